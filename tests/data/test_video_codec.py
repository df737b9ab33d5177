"""The store's compressed-frame codec: round trips, colour, frame identity, independence, damage, settings."""

import zlib

import numpy as np
import pytest

from mstudio.data.contractor_synth import read_barcode
from mstudio.data.minestudio_synth import barcode_frames
from mstudio.data.video_codec import VideoCodec, decode_chunk, encode_chunk


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images, in float64 (independent of the benchmark's)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10.0 * np.log10(255.0**2 / mse))


def textured(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Minecraft-like texture scrolling one pixel a frame: 16-pixel blocks of grass/dirt/stone/sand colours made
    of 2-pixel texels of random brightness. uint8 ``(n, H, W, 3)``."""
    rng = np.random.default_rng(seed)
    palette = np.array([[95, 159, 53], [134, 96, 67], [125, 125, 125], [219, 207, 163]], np.float64)
    blocks = palette[rng.integers(0, len(palette), (height // 16 + 2, (width + n) // 16 + 2))]
    texels = np.repeat(np.repeat(blocks, 8, 0), 8, 1) * rng.uniform(0.8, 1.2, (*blocks.shape[:2], 1)).repeat(
        8, 0).repeat(8, 1) * rng.uniform(0.85, 1.15, (blocks.shape[0] * 8, blocks.shape[1] * 8, 1))
    texture = np.repeat(np.repeat(texels, 2, 0), 2, 1).clip(0, 255).astype(np.uint8)
    return np.stack([texture[:height, t:t + width] for t in range(n)])


# Bounds, from what these frames measure at the default CRF and preset (128x128, 64x64 and odd sizes): in yuv444p
# barcode 45-47 dB, texture 40.7-41.9 dB in 32-frame chunks and 36.3 dB for a lone (intra) frame; in yuv420p
# barcode 38.7-41 dB, texture 33.5-34.5 dB (half-resolution chroma). A frame one step off measures 19-22 dB and
# a colour path off by a matrix or range far below the bounds, so they fail on a real bug while leaving 2-4 dB
# of room for other x264 versions.
MIN_PSNR = {("barcode", "yuv444p"): 41.0, ("texture", "yuv444p"): 34.0,
            ("barcode", "yuv420p"): 35.0, ("texture", "yuv420p"): 30.0}


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv420p"])
@pytest.mark.parametrize("size", [(128, 128), (64, 64)])
def test_round_trip_keeps_count_shape_and_quality(size, pix_fmt):
    codec = VideoCodec(pix_fmt=pix_fmt)
    contents = {"barcode": barcode_frames(range(codec.chunk_frames), *size),
                "texture": textured(codec.chunk_frames, *size)}
    for name, frames in contents.items():
        out = decode_chunk(encode_chunk(frames, codec), len(frames), size)
        assert out.dtype == np.uint8 and out.shape == frames.shape
        assert psnr(out, frames) > MIN_PSNR[name, pix_fmt], name


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv420p"])
def test_flat_colours_keep_their_value_without_bias(pix_fmt):
    # Encoder and decoder must use the same YUV matrix and range: a mismatch shifts flat colours by 3-20 levels,
    # PyAV's default (inexact) conversion by ~1.2 levels on average. CRF 0 leaves only the conversion error.
    colours = np.random.default_rng(1).integers(0, 256, (32, 3)).astype(np.uint8)
    colours[:6] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]
    frames = np.ascontiguousarray(np.broadcast_to(colours[:, None, None], (32, 16, 16, 3)))
    for crf in (0, VideoCodec().crf):
        codec = VideoCodec(crf=crf, pix_fmt=pix_fmt)
        error = decode_chunk(encode_chunk(frames, codec), 32, (16, 16)).astype(np.float64) - frames
        assert np.abs(error).max() <= 2
        assert np.all(np.abs(error.mean(axis=(0, 1, 2))) < 0.25)


def test_barcodes_survive_so_frame_identity_is_checkable():
    # B-frames reorder frames inside the stream; the decoded order must still be the presentation order.
    indices = [5, 6, 7, 900, 901, 40000, 3, 3, 65535, 0, 12345, 2]
    frames = barcode_frames(indices, 64, 64)
    out = decode_chunk(encode_chunk(frames, VideoCodec(chunk_frames=16, gop=16)), len(indices), (64, 64))
    assert [read_barcode(frame) for frame in out] == indices


def test_each_chunk_decodes_on_its_own():
    codec = VideoCodec(chunk_frames=16, gop=8)
    frames = barcode_frames(range(40), 64, 64)
    chunks = [encode_chunk(frames[s:s + 16], codec) for s in range(0, 40, 16)]
    for start, chunk in reversed(list(zip(range(0, 40, 16), chunks))):
        n = min(16, 40 - start)
        assert [read_barcode(f) for f in decode_chunk(chunk, n, (64, 64))] == list(range(start, start + n))


def test_chunks_carry_no_encoder_banner():
    # libx264's SEI (version and options, ~670 bytes) is dropped: it is 20% of a barcode chunk and never needed
    chunk = _chunk()
    assert b"x264" not in chunk and b"options:" not in chunk
    assert [read_barcode(f) for f in decode_chunk(chunk, 8, (32, 32))] == list(range(8))


def test_one_frame_chunk():
    frames = textured(1, 128, 128)
    out = decode_chunk(encode_chunk(frames, VideoCodec()), 1, (128, 128))
    assert out.shape == (1, 128, 128, 3) and psnr(out, frames) > MIN_PSNR["texture", "yuv444p"]


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv420p"])
@pytest.mark.parametrize("size", [(63, 65), (64, 33), (1, 1)])
def test_odd_sizes_are_padded_and_cropped_back(size, pix_fmt):
    frames = textured(5, 72, 72)[:, :size[0], :size[1]]
    out = decode_chunk(encode_chunk(np.ascontiguousarray(frames), VideoCodec(pix_fmt=pix_fmt)), 5, size)
    assert out.shape == (5, *size, 3) and out.flags.c_contiguous
    if size != (1, 1):  # a single pixel has no texture to speak of; the shape is what matters there
        assert psnr(out, frames) > MIN_PSNR["texture", pix_fmt]


def _chunk() -> bytes:
    return encode_chunk(barcode_frames(range(8), 32, 32), VideoCodec())


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"", "does not start with"),
    (lambda b: b"RIFF" + b[4:], "does not start with"),
    (lambda b: b[:-7], "CRC-32 mismatch"),
    (lambda b: b[:40] + bytes([b[40] ^ 4]) + b[41:], "CRC-32 mismatch"),
    # well-formed header over a payload that is not H.264 at all
    (lambda b: b[:4] + zlib.crc32(b"\0" * 64).to_bytes(4, "big") + b"\0" * 64, "no frames|cannot be decoded"),
])
def test_damaged_bytes_raise(damage, message):
    with pytest.raises(ValueError, match=rf"^shard-3 episode 7: .*({message})"):
        decode_chunk(damage(_chunk()), 8, (32, 32), where="shard-3 episode 7")


def test_every_truncation_is_caught():
    # H.264 cannot tell: a stream cut inside its last frame decodes to the right count of wrong pixels with no
    # error and no damage flag (libavcodec 62, even with err_detect=explode). The header's checksum catches it.
    chunk = _chunk()
    for cut in range(len(chunk)):
        with pytest.raises(ValueError, match="CRC-32 mismatch|does not start with"):
            decode_chunk(chunk[:cut], 8, (32, 32))


@pytest.mark.parametrize("n_frames, size", [(7, (32, 32)), (9, (32, 32)), (8, (32, 30)), (8, (16, 16))])
def test_wrong_frame_count_or_size_raises(n_frames, size):
    with pytest.raises(ValueError, match=r"holds 8 frames of 32x32; expected"):
        decode_chunk(_chunk(), n_frames, size)


@pytest.mark.parametrize("frames, message", [
    (np.zeros((33, 16, 16, 3), np.uint8), "1 to 32 frames"),
    (np.zeros((0, 16, 16, 3), np.uint8), "1 to 32 frames"),
    (np.zeros((2, 16, 16, 3), np.float32), "uint8"),
    (np.zeros((2, 16, 16), np.uint8), "uint8"),
])
def test_encode_refuses_bad_frames(frames, message):
    with pytest.raises(ValueError, match=message):
        encode_chunk(frames, VideoCodec())


def test_settings_round_trip_through_json():
    codec = VideoCodec(crf=28, gop=16, preset="medium", chunk_frames=64)
    assert VideoCodec.from_json(codec.to_json(), "manifest.json") == codec
    assert set(VideoCodec().to_json()) == {"codec", "crf", "gop", "preset", "chunk_frames", "pix_fmt"}


@pytest.mark.parametrize("change, field", [
    ({"crf": 52}, "crf"), ({"crf": -1}, "crf"), ({"crf": "20"}, "crf"), ({"crf": True}, "crf"),
    ({"gop": 0}, "gop"), ({"gop": 33}, "gop"), ({"chunk_frames": 0}, "chunk_frames"),
    ({"chunk_frames": 2.0}, "chunk_frames"), ({"preset": "fastest"}, "preset"), ({"codec": "libx265"}, "codec"),
    ({"pix_fmt": "rgb24"}, "pix_fmt"),
    ({"colour": "bt709"}, "colour"),
])
def test_from_json_refuses_bad_settings_naming_the_field(change, field):
    value = {**VideoCodec(chunk_frames=32, gop=32).to_json(), **change}
    with pytest.raises(ValueError, match=rf"^store/manifest.json: .*'{field}'"):
        VideoCodec.from_json(value, "store/manifest.json")


@pytest.mark.parametrize("value", [None, [], "libx264"])
def test_from_json_refuses_non_objects(value):
    with pytest.raises(ValueError, match="store/manifest.json: video codec settings must be a JSON object"):
        VideoCodec.from_json(value, "store/manifest.json")


def test_from_json_refuses_a_missing_field():
    value = VideoCodec().to_json()
    del value["gop"]
    with pytest.raises(ValueError, match="'gop' is missing"):
        VideoCodec.from_json(value, "store/manifest.json")


def test_constructor_validates():
    with pytest.raises(ValueError, match="'gop' must be in"):
        VideoCodec(chunk_frames=16, gop=32)
