"""combine / weighted: sums, same-named metrics, weights as numbers and as schedules of the step."""

import functools
import re

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


def test_weighted_scales_loss_and_the_declared_weight_metric_only():
    objective = const("bc", 2.0, bc_weight=1.0, other_weight=1.0, camera_loss=8.0)
    out = losses.weighted(objective, 0.01, weight_key="bc_weight")({}, {}, {})
    assert out["loss"].item() == pytest.approx(0.02)
    assert out["bc_weight"].item() == pytest.approx(0.01)
    assert out["other_weight"].item() == 1.0 and out["camera_loss"].item() == 8.0  # no name sniffing
    assert losses.weighted(objective, 0.01)({}, {}, {})["bc_weight"].item() == 1.0  # nothing declared
    assert losses.weighted(losses.behavior_clone, 0.5).weight_key == "bc_weight"


def test_hyperparam_weight_reads_the_state_value():
    objective = losses.combine(
        losses.weighted(const("a", 2.0), losses.Hyperparam("w_a", 0.5)),
        losses.weighted(const("b", 1.0, kl_weight=1.0), losses.Hyperparam("w_b", 3.0), weight_key="kl_weight"),
    )
    assert losses.hyperparams_of(objective) == {"w_a": 0.5, "w_b": 3.0}
    values = {"w_a": torch.tensor(0.25, dtype=torch.float64), "w_b": torch.tensor(2.0, dtype=torch.float64)}
    out = objective({losses.HYPERPARAMS_KEY: values}, {}, {})
    assert out["loss"].item() == 2.0 * 0.25 + 1.0 * 2.0 and out["kl_weight"].item() == 2.0
    with pytest.raises(ValueError, match="hyper-parameter 'w_a'"):
        objective({}, {}, {})
    with pytest.raises(ValueError, match="two defaults"):
        losses.combine(losses.weighted(const("a", 1.0), losses.Hyperparam("w", 1.0)),
                       losses.weighted(const("b", 1.0), losses.Hyperparam("w", 2.0)))


def test_weighted_behavior_clone_equals_its_weight_argument():
    gen = torch.Generator().manual_seed(0)
    latents = {"pi_logits": {"buttons": torch.randn(2, 3, 1, 8641, generator=gen).log_softmax(-1),
                             "camera": torch.randn(2, 3, 1, 121, generator=gen).log_softmax(-1)}}
    batch = {"agent_action": {"buttons": torch.randint(0, 8641, (2, 3, 1), generator=gen),
                              "camera": torch.randint(0, 121, (2, 3, 1), generator=gen)}}
    a = losses.weighted(losses.behavior_clone, 0.01)(batch, latents, {})
    with pytest.warns(DeprecationWarning, match="losses.weighted"):
        b = functools.partial(losses.behavior_clone, weight=0.01)(batch, latents, {})
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)


def test_scheduled_weight_reads_the_step_from_the_batch():
    objective = losses.weighted(const("kl", 1.0, kl_weight=1.0), schedules.linear_warmup(0.5, 4), weight_key="kl_weight")
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


@pytest.mark.parametrize("weight, error, message", [
    (float("nan"), ValueError, "weighted: weight must be a finite number, a schedule (step -> weight) or a "
                               "losses.Hyperparam, got nan"),
    ("0.1", TypeError, "got str '0.1'"),
    (torch.tensor(0.1), TypeError, "got tensor torch.float32 ()"),
    (losses.Hyperparam("w", float("inf")), ValueError, "losses.Hyperparam('w') default must be a finite number, got inf"),
])
def test_weighted_refuses_weights_it_cannot_use(weight, error, message):
    with pytest.raises(error, match=re.escape(message)):
        losses.weighted(losses.behavior_clone, weight)


@pytest.mark.parametrize("value, message", [
    ("x", "objective draft returned metric 'note' as str 'x'; metrics must be scalars"),
    (torch.ones(2), "objective draft returned metric 'note' as tensor torch.float32 (2,)"),
])
def test_objective_metrics_must_be_scalars(value, message):
    def draft(batch, latents, params):
        return {"loss": torch.zeros(()), "note": value}

    with pytest.raises(ValueError, match=re.escape(message)):
        losses.combine(draft)({}, {}, {})


def test_weighted_finds_the_weight_key_of_a_partials_function():
    smoothed = functools.partial(losses.label_smoothed_behavior_clone, smoothing=0.2)
    assert losses.weighted(smoothed, 0.5).weight_key == "bc_weight"
