"""The machine a figure came from: CPU model and SIMD level, cores, memory, GPU, versions.

The same training ran 2.5-7x slower on a 2-core AVX2-only CPU than on an AVX-512 one, and
its last metric digits moved: every timing and every metric table names its machine with
`header()`. Reads /proc and package metadata only (no TensorFlow or JAX import).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

# Widest first: the first vector flag the CPU has names its SIMD level; AMX (matrix tiles,
# bf16/int8 only) is named beside it.
SIMD_LEVELS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
LIBRARIES = ("tensorflow", "keras", "jax", "mlflow", "dvc")
# TensorFlow's x86-64 Linux wheels run convolutions through oneDNN by default only on CPUs
# with one of these flags (IsMklEnabled in tensorflow/core/util/port.cc, TensorFlow 2.21);
# elsewhere, e.g. on an AVX2-only AMD EPYC (Zen 3), through Eigen: 2-4x slower for these
# models (docs/benchmarks.md). `use_onednn` turns it on there too.
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
ONEDNN_DEFAULT_FLAGS = {
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
}


def _cpuinfo() -> str:
    proc = Path("/proc/cpuinfo")
    return proc.read_text() if proc.exists() else ""


def _fields(info: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def use_onednn() -> None:
    """oneDNN for TensorFlow on every x86-64 CPU, unless TF_ENABLE_ONEDNN_OPTS says otherwise
    (0 keeps Eigen). Only before TensorFlow starts: `import cxr` calls it."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault(ONEDNN_ENV, "1")


def onednn(info: str | None = None) -> str:
    """'on' or 'off': whether TensorFlow started now would use oneDNN (its variable, else
    its CPU rule), from `info`, the text of /proc/cpuinfo by default."""
    value = os.environ.get(ONEDNN_ENV, "").strip().lower()
    if value in ("1", "true", "0", "false"):
        return "on" if value in ("1", "true") else "off"
    flags = set(_fields(_cpuinfo() if info is None else info).get("flags", "").split())
    return "on" if flags & ONEDNN_DEFAULT_FLAGS else "off"


def cpu(info: str | None = None) -> tuple[str, str]:
    """(CPU model name, widest SIMD level: AVX-512 | AVX2 | AVX | none known, '+ AMX' added
    where the CPU has matrix tiles) from `info`, the text of /proc/cpuinfo by default."""
    fields = _fields(_cpuinfo() if info is None else info)
    flags = set(fields.get("flags", "").split())
    simd = next((name for flag, name in SIMD_LEVELS if flag in flags), "none known")
    if "amx_tile" in flags:
        simd += " + AMX"
    return fields.get("model name") or platform.processor() or "unknown CPU", simd


def gpus() -> list[str]:
    """Names of the NVIDIA GPUs `nvidia-smi` lists (none without a driver)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:  # e.g. "NVIDIA-SMI has failed ...": no driver, no GPU to name
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def versions() -> str:
    """Installed versions of the libraries a figure depends on, e.g. 'tensorflow 2.21.0
    (oneDNN on)'."""
    found = []
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            extra = f" (oneDNN {onednn()})" if name == "tensorflow" else ""
            found.append(f"{name} {metadata.version(name)}{extra}")
    return ", ".join([f"python {platform.python_version()}", *found])


def facts() -> dict[str, str | int | float]:
    """The header's facts, for JSON figures and MLflow params."""
    model, simd = cpu()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "simd": simd,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory),
        "gpu": ", ".join(gpus()) or "none",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
    }


def header(dated: bool = True, f: dict | None = None) -> str:
    """One line, e.g. 'Intel(R) Xeon(R) Processor (AVX-512 + AMX), 2 cores, 24 GiB, GPU none;
    python 3.11.7, tensorflow 2.21.0, ...; 2026-12-02' (`dated`: with the date), of `f`
    (`facts()`, read now by default)."""
    f = f or facts()
    line = (
        f"{f['cpu']} ({f['simd']}), {f['cores']} cores, {f['memory_gib']} GiB, GPU {f['gpu']}; "
        f"{f['versions']}"
    )
    return f"{line}; {f['date']}" if dated else line
