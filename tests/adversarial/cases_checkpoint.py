"""Adversarial cases: checkpoints (``save_checkpoint``, ``load_checkpoint``, ``latest_checkpoint``, ``Trainer.resume``).

A checkpoint is damaged after it was written (random bytes, truncation, 64 zeroed bytes, a swapped or pickled
state file, a broken ``meta.json``), loaded against the wrong template, saved with bad arguments, or resumed
from a run whose files were edited. The resume cases copy one tiny finished run (3 eager steps, a checkpoint at
each), made once per process.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from mstudio.trainer import ConfigError, Trainer, config_from_dict
from mstudio.trainer.checkpoint import (
    export_policy,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from tests.adversarial.cases_config import store, tiny_run
from tests.adversarial.cases_weights import RunsCode, flip_bit, rewrite_header, truncate, zero_bytes
from tests.adversarial.harness import Case, DataLost, Handled, Refused


class Moments(NamedTuple):
    count: torch.Tensor
    mu: dict


def tree(seed: int = 0) -> dict:
    """A train-state-like tree: params, optimizer moments, a None leaf and a step counter."""
    generator = torch.Generator().manual_seed(seed)
    params = {"net.weight": torch.randn(16, 16, generator=generator), "net.bias": torch.randn(16, generator=generator)}
    return {"params": params, "opt": Moments(torch.tensor(3), {k: v * 2 for k, v in params.items()}),
            "memory": None, "step": torch.tensor(seed, dtype=torch.int64)}


def saved(tmp: Path, step: int = 4, seed: int = 0) -> Path:
    """``tree(seed)`` saved at ``step`` in the run ``tmp/run``; returns its ``step_<step>`` directory."""
    return save_checkpoint(tmp / "run", step, tree(seed), {"loader": {"epoch": 0, "batch": step}}, keep=None)


def _load(tmp: Path, damage: Callable[[Path], None] = lambda path: None, template: Any = None) -> tuple:
    path = saved(tmp)
    damage(path)
    return load_checkpoint(path, tree(1) if template is None else template)


def _in_state(corrupt: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda path: corrupt(path / "state.safetensors")


def edit_meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Damage for a step directory: ``edit(header)`` applied to its ``meta.json``."""
    def damage(path: Path) -> None:
        header = json.loads((path / "meta.json").read_text())
        edit(header)
        (path / "meta.json").write_text(json.dumps(header))
    return damage


def _bytes_of(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(data)


def _swap_state(path: Path) -> None:
    other = saved(path.parent.parent.parent / "other", seed=5)
    shutil.copy(other / "state.safetensors", path / "state.safetensors")


def _pickled_state(path: Path) -> None:
    torch.save({"params": RunsCode(path / "ran")}, path / "state.safetensors")


def _load_pickled(tmp: Path) -> tuple:
    path = saved(tmp)
    _pickled_state(path)
    try:
        return load_checkpoint(path, tree(1))
    finally:
        assert not (path / "ran").exists(), "the pickled state ran code"


def _rename_step(tmp: Path) -> tuple:
    path = saved(tmp)
    renamed = path.with_name("step_9")
    path.rename(renamed)
    return load_checkpoint(renamed, tree(1))


def _restored(result: tuple, tmp: Path) -> None:
    restored, meta = result
    expected = tree(0)
    assert torch.equal(restored["params"]["net.weight"], expected["params"]["net.weight"]), "params differ"
    assert restored["memory"] is None and meta == {"loader": {"epoch": 0, "batch": 4}}, f"meta differs: {meta}"


def _template(edit: Callable[[dict], None]) -> dict:
    template = tree(1)
    edit(template)
    return template


DAMAGE = [
    Case("checkpoint", "load/round-trip", _load, Handled(_restored)),
    Case("checkpoint", "state/random-bytes",
         functools.partial(_load, damage=_bytes_of("state.safetensors", bytes(range(256)) * 9)),
         Refused(ValueError, "state.safetensors", "corrupt")),
    Case("checkpoint", "state/empty", functools.partial(_load, damage=_bytes_of("state.safetensors", b"")),
         Refused(ValueError, "state.safetensors", "corrupt")),
    Case("checkpoint", "state/truncated", functools.partial(_load, damage=_in_state(lambda p: truncate(p, 0.6))),
         Refused(ValueError, "state.safetensors", "corrupt")),
    *[Case("checkpoint", f"state/zeroed-64-bytes-at-{int(f * 100)}%",
           functools.partial(_load, damage=_in_state(functools.partial(zero_bytes, fraction=f))),
           Refused(ValueError, "state.safetensors", "sha256", "expected", "found")) for f in (0.0, 0.5, 1.0)],
    Case("checkpoint", "state/one-bit-flipped", functools.partial(_load, damage=_in_state(lambda p: flip_bit(p, 0.3))),
         Refused(ValueError, "state.safetensors", "sha256", "expected", "found")),
    Case("checkpoint", "state/header-retyped", functools.partial(_load, damage=_in_state(lambda p: rewrite_header(
        p, lambda h: h["step"].update(dtype="F64")))), Refused(ValueError, "state.safetensors", "corrupt")),
    Case("checkpoint", "state/swapped-for-another-checkpoints", functools.partial(_load, damage=_swap_state),
         Refused(ValueError, "state.safetensors", "sha256", "expected", "found")),
    Case("checkpoint", "state/a-code-running-pickle", _load_pickled,
         Refused(ValueError, "state.safetensors", "corrupt")),
    Case("checkpoint", "state/missing", functools.partial(_load, damage=lambda p: (p / "state.safetensors").unlink()),
         Refused(FileNotFoundError, "state.safetensors", "missing")),
    Case("checkpoint", "meta/missing", functools.partial(_load, damage=lambda p: (p / "meta.json").unlink()),
         Refused(FileNotFoundError, "meta.json", "missing")),
    Case("checkpoint", "meta/truncated", functools.partial(
        _load, damage=lambda p: truncate(p / "meta.json", 0.5)), Refused(ValueError, "meta.json", "not valid JSON")),
    Case("checkpoint", "meta/random-bytes", functools.partial(_load, damage=_bytes_of("meta.json", bytes(range(256)))),
         Refused(ValueError, "meta.json", "not valid JSON")),
    Case("checkpoint", "meta/a-list", functools.partial(_load, damage=_bytes_of("meta.json", b"[1, 2]")),
         Refused(ValueError, "meta.json", "format", "mstudio-checkpoint")),
    Case("checkpoint", "meta/other-format", functools.partial(_load, damage=edit_meta(lambda h: h.update(format="x"))),
         Refused(ValueError, "meta.json", "'x'", "mstudio-checkpoint")),
    Case("checkpoint", "meta/future-version",
         functools.partial(_load, damage=edit_meta(lambda h: h.update(version=99))),
         Refused(ValueError, "meta.json", "version 99")),
    Case("checkpoint", "meta/no-leaves", functools.partial(_load, damage=edit_meta(lambda h: h.pop("leaves"))),
         Refused(ValueError, "meta.json", "leaves")),
    Case("checkpoint", "meta/meta-not-an-object",
         functools.partial(_load, damage=edit_meta(lambda h: h.update(meta=5))),
         Refused(ValueError, "meta.json", "'meta'", "object", "int")),
    Case("checkpoint", "meta/step-a-string", functools.partial(_load, damage=edit_meta(lambda h: h.update(step="4"))),
         Refused(ValueError, "meta.json", "step", "'4'")),
    Case("checkpoint", "meta/checksum-missing",
         functools.partial(_load, damage=edit_meta(lambda h: h.pop("state_sha256", None))),
         Refused(ValueError, "meta.json", "state_sha256")),
    Case("checkpoint", "meta/checksum-edited", functools.partial(
        _load, damage=edit_meta(lambda h: h.update(state_sha256="0" * 64))),
        Refused(ValueError, "state.safetensors", "sha256", "0" * 64)),
    Case("checkpoint", "meta/lists-a-leaf-the-state-lacks", functools.partial(
        _load, damage=edit_meta(lambda h: h["leaves"].append({"path": "extra", "dtype": "float32", "shape": [1]}))),
        Refused(ValueError, "extra", "template")),
    Case("checkpoint", "dir/renamed-to-another-step", _rename_step, Refused(ValueError, "step_9", "step 4")),
    Case("checkpoint", "template/different-shape", functools.partial(
        _load, template=_template(lambda t: t["params"].update({"net.bias": torch.zeros(8)}))),
        Refused(ValueError, "params/net.bias", "(8,)", "(16,)")),
    Case("checkpoint", "template/different-dtype", functools.partial(
        _load, template=_template(lambda t: t.update(step=torch.tensor(0, dtype=torch.int32)))),
        Refused(ValueError, "step", "int32", "int64")),
    Case("checkpoint", "template/extra-leaf", functools.partial(
        _load, template=_template(lambda t: t["params"].update({"net.scale": torch.ones(1)}))),
        Refused(ValueError, "params/net.scale", "missing")),
    Case("checkpoint", "template/tensor-for-none", functools.partial(
        _load, template=_template(lambda t: t.update(memory=torch.zeros(1)))),
        Refused(ValueError, "memory", "a tensor", "None")),
    Case("checkpoint", "load/not-a-directory", lambda tmp: load_checkpoint(saved(tmp) / "state.safetensors", tree(1)),
         Refused(FileNotFoundError, "state.safetensors", "checkpoint directory")),
]


# ---- saving: arguments, keep-K, step directory names ----------------------------------------------------------------

def _save(step: Any = 4, keep: Any = 3, leaf: Any = None, meta: Any = None) -> Callable[[Path], Path]:
    def run(tmp: Path) -> Path:
        state = tree()
        if leaf is not None:
            state["params"]["bad"] = leaf
        return save_checkpoint(tmp / "run", step, state, {} if meta is None else meta, keep=keep)
    return run


def _steps(run_dir: Path) -> list[int]:
    return [int(path.name.removeprefix("step_")) for path in list_checkpoints(run_dir)]


def _save_series(keep: Any, steps: tuple[int, ...] = (1, 2, 3, 4, 5)) -> Callable[[Path], list[int]]:
    def run(tmp: Path) -> list[int]:
        for step in steps:
            save_checkpoint(tmp / "run", step, tree(step), {}, keep=keep)
        return _steps(tmp / "run")
    return run


def _kept(expected: list[int]) -> Callable[[list[int], Path], None]:
    def check(steps: list[int], tmp: Path) -> None:
        if not set(expected) <= set(steps):
            raise DataLost(f"checkpoints {sorted(set(expected) - set(steps))} were deleted; kept {steps}")
        assert steps == expected, f"kept {steps}, expected {expected}"
        assert not list((tmp / "run" / "checkpoints").glob(".tmp-*")), "debris left behind"
    return check


def _saved_at(step: int) -> Callable[[Path, Path], None]:
    def check(path: Path, tmp: Path) -> None:
        assert path.name == f"step_{step}" and _steps(tmp / "run") == [step], f"saved {path}"
        assert json.loads((path / "meta.json").read_text())["step"] == step
    return check


def _into_file(tmp: Path) -> Path:
    (tmp / "run").write_text("a file")
    return save_checkpoint(tmp / "run", 1, tree(), {})


def _stray_dirs(names: tuple[str, ...]) -> Callable[[Path], Path | None]:
    def run(tmp: Path) -> Path | None:
        good = saved(tmp, step=3)
        for name in names:
            shutil.copytree(good, good.with_name(name))
        return latest_checkpoint(tmp / "run")
    return run


def _is_step_3(path: Path | None, tmp: Path) -> None:
    assert path is not None and path.name == "step_3", f"latest_checkpoint gave {path}, not step_3"


def _export_to_dir(tmp: Path) -> Path:
    (tmp / "policy.safetensors").mkdir()
    return export_policy(tmp / "policy.safetensors", tree()["params"])


SAVING = [
    *[Case("checkpoint", f"save/keep-{name}", _save(keep=keep), Refused(ValueError, "keep", ">= 1", repr(keep)))
      for name, keep in [("0", 0), ("minus-1", -1), ("true", True), ("1.5", 1.5), ("str", "3")]],
    *[Case("checkpoint", f"save/step-{name}", _save(step=step), Refused(ValueError, "step", ">= 0", repr(step)))
      for name, step in [("minus-1", -1), ("true", True), ("2.0", 2.0), ("str", "4")]],
    Case("checkpoint", "save/step-numpy-int", _save(step=np.int64(4), keep=np.int64(2)), Handled(_saved_at(4))),
    Case("checkpoint", "save/keep-1", _save_series(1), Handled(_kept([5]))),
    Case("checkpoint", "save/keep-2", _save_series(2), Handled(_kept([4, 5]))),
    Case("checkpoint", "save/keep-more-than-saved", _save_series(10), Handled(_kept([1, 2, 3, 4, 5]))),
    Case("checkpoint", "save/keep-none", _save_series(None), Handled(_kept([1, 2, 3, 4, 5]))),
    Case("checkpoint", "save/same-step-twice", _save_series(2, (1, 2, 2)), Handled(_kept([1, 2]))),
    Case("checkpoint", "save/leaf-not-a-tensor", _save(leaf=1.5), Refused(TypeError, "params/bad", "float")),
    Case("checkpoint", "save/meta-not-json", _save(meta={"when": object()}),
         Refused(TypeError, "meta", "JSON", "object")),
    Case("checkpoint", "save/run-dir-is-a-file", _into_file, Refused(OSError, "run")),
    Case("checkpoint", "dir/non-canonical-names-ignored",
         _stray_dirs(("step_007", "step_x", "step_-1", "Step_9", "step_8.bak")),
         Handled(_is_step_3)),
    Case("checkpoint", "export/onto-a-directory", _export_to_dir, Refused(OSError, "policy.safetensors")),
    Case("checkpoint", "export/value-not-a-tensor", lambda tmp: export_policy(tmp / "p.safetensors", {"w": [1.0]}),
         Refused(TypeError, "'w'", "list")),
    Case("checkpoint", "export/config-not-json",
         lambda tmp: export_policy(tmp / "p.safetensors", tree()["params"], {"x": {1, 2}}),
         Refused(TypeError, "config", "JSON", "set")),
]


# ---- resuming a tiny finished run whose files were damaged or edited ------------------------------------------------

_FINISHED: list[Path] = []  # the run finished_run made in this process, if any


def finished_run() -> Path:
    """A finished tiny eager run (3 steps, checkpoints step_1..3), made once per process (again if something
    deleted it); do not modify it."""
    if _FINISHED and (_FINISHED[0] / "policy.safetensors").is_file():
        return _FINISHED[0]
    root = Path(tempfile.mkdtemp(prefix="adversarial-finished-run-"))
    atexit.register(_remove_if_owner, root, os.getpid())
    table = tiny_run(root, store(root), run={"max_steps": 3, "ckpt_every": 1, "keep_checkpoints": 3})
    Trainer(config_from_dict(table)).fit()
    _FINISHED[:] = [root / "runs" / "run"]
    return _FINISHED[0]


def _remove_if_owner(root: Path, owner: int) -> None:
    # A child forked by another case inherits this handler: only the process that made the run removes it.
    if os.getpid() == owner:
        shutil.rmtree(root, ignore_errors=True)


def copy_run(tmp: Path) -> Path:
    """A copy of :func:`finished_run` in ``tmp/runs/run`` (its config still reads the shared store)."""
    run = tmp / "runs" / "run"
    shutil.copytree(finished_run(), run)
    return run


def _resume(damage: Callable[[Path], None], max_steps: int | None = 4) -> Callable[[Path], Trainer]:
    def run(tmp: Path) -> Trainer:
        run_dir = copy_run(tmp)
        damage(run_dir)
        return Trainer.resume(run_dir, max_steps=max_steps)
    return run


def in_newest(name: str, corrupt: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage for a copy of the finished run: ``corrupt(path)`` of the file ``name`` of its newest checkpoint."""
    return lambda run_dir: corrupt(run_dir / "checkpoints" / "step_3" / name)


def edit_config(old: str, new: str) -> Callable[[Path], None]:
    """Damage for a run directory: ``old`` replaced by ``new`` in its ``config.toml``."""
    def damage(run_dir: Path) -> None:
        path = run_dir / "config.toml"
        text = path.read_text()
        assert old in text, f"{old!r} not in config.toml"
        path.write_text(text.replace(old, new))
    return damage


def edit_newest_meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Damage for a run directory: ``edit(meta)`` of the caller's meta in its newest checkpoint's ``meta.json``."""
    return lambda run_dir: edit_meta(lambda h: edit(h["meta"]))(run_dir / "checkpoints" / "step_3")


def _resumed_at(step: int) -> Callable[[Trainer, Path], None]:
    def check(trainer: Trainer, tmp: Path) -> None:
        assert int(trainer.state.step) == step, f"resumed at step {int(trainer.state.step)}, not {step}"
    return check


def _tmp_debris(run_dir: Path) -> None:
    (run_dir / "checkpoints" / ".tmp-step_4-999999999-abcd").mkdir()


def _drop_state(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "step_3" / "state.safetensors").unlink()


RESUME = [
    Case("checkpoint", "resume/untouched", _resume(lambda run_dir: None), Handled(_resumed_at(3))),
    Case("checkpoint", "resume/tmp-debris-is-ignored", _resume(_tmp_debris), Handled(_resumed_at(3))),
    Case("checkpoint", "resume/incomplete-newest-falls-back", _resume(_drop_state), Handled(_resumed_at(2))),
    Case("checkpoint", "resume/newest-state-zeroed",
         _resume(in_newest("state.safetensors", functools.partial(zero_bytes, fraction=0.5))),
         Refused(ValueError, "step_3", "state.safetensors", "sha256", "expected", "found")),
    Case("checkpoint", "resume/newest-state-truncated",
         _resume(in_newest("state.safetensors", lambda p: truncate(p, 0.5))),
         Refused(ValueError, "step_3", "state.safetensors", "corrupt")),
    Case("checkpoint", "resume/newest-meta-truncated", _resume(in_newest("meta.json", lambda p: truncate(p, 0.5))),
         Refused(ValueError, "step_3", "meta.json", "not valid JSON")),
    Case("checkpoint", "resume/meta-lacks-loader", _resume(edit_newest_meta(lambda m: m.pop("loader"))),
         Refused(ValueError, "meta.json", "loader")),
    Case("checkpoint", "resume/meta-loader-garbage",
         _resume(edit_newest_meta(lambda m: m.update(loader={"epoch": "x"}))),
         Refused(ValueError, "meta.json", "loader", "'x'")),
    Case("checkpoint", "resume/config-lr-edited", _resume(edit_config("\"lr\" = 0.001", "\"lr\" = 0.5")),
         Refused(ConfigError, "optimizer.lr", "0.001", "0.5")),
    Case("checkpoint", "resume/config-other-preset", _resume(edit_config('"preset" = "tiny"', '"preset" = "small"')),
         Refused(ConfigError, "policy.preset", "'tiny'", "'small'")),
    Case("checkpoint", "resume/config-batch-size-edited", _resume(edit_config('"batch_size" = 1', '"batch_size" = 2')),
         Refused(ConfigError, "data.batch_size", "1", "2")),
    Case("checkpoint", "resume/config-toml-missing", _resume(lambda run_dir: (run_dir / "config.toml").unlink()),
         Refused(FileNotFoundError, "config.toml")),
    Case("checkpoint", "resume/config-toml-garbage",
         _resume(lambda run_dir: (run_dir / "config.toml").write_text("[run")),
         Refused(ConfigError, "config.toml", "not valid TOML")),
    Case("checkpoint", "resume/no-checkpoints", _resume(lambda run_dir: shutil.rmtree(run_dir / "checkpoints")),
         Refused(FileNotFoundError, "no checkpoint", "without --resume")),
]

CASES = DAMAGE + SAVING + RESUME
