"""functionalize: the split into params / buffers, stateless calls, and the stateless-forward check."""

import pytest
import torch
from torch import nn

from mstudio.bridge import check_stateless_forward, functionalize
from mstudio.models import TinyPolicy


class Echo(nn.Module):
    """forward(batch, state_in) = (latents, state_out) with a frozen parameter and a buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("offset", torch.full((2,), 10.0))

    def initial_state(self, batch_size):
        return (torch.zeros(batch_size, 2),)

    def forward(self, batch, state_in):
        out = self.lin(batch["x"]) * self.frozen + self.offset
        return {"out": out}, (state_in[0] + out,)


def test_split_names_and_kinds():
    module = Echo()
    apply_fn, params, buffers = functionalize(module)
    assert set(params) == {"lin.weight", "lin.bias"}
    assert set(buffers) == {"frozen", "offset"}
    assert set(params) | set(buffers) == set(module.state_dict())
    assert all(not t.requires_grad for t in [*params.values(), *buffers.values()])


def test_apply_fn_uses_given_tensors_and_mutates_nothing():
    module = Echo()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    apply_fn, params, buffers = functionalize(module)
    new_params = {k: torch.zeros_like(v) for k, v in params.items()}
    batch = {"x": torch.randn(4, 3)}
    state = (torch.ones(4, 2),)
    latents, state_out = apply_fn(new_params, buffers, batch, state)
    torch.testing.assert_close(latents["out"], torch.full((4, 2), 10.0))  # zero weights: only the buffer
    torch.testing.assert_close(state_out[0], torch.full((4, 2), 11.0))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert torch.equal(state[0], torch.ones(4, 2))


def test_missing_tensor_is_an_error_not_a_silent_fallback():
    apply_fn, params, buffers = functionalize(Echo())
    del params["lin.bias"]
    with pytest.raises(RuntimeError, match="lin.bias"):
        apply_fn(params, buffers, {"x": torch.randn(1, 3)}, (torch.zeros(1, 2),))


def test_stateless_check_catches_attribute_and_buffer_writes():
    class WritesAttribute(Echo):
        def forward(self, batch, state_in):
            self.last_batch = batch  # MineStudio's VPT stores its attention mask like this
            return super().forward(batch, state_in)

    class WritesBuffer(Echo):
        def forward(self, batch, state_in):
            self.offset.add_(1)
            return super().forward(batch, state_in)

    for cls, message in [(WritesAttribute, r"attribute\(s\) \['last_batch'\]"), (WritesBuffer, r"buffer\(s\) \['offset'\]")]:
        module = cls()
        apply_fn, params, buffers = functionalize(module)
        run = lambda: apply_fn(params, buffers, {"x": torch.randn(1, 3)}, (torch.zeros(1, 2),))  # noqa: E731
        with pytest.raises(RuntimeError, match=message):
            check_stateless_forward(module, buffers, run)


def test_tiny_policy_is_stateless():
    policy = TinyPolicy(hidsize=8, image_size=16)
    apply_fn, params, buffers = functionalize(policy)
    batch = {"image": torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8)}
    latents, state = check_stateless_forward(policy, buffers, lambda: apply_fn(params, buffers, batch, policy.initial_state(2)))
    assert latents["pi_logits"]["buttons"].shape == (2, 3, 1, 8641)
    assert latents["pi_logits"]["camera"].shape == (2, 3, 1, 121)
    assert latents["vpred"].shape == (2, 3, 1)
    torch.testing.assert_close(latents["pi_logits"]["camera"].exp().sum(-1), torch.ones(2, 3, 1))


class Tied(nn.Module):
    """Two submodules sharing one weight (tied embeddings), one module reached twice, a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight
        self.shared = nn.Linear(3, 3)
        self.pair = nn.ModuleList([self.shared, self.shared])
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, batch, state_in):
        x = self.b(self.a(batch["x"]))
        for layer in self.pair:
            x = layer(x)
        return {"out": x * self.scale}, state_in


def test_eager_apply_matches_functional_call_with_tied_and_shared_tensors():
    module = Tied()
    apply_fn, params, buffers = functionalize(module)
    assert set(params) == {"a.weight", "shared.weight", "shared.bias"}  # tied and shared listed once
    new = {k: torch.randn_like(v) for k, v in params.items()}
    batch = {"x": torch.randn(4, 3)}
    got, _ = apply_fn(new, buffers, batch, ())
    want, _ = torch.func.functional_call(module, (new, buffers), (batch, ()), strict=True)
    assert torch.equal(got["out"], want["out"])
    # written out by hand: both tied layers use the new a.weight, the shared layer runs twice
    w, sw, sb = new["a.weight"], new["shared.weight"], new["shared.bias"]
    x = batch["x"] @ w.T @ w.T
    x = (x @ sw.T + sb) @ sw.T + sb
    torch.testing.assert_close(got["out"], 2 * x)
    assert module.a.weight is module.b.weight and isinstance(module.a.weight, nn.Parameter)
    assert all(module.state_dict()[k] is not new[k] for k in new)


def test_eager_apply_gradients_reach_the_given_tensors():
    module = Tied()
    apply_fn, params, buffers = functionalize(module)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    out, _ = apply_fn(leaves, buffers, {"x": torch.randn(2, 3)}, ())
    grads = torch.autograd.grad(out["out"].sum(), list(leaves.values()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in module.parameters())  # nothing reached the module's own


def test_eager_apply_restores_the_module_when_forward_raises():
    class Fails(Echo):
        def forward(self, batch, state_in):
            raise ValueError("boom")

    module = Fails()
    own = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    apply_fn, params, buffers = functionalize(module)
    with pytest.raises(ValueError, match="boom"):
        apply_fn({k: torch.zeros_like(v) for k, v in params.items()}, buffers, {"x": torch.randn(1, 3)}, ())
    assert all(module.state_dict(keep_vars=True)[k] is v for k, v in own.items())


def test_unexpected_tensor_is_an_error():
    apply_fn, params, buffers = functionalize(Echo())
    with pytest.raises(RuntimeError, match="unexpected.*'extra'"):
        apply_fn({**params, "extra": torch.zeros(1)}, buffers, {"x": torch.randn(1, 3)}, (torch.zeros(1, 2),))
