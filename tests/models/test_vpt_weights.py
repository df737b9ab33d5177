"""Loading VPT weights (OpenAI .weights, MineStudio .ckpt, local Hugging Face folders) and bad-input errors."""

import json
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
    ({"hidsze": 64}, "unknown policy_kwargs \\['hidsze'\\]"),
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
