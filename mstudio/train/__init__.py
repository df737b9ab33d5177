"""Train state and the pure, compilable train step."""

from mstudio.train.memory import carry_memory, episode_starts
from mstudio.train.state import TrainState, init_state
from mstudio.train.step import TrainStep, build_train_step, make_train_step

__all__ = ["TrainState", "TrainStep", "build_train_step", "carry_memory", "episode_starts", "init_state", "make_train_step"]
