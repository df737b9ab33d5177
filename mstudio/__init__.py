"""mstudio: functional, compiled offline training for Minecraft agents.

Attributes load on first use, so ``import mstudio.distributions`` (which ``losses`` does) pulls in neither
the trainer nor the data stack.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_ATTRIBUTES = {
    "functionalize": "mstudio.bridge",
    "TrainState": "mstudio.train",
    "init_state": "mstudio.train",
    "make_train_step": "mstudio.train",
    "set_hyperparams": "mstudio.train",
}
_SUBMODULES = ("actions", "bridge", "compat", "data", "distributed", "distributions", "models", "optim", "policy",
               "research", "train", "trainer")

__all__ = sorted([*_ATTRIBUTES, *_SUBMODULES])


def __getattr__(name: str):
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mstudio.{name}")
    raise AttributeError(f"module 'mstudio' has no attribute {name!r}")


def __dir__():
    return __all__
