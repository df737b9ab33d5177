"""VPT's image encoder: the IMPALA CNN followed by dense layers (MineStudio ``utils/vpt_lib/impala_cnn.py``).

Module and attribute names follow MineStudio's so that ``state_dict`` keys match theirs exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mstudio.models.vpt.max_pool import max_pool2d

__all__ = ["CnnBasicBlock", "CnnDownStack", "FanInLayer", "ImgObsProcess", "ImpalaCNN"]


class FanInLayer(nn.Module):
    """``layer(norm(x))``, then ``relu`` if ``relu``: VPT's ``FanInInitReLULayer`` (``use_activation=relu``).

    The norm acts on the layer's *input*; the layer has no bias when a norm exists. Weights are initialised
    with every output row (filter) rescaled to L2 norm ``init_scale`` (fan-in initialisation), biases at zero.
    ``state_dict`` keys are ``norm.*`` and ``layer.*``, as MineStudio's.

    Args:
        inchan, outchan: input and output channels (features for a ``Linear``).
        conv: a 3x3 ``Conv2d`` (padding 1) if True, else a ``Linear``.
        relu: apply a ReLU to the layer's output (VPT's transformer MLP omits it on its second layer).
        norm: ``"group"`` (GroupNorm with ``groups``), ``"layer"`` (LayerNorm) or ``None``.
        groups: GroupNorm's number of groups, with ``norm="group"``.
        init_scale: the L2 norm of every output row at initialisation.
    """

    def __init__(self, inchan: int, outchan: int, *, conv: bool, relu: bool, norm: str | None = None,
                 groups: int | None = None, init_scale: float = 1.0):
        super().__init__()
        if norm == "group":
            self.norm = nn.GroupNorm(groups, inchan)
        elif norm == "layer":
            self.norm = nn.LayerNorm(inchan)
        else:
            self.norm = None
        bias = self.norm is None
        if conv:
            self.layer = nn.Conv2d(inchan, outchan, 3, padding=1, bias=bias)
        else:
            self.layer = nn.Linear(inchan, outchan, bias=bias)
        self.relu = relu
        with torch.no_grad():
            w = self.layer.weight
            if not w.is_meta:
                w.mul_(init_scale / w.flatten(1).norm(dim=1).view(-1, *[1] * (w.ndim - 1)))
            if self.layer.bias is not None:
                self.layer.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        x = self.layer(x)
        # In place, as VPT: x is this layer's fresh output, and relu's backward needs only its result.
        return F.relu(x, inplace=True) if self.relu else x


class CnnBasicBlock(nn.Module):
    """Residual block ``x + conv1(conv0(x))`` keeping channels and size."""

    def __init__(self, chans: int, init_scale: float, groups: int | None):
        super().__init__()
        norm = "group" if groups is not None else None
        s = math.sqrt(init_scale)
        self.conv0 = FanInLayer(chans, chans, conv=True, relu=True, norm=norm, groups=groups, init_scale=s)
        self.conv1 = FanInLayer(chans, chans, conv=True, relu=True, norm=norm, groups=groups, init_scale=s)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(self.conv0(x))


class CnnDownStack(nn.Module):
    """``firstconv`` -> 3x3/2 max-pool -> ReLU -> optional GroupNorm ``n`` -> ``nblock`` residual blocks (halves
    H, W).

    VPT applies ``firstconv``'s ReLU before the pool; here it runs after it, on a quarter of the elements:
    ``relu(max_pool(y)) == max_pool(relu(y))`` exactly, in value and gradient (the ReLU is monotone, so each
    window's first maximum is the same element, and a window whose maximum is not positive passes no gradient
    either way).
    """

    def __init__(self, inchan: int, outchan: int, nblock: int, init_scale: float, groups: int | None,
                 post_pool_groups: int | None, first_conv_norm: bool):
        super().__init__()
        first_norm = "group" if first_conv_norm and groups is not None else None
        self.firstconv = FanInLayer(inchan, outchan, conv=True, relu=False, norm=first_norm, groups=groups)
        if post_pool_groups is not None:
            self.n = nn.GroupNorm(post_pool_groups, outchan)
        self.post_pool_groups = post_pool_groups
        self.blocks = nn.ModuleList(
            CnnBasicBlock(outchan, init_scale / math.sqrt(nblock), groups) for _ in range(nblock)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(max_pool2d(self.firstconv(x), kernel_size=3, stride=2, padding=1), inplace=True)
        if self.post_pool_groups is not None:
            x = self.n(x)
        for block in self.blocks:
            x = block(x)
        return x


class ImpalaCNN(nn.Module):
    """Down-sampling stacks, then a dense layer on the channel-major flattened features.

    ``forward``: float ``(N, H, W, 3)`` in [0, 1] -> ``(N, outsize)``.
    """

    def __init__(self, img_shape: tuple[int, int, int], chans: tuple[int, ...], outsize: int, nblock: int,
                 groups: int | None, dense_norm: str | None, post_pool_groups: int | None, first_conv_norm: bool):
        super().__init__()
        h, w, c = img_shape
        self.stacks = nn.ModuleList()
        for i, outchan in enumerate(chans):
            self.stacks.append(CnnDownStack(
                c, outchan, nblock, init_scale=math.sqrt(len(chans)), groups=groups,
                post_pool_groups=post_pool_groups, first_conv_norm=first_conv_norm if i == 0 else True,
            ))
            c, h, w = outchan, (h + 1) // 2, (w + 1) // 2
        self.dense = FanInLayer(c * h * w, outsize, conv=False, relu=True, norm=dense_norm, init_scale=1.4)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 3, 1, 2)
        for stack in self.stacks:
            x = stack(x)
        return self.dense(x.flatten(1))


class ImgObsProcess(nn.Module):
    """``ImpalaCNN`` (256 outputs, as in VPT) followed by a dense layer to ``hidsize``."""

    def __init__(self, img_shape: tuple[int, int, int], chans: tuple[int, ...], hidsize: int, groups: int | None,
                 dense_norm: str | None, post_pool_groups: int | None, first_conv_norm: bool):
        super().__init__()
        self.cnn = ImpalaCNN(img_shape, chans, 256, nblock=2, groups=groups, dense_norm=dense_norm,
                             post_pool_groups=post_pool_groups, first_conv_norm=first_conv_norm)
        self.linear = FanInLayer(256, hidsize, conv=False, relu=True, norm=dense_norm)

    def forward(self, x: Tensor) -> Tensor:
        """float ``(N, H, W, 3)`` -> ``(N, hidsize)``."""
        return self.linear(self.cnn(x))

