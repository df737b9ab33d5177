"""VPT's max-pool, run by ATen's kernels inside a compiled step too.

Inductor compiles ``max_pool2d`` into its own C++ loops, the backward as a zero fill and a scatter (torch 2.13's
decomposition); ATen's CPU kernels do both faster. Traced by the compiled train step on CPU (:func:`aten_max_pool`),
:func:`max_pool2d` therefore calls ATen through two operators inductor cannot see into, ``mstudio::max_pool2d``
and ``mstudio::max_pool2d_backward``, joined by an ``autograd.Function``. Measured on 2 cores, two fresh processes
each way (``mstudio bench`` presets, compiled step, 80 steps): VPT ``tiny`` 13.55 / 13.56 -> 12.88 / 13.19 ms a
step, ``small`` 166.9 / 167.0 -> 162.4 / 167.7 ms (within noise), cold compile tiny 53.6 -> 45.4 s and small
57.3 -> 51.0 s (fewer kernels to generate and build); warm starts unchanged (8.0 / 8.7 s).

Values and gradients are ATen's, as in the eager step, ties included (inductor's own backward routes ties
the same way; its rounding of what surrounds the pool differs, as any compiled graph's does).

Why not ``torch.library.custom_op`` with ``register_autograd``: its autograd does not run under
``torch.func.grad`` (the compiled step's transform), eagerly or traced. An ``autograd.Function`` with
``setup_context`` does, and dynamo traces it whole; AOTAutograd's cache then needs
``autograd_cache_allow_custom_autograd_functions``, which mstudio's compiled calls set (see
:func:`mstudio.compile.compiled_call`). Eagerly :func:`max_pool2d` is ``F.max_pool2d`` itself.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mstudio.operators import define

__all__ = ["aten_max_pool", "max_pool2d", "with_aten_max_pool"]

#: Whether traced :func:`max_pool2d` goes through ATen's kernels; read while dynamo traces (so guarded on),
#: set by :func:`aten_max_pool`.
_aten_when_traced = False


def _forward(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> tuple[Tensor, Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding)


def _backward(grad: Tensor, x: Tensor, indices: Tensor, kernel_size: list[int], stride: list[int],
              padding: list[int]) -> Tensor:
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, [1, 1], False,
                                                           indices)


# Under FakeTensor the same functions give the shapes, strides and dtypes: ATen's meta kernels.
_max_pool = define("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> (Tensor, Tensor)",
                   _forward)
_max_pool_backward = define("max_pool2d_backward(Tensor grad, Tensor x, Tensor indices, int[2] kernel_size, "
                            "int[2] stride, int[2] padding) -> Tensor", _backward)


class _MaxPool2d(torch.autograd.Function):
    """The two operators as one differentiable function (``setup_context`` style: ``torch.func`` transforms
    accept no other)."""

    @staticmethod
    def forward(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> tuple[Tensor, Tensor]:
        return tuple(_max_pool(x, kernel_size, stride, padding))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.kernel_size, ctx.stride, ctx.padding = inputs
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _indices_grad: Tensor | None):
        x, indices = ctx.saved_tensors
        return _max_pool_backward(grad, x, indices, ctx.kernel_size, ctx.stride, ctx.padding), None, None, None


def max_pool2d(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` of ``x`` ``(N, C, H, W)``, the same values and gradient;
    traced by ``torch.compile`` inside :func:`aten_max_pool` on CPU, through ATen's kernels rather than inductor's
    (see the module's docstring).

    Returns:
        ``(N, C, H_out, W_out)``, ``x``'s dtype and memory format.
    """
    # CPU only: that is where it was measured; on CUDA inductor's pool (Triton) is left as it is.
    if not (torch.compiler.is_compiling() and _aten_when_traced and x.device.type == "cpu"):
        return F.max_pool2d(x, kernel_size=kernel_size, stride=stride, padding=padding)
    return _MaxPool2d.apply(x, [kernel_size] * 2, [stride] * 2, [padding] * 2)[0]


@contextlib.contextmanager
def aten_max_pool() -> Iterator[None]:
    """Within this block, compiled code traces :func:`max_pool2d` through ATen's kernels (outside it, as
    ``F.max_pool2d``, which inductor compiles).

    The compiled train step enters it around every call (:func:`with_aten_max_pool`; the traced code is guarded
    on the setting, and the other one would recompile). Only there: the route is tested under
    ``torch.func.grad_and_value``, the step's transform. Under ``torch.func.vmap`` dynamo cannot trace an
    ``autograd.Function`` (:class:`~mstudio.research.SweepStep` would fail), and under a traced
    ``torch.func.vjp`` the gradient came out wrong, silently (torch 2.13).
    """
    global _aten_when_traced
    before, _aten_when_traced = _aten_when_traced, True
    try:
        yield
    finally:
        _aten_when_traced = before


def with_aten_max_pool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a compiled train step) called inside :func:`aten_max_pool`."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with aten_max_pool():
            return fn(*args, **kwargs)

    return call
