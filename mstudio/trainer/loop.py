"""The Trainer: drives the compiled step over a loader, logs, validates, checkpoints, resumes, exports.

The loop only orchestrates; the work is in the pure step. It reads metrics to the host every ``log_every``
steps (one sync), so between logs the step runs back to back.

Under ``torchrun --nproc_per_node=N`` the same loop trains data-parallel: every rank builds the same policy and
runs the same step on its own ``data.batch_size`` rows, the step averages the gradients across ranks, and
rank 0 alone writes (config, event files, checkpoints, the exported policy) and prints.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from mstudio.batch import normalize_batch
from mstudio.distributed import (
    PER_RANK_FIELDS,
    broadcast_from_rank_zero,
    check_replicas,
    check_same_across_ranks,
    collective_failures,
    gather_per_rank,
    init_distributed,
    is_distributed,
    rank_zero_first,
    reduce_metrics,
    take_own_rank,
)
from mstudio.compile import compiled_call
from mstudio.research import diagnose
from mstudio.train import init_state, make_train_step
from mstudio.train.evaluate import evaluate
from mstudio.train.sharded import make_sharded_train_step, shard_state, state_mesh, unshard_state
from mstudio.trainer import build
from mstudio.trainer.checkpoint import (
    atomic_path,
    export_policy,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from mstudio.trainer.config import ConfigError, TrainConfig, config_from_dict, read_config_table
from mstudio.trainer.interrupt import interrupts_after
from mstudio.trainer.tensorboard import MetricWriter
from mstudio.trainer.toml import dump_toml

__all__ = ["Trainer"]


def _to_host(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """All metrics in one device sync."""
    names = list(metrics)
    values = torch.stack([metrics[n].detach().float().reshape(()) for n in names]).tolist()
    return dict(zip(names, values))


# What a resumed run may change: how long it runs, where its directory now is, how ranks wait and check, and
# whether they shard the state (checkpoints hold the full state either way).
_MAY_CHANGE_ON_RESUME = {("run", "max_steps"), ("run", "out"), ("run", "name"), ("distributed", "timeout"),
                         ("distributed", "check_replicas_every"), ("distributed", "shard")}


def _config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"section.key: <saved> -> <current>"`` for every setting that differs (both as ``TrainConfig.to_dict``)."""
    changes = []
    for section in sorted(saved.keys() | current.keys()):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(old.keys() | new.keys()):
            if (section, key) not in _MAY_CHANGE_ON_RESUME and old.get(key) != new.get(key):
                changes.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def _check_out(run_dir: Path) -> None:
    """``ConfigError`` when ``run.out`` or the run directory exists but is not a directory."""
    for path, key in ((run_dir.parent, "run.out"), (run_dir, "run.name")):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: {path} exists and is not a directory; choose another {key}")


def _fresh_run_name(out: Path) -> str:
    """A time stamp, suffixed (``-1``, ``-2``, ...) when a run started in the same second already took it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, suffix = stamp, 0
    while (out / name).exists():
        suffix += 1
        name = f"{stamp}-{suffix}"
    return name


class _Silent:
    """The :class:`MetricWriter` of ranks other than 0: they log nothing (their metrics reach rank 0's log as
    means over ranks)."""

    def scalars(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        del prefix, metrics, step

    def hyperparameters(self, config: dict[str, Any]) -> None:
        del config

    def close(self) -> None:
        pass


class Trainer:
    """One run of ``config`` in ``<config.run.out>/<config.run.name>/``.

    Use :meth:`fit`. The run directory holds TensorBoard event files, ``config.toml``,
    ``checkpoints/step_<N>/`` and, at the end, ``policy.safetensors`` (the EMA weights when kept).

    Launched by ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` in the environment), every rank builds a Trainer:
    it joins the process group (gloo; :func:`mstudio.distributed.init_distributed`, waiting at most
    ``distributed.timeout`` seconds for a peer), trains data-parallel on its own ``data.batch_size`` rows (the
    samplers shard by rank) and rank 0 alone writes and prints. A checkpoint then holds every rank's memory carry
    and RNG state and resumes only with the same ``N``. The process group stays up after :meth:`fit`; leave it
    with :func:`mstudio.distributed.shutdown_distributed` (``mstudio train`` does).

    ``trainer.state`` is the newest :class:`~mstudio.train.TrainState`. An eager run in one process donates it to
    every step (updated in place, then spent): to keep a snapshot across :meth:`fit`, copy it
    (``optree.tree_map(torch.clone, trainer.state)``).

    Args:
        config: the run.
        resume: continue the run in its directory from its newest checkpoint (its config is the one given,
            normally read back from the run's ``config.toml``; only ``run.max_steps`` and the ``[distributed]``
            timeout and checks may differ), on as many ranks as wrote it.

    Raises:
        ConfigError: a setting cannot run (``run.out`` is a file, the store is missing or makes no batch, ...), or
            a resumed run's config or world size differs from its checkpoint's; checked before anything is built or
            written.
        FileNotFoundError: ``resume`` and the run has no checkpoint.
        ValueError: ``resume`` and the newest checkpoint is corrupt (its message names the file).
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False):
        self.config = config
        run = config.run
        self.world = init_distributed("cpu", timeout=config.distributed.timeout)  # a world of 1 without torchrun
        # rank 0 names the run (a time stamp): ranks may reach this line in different seconds
        self.run_dir = Path(run.out) / broadcast_from_rank_zero(run.name or _fresh_run_name(Path(run.out)))
        _check_out(self.run_dir)
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(f"run.name: {self.run_dir} already holds checkpoints; resume it (--resume "
                              f"{self.run_dir}) or choose another run name")
        checkpoint = self._resumable_checkpoint() if resume else None  # checked before anything is built
        self.policy = build.build_policy(config.policy, run.seed)  # the same weights on every rank (same seed)
        with rank_zero_first():  # rank 0 makes the built-in store once; the others then open it
            store = build.open_store(config.data, self.policy.config.img_shape, run.out)
        self.loader, self.val_loader = build.build_loaders(config.data, store, run.seed)
        self.objective = build.build_objective(config.objectives)
        self.optimizer = build.build_optimizer(config.optimizer)
        self.state = init_state(self.policy, self.optimizer, config.data.batch_size, objective=self.objective,
                                ema=run.ema_decay is not None)
        # distributed.shard: parameters, EMA and Adam moments sharded across ranks between steps (eager)
        self._mesh = state_mesh() if config.distributed.shard and self.world.size > 1 else None
        if self._mesh is not None:
            self.step = make_sharded_train_step(self.policy, self.objective, self.optimizer, ema_decay=run.ema_decay)
            self.state = shard_state(self.state, self._mesh)
        else:
            self.step = make_train_step(self.policy, self.objective, self.optimizer, compile=run.compile,
                                        ema_decay=run.ema_decay, data_parallel=self.world.size > 1,
                                        compile_options={"cpp_wrapper": True} if run.cpp_wrapper else None)
        # Eager and alone, the step updates the state in place (donated, with torch's fused AdamW: VPT tiny 24.8 ->
        # 17.1 ms a step, small 204.7 -> 176.7 ms); Ctrl-C then waits for the step to finish. (Compiled, donation
        # changes nothing; data-parallel, a rank held in a collective by a dead peer must stay interruptible.)
        self._donate = not run.compile and self._mesh is None and self.world.size == 1
        self._diagnose = self._diagnostics() if config.research.every else None
        if checkpoint is not None:
            self._restore(checkpoint)
        self._batch_stream = self._batches()  # one stream for every train() call, so calls continue it
        # The loader position that goes with self.state: the loader counts a batch as soon as it hands it out,
        # which is before the step that consumes it has finished (an interrupt may fall in between).
        self._position = self.loader.state_dict()

    @classmethod
    def resume(cls, run_dir: str | Path, *, max_steps: int | None = None) -> "Trainer":
        """The run in ``run_dir``, rebuilt from its ``config.toml``, at its newest checkpoint."""
        path = Path(run_dir) / "config.toml"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir} is not an mstudio run directory")
        table = read_config_table(path)
        run_dir = Path(run_dir)
        table["run"] = {**table.get("run", {}), "out": str(run_dir.parent), "name": run_dir.name}
        if max_steps is not None:
            table["run"]["max_steps"] = max_steps
        return cls(config_from_dict(table), resume=True)

    def _full_state(self) -> Any:
        """``self.state`` with full tensors: sharded (``distributed.shard``), gathered, so every rank must call it."""
        return self.state if self._mesh is None else unshard_state(self.state)

    def _checkpoint_tree(self) -> dict[str, Any]:
        """The train state (full, also when sharded) and the RNG state. Data-parallel, every rank must call it (an
        all-gather): the state's per-rank fields (memory carry, last timestamps) and the RNG state then hold every
        rank's, stacked over ranks (``[world_size, ...]``); its other fields are equal on every rank."""
        state = self._full_state()
        if self.world.size == 1:
            return {"state": state, "rng": torch.get_rng_state()}
        every = gather_per_rank({"rows": {f: getattr(state, f) for f in PER_RANK_FIELDS},
                                 "rng": torch.get_rng_state()})
        return {"state": state._replace(**every["rows"]), "rng": every["rng"]}

    def _resumable_checkpoint(self) -> Path:
        """The run's newest checkpoint, after checking that its meta holds a loader position and this config.

        Raises:
            FileNotFoundError: the run has no checkpoint.
            ValueError: its ``meta.json`` is corrupt or lacks what the Trainer writes.
            ConfigError: the checkpoint was written with other settings (only ``run.max_steps`` may change).
        """
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"{self.run_dir} has no checkpoint to resume from (the run stopped before its "
                                    "first one); start it again without --resume")
        meta = read_checkpoint_meta(path)
        for key in ("loader", "config"):
            if not isinstance(meta.get(key), dict):
                raise ValueError(f"{path / 'meta.json'} has no {key!r} object in its meta: it was not written by "
                                 "the Trainer, or is corrupt")
        saved_world = meta.get("world_size", 1)  # checkpoints from before data parallelism: one process
        if saved_world != self.world.size:
            how = f"torchrun --nproc_per_node={saved_world}" if saved_world > 1 else "a single process (no torchrun)"
            raise ConfigError(f"{path} was written with world_size {saved_world} but this run has world_size "
                              f"{self.world.size}: each rank's memory carry, loader position and RNG state resume "
                              f"only on as many ranks as saved them; resume with {how}")
        # through config_from_dict: keys added since the checkpoint was written compare as their defaults
        changes = _config_changes(config_from_dict(meta["config"]).to_dict(), self.config.to_dict())
        if changes:
            raise ConfigError(f"the run's config differs from the one its checkpoint {path} was written with "
                              f"(checkpoint -> now): {'; '.join(changes)}; only run.max_steps may change on resume")
        return path

    def _restore(self, path: Path) -> None:
        tree, meta = load_checkpoint(path, self._checkpoint_tree())
        try:
            self.loader.load_state_dict(meta["loader"])
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{path / 'meta.json'}: its 'loader' position does not fit this run's loader: "
                             f"{error}") from None
        state, rng = tree["state"], tree["rng"]
        if self.world.size > 1:  # this rank's own rows of the per-rank fields
            own = take_own_rank({"rows": {f: getattr(state, f) for f in PER_RANK_FIELDS}, "rng": rng})
            state, rng = state._replace(**own["rows"]), own["rng"]
        self.state = state if self._mesh is None else shard_state(state, self._mesh)
        torch.set_rng_state(rng)
        if self.world.rank == 0:
            print(f"resumed {self.run_dir} at step {int(self.state.step)} from {path}")

    def _diagnostics(self) -> Any:
        """``(state, batch) -> research metrics``: :func:`mstudio.research.diagnose` over the run's terms, compiled
        into one graph of its own when the run compiles (built on first use; the train step's graph is untouched)."""
        terms = build.build_research_terms(self.config.objectives)

        def diagnostics(state: Any, batch: dict) -> dict[str, torch.Tensor]:
            return diagnose(self.policy, terms, state, batch)

        if not self.config.run.compile:
            return diagnostics
        return compiled_call(torch.compile(diagnostics, fullgraph=True))

    def _save(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank takes part in gathering it); its path, ``None`` off rank 0."""
        tree = self._checkpoint_tree()
        # Samplers give every rank the same number of batches, so one loader position stands for all ranks.
        check_same_across_ranks(json.dumps(self._position, sort_keys=True), "the loader position")
        if self.world.rank != 0:
            return None
        meta = {"loader": self._position, "config": self.config.to_dict(), "world_size": self.world.size}
        return save_checkpoint(self.run_dir, int(self.state.step), tree, meta, keep=self.config.run.keep_checkpoints)

    def _batches(self) -> Iterator[dict]:
        """The train loader's batches, epoch after epoch (from wherever the loader stands)."""
        while True:
            yield from self.loader

    def validate(self) -> dict[str, float]:
        """Mean objective metrics over ``run.val_batches`` validation batches, with a memory of their own and
        the EMA weights when kept. Empty without a validation set. Data-parallel, every rank must call it: each
        evaluates its own rows and the means are averaged over ranks (the same numbers on every rank)."""
        if self.val_loader is None:
            return {}
        self.val_loader.load_state_dict({"epoch": 0, "batch": 0})  # the same batches every time
        batches = itertools.islice(self.val_loader, self.config.run.val_batches)
        return reduce_metrics(evaluate(self.policy, self.objective, self._full_state(), batches, use_ema=True))

    def fit(self) -> dict[str, Any]:
        """Train up to ``run.max_steps``, then export the policy (the EMA weights when kept).

        Returns:
            ``{"run_dir", "steps", "seconds", "first_loss", "last_loss", "val"}`` (losses as logged).
        """
        lead = self.world.rank == 0  # the one rank that writes
        step, start = int(self.state.step), time.perf_counter()
        writer: MetricWriter | _Silent = _Silent()
        if lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Atomically: a kill while a resumed run rewrites it must not leave the run without its config.
            with atomic_path(self.run_dir / "config.toml") as tmp:
                tmp.write_text(dump_toml(self.config.to_dict()))
            # a resumed run replaces whatever the killed one logged after its checkpoint
            writer = MetricWriter(self.run_dir, purge_step=step + 1 if step else None)
            writer.hyperparameters(self.config.to_dict())
        try:
            summary = self.train(self.config.run.max_steps - step, writer)
        except KeyboardInterrupt:
            writer.close()
            self._interrupted()
            raise
        full = self._full_state()  # every rank: gathering a sharded state is a collective
        if lead:
            params = full.ema if full.ema is not None else full.params
            export_policy(self.run_dir / "policy.safetensors", {**params, **full.buffers},
                          build.policy_config(self.policy))
        writer.close()
        if is_distributed():
            with collective_failures("the end of the run"):
                torch.distributed.barrier()  # on return the run is complete on disk for every rank
        return {"run_dir": str(self.run_dir), "steps": int(self.state.step), "seconds": time.perf_counter() - start,
                **summary}

    def _interrupted(self) -> None:
        """After Ctrl-C: alone, save a checkpoint and say how to resume. Data-parallel, save nothing: torchrun
        passes the interrupt to every rank, each stops wherever it is (one inside the step's all-reduce, another
        already past it), so no collective can gather a consistent state; rank 0 names the newest checkpoint."""
        resume = f"continue with mstudio train --resume {self.run_dir}"
        if self.world.size == 1:
            print(f"\ninterrupted at step {int(self.state.step)}: saved {self._save()}; {resume}", file=sys.stderr)
        elif self.world.rank == 0:
            newest = latest_checkpoint(self.run_dir)
            print(f"\ninterrupted at step {int(self.state.step)} of a data-parallel run: not saved (the ranks stopped "
                  f"at different points); the newest checkpoint is {newest}; {resume} under torchrun "
                  f"--nproc_per_node={self.world.size}", file=sys.stderr)

    def train(self, steps: int, writer: MetricWriter | _Silent) -> dict[str, Any]:
        """Run ``steps`` more updates (never past ``run.max_steps``): metrics read and logged every
        ``log_every`` steps, validation every ``val_every`` and checkpoints every ``ckpt_every``, and both
        at ``run.max_steps``.

        ``steps_per_s`` and ``frames_per_s`` are training throughput: the steps since the last log over the time
        they took, loading included; the first step of the call (its compile, on a fresh process) and the time
        spent in research diagnostics, validation and checkpoints are left out. A log with no such step yet (the
        first step, with ``log_every = 1``) has no rates.

        Data-parallel, every rank runs it; the metrics logged are means over ranks (the step's own already are;
        research diagnostics, computed on each rank's rows, are averaged) and ``frames_per_s`` counts every
        rank's frames; a collective that fails (a rank died or passed ``distributed.timeout``) raises
        :class:`mstudio.distributed.CollectiveFailure`.

        Returns:
            ``{"first_loss", "last_loss", "val"}``: the first and last train loss logged, the last validation.
        """
        with collective_failures("training"):
            return self._train(steps, writer)

    def _train(self, steps: int, writer: MetricWriter | _Silent) -> dict[str, Any]:
        run = self.config.run
        step = int(self.state.step)
        stop = min(step + steps, run.max_steps)
        frames_per_step = self.config.data.batch_size * self.config.data.window * self.world.size
        summary: dict[str, Any] = {"first_loss": None, "last_loss": None, "val": {}}
        bar = tqdm(total=run.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.world.rank != 0)
        compiling = step < stop and self.step.compile and not self.step.built
        if compiling:
            bar.set_postfix_str("compiling the step (cold: a minute or more on a CPU; cached after)")
        every = self.config.research.every
        check_every = self.config.distributed.check_replicas_every if self.world.size > 1 else 0
        # Throughput counts from the end of this call's first step (the compile) and leaves out the pauses.
        since, since_step, paused = None, step, 0.0
        while step < stop:
            batch = next(self._batch_stream)
            if every and step % every == 0:  # on the batch the step is about to train on, before the update
                start = time.perf_counter()
                research = self._diagnose(self._full_state(), normalize_batch(batch))
                writer.scalars("research", reduce_metrics(_to_host(research)), step)
                paused += time.perf_counter() - start
            # The state and the loader position that goes with it change together (Ctrl-C saves both).
            with interrupts_after() if self._donate else contextlib.nullcontext():
                new_state, metrics = self.step(self.state, batch, donate=self._donate)
                self.state, self._position = new_state, self.loader.state_dict()
            step += 1
            bar.update(1)
            if since is None:
                since, since_step, paused = time.perf_counter(), step, 0.0
                if compiling:
                    bar.set_postfix_str("")
            if check_every and step % check_every == 0:
                check_replicas(self._full_state())  # sharded: the gathered state, equal on every rank
            if step % run.log_every == 0 or step == run.max_steps:
                host = _to_host(metrics)
                now = time.perf_counter()
                if step > since_step:
                    host["steps_per_s"] = (step - since_step) / (now - since - paused)
                    host["frames_per_s"] = host["steps_per_s"] * frames_per_step
                host = reduce_metrics(host)  # the step's metrics already are means over ranks; the rates not
                since, since_step, paused = now, step, 0.0
                writer.scalars("train", host, step)
                summary["first_loss"] = summary["first_loss"] if summary["first_loss"] is not None else host["loss"]
                summary["last_loss"] = host["loss"]
                rates = ({"steps_s": f"{host['steps_per_s']:.1f}", "frames_s": f"{host['frames_per_s']:.0f}"}
                         if "steps_per_s" in host else {})
                bar.set_postfix(loss=f"{host['loss']:.4g}", **rates)
            start = time.perf_counter()
            if (run.val_every and step % run.val_every == 0) or step == run.max_steps:
                summary["val"] = self.validate()
                writer.scalars("val", summary["val"], step)
            if (run.ckpt_every and step % run.ckpt_every == 0) or step == run.max_steps:
                self._save()
            paused += time.perf_counter() - start
        bar.close()
        return summary
