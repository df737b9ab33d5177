"""VPT's max-pool (mstudio.models.vpt.max_pool): traced in the compiled step, ATen's kernels behind two opaque
operators, with exactly F.max_pool2d's values and gradients (ties included)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from mstudio.compile import compiled_call
from mstudio.models.vpt.impala import CnnDownStack
from mstudio.models.vpt.max_pool import _MaxPool2d, aten_max_pool, max_pool2d, with_aten_max_pool


def _tied(*shape, channels_last=True):
    """A ReLU'd input of quarter steps: many windows whose maximum is shared (all zeros, or equal values)."""
    torch.manual_seed(0)
    x = torch.relu((torch.randn(*shape) * 4).round() / 4)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _opaque(x):
    return _MaxPool2d.apply(x, [3, 3], [2, 2], [1, 1])[0]


def _reference(x):
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def _loss(pool):
    def loss(x, w):
        return (pool(x) * w).sum()
    return loss


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_opaque_pool_equals_max_pool2d_in_values_layout_and_gradient(channels_last):
    x = _tied(2, 3, 9, 9, channels_last=channels_last)
    w = torch.randn(2, 3, 5, 5)
    ours, want = _opaque(x), _reference(x)
    assert torch.equal(ours, want) and ours.stride() == want.stride()
    assert (x == 0).float().mean() > 0.4  # ties are what the gradient's routing is tested on
    got = torch.func.grad(_loss(_opaque))(x, w)
    assert torch.equal(got, torch.func.grad(_loss(_reference))(x, w))
    leaf = x.clone().requires_grad_()
    (_loss(_opaque)(leaf, w)).backward()  # autograd too
    assert torch.equal(leaf.grad, got)


def test_eagerly_max_pool2d_is_f_max_pool2d_inside_the_block_or_not():
    x = _tied(1, 2, 6, 6)
    with aten_max_pool():
        assert torch.equal(max_pool2d(x, 3, 2, 1), _reference(x))
    assert torch.equal(max_pool2d(x, 3, 2, 1), _reference(x))


def test_the_block_sets_the_route_for_its_extent_only():
    from mstudio.models.vpt import max_pool as module

    assert module._aten_when_traced is False
    with pytest.raises(KeyError):
        with aten_max_pool():
            assert module._aten_when_traced is True
            with aten_max_pool():
                pass
            assert module._aten_when_traced is True  # nested: the outer block still holds
            raise KeyError
    assert module._aten_when_traced is False


def test_the_route_is_taken_on_cpu_only(monkeypatch):
    from mstudio.models.vpt import max_pool as module

    taken = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as while dynamo traces
    monkeypatch.setattr(module._MaxPool2d, "apply", lambda x, *args: (taken.append(x.device.type), (x, x))[1])
    with aten_max_pool():
        max_pool2d(torch.zeros(1, 1, 4, 4), 3, 2, 1)
        out = max_pool2d(torch.zeros(1, 1, 4, 4, device="meta"), 3, 2, 1)  # another device: F.max_pool2d
    assert taken == ["cpu"] and out.shape == (1, 1, 2, 2)


def _stack_loss(stack, params, x, w):
    return (torch.func.functional_call(stack, params, (x,)) * w).sum()


@pytest.mark.slow
def test_the_compiled_step_pattern_runs_atens_kernels_inside_the_block_and_matches_eager():
    # One Impala stack (conv + ReLU -> pool -> GroupNorm -> residual blocks) under grad_and_value, as the step.
    torch.manual_seed(0)
    stack = CnnDownStack(3, 8, nblock=1, init_scale=1.0, groups=1, post_pool_groups=1, first_conv_norm=False)
    params = dict(stack.named_parameters())
    x = ((torch.randn(2, 3, 16, 16) * 4).round() / 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 8, 8, 8)

    def grads(params, x, w):
        return torch.func.grad_and_value(lambda p: _stack_loss(stack, p, x, w))(params)

    want, _ = grads(params, x, w)
    torch._dynamo.reset()
    counters.clear()
    compiled = with_aten_max_pool(compiled_call(torch.compile(grads, fullgraph=True)))
    (got, _), codes = run_and_get_code(compiled, params, x, w)
    code = "\n".join(codes)
    assert "torch.ops.mstudio.max_pool2d.default" in code and "torch.ops.mstudio.max_pool2d_backward.default" in code
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0  # compiled_call keeps AOTAutograd's cache open
    for name in params:  # convolutions and GroupNorm round their own way compiled; the pool is ATen's
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)

    # The same function compiled outside the block: inductor's own pool
    plain = compiled_call(torch.compile(grads, fullgraph=True))
    _, codes = run_and_get_code(plain, params, x, w)
    assert "mstudio.max_pool2d" not in "\n".join(codes)
