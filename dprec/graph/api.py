"""Graph operations of DPRec behind one small interface, with two interchangeable backends.

- ``build_user_item_graph``: on N = n_users + n_items nodes (users first, item i is node n_users + i), A is the
  binary symmetric adjacency of the training pairs (a pair seen twice is one edge) and the graph holds
  Â = D^-1/2 A D^-1/2, D = diag(A 1): w_ui = 1 / sqrt(d_u d_i) both ways; a node of degree 0 gets a 0 row.
- ``build_weighted_graph``: any weighted graph, propagate(x)[j] = sum_{edges i->j} w_ij x[i], repeated edges merged
  into one carrying the sum of their weights; w_ij = dst_scale[j] * weight_ij * src_scale[i] (caller normalises).
- ``lightgcn_propagate``: LightGCN's layer combination  mean(x, Â x, Â^2 x, ..., Â^L x).
- ``hypergraph_conv``: for an incidence H (n_nodes x K: dense, or a ``SparseIncidence`` of its non-zeros),
  hyperedge = H^T x and node_out = H hyperedge, no degree normalisation (as LGMRec); differentiable in H and x.

Backends "dgl" (default) and "torch" (torch.sparse, only torch needed) give the same numbers (tested to 1e-5).
Graphs are built once, weights precomputed, and moved with ``graph.to(device)``; weights are float32, and so must
the features be. ``resolve_backend(backend, device)`` is the backend to build with for a device: "dgl" on a GPU
where the installed DGL is a CPU build (PyPI's wheel) falls back to "torch", with one warning per process.
Why two backends, and why node scales: docs/design-notes.md#graphapi.
"""

from __future__ import annotations

import logging
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from dprec.graph import dgl_shim
from dprec.graph.base import DTYPE, EdgeList, PropagationGraph, SparseIncidence, check_index_range
from dprec.graph.dgl_shim import DGLUnavailableError

BACKENDS = ("dgl", "torch")
DEFAULT_BACKEND = "dgl"

IndexArray = np.ndarray | Tensor

logger = logging.getLogger(__name__)
_fallback_warned = False
"""Whether ``resolve_backend`` has logged its fallback warning in this process (it does so once)."""


def _backend_module(backend: str) -> ModuleType:
    """The module implementing ``backend``; raises DGLUnavailableError if "dgl" does not import."""
    if backend == "torch":
        from dprec.graph import torch_backend

        return torch_backend
    if backend == "dgl":
        from dprec.graph import dgl_backend

        return dgl_backend
    raise ValueError(f"unknown graph backend {backend!r}; choose one of {BACKENDS}")


def available_backends() -> tuple[str, ...]:
    """The backends that work in this environment ("torch" always; "dgl" when DGL imports)."""
    usable = []
    for name in BACKENDS:
        try:
            _backend_module(name)
        except DGLUnavailableError:
            continue
        usable.append(name)
    return tuple(usable)


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The graph backend to build with for graphs that will live on ``device`` (None: the CPU).

    "torch" is returned as it is. "dgl" stays "dgl" on the CPU, and on another device where the installed
    DGL can hold graphs there (``dgl_shim.dgl_device_problem``); elsewhere (PyPI's dgl==2.1.0 is a CPU
    build, DGL has no backend for the device, or DGL does not import) it falls back to "torch", which gives
    the same numbers, and logs one warning line per process that says why and what fixes it.
    An unknown backend raises ValueError.
    """
    global _fallback_warned
    if backend not in BACKENDS:
        raise ValueError(f"unknown graph backend {backend!r}; choose one of {BACKENDS}")
    dev = torch.device("cpu" if device is None else device)
    if backend == "torch" or dev.type == "cpu":
        return backend
    problem = dgl_shim.dgl_device_problem(str(dev))
    if problem is None:
        return backend
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "graph backend 'dgl' cannot run on %s: %s; using the torch.sparse backend instead (same results). "
            "Fix: install a CUDA build of DGL that matches this torch and CUDA (DGL's own wheel index, "
            "https://www.dgl.ai/pages/start.html; PyPI has CPU builds only), or set train.graph_backend=torch "
            "to choose torch.sparse and silence this",
            dev,
            problem,
        )
    return "torch"


def _tensor(values: np.ndarray | Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Tensors pass through; arrays are copied (they may be read-only: memory-mapped or from Arrow)."""
    return torch.as_tensor(values, dtype=dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)


def _as_index(values: IndexArray, upper: int, name: str) -> Tensor:
    index = _tensor(values)
    if index.dim() != 1 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D integer array, got dtype {index.dtype}, shape {tuple(index.shape)}")
    index = index.to(torch.int64)
    check_index_range(index, upper, name)
    return index


def _check_same_length(**arrays: Tensor) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"edge arrays must have one length, got {lengths}")


def _as_values(values: np.ndarray | Tensor | None, length: int, name: str) -> Tensor | None:
    if values is None:
        return None
    values = _tensor(values, DTYPE)
    if values.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name}: {int((~torch.isfinite(values)).sum())} values are NaN or infinite")
    return values


def _merge_repeated_edges(
    src: Tensor, dst: Tensor, weight: Tensor | None, n_src: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One edge per (src, dst) pair, carrying the sum of its weights (a count where weight is None)."""
    keys, position = torch.unique(dst * n_src + src, return_inverse=True)
    if len(keys) == len(src):
        return src, dst, weight
    summed = torch.zeros(len(keys), dtype=DTYPE)
    summed.index_add_(0, position, torch.ones(len(src), dtype=DTYPE) if weight is None else weight)
    return keys % n_src, keys // n_src, summed


def build_user_item_graph(
    n_users: int, n_items: int, users: IndexArray, items: IndexArray, backend: str = DEFAULT_BACKEND
) -> PropagationGraph:
    """Â = D^-1/2 A D^-1/2 of the bipartite user-item graph of the pairs (users[t], items[t])."""
    users = _as_index(users, n_users, "users")
    items = _as_index(items, n_items, "items")
    _check_same_length(users=users, items=items)
    pairs = torch.unique(users * n_items + items)
    users, items = pairs // n_items, pairs % n_items + n_users
    n_nodes = n_users + n_items
    src, dst = torch.cat([users, items]), torch.cat([items, users])
    degree = torch.bincount(src, minlength=n_nodes).to(DTYPE)
    inv_sqrt_degree = torch.where(degree > 0, degree.clamp(min=1).rsqrt(), 0.0)  # degree 0: 0, not inf
    edges = EdgeList(n_nodes, n_nodes, src, dst, src_scale=inv_sqrt_degree, dst_scale=inv_sqrt_degree)
    return _backend_module(backend).make_graph(edges)


def build_weighted_graph(
    n_src: int,
    n_dst: int,
    src: IndexArray,
    dst: IndexArray,
    weight: np.ndarray | Tensor | None,
    backend: str = DEFAULT_BACKEND,
    *,
    src_scale: np.ndarray | Tensor | None = None,
    dst_scale: np.ndarray | Tensor | None = None,
) -> PropagationGraph:
    """The graph with propagate(x)[j] = sum_{edges i->j} w_ij x[i]; edge e is src[e] -> dst[e].

    w_e = dst_scale[dst[e]] * weight[e] * src_scale[src[e]], each factor 1 where None. Give a
    symmetric normalisation D^-1/2 S D^-1/2 of a binary S as weight=None and the two scales: the
    DGL backend then takes its fast path (see ``dprec.graph.dgl_backend``).
    """
    src = _as_index(src, n_src, "src")
    dst = _as_index(dst, n_dst, "dst")
    _check_same_length(src=src, dst=dst)
    src, dst, weight = _merge_repeated_edges(src, dst, _as_values(weight, len(src), "weight"), n_src)
    edges = EdgeList(
        n_src,
        n_dst,
        src,
        dst,
        weight=weight,
        src_scale=_as_values(src_scale, n_src, "src_scale"),
        dst_scale=_as_values(dst_scale, n_dst, "dst_scale"),
    )
    return _backend_module(backend).make_graph(edges)


def lightgcn_propagate(graph: PropagationGraph, x: Tensor, n_layers: int) -> Tensor:
    """mean over l = 0..n_layers of Â^l x (LightGCN's layer combination)."""
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    layers = [x]
    for _ in range(n_layers):
        layers.append(graph.propagate(layers[-1]))
    return torch.stack(layers).mean(0)


def hypergraph_conv(
    incidence: Tensor | SparseIncidence, x: Tensor, backend: str = DEFAULT_BACKEND
) -> tuple[Tensor, Tensor]:
    """(node_out, hyperedge) = (H H^T x, H^T x) for H dense (n_nodes x K) or a SparseIncidence."""
    if isinstance(incidence, Tensor) and incidence.dim() != 2:
        raise ValueError(f"incidence must be a (n_nodes, K) matrix, got shape {tuple(incidence.shape)}")
    n_nodes = incidence.n_nodes if isinstance(incidence, SparseIncidence) else len(incidence)
    if x.dim() != 2 or x.shape[0] != n_nodes:
        raise ValueError(f"hypergraph_conv expects x of shape ({n_nodes}, d), got {tuple(x.shape)}")
    return _backend_module(backend).hypergraph_conv(incidence, x)
