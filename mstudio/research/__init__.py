"""Loss research: what single loss terms do to a policy's gradient.

- :func:`objective_gradients`: each objective's gradient from one forward pass;
  :func:`gradient_similarity`: their norms and pairwise cosines.
- :func:`per_sample_gradients` (``torch.func.vmap``, per row and optionally per time step) and
  :func:`gradient_noise_scale`.
- :func:`curvature` / :func:`hessian_vector_product`: the loss's curvature along a direction (``jvp`` of ``grad``).

All are pure functions of a policy, a :class:`~mstudio.TrainState` and a batch, and see the batch as the train
step does (memory carry, ``step`` and ``hyperparams``).
"""

from mstudio.research.diagnostics import gradient_noise_scale, gradient_similarity
from mstudio.research.gradients import (
    Forward,
    curvature,
    hessian_vector_product,
    loss_function,
    objective_gradients,
    per_sample_gradients,
)

__all__ = [
    "Forward",
    "curvature",
    "gradient_noise_scale",
    "gradient_similarity",
    "hessian_vector_product",
    "loss_function",
    "objective_gradients",
    "per_sample_gradients",
]
