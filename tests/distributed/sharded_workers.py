"""What each rank runs in the sharded-state tests (module-level, so spawned processes can import it)."""

from __future__ import annotations

import time

import optree
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import losses
import mstudio
import mstudio.distributed as md
from mstudio.optim import global_norm
from mstudio.train.sharded import make_sharded_train_step, shard_state, state_mesh, unshard_state
from tests.distributed.workers import ROWS, batches, setup


def _bits(tree):
    return optree.tree_map(lambda t: t.clone(), tree)


def _global_norms(mesh) -> tuple[float, float, str]:
    """``global_norm`` of DTensor shards (uneven, one rank's shard empty) and of the full tensors, and the type the
    sharded one comes back as."""
    generator = torch.Generator().manual_seed(3)
    full = {"a": torch.randn(5, 3, generator=generator), "b": torch.randn(1, generator=generator),
            "c": torch.randn(7, generator=generator)}
    shards = {name: distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for name, t in full.items()}
    sharded = global_norm(shards)
    kind = f"{type(sharded).__name__} {getattr(sharded, 'placements', '')}"
    value = sharded.full_tensor() if isinstance(sharded, DTensor) else sharded
    return value.item(), global_norm(full).item(), kind


def sharded_and_replicated(rank: int, world_size: int) -> dict:
    """On this rank's rows, the sharded step and the replicated data-parallel step from the same start: the final
    states (unsharded), the metrics, the round trip of shard_state/unshard_state and the placements."""
    policy, optimizer, objective = setup()
    rows = ROWS // world_size
    mine = batches(slice(rank * rows, (rank + 1) * rows))
    mesh = state_mesh()
    start = mstudio.init_state(policy, optimizer, batch_size=rows, objective=objective, ema=True)
    result = {"initial": _bits(start.params)}

    sharded = shard_state(start, mesh)
    back = unshard_state(sharded)
    result["round_trip"] = all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(start), optree.tree_leaves(back)))
    result["round_trip_same_tree"] = optree.tree_structure(start) == optree.tree_structure(back)
    dtensors = [t for t in optree.tree_leaves(sharded) if isinstance(t, DTensor)]
    result["local_rows"] = {name: p.to_local().shape[0] if p.dim() else None for name, p in sharded.params.items()}
    result["sharded_leaves"] = len(dtensors)
    result["norms"] = _global_norms(mesh)

    replicated_step = mstudio.make_train_step(policy, objective, optimizer, compile=False, data_parallel=True,
                                              ema_decay=0.9)
    sharded_step = make_sharded_train_step(policy, objective, optimizer, ema_decay=0.9)
    state_r, state_s = start, sharded
    metrics_s, metrics_r, times = [], [], {"sharded": [], "replicated": []}
    for batch in mine:  # interleaved, so the load the machine is under hits both alike
        t0 = time.perf_counter()
        state_r, metrics = replicated_step(state_r, batch)
        metrics_r.append({key: value.clone() for key, value in metrics.items()})
        t1 = time.perf_counter()
        state_s, metrics = sharded_step(state_s, batch)
        t2 = time.perf_counter()
        times["replicated"].append(t1 - t0)
        times["sharded"].append(t2 - t1)
        metrics_s.append({key: value.clone() for key, value in metrics.items()})
    result["grads_are_shards"] = all(isinstance(t, DTensor) for t in optree.tree_leaves(state_s.opt_state)
                                     if isinstance(t, torch.Tensor) and t.dim() > 0 and t.dtype == torch.float32)
    names = frozenset(state_s.params)
    paths, leaves, _ = optree.tree_flatten_with_path(state_s, is_leaf=lambda n: isinstance(n, dict) and set(n) == names)
    result["dtensors_elsewhere"] = [".".join(map(str, path)) for path, leaf in zip(paths, leaves)
                                    if isinstance(leaf, DTensor)]
    full = unshard_state(state_s)
    md.check_replicas(full)
    result.update(sharded=full, replicated=state_r, metrics=metrics_s, replicated_metrics=metrics_r, times=times)
    return result


def sharded_guard(rank: int, world_size: int) -> dict:
    """The sharded step with rank 1's loss +inf at step 2 (finite gradients): every rank skips that update. The
    objective also reads a parameter (a penalty on ``norm.weight``): it sees it gathered, as a plain tensor."""
    policy, optimizer, base = setup()

    def objective(batch, latents, params):
        out = base(batch, latents, params)
        poison = torch.where((batch[losses.STEP_KEY] == 2) & (rank == 1), float("inf"), 0.0)
        penalty = 1e-3 * params["norm.weight"].square().sum()
        assert not isinstance(params["norm.weight"], DTensor)
        return {**out, "loss": out["loss"] + penalty + poison}

    rows = ROWS // world_size
    step = make_sharded_train_step(policy, objective, optimizer)
    state = shard_state(mstudio.init_state(policy, optimizer, batch_size=rows, objective=base), state_mesh())
    nonfinite, unchanged = [], []
    for batch in batches(slice(rank * rows, (rank + 1) * rows)):
        before = unshard_state(state)
        state, metrics = step(state, batch)
        after = unshard_state(state)
        nonfinite.append(int(metrics["nonfinite"]))
        unchanged.append(all(torch.equal(before.params[n], after.params[n]) for n in before.params)
                         and optree.tree_all(optree.tree_map(torch.equal, before.opt_state, after.opt_state)))
    return {"nonfinite": nonfinite, "unchanged": unchanged, "skipped": int(state.skipped_updates)}


def sharded_trainer(rank: int, world_size: int, store: str, out: str) -> dict:
    """Trainers with ``distributed.shard``: run "a" 3 steps straight; run "b" 2 steps, copied to "c", then "b"
    resumed sharded and "c" resumed replicated to step 3. Full states (gathered) and checkpoint layouts."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    from mstudio.trainer import Trainer, config_from_dict

    def config(name: str, max_steps: int, shard: bool):
        return config_from_dict({
            "data": {"store": store, "batch_size": 2, "window": 4, "val_episodes": 1},
            "run": {"out": out, "name": name, "compile": False, "max_steps": max_steps, "log_every": 1,
                    "ckpt_every": 1, "ema_decay": 0.9},
            "distributed": {"shard": shard, "timeout": 60.0, "check_replicas_every": 1}})

    def layout(run: str) -> dict:
        tensors = load_file(str(Path(out) / run / "checkpoints" / "step_3" / "state.safetensors"))
        return {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}

    a = Trainer(config("a", 3, True))
    a.fit()
    b = Trainer(config("b", 2, True))
    b.fit()
    at_2 = b._full_state()
    if rank == 0:
        shutil.copytree(Path(out) / "b", Path(out) / "c")
    torch.distributed.barrier()
    b = Trainer(config("b", 3, True), resume=True)
    b.fit()
    c = Trainer(config("c", 3, False), resume=True)
    c.fit()
    result = {"a": a._full_state(), "b": b._full_state(), "c": c.state, "at_2": at_2,
              "a_sharded": isinstance(a.state.params["net.final_ln.bias"], DTensor)}
    if rank == 0:
        result["layouts"] = (layout("a"), layout("c"))
    return result
