"""The fast full-ranking path (dprec.training.metrics) against the algorithm it replaced.

``old_evaluate_ranking`` below is the previous implementation, verbatim in what it computes: per
chunk of users the scores are cloned, the training items set to -inf, ``torch.topk`` taken and the
hits gathered from a dense truth matrix. The new path must give *exactly* the same sums (``==``,
not approx), ties included, and must never write into the tensors ``score_users`` returns.
"""

import subprocess
import threading

import numpy as np
import pytest
import torch

from dprec import kernels
from dprec.data.interactions import UserItemSets
from dprec.training import metrics
from dprec.training.metrics import (
    evaluate_ranking,
    grouped_masked_topk,
    masked_topk,
    metric_names,
    native_masked_topk,
    reference_masked_topk,
)

NATIVE = kernels.load("topk") is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="the C kernel could not be built here (no C compiler)")


def old_evaluate_ranking(score_users, truth, train_mask, ks, chunk_size=2048):
    users = truth.users_with_items()
    n_items, max_k = truth.n_items, max(ks)
    sums = {name: 0.0 for name in metric_names(ks)}
    discounts = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64))
    ideal_cum = torch.cumsum(discounts, 0)
    for start in range(0, len(users), chunk_size):
        chunk = users[start : start + chunk_size]
        scores = score_users(torch.from_numpy(chunk)).detach().to(torch.float32).cpu().clone()
        rows, cols = train_mask.rows_cols(chunk)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        top = torch.topk(scores, max_k, dim=1).indices
        truth_dense = torch.zeros((len(chunk), n_items), dtype=torch.bool)
        rows, cols = truth.rows_cols(chunk)
        truth_dense[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        hits = torch.gather(truth_dense, 1, top).to(torch.float64)
        n_truth = torch.from_numpy(truth.sizes()[chunk]).to(torch.float64)
        for k in ks:
            hit_k = hits[:, :k].sum(1)
            dcg = (hits[:, :k] * discounts[:k]).sum(1)
            idcg = ideal_cum[torch.clamp(n_truth, max=k).long() - 1]
            sums[f"recall@{k}"] += float((hit_k / n_truth).sum())
            sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
            sums[f"precision@{k}"] += float((hit_k / k).sum())
    sums["n_users"] = float(len(users))
    return sums


@pytest.fixture
def two_threads():
    """The worker threads only run with more than one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def make_case(seed: int, n_users: int = 240, n_items: int = 1500, ties: str = "none"):
    """Random train / truth sets with every awkward kind of user, and a (users x items) score matrix."""
    rng = np.random.default_rng(seed)
    train_u, train_i, truth_u, truth_i = [], [], [], []
    for u in range(n_users):
        kind = u % 6
        n_train = int(rng.integers(0, 40)) if kind != 5 else int(rng.integers(300, 900))  # 5: heavy users
        items = rng.choice(n_items, size=n_train + 60, replace=False)
        train = items[:n_train]
        if kind == 0:  # no truth: not evaluated
            truth = items[:0]
        elif kind == 1 and n_train:  # every truth item is also a training item (masked)
            truth = train[: max(1, n_train // 3)]
        elif kind == 2:  # a single truth item (K > |truth|)
            truth = items[n_train : n_train + 1]
        else:
            truth = items[n_train : n_train + int(rng.integers(1, 60))]
        train_u += [u] * len(train)
        train_i += list(train)
        truth_u += [u] * len(truth)
        truth_i += list(truth)
    train = UserItemSets.from_pairs(np.array(train_u), np.array(train_i), n_users, n_items)
    truth = UserItemSets.from_pairs(np.array(truth_u), np.array(truth_i), n_users, n_items)
    scores = torch.from_numpy(rng.standard_normal((n_users, n_items)).astype(np.float32))
    if ties == "rounded":  # many equal scores, also at the top-k boundary
        scores = (scores * 4).round() / 4
    elif ties == "integers":  # popularity-like: a few distinct values only
        scores = torch.from_numpy(rng.integers(0, 12, (n_users, n_items)).astype(np.float32))
    elif ties == "some":  # a few rows with ties, NaN, infinities and constant scores
        scores[3, :] = 1.0
        scores[7, ::2] = scores[7, 1::2]
        scores[9, 5] = float("nan")
        scores[11, :40] = float("inf")
        scores[13, 100:] = -float("inf")
        scores[15, ::3] = -0.0
        scores[15, 1::3] = 0.0
    return train, truth, scores


@pytest.mark.parametrize(("seed", "ties"), [(0, "none"), (1, "rounded"), (2, "integers"), (3, "some"), (4, "none")])
def test_sums_identical_to_the_old_algorithm(seed, ties, two_threads):
    train, truth, scores = make_case(seed, ties=ties)
    score_fn = lambda u: scores[u]  # noqa: E731
    ks = (1, 5, 10, 20, 50)
    five = 4 * 1500 * 5  # block_bytes of 5 users; 1: one user per block
    for chunk_size, block_bytes, workers in [
        (1000, None, None),
        (1000, five, 1),
        (1000, five, 2),
        (37, None, 0),
        (37, 1, 1),
        (37, five, None),
    ]:
        old = old_evaluate_ranking(score_fn, truth, train, ks, chunk_size=chunk_size)
        new = evaluate_ranking(
            score_fn, truth, train, ks, chunk_size=chunk_size, block_bytes=block_bytes, workers=workers
        )
        assert new == old, (chunk_size, block_bytes, workers)


def test_sums_identical_with_one_thread():
    train, truth, scores = make_case(5, ties="some")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ks = (10, 20, 50)
        old = old_evaluate_ranking(lambda u: scores[u], truth, train, ks)
        assert evaluate_ranking(lambda u: scores[u], truth, train, ks, block_bytes=4 * 1500 * 16) == old
    finally:
        torch.set_num_threads(before)


def test_sums_identical_for_float64_and_strided_scores(two_threads):
    train, truth, scores = make_case(6)
    ks = (10, 20)
    old = old_evaluate_ranking(lambda u: scores[u], truth, train, ks)
    wide = scores.double()
    assert evaluate_ranking(lambda u: wide[u], truth, train, ks) == old
    transposed = scores.T.contiguous()  # columns are users: a non-contiguous (transposed) view per call
    assert evaluate_ranking(lambda u: transposed[:, u].T, truth, train, ks, block_bytes=4 * 1500 * 8) == old


def random_mask(rng, b, n, density):
    mask = torch.from_numpy(rng.random((b, n)) < density)
    return mask.nonzero(as_tuple=True)


def topk_case(rng, trial):
    """Scores of one of six kinds (distinct, few values, rounded, NaN / inf, half zeros) and a random mask."""
    b, n = int(rng.integers(1, 16)), int(rng.integers(2, 3000))
    k = int(rng.integers(1, min(n, 60) + 1))
    kind = trial % 6
    scores = torch.randn(b, n)
    if kind == 1:
        scores = torch.from_numpy(rng.integers(0, 20, (b, n)).astype(np.float32))
    elif kind == 2:
        scores = scores.round(decimals=1)
    elif kind == 3:
        scores[torch.rand(b, n) < 0.01] = float("nan")
        scores[torch.rand(b, n) < 0.002] = float("inf")
        scores[torch.rand(b, n) < 0.01] = -float("inf")
    elif kind == 4:
        scores[:, ::2] = 0.0
    rows, cols = random_mask(rng, b, n, float(rng.choice([0.0, 0.01, 0.3, 0.95])))
    if trial % 5 == 0:  # mask each row's best items: the group / chunk maxima must be recomputed
        best = torch.topk(scores.nan_to_num(0), min(n, 6), 1).indices
        rows = torch.cat([rows, torch.arange(b).repeat_interleave(best.shape[1])])
        cols = torch.cat([cols, best.reshape(-1)])
    return scores, rows, cols, k


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("impl", ["grouped", "native", "dispatch"])
def test_masked_topk_equals_topk_of_the_masked_copy(seed, impl):
    if impl == "native" and not NATIVE:
        pytest.skip("the C kernel could not be built here (no C compiler)")
    functions = {
        "grouped": [lambda s, r, c, k, w=w: grouped_masked_topk(s, r, c, k, width=w) for w in (None, 3, 16)],
        "native": [native_masked_topk],
        "dispatch": [masked_topk],
    }[impl]
    rng = np.random.default_rng(seed)
    for trial in range(30):
        scores, rows, cols, k = topk_case(rng, trial)
        before = scores.clone()
        expected = reference_masked_topk(scores, rows, cols, k)
        for i, fn in enumerate(functions):
            assert torch.equal(fn(scores, rows, cols, k), expected), (trial, i)
        assert torch.equal(scores.isnan(), before.isnan())
        assert torch.equal(scores.nan_to_num(), before.nan_to_num())  # never written


@needs_native
def test_native_topk_with_unsorted_duplicate_and_wrong_pairs():
    rng = np.random.default_rng(12)
    scores = torch.randn(20, 900)
    rows, cols = random_mask(rng, 20, 900, 0.05)
    order = torch.from_numpy(rng.permutation(len(rows)))
    rows, cols = torch.cat([rows[order], rows[:30]]), torch.cat([cols[order], cols[:30]])  # shuffled, repeated
    expected = reference_masked_topk(scores, rows, cols, 50)
    assert torch.equal(native_masked_topk(scores, rows, cols, 50), expected)
    assert torch.equal(native_masked_topk(scores, rows.int(), cols.int(), 50), expected)
    with pytest.raises(IndexError):
        native_masked_topk(scores, torch.tensor([3]), torch.tensor([900]), 5)  # as indexing the scores raises
    with pytest.raises(IndexError):
        native_masked_topk(scores, torch.tensor([20]), torch.tensor([0]), 5)
    assert native_masked_topk(scores.double(), rows, cols, 5) is None  # float32 only: the caller's other path
    assert native_masked_topk(scores, rows, cols, 900) is None  # k + 1 > items


@needs_native
def test_native_topk_on_large_rows_and_wide_k():
    """Rows long enough for the widest chunks, heavy masks, every k from 1 to 200."""
    rng = np.random.default_rng(13)
    scores = torch.randn(24, 20000)
    scores[5] = scores[5].round(decimals=2)  # ties below the top: still decided where the top is distinct
    rows, cols = random_mask(rng, 24, 20000, 0.02)
    heavy = torch.arange(19000)  # row 7: nearly everything masked
    rows, cols = torch.cat([rows, torch.full_like(heavy, 7)]), torch.cat([cols, heavy])
    for k in (1, 2, 10, 50, 200):
        assert torch.equal(native_masked_topk(scores, rows, cols, k), reference_masked_topk(scores, rows, cols, k)), k


@pytest.mark.parametrize("impl", ["grouped", "native"])
def test_fast_path_decides_rows_without_ties(monkeypatch, impl):
    """Distinct scores: no row may fall back to torch.topk (else the speed-up is gone)."""
    if impl == "native" and not NATIVE:
        pytest.skip("the C kernel could not be built here (no C compiler)")
    fn = grouped_masked_topk if impl == "grouped" else native_masked_topk
    rng = np.random.default_rng(7)
    scores = torch.randn(64, 7000)
    rows, cols = random_mask(rng, 64, 7000, 0.003)
    handed_over = []
    original = metrics.reference_masked_topk
    monkeypatch.setattr(
        metrics, "reference_masked_topk", lambda s, r, c, k: (handed_over.append(len(s)), original(s, r, c, k))[1]
    )
    top = fn(scores, rows, cols, 50)
    assert sum(handed_over) == 0
    assert torch.equal(top, original(scores, rows, cols, 50))
    scores[5, :] = 2.0  # a constant row: ranked by torch.topk, the others still by the fast path
    top = fn(scores, rows, cols, 50)
    assert handed_over == [1]
    assert torch.equal(top, original(scores, rows, cols, 50))


def test_kernel_is_built_once_and_its_absence_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DPREC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_loaded", {})
    rng = np.random.default_rng(14)
    scores = torch.randn(30, 2000)
    rows, cols = random_mask(rng, 30, 2000, 0.01)
    expected = reference_masked_topk(scores, rows, cols, 20)
    if NATIVE:
        path = kernels.build("topk")
        built = path.stat().st_mtime_ns
        assert kernels.build("topk") == path and path.stat().st_mtime_ns == built  # cached, not rebuilt
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
        assert torch.equal(native_masked_topk(scores, rows, cols, 20), expected)
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DPREC_KERNEL_CACHE", str(tmp_path / "other"))
    with caplog.at_level("WARNING", logger="dprec.kernels"):
        assert native_masked_topk(scores, rows, cols, 20) is None
    assert "no C compiler" in caplog.text
    assert torch.equal(masked_topk(scores, rows, cols, 20), expected)  # the torch path
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.delenv("CC")
    monkeypatch.setenv("DPREC_NATIVE", "0")
    assert kernels.load("topk") is None and native_masked_topk(scores, rows, cols, 20) is None
    assert torch.equal(masked_topk(scores, rows, cols, 20), expected)


def test_a_failing_build_leaves_nothing_behind(tmp_path, monkeypatch):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'error: broken' >&2\nexit 3\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("DPREC_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(subprocess.SubprocessError, match="exited with 3: error: broken"):
        kernels.build("topk")
    assert list((tmp_path / "cache").iterdir()) == []


def test_caller_tensors_are_never_written(two_threads):
    """score_users returns views of a tensor the caller keeps, or new tensors it keeps: all come back untouched."""
    n_users, n_items = 200, 1500
    rng = np.random.default_rng(8)
    train = UserItemSets.from_pairs(rng.integers(0, n_users, 3000), rng.integers(0, n_items, 3000), n_users, n_items)
    truth = UserItemSets.from_pairs(np.arange(n_users), rng.integers(0, n_items, n_users), n_users, n_items)
    scores = torch.randn(n_users, n_items)
    kept = scores.clone()
    views, fresh = [], []

    def view_of_scores(u):  # every user has truth, so each block is a run of consecutive users: a view
        out = scores[int(u[0]) : int(u[-1]) + 1]
        assert out._base is scores
        views.append(out)
        return out

    def new_tensor(u):  # ranked by a worker while the next block is scored
        out = scores[u]
        fresh.append((out, out.clone()))
        return out

    ks = (10, 50)
    old = old_evaluate_ranking(lambda u: scores[u], truth, train, ks)
    for workers in (0, 1):
        for score_fn in (view_of_scores, new_tensor):
            assert evaluate_ranking(score_fn, truth, train, ks, block_bytes=4 * n_items * 16, workers=workers) == old
    assert len(views) > 2 and len(fresh) > 2
    assert torch.equal(scores, kept)
    assert all(torch.equal(out, copy) for out, copy in fresh)
    rows, cols = (torch.from_numpy(a) for a in train.rows_cols(np.arange(n_users)))
    assert torch.equal(masked_topk(scores, rows, cols, 50), reference_masked_topk(kept, rows, cols, 50))
    assert torch.equal(scores, kept)


def test_score_function_reusing_its_output_buffer(two_threads):
    """A score function that overwrites one buffer on every call: each block is ranked before the next call."""
    train, truth, scores = make_case(9)
    buffer = torch.empty_like(scores)

    def reusing(u):
        out = buffer[: len(u)]
        torch.index_select(scores, 0, u, out=out)
        return out

    ks = (10, 20, 50)
    old = old_evaluate_ranking(lambda u: scores[u], truth, train, ks)
    assert evaluate_ranking(reusing, truth, train, ks, block_bytes=4 * 1500 * 8, workers=1) == old


def test_threads_are_restored(two_threads):
    train, truth, scores = make_case(10, n_users=60)
    evaluate_ranking(lambda u: scores[u], truth, train, (10,), block_bytes=4 * 1500 * 4, workers=1)
    assert torch.get_num_threads() == 2

    def failing(u):
        if int(u[0]) > 20:
            raise RuntimeError("model broke")
        return scores[u]

    with pytest.raises(RuntimeError, match="model broke"):
        evaluate_ranking(failing, truth, train, (10,), block_bytes=4 * 1500 * 4, workers=1)
    assert torch.get_num_threads() == 2


def test_blocks_are_ranked_beside_the_scoring(monkeypatch, two_threads):
    """New tensors per call: workers rank blocks while the caller scores; a reused buffer: the caller ranks."""
    train, truth, scores = make_case(11)
    where = []
    original = metrics.ranked_hits
    monkeypatch.setattr(
        metrics, "ranked_hits", lambda *a: (where.append(threading.current_thread().name), original(*a))[1]
    )
    ks = (10, 50)
    old = old_evaluate_ranking(lambda u: scores[u], truth, train, ks)
    assert evaluate_ranking(lambda u: scores[u], truth, train, ks, block_bytes=4 * 1500 * 8, workers=1) == old
    main = threading.main_thread().name
    # the first three blocks go to the workers whatever the timing (the first is ranked there and waited for,
    # the second and third find fewer than 2 * workers blocks pending); later ones go where there is room
    assert len(where) > 10 and sum(name != main for name in where) >= 3
    where.clear()
    buffer = torch.empty_like(scores)
    reusing = lambda u: torch.index_select(scores, 0, u, out=buffer[: len(u)])  # noqa: E731
    assert evaluate_ranking(reusing, truth, train, ks, block_bytes=4 * 1500 * 8, workers=1) == old
    assert where[0] != main and all(name == main for name in where[1:])  # only the first, checked, block


def factor_case(seed: int, n_users: int = 240, n_items: int = 1500, kind: str = "none"):
    """make_case's users and sets with embeddings instead of a score matrix (scores = users @ items.T)."""
    train, truth, _ = make_case(seed, n_users, n_items)
    gen = torch.Generator().manual_seed(seed)
    users, items = torch.randn(n_users, 16, generator=gen), torch.randn(n_items, 16, generator=gen)
    if kind == "ties":  # small integers: many equal scores, also at the top-k boundary
        users, items = users.round().clamp(-1, 1), items.round().clamp(-1, 1)
    elif kind == "odd":  # NaN and infinite scores in some rows, a zero user (constant row)
        users[3] = 0.0
        users[5, 0] = float("nan")
        items[7, 2] = float("inf")
        items[11] = float("-inf")
    return train, truth, users, items


@needs_native
@pytest.mark.parametrize(("seed", "kind"), [(20, "none"), (21, "ties"), (22, "odd")])
def test_streamed_topk_equals_topk_of_the_masked_product(seed, kind):
    train, truth, users, items = factor_case(seed, kind=kind)
    rows, cols = (torch.from_numpy(a) for a in train.rows_cols(np.arange(len(users))))
    scores = users @ items.T
    for k in (1, 10, 50):
        expected = reference_masked_topk(scores, rows, cols, k)
        for tile in (None, 1, 64, 100, 1470, 1500):  # 1: raised to MIN_TILE; 1470: the last 30 join the first tile
            got = metrics.factored_masked_topk(users, items, rows, cols, k, tile=tile)
            assert torch.equal(got, expected), (k, tile)
        for order in (
            torch.randperm(len(items), generator=torch.Generator().manual_seed(k)),
            items.norm(dim=1).argsort(),
        ):
            got = metrics.factored_masked_topk(
                users, items[order], rows, cols, k, order=order
            )  # items in another order
            assert torch.equal(got, expected), k
    shuffled = torch.from_numpy(np.random.default_rng(seed).permutation(len(rows)))
    got = metrics.factored_masked_topk(users, items, rows[shuffled], cols[shuffled], 50)
    assert torch.equal(got, reference_masked_topk(scores, rows, cols, 50))  # unsorted pairs
    with pytest.raises(IndexError):
        metrics.factored_masked_topk(users, items, torch.tensor([0]), torch.tensor([1500]), 5)
    assert metrics.factored_masked_topk(users.double(), items.double(), rows, cols, 5) is None


@needs_native
def test_tiles_of_the_product_are_the_products_columns():
    """What the streamed evaluation assumes of the BLAS: a tile's products are the whole product's, bit for bit."""
    gen = torch.Generator().manual_seed(23)
    for b, n, d in ((512, 7050, 64), (57, 18357, 64), (512, 3000, 192), (3, 100, 8), (240, 1500, 16)):
        users, items = torch.randn(b, d, generator=gen), torch.randn(n, d, generator=gen)
        whole = users @ items.T
        for width in (1, metrics.STREAM_TILE_BYTES // (4 * b), 100):
            bounds = metrics.tile_bounds(n, width)
            assert min(np.diff(bounds)) >= min(n, metrics.MIN_TILE) and bounds[0] == 0 and bounds[-1] == n
            tiles = torch.cat([users @ items[a:z].T for a, z in zip(bounds[:-1], bounds[1:], strict=True)], 1)
            assert torch.equal(tiles, whole), (b, n, d, width)


@needs_native
@pytest.mark.parametrize(("seed", "kind"), [(24, "none"), (25, "ties"), (26, "odd")])
def test_streamed_evaluation_sums_identical_to_the_old_algorithm(seed, kind, two_threads, monkeypatch):
    train, truth, users, items = factor_case(seed, kind=kind)
    scored = []

    def score_fn(u):
        scored.append(len(u))
        return users[u] @ items.T

    ks = (1, 10, 20, 50)
    monkeypatch.setattr(metrics, "STREAM_USERS", 16)  # many blocks: the workers take some
    for chunk_size, workers in [(2048, None), (2048, 0), (37, 1), (37, 2)]:
        old = old_evaluate_ranking(lambda u: users[u] @ items.T, truth, train, ks, chunk_size=chunk_size)
        new = evaluate_ranking(
            score_fn, truth, train, ks, chunk_size=chunk_size, workers=workers, factors=(users, items)
        )
        assert new == old, (chunk_size, workers)
    assert scored == []  # the streamed path never asks for a score block
    assert torch.get_num_threads() == 2


def test_without_the_kernel_the_factors_are_ignored(monkeypatch, two_threads):
    train, truth, users, items = factor_case(27)
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("DPREC_NATIVE", "0")
    ks = (10, 20)
    old = old_evaluate_ranking(lambda u: users[u] @ items.T, truth, train, ks)
    assert evaluate_ranking(lambda u: users[u] @ items.T, truth, train, ks, factors=(users, items)) == old
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.delenv("DPREC_NATIVE")
    wide = (users.double(), items.double())  # not float32: the score blocks, whatever the kernel
    assert evaluate_ranking(lambda u: (users[u] @ items.T).double(), truth, train, ks, factors=wide) == old
