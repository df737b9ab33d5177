"""VPT's action space: the head sizes and special classes, the camera quantizer and the joint button/camera
indices (``vpt_data_spec.md`` 2-3), and the conversion of contractor jsonl lines to env actions (1.5-1.6).

Imports only numpy and torch, so :mod:`losses` reads the constants here without the model or data stack.
"""

from mstudio.actions import camera
from mstudio.actions.contractor import ContractorActions, contractor_to_env
from mstudio.actions.mapping import BUTTONS, agent_to_env, env_to_agent
from mstudio.actions.space import CAMERA_NULL, INVENTORY_BUTTONS_INDEX, N_BUTTONS, N_CAMERA

__all__ = [
    "BUTTONS",
    "CAMERA_NULL",
    "INVENTORY_BUTTONS_INDEX",
    "N_BUTTONS",
    "N_CAMERA",
    "ContractorActions",
    "agent_to_env",
    "camera",
    "contractor_to_env",
    "env_to_agent",
]


def __dir__() -> list[str]:
    return __all__
