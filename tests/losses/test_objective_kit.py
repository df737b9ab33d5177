"""losses.testing.check_objective: accepts every shipped objective, rejects each kind of broken one precisely."""

import functools

import pytest
import torch

import losses
from losses.testing import ObjectiveCheckError, check_objective
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy


def _inputs():
    """A synthetic batch (B2 x T3, 16x16), TinyPolicy's latents for it plus GROOT-style Gaussians, its params."""
    policy = TinyPolicy(hidsize=16, image_size=16)
    batch = random_batch(2, 3, 16, seed=1)
    with torch.no_grad():
        latents, _ = policy(batch, policy.initial_state(2))
    gen = torch.Generator().manual_seed(2)
    latents["posterior_dist"] = {"mu": torch.randn(2, 4, generator=gen), "log_var": torch.randn(2, 4, generator=gen)}
    latents["prior_dist"] = {"mu": torch.randn(2, 4, generator=gen), "log_var": torch.randn(2, 4, generator=gen)}
    latents["reference_pi_logits"] = {k: torch.log_softmax(v + torch.randn(v.shape, generator=gen), -1)
                                      for k, v in latents["pi_logits"].items()}
    batch["return"] = torch.randn(2, 3, generator=gen)
    batch["step"] = torch.tensor(3)
    batch["hyperparams"] = {"w": torch.tensor(0.5, dtype=torch.float64)}
    return batch, latents, dict(policy.state_dict())


INITIAL = {name: p + 0.1 for name, p in TinyPolicy(hidsize=16, image_size=16).state_dict().items()}
SHIPPED = {
    "entropy_bonus": losses.entropy_bonus,
    "l2_init": losses.l2_init(INITIAL),
    "label_smoothed_behavior_clone": losses.label_smoothed_behavior_clone,
    "reference_kl": losses.reference_kl,
    "reference_kl_reverse": functools.partial(losses.reference_kl, direction="reverse"),
    "value_regression": losses.value_regression,
    "value_regression_huber": functools.partial(losses.value_regression, huber_delta=1.0),
    "behavior_clone": losses.behavior_clone,
    "kl_gaussian": losses.kl_gaussian,
    "combined": losses.combine(losses.behavior_clone, losses.weighted(losses.kl_gaussian, 0.1)),
    "scheduled": losses.weighted(losses.behavior_clone, lambda step: 0.1 * step),
    "hyperparam": losses.weighted(losses.kl_gaussian, losses.Hyperparam("w", 1.0)),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_objective_passes(name):
    out = check_objective(SHIPPED[name], *_inputs(), compile=False)
    assert torch.isfinite(out["loss"])


@pytest.mark.slow
def test_a_shipped_objective_compiles_in_one_graph():
    check_objective(losses.combine(*SHIPPED.values()), *_inputs())


def _bc(batch, latents, params):
    return losses.behavior_clone(batch, latents, params)


def non_scalar(batch, latents, params):
    return {"loss": -latents["pi_logits"]["buttons"].mean(dim=(1, 2, 3))}


def nan_loss(batch, latents, params):
    return {"loss": _bc(batch, latents, params)["loss"] * float("nan")}


def mutates_latents(batch, latents, params):
    out = _bc(batch, latents, params)
    latents["vpred"].mul_(2.0)
    return out


def impure(batch, latents, params, _calls=[0]):  # noqa: B006 - the shared default is the impurity under test
    _calls[0] += 1
    return {"loss": _bc(batch, latents, params)["loss"] + _calls[0]}


def no_loss(batch, latents, params):
    return {"bc": _bc(batch, latents, params)["loss"]}


def integer_loss(batch, latents, params):
    return {"loss": batch["agent_action"]["buttons"].sum()}


def constant(batch, latents, params):
    return {"loss": torch.tensor(1.0)}


def nan_gradient(batch, latents, params):
    """Finite loss, NaN gradient: d sqrt(0 * v) / dv = inf * 0."""
    return {"loss": (latents["vpred"] * 0).sqrt().sum() + _bc(batch, latents, params)["loss"]}


def reads_a_python_float(batch, latents, params):
    """Normalises by a Python float read from a tensor: fine eagerly, impossible under vmap."""
    loss = _bc(batch, latents, params)["loss"]
    return {"loss": loss / max(float(loss.detach()), 1.0)}


def not_a_dict(batch, latents, params):
    return _bc(batch, latents, params)["loss"]


BROKEN = [
    (non_scalar, r"0-d \(scalar\) tensor.*shape \(2,\)"),
    (nan_loss, r"'loss' is not finite"),
    (mutates_latents, r"mutated latents\['vpred'\] in place"),
    (impure, r"not pure: 'loss' was .* on a second call"),
    (no_loss, r"'loss' entry; it returned keys \['bc'\]"),
    (integer_loss, r"'loss' must be a float tensor; it is torch.int64"),
    (constant, r"depends on no float tensor"),
    (nan_gradient, r"gradient with respect to latents\['vpred'\] is not finite"),
    (reads_a_python_float, r"fails under torch.func.vmap"),
    (not_a_dict, r"must return a dict .* it returned a Tensor"),
]


@pytest.mark.parametrize("objective, message", BROKEN, ids=[f.__name__ for f, _ in BROKEN])
def test_each_kind_of_broken_objective_is_rejected_with_its_reason(objective, message):
    with pytest.raises(ObjectiveCheckError, match=message) as caught:
        check_objective(objective, *_inputs(), compile=False)
    assert objective.__name__ in str(caught.value)


def test_a_mutated_batch_is_caught_even_when_the_value_is_written_back():
    def rewrites(batch, latents, params):
        batch["timestamp"].add_(0)  # same values, but an in-place write
        return _bc(batch, latents, params)

    with pytest.raises(ObjectiveCheckError, match=r"mutated batch\['timestamp'\]"):
        check_objective(rewrites, *_inputs(), compile=False)


@pytest.mark.slow
def test_a_graph_break_is_reported():
    def prints(batch, latents, params):
        out = _bc(batch, latents, params)
        print(out["loss"].item())  # .item() then print: a graph break under fullgraph=True
        return out

    with pytest.raises(ObjectiveCheckError, match="does not compile into one graph"):
        check_objective(prints, *_inputs(), vmap=False)
