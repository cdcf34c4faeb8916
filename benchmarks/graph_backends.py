"""Speed of the graph backends ("dgl" vs "torch") on a random graph of Amazon Sports size.

    python benchmarks/graph_backends.py                # 35,598 users, 18,357 items, 218,409 pairs, d = 64
    python benchmarks/graph_backends.py --threads 1 --repeats 50 --hyperedges 16

Times one forward + backward call (propagate(x), then the gradient of a random linear loss), the
median of --repeats calls after one warm-up, with the backends interleaved so that load from
other processes hits both alike. Rows: user-item propagation (Â x, factored weights: DGL's
copy_u path), an item-item graph with general per-edge weights (k random neighbours per item:
DGL's u_mul_e path) and hypergraph convolution (H H^T x, H^T x) with a dense soft incidence
over all users and items. Fixed seed.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from dprec.graph import (
    BACKENDS,
    PropagationGraph,
    available_backends,
    build_user_item_graph,
    build_weighted_graph,
    hypergraph_conv,
)
from dprec.graph.dgl_shim import import_dgl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=35_598)
    parser.add_argument("--items", type=int, default=18_357)
    parser.add_argument("--interactions", type=int, default=218_409)
    parser.add_argument("--dim", type=int, default=64, help="embedding size d")
    parser.add_argument("--knn", type=int, default=10, help="neighbours per item in the item-item row")
    parser.add_argument("--hyperedges", type=int, default=64, help="K of the hypergraph row")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch and DGL (OpenMP) threads; default: theirs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def forward_backward(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], *inputs: torch.Tensor):
    """A closure running fn on leaf copies of inputs and back-propagating a fixed random linear loss."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    weights = [torch.randn_like(out) for out in outputs]

    def step() -> None:
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum((out * w).sum() for out, w in zip(outs, weights, strict=True))
        torch.autograd.grad(loss, leaves)

    return step


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def built(build: Callable[[str], PropagationGraph], backends: list[str]) -> dict[str, tuple[PropagationGraph, float]]:
    """Each backend's graph and the seconds its build took (after a warm-up build: lazy library set-up)."""
    graphs = {}
    for backend in backends:
        build(backend)
        start = time.perf_counter()
        graph = build(backend)
        graphs[backend] = graph, time.perf_counter() - start
    return graphs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backends = [b for b in BACKENDS if b in available_backends()]
    if args.threads:
        torch.set_num_threads(args.threads)
        if "dgl" in backends:
            import_dgl().utils.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    users = rng.integers(0, args.users, args.interactions)
    items = rng.integers(0, args.items, args.interactions)
    knn_src = rng.integers(0, args.items, args.items * args.knn)  # k random neighbours per item, random weights
    knn_dst = np.repeat(np.arange(args.items), args.knn)
    knn_weight = rng.random(args.items * args.knn) / args.knn
    n_nodes = args.users + args.items
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n_nodes, args.dim, generator=gen) * 0.1
    incidence = torch.softmax(torch.randn(n_nodes, args.hyperedges, generator=gen), dim=1)

    user_item = built(lambda b: build_user_item_graph(args.users, args.items, users, items, backend=b), backends)
    knn = built(lambda b: build_weighted_graph(args.items, args.items, knn_src, knn_dst, knn_weight, b), backends)
    rows = [
        (f"user-item Â ({user_item['torch'][0].num_edges:,} edges)", user_item, x),
        (f"item kNN, weights ({knn['torch'][0].num_edges:,})", knn, x[: args.items]),
    ]
    steps = [
        (name, {b: (forward_backward(g.propagate, feats), s) for b, (g, s) in graphs.items()})
        for name, graphs, feats in rows
    ]
    conv = {b: (forward_backward(functools.partial(hypergraph_conv, backend=b), incidence, x), None) for b in backends}
    steps.append((f"hypergraph conv K={args.hyperedges}", conv))

    dgl_threads = import_dgl().utils.get_num_threads() if "dgl" in backends else "-"
    print(
        f"users {args.users:,}  items {args.items:,}  pairs {args.interactions:,}  d {args.dim}  repeats {args.repeats}"
    )
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}  dgl OMP threads {dgl_threads}")
    print(f"{'operation':<36}{'backend':<9}{'build s':>9}{'fwd+bwd s/call':>16}{'vs torch':>10}")
    for name, per_backend in steps:
        medians = interleaved_medians({b: step for b, (step, _) in per_backend.items()}, args.repeats)
        for backend, seconds in medians.items():
            build_s = per_backend[backend][1]
            build = "-" if build_s is None else f"{build_s:.3f}"
            print(f"{name:<36}{backend:<9}{build:>9}{seconds:>16.4f}{seconds / medians['torch']:>9.2f}x")


if __name__ == "__main__":
    main()
