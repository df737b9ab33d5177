"""contractor_to_env on the scripted cases of vpt_data_spec.md 1.5-1.6 and 5.3."""

import numpy as np
import pytest

from mstudio.actions import contractor_to_env, env_to_agent


def line(keys=(), buttons=(), new_buttons=(), dx=0, dy=0, hotbar=0, gui=False, x=0.0, y=0.0):
    return {
        "mouse": {"x": x, "y": y, "dx": dx, "dy": dy, "buttons": list(buttons), "newButtons": list(new_buttons)},
        "keyboard": {"keys": list(keys), "newKeys": []},
        "hotbar": hotbar,
        "isGuiOpen": gui,
    }


def pressed(result, i):
    return {name for name, v in result.env.items() if name != "camera" and v[i]} | {
        name for name, v in result.extra.items() if v[i]
    }


def test_keys_mouse_and_camera():
    lines = [
        line(keys=["key.keyboard.w", "key.keyboard.left.control", "key.keyboard.t"], buttons=[1], dx=10, dy=-4),
        line(keys=["key.keyboard.escape"]),
        line(keys=["key.keyboard.f"]),
        line(buttons=[2]),
        line(keys=["key.keyboard.f3"]),  # unmapped only: null
    ]
    r = contractor_to_env(lines)
    assert pressed(r, 0) == {"forward", "sprint", "use"}
    np.testing.assert_allclose(r.env["camera"][0], [-4 * 0.15, 10 * 0.15])
    assert pressed(r, 1) == {"ESC"} and pressed(r, 2) == {"swapHands"} and pressed(r, 3) == {"pickItem"}
    assert r.null.tolist() == [False, False, False, False, True]
    assert r.env["camera"].dtype == np.float64 and r.env["forward"].shape == (5,)


def test_attack_stuck_at_start_until_pressed_again():
    lines = [
        line(buttons=[0], new_buttons=[0]),
        line(buttons=[0]),
        line(buttons=[0], new_buttons=[0]),  # pressed anew: this line keeps its attack
        line(buttons=[0]),
    ]
    r = contractor_to_env(lines)
    assert r.env["attack"].tolist() == [0, 0, 1, 1]
    assert r.attack_stuck_removed.tolist() == [True, True, False, False]
    assert r.null.tolist() == [True, True, False, False]


def test_hotbar_tracking_and_its_quirks():
    lines = [
        line(hotbar=2),  # line 0 with a non-zero slot gets a spurious press
        line(hotbar=2),
        line(hotbar=4),  # scroll only: hotbar.5 pressed, but the line stays null (flag taken before)
        line(keys=["key.keyboard.7"], hotbar=4),  # key press, field changes on the next line
        line(hotbar=6),
        {"mouse": None, "keyboard": None},  # 6.x style: null devices, no hotbar field
    ]
    r = contractor_to_env(lines)
    assert [sorted(pressed(r, i)) for i in range(6)] == [["hotbar.3"], [], ["hotbar.5"], ["hotbar.7"], ["hotbar.7"], []]
    assert r.hotbar_synthesized.tolist() == [True, False, True, False, True, False]
    assert r.null.tolist() == [True, True, True, False, True, True]


def test_camera_modes_and_opt_in_fixes():
    lines = [line(dx=5, dy=-13), line(dx=4, dy=2, gui=True, keys=["key.keyboard.escape"], x=1279, y=719)]
    float_cam = contractor_to_env(lines)
    np.testing.assert_allclose(float_cam.env["camera"][0], [-1.95, 0.75])
    vpt = contractor_to_env(lines, camera="vpt_int")
    assert vpt.env["camera"][0].tolist() == [-1.0, 0.0]  # truncated toward zero
    scaled = contractor_to_env(lines, gui_scaling_version="6.9", esc_as_inventory=True)
    np.testing.assert_allclose(scaled.env["camera"][1], [2 * 2 * 0.15, 4 * 2 * 0.15])
    np.testing.assert_allclose(scaled.env["camera"][0], float_cam.env["camera"][0])  # no GUI: unscaled
    assert scaled.env["inventory"].tolist() == [0, 1] and float_cam.env["inventory"].tolist() == [0, 0]
    assert float_cam.gui_open.tolist() == [False, True]
    assert float_cam.cursor[1].tolist() == [1279, 719]


@pytest.mark.parametrize("counts, expected", [(1, 60), (2, 61), (7, 61), (8, 62), (-52, 55)])
def test_float_camera_quantizes_as_the_spec_table(counts, expected):
    r = contractor_to_env([line(dx=counts)])
    assert int(env_to_agent(r.env)["camera"][0, 0]) == expected


def test_bad_input():
    with pytest.raises(ValueError, match="camera must be one of"):
        contractor_to_env([], camera="int")
    with pytest.raises(ValueError, match=r"lines\[1\]: must be a JSON object, got null"):
        contractor_to_env([line(), None])
    with pytest.raises(ValueError, match=r"lines\[0\]: 'hotbar' must be an integer 0-8 or null, got 12"):
        contractor_to_env([line(hotbar=12)])
    with pytest.raises(TypeError, match="lines must be a sequence of parsed jsonl lines"):
        contractor_to_env("{}")
