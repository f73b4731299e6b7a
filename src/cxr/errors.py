"""Errors a user can fix, and the stage entry point that shows them without a stack trace."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

MAX_MESSAGE = 1_000  # characters: a message quotes the user's values, which can be huge
# When this process started (ms since the epoch), set once run_stage runs it as a stage: its
# MLflow run starts then (cxr.tracking.start_run), so that the run's duration in MLflow is
# the stage's, start-up (Python, TensorFlow, MLflow: ~5 s) included.
stage_started_ms: int | None = None


class CxrError(Exception):
    """Bad input or configuration; the message names the problem and the fix. A message over
    MAX_MESSAGE characters keeps its start and its end (the fix), the middle cut."""

    def __init__(self, message: object = ""):
        text = str(message)
        if len(text) > MAX_MESSAGE:
            head, tail = text[: MAX_MESSAGE * 3 // 5], text[-MAX_MESSAGE // 3 :]
            cut = len(text) - len(head) - len(tail)
            text = f"{head} [... {cut:,} characters cut ...] {tail}"
        super().__init__(text)


class DownloadError(CxrError):
    """A dataset could not be fetched or unpacked (cxr.download and the modules it uses)."""


class DataError(CxrError):
    """The images cannot be prepared as asked (cxr.prepare and cxr.balance)."""


class CorruptArchive(DownloadError):
    """The zip itself is damaged (not its layout): a cached download is fetched again."""


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's main: a CxrError is one line on stderr (exit status 2); SIGTERM cleans
    up as Ctrl-C does (every `finally` runs: temporaries removed), exit status 143."""

    import psutil

    global stage_started_ms
    stage_started_ms = int(psutil.Process().create_time() * 1000)

    def terminated(signum, frame):
        import multiprocessing

        for child in multiprocessing.active_children():  # pool workers: they would be
            child.kill()  # waited for, to the end of their work, before any clean-up
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        main()
    except CxrError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
