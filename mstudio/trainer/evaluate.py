"""Evaluating a saved checkpoint on an episode store: the run's policy and objective, rebuilt from the checkpoint.

A checkpoint's ``meta.json`` holds the run's config (``meta["config"]``), so a checkpoint directory alone says
which policy and objectives to rebuild; the weights come from its ``state.safetensors``. Evaluation is the
validation step (:mod:`mstudio.train.evaluate`): no update, a memory of its own, the EMA weights when kept.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch

from mstudio.data import EpisodeStore, Loader, Store, WindowDataset, open_store
from mstudio.train import TrainState, init_state
from mstudio.train.evaluate import evaluate
from mstudio.trainer import build
from mstudio.trainer.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_meta
from mstudio.trainer.config import TrainConfig, config_from_dict

__all__ = ["evaluate_checkpoint", "resolve_checkpoint"]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``path`` names: ``path`` itself (a ``<run>/checkpoints/step_<N>``), or a run
    directory's newest checkpoint.

    Raises:
        FileNotFoundError: ``path`` is neither a checkpoint nor a run directory with one.
    """
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (<run>/checkpoints/step_<N>) nor a run directory "
                                "holding one")
    return newest


def _eval_loader(config: TrainConfig, store: EpisodeStore) -> Loader:
    """All of ``store``'s episodes in a fixed order, batched as the run's sampler batches them."""
    data, seed = config.data, config.run.seed
    # Episode-continuous rows carry memory from window to window, as in training; shuffle=False makes the
    # result independent of the run's seed.
    sampler = build.build_sampler(data, seed, shuffle=False)
    loader = Loader(WindowDataset(store, data.window, store.episode_ids, skip_frame=data.skip_frame,
                                  drop_null=data.drop_null), sampler)
    if len(loader) == 0:
        raise ValueError(f"{store.root}: its {len(store.episode_ids)} episodes make no batch of batch_size "
                         f"{data.batch_size} and window {data.window} with sampler {data.sampler!r}")
    return loader


def _load_state(checkpoint: Path, config: TrainConfig) -> tuple[torch.nn.Module, TrainState]:
    """The run's policy module and the checkpoint's :class:`TrainState` (shaped by a freshly built one)."""
    policy = build.build_policy(config.policy, config.run.seed)
    template = init_state(policy, build.build_optimizer(config.optimizer), config.data.batch_size,
                          objective=build.build_objective(config.objectives), ema=config.run.ema_decay is not None)
    tree, _ = load_checkpoint(checkpoint, {"state": template, "rng": torch.get_rng_state()})
    return policy, tree["state"]


def evaluate_checkpoint(path: str | os.PathLike[str], store: str | os.PathLike[str] | EpisodeStore,
                        batches: int | None = None) -> dict[str, float]:
    """Mean validation metrics of a checkpoint over an episode store.

    The policy and objective are rebuilt from the config in the checkpoint's meta (a pretrained run needs its
    ``policy.weights`` folder for the architecture). Every episode of ``store`` is used, windowed and batched as
    the run's config says (``data.window``, ``data.batch_size``, ``data.skip_frame``, ``data.drop_null``,
    ``data.sampler``), in a fixed order; each batch goes through :func:`mstudio.train.evaluate.make_eval_step`
    with the EMA weights when the run kept them, and a memory that starts empty and is carried across windows
    of the same episode.

    Args:
        path: a checkpoint directory (``<run>/checkpoints/step_<N>``) or a run directory (its newest checkpoint).
        store: an :class:`~mstudio.data.EpisodeStore` or its directory; frames must match the policy's size.
        batches: evaluate the first this many batches; ``None`` (or more than there are): one whole epoch.

    Returns:
        Metric name (``loss``, ``camera_loss``, ``button_loss``, ``entropy``, the objective weights, ...) -> its
        mean over the batches.

    Raises:
        FileNotFoundError: no checkpoint at ``path``, or no store at ``store``.
        ValueError: ``batches < 1``, the checkpoint is corrupt or lacks its config, does not fit its config, the
            store's frames do not match the policy, or the store makes no batch.
        ConfigError: the stored config is invalid (e.g. its ``policy.weights`` folder is gone).
    """
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be >= 1 or None (a whole epoch), got {batches!r}")
    checkpoint = resolve_checkpoint(path)
    meta = read_checkpoint_meta(checkpoint)
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{checkpoint / 'meta.json'} has no 'config' object in its meta, so the policy to evaluate "
                         "is unknown: evaluate a checkpoint the Trainer wrote")
    config = config_from_dict(meta["config"])
    store = store if isinstance(store, Store) else open_store(store)
    # Building the policy reseeds the global RNG and each DataLoader iteration draws from it: keep the caller's.
    with torch.random.fork_rng(devices=[]):
        policy, state = _load_state(checkpoint, config)
        if tuple(store.image_size) != tuple(policy.config.img_shape[:2]):
            raise ValueError(f"{store.root}: frames are {tuple(store.image_size)} but the policy takes "
                             f"{tuple(policy.config.img_shape[:2])}; import the store at the policy's resolution")
        loader = itertools.islice(_eval_loader(config, store), batches)
        return evaluate(policy, build.build_objective(config.objectives), state, loader, use_ema=True)
