"""The parts of a run, each built from its config: policy, store, loaders, objective, optimizer."""

from __future__ import annotations

from pathlib import Path

import torch

import losses
from mstudio.data import EpisodeContinuous, EpisodeStore, Loader, RandomWindows, Sampler, WindowDataset
from mstudio.data import stores
from mstudio.data.synthetic import fill_store
from mstudio.models import VPTPolicy
from mstudio.optim import GradientTransformation, adamw
from mstudio.research import term
from mstudio.trainer.config import ConfigError, DataConfig, OptimizerConfig, PolicyConfig

__all__ = ["HYPERPARAM_NAMES", "build_loaders", "build_objective", "build_optimizer", "build_policy",
           "build_research_terms", "build_sampler", "open_store", "policy_config"]

#: The state hyper-parameter that holds each objective's weight (named as MineStudio logs the weight).
HYPERPARAM_NAMES = {"behavior_clone": "bc_weight", "kl_gaussian": "kl_weight"}
_OBJECTIVES = {"behavior_clone": losses.behavior_clone, "kl_gaussian": losses.kl_gaussian}

# The built-in store: learnable synthetic episodes (each frame's colour names its action).
_SYNTHETIC = dict(episodes=12, frames=(150, 300), vocabulary=16, seed=0)


def build_policy(config: PolicyConfig, seed: int) -> VPTPolicy:
    """A VPT policy: pretrained from ``config.weights`` (a local folder or an exported file) or a fresh
    ``config.preset`` initialised from ``seed``."""
    if config.weights is not None:
        if not Path(config.weights).exists():
            raise ConfigError(f"policy.weights: {config.weights} does not exist (weights are never downloaded)")
        return VPTPolicy.from_pretrained(config.weights)
    torch.manual_seed(seed)
    return VPTPolicy.from_preset(config.preset)


def policy_config(policy: VPTPolicy) -> dict:
    """MineStudio's hub ``config.json`` content for ``policy``, stored with an exported policy."""
    temperature = policy.pi_head["buttons"].temperature
    return {"policy_kwargs": policy.config.to_policy_kwargs(), "temperature": temperature}


def open_store(config: DataConfig, image_shape: tuple[int, int, int], out: str) -> EpisodeStore:
    """``config.store``, or the built-in synthetic store under ``<out>/.synthetic-<H>x<W>`` (made once)."""
    if config.store is not None:
        try:
            store = stores.open_store(config.store)  # either kind of store
        except (OSError, ValueError) as error:
            raise ConfigError(f"data.store: {error}") from error
    else:
        path = Path(out) / f".synthetic-{image_shape[0]}x{image_shape[1]}"
        if (path / "manifest.json").exists():
            store = EpisodeStore.open(path)
        else:
            print(f"making the built-in synthetic store at {path} (once)")
            store = EpisodeStore.create(path, image_shape[:2], meta={"source": "mstudio train default"})
            fill_store(store, **_SYNTHETIC)
    if tuple(store.image_size) != tuple(image_shape[:2]):
        raise ConfigError(f"data.store: frames are {tuple(store.image_size)} but the policy takes "
                          f"{tuple(image_shape[:2])}; import the store at the policy's resolution")
    return store


def build_sampler(config: DataConfig, seed: int, *, shuffle: bool = True) -> Sampler:
    """The sampler ``config.sampler`` names, for ``config.batch_size`` rows."""
    kind = EpisodeContinuous if config.sampler == "continuous" else RandomWindows
    return kind(config.batch_size, seed=seed, shuffle=shuffle)


def build_loaders(config: DataConfig, store: EpisodeStore, seed: int) -> tuple[Loader, Loader | None]:
    """The train loader over all but the last ``val_episodes`` episodes, and a validation loader over those."""
    episodes = store.episode_ids
    if not episodes:
        raise ConfigError(f"data.store: {store.root} holds no episodes")
    if config.val_episodes >= len(episodes):
        raise ConfigError(f"data.val_episodes: holding out {config.val_episodes} of the store's {len(episodes)} "
                          "episodes leaves none to train on; hold out fewer (0: no validation)")
    held_out = config.val_episodes
    train_ids, val_ids = episodes[: len(episodes) - held_out], episodes[len(episodes) - held_out:]
    train = Loader(WindowDataset(store, config.window, train_ids, skip_frame=config.skip_frame,
                                 drop_null=config.drop_null),
                   build_sampler(config, seed), num_workers=config.num_workers)
    if len(train) == 0:
        raise ConfigError(f"data: {len(train_ids)} training episodes (windows of {config.window} steps) make no "
                          f"batch of batch_size {config.batch_size} with sampler {config.sampler!r}; use more "
                          "episodes or fewer rows")
    if not val_ids:
        return train, None
    val = Loader(WindowDataset(store, config.window, val_ids, skip_frame=config.skip_frame,
                               drop_null=config.drop_null),
                 RandomWindows(config.batch_size, seed=seed, shuffle=False))
    if len(val) == 0:
        raise ConfigError(f"data.val_episodes: {len(val_ids)} episodes make no batch of batch_size "
                          f"{config.batch_size}; hold out more episodes or set data.val_episodes = 0")
    return train, val


def _weighted_terms(weights: dict[str, float]) -> dict[str, losses.Objective]:
    """Each named objective weighted by its state hyper-parameter (``bc_weight``, ...)."""
    return {name: losses.weighted(_OBJECTIVES[name], losses.Hyperparam(HYPERPARAM_NAMES[name], weight))
            for name, weight in weights.items()}


def build_objective(weights: dict[str, float]) -> losses.Objective:
    """The sum of the named objectives, each weighted by a state hyper-parameter (``bc_weight``, ...)."""
    terms = list(_weighted_terms(weights).values())
    return terms[0] if len(terms) == 1 else losses.combine(*terms)


def build_research_terms(weights: dict[str, float]) -> dict[str, losses.Objective]:
    """What a ``[research]`` diagnostics pass compares: each configured objective as weighted in the run, and
    with ``behavior_clone`` its camera and button terms (unweighted) as ``behavior_clone.camera`` / ``.buttons``."""
    terms = _weighted_terms(weights)
    if "behavior_clone" in weights:
        terms["behavior_clone.camera"] = term(losses.behavior_clone, "camera_loss")
        terms["behavior_clone.buttons"] = term(losses.behavior_clone, "button_loss")
    return terms


def build_optimizer(config: OptimizerConfig) -> GradientTransformation:
    return adamw(config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                 warmup_steps=config.warmup_steps, clip_norm=config.clip_norm)
