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

from cxr.processes import alive


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


def remove_stale_scratch(path: Path) -> None:
    """Remove the temporaries of `path` left by a process that no longer runs (SIGKILL, a
    crash, a pre-empted machine); a running writer's stay."""
    for old in path.parent.glob(f".{glob.escape(path.stem)}.pid*.tmp"):
        pid = old.name[len(path.stem) + 5 :].split(".", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
