"""The accuracy tables from a grid's committed per-dataset summaries (``benchmarks/results/<grid>/*.summary.json``).

    python benchmarks/accuracy_table.py [benchmarks/results/accuracy] [--reference dprec]

One markdown table per dataset: test R@10 / R@20 / N@10 / N@20 (mean ± std over seeds, the hyper-parameters
selected on validation), seeds, mean best epoch, s/epoch, the selected search point; under each table, whether the
reference model's mean test R@20 beats every other model's by more than the larger of the two standard deviations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
ORDER = ("lightgcn", "freedom", "mgcn", "lgmrec", "dprec")


def verdict(summary: dict, reference: str, metric: str = "recall@20") -> str:
    """One line: the reference's margin over each other model, against the larger seed std of the pair."""
    if reference not in summary or len(summary) < 2:
        return ""
    ref = summary[reference][metric]
    parts, wins = [], True
    for name, entry in summary.items():
        if name == reference:
            continue
        other = entry[metric]
        margin, spread = ref["mean"] - other["mean"], max(ref["std"], other["std"])
        wins &= margin > spread
        parts.append(f"{name} {margin:+.4f} (std {spread:.4f})")
    head = "beats every model" if wins else "does not beat every model"
    return f"{reference} {head} by more than the larger seed std on test {metric}: " + ", ".join(parts)


def table(dataset: str, summary: dict, reference: str) -> str:
    names = sorted(summary, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    lines = [
        f"\n**{dataset}** ({summary[names[0]]['features']})\n",
        "| model | R@10 | R@20 | N@10 | N@20 | seeds | best epoch | s/epoch | selected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        entry = summary[name]
        cells = " | ".join(f"{entry[m]['mean']:.4f} ± {entry[m]['std']:.4f}" for m in METRICS)
        selected = ", ".join(f"{k}={v}" for k, v in sorted(entry.get("selected", {}).items()))
        epoch = entry.get("best_epoch")
        speed = entry.get("seconds_per_epoch")
        lines.append(
            f"| {name} | {cells} | {entry['recall@20']['n']} | {'' if epoch is None else f'{epoch:.0f}'} | "
            f"{'' if speed is None else f'{speed:.1f}'} | {selected} |"
        )
    line = verdict(summary, reference)
    return "\n".join(lines) + (f"\n\n{line}\n" if line else "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path(__file__).resolve().parent / "results/accuracy")
    parser.add_argument("--reference", default="dprec", help="the model whose margin is checked")
    args = parser.parse_args(argv)
    files = sorted(args.folder.glob("*.summary.json"))
    if not files:
        raise SystemExit(f"no *.summary.json under {args.folder}")
    for path in files:
        print(table(path.name.removesuffix(".summary.json"), json.loads(path.read_text()), args.reference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
