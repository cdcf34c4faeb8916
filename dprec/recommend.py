"""Ask a registered DPRec model for top-k recommendations: the example consumer of the registry (DESIGN §5).

    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db \\
    python -m dprec.recommend --model models:/dprec-default@champion --user U00001 --user U00002 --k 10

Needs only mlflow, numpy, pandas, torch, safetensors and the registry. Prints a table: per
requested user its rows in rank order (``user_id, rank, item_id, score, fallback``); ``fallback``
is true only for an unknown user of a model registered with ``unknown_user="popularity"``; an
unknown user of an ``"error"`` model exits with code 2 and names the user. The same model
served over HTTP (``mlflow models serve``) answers the same (docs/training-and-registry.md);
the contract is :mod:`dprec.tracking.serving`'s, limits included (``max_users_per_request``,
``max_k``, ``max_id_length`` ...).

A mistake is one ``recommend: error: ...`` line and exit code 2, never a traceback: an unknown
model URI, ``--k`` that is not a positive integer or larger than the model allows, an unknown or
malformed user, and a ``models:/`` or ``runs:/`` URI read from a local sqlite store that does
not exist (``MLFLOW_TRACKING_URI`` unset in a folder without ``mlflow.db``): recommend only
reads, so it refuses instead of creating an empty store.
"""

from __future__ import annotations

import argparse

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from dprec.config import ConfigError, run_stage
from dprec.tracking.registry import UNKNOWN_USER_POLICIES, cut, shown
from dprec.tracking.store import require_store, tracking_uri

STORE_SCHEMES = ("models", "runs")  # model URIs resolved through the tracking / registry store


def parse_k(text: str) -> int:
    """``--k`` as a positive integer (the model checks the upper bound)."""
    try:
        k = int(text.strip())
    except ValueError:
        raise ConfigError(f"--k must be a positive integer, got {shown(text)}") from None
    if k < 1:
        raise ConfigError(f"--k must be a positive integer, got {k}")
    return k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.recommend", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/dprec-default@champion")
    parser.add_argument("--user", action="append", required=True, help="original user ID; repeat for several users")
    parser.add_argument("--k", default="10", help="items per user, a positive integer (default 10)")
    parser.add_argument(
        "--unknown-user",
        choices=UNKNOWN_USER_POLICIES,
        help="override the registered policy for users the model has not seen",
    )
    args = parser.parse_args(argv)
    uri = tracking_uri()
    model_config = {"unknown_user": args.unknown_user} if args.unknown_user else None

    def body() -> int:
        k = parse_k(args.k)
        if args.model.partition(":")[0] in STORE_SCHEMES:
            require_store(uri)  # before set_tracking_uri, which would also set MLFLOW_TRACKING_URI
        mlflow.set_tracking_uri(uri)
        try:
            model = mlflow.pyfunc.load_model(args.model, model_config=model_config)
        except MlflowException as exc:
            raise ConfigError(f"--model {shown(args.model, 200)}: cannot load it ({cut(exc.message)})") from exc
        try:
            table = model.predict(pd.DataFrame({"user_id": args.user, "k": k}))
        except MlflowException as exc:
            raise ConfigError(cut(exc.message, 1000)) from exc
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        return 0

    return run_stage("recommend", body)


if __name__ == "__main__":
    raise SystemExit(main())
