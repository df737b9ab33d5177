"""Writing a run's resolved config as TOML (the standard library reads TOML but does not write it)."""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["dump_toml"]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def dump_toml(table: Mapping[str, Any]) -> str:
    """A two-level table (``{"section": {"key": value}}``, top-level scalars first) as TOML text.

    Values are bools, numbers, strings and lists of them; ``None`` has no TOML form and must be left out.
    """
    lines = [f"{key} = {_value(value)}" for key, value in table.items() if not isinstance(value, Mapping)]
    for section, values in table.items():
        if isinstance(values, Mapping):
            lines += ["", f"[{section}]"] + [f"{json.dumps(k)} = {_value(v)}" for k, v in values.items()]
    return "\n".join(lines).lstrip("\n") + "\n"
