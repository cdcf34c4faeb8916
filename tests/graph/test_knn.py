"""dprec.graph.knn: the block-wise kNN graph against a brute-force dense one, on small random features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprec.graph import available_backends
from dprec.graph.knn import (
    build_item_knn_graph,
    cache_stats,
    clear_knn_cache,
    item_knn_edges,
    knn_between,
    knn_neighbours,
)

BACKENDS = [
    pytest.param("dgl", marks=pytest.mark.skipif("dgl" not in available_backends(), reason="DGL missing")),
    "torch",
]


def brute_force_knn(features: np.ndarray, k: int, weighted: bool) -> np.ndarray:
    """Dense D^-1/2 S D^-1/2 with S[i] = the top-k positive cosine similarities of row i, self excluded (float64)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    s = np.zeros_like(sim)
    for i, row in enumerate(sim):
        top = np.argsort(-row)[:k]
        top = top[row[top] > 0]
        s[i, top] = row[top] if weighted else 1.0
    degree = s.sum(1)
    scale = np.where(degree > 0, 1 / np.sqrt(np.where(degree > 0, degree, 1)), 0)
    return scale[:, None] * s * scale[None, :]


def dense(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> np.ndarray:
    out = np.zeros((n, n))
    out[rows.numpy(), cols.numpy()] = values.double().numpy()
    return out


def random_features(seed: int, n: int = 60, d: int = 12) -> np.ndarray:
    features = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    features[5] = 0.0  # a missing feature row: no neighbours
    return features


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_equals_brute_force(seed: int, weighted: bool) -> None:
    features = random_features(seed)
    expected = brute_force_knn(features.astype(np.float64), k=4, weighted=weighted)
    got = dense(*item_knn_edges(features, k=4, weighted=weighted, block_size=16), n=len(features))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got[5] == 0).all() and (got[:, 5] == 0).all()
    assert (np.diag(got) == 0).all()


@pytest.mark.parametrize("block_size", [1, 7, 59, 60, 1000])
def test_block_size_does_not_change_the_graph(block_size: int) -> None:
    features = random_features(3)
    reference = item_knn_edges(features, k=5, block_size=len(features), cache=False)
    rows, cols, values = item_knn_edges(features, k=5, block_size=block_size, cache=False)
    assert torch.equal(rows, reference[0]) and torch.equal(cols, reference[1])
    torch.testing.assert_close(values, reference[2], rtol=0, atol=1e-7)


def test_neighbours_are_sorted_and_k_is_capped() -> None:
    features = random_features(4, n=6, d=3)
    features[5] = [1.0, 0.0, 0.0]
    rows, _, sims = knn_neighbours(features, k=50)
    assert np.bincount(rows.numpy(), minlength=6).max() <= 5
    for i in range(6):
        row = sims[rows == i]
        assert (row[:-1] >= row[1:]).all() and (row > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [True, False])
def test_graph_propagates_like_the_dense_matrix(backend: str, weighted: bool) -> None:
    features = random_features(5)
    graph = build_item_knn_graph(features, k=4, weighted=weighted, block_size=8, backend=backend)
    matrix = torch.from_numpy(brute_force_knn(features.astype(np.float64), k=4, weighted=weighted))
    x = torch.randn(len(features), 6, generator=torch.Generator().manual_seed(0))
    assert graph.n_src == graph.n_dst == len(features)
    torch.testing.assert_close(graph.propagate(x).double(), matrix @ x.double(), rtol=0, atol=1e-5)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_neighbours(np.ones((4, 2)), k=0)
    with pytest.raises(ValueError, match="block_size"):
        knn_neighbours(np.ones((4, 2)), block_size=0)
    with pytest.raises(ValueError, match=r"\(n_items, d\)"):
        knn_neighbours(np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        knn_neighbours(np.array([[1.0, np.nan], [1.0, 2.0]]))


def test_cache_returns_the_same_graph_for_the_same_features_only() -> None:
    clear_knn_cache()
    features = random_features(5)
    first = item_knn_edges(features, k=4)
    again = item_knn_edges(features.copy(), k=4)  # equal values, another array: a hit
    assert cache_stats == {"hits": 1, "misses": 1}
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    changed = features.copy()
    changed[0, 0] += 1.0
    item_knn_edges(changed, k=4)
    item_knn_edges(features, k=5)
    assert cache_stats == {"hits": 1, "misses": 3}
    uncached = item_knn_edges(changed, k=4, cache=False)
    assert cache_stats["misses"] == 3 and not torch.equal(uncached[2], first[2])


def test_knn_between_two_sets_matches_brute_force():
    rng = np.random.default_rng(4)
    queries, keys = rng.standard_normal((9, 6)).astype(np.float32), rng.standard_normal((15, 6)).astype(np.float32)
    sims, cols = knn_between(queries, keys, k=4, block_size=2)  # blocks smaller than the query count
    unit_q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    unit_k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    dense = unit_q @ unit_k.T
    expected = np.argsort(-dense, axis=1)[:, :4]
    assert np.array_equal(cols.numpy(), expected)
    assert np.allclose(sims.numpy(), np.take_along_axis(dense, expected, 1), atol=1e-6)
    assert (sims[:, :-1] >= sims[:, 1:]).all()  # most similar first, negatives kept
    sims, cols = knn_between(queries, keys[:3], k=10)
    assert cols.shape == (9, 3)  # k capped at the key count
    with pytest.raises(ValueError, match="queries have 6 columns, keys 5"):
        knn_between(queries, keys[:, :5])
