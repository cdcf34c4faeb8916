"""Item-item kNN graphs from the cosine similarity of item features, built block by block.

For features F (n x d), S keeps, for every item i, its k most cosine-similar other items j (the item itself
excluded, similarities <= 0 dropped) with S[i, j] = cos(F_i, F_j) (``weighted=True``, as MGCN) or S[i, j] = 1
(``weighted=False``, as FREEDOM). The graph holds the symmetric normalisation of MGCN and FREEDOM,

    Ŝ = D^-1/2 S D^-1/2,   D = diag(S 1)   (row sums; S itself is not symmetrised),

and propagates as  out[i] = sum_j Ŝ[i, j] x[j]:  every item gathers from its neighbours.
The n x n similarity matrix is never held: rows go ``block_size`` at a time (one block x n product, then top-k),
so memory is the features, their unit-norm copy and one block (block_size * n * 4 bytes).
Neighbour lists are cached in-process by the sha256 of the feature matrix (and k, device); ``clear_knn_cache()``
empties the cache. Differences from MGCN / FREEDOM, sizes and why the cache: docs/design-notes.md#graphknn.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from dprec.graph.api import DEFAULT_BACKEND, build_weighted_graph
from dprec.graph.base import DTYPE, PropagationGraph

DEFAULT_BLOCK_SIZE = 1024
CACHE_ENTRIES = 8
_CACHE: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
cache_stats = {"hits": 0, "misses": 0}


def clear_knn_cache() -> None:
    _CACHE.clear()
    cache_stats.update(hits=0, misses=0)


def _feature_key(features: np.ndarray | Tensor, k: int, device: torch.device | str) -> tuple:
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return hashlib.sha256(x.data).hexdigest(), x.shape, int(k), str(device)


def cached_knn_neighbours(
    features: np.ndarray | Tensor, k: int, block_size: int, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor]:
    """``knn_neighbours`` through the feature-hash cache (block_size does not change the result)."""
    key = _feature_key(features, k, device)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        cache_stats["hits"] += 1
        return _CACHE[key]
    cache_stats["misses"] += 1
    result = knn_neighbours(features, k, block_size, device)
    _CACHE[key] = result
    while len(_CACHE) > CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return result


def _unit_rows(features: np.ndarray | Tensor, device: torch.device | str) -> Tensor:
    x = torch.as_tensor(features).to(device=device, dtype=DTYPE)
    if x.dim() != 2:
        raise ValueError(f"features must be an (n_items, d) matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"features: {int((~torch.isfinite(x)).any(1).sum())} rows hold NaN or infinite values")
    return torch.nn.functional.normalize(x, dim=1)


def knn_neighbours(
    features: np.ndarray | Tensor, k: int = 10, block_size: int = DEFAULT_BLOCK_SIZE, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, sims) on the CPU: each item ``rows[e]``'s neighbour ``cols[e]`` with cosine ``sims[e]`` > 0.

    Every item gets its min(k, n - 1) most similar other items, less those with similarity <= 0;
    the edges of one item are consecutive, most similar first. ``device`` runs the products there.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x = _unit_rows(features, device)
    n = len(x)
    k = min(k, n - 1)
    rows, cols, sims = [], [], []
    for start in range(0, n, block_size):
        block = x[start : start + block_size] @ x.T
        own = torch.arange(start, start + len(block), device=x.device)
        block[torch.arange(len(block), device=x.device), own] = -torch.inf
        values, neighbours = block.topk(k, dim=1)
        keep = values > 0
        rows.append(own.unsqueeze(1).expand_as(neighbours)[keep].cpu())
        cols.append(neighbours[keep].cpu())
        sims.append(values[keep].cpu())
        del block  # free the block x n product before the next one is made
    if not rows:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=DTYPE)
    return torch.cat(rows), torch.cat(cols), torch.cat(sims)


def knn_between(
    queries: np.ndarray | Tensor,
    keys: np.ndarray | Tensor,
    k: int = 10,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(sims, cols), each (n_queries x min(k, n_keys)) on the CPU: every query row's most cosine-similar key rows,
    most similar first. Unlike :func:`knn_neighbours` nothing is dropped (the caller weighs the similarities), and
    the two sets are apart (a new item's neighbours among the trained ones). Blocks of ``block_size`` queries."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, x = _unit_rows(queries, device), _unit_rows(keys, device)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} columns, keys {x.shape[1]}")
    k = min(k, len(x))
    sims, cols = [], []
    for start in range(0, len(q), block_size):
        values, neighbours = (q[start : start + block_size] @ x.T).topk(k, dim=1)
        sims.append(values.cpu())
        cols.append(neighbours.cpu())
    if not sims:
        return torch.empty(0, k, dtype=DTYPE), torch.empty(0, k, dtype=torch.int64)
    return torch.cat(sims), torch.cat(cols)


def _inv_sqrt_degree(rows: Tensor, weight: Tensor, n: int) -> Tensor:
    degree = torch.zeros(n, dtype=DTYPE).index_add_(0, rows, weight)
    return torch.where(degree > 0, degree.clamp(min=torch.finfo(DTYPE).tiny).rsqrt(), 0.0)


def item_knn_edges(
    features: np.ndarray | Tensor,
    k: int = 10,
    weighted: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str = "cpu",
    cache: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, values) of Ŝ = D^-1/2 S D^-1/2: Ŝ[rows[e], cols[e]] = values[e] (see module docstring)."""
    rows, cols, sims = (cached_knn_neighbours if cache else knn_neighbours)(features, k, block_size, device)
    weight = sims if weighted else torch.ones_like(sims)
    scale = _inv_sqrt_degree(rows, weight, len(features))
    return rows, cols, scale[rows] * weight * scale[cols]


def build_item_knn_graph(
    features: np.ndarray | Tensor,
    k: int = 10,
    weighted: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = DEFAULT_BACKEND,
    device: torch.device | str = "cpu",
    cache: bool = True,
) -> PropagationGraph:
    """The propagation graph of Ŝ (items -> items), built once; see ``item_knn_edges`` for its entries."""
    rows, cols, sims = (cached_knn_neighbours if cache else knn_neighbours)(features, k, block_size, device)
    weight = sims if weighted else None  # binary S: scales only, DGL's fast copy_u path
    scale = _inv_sqrt_degree(rows, torch.ones_like(sims) if weight is None else weight, len(features))
    n = len(features)
    return build_weighted_graph(
        n, n, src=cols, dst=rows, weight=weight, backend=backend, src_scale=scale, dst_scale=scale
    )
