"""The whole pipeline on the embedded default dataset, end to end, on one machine.

    python -m dprec.demo [--workdir demo_output] [--epochs 200]

Steps: prepare (generate the seeded default catalogue with text and images, write the
canonical dataset folder) -> train popularity and LightGCN with early stopping on
validation Recall@20 -> evaluate the test split once -> print the table and the time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dprec.data.dataset import save_dataset
from dprec.data.synthetic import generate
from dprec.evaluate import format_metrics
from dprec.train import RunConfig, TrainConfig, Trainer, save_run


def train_one(model: dict, dataset_dir: Path, out: Path, epochs: int, seed: int) -> dict:
    cfg = RunConfig(
        dataset=str(dataset_dir),
        out=str(out),
        model=model,
        train=TrainConfig(epochs=epochs, patience=10, seed=seed, eval_every=1),
    )
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    result = trainer.fit(log=lambda line: print(f"  [{model['name']}] {line}", flush=True))
    result["seconds"] = time.perf_counter() - t0
    save_run(trainer, result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo_output"))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    print("== prepare: embedded default dataset", flush=True)
    ds = generate()
    dataset_dir = save_dataset(ds, args.workdir / "data" / "default")
    print(f"   {ds.n_users} users, {ds.n_items} items, {len(ds.interactions)} interactions, "
          f"split {ds.meta['n_per_split']} -> {dataset_dir}", flush=True)

    rows = {}
    for model in ({"name": "popularity"}, {"name": "lightgcn", "n_layers": 2}):
        print(f"== train + evaluate: {model['name']}", flush=True)
        rows[model["name"]] = train_one(model, dataset_dir, args.workdir / "runs" / model["name"], args.epochs, args.seed)

    print("\n| model | best epoch | test R@10 | R@20 | N@10 | N@20 | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = r["test"]
        print(f"| {name} | {r['best_epoch']} | {t['recall@10']:.4f} | {t['recall@20']:.4f} | "
              f"{t['ndcg@10']:.4f} | {t['ndcg@20']:.4f} | {r['seconds']:.1f} |")
    total = time.perf_counter() - start
    print(f"\ndemo finished in {total:.1f} s; runs in {args.workdir / 'runs'}")
    print(json.dumps({"demo_seconds": round(total, 1), **{n: format_metrics(r["test"]) for n, r in rows.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
