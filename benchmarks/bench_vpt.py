"""VPT train-step speed: mstudio compiled vs mstudio eager vs a MineStudio-style eager step, in one run.

For each size (``tiny`` B2 x T4 and ``small`` B4 x T32 by default, 64x64 images) all three variants train the
same VPTPolicy (same initial weights) on the same episode-continuous synthetic batches with behaviour
cloning (weight 0.01) and AdamW (lr 1e-3, weight decay 0.1, warmup 10, clipping at 1.0). The MineStudio-style
step is ``benchmarks/minestudio_style.py`` (what ``MineLightning`` + Lightning run per batch) on our module: the
baseline of the ratios. Reports the median ms/step over ``--repeats`` timed steps (variants take turns batch by
batch), the first call (for the compiled variant: the compile time), and the final losses (which must agree).

With ``--minestudio-python`` (the scratch venv of ``shared/minestudio_reference.md``), the same step is also
timed on MineStudio's own ``VPTPolicy`` (same weights, same batches): that interpreter runs
``minestudio_style.py`` itself as a script, so both measure the one reference step: ``minestudio_real``.
mstudio itself never imports minestudio.

    python benchmarks/bench_vpt.py                                 # tiny and small
    python benchmarks/bench_vpt.py --sizes small --repeats 10
    python benchmarks/bench_vpt.py --minestudio-python /root/msref_venv/bin/python --update-results

Writes ``benchmarks/results/latest/vpt.json`` and ``vpt.md`` (git-ignored), or with ``--update-results`` the
committed ``benchmarks/results/vpt.*``. Each states the machine, the command and the baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch

import minestudio_style  # sibling module, also run as a script in the MineStudio venv
from bench_step import (  # sibling script
    BASELINE, HYPER, add_results_argument, command_line, episode_batches, header, machine, minestudio_step,
    mstudio_step, run_interleaved, write_results,
)
from mstudio.models import VPTPolicy

SHAPES = {"tiny": (2, 4), "small": (4, 32)}  # (B, T)


def time_minestudio(python: str, policy: VPTPolicy, batches: list[dict], warmup: int) -> dict:
    """MineStudio's real VPTPolicy (same weights) stepped by ``minestudio_style.py`` in ``python``, a venv with
    minestudio; returns ``{"first_call_s", "median_ms", "final_loss"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pt"
        torch.save({"state_dict": policy.state_dict(), "policy_kwargs": json.dumps(policy.config.to_policy_kwargs()),
                    "hyper": json.dumps(HYPER), "batches": batches}, inputs)
        command = [python, minestudio_style.__file__, str(inputs), "--warmup", str(warmup),
                   "--threads", str(torch.get_num_threads())]
        out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed (is minestudio==1.1.6 installed in {python}?):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(name: str, repeats: int, warmup: int, compile: bool, minestudio_python: str | None) -> dict:
    """All variants on one VPT size; ``speed_vs_minestudio`` is relative to the MineStudio-style baseline."""
    torch.manual_seed(0)
    policy = VPTPolicy.from_preset(name)
    batch_size, seq_len = SHAPES[name]
    image = policy.config.img_shape[0]
    batches = episode_batches(batch_size, seq_len, image, warmup + repeats)
    variants = {
        "minestudio_eager": minestudio_step(policy),
        "mstudio_eager": mstudio_step(policy, batch_size, compile=False),
    }
    if compile:
        variants["mstudio_compiled"] = mstudio_step(policy, batch_size, compile=True)
    results = run_interleaved(variants, batches, warmup)
    if minestudio_python:
        results["minestudio_real"] = time_minestudio(minestudio_python, policy, batches, warmup)
    base = results["minestudio_eager"]["median_ms"]
    for r in results.values():
        r["speed_vs_minestudio"] = base / r["median_ms"]
    return {"batch": batch_size, "seq": seq_len, "image": image, "repeats": repeats, "warmup": warmup,
            "parameters": sum(p.numel() for p in policy.parameters()), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    parser.add_argument("--minestudio-python",
                        help="python of a venv with minestudio==1.1.6: also time MineStudio's own VPT")
    add_results_argument(parser)
    args = parser.parse_args()

    report = {
        "command": command_line(),
        "args": vars(args),
        "machine": machine(),
        "hyper": HYPER,
        "baseline": BASELINE,
        "sizes": {
            name: bench_size(name, args.repeats, args.warmup, not args.no_compile, args.minestudio_python)
            for name in args.sizes
        },
    }
    lines = header("VPT train step (BC, AdamW, clip 1.0)", report["machine"], report["command"], BASELINE) + [
        "mstudio_*: make_train_step; minestudio_real (if run): the same MineStudio-style step on MineStudio's own "
        "VPTPolicy in its venv, timed after the others, not interleaved. First call of mstudio_compiled = compile "
        "time. Final losses differ in the 4th digit: float32 round-off grows through AdamW on VPT (see "
        "tests/models/test_vpt_training.py).",
        "",
        "| size | B x T | variant | median ms/step | speed vs MineStudio-style | first call (s) | final loss |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, size in report["sizes"].items():
        for variant, r in size["results"].items():
            lines.append(
                f"| {name} | {size['batch']} x {size['seq']} | {variant} | {r['median_ms']:.2f} | "
                f"{r['speed_vs_minestudio']:.2f}x | {r['first_call_s']:.2f} | {r['final_loss']:.6f} |"
            )
    write_results("vpt", report, lines, args.update_results)


if __name__ == "__main__":
    main()
