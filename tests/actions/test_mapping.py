"""VPT's action space: every worked example of vpt_data_spec.md sections 2-3, and the full round trip."""

import numpy as np
import pytest
import torch

from mstudio.actions import BUTTONS, agent_to_env, camera, env_to_agent

BIN_CENTRES = [-10, -5.8095, -3.2154, -1.6095, -0.6154, 0, 0.6154, 1.6095, 3.2154, 5.8095, 10]

# Spec 3.5: (pressed buttons, camera [pitch, yaw]) -> (buttons_idx, camera_idx, pressed back, camera back)
WORKED = [
    (("forward", "attack"), (0, 0), 292, 60, ("forward", "attack"), (0, 0)),
    (("forward", "sprint", "jump"), (-1.2, 4.5), 323, 42, ("forward", "sprint", "jump"), (-1.6095, 5.8095)),
    (("hotbar.3",), (0.15, 0), 2592, 60, ("hotbar.3",), (0, 0)),
    (("inventory", "forward"), (3, -7), 8640, 60, ("inventory",), (0, 0)),
    (("forward", "back", "left", "sneak", "sprint", "use"), (10, -30), 177, 110, ("left", "sneak", "use"), (10, -10)),
    (("hotbar.2", "hotbar.7"), (0, 0.3), 6049, 61, ("hotbar.7",), (0, 0.6154)),
    ((), (0, 0), 0, 60, (), (0, 0)),
]


def test_bin_centres():
    np.testing.assert_allclose(camera.undiscretize(np.arange(11)), BIN_CENTRES, atol=1e-4)


@pytest.mark.parametrize(
    "counts, expected_bin",
    # Spec 2.3, float camera: |dx| 0-1 -> null bin, 2-7 -> 1 bin off, 8-15 -> 2, 16-29 -> 3, 30-51 -> 4, >= 52 -> 5
    [(0, 5), (1, 5), (2, 6), (7, 6), (8, 7), (15, 7), (16, 8), (29, 8), (30, 9), (51, 9), (52, 10), (500, 10)],
)
def test_quantizer_edges_in_mouse_counts(counts, expected_bin):
    degrees = np.array([counts, -counts]) * 0.15
    assert camera.discretize(degrees).tolist() == [expected_bin, 10 - expected_bin]


@pytest.mark.parametrize("pressed, cam, buttons_idx, camera_idx, pressed_back, cam_back", WORKED)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_worked_examples(kind, pressed, cam, buttons_idx, camera_idx, pressed_back, cam_back):
    array = np.array if kind == "numpy" else torch.tensor
    env = {name: array(1) for name in pressed}
    env["camera"] = array(np.array(cam, dtype=np.float64))
    agent = env_to_agent(env)
    assert type(agent["buttons"]) is type(env["camera"])
    assert (int(agent["buttons"][0]), int(agent["camera"][0])) == (buttons_idx, camera_idx)
    back = agent_to_env(agent)
    assert {name for name in BUTTONS if int(back[name]) == 1} == set(pressed_back)
    np.testing.assert_allclose(np.asarray(back["camera"]), cam_back, atol=1e-4)


def test_round_trip_over_every_joint_index():
    b, c = np.meshgrid(np.arange(8641), np.arange(121), indexing="ij")
    agent = {"buttons": b[..., None], "camera": c[..., None]}
    again = env_to_agent(agent_to_env(agent))
    # What survives a round trip: inventory and camera-off indices carry no camera; a camera-on index whose
    # camera is the null bin becomes the same buttons with the camera off.
    camera_on = (b % 2 == 1) & (b != 8640)
    expected_b = np.where(camera_on & (c == 60), b - 1, b)
    expected_c = np.where(camera_on, c, 60)
    assert np.array_equal(again["buttons"][..., 0], expected_b)
    assert np.array_equal(again["camera"][..., 0], expected_c)
    # torch gives the same, on a slice
    t = env_to_agent(agent_to_env({k: torch.from_numpy(v[:50]) for k, v in agent.items()}))
    assert torch.equal(t["buttons"][..., 0], torch.from_numpy(expected_b[:50]))


def test_leading_dims_are_kept():
    env = {"forward": np.ones((2, 3)), "camera": np.zeros((2, 3, 2))}
    agent = env_to_agent(env)
    assert agent["buttons"].shape == (2, 3, 1) and agent["camera"].shape == (2, 3, 1)
    assert agent_to_env(agent)["camera"].shape == (2, 3, 2)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown key"):
        env_to_agent({"fly": np.array(1), "camera": np.zeros(2)})
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        env_to_agent({"camera": np.zeros(3)})
    with pytest.raises(ValueError, match=r"outside \[0, 8641\)"):
        agent_to_env({"buttons": np.array([[8641]]), "camera": np.array([[60]])})
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 1\)"):
        agent_to_env({"buttons": np.array([[1, 2]]), "camera": np.array([[60]])})
