"""Where MLflow runs go and the names MLflow accepts.

The store is ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (an absolute
path, so a later ``cd`` does not move it). With a local sqlite store the artifacts of
experiment ``E`` go to ``<folder of mlflow.db>/mlruns/<safe E>``; against a tracking server
(``cluster/start_mlflow_server.sh``) the server decides. Metric names are made MLflow-legal:
``valid_recall@20`` -> ``valid_recall_at_20``.

MLflow creates a sqlite file that does not exist on first use. Commands that only read the store
(``recommend``, ``register settle``) call :func:`require_store` first, so that running one from the
wrong folder is an error naming the path and ``MLFLOW_TRACKING_URI`` instead of a new, empty
``mlflow.db``; commands that write (registering, training) create it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dprec.config import DPRecError
from dprec.io import safe_name

DEFAULT_DB = "mlflow.db"
_ILLEGAL_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an absolute sqlite URI for ``mlflow.db`` in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB}"


class StoreNotFoundError(DPRecError):
    """A command that only reads the tracking store was pointed at a local sqlite file that does not exist."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (query string dropped), None for any other store."""
    return Path(uri[len("sqlite:///") :].split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def require_store(uri: str) -> None:
    """Refuse to read a local sqlite store that does not exist (MLflow would create an empty one there)."""
    db = sqlite_path(uri)
    if db is None or db.is_file():
        return
    if os.environ.get("MLFLOW_TRACKING_URI"):
        why = f"MLFLOW_TRACKING_URI={uri} names it"
    else:
        why = f"MLFLOW_TRACKING_URI is not set, so the store is {DEFAULT_DB} in the working folder {Path.cwd()}"
    raise StoreNotFoundError(
        f"no MLflow tracking store at {db} ({why}); run from the folder that holds {DEFAULT_DB} or set "
        f"MLFLOW_TRACKING_URI=sqlite:///<absolute path of {DEFAULT_DB}> (or a tracking server's http:// URI). "
        "Nothing was created"
    )


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
