"""Checkpoints: bitwise round trips, atomic publish under SIGKILL, pruning, template checks, no unpickling."""

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import optree
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from mstudio.trainer import checkpoint
from mstudio.trainer.checkpoint import (
    export_policy,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_policy_config,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]


class Moments(NamedTuple):  # shaped like mstudio.optim's AdamWState
    count: Tensor
    mu: dict
    nu: dict


class State(NamedTuple):  # shaped like mstudio.train.TrainState
    params: dict
    buffers: dict
    opt_state: tuple
    memory: tuple
    step: Tensor


def make_state(seed: int = 0) -> State:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, generator=generator)
    weight[0, 0], weight[0, 1] = float("nan"), -0.0  # only a bitwise comparison tells these apart
    params = {"net.fc.weight": weight, "net.fc.bias": torch.randn(3, dtype=torch.float64, generator=generator)}
    shared = torch.arange(6.0).view(2, 3) + seed  # the memory leaves alias one storage; two are non-contiguous
    return State(
        params=params,
        buffers={"mask": torch.tensor([True, False, True]), "half": torch.randn(5, generator=generator).bfloat16()},
        opt_state=((), Moments(torch.tensor(7 + seed), {k: 2 * v for k, v in params.items()}, dict.fromkeys(params))),
        memory=(shared, shared.t(), shared[1], None),
        step=torch.tensor(12 + seed, dtype=torch.int64),
    )


def fresh_like(tree):
    """A template: same structure, dtypes and shapes, different values."""
    return optree.tree_map(lambda x: None if x is None else torch.ones_like(x), tree, none_is_leaf=True)


def assert_bitwise_equal(actual, expected):
    assert optree.tree_structure(actual, none_is_leaf=True) == optree.tree_structure(expected, none_is_leaf=True)
    for a, e in zip(optree.tree_leaves(actual, none_is_leaf=True), optree.tree_leaves(expected, none_is_leaf=True)):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), e.contiguous().reshape(-1).view(torch.uint8))


def tmp_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*"))


def test_round_trip_is_bitwise_and_keeps_structure(tmp_path):
    state, meta = make_state(), {"loader": {"epoch": 2, "cursor": [3, 5]}, "seed": 0}
    path = save_checkpoint(tmp_path, 12, state, meta)
    assert path == tmp_path / "checkpoints" / "step_12"
    loaded, loaded_meta = load_checkpoint(path, fresh_like(state))
    assert_bitwise_equal(loaded, state)
    assert isinstance(loaded, State) and isinstance(loaded.opt_state[1], Moments)
    assert loaded.step.dim() == 0 and loaded.opt_state[1].count.dim() == 0
    assert loaded_meta == meta
    assert tmp_dirs(tmp_path) == []


def test_meta_json_describes_every_leaf_in_flatten_order(tmp_path):
    state = make_state()
    header = json.loads((save_checkpoint(tmp_path, 3, state, {"a": 1}) / "meta.json").read_text())
    assert {k: header[k] for k in ("format", "version", "step", "mstudio_version", "meta")} == {
        "format": "mstudio-checkpoint", "version": 2, "step": 3, "mstudio_version": "0.1.0", "meta": {"a": 1},
    }
    state_file = tmp_path / "checkpoints" / "step_3" / "state.safetensors"
    assert header["state_sha256"] == hashlib.sha256(state_file.read_bytes()).hexdigest()
    paths = [leaf["path"] for leaf in header["leaves"]]
    assert len(paths) == len(optree.tree_leaves(state, none_is_leaf=True))
    assert paths[0] == "params/net.fc.bias"  # optree sorts dict keys
    assert {"path": "opt_state/1/mu/net.fc.weight", "dtype": "float32", "shape": [3, 4]} in header["leaves"]
    assert {"path": "opt_state/1/nu/net.fc.bias", "none": True} in header["leaves"]
    assert {"path": "step", "dtype": "int64", "shape": []} in header["leaves"]
    stored = load_file(tmp_path / "checkpoints" / "step_3" / "state.safetensors")
    assert sorted(stored) == sorted(leaf["path"] for leaf in header["leaves"] if "none" not in leaf)


def test_keep_prunes_to_the_newest_steps(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, make_state(step), {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_5"]
    # A checkpoint older than `keep` newer ones survives its own save (resuming from an earlier step).
    save_checkpoint(tmp_path, 1, make_state(1), {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1", "step_4", "step_5"]
    assert tmp_dirs(tmp_path) == []


def test_keep_none_keeps_everything(tmp_path):
    for step in range(5):
        save_checkpoint(tmp_path, step, make_state(step), {}, keep=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{k}" for k in range(5)]


@pytest.mark.parametrize(("step", "keep", "match"), [(-1, 3, "step"), (1.0, 3, "step"), (1, 0, "keep"), (1, -2, "keep")])
def test_bad_step_or_keep_raises_before_writing(tmp_path, step, keep, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path, step, make_state(), {}, keep=keep)
    assert not (tmp_path / "checkpoints").exists()


def test_saving_an_existing_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 7, make_state(0), {"version": "old"})
    path = save_checkpoint(tmp_path, 7, make_state(1), {"version": "new"})
    loaded, meta = load_checkpoint(path, fresh_like(make_state()))
    assert_bitwise_equal(loaded, make_state(1))
    assert meta == {"version": "new"}
    assert list_checkpoints(tmp_path) == [path]
    assert tmp_dirs(tmp_path) == []


def test_latest_ignores_tmp_and_incomplete_dirs(tmp_path):
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    good = save_checkpoint(tmp_path, 1, make_state(), {})
    root = tmp_path / "checkpoints"
    shutil.copytree(good, root / f".tmp-step_9-{os.getpid()}-abcd")  # complete files, but not published
    (root / "step_7").mkdir()
    shutil.copy(good / "meta.json", root / "step_7")
    (root / "step_8").mkdir()
    shutil.copy(good / "state.safetensors", root / "step_8")
    shutil.copytree(good, root / "step_x")
    assert latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]


def test_steps_sort_numerically(tmp_path):
    for step in (10, 9, 100):
        save_checkpoint(tmp_path, step, make_state(), {}, keep=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_9", "step_10", "step_100"]
    assert latest_checkpoint(tmp_path).name == "step_100"


def test_stale_tmp_dirs_go_and_live_writers_stay(tmp_path):
    root = tmp_path / "checkpoints"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    names = {
        "dead": f".tmp-step_4-{dead_pid}-00ff",  # a writer that crashed
        "own": f".tmp-step_4-{os.getpid()}-00aa",  # an earlier process that had our pid: not in flight here
        "live": f".tmp-step_4-{os.getppid()}-00bb",  # a running process: possibly a concurrent writer
        "foreign": ".tmp-notes",  # not a name we write: left alone
    }
    for name in names.values():
        (root / name).mkdir(parents=True)
        (root / name / "state.safetensors").write_bytes(b"partial")
    save_checkpoint(tmp_path, 1, make_state(), {})
    assert tmp_dirs(tmp_path) == sorted([names["live"], names["foreign"]])


CHILD = r"""
import os, sys, time
import torch
from mstudio.trainer.checkpoint import save_checkpoint

run_dir = sys.argv[1]
save_checkpoint(run_dir, 1, {"w": torch.arange(1000.0), "big": torch.arange(8.0)}, {"at": 1})
# A stand-in for a slow disk: the publishing rename of step 2 never comes, so the parent's SIGKILL lands
# mid-save even when this machine is too busy for the parent to poll in time (normally it lands mid-write).
os.rename = lambda src, dst: time.sleep(600)
save_checkpoint(run_dir, 2, {"w": torch.arange(1000.0) + 1, "big": torch.ones(50_000_000)}, {"at": 2})  # 200 MB
"""


def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "checkpoints").glob(".tmp-step_2-*")):
            assert child.poll() is None, f"the child exited early: {child.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the child never started writing step 2"
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL  # reaped: its pid no longer exists
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()

    assert tmp_dirs(tmp_path) != [] and not (tmp_path / "checkpoints" / "step_2").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1"
    template = {"w": torch.zeros(1000), "big": torch.zeros(8)}
    loaded, meta = load_checkpoint(latest_checkpoint(tmp_path), template)
    assert_bitwise_equal(loaded, {"w": torch.arange(1000.0), "big": torch.arange(8.0)})
    assert meta == {"at": 1}

    save_checkpoint(tmp_path, 3, template, {"at": 3})
    assert tmp_dirs(tmp_path) == []
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1", "step_3"]


def _without(tree: dict, key: str) -> dict:
    return {k: v for k, v in tree.items() if k != key}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: {**t, "extra": torch.zeros(1)}, r"1 leaves missing .*'extra'"),
        (lambda t: _without(t, "b"), r"1 unexpected leaves .*'b'"),
        (lambda t: {**t, "a": torch.zeros(2, 3)}, r"'a': expected float32 \(2, 3\) .* found float32 \(3, 2\)"),
        (lambda t: {**t, "a": torch.zeros(3, 2, dtype=torch.float16)}, r"'a': expected float16 .* found float32"),
        (lambda t: {**t, "n": torch.zeros(1)}, r"'n': expected a tensor .* found None"),
        (lambda t: {**t, "b": None}, r"'b': expected None .* found a tensor"),
    ],
    ids=["missing", "unexpected", "shape", "dtype", "none-vs-tensor", "tensor-vs-none"],
)
def test_template_mismatch_names_the_path(tmp_path, edit, match):
    tree = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "n": None}
    path = save_checkpoint(tmp_path, 1, tree, {})
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, edit(tree))


def test_template_leaves_must_be_tensors(tmp_path):
    with pytest.raises(TypeError, match="'lr' is a float"):
        save_checkpoint(tmp_path, 1, {"lr": 0.1}, {})


@pytest.mark.parametrize("keep_bytes", [0, 7, 100, -3])
def test_truncated_state_raises_value_error_naming_the_file(tmp_path, keep_bytes):
    path = save_checkpoint(tmp_path, 1, make_state(), {})
    data = (path / "state.safetensors").read_bytes()
    (path / "state.safetensors").write_bytes(data[:keep_bytes])
    with pytest.raises(ValueError, match="state.safetensors"):
        load_checkpoint(path, fresh_like(make_state()))


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "checkpoints" / "step_1", {})
    path = save_checkpoint(tmp_path, 1, make_state(), {})
    (path / "state.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="state.safetensors is missing"):
        load_checkpoint(path, fresh_like(make_state()))
    (path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_checkpoint(path, fresh_like(make_state()))


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ('{"format": "mstudio-checkpoint", "version": 2, "le', "not valid JSON"),
        ('{"format": "something-else", "version": 2}', "format is 'something-else'"),
        ('{"format": "mstudio-checkpoint", "version": 3, "mstudio_version": "9.0"}', r"version 3 .* reads versions \[1, 2\]"),
        ('{"format": "mstudio-checkpoint", "version": 1}', "'leaves' must be"),
        ('{"format": "mstudio-checkpoint", "version": 2, "leaves": {}, "meta": {}}', "'leaves' must be .* corrupt"),
    ],
)
def test_bad_meta_json_raises_value_error(tmp_path, header, match):
    path = save_checkpoint(tmp_path, 1, make_state(), {})
    (path / "meta.json").write_text(header)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, fresh_like(make_state()))


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_pickled_state_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = save_checkpoint(tmp_path, 1, make_state(), {})
    torch.save({"params/net.fc.bias": Payload(marker)}, path / "state.safetensors")
    with pytest.raises(ValueError, match="state.safetensors"):
        load_checkpoint(path, fresh_like(make_state()))
    assert not marker.exists()
    # The payload is live: unpickling it runs the command (torch.load routes *.safetensors to safetensors).
    torch.load(shutil.copy(path / "state.safetensors", tmp_path / "payload.pt"), weights_only=False)
    assert marker.exists()


def test_export_policy_round_trip(tmp_path):
    source = torch.nn.Linear(3, 2)
    config = {"policy_kwargs": {"hidsize": 2048, "timesteps": 128}, "temperature": 1.0}
    path = export_policy(tmp_path / "run" / "policy.safetensors", source.state_dict(), config)
    assert path == tmp_path / "run" / "policy.safetensors"
    assert read_policy_config(path) == config
    with safe_open(path, framework="pt") as file:
        assert file.metadata()["format"] == "mstudio-policy"
    target = torch.nn.Linear(3, 2)
    target.load_state_dict(load_file(path))  # strict: exactly the module's keys
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    assert sorted(p.name for p in path.parent.iterdir()) == ["policy.safetensors"]  # no tmp file left


def test_export_policy_without_config_and_overwrite(tmp_path):
    path = tmp_path / "policy.safetensors"
    export_policy(path, {"w": torch.zeros(2)}, {"temperature": 2.0})
    export_policy(path, {"w": torch.ones(2)})
    assert read_policy_config(path) is None
    assert torch.equal(load_file(path)["w"], torch.ones(2))


def test_read_policy_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_policy_config(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_policy_config(tmp_path / "bad.safetensors")


def test_unserializable_meta_fails_before_touching_the_disk(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_checkpoint(tmp_path, 1, make_state(), {"loader": object()})
    assert not (tmp_path / "checkpoints").exists()


def test_a_failed_write_leaves_no_debris(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, 1, make_state(), {})

    def disk_full(file, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_durably", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, make_state(), {})
    assert tmp_dirs(tmp_path) == [] and checkpoint._IN_FLIGHT == set()
    assert list_checkpoints(tmp_path) == [first]


def test_a_version_1_checkpoint_without_a_digest_still_loads(tmp_path):
    path = save_checkpoint(tmp_path, 3, make_state(0), {"a": 1})
    header = json.loads((path / "meta.json").read_text())
    del header["state_sha256"]
    header["version"] = 1
    (path / "meta.json").write_text(json.dumps(header))
    state, meta = load_checkpoint(path, make_state(1))
    assert meta == {"a": 1}
    assert_bitwise_equal(state, make_state(0))
