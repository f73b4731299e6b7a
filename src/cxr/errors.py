"""Errors a user can fix, and the stage entry point that shows them without a stack trace."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CxrError(Exception):
    """Bad input or configuration; the message names the problem and the fix."""


def run_stage(main: Callable[[], object]) -> None:
    try:
        main()
    except CxrError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
