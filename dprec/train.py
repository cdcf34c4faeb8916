"""Train one model in one process, tracked in MLflow and registered (DESIGN §4, §5).

    python -m dprec.train --config configs/default/lightgcn.yaml [--set train.epochs=5 model.n_layers=3]

The run config (:class:`dprec.training.config.RunConfig`) names the dataset, features, model and
training settings; ``--set`` overrides its keys. The run folder ``out`` receives config.yaml,
model.pt and metrics.json (:mod:`dprec.training.run`); the MLflow run and the registration of
``dprec-<dataset>`` follow :mod:`dprec.tracking`; the model is registered only after the run
folder is written. Per-epoch lines go to stdout; the last line is one JSON object (run folder,
best epoch, test metrics, registration). A mistake in the config, data or paths is one
``train: error: ...`` line and exit code 2; SIGTERM / SIGINT / SIGHUP end the MLflow run as ``KILLED``
(exit code 128 + signal). Multi-process and
multi-node training: ``deepspeed launchers/train.py`` (same config).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dprec.config import run_stage
from dprec.io import log_to_console
from dprec.tracking.fit import tracked_fit
from dprec.training.cold import make_trainer
from dprec.training.config import load_config
from dprec.training.run import new_run_folder, save_run
from dprec.training.signals import Interrupted, stop_on_signals

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="YAML run config (dataset, out, features, model, train)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. train.epochs=5"
    )
    parser.add_argument("--no-register", action="store_true", help="track the run but do not register the model")
    args = parser.parse_args(argv)
    log_to_console()

    def body() -> int:
        cfg = load_config(args.config, args.set)
        with new_run_folder(cfg.out) as out:  # an unwritable run folder fails now, not after the fit
            trainer = make_trainer(cfg)  # a cold-items split trains on its warm items (dprec.training.cold)
            # the run folder is written before the model is registered: a run without its files never publishes
            result = tracked_fit(
                trainer, register=not args.no_register, save=lambda result: save_run(trainer, result, out)
            )
        summary = {"run": str(out), "best_epoch": result["best_epoch"], "test": result["test"]}
        print(json.dumps({**summary, "valid": result["valid"], "registration": result.get("registration")}))
        return 0

    # SIGTERM / SIGINT / SIGHUP raise, so the MLflow run ends as KILLED instead of staying RUNNING
    with stop_on_signals():
        try:
            return run_stage("train", body)
        except Interrupted as exc:
            print(f"train: {exc}", file=sys.stderr)
            return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
