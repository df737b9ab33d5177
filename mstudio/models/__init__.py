"""Policies that follow :mod:`mstudio.policy`'s protocol."""

from mstudio.models.tiny import TinyPolicy

__all__ = ["TinyPolicy"]
from mstudio.models.vpt import VPTPolicy, vpt_configs  # noqa: E402
from mstudio.models.vpt.weights import load_vpt_weights  # noqa: E402

__all__ += ["VPTPolicy", "load_vpt_weights", "vpt_configs"]
