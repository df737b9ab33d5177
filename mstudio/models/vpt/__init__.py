"""The VPT policy, ported from MineStudio 1.1.6: typed config and presets, network, weight loading."""

from mstudio.models.vpt.config import VPTConfig, vpt_configs
from mstudio.models.vpt.policy import VPTPolicy

__all__ = ["VPTConfig", "VPTPolicy", "vpt_configs"]


def __dir__() -> list[str]:
    return __all__
