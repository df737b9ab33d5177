"""The store's compressed-frame codec, measured: bytes/frame, PSNR, encode and one-core decode frames/s.

For each content (below) at ``--sizes`` (default 128 and 64), encodes ``--frames`` frames in chunks with
:func:`mstudio.data.video_codec.encode_chunk` and decodes them with :func:`decode_chunk` (one decoder thread,
one swscale thread, in this process: decode frames/s is per core). Grids, trimmed to run in minutes:

- quality: chunk 32, CRF {12, 18, 23, 28} x preset {ultrafast, veryfast, medium} in yuv444p, and the CRFs at
  veryfast in yuv420p (half-resolution chroma);
- colour, first size only: the CRFs at veryfast with libx264rgb (H.264 coding the RGB planes directly);
- chunk length, first size only: chunk {16, 64, 128} at CRF {18, 23}, veryfast (gop = chunk);
- variants at chunk 32, CRF 23, veryfast, first size only: the container (raw H.264 without the chunk header and
  with libx264's SEI banner, MP4, Matroska), B-frames off, GOP 8 inside a chunk, PyAV's default colour conversion (yuv444p and yuv420p).

Contents (``--contents``): ``blockworld`` (a first-person blocky world rendered here at 640x360 and resized to the
store size as the importers do: textured ground of 16x16-texel blocks in grass/dirt/stone/sand/water/ore
palettes, mipmapped as Minecraft does, sky, fog, a static hotbar; the camera walks forward and turns, with
occasional fast turns), ``crafter``
(the Crafter game's own pixel-art renderer, 2D top-down, random sticky actions; needs ``pip install crafter``),
``barcode`` (``minestudio_synth.barcode_frames``: a smooth wave under a barcode, unrealistically compressible).
PSNR is over all pixels and channels, from the float64 MSE of all frames against the raw frames.
A random T-frame window (``--window``) must decode every chunk it touches from the chunk's start, so it decodes
``E[chunks touched] * chunk / T`` frames per frame used; ``window fps`` is decode fps divided by that.
Rates are frames per CPU-second of this process (encoder, decoder and swscale all run on one thread, so that is
per core and mostly immune to other processes' load), best of ``--repeats`` runs; the load average is recorded.

    python benchmarks/bench_codec.py                   # benchmarks/results/latest/codec.{json,md}
    python benchmarks/bench_codec.py --update-results  # the committed benchmarks/results/...
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import time
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from bench_step import add_results_argument, command_line, header, machine, write_results
from mstudio.data.contractor_import import resize
from mstudio.data import video_codec
from mstudio.data.minestudio_synth import barcode_frames
from mstudio.data.video_codec import (_FPS, _TO_RGB, _TO_YUV, VideoCodec, decode_chunk, decode_frames, encode_chunk,
                                      encode_frames)

BASELINE = "raw uint8 frames: H*W*3 bytes/frame, PSNR infinite; ratios are against that size"
CRFS, PRESETS = (12, 18, 23, 28), ("ultrafast", "veryfast", "medium")
VARIANTS = [("raw h264 as x264 writes it", {}), ("mp4", {"container": "mp4"}), ("matroska", {"container": "matroska"}),
            ("no B-frames", {"options": {"bf": "0"}}), ("gop 8", {"gop": 8}),
            ("PyAV default colour", {"accurate": False}),
            ("PyAV default colour", {"accurate": False, "pix_fmt": "yuv420p"})]


# --- content ---------------------------------------------------------------------------------------------------

_PALETTES = np.array([[95, 159, 53], [134, 96, 67], [125, 125, 125], [219, 207, 163], [63, 118, 228],
                      [112, 112, 112]], np.float64)  # grass, dirt, stone, sand, water, stone with ore
_SKY, _HORIZON = np.array([120, 167, 255], np.float64), np.array([192, 216, 255], np.float64)


def _hash(*ints: np.ndarray) -> np.ndarray:
    """Deterministic uniform [0, 1) per integer tuple (a multiplicative integer hash)."""
    h = np.zeros(np.broadcast(*ints).shape, np.uint64)
    with np.errstate(over="ignore"):  # uint64 products wrap around on purpose
        for k, i in enumerate(ints):
            h ^= (np.asarray(i, np.int64).astype(np.uint64) + np.uint64(k + 1)) * np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    return ((h >> np.uint64(40)).astype(np.float64)) / float(1 << 24)


def blockworld(n: int, size: int) -> np.ndarray:
    """``n`` frames of a first-person walk over a textured block floor: uint8 ``(n, size, size, 3)``."""
    return resize(_render_blockworld(n), size)


@functools.lru_cache(maxsize=1)  # rendered once for all sizes
def _render_blockworld(n: int, seed: int = 0) -> np.ndarray:
    """The walk at the contractor videos' 640x360: uint8 ``(n, 360, 640, 3)``."""
    rng = np.random.default_rng(seed)
    height, width, fov = 360, 640, math.radians(70)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    u = (u - width / 2 + 0.5) / (width / 2) * math.tan(fov / 2)
    v = (height / 2 - v - 0.5) / (width / 2) * math.tan(fov / 2)
    pixel = 2 * math.tan(fov / 2) / width  # a pixel's width on the image plane at distance 1
    yaw_rate = np.repeat(rng.normal(0, 2.0, n // 8 + 1), 8)[:n]  # degrees/frame, turns held for 8 frames
    yaw_rate[rng.random(n) < 0.04] += rng.choice([-1, 1]) * rng.uniform(10, 30)  # a quick look around
    yaw = np.radians(np.cumsum(yaw_rate))
    pitch = np.radians(-20 + 8 * np.sin(np.arange(n) / 23.0))
    position = np.zeros(2)
    frames = np.empty((n, height, width, 3), np.uint8)
    hotbar = np.zeros((height, width), bool)
    hotbar[height - 44:height - 4, 140:500] = True
    hotbar[height - 40:height - 8, 144:496] = False
    for t in range(n):
        position += 0.2 * np.array([math.sin(yaw[t]), math.cos(yaw[t])])  # walking, 4.3 blocks/s at 20 fps
        cp, sp, cy, sy = math.cos(pitch[t]), math.sin(pitch[t]), math.cos(yaw[t]), math.sin(yaw[t])
        dy = v * cp + sp  # ray direction, camera looking down by -pitch
        forward = cp - v * sp
        dx, dz = u * cy + forward * sy, -u * sy + forward * cy
        ground = dy < -1e-3
        depth = np.where(ground, 1.62 / np.maximum(-dy, 1e-3), 1e3)
        x, z = position[0] + dx * depth, position[1] + dz * depth
        bx, bz = np.floor(x).astype(np.int64), np.floor(z).astype(np.int64)
        tx, tz = np.floor((x - bx) * 16).astype(np.int64), np.floor((z - bz) * 16).astype(np.int64)
        biome = (_hash(bx // 6, bz // 6) * 5).astype(np.int64)  # patches of one material
        kind = np.where((biome == 2) & (_hash(bx, bz) < 0.15), 5, biome)
        # mipmapping, as Minecraft does: detail finer than a pixel's footprint fades to its mean
        footprint = 16 * depth * pixel * np.sqrt(u**2 + dy**2 + forward**2) / np.maximum(-dy, 1e-3)  # texels
        detail = np.clip(1 / footprint, 0, 1)
        texel = 0.98 + detail * 0.4 * (_hash(bx, bz, tx, tz) - 0.5)
        colour = _PALETTES[kind] * texel[..., None]
        ore = (kind == 5) & (_hash(bx, bz, tx // 3, tz // 3, 7) < 0.2)  # diamond-like specks of 3x3 texels
        speck = np.clip(3 / footprint, 0, 1)[ore][:, None]
        colour[ore] = colour[ore] * (1 - speck) + np.array([92, 219, 213]) * speck
        fog = np.exp(-depth / 40.0)[..., None]
        sky = _HORIZON + (_SKY - _HORIZON) * np.clip(dy / 0.6, 0, 1)[..., None]
        image = np.where(ground[..., None], colour * fog + _HORIZON * (1 - fog), sky)
        image[hotbar] = 60
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def crafter_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` frames of the Crafter game (random actions held 1-6 steps, moves favoured): ``(n, size, size, 3)``."""
    import crafter  # optional: only this content needs it

    np.random.seed(seed)  # Crafter also draws from numpy's global generator; without this runs differ
    env, rng = crafter.Env(size=(size, size), seed=seed), np.random.default_rng(seed)
    frames, action, hold = [env.reset()], 0, 0
    while len(frames) < n:
        if hold == 0:
            action, hold = (int(rng.integers(1, 5)) if rng.random() < 0.7 else int(rng.integers(0, 17))), int(
                rng.integers(1, 7))
        observation, _, done, _ = env.step(action)
        hold -= 1
        frames.append(env.reset() if done else observation)
    return np.stack(frames)


CONTENTS: dict[str, Callable[[int, int], np.ndarray]] = {
    "blockworld": blockworld, "crafter": crafter_frames,
    "barcode": lambda n, size: barcode_frames(range(n), size, size)}


# --- measurement -----------------------------------------------------------------------------------------------

def psnr(decoded: np.ndarray, raw: np.ndarray) -> float:
    """PSNR in dB over all frames, pixels and channels, from the float64 mean squared error."""
    mse = np.mean((decoded.astype(np.float64) - raw.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def window_cost(chunk: int, window: int) -> float:
    """Frames decoded per frame used by a window of ``window`` frames at a uniformly random offset."""
    touched = [math.ceil((offset + window) / chunk) for offset in range(chunk)]
    return float(np.mean(touched)) * chunk / window


def best_time(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The least CPU time of this process over ``repeats`` calls of ``run`` (one thread works, so CPU seconds
    are seconds of one core, and other processes' load does not count), and ``run``'s result."""
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.process_time()
        out = run()
        best = min(best, time.process_time() - start)
    return best, out


def measure(frames: np.ndarray, chunk: int, encode: Callable[[np.ndarray], bytes],
            decode: Callable[[bytes, int], np.ndarray], repeats: int) -> dict:
    """Encode ``frames`` in ``chunk``-frame chunks and decode them back; sizes, PSNR and rates."""
    starts = range(0, len(frames), chunk)
    encode_s, chunks = best_time(lambda: [encode(frames[s:s + chunk]) for s in starts], repeats)
    decode_s, decoded = best_time(
        lambda: [decode(c, min(chunk, len(frames) - s)) for s, c in zip(starts, chunks)], repeats)
    decoded = np.concatenate(decoded)
    assert decoded.shape == frames.shape, (decoded.shape, frames.shape)
    n = len(frames)
    return {"bytes_per_frame": sum(map(len, chunks)) / n, "psnr_db": psnr(decoded, frames),
            "encode_fps": n / encode_s, "decode_fps": n / decode_s}


def grid(full: bool) -> list[dict]:
    """The settings to measure (see the module docstring); ``full`` adds all but the CRF x preset x colour grid."""
    base = {"variant": "chunk format", "chunk": 32, "crf": 23, "preset": "veryfast", "pix_fmt": "yuv444p"}
    rows = [{**base, "crf": crf, "preset": preset} for preset in PRESETS for crf in CRFS]
    rows += [{**base, "crf": crf, "pix_fmt": "yuv420p"} for crf in CRFS]
    if full:
        rows += [{**base, "variant": "libx264rgb", "crf": crf, "pix_fmt": "rgb24"} for crf in CRFS]
        rows += [{**base, "chunk": chunk, "crf": crf} for chunk in (16, 64, 128) for crf in (18, 23)]
        rows += [{**base, "variant": name, **change} for name, change in VARIANTS]
    return rows


def measure_setting(frames: np.ndarray, setting: dict, repeats: int, window: int) -> dict:
    """One row: ``setting`` through the chunk format (``encode_chunk``/``decode_chunk``), or for the other
    variants through the shared helpers they are built on, changed as the variant says."""
    chunk, size = setting["chunk"], frames.shape[1:3]
    if setting["variant"] == "chunk format":
        codec = VideoCodec(crf=setting["crf"], preset=setting["preset"], chunk_frames=chunk, gop=chunk,
                           pix_fmt=setting["pix_fmt"])
        row = measure(frames, chunk, lambda f: encode_chunk(f, codec), lambda b, n: decode_chunk(b, n, size),
                      repeats)
    else:
        container, rgb = setting.get("container", "h264"), setting["pix_fmt"] == "rgb24"
        accurate = setting.get("accurate", True) and not rgb  # libx264rgb codes RGB: no YUV conversion
        options = {"crf": str(setting["crf"]), "preset": setting["preset"], **setting.get("options", {})}

        def encode(f: np.ndarray) -> bytes:
            return encode_frames(f, container=container, codec="libx264rgb" if rgb else "libx264", options=options,
                                 gop=setting.get("gop", chunk), rate=_FPS, pix_fmt=setting["pix_fmt"],
                                 to_yuv=_TO_YUV if accurate else None)

        def decode(data: bytes, n: int) -> np.ndarray:
            return decode_frames(data, setting["variant"], container=container, threads=1,
                                 to_rgb=_TO_RGB if accurate else {"threads": 1})
        row = measure(frames, chunk, encode, decode, repeats)
    row = {**setting, **row, "window_cost": window_cost(chunk, window)}
    row["window_fps"] = row["decode_fps"] / row["window_cost"]
    return row


# --- report ----------------------------------------------------------------------------------------------------

def table(rows: list[dict], raw_bytes: int) -> list[str]:
    lines = ["| variant | pixels | chunk | CRF | preset | bytes/frame | x smaller than raw | PSNR dB | encode f/s | "
             "decode f/s (1 core) | window frames decoded/used | window f/s |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['pix_fmt']} | {r['chunk']} | {r['crf']} | {r['preset']} | "
                     f"{r['bytes_per_frame']:,.0f} | "
                     f"{raw_bytes / r['bytes_per_frame']:,.0f} | {r['psnr_db']:.2f} | {r['encode_fps']:,.0f} | "
                     f"{r['decode_fps']:,.0f} | {r['window_cost']:.2f} | {r['window_fps']:,.0f} |")
    return lines


def summary(results: list[dict]) -> list[str]:
    """The rows at :class:`VideoCodec`'s defaults and at one change each, per content and size, then the
    reasons for the defaults (the last section of ``video_codec``'s docstring)."""
    chosen = VideoCodec()
    base = {"variant": "chunk format", "pix_fmt": chosen.pix_fmt, "crf": chosen.crf, "preset": chosen.preset,
            "chunk": chosen.chunk_frames}
    picks = {"defaults": base, "CRF 23": {**base, "crf": 23}, "veryfast": {**base, "preset": "veryfast"},
             "yuv420p, veryfast": {**base, "pix_fmt": "yuv420p", "preset": "veryfast"}}
    lines = [f"## At the defaults ({', '.join(f'{k}={v}' for k, v in chosen.to_json().items())}) and one change",
             "", "| content | size | setting | bytes/frame | PSNR dB | encode f/s | decode f/s (1 core) | window f/s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        for name, pick in picks.items():
            for r in result["rows"]:
                if all(r.get(k) == v for k, v in pick.items()):
                    lines.append(f"| {result['content']} | {result['size']} | {name} | {r['bytes_per_frame']:,.0f} | "
                                 f"{r['psnr_db']:.2f} | {r['encode_fps']:,.0f} | {r['decode_fps']:,.0f} | "
                                 f"{r['window_fps']:,.0f} |")
                    break
    doc = video_codec.__doc__
    return lines + ["", "## Why these defaults (from `mstudio/data/video_codec.py`)", "",
                    doc[doc.index("Defaults, chosen"):].strip(), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    available = [c for c in CONTENTS if c != "crafter" or importlib.util.find_spec("crafter") is not None]
    parser.add_argument("--contents", nargs="+", default=available, choices=list(CONTENTS),
                        help="default: all whose packages are installed (crafter needs `pip install crafter`)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 64])
    parser.add_argument("--frames", type=int, default=256, help="frames per content (a multiple of 128)")
    parser.add_argument("--window", type=int, default=128, help="T of the random training window")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best taken)")
    parser.add_argument("--quick", action="store_true", help="only the quality grid at the first size")
    add_results_argument(parser)
    args = parser.parse_args()
    info, command = machine(), command_line()
    load_before = os.getloadavg()
    results, lines = [], []
    for size in args.sizes[:1] if args.quick else args.sizes:
        for content in args.contents:
            frames = CONTENTS[content](args.frames, size)
            full = not args.quick and size == args.sizes[0]
            rows = [measure_setting(frames, setting, args.repeats, args.window)
                    for setting in tqdm(grid(full), desc=f"{content} {size}x{size}", leave=False)]
            results.append({"content": content, "size": size, "frames": len(frames), "rows": rows})
            lines += [f"## {content}, {size}x{size}, {len(frames)} frames", ""]
            lines += table(rows, size * size * 3) + [""]
    lines = summary(results) + lines
    load_after = os.getloadavg()
    report = {"machine": info, "command": command, "baseline": BASELINE, "args": vars(args),
              "decoder_threads": 1, "swscale_threads": 1, "load_average_before": load_before,
              "load_average_after": load_after, "results": results}
    title = "Compressed frame chunks (libx264 via PyAV): size, quality, one-core speed"
    notes = [f"- Encoding and decoding: one codec thread and one swscale thread, in-process (torch threads: "
             f"{info['torch_threads']}, unused here). Rates are frames per CPU-second (process time), best of "
             f"{args.repeats} runs per setting.",
             f"- Load average (1/5/15 min) before {tuple(round(x, 2) for x in load_before)}, after "
             f"{tuple(round(x, 2) for x in load_after)} on {info['cpus_total']} CPUs: the machine is shared, "
             "so rates are noisy; compare rows, not runs.", ""]
    write_results("codec", report, header(title, info, command, BASELINE) + notes + lines, args.update_results)


if __name__ == "__main__":
    main()
