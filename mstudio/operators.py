"""mstudio's own operators (``torch.ops.mstudio.*``): small pieces a compiled step must keep opaque to inductor.

They are defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: a compiled step calls
them every step, and custom_op's Python wrapper costs tens of microseconds a call (inside VPT ``tiny``'s compiled
step ``restore_unless_`` took ~75 us a call that way, ~17 us defined here; ``computed_once`` ~80 vs ~29 us).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["define"]

_LIBRARY = torch.library.Library("mstudio", "FRAGMENT")


def define(schema: str, kernel: Callable, fake: Callable | None = None) -> torch._ops.OpOverload:
    """Define ``mstudio::<schema>`` (e.g. ``"computed_once(Tensor x) -> Tensor"``), run by ``kernel`` on every
    device, and by ``fake`` under FakeTensor (tracing); ``fake=None``: ``kernel`` itself, for kernels made of ATen
    operators, whose meta functions then give the shapes. Returns the operator's default overload."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mstudio::{name}", fake or kernel, lib=_LIBRARY)
    return getattr(torch.ops.mstudio, name).default
