"""Per-user train / valid / test splits (labels in :mod:`dprec.data.schema`).

- ``given``: keep the labels the source carries (MMRec ``x_label``).
- ``random``: MMRec's per-user random 8:1:1. A user with ``n >= 3`` interactions gets
  ``max(1, floor(0.1 n))`` valid and as many test interactions, the rest train; a user with fewer
  than 3 keeps all of them in train (one in each split would leave nothing to learn from).
- ``chrono``: the same sizes, by time: each user's latest interactions are test, the ones before
  them valid; equal timestamps keep the row order given (the source file order).

``random`` is a pure function of (seed, the set of (user, item) pairs): rows are keyed in
(user, item) order, so the input row order does not change the result. How the rule meets
MMRec's published split sizes: docs/data-and-features.md.
"""

from __future__ import annotations

import typing
from typing import Literal

import numpy as np
import pandas as pd

from dprec.data.dataset import DatasetError
from dprec.data.schema import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID

SplitRule = Literal["given", "random", "chrono"]
SPLIT_RULES: tuple[str, ...] = typing.get_args(SplitRule)
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
MIN_HOLDOUT_USER = 3


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


def assign_split(
    interactions: pd.DataFrame, rule: str, seed: int = 0, ratios: tuple[float, float, float] = DEFAULT_RATIOS
) -> np.ndarray:
    """Split labels for ``interactions`` (``user_idx``, ``item_idx``, ``timestamp``, ``split`` as needed)."""
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
    if rule == "chrono":
        if "timestamp" not in interactions:
            raise DatasetError("chrono split: the interactions have no timestamp column; use --split random")
        return chrono_split(users, interactions["timestamp"].to_numpy(np.int64), ratios)
    raise DatasetError(f"unknown split rule {rule!r}; use one of {', '.join(SPLIT_RULES)}")
