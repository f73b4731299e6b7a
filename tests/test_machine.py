"""Every figure names its machine: the CPU's SIMD level is read from its flags."""

from __future__ import annotations

import pytest

from cxr import machine

EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
XEON = "model name\t: Intel(R) Xeon(R)\nflags\t: avx avx2 avx512f avx512bw amx_tile amx_bf16\n"


@pytest.mark.parametrize(
    "info, expected",
    [
        (EPYC, ("AMD EPYC 7B13", "AVX2")),
        (XEON, ("Intel(R) Xeon(R)", "AVX-512 + AMX")),
        (XEON.replace(" amx_tile", ""), ("Intel(R) Xeon(R)", "AVX-512")),
        ("model name\t: Old\nflags\t: sse2\n", ("Old", "none known")),
    ],
)
def test_the_simd_level_is_the_widest_vector_flag(info, expected):
    assert machine.cpu(info) == expected


def test_the_header_names_cpu_cores_gpu_and_versions():
    line = machine.header()
    model, simd = machine.cpu()
    assert line.startswith(f"{model} ({simd}), ") and " cores, " in line and "GPU " in line
    assert "keras " in line and line.endswith(machine.facts()["date"])
    assert not machine.header(dated=False).endswith(machine.facts()["date"])


@pytest.mark.parametrize(
    "code, stdout, expected",
    [
        (0, "NVIDIA H200\nNVIDIA H200\n", ["NVIDIA H200", "NVIDIA H200"]),
        (9, "NVIDIA-SMI has failed because it couldn't communicate with the driver.\n", []),
    ],
)
def test_gpus_are_named_only_when_nvidia_smi_succeeds(code, stdout, expected, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(machine.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        machine.subprocess,
        "run",
        lambda *a, **k: SimpleNamespace(returncode=code, stdout=stdout),
    )
    assert machine.gpus() == expected
