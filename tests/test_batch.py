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
    (("timestamp",), lambda t: t[:, :0],
     "batch['timestamp'] must be long (B, T) with at least one row and one step, got torch.int64 (2, 0)"),
    (("image",), None, "batch['image'] (uint8 (B, T, H, W, 3)) is required by the policy"),
    ((0,), torch.zeros(2, 4), "batch keys must be str, got 0 (int)"),
    (("image",), lambda t: t.float(), "batch['image'] must be uint8 (B, T, H, W, 3) with (B, T) = (2, 4), got torch.float32"),
    (("image",), lambda t: t[:, :3], "batch['image'] must be uint8 (B, T, H, W, 3) with (B, T) = (2, 4), got torch.uint8 (2, 3, 8, 8, 3)"),
    (("mask",), lambda t: t[:, 0], "batch['mask'] must be a tensor of shape (2, 4), got torch.uint8 (2,)"),
    (("agent_action", "camera"), None, "batch['agent_action']['camera'] is missing"),
    (("agent_action", "buttons"), lambda t: t[..., 0], "batch['agent_action']['buttons'] must be long (2, 4, 1), got torch.int64 (2, 4)"),
    (("agent_action", "buttons"), lambda t: t.int(), "batch['agent_action']['buttons'] must be long (2, 4, 1), got torch.int32"),
    (("agent_action", "camera"), lambda t: t.fill_(121), "batch['agent_action']['camera'] holds indices in [121, 121], outside [0, 121)"),
    (("agent_action", "buttons"), lambda t: t.fill_(-1), "batch['agent_action']['buttons'] holds indices in [-1, -1], outside [0, 8641)"),
]


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


def _mask(values, dtype=torch.float32):
    return lambda t: torch.tensor(values, dtype=dtype).reshape(1, -1).expand(2, 4).clone()


VALUE_CASES = [
    (("mask",), _mask([1, 1, -1, 0]), "batch['mask'] must hold values in [0, 1] (0 on padding), got values in [-1, 1]"),
    (("mask",), _mask([1, 2, 0, 0], torch.int64), "batch['mask'] must hold values in [0, 1] (0 on padding), got values in [0, 2]"),
    (("mask",), _mask([1, float("nan"), 0, 0]), "batch['mask'] must be finite with values in [0, 1], got 2 NaN or inf value(s)"),
    (("mask",), _mask([1, float("inf"), float("-inf"), 0]), "got 4 NaN or inf value(s)"),
    (("mask",), lambda t: t.to(torch.complex64),
     "batch['mask'] must be real (bool, integer or floating) with values in [0, 1], got torch.complex64 (2, 4)"),
    (("timestamp",), lambda t: t - 10, "batch['timestamp'] must be a non-negative frame index, got a minimum of -10"),
    (("timestamp",), lambda t: t.flip(1),
     "batch['timestamp'] must increase along T (a window's frames in order), got a step where it changes by -1"),
]


@pytest.mark.parametrize("path, value, message", CASES + VALUE_CASES)
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




def test_mask_in_zero_one_passes_for_every_real_dtype():
    batch = random_batch(2, 4, 8)
    for dtype in (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64):
        batch["mask"] = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]]).to(dtype)
        assert check_batch(batch) == (2, 4)
    batch["mask"] = torch.full((2, 4), 0.5)  # fractional weights are fine
    assert check_batch(batch) == (2, 4)


@pytest.mark.parametrize("path", [("mask",), ("image",), ("agent_action", "camera"), ("timestamp",), ("env_reward",)])
def test_meta_tensors_are_rejected_even_without_value_checks(path):
    batch = random_batch(2, 4, 8)
    batch["env_reward"] = torch.zeros(2, 4)
    _edit(path, lambda t: t.to("meta"))(batch)
    name = "batch" + "".join(f"[{k!r}]" for k in path)
    with pytest.raises(ValueError, match=re.escape(f"{name} is on the meta device")):
        check_batch(batch, check_values=False)


def test_meta_batch_is_rejected_by_a_step_that_does_not_validate():
    policy = CountingPolicy()
    optimizer = mstudio.optim.adamw(1e-3)
    state = mstudio.init_state(policy, optimizer, 2)
    step = mstudio.make_train_step(policy, losses.behavior_clone, optimizer, compile=False, validate=False)
    batch = random_batch(2, 4, 8)
    batch["mask"] = batch["mask"].to("meta")
    with pytest.raises(ValueError, match=re.escape("batch['mask'] is on the meta device")):
        step(state, batch)
    assert step.reached is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_another_device_than_timestamp_are_rejected():
    batch = random_batch(2, 4, 8)
    batch["mask"] = batch["mask"].cuda()
    with pytest.raises(ValueError, match=re.escape("batch['mask'] must be on batch['timestamp']'s device cpu")):
        check_batch(batch, check_values=False)


def test_value_checks_take_one_device_sync(monkeypatch):
    calls = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    batch = random_batch(2, 4, 8)
    batch["mask"] = batch["mask"].float()
    assert check_batch(batch) == (2, 4)
    assert calls == ["tolist"]
    calls.clear()
    assert check_batch(batch, check_values=False) == (2, 4)
    assert calls == []
