"""Train state and the pure, compilable train step."""

from mstudio.train.memory import carry_memory, episode_starts
from mstudio.train.state import TrainState, init_state, set_hyperparams
from mstudio.train.step import TrainStep, make_train_step, train_step_function
from mstudio.train.transfer import batch_to_device

__all__ = ["TrainState", "TrainStep", "batch_to_device", "carry_memory", "episode_starts", "init_state",
           "make_train_step", "set_hyperparams", "train_step_function"]


def __dir__() -> list[str]:
    return __all__
