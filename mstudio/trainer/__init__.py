"""The training loop around the compiled step: config, checkpoints, TensorBoard, validation, EMA, export, eval."""

from mstudio.trainer.checkpoint import export_policy, latest_checkpoint, load_checkpoint, save_checkpoint
from mstudio.trainer.config import ConfigError, TrainConfig, config_from_dict, load_config
from mstudio.trainer.evaluate import evaluate_checkpoint
from mstudio.trainer.loop import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "config_from_dict", "evaluate_checkpoint", "export_policy",
           "latest_checkpoint", "load_checkpoint", "load_config", "save_checkpoint"]


def __dir__() -> list[str]:
    return __all__
