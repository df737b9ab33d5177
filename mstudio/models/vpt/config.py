"""VPT network sizes: the typed :class:`VPTConfig`, its named presets, and MineStudio's ``policy_kwargs``.

A :class:`VPTConfig` is the validated architecture of a VPT network. ``VPTConfig.preset(name)`` gives a named
size, ``VPTConfig.from_policy_kwargs(kwargs)`` reads MineStudio's ``policy_kwargs`` (as MineStudio's
``config.json`` and OpenAI's ``.model`` files spell them) and ``config.to_policy_kwargs()`` writes them back,
so a checkpoint or an export can record a config that MineStudio reads. The foundation sizes are those of
OpenAI's published VPT models (``foundation-model-1x/2x/3x.model``).

``vpt_configs`` (a mapping name -> ``policy_kwargs``) is deprecated: use ``VPTConfig.preset(name)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from mstudio._names import unknown_names

__all__ = ["VPTConfig", "vpt_configs"]

# MineStudio's MinecraftPolicy accepts these and never reads them; published configs carry them.
_IGNORED = {"obs_processing_width", "only_img_input", "diff_mlp_embedding", "input_shape", "active_reward_monitors"}


@dataclass(frozen=True)
class VPTConfig:
    """The validated architecture of a VPT network (MineStudio's ``models/vpt/body.py:MinecraftPolicy``).

    Build one from a preset (``VPTConfig.preset("1x")``), from MineStudio's ``policy_kwargs``
    (:meth:`from_policy_kwargs`), or field by field; every way is checked by the same rules.

    Raises:
        ValueError: naming the field, what it must be and what came: a field of the wrong type (a ``str``,
            ``float`` or ``bool`` for an int, anything but a ``bool`` for a flag), a size below 1, an ``img_shape``
            that is not ``(height, width, 3)``, an ``attention_memory_size`` not above ``timesteps``, a ``hidsize``
            that ``attention_heads`` does not divide, or GroupNorm groups that do not divide the channels.
    """

    hidsize: int = 512
    """Width of the latent: the CNN's output, every transformer layer and the heads' input."""
    img_shape: tuple[int, int, int] = (128, 128, 3)
    """``(height, width, 3)`` of the uint8 frames the policy takes."""
    impala_width: int = 1
    """Multiplier of every IMPALA CNN stack's channel count."""
    impala_chans: tuple[int, ...] = (16, 32, 32)
    """Channels of the IMPALA CNN stacks before ``impala_width`` multiplies them (one stack per entry)."""
    conv_groups: int | None = None
    """GroupNorm groups before every convolution but the first; ``None`` for no norm. MineStudio:
    ``init_norm_kwargs["group_norm_groups"]``. Setting it also puts a LayerNorm before the dense layers."""
    post_pool_groups: int | None = None
    """GroupNorm groups after each stack's max-pool; ``None`` for no norm. MineStudio:
    ``impala_kwargs["post_pool_groups"]``."""
    first_conv_norm: bool = False
    """Whether the very first convolution gets a norm too."""
    scale_input_img: bool = True
    """Whether frames are divided by 255 before the CNN."""
    attention_heads: int = 8
    """Heads of each transformer layer's attention; must divide ``hidsize``."""
    attention_memory_size: int = 2048
    """Memory plus chunk length of the attention; must exceed ``timesteps`` (see :attr:`maxlen`)."""
    timesteps: int = 128
    """The chunk length the attention was built for; only ``attention_memory_size - timesteps`` matters here."""
    n_recurrence_layers: int = 1
    """Number of transformer layers (each carries its own memory)."""
    use_pointwise_layer: bool = True
    """Whether each transformer layer has its pointwise MLP after the attention."""
    pointwise_ratio: int = 4
    """Hidden width of that MLP, as a multiple of ``hidsize``."""
    pointwise_use_activation: bool = False
    """Whether that MLP has a ReLU between its two linear layers."""
    recurrence_is_residual: bool = True
    """Whether the MLP output is added to its input."""
    use_pre_lstm_ln: bool = True
    """Whether a LayerNorm sits between the CNN and the transformer (the name is VPT's, from its LSTM days)."""

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the config hashable and equal to its presets.
        object.__setattr__(self, "img_shape", _img_shape(self.img_shape))
        object.__setattr__(self, "impala_chans", _positive_ints("impala_chans", self.impala_chans))
        for name in _POSITIVE_INTS:
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        for name in ("conv_groups", "post_pool_groups"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else _positive_int(name, value, "None or an int"))
        for name in _BOOLS:
            _check(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        width = self.impala_width
        _check(isinstance(width, Real) and not isinstance(width, bool) and 0 < width < math.inf, "impala_width",
               "a finite number > 0", width)
        _check(min(self.chans) >= 1, "impala_width", f"large enough that every stack of impala_width * impala_chans "
               f"{self.impala_chans} has a channel (got channels {self.chans})", width)
        self._check_sizes()

    def _check_sizes(self) -> None:
        """The rules between fields: memory beyond the chunk, heads dividing the width, groups the channels."""
        if self.maxlen <= 0:
            raise ValueError(
                f"VPTConfig: attention_memory_size ({self.attention_memory_size}) must exceed timesteps "
                f"({self.timesteps}): the memory holds attention_memory_size - timesteps frames"
            )
        if self.hidsize % self.attention_heads:
            raise ValueError(
                f"VPTConfig: hidsize {self.hidsize} is not divisible by attention_heads {self.attention_heads}"
            )
        # GroupNorm needs its groups to divide the channels it normalises: every stack's (and the image's 3
        # when the first convolution is normed too).
        normed = {"conv_groups": self.chans + ((3,) if self.first_conv_norm else ()), "post_pool_groups": self.chans}
        for name, channels in normed.items():
            groups = getattr(self, name)
            if groups is not None and any(c % groups for c in channels):
                raise ValueError(f"VPTConfig: {name} {groups} must divide the channels of every convolution it "
                                 f"normalises {channels}")

    @property
    def maxlen(self) -> int:
        """Frames of memory each layer carries between calls (``attention_memory_size - timesteps``)."""
        return self.attention_memory_size - self.timesteps

    @property
    def chans(self) -> tuple[int, ...]:
        """Channels of the IMPALA CNN stacks (``impala_width * impala_chans``)."""
        return tuple(int(self.impala_width * c) for c in self.impala_chans)

    @property
    def dense_layer_norm(self) -> bool:
        """Whether the dense layers are LayerNormed: MineStudio turns that on whenever the convolutions are."""
        return self.conv_groups is not None

    @classmethod
    def preset(cls, name: str) -> VPTConfig:
        """A named size: ``tiny`` (tests; a half-width CNN keeps fixtures small, and its 6-frame memory is
        shorter than a test window, so the band mask matters), ``small`` (the benchmark size), ``1x``/``2x``/``3x``
        (OpenAI's foundation models: about 71 M, 248.5 M and 532.5 M parameters).

        Raises:
            ValueError: for an unknown name, listing the known ones.
        """
        if name not in _PRESETS:
            raise ValueError(_unknown_preset(name))
        return _PRESETS[name]

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        """The names :meth:`preset` accepts, smallest first."""
        return tuple(_PRESETS)

    @classmethod
    def from_policy_kwargs(cls, policy_kwargs: Mapping[str, Any]) -> VPTConfig:
        """Check MineStudio's ``policy_kwargs`` and return the config they describe.

        Args:
            policy_kwargs: MineStudio's ``MinecraftPolicy`` keyword arguments, e.g. ``config.json["policy_kwargs"]``.
                ``img_shape`` and ``timesteps`` are required; keys MineStudio ignores are ignored.

        Raises:
            ValueError: for an unknown name (suggesting the close one), a missing ``img_shape`` or ``timesteps``, a
                value of the wrong type, or a value this port does not implement (LSTM recurrence, BatchNorm, image
                statistics files, ...), naming the argument and the accepted values.
        """
        kwargs = {k: v for k, v in policy_kwargs.items() if k not in _IGNORED}
        known = {*_PLAIN_FIELDS, *_FIXED_CHOICES, *_IGNORED, "init_norm_kwargs", "impala_kwargs", "img_statistics",
                 "single_output"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"VPTConfig: unknown policy_kwargs {unknown_names(unknown, known)}; "
                             f"accepted: {sorted(known)}")
        missing = [name for name in _REQUIRED if kwargs.get(name) is None]
        if missing:
            raise ValueError(f"VPTConfig: policy_kwargs lacks the required {', '.join(missing)} (img_shape: "
                             "(height, width, 3) of the frames; the transformer memory is attention_memory_size - "
                             "timesteps)")
        _check_fixed_choices(kwargs)
        conv_groups = _parse_init_norm_kwargs(kwargs.pop("init_norm_kwargs", None))
        post_pool_groups = _parse_impala_kwargs(kwargs.pop("impala_kwargs", None))
        return cls(conv_groups=conv_groups, post_pool_groups=post_pool_groups, **kwargs)

    def to_policy_kwargs(self) -> dict[str, Any]:
        """MineStudio's ``policy_kwargs`` for this config, every architecture argument explicit (no reliance on
        MineStudio's defaults), so ``VPTConfig.from_policy_kwargs(c.to_policy_kwargs()) == c``."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        conv_groups, post_pool_groups = kwargs.pop("conv_groups"), kwargs.pop("post_pool_groups")
        init_norm = {"batch_norm": False} | ({} if conv_groups is None else {"group_norm_groups": conv_groups})
        impala = {} if post_pool_groups is None else {"post_pool_groups": post_pool_groups}
        kwargs.update(init_norm_kwargs=init_norm, impala_kwargs=impala, **_FIXED_CHOICES)
        return dict(sorted(kwargs.items()))


# policy_kwargs this port implements one value of; to_policy_kwargs writes them so MineStudio builds the same.
_FIXED_CHOICES = {"recurrence_type": "transformer", "attention_mask_style": "clipped_causal"}


# policy_kwargs that are VPTConfig fields of the same name (checked by VPTConfig itself).
_PLAIN_FIELDS = (
    "hidsize", "img_shape", "timesteps", "impala_width", "impala_chans", "first_conv_norm", "scale_input_img",
    "attention_heads", "attention_memory_size", "n_recurrence_layers", "use_pointwise_layer", "pointwise_ratio",
    "pointwise_use_activation", "recurrence_is_residual", "use_pre_lstm_ln",
)
# MineStudio has no default for these.
_REQUIRED = ("img_shape", "timesteps")
_POSITIVE_INTS = ("hidsize", "attention_heads", "attention_memory_size", "timesteps", "n_recurrence_layers",
                  "pointwise_ratio")
_BOOLS = ("first_conv_norm", "scale_input_img", "use_pointwise_layer", "pointwise_use_activation",
          "recurrence_is_residual", "use_pre_lstm_ln")


def _shown(value: Any) -> str:
    """``value`` as a message shows it: sequences as tuples (JSON gives lists), with the type for scalars."""
    if isinstance(value, (list, tuple)):
        return str(tuple(value))
    return repr(value) if value is None else f"{type(value).__name__} {value!r}"


def _check(condition: bool, name: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"VPTConfig: {name} must be {expected}, got {_shown(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, expected: str = "an int") -> int:
    _check(_is_int(value) and value >= 1, name, f"{expected} >= 1", value)
    return int(value)


def _positive_ints(name: str, value: Any) -> tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v >= 1 for v in value)
    _check(ok, name, "a non-empty sequence of ints >= 1", value)
    return tuple(int(v) for v in value)


def _img_shape(value: Any) -> tuple[int, int, int]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) and v >= 1 for v in value)
          and value[2] == 3)
    _check(ok, "img_shape", "(height, width, 3) with integer height and width >= 1", value)
    return tuple(int(v) for v in value)


def _require(name: str, value: Any, accepted: tuple[Any, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"VPTConfig: {name}={value!r} is not supported; accepted: {list(accepted)}")


def _check_fixed_choices(kwargs: dict[str, Any]) -> None:
    """Pop the arguments with one supported value (or none that matters) from ``kwargs``, checking each."""
    for name, value in _FIXED_CHOICES.items():
        _require(name, kwargs.pop(name, value), (value,))
    _require("img_statistics", kwargs.pop("img_statistics", None), (None,))
    kwargs.pop("single_output", None)  # policy and value share one latent either way


def _parse_init_norm_kwargs(norm_kwargs: Mapping[str, Any] | None) -> int | None:
    """``init_norm_kwargs`` -> :attr:`VPTConfig.conv_groups`."""
    norm_kwargs = dict(norm_kwargs or {})
    _require("init_norm_kwargs['batch_norm']", bool(norm_kwargs.pop("batch_norm", False)), (False,))
    conv_groups = norm_kwargs.pop("group_norm_groups", None)
    conv_layer_norm = bool(norm_kwargs.pop("layer_norm", False))
    if norm_kwargs:
        raise ValueError(f"VPTConfig: unknown init_norm_kwargs {sorted(norm_kwargs)}; accepted: "
                         "['batch_norm' (False only), 'group_norm_groups', 'layer_norm']")
    if conv_layer_norm and conv_groups is None:
        # MineStudio would put a LayerNorm(channels) on (N, C, H, W) convolution inputs, which fails.
        raise ValueError("VPTConfig: init_norm_kwargs layer_norm=True needs group_norm_groups for the convolutions")
    # With group_norm_groups set, layer_norm only adds the dense LayerNorms, which groups turn on anyway.
    return conv_groups


def _parse_impala_kwargs(impala_kwargs: Mapping[str, Any] | None) -> int | None:
    """``impala_kwargs`` -> :attr:`VPTConfig.post_pool_groups`."""
    impala_kwargs = dict(impala_kwargs or {})
    post_pool_groups = impala_kwargs.pop("post_pool_groups", None)
    if impala_kwargs:
        raise ValueError(f"VPTConfig: unknown impala_kwargs {sorted(impala_kwargs)}; accepted: ['post_pool_groups']")
    return post_pool_groups


def _foundation(hidsize: int, heads: int, impala_width: int) -> VPTConfig:
    return VPTConfig(
        hidsize=hidsize, img_shape=(128, 128, 3), impala_width=impala_width, impala_chans=(16, 32, 32),
        conv_groups=1, post_pool_groups=1, attention_heads=heads, attention_memory_size=256, timesteps=128,
        n_recurrence_layers=4, use_pre_lstm_ln=False,
    )


def _small(hidsize: int, heads: int, memory: int, timesteps: int) -> VPTConfig:
    return dataclasses.replace(
        _foundation(hidsize, heads, impala_width=1),
        img_shape=(64, 64, 3), n_recurrence_layers=2, attention_memory_size=memory, timesteps=timesteps,
    )


_PRESETS: dict[str, VPTConfig] = {
    "tiny": dataclasses.replace(_small(hidsize=64, heads=4, memory=10, timesteps=4), impala_chans=(8, 16, 16)),
    "small": _small(hidsize=256, heads=4, memory=64, timesteps=32),
    "1x": _foundation(hidsize=1024, heads=16, impala_width=4),
    "2x": _foundation(hidsize=2048, heads=16, impala_width=8),
    "3x": _foundation(hidsize=3072, heads=24, impala_width=12),
}


def _unknown_preset(name: object) -> str:
    return f"unknown VPT preset {name!r}; known presets: {list(_PRESETS)}"


class _DeprecatedPresetKwargs(Mapping[str, dict[str, Any]]):
    """``vpt_configs[name]``: a preset's MineStudio ``policy_kwargs``, with a ``DeprecationWarning``."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in _PRESETS:
            raise KeyError(_unknown_preset(name))
        warnings.warn(
            f"mstudio.models.vpt_configs is deprecated and will be removed in mstudio 0.2: use "
            f"VPTPolicy.from_preset({name!r}) or VPTConfig.preset({name!r}) (its MineStudio policy_kwargs: "
            f"VPTConfig.preset({name!r}).to_policy_kwargs())",
            DeprecationWarning,
            stacklevel=2,
        )
        return VPTConfig.preset(name).to_policy_kwargs()

    def __contains__(self, name: object) -> bool:
        return name in _PRESETS  # without the deprecation warning __getitem__ gives

    def __iter__(self) -> Iterator[str]:
        return iter(_PRESETS)

    def __len__(self) -> int:
        return len(_PRESETS)

    def __repr__(self) -> str:
        return f"vpt_configs({list(_PRESETS)}; deprecated, use VPTConfig.preset(name))"


#: Deprecated: ``vpt_configs[name]`` is ``VPTConfig.preset(name).to_policy_kwargs()`` (read-only).
vpt_configs: Mapping[str, dict[str, Any]] = _DeprecatedPresetKwargs()
