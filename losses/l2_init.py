"""L2-SP: an L2 penalty towards the starting weights (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias
for Transfer Learning with Convolutional Networks")."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import Tensor

from losses.api import Objective

__all__ = ["l2_init"]


def l2_init(initial_params: Mapping[str, Tensor], *, names: Iterable[str] | None = None) -> Objective:
    """An objective pulling parameters back to ``initial_params``: ``loss = sum_i ||p_i - p0_i||^2``.

    The anchors ``p0_i`` are detached copies taken now, when the objective is built, so later changes to
    ``initial_params`` (or training the module they came from) do not move them; ``initial_params`` itself
    is not modified. Usually ``initial_params = mstudio.init_state(policy, ...).params`` (or
    ``dict(policy.named_parameters())``), before training starts.

    The objective reads ``params`` (name -> tensor, what the train step passes) and neither ``batch`` nor
    ``latents``; it applies no mask (a penalty on weights, not on steps). Weight it with
    :func:`losses.weighted`, e.g. ``combine(behavior_clone, weighted(l2_init(state.params), 1e-4))``. Unlike
    weight decay, which pulls towards 0, it keeps a fine-tuned VPT near its pretrained weights.

    Args:
        initial_params: name -> tensor. Only floating-point tensors are anchored (integer buffers are skipped
            when ``names`` is ``None``).
        names: anchor only these parameters (default: every float tensor of ``initial_params``).

    Returns:
        ``objective(batch, latents, params) -> {"loss", "l2_init"}`` (``l2_init``: the same sum, detached),
        scalars in the parameters' dtype. Every call checks that ``params`` holds every anchored name with
        the anchor's shape (a ``ValueError`` naming them otherwise).

    Raises:
        ValueError: ``names`` lists a name ``initial_params`` lacks or a non-float tensor, or nothing to anchor.
    """
    if not isinstance(initial_params, Mapping):
        raise TypeError(
            f"l2_init needs initial_params as a mapping name -> tensor, got {type(initial_params).__name__}"
        )
    if names is None:
        selected = [n for n, t in initial_params.items() if _is_float(t)]
    else:
        if isinstance(names, str):
            raise TypeError(f"l2_init needs names as a list of parameter names, got the string {names!r}")
        selected = list(dict.fromkeys(names))
        missing = [n for n in selected if n not in initial_params]
        if missing:
            raise ValueError(
                f"l2_init: names {missing} are not in initial_params, which has {_preview(initial_params)}"
            )
        not_float = [n for n in selected if not _is_float(initial_params[n])]
        if not_float:
            raise ValueError(f"l2_init anchors floating-point parameters only; {not_float} are not float tensors")
    if not selected:
        raise ValueError("l2_init has nothing to anchor: initial_params has no floating-point tensor among the names")
    anchors = {name: initial_params[name].detach().clone() for name in selected}

    def l2_init_objective(
        batch: Mapping[str, Any], latents: Mapping[str, Any], params: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        del batch, latents
        _check_params(anchors, params)
        # A Python sum, not torch.stack: parameters of different dtypes promote instead of failing.
        total = sum((params[name] - anchor.to(params[name])).square().sum() for name, anchor in anchors.items())
        return {"loss": total, "l2_init": total.detach()}

    l2_init_objective.__name__ = "l2_init"
    l2_init_objective.names = tuple(anchors)
    return l2_init_objective


def _check_params(anchors: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` unless ``params`` has every anchored name with the anchor's shape."""
    missing = [name for name in anchors if name not in params]
    if missing:
        raise ValueError(
            f"l2_init was built with anchors {missing} that params lacks (params has {_preview(params)}); build it "
            "from the parameters of the policy being trained (init_state(...).params), or pass names="
        )
    wrong = [f"{name}: anchor {tuple(a.shape)}, param {tuple(params[name].shape)}"
             for name, a in anchors.items() if tuple(params[name].shape) != tuple(a.shape)]
    if wrong:
        raise ValueError(f"l2_init anchors and params differ in shape: {'; '.join(wrong)}")


def _is_float(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _preview(mapping: Mapping[str, Any], limit: int = 8) -> str:
    keys = sorted(mapping)
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} ... ({len(keys)} names)"
