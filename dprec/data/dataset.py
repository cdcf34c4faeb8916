"""The canonical dataset folder (DESIGN §2): written by ``dprec.prepare``, read by every later stage.

A folder holds ``interactions.parquet``, ``items.parquet`` and ``users.parquet`` (columns in
:mod:`dprec.data.schema`) and ``dataset.json`` (name, source, split rule, seed, counts,
missing-field and skipped-input counts, content hash, format version), written last.

The content hash covers the logical content (interaction arrays, ID maps, item text and image
references and bytes), not the parquet bytes, so it is stable across pyarrow versions;
``items_hash`` covers the item catalogue alone, and feature shards record and check it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.config import DPRecError
from dprec.data.schema import (
    INTERACTION_COLUMNS,
    INTERACTION_DTYPES,
    ITEM_COLUMNS,
    ITEM_TEXT_FIELDS,
    SPLIT_LABELS,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    USER_COLUMNS,
)
from dprec.io import atomic_write_text, atomic_write_with

FORMAT_VERSION = 1
# in items.parquet's column order: the hash does not follow the prompt order of ITEM_TEXT_FIELDS
HASHED_ITEM_COLUMNS = tuple(c for c in ITEM_COLUMNS if c not in ("item_idx", "image_bytes", "extra"))
__all__ = [
    "FORMAT_VERSION",
    "SPLIT_TEST",
    "SPLIT_TRAIN",
    "SPLIT_VALID",
    "Dataset",
    "DatasetError",
    "content_hash",
    "items_hash",
    "load_dataset",
    "make_dataset",
    "save_dataset",
    "validate",
]


class DatasetError(DPRecError, ValueError):
    """A dataset folder or table breaks the contract; the message names the file and the fault."""


@dataclass
class Dataset:
    """An in-memory canonical dataset. Build it with :func:`make_dataset`, persist with :func:`save_dataset`."""

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def split(self, label: int) -> pd.DataFrame:
        return self.interactions[self.interactions["split"] == label]

    def pairs(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) int64 arrays of one split."""
        part = self.split(label)
        return part["user_idx"].to_numpy(np.int64), part["item_idx"].to_numpy(np.int64)

    def image_file(self, item_idx: int) -> Path | None:
        """The resolved local image path of an item, or None."""
        raw = self.items.at[item_idx, "image_path"]
        if not raw:
            return None
        path = Path(raw)
        if not path.is_absolute() and self.folder is not None:
            path = self.folder / path
        return path


def _as_str(series: pd.Series) -> pd.Series:
    return series.fillna("").astype(str)


def make_dataset(
    name: str,
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame,
    meta: dict[str, Any] | None = None,
) -> Dataset:
    """Normalise column types, check the contract and compute counts and the content hash."""
    inter = interactions.copy()
    for col in ("user_idx", "item_idx", "split"):
        if col not in inter:
            raise DatasetError(f"interactions: missing column {col!r}")
    inter["timestamp"] = inter["timestamp"].fillna(-1) if "timestamp" in inter else -1
    inter["rating"] = inter["rating"] if "rating" in inter else np.nan
    inter = inter[list(INTERACTION_COLUMNS)].astype(INTERACTION_DTYPES).reset_index(drop=True)

    it = items.copy()
    if "item_idx" not in it or "item_id" not in it:
        raise DatasetError("items: needs columns 'item_idx' and 'item_id'")
    for col in ITEM_COLUMNS:
        if col == "image_bytes":
            it[col] = it[col].map(lambda b: b if isinstance(b, bytes) else b"") if col in it else b""
        elif col != "item_idx":
            it[col] = _as_str(it[col]) if col in it else ""
    it = it[list(ITEM_COLUMNS)].astype({"item_idx": "int64"}).sort_values("item_idx").reset_index(drop=True)

    us = users.copy()
    us["user_id"] = _as_str(us["user_id"])
    us = us[list(USER_COLUMNS)].astype({"user_idx": "int64"}).sort_values("user_idx").reset_index(drop=True)

    ds = Dataset(name=name, interactions=inter, items=it, users=us, meta=dict(meta or {}))
    validate(ds)
    ds.meta.update(
        name=name,
        format_version=FORMAT_VERSION,
        n_users=ds.n_users,
        n_items=ds.n_items,
        n_interactions=len(inter),
        n_per_split={str(k): int((inter["split"] == k).sum()) for k in SPLIT_LABELS},
        missing_fields={col: int((it[col] == "").sum()) for col in ITEM_TEXT_FIELDS}
        | {"image": int(((it["image_path"] == "") & (it["image_url"] == "") & (it["image_bytes"] == b"")).sum())},
        content_hash=content_hash(ds),
    )
    return ds


def validate(ds: Dataset) -> None:
    """Raise :class:`DatasetError` where the dataset breaks the contract of this module."""
    where = f"dataset {ds.name!r}"
    if ds.n_items == 0 or ds.n_users == 0 or len(ds.interactions) == 0:
        raise DatasetError(
            f"{where}: empty ({ds.n_users} users, {ds.n_items} items, {len(ds.interactions)} interactions)"
        )
    if not np.array_equal(ds.items["item_idx"].to_numpy(), np.arange(ds.n_items)):
        raise DatasetError(f"{where}: item_idx must be dense 0..{ds.n_items - 1}")
    if not np.array_equal(ds.users["user_idx"].to_numpy(), np.arange(ds.n_users)):
        raise DatasetError(f"{where}: user_idx must be dense 0..{ds.n_users - 1}")
    if ds.items["item_id"].duplicated().any():
        dup = ds.items.loc[ds.items["item_id"].duplicated(), "item_id"].iloc[0]
        raise DatasetError(f"{where}: item_id {dup!r} appears twice")
    if ds.users["user_id"].duplicated().any():
        dup = ds.users.loc[ds.users["user_id"].duplicated(), "user_id"].iloc[0]
        raise DatasetError(f"{where}: user_id {dup!r} appears twice")
    inter = ds.interactions
    if inter["user_idx"].min() < 0 or inter["user_idx"].max() >= ds.n_users:
        raise DatasetError(f"{where}: interactions name user indices outside 0..{ds.n_users - 1}")
    if inter["item_idx"].min() < 0 or inter["item_idx"].max() >= ds.n_items:
        raise DatasetError(f"{where}: interactions name item indices outside 0..{ds.n_items - 1}")
    bad_split = ~inter["split"].isin(SPLIT_LABELS)
    if bad_split.any():
        raise DatasetError(f"{where}: split labels must be 0, 1 or 2, found {inter.loc[bad_split, 'split'].iloc[0]}")
    if inter.duplicated(["user_idx", "item_idx"]).any():
        raise DatasetError(f"{where}: duplicate (user, item) interactions")


def content_hash(ds: Dataset) -> str:
    """sha256 over the logical content: interaction arrays, id maps and item text/image references."""
    h = hashlib.sha256()
    inter = ds.interactions
    for col in INTERACTION_COLUMNS:
        arr = np.ascontiguousarray(inter[col].to_numpy())
        h.update(col.encode())
        h.update(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    _hash_items(h, ds.items)
    h.update(b"user_id")
    h.update(json.dumps(ds.users["user_id"].tolist(), ensure_ascii=False).encode())
    return h.hexdigest()


def _json_scalar(value):
    """JSON stand-in for values a loaded table does not hold but an in-memory one may (bytes in a text column)."""
    return value.hex() if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


def _hash_items(h, items) -> None:
    """Feed the item catalogue (ids, text, image references and bytes, extra attributes) to ``h``."""
    for col in HASHED_ITEM_COLUMNS:
        h.update(col.encode())
        h.update(json.dumps(items[col].tolist(), ensure_ascii=False, default=_json_scalar).encode())
    h.update(b"image_bytes")
    for b in items["image_bytes"]:
        h.update(hashlib.sha256(b).digest())
    if (items["extra"] != "").any():  # only when some item has attributes (see docs/data-and-features.md)
        h.update(b"extra")
        h.update(json.dumps(items["extra"].tolist(), ensure_ascii=False, default=_json_scalar).encode())


def items_hash(ds: Dataset) -> str:
    """sha256 over the item catalogue alone (the items part of ``content_hash``).

    Item features depend on nothing else, so two splits (or k-core filterings that keep every item)
    of one catalogue share a feature set; the features' manifest records this hash.
    """
    h = hashlib.sha256()
    _hash_items(h, ds.items)
    return h.hexdigest()


def save_dataset(ds: Dataset, folder: str | Path) -> Path:
    """Write the folder; ``dataset.json`` last, so a folder with it is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("interactions", ds.interactions), ("items", ds.items), ("users", ds.users)):
        atomic_write_with(folder / f"{name}.parquet", lambda p, f=frame: f.to_parquet(p, index=False))
    atomic_write_text(folder / "dataset.json", json.dumps(ds.meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    ds.folder = folder
    return folder


def load_dataset(folder: str | Path, verify_hash: bool = False) -> Dataset:
    """Read a dataset folder; with ``verify_hash`` recompute the content hash and compare."""
    folder = Path(folder)
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{folder}: not a dataset folder (no dataset.json); run `python -m dprec.prepare` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    frames = {}
    for name, columns in (("interactions", INTERACTION_COLUMNS), ("items", ITEM_COLUMNS), ("users", USER_COLUMNS)):
        path = folder / f"{name}.parquet"
        try:
            frames[name] = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise DatasetError(f"{path}: cannot read ({exc})") from exc
        missing = [c for c in columns if c not in frames[name]]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; write the folder again with dprec.prepare")
    ds = Dataset(meta["name"], frames["interactions"], frames["items"], frames["users"], meta, folder)
    validate(ds)
    if verify_hash and content_hash(ds) != meta.get("content_hash"):
        raise DatasetError(f"{folder}: content hash differs from dataset.json; the folder was changed after prepare")
    return ds
