import shutil
from collections import Counter

import numpy as np
import pytest

from cxr.classes import DATASET_DIR, LABELS
from cxr.images import load_grey
from cxr.prepare import DataError, index_images, load_prepared, prepare
from tests.conftest import REAL_SAMPLE

CFG = {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25, "seed": 3}


def test_split_is_stratified_disjoint_and_cached(synthetic_raw, tmp_path):
    summary = prepare(synthetic_raw, [], list(LABELS), CFG, tmp_path / "prepared")
    images, rows, saved = load_prepared(tmp_path / "prepared")
    assert saved == summary and images.shape == (48, 32, 32) and images.dtype == np.uint8
    assert Counter(r["split"] for r in rows) == {"train": 24, "val": 12, "test": 12}
    for split in ("train", "val", "test"):
        per_class = Counter(r["label"] for r in rows if r["split"] == split)
        assert len(set(per_class.values())) == 1, (split, per_class)
    assert len({r["path"] for r in rows}) == 48
    for r in rows[:5]:
        assert np.array_equal(images[int(r["index"])], load_grey(r["path"], 32))


def test_same_seed_same_split_and_fingerprint(synthetic_raw, tmp_path):
    a = prepare(synthetic_raw, [], list(LABELS), CFG, tmp_path / "a")
    b = prepare(synthetic_raw, [], list(LABELS), CFG, tmp_path / "b")
    c = prepare(synthetic_raw, [], list(LABELS), {**CFG, "seed": 4}, tmp_path / "c")
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]


def test_flat_layout_and_user_data_are_merged(synthetic_raw, tmp_path):
    flat = tmp_path / "flat"
    for folder in (synthetic_raw / DATASET_DIR).iterdir():
        shutil.copytree(folder / "images", flat / folder.name)  # older layout: no images/
    user = tmp_path / "data" / "COVID"
    user.mkdir(parents=True)
    shutil.copy(next((flat / "COVID").iterdir()), user / "mine.png")
    items = index_images(flat, [tmp_path / "data"], list(LABELS))
    counts = Counter(item.label for item in items)
    assert counts == {"covid": 13, "lung_opacity": 12, "normal": 12, "pneumonia": 12}


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason=f"real sample not found at {REAL_SAMPLE}")
def test_real_sample_missing_class_names_it_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(REAL_SAMPLE, [], list(LABELS), CFG, tmp_path / "p")
    message = str(err.value)
    assert "'Lung_Opacity'" in message and "data.classes" in message
    assert "['covid', 'normal', 'pneumonia']" in message
    assert not (tmp_path / "p").exists()

    summary = prepare(REAL_SAMPLE, [], ["covid", "normal", "pneumonia"], CFG, tmp_path / "p")
    assert summary["n_images"] == 120
    assert summary["counts"]["test"] == {"covid": 10, "normal": 10, "pneumonia": 10}
