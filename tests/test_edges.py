"""Edge values at the library's entry points: refused with a clear error, or accepted and handled right."""

import math
import re

import numpy as np
import pytest
import torch

import mstudio
from mstudio.models import VPTPolicy
from tests.support.policies import CountingPolicy


@pytest.mark.parametrize("batch_size", [2, np.int64(2), np.int32(2), torch.tensor(2)], ids=["int", "np64", "np32", "tensor"])
def test_init_state_accepts_any_integral_batch_size(batch_size):
    state = mstudio.init_state(CountingPolicy(), mstudio.optim.adamw(1e-3), batch_size)
    assert state.batch_size == 2 and type(state.batch_size) is int
    assert state.last_timestamp.shape == (2,)


@pytest.mark.parametrize("batch_size", [True, False, torch.tensor(True)], ids=["True", "False", "tensor-bool"])
def test_init_state_refuses_a_bool_batch_size(batch_size):
    message = f"batch_size must be a positive int (rows per batch), got the bool {batch_size!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        mstudio.init_state(CountingPolicy(), mstudio.optim.adamw(1e-3), batch_size)


@pytest.mark.parametrize("batch_size, message", [
    (0, "batch_size must be a positive int, got 0"),
    (np.int64(-1), "batch_size must be a positive int, got -1"),
    (2.0, "batch_size must be a positive int, got float 2.0"),
    ("2", "batch_size must be a positive int, got str '2'"),
    (np.bool_(True), "batch_size must be a positive int, got bool"),
])
def test_init_state_refuses_other_batch_sizes(batch_size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        mstudio.init_state(CountingPolicy(), mstudio.optim.adamw(1e-3), batch_size)


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, math.nan, math.inf, True, "1"])
def test_vpt_policy_refuses_a_bad_temperature(temperature):
    message = f"VPTPolicy: temperature must be a finite number > 0 (it divides the action logits), got {temperature!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        VPTPolicy.from_preset("tiny", temperature=temperature)


def test_vpt_policy_accepts_a_positive_temperature():
    assert VPTPolicy.from_preset("tiny", temperature=np.float64(0.5)).pi_head["camera"].temperature == 0.5
