"""MineStudio's offline train step, written once: the baseline of ``mstudio bench`` and of the tests.

:func:`make_minestudio_step` does per batch what MineStudio 1.1.6's ``MineLightning`` and Lightning's optimizer
loop do (``minestudio/offline/trainer.py``): ``_make_memory`` (rows whose ``timestamp[:, 0] != last + 1``
restart from ``policy.initial_state(B)``), the module's forward, the objective, ``loss.backward()``,
``clip_grad_norm_`` over the parameters that have a gradient (Trainer ``gradient_clip_val``),
``torch.optim.AdamW.step()``, the ``LambdaLR`` warm-up ``min((k + 1) / warmup, 1)``, ``zero_grad``, and the
detached ``state_out`` carried to the next batch.

Two places run it: ``mstudio bench`` (variant ``minestudio_style``, on mstudio's own ``VPTPolicy``) and, as a
script, a venv with ``minestudio==1.1.6`` (``mstudio bench --minestudio-python``), where it steps MineStudio's own
``VPTPolicy`` in a long-lived process that takes turns with the benchmark's rounds. So it imports torch and the
standard library only (no mstudio: that venv has none), and this folder holds no module named like a standard one.

    python mstudio/bench/minestudio_style.py inputs.pt 2   # in a venv with minestudio==1.1.6
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MineStudioStep", "Objective", "make_minestudio_step", "reset_memory"]

#: ``(batch, latents) -> {"loss": scalar, **metrics}``: MineStudio's callbacks, summed.
Objective = Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]]
#: ``batch -> (detached objective outputs, carried memory)``; trains the policy in place.
MineStudioStep = Callable[[Mapping[str, Any]], tuple[dict[str, Any], tuple[Tensor, ...]]]


def reset_memory(memory: Sequence[Tensor], init_memory: Sequence[Tensor], begins: Tensor) -> tuple[Tensor, ...]:
    """MineStudio's ``_make_memory`` reset: rows where ``begins`` (bool ``(B,)``) take ``init_memory``.

    MineStudio indexes ``boe[:, None, None]``, which assumes 3-d leaves (VPT's); viewing ``begins`` as
    ``(B, 1, ..., 1)`` is the same for those and also fits policies with leaves of other ranks.
    """
    return tuple(
        torch.where(begins.view(-1, *[1] * (m.dim() - 1)), i, m) for m, i in zip(memory, init_memory, strict=True)
    )


def make_minestudio_step(
    policy: nn.Module,
    objective: Objective,
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    clip_norm: float | None,
) -> MineStudioStep:
    """A step as ``MineLightning.training_step`` and Lightning's optimizer loop run it, training ``policy`` in place.

    Args:
        policy: ``forward(batch, state_in) -> (latents, state_out)`` and ``initial_state(B)``; pass a copy
            to keep the original.
        objective: ``(batch, latents) -> {"loss": scalar, ...}`` (MineStudio's callbacks, summed).
        lr: AdamW's peak learning rate.
        weight_decay: AdamW's decoupled weight decay (all parameters decayed, no groups, as MineStudio).
        warmup_steps: ``LambdaLR`` warm-up ``min((k + 1) / warmup_steps, 1)``, stepped after every update.
        clip_norm: global gradient-norm clip (Trainer ``gradient_clip_val``), or ``None`` for no clipping.

    Returns:
        ``step(batch) -> (outputs, memory)``: the objective's outputs detached, and the memory carried to the next
        batch. As MineStudio, the memory starts with ``initial_state`` of the first batch's size.
    """
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min((k + 1) / warmup_steps, 1))
    init_memory: tuple[Tensor, ...] = ()
    memory: tuple[Tensor, ...] = ()
    last_timestamp: Tensor | None = None

    def step(batch: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        nonlocal init_memory, memory, last_timestamp
        timestamp = batch["timestamp"]
        if last_timestamp is None:
            init_memory = memory = tuple(policy.initial_state(timestamp.shape[0]))
            last_timestamp = torch.zeros(timestamp.shape[0], dtype=torch.long, device=timestamp.device)
        memory = reset_memory(memory, init_memory, timestamp[:, 0] != last_timestamp + 1)
        last_timestamp = timestamp[:, -1]
        latents, state_out = policy(batch, memory)
        outputs = dict(objective(batch, latents))
        outputs["loss"].backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        memory = tuple(s.detach() for s in state_out)
        # MineStudio's callbacks return some metrics as Python floats (bc_weight).
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in outputs.items()}, memory

    return step


#: Prefix of the lines the server writes for the benchmark (MineStudio prints its own lines on stdout too).
REPLY = "@mstudio-bench "


def _serve_minestudio_vpt(argv: Sequence[str] | None = None) -> None:
    """Step MineStudio's own ``VPTPolicy`` with its ``BehaviorCloneCallback``, one batch per request.

    Runs only in a venv with ``minestudio==1.1.6`` (see ``shared/minestudio_reference.md``). Reads the inputs
    ``mstudio bench`` saved, replies ``{"ready": true}``, then for each line ``<i> <lead>`` on stdin steps on
    batch ``i`` ``lead`` times untimed and once timed (the loss read as a float, as a logging loop does) and
    replies ``{"seconds": ..., "loss": ...}`` of the timed step; ends at end of input. Each reply is one JSON line after :data:`REPLY`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2 or not argv[1].isdigit():
        raise SystemExit(f"usage: python {__file__} INPUTS.pt THREADS (got {argv})")
    inputs, threads = argv[0], int(argv[1])
    from minestudio.models import VPTPolicy
    from minestudio.offline.mine_callbacks import BehaviorCloneCallback

    torch.set_num_threads(threads)
    data = torch.load(inputs, weights_only=True)
    hyper = json.loads(data["hyper"])
    policy = VPTPolicy(policy_kwargs=json.loads(data["policy_kwargs"]))
    policy.load_state_dict(data["state_dict"])
    callback = BehaviorCloneCallback(weight=hyper["bc_weight"])
    step = make_minestudio_step(
        policy, lambda batch, latents: callback(batch, 0, "train", latents, policy),
        lr=hyper["lr"], weight_decay=hyper["weight_decay"], warmup_steps=hyper["warmup_steps"],
        clip_norm=hyper["clip_norm"],
    )
    print(REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        index, lead = map(int, line.split())
        batch = data["batches"][index]
        for _ in range(lead):
            step(batch)
        start = time.perf_counter()
        loss = float(step(batch)[0]["loss"])
        seconds = time.perf_counter() - start
        print(REPLY + json.dumps({"seconds": seconds, "loss": loss}), flush=True)


if __name__ == "__main__":
    _serve_minestudio_vpt()
