"""VPTPolicy against MineStudio 1.1.6 reference outputs (fixtures made by tests/fixtures/vpt/make_fixtures.py), and
VPTConfig: presets, MineStudio policy_kwargs both ways, the deprecated vpt_configs."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mstudio.bridge import check_stateless_forward
from mstudio.models import VPTConfig, VPTPolicy, vpt_configs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vpt"
ATOL = 1e-5


def load(name):
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="module")
def reference():
    weights = load("weights.pt")
    policy = VPTPolicy.from_preset("tiny")
    policy.load_state_dict(weights["state_dict"], strict=True)
    return policy, load("forward.pt")


def assert_close(got, expected, what):
    err = (got.float() - expected.float()).abs().max().item()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


def test_tiny_preset_is_the_fixture_config():
    fixture_kwargs = json.loads(load("weights.pt")["policy_kwargs_json"])
    assert VPTConfig.from_policy_kwargs(fixture_kwargs) == VPTConfig.preset("tiny")


@pytest.mark.parametrize("name", VPTConfig.preset_names())
def test_policy_kwargs_round_trip_for_every_preset(name):
    config = VPTConfig.preset(name)
    kwargs = config.to_policy_kwargs()
    assert VPTConfig.from_policy_kwargs(kwargs) == config
    assert VPTConfig.from_policy_kwargs(json.loads(json.dumps(kwargs))) == config  # as a config.json stores them
    assert kwargs["recurrence_type"] == "transformer"  # every architecture argument is explicit


def test_presets_are_the_published_names():
    assert VPTConfig.preset_names() == ("tiny", "small", "1x", "2x", "3x")


def test_unknown_preset_lists_the_known_ones():
    known = r"known presets: \['tiny', 'small', '1x', '2x', '3x'\]"
    with pytest.raises(ValueError, match=rf"unknown VPT preset '4x'; {known}"):
        VPTConfig.preset("4x")
    with pytest.raises(ValueError, match=known):
        VPTPolicy.from_preset("4x")


def test_config_and_policy_kwargs_build_the_same_policy():
    config = dataclasses.replace(VPTConfig.preset("tiny"), hidsize=32)
    by_config = VPTPolicy(config).state_dict()
    by_kwargs = VPTPolicy(**config.to_policy_kwargs()).state_dict()
    assert {k: v.shape for k, v in by_config.items()} == {k: v.shape for k, v in by_kwargs.items()}


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match=r"both a VPTConfig and policy_kwargs \['hidsize'\]"):
        VPTPolicy(VPTConfig.preset("tiny"), hidsize=32)
    with pytest.raises(TypeError, match="config must be a VPTConfig .* temperature is keyword-only"):
        VPTPolicy(2.0)
    with pytest.raises(TypeError, match="needs an architecture"):
        VPTPolicy()
    with pytest.raises(ValueError, match="hidsize 60 is not divisible by attention_heads 8"):
        VPTConfig(hidsize=60, attention_heads=8)


def test_deprecated_vpt_configs_gives_the_preset_kwargs():
    with pytest.warns(DeprecationWarning, match=r"VPTPolicy.from_preset\('small'\)"):
        kwargs = vpt_configs["small"]
    assert kwargs == VPTConfig.preset("small").to_policy_kwargs()
    assert list(vpt_configs) == list(VPTConfig.preset_names()) and "4x" not in vpt_configs
    with pytest.raises(KeyError, match="unknown VPT preset '4x'; known presets"):  # a Mapping's KeyError
        vpt_configs["4x"]


def test_state_dict_keys_shapes_and_order_match_minestudio():
    expected = load("weights.pt")["state_dict"]
    got = VPTPolicy.from_preset("tiny").state_dict()
    assert list(got) == list(expected)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_unchunked_outputs_and_state_match_minestudio(reference):
    policy, ref = reference
    with torch.no_grad():
        latents, state = policy({"image": ref["image"]}, policy.initial_state(2))
    assert latents["pi_logits"]["buttons"].dtype == torch.float32
    assert_close(latents["pi_logits"]["buttons"], ref["full_buttons"], "buttons")
    assert_close(latents["pi_logits"]["camera"], ref["full_camera"], "camera")
    assert_close(latents["vpred"], ref["full_vpred"], "vpred")
    assert len(state) == len(ref["full_state"])
    for i, (got, expected) in enumerate(zip(state, ref["full_state"])):
        assert got.dtype == expected.dtype, f"state[{i}] dtype"
        assert_close(got, expected, f"state[{i}]")


def test_chunked_outputs_and_state_match_minestudio(reference):
    policy, ref = reference
    state = policy.initial_state(2)
    outputs = []
    with torch.no_grad():
        for part in (ref["image"][:, :4], ref["image"][:, 4:]):
            latents, state = policy({"image": part}, state)
            outputs.append(latents)
    assert_close(torch.cat([o["pi_logits"]["buttons"] for o in outputs], 1), ref["chunk_buttons"], "buttons")
    assert_close(torch.cat([o["pi_logits"]["camera"] for o in outputs], 1), ref["chunk_camera"], "camera")
    assert_close(torch.cat([o["vpred"] for o in outputs], 1), ref["chunk_vpred"], "vpred")
    for i, (got, expected) in enumerate(zip(state, ref["chunk_state"])):
        assert_close(got, expected, f"state[{i}]")


def test_minestudio_state_list_is_accepted(reference):
    policy, ref = reference
    with torch.no_grad():
        latents, _ = policy({"image": ref["image"][:, 4:]}, list(ref["chunk_state"]))
    assert latents["pi_logits"]["camera"].shape == (2, 4, 1, 121)


def test_forward_writes_nothing_to_the_module(reference):
    policy, ref = reference
    tensors = dict(policy.named_parameters()) | dict(policy.named_buffers())
    check_stateless_forward(policy, tensors, lambda: policy({"image": ref["image"]}, policy.initial_state(2)))


def test_initial_state_has_batch_first_and_bool_masks():
    policy = VPTPolicy.from_preset("tiny")
    state = policy.initial_state(3)
    assert isinstance(state, tuple) and len(state) == 6
    for i, leaf in enumerate(state):
        assert leaf.shape[0] == 3
        assert leaf.dtype == (torch.bool if i % 3 == 0 else torch.float32)
        assert not leaf.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_initial_state_spec_follows_the_parameters_dtype(dtype):
    policy = VPTPolicy.from_preset("tiny").to(dtype)
    spec = policy.initial_state_spec(3)
    assert spec == [(tuple(leaf.shape), leaf.dtype) for leaf in policy.initial_state(3)]
    assert spec[1][1] == dtype


def test_temperature_divides_the_logits(reference):
    policy, ref = reference
    hot = VPTPolicy.from_preset("tiny", temperature=2.0)
    hot.load_state_dict(policy.state_dict())
    image = ref["image"][:, :2]
    with torch.no_grad():
        base, _ = policy({"image": image}, policy.initial_state(2))
        scaled, _ = hot({"image": image}, hot.initial_state(2))
    expected = torch.log_softmax(base["pi_logits"]["camera"] / 2.0, dim=-1)
    torch.testing.assert_close(scaled["pi_logits"]["camera"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, millions", [("1x", 71.3), ("2x", 248.5), ("3x", 532.5)])
def test_foundation_sizes_by_parameter_count(name, millions):
    with torch.device("meta"):
        policy = VPTPolicy.from_preset(name)
    count = sum(p.numel() for p in policy.parameters())
    assert abs(count / 1e6 - millions) < 0.1, count


def test_small_config_shapes():
    policy = VPTPolicy.from_preset("small")
    latents, state = policy({"image": torch.zeros(1, 3, 64, 64, 3, dtype=torch.uint8)}, policy.initial_state(1))
    assert latents["vpred"].shape == (1, 3, 1)
    assert state[1].shape == (1, 32, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is checked on CUDA only")
def test_bf16_autocast_keeps_pi_logits_float32():
    policy = VPTPolicy.from_preset("tiny").cuda()
    image = torch.zeros(2, 4, 64, 64, 3, dtype=torch.uint8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        latents, state = policy({"image": image}, policy.initial_state(2))
    assert latents["pi_logits"]["buttons"].dtype == torch.float32
    assert latents["pi_logits"]["camera"].dtype == torch.float32
    assert state[1].dtype == torch.float32
