"""Export a trained model, log it as an MLflow pyfunc without pickles, register it, move ``@champion``.

The logged model is "models from code": ``dprec/tracking/serving.py`` (the pyfunc) + a bundle
of tensors, arrays and JSON (:func:`export_bundle`) + the model config ``unknown_user`` /
``default_k``. Registered name: ``dprec-<dataset>``; each version carries its metrics as tags
(``valid_recall_at_20``, ``test_*``, ``dataset_hash`` ...), set at creation. Champion rule:
``@champion`` is the eligible version (tag ``champion_eligible`` not ``false``) with the highest
``valid_recall_at_20``, ties to the earlier version; a new version that does not take it gets
``@challenger``. A version that serves a run's weights with a grown catalogue (``add-items``) supersedes
the versions of the same weights (:func:`supersede`), so the champion moves to it exactly when it was on them. Every registration recomputes the champion from all versions' tags, sets the
aliases, re-reads and repeats until stable, so concurrent registrations settle on the best
version; a local sqlite store also takes a file lock. CLI: ``python -m dprec.register``.

A bundle is checked before anything is logged (:func:`check_bundle`), reading it without
unpickling anything (safetensors, ``.npz`` / ``.npy`` with ``allow_pickle=False``, JSON): a
folder that is not a bundle, a missing file, malformed JSON, wrong shapes or dtypes, NaN or
infinite embeddings, IDs that do not match the embeddings, or CSR arrays out of range raise
:class:`BundleError` naming the file and the fault. The model config also carries the serving
limits (:data:`SERVING_LIMITS`, as ``serving.DEFAULT_LIMITS``), ``max_id_length`` raised to
the bundle's longest ID.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import tempfile
import zipfile
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
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema
from safetensors.torch import save_file

from dprec.config import ConfigError, DPRecError
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
WEIGHTS_TAG = "weights_run_id"
"""Tag of a version that serves another run's weights with a grown catalogue (``add-items``): that run's id."""
SUPERSEDED_TAG = "superseded_by"
CHAMPION, CHALLENGER = "champion", "challenger"
UNKNOWN_USER_POLICIES = ("error", "popularity")  # as in serving.py, which must not import dprec
SERVING_LIMITS = {  # as serving.DEFAULT_LIMITS (tests/reliability/test_serving_input.py checks they agree)
    "max_users_per_request": 10_000,
    "max_k": 1_000,
    "max_results_per_request": 100_000,
    "max_id_length": 256,
}
DEFAULT_K = 10
MAX_SETTLE_ROUNDS = 50
SHOWN_CHARS = 32
_FORBIDDEN_ID_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # as serving.py: refused in requests


class BundleError(DPRecError):
    """A folder given as a model bundle that is not one, or one whose files are malformed or disagree."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` as an error message may repeat it: its repr, cut to ``limit`` characters plus its length."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than str() converts
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def cut(message: str, limit: int = 300) -> str:
    """A message (e.g. MLflow's, which may repeat what the user gave) on one line, cut to ``limit`` characters."""
    message = " ".join(str(message).split())
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} characters)"


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"{path}: not valid JSON ({cut(str(exc), 200)})") from None


def _read_embeddings(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing = {"user", "item"} - names
            if missing:
                raise BundleError(f"{path}: lacks tensor(s) {sorted(missing)}; has {sorted(names)[:10]}")
            tensors = {name: f.get_tensor(name) for name in ("user", "item")}
    except BundleError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a file that is not one
        raise BundleError(f"{path}: not a safetensors file ({cut(str(exc), 200)})") from None
    for name, t in tensors.items():
        if t.ndim != 2 or not t.is_floating_point() or t.shape[1] < 1:
            raise BundleError(
                f"{path}: tensor {name!r} must be a 2-D float matrix (rows x dim), got {t.dtype} {list(t.shape)}"
            )
        if not torch.isfinite(t).all():
            raise BundleError(f"{path}: tensor {name!r} holds NaN or infinite values")
    if tensors["user"].shape[1] != tensors["item"].shape[1]:
        raise BundleError(
            f"{path}: user and item embeddings differ in dimension "
            f"({tensors['user'].shape[1]} vs {tensors['item'].shape[1]})"
        )
    return tensors


def _read_npy(path: Path, npz: bool) -> Any:
    """An .npy array or an .npz archive, never unpickling (object arrays are refused)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: not a numpy {'.npz' if npz else '.npy'} file without pickles ({exc})") from None
    kind = np.lib.npyio.NpzFile if npz else np.ndarray
    if not isinstance(loaded, kind):
        if hasattr(loaded, "close"):
            loaded.close()
        raise BundleError(f"{path}: expected a numpy {'.npz archive' if npz else '.npy array'}")
    return loaded


def _int_vector(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise BundleError(f"{path}: {name} must be a 1-D integer array, got {array.dtype} {list(array.shape)}")
    return array.astype(np.int64)


def _id_list(path: Path, ids: Any, key: str, n_expected: int, what: str) -> list[str]:
    values = ids.get(key) if isinstance(ids, dict) else None
    if not isinstance(values, list):
        raise BundleError(f"{path}: needs a list {key!r} (a JSON object with user_ids and item_ids)")
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise BundleError(f"{path}: {key}[{bad}] must be a non-empty string, got {shown(values[bad])}")
    if len(values) != n_expected:
        raise BundleError(f"{path}: {len(values)} {key} but {n_expected} {what} embeddings")
    if len(set(values)) != len(values):
        seen: set[str] = set()
        dup = next(v for v in values if v in seen or seen.add(v))
        raise BundleError(f"{path}: {key} repeats {shown(dup)}")
    forbidden = next((v for v in values if _FORBIDDEN_ID_CHARS.search(v)), None)
    if forbidden is not None:
        raise BundleError(f"{path}: {key} entry {shown(forbidden)} holds a control character or lone surrogate")
    return values


def _finite_metrics(path: Path, config: dict, key: str) -> None:
    metrics = config.get(key)
    if not isinstance(metrics, dict):
        raise BundleError(f"{path}: needs a mapping {key!r} of metrics")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise BundleError(f"{path}: {key}.{shown(name)} must be a finite number, got {shown(value)}")


def check_bundle(folder: str | Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``(config, ids)`` of a bundle folder after checking every file (see the module docstring).

    Reads without unpickling: safetensors, numpy with ``allow_pickle=False``, JSON. Raises
    :class:`BundleError` naming the file and the fault.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a folder (a model bundle is a folder written by export_bundle)")
    paths = {key: folder / name for key, name in BUNDLE_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if len(missing) == len(paths):
        raise BundleError(f"{folder}: not a model bundle (none of {sorted(BUNDLE_FILES.values())}; see export_bundle)")
    if missing:
        raise BundleError(f"{folder}: incomplete model bundle, missing {missing}")

    config = _read_json(paths["config"])
    dataset = config.get("dataset") if isinstance(config, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(dataset, dict) or not isinstance(model, dict):
        raise BundleError(f"{paths['config']}: needs mappings 'dataset' and 'model' (written by export_bundle)")
    for key in ("name", "content_hash"):
        if not isinstance(dataset.get(key), str) or not dataset[key]:
            raise BundleError(f"{paths['config']}: dataset.{key} must be a non-empty string")
    if len(dataset["name"]) > 200:
        raise BundleError(f"{paths['config']}: dataset.name {shown(dataset['name'])} is longer than 200 characters")
    if not isinstance(model.get("name"), str) or not model["name"]:
        raise BundleError(f"{paths['config']}: model.name must be a non-empty string")
    best_epoch = config.get("best_epoch")
    if isinstance(best_epoch, bool) or not isinstance(best_epoch, int):
        raise BundleError(f"{paths['config']}: best_epoch must be an integer, got {shown(best_epoch)}")
    for key in ("valid", "test"):
        _finite_metrics(paths["config"], config, key)

    tensors = _read_embeddings(paths["embeddings"])
    n_users, n_items = tensors["user"].shape[0], tensors["item"].shape[0]
    if n_users < 1 or n_items < 1:
        raise BundleError(f"{paths['embeddings']}: no users or no items ({n_users} x {n_items})")
    for key, n in (("n_users", n_users), ("n_items", n_items)):
        if dataset.get(key) != n:
            raise BundleError(f"{paths['config']}: dataset.{key} is {shown(dataset.get(key))}, the embeddings {n}")

    ids = _read_json(paths["ids"])
    user_ids = _id_list(paths["ids"], ids, "user_ids", n_users, "user")
    item_ids = _id_list(paths["ids"], ids, "item_ids", n_items, "item")

    with _read_npy(paths["train_items"], npz=True) as train:
        try:
            indptr = _int_vector(paths["train_items"], "indptr", train["indptr"])
            indices = _int_vector(paths["train_items"], "indices", train["indices"])
        except KeyError as exc:
            raise BundleError(f"{paths['train_items']}: lacks array {exc}; has {sorted(train.files)[:10]}") from None
        except (ValueError, OSError, zipfile.BadZipFile) as exc:  # e.g. an object array, which needs pickle
            raise BundleError(f"{paths['train_items']}: unreadable array ({exc})") from None
    if len(indptr) != n_users + 1 or indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise BundleError(
            f"{paths['train_items']}: indptr must rise from 0 to len(indices)={len(indices)} "
            f"over n_users + 1 = {n_users + 1} entries (has {len(indptr)})"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise BundleError(f"{paths['train_items']}: indices must lie in [0, {n_items}) (the items)")

    popularity = _read_npy(paths["popularity"], npz=False)
    if (
        popularity.ndim != 1
        or len(popularity) != n_items
        or not (np.issubdtype(popularity.dtype, np.integer) or np.issubdtype(popularity.dtype, np.floating))
    ):
        raise BundleError(
            f"{paths['popularity']}: must be {n_items} numbers (one per item), got {popularity.dtype} "
            f"{list(popularity.shape)}"
        )
    if not np.isfinite(popularity).all() or (popularity < 0).any():
        raise BundleError(f"{paths['popularity']}: counts must be finite and non-negative")
    return config, {"user_ids": user_ids, "item_ids": item_ids}


def serving_config(unknown_user: str, ids: Mapping[str, list[str]]) -> dict[str, Any]:
    """The model config of a registered version: unknown-user policy, default k and the serving limits."""
    longest = max(len(i) for i in ids["user_ids"])
    limits = dict(SERVING_LIMITS, max_id_length=max(SERVING_LIMITS["max_id_length"], longest))
    return {"unknown_user": unknown_user, "default_k": DEFAULT_K, **limits}


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
    """Outputs only: the request (``user_id``, optional ``k``) is converted and checked by serving.py itself.

    No input schema on purpose: a request MLflow's schema enforcement refuses (a missing column, an
    ID pandas cannot store) gets an error message that repeats the whole request, megabytes for a
    hostile one; serving.py answers every malformed request with a short 400 of its own.
    """
    columns = {"user_id": "string", "rank": "long", "item_id": "string", "score": "double", "fallback": "boolean"}
    return ModelSignature(inputs=None, outputs=Schema([ColSpec(kind, name) for name, kind in columns.items()]))


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
    if run_id:
        try:
            MlflowClient().get_run(run_id)
        except MlflowException as exc:
            raise ConfigError(
                f"run {shown(run_id)}: not found in {mlflow.get_tracking_uri()} ({cut(exc.message)})"
            ) from None
    experiment_id = None if run_id else ensure_experiment(experiment, MlflowClient(), mlflow.get_tracking_uri())
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else "register") as run:
        yield run.info.run_id


def registry_lock(uri: str) -> AbstractContextManager:
    """A file lock beside a local sqlite store (several processes on one machine); nothing for a server."""
    db = sqlite_path(uri)
    return FileLock(f"{db}.registry.lock", timeout=300) if db else nullcontext()


def log_and_register(
    bundle: str | Path,
    run_id: str | None = None,
    unknown_user: str = "error",
    uri: str | None = None,
    weights_of: str | None = None,
) -> Registration:
    """Log ``bundle`` as a pyfunc into ``run_id`` (a new run if None), register it and settle the aliases.

    ``weights_of``: the training run whose weights the bundle serves with a grown catalogue (``add-items``): the
    new version is tagged ``weights_run_id`` and supersedes the eligible versions of those weights
    (:func:`supersede`) before the aliases settle."""
    if unknown_user not in UNKNOWN_USER_POLICIES:
        raise ConfigError(f"unknown_user must be one of {UNKNOWN_USER_POLICIES}, got {shown(unknown_user)}")
    bundle = Path(bundle)
    config, ids = check_bundle(bundle)
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = registered_name(config["dataset"]["name"])
    first_user = ids["user_ids"][0]
    with in_run(run_id, experiment=name) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={key: str(bundle / file) for key, file in BUNDLE_FILES.items()},
            model_config=serving_config(unknown_user, ids),
            signature=serving_signature(),
            input_example=pd.DataFrame({"user_id": [first_user], "k": [min(5, config["dataset"]["n_items"])]}),
            pip_requirements=serving_requirements(),
        )
        tags = version_tags(config, run)
    if weights_of:
        tags |= {WEIGHTS_TAG: weights_of, "catalogue_items": str(config["dataset"]["n_items"])}
    client = MlflowClient(uri)
    with registry_lock(uri):
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
        if weights_of:
            supersede(client, name, weights_of, str(version))
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


def supersede(client: MlflowClient, name: str, weights_run_id: str, new_version: str) -> list[str]:
    """Retire the eligible versions that serve the weights of ``weights_run_id`` (registered by that run, or by an
    earlier ``add-items``) in favour of ``new_version``, the same weights with a larger catalogue: each is tagged
    ``champion_eligible=false`` and ``superseded_by=<new_version>``. So ``@champion`` moves to the new version
    exactly when it was on those weights; a rollback tags the new version ineligible and the old one eligible.
    Returns the retired versions."""
    retired = []
    for version in client.search_model_versions(f"name='{name}'"):
        tags = version.tags or {}
        same = weights_run_id in (tags.get("run_id"), tags.get(WEIGHTS_TAG))
        if str(version.version) != new_version and same and selection_score(version) is not None:
            client.set_model_version_tag(name, version.version, ELIGIBLE_TAG, "false")
            client.set_model_version_tag(name, version.version, SUPERSEDED_TAG, new_version)
            retired.append(str(version.version))
    return retired


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
