"""Naming what was not recognised: shared by every error that lists unknown keys, options or entries."""

from __future__ import annotations

import difflib
from typing import Iterable


def unknown_names(unknown: Iterable[str], known: Iterable[str]) -> str:
    """``'hidsze' (did you mean 'hidsize'?), 'foo'``: each unknown name, with the closest known one if any."""
    known = list(known)
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(parts)
