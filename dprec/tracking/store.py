"""Where MLflow runs go and the names MLflow accepts.

The store is ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (an absolute
path, so a later ``cd`` does not move it). With a local sqlite store the artifacts of
experiment ``E`` go to ``<folder of mlflow.db>/mlruns/<safe E>``; against a tracking server
(``cluster/start_mlflow_server.sh``) the server decides. Metric names are made MLflow-legal:
``valid_recall@20`` -> ``valid_recall_at_20``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dprec.io import safe_name

DEFAULT_DB = "mlflow.db"
_ILLEGAL_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an absolute sqlite URI for ``mlflow.db`` in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def metric_name(key: str) -> str:
    """An MLflow-legal metric name: ``valid_recall@20`` -> ``valid_recall_at_20``."""
    return _ILLEGAL_NAME_CHARS.sub("_", key.replace("@", "_at_"))


def ensure_experiment(name: str, client: MlflowClient, uri: str) -> str:
    """Id of experiment ``name``, created if missing (artifacts beside a local sqlite store)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlruns" / safe_name(name)).as_uri() if db else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it between our two calls
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
