"""The cold-start tables from the cold-start grid's committed summaries (``benchmarks/results/cold-start/``).

    python benchmarks/cold_table.py [benchmarks/results/cold-start] [--reference dprec] [--baseline content_knn]

One markdown table per dataset, test split, mean ± std over seeds (settings selected on the cold validation items):
the held-out items ranked among themselves (cold R@20 / N@20), every item ranked for every target (all R@20), the
warm items (warm R@20 / N@20); then whether the reference's mean cold R@20 beats the baseline's by more than the
larger of the two standard deviations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (
    ("cold R@20", "cold_recall@20"),
    ("cold N@20", "cold_ndcg@20"),
    ("all R@20", "all_recall@20"),
    ("warm R@20", "warm_recall@20"),
    ("warm N@20", "warm_ndcg@20"),
)
ORDER = ("popularity", "content_knn", "lightgcn", "freedom", "mgcn", "lgmrec", "dprec")


def margin_line(summary: dict, reference: str, baseline: str, metric: str = "cold_recall@20") -> str:
    """Does the reference beat the baseline on ``metric`` by more than the larger seed std of the two?"""
    if reference not in summary or baseline not in summary:
        return ""
    ref, base = summary[reference][metric], summary[baseline][metric]
    margin, spread = ref["mean"] - base["mean"], max(ref["std"], base["std"])
    head = "beats" if margin > spread else "does not beat"
    return (
        f"{reference} {head} {baseline} on test {metric} by more than the larger seed std: "
        f"{margin:+.4f} (std {spread:.4f})"
    )


def table(dataset: str, summary: dict, reference: str, baseline: str) -> str:
    names = sorted(summary, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    lines = [
        f"\n**{dataset}** ({summary[names[0]]['features']})\n",
        "| model | " + " | ".join(label for label, _ in COLUMNS) + " | seeds | best epoch | selected |",
        "|---|" + "---|" * (len(COLUMNS) + 3),
    ]
    for name in names:
        entry = summary[name]
        cells = " | ".join(
            f"{entry[key]['mean']:.4f} ± {entry[key]['std']:.4f}" if key in entry else "" for _, key in COLUMNS
        )
        selected = ", ".join(f"{k}={v}" for k, v in sorted(entry.get("selected", {}).items()))
        epoch = entry.get("best_epoch")
        lines.append(
            f"| {name} | {cells} | {entry['recall@20']['n']} | {'' if epoch is None else f'{epoch:.0f}'} | {selected} |"
        )
    line = margin_line(summary, reference, baseline)
    return "\n".join(lines) + (f"\n\n{line}\n" if line else "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path(__file__).resolve().parent / "results/cold-start")
    parser.add_argument("--reference", default="dprec", help="the model whose margin is checked")
    parser.add_argument("--baseline", default="content_knn", help="the model it is checked against")
    args = parser.parse_args(argv)
    files = sorted(args.folder.glob("*.summary.json"))
    if not files:
        raise SystemExit(f"no *.summary.json under {args.folder}")
    for path in files:
        name = path.name.removesuffix(".summary.json")
        print(table(name, json.loads(path.read_text()), args.reference, args.baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
