"""VPT train-step speed: mstudio compiled vs mstudio eager vs a MineStudio-style eager step, in one run.

For each size (``tiny`` B2 x T4 and ``small`` B4 x T32 by default, 64x64 images) all three variants train the
same VPTPolicy (same initial weights) on the same episode-continuous synthetic batches with behaviour
cloning (weight 0.01) and AdamW (lr 1e-3, weight decay 0.1, warmup 10, clipping at 1.0). The MineStudio-style
step is what ``MineLightning`` + Lightning run per batch (module forward, ``loss.backward()``,
``clip_grad_norm_``, ``torch.optim.AdamW`` + ``LambdaLR``), on our module: the baseline ratio. Reports the
median ms/step over ``--repeats`` timed steps (variants take turns batch by batch), the first call (for the
compiled variant: the compile time), and the final losses (which must agree).

With ``--minestudio-python`` (the scratch venv of ``shared/minestudio_reference.md``), the same step is also
timed on MineStudio's own ``VPTPolicy`` (same weights, same batches) in a subprocess of that interpreter:
``minestudio_real``. mstudio itself never imports minestudio.

    python benchmarks/bench_vpt.py                                 # tiny and small
    python benchmarks/bench_vpt.py --sizes small --repeats 10
    python benchmarks/bench_vpt.py --minestudio-python /root/msref_venv/bin/python

Writes ``benchmarks/results/vpt.json`` and ``vpt.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from bench_step import HYPER, episode_batches, minestudio_style, mstudio_step, run_interleaved  # sibling script
from mstudio.models import VPTPolicy, vpt_configs

RESULTS = Path(__file__).parent / "results"
SHAPES = {"tiny": (2, 4), "small": (4, 32)}  # (B, T)

# Run by --minestudio-python: MineLightning's per-batch work on MineStudio's VPTPolicy, timed like
# run_interleaved (median over the steps after the warm-up). argv: inputs.pt, warmup.
MINESTUDIO_STEP = """
import json, statistics, sys, time
import torch
from minestudio.models import VPTPolicy
from minestudio.offline.mine_callbacks import BehaviorCloneCallback
torch.set_num_threads(int(sys.argv[3]))
data = torch.load(sys.argv[1], weights_only=True)
hyper = json.loads(data["hyper"])
policy = VPTPolicy(policy_kwargs=json.loads(data["policy_kwargs"]))
policy.load_state_dict(data["state_dict"])
bc = BehaviorCloneCallback(weight=hyper["bc_weight"])
optimizer = torch.optim.AdamW(policy.parameters(), lr=hyper["lr"], weight_decay=hyper["weight_decay"])
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min((k + 1) / hyper["warmup_steps"], 1))
memory, times = None, []
for batch in data["batches"]:
    start = time.perf_counter()
    latents, memory = policy(batch, memory)
    loss = bc(batch, 0, "train", latents, policy)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], hyper["clip_norm"])
    optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
    memory = [m.detach() for m in memory]
    times.append(time.perf_counter() - start)
warmup = int(sys.argv[2])
print(json.dumps({"first_call_s": times[0], "median_ms": 1e3 * statistics.median(times[warmup:]),
                  "final_loss": float(loss)}))
"""


def time_minestudio(python: str, name: str, policy: VPTPolicy, batches: list[dict], warmup: int) -> dict:
    """MineStudio's real VPTPolicy stepped as MineLightning does, in ``python`` (a venv with minestudio)."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pt"
        torch.save({"state_dict": policy.state_dict(), "policy_kwargs": json.dumps(vpt_configs[name]),
                    "hyper": json.dumps(HYPER), "batches": batches}, inputs)
        out = subprocess.run([python, "-c", MINESTUDIO_STEP, str(inputs), str(warmup), str(torch.get_num_threads())],
                             check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(name: str, repeats: int, warmup: int, compile: bool, minestudio_python: str | None) -> dict:
    torch.manual_seed(0)
    policy = VPTPolicy(**vpt_configs[name])
    batch_size, seq_len = SHAPES[name]
    image = vpt_configs[name]["img_shape"][0]
    batches = episode_batches(batch_size, seq_len, image, warmup + repeats)
    variants = {
        "minestudio_eager": minestudio_style(policy, batches),
        "mstudio_eager": mstudio_step(policy, batch_size, compile=False),
    }
    if compile:
        variants["mstudio_compiled"] = mstudio_step(policy, batch_size, compile=True)
    results = run_interleaved(variants, batches, warmup)
    if minestudio_python:
        results["minestudio_real"] = time_minestudio(minestudio_python, name, policy, batches, warmup)
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
    args = parser.parse_args()

    report = {
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
        "hyper": HYPER,
        "sizes": {
            name: bench_size(name, args.repeats, args.warmup, not args.no_compile, args.minestudio_python)
            for name in args.sizes
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vpt.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# VPT train step (BC, AdamW, clip 1.0), torch {torch.__version__}, {report['machine']}",
        "",
        "Command: `python benchmarks/bench_vpt.py " + " ".join(
            [f"--sizes {' '.join(args.sizes)}", f"--repeats {args.repeats}", f"--warmup {args.warmup}"]
            + ([f"--minestudio-python {args.minestudio_python}"] if args.minestudio_python else [])) + "`",
        "",
        "minestudio_eager: MineLightning's per-batch work on our module; mstudio_*: make_train_step; "
        "minestudio_real (if run): MineStudio's own VPTPolicy in its venv, timed after the others, not interleaved. "
        "First call of mstudio_compiled = compile time. Final losses differ in the 4th digit: float32 round-off "
        "grows through AdamW on VPT (see tests/models/test_vpt_training.py).",
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
    (RESULTS / "vpt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
