"""Balancing and splitting the prepared images (steps 4 and 5 of cxr.prepare): whole
near-duplicate groups at a time, so that no film is in two splits, reproducible by seed."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr.classes import TOPUP_LABEL
from cxr.errors import DataError

if TYPE_CHECKING:
    from cxr.prepare import Item


def _take_groups(indices: list[int], group: dict[int, int], target: int, rng) -> list[int]:
    """Whole near-duplicate groups, in random order, while they fit under `target`."""
    by_group: dict[int, list[int]] = defaultdict(list)
    for i in indices:
        by_group[group[i]].append(i)
    order = list(by_group)
    rng.shuffle(order)
    chosen: list[int] = []
    for g in order:
        if len(chosen) + len(by_group[g]) <= target:
            chosen += by_group[g]
    return sorted(chosen)


def balance(
    items: list[Item],
    kept: list[int],
    group: dict[int, int],
    classes: list[str],
    cfg: dict[str, Any],
) -> tuple[list[int], dict[str, Any]]:
    """Apply `cfg['balance']`; return the chosen indices and what happened, per class."""
    rng = np.random.default_rng(cfg["seed"])
    pool = {
        label: [i for i in kept if items[i].label == label and items[i].origin != "topup"]
        for label in classes
    }
    # A top-up film that is a near duplicate of one already in the pool adds nothing.
    pooled_groups = {group[i] for label in classes for i in pool[label]}
    topped = any(items[i].origin == "topup" for i in kept)  # data.topup is set
    topup = [i for i in kept if items[i].origin == "topup" and group[i] not in pooled_groups]
    counts = {label: len(pool[label]) for label in classes}
    strategy, target_cfg = cfg["balance"], cfg["balance_target"]
    if strategy == "none":  # everything, the top-up's new films included
        return sorted([i for label in classes for i in pool[label]] + topup), {
            "strategy": "none",
            "target": None,
            "notes": [],
        }
    # a class name (one of data.classes: cxr.params checks) or a number
    target = counts[target_cfg] if isinstance(target_cfg, str) else int(target_cfg)
    chosen, notes = [], []
    for label in classes:
        if counts[label] >= target:
            chosen += _take_groups(pool[label], group, target, rng)
            continue
        have = list(pool[label])
        if topped and label == TOPUP_LABEL:  # data.topup: fill it from the paediatric set
            added = _take_groups(topup, group, target - len(have), rng)
            have += added
            notes.append(
                f"{label}: {counts[label]} images, topped up with {len(added)} of "
                f"{len(topup)} new films from the paediatric set (duplicates of images already "
                f"here removed) to {len(have)}."
            )
        chosen += have
        if len(have) < target:
            notes.append(
                f"{label}: {len(have)} images, below the target {target}; "
                + (
                    "no top-up set can add more. "
                    if topped
                    else "undersampling cannot add images. "
                )
                + "Kept all of them; the shortfall is left to training (class weights or "
                "oversampling inside the training split)."
            )
    return sorted(chosen), {"strategy": strategy, "target": target, "notes": notes}


def split_groups(
    items: list[Item],
    chosen: list[int],
    group: dict[int, int],
    val: float,
    test: float,
    seed: int,
) -> dict[int, str]:
    """Stratified train/val/test by class, moving whole near-duplicate groups."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    first_label: dict[int, str] = {}
    for i in chosen:
        first_label.setdefault(group[i], items[i].label)
        by_label[first_label[group[i]]][group[i]].append(i)
    split: dict[int, str] = {}
    for label in sorted(by_label):
        groups = by_label[label]
        n = sum(len(m) for m in groups.values())
        if n < 3:
            raise DataError(f"Class '{label}' has {n} usable image(s): too few to split.")
        order = list(groups)
        rng.shuffle(order)
        want = {"test": max(1, round(n * test)), "val": max(1, round(n * val))}
        filled = {"test": 0, "val": 0}
        for g in order:
            name = next((s for s in ("test", "val") if filled[s] < want[s]), "train")
            if name != "train":
                filled[name] += len(groups[g])
            for i in groups[g]:
                split[i] = name
    return split
