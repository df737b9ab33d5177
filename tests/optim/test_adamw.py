"""mstudio.optim.adamw against torch.optim.AdamW + LambdaLR(min((k+1)/warmup, 1)) + clip_grad_norm_."""

import copy

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
        updates, state = tx.update({k: grads.get(k) for k in params}, state, params)
        assert tx.learning_rate(torch.tensor(step)).item() == torch_lr  # same float64 arithmetic
        params = optim.apply_updates(params, updates)

    torch_params = dict(ref.named_parameters())
    for name, value in params.items():
        assert _rel_err(value, torch_params[name]) <= 1e-6, name
    assert torch.equal(params["unused.weight"], torch_params["unused.weight"])
    assert torch.equal(params["unused.weight"], ours_module.unused.weight)  # never touched
    assert "frozen.weight" not in params


def test_without_weight_decay_it_is_bit_identical_to_torch():
    torch.manual_seed(0)
    w = torch.randn(50, 40) * 0.1
    ref = nn.Parameter(w.clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
    tx = optim.adamw(1e-3, weight_decay=0.0)
    params = {"w": w.clone()}
    state = tx.init(params)
    for _ in range(20):
        g = torch.randn(50, 40)
        ref.grad = g.clone()
        torch_opt.step()
        updates, state = tx.update({"w": g}, state, params)
        params = optim.apply_updates(params, updates)
    assert torch.equal(params["w"], ref.detach())


def test_moments_of_parameters_without_gradient_are_untouched():
    tx = optim.adamw(1e-2)
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    state = tx.init(params)
    updates, new_state = tx.update({"a": torch.ones(3), "b": None}, state, params)
    adam = new_state[1]
    assert updates["b"] is None
    assert adam.mu["b"] is state[1].mu["b"] and adam.nu["b"] is state[1].nu["b"]
    assert adam.mu["a"].abs().sum() > 0
    assert optim.apply_updates(params, updates)["b"] is params["b"]


def test_update_is_pure():
    tx = optim.adamw(1e-2, weight_decay=0.1, clip_norm=0.1)
    params = {"a": torch.randn(4)}
    grads = {"a": torch.randn(4)}
    state = tx.init(params)
    snapshot = [t.clone() for t in (params["a"], grads["a"], state[1].mu["a"], state[1].nu["a"], state[1].count)]
    tx.update(grads, state, params)
    after = (params["a"], grads["a"], state[1].mu["a"], state[1].nu["a"], state[1].count)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


@pytest.mark.parametrize("kwargs", [dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1), dict(lr=-1.0)])
def test_bad_hyperparameters(kwargs):
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError):
        optim.adamw(args.pop("lr"), **args)
