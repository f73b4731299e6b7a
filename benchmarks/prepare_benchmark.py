"""Time and peak memory of the prepare stage on the real database's size.

    python benchmarks/prepare_benchmark.py [--workdir DIR] [--image-size 224]

Writes 21,165 phantom radiographs at 299 px with the real class counts (COVID 3,616,
Lung_Opacity 6,012, Normal 10,192, Viral Pneumonia 1,345) into DIR (kept for reruns), then
runs `stages/prepare.py`'s work in a child process and samples the resident memory of the
whole process tree (parent and decode workers) every 0.1 s. Prints wall time, images/s and
the peak of the summed RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from cxr import machine
from cxr.classes import DATABASE_COUNTS, LABELS
from cxr.synthetic import write_dataset

CHILD = """
import sys
from pathlib import Path
from cxr.params import load_params
from cxr.prepare import prepare
cfg = {{**load_params()["prepare"], "image_size": {size}}}  # the stage's settings
report = prepare(Path({raw!r}), [], {labels!r}, cfg, Path({out!r}))
print("kept", report["n_images"], "rejects", len(report["rejects"]),
      "near-duplicate groups", len(report["near_duplicate_groups"]), file=sys.stderr)
"""


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cxr-bench")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    raw = args.workdir / "raw"
    if not (raw / ".complete").exists():
        started = time.perf_counter()
        for label, n in DATABASE_COUNTS.items():
            write_dataset(raw, per_class=n, size=299, seed=0, labels=(label,))
        (raw / ".complete").touch()
        print(
            f"generated {sum(DATABASE_COUNTS.values())} phantoms in "
            f"{time.perf_counter() - started:.0f} s"
        )
    out = args.workdir / "prepared"
    code = CHILD.format(size=args.image_size, raw=str(raw), labels=list(LABELS), out=str(out))
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    proc = psutil.Process(child.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rc = child.wait()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    n = sum(DATABASE_COUNTS.values())
    print(
        f"prepare: {n} images at 299 px -> {args.image_size} px on {os.cpu_count()} cores: "
        f"{seconds:.1f} s ({n / seconds:.0f} images/s), peak RSS of the process tree "
        f"{peak / 2**30:.2f} GiB, exit code {rc}"
    )
    print(f"# {machine.header()}")


if __name__ == "__main__":
    main()
