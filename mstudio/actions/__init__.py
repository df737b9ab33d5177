"""VPT's action space: the camera quantizer and the joint button/camera indices (``vpt_data_spec.md`` 2-3)."""

from mstudio.actions import camera
from mstudio.actions.mapping import BUTTONS, INVENTORY, agent_to_env, env_to_agent

__all__ = ["BUTTONS", "INVENTORY", "agent_to_env", "camera", "env_to_agent"]
