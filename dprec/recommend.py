"""Ask a registered DPRec model for top-k recommendations: the example consumer of the registry.

In process (needs only mlflow, numpy, pandas, torch, safetensors and the model's registry)::

    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db \\
    python -m dprec.recommend --model models:/dprec-default@champion --user U00001 --user U00002 --k 10

Over HTTP, after serving the same model on loopback::

    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db \\
    mlflow models serve -m models:/dprec-default@champion --env-manager local -h 127.0.0.1 -p 5001

    curl -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"user_id": "U00001", "k": 5}]}'
    # 200 {"predictions": [{"user_id": "U00001", "rank": 1, "item_id": "...", "score": 4.2, "fallback": false}, ...]}
    # 400 {"error_code": "INVALID_PARAMETER_VALUE", "message": "... unknown user_id 'U99999': ..."}

Rows come back per requested user in rank order; ``fallback`` is true only for an unknown
user of a model registered with ``unknown_user="popularity"`` (see ``dprec/serving.py``).
"""

from __future__ import annotations

import argparse
import sys

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from dprec.registry import UNKNOWN_USER_POLICIES
from dprec.tracking import tracking_uri


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
    try:
        model = mlflow.pyfunc.load_model(args.model, model_config=model_config)
        table = model.predict(pd.DataFrame({"user_id": args.user, "k": args.k}))
    except MlflowException as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
