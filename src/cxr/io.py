"""Atomic outputs: a killed stage never leaves a half-written file that DVC would cache, and
the next run removes the scratch a killed one could not."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or folder); move it into place on success.

    The temporary name keeps the suffix, so writers that check extensions (Keras' `.keras`)
    accept it. On error the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(path)
    prefix = f".{path.stem}.pid{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_scratch(path: Path) -> None:
    """Remove the temporaries of `path` left by a process that no longer runs (SIGKILL, a
    crash, a pre-empted machine); a running writer's stay."""
    for old in path.parent.glob(f".{glob.escape(path.stem)}.pid*.tmp"):
        pid = old.name[len(path.stem) + 5 :].split(".", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


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


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Write a matplotlib figure as a PNG, atomically, and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def progress(iterable=None, **kwargs):
    """A tqdm progress bar; updated every 10 s when output goes to a log, not a terminal."""
    from tqdm import tqdm

    from cxr.console import stderr_is_terminal

    return tqdm(iterable, mininterval=0.2 if stderr_is_terminal() else 10, **kwargs)
