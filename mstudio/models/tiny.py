"""A small recurrent policy with VPT-sized heads, for tests, quick demos and benchmarks of the step itself."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mstudio.actions import N_BUTTONS, N_CAMERA

__all__ = ["TinyPolicy"]


class TinyPolicy(nn.Module):
    """Conv encoder -> GRU cell over time -> VPT action heads and a value head.

    The GRU's hidden state is the recurrent memory: ``initial_state(B)`` is ``(zeros (B, hidsize),)`` and
    ``forward`` returns the hidden state after the window's last frame, so windows chained through
    ``state_out`` see the whole episode. The time loop is unrolled (``T`` is static under compile).

    Args:
        hidsize: width of the encoder output and of the memory.
        image_size: ``H = W`` of the input frames (a multiple of 16).
    """

    def __init__(self, hidsize: int = 64, image_size: int = 64):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
        self.hidsize, self.image_size = hidsize, image_size
        self.conv1 = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=4, stride=4)
        self.encoder_out = nn.Linear(32 * (image_size // 16) ** 2, hidsize)
        self.core = nn.GRUCell(hidsize, hidsize)
        self.norm = nn.LayerNorm(hidsize)
        self.pi_buttons = nn.Linear(hidsize, N_BUTTONS)
        self.pi_camera = nn.Linear(hidsize, N_CAMERA)
        self.value = nn.Linear(hidsize, 1)

    def initial_state(self, batch_size: int) -> tuple[Tensor]:
        """``(h,)`` with ``h`` zeros ``(batch_size, hidsize)`` in the parameters' dtype (float32 unless converted)."""
        return (torch.zeros(batch_size, self.hidsize, dtype=self.value.weight.dtype, device=self.value.weight.device),)

    def forward(self, batch: Mapping[str, Any], state_in: tuple[Tensor]) -> tuple[dict[str, Any], tuple[Tensor]]:
        """Args: ``batch["image"]`` uint8 ``(B, T, H, W, 3)``; ``state_in = (h,)``, float32 ``(B, hidsize)``.

        Returns: ``latents = {"pi_logits": {"buttons": (B, T, 1, 8641), "camera": (B, T, 1, 121)}`` (log-softmax),
        ``"vpred": (B, T, 1)}`` and ``state_out = (h,)`` after the last frame.
        """
        image = batch["image"]
        B, T = image.shape[:2]
        expected = (B, T, self.image_size, self.image_size, 3)
        if image.dtype != torch.uint8 or tuple(image.shape) != expected:
            raise ValueError(f"TinyPolicy needs image uint8 {expected}, got {image.dtype} {tuple(image.shape)}")
        (h,) = state_in
        if tuple(h.shape) != (B, self.hidsize):
            raise ValueError(f"TinyPolicy needs state_in (h,) with h of shape {(B, self.hidsize)}, got {tuple(h.shape)}")

        x = image.reshape(B * T, *image.shape[2:]).permute(0, 3, 1, 2).to(self.conv1.weight.dtype) / 255.0
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.encoder_out(x.flatten(1))).view(B, T, self.hidsize)
        outputs = []
        for t in range(T):
            h = self.core(x[:, t], h)
            outputs.append(h)
        features = self.norm(torch.stack(outputs, dim=1))
        latents = {
            "pi_logits": {
                "buttons": F.log_softmax(self.pi_buttons(features), dim=-1).unsqueeze(2),
                "camera": F.log_softmax(self.pi_camera(features), dim=-1).unsqueeze(2),
            },
            "vpred": self.value(features),
        }
        return latents, (h,)
