"""Where a stage's wall time goes: its start-up (Python, imports) and its named phases.

Each stage that does heavy work prints one line at the end, for example

    train@cnn: 31.4 s: start-up 6.2, data 0.3, build 0.5, fit 21.9, logging 2.5

which `benchmarks/pipeline_benchmark.py` collects into a table. Start-up counts from the
moment the operating system started the process, so it includes the interpreter and every
import before the first phase.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

_IMPORTED = time.perf_counter()
LINE = re.compile(r"^(?P<stage>\S+): (?P<total>[\d.]+) s: (?P<phases>.+)$")


def process_seconds() -> float:
    """Wall seconds since this process started (Linux: /proc; elsewhere: since this module
    was imported, which leaves out the interpreter's start and earlier imports)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


class Phases:
    """Consecutive phases of a stage; `done(name)` closes the phase that ends now."""

    def __init__(self, stage: str):
        self.stage = stage
        self.seconds: dict[str, float] = {"start-up": process_seconds()}
        self._last = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def move(self, source: str, phase: str, seconds: float, before: bool = False) -> None:
        """Count `seconds` of phase `source` as `phase` (a part measured inside it), listed
        after `source`, or just before it (`before`: the part came first)."""
        self.seconds[source] -= seconds
        if before and phase not in self.seconds:
            order = list(self.seconds)
            order.insert(order.index(source), phase)
            self.seconds = {k: self.seconds.get(k, 0.0) for k in order}
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def line(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}" for name, s in self.seconds.items())
        return f"{self.stage}: {sum(self.seconds.values()):.1f} s: {parts}"

    def metrics(self) -> dict[str, float]:
        """`time_<phase>_seconds` for MLflow."""
        return {
            f"time_{name.replace('-', '')}_seconds": round(s, 2) for name, s in self.seconds.items()
        }


def parse(line: str) -> tuple[str, float, dict[str, float]] | None:
    """(stage, total seconds, {phase: seconds}) of a `Phases.line`, or None."""
    match = LINE.match(line.strip())
    if not match:
        return None
    phases = {}
    for part in match["phases"].split(", "):
        name, _, value = part.rpartition(" ")
        try:
            phases[name] = float(value)
        except ValueError:
            return None
    return match["stage"], float(match["total"]), phases
