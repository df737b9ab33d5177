"""Adversarial cases: training configs (``config_from_dict``, ``load_config``, TOML files, the Trainer's checks).

Every key of every table gets a value of the wrong type and values out of range; unknown and misspelt tables
and keys must be named with the close name suggested; a file that is not TOML, not UTF-8, missing or a
directory must be named. The last cases are configs that validate but cannot run (a missing store, a batch
larger than the data), refused by the Trainer before it trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mstudio.data import EpisodeStore, fill_store
from mstudio.trainer import ConfigError, TrainConfig, Trainer, config_from_dict, load_config
from mstudio.trainer.toml import dump_toml
from tests.adversarial.harness import Case, Handled, Refused


def _value(section: str, key: str, value: Any) -> TrainConfig:
    return config_from_dict({section: {key: value}})


def _refused(section: str, key: str, value: Any, *fragments: str, name: str = "") -> Case:
    """``[section] key = value`` must be refused naming ``section.key``, the value and ``fragments``."""
    where = f"{section}.{key}"
    return Case("config", f"{where}={name or repr(value)}", lambda tmp: _value(section, key, value),
                Refused(ConfigError, where, *fragments))


# (section, key, wrong value, the type expected): one wrong type per field.
WRONG_TYPES = [
    ("data", "store", 5, "str"), ("data", "window", "16", "int"), ("data", "batch_size", 2.5, "int"),
    ("data", "sampler", 1, "str"), ("data", "skip_frame", True, "int"), ("data", "num_workers", None, "int"),
    ("data", "val_episodes", [1], "int"), ("data", "drop_null", 1, "bool"), ("policy", "preset", 1, "str"),
    ("policy", "weights", True, "str"),
    ("optimizer", "lr", "1e-3", "float"), ("optimizer", "weight_decay", True, "float"),
    ("optimizer", "warmup_steps", 1.5, "int"), ("optimizer", "clip_norm", "1", "float"),
    ("optimizer", "betas", 0.9, "a list of 2"), ("optimizer", "betas", [0.9], "a list of 2"),
    ("optimizer", "eps", None, "float"), ("run", "name", 5, "str"), ("run", "out", 1, "str"),
    ("run", "max_steps", "300", "int"), ("run", "log_every", 1.0, "int"), ("run", "val_every", True, "int"),
    ("run", "val_batches", [], "int"), ("run", "ckpt_every", "10", "int"), ("run", "keep_checkpoints", 2.0, "int"),
    ("run", "ema_decay", "0.9", "float"), ("run", "compile", "false", "bool"), ("run", "compile", 0, "bool"),
    ("run", "seed", 1.5, "int"),
]

# (section, key, value, what is allowed): values of the right type out of range.
OUT_OF_RANGE = [
    ("data", "window", 0, ">= 1"), ("data", "batch_size", -1, ">= 1"), ("data", "skip_frame", 0, ">= 1"),
    ("data", "num_workers", -1, ">= 0"), ("data", "val_episodes", -1, ">= 0"),
    ("data", "sampler", "Continuous", "'continuous', 'random'"), ("data", "store", "", "non-empty"),
    ("policy", "preset", "4x", "'tiny'"), ("policy", "weights", "", "non-empty"),
    ("optimizer", "lr", -1.0, ">= 0"), ("optimizer", "lr", math.inf, "finite"), ("optimizer", "lr", math.nan, "finite"),
    ("optimizer", "weight_decay", -0.1, ">= 0"), ("optimizer", "weight_decay", math.nan, "finite"),
    ("optimizer", "warmup_steps", -1, ">= 0"), ("optimizer", "clip_norm", 0.0, "> 0"),
    ("optimizer", "clip_norm", math.nan, "> 0"), ("optimizer", "betas", [1.0, 0.999], "[0, 1)"),
    ("optimizer", "betas", [0.9, math.nan], "[0, 1)"), ("optimizer", "eps", 0.0, "> 0"),
    ("optimizer", "eps", math.inf, "finite"), ("optimizer", "eps", math.nan, "> 0"),
    ("run", "max_steps", 0, ">= 1"), ("run", "log_every", 0, ">= 1"), ("run", "val_every", -1, ">= 0"),
    ("run", "val_batches", 0, ">= 1"), ("run", "ckpt_every", -1, ">= 0"), ("run", "keep_checkpoints", 0, ">= 1"),
    ("run", "ema_decay", 1.0, "[0, 1)"), ("run", "ema_decay", -0.1, "[0, 1)"), ("run", "ema_decay", math.nan, "[0, 1)"),
    ("run", "seed", -1, ">= 0"), ("run", "seed", 2**64, "< 2**64"), ("run", "name", "", "directory name"),
    ("run", "name", "a/b", "directory name"), ("run", "name", "..", "directory name"), ("run", "out", "", "non-empty"),
    ("objectives", "behavior_clone", -1.0, ">= 0"), ("objectives", "behavior_clone", math.nan, "finite"),
    ("objectives", "behavior_clone", math.inf, "finite"), ("objectives", "behavior_clone", "1", "float"),
]


def _table(table: Any) -> Any:
    return lambda tmp: config_from_dict(table)


def _toml_file(text: str | bytes) -> Any:
    """A case that loads ``text`` as ``tmp/run.toml``."""
    def run(tmp: Path) -> TrainConfig:
        path = tmp / "run.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return load_config(path)
    return run


def _load_missing(tmp: Path) -> TrainConfig:
    return load_config(tmp / "missing.toml")


def _load_dir(tmp: Path) -> TrainConfig:
    (tmp / "configs").mkdir()
    return load_config(tmp / "configs")


def _is_default(config: TrainConfig, tmp: Path) -> None:
    del tmp
    assert config == TrainConfig(), f"an empty config should give the defaults, got {config}"


def _round_trip(tmp: Path) -> tuple[TrainConfig, TrainConfig]:
    config = config_from_dict({"data": {"window": 8}, "optimizer": {"lr": 1, "betas": [0.5, 0.6], "clip_norm": 1.0},
                               "objectives": {"behavior_clone": 1, "kl_gaussian": 0.5}, "run": {"ema_decay": 0.9}})
    path = tmp / "run.toml"
    path.write_text(dump_toml(config.to_dict()))
    return config, load_config(path)


def _same(pair: tuple[TrainConfig, TrainConfig], tmp: Path) -> None:
    del tmp
    assert pair[0] == pair[1], f"the TOML round trip changed the config: {pair[0]} -> {pair[1]}"
    assert pair[0].optimizer.lr == 1.0 and isinstance(pair[0].optimizer.lr, float), "lr = 1 should be the float 1.0"


TABLES = [
    Case("config", "table/not-a-mapping", _table([("run", {})]), Refused(ConfigError, "table", "list")),
    Case("config", "table/unknown-section", _table({"trainer": {}}), Refused(ConfigError, "trainer", "allowed", "run")),
    Case("config", "table/misspelt-section", _table({"optimiser": {"lr": 1e-3}}),
         Refused(ConfigError, "optimiser", "did you mean 'optimizer'")),
    Case("config", "table/key-outside-a-section", _table({"lr": 1e-3}), Refused(ConfigError, "lr", "allowed")),
    Case("config", "table/section-not-a-table", _table({"run": 5}), Refused(ConfigError, "run", "table", "int 5")),
    Case("config", "table/objectives-not-a-table", _table({"objectives": "behavior_clone"}),
         Refused(ConfigError, "objectives", "table", "'behavior_clone'")),
    Case("config", "table/objectives-empty", _table({"objectives": {}}),
         Refused(ConfigError, "objectives", "at least one", "{}")),
    Case("config", "table/objectives-all-zero", _table({"objectives": {"behavior_clone": 0.0}}),
         Refused(ConfigError, "objectives", "> 0", "behavior_clone")),
    Case("config", "table/objective-misspelt", _table({"objectives": {"behaviour_clone": 1.0}}),
         Refused(ConfigError, "behaviour_clone", "did you mean 'behavior_clone'")),
    Case("config", "table/objective-unknown", _table({"objectives": {"ppo": 1.0}}),
         Refused(ConfigError, "objectives", "'ppo'", "behavior_clone", "kl_gaussian")),
    Case("config", "table/misspelt-key", _table({"run": {"max_step": 3}}),
         Refused(ConfigError, "run", "max_step", "did you mean 'max_steps'")),
    Case("config", "table/misspelt-key-2", _table({"data": {"batchsize": 3}}),
         Refused(ConfigError, "data", "batchsize", "did you mean 'batch_size'")),
    Case("config", "table/unknown-key", _table({"optimizer": {"momentum": 0.9}}),
         Refused(ConfigError, "optimizer", "momentum", "allowed", "betas")),
    Case("config", "table/int-for-float-is-fine", _round_trip, Handled(_same)),
    *[_refused(section, key, value, f"expected {expected}", name=f"{type(value).__name__}-{value!r}")
      for section, key, value, expected in WRONG_TYPES],
    *[_refused(section, key, value, allowed) for section, key, value, allowed in OUT_OF_RANGE],
]

FILES = [
    Case("config", "toml/malformed", _toml_file("[run\nmax_steps = 3\n"),
         Refused(ConfigError, "run.toml", "not valid TOML", "line 1")),
    Case("config", "toml/duplicate-key", _toml_file("[run]\nseed = 1\nseed = 2\n"),
         Refused(ConfigError, "run.toml", "not valid TOML")),
    Case("config", "toml/not-utf8", _toml_file(b"[run]\nname = \"\xff\xfe\"\n"),
         Refused(ConfigError, "run.toml", "UTF-8")),
    Case("config", "toml/binary-garbage", _toml_file(bytes(range(256))), Refused(ConfigError, "run.toml")),
    Case("config", "toml/missing-file", _load_missing, Refused(ConfigError, "missing.toml", "does not exist")),
    Case("config", "toml/a-directory", _load_dir, Refused(ConfigError, "configs", "directory")),
    Case("config", "toml/empty-file-gives-defaults", _toml_file(""), Handled(_is_default)),
    Case("config", "toml/bad-value-names-the-key", _toml_file("[data]\nwindow = \"16\"\n"),
         Refused(ConfigError, "data.window", "expected int", "'16'")),
]


# ---- configs that validate but cannot run: refused by the Trainer before any training -------------------------------

def store(tmp: Path, episodes: int = 3, size: tuple[int, int] = (64, 64)) -> Path:
    """A small learnable episode store at ``tmp/store`` (8 to 12 frames per episode)."""
    path = tmp / "store"
    fill_store(EpisodeStore.create(path, size), episodes=episodes, frames=(8, 12), seed=1, vocabulary=8)
    return path


def tiny_run(tmp: Path, store_path: Path | str | None, **sections: dict) -> dict:
    """The table of a tiny eager run in ``tmp`` on ``store_path``, ``sections`` merged into its tables."""
    table = {"data": {"batch_size": 1, "window": 2, "val_episodes": 0},
             "run": {"out": str(tmp / "runs"), "name": "run", "compile": False, "log_every": 1, "max_steps": 2}}
    if store_path is not None:
        table["data"]["store"] = str(store_path)
    for section, entries in sections.items():
        table[section] = {**table.get(section, {}), **entries}
    return table


def _trainer(make_store: bool = True, **sections: dict) -> Any:
    def run(tmp: Path) -> Trainer:
        return Trainer(config_from_dict(tiny_run(tmp, store(tmp) if make_store else None, **sections)))
    return run


def _missing_store(tmp: Path) -> Trainer:
    return Trainer(config_from_dict(tiny_run(tmp, tmp / "nowhere")))


def _store_is_file(tmp: Path) -> Trainer:
    (tmp / "store.txt").write_text("not a store")
    return Trainer(config_from_dict(tiny_run(tmp, tmp / "store.txt")))


def _out_is_file(tmp: Path) -> Trainer:
    (tmp / "runs").write_text("a file")
    return Trainer(config_from_dict(tiny_run(tmp, store(tmp))))


def _wrong_resolution(tmp: Path) -> Trainer:
    return Trainer(config_from_dict(tiny_run(tmp, store(tmp, size=(32, 32)))))


def _missing_weights(tmp: Path) -> Trainer:
    return Trainer(config_from_dict(tiny_run(tmp, None, policy={"weights": str(tmp / "policy.safetensors")})))


def _no_run_dir(trainer: Trainer, tmp: Path) -> None:
    assert not (tmp / "runs").exists(), "refusing the config must not create the run directory"


TRAINER = [
    Case("config", "trainer/store-missing", _missing_store,
         Refused(ConfigError, "data.store", "nowhere", "manifest.json")),
    Case("config", "trainer/store-is-a-file", _store_is_file, Refused(ConfigError, "data.store", "store.txt")),
    Case("config", "trainer/out-is-a-file", _out_is_file, Refused(ConfigError, "run.out", "runs", "not a directory")),
    Case("config", "trainer/store-resolution", _wrong_resolution,
         Refused(ConfigError, "data.store", "(32, 32)", "(64, 64)")),
    Case("config", "trainer/weights-missing", _missing_weights,
         Refused(ConfigError, "policy.weights", "policy.safetensors", "does not exist")),
    Case("config", "trainer/batch-larger-than-episodes", _trainer(data={"batch_size": 8}),
         Refused(ConfigError, "batch_size", "8", "3 training episodes")),
    Case("config", "trainer/window-longer-than-episodes-pads", _trainer(data={"window": 64}), Handled(_no_run_dir)),
    Case("config", "trainer/val-episodes-take-all", _trainer(data={"val_episodes": 3, "batch_size": 2}),
         Refused(ConfigError, "val_episodes", "3")),
    Case("config", "trainer/valid-tiny-run-builds", _trainer(), Handled(_no_run_dir)),
]

CASES = TABLES + FILES + TRAINER
