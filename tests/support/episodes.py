"""Episodes for store tests: random in-range arrays, and episodes whose frames name themselves and whose null
frames are flagged (the drop_null tests)."""

import numpy as np

from mstudio.data.contractor_import import FLAG_GUI_OPEN, FLAG_NULL


def random_episode(n: int = 5, size: tuple[int, int] = (4, 6), seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays of ``n`` frames of ``size``, every value in its array's range."""
    rng = np.random.default_rng(seed)
    return {
        "frames": rng.integers(0, 256, (n, *size, 3), dtype=np.uint8),
        "buttons": rng.integers(0, 8641, n).astype(np.int16),
        "camera": rng.integers(0, 121, n).astype(np.uint8),
        "env_buttons": rng.integers(0, 2**23, n).astype(np.uint32),
        "env_camera": rng.normal(size=(n, 2)).astype(np.float32),
        "flags": rng.integers(0, 32, n).astype(np.uint8),
    }


def append_flagged(store, episode_id: str, null: np.ndarray, number: int, rng: np.random.Generator) -> None:
    """Append an episode of ``len(null)`` frames to ``store``; frame ``i``'s pixels are ``(i % 256, i // 256, number)``.

    Null frames (``null`` True) get buttons 0, camera 60 and the ``FLAG_NULL`` bit, as the importers write them;
    the others a random non-null action. ``FLAG_GUI_OPEN`` is set at random on all frames: it must not count.
    """
    n = len(null)
    height, width = store.image_size
    frames = np.zeros((n, height, width, 3), dtype=np.uint8)
    frames[..., 0] = (np.arange(n) % 256)[:, None, None]
    frames[..., 1] = (np.arange(n) // 256)[:, None, None]
    frames[..., 2] = number
    flags = null * FLAG_NULL + (rng.random(n) < 0.5) * FLAG_GUI_OPEN
    store.append(episode_id, {
        "frames": frames,
        "buttons": np.where(null, 0, rng.integers(1, 8641, n)).astype(np.int16),
        "camera": np.where(null, 60, rng.integers(0, 121, n)).astype(np.uint8),
        "env_buttons": np.zeros(n, np.uint32),
        "env_camera": np.zeros((n, 2), np.float32),
        "flags": flags.astype(np.uint8),
    })


def frame_ids(image) -> tuple[list[int], list[int]]:
    """The (frame numbers, episode numbers) the frames of a window ``(T, H, W, 3)`` uint8 tensor show."""
    pixel = image[:, 0, 0].long()
    return (pixel[:, 0] + 256 * pixel[:, 1]).tolist(), pixel[:, 2].tolist()
