"""A long compiled run recompiles nothing: a few hundred steps of a tiny policy through episode resets, the warmup's
end, a hyper-parameter change, the EMA and a mask that comes and goes, counted by dynamo's own counters."""

import optree
import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy

pytestmark = pytest.mark.slow  # one compile of a tiny step: 20-60 s on 2 cores, minutes under load

STEPS = 300
WARMUP = 40


def _batches(count, B=2, T=4):
    """Each row restarts its episode at random (timestamps back to 0) about every fifth batch."""
    generator = torch.Generator().manual_seed(0)
    starts, batches = torch.zeros(B, dtype=torch.long), []
    for i in range(count):
        restart = torch.rand(B, generator=generator) < 0.2
        starts = torch.where(restart, 0, starts)
        batch = random_batch(B, T, 16, seed=i % 7, start=starts.clone())  # few distinct frames: cheap to make
        if i % 9 == 4:
            del batch["mask"]  # filled with ones by the step: same graph
        batches.append(batch)
        starts = starts + T
    return batches


def test_hundreds_of_compiled_steps_compile_once():
    torch.manual_seed(0)
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3, weight_decay=0.1, warmup_steps=WARMUP, clip_norm=1.0)
    objective = losses.weighted(losses.behavior_clone, losses.Hyperparam("bc_weight", 0.01))
    step = mstudio.make_train_step(policy, objective, optimizer, ema_decay=0.99)
    state = mstudio.init_state(policy, optimizer, 2, objective=objective, ema=True)
    batches = _batches(STEPS)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    lrs = []
    for i, batch in enumerate(batches):
        if i == STEPS // 2:
            state = mstudio.set_hyperparams(state, learning_rate=5e-4, bc_weight=0.02)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            state, metrics = step(state, batch, donate=True)
        lrs.append(metrics["lr"].item())
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    assert state.step.item() == STEPS and state.skipped_updates.item() == 0
    # the schedule really moved (warmup, then flat, then the new lr): traced as data, not constants
    assert lrs[0] == pytest.approx(1e-3 / WARMUP) and lrs[WARMUP] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(5e-4)


def test_a_batch_of_one_row_compiles_once():
    # A (1, T) slice such as timestamp[:, -1] counts as contiguous whatever its stride, so .contiguous() keeps the
    # batch's stride (T); the next call's guard expected the state's own (1) and recompiled (VPT 1x, B1 x T16).
    torch.manual_seed(0)
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer)
    state = mstudio.init_state(policy, optimizer, 1)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for i, batch in enumerate(_batches(4, B=1, T=5)):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            state, _ = step(state, batch)
        assert all(leaf.is_contiguous() and leaf.stride() == torch.empty(leaf.shape).stride()
                   for leaf in optree.tree_leaves(state) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0)
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["recompiles"].values()) == 0
    assert state.last_timestamp.tolist() == [_batches(4, B=1, T=5)[-1]["timestamp"][0, -1].item()]
