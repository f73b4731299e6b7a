"""The user's repository: where it is and which commit it is at."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def repo_root(start: Path | None = None) -> Path:
    """The user's repository root: `$DVC_ROOT`, else the nearest folder with `.dvc/`."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"
