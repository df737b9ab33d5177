"""combine / weighted: sums, same-named metrics, weights as numbers and as schedules of the step."""

import functools

import pytest
import torch

import losses
from mstudio.optim import schedules


def const(name, loss, **metrics):
    def objective(batch, latents, params):
        return {"loss": torch.tensor(loss), **{k: torch.tensor(v) for k, v in metrics.items()}}

    objective.__name__ = name
    return objective


def test_combine_adds_loss_and_same_named_metrics():
    out = losses.combine(const("a", 1.0, shared=2.0, only_a=5.0), const("b", 3.0, shared=4.0))({}, {}, {})
    assert out == {"loss": 4.0, "shared": 6.0, "only_a": 5.0}


def test_combinators_nest():
    inner = losses.combine(const("a", 1.0), losses.weighted(const("b", 2.0), 3.0))
    out = losses.combine(inner, losses.weighted(inner, 10.0))({}, {}, {})
    assert out["loss"].item() == pytest.approx(7.0 + 70.0)


def test_weighted_scales_loss_and_weight_metrics_only():
    out = losses.weighted(const("bc", 2.0, bc_weight=1.0, camera_loss=8.0), 0.01)({}, {}, {})
    assert out["loss"].item() == pytest.approx(0.02)
    assert out["bc_weight"].item() == pytest.approx(0.01)
    assert out["camera_loss"].item() == 8.0


def test_weighted_behavior_clone_equals_its_weight_argument():
    gen = torch.Generator().manual_seed(0)
    latents = {"pi_logits": {"buttons": torch.randn(2, 3, 1, 8641, generator=gen).log_softmax(-1),
                             "camera": torch.randn(2, 3, 1, 121, generator=gen).log_softmax(-1)}}
    batch = {"agent_action": {"buttons": torch.randint(0, 8641, (2, 3, 1), generator=gen),
                              "camera": torch.randint(0, 121, (2, 3, 1), generator=gen)}}
    a = losses.weighted(losses.behavior_clone, 0.01)(batch, latents, {})
    b = functools.partial(losses.behavior_clone, weight=0.01)(batch, latents, {})
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)


def test_scheduled_weight_reads_the_step_from_the_batch():
    objective = losses.weighted(const("kl", 1.0, kl_weight=1.0), schedules.linear_warmup(0.5, 4))
    for step, expected in [(0, 0.125), (1, 0.25), (3, 0.5), (10, 0.5)]:
        out = objective({losses.STEP_KEY: torch.tensor(step)}, {}, {})
        assert out["loss"].item() == pytest.approx(expected)
        assert out["kl_weight"].item() == pytest.approx(expected)


def test_scheduled_weight_without_step_is_an_error():
    objective = losses.weighted(const("kl", 1.0), schedules.constant(0.5))
    with pytest.raises(ValueError, match=r"batch\['step'\]"):
        objective({}, {}, {})


def test_objective_without_loss_is_an_error():
    def broken(batch, latents, params):
        return {"camera_loss": torch.tensor(1.0)}

    with pytest.raises(ValueError, match="broken must return a dict with a 'loss'"):
        losses.combine(broken)({}, {}, {})
    with pytest.raises(ValueError):
        losses.combine()


def test_losses_import_without_the_trainer():
    import subprocess
    import sys

    code = "import losses, sys; bad = [m for m in sys.modules if m.startswith(('mstudio.train', 'mstudio.data', 'mstudio.models'))]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
