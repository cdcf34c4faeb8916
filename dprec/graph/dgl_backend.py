"""DGL implementation of the graph interface (backend "dgl", the default).

Propagation: a one-relation bipartite DGL graph ('src' -> 'dst'); one ``update_all`` with the ``sum`` reducer
(one generalised SpMM: CSC forward, CSR backward, both formats created at build time). Weights given in factored
form, w_ij = dst_scale[j] * weight_ij * src_scale[i], are applied as node scalings around a ``copy_u`` pass;
``u_mul_e`` is used only for a general ``weight``:

    out = dst_scale * update_all(copy_u or u_mul_e('h', 'w'), sum)(src_scale * x)

Hypergraph convolution: a heterograph with node types 'node' (n_nodes) and 'hyperedge' (K) and relations 'joins'
(node -> hyperedge) and 'holds' (hyperedge -> node) over the non-zeros of H, edge weight = H entry, the same edge
order in both. Two update_all passes (u_mul_e, sum) give hyperedge = H^T x and node_out = H hyperedge; gradients
reach x and the H entries (edge data). For a dense H the structure (all n_nodes * K pairs) is cached by shape.
Why copy_u and node scalings: docs/design-notes.md#graphdgl_backend.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dprec.graph.base import EdgeList, PropagationGraph, SparseIncidence
from dprec.graph.dgl_shim import import_dgl

dgl = import_dgl()
fn = dgl.function


def _column(scale: Tensor | None, device: torch.device | str | None = None) -> Tensor | None:
    return None if scale is None else scale.reshape(-1, 1).to(device)


class DGLPropagationGraph(PropagationGraph):
    """out = dst_scale * (sum over in-edges of [w *] src_scale * x), as a DGL message pass."""

    backend = "dgl"

    def __init__(self, graph: dgl.DGLGraph, src_scale: Tensor | None, dst_scale: Tensor | None) -> None:
        super().__init__(n_src=graph.num_src_nodes(), n_dst=graph.num_dst_nodes())
        graph.create_formats_()
        self.graph = graph
        self.src_scale = _column(src_scale)
        self.dst_scale = _column(dst_scale)
        self._message = fn.u_mul_e("h", "w", "m") if "w" in graph.edata else fn.copy_u("h", "m")

    @property
    def num_edges(self) -> int:
        return self.graph.num_edges()

    def to(self, device: torch.device | str) -> DGLPropagationGraph:
        scales = _column(self.src_scale, device), _column(self.dst_scale, device)
        return DGLPropagationGraph(self.graph.to(device), *scales)

    def _propagate(self, x: Tensor) -> Tensor:
        if self.src_scale is not None:
            x = x * self.src_scale
        with self.graph.local_scope():
            self.graph.srcdata["h"] = x
            self.graph.update_all(self._message, fn.sum("m", "h"))
            out = self.graph.dstdata["h"]
        return out if self.dst_scale is None else out * self.dst_scale


def make_graph(edges: EdgeList) -> DGLPropagationGraph:
    """The DGL graph of ``edges``, with the weight factors kept apart (see module docstring)."""
    relation = {("src", "to", "dst"): (edges.src, edges.dst)}
    graph = dgl.heterograph(relation, num_nodes_dict={"src": edges.n_src, "dst": edges.n_dst})
    if edges.weight is not None:
        graph.edata["w"] = edges.weight.unsqueeze(1)
    return DGLPropagationGraph(graph, edges.src_scale, edges.dst_scale)


def _incidence_graph(rows: Tensor, cols: Tensor, n_nodes: int, n_hyperedges: int) -> dgl.DGLGraph:
    relations = {("node", "joins", "hyperedge"): (rows, cols), ("hyperedge", "holds", "node"): (cols, rows)}
    graph = dgl.heterograph(relations, num_nodes_dict={"node": n_nodes, "hyperedge": n_hyperedges})
    graph.create_formats_()
    return graph


@functools.lru_cache(maxsize=8)
def _dense_incidence_graph(n_nodes: int, n_hyperedges: int, device: torch.device) -> dgl.DGLGraph:
    """All (node, hyperedge) pairs, row-major, so edge e carries H.reshape(-1)[e]."""
    rows = torch.arange(n_nodes, device=device).repeat_interleave(n_hyperedges)
    cols = torch.arange(n_hyperedges, device=device).repeat(n_nodes)
    return _incidence_graph(rows, cols, n_nodes, n_hyperedges)


def hypergraph_conv(incidence: Tensor | SparseIncidence, x: Tensor) -> tuple[Tensor, Tensor]:
    """(H H^T x, H^T x) by two message passes over the node-hyperedge graph."""
    if isinstance(incidence, SparseIncidence):
        graph = _incidence_graph(incidence.rows, incidence.cols, incidence.n_nodes, incidence.n_hyperedges)
        weight = incidence.values
    else:
        graph = _dense_incidence_graph(*incidence.shape, incidence.device)
        weight = incidence.reshape(-1)
    with graph.local_scope():
        graph.edges["joins"].data["w"] = weight.unsqueeze(1)
        graph.edges["holds"].data["w"] = weight.unsqueeze(1)
        graph.nodes["node"].data["x"] = x
        graph.update_all(fn.u_mul_e("x", "w", "m"), fn.sum("m", "e"), etype="joins")
        graph.update_all(fn.u_mul_e("e", "w", "m"), fn.sum("m", "out"), etype="holds")
        return graph.nodes["node"].data["out"], graph.nodes["hyperedge"].data["e"]
