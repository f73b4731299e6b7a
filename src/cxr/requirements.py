"""What a logged model needs to load and serve: pinned to the lock file's exact versions."""

from __future__ import annotations

from pathlib import Path

LOCK_FILE = Path("requirements.lock")  # stages run in the repository root
MODEL_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy")


def pinned_requirements(
    names: tuple[str, ...] = MODEL_REQUIREMENTS, lock: Path = LOCK_FILE
) -> list[str] | None:
    """`name==version` lines of `names` from the lock file (None if absent)."""
    if not lock.is_file():
        return None
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, _ = line.partition("==")
        if sep and name.strip().lower() in names:
            pins[name.strip().lower()] = line.strip()
    return [pins[name] for name in names if name in pins]
