"""WithReference: a frozen copy held as buffers, its logits in the latents, and reference_kl through the train step
(eager; one compiled run, slow-marked)."""

import functools

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mstudio
from losses.behavior_clone import behavior_clone
from losses.combinators import combine, weighted
from losses.entropy import entropy_bonus
from losses.l2_init import l2_init
from losses.label_smoothing import label_smoothed_behavior_clone
from losses.reference_kl import reference_kl
from losses.value import value_regression
from mstudio.data.synthetic import random_batch
from mstudio.models import TinyPolicy
from mstudio.models.reference import WithReference

B, T, IMAGE = 2, 4, 16


def _tiny():
    torch.manual_seed(0)
    return TinyPolicy(hidsize=16, image_size=IMAGE)


def _batches(count, with_return=False):
    batches = [random_batch(B, T, IMAGE, seed=i, start=torch.tensor([4 * i, 4 * (i % 2)])) for i in range(count)]
    for i, batch in enumerate(batches):
        if with_return:
            batch["return"] = torch.randn(B, T, generator=torch.Generator().manual_seed(100 + i))
    return batches


def _optimizer():
    return mstudio.optim.adamw(1e-3, weight_decay=0.1)


class TiedGRUPolicy(nn.Module):
    """A policy with an ``nn.GRU`` (which caches its weights in a list) and an embedding tied to a head."""

    def __init__(self, hidden=8):
        super().__init__()
        self.embed = nn.Embedding(16, hidden)
        self.core = nn.GRU(hidden, hidden, batch_first=True)
        self.buttons = nn.Linear(hidden, 16, bias=False)
        self.buttons.weight = self.embed.weight  # tied
        self.camera = nn.Linear(hidden, 121)
        self.hidden = hidden

    def initial_state(self, batch_size):
        return (torch.zeros(batch_size, self.hidden),)

    def forward(self, batch, state_in):
        tokens = batch["image"][..., 0, 0, 0].long() % 16  # (B, T)
        out, h = self.core(self.embed(tokens), state_in[0][None])
        latents = {"pi_logits": {"buttons": F.log_softmax(self.buttons(out), -1)[:, :, None],
                                 "camera": F.log_softmax(self.camera(out), -1)[:, :, None]}}
        return latents, (h[0],)


# --- the module --------------------------------------------------------------------------------------------------


def test_reference_weights_are_buffers_the_optimizer_never_sees():
    policy = _tiny()
    model = WithReference(policy)
    mstudio.policy.check_policy(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert set(params) == {f"policy.{name}" for name, _ in policy.named_parameters()}
    assert set(buffers) == {f"reference.{name}" for name, _ in policy.named_parameters()}
    for name, value in policy.named_parameters():
        assert torch.equal(buffers[f"reference.{name}"], value)
        assert buffers[f"reference.{name}"].data_ptr() != value.data_ptr()  # a copy, not a view
    state = mstudio.init_state(model, _optimizer(), B)
    assert set(state.params) == set(params) and set(state.buffers) == set(buffers)
    bare = mstudio.init_state(policy, _optimizer(), B)
    # The optimizer state (Adam moments) is the bare policy's: nothing for the reference.
    shapes = lambda s: sorted(tuple(t.shape) for t in optree.tree_leaves(s.opt_state))  # noqa: E731
    assert shapes(state) == shapes(bare)


def test_forward_adds_the_reference_logits_and_leaves_the_policy_alone():
    policy = _tiny()
    model = WithReference(policy)
    assert model.policy is policy
    assert all(isinstance(p, nn.Parameter) for p in policy.parameters())
    batch = random_batch(B, T, IMAGE)
    own, own_state = policy(batch, policy.initial_state(B))
    latents, (policy_state, reference_state) = model(batch, model.initial_state(B))
    torch.testing.assert_close(latents["pi_logits"], own["pi_logits"], rtol=0, atol=0)
    torch.testing.assert_close(latents["vpred"], own["vpred"], rtol=0, atol=0)
    torch.testing.assert_close(latents["reference_pi_logits"], own["pi_logits"], rtol=0, atol=0)
    torch.testing.assert_close(policy_state, own_state, rtol=0, atol=0)
    torch.testing.assert_close(reference_state, own_state, rtol=0, atol=0)
    assert latents["pi_logits"]["buttons"].requires_grad
    assert not any(t.requires_grad for t in optree.tree_leaves((latents["reference_pi_logits"], reference_state)))
    with torch.no_grad():  # changing the policy afterwards does not move its reference
        policy.pi_buttons.weight.add_(1.0)
    later, _ = model(batch, model.initial_state(B))
    torch.testing.assert_close(later["reference_pi_logits"], own["pi_logits"], rtol=0, atol=0)


def test_another_reference_module_for_distillation():
    policy, teacher = _tiny(), TinyPolicy(hidsize=32, image_size=IMAGE)
    model = WithReference(policy, reference=teacher)
    batch = random_batch(B, T, IMAGE)
    latents, (_, (h_ref,)) = model(batch, model.initial_state(B))
    torch.testing.assert_close(latents["reference_pi_logits"], teacher(batch, teacher.initial_state(B))[0]["pi_logits"])
    assert h_ref.shape == (B, 32)
    assert all(isinstance(p, nn.Parameter) for p in teacher.parameters())  # the teacher passed is left alone


def test_rnn_and_tied_weights_read_the_buffers_given_to_functional_call():
    policy = TiedGRUPolicy()
    model = WithReference(policy)
    buffers = dict(model.named_buffers())
    assert "reference.buttons.weight" not in buffers  # tied: one buffer, under its first name
    assert model.reference.buttons.weight is model.reference.embed.weight
    batch = random_batch(B, T, IMAGE)
    latents, _ = model(batch, model.initial_state(B))
    torch.testing.assert_close(latents["reference_pi_logits"], latents["pi_logits"])  # GRU kernels may differ in ulps
    # Stateless: the step's buffers, not the module's own tensors, are what the reference reads.
    apply_fn, params, buffers = mstudio.functionalize(model)
    zeroed = {name: torch.zeros_like(b) if "core" in name else b for name, b in buffers.items()}
    moved, _ = apply_fn(params, zeroed, batch, model.initial_state(B))
    assert not torch.allclose(moved["reference_pi_logits"]["camera"], latents["reference_pi_logits"]["camera"])
    torch.testing.assert_close(moved["pi_logits"], latents["pi_logits"])


def test_reference_stays_in_eval_mode():
    model = WithReference(_tiny())
    model.train()
    assert model.training and model.policy.training and not model.reference.training
    model.eval()
    assert not model.policy.training and not model.reference.training


def test_errors():
    with pytest.raises(TypeError, match="initial_state"):
        WithReference(nn.Linear(2, 2))
    model = WithReference(_tiny())
    with pytest.raises(ValueError, match=r"state_in = \(policy_state, reference_state\)"):
        model(random_batch(B, T, IMAGE), model.policy.initial_state(B))


# --- training with reference_kl ------------------------------------------------------------------------------------


def _train(objective, batches, compile=False):
    model = WithReference(_tiny())
    optimizer = _optimizer()
    state = mstudio.init_state(model, optimizer, B, objective=objective)
    initial = optree.tree_map(torch.clone, state.buffers)
    step = mstudio.make_train_step(model, objective, optimizer, compile=compile)
    history = []
    for i, batch in enumerate(batches):
        with torch._dynamo.config.patch(error_on_recompile=compile and i > 0):
            state, metrics = step(state, batch)
        history.append({k: v.clone() for k, v in metrics.items()})
    return model, state, step, initial, history


def test_kl_is_zero_with_zero_gradient_at_step_0():
    _, _, step, _, history = _train(reference_kl, _batches(1))
    _, _, _, _, bc = _train(behavior_clone, _batches(1))
    assert history[0]["reference_kl"].item() == 0.0
    assert history[0]["grad_norm"].item() < 1e-6 * bc[0]["grad_norm"].item()
    assert all(name.startswith("policy.") for name in step.reached)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_grows_under_bc_and_stays_smaller_with_the_penalty(direction):
    batches = [random_batch(B, T, IMAGE, seed=0)] * 6  # one batch, each time from the episode start
    kl = functools.partial(reference_kl, direction=direction)
    # BC alone (the KL weighted 0 is only logged) vs BC plus the KL penalty, on the same batches.
    _, free_state, _, initial, free = _train(combine(behavior_clone, weighted(kl, 0.0)), batches)
    _, held_state, _, _, held = _train(combine(behavior_clone, weighted(kl, 20.0)), batches)
    free_kl = [m["reference_kl"].item() for m in free]
    held_kl = [m["reference_kl"].item() for m in held]
    assert free_kl[0] == 0.0 and held_kl[0] == 0.0
    assert all(b > a for a, b in zip(free_kl[1:], free_kl[2:])), free_kl  # grows step after step
    assert held_kl[-1] < free_kl[-1], (held_kl, free_kl)
    for state in (free_state, held_state):
        assert state.step.item() == 6
        for name, value in state.buffers.items():  # the reference never moves
            assert torch.equal(value, initial[name]), name
        assert not torch.equal(state.params["policy.pi_buttons.weight"], initial["reference.pi_buttons.weight"])


def test_memory_carries_both_states():
    _, state, _, _, _ = _train(behavior_clone, _batches(2))
    (policy_h,), (reference_h,) = state.memory
    assert policy_h.shape == reference_h.shape == (B, 16)
    assert policy_h.abs().sum() > 0 and reference_h.abs().sum() > 0
    assert not torch.equal(policy_h, reference_h)  # the policy moved, the reference did not


def _all_objectives(params):
    return combine(
        weighted(functools.partial(label_smoothed_behavior_clone, smoothing=0.1), 0.01, weight_key="bc_weight"),
        weighted(reference_kl, 0.5),
        weighted(entropy_bonus, 1e-3),
        weighted(value_regression, 0.5),
        weighted(l2_init(params), 1e-3),
    )


def test_every_zoo_objective_trains_eagerly():
    params = mstudio.init_state(WithReference(_tiny()), _optimizer(), B).params
    _, state, step, initial, history = _train(_all_objectives(params), _batches(3, with_return=True))
    assert history[0]["reference_kl"].item() == 0.0 and history[0]["l2_init"].item() == 0.0
    assert history[-1]["l2_init"].item() > 0 and history[-1]["reference_kl"].item() > 0
    assert "policy.value.weight" in step.reached  # value_regression reaches the value head
    assert all(torch.equal(v, initial[k]) for k, v in state.buffers.items())


@pytest.mark.slow
def test_compiled_step_equals_eager():
    """One compiled graph for WithReference and every zoo objective; no recompile; same numbers as eager."""
    params = mstudio.init_state(WithReference(_tiny()), _optimizer(), B).params
    batches = _batches(3, with_return=True)
    _, eager_state, _, _, eager = _train(_all_objectives(params), batches)
    torch._dynamo.reset()
    _, comp_state, _, initial, comp = _train(_all_objectives(params), batches, compile=True)
    for e, c in zip(eager, comp):
        for key in e:
            torch.testing.assert_close(c[key], e[key], rtol=1e-5, atol=1e-5, msg=key)
    close = optree.tree_map(lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5), comp_state, eager_state)
    assert all(optree.tree_leaves(close))
    assert all(torch.equal(v, initial[k]) for k, v in comp_state.buffers.items())
