"""Small policies for the train-step tests."""

import torch
import torch.nn.functional as F
from torch import nn


class CountingPolicy(nn.Module):
    """A policy whose memory counts the frames it has seen since its episode began.

    ``state = (count float (B, 1),)``; the logits depend on the parameters and on the count, so the carry
    is visible both in ``state_out`` and in the loss. ``value`` gets no gradient from behaviour cloning.
    """

    def __init__(self, image_size=8):
        super().__init__()
        self.encoder = nn.Linear(image_size * image_size * 3, 16)
        self.buttons = nn.Linear(17, 8641)
        self.camera = nn.Linear(17, 121)
        self.value = nn.Linear(17, 1)

    def initial_state(self, batch_size):
        return (torch.zeros(batch_size, 1),)

    def forward(self, batch, state_in):
        image = batch["image"]
        B, T = image.shape[:2]
        x = torch.tanh(self.encoder(image.reshape(B, T, -1).float() / 255))
        count = state_in[0][:, None, :] + torch.arange(1, T + 1, dtype=torch.float32)[None, :, None]
        h = torch.cat([x, count / 100], dim=-1)
        latents = {
            "pi_logits": {"buttons": F.log_softmax(self.buttons(h), -1)[:, :, None],
                          "camera": F.log_softmax(self.camera(h), -1)[:, :, None]},
            "vpred": self.value(h),
        }
        return latents, (state_in[0] + T,)
