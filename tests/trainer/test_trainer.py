"""The Trainer: exact resume, TensorBoard tags, validation's own memory, config errors, the VPT fine-tune example.

Every run is tiny and eager (VPT ``tiny``, B=2, T=4, ``run.compile = false``) on CPU.
"""

import json
import shutil
import time
import tomllib
from pathlib import Path

import optree
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mstudio.data import EpisodeStore, fill_store
from mstudio.models import VPTPolicy
from mstudio.models.vpt.config import VPTConfig
from mstudio.trainer import ConfigError, Trainer, config_from_dict, load_config
from mstudio.trainer.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_meta
from mstudio.trainer.toml import dump_toml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "finetune_vpt.toml"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """7 short learnable episodes at the tiny policy's 64x64: 16 train batches per epoch (B=2, T=4), 1 held out."""
    path = tmp_path_factory.mktemp("store") / "store"
    fill_store(EpisodeStore.create(path, (64, 64)), episodes=7, frames=(16, 28), seed=1, vocabulary=8)
    return path


def tiny(out: Path, name: str, store: Path, **run) -> dict:
    """A tiny eager run's config table."""
    return {"data": {"store": str(store), "batch_size": 2, "window": 4, "val_episodes": 1},
            "run": {"out": str(out), "name": name, "compile": False, "log_every": 1, "val_batches": 2, **run}}


def assert_trees_equal(a, b) -> None:
    paths, leaves_a, spec_a = optree.tree_flatten_with_path(a, none_is_leaf=True)
    _, leaves_b, spec_b = optree.tree_flatten_with_path(b, none_is_leaf=True)
    assert spec_a == spec_b
    for path, x, y in zip(paths, leaves_a, leaves_b):
        assert (x is None and y is None) or torch.equal(x, y), f"leaf {path} differs"


def assert_policies_equal(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_resume_is_bitwise_exact_mid_epoch(tmp_path, store):
    # 16 batches per epoch: the run stops at step 10 (mid-epoch; checkpoints at 3, 6, 9 and the final 10, which
    # ckpt_every does not divide) and resumes through the epoch boundary to 20.
    run = dict(ckpt_every=3, val_every=4, ema_decay=0.9, keep_checkpoints=2)
    interrupted = Trainer(config_from_dict(tiny(tmp_path, "interrupted", store, max_steps=10, **run)))
    assert len(interrupted.loader) == 16
    interrupted.fit()
    assert read_checkpoint_meta(latest_checkpoint(tmp_path / "interrupted"))["loader"] == {"epoch": 0, "batch": 10}

    resumed = Trainer.resume(tmp_path / "interrupted", max_steps=20)
    assert int(resumed.state.step) == 10
    resumed.fit()
    straight = Trainer(config_from_dict(tiny(tmp_path, "straight", store, max_steps=20, **run)))
    straight.fit()

    assert resumed.loader.state_dict() == straight.loader.state_dict() == {"epoch": 1, "batch": 4}
    assert_trees_equal(resumed.state, straight.state)
    assert_policies_equal(tmp_path / "interrupted" / "policy.safetensors", tmp_path / "straight" / "policy.safetensors")
    # the whole checkpoint, the RNG state included, is the one the uninterrupted run wrote
    template = straight._checkpoint_tree()
    final = [load_checkpoint(latest_checkpoint(tmp_path / run_name), template)[0] for run_name in ("interrupted", "straight")]
    assert_trees_equal(*final)


def test_event_files_hold_train_and_val_scalars_and_hparams(tmp_path, store):
    Trainer(config_from_dict(tiny(tmp_path, "events", store, max_steps=3, val_every=2))).fit()
    events = EventAccumulator(str(tmp_path / "events"))
    events.Reload()
    expected = {"train/loss", "train/camera_loss", "train/button_loss", "train/entropy", "train/bc_weight",
                "train/lr", "train/grad_norm", "train/frames_per_s", "train/skipped_updates", "val/loss"}
    assert expected <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]
    assert [event.step for event in events.Scalars("val/loss")] == [2, 3]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))


def test_throughput_leaves_out_the_first_step_validation_and_checkpoints(tmp_path, store, monkeypatch):
    # Validation and checkpoints each stall 1 s here; the rates count only the steps' own time, so a step of the
    # tiny policy (well under 1 s) gives more than 1 step/s, where counting the stalls would give under 0.5.
    trainer = Trainer(config_from_dict(tiny(tmp_path, "rates", store, max_steps=4, val_every=1, ckpt_every=1)))
    validate, save = trainer.validate, trainer._save

    def slow(run):
        def wrapped():
            time.sleep(1.0)
            return run()
        return wrapped

    monkeypatch.setattr(trainer, "validate", slow(validate))
    monkeypatch.setattr(trainer, "_save", slow(save))
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "rates"))
    events.Reload()
    rates = events.Scalars("train/steps_per_s")
    assert [e.step for e in rates] == [2, 3, 4]  # the first step (a compile, on a fresh process) has no rate
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert all(e.value > 1.0 for e in rates), [e.value for e in rates]
    frames = events.Scalars("train/frames_per_s")
    assert [f.value for f in frames] == pytest.approx([r.value * 2 * 4 for r in rates])  # B 2 x T 4 frames a step


def test_the_bar_says_the_step_is_compiling_until_its_first_call_returns(tmp_path, store, monkeypatch):
    import mstudio.trainer.loop as loop

    trainer = Trainer(config_from_dict(tiny(tmp_path, "bar", store, max_steps=2, val_every=0)))
    eager = trainer.step

    class NotYetCompiled:  # stands for a compiled step before its first call, and runs the eager one
        compile, built = True, False

        def __call__(self, *args, **kwargs):
            return eager(*args, **kwargs)

    trainer.step = NotYetCompiled()
    postfixes, make_bar = [], loop.tqdm

    def recording_bar(*args, **kwargs):
        bar = make_bar(*args, **kwargs)
        set_postfix_str = bar.set_postfix_str
        bar.set_postfix_str = lambda text="", refresh=True: (postfixes.append(text), set_postfix_str(text, refresh))
        return bar

    monkeypatch.setattr(loop, "tqdm", recording_bar)
    trainer.fit()
    assert postfixes[0].startswith("compiling the step") and postfixes[1] == ""


def test_research_diagnostics_are_logged_every_n_steps_and_change_no_training(tmp_path, store):
    table = tiny(tmp_path, "research", store, max_steps=5, val_every=0)
    with_research = Trainer(config_from_dict({**table, "research": {"every": 2}}))
    with_research.fit()
    plain = Trainer(config_from_dict(tiny(tmp_path, "plain", store, max_steps=5, val_every=0)))
    plain.fit()
    assert_trees_equal(with_research.state, plain.state)  # the pass reads the state and changes nothing
    events = EventAccumulator(str(tmp_path / "research"))
    events.Reload()
    tags = {tag for tag in events.Tags()["scalars"] if tag.startswith("research/")}
    assert tags == {"research/loss/behavior_clone", "research/loss/behavior_clone.camera",
                    "research/loss/behavior_clone.buttons", "research/grad_norm/behavior_clone",
                    "research/grad_norm/behavior_clone.camera", "research/grad_norm/behavior_clone.buttons",
                    "research/grad_cosine/behavior_clone__behavior_clone.camera",
                    "research/grad_cosine/behavior_clone__behavior_clone.buttons",
                    "research/grad_cosine/behavior_clone.camera__behavior_clone.buttons"}
    assert [e.step for e in events.Scalars("research/grad_norm/behavior_clone")] == [0, 2, 4]
    # BC is the sum of its camera and button terms: its loss is theirs added up
    first = {tag: events.Scalars(f"research/loss/{tag}")[0].value
             for tag in ("behavior_clone", "behavior_clone.camera", "behavior_clone.buttons")}
    assert first["behavior_clone"] == pytest.approx(first["behavior_clone.camera"] + first["behavior_clone.buttons"],
                                                    rel=1e-5)


def test_resumed_run_replaces_the_events_logged_after_its_checkpoint(tmp_path, store):
    Trainer(config_from_dict(tiny(tmp_path, "replayed", store, max_steps=6, ckpt_every=3))).fit()
    shutil.rmtree(tmp_path / "replayed" / "checkpoints" / "step_6")  # as if killed before saving step 6
    Trainer.resume(tmp_path / "replayed").fit()  # steps 4 to 6 again, in a second event file
    assert len(list((tmp_path / "replayed").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(tmp_path / "replayed"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_validation_leaves_training_memory_alone(tmp_path, store):
    config = config_from_dict(tiny(tmp_path, "validate", store))
    validated, plain = Trainer(config), Trainer(config)
    batches, plain_batches = iter(validated.loader), iter(plain.loader)
    for _ in range(2):
        validated.state, _ = validated.step(validated.state, next(batches))
        plain.state, _ = plain.step(plain.state, next(plain_batches))
    memory = optree.tree_map(torch.clone, validated.state.memory)

    metrics = validated.validate()
    assert metrics["loss"] > 0
    assert_trees_equal(validated.state.memory, memory)

    validated.state, after = validated.step(validated.state, next(batches))
    plain.state, plain_after = plain.step(plain.state, next(plain_batches))
    assert_trees_equal(after, plain_after)
    assert_trees_equal(validated.state, plain.state)


BAD_CONFIGS = [
    # (table, what the message must name: the key, what is allowed, what came)
    ({"trainer": {}}, ["trainer", "allowed", "'run'"]),
    ({"data": {"windw": 4}}, ["data", "windw", "'window'"]),
    ({"data": {"window": "4"}}, ["data.window", "int", "'4'"]),
    ({"run": {"compile": "no"}}, ["run.compile", "bool", "'no'"]),
    ({"data": {"window": 0}}, ["data.window", ">= 1", "got 0"]),
    ({"data": {"sampler": "foo"}}, ["data.sampler", "'continuous'", "'random'", "'foo'"]),
    ({"policy": {"preset": "4x"}}, ["policy.preset", "'tiny'", "'2x'", "'4x'"]),
    ({"optimizer": {"lr": -1}}, ["optimizer.lr", ">= 0", "-1"]),
    ({"run": {"ema_decay": 1.0}}, ["run.ema_decay", "[0, 1)", "1.0"]),
    ({"objectives": {"foo": 1.0}}, ["objectives", "'behavior_clone'", "'kl_gaussian'", "'foo'"]),
    ({"research": {"every": -1}}, ["research.every", ">= 0", "-1"]),
    ({"research": {"evry": 2}}, ["research", "'evry'", "did you mean 'every'"]),
]


@pytest.mark.parametrize("table, names", BAD_CONFIGS, ids=[str(t) for t, _ in BAD_CONFIGS])
def test_bad_config_names_key_allowed_and_found(table, names):
    with pytest.raises(ConfigError) as error:
        config_from_dict(table)
    for name in names:
        assert name in str(error.value)


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nmax_steps = = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML: .*line 2"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_example_config_says_what_the_tutorial_says():
    config = load_config(EXAMPLE)
    assert config.objectives == {"behavior_clone": 0.01}
    opt = config.optimizer
    assert (opt.lr, opt.warmup_steps, opt.weight_decay, opt.clip_norm) == (4e-5, 2000, 1.81e-4, 1.0)
    assert (config.data.window, config.data.batch_size, config.data.sampler) == (128, 8, "continuous")
    assert config.run.ema_decay == 0.999
    assert config.policy.weights is not None  # a local Hugging Face-layout folder
    assert VPTConfig.preset("2x").img_shape == (128, 128, 3)  # hence the 128x128 store


def test_example_config_trains_with_a_tiny_policy_and_store(tmp_path, store):
    table = tomllib.loads(EXAMPLE.read_text())
    del table["policy"]["weights"]
    table["policy"]["preset"] = "tiny"
    table["data"].update(store=str(store), window=4, batch_size=2, num_workers=0, val_episodes=1)
    table["run"].update(out=str(tmp_path), compile=False, max_steps=3)
    result = Trainer(config_from_dict(table)).fit()
    assert result["steps"] == 3
    assert torch.isfinite(torch.tensor([result["last_loss"], result["val"]["loss"]])).all()
    assert result["val"]["bc_weight"] == pytest.approx(0.01)
    assert (tmp_path / "finetune-vpt-2x" / "policy.safetensors").is_file()


def test_exported_policy_loads_back_and_fine_tunes(tmp_path, store):
    """``policy.safetensors`` (EMA weights when kept) loads through ``VPTPolicy.from_pretrained`` and a plain
    ``load_state_dict``, and serves as ``policy.weights`` of a new run."""
    trainer = Trainer(config_from_dict(tiny(tmp_path, "first", store, max_steps=4, ema_decay=0.5)))
    trainer.fit()
    exported = tmp_path / "first" / "policy.safetensors"
    loaded = VPTPolicy.from_pretrained(exported)
    expected = {**trainer.state.ema, **trainer.state.buffers}
    assert_trees_equal(dict(loaded.state_dict()), {name: expected[name] for name in loaded.state_dict()})
    plain = VPTPolicy.from_preset("tiny")
    plain.load_state_dict(load_file(exported))
    assert_trees_equal(dict(plain.state_dict()), dict(loaded.state_dict()))

    table = tiny(tmp_path, "second", store, max_steps=2)
    table["policy"] = {"weights": str(exported)}
    second = Trainer(config_from_dict(table))
    assert_trees_equal(second.state.params, {name: expected[name] for name in second.state.params})
    assert second.fit()["steps"] == 2


def test_a_checkpoint_from_before_newer_config_keys_resumes(tmp_path, store):
    # an older mstudio wrote meta.json and config.toml without data.drop_null and the [distributed] table: they
    # take their defaults, which is how that run trained, so the resume is no config change
    Trainer(config_from_dict(tiny(tmp_path, "old", store, max_steps=2, ckpt_every=2))).fit()
    meta_path = latest_checkpoint(tmp_path / "old") / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["meta"]["config"]["data"]["drop_null"], meta["meta"]["config"]["distributed"]
    meta_path.write_text(json.dumps(meta))
    config_path = tmp_path / "old" / "config.toml"
    table = tomllib.loads(config_path.read_text())
    del table["data"]["drop_null"], table["distributed"]
    config_path.write_text(dump_toml(table))
    resumed = Trainer.resume(tmp_path / "old", max_steps=3)
    assert int(resumed.state.step) == 2


def test_an_eager_run_donates_its_state_to_every_step(tmp_path, store):
    trainer = Trainer(config_from_dict(tiny(tmp_path, "donating", store, max_steps=2)))
    first = trainer.state
    snapshot = optree.tree_map(torch.clone, first)
    trainer.fit()
    # the first state was updated in place and spent: the step refuses it, and its tensors moved on
    with pytest.raises(RuntimeError, match="donated"):
        trainer.step(first, next(iter(trainer.loader)))
    names = list(snapshot.params)
    assert all(trainer.state.params[n].data_ptr() == first.params[n].data_ptr() for n in names)  # no new tensors
    assert any(not torch.equal(first.params[n], snapshot.params[n]) for n in names)
    assert int(trainer.state.step) == 2


@pytest.mark.parametrize("cpp_wrapper, options", [(False, None), (True, {"cpp_wrapper": True})])
def test_run_cpp_wrapper_reaches_the_compiled_step(tmp_path, store, monkeypatch, cpp_wrapper, options):
    import mstudio.trainer.loop as loop

    built = []
    real = loop.make_train_step
    monkeypatch.setattr(loop, "make_train_step", lambda *args, **kwargs: built.append(kwargs) or real(*args, **kwargs))
    Trainer(config_from_dict(tiny(tmp_path, "cpp", store, compile=True, cpp_wrapper=cpp_wrapper)))  # not stepped
    assert len(built) == 1 and built[0]["compile"] is True and built[0]["compile_options"] == options
