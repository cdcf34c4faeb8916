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

Limits (model config, defaults in :data:`DEFAULT_LIMITS`; overridable at load like ``unknown_user``):
``max_users_per_request`` 10,000 request rows; ``max_k`` 1,000 (and never more than the number of
items); ``max_results_per_request`` 100,000 (the sum of k over the rows); ``max_id_length`` 256
characters (registration raises it to the longest ID the model knows). A request over a limit,
a ``user_id`` with a control character (NUL, newline, ...) or a lone surrogate, or any other
malformed request is an HTTP 400 (``INVALID_PARAMETER_VALUE``) naming the row and the limit. An
error message shows at most a short prefix of a value the client sent, with its length.
"""

from __future__ import annotations

import json
import math
import numbers
import re
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
DEFAULT_LIMITS = {  # model config keys; registry.SERVING_LIMITS writes the same (it may not import this file)
    "max_users_per_request": 10_000,
    "max_k": 1_000,
    "max_results_per_request": 100_000,
    "max_id_length": 256,
}
SHOWN_CHARS = 32  # how much of a client's value an error message repeats
_FORBIDDEN_ID_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # control characters, lone surrogates


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``value`` as an error message may repeat it: its repr, cut to ``limit`` characters plus its length."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than str() converts
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_user_id(value: Any, row: int, max_length: int = DEFAULT_LIMITS["max_id_length"]) -> str:
    """A request's user ID as the string the model knows; too long, control characters or another type: 400."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, numbers.Integral | float) and not isinstance(value, bool):
        if isinstance(value, float) and not value.is_integer():  # integer columns that pandas made float pass
            raise bad_request(f"row {row}: user_id must be a string or an integer, got {shown(value)}")
        try:
            text = str(int(value))
        except ValueError:  # more digits than Python converts (4,300)
            raise bad_request(f"row {row}: user_id is longer than max_id_length={max_length} characters") from None
    else:
        raise bad_request(f"row {row}: user_id must be a string or an integer, got {shown(value)}")
    if len(text) > max_length:
        raise bad_request(
            f"row {row}: user_id {shown(text)} is longer than max_id_length={max_length} characters (model config)"
        )
    bad = _FORBIDDEN_ID_CHARS.search(text)
    if bad:
        raise bad_request(
            f"row {row}: user_id {shown(text)} contains the character U+{ord(bad.group()):04X}; "
            "IDs must not hold control characters (NUL, newline, ...) or lone surrogates"
        )
    return text


def parse_k(value: Any, row: int, default: int, n_items: int, max_k: int = DEFAULT_LIMITS["max_k"]) -> int:
    """A row's k: ``default`` when missing, else an integer between 1 and min(``max_k``, ``n_items``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not integral:
        raise bad_request(f"row {row}: k must be a positive integer, got {shown(value)}")
    k = int(value)
    if n_items <= max_k and not 1 <= k <= n_items:
        raise bad_request(f"row {row}: k must be between 1 and the number of items ({n_items}), got {shown(k)}")
    if not 1 <= k <= max_k:
        raise bad_request(f"row {row}: k must be between 1 and max_k={max_k} (model config), got {shown(k)}")
    return k


def parse_request(
    model_input: Any, default_k: int, n_items: int, limits: dict[str, int] | None = None
) -> tuple[list[str], list[int]]:
    """(user ids, k per row) of a request; a malformed one raises a 400-style error naming the fault.

    ``limits``: :data:`DEFAULT_LIMITS` keys (missing ones take the defaults). The row count is checked
    before any row is read, so an oversized request costs no parsing.
    """
    limits = DEFAULT_LIMITS | (limits or {})
    if not isinstance(model_input, pd.DataFrame):
        try:
            model_input = pd.DataFrame(model_input)
        except (TypeError, ValueError) as exc:
            raise bad_request(f"request must be a table with a user_id column ({shown(str(exc), 200)})") from exc
    if "user_id" not in model_input.columns:
        columns = [shown(str(c)) for c in model_input.columns[:10]]
        more = f" and {len(model_input.columns) - 10} more" if len(model_input.columns) > 10 else ""
        raise bad_request(f"request needs a 'user_id' column; got columns [{', '.join(columns)}]{more}")
    n_rows, max_users = len(model_input), limits["max_users_per_request"]
    if n_rows > max_users:
        raise bad_request(
            f"request has {n_rows} rows, more than max_users_per_request={max_users} (model config); "
            "split it into smaller requests"
        )
    max_length = limits["max_id_length"]
    users = [parse_user_id(v, row, max_length) for row, v in enumerate(model_input["user_id"].tolist())]
    raw_k = model_input["k"].tolist() if "k" in model_input.columns else [None] * len(users)
    ks = [parse_k(v, row, default_k, n_items, limits["max_k"]) for row, v in enumerate(raw_k)]
    total, max_results = sum(ks), limits["max_results_per_request"]
    if total > max_results:
        raise bad_request(
            f"request asks for {total} recommendations (the sum of k over its {n_rows} rows), more than "
            f"max_results_per_request={max_results} (model config); ask for fewer users or a smaller k"
        )
    return users, ks


def positive_int(config: dict[str, Any], key: str, default: int) -> int:
    """Model config ``key`` as a positive integer (``default`` when absent); anything else refuses to load."""
    value = config.get(key, default)
    try:
        number = int(value) if isinstance(value, numbers.Integral | str) and not isinstance(value, bool) else 0
    except ValueError:
        number = 0
    if number < 1:
        raise MlflowException(f"model config {key} must be a positive integer, got {shown(value)}")
    return number


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
        if self.unknown_user not in UNKNOWN_USER_POLICIES:
            raise MlflowException(
                f"model config unknown_user must be one of {UNKNOWN_USER_POLICIES}, got {shown(self.unknown_user)}"
            )
        self.limits = {key: positive_int(config, key, default) for key, default in DEFAULT_LIMITS.items()}
        self.max_k = min(self.limits["max_k"], len(self.item_ids))
        self.default_k = min(positive_int(config, "default_k", DEFAULT_K), self.max_k)
        shapes = (len(self.user_index), len(self.indptr) - 1, self.user_emb.shape[0])
        item_shapes = (self.item_emb.shape[0], len(self.item_ids), len(self.popularity))
        if len(set(shapes)) != 1 or len(set(item_shapes)) != 1:
            raise MlflowException(f"model artifacts disagree on sizes: users {shapes}, items {item_shapes}")
        if not (torch.isfinite(self.user_emb).all() and torch.isfinite(self.item_emb).all()):
            raise MlflowException("model artifacts hold non-finite (NaN or infinite) embeddings")

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        users, ks = parse_request(model_input, self.default_k, len(self.item_ids), self.limits)
        index = [self.user_index.get(user) for user in users]
        unknown = sorted({user for user, i in zip(users, index, strict=True) if i is None})
        if unknown and self.unknown_user == "error":
            names = ", ".join(shown(u) for u in unknown[:10]) + (
                f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            )
            raise bad_request(
                f"unknown user_id {names}: the model knows the {len(self.user_index)} users of its training data "
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
