"""Duplicates among the scanned images: exact copies (the same pixels) and near duplicates
(perceptual hashes within a few bits and 32x32 thumbnails within a few grey levels).

One copy of each exact duplicate is kept, by origin (the database's first, then yours, then
the top-up's) and path; the same pixels under two labels is a conflict and every copy is
dropped; near duplicates form groups (union-find) that balancing and splitting keep whole.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

ORIGINS = ("database", "user", "topup")  # priority when keeping one of several copies


def near_duplicate_pairs(
    phash: np.ndarray, thumbs: np.ndarray, max_bits: int, max_mad: float
) -> list[tuple[int, int]]:
    """Pairs (i < j) whose perceptual hashes differ in at most `max_bits` bits and whose
    32x32 thumbnails differ by at most `max_mad` grey levels on average."""
    pairs = []
    n = len(phash)
    for start in range(0, n, 512):
        block = phash[start : start + 512]
        dist = np.bitwise_count(block[:, None] ^ phash[None, :])
        rows, cols = np.nonzero(dist <= max_bits)
        keep = cols > rows + start
        for i, j in zip(rows[keep] + start, cols[keep], strict=True):
            diff = np.abs(thumbs[i].astype(np.int16) - thumbs[j].astype(np.int16)).mean()
            if diff <= max_mad:
                pairs.append((int(i), int(j)))
    return pairs


def _groups(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    """Union-find: a group id (its smallest member) for each of n items."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(n)]


def dedupe(items: list, facts: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Decide which valid items are kept; return kept indices, groups and what was found."""
    valid = [i for i, reason in enumerate(facts["reject"]) if reason is None]
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i in valid:
        by_hash[facts["hash"][i]].append(i)
    kept, duplicates, conflicts = [], [], []
    for copies in by_hash.values():
        labels = {items[i].label for i in copies}
        if len(labels) > 1:
            conflicts.append(copies)
            continue
        copies.sort(key=lambda i: (ORIGINS.index(items[i].origin), str(items[i].path)))
        kept.append(copies[0])
        if len(copies) > 1:
            duplicates.append(copies)
    kept.sort()
    pairs = near_duplicate_pairs(
        facts["phash"][kept],
        facts["thumb"][kept],
        cfg["near_duplicate_bits"],
        cfg["near_duplicate_mad"],
    )
    local = _groups(len(kept), pairs)
    group = {kept[k]: kept[g] for k, g in enumerate(local)}
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in group.items():
        members[g].append(i)
    near = [m for m in members.values() if len(m) > 1]
    return {
        "kept": kept,
        "group": group,
        "duplicates": duplicates,
        "conflicts": conflicts,
        "near_groups": near,
    }
