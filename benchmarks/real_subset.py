"""A subset of the Kaggle database, drawn per class: the real films a CPU-sized run reads.

    python benchmarks/real_subset.py --archive COVID-19_Radiography_Database.zip \
        --out real-dev [--per-class 400] [--classes covid normal pneumonia] [--seed 0]
        [--no-masks]

Reads `--archive` (the database's zip as Kaggle serves it, or a folder in either Kaggle
layout) as the download stage does, draws `--per-class` images of each class at random
(`--seed`), and writes them into `--out` in the Kaggle layout (`--out` must not exist yet),
with their classes' source sheets (`<Class>.metadata.xlsx`: per-source accuracy) and, unless
`--no-masks`, their lung masks (the lung audit then hides each film's own lungs, not the
template's): what `cxr profile real_cpu --archive`, the benchmarks' `--archive` and
`serve_benchmark.py --images` read. The figures in docs/benchmarks.md and docs/lungs.md
come from such a subset without masks (1,200 films: 400 each of COVID, Normal and Viral
Pneumonia; `--no-masks`); another draw gives figures of the same kind, not the same digits.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cxr import layout
from cxr.archive import unpack_into
from cxr.classes import DATASET_DIR, LABELS
from cxr.files import atomic_path


def subset(
    archive: Path, out: Path, per_class: int, classes: list[str], seed: int, masks: bool = True
) -> dict:
    """Write the subset to `out` (all of it, or nothing); return the images per class."""
    if out.exists():
        raise SystemExit(f"--out {out} exists; name a new folder.")
    rng = np.random.default_rng(seed)
    counts = {}
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.resolve().parent) as tmp:
        unpack_into(archive, Path(tmp), DATASET_DIR, "--archive")
        found = layout.survey(Path(tmp) / DATASET_DIR, classes)
        with atomic_path(out) as staging:
            for label in classes:
                files = found.images.get(label, [])
                if len(files) < per_class:
                    raise SystemExit(
                        f"{archive} has {len(files)} images of {label}, fewer than "
                        f"--per-class {per_class}; ask for fewer."
                    )
                folder = staging / DATASET_DIR / found.folders[label].name
                for path in sorted(rng.choice(files, per_class, replace=False)):
                    rel = path.relative_to(found.folders[label])
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, folder / rel)
                    mask = path.parent.parent / "masks" / path.name
                    if masks and path.parent.name == "images" and mask.is_file():
                        (folder / "masks").mkdir(exist_ok=True)
                        shutil.copy2(mask, folder / "masks" / path.name)
                counts[found.folders[label].name] = per_class
                sheet = found.folders[label].with_name(folder.name + layout.METADATA_SUFFIX)
                if sheet.is_file():
                    shutil.copy2(sheet, folder.with_name(sheet.name))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archive", type=Path, required=True, help="the database: zip or folder")
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument(
        "--classes", nargs="+", choices=LABELS, default=["covid", "normal", "pneumonia"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-masks", action="store_true", help="leave the lung masks out")
    args = parser.parse_args()
    classes = sorted(args.classes)
    counts = subset(args.archive, args.out, args.per_class, classes, args.seed, not args.no_masks)
    print(f"{args.out}: {counts}")


if __name__ == "__main__":
    main()
