"""Errors a user can fix, and the stage entry point that shows them without a stack trace."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class CxrError(Exception):
    """Bad input or configuration; the message names the problem and the fix."""


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's main: a CxrError is one line on stderr (exit status 2); SIGTERM cleans
    up as Ctrl-C does (every `finally` runs: temporaries removed), exit status 143."""

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
