"""The VPT policy, ported from MineStudio 1.1.6: config table, network, weight loading."""

from mstudio.models.vpt.config import vpt_configs
from mstudio.models.vpt.policy import VPTPolicy

__all__ = ["VPTPolicy", "vpt_configs"]
