"""Inductor's fusion heuristic, widened for the loops of a compiled step's optimizer update.

Inductor fuses two loops that read the same tensors only when they sit within 64 nodes of each other in the graph
(``Scheduler.are_long_distant_nodes``: fusing far-apart loops can keep tensors alive longer and raise peak
memory). An optimizer update is traced transformation by transformation, each over every parameter group, so with
tens of groups (VPT ``small``: 16 large tensors and one packed buffer) a tensor's new first moment, new second
moment and new value end up far apart, and each becomes a loop of its own that reads the gradient and the
moments again: four passes over each large tensor instead of two.

:func:`output_fusion_choices` lets two such loops fuse anyway when distance is inductor's only objection, both
run on the CPU, and every tensor either loop writes is one the graph returns, one only that loop reads, or a
single element. Such a fusion only moves where the graph's own results are written, so the memory argument
behind the limit hardly applies; in the forward and backward passes loops write activations and gradients, which
the graph does not return, and there the limit stands. Measured on 2 cores (two fresh processes each way, the
``mstudio bench`` presets, the same losses bit for bit): VPT ``small`` 148.4 / 146.9 -> 144.4 / 142.4 ms a step,
``1x`` 799.0 / 789.2 -> 776.0 / 774.3 ms; peak memory within the run-to-run noise (``1x``, two fresh processes each
way: 3459 / 3259 MiB before, 3458 / 3299 MiB after).

:func:`mstudio.compile.compiled_call` installs it around every compiled call (:func:`output_fusion`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

__all__ = ["output_fusion", "output_fusion_choices"]

#: Names this version of the heuristic in inductor's cache keys (a compiled graph cached under the default
#: heuristic is not reused under this one, nor the other way round).
_UUID = "mstudio.fusion_choices.output_fusion/1"


def _writes_only_outputs(node: Any, outputs: set[str]) -> bool:
    """Whether every buffer scheduler ``node`` writes is a graph output (its name in ``outputs``), read only
    inside ``node``, or a single element."""
    own = node.get_operation_names()
    for buf in node.get_outputs():
        if buf.get_name() in outputs or all(user.get_name() in own for user in buf.users):
            continue
        try:
            if int(buf.node.get_numel()) <= 1:
                continue
        except TypeError:  # a symbolic size: not known to be a single element
            pass
        return False
    return True


@functools.cache
def _choices_class() -> type:
    # Defined on first use: importing inductor takes seconds, which `import mstudio` does not pay.
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class OutputFusionChoices(InductorChoices):
        """Inductor's default choices, except that loops writing only the graph's outputs fuse at any
        distance (see :mod:`mstudio.fusion_choices`)."""

        @staticmethod
        def can_fuse_horizontal(scheduler, node1, node2, shared_data_score) -> bool:
            if InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score):
                return True
            if shared_data_score < config.score_fusion_memory_threshold:
                return False
            if not scheduler.are_long_distant_nodes(node1, node2):
                return False  # refused for another reason than distance
            if any(getattr(node.get_device(), "type", None) != "cpu" for node in (node1, node2)):
                return False
            outputs = set(V.graph.get_output_names())
            return _writes_only_outputs(node1, outputs) and _writes_only_outputs(node2, outputs)

        def uuid(self) -> str:
            return _UUID

    return OutputFusionChoices


@functools.cache
def output_fusion_choices() -> Any:
    """The ``torch._inductor.choices.InductorChoices`` with the widened fusion rule (see the module); one
    instance (it holds no state)."""
    return _choices_class()()


@functools.cache
def _hooks() -> tuple[Any, Any] | None:
    """``(inductor's config module, its virtualized V)`` when this torch has both hooks the block needs, else
    ``None`` (looked up once: :func:`output_fusion` runs around every compiled call)."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    if not hasattr(InductorChoices, "can_fuse_horizontal") or not hasattr(config, "inductor_choices_class"):
        return None
    return config, V


@contextlib.contextmanager
def output_fusion() -> Iterator[None]:
    """Within this block, inductor compiles with :func:`output_fusion_choices` on this thread, and its caches key
    on it. With a torch that lacks either hook (``InductorChoices.can_fuse_horizontal``,
    ``torch._inductor.config.inductor_choices_class``) the block changes nothing. ~12 us a call."""
    hooks = _hooks()
    if hooks is None:
        yield
        return
    config, V = hooks
    # The handler first: entering it reads the thread's current choices to restore, which inductor builds from
    # the config the first time; with the config already changed it would "restore" these choices.
    with V.set_choices_handler(output_fusion_choices()):  # what this thread's compiles use
        before = config.inductor_choices_class
        config.inductor_choices_class = output_fusion_choices  # the caches' key (its uuid)
        try:
            yield
        finally:
            config.inductor_choices_class = before
