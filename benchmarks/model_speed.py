"""Seconds per training epoch and peak memory of DPRec against LightGCN and the relatives.

    python benchmarks/model_speed.py --dataset data/sports-random [--features kw=data_shards/sports/smollm2-kw#text]
                                     [--models lightgcn mgcn lgmrec dprec] [--epochs 2] [--threads 2]
    python benchmarks/model_speed.py --dataset data/baby --shape mmrec-baby     # MMRec's feature shapes

Each model trains ``--epochs`` epochs (no early stopping) in a fresh process, so the peak
resident memory is its own; the table shows model build seconds (kNN graphs included), mean
training seconds per epoch, seconds of one full validation ranking and the peak RSS. Without
``--features`` the modalities are generated (standard normal, ``--modalities`` x ``--dim``; 576 =
SmolLM2's width; ``--shape mmrec-baby``: MMRec's image 4,096-d (VGG) + text 384-d (MiniLM) on Amazon
Baby, ``data/baby`` from ``python -m dprec.prepare mmrec ../shared/data/amazon-baby --out data/baby``):
timings do not depend on the values, only the kNN neighbours do. DPRec runs with every part on
(``dprec.models.every_part``, the expansion perspective's kNN graphs included), as in the tables measured before
those parts went off by default; ``--set model.use_expansion=false`` times the default.
"""

from __future__ import annotations

import argparse
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

SHAPES = {"mmrec-baby": {"image": 4096, "text": 384}}
"""Generated modality widths of a preset: name -> {modality: dim}."""


def run_one(
    dataset: str,
    model: str,
    features: dict[str, str],
    dims: dict[str, int],
    epochs: int,
    threads: int,
    overrides: list[str] = (),
) -> dict:
    from dprec.config import from_dict, merge, parse_overrides
    from dprec.data.dataset import load_dataset
    from dprec.features.modalities import load_features
    from dprec.models import every_part
    from dprec.training.config import RunConfig
    from dprec.training.loop import Trainer

    ds = load_dataset(dataset)
    if features:
        feats, _ = load_features(features, ds)
    else:
        rng = np.random.default_rng(0)
        feats = {name: rng.standard_normal((ds.n_items, dim), dtype=np.float32) for name, dim in dims.items()}
    base = {"dataset": dataset, "model": every_part(model), "train": {"epochs": epochs, "threads": threads, "seed": 1}}
    cfg = from_dict(RunConfig, merge(base, parse_overrides(list(overrides))), "speed")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ds, features=feats)
    build = time.perf_counter() - t0
    train = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)
        train.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    trainer.evaluate("valid")
    evaluate = time.perf_counter() - t0
    return {
        "model": model,
        "build_s": build,
        "epoch_s": float(np.mean(train)),
        "eval_s": evaluate,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in trainer.model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", nargs="*", default=[], metavar="NAME=FOLDER#MODALITY")
    p.add_argument("--models", nargs="+", default=["lightgcn", "freedom", "mgcn", "lgmrec", "dprec"])
    p.add_argument("--modalities", type=int, default=1, help="generated modalities (without --features)")
    p.add_argument("--dim", type=int, default=576, help="generated feature width (without --features)")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), help="generated modalities of a preset (overrides --modalities/--dim)"
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every model, e.g. train.batch_size=4096",
    )
    a = p.parse_args(argv)
    features = dict(f.split("=", 1) for f in a.features)
    dims = SHAPES[a.shape] if a.shape else {f"v{i}": a.dim for i in range(a.modalities)}
    rows = []
    for model in a.models:  # one fresh process per model: its own peak memory
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(run_one, a.dataset, model, features, dims, a.epochs, a.threads, a.set).result())
        print(rows[-1], flush=True)
    generated = " + ".join(f"{name} {dim}-d" for name, dim in dims.items())
    what = ", ".join(features) if features else f"generated {generated}"
    settings = f", {' '.join(a.set)}" if a.set else ""
    print(f"\n{a.dataset}, features: {what}, {a.threads} threads, {a.epochs} epochs{settings}\n")
    print("| model | parameters | build s | train s/epoch | eval s | peak MiB | epoch time / LightGCN |")
    print("|---|---|---|---|---|---|---|")
    base = next((r["epoch_s"] for r in rows if r["model"] == "lightgcn"), None)
    for r in rows:
        ratio = f"{r['epoch_s'] / base:.1f}" if base else ""
        print(
            f"| {r['model']} | {r['params']:,} | {r['build_s']:.1f} | {r['epoch_s']:.1f} | {r['eval_s']:.2f} | "
            f"{r['peak_mib']:.0f} | {ratio} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
