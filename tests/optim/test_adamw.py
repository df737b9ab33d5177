"""mstudio.optim.adamw against torch.optim.AdamW + LambdaLR(min((k+1)/warmup, 1)) + clip_grad_norm_."""

import copy
import re

import pytest
import torch
from torch import nn

import mstudio.optim as optim


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)  # a frozen parameter: never updated, by either optimizer
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 1)  # gets no gradient: must stay bit-identical (no decay)

    def forward(self, x):
        return self.head(self.frozen(self.body(x)))


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("clip_norm", [None, 1.0, 0.05])
def test_30_steps_match_torch(clip_norm):
    lr, wd, warmup = 1e-2, 0.1, 7
    torch.manual_seed(0)
    ref = Net()
    ours_module = copy.deepcopy(ref)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda k: min((k + 1) / warmup, 1))

    tx = optim.adamw(lr, weight_decay=wd, warmup_steps=warmup, clip_norm=clip_norm)
    params = {k: v.detach().clone() for k, v in ours_module.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in ours_module.named_parameters() if not v.requires_grad}
    state = tx.init(params)
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        x = torch.randn(5, 6, generator=gen)
        ref(x).pow(2).mean().backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], clip_norm)
        torch_lr = torch_opt.param_groups[0]["lr"]
        torch_opt.step()
        sched.step()
        torch_opt.zero_grad(set_to_none=True)

        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = torch.func.functional_call(ours_module, {**leaves, **frozen}, (x,)).pow(2).mean()
        reached = [k for k in leaves if not k.startswith("unused")]
        grads = dict(zip(reached, torch.autograd.grad(loss, [leaves[k] for k in reached])))
        assert tx.learning_rate(state).item() == torch_lr  # same float64 arithmetic
        updates, state = tx.update({k: grads.get(k) for k in params}, state, params)
        params = optim.apply_updates(params, updates)

    torch_params = dict(ref.named_parameters())
    for name, value in params.items():
        assert _rel_err(value, torch_params[name]) <= 1e-6, name
    assert torch.equal(params["unused.weight"], torch_params["unused.weight"])
    assert torch.equal(params["unused.weight"], ours_module.unused.weight)  # never touched
    assert "frozen.weight" not in params


def _adam_of(state):
    """The Adam block's state inside adamw's: inject(count, hyperparams, chain(clip, adam, lr, decay))."""
    return state.inner_state[1]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_each_step_is_within_a_few_roundings_of_torch(weight_decay):
    """Stepped from torch's parameters each time, a step lands on torch's value or a few roundings from it.

    (The chain applies the step size after the division, torch before it; see ``adamw``'s docstring.)
    """
    torch.manual_seed(0)
    w = torch.randn(50, 40) * 0.1
    ref = nn.Parameter(w.clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=weight_decay)
    tx = optim.adamw(1e-3, weight_decay=weight_decay)
    state = tx.init({"w": w.clone()})
    differing = 0
    for _ in range(20):
        before = ref.detach().clone()
        g = torch.randn(50, 40)
        ref.grad = g.clone()
        torch_opt.step()
        updates, state = tx.update({"w": g}, state, {"w": before})
        ours = optim.apply_updates({"w": before}, updates)["w"]
        # a few roundings at the float32 spacing of the larger of the old and new magnitudes (more than one only
        # where the step exceeds the weight, as for adamw today: see its docstring)
        larger = torch.maximum(before.abs(), ref.detach().abs())
        ulp = torch.nextafter(larger, torch.tensor(float("inf"))) - larger
        assert ((ours - ref.detach()).abs() <= 4 * ulp).all()  # measured worst: 3, near zero
        differing += (ours != ref.detach()).sum().item()
    assert differing < 0.02 * 20 * w.numel()  # measured: about 1 % of elements per step


def test_blocks_chained_by_hand_equal_adamw():
    torch.manual_seed(0)
    params = {"a": torch.randn(6, 5), "b": torch.randn(5), "frozen_out": torch.randn(3)}
    lr, wd, warmup = 3e-3, 0.05, 4
    tx = optim.adamw(lr, weight_decay=wd, warmup_steps=warmup, clip_norm=0.5)
    state = tx.init(params)
    by_hand = {k: v.clone() for k, v in params.items()}
    adam = optim.scale_by_adam(0.9, 0.999, 1e-8)
    adam_state = adam.init(by_hand)
    for k in range(10):
        grads = {"a": torch.randn(6, 5), "b": torch.randn(5), "frozen_out": None}
        lr_k = torch.tensor(lr, dtype=torch.float64) * min((k + 1) / warmup, 1)
        hand = optim.chain(optim.clip_by_global_norm(0.5), optim.scale_by_learning_rate(lr_k),
                           optim.add_decayed_weights(wd, lr_k))
        clipped, _ = optim.clip_by_global_norm(0.5).update(grads, (), by_hand)
        direction, adam_state = adam.update(clipped, adam_state, by_hand)
        stepped, _ = optim.scale_by_learning_rate(lr_k).update(direction, (), by_hand)
        decayed, _ = optim.add_decayed_weights(wd, lr_k).update(stepped, (), by_hand)
        assert hand.init(by_hand) == ((), (), ())
        by_hand = optim.apply_updates(by_hand, decayed)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    for name in params:
        assert torch.equal(params[name], by_hand[name]), name


def test_learning_rate_and_weight_decay_are_settable_state():
    tx = optim.adamw(1e-3, weight_decay=0.1, warmup_steps=4)
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    assert tx.learning_rate(state).item() == 1e-3 / 4
    assert sorted(optim.find_hyperparams(state)) == ["learning_rate", "weight_decay"]
    changed = optim.set_hyperparams(state, learning_rate=2e-3, weight_decay=0.0)
    assert tx.learning_rate(changed).item() == 2e-3 / 4
    assert state.hyperparams["learning_rate"].item() == 1e-3  # the old state is untouched
    # with no decay and a fresh state, the step equals adamw built with the new numbers
    fresh = optim.adamw(2e-3, weight_decay=0.0, warmup_steps=4)
    g = {"w": torch.tensor([0.5, -1.0, 2.0])}
    a, _ = tx.update(g, changed, params)
    b, _ = fresh.update(g, fresh.init(params), params)
    assert torch.equal(a["w"], b["w"])
    with pytest.raises(KeyError, match="warmup"):
        optim.set_hyperparams(state, warmup=3)


def test_moments_of_parameters_without_gradient_are_untouched():
    tx = optim.adamw(1e-2)
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    state = tx.init(params)
    updates, new_state = tx.update({"a": torch.ones(3), "b": None}, state, params)
    adam, old = _adam_of(new_state), _adam_of(state)
    assert updates["b"] is None
    assert adam.mu["b"] is old.mu["b"] and adam.nu["b"] is old.nu["b"]
    assert adam.mu["a"].abs().sum() > 0
    assert optim.apply_updates(params, updates)["b"] is params["b"]


def test_update_is_pure():
    tx = optim.adamw(1e-2, weight_decay=0.1, clip_norm=0.1)
    params = {"a": torch.randn(4)}
    grads = {"a": torch.randn(4)}
    state = tx.init(params)
    adam = _adam_of(state)
    snapshot = [t.clone() for t in (params["a"], grads["a"], adam.mu["a"], adam.nu["a"], adam.count, state.count)]
    tx.update(grads, state, params)
    after = (params["a"], grads["a"], adam.mu["a"], adam.nu["a"], adam.count, state.count)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


@pytest.mark.parametrize("kwargs", [dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1), dict(lr=-1.0),
                                    dict(lr=float("inf")), dict(lr=float("nan")), dict(weight_decay=float("inf"))])
def test_bad_hyperparameters(kwargs):
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError):
        optim.adamw(args.pop("lr"), **args)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=0.0), "adamw: eps must be a finite number > 0, got 0.0"),
    (dict(eps=NAN), "adamw: eps must be a finite number > 0, got nan"),
    (dict(eps=INF), "adamw: eps must be a finite number > 0, got inf"),
    (dict(betas=(NAN, 0.999)), "adamw: betas[0] must be a number in [0, 1), got nan"),
    (dict(betas=(0.9, NAN)), "adamw: betas[1] must be a number in [0, 1), got nan"),
    (dict(weight_decay=NAN), "adamw: weight_decay must be a finite number >= 0, got nan"),
    (dict(lr=NAN), "adamw: lr must be a finite number >= 0 or a schedule, got nan"),
    (dict(clip_norm=0.0), "adamw: clip_norm must be a finite number > 0 or None for no clipping, got 0.0"),
    (dict(clip_norm=-1.0), "adamw: clip_norm must be a finite number > 0 or None for no clipping, got -1.0"),
    (dict(clip_norm=INF), "adamw: clip_norm must be a finite number > 0 or None for no clipping, got inf"),
    (dict(clip_norm=NAN), "adamw: clip_norm must be a finite number > 0 or None for no clipping, got nan"),
])
def test_bad_hyperparameters_name_the_argument_and_value(kwargs, message):
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        optim.adamw(args.pop("lr"), **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr="1e-3"), "adamw: lr must be a finite number >= 0 or a schedule, got str '1e-3'"),
    (dict(lr=True), "adamw: lr must be a finite number >= 0 or a schedule, got bool True"),
    (dict(betas=0.9), "adamw: betas must be two numbers (b1, b2) in [0, 1), got float 0.9"),
    (dict(warmup_steps=1.5), "adamw: warmup_steps must be an int >= 0, got float 1.5"),
    (dict(clip_norm="1"), "adamw: clip_norm must be a finite number > 0 or None for no clipping, got str '1'"),
])
def test_hyperparameters_of_the_wrong_type_name_the_argument_and_type(kwargs, message):
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(TypeError, match=re.escape(message)):
        optim.adamw(args.pop("lr"), **args)


@pytest.mark.parametrize("value, error", [(float("nan"), ValueError), (-1.0, ValueError), ("1", TypeError),
                                          (True, TypeError)])
def test_set_hyperparams_refuses_what_adamw_refuses(value, error):
    state = optim.adamw(1e-3).init({"a": torch.ones(2)})
    with pytest.raises(error, match="learning_rate must be a finite number >= 0"):
        optim.set_hyperparams(state, learning_rate=value)


def test_tiny_eps_keeps_zero_gradients_finite():
    """What eps = 0 would break: a parameter whose gradient and moments are all zero (0 / 0 with eps = 0)."""
    params = {"a": torch.ones(3)}
    tx = optim.adamw(1e-3, eps=1e-30, weight_decay=0.0)
    state = tx.init(params)
    updates, state = tx.update({"a": torch.zeros(3)}, state, params)
    assert torch.equal(updates["a"], torch.zeros(3))
