"""VPT's action space: the camera quantizer and the joint button/camera indices (``vpt_data_spec.md`` 2-3),
and the conversion of contractor jsonl lines to env actions (1.5-1.6)."""

from mstudio.actions import camera
from mstudio.actions.contractor import ContractorActions, contractor_to_env
from mstudio.actions.mapping import BUTTONS, INVENTORY, agent_to_env, env_to_agent

__all__ = ["BUTTONS", "INVENTORY", "ContractorActions", "agent_to_env", "camera", "contractor_to_env", "env_to_agent"]
