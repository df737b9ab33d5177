"""Media files for importer tests."""

from pathlib import Path

import av
import numpy as np


def write_audio_only(path: Path) -> None:
    """An ``.mp4`` at ``path`` with one short AAC audio stream and no video stream."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
