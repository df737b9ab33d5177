"""The ``mstudio train`` and ``mstudio eval`` commands: resume after SIGKILL, errors, eval, reproducibility.

Runs are tiny and eager (VPT ``tiny``, B=2, T=4, ``--no-compile``) on CPU. Runs that must be bit-identical to
each other run in the same kind of process (all in subprocesses, or all in this one), so they share torch's
thread settings.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mstudio.cli import main
from mstudio.data import EpisodeContinuous, EpisodeStore, Loader, WindowDataset, fill_store
from mstudio.train.evaluate import init_eval_carry, make_eval_step
from mstudio.trainer import Trainer, evaluate_checkpoint
from mstudio.trainer.checkpoint import latest_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[2]
TINY = "[data]\nbatch_size = 2\nwindow = 4\n{data}\n[run]\nlog_every = 1\nval_batches = 2\n{run}\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One ``--out`` for the module's runs on the built-in store, so that store is made once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """7 short learnable episodes at the tiny policy's 64x64: 16 train batches per epoch (B=2, T=4), 1 held out."""
    path = tmp_path_factory.mktemp("store") / "store"
    fill_store(EpisodeStore.create(path, (64, 64)), episodes=7, frames=(16, 28), seed=1, vocabulary=8)
    return path


def write_config(path: Path, data: str = "", run: str = "") -> Path:
    path.write_text(TINY.format(data=data, run=run))
    return path


def run_cli(*args: str, **popen) -> subprocess.Popen:
    """``python -m mstudio <args>`` in a subprocess (stdout and stderr piped)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "mstudio", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def assert_files_equal(a: Path, b: Path, prefix: str = "") -> None:
    """Every tensor of two safetensors files whose name starts with ``prefix`` is equal."""
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name in (name for name in first if name.startswith(prefix)):
        assert torch.equal(first[name], second[name]), f"{name} differs between {a} and {b}"


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as file:
        return file.metadata()


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


class Progress:
    """The highest step count tqdm has printed on a process's stderr so far."""

    def __init__(self, process: subprocess.Popen, total: int):
        self.step, self._pattern = 0, re.compile(rb"(\d+)/%d" % total)
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            steps = [int(match) for match in self._pattern.findall(chunk)]
            self.step = max([self.step, *steps])


def start_run(config: Path, name: str, *, past_step: int, checkpoint: bool) -> tuple[subprocess.Popen, Progress]:
    """``mstudio train`` in a subprocess, returned once it has gone past ``past_step`` (and, with ``checkpoint``,
    written a checkpoint)."""
    # A shell that starts the test suite in the background leaves SIGINT ignored in its children, and Python
    # then installs no KeyboardInterrupt handler: give the run the default disposition, as a terminal would.
    process = run_cli("train", "--config", config, "--name", name,
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    progress = Progress(process, total=1000)
    run_dir, deadline = config.parent / name, time.monotonic() + 300
    while progress.step < past_step or (checkpoint and not list_checkpoints(run_dir)):
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended or never passed {past_step}"
        time.sleep(0.01)
    return process, progress


def test_resume_after_sigkill_between_checkpoints_is_exact(tmp_path, store):
    config = write_config(tmp_path / "run.toml", f'store = "{store}"\nval_episodes = 1',
                          f'out = "{tmp_path}"\ncompile = false\nckpt_every = 5\nval_every = 3\nmax_steps = 1000')
    killed, progress = start_run(config, "killed", past_step=7, checkpoint=True)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = int(latest_checkpoint(tmp_path / "killed").name.removeprefix("step_"))
    assert progress.step > saved, "killed at a checkpoint, not between two"

    total = saved + 14  # past the end of epoch 0 (16 batches), ending between checkpoints
    finish(run_cli("train", "--resume", tmp_path / "killed", "--max-steps", total))
    finish(run_cli("train", "--config", config, "--name", "straight", "--max-steps", total))

    assert_files_equal(tmp_path / "killed" / "policy.safetensors", tmp_path / "straight" / "policy.safetensors")
    final = [tmp_path / name / "checkpoints" / f"step_{total}" / "state.safetensors" for name in ("killed", "straight")]
    assert_files_equal(*final)  # the TrainState and the RNG state saved beside it
    # TensorBoard hides what the killed process logged past its checkpoint: one point per step, as uninterrupted
    assert scalars(tmp_path / "killed", "train/loss") == scalars(tmp_path / "straight", "train/loss")


def test_ctrl_c_saves_a_checkpoint_to_resume_from_exactly(tmp_path, store):
    config = write_config(tmp_path / "run.toml", f'store = "{store}"\nval_episodes = 1',
                          f'out = "{tmp_path}"\ncompile = false\nckpt_every = 100\nval_every = 3\nmax_steps = 1000')
    interrupted, _ = start_run(config, "interrupted", past_step=7, checkpoint=False)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=120) == 130
    saved = int(latest_checkpoint(tmp_path / "interrupted").name.removeprefix("step_"))
    assert saved >= 7  # no periodic checkpoint before step 100: this one is the interrupt's

    total = saved + 5
    finish(run_cli("train", "--resume", tmp_path / "interrupted", "--max-steps", total))
    finish(run_cli("train", "--config", config, "--name", "straight", "--max-steps", total))
    final = [tmp_path / name / "checkpoints" / f"step_{total}" / "state.safetensors"
             for name in ("interrupted", "straight")]
    assert_files_equal(*final)


BAD_COMMANDS = [
    # (arguments, files to write, what stderr must name)
    (["--out", "{tmp}/out", "--config", "{tmp}/missing.toml"], {}, "config file .*missing.toml does not exist"),
    (["--out", "{tmp}/out", "--config", "{tmp}/bad.toml"], {"bad.toml": "[run\n"}, "bad.toml is not valid TOML"),
    (["--out", "{tmp}/out", "--config", "{tmp}/key.toml"], {"key.toml": "[run]\nmax_step = 3\n"},
     r"run: unknown key\(s\) 'max_step' \(did you mean 'max_steps'\?\)"),
    (["--out", "{tmp}/out", "--max-steps", "0"], {}, "run.max_steps: must be an integer >= 1, got 0"),
    (["--out", "{tmp}/out", "--ckpt-every", "-1"], {}, "run.ckpt_every: must be an integer >= 0, got -1"),
    (["--resume", "{tmp}/out/x", "--seed", "1", "--no-compile"], {}, "only --max-steps .* got --seed, --no-compile"),
    (["--resume", "{tmp}/nowhere"], {}, "config.toml not found"),
]


@pytest.mark.parametrize("args, files, message", BAD_COMMANDS,
                         ids=[" ".join(a[2:] if a[0] == "--out" else a) for a, _, _ in BAD_COMMANDS])
def test_train_errors_exit_2_before_any_work(tmp_path, capsys, args, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert main(["train", *args]) == 2
    stdout, stderr = capsys.readouterr()
    assert stderr.startswith("mstudio train: error: ") and re.search(message, stderr), stderr
    assert stdout == ""
    assert not (tmp_path / "out").exists()


def test_python_m_mstudio_exits_2_on_a_bad_config(tmp_path):
    process = run_cli("train", "--out", tmp_path / "out", "--config", tmp_path / "missing.toml")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.decode().startswith("mstudio train: error: config file") and b"Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def printed_run_dir(stdout: str) -> Path:
    (first, last) = re.findall(r"^run directory: (.+)$", stdout, re.MULTILINE)
    assert first == last
    return Path(first)


def test_same_command_twice_gives_identical_policies(tmp_path, out, capsys):
    command = ["train", "--config", str(write_config(tmp_path / "run.toml")), "--out", str(out), "--max-steps", "4",
               "--no-compile"]
    policies = []
    for _ in range(2):
        assert main(command) == 0
        stdout = capsys.readouterr().out
        assert re.search(r"^done: 4 steps in .* s; train loss .* -> .*; val loss .*; policy .*policy\.safetensors$",
                         stdout, re.MULTILINE), stdout
        policies.append(printed_run_dir(stdout) / "policy.safetensors")
    assert policies[0] != policies[1]  # no --name: two time-stamped run directories
    assert_files_equal(*policies)
    # Not the file bytes: safetensors writes metadata keys in random order (safetensors/safetensors#584).
    assert metadata(policies[0]) == metadata(policies[1])


@pytest.fixture(scope="module")
def finished(out, tmp_path_factory) -> Path:
    """A finished 3-step run on the built-in store, with an EMA."""
    config = write_config(tmp_path_factory.mktemp("config") / "run.toml", run="ema_decay = 0.5")
    assert main(["train", "--config", str(config), "--out", str(out), "--name", "finished", "--max-steps", "3",
                 "--no-compile"]) == 0
    return out / "finished"


def test_resume_cannot_go_back(finished, capsys):
    assert main(["train", "--resume", str(finished), "--max-steps", "2"]) == 2
    assert "mstudio train: error: --max-steps: the run's newest checkpoint is at step 3" in capsys.readouterr().err
    assert [path.name for path in list_checkpoints(finished)] == ["step_3"]


def test_eval_prints_the_mean_validation_metrics(finished, out, capsys):
    store = next(out.glob(".synthetic-*"))
    capsys.readouterr()
    assert main(["eval", str(finished), "--data", str(store), "--batches", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"checkpoint {finished / 'checkpoints' / 'step_3'}")
    printed = {key: float(value) for key, value in (line.split(" = ") for line in lines[1:])}

    trainer = Trainer.resume(finished)  # the run's policy and objective at its checkpoint
    episodes = EpisodeStore.open(store)
    loader = Loader(WindowDataset(episodes, 4, episodes.episode_ids), EpisodeContinuous(2, shuffle=False))
    carry = init_eval_carry(trainer.policy, 2)
    eval_step = make_eval_step(trainer.policy, trainer.objective)
    totals: dict[str, float] = {}
    for _, batch in zip(range(5), loader):
        carry, metrics = eval_step(trainer.state, carry, batch, use_ema=True)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value.item()
    assert printed == {key: total / 5 for key, total in totals.items()}
    assert {"loss", "camera_loss", "button_loss", "entropy"} <= set(printed)


def test_evaluate_checkpoint_takes_a_whole_epoch_and_keeps_the_callers_rng(finished, store):
    rng = torch.get_rng_state()
    whole = evaluate_checkpoint(finished / "checkpoints" / "step_3", EpisodeStore.open(store))
    assert torch.equal(torch.get_rng_state(), rng)
    episodes = EpisodeStore.open(store)
    count = len(Loader(WindowDataset(episodes, 4, episodes.episode_ids), EpisodeContinuous(2, shuffle=False)))
    assert evaluate_checkpoint(finished, store, batches=count) == whole
    assert evaluate_checkpoint(finished, store, batches=count + 100) == whole
    with pytest.raises(ValueError, match="batches must be >= 1"):
        evaluate_checkpoint(finished, store, batches=0)


def test_eval_errors(finished, store, capsys):
    assert main(["eval", str(finished.parent), "--data", str(store)]) == 2  # not a run directory
    assert "mstudio eval: error: " in capsys.readouterr().err
