"""TinyPolicy: the protocol's shapes, memory that carries, and clear input errors."""

import pytest
import torch

from mstudio.models import TinyPolicy


def _images(B, T, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, size, size, 3), dtype=torch.uint8, generator=gen)


def test_chunked_calls_equal_one_long_call():
    policy = TinyPolicy(hidsize=8, image_size=16)
    images = _images(2, 6)
    whole, state_whole = policy({"image": images}, policy.initial_state(2))
    first, state = policy({"image": images[:, :4]}, policy.initial_state(2))
    second, state = policy({"image": images[:, 4:]}, state)
    torch.testing.assert_close(torch.cat([first["vpred"], second["vpred"]], 1), whole["vpred"])
    torch.testing.assert_close(state[0], state_whole[0])


@pytest.mark.parametrize(
    "image, state, message",
    [
        (_images(2, 3).float(), None, r"needs image uint8 \(2, 3, 16, 16, 3\), got torch.float32"),
        (_images(2, 3, size=32), None, r"got torch.uint8 \(2, 3, 32, 32, 3\)"),
        (_images(2, 3), (torch.zeros(3, 8),), r"h of shape \(2, 8\), got \(3, 8\)"),
    ],
)
def test_bad_input(image, state, message):
    policy = TinyPolicy(hidsize=8, image_size=16)
    with pytest.raises(ValueError, match=message):
        policy({"image": image}, state or policy.initial_state(2))
