"""Full-ranking evaluation with MMRec's metric definitions (DESIGN §4).

For every user with at least one item in the evaluated split all items are scored, the user's
training items are masked (-inf; as in MMRec, validation items are *not* masked when the test
split is ranked) and the top max(K) are compared with the split's items:

- Recall@K    = hits@K / |truth(u)|
- Precision@K = hits@K / K
- NDCG@K      = DCG@K / IDCG@K, binary gain, DCG@K = sum_{r<K, hit} 1 / log2(r + 2),
                IDCG@K = sum_{r < min(|truth(u)|, K)} 1 / log2(r + 2)

each averaged over the evaluated users. Users are scored in chunks (``chunk_size`` x n_items at
most in memory). :func:`evaluate_ranking` returns per-metric *sums* and ``n_users``, so ranks of
a distributed run can each evaluate a slice of the users and add their sums; :func:`finalize`
turns sums into means. Reference: X. Zhou, "MMRec: Simplifying Multimodal Recommendation" (2023).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dprec.data.interactions import UserItemSets

DEFAULT_KS = (10, 20, 50)


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    return [f"{m}@{k}" for m in ("recall", "ndcg", "precision") for k in ks]


def rank_metrics_sums(
    topk: torch.Tensor, truth: torch.Tensor, n_truth: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Per-metric sums over the rows of one chunk.

    ``topk`` (B x maxK) item indices in rank order, ``truth`` (B x n_items) bool, ``n_truth`` (B,).
    """
    hits = torch.gather(truth, 1, topk).to(torch.float64)
    max_k = topk.shape[1]
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


def evaluate_ranking(
    score_users: Callable[[torch.Tensor], torch.Tensor],
    truth: UserItemSets,
    train_mask: UserItemSets,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 2048,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Rank all items for the users that have truth items; return metric sums and ``n_users``.

    ``score_users(user_idx)`` returns a (len(user_idx) x n_items) score tensor. ``users``
    restricts evaluation to a subset (one rank's slice); default: every user with truth.
    Use :func:`finalize` to turn the sums into means.
    """
    if users is None:
        users = truth.users_with_items()
    else:
        users = users[truth.sizes()[users] > 0]
    n_items = truth.n_items
    max_k = max(ks)
    if max_k > n_items:
        raise ValueError(f"K={max_k} exceeds the number of items ({n_items})")
    sums = {name: 0.0 for name in metric_names(ks)}
    for start in range(0, len(users), chunk_size):
        chunk = users[start : start + chunk_size]
        with torch.no_grad():
            scores = score_users(torch.from_numpy(chunk)).detach().to(torch.float32).cpu().clone()
        if scores.shape != (len(chunk), n_items):
            raise ValueError(f"score_users returned shape {tuple(scores.shape)}, expected {(len(chunk), n_items)}")
        rows, cols = train_mask.rows_cols(chunk)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        top = torch.topk(scores, max_k, dim=1).indices
        truth_dense = torch.zeros((len(chunk), n_items), dtype=torch.bool)
        rows, cols = truth.rows_cols(chunk)
        truth_dense[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        n_truth = torch.from_numpy(truth.sizes()[chunk])
        for name, value in rank_metrics_sums(top, truth_dense, n_truth, ks).items():
            sums[name] += value
    sums["n_users"] = float(len(users))
    return sums


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Means from the sums of :func:`evaluate_ranking` (possibly added over ranks)."""
    n = sums["n_users"]
    if n == 0:
        raise ValueError("no user has an item in the evaluated split")
    return {name: value / n for name, value in sums.items() if name != "n_users"}


def format_metrics(metrics: dict[str, float], ks: Sequence[int] = (10, 20)) -> str:
    return " ".join(f"{m[0].upper()}@{k}={metrics[f'{m}@{k}']:.4f}" for m in ("recall", "ndcg") for k in ks)
