"""Compressed frames for the episode store: runs of RGB frames as self-contained H.264 chunks.

A chunk is ``b"MSV1"`` + CRC-32 of the payload (4 bytes, big-endian) + a raw H.264 Annex-B stream made by
libx264 on one thread, BT.601 limited range (tagged in the stream's VUI too). Each chunk is a new encoder run,
so it starts with an IDR frame and decodes on its own, from memory, with no container index.
:func:`encode_chunk` and :func:`decode_chunk` are the store's API; :func:`encode_frames` and
:func:`decode_frames` are the PyAV plumbing they share with the MineStudio synth and importer.

Fixed choices (measured by ``benchmarks/bench_codec.py``, numbers in ``benchmarks/results/latest/codec.md``):

- **Container**: raw Annex-B. At 32-frame chunks MP4 costs 35-37 more bytes per frame (+2% on the blockworld
  content, +8% on Crafter, +40% on barcodes), Matroska 24-25, and neither decodes faster. libx264's SEI unit
  (its version and options, ~670 bytes a chunk, 21 bytes a frame) is dropped too. Raw H.264 has no
  checksum, and H.264 conceals damage: a stream cut inside its last frame decodes to the right number of wrong
  frames without any error. So the header's CRC-32 turns any damaged byte into a ``ValueError``, and
  :func:`decode_chunk` checks the frame count and size.
- **Colour**: both conversions use an explicit BT.601 limited-range matrix with swscale's ``ACCURATE_RND |
  FULL_CHR_H_INT``. In yuv420p, PyAV's default conversion darkens flat colours by ~1.2 levels on average (up
  to 3); this one has no bias (<0.1 level) and errs by at most 2. In yuv444p both agree and cost the same.
- **Odd sizes**: yuv420p needs even height and width, so :func:`encode_chunk` pads odd frames (both pixel
  formats, one rule) by repeating the last row/column and :func:`decode_chunk` crops back to ``image_size``.
- **Threads**: one decoder thread and one swscale thread. The loader's workers are the parallelism; a threaded
  decoder inside each worker would oversubscribe the cores.
- **B-frames on** (libx264's default, 3): off costs 0-15% more bytes and decodes no faster.
- **GOP = chunk**: a chunk is always decoded whole from its first frame, so more keyframes only cost bytes
  (GOP 8 in a 32-frame chunk: +12% on blockworld, +100% on Crafter).

Defaults, chosen from the measurements (128x128, libx264 core 165, frames/s per core; the contents are
described in ``bench_codec.py``: ``blockworld`` is a first-person walk over mipmapped 16x16-texel block
textures rendered at 640x360 and resized as the importers do, ``crafter`` is the Crafter game's 2D pixel art):

- **yuv444p**, not yuv420p: at 128x128, half-resolution chroma blurs the colour edges of block textures and
  pixel art. At the same bytes yuv444p is 1.3-2.4 dB better on blockworld and 4.5-8 dB on Crafter, where
  yuv420p stays under 27.7 dB at any CRF; it decodes about as fast. libx264rgb (RGB planes coded directly) is ~2 dB
  better than yuv444p on Crafter at equal bytes but 1.3-1.6 dB worse on blockworld, and decodes slower there.
- **CRF 18**: blockworld 3.2 KB/frame (15x smaller than raw), 32.9 dB, 1.6k frames/s decoded; Crafter
  0.73 KB/frame (67x), 36.2 dB, 3.0k frames/s. Each step of 5-6 in CRF divides the bytes by 1.6-2.7 for
  2.7-5 dB, with no knee, so the choice is a budget: the sources are lossy already (MineStudio stores CRF 23
  chunks) and CRF 18 adds little to that, while 160M frames of blockworld-like content still fit in ~0.5 TB
  instead of 7.9 TB raw. CRF 23 saves 37-50% of the bytes for -3.2 to -4 dB and decodes 9-38% faster.
- **preset medium**: at equal PSNR 15% (blockworld) to 29% (Crafter) fewer bytes than veryfast, decoding
  about as fast; it encodes 1.7-2.8x slower (320-870 frames/s per core at 128x128), a one-off cost at import.
  ultrafast is larger at equal quality (no CABAC, no B-frames).
- **chunk 32** (MineStudio's too): a random 128-frame window decodes 1.24 frames per frame it uses (64: 1.49,
  128: 1.99, 16: 1.12). 64-frame chunks would save 0.2% (blockworld) to 12% (Crafter) of the bytes at the
  cost of 17% of the window throughput; 16-frame chunks cost 1.5% to 27% more bytes for 11% more.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation

__all__ = ["PIX_FMTS", "PRESETS", "VideoCodec", "decode_chunk", "decode_frames", "encode_chunk", "encode_frames"]

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
"""libx264's speed presets, fastest (largest files) first."""

_CODECS = ("libx264",)  # the raw Annex-B payload below is H.264; another codec needs another muxer
PIX_FMTS = ("yuv444p", "yuv420p")
_MAGIC = b"MSV1"
_HEADER = len(_MAGIC) + 4
_CONTAINER = "h264"
_FPS = 20  # only a time base: a raw stream stores no timestamps
_ACCURATE = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
_TO_YUV = {"dst_colorspace": Colorspace.ITU601, "dst_color_range": ColorRange.MPEG, "interpolation": _ACCURATE,
           "threads": 1}
_TO_RGB = {"src_colorspace": Colorspace.ITU601, "src_color_range": ColorRange.MPEG, "interpolation": _ACCURATE,
           "threads": 1}


@dataclass(frozen=True)
class VideoCodec:
    """Settings of a store's compressed frames; recorded in the store's manifest (:meth:`to_json`).

    The defaults and their reasons are in this module's docstring; the numbers behind them come from
    ``benchmarks/bench_codec.py``.
    """

    codec: str = "libx264"
    """A PyAV encoder name; only ``libx264`` is supported (the chunk payload is raw H.264)."""
    crf: int = 18
    """libx264 constant rate factor, 0 (lossless) to 51: lower keeps more detail and costs more bytes."""
    gop: int = 32
    """Keyframe interval in frames, at most ``chunk_frames`` (every chunk starts with a keyframe anyway)."""
    preset: str = "medium"
    """libx264 preset (:data:`PRESETS`): slower presets give fewer bytes at the same quality."""
    chunk_frames: int = 32
    """Frames per chunk; a chunk is the unit the store reads and decodes."""
    pix_fmt: str = "yuv444p"
    """Encoded pixel format (:data:`PIX_FMTS`): ``yuv420p`` halves the chroma's height and width."""

    def __post_init__(self):
        problem = _first_problem(asdict(self))
        if problem:
            raise ValueError(f"VideoCodec {problem}")

    def to_json(self) -> dict:
        """The settings as a JSON object (every field, so a store never depends on today's defaults)."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any, where: str) -> "VideoCodec":
        """The settings :meth:`to_json` wrote; ``where`` (e.g. the manifest's path) prefixes every error.

        Raises:
            ValueError: ``value`` is not an object with exactly the fields of :class:`VideoCodec`, or a field is
                out of range; the message names ``where`` and the field.
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: video codec settings must be a JSON object; found {type(value).__name__}")
        names = [f.name for f in fields(cls)]
        for name in value:
            if name not in names:
                raise ValueError(f"{where}: unknown video codec field {name!r} (known: {', '.join(names)})")
        for name in names:
            if name not in value:
                raise ValueError(f"{where}: video codec field {name!r} is missing")
        problem = _first_problem(value)
        if problem:
            raise ValueError(f"{where}: video codec {problem}")
        return cls(**{name: value[name] for name in names})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # numpy ints would not serialize to JSON


def _first_problem(settings: Mapping[str, Any]) -> str | None:
    """``"field 'name' <problem>"`` for the first invalid field of ``settings`` (chunk_frames first, since
    gop's bound depends on it), or ``None``."""
    problem = _problem("chunk_frames", settings["chunk_frames"], None)
    if problem:
        return f"field 'chunk_frames' {problem}"
    for name in ("codec", "crf", "gop", "preset", "pix_fmt"):
        problem = _problem(name, settings[name], settings["chunk_frames"])
        if problem:
            return f"field {name!r} {problem}"
    return None


def _problem(name: str, value: Any, chunk_frames: int | None) -> str | None:
    """Why ``value`` is not a valid ``name`` field (``None`` if it is)."""
    if name in ("codec", "preset", "pix_fmt"):
        allowed = {"codec": _CODECS, "preset": PRESETS, "pix_fmt": PIX_FMTS}[name]
        return None if value in allowed else f"must be one of {', '.join(allowed)}; found {value!r}"
    if not _is_int(value):
        return f"must be an int; found {value!r}"
    low, high = {"crf": (0, 51), "gop": (1, chunk_frames), "chunk_frames": (1, None)}[name]
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        suffix = " (chunk_frames)" if name == "gop" else ""
        return f"must be {bound}{suffix}; found {value}"
    return None


def encode_frames(frames: np.ndarray, *, container: str, codec: str = "libx264",
                  options: Mapping[str, str] | None = None, gop: int | None = None, rate: int = _FPS,
                  pix_fmt: str = "yuv420p", to_yuv: Mapping[str, Any] | None = None) -> bytes:
    """Encode RGB frames as one in-memory video, on one encoder thread.

    The bytes are not always reproducible: with decodes running in between, libx264's output for the same frames
    varied between calls in one process (seen at 32x32, 64x66 and 224x224, not at 48, 64 or 128 square; the
    cause was not found). Each output decodes correctly; do not compare chunks by their bytes.

    Args:
        frames: uint8 ``(n, H, W, 3)`` RGB, H and W even.
        container: a PyAV output format (``"mp4"``, ``"h264"`` for raw Annex-B, ...).
        codec: a PyAV encoder name.
        options: encoder options (e.g. ``{"crf": "20", "preset": "veryfast"}``); ``None`` for its defaults.
        gop: keyframe interval, or ``None`` for the encoder's default.
        rate: frames per second (the time base).
        pix_fmt: the encoded pixel format (``"yuv420p"``: chroma at half height and width).
        to_yuv: keyword arguments of :meth:`av.VideoFrame.reformat` for the RGB -> ``pix_fmt`` conversion, whose
            ``dst_colorspace``/``dst_color_range`` are also tagged on the stream; ``None`` lets PyAV convert
            with its defaults.

    Returns:
        The container's bytes.
    """
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        context = stream.codec_context
        context.thread_count = 1
        if gop is not None:
            context.gop_size = gop
        if to_yuv is not None:
            context.colorspace = to_yuv["dst_colorspace"]
            context.color_range = to_yuv["dst_color_range"]
        if options:
            stream.options = dict(options)
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if to_yuv is not None:
                picture = picture.reformat(format=pix_fmt, **to_yuv)
            for packet in stream.encode(picture):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def decode_frames(data: bytes, where: str, *, container: str | None = None, threads: int = 0,
                  to_rgb: Mapping[str, Any] | None = None) -> np.ndarray:
    """Decode the first video stream of an in-memory video to RGB, in presentation order.

    Args:
        data: the video's bytes.
        where: names the video in error messages.
        container: a PyAV input format, or ``None`` to probe it.
        threads: decoder threads (``0``: FFmpeg picks, frame and slice threading).
        to_rgb: keyword arguments of :meth:`av.VideoFrame.to_ndarray` for the YUV -> RGB conversion;
            ``None`` for PyAV's defaults.

    Returns:
        uint8 ``(n, H, W, 3)``.

    Raises:
        ValueError: the bytes are not a video, a frame is damaged (the decoder concealed an error), the video
            holds no frames, or its frames change size.
    """
    try:
        with av.open(io.BytesIO(data), "r", format=container) as source:
            if not source.streams.video:
                raise ValueError(f"{where}: the chunk has no video stream")
            stream = source.streams.video[0]
            if threads:
                stream.codec_context.thread_count = threads
            else:
                stream.thread_type = "AUTO"
            pictures = list(source.decode(stream))
            if any(picture.is_corrupt for picture in pictures):
                raise ValueError(f"{where}: the video chunk has damaged frames")
            frames = [picture.to_ndarray(format="rgb24", **(to_rgb or {})) for picture in pictures]
    except (av.FFmpegError, OSError, EOFError) as error:
        raise ValueError(f"{where}: the video chunk cannot be decoded ({type(error).__name__}: {error})") from None
    if not frames:
        raise ValueError(f"{where}: the video chunk holds no frames")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"{where}: the video chunk's frames change size ({sorted({f.shape for f in frames})})")
    return np.stack(frames)


def encode_chunk(frames: np.ndarray, codec: VideoCodec) -> bytes:
    """One self-contained chunk (header + raw H.264 starting with a keyframe) of ``frames``.

    Args:
        frames: uint8 ``(n, H, W, 3)`` RGB, ``1 <= n <= codec.chunk_frames``; odd H or W is padded by repeating
            the last row/column (yuv420p needs even sizes) and cropped again by :func:`decode_chunk`.
        codec: the store's settings.

    Returns:
        The chunk's bytes, for :func:`decode_chunk`.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        found = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"encode_chunk: frames must be uint8 (n, H, W, 3) RGB; found {found}")
    if not 1 <= len(frames) <= codec.chunk_frames:
        raise ValueError(f"encode_chunk: a chunk holds 1 to {codec.chunk_frames} frames (chunk_frames); "
                         f"found {len(frames)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    options = {"crf": str(codec.crf), "preset": codec.preset}
    payload = _drop_sei(encode_frames(frames, container=_CONTAINER, codec=codec.codec, options=options,
                                      gop=codec.gop, pix_fmt=codec.pix_fmt, to_yuv=_TO_YUV))
    return _MAGIC + zlib.crc32(payload).to_bytes(4, "big") + payload


def _drop_sei(stream: bytes) -> bytes:
    """An Annex-B stream without its SEI units (NAL type 6): libx264 writes its version and every option there,
    ~670 bytes a chunk, and decoding never needs them. Emulation prevention keeps ``00 00 01`` out of NAL
    payloads, so splitting at it is exact."""
    starts = [m.start() for m in re.finditer(b"\x00\x00\x01", stream)]
    units = [stream[a:b] for a, b in zip([0, *starts], [*starts, len(stream)])]
    return b"".join(unit for unit in units if not (len(unit) > 3 and unit[:3] == b"\0\0\x01" and unit[3] & 0x1F == 6))


def decode_chunk(data: bytes, n_frames: int, image_size: tuple[int, int], *, where: str = "video chunk") -> np.ndarray:
    """Decode a chunk made by :func:`encode_chunk`, on one thread.

    Args:
        data: the chunk's bytes.
        n_frames: how many frames the chunk must hold.
        image_size: ``(H, W)`` the frames must have (before :func:`encode_chunk` padded odd sizes).
        where: names the chunk in error messages (e.g. the shard and episode).

    Returns:
        uint8 ``(n_frames, H, W, 3)`` RGB.

    Raises:
        ValueError: the bytes are not such a chunk, are damaged (checksum), or do not decode to exactly
            ``n_frames`` frames of ``image_size``.
    """
    height, width = image_size
    if len(data) < _HEADER or data[:len(_MAGIC)] != _MAGIC:
        raise ValueError(f"{where}: not a compressed frame chunk (it does not start with {_MAGIC!r})")
    payload = memoryview(data)[_HEADER:]
    if zlib.crc32(payload).to_bytes(4, "big") != data[len(_MAGIC):_HEADER]:
        raise ValueError(f"{where}: the chunk's bytes are damaged (CRC-32 mismatch over {len(payload)} bytes)")
    frames = decode_frames(bytes(payload), where, container=_CONTAINER, threads=1, to_rgb=_TO_RGB)
    padded = (height + height % 2, width + width % 2)
    if len(frames) != n_frames or frames.shape[1:3] != padded:
        raise ValueError(f"{where}: the chunk holds {len(frames)} frames of {frames.shape[1]}x{frames.shape[2]}; "
                         f"expected {n_frames} of {padded[0]}x{padded[1]} (image_size {height}x{width})")
    return np.ascontiguousarray(frames[:, :height, :width])
