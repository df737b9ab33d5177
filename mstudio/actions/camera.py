"""VPT's camera quantizer: mu-law bins of camera motion in degrees (``ActionTransformer`` as VPT configures it).

Per axis (pitch, yaw): clip to ``[-10, 10]`` degrees, mu-law encode with ``mu = 10``, and round to one of 11
bins of width 2 (bin 5: no motion). Computed in float64 with round-half-to-even (numpy's and torch's
``round``), so values on bin edges land where VPT's numpy code puts them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["BINSIZE", "MAXVAL", "MU", "NULL_BIN", "N_BINS", "discretize", "undiscretize"]

MAXVAL = 10.0  # degrees; larger motions are clipped
BINSIZE = 2.0
MU = 10.0
N_BINS = 11  # per axis: 2 * MAXVAL / BINSIZE + 1
NULL_BIN = 5  # MAXVAL / BINSIZE: the camera did not move


def _backend(x):
    if isinstance(x, torch.Tensor):
        return torch, x.to(torch.float64)
    return np, np.asarray(x, dtype=np.float64)


def discretize(degrees):
    """Degrees -> bin indices in ``[0, 11)``, elementwise. numpy in, numpy (int64) out; torch in, torch out."""
    xp, x = _backend(degrees)
    u = xp.clip(x, -MAXVAL, MAXVAL) / MAXVAL
    encoded = MAXVAL * xp.sign(u) * xp.log1p(MU * xp.abs(u)) / math.log1p(MU)
    bins = xp.round((encoded + MAXVAL) / BINSIZE)
    return bins.to(torch.int64) if xp is torch else bins.astype(np.int64)


def undiscretize(bins):
    """Bin indices -> the degrees at the bins' centres (``-10, -5.81, ..., 0, ..., 10``), float64."""
    xp, b = _backend(bins)
    w = (b * BINSIZE - MAXVAL) / MAXVAL
    return MAXVAL * xp.sign(w) * ((1 + MU) ** xp.abs(w) - 1) / MU
