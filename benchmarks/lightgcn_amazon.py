"""LightGCN and popularity on the real Amazon Baby and Sports sets (splits as given).

    python benchmarks/lightgcn_amazon.py [--datasets baby sports] [--workdir runs/bench]

Prints test R@10 / R@20 / N@10 / N@20 at the best validation epoch beside the published
LightGCN numbers (MMRec protocol, BENCHMARKS.md) and their ratio, seconds per training epoch,
seconds per full validation ranking, peak resident memory of the process, and the ratio of
DGL to torch.sparse epoch time (same model, same data, ``--ratio-epochs`` epochs each).
Every configuration runs in a fresh process, so the peak memory is its own.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

PUBLISHED = {  # LightGCN, BENCHMARKS.md: R@10, R@20, N@10, N@20
    "baby": (0.0479, 0.0754, 0.0257, 0.0328),
    "sports": (0.0569, 0.0864, 0.0311, 0.0387),
}
SHARED = Path(os.environ.get("DPREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def prepare(name: str, workdir: Path) -> Path:
    from dprec.prepare import main as prepare_main

    out = workdir / "data" / name
    if not (out / "dataset.json").is_file():
        prepare_main(["mmrec", str(SHARED / f"amazon-{name}"), "--out", str(out)])
    return out


def run_job(dataset_dir: str, model: dict, backend: str, epochs: int, patience: int, seed: int) -> dict:
    """One configuration in this (fresh) process; returns metrics, timings and peak memory."""
    from dprec.training.config import RunConfig, TrainConfig
    from dprec.training.loop import Trainer

    cfg = RunConfig(
        dataset=dataset_dir,
        model=model,
        train=TrainConfig(epochs=epochs, patience=patience, seed=seed, graph_backend=backend),
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - t0
    result = trainer.fit(
        log=lambda line: print(f"  [{Path(dataset_dir).name} {model['name']} {backend}] {line}", flush=True)
    )
    hist = result["history"]
    return {
        "test": result["test"],
        "best_epoch": result["best_epoch"],
        "epochs": len(hist),
        "epoch_s": float(np.mean([h["train_seconds"] for h in hist])),
        "eval_s": float(np.mean([h["eval_seconds"] for h in hist if "eval_seconds" in h])),
        "setup_s": setup,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_job, *args).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["baby", "sports"], choices=sorted(PUBLISHED))
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--backend", default="dgl", choices=("dgl", "torch"), help="backend of the full LightGCN run")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--ratio-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"real datasets not found at {SHARED}; set DPREC_SHARED_DATA", file=sys.stderr)
        return 2

    rows = []
    for name in args.datasets:
        data = str(prepare(name, args.workdir))
        lgcn = {"name": "lightgcn", "n_layers": args.layers}
        pop = in_fresh_process(data, {"name": "popularity"}, args.backend, 1, 1, args.seed)
        full = in_fresh_process(data, lgcn, args.backend, args.max_epochs, args.patience, args.seed)
        timing = {
            b: in_fresh_process(data, lgcn, b, args.ratio_epochs, args.ratio_epochs, args.seed)
            for b in ("dgl", "torch")
        }
        ratio = timing["dgl"]["epoch_s"] / timing["torch"]["epoch_s"]
        rows.append((name, "popularity", pop, None))
        rows.append((name, f"LightGCN ({args.layers} layers, {args.backend})", full, ratio))

    print(
        "\n| dataset | model | R@10 | R@20 | N@10 | N@20 | published R@20 | R@20 ratio | best epoch | s/epoch | "
        "eval s | peak MB | DGL/torch.sparse epoch time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label, r, ratio in rows:
        t = r["test"]
        pub = PUBLISHED[name][1]
        print(
            f"| {name} | {label} | {t['recall@10']:.4f} | {t['recall@20']:.4f} | {t['ndcg@10']:.4f} | "
            f"{t['ndcg@20']:.4f} | {pub:.4f} | {t['recall@20'] / pub:.3f} | {r['best_epoch']} | "
            f"{r['epoch_s']:.2f} | {r['eval_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
