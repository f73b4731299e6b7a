"""The lung template over real radiographs: the by-eye check of cxr.lungs.TEMPLATE.

    python benchmarks/lung_template.py --archive real-sample \
        [--per-class 8] [--size 128] [--out lung_template.png]

Draws, for each class folder of the archive (a folder in the Kaggle layout), the mean of its
images with the template (red) and the lung focus's region (the template grown by
params.yaml's train.lung_focus_margin, dashed), then `--per-class` films with the same
outlines. Where a film has its own mask file (`<Class>/masks/`), it is drawn too (green)
and the template's Dice overlap with it is printed. The figure goes to --out (not into the
repository: it shows the films).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cxr.classes import DATASET_DIR, FOLDER_TO_LABEL
from cxr.figures import pyplot
from cxr.images import load_grey
from cxr.lungs import mask_file, read_mask, template_mask
from cxr.params import load_params


def class_folders(archive: Path) -> list[Path]:
    root = archive / DATASET_DIR if (archive / DATASET_DIR).is_dir() else archive
    return sorted(p for p in root.iterdir() if p.name in FOLDER_TO_LABEL and p.is_dir())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("lung_template.png"))
    args = parser.parse_args()
    folders = [f for f in class_folders(args.archive) if any((f / "images").glob("*.png"))]
    if not folders:
        raise SystemExit(f"lung_template: no class folders with images/ under {args.archive}")
    size, template = args.size, template_mask(args.size)
    grown = template_mask(size, load_params()["train"]["lung_focus_margin"])
    plt = pyplot()
    fig, axes = plt.subplots(
        len(folders), args.per_class + 1, figsize=(1.9 * (args.per_class + 1), 2.0 * len(folders))
    )
    axes = np.atleast_2d(axes)
    dice = []
    for row, folder in zip(axes, folders, strict=True):
        files = sorted((folder / "images").glob("*.png"))
        films = np.stack([load_grey(f, size) for f in files])
        shown = [("mean", films.mean(axis=0), None)] + [
            (f.stem, films[i], mask_file(f)) for i, f in enumerate(files[: args.per_class])
        ]
        for ax, (title, image, own) in zip(row, shown, strict=False):
            ax.imshow(image, cmap="gray")
            ax.contour(template, [0.5], colors="red", linewidths=0.8)
            ax.contour(grown, [0.5], colors="red", linewidths=0.6, linestyles="dashed")
            if own is not None:
                lungs = read_mask(own, size)
                ax.contour(lungs, [0.5], colors="lime", linewidths=0.8)
                dice.append(2 * (lungs & template).sum() / (lungs.sum() + template.sum()))
            ax.set_title(title if title != "mean" else f"{folder.name}: mean", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"lung_template: {args.out} ({len(folders)} classes, {size} px)")
    if dice:
        print(f"template vs the films' own masks: Dice {np.mean(dice):.3f} over {len(dice)} films")


if __name__ == "__main__":
    main()
