"""Ask a registered DPRec model for top-k recommendations: the example consumer of the registry (DESIGN §5).

    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db \\
    python -m dprec.recommend --model models:/dprec-default@champion --user U00001 --user U00002 --k 10

Needs only mlflow, numpy, pandas, torch, safetensors and the registry. Prints a table: per
requested user its rows in rank order (``user_id, rank, item_id, score, fallback``); ``fallback``
is true only for an unknown user of a model registered with ``unknown_user="popularity"``; an
unknown user of an ``"error"`` model exits with code 2 and names the user. The same model
served over HTTP (``mlflow models serve``) answers the same (docs/training-and-registry.md);
the contract is :mod:`dprec.tracking.serving`'s.
"""

from __future__ import annotations

import argparse

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from dprec.config import ConfigError, run_stage
from dprec.tracking.registry import UNKNOWN_USER_POLICIES
from dprec.tracking.store import tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.recommend", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/dprec-default@champion")
    parser.add_argument("--user", action="append", required=True, help="original user ID; repeat for several users")
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument(
        "--unknown-user",
        choices=UNKNOWN_USER_POLICIES,
        help="override the registered policy for users the model has not seen",
    )
    args = parser.parse_args(argv)
    mlflow.set_tracking_uri(tracking_uri())
    model_config = {"unknown_user": args.unknown_user} if args.unknown_user else None

    def body() -> int:
        try:
            model = mlflow.pyfunc.load_model(args.model, model_config=model_config)
            table = model.predict(pd.DataFrame({"user_id": args.user, "k": args.k}))
        except MlflowException as exc:
            raise ConfigError(exc.message) from exc
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        return 0

    return run_stage("recommend", body)


if __name__ == "__main__":
    raise SystemExit(main())
