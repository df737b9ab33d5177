"""VPT's recurrent transformer: residual blocks of memory attention + pointwise MLP.

Faithful to MineStudio's ``utils/vpt_lib/{util,masked_attention,xf}.py`` (names kept so ``state_dict`` keys
match), but stateless: the attention mask is computed from ``state_in`` and returned in ``state_out``, never
stored on the module, and all time steps of a chunk are processed at once.

Per block the memory is ``(mask, K, V)``: ``mask`` bool ``(B, 1, maxlen)`` (False = empty slot), ``K``, ``V``
float ``(B, maxlen, hidsize)``, holding the keys/values of the last ``maxlen`` frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mstudio.models.vpt.impala import FanInLayer

__all__ = [
    "MASKED_LOGIT",
    "N_BASIS",
    "MaskedAttention",
    "ResidualRecurrentBlock",
    "ResidualRecurrentBlocks",
    "SelfAttentionLayer",
]

#: Basis functions of the relative-position attention bias (``b_nd`` has this many rows).
N_BASIS = 10
#: Added to the logits of keys a query may not see (MineStudio adds -1e9 rather than -inf).
MASKED_LOGIT = -1e9


def _normed_linear(insize: int, outsize: int, scale: float, bias: bool = True) -> nn.Linear:
    """``nn.Linear`` with each weight row rescaled to L2 norm ``scale`` and zero bias (VPT's ``NormedLinear``)."""
    layer = nn.Linear(insize, outsize, bias=bias)
    with torch.no_grad():
        if not layer.weight.is_meta:
            layer.weight.mul_(scale / layer.weight.norm(dim=1, keepdim=True))
        if bias:
            layer.bias.zero_()
    return layer


class SelfAttentionLayer(nn.Module):
    """Multi-head attention of a chunk over ``maxlen`` remembered frames plus itself, output ``x + Attn(x)``.

    Logits are ``q.k / head_dim + rel + mask`` where ``rel[i, j] = sum_n r_layer(x_i)[h, n] * b_nd[n, d]`` for
    the frame distance ``d = pos(i) - pos(j)`` in ``[0, maxlen)`` (zero elsewhere) and ``mask`` is -1e9 for keys
    outside that band or in empty memory slots (``xf.py:attention``, ``relattn_logits``).
    """

    def __init__(self, hidsize: int, heads: int, maxlen: int, init_scale: float):
        super().__init__()
        s = math.sqrt(init_scale)
        self.heads, self.maxlen = heads, maxlen
        self.q_layer = _normed_linear(hidsize, hidsize, 0.1)
        self.k_layer = _normed_linear(hidsize, hidsize, 0.2, bias=False)
        self.v_layer = _normed_linear(hidsize, hidsize, s, bias=False)
        self.proj_layer = _normed_linear(hidsize, hidsize, s)
        self.r_layer = _normed_linear(hidsize, N_BASIS * heads, 0.1)
        self.b_nd = nn.Parameter(torch.randn(N_BASIS, maxlen) * 0.2)

    def forward(self, x: Tensor, memory: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Args: ``x`` ``(B, t, hidsize)``; ``memory = (mask, K, V)`` as in the module docstring.

        Returns: ``(B, t, hidsize)`` and the memory after the chunk (the last ``maxlen`` frames of
        memory + chunk).
        """
        mask, k_mem, v_mem = memory
        B, t, e = x.shape
        h, maxlen = self.heads, self.maxlen
        T = maxlen + t
        k = torch.cat([k_mem, self.k_layer(x)], dim=1)  # (B, T, e): remembered frames then the chunk
        v = torch.cat([v_mem, self.v_layer(x)], dim=1)
        seen = torch.cat([mask, mask.new_ones(B, 1, t)], dim=2)  # (B, 1, T)

        # Distance d = (maxlen + i) - j between query i and key j; visible iff 0 <= d < maxlen.
        d = maxlen + torch.arange(t, device=x.device)[:, None] - torch.arange(T, device=x.device)
        in_band = (d >= 0) & (d < maxlen)  # (t, T)
        r = self.r_layer(x).view(B, t, h, N_BASIS).transpose(1, 2)  # (B, h, t, n)
        rel_by_distance = F.pad(r @ self.b_nd, (0, 1))  # (B, h, t, maxlen + 1); column maxlen is zero
        index = torch.where(in_band, d, maxlen).expand(B, h, t, T)
        rel = rel_by_distance.gather(3, index)
        visible = in_band & seen.unsqueeze(1)  # (B, 1, t, T)
        bias = rel + (~visible).to(rel.dtype) * MASKED_LOGIT

        q = self.q_layer(x).view(B, t, h, e // h).transpose(1, 2)
        k_h = k.view(B, T, h, e // h).transpose(1, 2)
        v_h = v.view(B, T, h, e // h).transpose(1, 2)
        # VPT scales logits by 1/head_dim (muP), not 1/sqrt(head_dim).
        a = F.scaled_dot_product_attention(q, k_h.to(q.dtype), v_h.to(q.dtype), attn_mask=bias.to(q.dtype),
                                           scale=1.0 / (e // h))
        out = x + self.proj_layer(a.transpose(1, 2).reshape(B, t, e))
        new_memory = (seen[:, :, -maxlen:], k[:, -maxlen:], v[:, -maxlen:])
        return out, new_memory


class MaskedAttention(nn.Module):
    """Holds ``orc_block`` so that parameter names read ``r.orc_block.*`` as in MineStudio."""

    def __init__(self, hidsize: int, heads: int, maxlen: int, init_scale: float):
        super().__init__()
        self.orc_block = SelfAttentionLayer(hidsize, heads, maxlen, init_scale)

    def forward(self, x: Tensor, memory):
        return self.orc_block(x, memory)


class ResidualRecurrentBlock(nn.Module):
    """``y = a(LN(x))`` with ``a`` the (internally residual) attention, then ``y + mlp1(mlp0(y))``.

    There is no outer residual around the attention: VPT's transformer block adds its input after the
    pre-norm (``util.py:ResidualRecurrentBlock.forward``).
    """

    def __init__(self, hidsize: int, heads: int, maxlen: int, init_scale: float, use_pointwise_layer: bool,
                 pointwise_ratio: int, pointwise_use_activation: bool, is_residual: bool):
        super().__init__()
        s = init_scale
        self.use_pointwise_layer, self.is_residual = use_pointwise_layer, is_residual
        if use_pointwise_layer:
            if is_residual:
                s *= 2 ** -0.5  # second residual branch
            self.mlp0 = FanInLayer(hidsize, hidsize * pointwise_ratio, conv=False, relu=True, norm="layer")
            self.mlp1 = FanInLayer(hidsize * pointwise_ratio, hidsize, conv=False, relu=pointwise_use_activation,
                                   init_scale=s)
        self.pre_r_ln = nn.LayerNorm(hidsize)
        self.r = MaskedAttention(hidsize, heads, maxlen, init_scale=s)

    def forward(self, x: Tensor, memory):
        x, memory = self.r(self.pre_r_ln(x), memory)
        if self.use_pointwise_layer:
            y = self.mlp1(self.mlp0(x))
            x = x + y if self.is_residual else y
        return x, memory


class ResidualRecurrentBlocks(nn.Module):
    """``n_block`` blocks in sequence; the memory is a flat tuple ``(mask_0, K_0, V_0, mask_1, ...)``."""

    def __init__(self, n_block: int, hidsize: int, heads: int, maxlen: int, use_pointwise_layer: bool,
                 pointwise_ratio: int, pointwise_use_activation: bool, is_residual: bool):
        super().__init__()
        init_scale = n_block ** -0.5 if is_residual else 1.0
        self.blocks = nn.ModuleList(
            ResidualRecurrentBlock(hidsize, heads, maxlen, init_scale, use_pointwise_layer, pointwise_ratio,
                                   pointwise_use_activation, is_residual)
            for _ in range(n_block)
        )

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        state_out = []
        for i, block in enumerate(self.blocks):
            x, memory = block(x, tuple(state[3 * i: 3 * i + 3]))
            state_out.extend(memory)
        return x, tuple(state_out)
