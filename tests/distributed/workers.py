"""What each rank runs in the data-parallel tests (module-level, so spawned processes can import it)."""

from __future__ import annotations

import os
import time

import torch

import losses
import mstudio
import mstudio.distributed as md
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy

ROWS, SEQ, IMAGE, STEPS = 4, 4, 16, 5
HANG = 20.0  # seconds the hanging rank stays silent
#: Per step, the first timestamp of each of the ROWS rows. Row 3 (rank 1's second row of two) restarts its episode
#: at step 2 while every other row continues; row 0 (rank 0's) restarts at step 4.
STARTS = [[SEQ * i, 100 + SEQ * i, 7 + SEQ * i, SEQ * i if i < 2 else SEQ * (i - 2)] for i in range(STEPS)]
STARTS[4][0] = 0


def setup():
    """Policy (same weights on every rank), optimizer (clipping on: it must see the global gradient), objective."""
    torch.manual_seed(0)
    policy = TinyPolicy(hidsize=8, image_size=IMAGE)
    optimizer = mstudio.optim.adamw(1e-3, weight_decay=0.1, warmup_steps=2, clip_norm=0.05)
    objective = losses.weighted(losses.behavior_clone, losses.Hyperparam("bc_weight", 0.01))
    return policy, optimizer, objective


def batches(rows: slice = slice(None)) -> list[dict]:
    """The run's batches of ROWS rows (a mask with zeros, so padding counts), or the rows ``rows`` of each."""
    out = []
    for i, starts in enumerate(STARTS):
        batch = random_batch(ROWS, SEQ, IMAGE, seed=i, start=torch.tensor(starts))
        batch["mask"][1, -1] = 0
        out.append({key: ({k: v[rows] for k, v in value.items()} if isinstance(value, dict) else value[rows])
                    for key, value in batch.items()})
    return out


def train(rank: int, world_size: int, compile: bool) -> dict:
    """STEPS steps on this rank's ROWS // world_size rows; the final state's parts and the metrics."""
    policy, optimizer, objective = setup()
    rows = ROWS // world_size
    mine = batches(slice(rank * rows, (rank + 1) * rows))
    step = mstudio.make_train_step(policy, objective, optimizer, compile=compile, data_parallel=world_size > 1)
    state = mstudio.init_state(policy, optimizer, batch_size=rows, objective=objective)
    initial = {name: p.clone() for name, p in state.params.items()}
    history = []
    graphs = None
    if compile:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(mstudio.train.step.train_step_function(
            step.apply_fn, objective, optimizer,
            mstudio.train.step.reached_parameters(policy, objective, state, mine[0]),
            grad_reduce=mstudio.train.step.average_across_ranks()))(state, mine[0])
        graphs = (explanation.graph_count, explanation.graph_break_count, [str(r) for r in explanation.break_reasons])
        torch._dynamo.reset()
    for i, batch in enumerate(mine):
        with torch._dynamo.config.patch(error_on_recompile=compile and i > 0):
            state, metrics = step(state, batch)
        history.append({key: value.clone() for key, value in metrics.items()})
    md.check_replicas(state)
    return {"initial": initial, "params": state.params, "opt_state": state.opt_state, "memory": state.memory,
            "last_timestamp": state.last_timestamp, "metrics": history, "graphs": graphs}


def die_or_hang(rank: int, world_size: int, how: str) -> None:
    """Rank 1 dies (``how="dies"``) or stops answering (``"hangs"``) at step 2; rank 0 must stop with an error."""
    policy, optimizer, objective = setup()
    rows = ROWS // world_size
    mine = batches(slice(rank * rows, (rank + 1) * rows))
    step = mstudio.make_train_step(policy, objective, optimizer, compile=False, data_parallel=True)
    state = mstudio.init_state(policy, optimizer, batch_size=rows, objective=objective)
    for i, batch in enumerate(mine):
        if rank == 1 and i == 2:
            if how == "dies":
                os._exit(3)
            time.sleep(HANG)  # alive but silent, longer than the collective timeout
            os._exit(4)
        state, _ = step(state, batch)


def replica_checks(rank: int, world_size: int, shared: str) -> dict:
    """The errors the replica checks raise when rank 1 holds different weights, a metric reduction, per-rank
    state gathered for a checkpoint, and rank 0 going first (it writes ``shared``, the others read it)."""
    with md.rank_zero_first():
        if rank == 0:
            time.sleep(0.5)
            with open(shared, "w") as file:
                file.write("made by rank 0")
        with open(shared) as file:
            first = file.read()
    policy, optimizer, objective = setup()
    state = mstudio.init_state(policy, optimizer, batch_size=2, objective=objective)
    md.check_replicas(state)  # equal: passes
    params = dict(state.params)
    if rank == 1:  # one bit of one element of one tensor
        nudged = params["core.bias_hh"].clone()
        nudged[3] = torch.nextafter(nudged[3], torch.tensor(float("inf")))
        params["core.bias_hh"] = nudged
    differing = state._replace(params=params)
    out = {"reduced": md.reduce_metrics({"rank": torch.tensor(float(rank)), "same": 2.5}), "first": first}
    try:
        md.check_replicas(differing)
    except ValueError as error:
        out["check_replicas"] = str(error)
    step = mstudio.make_train_step(policy, objective, optimizer, compile=False, data_parallel=True)
    try:
        step(differing, batches(slice(2 * rank, 2 * rank + 2))[0])
    except ValueError as error:
        out["first_step"] = str(error)
    try:
        md.check_same_across_ranks(f"config-{rank}", "the config")
    except ValueError as error:
        out["same"] = str(error)
    torch.manual_seed(rank)  # per-rank memory, a bool leaf (VPT's attention mask) and RNG, as a checkpoint holds them
    own = {"memory": (torch.randn(2, 8),), "mask": torch.rand(2, 3) < 0.5, "rng": torch.get_rng_state()}
    gathered = md.gather_per_rank(own)
    out["gathered_shapes"] = [tuple(t.shape) for t in (gathered["memory"][0], gathered["mask"], gathered["rng"])]
    out["round_trip"] = all(torch.equal(a, b) for a, b in zip(
        [own["memory"][0], own["mask"], own["rng"]],
        [*md.take_own_rank(gathered)["memory"], md.take_own_rank(gathered)["mask"], md.take_own_rank(gathered)["rng"]]))
    out["row_of_rank"] = torch.equal(gathered["mask"][rank], own["mask"]) and gathered["mask"].dtype == torch.bool
    return out


def guard(rank: int, world_size: int) -> dict:
    """Rank 1's loss is +inf at step 2 while its gradients stay finite (an inf constant added): every rank must
    skip that update, or the replicas would part."""
    policy, optimizer, base = setup()

    def objective(batch, latents, params):
        out = base(batch, latents, params)
        poison = torch.where((batch[losses.STEP_KEY] == 2) & (rank == 1), float("inf"), 0.0)
        return {**out, "loss": out["loss"] + poison}

    objective.hyperparams = losses.hyperparams_of(base)
    rows = ROWS // world_size
    step = mstudio.make_train_step(policy, objective, optimizer, compile=False, data_parallel=True)
    state = mstudio.init_state(policy, optimizer, batch_size=rows, objective=objective)
    nonfinite = []
    for batch in batches(slice(rank * rows, (rank + 1) * rows)):
        state, metrics = step(state, batch)
        nonfinite.append(int(metrics["nonfinite"]))
    md.check_replicas(state)
    return {"nonfinite": nonfinite, "skipped": int(state.skipped_updates)}


def fsdp_gradients(rank: int, world_size: int) -> dict:
    """FSDP2 via ``shard_policy``: the module's gradients on this rank's rows, all-gathered to full tensors."""
    policy, _, _ = setup()
    md.shard_policy(policy, units=("Conv2d", "GRUCell"))
    rows = ROWS // world_size
    batch = batches(slice(rank * rows, (rank + 1) * rows))[0]
    latents, _ = policy(batch, policy.initial_state(rows))
    losses.behavior_clone(batch, latents, {})["loss"].backward()
    local = {name: tuple(p.to_local().shape) for name, p in policy.named_parameters()}
    return {"grads": {name: p.grad.full_tensor() for name, p in policy.named_parameters() if p.grad is not None},
            "local_shapes": local}


def trainer_checks(rank: int, world_size: int, store: str, out: str) -> dict:
    """A data-parallel Trainer on ``store``: the run name rank 0 chose, then rank 1's parameters nudged after one
    step, which the every-step replica check must name; then a Trainer whose store is missing, which rank 0 alone
    opens (``rank_zero_first``): every rank must fail at once."""
    from mstudio.trainer import Trainer, config_from_dict
    from mstudio.trainer.loop import _Silent

    table = {"data": {"store": store, "batch_size": 2, "window": 4, "val_episodes": 1},
             "run": {"out": out, "compile": False, "max_steps": 4, "log_every": 1},
             "distributed": {"check_replicas_every": 1, "timeout": 30.0}}
    trainer = Trainer(config_from_dict(table))
    result = {"run_dir": str(trainer.run_dir), "world": tuple(trainer.world[:3])}
    trainer.train(1, _Silent())
    if rank == 1:
        params = dict(trainer.state.params)
        params["net.final_ln.bias"] = params["net.final_ln.bias"] + 1e-3
        trainer.state = trainer.state._replace(params=params)
    try:
        trainer.train(1, _Silent())
    except ValueError as error:
        result["replicas"] = str(error)
    start = time.perf_counter()
    try:
        Trainer(config_from_dict({**table, "data": {**table["data"], "store": store + "-missing"}}))
    except Exception as error:  # noqa: BLE001 - the test reads its type and text
        result["missing_store"] = (type(error).__name__, str(error), time.perf_counter() - start)
    return result


def fsdp_and_functional_call(rank: int, world_size: int) -> dict:
    """Why the pure step does not take a ``fully_shard``-ed policy yet, and what would work instead.

    ``functional_call`` on the sharded module with copies of its DTensor parameters: which copies get a gradient.
    Then an unsharded copy of the module called with each shard gathered by ``redistribute(Replicate)`` and
    ``to_local(grad_placements=[Partial("avg")])``: the gradients, as full tensors, on this rank's rows."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Partial, Replicate

    torch.manual_seed(0)
    sharded = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    plain.load_state_dict(sharded.state_dict())
    fully_shard(sharded[0])
    fully_shard(sharded)
    rows = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))[2 * rank:2 * rank + 2]
    given = {name: p.detach().clone().requires_grad_() for name, p in sharded.named_parameters()}
    torch.func.functional_call(sharded, given, (rows,)).sum().backward()
    shards = {name: p.detach().clone().requires_grad_() for name, p in sharded.named_parameters()}
    full = {name: s.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial("avg")])
            for name, s in shards.items()}
    torch.func.functional_call(plain, full, (rows,)).sum().backward()
    return {"given_with_grad": sorted(name for name, p in given.items() if p.grad is not None),
            "module_with_grad": sorted(name for name, p in sharded.named_parameters() if p.grad is not None),
            "gathered_grads": {name: s.grad.full_tensor() for name, s in shards.items()},
            "initial": plain.state_dict()}
