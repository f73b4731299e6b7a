import io
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.classes import DATASET_DIR, LABELS
from cxr.data_report import write_data_report
from cxr.images import load_grey
from cxr.lungs import read_mask, template_mask
from cxr.prepare import DataError, index_images, prepare
from cxr.prepared import load_prepared, split_arrays, split_masks
from cxr.synthetic import write_dataset, write_topup
from tests.conftest import REAL_SAMPLE, prepare_settings

CFG = prepare_settings(
    image_size=32,
    min_size=32,
    balance="undersample",
    balance_target="covid",
    val_fraction=0.25,
    test_fraction=0.25,
    seed=3,
)


def test_split_is_stratified_disjoint_and_cached(synthetic_raw, tmp_path):
    report = prepare(synthetic_raw, [], list(LABELS), CFG, tmp_path / "prepared")
    images, rows, saved = load_prepared(tmp_path / "prepared")
    assert saved["fingerprint"] == report["fingerprint"]
    assert images.shape == (48, 32, 32) and images.dtype == np.uint8
    assert Counter(r["split"] for r in rows) == {"train": 24, "val": 12, "test": 12}
    for split in ("train", "val", "test"):
        per_class = Counter(r["label"] for r in rows if r["split"] == split)
        assert len(set(per_class.values())) == 1, (split, per_class)
    assert len({r["path"] for r in rows}) == 48
    for r in rows[:5]:
        assert np.array_equal(images[int(r["index"])], load_grey(r["path"], 32))
    assert report["rejects"] == [] and report["duplicates"] == []
    assert list(tmp_path.iterdir()) == [tmp_path / "prepared"]  # no scratch left behind
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == [
        "dataset.json",
        "images.npy",
        "manifest.csv",
        "masks.npy",
    ]


def test_lung_masks_follow_their_images_through_dedupe_and_split(synthetic_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    covid = raw / DATASET_DIR / "COVID"
    (covid / "masks" / "COVID-1.png").unlink()  # no mask: the template stands in
    (covid / "masks" / "COVID-2.png").write_bytes(b"damaged")
    report = prepare(raw, [], list(LABELS), CFG, tmp_path / "prepared")
    images, rows, _ = load_prepared(tmp_path / "prepared")
    masks = np.load(tmp_path / "prepared" / "masks.npy")
    assert masks.shape == images.shape and set(np.unique(masks)) <= {0, 1}
    kinds = {}
    for r in rows:
        path = Path(r["path"])
        kinds[path.name] = r["lung_mask"]
        own = path.parent.parent / "masks" / path.name
        expected = read_mask(own, 32) if r["lung_mask"] == "file" else template_mask(32)
        assert np.array_equal(masks[int(r["index"])], expected), r["path"]
    assert kinds["COVID-1.png"] == kinds["COVID-2.png"] == "template"
    assert sum(k == "file" for k in kinds.values()) == len(rows) - 2
    assert report["lung_masks"] == dict(Counter(r["lung_mask"] for r in rows))
    notes = {Path(n["path"]).name: n["mask"] for n in report["lung_mask_notes"]}
    assert list(notes) == ["COVID-2.png"] and notes["COVID-2.png"].startswith(
        "template (unreadable lung mask COVID-2.png"
    )
    test_masks, where = split_masks(tmp_path / "prepared", "test")
    x_test = split_arrays(tmp_path / "prepared", "test")[0]
    assert test_masks.shape == x_test.shape[:3] and test_masks.dtype == bool
    assert where == [r["lung_mask"] for r in rows if r["split"] == "test"]


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


@pytest.fixture
def planted(tmp_path):
    """Phantoms with every kind of trouble planted in them."""
    root = tmp_path / "raw"
    write_dataset(root, per_class=12, size=96)
    base = root / DATASET_DIR
    covid, normal = base / "COVID" / "images", base / "Normal" / "images"
    pneu, opacity = base / "Viral Pneumonia" / "images", base / "Lung_Opacity" / "images"
    shutil.copy(covid / "COVID-1.png", covid / "COVID-copy.png")  # exact duplicate
    grey = np.asarray(Image.open(covid / "COVID-2.png"))
    Image.fromarray(np.stack([grey] * 3, -1)).save(covid / "COVID-2-rgb.png")  # same pixels
    shutil.copy(normal / "Normal-3.png", pneu / "Viral Pneumonia-conflict.png")  # two labels
    buf = io.BytesIO()
    Image.open(opacity / "Lung_Opacity-4.png").save(buf, "JPEG", quality=85)
    (opacity / "Lung_Opacity-4-reencoded.jpg").write_bytes(buf.getvalue())  # near duplicate
    (normal / "empty.png").write_bytes(b"")
    (normal / "notes.png").write_text("not an image")
    (normal / "truncated.png").write_bytes((normal / "Normal-5.png").read_bytes()[:400])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(normal / "tiny.png")
    other = np.asarray(Image.open(pneu / "Viral Pneumonia-6.png"))[::-1]  # a new image
    rgba = np.dstack([other] * 3 + [np.full_like(other, 255)])
    Image.fromarray(rgba).save(pneu / "rgba.png")  # valid, RGBA
    other = np.asarray(Image.open(opacity / "Lung_Opacity-6.png"))[::-1]
    Image.fromarray(other.astype(np.uint16) * 257).save(opacity / "sixteen.png")  # 16 bit
    return root


def test_planted_trouble_is_handled_and_reported(planted, tmp_path):
    cfg = {**CFG, "balance": "none", "min_size": 48}
    report = prepare(planted, [], list(LABELS), cfg, tmp_path / "p")
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report["rejects"]}
    assert set(reasons) == {"empty.png", "notes.png", "truncated.png", "tiny.png"}
    assert "empty" in reasons["empty.png"]
    assert "not an image" in reasons["notes.png"]
    assert "corrupt or truncated" in reasons["truncated.png"]
    assert "too small" in reasons["tiny.png"]

    dup_names = sorted(sorted(p.rsplit("/", 1)[-1] for p in g) for g in report["duplicates"])
    assert ["COVID-1.png", "COVID-copy.png"] in dup_names
    assert ["COVID-2-rgb.png", "COVID-2.png"] in dup_names
    assert [c["labels"] for c in report["conflicts"]] == [["normal", "pneumonia"]]

    _, rows, _ = load_prepared(tmp_path / "p")
    names = {r["path"].rsplit("/", 1)[-1] for r in rows}
    assert {"rgba.png", "sixteen.png", "Lung_Opacity-4-reencoded.jpg"} <= names
    # One copy of each exact duplicate is kept; every copy of a conflict is dropped.
    assert len(names & {"COVID-1.png", "COVID-copy.png"}) == 1
    assert len(names & {"COVID-2.png", "COVID-2-rgb.png"}) == 1
    assert not names & {"Normal-3.png", "Viral Pneumonia-conflict.png"}
    near = [g for g in report["near_duplicate_groups"] if any("reencoded" in p for p in g)]
    assert len(near) == 1 and len(near[0]) == 2
    splits = {r["split"] for r in rows if r["path"] in near[0]}
    assert len(splits) == 1  # a group never straddles splits

    write_data_report(report, tmp_path / "p", tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "notes.png" in md and "Label conflicts" in md and "| covid |" in md
    assert (tmp_path / "report" / "sample_grid.png").stat().st_size > 1000


def test_decompression_bomb_is_rejected_without_decoding(tmp_path):
    from cxr.images import ImageRejected, decode_grey

    Image.new("L", (8000, 7000)).save(tmp_path / "bomb.png")
    with pytest.raises(ImageRejected, match="too large"):
        decode_grey(tmp_path / "bomb.png")


def test_undersampling_to_the_covid_count_and_the_shortfall(tmp_path):
    root = tmp_path / "raw"
    write_dataset(root, per_class=20, size=64, labels=("covid", "lung_opacity", "normal"))
    write_dataset(root, per_class=8, size=64, labels=("pneumonia",))
    shutil.rmtree(root / DATASET_DIR / "COVID" / "images")
    write_dataset(root, per_class=12, size=64, labels=("covid",))
    report = prepare(root, [], list(LABELS), CFG, tmp_path / "p")
    after = {c: v["after_balancing"] for c, v in report["per_class"].items()}
    assert after == {"covid": 12, "lung_opacity": 12, "normal": 12, "pneumonia": 8}
    assert report["balance"]["target"] == 12
    assert any("pneumonia: 8 images, below the target 12" in n for n in report["balance"]["notes"])


def test_top_up_adds_only_new_films(tmp_path):
    root = tmp_path / "raw"
    write_dataset(root, per_class=16, size=64, labels=("covid", "lung_opacity", "normal"))
    write_dataset(root, per_class=4, size=64, labels=("pneumonia",))
    write_topup(root / "chest_xray", per_class=16, size=64)  # holds copies of 4 db films
    report = prepare(root, [], list(LABELS), CFG, tmp_path / "p", topup="viral")
    _, rows, _ = load_prepared(tmp_path / "p")
    added = [r for r in rows if r["origin"] == "topup"]
    assert all("virus" in r["path"] for r in added)
    assert report["per_class"]["pneumonia"]["after_balancing"] == 4 + len(added)
    # The topped-up set has no film twice: re-encoded copies of database films were dropped.
    assert len(added) <= 16 - 4 + 1
    # balance none keeps everything: the top-up's new films too
    cfg = {**CFG, "balance": "none"}
    report = prepare(root, [], list(LABELS), cfg, tmp_path / "all", topup="viral")
    _, rows, _ = load_prepared(tmp_path / "all")
    assert [r for r in rows if r["origin"] == "topup"] and report["balance"]["strategy"] == "none"
    assert sum(r["label"] == "covid" for r in rows) == 16


def test_no_group_straddles_splits_with_many_near_duplicates(tmp_path):
    root = tmp_path / "raw"
    write_dataset(root, per_class=10, size=64)
    for folder in (root / DATASET_DIR).iterdir():
        for png in list((folder / "images").glob("*.png"))[:5]:
            img = Image.open(png)
            for k in range(2):
                img.save(png.with_name(f"{png.stem}-v{k}.jpg"), quality=80 + 5 * k)
    report = prepare(root, [], list(LABELS), {**CFG, "balance": "none"}, tmp_path / "p")
    _, rows, _ = load_prepared(tmp_path / "p")
    by_group = defaultdict(set)
    for r in rows:
        by_group[r["group"]].add(r["split"])
    assert len(report["near_duplicate_groups"]) == 20
    assert all(len(s) == 1 for s in by_group.values())


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason=f"real sample not found at {REAL_SAMPLE}")
def test_real_sample_missing_class_names_it_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(REAL_SAMPLE, [], list(LABELS), CFG, tmp_path / "p")
    message = str(err.value)
    assert "'Lung_Opacity'" in message and "data.classes" in message
    assert "['covid', 'normal', 'pneumonia']" in message
    assert not (tmp_path / "p").exists()

    report = prepare(REAL_SAMPLE, [], ["covid", "normal", "pneumonia"], CFG, tmp_path / "p")
    assert report["n_images"] == 120 and report["rejects"] == []
    assert report["counts"]["test"] == {"covid": 10, "normal": 10, "pneumonia": 10}


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason=f"real sample not found at {REAL_SAMPLE}")
def test_image_sources_come_from_the_kaggle_metadata_sheets(tmp_path, capsys):
    import openpyxl

    raw = tmp_path / "raw"
    shutil.copytree(REAL_SAMPLE, raw)
    root = raw / DATASET_DIR
    for folder, url in (("COVID", "https://github.com/ieee8023"), ("Normal", "https://rsna")):
        book = openpyxl.Workbook()
        book.active.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
        for path in sorted((root / folder / "images").glob("*.png")):
            # the sheets name files in upper case and without the extension
            book.active.append([path.stem.upper(), "PNG", "256*256", url])
        book.save(root / f"{folder}.metadata.xlsx")
    (root / "Viral Pneumonia.metadata.xlsx").write_bytes(b"not a workbook")

    prepare(raw, [], ["covid", "normal", "pneumonia"], CFG, tmp_path / "p")
    assert "skipped Viral Pneumonia.metadata.xlsx" in capsys.readouterr().out
    _, rows, _ = load_prepared(tmp_path / "p")
    by_label = defaultdict(set)
    for row in rows:
        by_label[row["label"]].add(row["source"])
    assert by_label == {
        "covid": {"https://github.com/ieee8023"},
        "normal": {"https://rsna"},
        "pneumonia": {""},
    }
