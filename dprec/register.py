"""Register a model bundle in the MLflow registry, or re-settle a registered model's aliases (DESIGN §5).

    python -m dprec.register register --bundle <bundle folder> [--run-id RUN] [--unknown-user popularity]
    python -m dprec.register settle --name dprec-default
    python -m dprec.register add-items --run runs/default/dprec --dataset data/default-v2

``register`` logs a folder written by :func:`dprec.tracking.registry.export_bundle` as a pyfunc
(into ``--run-id``, else a new run) and registers it as ``dprec-<dataset>``; ``settle``
recomputes ``@champion`` / ``@challenger`` from the versions' tags, e.g. after tagging a
version ``champion_eligible=false`` (a rollback). ``add-items`` serves a trained run's weights
with a grown catalogue, no training: ``--dataset`` is the run's dataset with items appended
(``python -m dprec.prepare add-items``) whose features were extracted into the run's feature
folders (only the new items' shards are written); the new items are embedded from their content
(``dprec.training.cold.grown_catalogue``, the run's ``cold`` settings) and the new version
supersedes the versions of the same weights (``registry.supersede``), so ``@champion`` moves to
it exactly when it was on them (docs/cold-start.md). The store is ``$MLFLOW_TRACKING_URI``, else
``sqlite:///$PWD/mlflow.db``. Prints one JSON object.

The user's own mistakes are one ``register: error: ...`` line and exit code 2, never a traceback:
a folder that is not a bundle or a bundle that fails :func:`~dprec.tracking.registry.check_bundle`
(nothing is logged then), an unknown ``--run-id``, ``settle`` of a model that is not registered,
and ``settle`` against a local sqlite store that does not exist (it only reads, so it does not
create one; ``register`` writes and may).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dprec.config import ConfigError, run_stage
from dprec.io import log_to_console
from dprec.tracking.registry import (
    UNKNOWN_USER_POLICIES,
    cut,
    export_bundle,
    log_and_register,
    registry_lock,
    settle_aliases,
    shown,
)
from dprec.tracking.store import require_store, tracking_uri

logger = logging.getLogger(__name__)


def add_items(run: Path, dataset: Path, unknown_user: str, uri: str) -> int:
    """Register the weights of ``run`` with the grown catalogue ``dataset`` (see the module docstring)."""
    from dprec.data.dataset import load_dataset
    from dprec.training.cold import grown_catalogue
    from dprec.training.run import load_run, run_result

    trainer = load_run(run)
    result = run_result(run)
    grown = load_dataset(dataset)
    trained = grown_catalogue(trainer, grown)
    weights_of = result.get("tracking_run_id") or f"run-folder:{run.resolve()}"
    with tempfile.TemporaryDirectory(prefix="dprec-bundle-") as tmp:
        bundle = export_bundle(trained, result, tmp)
        try:
            registration = log_and_register(bundle, unknown_user=unknown_user, uri=uri, weights_of=weights_of)
        except MlflowException as exc:
            raise ConfigError(f"MLflow ({uri}): {cut(exc.message)}") from exc
    added = grown.n_items - getattr(trainer, "full", trainer.ds).n_items
    print(json.dumps({**registration.__dict__, "items": grown.n_items, "added": added}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.register", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="log a bundle folder as a pyfunc and register it")
    reg.add_argument("--bundle", required=True, type=Path, help="folder written by export_bundle")
    reg.add_argument("--run-id", help="MLflow run to log the model into (default: a new run)")
    reg.add_argument(
        "--unknown-user",
        choices=UNKNOWN_USER_POLICIES,
        default="error",
        help="answer for users the model has not seen: an HTTP 400 error or the popularity list",
    )
    grow = sub.add_parser("add-items", help="register a run's weights again with the new items of a grown catalogue")
    grow.add_argument("--run", required=True, type=Path, help="run folder written by python -m dprec.train")
    grow.add_argument(
        "--dataset", required=True, type=Path, help="the run's dataset with items added (prepare add-items)"
    )
    grow.add_argument("--unknown-user", choices=UNKNOWN_USER_POLICIES, default="error", help="as for register")
    settle = sub.add_parser("settle", help="recompute @champion / @challenger of a registered model")
    settle.add_argument("--name", required=True, help="registered model name, e.g. dprec-default")
    args = parser.parse_args(argv)
    log_to_console()
    uri = tracking_uri()

    def body() -> int:
        if args.command == "register":
            if not args.bundle.is_dir():
                raise ConfigError(f"--bundle {args.bundle}: not a model bundle folder (written by export_bundle)")
            try:
                result = log_and_register(args.bundle, run_id=args.run_id, unknown_user=args.unknown_user, uri=uri)
            except MlflowException as exc:
                raise ConfigError(f"MLflow ({uri}): {cut(exc.message)}") from exc
            print(json.dumps(result.__dict__))
            return 0
        if args.command == "add-items":
            return add_items(args.run, args.dataset, args.unknown_user, uri)
        require_store(uri)
        client = MlflowClient(uri)
        try:
            client.get_registered_model(args.name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ConfigError(f"MLflow ({uri}): {cut(exc.message)}") from None
            known = [m.name for m in client.search_registered_models(max_results=10)]
            raise ConfigError(
                f"--name {shown(args.name)}: no such registered model in {uri} ({cut(exc.message, 100)}); "
                f"registered: {known or 'none'}"
            ) from None
        try:
            with registry_lock(uri):
                champion = settle_aliases(client, args.name)
        except MlflowException as exc:
            raise ConfigError(cut(exc.message)) from exc
        print(json.dumps({"name": args.name, "champion": champion}))
        return 0

    return run_stage("register", body)


if __name__ == "__main__":
    raise SystemExit(main())
