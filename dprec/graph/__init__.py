"""Graph operations of DPRec: user-item, weighted (item-item) and hypergraph propagation.

Two backends give the same numbers: "dgl" (default) and "torch" (torch.sparse). See
``dprec.graph.api`` for the equations and ``benchmarks/graph_backends.py`` for their speed.
"""

from dprec.graph.api import (
    BACKENDS,
    DEFAULT_BACKEND,
    available_backends,
    build_user_item_graph,
    build_weighted_graph,
    hypergraph_conv,
    lightgcn_propagate,
    resolve_backend,
)
from dprec.graph.base import PropagationGraph, SparseIncidence
from dprec.graph.dgl_shim import DGLUnavailableError

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DGLUnavailableError",
    "PropagationGraph",
    "SparseIncidence",
    "available_backends",
    "build_user_item_graph",
    "build_weighted_graph",
    "hypergraph_conv",
    "lightgcn_propagate",
    "resolve_backend",
]
