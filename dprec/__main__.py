"""``dprec <stage> ...`` runs ``python -m dprec.<stage> ...``: the same ``main(argv) -> int``, the same exit code."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": "raw tables / MMRec folders / Amazon reviews -> canonical dataset folder",
    "extract": "item text and image embeddings on Ray -> WebDataset shards",
    "train": "train one model on one process, tracked in MLflow and registered",
    "evaluate": "full-ranking metrics of a saved run on its validation or test split",
    "register": "log a model bundle into the MLflow registry, settle @champion",
    "recommend": "top-k items for users from a registered model",
    "demo": "every stage end to end on the embedded default dataset",
}


def usage() -> str:
    lines = ["usage: dprec <stage> [options]   (each also runs as python -m dprec.<stage>)", "", "stages:"]
    lines += [f"  {name:<10} {text}" for name, text in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in STAGES:
        print(usage(), file=sys.stderr)
        return 2
    return importlib.import_module(f"dprec.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
