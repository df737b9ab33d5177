"""What a training run is, as typed dataclasses read from TOML; every bad value fails before any work.

A config file has one table per part (every key optional; the defaults train VPT ``tiny`` with behaviour
cloning on a built-in synthetic store)::

    [data]        store, window, batch_size, sampler, skip_frame, drop_null, num_workers, val_episodes
    [policy]      preset, weights
    [objectives]  behavior_clone = 1.0, kl_gaussian = 0.5     (name = weight)
    [optimizer]   lr, weight_decay, warmup_steps, clip_norm, betas, eps
    [run]         name, out, max_steps, log_every, val_every, val_batches, ckpt_every, keep_checkpoints,
                  ema_decay, compile, cpp_wrapper, seed
    [distributed] timeout, check_replicas_every, shard    (data-parallel runs under torchrun)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mstudio._names import unknown_names
from mstudio.models.vpt.config import VPTConfig

__all__ = ["OBJECTIVES", "ConfigError", "DataConfig", "DistributedConfig", "OptimizerConfig", "PolicyConfig", "RunConfig", "TrainConfig",
           "config_from_dict", "load_config", "read_config_table"]

#: Objectives a config may name, with the ``losses`` function each stands for.
OBJECTIVES = ("behavior_clone", "kl_gaussian")


class ConfigError(ValueError):
    """A config value that is not allowed: the message names the key, what is allowed and what came."""


@dataclass(frozen=True)
class DataConfig:
    store: str | None = None
    """Episode store directory; ``None``: the built-in synthetic store (made on first use, then reused)."""
    window: int = 16
    """``T``: steps per window."""
    batch_size: int = 4
    """``B``: rows per batch on each rank (under ``torchrun --nproc_per_node=N`` a step trains on ``N * B`` rows)."""
    sampler: str = "continuous"
    """``"continuous"`` (episode-continuous rows, memory carried; MineStudio's sampler) or ``"random"``."""
    skip_frame: int = 1
    """Take every ``skip_frame``-th frame."""
    drop_null: bool = False
    """Leave out frames flagged null (no button, camera at rest; VPT drops them) before ``skip_frame`` applies;
    off by default, as in MineStudio (``mstudio.data.WindowDataset`` has the details)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    val_episodes: int = 2
    """Episodes held out (the store's last ones) for validation; 0: no validation."""


@dataclass(frozen=True)
class PolicyConfig:
    preset: str = "tiny"
    """VPT size (``mstudio.models.VPTConfig`` presets: tiny, small, 1x, 2x, 3x); ignored with ``weights``."""
    weights: str | None = None
    """Pretrained weights: a local Hugging Face-layout folder (config.json + model.safetensors) or an exported
    ``policy.safetensors``; never downloaded."""


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate (MineStudio's ``learning_rate``)."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    warmup_steps: int = 0
    """Linear warmup length: update k uses ``lr * min((k + 1) / warmup_steps, 1)``."""
    clip_norm: float | None = None
    """Global gradient-norm clip (Lightning's ``gradient_clip_val``); ``None``: off."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's ``(b1, b2)``."""
    eps: float = 1e-8
    """Adam's epsilon."""


@dataclass(frozen=True)
class RunConfig:
    name: str | None = None
    """Run directory name under ``out``; ``None``: a time stamp."""
    out: str = "runs"
    """Where run directories go."""
    max_steps: int = 300
    """Updates to train for (a resumed run continues up to this count)."""
    log_every: int = 10
    """Read metrics to the host and log them every this many steps."""
    val_every: int = 100
    """Validate every this many steps (and at the end); 0: never."""
    val_batches: int = 4
    """Batches per validation pass."""
    ckpt_every: int = 100
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept."""
    ema_decay: float | None = None
    """Keep an EMA of the parameters with this decay (used for validation and export); ``None``: off."""
    compile: bool = True
    """Compile the train step into one graph (``torch.compile``); ``False``: eager."""
    cpp_wrapper: bool = False
    """Compiled, call the kernels from a C++ wrapper instead of Python (inductor's ``cpp_wrapper``): on 2 CPU
    cores VPT ``tiny``'s step 6 % faster, ``small``'s 2 %, for a longer cold compile (``tiny``: 85 s, where the
    default builds its kernels in batches in 53 s). No effect on an eager step."""
    seed: int = 0
    """Seeds the policy's initialisation and the samplers."""


@dataclass(frozen=True)
class ResearchConfig:
    every: int = 0
    """Run a gradient-diagnostics pass every this many steps and log it under ``research/`` (0: never). It
    compares each configured objective's gradient (and, with ``behavior_clone``, its camera and button terms):
    ``research/grad_norm/<term>``, ``research/grad_cosine/<a>__<b>``, ``research/loss/<term>``."""


@dataclass(frozen=True)
class DistributedConfig:
    timeout: float = 600.0
    """Seconds a collective waits for the other ranks before it fails, so that a rank that died or hangs stops the
    others with an error; it must exceed how far ranks drift apart (the first step's compilation, a checkpoint
    written by rank 0 alone). Ignored in a single process."""
    check_replicas_every: int = 0
    """Debug: every this many steps check that parameters and optimizer state are bit-identical on every rank (an
    error names the first tensor that differs); 0: only at the first step."""
    shard: bool = False
    """Keep parameters, EMA and Adam moments sharded across ranks between steps (``Shard(0)`` DTensors,
    :mod:`mstudio.train.sharded`: ``1 / world_size`` of the train state per rank; the whole model is gathered for
    each forward/backward). Eager only (``run.compile = false``). Checkpoints hold the full state as without it, so
    a run may resume with or without sharding. Ignored in a single process."""


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    objectives: dict[str, float] = field(default_factory=lambda: {"behavior_clone": 1.0})
    """Objective name -> weight (see :data:`OBJECTIVES`)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    research: ResearchConfig = field(default_factory=ResearchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML- and JSON-able; ``None`` values left out, as TOML has no null)."""
        return _drop_none(dataclasses.asdict(self))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return list(value) if isinstance(value, tuple) else value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against ``annotation`` (int, float, str, bool, X | None, tuple[float, float])."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return value


def _check_known(names: Any, known: Any, what: str) -> None:
    """``ConfigError`` naming the names not in ``known`` (each with the close known name, if any)."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"{what} {unknown_names(unknown, known)}; allowed: {sorted(known)}")


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__} {table!r}")
    hints = typing.get_type_hints(cls)
    _check_known(table, hints, f"{where}: unknown key(s)")
    return cls(**{key: _coerce(value, hints[key], f"{where}.{key}") for key, value in table.items()})


def _check(condition: bool, where: str, allowed: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{where}: must be {allowed}, got {value!r}")


def _is_directory_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and os.sep not in name


def _validate(config: TrainConfig) -> None:
    data, run, opt = config.data, config.run, config.optimizer
    for where, value in (("data.window", data.window), ("data.batch_size", data.batch_size),
                         ("data.skip_frame", data.skip_frame), ("run.max_steps", run.max_steps),
                         ("run.log_every", run.log_every), ("run.val_batches", run.val_batches),
                         ("run.keep_checkpoints", run.keep_checkpoints)):
        _check(value >= 1, where, "an integer >= 1", value)
    for where, value in (("data.num_workers", data.num_workers), ("data.val_episodes", data.val_episodes),
                         ("run.val_every", run.val_every), ("run.ckpt_every", run.ckpt_every),
                         ("optimizer.warmup_steps", opt.warmup_steps), ("run.seed", run.seed),
                         ("research.every", config.research.every),
                         ("distributed.check_replicas_every", config.distributed.check_replicas_every)):
        _check(value >= 0, where, "an integer >= 0", value)
    _check(data.sampler in ("continuous", "random"), "data.sampler", "one of ['continuous', 'random']", data.sampler)
    _check(config.policy.preset in VPTConfig.preset_names(), "policy.preset", f"one of {sorted(VPTConfig.preset_names())}",
           config.policy.preset)
    _check(opt.lr >= 0 and opt.lr != float("inf"), "optimizer.lr", "a finite number >= 0", opt.lr)
    _check(0 <= opt.weight_decay < float("inf"), "optimizer.weight_decay", "a finite number >= 0", opt.weight_decay)
    _check(opt.clip_norm is None or opt.clip_norm > 0, "optimizer.clip_norm", "a number > 0", opt.clip_norm)
    _check(all(0 <= b < 1 for b in opt.betas), "optimizer.betas", "two numbers in [0, 1)", list(opt.betas))
    _check(0 < opt.eps < float("inf"), "optimizer.eps", "a finite number > 0", opt.eps)
    _check(0 < config.distributed.timeout < float("inf"), "distributed.timeout", "a finite number of seconds > 0",
           config.distributed.timeout)
    _check(not (config.distributed.shard and run.compile), "distributed.shard",
           "false when run.compile = true (the sharded step runs eagerly: set run.compile = false)",
           config.distributed.shard)
    _check(run.ema_decay is None or 0 <= run.ema_decay < 1, "run.ema_decay", "a number in [0, 1)", run.ema_decay)
    _check(run.seed < 2**64, "run.seed", "an integer >= 0 and < 2**64 (torch.manual_seed's range)", run.seed)
    _check(run.name is None or _is_directory_name(run.name), "run.name",
           "a directory name (not empty, no '/', not '.' or '..')", run.name)
    for where, path in (("run.out", run.out), ("data.store", data.store), ("policy.weights", config.policy.weights)):
        _check(path != "", where, "a non-empty path", path)
    _validate_objectives(config.objectives)


def _validate_objectives(objectives: dict[str, float]) -> None:
    _check(bool(objectives), "objectives", f"at least one of {list(OBJECTIVES)}", objectives)
    _check_known(objectives, OBJECTIVES, "objectives: unknown objective(s)")
    for name, weight in objectives.items():
        _check(0 <= weight < float("inf"), f"objectives.{name}", "a finite weight >= 0", weight)
    _check(any(weight > 0 for weight in objectives.values()), "objectives",
           "at least one weight > 0 (with all weights 0 nothing is learned)", objectives)


def config_from_dict(table: Mapping[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from nested plain data (a parsed TOML file).

    Raises:
        ConfigError: naming the key, what is allowed and what came.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"a config must be a table, got {type(table).__name__}")
    parts = {"data": DataConfig, "policy": PolicyConfig, "optimizer": OptimizerConfig, "run": RunConfig,
             "research": ResearchConfig, "distributed": DistributedConfig}
    _check_known(table, [*parts, "objectives"], "unknown table(s)")
    built = {name: _build(cls, table.get(name, {}), name) for name, cls in parts.items()}
    objectives = table.get("objectives", {"behavior_clone": 1.0})
    if not isinstance(objectives, Mapping):
        raise ConfigError(f"objectives: expected a table of name = weight, got {objectives!r}")
    built["objectives"] = {name: _coerce(w, float, f"objectives.{name}") for name, w in objectives.items()}
    config = TrainConfig(**built)
    _validate(config)
    return config


def read_config_table(path: str | Path) -> dict[str, Any]:
    """The plain table of a TOML config file, unvalidated (edit it, then hand it to :func:`config_from_dict`).

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8 or not valid TOML (the message names the path).
    """
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML files are UTF-8 whatever the locale
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (TOML must be): {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML config file (see the module docstring for its tables)."""
    return config_from_dict(read_config_table(path))
