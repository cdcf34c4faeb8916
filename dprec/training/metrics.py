"""Full-ranking evaluation with MMRec's metric definitions (DESIGN §4).

For every user with at least one item in the evaluated split all items are scored, the user's
training items are masked (-inf; as in MMRec, validation items are *not* masked when the test
split is ranked) and the top max(K) are compared with the split's items:

- Recall@K    = hits@K / |truth(u)|
- Precision@K = hits@K / K
- NDCG@K      = DCG@K / IDCG@K, binary gain, DCG@K = sum_{r<K, hit} 1 / log2(r + 2),
                IDCG@K = sum_{r < min(|truth(u)|, K)} 1 / log2(r + 2)

each averaged over the evaluated users. :func:`evaluate_ranking` returns per-metric *sums* and
``n_users``, so ranks of a distributed run can each evaluate a slice of the users and add their
sums; :func:`finalize` turns sums into means. Reference: X. Zhou, "MMRec: Simplifying Multimodal
Recommendation" (2023).

Speed: where the scores are products of user and item embeddings (``factors``, every model here)
and the C kernel is built, no score block is held: blocks of users are scored a cache-sized tile
of items at a time, items in descending order of norm, and each tile is ranked by a streaming
top-k (:func:`factored_masked_topk`) while it is in the cache, every thread taking whole blocks.
Otherwise users are scored in blocks of a few MiB of scores (cache-sized, never more than
``chunk_size`` users), ranked by :func:`masked_topk`, which neither copies nor writes the scores:
a C kernel (``dprec/kernels/topk.c``, compiled on first use) bounds each row's (k+1)-th best from
chunk maxima and heaps the few scores above; without a C compiler, torch operations find a few
candidates per row from column-group maxima. With two or more intra-op threads, those blocks are
ranked in worker threads while the calling thread scores the next ones. Either way hits are looked
up in the truth pairs of the block's users (binary search), not in a dense truth matrix, and the
sums are added per ``chunk_size`` users exactly as before.

Ties: ``torch.topk`` on CPU keeps (value, index) pairs and selects with ``std::partial_sort``
(k * 64 <= n_items) or ``std::nth_element`` + ``std::sort`` with a comparator on the value alone,
so which of several equal scores are kept, and their order, depends on the heap / partition
order, not on the item index. The fast paths only decide rows whose k+1 best scores are all
different (then the result is unique); any row with a tie there is ranked by ``torch.topk`` itself,
on the same masked row, so the results (and metric sums) are identical to the old code's.
"""

from __future__ import annotations

import ctypes
import functools
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from dprec import kernels
from dprec.data.interactions import UserItemSets
from dprec.training.signals import deferred_signals

DEFAULT_KS = (10, 20, 50)
SCORE_BLOCK_BYTES = 4 * 2**20
"""Float32 scores per ``score_users`` call of :func:`evaluate_ranking` by default: a few times a
core's L2 cache, so the matmul writes them into the cache and the top-k reads them from there."""
STREAM_TILE_BYTES = 512 * 2**10
"""Float32 scores per tile of :func:`factored_masked_topk`: a core's L2 cache, where the product writes them
and the kernel reads them."""
MIN_TILE = 64
"""Fewest items per tile: products of a few columns take another BLAS path (matrix-vector), whose sums may differ
in the last bit from the whole product's."""
STREAM_USERS = 512
"""Users per block of :func:`evaluate_ranking` when it computes the scores tile by tile."""
GROUP_WIDTH = 8
"""Columns per group in :func:`masked_topk`."""
COARSE_GROUPS = 3
"""Coarse groups (of group maxima) per ranked position in :func:`masked_topk`."""
MAX_GROUPS = 4
"""Groups per ranked position above which :func:`masked_topk` leaves a row (many ties) to ``torch.topk``."""


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    return [f"{m}@{k}" for m in ("recall", "ndcg", "precision") for k in ks]


def rank_metrics_sums(
    topk: torch.Tensor, truth: torch.Tensor, n_truth: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Per-metric sums over the rows of one chunk.

    ``topk`` (B x maxK) item indices in rank order, ``truth`` (B x n_items) bool, ``n_truth`` (B,).
    """
    return hit_metrics_sums(torch.gather(truth, 1, topk).to(torch.float64), n_truth, ks)


def hit_metrics_sums(hits: torch.Tensor, n_truth: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Per-metric sums over the rows of one chunk from ``hits`` (B x maxK float64: 1 where the
    item at that rank is a truth item) and ``n_truth`` (B,)."""
    max_k = hits.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64))
    ideal_cum = torch.cumsum(discounts, 0)
    n_truth = n_truth.to(torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit_k = hits[:, :k].sum(1)
        dcg = (hits[:, :k] * discounts[:k]).sum(1)
        ideal_len = torch.clamp(n_truth, max=k).long()
        idcg = ideal_cum[ideal_len - 1]
        out[f"recall@{k}"] = float((hit_k / n_truth).sum())
        out[f"ndcg@{k}"] = float((dcg / idcg).sum())
        out[f"precision@{k}"] = float((hit_k / k).sum())
    return out


def reference_masked_topk(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.topk`` indices of ``scores`` with ``scores[rows, cols]`` set to -inf, on a copy."""
    masked = scores.clone()
    masked[rows, cols] = -torch.inf
    return torch.topk(masked, k, dim=1).indices


def _group_max(values: torch.Tensor, groups: int) -> torch.Tensor:
    """(B x groups) maxima of the strided column groups j, j + groups, j + 2 groups, ... (NaN propagates)."""
    n = values.shape[1]
    width = n // groups
    out = values[:, : width * groups].unflatten(1, (width, groups)).amax(1)
    tail = n - width * groups
    if tail:
        out[:, :tail] = torch.maximum(out[:, :tail], values[:, width * groups :])
    return out


def masked_topk(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly :func:`reference_masked_topk` (same indices, same order), without copying or
    writing into ``scores``: by the C kernel (:func:`native_masked_topk`) where it is built, else by
    :func:`grouped_masked_topk`."""
    top = native_masked_topk(scores, rows, cols, k)
    return grouped_masked_topk(scores, rows, cols, k) if top is None else top


def _kernel() -> SimpleNamespace | None:
    """The functions of ``dprec/kernels/topk.c``, typed, or ``None`` where it is not built."""
    lib = kernels.load("topk")
    return None if lib is None else _typed(lib)


@functools.cache
def _typed(lib: ctypes.CDLL) -> SimpleNamespace:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "dprec_masked_topk_f32": [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr],
        "dprec_topk_feed_f32": [ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr],
        "dprec_topk_finish": [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr],
        "dprec_topk_capacity": [i64],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, i64
    return SimpleNamespace(
        masked=lib.dprec_masked_topk_f32,
        feed=lib.dprec_topk_feed_f32,
        finish=lib.dprec_topk_finish,
        capacity=lib.dprec_topk_capacity,
    )


def _pairs_by_row(r: torch.Tensor, c: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) pairs sorted by row, then column, as the kernels take them."""
    by_row = torch.argsort(r * n + c)
    return r[by_row].contiguous(), c[by_row].contiguous()


def _rank_by_reference(
    top: torch.Tensor, failed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int, scores_of
) -> None:
    """Fill ``top``'s ``failed`` rows with :func:`reference_masked_topk` of ``scores_of(failed)`` (their whole
    score rows), the masked pairs of those rows renumbered."""
    if len(failed):
        local = torch.full((len(top),), -1, dtype=torch.int64)
        local[failed] = torch.arange(len(failed))
        keep = local[rows] >= 0
        top[failed] = reference_masked_topk(scores_of(failed), local[rows[keep]], cols[keep], k)


def native_masked_topk(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor | None:
    """:func:`reference_masked_topk` by the C kernel ``dprec/kernels/topk.c`` (chunk maxima bound each row's
    (k+1)-th best, then a heap takes the few scores above), or ``None`` where the kernel is not built (``dprec.kernels``) or
    does not apply (not float32 scores, k + 1 > items). Rows with a tie among their k + 1 best, a NaN or too
    few unmasked scores are ranked by :func:`reference_masked_topk` itself, as in :func:`grouped_masked_topk`."""
    b, n = scores.shape
    if scores.dtype != torch.float32 or b == 0 or not 1 <= k < n:
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    s = scores.contiguous()
    r = rows.to(torch.int64).contiguous()
    c = cols.to(torch.int64).contiguous()
    top = torch.empty((b, k), dtype=torch.int64)
    ok = torch.empty(b, dtype=torch.uint8)

    def run() -> int:
        return kernel.masked(s.data_ptr(), b, n, r.data_ptr(), c.data_ptr(), len(r), k, top.data_ptr(), ok.data_ptr())

    status = run()
    if status == -1:  # pairs not sorted by row, then column
        r, c = _pairs_by_row(r, c, n)
        status = run()
    if status == -2:  # a pair out of range: the reference raises the error indexing would raise
        return reference_masked_topk(scores, rows, cols, k)
    if status != 0:
        raise RuntimeError(f"masked top-k kernel failed with status {status}")
    _rank_by_reference(top, (ok == 0).nonzero().squeeze(1), r, c, k, lambda failed: s[failed])
    return top


def streaming_available(user_emb: torch.Tensor, item_emb: torch.Tensor, k: int) -> bool:
    """Can :func:`factored_masked_topk` rank these embeddings (float32 on the CPU, k < items, kernel built)?"""
    return (
        user_emb.dtype == item_emb.dtype == torch.float32
        and user_emb.device.type == item_emb.device.type == "cpu"
        and user_emb.dim() == item_emb.dim() == 2
        and user_emb.shape[1] == item_emb.shape[1]
        and 1 <= k < item_emb.shape[0]
        and _kernel() is not None
    )


def tile_bounds(n: int, width: int) -> list[int]:
    """Column bounds of the tiles of :func:`factored_masked_topk`: ``width`` (at least :data:`MIN_TILE`)
    columns each, a narrower last tile joined to the one before."""
    width = max(MIN_TILE, width)
    bounds = list(range(0, n, width)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_TILE:
        del bounds[-2]
    return bounds


def factored_masked_topk(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    k: int,
    tile: int | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`reference_masked_topk` of the scores ``user_emb @ item_emb.T`` without holding them:
    the product is taken ``tile`` items at a time (default: :data:`STREAM_TILE_BYTES` of scores, a
    core's L2 cache; at least :data:`MIN_TILE`) and each tile goes through the streaming kernel of
    ``dprec/kernels/topk.c`` while it is in the cache. Rows with a tie among their k + 1 best, a NaN
    or too few unmasked scores are ranked by :func:`reference_masked_topk` on their whole score rows.
    ``None`` where :func:`streaming_available` is false.

    ``order`` (a permutation of the items): ``item_emb``'s row j is item ``order[j]`` (masks and the
    result speak of items); items of large norm first raise each row's threshold early. The tiles'
    products are the whole product's, column by column, where the BLAS sums each dot product in the
    same order whatever the number of columns (checked: ``tests/test_metrics_speedpath.py``).
    """
    if not streaming_available(user_emb, item_emb, k) or len(user_emb) == 0:
        return None
    kernel = _kernel()
    b, n = user_emb.shape[0], item_emb.shape[0]
    u, items = user_emb.contiguous(), item_emb.contiguous()
    r, c = rows.to(torch.int64).contiguous(), cols.to(torch.int64).contiguous()
    capacity = kernel.capacity(k)
    values = torch.empty((b, capacity), dtype=torch.float32)
    columns = torch.empty((b, capacity), dtype=torch.int64)
    count = torch.zeros(b, dtype=torch.int64)
    threshold = torch.full((b,), -torch.inf, dtype=torch.float32)
    bad = torch.zeros(b, dtype=torch.uint8)
    state = [t.data_ptr() for t in (values, columns, count, threshold, bad)]
    if order is not None:
        order = order.to(torch.int64).contiguous()
        if order.shape != (n,):
            raise ValueError(f"order has shape {tuple(order.shape)}, expected ({n},)")
    column_of = order.data_ptr() if order is not None else None
    bounds = tile_bounds(n, tile or STREAM_TILE_BYTES // (4 * b))
    buffer = torch.empty((b, bounds[1] - bounds[0]), dtype=torch.float32)

    def feed(out: torch.Tensor, start: int) -> int:  # the pairs as they are now (sorted below if need be)
        return kernel.feed(
            out.data_ptr(), b, out.shape[1], start, n, column_of, r.data_ptr(), c.data_ptr(), len(r), k, *state
        )

    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        part = items[start:end]
        out = buffer if len(part) == buffer.shape[1] else torch.empty((b, len(part)), dtype=torch.float32)
        torch.mm(u, part.T, out=out)
        status = feed(out, start)
        if status == -1:  # pairs not sorted by row, then column: checked before any row, so the state is untouched
            r, c = _pairs_by_row(r, c, n)
            status = feed(out, start)
        if status == -2:  # a pair out of range: the reference raises the error indexing would raise
            return reference_masked_topk(_item_order_scores(u, items, order), rows, cols, k)
        if status != 0:
            raise RuntimeError(f"streaming top-k kernel failed with status {status}")
    top = torch.empty((b, k), dtype=torch.int64)
    ok = torch.empty(b, dtype=torch.uint8)
    kernel.finish(b, k, state[0], state[1], state[2], state[4], top.data_ptr(), ok.data_ptr())
    failed = (ok == 0).nonzero().squeeze(1)
    _rank_by_reference(top, failed, r, c, k, lambda rows_: _item_order_scores(u.index_select(0, rows_), items, order))
    return top


def _item_order_scores(users: torch.Tensor, items: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """``users @ items.T`` with its columns put back in item order where ``items`` come in ``order``."""
    scores = users @ items.T
    if order is None:
        return scores
    out = torch.empty_like(scores)
    out[:, order] = scores
    return out


def grouped_masked_topk(
    scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int, width: int | None = None
) -> torch.Tensor:
    """Exactly :func:`reference_masked_topk` (same indices, same order), without copying or
    writing into ``scores``, in torch operations.

    Rows are cut into G strided column groups (group j: columns j, j + G, j + 2G, ...; ``width``
    columns each, default :data:`GROUP_WIDTH`); their maxima, masked items left out, are grouped
    again into a few times k+1 coarse maxima, whose (k+1)-th largest is ``t``: at least k+1
    unmasked scores are >= ``t``, and every one of them lies in a group whose maximum is >= ``t``.
    The unmasked scores >= ``t`` of those groups (k+1 and a few more per row) are the candidates,
    sorted by row and score. Where a row's k+1 best are strictly decreasing its top k is unique,
    and so what any exact method returns; rows with a tie there, a NaN, fewer than k+1 finite
    unmasked scores or many candidates are ranked by :func:`reference_masked_topk` itself, so
    ties are resolved exactly as ``torch.topk`` resolves them.
    """
    b, n = scores.shape
    kk = k + 1
    g = n // (width or GROUP_WIDTH)
    if scores.dtype != torch.float32 or b == 0 or g < 2 * kk:
        return reference_masked_topk(scores, rows, cols, k)
    s = scores.contiguous().view(-1)
    m = -(-n // g)  # columns per group: groups j < n - (m - 1) g have m, the others m - 1
    steps = torch.arange(m) * g
    group_max = _group_max(s.view(b, n), g).view(-1)
    masked_group = rows * g + cols % g
    masked_values = s.index_select(0, rows * n + cols)
    # groups whose maximum is a masked score get their maximum without the masked ones
    fix = torch.unique(masked_group[masked_values == group_max.index_select(0, masked_group)])
    if len(fix):
        values = s.index_select(0, ((fix // g * n + fix % g)[:, None] + steps).view(-1).clamp_(max=b * n - 1))
        values = values.view(len(fix), m)
        values[:, -1].masked_fill_(fix % g + steps[-1] >= n, -torch.inf)
        pos = torch.searchsorted(fix, masked_group).clamp_(max=len(fix) - 1)
        hit = fix.index_select(0, pos) == masked_group
        values[pos[hit], (cols // g)[hit]] = -torch.inf
        group_max[fix] = values.amax(1)
    group_max = group_max.view(b, g)
    coarse = _group_max(group_max, COARSE_GROUPS * kk) if g > 2 * COARSE_GROUPS * kk else group_max
    threshold = torch.topk(coarse, kk, dim=1, sorted=False).values.amin(1)  # NaN ranks first and propagates
    ok = torch.isfinite(threshold)
    threshold = torch.where(ok, threshold, torch.nan)[:, None]  # nothing passes in the rows left to the reference
    passing = group_max >= threshold
    crowded = passing.sum(1) > MAX_GROUPS * kk  # many ties at t (constant scores, say): cheaper by the reference
    if crowded.any():
        ok &= ~crowded
        passing &= ok[:, None]
    selected = passing.view(-1).nonzero().squeeze(1)  # row * g + group, sorted
    r = selected // g
    index = ((r * n + selected - r * g)[:, None] + steps).view(-1).clamp_(max=b * n - 1)
    values = s.index_select(0, index).view(len(selected), m)
    values[:, -1].masked_fill_(selected - r * g + steps[-1] >= n, -torch.inf)
    high = (masked_values >= threshold.view(-1).index_select(0, rows)).nonzero().squeeze(1)
    if len(high) and len(selected):  # masked scores >= t in the selected groups are no candidates
        pos = torch.searchsorted(selected, masked_group[high]).clamp_(max=len(selected) - 1)
        hit = selected.index_select(0, pos) == masked_group[high]
        values[pos[hit], (cols[high] // g)[hit]] = -torch.inf
    flat = (values >= threshold.view(-1).index_select(0, r)[:, None]).view(-1).nonzero().squeeze(1)
    top = torch.empty((b, k), dtype=torch.int64)
    if len(flat):
        r = r.index_select(0, flat // m)
        v = values.view(-1).index_select(0, flat)
        bits = v.view(torch.int32).to(torch.int64)
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # as integers in the order of the floats
        order = torch.sort((r << 32) | (0x7FFFFFFF - ordered)).indices  # by row, then score descending
        counts = torch.bincount(r, minlength=b)
        pos = ((torch.cumsum(counts, 0) - counts)[:, None] + torch.arange(kk)).view(-1).clamp_(max=len(flat) - 1)
        pos = order.index_select(0, pos)
        v = v.index_select(0, pos).view(b, kk)
        ok &= (counts >= kk) & (v[:, :-1] > v[:, 1:]).all(1)
        top = (index.index_select(0, flat.index_select(0, pos)) - r.index_select(0, pos) * n).view(b, kk)[:, :k]
    else:
        ok[:] = False
    _rank_by_reference(top, (~ok).nonzero().squeeze(1), rows, cols, k, lambda bad: s.view(b, n)[bad])
    return top


def ranked_hits(
    scores: torch.Tensor, users: np.ndarray, truth: UserItemSets, train_mask: UserItemSets, k: int
) -> np.ndarray:
    """(len(users) x k) bool: is the item at each rank of each user's top k (``train_mask`` items
    masked) one of the user's ``truth`` items. ``scores`` (len(users) x n_items) is only read."""
    rows, cols = (torch.from_numpy(a) for a in train_mask.rows_cols(users))
    return hits_of_top(masked_topk(scores, rows, cols, k).numpy(), users, truth)


def factored_hits(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    users: np.ndarray,
    truth: UserItemSets,
    train_mask: UserItemSets,
    k: int,
    order: torch.Tensor | None = None,
) -> np.ndarray:
    """:func:`ranked_hits` of the scores ``user_emb[users] @ item_emb.T``, computed tile by tile
    (:func:`factored_masked_topk`, with its ``order``); the C kernel must be available."""
    rows, cols = (torch.from_numpy(a) for a in train_mask.rows_cols(users))
    top = factored_masked_topk(user_emb.index_select(0, torch.from_numpy(users)), item_emb, rows, cols, k, order=order)
    if top is None:
        raise RuntimeError("the streaming top-k needs the C kernel and float32 CPU embeddings")
    return hits_of_top(top.numpy(), users, truth)


def hits_of_top(top: np.ndarray, users: np.ndarray, truth: UserItemSets) -> np.ndarray:
    """(len(users) x k) bool: is ``top[r, j]`` one of user ``users[r]``'s ``truth`` items (binary search)."""
    rows, cols = truth.rows_cols(users)
    keys = rows * truth.n_items + cols  # sorted: rows_cols lists the pairs row by row, items sorted
    query = (np.arange(len(users))[:, None] * truth.n_items + top).ravel()
    pos = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
    hits = keys[pos] == query if len(keys) else np.zeros(len(query), bool)
    return hits.reshape(top.shape)


def evaluate_ranking(
    score_users: Callable[[torch.Tensor], torch.Tensor],
    truth: UserItemSets,
    train_mask: UserItemSets,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 2048,
    users: np.ndarray | None = None,
    block_bytes: int | None = None,
    workers: int | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Rank all items for the users that have truth items; return metric sums and ``n_users``.

    ``score_users(user_idx)`` returns a (len(user_idx) x n_items) score tensor, which is only read.
    ``users`` restricts evaluation to a subset (one rank's slice); default: every user with truth.
    Use :func:`finalize` to turn the sums into means.

    ``factors`` = (user embeddings, item embeddings) whose products are ``score_users``' scores (a
    model's ``score_factors()``): where :func:`streaming_available`, no score block is held at all.
    Blocks of :data:`STREAM_USERS` users are scored a cache-sized tile of items at a time, each tile
    ranked while it is in the cache (:func:`factored_masked_topk`), and every thread (the calling one
    and ``workers``, default T - 1, one intra-op thread each) takes whole blocks. Otherwise:

    Users are scored in blocks of at most ``chunk_size`` users and ``block_bytes`` of float32
    scores (default :data:`SCORE_BLOCK_BYTES`); the sums are added up per ``chunk_size`` users, in
    order, so they do not depend on the blocks or the threads. With ``torch.get_num_threads()`` =
    T > 1, ``workers`` threads (default T // 2, measured fastest) of one intra-op thread each rank
    blocks while the calling thread, left T - ``workers`` intra-op threads until the end, scores the
    next ones (and ranks a block itself when the workers have two each): no thread waits for another
    inside an operation, which on a busy machine costs more than the work. Ranking a block while the
    next is scored needs ``score_users`` to return new memory; the first two blocks are checked, and
    where the second reuses the first's memory every block is ranked before the next call.

    A stop signal (``dprec.training.signals``) is held while a block is scored and handed to the
    pool and raised between blocks: raised inside the executor's locks, it could leave one held and
    the pool's shutdown would wait for it forever.
    """
    if users is None:
        users = truth.users_with_items()
    else:
        users = users[truth.sizes()[users] > 0]
    n_items = truth.n_items
    max_k = max(ks)
    if max_k > n_items:
        raise ValueError(f"K={max_k} exceeds the number of items ({n_items})")
    if factors is not None and streaming_available(factors[0], factors[1], max_k):
        user_emb, item_emb = factors
        order = torch.argsort(item_emb.norm(dim=1), descending=True, stable=True)  # large norms first
        ordered = item_emb.index_select(0, order)
        return _every_thread_ranks(
            lambda part: factored_hits(user_emb, ordered, part, truth, train_mask, max_k, order),
            users,
            truth,
            ks,
            chunk_size,
            min(chunk_size, STREAM_USERS),
            workers,
        )
    block = max(1, min(chunk_size, (block_bytes or SCORE_BLOCK_BYTES) // (4 * n_items)))
    threads = torch.get_num_threads()
    workers = threads // 2 if workers is None else workers
    pool = None
    if workers > 0 and threads > 1 and len(users) > block:
        with deferred_signals():
            pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
        torch.set_num_threads(max(1, threads - workers))
    restore_threads = pool is not None
    sums = {name: 0.0 for name in metric_names(ks)}
    chunks: deque[tuple[np.ndarray, list]] = deque()  # (users, per-block hits or futures), not yet summed

    def add_oldest_chunk() -> None:
        _add_chunk(*chunks.popleft(), truth, ks, sums)

    pending: deque[tuple[torch.Tensor, Future]] = deque()  # blocks given to the workers, oldest first
    overlap = None  # may a block be ranked while the next is scored? known at the second block
    try:
        for start in range(0, len(users), chunk_size):
            chunk = users[start : start + chunk_size]
            chunks.append((chunk, []))
            for block_start in range(0, len(chunk), block):
                part = chunk[block_start : block_start + block]
                with deferred_signals():  # a stop signal waits for this block: never inside the pool's locks
                    with torch.no_grad():
                        scores = score_users(torch.from_numpy(part)).detach().to(torch.float32).cpu()
                    if scores.shape != (len(part), n_items):
                        raise ValueError(
                            f"score_users returned shape {tuple(scores.shape)}, expected {(len(part), n_items)}"
                        )
                    if pool is not None and overlap is None and pending:  # the second block: new memory?
                        overlap = not _shares_memory(scores, pending.popleft()[0])
                        if not overlap:  # no: rank every block here, before the next call, with all threads
                            pool.shutdown()
                            pool = None
                            torch.set_num_threads(threads)
                    elif overlap and any(_shares_memory(scores, held) for held, f in pending if not f.done()):
                        raise RuntimeError("score_users returned memory of a block that is still being ranked")
                    while pending and pending[0][1].done():
                        pending.popleft()
                    if pool is None or len(pending) >= 2 * workers:  # the workers have enough to do: rank it here
                        chunks[-1][1].append(ranked_hits(scores, part, truth, train_mask, max_k))
                    else:
                        future = pool.submit(ranked_hits, scores, part, truth, train_mask, max_k)
                        chunks[-1][1].append(future)
                        pending.append((scores, future))
                        if overlap is None:  # the first block: ranked now, kept to compare with the second
                            future.result()
                    while len(chunks) > 1 and all(isinstance(p, np.ndarray) or p.done() for p in chunks[0][1]):
                        add_oldest_chunk()
        with deferred_signals():
            while chunks:
                add_oldest_chunk()
    finally:
        if pool is not None:
            with deferred_signals():
                pool.shutdown(cancel_futures=True)
        if restore_threads:  # also the default of threads started later, which the workers changed
            torch.set_num_threads(threads)
    sums["n_users"] = float(len(users))
    return sums


def _add_chunk(chunk: np.ndarray, parts: list, truth: UserItemSets, ks: Sequence[int], sums: dict) -> None:
    """Add the metric sums of one chunk of users, from its blocks' hits (arrays or futures of them)."""
    hits = np.concatenate([p if isinstance(p, np.ndarray) else p.result() for p in parts])
    n_truth = torch.from_numpy(truth.sizes()[chunk])
    for name, value in hit_metrics_sums(torch.from_numpy(hits).to(torch.float64), n_truth, ks).items():
        sums[name] += value


def _every_thread_ranks(
    work: Callable[[np.ndarray], np.ndarray],
    users: np.ndarray,
    truth: UserItemSets,
    ks: Sequence[int],
    chunk_size: int,
    block: int,
    workers: int | None,
) -> dict[str, float]:
    """Metric sums of ``work(block users) -> hits`` over ``users``, in blocks that the calling thread and
    ``workers`` threads (default T - 1) take whole, each with one intra-op thread; sums per chunk, in order.
    Stop signals are held as in :func:`evaluate_ranking`."""
    threads = torch.get_num_threads()
    workers = threads - 1 if workers is None else workers
    sums = {name: 0.0 for name in metric_names(ks)}
    chunks: deque[tuple[np.ndarray, list]] = deque()

    def add_done_chunks(everything: bool = False) -> None:
        while chunks and (
            everything or len(chunks) > 1 and all(isinstance(p, np.ndarray) or p.done() for p in chunks[0][1])
        ):
            _add_chunk(*chunks.popleft(), truth, ks, sums)

    pool = None
    try:
        if workers > 0 and threads > 1 and len(users) > block:
            with deferred_signals():
                pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
            torch.set_num_threads(1)
        pending: deque[Future] = deque()
        for start in range(0, len(users), chunk_size):
            chunk = users[start : start + chunk_size]
            chunks.append((chunk, []))
            for block_start in range(0, len(chunk), block):
                part = chunk[block_start : block_start + block]
                with deferred_signals():  # never inside the pool's locks; this thread's own block in one piece
                    while pending and pending[0].done():
                        pending.popleft()
                    if pool is not None and len(pending) < 2 * workers:
                        pending.append(pool.submit(work, part))
                        chunks[-1][1].append(pending[-1])
                    else:  # the workers have enough to do (or there are none): this thread takes the block
                        chunks[-1][1].append(work(part))
                add_done_chunks()
        with deferred_signals():
            add_done_chunks(everything=True)
    finally:
        if pool is not None:
            with deferred_signals():
                pool.shutdown(cancel_futures=True)
            torch.set_num_threads(threads)  # also the default of threads started later, which the workers changed
    sums["n_users"] = float(len(users))
    return sums


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do the storages of ``a`` and ``b`` overlap?"""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Means from the sums of :func:`evaluate_ranking` (possibly added over ranks)."""
    n = sums["n_users"]
    if n == 0:
        raise ValueError("no user has an item in the evaluated split")
    return {name: value / n for name, value in sums.items() if name != "n_users"}


def format_metrics(metrics: dict[str, float], ks: Sequence[int] = (10, 20)) -> str:
    return " ".join(f"{m[0].upper()}@{k}={metrics[f'{m}@{k}']:.4f}" for m in ("recall", "ndcg") for k in ks)
