"""Build time and peak memory of the item-item kNN graph (``dprec.graph.knn``) at Amazon Electronics scale.

    python benchmarks/knn_graph.py                                  # 63,000 items x 768-d, k = 10, CPU
    python benchmarks/knn_graph.py --block-sizes 1024 --device cuda # on a GPU

Each block size runs in a fresh process (so peak memory is its own): it generates seeded Gaussian
features (float32), then times ``build_item_knn_graph`` (block-wise similarities, top-k, symmetric
normalisation, graph construction). "peak extra" is the process's peak resident memory during the
build minus its resident memory just before (the features themselves are not counted); on a GPU,
the peak allocated device memory is given too. The dense n x n float32 similarity matrix that MMRec's
models hold is given for comparison; it is not built.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import numpy as np
import torch

from dprec.graph.knn import build_item_knn_graph

MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=63_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--backend", default="torch", choices=["dgl", "torch"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args: argparse.Namespace, block_size: int) -> dict[str, float]:
    """One build in this process: seconds, peak extra host memory, peak device memory and edge count."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    features = np.random.default_rng(args.seed).standard_normal((args.items, args.dim), dtype=np.float32)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = resident_bytes()
    start = time.perf_counter()
    graph = build_item_knn_graph(
        features, k=args.k, block_size=block_size, backend=args.backend, device=args.device, cache=False
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_extra_mib": (peak_resident_bytes() - before) / MiB,
        "device_peak_mib": torch.cuda.max_memory_allocated() / MiB if cuda else float("nan"),
        "edges": graph.num_edges,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    features_mib = args.items * args.dim * 4 / MiB
    print(
        f"kNN graph: {args.items:,} items x {args.dim}-d float32 features ({features_mib:,.0f} MiB), k = {args.k}, "
        f"backend {args.backend}, device {args.device}, torch threads {args.threads or torch.get_num_threads()}"
    )
    print(f"dense {args.items:,} x {args.items:,} float32 similarity (not built): {args.items**2 * 4 / MiB:,.0f} MiB\n")
    print(f"{'block':>6} {'block MiB':>9} {'build s':>8} {'peak extra MiB':>15} {'device peak MiB':>16} {'edges':>9}")
    context = multiprocessing.get_context("spawn")
    for block_size in args.block_sizes:
        with context.Pool(1) as pool:
            row = pool.apply(measure, (args, block_size))
        block_mib = min(block_size, args.items) * args.items * 4 / MiB
        device_peak = "-" if np.isnan(row["device_peak_mib"]) else f"{row['device_peak_mib']:,.0f}"
        print(
            f"{block_size:>6} {block_mib:>9,.0f} {row['seconds']:>8.1f} {row['peak_extra_mib']:>15,.0f} "
            f"{device_peak:>16} {row['edges']:>9,}",
            flush=True,
        )


if __name__ == "__main__":
    main()
