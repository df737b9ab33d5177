"""VPTPolicy against MineStudio 1.1.6 reference outputs (fixtures made by tests/fixtures/vpt/make_fixtures.py)."""

import json
from pathlib import Path

import pytest
import torch

from mstudio.bridge import check_stateless_forward
from mstudio.models import VPTPolicy, vpt_configs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vpt"
ATOL = 1e-5


def load(name):
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="module")
def reference():
    weights = load("weights.pt")
    policy = VPTPolicy(**vpt_configs["tiny"])
    policy.load_state_dict(weights["state_dict"], strict=True)
    return policy, load("forward.pt")


def assert_close(got, expected, what):
    err = (got.float() - expected.float()).abs().max().item()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


def test_tiny_config_is_the_fixture_config():
    weights = load("weights.pt")
    ours = json.loads(json.dumps(vpt_configs["tiny"], sort_keys=True))
    assert ours == json.loads(weights["policy_kwargs_json"])


def test_state_dict_keys_shapes_and_order_match_minestudio():
    expected = load("weights.pt")["state_dict"]
    got = VPTPolicy(**vpt_configs["tiny"]).state_dict()
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
    policy = VPTPolicy(**vpt_configs["tiny"])
    state = policy.initial_state(3)
    assert isinstance(state, tuple) and len(state) == 6
    for i, leaf in enumerate(state):
        assert leaf.shape[0] == 3
        assert leaf.dtype == (torch.bool if i % 3 == 0 else torch.float32)
        assert not leaf.any()


def test_temperature_divides_the_logits(reference):
    policy, ref = reference
    hot = VPTPolicy(temperature=2.0, **vpt_configs["tiny"])
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
        policy = VPTPolicy(**vpt_configs[name])
    count = sum(p.numel() for p in policy.parameters())
    assert abs(count / 1e6 - millions) < 0.1, count


def test_small_config_shapes():
    policy = VPTPolicy(**vpt_configs["small"])
    latents, state = policy({"image": torch.zeros(1, 3, 64, 64, 3, dtype=torch.uint8)}, policy.initial_state(1))
    assert latents["vpred"].shape == (1, 3, 1)
    assert state[1].shape == (1, 32, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is checked on CUDA only")
def test_bf16_autocast_keeps_pi_logits_float32():
    policy = VPTPolicy(**vpt_configs["tiny"]).cuda()
    image = torch.zeros(2, 4, 64, 64, 3, dtype=torch.uint8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        latents, state = policy({"image": image}, policy.initial_state(2))
    assert latents["pi_logits"]["buttons"].dtype == torch.float32
    assert latents["pi_logits"]["camera"].dtype == torch.float32
    assert state[1].dtype == torch.float32
