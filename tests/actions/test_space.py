"""The action-space constants: their values, their agreement with the mapping, and a light import."""

import subprocess
import sys

import numpy as np

import mstudio.actions as A


def test_constants_are_vpts():
    assert (A.N_BUTTONS, A.N_CAMERA, A.CAMERA_NULL, A.INVENTORY_BUTTONS_INDEX) == (8641, 121, 60, 8640)


def test_constants_agree_with_the_mapping():
    still = A.env_to_agent({"camera": np.zeros(2)})
    assert (int(still["buttons"][0]), int(still["camera"][0])) == (0, A.CAMERA_NULL)
    inventory = A.env_to_agent({"inventory": np.array(1), "forward": np.array(1), "camera": np.array([3.0, -7.0])})
    assert (int(inventory["buttons"][0]), int(inventory["camera"][0])) == (A.INVENTORY_BUTTONS_INDEX, A.CAMERA_NULL)
    top = A.agent_to_env({"buttons": np.array([A.N_BUTTONS - 1]), "camera": np.array([A.N_CAMERA - 1])})
    assert int(top["inventory"]) == 1


def test_actions_import_only_numpy_and_torch():
    code = (
        "import sys, mstudio.actions; "
        "bad = [m for m in sys.modules if (m.startswith('mstudio.') and not m.startswith('mstudio.actions'))"
        " or m.split('.')[0] in ('optree', 'av', 'safetensors', 'tensorboard', 'losses')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
