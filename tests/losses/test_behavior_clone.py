"""behavior_clone against MineStudio's formula written out independently in float64 (numpy)."""

import numpy as np
import pytest
import torch

import losses

B, T = 3, 5


def _inputs(seed=0, mask_dtype=torch.uint8):
    gen = torch.Generator().manual_seed(seed)
    raw = {"buttons": torch.randn(B, T, 1, 8641, generator=gen, dtype=torch.float64),
           "camera": torch.randn(B, T, 1, 121, generator=gen, dtype=torch.float64)}
    buttons = torch.randint(0, 8641, (B, T, 1), generator=gen)
    camera = torch.randint(0, 121, (B, T, 1), generator=gen)
    camera[0, :2] = 60  # steps where the camera did not move
    camera[2] = 60  # a whole row of them
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0  # padding past an episode's end
    batch = {"agent_action": {"buttons": buttons, "camera": camera}, "mask": mask.to(mask_dtype)}
    return raw, batch


def _reference(raw, batch, weight):
    """MineStudio's BehaviorCloneCallback, one element at a time, in float64."""
    out = {k: 0.0 for k in ("camera_loss", "button_loss", "entropy")}
    mask = batch["mask"].double().numpy() if "mask" in batch else np.ones((B, T))
    for b in range(B):
        cam_l = btn_l = ent = 0.0
        for t in range(T):
            lb = raw["buttons"][b, t, 0].numpy()
            lc = raw["camera"][b, t, 0].numpy()
            lb = lb - np.log(np.exp(lb - lb.max()).sum()) - lb.max()  # log-softmax
            lc = lc - np.log(np.exp(lc - lc.max()).sum()) - lc.max()
            a_b = int(batch["agent_action"]["buttons"][b, t, 0])
            a_c = int(batch["agent_action"]["camera"][b, t, 0])
            moved = float(a_c != 60)
            m = mask[b, t]
            cam_l -= lc[a_c] * m * moved
            btn_l -= lb[a_b] * m
            ent += -(np.exp(lc) * lc).sum() * m * moved - (np.exp(lb) * lb).sum() * m
        out["camera_loss"] += cam_l / B
        out["button_loss"] += btn_l / B
        out["entropy"] += ent / B
    out["loss"] = weight * (out["camera_loss"] + out["button_loss"])
    return out


def _latents(raw):
    return {"pi_logits": {k: torch.log_softmax(v, -1) for k, v in raw.items()}}


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool, torch.float32, torch.float64])
def test_matches_float64_reference_for_every_mask_dtype(mask_dtype):
    raw, batch = _inputs(mask_dtype=mask_dtype)
    out = losses.weighted(losses.behavior_clone, 0.01)(batch, _latents(raw), {})
    ref = _reference(raw, batch, 0.01)
    for key in ("loss", "camera_loss", "button_loss", "entropy"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-12), key
    assert out["bc_weight"].item() == pytest.approx(0.01)


def test_no_mask_means_all_steps_count():
    raw, batch = _inputs()
    del batch["mask"]
    out = losses.behavior_clone(batch, _latents(raw), {})
    assert out["loss"].item() == pytest.approx(_reference(raw, batch, 1.0)["loss"], rel=1e-12)


def test_padding_and_null_camera_steps_get_no_gradient():
    raw, batch = _inputs()
    logits = {k: torch.log_softmax(v, -1).requires_grad_() for k, v in raw.items()}
    losses.behavior_clone(batch, {"pi_logits": logits}, {})["loss"].backward()
    assert logits["buttons"].grad[1, 3:].abs().sum() == 0  # masked padding
    assert logits["camera"].grad[1, 3:].abs().sum() == 0
    assert logits["camera"].grad[2].abs().sum() == 0  # camera == 60 everywhere in row 2
    assert logits["buttons"].grad[2].abs().sum() > 0  # ... but its buttons still train


def test_gradcheck():
    raw, batch = _inputs()
    # Few classes keep gradcheck fast; 61 camera classes keep the null-camera index 60 valid.
    small = {"buttons": raw["buttons"][..., :7], "camera": raw["camera"][..., :61]}
    actions = batch["agent_action"]
    batch["agent_action"] = {"buttons": actions["buttons"] % 7, "camera": torch.where(actions["camera"] == 60, 60, actions["camera"] % 60)}

    def loss(buttons, camera):
        latents = {"pi_logits": {"buttons": torch.log_softmax(buttons, -1), "camera": torch.log_softmax(camera, -1)}}
        out = losses.weighted(losses.behavior_clone, 0.3)(batch, latents, {})
        return out["loss"], out["entropy"]

    inputs = tuple(small[k].clone().requires_grad_() for k in ("buttons", "camera"))
    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b, l: b.pop("agent_action"), "batch['agent_action']"),
        (lambda b, l: l.pop("pi_logits"), "latents['pi_logits']"),
        (lambda b, l: b.__setitem__("mask", torch.ones(B)), "batch['mask'] must have shape"),
        (lambda b, l: b["agent_action"].__setitem__("camera", torch.zeros(B, T, dtype=torch.long)), "agent_action['camera']"),
        (lambda b, l: b["agent_action"].pop("buttons"), "lacks head"),
    ],
)
def test_bad_input_names_the_key(edit, message):
    raw, batch = _inputs()
    latents = _latents(raw)
    edit(batch, latents)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        losses.behavior_clone(batch, latents, {})
