"""Per-user train / valid / test splits (labels in :mod:`dprec.data.schema`).

- ``given``: keep the labels the source carries (MMRec ``x_label``).
- ``random``: MMRec's per-user random 8:1:1. A user with ``n >= 3`` interactions gets
  ``max(1, floor(0.1 n))`` valid and as many test interactions, the rest train; a user with fewer
  than 3 keeps all of them in train (one in each split would leave nothing to learn from).
- ``chrono``: the same sizes, by time: each user's latest interactions are test, the ones before
  them valid; equal timestamps keep the row order given (the source file order).
- ``cold-items``: a seeded share (``cold_share``, default 20 %) of the items that have interactions is
  held out of training entirely: the first half of them (rounded up, in the seeded order) are the cold
  validation items, the rest the cold test items, and every interaction of a held-out item takes its
  item's label. The other interactions get the ``random`` rule among themselves (the warm train / valid /
  test). The held-out items are recorded in ``dataset.json`` (``cold_start``, :func:`held_out_items`),
  because a warm item may also end up without training interactions by chance.

``random`` and ``cold-items`` are pure functions of (seed, the set of (user, item) pairs): rows are keyed in
(user, item) order, so the input row order does not change the result. How the rule meets
MMRec's published split sizes: docs/data-and-features.md.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from dprec.data.dataset import DatasetError
from dprec.data.schema import COLD_META_KEY, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID

SplitRule = Literal["given", "random", "chrono", "cold-items"]
SPLIT_RULES: tuple[str, ...] = typing.get_args(SplitRule)
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
MIN_HOLDOUT_USER = 3
COLD_ITEMS = "cold-items"
DEFAULT_COLD_SHARE = 0.2


@dataclass(frozen=True)
class HeldOutItems:
    """The items a cold-items split holds out of training, by the split whose targets they are."""

    valid: np.ndarray
    """Sorted int64 item indices whose interactions are all validation targets."""
    test: np.ndarray
    """Sorted int64 item indices whose interactions are all test targets."""

    @property
    def all(self) -> np.ndarray:
        return np.union1d(self.valid, self.test)

    def of(self, split: int) -> np.ndarray:
        """The held-out items of ``split`` (SPLIT_VALID or SPLIT_TEST)."""
        if split == SPLIT_VALID:
            return self.valid
        if split == SPLIT_TEST:
            return self.test
        raise ValueError(f"held-out items belong to the valid or test split, not {split}")


def holdout_sizes(n: np.ndarray, ratios: tuple[float, float, float] = DEFAULT_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """Per-user (n_valid, n_test) for users with ``n`` interactions (zero below 3 interactions)."""
    n = np.asarray(n, dtype=np.int64)
    if len(ratios) != 3 or min(ratios) < 0 or not np.isclose(sum(ratios), 1.0):
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    eligible = n >= MIN_HOLDOUT_USER
    n_valid = np.where(eligible, np.maximum(1, np.floor(n * ratios[1] + 1e-9)), 0).astype(np.int64)
    n_test = np.where(eligible, np.maximum(1, np.floor(n * ratios[2] + 1e-9)), 0).astype(np.int64)
    return n_valid, n_test


def _labels_by_rank(users: np.ndarray, order: np.ndarray, ratios: tuple[float, float, float]) -> np.ndarray:
    """Label rows given ``order``, a permutation that sorts rows by user and then by rank within the user.

    The last ``n_test`` ranks of a user are test, the ``n_valid`` before them valid, the rest train.
    """
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    n_valid, n_test = holdout_sizes(sizes, ratios)
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    from_end = np.repeat(sizes, sizes) - rank
    labels_sorted = np.full(len(order), SPLIT_TRAIN, dtype=np.int8)
    labels_sorted[from_end <= np.repeat(n_test + n_valid, sizes)] = SPLIT_VALID
    labels_sorted[from_end <= np.repeat(n_test, sizes)] = SPLIT_TEST
    labels = np.empty(len(order), dtype=np.int8)
    labels[order] = labels_sorted
    return labels


def random_split(
    users: np.ndarray, items: np.ndarray, seed: int, ratios: tuple[float, float, float] = DEFAULT_RATIOS
) -> np.ndarray:
    """Per-user random split labels, aligned with the input rows."""
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    canonical = np.lexsort((items, users))
    keys = np.empty(len(users))
    keys[canonical] = np.random.default_rng(seed).random(len(users))
    return _labels_by_rank(users, np.lexsort((keys, users)), ratios)


def chrono_split(
    users: np.ndarray, timestamps: np.ndarray, ratios: tuple[float, float, float] = DEFAULT_RATIOS
) -> np.ndarray:
    """Per-user chronological split labels (ties: row order), aligned with the input rows."""
    users, timestamps = np.asarray(users, np.int64), np.asarray(timestamps, np.int64)
    if (timestamps < 0).any():
        raise DatasetError(
            f"chrono split: {int((timestamps < 0).sum())} interactions have no timestamp; "
            "use --split random, or a source with times"
        )
    order = np.lexsort((np.arange(len(users)), timestamps, users))
    return _labels_by_rank(users, order, ratios)


def choose_cold_items(items: np.ndarray, seed: int, share: float = DEFAULT_COLD_SHARE) -> HeldOutItems:
    """The held-out items of a cold-items split of interactions naming ``items``: a pure function of (seed, the set
    of items). ``round(share * distinct items)`` of them, at least 2 (one per target split)."""
    if not 0 < share < 1:
        raise DatasetError(f"cold-items split: cold_share must lie strictly between 0 and 1, got {share}")
    distinct = np.unique(np.asarray(items, np.int64))
    n_cold = int(round(share * len(distinct)))
    if n_cold < 2 or n_cold >= len(distinct):
        raise DatasetError(
            f"cold-items split: {len(distinct)} items with interactions and cold_share {share} hold out {n_cold}; "
            "it needs at least 2 held-out items (one per target split) and at least one warm item"
        )
    cold = np.random.default_rng(seed).permutation(distinct)[:n_cold]
    n_valid = (n_cold + 1) // 2
    return HeldOutItems(valid=np.sort(cold[:n_valid]), test=np.sort(cold[n_valid:]))


def cold_items_split(
    users: np.ndarray,
    items: np.ndarray,
    held_out: HeldOutItems,
    seed: int,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
) -> np.ndarray:
    """Labels of a cold-items split: held-out items' interactions take their item's split, the rest ``random``."""
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    labels = np.empty(len(users), dtype=np.int8)
    cold_valid, cold_test = np.isin(items, held_out.valid), np.isin(items, held_out.test)
    warm = ~(cold_valid | cold_test)
    labels[cold_valid], labels[cold_test] = SPLIT_VALID, SPLIT_TEST
    labels[warm] = random_split(users[warm], items[warm], seed, ratios)
    return labels


def cold_split_meta(held_out: HeldOutItems, seed: int, share: float) -> dict[str, Any]:
    """What ``dataset.json`` records of a cold-items split (under :data:`COLD_META_KEY`)."""
    return {"share": share, "seed": seed, "valid_items": held_out.valid.tolist(), "test_items": held_out.test.tolist()}


def held_out_items(meta: dict[str, Any], n_items: int) -> HeldOutItems | None:
    """The held-out items a dataset's ``meta`` records (None: not a cold-items split), checked."""
    record = meta.get(COLD_META_KEY)
    if record is None:
        return None
    where = f"dataset {meta.get('name', '?')!r}: dataset.json {COLD_META_KEY}"
    if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in ("valid_items", "test_items")):
        raise DatasetError(f"{where} must hold lists valid_items and test_items; prepare the dataset again")
    parts = []
    for key in ("valid_items", "test_items"):
        values = record[key]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_items for v in values):
            raise DatasetError(f"{where}.{key} must be a non-empty list of item indices in 0..{n_items - 1}")
        parts.append(np.unique(np.asarray(values, np.int64)))
    if np.intersect1d(*parts).size:
        raise DatasetError(f"{where}: an item is both a validation and a test item; prepare the dataset again")
    return HeldOutItems(valid=parts[0], test=parts[1])


def assign_split(
    interactions: pd.DataFrame,
    rule: str,
    seed: int = 0,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    held_out: HeldOutItems | None = None,
) -> np.ndarray:
    """Split labels for ``interactions`` (``user_idx``, ``item_idx``, ``timestamp``, ``split`` as needed).

    ``held_out``: the items a ``cold-items`` split holds out (default: :func:`choose_cold_items` with the
    default share)."""
    if rule == "given":
        if "split" not in interactions or (interactions["split"] < 0).any():
            raise DatasetError(
                "split 'given': the source has no split labels for every interaction; "
                "use --split random or --split chrono"
            )
        return interactions["split"].to_numpy(np.int8)
    users = interactions["user_idx"].to_numpy(np.int64)
    if rule == "random":
        return random_split(users, interactions["item_idx"].to_numpy(np.int64), seed, ratios)
    if rule == COLD_ITEMS:
        items = interactions["item_idx"].to_numpy(np.int64)
        held_out = held_out if held_out is not None else choose_cold_items(items, seed)
        return cold_items_split(users, items, held_out, seed, ratios)
    if rule == "chrono":
        if "timestamp" not in interactions:
            raise DatasetError("chrono split: the interactions have no timestamp column; use --split random")
        return chrono_split(users, interactions["timestamp"].to_numpy(np.int64), ratios)
    raise DatasetError(f"unknown split rule {rule!r}; use one of {', '.join(SPLIT_RULES)}")
