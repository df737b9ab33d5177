"""TensorBoard logging: ``train/<metric>``, ``val/<metric>`` scalars and the run's hyper-parameters once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

__all__ = ["MetricWriter"]


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1e-3}}`` -> ``{"optimizer.lr": 1e-3}``, values as TensorBoard's hparams take them."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class MetricWriter:
    """Writes event files under ``log_dir``, readable by ``tensorboard --logdir``.

    Args:
        log_dir: the run directory.
        purge_step: the first step a resumed run logs (its checkpoint's step + 1): TensorBoard hides the events
            an earlier, interrupted writer logged at this step or later, so the resumed run's points replace
            them instead of doubling them. ``None`` for a fresh run.
    """

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None):
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        """Each metric as ``<prefix>/<name>`` at ``step``."""
        for name, value in metrics.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def hyperparameters(self, config: Mapping[str, Any]) -> None:
        """Record the run's configuration once (TensorBoard's HPARAMS tab), in the run's own event file."""
        experiment, session_start, session_end = hparams(_flat(config), {}, None)
        for summary in (experiment, session_start, session_end):
            self._writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
