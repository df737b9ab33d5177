"""``mstudio bench``: interleaving, medians, FLOPs, compile counters, memory, machine, results and the command."""

import json
import subprocess
import sys

import pytest
import torch

from mstudio import host_memory, kernel_builds
from mstudio.bench import (
    CompileStats, SweepOptions, Workload, bench_markdown, count_flops, round_order, run_rounds, run_sweep, step_flops,
    summarize, sweep_markdown, sweep_points, timed,
)
from mstudio.bench._machine import git_commit, machine
from mstudio.bench._minestudio import MineStudioProcess
from mstudio.bench._variants import episode_batches
from mstudio.cli import main


def test_rounds_run_every_timer_once_per_round_in_a_shuffled_order():
    calls = []

    def stub(name, seconds):
        return lambda round_: calls.append((round_, name)) or seconds

    names = ["a", "b", "c", "d"]
    rounds = 48
    times = run_rounds({n: stub(n, float(i)) for i, n in enumerate(names)}, rounds=rounds)
    assert times == {n: [float(i)] * rounds for i, n in enumerate(names)}
    by_round = [[name for r, name in calls if r == round_] for round_ in range(rounds)]
    assert all(sorted(order) == names for order in by_round)
    assert by_round == [round_order(names, r) for r in range(rounds)]  # reproducible
    # unlike a rotation, no timer always runs right after the same one: every ordered pair occurs
    follows = {(order[i], order[i + 1]) for order in by_round for i in range(len(order) - 1)}
    assert follows == {(x, y) for x in names for y in names if x != y}


def test_timed_steps_lead_times_untimed_then_times_one():
    calls = []
    timer = timed(lambda x: calls.append(x), ["b0", "b1"], lead=2)
    assert timer(1) >= 0.0
    assert calls == ["b1", "b1", "b1"]
    timer(0)  # round 0: the first call of all, timed alone
    assert calls[3:] == ["b0"]
    with pytest.raises(ValueError, match="lead must be >= 0"):
        timed(lambda x: None, ["b0"], lead=-1)


def test_rounds_reject_no_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run_rounds({"a": lambda r: 0.0}, rounds=0)


def test_summarize_takes_the_median_after_warmup():
    odd = summarize([9.0, 0.003, 0.001, 0.002], warmup=1)  # kept: 3, 1, 2 ms
    assert odd == {"first_call_s": 9.0, "median_ms": pytest.approx(2.0), "min_ms": pytest.approx(1.0),
                   "max_ms": pytest.approx(3.0), "timed_steps": 3}
    even = summarize([9.0, 8.0, 0.004, 0.001, 0.002, 0.100], warmup=2)  # kept: 4, 1, 2, 100 ms
    assert even["median_ms"] == pytest.approx(3.0) and even["first_call_s"] == 9.0
    assert summarize([0.5], warmup=0)["median_ms"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="warmup must be in"):
        summarize([1.0, 2.0], warmup=2)


def test_flops_of_a_linear_layer_are_counted_by_hand():
    layer = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    # forward x @ W^T: 2 * 5 * 3 * 4 = 120; backward grad_W = grad_out^T @ x: 2 * 4 * 5 * 3 = 120; bias adds 0
    assert count_flops(lambda: layer(x).sum().backward()) == 240
    x.requires_grad_(True)  # plus grad_x = grad_out @ W: 2 * 5 * 4 * 3 = 120
    assert count_flops(lambda: layer(x).sum().backward()) == 360
    assert count_flops(lambda: layer(x)) == 120


def test_step_flops_grow_linearly_with_the_batch():
    workload = Workload.preset("tiny")
    policy = workload.policy()
    one, two = (step_flops(policy, episode_batches(b, 4, workload.image, 1)[0]) for b in (2, 4))
    assert one > 0 and two == 2 * one
    assert all(p.grad is None for p in policy.parameters())  # counted on a copy


def test_compile_stats_count_a_forced_recompile():
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with CompileStats() as first:
        double(torch.ones(2))
        double(torch.ones(2))  # cached: nothing new
    assert first.as_dict() == {"graphs": 1, "recompiles": 0}
    with CompileStats() as forced:
        double(torch.ones(3))  # a new shape fails the static shape guard: recompiled
    assert forced.as_dict() == {"graphs": 1, "recompiles": 1}
    assert set(forced.caches) >= {"fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit"}


_PEAK_PROBE = """
import json, torch
from mstudio.bench._measure import memory_mb, peak_memory_mb, reset_peak_memory
reset_peak_memory()
before = memory_mb()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
del block
grown = peak_memory_mb() - before
reset_peak_memory()
print(json.dumps({"grown": grown, "after_reset": peak_memory_mb() - memory_mb()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident set from /proc")
def test_peak_memory_sees_a_transient_allocation():
    # in a fresh process: in this one, malloc may serve the block from heap memory earlier tests freed but left
    # resident, and the resident set would not grow
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, check=True).stdout
    measured = json.loads(out)
    assert measured["grown"] >= 60
    assert measured["after_reset"] < 30


def test_git_commit_is_read_from_the_git_directory(tmp_path):
    sha, other = "a" * 40, "b" * 40
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    inside = tmp_path / "pkg" / "mod.py"
    assert git_commit(inside) == sha
    (tmp_path / ".git" / "refs" / "heads" / "main").unlink()
    (tmp_path / ".git" / "packed-refs").write_text(f"# pack-refs\n{other} refs/heads/dev\n{sha} refs/heads/main\n")
    assert git_commit(inside) == sha
    (tmp_path / ".git" / "HEAD").write_text(other + "\n")  # detached
    assert git_commit(inside) == other


def test_machine_names_cpu_cores_torch_and_threads():
    info = machine()
    assert info["cpu"] and info["cpus_total"] >= info["cpus_available"] >= 1
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert {"git_commit", "load_average", "python", "platform"} <= set(info)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config="huge"), "unknown VPT preset"),
    (dict(config="tiny", batch=0), "batch must be an integer >= 1"),
    (dict(config="tiny", hidsize=66), "not divisible by attention_heads"),
])
def test_workload_rejects_bad_points(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Workload.preset(**kwargs)


def test_minestudio_process_names_a_python_that_cannot_run(tmp_path):
    workload = Workload.preset("tiny")
    with pytest.raises(ValueError, match="--minestudio-python .*missing"):
        with MineStudioProcess(tmp_path / "missing", workload.policy(), episode_batches(2, 4, 64, 1), warmup=0):
            pass


VARIANT_KEYS = {"description", "first_call_s", "median_ms", "min_ms", "max_ms", "timed_steps", "frames_per_s",
                "speedup_vs_baseline", "achieved_gflops", "fraction_of_matmul_peak", "final_loss", "compile", "memory"}


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory):
    """One quick ``mstudio bench`` run, eager variants only, with its fresh-process measurements."""
    out = tmp_path_factory.mktemp("bench")
    status = main(["bench", "--config", "tiny", "--repeats", "1", "--warmup", "0", "--no-compile",
                   "--json", str(out / "r.json"), "--markdown", str(out / "r.md")])
    return status, out


def test_cli_bench_writes_json_with_every_field(cli_result):
    status, out = cli_result
    assert status == 0
    result = json.loads((out / "r.json").read_text())
    assert {"schema", "command", "machine", "load_average_end", "workload", "protocol", "flops_per_step",
            "matmul_peak", "variants"} <= set(result)
    assert result["command"] == (f"mstudio bench --config tiny --repeats 1 --warmup 0 --no-compile --json {out}/r.json "
                                 f"--markdown {out}/r.md")
    assert {"cpu", "cpus_available", "cpus_total", "torch", "torch_threads", "git_commit"} <= set(result["machine"])
    # a CPU bench runs every variant with malloc keeping freed blocks, as a CPU TrainStep would (glibc only)
    assert result["machine"]["malloc_keeps_freed_memory"] is (host_memory._glibc_mallopt() is not None)
    assert result["machine"]["cpu_kernels_batched"] is kernel_builds.batching_applies()
    assert result["workload"]["batch"] == 2 and result["workload"]["frames_per_step"] == 8
    assert result["flops_per_step"] > 0 and result["matmul_peak"]["gflops"] > 0
    assert list(result["variants"]) == ["minestudio_style", "eager", "eager_pure"]
    for name, variant in result["variants"].items():
        assert VARIANT_KEYS <= set(variant), name
        assert variant["timed_steps"] == 1
        assert variant["frames_per_s"] == pytest.approx(8e3 / variant["median_ms"])
        assert variant["memory"]["peak_memory_mb"] >= variant["memory"]["memory_built_mb"] > 0
    assert result["variants"]["minestudio_style"]["speedup_vs_baseline"] == 1.0
    eager = result["variants"]["eager"]
    assert eager["compile"]["graphs"] == eager["compile"]["recompiles"] == 0  # nothing compiled eagerly
    assert eager["compile"]["cold_s"] is None and eager["compile"]["warm_s"] is None
    # same weights, same batch, same step: the losses agree (donated or not)
    for name in ("eager", "eager_pure"):
        assert result["variants"][name]["final_loss"] == pytest.approx(
            result["variants"]["minestudio_style"]["final_loss"], rel=1e-5)


def test_cli_bench_markdown_has_every_column_and_variant(cli_result):
    _, out = cli_result
    text = (out / "r.md").read_text()
    result = json.loads((out / "r.json").read_text())
    assert text == bench_markdown(result)
    for column in ("ms/step", "frames/s", "speed-up vs minestudio_style", "GFLOP/s", "of matmul peak",
                   "first call s", "cold compile s", "warm compile s", "graphs", "recompiles", "peak memory MiB",
                   "final loss"):
        assert column in text
    for name, variant in result["variants"].items():
        assert f"| {name} | {variant['median_ms']:.2f}" in text
    assert result["machine"]["cpu"] in text and f"{result['flops_per_step'] / 1e9:.3f} GFLOP" in text
    kept = result["machine"]["malloc_keeps_freed_memory"]
    assert ("- malloc: keeps freed blocks" in text) is kept and ("- malloc: as the system has it" in text) is not kept
    batched = result["machine"]["cpu_kernels_batched"]
    assert ("C++ kernels of the compiled step: built in batches" in text) is batched
    assert ("C++ kernels of the compiled step: one g++ run each" in text) is not batched


def test_cli_bench_plot_needs_a_sweep(capsys):
    assert main(["bench", "--plot", "x.png"]) == 2
    assert "--plot draws the sweep" in capsys.readouterr().err


def test_sweep_varies_one_axis_at_a_time():
    options = SweepOptions(Workload.preset("tiny"), batches=(1, 2), seqs=(4,), hidsizes=(32, 64))
    assert [(axis, value, (w.batch, w.seq, w.hidsize)) for axis, value, w in sweep_points(options)] == [
        ("batch", 1, (1, 4, None)), ("batch", 2, (2, 4, None)), ("seq", 4, (2, 4, None)),
        ("hidsize", 32, (2, 4, 32)), ("hidsize", 64, (2, 4, 64)),
    ]


def test_sweep_writes_a_table_and_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from mstudio.bench import plot_sweep

    options = SweepOptions(Workload.preset("tiny"), batches=(1, 2), seqs=(2,), hidsizes=(32,), variants=("eager",),
                           repeats=1, warmup=0)
    result = run_sweep(options, progress=False)
    assert [(p["axis"], p["value"]) for p in result["points"]] == [("batch", 1), ("batch", 2), ("seq", 2),
                                                                  ("hidsize", 32)]
    assert result["points"][1]["flops_per_step"] == 2 * result["points"][0]["flops_per_step"]
    text = sweep_markdown(result)
    assert text.count("| eager |") == 4
    image = plot_sweep(result, tmp_path / "sweep.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minestudio_style_runs_as_a_script_without_mstudio(tmp_path):
    """The MineStudio venv has no mstudio: the script imports none of it (run here with mstudio hidden) and
    checks its arguments before importing minestudio."""
    import mstudio.bench.minestudio_style as script

    code = f"import runpy, sys; sys.modules['mstudio'] = None; runpy.run_path({script.__file__!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", code, "only-one-argument"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 1 and "usage: python" in done.stderr and "Error" not in done.stderr, done.stderr
