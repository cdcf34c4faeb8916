"""The registered DPRec model: an MLflow pyfunc answering top-k requests in original IDs (DESIGN §5).

Logged as the model's code ("models from code", by ``dprec.tracking.registry``), so it imports
only mlflow, numpy, pandas, torch and safetensors, nothing of dprec, and nothing is pickled.
Artifacts (``registry.export_bundle``): ``embeddings`` (safetensors ``user``, ``item``; score(u, i)
= <user[u], item[i]>), ``train_items`` (npz CSR ``indptr``, ``indices``), ``ids`` (JSON original
IDs in index order), ``popularity`` (npy training counts per item), ``config`` (JSON, informational).

Request: rows with ``user_id`` (string; integers are converted) and optional integer ``k``
(default 10, at most the number of items). Response: ``user_id, rank (1-based), item_id, score,
fallback`` per recommended item, request rows in order, never an item the user trained on.
Unknown users: model config ``unknown_user: "error"`` (default) answers HTTP 400 naming them;
``"popularity"`` gives the k most-trained items, score = count, ``fallback`` = True. Chosen at
registration or at load: ``mlflow.pyfunc.load_model(uri, model_config={"unknown_user": "popularity"})``.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from safetensors.torch import load_file

OUTPUT_COLUMNS = ("user_id", "rank", "item_id", "score", "fallback")
UNKNOWN_USER_POLICIES = ("error", "popularity")
DEFAULT_K = 10
SCORE_CHUNK = 1024  # users scored at once: at most SCORE_CHUNK x n_items floats in memory


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def parse_user_id(value: Any, row: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():  # an integer column that pandas made float
        return str(int(value))
    raise bad_request(f"row {row}: user_id must be a string or an integer, got {value!r}")


def parse_k(value: Any, row: int, default: int, n_items: int) -> int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise bad_request(f"row {row}: k must be a positive integer, got {value!r}")
    k = int(value)
    if not 1 <= k <= n_items:
        raise bad_request(f"row {row}: k must be between 1 and the number of items ({n_items}), got {k}")
    return k


def parse_request(model_input: Any, default_k: int, n_items: int) -> tuple[list[str], list[int]]:
    """(user ids, k per row) of a request; a malformed one raises a 400-style error naming the fault."""
    if not isinstance(model_input, pd.DataFrame):
        try:
            model_input = pd.DataFrame(model_input)
        except (TypeError, ValueError) as exc:
            raise bad_request(f"request must be a table with a user_id column ({exc})") from exc
    if "user_id" not in model_input.columns:
        raise bad_request(f"request needs a 'user_id' column; got columns {list(map(str, model_input.columns))}")
    users = [parse_user_id(v, row) for row, v in enumerate(model_input["user_id"].tolist())]
    raw_k = model_input["k"].tolist() if "k" in model_input.columns else [None] * len(users)
    ks = [parse_k(v, row, default_k, n_items) for row, v in enumerate(raw_k)]
    return users, ks


class DPRecRecommender(PythonModel):
    """Top-k recommendation by dot product of exported embeddings, training items masked."""

    def load_context(self, context: PythonModelContext) -> None:
        paths = context.artifacts
        tensors = load_file(paths["embeddings"])
        self.user_emb, self.item_emb = tensors["user"].float(), tensors["item"].float()
        with np.load(paths["train_items"], allow_pickle=False) as train:
            self.indptr, self.indices = train["indptr"].astype(np.int64), train["indices"].astype(np.int64)
        with open(paths["ids"], encoding="utf-8") as f:
            ids = json.load(f)
        self.user_index = {user: i for i, user in enumerate(ids["user_ids"])}
        self.item_ids = np.asarray(ids["item_ids"], dtype=object)
        self.popularity = torch.from_numpy(np.load(paths["popularity"], allow_pickle=False).astype(np.float32))
        with open(paths["config"], encoding="utf-8") as f:
            self.dataset = json.load(f)["dataset"]["name"]
        config = context.model_config or {}
        self.unknown_user = config.get("unknown_user", "error")
        self.default_k = min(int(config.get("default_k", DEFAULT_K)), len(self.item_ids))
        if self.unknown_user not in UNKNOWN_USER_POLICIES:
            raise MlflowException(
                f"model config unknown_user must be one of {UNKNOWN_USER_POLICIES}, got {self.unknown_user!r}"
            )
        shapes = (len(self.user_index), len(self.indptr) - 1, self.user_emb.shape[0])
        item_shapes = (self.item_emb.shape[0], len(self.item_ids), len(self.popularity))
        if len(set(shapes)) != 1 or len(set(item_shapes)) != 1:
            raise MlflowException(f"model artifacts disagree on sizes: users {shapes}, items {item_shapes}")

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        users, ks = parse_request(model_input, self.default_k, len(self.item_ids))
        index = [self.user_index.get(user) for user in users]
        unknown = sorted({user for user, i in zip(users, index, strict=True) if i is None})
        if unknown and self.unknown_user == "error":
            shown = ", ".join(repr(u) for u in unknown[:10]) + (
                f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            )
            raise bad_request(
                f"unknown user_id {shown}: the model knows the {len(self.user_index)} users of its training data "
                f"(dataset {self.dataset!r}); register it with unknown_user='popularity' for a popularity fallback"
            )
        return self.recommend(users, index, ks)

    def recommend(self, users: list[str], index: list[int | None], ks: list[int]) -> pd.DataFrame:
        """Output rows for request rows; ``index[j]`` None means the popularity fallback."""
        known = [j for j, i in enumerate(index) if i is not None]
        items: list[np.ndarray] = [np.empty(0, np.int64)] * len(users)
        scores: list[np.ndarray] = [np.empty(0, np.float32)] * len(users)
        for start in range(0, len(known), SCORE_CHUNK):
            rows = known[start : start + SCORE_CHUNK]
            top_scores, top_items = self.top_items(np.array([index[j] for j in rows]), max(ks[j] for j in rows))
            for r, j in enumerate(rows):
                keep = np.isfinite(top_scores[r, : ks[j]])
                items[j], scores[j] = top_items[r, : ks[j]][keep], top_scores[r, : ks[j]][keep]
        fallback = [j for j, i in enumerate(index) if i is None]
        if fallback:
            pop_scores, pop_items = torch.topk(self.popularity, max(ks[j] for j in fallback))
            for j in fallback:
                items[j], scores[j] = pop_items[: ks[j]].numpy(), pop_scores[: ks[j]].numpy()
        counts = [len(x) for x in items]
        flat_items = np.concatenate(items) if users else np.empty(0, np.int64)
        return pd.DataFrame(
            {
                "user_id": np.repeat(np.asarray(users, dtype=object), counts),
                "rank": np.concatenate([np.arange(1, n + 1) for n in counts]) if users else np.empty(0, np.int64),
                "item_id": self.item_ids[flat_items],
                "score": (np.concatenate(scores) if users else np.empty(0)).astype(np.float64),
                "fallback": np.repeat([i is None for i in index], counts).astype(bool),
            },
            columns=list(OUTPUT_COLUMNS),
        )

    def top_items(self, user_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, items) of the k best items per user, training items at -inf (so ranked last)."""
        with torch.inference_mode():
            scores = self.user_emb[torch.from_numpy(user_idx)] @ self.item_emb.T
            starts, ends = self.indptr[user_idx], self.indptr[user_idx + 1]
            lengths = ends - starts
            rows = np.repeat(np.arange(len(user_idx)), lengths)
            cols = self.indices[np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])]
            scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
            top = torch.topk(scores, k, dim=1)
        return top.values.numpy(), top.indices.numpy()


mlflow.models.set_model(DPRecRecommender())
