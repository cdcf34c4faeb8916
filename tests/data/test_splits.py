"""Split rules on hand-made cases: sizes per user, chronology, ties, seeds, row-order independence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dprec.data.dataset import DatasetError
from dprec.data.splits import assign_split, chrono_split, holdout_sizes, random_split


def _frame(sizes: list[int]) -> pd.DataFrame:
    users = np.repeat(np.arange(len(sizes)), sizes)
    items = np.concatenate([np.arange(n) * 7 + u for u, n in enumerate(sizes)])
    return pd.DataFrame({"user_idx": users, "item_idx": items, "timestamp": np.arange(len(users))})


def _counts(frame: pd.DataFrame, labels: np.ndarray) -> dict[int, tuple[int, int, int]]:
    table = pd.crosstab(frame["user_idx"], labels).reindex(columns=[0, 1, 2], fill_value=0)
    return {int(u): tuple(int(v) for v in row) for u, row in table.iterrows()}


def test_holdout_sizes_follow_the_mmrec_rule():
    n = np.array([1, 2, 3, 4, 9, 10, 15, 19, 20, 29, 30, 105])
    n_valid, n_test = holdout_sizes(n)
    assert n_valid.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 10]
    assert n_test.tolist() == n_valid.tolist()


def test_holdout_sizes_reject_bad_ratios():
    with pytest.raises(ValueError, match="summing to 1"):
        holdout_sizes(np.array([10]), (0.8, 0.3, 0.1))


def test_random_split_sizes_per_user():
    frame = _frame([1, 2, 3, 5, 10, 20, 31])
    labels = assign_split(frame, "random", seed=3)
    assert _counts(frame, labels) == {
        0: (1, 0, 0),
        1: (2, 0, 0),
        2: (1, 1, 1),
        3: (3, 1, 1),
        4: (8, 1, 1),
        5: (16, 2, 2),
        6: (25, 3, 3),
    }


def test_random_split_is_seeded_and_ignores_row_order():
    frame = _frame([12, 30, 7, 50])
    first = assign_split(frame, "random", seed=11)
    assert np.array_equal(first, assign_split(frame, "random", seed=11))
    assert not np.array_equal(first, assign_split(frame, "random", seed=12))
    shuffled = frame.sample(frac=1.0, random_state=0)
    again = random_split(shuffled["user_idx"].to_numpy(), shuffled["item_idx"].to_numpy(), seed=11)
    assert np.array_equal(pd.Series(again, index=shuffled.index).sort_index().to_numpy(), first)


def test_random_split_varies_which_items_are_held_out():
    frame = _frame([40])
    held = {tuple(np.flatnonzero(assign_split(frame, "random", seed=s) == 2)) for s in range(5)}
    assert len(held) == 5


def test_chrono_split_holds_out_the_latest():
    frame = pd.DataFrame(
        {"user_idx": [0] * 5 + [1] * 2, "item_idx": [4, 3, 2, 1, 0, 9, 8], "timestamp": [50, 10, 40, 20, 30, 1, 2]}
    )
    labels = chrono_split(frame["user_idx"].to_numpy(), frame["timestamp"].to_numpy())
    # user 0: latest (t=50) test, next (t=40) valid; user 1 has two interactions: all train
    assert labels.tolist() == [2, 0, 1, 0, 0, 0, 0]


def test_chrono_split_breaks_ties_by_row_order():
    frame = pd.DataFrame({"user_idx": [0, 0, 0, 0], "item_idx": [3, 1, 2, 0], "timestamp": [5, 9, 9, 9]})
    labels = assign_split(frame, "chrono")
    assert labels.tolist() == [0, 0, 1, 2]  # rows 1..3 tie at t=9: the later row is the later event


def test_chrono_split_needs_timestamps():
    frame = pd.DataFrame({"user_idx": [0, 0, 0], "item_idx": [0, 1, 2], "timestamp": [1, -1, 3]})
    with pytest.raises(DatasetError, match="1 interactions have no timestamp"):
        assign_split(frame, "chrono")


def test_given_split_keeps_labels_and_needs_them():
    frame = _frame([3]).assign(split=[2, 0, 1])
    assert assign_split(frame, "given").tolist() == [2, 0, 1]
    with pytest.raises(DatasetError, match="no split labels"):
        assign_split(frame.assign(split=[0, -1, 1]), "given")
    with pytest.raises(DatasetError, match="unknown split rule 'weird'"):
        assign_split(frame, "weird")
