"""Experiment grids: models x hyper-parameters x seeds, selected on validation, reported on test.

    python benchmarks/experiments.py --grid benchmarks/grids/ml100k.yaml [--seeds 1 2 3] [--only dprec lightgcn]

A grid file names datasets (a prepared dataset folder and its feature views) and models (a
``model:`` section, optionally with ``search:`` lists of hyper-parameter values; a ``train.<key>`` entry, e.g.
``train.lr``, searches a train setting, a ``cold.<key>`` entry a cold-start setting). A grid's (or a model's)
``cold:`` section is the run config's (``dprec.training.config.ColdStartConfig``): on a cold-items split the
runs train on the warm items and validate on the held-out ones (``dprec.training.cold``). For every
dataset and model (a model may also carry ``modalities_from:``, the feature views it gets, and
``train:``, its overrides of the grid's train section):

1. each point of the search space is trained with the first seed; the point with the best
   validation Recall@20 is kept (the test split is not looked at);
2. the kept point is trained with the other seeds (its first-seed run is the search run); each
   run reads its test split once, at its best validation epoch;
3. the table shows test R@10 / R@20 / N@10 / N@20 as mean ± std over seeds.

Tables are printed as markdown and written beside the grid's output folder (``results.md``,
``results.json``).

Resumable: every finished run writes one small JSON file (config, config hash, seed, valid and test metrics,
best epoch, seconds) under ``--results`` (default ``benchmarks/results/<grid>/``), named
``<dataset>/<model>-<config hash>-s<seed>.json``; a rerun reads a run whose file exists instead of training it,
so a grid finishes over several sessions and its tables are rebuilt from the files. The hash covers what the grid
spells; the file also keeps the model's whole resolved config (``model_resolved``), and a file whose resolved config
differs from what the same spec resolves to now (a model default changed since) is stale: the run is trained again
and the file replaced (files written before this record was kept are read as they are). The per-dataset summary is
``<dataset>.summary.json``: ``{model: {"recall@20": {"mean", "std", "n"}, ..., "features": ...}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dprec.config import from_dict, load_yaml, merge, to_dict
from dprec.data.dataset import load_dataset
from dprec.data.splits import held_out_items
from dprec.features.modalities import load_features
from dprec.models import MODELS
from dprec.models.base import Recommender
from dprec.training.cold import make_trainer
from dprec.training.config import RunConfig

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
TARGET_METRICS = tuple(f"{t}_{m}" for t in ("cold", "all", "warm") for m in ("recall@20", "ndcg@20"))
"""What a cold-items run's test split also reports (dprec.training.cold): kept in the summary beside METRICS."""
MODEL_DEFAULTED = tuple(Recommender.train_defaults)
"""Train settings whose default depends on the model (batch size, feature rank, learning rate)."""


def search_points(search: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = sorted(search)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(search[k] for k in keys))] or [{}]


SECTIONS = ("train.", "cold.")
"""Search keys with these prefixes go to the run config's train and cold sections; the others to the model's."""


def split_point(model: dict, train: dict, point: dict[str, Any], cold: dict | None = None) -> tuple[dict, dict, dict]:
    """The model, train and cold sections of one search point: ``train.<key>`` values (``train.lr``) go to the train
    section, ``cold.<key>`` values to the cold section, the others to the model's."""
    own = {k: v for k, v in point.items() if not k.startswith(SECTIONS)}

    def section(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in point.items() if k.startswith(prefix)}

    return {**model, **own}, {**train, **section("train.")}, {**(cold or {}), **section("cold.")}


def config_hash(config: dict) -> str:
    """12 hex digits of the sha256 of the run's canonical JSON (seed excluded: it is in the file name)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_once(
    dataset: str,
    features: dict[str, np.ndarray],
    model: dict,
    train: dict,
    seed: int,
    ds,
    feature_names: str = "",
    results: Path | None = None,
    cold: dict | None = None,
) -> dict:
    """One training run, or its result file under ``results`` when that exists (None: nothing is cached)."""
    # the train settings a grid leaves open take the model's defaults (RunConfig): the identity records their values,
    # so a later change of a default is a new configuration, not a cached result of the old one
    sections = {
        "dataset": dataset,
        "model": model,
        "train": {**train, "seed": seed},
        **({"cold": cold} if cold else {}),
    }
    cfg = from_dict(RunConfig, sections, "experiment")
    identity = {
        "dataset": dataset,
        "dataset_hash": ds.meta.get("content_hash", ""),
        "features": feature_names,
        "model": model,
        "train": {
            **{key: getattr(cfg.train, key) for key in MODEL_DEFAULTED},
            **{k: v for k, v in train.items() if k != "threads"},
        },
        **({"cold": cold} if cold else {}),  # only where given: the hashes of the runs without it stay
    }
    digest = config_hash(identity)
    resolved = json.loads(json.dumps(to_dict(cfg.model_config()), default=str))
    path = None if results is None else results / f"{model['name']}-{digest}-s{seed}.json"
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("model_resolved", resolved) == resolved:
            return cached
        print(f"{path.name}: the model's defaults changed since this run; training it again", flush=True)
    t0 = time.perf_counter()
    trainer = make_trainer(cfg, ds, features=features)
    result = trainer.fit(log=lambda line: None)
    epochs = [row["train_seconds"] for row in result["history"] if "train_seconds" in row]
    out = {
        "config": identity,
        "config_hash": digest,
        "model_resolved": resolved,
        "seed": seed,
        "valid": result["valid"],
        "test": result["test"],
        "best_epoch": result["best_epoch"],
        "epochs": len(result["history"]),
        "seconds_per_epoch": float(np.mean(epochs)) if epochs else 0.0,
        "seconds": time.perf_counter() - t0,
    }
    if path is not None:
        from dprec.io import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


def run_model(
    name: str,
    spec: dict,
    data: dict,
    train: dict,
    seeds: list[int],
    ds,
    features,
    results: Path | None = None,
    cold: dict | None = None,
    points: list[int] | None = None,
) -> dict | None:
    """Select the search point on validation with the first seed, then train the kept point with every seed.

    ``points`` (1-based, in the order :func:`search_points` lists them): train only these points with the first
    seed and return ``None``: a search spread over processes, whose result files a later full run reads back.

    ``spec`` is the model section plus optional ``search:`` (lists of values), ``modalities_from:`` (feature
    views to give the model) and ``train:`` (this model's overrides of the grid's train section, e.g.
    MGCN's learning-rate decay). The first seed's run of the kept point is the search run itself.
    """
    model = {k: v for k, v in spec.items() if k not in ("search", "train", "cold")}
    train = {**train, **spec.get("train", {})}
    cold = {**(cold or {}), **spec.get("cold", {})}
    views = model.pop("modalities_from", None)
    feats = {k: v for k, v in features.items() if views is None or k in views}
    names = ",".join(f"{k}={data['features'][k]}" for k in sorted(feats))
    trials = []
    for number, point in enumerate(search_points(spec.get("search", {})), 1):
        if points and number not in points:
            continue
        m, t, c = split_point(model, train, point, cold)
        r = train_once(data["dataset"], feats, m, t, seeds[0], ds, names, results, c)
        trials.append((r["valid"]["recall@20"], point, r))
        print(
            f"    {name} {point or '(defaults)'}: valid R@20 {r['valid']['recall@20']:.4f} "
            f"(best epoch {r['best_epoch']}, {r['seconds']:.0f} s)",
            flush=True,
        )
    if points:
        return None
    _, best_point, first = max(trials, key=lambda t: t[0])
    best_model, best_train, best_cold = split_point(model, train, best_point, cold)
    runs = [first] + [
        train_once(data["dataset"], feats, best_model, best_train, s, ds, names, results, best_cold) for s in seeds[1:]
    ]
    reported = METRICS + tuple(m for m in TARGET_METRICS if all(m in r["test"] for r in runs))
    test = {m: [r["test"][m] for r in runs] for m in reported}
    summary = {m: (float(np.mean(v)), float(np.std(v))) for m, v in test.items()}
    shown = {m: v for m, v in summary.items() if m in METRICS}
    print(f"  {name}: " + "  ".join(f"{m} {mu:.4f}±{sd:.4f}" for m, (mu, sd) in shown.items()), flush=True)
    return {
        "model": name,
        "selected": best_point,
        "summary": summary,
        "runs": runs,
        "seconds": float(np.mean([r["seconds"] for r in runs])),
        "seconds_per_epoch": float(np.mean([r.get("seconds_per_epoch", 0.0) for r in runs])),
        "best_epoch": float(np.mean([r["best_epoch"] for r in runs])),
        "features": names,
    }


def summary_json(rows: list[dict]) -> dict:
    """The per-dataset summary: {model: {metric: {"mean", "std", "n"}, "features": ...}}."""
    out = {}
    for row in rows:
        entry = {m: {"mean": mean, "std": std, "n": len(row["runs"])} for m, (mean, std) in row["summary"].items()}
        out[row["model"]] = {
            **entry,
            "features": row["features"],
            "selected": row["selected"],
            "seconds_per_epoch": row["seconds_per_epoch"],
            "best_epoch": row["best_epoch"],
        }
    return out


def table(dataset: str, rows: list[dict]) -> str:
    lines = [
        f"\n**{dataset}** (test, mean ± std over seeds; hyper-parameters selected on validation)\n",
        "| model | R@10 | R@20 | N@10 | N@20 | best epoch | s/epoch | s/run | selected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = " | ".join(f"{mu:.4f} ± {sd:.4f}" for mu, sd in (row["summary"][m] for m in METRICS))
        lines.append(
            f"| {row['model']} | {cells} | {row['best_epoch']:.0f} | {row['seconds_per_epoch']:.1f} | "
            f"{row['seconds']:.0f} | "
            f"{json.dumps(row['selected']) if row['selected'] else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--only", nargs="*", help="model names to run (default: all in the grid)")
    parser.add_argument("--datasets", nargs="*", help="dataset names to run (default: all in the grid)")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the grid to MLflow")
    parser.add_argument(
        "--results", type=Path, help="folder of the per-run result files (default benchmarks/results/<grid name>)"
    )
    parser.add_argument(
        "--points",
        type=int,
        nargs="+",
        help="train only these search points (1-based, in grid order) with the first seed and write their result "
        "files, no selection or summary: a search spread over processes (a later run without it reads them back)",
    )
    args = parser.parse_args(argv)
    grid = load_yaml(args.grid)
    folder = args.results or Path(__file__).resolve().parent / "results" / args.grid.stem
    train = {**grid.get("train", {}), **({"threads": args.threads} if args.threads else {})}
    results: dict[str, list[dict]] = {}
    for dname, data in grid["datasets"].items():
        if args.datasets and dname not in args.datasets:
            continue
        ds = load_dataset(data["dataset"])
        chosen = {m: spec for m, spec in grid["models"].items() if not args.only or m in args.only}
        # ID-only models (LightGCN) run before the features exist; the others need them loaded, and so does every
        # model on a cold-items split (its held-out items are embedded from their content)
        cold_split = held_out_items(ds.meta, ds.n_items) is not None
        wanted = data.get("features") and (
            cold_split or any(MODELS[spec["name"]][0].uses_features for spec in chosen.values())
        )
        features, _ = load_features(data["features"], ds) if wanted else ({}, {})
        print(f"== {dname}: {ds.n_users} users, {ds.n_items} items, views {sorted(features)}", flush=True)
        rows = []
        for mname, spec in chosen.items():
            row = run_model(
                mname,
                merge(spec, data.get("model_overrides", {}).get(mname, {})),
                data,
                train,
                args.seeds,
                ds,
                features,
                folder / dname,
                grid.get("cold"),
                args.points,
            )
            if row is not None:
                rows.append(row)
        if args.points:
            continue
        results[dname] = rows
        from dprec.io import atomic_write_text

        summary_path = folder / f"{dname}.summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary.update(summary_json(rows))  # a run of some models (--only) keeps the others' entries
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_path, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    text = "".join(table(d, rows) for d, rows in results.items())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        args.grid.stem
        + (f"-{'-'.join(args.datasets)}" if args.datasets else "")
        + (f"-{'-'.join(args.only)}" if args.only else "")
    )
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_mlflow:
        log_to_mlflow(stem, results)
    return 0


def log_to_mlflow(stem: str, results: dict[str, list[dict]]) -> None:
    """One MLflow run per grid: the table (markdown, CSV) and a bar chart of test R@20."""
    from dprec.tracking.tracker import RunTracker

    rows = [
        {
            "variant": f"{dataset}/{row['model']}",
            **{f"test_{m}": row["summary"][m][0] for m in METRICS},
            **{f"std_{m}": row["summary"][m][1] for m in METRICS},
        }
        for dataset, grid in results.items()
        for row in grid
    ]
    tracker = RunTracker()
    tracker.start({"grid": stem}, run_name=f"grid-{stem}", experiment="dprec-experiments")
    tracker.log_grid(rows, label="variant", metric="test_recall@20", name=stem)
    tracker.finish([])
    print(f"grid logged to MLflow run {tracker.run_id} ({tracker.uri})")


if __name__ == "__main__":
    raise SystemExit(main())
