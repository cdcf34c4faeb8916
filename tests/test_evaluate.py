import math

import numpy as np
import pytest
import torch

from dprec.data.interactions import UserItemSets
from dprec.training.metrics import evaluate_ranking, finalize

SCORES = torch.tensor(
    [
        [9.0, 5.0, 8.0, 1.0, 7.0],
        [1.0, 2.0, 3.0, 4.0, 5.0],
        [5.0, 4.0, 3.0, 2.0, 1.0],
    ]
)


def hand_case():
    train = UserItemSets.from_pairs(np.array([0, 1, 1, 2]), np.array([0, 2, 3, 1]), 3, 5)
    truth = UserItemSets.from_pairs(np.array([0, 0, 1]), np.array([1, 3, 0]), 3, 5)
    return train, truth


def test_metrics_match_hand_computation():
    train, truth = hand_case()
    sums = evaluate_ranking(lambda u: SCORES[u], truth, train, ks=(2, 3, 4))
    assert sums["n_users"] == 2  # user 2 has no truth item and is not evaluated
    m = finalize(sums)
    # user 0 ranks 2, 4, 1, 3 (item 0 masked); user 1 ranks 4, 1, 0 (items 2, 3 masked)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["recall@2"] == pytest.approx(0.0)
    assert m["recall@3"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["ndcg@3"] == pytest.approx((0.5 / idcg2 + 0.5) / 2)
    assert m["precision@3"] == pytest.approx(1 / 3)
    assert m["recall@4"] == pytest.approx(1.0)
    assert m["ndcg@4"] == pytest.approx(((0.5 + 1 / math.log2(5)) / idcg2 + 0.5) / 2)
    assert m["precision@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)


def brute_force(scores: np.ndarray, train, truth, k: int):
    rec, ndcg = [], []
    for u in range(scores.shape[0]):
        t = set(truth.indices[truth.indptr[u] : truth.indptr[u + 1]])
        if not t:
            continue
        s = scores[u].copy()
        s[train.indices[train.indptr[u] : train.indptr[u + 1]]] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        hits = [1.0 if i in t else 0.0 for i in top]
        rec.append(sum(hits) / len(t))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(t), k)))
        ndcg.append(dcg / idcg)
    return np.mean(rec), np.mean(ndcg)


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_evaluation_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 37, 60
    pairs = rng.random((n_users, n_items))
    train_u, train_i = np.nonzero(pairs < 0.15)
    test_u, test_i = np.nonzero(pairs > 0.93)
    train = UserItemSets.from_pairs(train_u, train_i, n_users, n_items)
    truth = UserItemSets.from_pairs(test_u, test_i, n_users, n_items)
    scores = rng.standard_normal((n_users, n_items)).astype(np.float32)
    score_fn = lambda u: torch.from_numpy(scores[u.numpy()])  # noqa: E731
    whole = finalize(evaluate_ranking(score_fn, truth, train, ks=(10, 20), chunk_size=1000))
    chunked = finalize(evaluate_ranking(score_fn, truth, train, ks=(10, 20), chunk_size=4))
    for k in (10, 20):
        rec, ndcg = brute_force(scores, train, truth, k)
        assert whole[f"recall@{k}"] == pytest.approx(rec, abs=1e-9)
        assert whole[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-9)
        assert chunked[f"recall@{k}"] == pytest.approx(whole[f"recall@{k}"], abs=1e-12)


def test_sums_over_user_slices_add_up():
    rng = np.random.default_rng(3)
    n_users, n_items = 20, 30
    train = UserItemSets.from_pairs(rng.integers(0, n_users, 80), rng.integers(0, n_items, 80), n_users, n_items)
    truth = UserItemSets.from_pairs(np.arange(n_users), rng.integers(0, n_items, n_users), n_users, n_items)
    scores = torch.from_numpy(rng.standard_normal((n_users, n_items)))
    fn = lambda u: scores[u]  # noqa: E731
    full = evaluate_ranking(fn, truth, train, ks=(10,))
    a = evaluate_ranking(fn, truth, train, ks=(10,), users=np.arange(0, 7))
    b = evaluate_ranking(fn, truth, train, ks=(10,), users=np.arange(7, 20))
    for key in full:
        assert a[key] + b[key] == pytest.approx(full[key])


def test_contains_and_rejects_large_k():
    train, truth = hand_case()
    assert train.contains(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 2, 4, 1])).tolist() == [
        True,
        False,
        True,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="exceeds the number of items"):
        evaluate_ranking(lambda u: SCORES[u], truth, train, ks=(10,))


def test_wrong_score_shape_is_reported():
    train, truth = hand_case()
    with pytest.raises(ValueError, match="expected"):
        evaluate_ranking(lambda u: SCORES[u][:, :4], truth, train, ks=(2,))
