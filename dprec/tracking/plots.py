"""Run and grid artifacts: the training curve, a grid's bar chart, markdown and CSV tables.

Plots use matplotlib's Agg backend (no display). ``training_curve_png`` draws the training
loss and validation Recall@20 per epoch of a fit history and marks the best epoch;
``grid_bar_png`` one bar of a metric per grid row. Tables take columns in first-seen order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def training_curve_png(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss and validation Recall@20 per epoch, best epoch marked (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_r20) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_rows = [row for row in history if "loss" in row]
    ax_loss.plot([r["epoch"] for r in loss_rows], [r["loss"] for r in loss_rows], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    valid_rows = [row for row in history if "valid_recall@20" in row]
    epochs = [r["epoch"] for r in valid_rows]
    values = [r["valid_recall@20"] for r in valid_rows]
    ax_r20.plot(epochs, values, marker=".", color="tab:green")
    if values:
        best = max(range(len(values)), key=values.__getitem__)
        ax_r20.axvline(epochs[best], color="grey", linestyle="--", label=f"best epoch {epochs[best]}")
        ax_r20.legend()
    ax_r20.set(xlabel="epoch", ylabel="Recall@20", title="validation Recall@20")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table of ``rows`` (columns in first-seen order, floats to 4 decimals)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def grid_bar_png(rows: Sequence[Mapping[str, Any]], label: str, metric: str, path: Path) -> Path:
    """One bar per grid row: ``metric`` of each ``label``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(row[label]) for row in rows]
    values = [float(row[metric]) for row in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.6))
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.4f", fontsize=8)
    ax.set(ylabel=metric, title=f"{metric} per {label}")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
