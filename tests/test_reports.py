"""Unit tests of what evaluate, compare and register write, on made-up predictions (no model,
no pipeline): the headline metrics, the predictions file, the comparison and the model card."""

import numpy as np
import pytest

from cxr import compare as compare_module
from cxr import evaluate
from cxr.errors import CxrError
from cxr.evaluate import read_predictions, write_predictions
from cxr.files import read_json, write_json
from cxr.metrics import HEADLINE, INTERVALS
from cxr.model_card import model_card

CLASSES = ["covid", "normal", "pneumonia"]
EVALUATE = {"bootstrap": 200, "ci_level": 0.95, "seed": 0, "calibration_bins": 5}


def predictions(correct: float, n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of a classifier right on about `correct` of n images."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    guess = np.where(rng.random(n) < correct, y, (y + 1) % len(CLASSES))
    probs = rng.random((n, len(CLASSES))) * 0.2
    probs[np.arange(n), guess] += 1
    return y, probs / probs.sum(axis=1, keepdims=True)


def test_headline_metrics_have_their_intervals():
    y, probs = predictions(0.8)
    metrics = evaluate.test_metrics(y, probs, CLASSES, EVALUATE)
    assert [k for k in metrics if k in HEADLINE] == list(HEADLINE)
    for key in INTERVALS:
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))
    assert metrics["n_test"] == 60 and set(metrics["per_class"]) == set(CLASSES)
    assert evaluate.test_metrics(y, probs, CLASSES, EVALUATE) == metrics  # seeded


def test_predictions_file_round_trips(tmp_path):
    y, probs = predictions(0.7)
    rows = [{"path": f"img/{i}.png"} for i in range(len(y))]
    write_predictions(tmp_path / "p.csv", y, probs, CLASSES, rows)
    y2, probs2, paths = read_predictions(tmp_path / "p.csv", CLASSES)
    assert np.array_equal(y2, y) and paths == [r["path"] for r in rows]
    np.testing.assert_allclose(probs2, probs, atol=5e-7)


def evaluation_json(y: np.ndarray, probs: np.ndarray, correct: float) -> dict:
    """test.json of a model right on about `correct` of the images intact, and on as many
    with the lungs hidden as with them alone: it reads outside the lungs."""
    audit = {
        view: predictions(correct, len(y), seed=k + 10)[1]
        for k, view in enumerate(("lungs_hidden", "lungs_only"))
    }
    return {
        **evaluate.test_metrics(y, probs, CLASSES, EVALUATE),
        **evaluate.audit_scores(y, audit, CLASSES, EVALUATE),
        "gradcam_lung_share": 0.25,
        "lung_area_share": 0.3,
        "lung_masks_from_files": 1.0,
    }


def val_json(correct: float, seed: int) -> dict:
    """val.json of a model right on about `correct` of the validation images."""
    from cxr.metrics import scores

    y, probs = predictions(correct, seed=seed)
    result = scores(y, probs, CLASSES)
    return {"n_val": len(y), **{k: result[k] for k in HEADLINE}} | {
        f"{view}_{key}": 0.4
        for view in ("lungs_hidden", "lungs_only")
        for key in ("accuracy", "macro_f1")
    }


def fake_evaluation(folder, scores: dict[str, tuple[float, int]], paths_of=None, val=None):
    """evaluation/<model>/ as the evaluate stage leaves it, for models scoring about
    `correct` on the test split (and on validation, unless `val` says otherwise), with
    `param_count` parameters."""
    for i, (name, (correct, param_count)) in enumerate(scores.items()):
        out = folder / name
        out.mkdir(parents=True)
        y, probs = predictions(correct, seed=i)
        rows = [{"path": (paths_of or {}).get(name, "img") + f"/{k}.png"} for k in range(len(y))]
        write_predictions(out / "predictions.csv", y, probs, CLASSES, rows)
        write_json(out / "test.json", evaluation_json(y, probs, correct))
        write_json(out / "val.json", val_json((val or {}).get(name, correct), seed=i + 100))
        write_json(out / "run.json", {"run_id": f"run-{name}", "param_count": param_count})


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # a throw-away MLflow store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return {
        "data": {"classes": CLASSES},
        "train": {"models": ["big", "small", "weak"]},
        "compare": {"metric": "macro_f1"},
        "evaluate": {"ci_level": 0.95},
        "mlflow": {"experiment": "cxr-test"},
    }


def test_compare_ranks_tests_the_top_two_and_draws_the_chance_line(tmp_path, params, monkeypatch):
    fake_evaluation(
        tmp_path / "evaluation", {"big": (0.9, 900), "small": (0.9, 100), "weak": (0.5, 50)}
    )
    figures = []
    monkeypatch.setattr(compare_module, "save_figure", lambda fig, path: figures.append(fig))
    summary = compare_module.compare(params, tmp_path / "evaluation", tmp_path / "out")
    ranking = [r["model"] for r in summary["ranking"]]
    assert ranking[-1] == "weak" and summary["champion"] == ranking[0]
    assert summary["runner_up"] == ranking[1] and summary["mcnemar"]["p_value"] <= 1
    assert read_json(tmp_path / "out" / "summary.json") == summary
    table = (tmp_path / "out" / "table.md").read_text()
    assert all(label in table for label in HEADLINE.values()) and "McNemar" in table
    assert "on a machine this store does not record" in table  # no training runs here
    (chance,) = [line for line in figures[0].axes[0].lines if "chance" in line.get_label()]
    assert chance.get_ydata()[0] == pytest.approx(1 / 3)
    assert chance.get_label() == "chance (3 classes)"


def test_compare_ties_go_to_the_smaller_model():
    rows = [
        {"model": "b", "val_macro_f1": 0.9, "param_count": 100},
        {"model": "a", "val_macro_f1": 0.9, "param_count": 900},
        {"model": "c", "val_macro_f1": 0.9, "param_count": 100},
    ]
    assert [r["model"] for r in compare_module.rank(rows, "macro_f1")] == ["b", "c", "a"]


def test_the_champion_is_chosen_on_validation_when_the_test_split_disagrees(tmp_path, params):
    """`picked` is best on validation and worst on test, `lucky` the reverse: the champion
    is `picked`, and its reported score is its test score, not the best test score."""
    params["train"]["models"] = ["lucky", "picked"]
    fake_evaluation(
        tmp_path / "evaluation",
        {"lucky": (0.95, 100), "picked": (0.7, 100)},
        val={"lucky": 0.6, "picked": 0.9},
    )
    summary = compare_module.compare(params, tmp_path / "evaluation", tmp_path / "out")
    test = {m: read_json(tmp_path / "evaluation" / m / "test.json") for m in ("lucky", "picked")}
    val = {m: read_json(tmp_path / "evaluation" / m / "val.json") for m in ("lucky", "picked")}
    assert test["lucky"]["macro_f1"] > test["picked"]["macro_f1"]
    assert val["picked"]["macro_f1"] > val["lucky"]["macro_f1"]
    assert summary["champion"] == "picked" and summary["split"] == "val"
    assert summary["value"] == val["picked"]["macro_f1"]
    assert summary["test_value"] == test["picked"]["macro_f1"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Champion by validation `macro_f1`: **picked**" in table


def test_compare_refuses_missing_or_mismatched_evaluations(tmp_path, params):
    fake_evaluation(
        tmp_path / "evaluation", {"big": (0.9, 9), "small": (0.8, 1)}, {"small": "elsewhere"}
    )
    params["train"]["models"] = ["big", "small"]
    with pytest.raises(CxrError, match="evaluated on different test images"):
        compare_module.compare(params, tmp_path / "evaluation", tmp_path / "out")
    params["train"]["models"] = ["big", "small", "weak"]
    with pytest.raises(CxrError, match=r"run `dvc repro evaluate@weak`"):
        compare_module.compare(params, tmp_path / "evaluation", tmp_path / "out")


def test_model_card_shows_every_headline_metric_and_the_sources():
    y, probs = predictions(0.8)
    test = evaluation_json(y, probs, 0.8)
    summary = {"metric": "macro_f1", "champion": "cnn", "classes": CLASSES, "ranking": [{}] * 6}
    dataset = {
        "n_images": 60,
        "image_size": 64,
        "fingerprint": "f" * 64,
        "classes": CLASSES,
        "counts": {"test": dict.fromkeys(CLASSES, 20)},
    }
    sources = {"hospital-a": {"n": 60, "accuracy": 0.8, "classes": {"covid": 20}}}
    card = model_card(summary, test, sources, dataset, "cxr-classifier", "3", "no champion yet")
    assert "# Model card: cxr-classifier version 3 (cnn)" in card
    for key, label in HEADLINE.items():
        (line,) = [row for row in card.splitlines() if row.startswith(f"| {label} |")]
        assert f"{test[key]:.3f}" in line
        assert ("[" in line) == (key in INTERVALS)
    assert "| hospital-a | 60 | 0.800 | covid 20 |" in card
    assert "Not for clinical use" in card
