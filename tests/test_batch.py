"""Bad batches are rejected before anything runs, with the key, what was expected and what came."""

import re

import pytest
import torch

import losses
import mstudio
from mstudio.batch import check_batch, normalize_batch
from mstudio.data.synthetic import random_batch
from tests.support.policies import CountingPolicy


def _edit(path, value):
    def edit(batch):
        target = batch
        for key in path[:-1]:
            target = target[key]
        if value is None:
            del target[path[-1]]
        else:
            target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return edit


CASES = [
    (("timestamp",), None, "batch['timestamp'] (long (B, T)) is required"),
    (("timestamp",), lambda t: t.int(), "batch['timestamp'] must be long (B, T), got torch.int32"),
    (("image",), lambda t: t.float(), "batch['image'] must be uint8 (B, T, H, W, 3) with (B, T) = (2, 4), got torch.float32"),
    (("image",), lambda t: t[:, :3], "batch['image'] must be uint8 (B, T, H, W, 3) with (B, T) = (2, 4), got torch.uint8 (2, 3, 8, 8, 3)"),
    (("mask",), lambda t: t[:, 0], "batch['mask'] must be a tensor of shape (2, 4), got torch.uint8 (2,)"),
    (("agent_action", "camera"), None, "batch['agent_action']['camera'] is missing"),
    (("agent_action", "buttons"), lambda t: t[..., 0], "batch['agent_action']['buttons'] must be long (2, 4, 1), got torch.int64 (2, 4)"),
    (("agent_action", "buttons"), lambda t: t.int(), "batch['agent_action']['buttons'] must be long (2, 4, 1), got torch.int32"),
    (("agent_action", "camera"), lambda t: t.fill_(121), "batch['agent_action']['camera'] holds indices in [121, 121], outside [0, 121)"),
    (("agent_action", "buttons"), lambda t: t.fill_(-1), "batch['agent_action']['buttons'] holds indices in [-1, -1], outside [0, 8641)"),
]


@pytest.mark.parametrize("path, value, message", CASES)
def test_bad_batch_is_rejected_before_the_step_runs(path, value, message):
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    state = mstudio.init_state(policy, optimizer, 2)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
    batch = random_batch(2, 4, 8)
    _edit(path, value)(batch)
    with pytest.raises(ValueError, match=re.escape(message)):
        step(state, batch)
    assert step.reached is None  # nothing ran


def test_batch_size_must_match_the_state():
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
    with pytest.raises(ValueError, match=r"batch size 3, but the train state was made for batch_size=2"):
        step(mstudio.init_state(policy, optimizer, 2), random_batch(3, 4, 8))


def test_reserved_and_changing_keys():
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    state = mstudio.init_state(policy, optimizer, 2)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False)
    with pytest.raises(ValueError, match="'step' is reserved"):
        step(state, {**random_batch(2, 4, 8), "step": torch.tensor(0)})
    with pytest.raises(ValueError, match="'hyperparams' is reserved"):
        step(state, {**random_batch(2, 4, 8), "hyperparams": {}})
    state, _ = step(state, random_batch(2, 4, 8))
    batch = random_batch(2, 4, 8, start=4)
    batch["env_reward"] = torch.zeros(2, 4)  # a tensor key the first batch did not have
    with pytest.raises(ValueError, match=r"new \['env_reward'\]"):
        step(state, batch)


def test_normalize_batch_fills_the_mask_and_drops_non_tensors():
    batch = random_batch(2, 3, 8)
    del batch["mask"]
    batch["episode"] = ["a", "b"]
    out = normalize_batch(batch)
    assert "episode" not in out and "mask" not in batch and batch["episode"] == ["a", "b"]  # input untouched
    assert out["mask"].dtype == torch.uint8 and out["mask"].shape == (2, 3) and bool(out["mask"].all())
    assert out["agent_action"] is batch["agent_action"]
    given = torch.zeros(2, 3, dtype=torch.bool)
    assert normalize_batch({**batch, "mask": given})["mask"] is given


def test_check_batch_returns_sizes_and_accepts_any_mask_dtype():
    batch = random_batch(3, 5, 8)
    for dtype in (torch.uint8, torch.bool, torch.float32):
        batch["mask"] = batch["mask"].to(dtype)
        assert check_batch(batch) == (3, 5)
