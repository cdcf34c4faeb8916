"""torch.sparse implementation of the graph interface (backend "torch"), needing nothing beyond torch.

Propagation: M (n_dst x n_src, M[j, i] = w_ij, factored weights multiplied out) and its transpose
are stored once as CSR matrices; forward is M @ x and backward M^T @ grad, both ``torch.sparse.mm``.
Keeping M^T ready makes the backward cheap: autograd through ``torch.sparse.mm`` would transpose
(re-sort) M on every call.

Hypergraph convolution: hyperedge = H^T x, node_out = H hyperedge, as dense products for a dense H
and as COO ``torch.sparse.mm`` for a ``SparseIncidence``; autograd gives gradients for H and x.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from dprec.graph.base import EdgeList, PropagationGraph, SparseIncidence


class _SpMM(torch.autograd.Function):
    """y = M @ x with dL/dx = M^T @ dL/dy, both from precomputed sparse matrices."""

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, matrix_t: Tensor) -> Tensor:
        ctx.matrix_t = matrix_t
        return torch.sparse.mm(matrix, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return torch.sparse.mm(ctx.matrix_t, grad), None, None


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=True).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return coo.to_sparse_csr()


class TorchSparseGraph(PropagationGraph):
    """out = M @ x with M held as CSR (see module docstring)."""

    backend = "torch"

    def __init__(self, matrix: Tensor, matrix_t: Tensor) -> None:
        super().__init__(n_src=matrix.shape[1], n_dst=matrix.shape[0])
        self.matrix = matrix
        self.matrix_t = matrix_t

    @property
    def num_edges(self) -> int:
        return int(self.matrix._nnz())

    def to(self, device: torch.device | str) -> TorchSparseGraph:
        return TorchSparseGraph(self.matrix.to(device), self.matrix_t.to(device))

    def _propagate(self, x: Tensor) -> Tensor:
        return _SpMM.apply(x, self.matrix, self.matrix_t)


def make_graph(edges: EdgeList) -> TorchSparseGraph:
    """M and M^T as CSR, with the weight factors multiplied into one value per edge."""
    weight = edges.edge_weights()
    matrix = _csr(edges.dst, edges.src, weight, (edges.n_dst, edges.n_src))
    return TorchSparseGraph(matrix, _csr(edges.src, edges.dst, weight, (edges.n_src, edges.n_dst)))


def hypergraph_conv(incidence: Tensor | SparseIncidence, x: Tensor) -> tuple[Tensor, Tensor]:
    """(H H^T x, H^T x) for a dense H or a SparseIncidence."""
    if isinstance(incidence, SparseIncidence):
        indices = torch.stack([incidence.rows, incidence.cols])
        shape = (incidence.n_nodes, incidence.n_hyperedges)
        h = torch.sparse_coo_tensor(indices, incidence.values, shape, check_invariants=False)  # ranges checked
        hyperedge = torch.sparse.mm(h.t(), x)
        return torch.sparse.mm(h, hyperedge), hyperedge
    hyperedge = incidence.T @ x
    return incidence @ hyperedge, hyperedge
