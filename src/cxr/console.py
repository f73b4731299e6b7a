"""What a user sees while a stage runs: the known start-up noise dropped, everything else kept.

TensorFlow's C++ runtime prints notices on every start that say nothing about this run
(oneDNN is on, the CPU has AVX, absl's pre-init banner, and on a machine without an NVIDIA
driver "Could not find cuda drivers" and a cuInit error), MLflow warns about how it
reads a dataset source on every training run, and `dvc exp run --temp` warns once per output
that its fresh copy has none yet. `quiet()` drops exactly those lines, matched
by their text: from file descriptor 2 (where C++ writes directly, below Python) through a
pipe that passes every other byte on unchanged, and from Python's warnings. Errors,
tracebacks, progress bars and every other message still reach the terminal.
`CXR_VERBOSE=1` turns the filter off.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import warnings
from pathlib import Path

VERBOSE_ENV = "CXR_VERBOSE"
# Lines from TensorFlow's C++ logging (absl format: "I0000 00:00:... file.cc:123] text").
_CPP = rb"^[IWEF]\d{4} [\d:. ]+\S+\.cc:\d+\] "
NOISE = [
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    _CPP + rb"oneDNN custom operations are on\.",
    _CPP + rb"This TensorFlow binary is optimized to use available CPU instructions",
    rb"^To enable the following instructions: .* in other operations, rebuild TensorFlow",
    # TensorFlow's graph from a newer tf.data than its runtime: harmless, says the message.
    _CPP + rb"NodeDef mentions attribute use_unbounded_threadpool which is not in the op",
    # `dvc exp run --temp` first checks out every output of dvc.yaml into its temporary copy
    # (under .dvc/tmp/exps/), which lacks them until its stages run: one warning each.
    rb"^WARNING: No file hash info found for '[^'\n]*[/\\]\.dvc[/\\]tmp[/\\]exps[/\\]"
    rb"[^'\n]*'\. It won't be created\.",
]
# Only where there is no NVIDIA driver: there, looking for CUDA is expected to fail.
NO_GPU_NOISE = [
    _CPP + rb"Could not find cuda drivers on your machine, GPU will not be used\.",
    _CPP + rb"failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: ",
]
WARNINGS = [
    # mlflow.data.from_numpy(source=<a folder>): both candidate readers are the same class.
    r"The specified dataset source can be interpreted in multiple ways",
]
# A line that starts like this may be noise: hold it until its end arrives.
_MAYBE = re.compile(rb"^(?:[IWEF]\d|WARNING: All|WARNING: No|To enable)")


def noise_patterns(has_nvidia_driver: bool) -> re.Pattern[bytes]:
    patterns = NOISE + ([] if has_nvidia_driver else NO_GPU_NOISE)
    return re.compile(b"|".join(b"(?:" + p + b")" for p in patterns))


def filter_stream(chunks, noise: re.Pattern[bytes], write) -> None:
    """Pass `chunks` (bytes, as they arrive) to `write`, less the lines matching `noise`. A
    line ends at a newline or a carriage return (progress bars redraw with one); an
    unfinished line goes on at once unless it may be noise."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        pieces = re.split(rb"(?<=[\r\n])", pending)
        pending = pieces.pop()
        out = [p for p in pieces if not noise.match(p)]
        if pending and not _MAYBE.match(pending):
            out.append(pending)
            pending = b""
        if out:
            write(b"".join(out))
    if pending and not noise.match(pending):
        write(pending)


_terminal: int | None = None  # the real stderr's descriptor once quiet() filters fd 2


def stderr_is_terminal() -> bool:
    """Whether stderr reaches a terminal (behind quiet()'s filter, the real one's answer)."""
    return os.isatty(_terminal) if _terminal is not None else sys.stderr.isatty()


def quiet() -> None:
    """Drop the known noise from this process's stderr and warnings (see the module's
    docstring); call before TensorFlow is imported. No-op with CXR_VERBOSE=1."""
    global _terminal
    if _terminal is not None or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own INFO and WARNING
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    noise = noise_patterns(Path("/proc/driver/nvidia").exists())
    sys.stderr.flush()
    terminal = _terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def chunks():
        while chunk := os.read(read_end, 65536):
            yield chunk

    def write(data: bytes) -> None:
        os.write(terminal, data)

    pump = threading.Thread(target=filter_stream, args=(chunks(), noise, write), daemon=True)
    pump.start()

    def restore() -> None:  # at exit: the pipe's last writer closes, the pump drains it
        sys.stderr.flush()
        os.dup2(terminal, 2)
        pump.join(timeout=2)

    atexit.register(restore)


def progress(iterable=None, **kwargs):
    """A tqdm progress bar; updated every 10 s when output goes to a log, not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, mininterval=0.2 if stderr_is_terminal() else 10, **kwargs)
