"""The sharded-state train step (:mod:`mstudio.train.sharded`) on 2 CPU processes (gloo), spawned by the tests:
parameters, EMA and Adam moments as ``Shard(0)`` DTensors, the same training as one process with all rows and as
the replicated data-parallel step, a bit-exact shard/unshard round trip, the global gradient norm over shards,
and one non-finite verdict for all ranks. Eager only. What the ranks run is in ``sharded_workers.py``.
"""

import pytest
import torch

import tests.distributed.test_data_parallel as data_parallel
from mstudio.train.sharded import state_mesh
from tests.distributed import sharded_workers, workers
from tests.distributed.spawn import check_ok, run_ranks

slow = pytest.mark.slow  # 2 spawned ranks: 20-60 s on 2 loaded cores


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """One 2-rank run: the sharded and the replicated step interleaved on each rank's rows (EMA kept)."""
    return check_ok(run_ranks(sharded_workers.sharded_and_replicated, 2, timeout=300))


@slow
def test_sharded_step_trains_as_one_process_with_all_rows(ranks):
    # parameters (unsharded at the end) within 1e-5 relative of one process's updates, each rank's memory its own
    # rows of it, the metrics means over ranks and equal on both
    values = [{"params": v["sharded"].params, "memory": v["sharded"].memory,
               "last_timestamp": v["sharded"].last_timestamp, "metrics": v["metrics"]} for v in ranks]
    data_parallel._check_matches_one_process(values, data_parallel._reference(), rtol=1e-5)


@slow
def test_sharded_step_equals_the_replicated_data_parallel_step(ranks):
    for value in ranks:
        sharded, replicated = value["sharded"], value["replicated"]
        initial = value["initial"]
        # the updates agree to float32 rounding (the global norm and the mean over ranks sum in another order,
        # which Adam amplifies on near-zero gradients, hence a norm over all updates, not elementwise)
        error, worst = data_parallel._relative_update_error(sharded.params,
                                                             {"initial": initial, "params": replicated.params})
        assert error <= 1e-5, f"relative error of the updates {error:.3g} (worst tensor {worst:.3g})"
        ema_error, _ = data_parallel._relative_update_error(sharded.ema, {"initial": initial, "params": replicated.ema})
        assert ema_error <= 1e-5, ema_error
        for m_s, m_r in zip(value["metrics"], value["replicated_metrics"]):
            assert set(m_s) == set(m_r)
            for key in m_r:
                assert not isinstance(m_s[key], torch.distributed.tensor.DTensor), key
                torch.testing.assert_close(m_s[key], m_r[key], rtol=1e-5, atol=1e-7, msg=key)
        # the carry: this rank's own rows, as the replicated step's (up to the parameters' rounding)
        torch.testing.assert_close(sharded.memory[0], replicated.memory[0], rtol=1e-5, atol=1e-6)
        assert not isinstance(sharded.memory[0], torch.distributed.tensor.DTensor)
        assert int(sharded.skipped_updates) == 0 and sharded.step.item() == workers.STEPS


@slow
def test_state_stays_sharded_and_round_trips_bit_exactly(ranks):
    rank0, rank1 = ranks
    assert rank0["round_trip"] and rank0["round_trip_same_tree"] and rank1["round_trip"]
    # params, EMA, Adam's mu and nu: 4 x 18 DTensors; only they (the step's scalars come back plain)
    assert rank0["sharded_leaves"] == 4 * 18
    assert rank0["grads_are_shards"] and rank0["dtensors_elsewhere"] == []
    # each rank holds its half of dim 0 (value.weight, 1 row: all on rank 0, none on rank 1)
    full = rank0["initial"]
    for name, rows in rank0["local_rows"].items():
        assert rows == (full[name].shape[0] + 1) // 2, name
        assert rank1["local_rows"][name] == full[name].shape[0] - rows, name


@slow
def test_global_norm_over_shards_is_the_norm_of_the_whole(ranks):
    for value in ranks:
        sharded, full, kind = value["norms"]
        assert kind == "DTensor (Replicate(),)"
        assert sharded == pytest.approx(full, rel=1e-6)


@slow
def test_sharded_nonfinite_guard_decides_the_same_on_every_rank():
    # rank 1 alone sees an infinite loss at step 2: both ranks skip it, parameters and moments bit-unchanged (the
    # objective reads a parameter, gathered for it)
    for value in check_ok(run_ranks(sharded_workers.sharded_guard, 2, timeout=120)):
        assert value["nonfinite"] == [0, 0, 1, 0, 0] and value["skipped"] == 1
        assert value["unchanged"] == [False, False, True, False, False]


def test_state_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_distributed"):
        state_mesh()


def test_config_refuses_shard_with_compile():
    from mstudio.trainer import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="distributed.shard"):
        config_from_dict({"distributed": {"shard": True}})  # run.compile defaults to true
    assert config_from_dict({"distributed": {"shard": True}, "run": {"compile": False}}).distributed.shard


@slow
def test_trainer_with_distributed_shard_saves_full_checkpoints_and_resumes(tmp_path):
    from mstudio.data import EpisodeStore, fill_store

    store = tmp_path / "store"
    fill_store(EpisodeStore.create(store, (64, 64)), episodes=7, frames=(16, 28), seed=1, vocabulary=8)
    rank0, rank1 = check_ok(run_ranks(sharded_workers.sharded_trainer, 2, str(store), str(tmp_path / "runs"),
                                      timeout=600, collective_timeout=120))
    assert rank0["a_sharded"]
    # the checkpoints of a sharded run have the layout of a replicated one: full tensors, same names
    sharded_layout, replicated_layout = rank0["layouts"]
    assert sharded_layout == replicated_layout
    for value in (rank0, rank1):
        # a sharded run resumed sharded continues bit-exactly
        for x, y in zip(torch.utils._pytree.tree_leaves(value["a"]), torch.utils._pytree.tree_leaves(value["b"])):
            assert torch.equal(x, y)
        # ... and resumed replicated from the same checkpoint, its next update agrees to float32 rounding
        error, worst = data_parallel._relative_update_error(value["c"].params,
                                                             {"initial": value["at_2"].params, "params": value["a"].params})
        assert error <= 1e-5, f"relative error of the update {error:.3g} (worst tensor {worst:.3g})"
