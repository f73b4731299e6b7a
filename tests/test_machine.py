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


@pytest.mark.parametrize(
    "info, env, expected",
    [
        (EPYC, None, "off"),  # AVX2 only: TensorFlow's own rule leaves oneDNN off
        (XEON, None, "on"),
        (EPYC, "1", "on"),
        (XEON, "0", "off"),
        (XEON, "False", "off"),
    ],
)
def test_onednn_follows_the_variable_else_tensorflows_cpu_rule(info, env, expected, monkeypatch):
    monkeypatch.delenv(machine.ONEDNN_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(machine.ONEDNN_ENV, env)
    assert machine.onednn(info) == expected


@pytest.mark.parametrize("env", [None, "0"])
def test_tensorflow_uses_onednn_after_import_cxr_unless_told_not_to(env):
    """On an AVX2-only CPU TensorFlow alone would leave oneDNN off: `import cxr` turns it on,
    and TensorFlow must agree with what the header says."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != machine.ONEDNN_ENV}
    if env is not None:
        environ[machine.ONEDNN_ENV] = env
    code = (
        "import cxr\n"
        "from cxr import machine\n"
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "import os\n"
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], machine.onednn(),"
        " 'on' if port.IsMklEnabled() else 'off')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == (["1", "on", "on"] if env is None else ["0", "off", "off"])
