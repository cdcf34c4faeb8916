"""Evaluate a saved run's model on its dataset: full-ranking metrics of one split (DESIGN §4).

    python -m dprec.evaluate --run runs/default/lightgcn [--split test] [--chunk-size 2048]

``--run`` is a run folder written by ``python -m dprec.train`` or ``launchers/train.py``
(:mod:`dprec.training.run`; refused, in one ``evaluate: error: ...`` line and exit code 2, if it
is missing, is not a run folder or its dataset changed since). Prints one JSON object:
Recall@K, NDCG@K and Precision@K for the run's ``train.ks``, as defined in
:mod:`dprec.training.metrics`. A run on a cold-items split (:mod:`dprec.training.cold`) ranks its
held-out items from their content: ``valid`` gives the metrics of its ``cold.target``, ``test``
those and every target's as ``cold_*``, ``all_*`` and ``warm_*`` (docs/cold-start.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from dprec.config import positive_int, run_stage
from dprec.io import log_to_console
from dprec.training.run import load_run

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run folder written by python -m dprec.train")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=2048, help="users scored at once (memory: chunk x items scores)"
    )
    args = parser.parse_args(argv)
    log_to_console()

    def body() -> int:
        metrics = load_run(args.run).evaluate(args.split, chunk_size=args.chunk_size)
        rounded = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        print(json.dumps(rounded))
        return 0

    return run_stage("evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
