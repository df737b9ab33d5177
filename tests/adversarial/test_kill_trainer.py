"""SIGKILL ``mstudio train`` at its file-system operations; resuming must lose nothing and change nothing.

A tiny eager run (VPT ``tiny``, B=1, T=2, 4 steps, a checkpoint at every step, ``keep_checkpoints = 2``) runs
once to the end in a child process that counts its file-system operations (:mod:`tests.adversarial.kill`) and
prints when each checkpoint save and the policy export start and end. Then, for each chosen operation, a fresh
run is killed just before it, and recovered as a user would: ``mstudio train --resume RUN`` when the run has a
checkpoint, else the same ``mstudio train`` command again. Each recovered run must end with bitwise the
uninterrupted run's final train state (the sha256 of its last ``state.safetensors``, RNG state included) and
exported policy (the digest of its tensors), and the kill must not have lost a checkpoint that was complete
before it (beyond what ``keep_checkpoints`` prunes) nor left a partial one.

Recovery runs in this process with one thread, as the children do, so that every run does the same arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mstudio.cli import main
from mstudio.data import EpisodeStore, fill_store
from mstudio.trainer.checkpoint import latest_checkpoint, list_checkpoints
from tests.adversarial.harness import DataLost
from tests.adversarial.kill import kill_points, run_killed

pytestmark = pytest.mark.slow

KEEP = 2
CONFIG = """[data]
store = "{store}"
batch_size = 1
window = 2
val_episodes = 0

[run]
max_steps = 4
ckpt_every = 1
keep_checkpoints = {keep}
log_every = 1
val_every = 0
compile = false
"""

# Runs `mstudio train` in the child; with `trace`, prints the operation range of every save and export.
# TensorBoard writes its event file from a background thread, at times that vary from run to run, which would
# shift the operation numbers between the reference run and the killed ones: the children log nothing.
SNIPPET = """
import sys, torch
torch.set_num_threads(1)
import mstudio.trainer.loop as loop

class NoEvents:
    def __init__(self, *args, **kwargs): pass
    def scalars(self, *args): pass
    def hyperparameters(self, *args): pass
    def close(self): pass

loop.MetricWriter = NoEvents

# torch imports dynamo lazily in the first step, and that import writes (probes the temp dir, makes its cache
# dir) depending on what earlier processes left: import it now and count from here, so numbers do not shift.
import tempfile, torch._dynamo
tempfile.gettempdir()
_count = 0

def traced(name, function):
    def wrapper(*args, **kwargs):
        start = _count
        result = function(*args, **kwargs)
        print("TRACE", name, args[1] if name == "save" else -1, start + 1, _count, flush=True)
        return result
    return wrapper

if {trace}:
    loop.save_checkpoint = traced("save", loop.save_checkpoint)
    loop.export_policy = traced("export", loop.export_policy)
from mstudio.cli import main
sys.exit(main(["train", "--config", "run.toml", "--out", {out!r}, "--name", "run"]))
"""


@dataclass(frozen=True)
class Span:
    """The operations ``first..last`` of one save (of ``step``) or of the export (``step`` -1)."""

    name: str
    step: int
    first: int
    last: int


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run: its operation count, save/export spans and final digests."""

    tmp: Path
    operations: int
    spans: list[Span]
    state_sha256: str
    policy_sha256: str


def _final_digests(run_dir: Path) -> tuple[str, str]:
    """The sha256 of the newest checkpoint's state file (as meta.json records it) and of the exported tensors."""
    newest = latest_checkpoint(run_dir)
    state = json.loads((newest / "meta.json").read_text())["state_sha256"]
    with safe_open(run_dir / "policy.safetensors", framework="pt") as file:
        policy = file.metadata()["tensors_sha256"]
    return state, policy


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    tmp = tmp_path_factory.mktemp("kill")
    fill_store(EpisodeStore.create(tmp / "store", (64, 64)), episodes=3, frames=(8, 12), seed=1, vocabulary=8)
    (tmp / "run.toml").write_text(CONFIG.format(store=tmp / "store", keep=KEEP))
    done = run_killed(SNIPPET.format(trace=True, out="reference"), tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    spans = [Span(name, int(step), int(first), int(last))
             for name, step, first, last in re.findall(r"^TRACE (\w+) (-?\d+) (\d+) (\d+)$", done.stdout, re.M)]
    return Reference(tmp, done.operations, spans, *_final_digests(tmp / "reference" / "run"))


def _points(ref: Reference) -> list[int]:
    """Every operation of the third save (it writes, publishes and prunes) and of the export, and 8 spread
    over the whole run."""
    save, export = next(s for s in ref.spans if s.step == 3), next(s for s in ref.spans if s.name == "export")
    inside = [*range(save.first, save.last + 1), *range(export.first, export.last + 1)]
    return sorted({*kill_points(ref.operations, 8), *inside})


def _must_survive(ref: Reference, kill_at: int, present: list[int]) -> list[int]:
    """The checkpoints that were complete before operation ``kill_at`` and that no save may have pruned yet:
    the newest ``KEEP`` finished saves, less the oldest of them if a save in progress published its own."""
    saves = [s for s in ref.spans if s.name == "save"]
    finished = [s.step for s in saves if s.last < kill_at]
    must = finished[-KEEP:]
    in_progress = [s.step for s in saves if s.first <= kill_at <= s.last]
    if in_progress and in_progress[0] in present and len(must) == KEEP:
        must = must[1:]
    return must


def _check_after_kill(ref: Reference, kill_at: int, run_dir: Path) -> None:
    """No complete checkpoint lost, none partial, every one intact (its state matches its recorded sha256)."""
    present = [int(path.name.removeprefix("step_")) for path in list_checkpoints(run_dir)]
    lost = [step for step in _must_survive(ref, kill_at, present) if step not in present]
    if lost:
        raise DataLost(f"kill at operation {kill_at} lost checkpoints {lost}; left {present}")
    partial = [p.name for p in (run_dir / "checkpoints").glob("step_*") if p not in list_checkpoints(run_dir)]
    assert not partial, f"kill at operation {kill_at} left partial checkpoints {partial}"
    for path in list_checkpoints(run_dir):
        recorded = json.loads((path / "meta.json").read_text())["state_sha256"]
        assert hashlib.sha256((path / "state.safetensors").read_bytes()).hexdigest() == recorded, path


def _recover(ref: Reference, out: str, capsys) -> None:
    """What a user does after the kill: resume the run if it has a checkpoint, else run the command again."""
    run_dir = ref.tmp / out / "run"
    if latest_checkpoint(run_dir) is not None:
        status = main(["train", "--resume", str(run_dir)])
    else:
        status = main(["train", "--config", str(ref.tmp / "run.toml"), "--out", str(ref.tmp / out), "--name", "run"])
    captured = capsys.readouterr()
    assert status == 0, f"recovery after the kill into {out} failed: {captured.err[-1500:]}"


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children: the same arithmetic, so bitwise-equal results
    yield
    torch.set_num_threads(threads)


def test_the_reference_run_covers_saves_and_export(reference):
    assert [s.step for s in reference.spans if s.name == "save"] == [1, 2, 3, 4]
    assert [s.name for s in reference.spans][-1] == "export"
    assert len(_points(reference)) >= 15


def test_every_kill_point_resumes_to_the_same_result(reference, one_thread, capsys):
    recovered, failures = [], []
    for kill_at in _points(reference):
        out = f"killed-{kill_at}"
        killed = run_killed(SNIPPET.format(trace=False, out=out), reference.tmp, kill_at=kill_at)
        assert killed.killed, (f"the run ended before operation {kill_at} (exit {killed.returncode}, "
                               f"{killed.operations} operations): {killed.stdout[-500:]} {killed.stderr[-1500:]}")
        try:
            _check_after_kill(reference, kill_at, reference.tmp / out / "run")
            _recover(reference, out, capsys)
            found = _final_digests(reference.tmp / out / "run")
            assert found == (reference.state_sha256, reference.policy_sha256), f"final state differs: {found}"
            recovered.append(kill_at)
        except AssertionError as error:  # DataLost included: report every point, then fail
            failures.append(f"operation {kill_at}: {type(error).__name__}: {error}")
    summary = f"{len(recovered)} of {len(recovered) + len(failures)} kill points recovered exactly"
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures)
