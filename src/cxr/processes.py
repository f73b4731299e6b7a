"""Processes: whether one still runs, and pool workers that die with their parent."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def worker_dies_with_parent() -> None:
    """For a process-pool initializer: the worker gets SIGKILL when its parent dies, however
    it dies (Linux; elsewhere nothing), instead of waiting on a pipe for good."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl: go now
            os._exit(1)
