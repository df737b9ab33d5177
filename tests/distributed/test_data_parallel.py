"""Data parallelism on 2 CPU processes (gloo), spawned by the tests: the same training as one process with all
rows (eager, and compiled as one graph), each rank's memory following its own rows, identical replicas, one
non-finite verdict for all ranks, no hang when a rank dies or hangs, FSDP2 sharding of a policy, and why the
pure step cannot call a ``fully_shard``-ed module through ``functional_call``.

Each test starts 2 fresh processes (3-10 s on 2 cores); the compiled one compiles on both ranks (2-3 min).
What the ranks run is in ``workers.py``; ``spawn.py`` starts them.
"""

import pytest
import torch

import losses
import mstudio
import mstudio.distributed as md
from tests.distributed import workers
from tests.distributed.spawn import check_ok, run_ranks


def _reference() -> dict:
    """One process, all ROWS rows, eager: what the ranks together must reproduce."""
    return workers.train(0, 1, False)


def _relative_update_error(ranks_params, ref) -> tuple[float, float]:
    """``|d_ranks - d_ref| / |d_ref|`` over all parameters (d = final - initial), and the worst single tensor's."""
    diffs, norms, worst = 0.0, 0.0, 0.0
    for name, initial in ref["initial"].items():
        d_ref = ref["params"][name] - initial
        d_ranks = ranks_params[name] - initial
        diff, norm = (d_ranks - d_ref).norm().item(), d_ref.norm().item()
        diffs, norms = diffs + diff**2, norms + norm**2
        if norm > 0:
            worst = max(worst, diff / norm)
        else:
            assert diff == 0, f"{name} gets no update in one process but moves on 2 ranks"
    return (diffs / norms) ** 0.5, worst


def _check_matches_one_process(values: list[dict], ref: dict, rtol: float) -> None:
    rank0, rank1 = values
    for name in ref["params"]:  # replicas: bit-identical (also checked inside the workers with check_replicas)
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    error, worst = _relative_update_error(rank0["params"], ref)
    assert error <= rtol, f"relative error of the updates {error:.3g} > {rtol} (worst tensor {worst:.3g})"
    # the value head gets no gradient from behaviour cloning: untouched on every rank, as in one process
    for name in ("value.weight", "value.bias"):
        assert torch.equal(rank0["params"][name], ref["initial"][name])
    # each rank's memory is the single process's memory for its rows (row 3 restarted at step 2, row 0 at step 4)
    rows = workers.ROWS // 2
    for rank, value in enumerate(values):
        own = slice(rank * rows, (rank + 1) * rows)
        torch.testing.assert_close(value["memory"][0], ref["memory"][0][own], rtol=1e-4, atol=1e-5)
        assert torch.equal(value["last_timestamp"], ref["last_timestamp"][own])
    # the step's metrics are means over the ranks: the same on both, and those of one process with all rows
    for step, (m0, m1, m_ref) in enumerate(zip(rank0["metrics"], rank1["metrics"], ref["metrics"])):
        for key in m_ref:
            assert torch.equal(m0[key], m1[key]), (step, key)
            torch.testing.assert_close(m0[key], m_ref[key], rtol=1e-4, atol=1e-6, msg=f"step {step} {key}")


def test_two_ranks_train_as_one_process_with_all_rows():
    values = check_ok(run_ranks(workers.train, 2, False, timeout=120))
    _check_matches_one_process(values, _reference(), rtol=1e-5)


@pytest.mark.slow
def test_two_ranks_compiled_train_as_one_process_in_one_graph():
    values = check_ok(run_ranks(workers.train, 2, True, timeout=600, collective_timeout=300))
    for value in values:
        graphs, breaks, reasons = value["graphs"]
        assert (graphs, breaks) == (1, 0), reasons
    _check_matches_one_process(values, _reference(), rtol=1e-5)


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_other_with_an_error(how):
    collective_timeout = 4.0
    results = run_ranks(workers.die_or_hang, 2, how, timeout=90, collective_timeout=collective_timeout)
    survivor = results[0]
    assert survivor.exitcode == 1, survivor
    assert "CollectiveFailure: rank 0 of 2: a collective in the data-parallel train step failed" in survivor.error
    # The survivor stops as soon as the dead peer's socket closes, or at the collective timeout when the peer
    # hangs (well before the silent rank wakes up): its own run is start-up, two steps and at most the timeout.
    assert survivor.seconds < workers.HANG, survivor.seconds
    assert results[1].exitcode == (3 if how == "dies" else 4)


def test_replica_checks_name_the_tensor_and_rank_that_differ_and_per_rank_state_gathers(tmp_path):
    values = check_ok(run_ranks(workers.replica_checks, 2, str(tmp_path / "made-first"), timeout=120))
    for value in values:
        assert value["first"] == "made by rank 0"  # rank_zero_first: rank 1 read what rank 0 wrote before it
        assert value["reduced"] == {"rank": 0.5, "same": 2.5}
        assert "params.core.bias_hh on rank(s) [1] differs from rank 0 (1 of" in value["check_replicas"]
        assert "params.core.bias_hh on rank(s) [1]" in value["first_step"]
        assert "the config differs across ranks: rank 0 has 'config-0', rank 1 has 'config-1'" in value["same"]
        # per-rank state for rank 0's checkpoint: stacked over ranks, and each rank takes its own row back
        assert value["gathered_shapes"][:2] == [(2, 2, 8), (2, 2, 3)] and value["gathered_shapes"][2][0] == 2
        assert value["round_trip"] and value["row_of_rank"]


def test_without_a_process_group_everything_is_single_process():
    assert (md.rank(), md.world_size(), md.is_distributed()) == (0, 1, False)
    assert md.init_distributed() == md.World(0, 1, 0, torch.device("cpu"))  # no torchrun variables: alone
    assert md.reduce_metrics({"a": torch.tensor(1.5), "b": 2}) == {"a": 1.5, "b": 2.0}
    md.check_replicas({"x": torch.ones(2)})
    policy, optimizer, objective = workers.setup()
    step = mstudio.make_train_step(policy, objective, optimizer, compile=False, data_parallel=True)
    state = mstudio.init_state(policy, optimizer, batch_size=2, objective=objective)
    with pytest.raises(RuntimeError, match="no torch.distributed process group is initialised"):
        step(state, workers.batches(slice(0, 2))[0])


def test_rank_seeds_differ_by_rank_and_epoch_and_repeat():
    seeds = {(r, e): md.rank_seed(7, r, e) for r in range(4) for e in range(4)}
    assert len(set(seeds.values())) == 16
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert md.rank_seed(7, 1, 2) == seeds[1, 2]
    with pytest.raises(ValueError, match="rank must be an int >= 0"):
        md.rank_seed(7, -1, 0)


def test_default_backend():
    assert md.default_backend("cpu") == "gloo"


def test_the_nonfinite_guard_decides_the_same_on_every_rank():
    # rank 1 alone sees an infinite loss (finite gradients) at step 2; both ranks skip it and stay equal
    for value in check_ok(run_ranks(workers.guard, 2, timeout=120)):
        assert value == {"nonfinite": [0, 0, 1, 0, 0], "skipped": 1}


def test_shard_policy_shards_parameters_and_averages_gradients_across_ranks():
    # FSDP2 on 2 CPU ranks (gloo): each rank holds half of each parameter's rows, and the gradient of the
    # module's backward is the gradient of one process over all rows (reduce-scatter with averaging)
    values = check_ok(run_ranks(workers.fsdp_gradients, 2, timeout=120))
    policy, _, _ = workers.setup()
    batch = workers.batches()[0]
    latents, _ = policy(batch, policy.initial_state(workers.ROWS))
    losses.behavior_clone(batch, latents, {})["loss"].backward()
    full = dict(policy.named_parameters())
    assert values[0]["local_shapes"]["conv2.weight"] == (16, 16, 4, 4)  # 32 output channels, half on each rank
    for name, grad in values[0]["grads"].items():
        torch.testing.assert_close(grad, full[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert set(values[0]["grads"]) == {n for n, p in full.items() if p.grad is not None}
    with pytest.raises(ValueError, match="no submodule of TinyPolicy is one of units=.'ResidualRecurrentBlock'"):
        md.shard_policy(policy, units=("ResidualRecurrentBlock",))
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        md.shard_policy(policy, units=("GRUCell",))


@pytest.mark.slow  # 2 spawned ranks: 20-30 s on 2 loaded cores
def test_functional_call_bypasses_fully_shard_and_gathered_shards_average_gradients():
    # functional_call on a fully_shard-ed module: FSDP2's hooks put the module's own gathered parameters in place of
    # the root's given ones, so those get no gradient (the module's own do): the pure step cannot call it so
    rank0, _ = check_ok(run_ranks(workers.fsdp_and_functional_call, 2, timeout=120))
    assert rank0["module_with_grad"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert "2.weight" not in rank0["given_with_grad"]
    # an unsharded module called with gathered shards: the gradient of one process on all rows, averaged over ranks
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plain.load_state_dict(rank0["initial"])
    rows = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    (plain(rows).sum() / 2).backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(rank0["gathered_grads"][name], p.grad, rtol=1e-6, atol=1e-7, msg=name)
