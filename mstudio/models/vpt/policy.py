"""``VPTPolicy``: OpenAI's VPT network with MineStudio's heads, as a stateless mstudio policy.

Weight-compatible with MineStudio 1.1.6 ``minestudio.models.VPTPolicy`` (same ``state_dict`` keys and shapes,
same outputs for the same weights), see ``models/vpt/body.py`` there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mstudio.models.vpt.config import VPTConfig
from mstudio.actions import N_BUTTONS, N_CAMERA
from mstudio.models.vpt.impala import FanInLayer, ImgObsProcess
from mstudio.models.vpt.transformer import ResidualRecurrentBlocks
from mstudio.models.vpt.weights import check_state_values, check_temperature
from mstudio.policy import DictActionHead, get_action

__all__ = ["CategoricalHead", "ValueHead", "VPTBody", "VPTPolicy"]


class VPTBody(nn.Module):
    """Images -> latent ``(B, T, hidsize)``: IMPALA CNN, optional LayerNorm, transformer, ``relu``, dense, LayerNorm."""

    def __init__(self, config: VPTConfig):
        super().__init__()
        dense_norm = "layer" if config.dense_layer_norm else None
        self.img_process = ImgObsProcess(config.img_shape, config.chans, config.hidsize, config.conv_groups,
                                         dense_norm, config.post_pool_groups, config.first_conv_norm)
        self.pre_lstm_ln = nn.LayerNorm(config.hidsize) if config.use_pre_lstm_ln else None
        self.recurrent_layer = ResidualRecurrentBlocks(
            config.n_recurrence_layers, config.hidsize, config.attention_heads, config.maxlen,
            config.use_pointwise_layer, config.pointwise_ratio, config.pointwise_use_activation,
            config.recurrence_is_residual,
        )
        self.lastlayer = FanInLayer(config.hidsize, config.hidsize, conv=False, norm=dense_norm, relu=True)
        self.final_ln = nn.LayerNorm(config.hidsize)
        self.ob_scale = 255.0 if config.scale_input_img else 1.0  # divide, as MineStudio, for bitwise-equal inputs

    def forward(self, image: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        B, T = image.shape[:2]
        # In the parameters' dtype: float32 as MineStudio, float64 when checking numerics against float32.
        x = image.reshape(B * T, *image.shape[2:]).to(self.final_ln.weight.dtype) / self.ob_scale
        x = self.img_process(x).view(B, T, -1)
        if self.pre_lstm_ln is not None:
            x = self.pre_lstm_ln(x)
        x, state = self.recurrent_layer(x, state)
        return self.final_ln(self.lastlayer(F.relu(x))), state


class CategoricalHead(nn.Module):
    """``log_softmax(linear(x) / temperature)`` in at least float32 (float32 under bf16 autocast, as MineStudio;
    float64 for a float64 model), with a singleton action dim."""

    def __init__(self, hidsize: int, n: int, temperature: float):
        super().__init__()
        self.linear_layer = nn.Linear(hidsize, n)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, hidsize)`` -> float32 (or float64) ``(B, T, 1, n)``."""
        logits = self.linear_layer(x) / self.temperature
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).unsqueeze(-2)


class ValueHead(nn.Module):
    """``linear(x)``; ``normalizer`` holds MineStudio's EWMA return statistics (frozen, unused by forward)."""

    def __init__(self, hidsize: int):
        super().__init__()
        self.linear = nn.Linear(hidsize, 1)
        self.normalizer = nn.Module()
        for name, shape in (("running_mean", (1,)), ("running_mean_sq", (1,)), ("debiasing_term", ())):
            setattr(self.normalizer, name, nn.Parameter(torch.zeros(shape), requires_grad=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _config_from(config: VPTConfig | None, policy_kwargs: Mapping[str, Any]) -> VPTConfig:
    """``VPTPolicy``'s architecture argument: a :class:`VPTConfig` or MineStudio's ``policy_kwargs``, one of them."""
    if config is None and not policy_kwargs:
        raise TypeError("VPTPolicy needs an architecture: VPTPolicy.from_preset('1x'), VPTPolicy(VPTConfig(...)) "
                        "or VPTPolicy(**policy_kwargs) with MineStudio's policy_kwargs")
    if config is None:
        return VPTConfig.from_policy_kwargs(policy_kwargs)
    if not isinstance(config, VPTConfig):
        raise TypeError(f"VPTPolicy: config must be a VPTConfig (e.g. VPTConfig.preset('1x')), got "
                        f"{type(config).__name__} {config!r}; temperature is keyword-only: "
                        "VPTPolicy(config, temperature=t)")
    if policy_kwargs:
        raise ValueError(f"VPTPolicy got both a VPTConfig and policy_kwargs {sorted(policy_kwargs)}; pass one: "
                         "VPTPolicy(dataclasses.replace(config, ...)) or VPTPolicy(**policy_kwargs)")
    return config


class VPTPolicy(nn.Module):
    """The VPT policy (OpenAI's Video PreTraining network) with MineStudio's action and value heads.

    Args:
        config: the architecture (:meth:`VPTConfig.preset` gives the named sizes); or, instead of it,
        **policy_kwargs: MineStudio's ``policy_kwargs``, read by :meth:`VPTConfig.from_policy_kwargs` (unknown or
            unsupported values raise ``ValueError``).
        temperature: divides the action logits before the log-softmax (MineStudio's ``temperature``); a finite
            number > 0, else ``ValueError``.

    Memory (``initial_state(B)``): a flat tuple with three tensors per transformer layer, as MineStudio's
    state list: ``mask`` bool ``(B, 1, maxlen)`` (False = empty slot), ``K`` and ``V`` float32 (the
    parameters' dtype) ``(B, maxlen, hidsize)``, ``maxlen = attention_memory_size - timesteps``. A query
    attends to the previous ``maxlen`` frames including itself, so one call over ``2t`` frames equals two
    calls over ``t`` frames with the state carried. As in MineStudio, episode starts inside a chunk are not modelled
    (``first`` is all False); a trainer resets the memory between chunks instead.
    """

    def __init__(self, config: VPTConfig | None = None, *, temperature: float = 1.0, **policy_kwargs: Any):
        super().__init__()
        check_temperature(temperature, "VPTPolicy: temperature")
        self.config = _config_from(config, policy_kwargs)
        hidsize = self.config.hidsize
        # Registration order value_head, pi_head, net gives MineStudio's state_dict key order.
        self.value_head = ValueHead(hidsize)

        # MineStudio's pi_head API (logprob / entropy / sample) over the same children and state_dict keys.
        self.pi_head = DictActionHead({
            "buttons": CategoricalHead(hidsize, N_BUTTONS, temperature),
            "camera": CategoricalHead(hidsize, N_CAMERA, temperature),
        })
        self.net = VPTBody(self.config)

    @classmethod
    def from_preset(cls, name: str, *, temperature: float = 1.0) -> "VPTPolicy":
        """A freshly initialised policy of the named size (see :meth:`VPTConfig.preset`: ``tiny``, ``small``,
        ``1x``, ``2x``, ``3x``); an unknown name raises ``ValueError`` listing the known ones."""
        return cls(VPTConfig.preset(name), temperature=temperature)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VPTPolicy":
        """A policy from a folder in MineStudio's Hugging Face layout (``config.json`` + ``model.safetensors``) or
        from an mstudio ``.safetensors`` export (config in its metadata); see
        :func:`mstudio.models.vpt.weights.from_pretrained`. Never downloads."""
        from mstudio.models.vpt.weights import from_pretrained

        return from_pretrained(cls, path)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, refusing first what it would load silently wrong.

        Raises:
            ValueError: listing every tensor holding NaN or inf, or of another kind than its parameter (an int,
                bool or complex tensor into a float parameter, which torch casts without a word).
            RuntimeError: from torch, for missing or unexpected keys (with ``strict``) and shape mismatches.
                Float-to-float casts happen as in torch.
        """
        check_state_values(self, state_dict, "the state_dict given to VPTPolicy.load_state_dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Empty memory: per layer ``(mask False (B, 1, maxlen), K zeros, V zeros (B, maxlen, hidsize))``."""
        reference = self.net.final_ln.weight  # K, V in the parameters' dtype: float32 unless cast
        c = self.config
        state = []
        for _ in range(c.n_recurrence_layers):
            state.append(torch.zeros(batch_size, 1, c.maxlen, dtype=torch.bool, device=reference.device))
            state.append(torch.zeros(batch_size, c.maxlen, c.hidsize, dtype=reference.dtype, device=reference.device))
            state.append(torch.zeros(batch_size, c.maxlen, c.hidsize, dtype=reference.dtype, device=reference.device))
        return tuple(state)

    def forward(self, batch: Mapping[str, Any], state_in: tuple[Tensor, ...] | list[Tensor]) -> tuple[dict, tuple]:
        """Args: ``batch["image"]`` uint8 ``(B, T, H, W, 3)`` with ``(H, W, 3) == img_shape``; ``state_in`` as
        :meth:`initial_state` returns (a MineStudio state list works too).

        Returns: ``latents = {"pi_logits": {"buttons": float32 (B, T, 1, 8641), "camera": float32
        (B, T, 1, 121)}`` (log-softmax), ``"vpred": (B, T, 1)}`` and ``state_out`` like ``state_in``, after
        the chunk's last frame.
        """
        image = batch["image"]
        self._check_inputs(image, state_in)
        features, state_out = self.net(image, tuple(state_in))
        latents = {
            "pi_logits": self.pi_head(features),
            "vpred": self.value_head(features),
        }
        return latents, state_out

    def get_action(
        self,
        obs: Mapping[str, Any],
        state_in: tuple[Tensor, ...] | list[Tensor] | None,
        *,
        deterministic: bool = False,
        input_shape: str = "BT*",
    ) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        """Act, as MineStudio's ``MinePolicy.get_action``, without gradients (see :func:`mstudio.policy.get_action`).

        Args:
            obs: ``{"image": uint8 (B, T, H, W, 3)}`` with ``input_shape="BT*"``, or one frame ``{"image": uint8
                (H, W, 3)}`` (numpy or torch) with ``input_shape="*"``.
            state_in: the previous call's ``state_out``, or ``None`` at an episode's start.
            deterministic: argmax of each head instead of a sample.
            input_shape: ``"BT*"`` or ``"*"``.

        Returns:
            ``({"buttons": long (B, T, 1), "camera": long (B, T, 1)}, state_out)``; for ``"*"`` the actions are
            ``(1,)`` and the state has no batch dim. ``mstudio.actions.agent_to_env(action)`` gives the env's
            buttons and camera degrees.
        """
        return get_action(self, obs, state_in, deterministic=deterministic, input_shape=input_shape)

    def _check_inputs(self, image: Tensor, state_in) -> None:
        """Raise ``ValueError`` naming what came and what is needed (shapes are static: free under compile)."""
        c = self.config
        if image.dtype != torch.uint8 or image.ndim != 5 or tuple(image.shape[2:]) != c.img_shape:
            raise ValueError(
                f"VPTPolicy needs batch['image'] uint8 (B, T, {', '.join(map(str, c.img_shape))}), got "
                f"{image.dtype} {tuple(image.shape)}"
            )
        B = image.shape[0]
        expected = self.initial_state_spec(B)
        if len(state_in) != len(expected):
            raise ValueError(f"VPTPolicy needs a state of {len(expected)} tensors (3 per layer), got {len(state_in)}")
        for i, (tensor, (shape, dtype)) in enumerate(zip(state_in, expected)):
            ok_dtype = tensor.dtype == torch.bool if dtype == torch.bool else tensor.is_floating_point()
            if tuple(tensor.shape) != shape or not ok_dtype:
                raise ValueError(
                    f"VPTPolicy state_in[{i}] must be {'bool' if dtype == torch.bool else 'float'} {shape} "
                    f"(batch {B}), got {tensor.dtype} {tuple(tensor.shape)}; is it the state of another batch size? "
                    "Use policy.initial_state(batch_size)"
                )

    def initial_state_spec(self, batch_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """``(shape, dtype)`` of each leaf of :meth:`initial_state` ``(batch_size)``, without allocating."""
        c = self.config
        mask = ((batch_size, 1, c.maxlen), torch.bool)
        kv = ((batch_size, c.maxlen, c.hidsize), self.net.final_ln.weight.dtype)  # as initial_state: the params'
        return [mask, kv, kv] * c.n_recurrence_layers
