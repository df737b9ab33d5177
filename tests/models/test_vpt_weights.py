"""Loading VPT weights (OpenAI .weights, MineStudio .ckpt, local Hugging Face folders) and bad-input errors."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from mstudio.models import VPTConfig, VPTPolicy, load_vpt_weights

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vpt"


@pytest.fixture(scope="module")
def reference_state():
    return torch.load(FIXTURES / "weights.pt", weights_only=True)["state_dict"]


def tiny():
    return VPTPolicy.from_preset("tiny")


def assert_loaded(policy, state):
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_loads_an_openai_style_weights_file(tmp_path, reference_state):
    path = tmp_path / "foundation.weights"
    torch.save(reference_state, path)
    assert_loaded(load_vpt_weights(tiny(), path), reference_state)


def test_loads_a_minestudio_lightning_checkpoint(tmp_path, reference_state):
    path = tmp_path / "weight-epoch=0-step=10.ckpt"
    torch.save({"epoch": 0, "global_step": 10,
                "state_dict": {f"mine_policy.{k}": v for k, v in reference_state.items()}}, path)
    assert_loaded(load_vpt_weights(tiny(), path), reference_state)


def test_shape_and_key_mismatches_are_listed(tmp_path, reference_state):
    state = dict(reference_state)
    state["pi_head.camera.linear_layer.bias"] = torch.zeros(7)
    del state["net.final_ln.weight"]
    state["net.extra"] = torch.zeros(2)
    path = tmp_path / "bad.weights"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_vpt_weights(tiny(), path)
    message = str(error.value)
    assert "shape of pi_head.camera.linear_layer.bias: expected (121,), found (7,)" in message
    assert "missing net.final_ln.weight (expected (64,))" in message
    assert "unexpected net.extra (found (2,))" in message


def test_weights_for_another_size_are_rejected(tmp_path, reference_state):
    path = tmp_path / "tiny.weights"
    torch.save(reference_state, path)
    with pytest.raises(ValueError, match=r"value_head.linear.weight: expected \(1, 256\), found \(1, 64\)"):
        load_vpt_weights(VPTPolicy.from_preset("small"), path)


def test_from_pretrained_reads_minestudios_hub_layout(tmp_path, reference_state):
    safetensors = pytest.importorskip("safetensors.torch")
    shutil.copy(FIXTURES / "hub_config.json", tmp_path / "config.json")
    safetensors.save_file({k: v.contiguous() for k, v in reference_state.items()}, str(tmp_path / "model.safetensors"))
    assert_loaded(VPTPolicy.from_pretrained(tmp_path), reference_state)


def test_from_pretrained_reads_a_pytorch_model_bin(tmp_path, reference_state):
    shutil.copy(FIXTURES / "hub_config.json", tmp_path / "config.json")
    torch.save(reference_state, tmp_path / "pytorch_model.bin")
    policy = VPTPolicy.from_pretrained(tmp_path)
    assert policy.config.hidsize == json.loads((FIXTURES / "hub_config.json").read_text())["policy_kwargs"]["hidsize"]
    assert_loaded(policy, reference_state)


def test_from_pretrained_reads_an_mstudio_safetensors_export(tmp_path, reference_state):
    safetensors = pytest.importorskip("safetensors.torch")
    config = {"policy_kwargs": VPTConfig.preset("tiny").to_policy_kwargs(), "temperature": 2.0}
    path = tmp_path / "policy.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in reference_state.items()}, str(path),
                          metadata={"format": "mstudio-policy", "config": json.dumps(config)})
    policy = VPTPolicy.from_pretrained(path)
    assert policy.config == VPTConfig.preset("tiny")
    assert policy.pi_head["camera"].temperature == 2.0
    assert_loaded(policy, reference_state)


@pytest.mark.parametrize("metadata", [None, {"format": "mstudio-policy"}, {"format": "other", "config": "{}"}])
def test_from_pretrained_rejects_a_safetensors_file_without_config(tmp_path, reference_state, metadata):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in reference_state.items()}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="holds weights but no config .* the architecture is unknown"):
        VPTPolicy.from_pretrained(path)


def test_from_pretrained_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        VPTPolicy.from_pretrained(tmp_path / "CraftJarvis" / "MineStudio_VPT.foundation_model_2x")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        VPTPolicy.from_pretrained(tmp_path / "policy.safetensors")


@pytest.mark.parametrize("kwargs, match", [
    ({"recurrence_type": "multi_layer_lstm"}, "recurrence_type='multi_layer_lstm' is not supported"),
    ({"init_norm_kwargs": {"batch_norm": True}}, "batch_norm"),
    ({"impala_kwargs": {"post_pool_groups": 1, "stride": 2}}, "unknown impala_kwargs \\['stride'\\]"),
    ({"img_statistics": "stats.npz"}, "img_statistics"),
    ({"attention_memory_size": 4}, "must exceed timesteps"),
    ({"hidsze": 64}, "unknown policy_kwargs 'hidsze' \\(did you mean 'hidsize'\\?\\)"),
])
def test_unsupported_policy_kwargs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VPTPolicy(**{**VPTConfig.preset("tiny").to_policy_kwargs(), **kwargs})


def test_wrong_image_size_or_dtype_raises():
    policy = tiny()
    state = policy.initial_state(2)
    with pytest.raises(ValueError, match=r"uint8 \(B, T, 64, 64, 3\), got torch.uint8 \(2, 4, 128, 128, 3\)"):
        policy({"image": torch.zeros(2, 4, 128, 128, 3, dtype=torch.uint8)}, state)
    with pytest.raises(ValueError, match=r"got torch.float32 \(2, 4, 64, 64, 3\)"):
        policy({"image": torch.zeros(2, 4, 64, 64, 3)}, state)


def test_state_from_another_batch_size_raises():
    policy = tiny()
    expected = r"state_in\[0\] must be bool \(2, 1, 6\) \(batch 2\), got torch.bool \(3, 1, 6\)"
    with pytest.raises(ValueError, match=expected):
        policy({"image": torch.zeros(2, 4, 64, 64, 3, dtype=torch.uint8)}, policy.initial_state(3))


KEY = "pi_head.camera.linear_layer.bias"


@pytest.mark.parametrize("bad, found", [
    (lambda t: t.long(), "torch.int64"),
    (lambda t: t.bool(), "torch.bool"),
    (lambda t: t.to(torch.complex64), "torch.complex64"),
    (lambda t: t.double(), "torch.float64"),
    (lambda t: t.half(), "torch.float16"),
])
def test_wrong_dtypes_are_refused_not_cast(tmp_path, reference_state, bad, found):
    state = {**reference_state, KEY: bad(reference_state[KEY])}
    path = tmp_path / "bad.weights"
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape(f"dtype of {KEY}: expected torch.float32, found {found}")):
        load_vpt_weights(tiny(), path)


@pytest.mark.parametrize("value, count", [(float("nan"), 3), (float("inf"), 2), (float("-inf"), 1)])
def test_non_finite_weights_are_refused(tmp_path, reference_state, value, count):
    tensor = reference_state[KEY].clone()
    tensor[:count] = value
    path = tmp_path / "nan.weights"
    torch.save({**reference_state, KEY: tensor}, path)
    with pytest.raises(ValueError, match=re.escape(f"{KEY} holds {count} non-finite value(s) (NaN or inf) of 121")):
        load_vpt_weights(tiny(), path)


def test_non_finite_weights_are_refused_by_from_pretrained(tmp_path, reference_state):
    shutil.copy(FIXTURES / "hub_config.json", tmp_path / "config.json")
    tensor = reference_state[KEY].clone()
    tensor[0] = float("nan")
    torch.save({**reference_state, KEY: tensor}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=re.escape(f"{KEY} holds 1 non-finite value(s)")):
        VPTPolicy.from_pretrained(tmp_path)


@pytest.mark.parametrize("data", [os.urandom(4096), b"", b"PK\x03\x04" + bytes(200)], ids=["random", "empty", "zip"])
def test_unreadable_weights_file_never_suggests_loading_pickled_code(tmp_path, data):
    path = tmp_path / "garbage.weights"
    path.write_bytes(data)
    with pytest.raises(ValueError) as error:
        load_vpt_weights(tiny(), path)
    message = str(error.value)
    assert f"{path} is not a readable weights file" in message and "mstudio never loads pickled code" in message
    assert "weights_only` set to `False`" not in message and "will likely succeed" not in message
    assert error.value.__cause__ is None and error.value.__context__ is None  # torch's hint is not chained


def test_unreadable_pytorch_model_bin_is_refused(tmp_path):
    shutil.copy(FIXTURES / "hub_config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(os.urandom(1024))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'pytorch_model.bin'} is not a readable weights file")):
        VPTPolicy.from_pretrained(tmp_path)


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, float("nan"), float("inf"), "1.0", True, None])
def test_bad_temperature_in_config_json_is_refused(tmp_path, reference_state, temperature):
    config = json.loads((FIXTURES / "hub_config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "temperature": temperature}))
    torch.save(reference_state, tmp_path / "pytorch_model.bin")
    message = ("config.json: 'temperature' must be a finite number > 0 (it divides the action logits), "
               f"got {temperature!r}")
    with pytest.raises(ValueError, match=re.escape(message)):
        VPTPolicy.from_pretrained(tmp_path)
