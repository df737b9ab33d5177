"""A policy paired with a frozen reference copy of itself, for objectives that compare the two (``reference_kl``)."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import optree
import torch
from torch import Tensor, nn

from mstudio.policy import Latents, State, check_policy

__all__ = ["WithReference"]


class WithReference(nn.Module):
    """``policy`` plus a frozen copy of its current weights, whose logits the forward adds to the latents.

    The copy's weights are **buffers**: :func:`mstudio.functionalize` puts them in ``state.buffers``, so the
    optimizer never sees them (no gradients, no Adam moments, no weight decay) and every step reads them
    unchanged. The reference runs under ``torch.no_grad()``: one extra forward per step, no extra backward.
    State-dict names get a prefix: ``policy.<name>`` for the trained weights, ``reference.<name>`` for the
    frozen ones; after training, ``model.load_state_dict({**state.params, **state.buffers})`` and
    ``model.policy`` is the trained policy.

    Example::

        model = WithReference(pretrained_vpt)
        objective = losses.combine(losses.behavior_clone, losses.weighted(losses.reference_kl, 0.1))
        step = mstudio.make_train_step(model, objective, mstudio.optim.adamw(1e-4))

    Args:
        policy: the policy to train (kept as is, not copied), following :mod:`mstudio.policy`.
        reference: the frozen module (same action heads), for distillation from another policy; default a copy
            of ``policy`` as it is now. Either way it is deep-copied, so the module passed is left alone.
    """

    def __init__(self, policy: nn.Module, *, reference: nn.Module | None = None):
        super().__init__()
        check_policy(policy)
        if reference is not None:
            check_policy(reference)
        self.policy = policy
        self.reference = _frozen_copy(policy if reference is None else reference)

    def train(self, mode: bool = True) -> "WithReference":
        """Set the policy's mode; the reference stays in eval mode (a frozen teacher: no dropout)."""
        super().train(mode)
        self.reference.eval()
        return self

    def initial_state(self, batch_size: int) -> tuple[State, State]:
        """``(policy.initial_state(B), reference.initial_state(B))``: the two carry their own memory."""
        return self.policy.initial_state(batch_size), self.reference.initial_state(batch_size)

    def forward(self, batch: Mapping[str, Any], state_in: tuple[State, State]) -> tuple[Latents, tuple[State, State]]:
        """Args: ``batch`` as the policy takes it; ``state_in = (policy_state, reference_state)``.

        Returns: the policy's latents plus ``"reference_pi_logits"`` (the reference's ``pi_logits``, same layout,
        detached) and ``state_out = (policy_state_out, reference_state_out)``.
        """
        if not (isinstance(state_in, (tuple, list)) and len(state_in) == 2):
            raise ValueError(
                "WithReference needs state_in = (policy_state, reference_state), as its initial_state(batch_size) "
                f"returns; got {type(state_in).__name__}"
                + (f" of length {len(state_in)}" if isinstance(state_in, (tuple, list)) else "")
            )
        policy_state, reference_state = state_in
        latents, policy_out = self.policy(batch, policy_state)
        with torch.no_grad():
            reference_latents, reference_out = self.reference(batch, reference_state)
        if "pi_logits" not in reference_latents:
            raise ValueError(
                f"the reference policy's latents lack 'pi_logits'; it returned {sorted(reference_latents)}"
            )
        latents = {**latents, "reference_pi_logits": _detach(reference_latents["pi_logits"])}
        return latents, (policy_out, _detach(reference_out))


def _detach(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are buffers (tied parameters stay tied), in eval mode."""
    frozen = copy.deepcopy(module)
    as_buffer: dict[int, Tensor] = {}
    for sub in frozen.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            buffer = as_buffer.setdefault(id(param), param.detach().clone())
            del sub._parameters[name]
            sub.register_buffer(name, buffer)
        if hasattr(sub, "_init_flat_weights"):  # nn.RNNBase caches its weights in a list: rebuild it
            sub._init_flat_weights()
    return frozen.eval()
