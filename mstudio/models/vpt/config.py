"""VPT network sizes and the validation of MineStudio's ``policy_kwargs``.

``vpt_configs[name]`` is a dict of keyword arguments for :class:`mstudio.models.VPTPolicy`, spelt as
MineStudio's ``policy_kwargs`` (and OpenAI's ``.model`` files) spell them. The foundation sizes are those of
OpenAI's published VPT models (``foundation-model-1x/2x/3x.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

_IMPALA_NORMS = {"batch_norm": False, "group_norm_groups": 1}


def _foundation(hidsize: int, heads: int, impala_width: int) -> dict[str, Any]:
    return dict(
        attention_heads=heads,
        attention_mask_style="clipped_causal",
        attention_memory_size=256,
        diff_mlp_embedding=False,
        hidsize=hidsize,
        img_shape=(128, 128, 3),
        impala_chans=(16, 32, 32),
        impala_kwargs={"post_pool_groups": 1},
        impala_width=impala_width,
        init_norm_kwargs=dict(_IMPALA_NORMS),
        n_recurrence_layers=4,
        only_img_input=True,
        pointwise_ratio=4,
        pointwise_use_activation=False,
        recurrence_is_residual=True,
        recurrence_type="transformer",
        timesteps=128,
        use_pointwise_layer=True,
        use_pre_lstm_ln=False,
    )


def _small(hidsize: int, heads: int, memory: int, timesteps: int) -> dict[str, Any]:
    config = _foundation(hidsize, heads, impala_width=1)
    config.update(
        img_shape=(64, 64, 3), n_recurrence_layers=2, attention_memory_size=memory, timesteps=timesteps
    )
    return config


#: Named VPT sizes. ``tiny``: for tests (half-width CNN to keep fixtures small; its 6-frame memory is shorter
#: than a test window, so the band mask matters). ``small``: the benchmark size. ``1x``/``2x``/``3x``: OpenAI's
#: foundation models (about 71 M, 248.5 M and 532.5 M parameters).
vpt_configs: dict[str, dict[str, Any]] = {
    "tiny": {**_small(hidsize=64, heads=4, memory=10, timesteps=4), "impala_chans": (8, 16, 16)},
    "small": _small(hidsize=256, heads=4, memory=64, timesteps=32),
    "1x": _foundation(hidsize=1024, heads=16, impala_width=4),
    "2x": _foundation(hidsize=2048, heads=16, impala_width=8),
    "3x": _foundation(hidsize=3072, heads=24, impala_width=12),
}

# MineStudio's MinecraftPolicy accepts these and never reads them; published configs carry them.
_IGNORED = {"obs_processing_width", "only_img_input", "diff_mlp_embedding", "input_shape", "active_reward_monitors"}


@dataclass(frozen=True)
class VPTConfig:
    """The validated architecture of a VPT network (see MineStudio's ``models/vpt/body.py:MinecraftPolicy``)."""

    hidsize: int = 512
    img_shape: tuple[int, int, int] = (128, 128, 3)
    impala_width: int = 1
    impala_chans: tuple[int, ...] = (16, 32, 32)
    conv_groups: int | None = None  # GroupNorm groups before convs (init_norm_kwargs["group_norm_groups"])
    dense_layer_norm: bool = False  # LayerNorm before dense layers (on when convs are normed)
    post_pool_groups: int | None = None
    first_conv_norm: bool = False
    scale_input_img: bool = True
    attention_heads: int = 8
    attention_memory_size: int = 2048
    timesteps: int = 128
    n_recurrence_layers: int = 1
    use_pointwise_layer: bool = True
    pointwise_ratio: int = 4
    pointwise_use_activation: bool = False
    recurrence_is_residual: bool = True
    use_pre_lstm_ln: bool = True

    @property
    def maxlen(self) -> int:
        """Frames of memory each layer carries between calls (``attention_memory_size - timesteps``)."""
        return self.attention_memory_size - self.timesteps

    @property
    def chans(self) -> tuple[int, ...]:
        return tuple(int(self.impala_width * c) for c in self.impala_chans)


def parse_policy_kwargs(kwargs: Mapping[str, Any]) -> VPTConfig:
    """Check MineStudio ``policy_kwargs`` and return the :class:`VPTConfig` they describe.

    Raises:
        ValueError: for an unknown name, or a value this port does not implement (LSTM recurrence,
            BatchNorm, image statistics files, ...), naming the argument and the accepted values.
    """
    kwargs = dict(kwargs)
    for name in _IGNORED:
        kwargs.pop(name, None)

    def take(name: str, default: Any) -> Any:
        return kwargs.pop(name, default)

    def require(name: str, value: Any, accepted: tuple) -> None:
        if value not in accepted:
            raise ValueError(f"VPTPolicy: {name}={value!r} is not supported; accepted: {list(accepted)}")

    require("recurrence_type", take("recurrence_type", "transformer"), ("transformer",))
    require("attention_mask_style", take("attention_mask_style", "clipped_causal"), ("clipped_causal",))
    img_statistics = take("img_statistics", None)
    require("img_statistics", img_statistics, (None,))
    take("single_output", False)  # policy and value share one latent either way

    norm_kwargs = dict(take("init_norm_kwargs", {}) or {})
    require("init_norm_kwargs['batch_norm']", bool(norm_kwargs.pop("batch_norm", False)), (False,))
    conv_groups = norm_kwargs.pop("group_norm_groups", None)
    conv_layer_norm = bool(norm_kwargs.pop("layer_norm", False))
    if norm_kwargs:
        raise ValueError(f"VPTPolicy: unknown init_norm_kwargs {sorted(norm_kwargs)}; accepted: "
                         "['batch_norm' (False only), 'group_norm_groups', 'layer_norm']")
    if conv_layer_norm and conv_groups is None:
        # MineStudio would put a LayerNorm(channels) on (N, C, H, W) convolution inputs, which fails.
        raise ValueError("VPTPolicy: init_norm_kwargs layer_norm=True needs group_norm_groups for the convolutions")
    impala_kwargs = dict(take("impala_kwargs", {}) or {})
    post_pool_groups = impala_kwargs.pop("post_pool_groups", None)
    if impala_kwargs:
        raise ValueError(f"VPTPolicy: unknown impala_kwargs {sorted(impala_kwargs)}; accepted: ['post_pool_groups']")

    img_shape = tuple(int(s) for s in take("img_shape", None) or ())
    if len(img_shape) != 3 or img_shape[2] != 3:
        raise ValueError(f"VPTPolicy: img_shape must be (height, width, 3), got {img_shape}")
    timesteps = take("timesteps", None)
    if timesteps is None:
        raise ValueError(
            "VPTPolicy: timesteps is required (the transformer memory is attention_memory_size - timesteps)"
        )

    config = VPTConfig(
        hidsize=int(take("hidsize", 512)),
        img_shape=img_shape,
        impala_width=take("impala_width", 1),
        impala_chans=tuple(take("impala_chans", (16, 32, 32))),
        conv_groups=conv_groups,
        dense_layer_norm=conv_groups is not None or conv_layer_norm,
        post_pool_groups=post_pool_groups,
        first_conv_norm=bool(take("first_conv_norm", False)),
        scale_input_img=bool(take("scale_input_img", True)),
        attention_heads=int(take("attention_heads", 8)),
        attention_memory_size=int(take("attention_memory_size", 2048)),
        timesteps=int(timesteps),
        n_recurrence_layers=int(take("n_recurrence_layers", 1)),
        use_pointwise_layer=bool(take("use_pointwise_layer", True)),
        pointwise_ratio=take("pointwise_ratio", 4),
        pointwise_use_activation=bool(take("pointwise_use_activation", False)),
        recurrence_is_residual=bool(take("recurrence_is_residual", True)),
        use_pre_lstm_ln=bool(take("use_pre_lstm_ln", True)),
    )
    if kwargs:
        raise ValueError(f"VPTPolicy: unknown policy_kwargs {sorted(kwargs)}")
    if config.maxlen <= 0:
        raise ValueError(
            f"VPTPolicy: attention_memory_size ({config.attention_memory_size}) must exceed timesteps "
            f"({config.timesteps}): the memory holds attention_memory_size - timesteps frames"
        )
    if config.hidsize % config.attention_heads:
        raise ValueError(
            f"VPTPolicy: hidsize {config.hidsize} is not divisible by attention_heads {config.attention_heads}"
        )
    return config
