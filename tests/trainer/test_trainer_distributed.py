"""The Trainer and ``mstudio train`` under torchrun: 2 CPU ranks (gloo), launched for real.

``python -m torch.distributed.run --standalone --nproc_per_node=2 -m mstudio train`` on the built-in default config
(VPT tiny, 4 rows per rank, eager) runs in a subprocess: it finishes with one set of event files and checkpoints
(rank 0's), resumes bit-exactly (every rank's memory carry, loader position and RNG come back), its first update
is the update of one process on both ranks' rows, rank 0 logs means over the ranks, a checkpoint refuses another
world size, and Ctrl-C stops every rank without a hang. Spawned ranks (``tests.distributed.spawn``) check the
every-N-steps replica check and a failure on rank 0 while it makes the store.

Why only the first update is compared to one process at 1e-5: the ranks sum their gradients in another order
than one process does (float32 rounding, ~2e-6 of the gradient), and on VPT Adam amplifies such rounding about
tenfold per step (the relative error of the updates is 5e-6 after 1 step, 7e-5 after 2, 1.4e-3 after 3 with
lr 1e-3; one process on 1 or 2 threads already differs by 8e-5 after 3 steps). ``tests/distributed`` shows the
2-rank step equal to one process over 5 steps on a smaller policy.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mstudio.trainer import ConfigError, Trainer, config_from_dict
from mstudio.trainer.build import build_policy
from mstudio.trainer.checkpoint import list_checkpoints, read_checkpoint_meta
from mstudio.trainer.config import PolicyConfig
from tests.distributed import workers
from tests.distributed.spawn import check_ok, run_ranks

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # every test starts 2 ranks (15-40 s each on 2 loaded cores)


def torchrun(*args: str, out: Path, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """``mstudio train <args> --out <out>`` on 2 ranks under torchrun (eager), finished or still running."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mstudio",
               "train", *args]
    if "--resume" not in args:
        command += ["--no-compile", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # torchrun gives each of its 2 workers 1 thread
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("events.out.tfevents.*"))


def relative_update_error(params: dict, reference: dict, initial: dict) -> float:
    """``|d - d_ref| / |d_ref|`` over all float tensors, ``d = final - initial``."""
    diff = sum((params[n].double() - reference[n].double()).norm() ** 2 for n in reference)
    norm = sum((reference[n].double() - initial[n].double()).norm() ** 2 for n in reference)
    return float((diff / norm).sqrt())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three 2-rank runs of the default config: 3 steps (checkpoints 1, 2, 3) resumed to 6, and 6 straight; and
    one process with both ranks' rows (8) for 3 steps, logging and validating at 1 and 3."""
    out = tmp_path_factory.mktemp("runs")
    first = torchrun("--max-steps", "3", "--ckpt-every", "1", "--name", "resumed", out=out)
    after_first = {"events": event_files(out / "resumed"), "checkpoints": list_checkpoints(out / "resumed"),
                   "files": sorted(p.name for p in (out / "resumed").iterdir()), "stdout": first.stdout,
                   "step_1": load_file(out / "resumed" / "checkpoints" / "step_1" / "state.safetensors")}
    second = torchrun("--resume", str(out / "resumed"), "--max-steps", "6", out=out)
    torchrun("--max-steps", "6", "--ckpt-every", "3", "--name", "straight", out=out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        table = {"data": {"batch_size": 8}, "run": {"out": str(out), "name": "one", "compile": False, "max_steps": 3,
                                                     "log_every": 1, "val_every": 1, "ckpt_every": 1}}
        Trainer(config_from_dict(table)).fit()
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "first": after_first, "second_stdout": second.stdout}


def test_torchrun_writes_one_set_of_files_from_rank_zero(runs):
    run_dir, first = runs["out"] / "resumed", runs["first"]
    assert len(first["events"]) == 1, first["events"]  # rank 1 writes no event file
    assert first["files"] == ["checkpoints", "config.toml", first["events"][0].name, "policy.safetensors"]
    assert [p.name for p in first["checkpoints"]] == ["step_1", "step_2", "step_3"]
    assert first["stdout"].count("done: 3 steps") == 1  # rank 1 prints nothing
    assert runs["second_stdout"].count(f"resumed {run_dir} at step 3") == 1
    assert len(event_files(run_dir)) == 2  # one per launch
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_4", "step_5", "step_6"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert read_checkpoint_meta(run_dir / "checkpoints" / "step_6")["world_size"] == 2
    header = json.loads((run_dir / "checkpoints" / "step_6" / "meta.json").read_text())
    shapes = {leaf["path"]: leaf["shape"] for leaf in header["leaves"] if "shape" in leaf}
    assert shapes["state/last_timestamp"] == [2, 4]  # [ranks, rows per rank]: every rank's
    assert shapes["rng"][0] == 2


def test_torchrun_resume_continues_bit_exactly(runs):
    # 3 steps then resumed to 6 == 6 straight: every rank got its own memory, loader position and RNG back
    resumed = load_file(runs["out"] / "resumed" / "checkpoints" / "step_6" / "state.safetensors")
    straight = load_file(runs["out"] / "straight" / "checkpoints" / "step_6" / "state.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert scalars(runs["out"] / "resumed", "train/loss")[6] == scalars(runs["out"] / "straight", "train/loss")[6]


def test_two_ranks_update_as_one_process_on_their_rows_and_log_means(runs):
    one = load_file(runs["out"] / "one" / "checkpoints" / "step_1" / "state.safetensors")
    ranks = runs["first"]["step_1"]  # (pruned by the resumed run)
    names = [key.removeprefix("state/params/") for key in one if key.startswith("state/params/")]
    initial = build_policy(PolicyConfig(), 0).state_dict()
    params = {name: ranks[f"state/params/{name}"] for name in names}
    reference = {name: one[f"state/params/{name}"] for name in names}
    assert relative_update_error(params, reference, initial) <= 1e-5
    # rank 0 logs the mean over the ranks: the loss of one process on both ranks' rows (a rank's own rows differ).
    # After 3 updates, not 1: the lone process donates its state (adamw's in-place update, torch's arithmetic), the
    # ranks run the pure chain, one rounding of the step apart, which Adam amplifies (1.4e-4 on val/loss here).
    for tag in ("train/loss", "train/camera_loss", "val/loss", "val/button_loss"):
        logged, expected = scalars(runs["out"] / "resumed", tag)[3], scalars(runs["out"] / "one", tag)[3]
        assert logged == pytest.approx(expected, rel=1e-3), tag
    assert scalars(runs["out"] / "resumed", "train/frames_per_s")[3] > 0


def test_a_checkpoint_resumes_only_with_its_world_size(runs):
    with pytest.raises(ConfigError, match="written with world_size 2 but this run has world_size 1.*"
                                          "torchrun --nproc_per_node=2"):
        Trainer.resume(runs["out"] / "resumed", max_steps=7)


def test_ctrl_c_stops_every_rank_leaving_the_checkpoints_complete(tmp_path):
    process = torchrun("--max-steps", "1000", "--ckpt-every", "1", "--name", "stopped", out=tmp_path, wait=False)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step_2").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert (checkpoints / "step_2").exists(), process.communicate()
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends torchrun; it passes SIGINT on to the ranks
    start = time.monotonic()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - start < 60  # torchrun would SIGKILL a rank still alive after 30 s
    assert "of a data-parallel run: not saved (the ranks stopped at different points); the newest checkpoint is" \
        in stderr, stderr[-3000:]
    newest = list_checkpoints(tmp_path / "stopped")[-1]
    assert f"the newest checkpoint is {newest}" in stderr
    header = json.loads((newest / "meta.json").read_text())  # complete: its tensors are what it recorded
    assert hashlib.sha256((newest / "state.safetensors").read_bytes()).hexdigest() == header["state_sha256"]

def test_replica_check_every_step_and_a_failure_on_rank_zero_stop_every_rank(tmp_path):
    from mstudio.data import EpisodeStore, fill_store

    store = tmp_path / "store"
    fill_store(EpisodeStore.create(store, (64, 64)), episodes=7, frames=(16, 28), seed=1, vocabulary=8)
    values = check_ok(run_ranks(workers.trainer_checks, 2, str(store), str(tmp_path / "runs"), timeout=300))
    assert values[0]["run_dir"] == values[1]["run_dir"]  # the time stamp rank 0 chose
    assert [v["world"] for v in values] == [(0, 2, 0), (1, 2, 1)]
    for value in values:
        assert "params.net.final_ln.bias on rank(s) [1] differs from rank 0 (1 of" in value["replicas"]
    kind, message, seconds = values[0]["missing_store"]
    assert kind == "ConfigError" and "data.store:" in message
    kind, message, seconds = values[1]["missing_store"]
    assert kind == "RuntimeError" and "rank 0 failed in the work it does first" in message
    assert "ConfigError: data.store:" in message and seconds < 20  # not the 30 s timeout
