"""The policy protocol: what mstudio asks of a policy module.

A policy is a plain ``nn.Module``; mstudio calls it statelessly, swapping the state's tensors in for the call as
``torch.func.functional_call`` does (see :mod:`mstudio.bridge`), so it must not write to itself during ``forward``.

Contract (shapes use ``B`` batch rows, ``T`` time steps):

``forward(batch, state_in) -> (latents, state_out)``
    ``batch`` is a dict with at least ``image``: uint8 ``(B, T, H, W, 3)``. ``state_in`` is the recurrent
    memory, a pytree of tensors whose every leaf has the batch on dim 0. ``latents`` is a dict with
    ``pi_logits = {"buttons": float32 (B, T, 1, 8641), "camera": float32 (B, T, 1, 121)}`` holding
    log-softmax values, and ``vpred``: ``(B, T, 1)``; policies may add keys (e.g. ``posterior_dist``).
    ``state_out`` has the structure, shapes and dtypes of ``state_in``.

``initial_state(batch_size) -> pytree``
    The memory at the beginning of an episode, batch on dim 0 of every leaf.

Also here, MineStudio's inference API for any such policy: :class:`DictActionHead` (``pi_head.logprob``,
``.entropy``, ``.sample`` over ``pi_logits``) and :func:`get_action` (``MinePolicy.get_action``).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import optree
import torch
from torch import Tensor, nn

from mstudio import distributions

__all__ = ["DictActionHead", "Latents", "Policy", "State", "check_policy", "get_action"]

State = Any  # a pytree of tensors, batch on dim 0 of every leaf
Latents = dict[str, Any]


@runtime_checkable
class Policy(Protocol):
    """Structural type of an mstudio policy (any ``nn.Module`` with these two methods)."""

    def forward(self, batch: Mapping[str, Any], state_in: State) -> tuple[Latents, State]: ...

    def initial_state(self, batch_size: int) -> State: ...


def check_policy(policy: torch.nn.Module) -> None:
    """Raise ``TypeError`` unless ``policy`` is an ``nn.Module`` that follows the :class:`Policy` protocol."""
    if not isinstance(policy, torch.nn.Module):
        raise TypeError(f"a policy must be a torch.nn.Module, got {type(policy).__name__}")
    if not callable(getattr(policy, "initial_state", None)):
        raise TypeError(
            f"{type(policy).__name__} has no initial_state(batch_size) method; mstudio policies return their "
            "episode-start memory from it (an empty tuple for a memoryless policy)"
        )


class DictActionHead(nn.ModuleDict):
    """Named action heads with MineStudio's ``DictActionHead`` API (``utils/vpt_lib/action_head.py``).

    A ``ModuleDict`` (so ``state_dict`` keys stay ``<name>.<child>...``) whose every head maps features to
    log-softmax logits float ``(B, T, 1, K)``. Calling it returns ``pi_logits``; the other methods are the
    categorical functions of :mod:`mstudio.distributions` applied per head, with MineStudio's shapes, so a
    MineStudio callback's ``mine_policy.pi_head.logprob(...)`` runs unchanged. Heads are visited in the
    dict's order (VPT: ``buttons``, then ``camera``), as MineStudio sums them.
    """

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Features ``(B, T, hidsize)`` -> ``pi_logits``: head name -> log-softmax ``(B, T, 1, K)``."""
        return {name: head(x) for name, head in self.items()}

    def _heads_of(self, tree: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
        missing = [name for name in self if name not in tree]
        if missing:
            raise ValueError(f"{what} lacks head(s) {missing}: pi_head has {list(self)}, {what} has {sorted(tree)}")
        return {name: tree[name] for name in self}

    def logprob(
        self, action: Mapping[str, Tensor], pi_logits: Mapping[str, Tensor], return_dict: bool = False
    ) -> Tensor | dict[str, Tensor]:
        """Log-probability of ``action`` (head -> long ``(B, T, 1)``): per head float ``(B, T)`` if
        ``return_dict``, else their sum ``(B, T)``."""
        logits = self._heads_of(pi_logits, "pi_logits")
        per_head = distributions.logprob(logits, self._heads_of(action, "action"))
        return per_head if return_dict else sum(per_head.values())

    def entropy(self, pi_logits: Mapping[str, Tensor], return_dict: bool = False) -> Tensor | dict[str, Tensor]:
        """Entropy per head, float ``(B, T)`` each if ``return_dict``, else their sum ``(B, T)``."""
        per_head = distributions.entropy(self._heads_of(pi_logits, "pi_logits"))
        return per_head if return_dict else sum(per_head.values())

    def sample(self, pi_logits: Mapping[str, Tensor], deterministic: bool = False) -> dict[str, Tensor]:
        """One action per step: head -> long ``(B, T, 1)``; the argmax if ``deterministic``, else a draw
        (Gumbel-max, as VPT's ``vanilla_sample``; MineStudio's optional nucleus sampling is not offered)."""
        logits = self._heads_of(pi_logits, "pi_logits")
        return distributions.mode(logits) if deterministic else distributions.sample(logits)

    def kl_divergence(self, logits_q: Mapping[str, Tensor], logits_p: Mapping[str, Tensor]) -> Tensor:
        """``KL(q || p)`` of the joint action, summed over heads: float ``(B, T, 1)`` (MineStudio keeps the dim)."""
        q, p = self._heads_of(logits_q, "logits_q"), self._heads_of(logits_p, "logits_p")
        per_head = distributions.per_head_kl(q, p)
        return sum(per_head.values()).unsqueeze(-1)


def _batchify(value: Any, device: torch.device) -> Any:
    """One observation entry -> a ``(1, 1, ...)`` tensor on ``device`` (strings -> ``[[s]]``), as MineStudio's
    ``MinePolicy._batchify``; anything else passes through."""
    if isinstance(value, str):
        return [[value]]
    if isinstance(value, (Tensor, int, float)) or hasattr(value, "__array_interface__"):
        return torch.as_tensor(value, device=device)[None, None]
    return value


@torch.no_grad()
def get_action(
    policy: nn.Module,
    obs: Mapping[str, Any],
    state_in: State | None,
    *,
    deterministic: bool = False,
    input_shape: str = "BT*",
) -> tuple[dict[str, Tensor], State]:
    """Act: MineStudio's ``MinePolicy.get_action`` for any policy of this protocol, without gradients.

    Args:
        policy: the policy.
        obs: observations. ``input_shape="BT*"``: batched windows, e.g. ``image`` uint8 ``(B, T, H, W, 3)``.
            ``input_shape="*"``: one frame, e.g. ``image`` uint8 ``(H, W, 3)`` (numpy or torch); every
            tensor-like entry gets batch and time dims of 1 and moves to the policy's device.
        state_in: the memory from the previous call, batch-first (``"BT*"``) or without the batch dim
            (``"*"``); ``None`` starts an episode (``policy.initial_state``).
        deterministic: take each head's most likely class instead of sampling it.
        input_shape: ``"BT*"`` or ``"*"``.

    Returns:
        ``(agent_action, state_out)``: ``agent_action`` = head -> long ``(B, T, 1)`` (``"*"``: ``(1,)``), joint
        indices that :func:`mstudio.actions.agent_to_env` turns into env buttons and camera degrees;
        ``state_out`` shaped as ``state_in`` (``"*"``: without the batch dim).

    Unlike MineStudio, nothing is cached on the policy (no ``policy.vpred``): call ``policy(obs, state)``
    for the latents.
    """
    if input_shape not in ("BT*", "*"):
        raise ValueError(f"input_shape must be 'BT*' (batched windows) or '*' (one frame), got {input_shape!r}")
    single = input_shape == "*"
    if single:
        device = next(policy.parameters()).device
        obs = {key: _batchify(value, device) for key, value in obs.items()}
        if state_in is not None:
            state_in = optree.tree_map(lambda t: t.unsqueeze(0), state_in)
    if "image" not in obs or not isinstance(obs["image"], Tensor):
        raise ValueError(f"get_action needs obs['image'] (a frame or a batch of windows); obs has {sorted(obs)}")
    if state_in is None:
        state_in = policy.initial_state(obs["image"].shape[0])
    latents, state_out = policy(obs, state_in)
    pi_logits = latents["pi_logits"]
    action = distributions.mode(pi_logits) if deterministic else distributions.sample(pi_logits)
    if single:
        return {head: a[0, 0] for head, a in action.items()}, optree.tree_map(lambda t: t[0], state_out)
    return action, state_out
