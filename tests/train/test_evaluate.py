"""mstudio.train.evaluate: means over a pass with a memory of its own, and a clear error for no batches."""

import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.train.evaluate import evaluate, init_eval_carry, make_eval_step
from tests.support.policies import CountingPolicy


def test_evaluate_is_the_mean_of_the_eval_steps_and_leaves_the_state_alone():
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    state = mstudio.init_state(policy, optimizer, 2)
    batches = [random_batch(2, 4, 8, seed=i, start=4 * i) for i in range(3)]
    step, carry, seen = make_eval_step(policy, losses.behavior_clone), init_eval_carry(policy, 2), []
    for batch in batches:
        carry, metrics = step(state, carry, batch)
        seen.append(metrics["loss"].double())
    means = evaluate(policy, losses.behavior_clone, state, iter(batches))
    assert means["loss"] == (sum(seen) / 3).item()
    assert torch.equal(state.memory[0], torch.zeros(2, 1))  # the train state's memory is not the pass's


def test_evaluate_without_batches_is_an_error():
    policy = CountingPolicy()
    state = mstudio.init_state(policy, mstudio.optim.adamw(1e-3), 2)
    with pytest.raises(ValueError, match="batches to evaluate are empty"):
        evaluate(policy, losses.behavior_clone, state, iter([]))


def test_the_eval_carry_keeps_no_view_of_the_batch():
    policy = CountingPolicy()
    state = mstudio.init_state(policy, mstudio.optim.adamw(1e-3), 2)
    batch = random_batch(2, 4, 8, start=torch.tensor([4, 20]))
    carry, _ = make_eval_step(policy, losses.behavior_clone)(state, init_eval_carry(policy, 2), batch)
    batch["timestamp"].fill_(-1)  # a loader refilling its buffer with the next batch
    assert carry.last_timestamp.tolist() == [7, 23]
