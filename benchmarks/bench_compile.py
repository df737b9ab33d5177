"""Compile time of the VPT train step: cold (empty inductor cache) and warm (the same cache), where the seconds go.

Each measurement runs in a fresh child process (nothing in memory from an earlier compile), with
``TORCHINDUCTOR_CACHE_DIR`` pointing at a directory that is empty for the cold run and reused for the warm one.
The child builds ``VPTPolicy.from_preset(size)``, the BC + AdamW step of ``bench_step.py`` and times its first
call (build + compile + one step), then reports torch's own breakdown (``torch._dynamo.utils.compile_times``),
the graph and recompile counters, and the machine load around the run.

    python benchmarks/bench_compile.py                       # tiny and small, cold then warm, once
    python benchmarks/bench_compile.py --sizes small --repeats 2 --json /tmp/compile.json

Timings on a shared machine are noisy: the load average is printed next to each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from mstudio.bench._presets import SHAPES  # (B, T) of each VPT size, as mstudio bench uses them


def child(size: str, steps: int) -> dict:
    """Build and first-call the compiled step of VPT ``size`` in this process; the timings and counters."""
    import torch

    import losses
    import mstudio
    from mstudio.bench import HYPER, episode_batches
    from mstudio.models import VPTPolicy

    torch.manual_seed(0)
    policy = VPTPolicy.from_preset(size)
    batch_size, seq_len = SHAPES[size]
    batches = episode_batches(batch_size, seq_len, policy.config.img_shape[0], steps)
    optimizer = mstudio.optim.adamw(HYPER["lr"], weight_decay=HYPER["weight_decay"],
                                    warmup_steps=HYPER["warmup_steps"], clip_norm=HYPER["clip_norm"])
    objective = losses.weighted(losses.behavior_clone, HYPER["bc_weight"])
    step = mstudio.make_train_step(policy, objective, optimizer, compile=True)
    state = mstudio.init_state(policy, optimizer, batch_size)
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    metrics["loss"].item()
    first = time.perf_counter() - start
    for batch in batches[1:]:
        state, metrics = step(state, batch)
    counters = torch._dynamo.utils.counters
    names, values = torch._dynamo.utils.compile_times(repr="csv")  # seconds summed per compile phase
    breakdown = {name: round(sum(float(v) for v in value.split(",")), 2) for name, value in zip(names, values)}
    return {
        "size": size,
        "first_call_s": first,
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
        "breakdown": breakdown,
        "fxgraph_cache": dict(counters["inductor"]),
        "aot_autograd": dict(counters["aot_autograd"]),
    }


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(size: str, cache_dir: str, steps: int) -> dict:
    """Run :func:`child` in a fresh interpreter with ``cache_dir`` as the inductor cache; its result, the wall
    and CPU seconds of the whole process (compile workers included) and the load average around it."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [here, os.path.dirname(here), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": path}
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", size, "--steps", str(steps)], env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"child for {size} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # CPU seconds of the child and its compile workers: less sensitive to other processes' load than wall time.
    result.update(process_s=wall, cpu_s=_children_cpu() - cpu_before, load_before=load_before,
                  load_after=os.getloadavg()[0])
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=1, help="cold + warm pairs per size")
    parser.add_argument("--steps", type=int, default=3, help="steps per child (recompiles are counted over them)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    results = []
    for size in args.sizes:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="mstudio-compile-") as cache:
                for kind in ("cold", "warm"):
                    r = run_child(size, cache, args.steps)
                    r["cache"] = kind
                    results.append(r)
                    print(f"{size:5s} {kind}: first call {r['first_call_s']:6.1f} s (process {r['process_s']:6.1f} s, "
                          f"cpu {r['cpu_s']:6.1f} s), "
                          f"graphs {r['graphs']}, recompiles {r['recompiles']}, load {r['load_before']:.1f}->"
                          f"{r['load_after']:.1f}", flush=True)
                    top = sorted(r["breakdown"].items(), key=lambda kv: -kv[1])[:10]
                    print("   " + ", ".join(f"{k}={v:.1f}" for k, v in top), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
