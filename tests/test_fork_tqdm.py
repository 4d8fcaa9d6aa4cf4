"""A child forked while another thread holds tqdm's lock can still show a progress bar (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from tqdm import tqdm
from tqdm.std import TqdmDefaultWriteLock


class OwnLockBar(tqdm):
    """A subclass holding a lock of its own, as tqdm.auto's class (the library's bars) does when its get_lock() ran
    before tqdm's own."""


OwnLockBar.set_lock(TqdmDefaultWriteLock())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("bar", [tqdm, OwnLockBar])
def test_a_child_forked_while_tqdms_lock_is_held_makes_a_bar(bar):
    held, release = threading.Event(), threading.Event()

    def holder() -> None:  # what tqdm's monitor thread does every few seconds
        with bar.get_lock():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: a bar, then exit 0 (os._exit: no pytest teardown in the child)
        try:
            with bar(total=1, disable=True) as shown:
                shown.update()
        finally:
            os._exit(0)
    release.set()
    thread.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child waited for ever for tqdm's lock (held by a thread of the parent at the fork)")
