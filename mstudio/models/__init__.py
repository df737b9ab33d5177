"""Policies that follow :mod:`mstudio.policy`'s protocol."""

from mstudio.models.tiny import TinyPolicy

__all__ = ["TinyPolicy"]
