"""interrupts_after: Ctrl-C during the block lands after it, never inside."""

import os
import signal
import threading

import pytest

from mstudio.trainer.interrupt import interrupts_after


def test_interrupt_inside_the_block_is_raised_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_after():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")  # still runs: the interrupt waited
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back


def test_no_interrupt_no_exception_and_handler_restored():
    with interrupts_after():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_in_the_block_propagates_and_restores_the_handler():
    with pytest.raises(ValueError, match="boom"):
        with interrupts_after():
            raise ValueError("boom")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_of_the_caller_stays_in_charge():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts_after():
            os.kill(os.getpid(), signal.SIGINT)
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_it_changes_nothing():
    seen = []

    def work():
        with interrupts_after():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
