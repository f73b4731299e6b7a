import os
import subprocess
import sys

from cxr.console import filter_stream, noise_patterns

ONEDNN = (
    b"I0000 00:00:1795698088.712745    4464 port.cc:153] oneDNN custom operations are on. "
    b"You may see slightly different numerical results.\n"
)
CUINIT = (
    b"E0000 00:00:1795698093.248872    4464 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
REAL = b"E0000 00:00:1795698093.248872    4464 some_op.cc:12] an out-of-memory error\n"


def run_filter(chunks, nvidia=False) -> bytes:
    out = []
    filter_stream(chunks, noise_patterns(nvidia), out.append)
    return b"".join(out)


def test_known_noise_goes_and_everything_else_stays():
    text = run_filter([b"start\n" + ONEDNN + REAL, CUINIT + b"Traceback (most recent call)\n"])
    assert text == b"start\n" + REAL + b"Traceback (most recent call)\n"
    # with an NVIDIA driver a failing cuInit is news, not noise
    assert run_filter([CUINIT], nvidia=True) == CUINIT


def test_dvc_temp_copy_warnings_go_but_a_workspace_one_stays():
    """`dvc exp run --temp` checks out outputs its fresh copy has none of yet: noise. The same
    warning about the user's own workspace says something is missing: it stays."""
    temp = b"WARNING: No file hash info found for '/r/.dvc/tmp/exps/standalone/tmpq/raw'. "
    workspace = b"WARNING: No file hash info found for '/r/models/cnn'. "
    end = b"It won't be created.\n"
    assert run_filter([temp[:20], temp[20:] + end, workspace + end]) == workspace + end


def test_lines_split_across_writes_and_progress_bars_pass_at_once():
    assert run_filter([ONEDNN[:30], ONEDNN[30:], b"done\n"]) == b"done\n"
    seen = []
    chunks = iter([b"\rdecode:  10%|#", b"  | 80/800", b"\rdecode:  20%|##"])
    filter_stream(chunks, noise_patterns(False), seen.append)
    assert seen == [b"\rdecode:  10%|#", b"  | 80/800", b"\rdecode:  20%|##"]  # no waiting
    assert run_filter([b"I0000 unfinished at exit"]) == b"I0000 unfinished at exit"


SCRIPT = f"""
import os, warnings
from cxr.console import quiet
quiet()
os.write(2, {ONEDNN + REAL!r})
warnings.warn("The specified dataset source can be interpreted in multiple ways: x")
warnings.warn("a warning of our own")
raise SystemExit("the stage's own error")
"""


def test_a_quiet_process_keeps_its_errors_and_warnings():
    def stderr(**env):
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, env={**os.environ, **env}
        )
        assert proc.returncode == 1
        return proc.stderr

    quiet = stderr()
    assert ONEDNN not in quiet and b"interpreted in multiple ways" not in quiet
    assert REAL in quiet and b"a warning of our own" in quiet
    assert quiet.rstrip().endswith(b"the stage's own error")  # drained before exit
    loud = stderr(CXR_VERBOSE="1")
    assert ONEDNN in loud and b"interpreted in multiple ways" in loud
