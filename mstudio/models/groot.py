"""``GrootPolicy``: a small latent-conditioned policy in the style of GROOT (Cai et al., 2023, "GROOT: Learning
to Follow Instructions by Watching Gameplay Videos", arXiv:2310.08235), built from VPT's pieces.

A reference video is encoded into a Gaussian posterior over a goal latent ``z``; the window's first frame
alone is encoded into a Gaussian prior; a VPT-style recurrent transformer decodes actions from the window's
frames conditioned on ``z``. Trained with ``losses.combine(losses.behavior_clone, losses.weighted(
losses.kl_gaussian, w))``, the KL term pulls the posterior towards what the first frame predicts (GROOT's
"self-supervised" goal space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mstudio.actions import N_BUTTONS, N_CAMERA
from mstudio.models.vpt.impala import FanInLayer, ImgObsProcess
from mstudio.models.vpt.policy import CategoricalHead
from mstudio.models.vpt.transformer import ResidualRecurrentBlocks
from mstudio.policy import DictActionHead

__all__ = ["NOISE_KEY", "REFERENCE_KEY", "FrameEncoder", "GrootConfig", "GrootPolicy", "VideoEncoder",
           "with_latent_noise"]

#: Batch key of the reparametrization noise, float ``(B, latent_dim)``.
NOISE_KEY = "latent_noise"
#: Batch key of the reference video, uint8 ``(B, Tr, H, W, 3)``.
REFERENCE_KEY = "reference_image"


@dataclass(frozen=True)
class GrootConfig:
    """The architecture of a :class:`GrootPolicy`; the defaults are tiny (tests, demos, CPU runs).

    Raises:
        ValueError: a non-positive size, an odd ``hidsize`` or one not divisible by ``heads``, naming the field
            and value.
    """

    image_size: int = 32
    """``H = W`` of the uint8 frames (``image`` and ``reference_image``)."""
    hidsize: int = 64
    """Width of the frame features, of the decoder's transformer and of the heads' input."""
    latent_dim: int = 16
    """``D``, the size of the goal latent ``z`` (and of ``mu`` / ``log_var``)."""
    impala_chans: tuple[int, ...] = (8, 16, 16)
    """Channels of the IMPALA CNN stacks of the shared frame encoder (each stack halves H and W)."""
    heads: int = 4
    """Attention heads of the decoder's transformer layers and of the video encoder's pooling."""
    decoder_layers: int = 1
    """Recurrent transformer layers of the decoder (each carries its own memory)."""
    memory_len: int = 8
    """Frames each decoder layer remembers across calls: a frame attends to itself and the ``memory_len - 1``
    before it (VPT's ``attention_memory_size - timesteps``)."""
    pointwise_ratio: int = 2
    """Hidden width of each decoder layer's MLP, as a multiple of ``hidsize``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "impala_chans", tuple(int(c) for c in self.impala_chans))
        for name in ("image_size", "hidsize", "latent_dim", "heads", "decoder_layers", "memory_len", "pointwise_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GrootConfig: {name} must be a positive int, got {value!r}")
        if not self.impala_chans or min(self.impala_chans) <= 0:
            raise ValueError(f"GrootConfig: impala_chans must be positive channel counts, got {self.impala_chans}")
        if self.hidsize % 2:
            raise ValueError(f"GrootConfig: hidsize must be even (the video encoder's sin/cos time embedding), "
                             f"got {self.hidsize}")
        if self.hidsize % self.heads:
            raise ValueError(f"GrootConfig: hidsize {self.hidsize} is not divisible by heads {self.heads}")


def _time_embedding(length: int, dim: int, like: Tensor) -> Tensor:
    """Sinusoidal position embedding ``(length, dim)`` (``dim`` even) in ``like``'s dtype and device."""
    position = torch.arange(length, device=like.device, dtype=like.dtype)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=like.device, dtype=like.dtype) * (-math.log(1e4) / dim))
    angle = position * frequency  # (length, dim / 2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)


def _gaussian(params: Tensor) -> dict[str, Tensor]:
    """``(..., 2D)`` -> ``{"mu": (..., D), "log_var": (..., D)}``."""
    mu, log_var = params.chunk(2, dim=-1)
    return {"mu": mu, "log_var": log_var}


class VideoEncoder(nn.Module):
    """Frame features ``(B, Tr, hidsize)`` -> posterior ``{mu, log_var}`` ``(B, D)``.

    Adds a sinusoidal time embedding (so the order of frames matters), pools the video with one learned
    query attending to every frame (multi-head), then an MLP gives ``mu`` and ``log_var``. A tiny stand-in
    for GROOT's non-causal transformer with learned summary tokens.
    """

    def __init__(self, hidsize: int, latent_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(hidsize) * hidsize ** -0.5)
        self.norm = nn.LayerNorm(hidsize)
        self.kv = nn.Linear(hidsize, 2 * hidsize)
        self.out = FanInLayer(hidsize, hidsize, conv=False, relu=True, norm="layer")
        self.dist = nn.Linear(hidsize, 2 * latent_dim)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        B, Tr, e = features.shape
        h = self.heads
        x = self.norm(features + _time_embedding(Tr, e, features))
        k, v = self.kv(x).view(B, Tr, 2, h, e // h).permute(2, 0, 3, 1, 4)  # each (B, h, Tr, e / h)
        q = self.query.view(1, h, 1, e // h).expand(B, h, 1, e // h)
        pooled = F.scaled_dot_product_attention(q, k, v).reshape(B, e)  # (B, h, 1, e / h) -> (B, e)
        return _gaussian(self.dist(self.out(pooled)))


class FrameEncoder(nn.Module):
    """First-frame features ``(B, hidsize)`` -> prior ``{mu, log_var}`` ``(B, D)`` (a two-layer MLP)."""

    def __init__(self, hidsize: int, latent_dim: int):
        super().__init__()
        self.hidden = FanInLayer(hidsize, hidsize, conv=False, relu=True, norm="layer")
        self.dist = nn.Linear(hidsize, 2 * latent_dim)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return _gaussian(self.dist(self.hidden(features)))


class GrootPolicy(nn.Module):
    """A latent-conditioned policy: reference video -> posterior over ``z``; first frame -> prior over ``z``;
    frames + ``z`` -> actions through a VPT-style recurrent transformer.

    Modules: ``img_process`` (VPT's IMPALA CNN + dense, shared by every frame: reference, first and window
    frames, as GROOT shares its backbone), ``video_encoder`` (posterior), ``prior_encoder`` (prior),
    ``condition`` (``z`` -> a ``hidsize`` vector added to every frame's features, GROOT's cross-attention
    to its goal tokens reduced to one vector), ``recurrent_layer`` (VPT's ``ResidualRecurrentBlocks``),
    ``lastlayer`` / ``final_ln`` (as ``VPTBody``), ``pi_head`` (a :class:`~mstudio.policy.DictActionHead` of
    VPT's ``CategoricalHead``) and ``value_head`` (a linear layer).

    ``condition`` starts with rows of norm 0.1: with the default ``nn.Linear`` initialization, the noise of
    ``z`` (std ~1 per dimension at first) moved each frame's features 8x more than the frames differ, and on
    :func:`~mstudio.data.synthetic.random_batch` data BC + KL stalled at the batch's marginal action
    entropy (``8 ln 32`` for the buttons of a 4x8 batch) instead of fitting the frames.

    **Latent sample.** ``z = mu + exp(log_var / 2) * eps`` of the posterior, with ``eps`` read from
    ``batch["latent_noise"]`` (float ``(B, D)``, e.g. :func:`with_latent_noise`); without that key ``z`` is
    the posterior mean (``eps = 0``; use this for evaluation and acting). The noise comes from the batch,
    not drawn inside ``forward``, so the policy stays a pure function of its inputs: the train step gives the
    same numbers eager and compiled, twice in a row, and under ``torch.func`` transforms, and it compiles
    into one graph (a global-RNG draw inside a compiled graph is neither reproducible against eager nor
    pure); the data pipeline draws ``eps`` from its own seeded generator.

    **Reference video.** ``batch["reference_image"]`` uint8 ``(B, Tr, H, W, 3)`` when given; otherwise the
    window's own ``image`` is the reference (GROOT encodes the demonstration it imitates). To act on an
    instruction video, pass it as ``reference_image``.

    **Memory** (``initial_state(B)``): VPT's, a flat tuple with per decoder layer ``mask`` bool
    ``(B, 1, memory_len)`` (False = empty slot) and ``K``, ``V`` in the parameters' dtype ``(B, memory_len,
    hidsize)``; every leaf is batch-first with a fixed shape, so the train step's memory carry resets rows
    with ``torch.where``. With the same ``z`` (same reference and noise), two calls over ``t`` frames with the
    state carried equal one call over ``2t`` frames.

    Args:
        config: the architecture; ``GrootConfig()`` (the default) is tiny.
    """

    def __init__(self, config: GrootConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else GrootConfig()
        if not isinstance(c, GrootConfig):
            raise TypeError(f"GrootPolicy: config must be a GrootConfig, got {type(c).__name__} {c!r}")
        self.img_process = ImgObsProcess((c.image_size, c.image_size, 3), c.impala_chans, c.hidsize, groups=None,
                                         dense_norm=None, post_pool_groups=None, first_conv_norm=False)
        self.video_encoder = VideoEncoder(c.hidsize, c.latent_dim, c.heads)
        self.prior_encoder = FrameEncoder(c.hidsize, c.latent_dim)
        self.condition = FanInLayer(c.latent_dim, c.hidsize, conv=False, relu=False, init_scale=0.1)
        self.pre_ln = nn.LayerNorm(c.hidsize)
        self.recurrent_layer = ResidualRecurrentBlocks(
            c.decoder_layers, c.hidsize, c.heads, c.memory_len, use_pointwise_layer=True,
            pointwise_ratio=c.pointwise_ratio, pointwise_use_activation=False, is_residual=True,
        )
        self.lastlayer = FanInLayer(c.hidsize, c.hidsize, conv=False, relu=True, norm="layer")
        self.final_ln = nn.LayerNorm(c.hidsize)
        self.pi_head = DictActionHead({
            "buttons": CategoricalHead(c.hidsize, N_BUTTONS, temperature=1.0),
            "camera": CategoricalHead(c.hidsize, N_CAMERA, temperature=1.0),
        })
        self.value_head = nn.Linear(c.hidsize, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        """Empty memory: per decoder layer ``(mask False (B, 1, memory_len), K zeros, V zeros (B, memory_len,
        hidsize))``, ``K`` / ``V`` in the parameters' dtype."""
        device = self.final_ln.weight.device
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in self.state_spec(batch_size))

    def state_spec(self, batch_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """``(shape, dtype)`` of each leaf of :meth:`initial_state` ``(batch_size)``, without allocating."""
        c = self.config
        mask = ((batch_size, 1, c.memory_len), torch.bool)
        kv = ((batch_size, c.memory_len, c.hidsize), self.final_ln.weight.dtype)
        return [mask, kv, kv] * c.decoder_layers

    def encode_frames(self, frames: Tensor) -> Tensor:
        """uint8 ``(B, N, H, W, 3)`` -> float ``(B, N, hidsize)`` in the parameters' dtype (frame by frame)."""
        B, N = frames.shape[:2]
        x = frames.reshape(B * N, *frames.shape[2:]).to(self.final_ln.weight.dtype) / 255.0
        return self.img_process(x).view(B, N, -1)

    def forward(self, batch: Mapping[str, Any], state_in: tuple[Tensor, ...] | list[Tensor]) -> tuple[dict, tuple]:
        """Args: ``batch["image"]`` uint8 ``(B, T, H, W, 3)``, ``H = W = image_size``; optional
        ``batch["reference_image"]`` uint8 ``(B, Tr, H, W, 3)`` (default: ``image``) and
        ``batch["latent_noise"]`` float ``(B, D)`` (default: zeros, i.e. ``z`` = posterior mean);
        ``state_in`` as :meth:`initial_state` returns.

        Returns: ``latents`` = ``{"pi_logits": {"buttons": float32 (B, T, 1, 8641), "camera": float32
        (B, T, 1, 121)}`` (log-softmax), ``"vpred"``: ``(B, T, 1)``, ``"posterior_dist"`` and ``"prior_dist"``:
        ``{"mu": (B, D), "log_var": (B, D)}``}`` (the parameters' dtype unless stated) and ``state_out`` like
        ``state_in``, after the window's last frame.
        """
        image, reference, noise = self._check_inputs(batch, state_in)
        features = self.encode_frames(image)  # (B, T, hidsize)
        reference_features = features if reference is None else self.encode_frames(reference)
        posterior = self.video_encoder(reference_features)
        prior = self.prior_encoder(features[:, 0])
        z = posterior["mu"]
        if noise is not None:
            z = z + torch.exp(0.5 * posterior["log_var"]) * noise.to(z.dtype)
        x = self.pre_ln(features + self.condition(z)[:, None])
        x, state_out = self.recurrent_layer(x, tuple(state_in))
        x = self.final_ln(self.lastlayer(F.relu(x)))
        latents = {
            "pi_logits": self.pi_head(x),
            "vpred": self.value_head(x),
            "posterior_dist": posterior,
            "prior_dist": prior,
        }
        return latents, state_out

    def _check_inputs(self, batch: Mapping[str, Any], state_in) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(image, reference_image or None, latent_noise or None)``, or a ``ValueError`` naming the key, what
        came and what is needed (shapes and dtypes are static: free under compile)."""
        c = self.config
        frame = (c.image_size, c.image_size, 3)
        if "image" not in batch:
            raise ValueError(f"GrootPolicy needs batch['image'] uint8 (B, T, {c.image_size}, {c.image_size}, 3); "
                             f"batch has {sorted(batch)}")
        image = batch["image"]
        _expect_frames(image, "image", frame, batch_size=None)
        B = image.shape[0]
        reference = batch.get(REFERENCE_KEY)
        if reference is not None:
            _expect_frames(reference, REFERENCE_KEY, frame, batch_size=B)
        noise = batch.get(NOISE_KEY)
        if noise is not None and (not isinstance(noise, Tensor) or not noise.is_floating_point()
                                  or tuple(noise.shape) != (B, c.latent_dim)):
            got = f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"GrootPolicy needs batch[{NOISE_KEY!r}] float {(B, c.latent_dim)} (one standard normal "
                             f"draw per row, see with_latent_noise), got {got}")
        expected = self.state_spec(B)
        if len(state_in) != len(expected):
            raise ValueError(f"GrootPolicy needs a state of {len(expected)} tensors (3 per decoder layer), got "
                             f"{len(state_in)}; use policy.initial_state(batch_size)")
        for i, (tensor, (shape, dtype)) in enumerate(zip(state_in, expected)):
            if tuple(tensor.shape) != shape or (tensor.dtype == torch.bool) != (dtype == torch.bool):
                raise ValueError(f"GrootPolicy state_in[{i}] must be {'bool' if dtype == torch.bool else 'float'} "
                                 f"{shape}, got {tensor.dtype} {tuple(tensor.shape)}; use policy.initial_state({B})")
        return image, reference, noise


def _expect_frames(frames: Any, key: str, frame: tuple[int, int, int], batch_size: int | None) -> None:
    """Raise ``ValueError`` unless ``frames`` is uint8 ``(B, N, *frame)`` with ``N >= 1`` (and ``B = batch_size``)."""
    ok = (isinstance(frames, Tensor) and frames.dtype == torch.uint8 and frames.dim() == 5
          and tuple(frames.shape[2:]) == frame and frames.shape[1] >= 1
          and (batch_size is None or frames.shape[0] == batch_size))
    if not ok:
        rows = "B" if batch_size is None else str(batch_size)
        got = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"GrootPolicy needs batch[{key!r}] uint8 ({rows}, N, {', '.join(map(str, frame))}) "
                         f"with N >= 1 frames, got {got}")


def with_latent_noise(batch: Mapping[str, Any], latent_dim: int, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``batch`` plus the reparametrization noise :class:`GrootPolicy` reads (the input is not modified).

    Draw a fresh one per training batch from a seeded generator: the step stays pure and reproducible.

    Args:
        batch: a batch with ``image`` uint8 ``(B, T, H, W, 3)``.
        latent_dim: ``D`` (``GrootConfig.latent_dim``).
        generator: a CPU ``torch.Generator`` (``None``: torch's global one).
        dtype: the noise's dtype (the policy casts it to the parameters' dtype).

    Returns:
        ``{**batch, "latent_noise": standard normal (B, D)}`` on ``image``'s device.
    """
    image = batch["image"]
    noise = torch.randn(image.shape[0], latent_dim, generator=generator, dtype=dtype)
    return {**batch, NOISE_KEY: noise.to(image.device)}
