"""The sizes and special classes of VPT's two action heads, ``buttons`` and ``camera`` (``vpt_data_spec.md`` 3).

An agent action is ``{"buttons": long (..., 1), "camera": long (..., 1)}``: one class of each head. Imports
only :mod:`mstudio.actions.camera` (numpy and torch), so objectives can read these without the model stack.
"""

from __future__ import annotations

from mstudio.actions import camera as _camera

__all__ = ["CAMERA_NULL", "INVENTORY_BUTTONS_INDEX", "N_BUTTONS", "N_CAMERA"]

#: Number of classes of VPT's joint button head (8640 button combinations + the inventory class).
N_BUTTONS = 8641
#: The ``buttons`` class meaning "inventory pressed" (8640); it overrides every other button.
INVENTORY_BUTTONS_INDEX = N_BUTTONS - 1
#: Number of classes of VPT's camera head (11 pitch bins x 11 yaw bins).
N_CAMERA = _camera.N_BINS**2
#: Camera class meaning "the camera did not move" (60: pitch bin 5, yaw bin 5).
CAMERA_NULL = _camera.N_BINS * _camera.NULL_BIN + _camera.NULL_BIN
