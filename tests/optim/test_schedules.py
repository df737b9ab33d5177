"""Schedules are float64 functions of a step tensor."""

import math

import pytest
import torch

from mstudio.optim import schedules


def values(schedule, steps):
    return [schedule(torch.tensor(k)).item() for k in steps]


def test_linear_warmup_is_minestudios_lambda():
    assert values(schedules.linear_warmup(4e-5, 2000), [0, 1, 1998, 1999, 5000]) == [
        4e-5 * min((k + 1) / 2000, 1) for k in [0, 1, 1998, 1999, 5000]
    ]
    assert values(schedules.linear_warmup(0.1, 0), [0, 7]) == [0.1, 0.1]
    with pytest.raises(ValueError):
        schedules.linear_warmup(0.1, -1)


def test_cosine_decay():
    got = values(schedules.cosine_decay(2.0, 10, alpha=0.1), [0, 5, 10, 20])
    expected = [2.0 * ((0.9) * 0.5 * (1 + math.cos(math.pi * min(k, 10) / 10)) + 0.1) for k in [0, 5, 10, 20]]
    assert got == pytest.approx(expected, rel=1e-15)


def test_warmup_composes_with_a_schedule_and_join_switches():
    warm_cos = schedules.linear_warmup(schedules.cosine_decay(1.0, 100), 10)
    assert warm_cos(torch.tensor(4)).item() == pytest.approx(0.5 * (0.5 * (1 + math.cos(math.pi * 0.04))))
    joined = schedules.join([schedules.constant(1.0), schedules.cosine_decay(1.0, 10)], boundaries=[5])
    assert values(joined, [0, 4, 5, 10, 15]) == pytest.approx([1.0, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0], abs=1e-15)
    with pytest.raises(ValueError):
        schedules.join([schedules.constant(1.0)], boundaries=[3])


def test_schedules_return_float64_tensors():
    for schedule in (schedules.constant(1.0), schedules.linear_warmup(1.0, 3), schedules.cosine_decay(1.0, 3)):
        assert schedule(torch.tensor(1)).dtype == torch.float64
