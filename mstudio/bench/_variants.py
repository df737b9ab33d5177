"""What ``mstudio bench`` times: the workload (a VPT size, a batch shape, synthetic batches) and the train steps.

Every variant trains its own copy of one freshly initialised policy (same weights) on the same batches with
behaviour cloning (weight 0.01) and AdamW (lr 1e-3, weight decay 0.1, warm-up 10, clipping at 1.0), and reads
the loss after each step as a logging loop does (a host sync, inside the timed step):

- ``minestudio_style``: MineStudio's per-batch loop (:mod:`mstudio.bench.minestudio_style`) on the module: the
  baseline of every speed-up;
- ``eager``: ``make_train_step(compile=False)``, the state donated (updated in place) as the Trainer runs it;
- ``eager_pure``: the same without donation, a new state every step;
- ``compiled``: ``make_train_step`` with its default arguments.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

import losses
import mstudio
from mstudio.bench._measure import count_flops
from mstudio.bench._presets import HYPER, SHAPES, VARIANTS
from mstudio.bench.minestudio_style import make_minestudio_step
from mstudio.data.synthetic import random_batch
from mstudio.models import VPTConfig, VPTPolicy

__all__ = ["Step", "Workload", "episode_batches", "make_step", "minestudio_step", "mstudio_step", "step_flops"]

#: One training step on a batch, returning the loss as a Python float (read as a logging loop would).
Step = Callable[[Mapping[str, Any]], float]


@dataclass(frozen=True)
class Workload:
    """One benchmark point: a VPT preset, optionally resized, and the batch shape it trains on."""

    config: str
    """VPT preset name (:meth:`VPTConfig.preset`: ``tiny``, ``small``, ``1x``, ...)."""
    batch: int
    """``B``, rows per batch."""
    seq: int
    """``T``, frames per row."""
    hidsize: int | None = None
    """Override of the preset's latent width (the sweep's third axis); ``None`` keeps the preset's."""
    device: str = "cpu"
    """Where the policy and the batches live."""
    seed: int = 0
    """Seeds the initial weights; batch ``i`` is drawn with seed ``i``."""

    def __post_init__(self) -> None:
        for name in ("batch", "seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload: {name} must be an integer >= 1, got {value!r}")
        self.vpt_config()  # an unknown preset or a hidsize the heads do not divide fails here

    @classmethod
    def preset(cls, config: str, batch: int | None = None, seq: int | None = None, **kwargs: Any) -> Workload:
        """The workload of ``config`` at its :data:`SHAPES` batch shape unless ``batch``/``seq`` are given."""
        VPTConfig.preset(config)  # an unknown name fails here, listing the presets
        default_batch, default_seq = SHAPES.get(config, (None, None))
        batch = default_batch if batch is None else batch
        seq = default_seq if seq is None else seq
        if batch is None or seq is None:
            raise ValueError(f"Workload: config {config!r} has no default batch shape (known: {sorted(SHAPES)}); "
                             "give batch and seq")
        return cls(config, batch, seq, **kwargs)

    def vpt_config(self) -> VPTConfig:
        """The network's :class:`VPTConfig`."""
        config = VPTConfig.preset(self.config)
        return config if self.hidsize is None else dataclasses.replace(config, hidsize=self.hidsize)

    @property
    def image(self) -> int:
        """Frame height (= width) in pixels."""
        return self.vpt_config().img_shape[0]

    @property
    def frames(self) -> int:
        """Frames per step, ``B * T``."""
        return self.batch * self.seq

    def policy(self) -> VPTPolicy:
        """A freshly initialised policy, the same for every call (seeded by :attr:`seed`)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return VPTPolicy(self.vpt_config()).to(self.device)

    def describe(self) -> dict[str, Any]:
        """The workload as recorded in a result."""
        return {**dataclasses.asdict(self), "hidsize": self.vpt_config().hidsize, "image": self.image,
                "frames_per_step": self.frames, "hyper": HYPER}


def episode_batches(batch_size: int, seq_len: int, image_size: int, count: int,
                    device: torch.device | str = "cpu") -> list[dict]:
    """``count`` consecutive windows per row (timestamps continue), so the memory is carried, never reset."""
    return [random_batch(batch_size, seq_len, image_size, seed=i, start=i * seq_len, device=device)
            for i in range(count)]


def _objective() -> Callable:
    return losses.weighted(losses.behavior_clone, HYPER["bc_weight"])


def minestudio_step(policy: torch.nn.Module) -> Step:
    """The baseline: MineStudio's step (:func:`make_minestudio_step`) on a copy of ``policy``, BC as the objective."""
    objective = _objective()
    hyper = {k: HYPER[k] for k in ("lr", "weight_decay", "warmup_steps", "clip_norm")}
    step = make_minestudio_step(copy.deepcopy(policy), lambda batch, latents: objective(batch, latents, {}), **hyper)
    return lambda batch: float(step(batch)[0]["loss"])


def mstudio_step(policy: torch.nn.Module, batch_size: int, *, compile: bool, donate: bool = False,
                 pack_optimizer: bool = True, compile_options: Mapping[str, Any] | None = None) -> Step:
    """mstudio's ``make_train_step`` (eager, or compiled with the default arguments but ``pack_optimizer`` and
    ``compile_options``), its state held here and donated to every step when ``donate``."""
    optimizer = mstudio.optim.adamw(HYPER["lr"], weight_decay=HYPER["weight_decay"],
                                    warmup_steps=HYPER["warmup_steps"], clip_norm=HYPER["clip_norm"])
    objective = _objective()
    train_step = (mstudio.make_train_step(policy, objective, optimizer, pack_optimizer=pack_optimizer,
                                          compile_options=compile_options) if compile
                  else mstudio.make_train_step(policy, objective, optimizer, compile=False))
    holder = {"state": mstudio.init_state(policy, optimizer, batch_size)}

    def step(batch: Mapping[str, Any]) -> float:
        holder["state"], metrics = train_step(holder["state"], batch, donate=donate)
        return float(metrics["loss"])

    return step


def make_step(variant: str, policy: torch.nn.Module, batch_size: int) -> Step:
    """The :data:`VARIANTS` step named ``variant`` for ``policy``; an unknown name raises ``ValueError``."""
    if variant == "minestudio_style":
        return minestudio_step(policy)
    if variant in ("eager", "eager_pure", "compiled"):
        return mstudio_step(policy, batch_size, compile=variant == "compiled", donate=variant == "eager")
    raise ValueError(f"unknown bench variant {variant!r}; known: {list(VARIANTS)}")


def step_flops(policy: torch.nn.Module, batch: Mapping[str, Any]) -> int:
    """FLOPs of one eager training step's forward and backward (BC loss) on a copy of ``policy``, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; the optimizer's elementwise
    work is not counted)."""
    policy = copy.deepcopy(policy)
    objective = _objective()
    memory = policy.initial_state(batch["timestamp"].shape[0])

    def forward_backward() -> None:
        latents, _ = policy(batch, memory)
        objective(batch, latents, {})["loss"].backward()

    return count_flops(forward_backward)
