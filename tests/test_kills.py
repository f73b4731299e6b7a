"""A killed stage leaves no worker processes and no scratch behind (or the next run removes
its scratch)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from cxr.files import atomic_path

# A stage whose pool workers block, writing into an atomic folder, as prepare does.
STAGE = textwrap.dedent("""
    import time
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path
    from cxr.errors import run_stage
    from cxr.files import atomic_path
    from cxr.processes import worker_dies_with_parent

    def block(_):
        time.sleep(600)

    def main():
        with atomic_path(Path({out!r})) as tmp:
            tmp.mkdir()
            (tmp / "half.npy").write_bytes(b"x" * 1000)
            with ProcessPoolExecutor(2, initializer=worker_dies_with_parent) as pool:
                list(pool.map(block, range(2)))

    run_stage(main)
""")


def start(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", STAGE.format(out=str(tmp_path / "prepared"))])
    deadline = time.time() + 60
    while len(psutil.Process(proc.pid).children()) < 2:
        assert proc.poll() is None and time.time() < deadline, "the stage did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    return proc, psutil.Process(proc.pid).children()


def gone(workers, timeout=10) -> bool:
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    return not alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_stage_takes_its_workers_with_it(tmp_path, sig):
    proc, workers = start(tmp_path)
    os.kill(proc.pid, sig)  # the process only, not its group
    proc.wait(timeout=30)
    assert gone(workers), "pool workers outlived their parent"
    scratch = list(tmp_path.glob(".prepared.pid*.tmp"))
    assert not (tmp_path / "prepared").exists()  # never a half-written output
    if sig == signal.SIGTERM:  # cleans up as Ctrl-C does
        assert proc.returncode == 143 and not scratch
    else:  # nothing runs on SIGKILL: the next run removes the dead one's scratch
        assert len(scratch) == 1
        with atomic_path(tmp_path / "prepared") as tmp:
            tmp.mkdir()
        assert not list(tmp_path.glob(".prepared.pid*.tmp"))
        assert (tmp_path / "prepared").is_dir()


def test_a_running_writers_scratch_is_left_alone(tmp_path):
    live = tmp_path / f".prepared.pid{os.getpid()}.abc.tmp"
    live.mkdir()
    with atomic_path(tmp_path / "prepared") as tmp:
        tmp.mkdir()
    assert live.exists()
