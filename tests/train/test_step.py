"""The eager train step: MineStudio's semantics, purity, memory carry, metrics and errors."""

import copy

import optree
import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy
from mstudio.train.step import train_step_function, value_and_grad_autograd, value_and_grad_func

from benchmarks.minestudio_style import make_minestudio_step
from tests.support.policies import CountingPolicy

HYPER = dict(lr=1e-3, weight_decay=0.1, warmup_steps=3, clip_norm=1.0)


def episode_batches(B=2, T=4, image=16, count=6):
    """Row 0 runs one long episode; row 1 restarts at batches 2 and 4 (timestamps back to 0)."""
    starts = [(4 * i, 4 * (i % 2)) for i in range(count)]
    return [random_batch(B, T, image, seed=i, start=torch.tensor(s)) for i, s in enumerate(starts)]


def minestudio_reference(policy, batches, weight=0.01):
    """MineStudio's step (benchmarks/minestudio_style.py) over ``batches``, on a copy of ``policy``."""
    policy = copy.deepcopy(policy)
    objective = losses.weighted(losses.behavior_clone, weight)
    step = make_minestudio_step(policy, lambda batch, latents: objective(batch, latents, {}), **HYPER)
    history = []
    for batch in batches:
        outputs, memory = step(batch)
        history.append({k: float(v) for k, v in outputs.items()})
    return policy, memory, history


def make(policy, B=2, compile=False, objective=None):
    optimizer = mstudio.optim.adamw(HYPER["lr"], weight_decay=HYPER["weight_decay"],
                                    warmup_steps=HYPER["warmup_steps"], clip_norm=HYPER["clip_norm"])
    objective = objective or losses.weighted(losses.behavior_clone, 0.01)
    return mstudio.init_state(policy, optimizer, B), mstudio.make_train_step(policy, objective, optimizer, compile=compile)


@pytest.mark.parametrize("policy_cls", [CountingPolicy, lambda: TinyPolicy(hidsize=16, image_size=16)])
def test_eager_steps_match_minestudio(policy_cls):
    torch.manual_seed(0)
    policy = policy_cls() if policy_cls is CountingPolicy else policy_cls()
    image = 8 if isinstance(policy, CountingPolicy) else 16
    batches = episode_batches(image=image)
    ref_policy, ref_memory, history = minestudio_reference(policy, batches)
    state, step = make(policy)
    for batch, ref in zip(batches, history):
        state, metrics = step(state, batch)
        for key in ("loss", "camera_loss", "button_loss", "entropy", "bc_weight"):
            assert metrics[key].item() == pytest.approx(ref[key], rel=1e-6), key
    ref_params = dict(ref_policy.named_parameters())
    for name, value in state.params.items():
        assert ((value - ref_params[name]).norm() / ref_params[name].norm()).item() <= 1e-6, name
    # The value head gets no gradient under BC: bit-identical, as in MineStudio.
    assert torch.equal(state.params["value.weight"], policy.value.weight)
    assert torch.equal(state.params["value.weight"], ref_params["value.weight"])
    assert "value.weight" not in step.reached
    for ours, ref in zip(state.memory, ref_memory):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_memory_carry_follows_the_reset_rule():
    policy = CountingPolicy()
    state, step = make(policy)
    # Batch 0 starts at 1 for row 0 (continues from the initial memory) and at 0 for row 1 (restart).
    seen = []
    for start in [(1, 0), (5, 4), (9, 0), (13, 4)]:
        state, _ = step(state, random_batch(2, 4, 8, start=torch.tensor(start)))
        seen.append(state.memory[0][:, 0].tolist())
    assert seen == [[4, 4], [8, 8], [12, 4], [16, 8]]
    assert state.last_timestamp.tolist() == [16, 7]
    assert state.step.item() == 4


def test_step_leaves_state_and_batch_untouched():
    state, step = make(CountingPolicy())
    batch = random_batch(2, 4, 8)
    snapshot = optree.tree_map(torch.clone, (state, batch))
    new_state, _ = step(state, batch)
    new_state, _ = step(new_state, random_batch(2, 4, 8, start=4))
    same = optree.tree_map(torch.equal, snapshot, (state, batch))
    assert all(optree.tree_leaves(same))
    assert "step" not in batch


def test_a_step_is_built_by_its_first_call():
    state, step = make(CountingPolicy())
    assert not step.built
    step(state, random_batch(2, 4, 8))
    assert step.built


def test_metrics_hold_objective_outputs_lr_and_grad_norm():
    state, step = make(CountingPolicy())
    lrs = []
    for i in range(4):
        state, metrics = step(state, random_batch(2, 4, 8, seed=i, start=4 * i))
        lrs.append(metrics["lr"].item())
        assert set(metrics) == {"loss", "camera_loss", "button_loss", "entropy", "bc_weight", "lr", "grad_norm",
                                "nonfinite", "skipped_updates"}
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])


def test_grad_norm_is_the_pre_clip_global_norm():
    policy = CountingPolicy()
    state, step = make(policy)
    batch = random_batch(2, 4, 8)
    _, metrics = step(state, batch)
    latents, _ = policy(batch, policy.initial_state(2))
    losses.weighted(losses.behavior_clone, 0.01)(batch, latents, {})["loss"].backward()
    expected = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], 1e9)
    assert metrics["grad_norm"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_scheduled_objective_sees_the_step_counter():
    from mstudio.optim import schedules

    objective = losses.weighted(losses.behavior_clone, schedules.linear_warmup(1.0, 4))
    state, step = make(CountingPolicy(), objective=objective)
    weights = []
    for i in range(3):
        state, metrics = step(state, random_batch(2, 4, 8, start=4 * i))
        weights.append(metrics["bc_weight"].item())
    assert weights == pytest.approx([0.25, 0.5, 0.75])


def test_the_two_gradient_implementations_agree():
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3, weight_decay=0.1, warmup_steps=2, clip_norm=1.0)
    state = mstudio.init_state(policy, optimizer, 2)
    apply_fn, _, _ = mstudio.functionalize(policy)
    objective = losses.weighted(losses.behavior_clone, 0.01)
    reached = frozenset(k for k in state.params if not k.startswith("value"))
    batch = random_batch(2, 4, 16)
    a = train_step_function(apply_fn, objective, optimizer, reached, value_and_grad_func)(state, batch)
    b = train_step_function(apply_fn, objective, optimizer, reached, value_and_grad_autograd)(state, batch)
    close = optree.tree_map(lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
    assert all(optree.tree_leaves(close))


def test_policy_writing_to_itself_is_rejected_on_the_first_step():
    class Leaky(CountingPolicy):
        def forward(self, batch, state_in):
            self.cache = state_in
            return super().forward(batch, state_in)

    state, step = make(Leaky())
    with pytest.raises(RuntimeError, match="wrote attribute"):
        step(state, random_batch(2, 4, 8))


@pytest.mark.parametrize(
    "objective, message",
    [
        (lambda b, l, p: {"camera_loss": torch.tensor(1.0)}, "must return a dict with a 'loss'"),
        (lambda b, l, p: {"loss": l["vpred"].sum(-1)}, "float scalar 'loss'"),
        (lambda b, l, p: {"loss": torch.tensor(1.0)}, "depends on no trainable parameter"),
    ],
)
def test_malformed_objectives(objective, message):
    state, step = make(CountingPolicy(), objective=objective)
    with pytest.raises(ValueError, match=message):
        step(state, random_batch(2, 4, 8))


def test_init_state_rejects_memory_without_a_batch_dimension():
    class Bad(CountingPolicy):
        def initial_state(self, batch_size):
            return (torch.zeros(1),)

    with pytest.raises(ValueError, match=r"batch \(3\) on dim 0"):
        mstudio.init_state(Bad(), mstudio.optim.adamw(1e-3), 3)
    with pytest.raises(ValueError, match="positive int"):
        mstudio.init_state(CountingPolicy(), mstudio.optim.adamw(1e-3), 0)


def test_frozen_parameters_are_never_updated():
    policy = TinyPolicy(hidsize=16, image_size=16)
    policy.conv1.weight.requires_grad_(False)
    state, step = make(policy)
    assert "conv1.weight" in state.buffers and "conv1.weight" not in state.params
    for i in range(3):
        state, _ = step(state, random_batch(2, 4, 16, seed=i, start=4 * i))
    assert torch.equal(state.buffers["conv1.weight"], policy.conv1.weight)
    assert not torch.equal(state.params["conv1.bias"], policy.conv1.bias)


def test_a_one_row_state_keeps_no_view_of_the_batch():
    # timestamp[:, -1] of a (1, T) batch is a view that .contiguous() hands back as it is
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
    batch = random_batch(1, 5, 16, start=torch.tensor([10]))
    state, _ = step(mstudio.init_state(policy, optimizer, 1), batch)
    assert state.last_timestamp.tolist() == [14] and state.last_timestamp.stride() == (1,)
    batch["timestamp"].fill_(-7)  # a loader reusing its buffer for the next batch
    assert state.last_timestamp.tolist() == [14]
