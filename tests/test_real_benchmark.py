"""End-to-end: the real-radiograph benchmark on the shared 120-image sample, tiny settings.

Speed and accuracy are benchmark figures, not assertions: this checks that the command runs
the pipeline as a DVC experiment, scores the baselines on the same test images, prints the
table and leaves the workspace as it was."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REAL_SAMPLE, copy_repo, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason=f"{REAL_SAMPLE} (real sample) is absent"),
]

TINY = [
    "train.models=[cnn, cnn4_bn]",
    "prepare.image_size=32",
    "train.epochs=2",
    "models.cnn.epochs=2",  # the profile's own 60 for cnn would win over train.epochs
    "train.batch_size=16",
    "evaluate.bootstrap=200",
]


def test_real_benchmark_prints_models_and_baselines_on_one_split(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    before = (repo / "params.yaml").read_text()
    out = tmp_path / "figures.json"
    sets = [arg for item in TINY for arg in ("-S", item)]
    proc = run(
        [sys.executable, "benchmarks/real_benchmark.py", "--archive", str(REAL_SAMPLE),
         "--profile", "real_cpu", *sets, "--workdir", str(tmp_path / "work"), "--out", str(out)],
        repo,
        timeout=600,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    header = lines.index(
        next(line for line in lines if line.startswith("| model |") and "vs LR" in line)
    )
    names = [line.split("|")[1].strip().split(" ")[0] for line in lines[header + 2 : header + 6]]
    assert names == ["logistic_regression", "pca_svm", "cnn", "cnn4_bn"], proc.stdout
    figures = json.loads(out.read_text())
    assert {r["name"] for r in figures["rows"]} == {
        "logistic_regression", "pca_svm", "cnn", "cnn4_bn"
    }  # fmt: skip
    for row in figures["rows"]:  # the lung audit of models and baselines alike
        for key in ("accuracy", "macro_f1", "lungs_hidden", "lungs_only"):
            point, low, high = row[key]
            assert 0 <= low <= point <= high <= 1, row
    models = [r for r in figures["rows"] if r["kind"] == "model"]
    assert all(r["fit_seconds"] > 0 and r["stage_seconds"] > 0 for r in models)
    assert figures["verdict"]["champion"] in {"cnn", "cnn4_bn"}
    # The reference row compares with itself: nothing either one alone gets right.
    lr = next(r for r in figures["rows"] if r["name"] == "logistic_regression")
    assert lr["mcnemar_vs_lr"]["a_only_correct"] == lr["mcnemar_vs_lr"]["b_only_correct"] == 0
    # The champion's Grad-CAM overlays were kept; the experiment and params.yaml were not touched.
    export = tmp_path / "work" / figures["experiment"] / "evaluation"
    assert (export / figures["verdict"]["champion"] / "figures" / "gradcam.png").is_file()
    assert (repo / "params.yaml").read_text() == before
    assert run(["dvc", "exp", "list", "--name-only"], repo).stdout.strip() == ""
    assert run(["git", "status", "--porcelain"], repo).stdout.strip() == ""
