"""MineStudio's reset rule: boe = timestamp[:, 0] != last_timestamp + 1, row by row."""

import torch

from mstudio.train import carry_memory, episode_starts


def test_first_batch_starting_at_timestamp_1_continues_from_the_initial_memory():
    # last_timestamp starts at zeros, so a window starting at 1 "continues" and one starting at 0 restarts.
    timestamp = torch.tensor([[1, 2, 3], [0, 1, 2], [7, 8, 9]])
    assert episode_starts(timestamp, torch.zeros(3, dtype=torch.long)).tolist() == [False, True, True]


def test_rows_restart_independently():
    last = torch.tensor([3, 3, 10])
    timestamp = torch.tensor([[4, 5], [0, 1], [11, 12]])
    restart = episode_starts(timestamp, last)
    assert restart.tolist() == [False, True, False]
    memory = (torch.full((3, 2, 2), 5.0), torch.ones(3, 4, dtype=torch.bool))
    init = (torch.zeros(3, 2, 2), torch.zeros(3, 4, dtype=torch.bool))
    carried = carry_memory(memory, init, restart)
    assert carried[0][:, 0, 0].tolist() == [5.0, 0.0, 5.0]
    assert carried[1].all(dim=1).tolist() == [True, False, True]
    assert carried[1].dtype == torch.bool
