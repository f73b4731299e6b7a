"""Evaluate's figures: the lung audit's three views, the confusion matrices, the
reliability diagram and the Grad-CAM heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr.figures import pyplot, save_figure
from cxr.lungs import audit_inputs


def plot_audit(
    x: np.ndarray,
    masks: np.ndarray,
    probs: dict[str, np.ndarray],
    y: np.ndarray,
    classes: list[str],
    path: Path,
    title: str,
) -> None:
    """The first test image of each class in the audit's three views, with the prediction."""
    plt = pyplot()
    views = audit_inputs(x, masks)
    firsts = [int(np.flatnonzero(y == k)[0]) for k in range(len(classes)) if np.any(y == k)]
    fig, axes = plt.subplots(len(firsts), 3, figsize=(6.6, 2.4 * len(firsts)), squeeze=False)
    for row, i in zip(axes, firsts, strict=True):
        for ax, view in zip(row, ("intact", "lungs_hidden", "lungs_only"), strict=True):
            p = probs[view][i]
            ax.imshow(views[view][i].squeeze(), cmap="gray", vmin=0, vmax=255)
            ax.contour(masks[i], [0.5], colors="red", linewidths=0.6)
            ax.set_title(
                f"{classes[y[i]]}, {view.replace('_', ' ')}\n-> {classes[int(p.argmax())]} "
                f"{p.max():.2f}",
                fontsize=8,
            )
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(conf: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    plt = pyplot()
    rows = conf.sum(axis=1, keepdims=True)
    normalised = np.divide(conf, rows, out=np.zeros(conf.shape), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, data, label, fmt in (
        (axes[0], conf, "counts", "{:d}"),
        (axes[1], normalised, "normalised by actual class", "{:.2f}"),
    ):
        ax.imshow(data, cmap="Blues", vmin=0)
        for (i, j), value in np.ndenumerate(data):
            dark = value > data.max() / 2
            ax.text(
                j,
                i,
                fmt.format(value),
                ha="center",
                va="center",
                color="white" if dark else "black",
            )
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(cal: dict[str, Any], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    bins = cal["bins"]
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        width=0.08,
        alpha=0.7,
        label="accuracy per confidence bin",
    )
    for b in bins:
        ax.annotate(str(b["count"]), (b["confidence"], b["accuracy"]), ha="center", va="bottom")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {cal['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_grad_cam(
    images: np.ndarray,
    cams: np.ndarray,
    probs: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    path: Path,
    title: str,
) -> None:
    """One row per class: each image with its heatmap, titled actual / predicted (prob)."""
    plt = pyplot()
    per_row = max(np.bincount(y, minlength=len(classes)).max(), 1)
    fig, axes = plt.subplots(
        len(classes), per_row, figsize=(2.2 * per_row, 2.4 * len(classes)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    column = dict.fromkeys(range(len(classes)), 0)
    for image, cam, p, label in zip(images, cams, probs, y, strict=True):
        ax = axes[label, column[label]]
        column[label] += 1
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        guess = int(p.argmax())
        mark = "" if guess == label else " (wrong)"
        ax.set_title(f"{classes[label]}\n-> {classes[guess]} {p[guess]:.2f}{mark}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
