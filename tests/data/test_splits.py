"""Split rules on hand-made cases: sizes per user, chronology, ties, seeds, row-order independence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dprec.data.dataset import DatasetError
from dprec.data.schema import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID
from dprec.data.splits import (
    assign_split,
    choose_cold_items,
    chrono_split,
    cold_split_meta,
    held_out_items,
    holdout_sizes,
    random_split,
)


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


# ---------------------------------------------------------------- cold-items


def _grid_frame(n_users: int = 30, n_items: int = 20) -> pd.DataFrame:
    """Every user has items u, u+1, ... u+9 (mod n_items): each item has interactions."""
    users = np.repeat(np.arange(n_users), 10)
    items = (users + np.tile(np.arange(10), n_users)) % n_items
    return pd.DataFrame({"user_idx": users, "item_idx": items})


def test_cold_items_split_holds_whole_items_out_half_valid_half_test():
    frame = _grid_frame()
    held = choose_cold_items(frame["item_idx"].to_numpy(), seed=5, share=0.2)
    assert len(held.valid) == 2 and len(held.test) == 2  # round(0.2 * 20) = 4, half each
    assert np.intersect1d(held.valid, held.test).size == 0
    labels = assign_split(frame, "cold-items", seed=5, held_out=held)
    items = frame["item_idx"].to_numpy()
    assert (labels[np.isin(items, held.valid)] == SPLIT_VALID).all()
    assert (labels[np.isin(items, held.test)] == SPLIT_TEST).all()
    assert not np.isin(items[labels == SPLIT_TRAIN], held.all).any()  # a held-out item is never trained on
    warm = ~np.isin(items, held.all)
    expected = random_split(frame["user_idx"].to_numpy()[warm], items[warm], seed=5)
    assert np.array_equal(labels[warm], expected)  # the warm interactions: the random rule among themselves
    # the default share of the rule is the one prepare uses
    assert np.array_equal(assign_split(frame, "cold-items", seed=5), labels)


def test_cold_items_split_is_seeded_and_ignores_row_order():
    frame = _grid_frame()
    first = choose_cold_items(frame["item_idx"].to_numpy(), seed=1)
    assert np.array_equal(first.valid, choose_cold_items(frame["item_idx"].to_numpy(), seed=1).valid)
    other = choose_cold_items(frame["item_idx"].to_numpy(), seed=2)
    assert not np.array_equal(first.all, other.all)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    labels = pd.Series(assign_split(frame, "cold-items", seed=1), index=pd.MultiIndex.from_frame(frame))
    again = pd.Series(assign_split(shuffled, "cold-items", seed=1), index=pd.MultiIndex.from_frame(shuffled))
    assert labels.sort_index().equals(again.sort_index())


def test_cold_items_split_refuses_shares_that_hold_out_nothing_or_everything():
    items = np.arange(20)
    for share in (0.0, 1.0, -0.1):
        with pytest.raises(DatasetError, match="cold_share must lie strictly between 0 and 1"):
            choose_cold_items(items, seed=0, share=share)
    with pytest.raises(DatasetError, match="at least 2 held-out items"):
        choose_cold_items(np.arange(5), seed=0, share=0.2)  # round(1.0) = 1 item


def test_held_out_items_are_read_back_from_the_meta_and_checked():
    held = choose_cold_items(np.arange(20), seed=0, share=0.2)
    meta = {"name": "x", "cold_start": cold_split_meta(held, 0, 0.2)}
    back = held_out_items(meta, 20)
    assert np.array_equal(back.valid, held.valid) and np.array_equal(back.test, held.test)
    assert held_out_items({"name": "x"}, 20) is None
    with pytest.raises(DatasetError, match=r"valid_items must be a non-empty list of item indices in 0\.\.9"):
        held_out_items({"name": "x", "cold_start": {"valid_items": [10], "test_items": [1]}}, 10)
    with pytest.raises(DatasetError, match="both a validation and a test item"):
        held_out_items({"name": "x", "cold_start": {"valid_items": [1, 2], "test_items": [2]}}, 10)
