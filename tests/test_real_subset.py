"""benchmarks/real_subset.py: a per-class draw of the database, in its layout, masks kept."""

from __future__ import annotations

import zipfile

import pytest

from benchmarks.real_subset import subset
from cxr import layout
from cxr.classes import DATASET_DIR
from cxr.synthetic import write_dataset


def test_a_subset_keeps_the_layout_and_masks_and_refuses_what_it_cannot_draw(tmp_path):
    write_dataset(tmp_path / "db", per_class=6, size=32, labels=("covid", "normal"))
    archive = tmp_path / "db.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "db").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "db").as_posix())
    counts = subset(archive, tmp_path / "sub", 4, ["covid", "normal"], seed=0)
    found = layout.survey(tmp_path / "sub" / DATASET_DIR)
    assert counts == found.counts() == {"COVID": 4, "Normal": 4}
    for files in found.images.values():
        assert all((f.parent.parent / "masks" / f.name).is_file() for f in files)
    again = subset(archive, tmp_path / "again", 4, ["covid", "normal"], seed=0)
    assert again == counts and sorted(p.name for p in (tmp_path / "again").rglob("*.png")) == (
        sorted(p.name for p in (tmp_path / "sub").rglob("*.png"))
    )  # the same seed, the same films
    (tmp_path / "db" / DATASET_DIR / "COVID.metadata.xlsx").write_bytes(b"sheet")
    zf = zipfile.ZipFile(archive, "a")
    zf.write(
        tmp_path / "db" / DATASET_DIR / "COVID.metadata.xlsx", f"{DATASET_DIR}/COVID.metadata.xlsx"
    )
    zf.close()
    subset(archive, tmp_path / "bare", 2, ["covid"], seed=0, masks=False)
    assert not list((tmp_path / "bare").rglob("masks"))
    assert (tmp_path / "bare" / DATASET_DIR / "COVID.metadata.xlsx").read_bytes() == b"sheet"
    with pytest.raises(SystemExit, match="exists; name a new folder"):
        subset(archive, tmp_path / "sub", 4, ["covid"], seed=0)
    with pytest.raises(SystemExit, match="6 images of covid, fewer than --per-class 7"):
        subset(archive, tmp_path / "more", 7, ["covid"], seed=0)
    assert not (tmp_path / "more").exists()
