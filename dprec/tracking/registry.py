"""Export a trained model, log it as an MLflow pyfunc without pickles, register it, move ``@champion``.

The logged model is "models from code": ``dprec/tracking/serving.py`` (the pyfunc) + a bundle
of tensors, arrays and JSON (:func:`export_bundle`) + the model config ``unknown_user`` /
``default_k``. Registered name: ``dprec-<dataset>``; each version carries its metrics as tags
(``valid_recall_at_20``, ``test_*``, ``dataset_hash`` ...), set at creation. Champion rule:
``@champion`` is the eligible version (tag ``champion_eligible`` not ``false``) with the highest
``valid_recall_at_20``, ties to the earlier version; a new version that does not take it gets
``@challenger``. Every registration recomputes the champion from all versions' tags, sets the
aliases, re-reads and repeats until stable, so concurrent registrations settle on the best
version; a local sqlite store also takes a file lock. CLI: ``python -m dprec.register``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import safetensors
import torch
from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema
from safetensors.torch import save_file

from dprec.io import safe_name
from dprec.tracking.store import ensure_experiment, metric_name, sqlite_path, tracking_uri

if TYPE_CHECKING:
    from dprec.training.loop import TrainedModel

SERVING_CODE = Path(__file__).with_name("serving.py")
BUNDLE_FILES = {
    "embeddings": "embeddings.safetensors",
    "train_items": "train_items.npz",
    "ids": "ids.json",
    "popularity": "popularity.npy",
    "config": "config.json",
}
SELECTION_TAG = "valid_recall_at_20"
ELIGIBLE_TAG = "champion_eligible"
CHAMPION, CHALLENGER = "champion", "challenger"
UNKNOWN_USER_POLICIES = ("error", "popularity")  # as in serving.py, which must not import dprec
MAX_SETTLE_ROUNDS = 50


@dataclass(frozen=True)
class Registration:
    """Where a registration landed: ``alias`` is what the new version holds after settling."""

    name: str
    version: str
    alias: str
    champion: str
    model_uri: str


def registered_name(dataset: str) -> str:
    return "dprec-" + safe_name(dataset)


def export_bundle(trained: TrainedModel, result: Mapping[str, Any], folder: str | Path) -> Path:
    """Write the serving bundle of ``trained`` (``Trainer.trained_model()`` after ``fit``): tensors, arrays, JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"user": trained.user_embeddings, "item": trained.item_embeddings}
    save_file(tensors, folder / BUNDLE_FILES["embeddings"])
    sets = trained.train_sets
    np.savez(
        folder / BUNDLE_FILES["train_items"], indptr=sets.indptr.astype(np.int64), indices=sets.indices.astype(np.int64)
    )
    np.save(folder / BUNDLE_FILES["popularity"], np.bincount(sets.indices, minlength=sets.n_items).astype(np.int64))
    ids = {"user_ids": list(trained.user_ids), "item_ids": list(trained.item_ids)}
    (folder / BUNDLE_FILES["ids"]).write_text(json.dumps(ids), encoding="utf-8")
    config = {
        "format_version": 1,
        "model": dict(trained.model_section),
        "dataset": {
            "name": trained.dataset_name,
            "content_hash": trained.dataset_hash,
            "n_users": len(trained.user_ids),
            "n_items": len(trained.item_ids),
        },
        "embedding_dim": int(tensors["item"].shape[1]),
        "best_epoch": int(result["best_epoch"]),
        "valid": dict(result["valid"]),
        "test": dict(result["test"]),
    }
    (folder / BUNDLE_FILES["config"]).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def version_tags(config: Mapping[str, Any], run_id: str) -> dict[str, str]:
    """The tags a new version is created with: selection metric, test metrics, provenance."""
    tags = {metric_name(f"valid_{k}"): repr(float(v)) for k, v in config["valid"].items()}
    tags |= {metric_name(f"test_{k}"): repr(float(v)) for k, v in config["test"].items()}
    tags |= {
        "dataset_hash": config["dataset"]["content_hash"],
        "model": config["model"]["name"],
        "best_epoch": str(config["best_epoch"]),
        "run_id": run_id,
    }
    return tags


def serving_signature() -> ModelSignature:
    """Input ``user_id`` (+ optional ``k``) left untyped so that serving.py converts and validates them itself."""
    inputs = Schema([ColSpec(AnyType(), "user_id"), ColSpec(AnyType(), "k", required=False)])
    columns = {"user_id": "string", "rank": "long", "item_id": "string", "score": "double", "fallback": "boolean"}
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(kind, name) for name, kind in columns.items()]))


def serving_requirements() -> list[str]:
    """What the pyfunc imports, pinned to this environment (no Ray, DeepSpeed, DGL or dprec)."""
    versions = {
        "mlflow": mlflow.__version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "safetensors": safetensors.__version__,
    }
    return [f"{name}=={version}" for name, version in versions.items()]


@contextmanager
def in_run(run_id: str | None, experiment: str) -> Iterator[str]:
    """The run to log into: the active one if it is ``run_id``, else ``run_id`` reopened, else a new run."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield run_id
        return
    experiment_id = None if run_id else ensure_experiment(experiment, MlflowClient(), mlflow.get_tracking_uri())
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else "register") as run:
        yield run.info.run_id


def registry_lock(uri: str) -> AbstractContextManager:
    """A file lock beside a local sqlite store (several processes on one machine); nothing for a server."""
    db = sqlite_path(uri)
    return FileLock(f"{db}.registry.lock", timeout=300) if db else nullcontext()


def log_and_register(
    bundle: str | Path, run_id: str | None = None, unknown_user: str = "error", uri: str | None = None
) -> Registration:
    """Log ``bundle`` as a pyfunc into ``run_id`` (a new run if None), register it and settle the aliases."""
    if unknown_user not in UNKNOWN_USER_POLICIES:
        raise ValueError(f"unknown_user must be one of {UNKNOWN_USER_POLICIES}, got {unknown_user!r}")
    bundle = Path(bundle)
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    config = json.loads((bundle / BUNDLE_FILES["config"]).read_text(encoding="utf-8"))
    name = registered_name(config["dataset"]["name"])
    first_user = json.loads((bundle / BUNDLE_FILES["ids"]).read_text(encoding="utf-8"))["user_ids"][0]
    with in_run(run_id, experiment=name) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={key: str(bundle / file) for key, file in BUNDLE_FILES.items()},
            model_config={"unknown_user": unknown_user, "default_k": 10},
            signature=serving_signature(),
            input_example=pd.DataFrame({"user_id": [first_user], "k": [min(5, config["dataset"]["n_items"])]}),
            pip_requirements=serving_requirements(),
        )
        tags = version_tags(config, run)
    client = MlflowClient(uri)
    with registry_lock(uri):
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
        champion = settle_aliases(client, name, new_version=str(version))
    alias = CHAMPION if champion == str(version) else CHALLENGER
    return Registration(name, str(version), alias, champion, f"models:/{name}/{version}")


def register_model(
    trained: TrainedModel,
    result: Mapping[str, Any],
    run_id: str | None = None,
    unknown_user: str = "error",
    uri: str | None = None,
) -> Registration:
    """Export ``trained`` to a temporary bundle, log it into ``run_id`` and register it."""
    with tempfile.TemporaryDirectory(prefix="dprec-bundle-") as tmp:
        bundle = export_bundle(trained, result, tmp)
        return log_and_register(bundle, run_id=run_id, unknown_user=unknown_user, uri=uri)


def selection_score(version: ModelVersion) -> float | None:
    """Validation Recall@20 of an eligible version, None for one that cannot be champion."""
    tags = version.tags or {}
    if tags.get(ELIGIBLE_TAG, "true").lower() == "false" or SELECTION_TAG not in tags:
        return None
    return float(tags[SELECTION_TAG])


def best_version(versions: list[ModelVersion]) -> str | None:
    """The champion by the rule: highest validation Recall@20, ties to the lowest version number."""
    scored = [(score, -int(v.version)) for v in versions if (score := selection_score(v)) is not None]
    return str(-max(scored)[1]) if scored else None


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version (as a string) of a registered model."""
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def settle_champion(client: MlflowClient, name: str) -> str | None:
    """Point ``@champion`` at :func:`best_version`; re-read and repeat until a read finds it in place."""
    for _ in range(MAX_SETTLE_ROUNDS):
        champion = best_version(client.search_model_versions(f"name='{name}'"))
        if champion is None or aliases_of(client, name).get(CHAMPION) == champion:
            return champion
        client.set_registered_model_alias(name, CHAMPION, champion)
    raise RuntimeError(f"{name}: @champion did not settle in {MAX_SETTLE_ROUNDS} rounds (registrations keep racing)")


def settle_aliases(client: MlflowClient, name: str, new_version: str | None = None) -> str | None:
    """Settle ``@champion``; ``new_version``, if it is not the champion, gets ``@challenger`` (last registration
    wins it). A ``@challenger`` left on the champion (after a rollback) is removed. Returns the champion."""
    champion = settle_champion(client, name)
    if new_version is not None and new_version != champion:
        client.set_registered_model_alias(name, CHALLENGER, new_version)
    elif champion is not None and aliases_of(client, name).get(CHALLENGER) == champion:
        client.delete_registered_model_alias(name, CHALLENGER)
    return champion
