"""Feature width reduction (dprec.features.reduction, ``train.feature_rank``): exact at r >= rank, deterministic,
no side effect on the random state, and wired into the trainer for feature-reading models only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dprec.features.reduction import reduce_width
from dprec.graph.knn import build_item_knn_graph


def low_rank(n: int = 300, d: int = 64, rank: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))).astype(np.float32)


@pytest.mark.parametrize("n", [300, 20])  # randomised SVD; exact SVD (n <= r + oversampling)
def test_reduction_is_exact_at_the_rank(n):
    f = low_rank(n=n)
    r = min(12, n)
    reduced, done = reduce_width(f, 12)
    assert reduced.shape == (n, r) and reduced.dtype == np.float32
    assert (done.dim_in, done.dim_out) == (64, r)
    assert done.energy == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(reduced @ reduced.T, f @ f.T, rtol=1e-4, atol=1e-3)  # all dot products kept
    # a linear layer W on F equals the layer V^T W on the reduced F (V from F = reduced V^T)
    v = np.linalg.lstsq(reduced.astype(np.float64), f.astype(np.float64), rcond=None)[0].T  # d x r
    w = np.random.default_rng(1).standard_normal((64, 5))
    np.testing.assert_allclose(reduced @ (v.T @ w), f @ w, rtol=1e-4, atol=1e-3)


def test_knn_graph_of_an_exact_reduction_is_the_same():
    f = low_rank()
    reduced, _ = reduce_width(f, 12)
    graphs = [build_item_knn_graph(torch.from_numpy(x), 5, False, 64, "torch", "cpu") for x in (f, reduced)]
    x = torch.randn(300, 3)
    torch.testing.assert_close(graphs[0].propagate(x), graphs[1].propagate(x))


def test_reduction_keeps_the_top_energy_and_reports_it():
    rng = np.random.default_rng(2)
    scales = np.r_[np.full(8, 10.0), np.full(56, 0.1)]
    f = (rng.standard_normal((400, 64)) * scales).astype(np.float32)
    reduced, done = reduce_width(f, 8)
    expected = (scales[:8] ** 2).sum() / (scales**2).sum()
    assert done.energy == pytest.approx(expected, abs=0.01)
    assert np.abs(reduced).mean() > 5  # the 8 strong directions, not noise


def test_reduction_is_deterministic_and_leaves_the_random_state_alone():
    f = low_rank(d=80, rank=40)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first, _ = reduce_width(f, 16)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = reduce_width(f, 16)
    np.testing.assert_array_equal(first, second)
    flipped, _ = reduce_width(-f, 16)  # the sign of each direction is fixed by the data, not by the solver
    np.testing.assert_allclose(np.abs(flipped), np.abs(first), rtol=1e-4, atol=1e-4)


def test_narrow_views_pass_through_and_bad_ranks_fail():
    f = low_rank(d=10, rank=10)
    same, done = reduce_width(f, 16)
    assert same is not None and np.array_equal(same, f) and done.dim_out == 10 and done.energy == 1.0
    with pytest.raises(ValueError, match="positive"):
        reduce_width(f, 0)
    with pytest.raises(ValueError, match="matrix"):
        reduce_width(np.ones(5, np.float32), 2)


def test_trainer_reduces_views_for_feature_models_only(tmp_path, caplog):
    from dprec.config import ConfigError, from_dict
    from dprec.data.dataset import save_dataset
    from dprec.data.synthetic import SyntheticSpec, generate
    from dprec.training.config import RunConfig
    from dprec.training.loop import Trainer

    ds_dir = save_dataset(generate(SyntheticSpec(n_users=60, n_items=40, image_size=16, seed=0)), tmp_path / "ds")
    rng = np.random.default_rng(0)
    feats = {
        "a": rng.standard_normal((40, 30)).astype(np.float32),
        "b": rng.standard_normal((40, 6)).astype(np.float32),
    }

    def trainer(model: str, rank: int) -> Trainer:
        cfg = from_dict(
            RunConfig,
            {"dataset": str(ds_dir), "model": {"name": model}, "train": {"feature_rank": rank, "ks": [5, 20]}},
            "t",
        )
        return Trainer(cfg, features=feats)

    with caplog.at_level(logging.INFO, logger="dprec.training.loop"):
        model = trainer("dprec", 8).model
    assert model.projection["a"][0].in_features == 8 and model.projection["b"][0].in_features == 6
    assert any("feature view a: 30 -> 8 dims" in r.getMessage() for r in caplog.records)
    assert trainer("dprec", 0).model.projection["a"][0].in_features == 30
    assert trainer("lightgcn", 8).model is not None  # an ID model: nothing to reduce, nothing logged twice
    with pytest.raises((ConfigError, ValueError), match="feature_rank"):
        trainer("dprec", -1)


def test_the_basis_reduces_rows_that_were_not_in_the_matrix():
    rng = np.random.default_rng(7)
    f = rng.standard_normal((60, 24)).astype(np.float32)
    reduced, done = reduce_width(f[:50], 8)
    assert done.basis.shape == (24, 8)
    assert np.allclose(done.apply(f[:50]), reduced, atol=1e-5)  # the fitted rows reduce as reduce_width did
    assert np.allclose(done.apply(f[50:]), f[50:] @ done.basis)  # new rows: the same projection
    same, kept = reduce_width(f, 32)  # nothing to reduce: no basis, rows pass unchanged
    assert kept.basis is None and np.array_equal(kept.apply(f[:3]), f[:3])
