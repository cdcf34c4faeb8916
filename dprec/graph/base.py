"""Types that the graph backends share: an edge list, the propagation graph and a sparse incidence.

A ``PropagationGraph`` is a fixed weighted directed graph from ``n_src`` source nodes to ``n_dst``
destination nodes, built once from an ``EdgeList``. Its one operation is

    propagate(x)[j] = sum_{edges i->j} w_ij * x[i]        i.e.  out = M @ x,  M[j, i] = w_ij,

for x of shape (n_src, d), differentiable with respect to x.
An ``EdgeList`` may give w_ij in factored form, w_ij = dst_scale[j] * weight_ij * src_scale[i]
(D^-1/2 A D^-1/2 is one): a backend may then propagate without per-edge weights, which is DGL's
fast path. Weights are float32, so x must be float32 too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float32


def check_index_range(index: Tensor, upper: int, name: str) -> None:
    """Raise a ValueError naming ``name`` unless every entry of ``index`` lies in [0, upper)."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= upper):
        raise ValueError(
            f"{name}: indices must lie in [0, {upper}), got min {int(index.min())}, max {int(index.max())}"
        )


@dataclass(frozen=True)
class EdgeList:
    """Edges src[e] -> dst[e] with w_e = dst_scale[dst[e]] * weight[e] * src_scale[src[e]]; None = all ones.

    Built and validated by ``dprec.graph.api``; the backends trust it.
    """

    n_src: int
    n_dst: int
    src: Tensor
    dst: Tensor
    weight: Tensor | None = None
    src_scale: Tensor | None = None
    dst_scale: Tensor | None = None

    def edge_weights(self) -> Tensor:
        """The combined weight w_e of every edge."""
        weight = torch.ones(len(self.src), dtype=DTYPE) if self.weight is None else self.weight
        if self.src_scale is not None:
            weight = weight * self.src_scale[self.src]
        if self.dst_scale is not None:
            weight = weight * self.dst_scale[self.dst]
        return weight


class PropagationGraph(ABC):
    """A fixed weighted graph that propagates node features: out = M @ x (see module docstring)."""

    backend: str
    """Name of the implementation: "dgl" or "torch"."""

    def __init__(self, n_src: int, n_dst: int) -> None:
        self.n_src = n_src
        self.n_dst = n_dst

    @property
    @abstractmethod
    def num_edges(self) -> int:
        """Number of distinct edges (repeated ones were merged when the graph was built)."""

    @abstractmethod
    def to(self, device: torch.device | str) -> PropagationGraph:
        """A copy of this graph on ``device`` (like ``Tensor.to``, it returns the graph, not a view)."""

    @abstractmethod
    def _propagate(self, x: Tensor) -> Tensor: ...

    def propagate(self, x: Tensor) -> Tensor:
        """out[j] = sum_{edges i->j} w_ij * x[i]; x: (n_src, d) float32 -> out: (n_dst, d)."""
        if x.dim() != 2 or x.shape[0] != self.n_src:
            raise ValueError(f"propagate expects x of shape ({self.n_src}, d), got {tuple(x.shape)}")
        if x.dtype != DTYPE:
            raise TypeError(f"propagate expects {DTYPE} features (the graph's weights), got {x.dtype}")
        return self._propagate(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_src={self.n_src}, n_dst={self.n_dst}, num_edges={self.num_edges})"


@dataclass(frozen=True)
class SparseIncidence:
    """A node-hyperedge incidence matrix H (n_nodes x n_hyperedges) given by its non-zeros.

    H[rows[t], cols[t]] = values[t]; repeated (row, col) pairs add up. ``values`` may require grad.
    """

    rows: Tensor
    cols: Tensor
    values: Tensor
    n_nodes: int
    n_hyperedges: int

    def __post_init__(self) -> None:
        if not self.rows.shape == self.cols.shape == self.values.shape or self.rows.dim() != 1:
            raise ValueError(
                "SparseIncidence: rows, cols and values must be 1-D of one length, got shapes "
                f"{tuple(self.rows.shape)}, {tuple(self.cols.shape)}, {tuple(self.values.shape)}"
            )
        check_index_range(self.rows, self.n_nodes, "SparseIncidence.rows")
        check_index_range(self.cols, self.n_hyperedges, "SparseIncidence.cols")
