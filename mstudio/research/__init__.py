"""Loss research: what single loss terms do to a policy's gradient.

- :func:`objective_gradients`: each objective's gradient from one forward pass;
  :func:`gradient_similarity`: their norms and pairwise cosines; :func:`diagnose`: both, as one pass to log.
- :func:`per_sample_gradients` (``torch.func.vmap``, per row and optionally per time step) and
  :func:`gradient_noise_scale`.
- :func:`term`: one output of an objective (e.g. BC's ``camera_loss``) as an objective of its own.
- :func:`curvature` / :func:`hessian_vector_product`: the loss's curvature along a direction (``jvp`` of ``grad``).

- :class:`SweepStep`: K variants (weights, learning rates) trained side by side in one vmapped, compiled call.

All are pure functions of a policy, a :class:`~mstudio.TrainState` and a batch, and see the batch as the train
step does (memory carry, ``step`` and ``hyperparams``).
"""

from mstudio.research.diagnostics import diagnose, gradient_noise_scale, gradient_similarity
from mstudio.research.gradients import (
    Forward,
    curvature,
    hessian_vector_product,
    loss_function,
    objective_gradients,
    per_sample_gradients,
    term,
)
from mstudio.research.sweep import SweepStep, stack_states, unstack_state

__all__ = [
    "Forward",
    "SweepStep",
    "curvature",
    "diagnose",
    "gradient_noise_scale",
    "gradient_similarity",
    "hessian_vector_product",
    "loss_function",
    "objective_gradients",
    "per_sample_gradients",
    "stack_states",
    "term",
    "unstack_state",
]


def __dir__() -> list[str]:
    return __all__
