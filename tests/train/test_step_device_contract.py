"""The CUDA path's contract, checked on the CPU: metrics that survive the next CUDA-graph replay, float32 logits and
loss under bf16 autocast, batches moved with their dtypes."""

import pytest
import torch

import losses
import mstudio
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy, VPTPolicy


def _setup():
    torch.manual_seed(0)
    policy = TinyPolicy(hidsize=16, image_size=16)
    optimizer = mstudio.optim.adamw(1e-3)
    step = mstudio.make_train_step(policy, losses.weighted(losses.behavior_clone, 0.01), optimizer, compile=False)
    return step, mstudio.init_state(policy, optimizer, 2)


def _replaying(step_fn):
    """``step_fn`` as a CUDA graph returns outputs: every call writes its metrics into the same buffers."""
    buffers = {}

    def replay(state, batch):
        new_state, metrics = step_fn(state, batch)
        for key, value in metrics.items():
            buffers.setdefault(key, torch.empty_like(value)).copy_(value)
        return new_state, dict(buffers)

    return replay


def test_metrics_survive_the_next_replay_and_the_old_state_is_spent():
    step, state = _setup()
    batches = [random_batch(2, 4, 16, seed=i, start=4 * i) for i in range(3)]
    state, _ = step(state, batches[0])  # builds the step
    step._step_fn, step._cuda_graphs = _replaying(step._step_fn), True  # what compiling on CUDA sets up
    first_state, first = step(state, batches[1])
    kept = {key: value.item() for key, value in first.items()}
    _, second = step(first_state, batches[2])
    assert second["loss"].item() != kept["loss"]  # the fake replay did overwrite its buffers
    assert {key: value.item() for key, value in first.items()} == kept
    with pytest.raises(RuntimeError, match="donated to an earlier step"):
        step(first_state, batches[2])  # a replay overwrote it: refused, not silently read


@pytest.mark.slow  # bf16 convolutions on a CPU are ~400x slower than float32: one tiny step takes seconds
def test_bf16_autocast_keeps_logits_and_loss_in_float32():
    torch.manual_seed(0)
    policy = VPTPolicy.from_preset("tiny")
    batch = random_batch(1, 2, 64, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents, _ = policy(batch, policy.initial_state(1))
    assert {head: logits.dtype for head, logits in latents["pi_logits"].items()} == {
        "buttons": torch.float32, "camera": torch.float32}
    optimizer = mstudio.optim.adamw(1e-3, clip_norm=1.0)
    step = mstudio.make_train_step(policy, losses.weighted(losses.behavior_clone, 0.01), optimizer, compile=False,
                                   autocast_dtype=torch.bfloat16)
    state = mstudio.init_state(policy, optimizer, 1)
    new_state, metrics = step(state, batch)
    assert metrics["loss"].dtype == torch.float32 and torch.isfinite(metrics["loss"])
    assert metrics["nonfinite"].item() == 0
    assert all(p.dtype == torch.float32 for p in new_state.params.values())
    assert any(not torch.equal(new_state.params[n], state.params[n]) for n in state.params)


def test_batch_to_device_keeps_structure_and_dtypes():
    batch = random_batch(2, 3, 8, seed=0)
    moved = mstudio.train.batch_to_device(batch, "meta")
    assert moved["image"].device.type == "meta" and moved["image"].dtype == torch.uint8  # frames stay uint8
    assert moved["agent_action"]["buttons"].dtype == batch["agent_action"]["buttons"].dtype
    assert moved.keys() == batch.keys()
    same = mstudio.train.batch_to_device(batch, "cpu")
    assert same["image"] is batch["image"]  # already there: not copied
