"""VPT's Impala CNN (mstudio.models.vpt.impala): a down-stack pools before its first ReLU, and is still VPT's
function (ReLU, then pool) exactly, values and gradients."""

import torch
import torch.nn.functional as F

from mstudio.models.vpt.impala import CnnDownStack


def _vpt_order(stack: CnnDownStack, x: torch.Tensor) -> torch.Tensor:
    """The stack as VPT writes it: the first conv's ReLU, then the pool."""
    y = F.max_pool2d(F.relu(stack.firstconv(x)), kernel_size=3, stride=2, padding=1)
    y = stack.n(y)
    for block in stack.blocks:
        y = block(y)
    return y


def _outputs_and_gradients(stack, forward, x, w):
    stack.zero_grad()
    leaf = x.clone().requires_grad_()
    out = forward(leaf)
    (out * w).sum().backward()
    return out.detach(), leaf.grad, [p.grad.clone() for p in stack.parameters()]


def test_a_down_stack_pooling_before_its_relu_is_vpts_relu_then_pool_exactly():
    torch.manual_seed(0)
    stack = CnnDownStack(3, 4, nblock=1, init_scale=1.0, groups=2, post_pool_groups=1, first_conv_norm=False)
    with torch.no_grad():  # quarter-step weights on integer pixels: the conv's outputs tie exactly, often
        stack.firstconv.layer.weight.copy_((torch.randn_like(stack.firstconv.layer.weight) * 2).round() / 4)
    x = torch.randint(-2, 3, (2, 3, 11, 11)).float().contiguous(memory_format=torch.channels_last)
    pre = stack.firstconv(x).detach()
    padded = F.pad(pre.flatten(0, 1).unsqueeze(1), (1, 1, 1, 1), value=float("-inf"))  # the pool's padding
    windows = F.unfold(padded, 3, stride=2)  # (N*C, 9, windows)
    assert (windows.amax(1) <= 0).any()  # windows that pass no gradient
    assert ((windows == windows.amax(1, keepdim=True)).sum(1) > 1).any()  # tied maxima: the first one wins
    w = torch.randn_like(stack(x))

    ours = _outputs_and_gradients(stack, stack, x, w)
    want = _outputs_and_gradients(stack, lambda t: _vpt_order(stack, t), x, w)
    assert torch.equal(ours[0], want[0])
    assert torch.equal(ours[1], want[1])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], want[2]))
