"""Float32 accuracy of VPT training against float64 (issue 12, item 6).

What was found: no float32 CPU kernel of VPT is inaccurate. Replayed one by one on the float64 run's own inputs,
every GroupNorm, LayerNorm, Conv2d and Linear forward and backward of VPT tiny is within 5e-6 of float64
(``test_cnn_kernels_match_float64`` keeps the CNN's). The 1e-2..1e-1 gaps between float32 and float64 runs come
from branch flips: a ReLU input or a max-pool near-tie within float32 round-off (~1e-6) of its kink takes the
other branch, which moves a whole element's gradient (one flipped ReLU at step 0 of B3 x T4 made the CNN
gradients 0.5-1 % off), and the trajectories part from there. Over batch seeds the eager float32 step ends
3e-5 from float64 when nothing flips and 4e-3..1.6e-1 when something does; the compiled float32 step flips
alike (6.69e-2 on a seed where eager ends 6.69e-2; the 3.5e-5 in the issue was a flip-free configuration).
Adam does not amplify round-off: float64 runs with 1e-7 relative noise on every gradient end 3e-8 from
the clean run.

So the end-to-end test compares float32 with a float64 run made to take float32's ReLU and max-pool branches
(:class:`_Branches`): both then compute the same piecewise-linear function, and only round-off is left, to be
within the compiled step's error on a flip-free configuration (3.5e-5; bound 1e-4).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import losses
import mstudio
from mstudio.models import VPTPolicy
from mstudio.models.vpt.impala import CnnDownStack, FanInLayer

OBJECTIVE = losses.weighted(losses.behavior_clone, 0.01)
ROWS, FRAMES, STEPS = 2, 4, 4


def _batches(seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{
        "image": torch.randint(0, 256, (ROWS, FRAMES, 64, 64, 3), generator=gen, dtype=torch.uint8),
        "agent_action": {"buttons": torch.randint(0, 8641, (ROWS, FRAMES, 1), generator=gen),
                         "camera": torch.randint(0, 121, (ROWS, FRAMES, 1), generator=gen)},
        "timestamp": torch.arange(FRAMES).repeat(ROWS, 1) + FRAMES * i,
    } for i in range(STEPS)]


class _Branches:
    """Hooks that record every ReLU sign pattern and max-pool argmax of a run (``follow=None``), or make a run
    take the recorded ones (``follow`` = another run's record): a float64 run that follows a float32 run's
    branches computes, in float64, the same piecewise-linear function float32 chose, so the two differ by
    round-off only, however close to a kink an activation falls.
    """

    def __init__(self, policy: VPTPolicy, follow: list | None = None):
        self.log, self.follow, self.pre = [], follow, {}
        self.handles = []
        for module in policy.modules():
            if isinstance(module, FanInLayer) and module.relu:
                # relu runs in place on the layer's output: hand it a copy, keep the original (pre-activation).
                self._hook(module.layer, self._keep_pre, module)
                self._hook(module, self._relu, module)
            if isinstance(module, CnnDownStack):
                self._hook(module.firstconv, self._keep_pre, module)
                self.handles.append(module.n.register_forward_pre_hook(
                    lambda m, args, stack=module: (self._pool(stack),)))
        # VPTBody's one functional ReLU: between recurrent_layer's output and lastlayer.
        body = policy.net
        self.handles.append(body.recurrent_layer.register_forward_hook(
            lambda m, args, out: self.pre.__setitem__(body, out[0])))
        self.handles.append(body.lastlayer.register_forward_pre_hook(lambda m, args: (self._relu(m, args[0], body),)))

    def _hook(self, module, fn, key):
        self.handles.append(module.register_forward_hook(lambda m, args, out: fn(m, out, key)))

    def _keep_pre(self, module, out, key):
        self.pre[key] = out
        return out.clone()

    def _decide(self, branch):
        if self.follow is None:
            self.log.append(branch)
            return branch
        recorded = self.follow[len(self.log)]
        self.log.append(recorded)
        return recorded

    def _relu(self, module, out, key):
        pre = self.pre.pop(key)
        return pre * self._decide(pre > 0)  # = relu(pre), value and gradient, when the mask is its own

    def _pool(self, stack):
        x = self.pre.pop(stack)  # firstconv's output (N, C, H, W), before the ReLU the stack applies after the pool
        index = self._decide(F.max_pool2d(x, kernel_size=3, stride=2, padding=1, return_indices=True)[1])
        pooled = x.flatten(2).gather(2, index.flatten(2)).view(index.shape)
        return pooled * self._decide(pooled > 0)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _train(dtype: torch.dtype, seed: int, follow: list | None = None) -> tuple[dict, list]:
    """Eager steps from VPT tiny (seed 0 weights); returns the parameter updates (float64) and the branches."""
    torch.manual_seed(0)
    policy = VPTPolicy.from_preset("tiny").to(dtype)
    optimizer = mstudio.optim.adamw(1e-3, weight_decay=0.1, warmup_steps=3, clip_norm=1.0)
    state = mstudio.init_state(policy, optimizer, batch_size=ROWS)
    start = {k: v.double() for k, v in state.params.items()}
    step = mstudio.make_train_step(policy, OBJECTIVE, optimizer, compile=False)
    branches = _Branches(policy, follow)
    try:
        for batch in _batches(seed):
            state, _ = step(state, batch)
    finally:
        branches.remove()
    return {k: state.params[k].double() - start[k] for k in start}, branches.log


def _relative_l2(got: dict, expected: dict) -> float:
    num = sum((got[k] - expected[k]).square().sum() for k in expected)
    return (num / sum(v.square().sum() for v in expected.values())).sqrt().item()


def test_eager_float32_step_tracks_float64():
    # On seed 9 branches flip (unfollowed, float64 takes ~8,000 other branches and float32 ends 1e-1 from it);
    # followed, only round-off is left (1.2e-5).
    updates32, branches32 = _train(torch.float32, seed=9)
    updates64, branches64 = _train(torch.float64, seed=9, follow=branches32)
    assert len(branches64) == len(branches32) > 0
    # The compiled float32 step ends 3.5e-5 from float64 on this size; eager must do as well.
    assert _relative_l2(updates32, updates64) < 1e-4


def _group_norm64(x, weight, bias, eps=1e-5):
    """GroupNorm with one group from its definition: (x - mean) / sqrt(var + eps) over (C, H, W), per sample."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (var + eps).sqrt() * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _conv64(x, weight):
    """3x3 convolution, padding 1, as a sum of shifted products (no convolution kernel involved)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    return sum(torch.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + w], weight[:, :, i, j])
               for i in range(3) for j in range(3))


def _max_pool64(x):
    """3x3 / stride 2 / padding 1 max-pool as a max over the nine shifted strided views."""
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    h, w = (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2
    views = [padded[:, :, i:i + 2 * h:2, j:j + 2 * w:2] for i in range(3) for j in range(3)]
    return torch.stack(views).amax(dim=0)


@pytest.mark.parametrize("op", ["group_norm", "conv2d", "max_pool2d"])
def test_cnn_kernels_match_float64(op):
    """The float32 CNN kernels VPT runs (forward, input and parameter gradients) against float64 formulas, on
    VPT tiny's first-stack shapes; each is within a few float32 ulps (max-pool's random inputs have no near-ties:
    its gradient is a routing). GroupNorm's input has mean 3, std 1, as VPT's post-ReLU activations: ATen's
    GroupNorm weight gradient, ``(sum(dy * x) - mean * sum(dy)) * rstd``, loses digits in proportion to
    mean / std (9e-6 at mean 30, 6e-5 at 300), harmless at VPT's statistics."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, 32, 32, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(12, 8, 32, 32, generator=gen, dtype=torch.float64)
    if op == "group_norm":
        x = x + 3
        params = [1 + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64), 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)]
        fast = lambda x, w, b: F.group_norm(x, 1, w, b)  # noqa: E731
        exact = _group_norm64
    elif op == "conv2d":
        params = [torch.randn(8, 8, 3, 3, generator=gen, dtype=torch.float64) / 8]
        fast = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
        exact = _conv64
    else:
        params = []
        grad_out = grad_out[:, :, :16, :16]
        fast = lambda x: F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # noqa: E731
        exact = _max_pool64
    inputs = [t.requires_grad_() for t in [x, *params]]
    expected = exact(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    got = fast(*inputs32)
    got_grads = torch.autograd.grad(got, inputs32, grad_out.float())
    for name, a, b in zip(["output", "input grad", "weight grad", "bias grad"], [got, *got_grads],
                          [expected, *expected_grads]):
        error = ((a.double() - b).norm() / b.norm()).item()
        assert error < 2e-6, f"{op} {name}: relative error {error:.1e} vs float64"
