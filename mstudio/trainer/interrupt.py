"""Ctrl-C held back until the work in hand is done."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["interrupts_after"]


@contextlib.contextmanager
def interrupts_after() -> Iterator[None]:
    """Run the block to its end even if Ctrl-C (SIGINT) arrives, then raise the ``KeyboardInterrupt``.

    The Trainer's eager step updates the state in place (donated); an interrupt half-way would leave half the
    parameters updated, and the checkpoint saved on Ctrl-C would hold that. Held back, the interrupt lands
    between steps, with a consistent state. Only where Python's own handler is installed, in the main thread
    (a handler of the caller's stays in charge; other threads cannot receive signals).
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
