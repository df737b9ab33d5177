"""Policies that follow :mod:`mstudio.policy`'s protocol."""

from mstudio.models.groot import GrootConfig, GrootPolicy, with_latent_noise
from mstudio.models.reference import WithReference
from mstudio.models.tiny import TinyPolicy
from mstudio.models.vpt import VPTConfig, VPTPolicy, vpt_configs
from mstudio.models.vpt.weights import load_vpt_weights

__all__ = [
    "GrootConfig",
    "GrootPolicy",
    "TinyPolicy",
    "VPTConfig",
    "VPTPolicy",
    "WithReference",
    "load_vpt_weights",
    "vpt_configs",
    "with_latent_noise",
]


def __dir__() -> list[str]:
    return __all__
