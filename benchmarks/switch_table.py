"""Validation and test Recall@20 of each variant of a grid, from its per-run result files.

    python benchmarks/switch_table.py benchmarks/results/speed-switches

One row per (dataset, configuration): the train settings that differ from the grid's, mean ± std of
validation R@20 (what a default is chosen on) and of test R@20 over the seeds, seconds per epoch.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def rows(folder: Path) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*/*-s*.json")):
        run = json.loads(path.read_text())
        groups[(path.parent.name, run["config_hash"])].append(run)
    out = []
    for (dataset, _), runs in sorted(groups.items()):
        cfg = runs[0]["config"]
        train = {k: cfg["train"][k] for k in ("batch_size", "feature_rank", "lr") if k in cfg["train"]}
        model = {k: v for k, v in cfg["model"].items() if k != "name"}
        out.append(
            {
                "dataset": dataset,
                "model": cfg["model"]["name"],
                "settings": {**train, **model},
                "n": len(runs),
                **{
                    f"{split}_r20": (
                        float(np.mean([r[split]["recall@20"] for r in runs])),
                        float(np.std([r[split]["recall@20"] for r in runs])),
                    )
                    for split in ("valid", "test")
                },
                "s_epoch": float(np.mean([r.get("seconds_per_epoch", 0.0) for r in runs])),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    print("| dataset | model | settings | seeds | valid R@20 | test R@20 | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows(folder):
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        valid, test = r["valid_r20"], r["test_r20"]
        print(
            f"| {r['dataset']} | {r['model']} | {settings} | {r['n']} | {valid[0]:.4f} ± {valid[1]:.4f} | "
            f"{test[0]:.4f} ± {test[1]:.4f} | {r['s_epoch']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
