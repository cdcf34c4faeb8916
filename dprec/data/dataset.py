"""The canonical dataset folder (DESIGN §2): written by ``dprec.prepare``, read by every later stage.

A folder holds ``interactions.parquet``, ``items.parquet`` and ``users.parquet`` (columns in
:mod:`dprec.data.schema`) and ``dataset.json`` (name, source, split rule, seed, counts,
missing-field and skipped-input counts, content hash, format version, and ``files``: each table
file's size, row count and sha256), written last.

The folder is written whole or not at all (:func:`save_dataset`: a hidden sibling renamed into
place; an existing dataset folder replaced only with ``overwrite``), and :func:`load_dataset`
refuses a folder whose files do not belong together (row counts, sizes, sha256 and the content
hash each table file carries must match ``dataset.json``) or that was left half-written. :func:`check_trainable` is what a trainer calls before training: it names what a
dataset lacks to be trained and evaluated (validation or test interactions, at least K items).

The content hash covers the logical content (interaction arrays, ID maps, item text and image
references and bytes), not the parquet bytes, so it is stable across pyarrow versions;
``items_hash`` covers the item catalogue alone, and feature shards record and check it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.config import DPRecError
from dprec.data.schema import (
    COLD_META_KEY,
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
from dprec.io import TMP_PREFIX, atomic_write_folder, atomic_write_text, atomic_write_with, sha256_file

FORMAT_VERSION = 1
TABLES = {"interactions": INTERACTION_COLUMNS, "items": ITEM_COLUMNS, "users": USER_COLUMNS}
DATASET_FILES = (*(f"{name}.parquet" for name in TABLES), "dataset.json")
ROW_COUNTS = {"interactions": "n_interactions", "items": "n_items", "users": "n_users"}
# the token every table file carries (parquet key-value metadata, through DataFrame.attrs): the content hash
FILE_TOKEN = "dprec_content_hash"
# the largest cut-off the evaluation uses by default (dprec.training.metrics.DEFAULT_KS; data cannot import it)
MAX_EVAL_K = 50
# in items.parquet's column order: the hash does not follow the prompt order of ITEM_TEXT_FIELDS
HASHED_ITEM_COLUMNS = tuple(c for c in ITEM_COLUMNS if c not in ("item_idx", "image_bytes", "extra"))
__all__ = [
    "FORMAT_VERSION",
    "SPLIT_TEST",
    "SPLIT_TRAIN",
    "SPLIT_VALID",
    "DATASET_FILES",
    "MAX_EVAL_K",
    "Dataset",
    "DatasetError",
    "check_target",
    "check_trainable",
    "content_hash",
    "items_hash",
    "items_prefix_hash",
    "load_dataset",
    "make_dataset",
    "save_dataset",
    "trainability_problems",
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


def items_prefix_hash(ds: Dataset, n_items: int) -> str:
    """:func:`items_hash` of the catalogue's first ``n_items`` items (a grown catalogue's earlier self)."""
    h = hashlib.sha256()
    _hash_items(h, ds.items.iloc[:n_items])
    return h.hexdigest()


def _writable(folder: Path) -> bool:
    """A new entry can be made in ``folder``: the OS allows it, and its mode grants write to someone.

    The mode test makes a folder marked read-only (``chmod a-w``) refuse also for root, who may write anyway.
    """
    try:
        return os.access(folder, os.W_OK | os.X_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def check_target(folder: str | Path, overwrite: bool = False) -> None:
    """Refuse to write a dataset to ``folder`` where that would lose data; the message says what to do.

    Allowed: a missing folder, an empty folder, and (only with ``overwrite``) a folder that holds nothing
    but a dataset's files (``DATASET_FILES`` and ``.tmp-`` leftovers). A file, or a folder holding
    anything else, is refused even with ``overwrite``: it is not ours to replace. The folder that the
    new one is made in (the parent, or the nearest existing ancestor) must be writable.
    """
    folder = Path(folder)
    ancestor = next((p for p in folder.absolute().parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise DatasetError(f"{folder}: cannot create the folder, {ancestor} is a file, not a folder")
    if ancestor is not None and not _writable(ancestor):
        raise DatasetError(f"{folder}: cannot write the dataset folder, {ancestor} is read-only (Permission denied)")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DatasetError(f"{folder}: exists and is a file, not a folder; --out must name a dataset folder")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    foreign = [e for e in entries if e not in DATASET_FILES and not e.startswith(TMP_PREFIX)]
    if foreign:
        shown = ", ".join(repr(e) for e in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DatasetError(
            f"{folder}: is not empty and is not a dataset folder (it holds {shown}); choose another --out "
            "(--overwrite only replaces a dataset folder)"
        )
    if not overwrite:
        what = "a dataset" if "dataset.json" in entries else "the files of an unfinished dataset"
        raise DatasetError(f"{folder}: this folder already holds {what}; choose another --out or pass --overwrite")


def save_dataset(ds: Dataset, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the dataset folder atomically: all of it, or (on any failure) nothing.

    The tables and ``dataset.json`` (last) go to a hidden sibling that is renamed onto ``folder`` at the end
    (:func:`dprec.io.atomic_write_folder`); an existing dataset folder is replaced only with ``overwrite``
    (:func:`check_target`). ``dataset.json`` records each table file's size, row count and sha256
    (``files``), and every table file carries the content hash in its metadata, so :func:`load_dataset`
    can tell that the files belong together.
    """
    folder = Path(folder)
    if folder.is_symlink():  # replace the folder the link names, not the link
        folder = folder.resolve()
    check_target(folder, overwrite)
    token = ds.meta.get("content_hash") or content_hash(ds)
    files: dict[str, dict[str, Any]] = {}
    meta = {**ds.meta, "content_hash": token, "files": files}

    def fill(tmp: Path) -> None:
        for name in TABLES:
            frame = getattr(ds, name).copy(deep=False)
            frame.attrs = {FILE_TOKEN: token}
            path = tmp / f"{name}.parquet"
            atomic_write_with(path, lambda p, f=frame: f.to_parquet(p, index=False))
            files[path.name] = {"bytes": path.stat().st_size, "rows": len(frame), "sha256": sha256_file(path)}
        text = json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write_text(tmp / "dataset.json", text)

    atomic_write_folder(folder, fill, replace=overwrite)
    ds.meta, ds.folder = meta, folder
    return folder


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / "dataset.json"
    if not folder.exists():
        raise DatasetError(f"{folder}: no such dataset folder; run `python -m dprec.prepare` first")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: is a file, not a dataset folder")
    if not meta_path.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.name in DATASET_FILES or p.name.startswith(TMP_PREFIX))
        if present:
            raise DatasetError(
                f"{folder}: half-written dataset folder (it has {present} but no dataset.json): a prepare did not "
                "finish; run `python -m dprec.prepare` again with --overwrite"
            )
        raise DatasetError(f"{folder}: not a dataset folder (no dataset.json); run `python -m dprec.prepare` first")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DatasetError(f"{meta_path}: not valid JSON ({exc}); write the folder again with dprec.prepare") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object; write the folder again with dprec.prepare")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    missing = [k for k in ("name", *ROW_COUNTS.values()) if k not in meta]
    if missing:
        raise DatasetError(f"{meta_path}: missing key(s) {missing}; write the folder again with dprec.prepare")
    return meta


def _mixed(folder: Path, path: Path, what: str) -> DatasetError:
    return DatasetError(
        f"{path}: {what}; the files of {folder} do not belong together (a write was interrupted, or a file "
        "was copied in from another dataset); run `python -m dprec.prepare` again with --overwrite"
    )


def load_dataset(folder: str | Path, verify_hash: bool = False) -> Dataset:
    """Read a dataset folder, refusing one whose files do not belong together or that was left half-written.

    Always checked: ``dataset.json`` is there and valid, each table's row count equals the one in
    ``dataset.json``, and (folders written since ``files`` is recorded) each table's size, sha256 and the
    content hash its metadata carries match ``dataset.json`` (cheap next to reading the tables). With
    ``verify_hash`` also the content hash recomputed from the tables.
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    files = meta.get("files")
    frames = {}
    for name, columns in TABLES.items():
        path = folder / f"{name}.parquet"
        record = files.get(path.name) if isinstance(files, dict) else None
        if not path.is_file():
            raise _mixed(folder, path, "missing, but dataset.json is there")
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise DatasetError(f"{path}: cannot read ({exc})") from exc
        attrs, frame.attrs = dict(frame.attrs), {}
        missing = [c for c in columns if c not in frame]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; write the folder again with dprec.prepare")
        if files is not None and attrs.get(FILE_TOKEN) != meta.get("content_hash"):
            raise _mixed(folder, path, "written with another dataset than dataset.json (content hash differs)")
        if len(frame) != meta[ROW_COUNTS[name]]:
            raise _mixed(folder, path, f"{len(frame)} rows, dataset.json records {meta[ROW_COUNTS[name]]}")
        if files is not None:
            if not isinstance(record, dict):
                raise _mixed(folder, path, "not listed in dataset.json")
            size = path.stat().st_size
            if size != record.get("bytes"):
                raise _mixed(folder, path, f"{size} bytes, dataset.json records {record.get('bytes')}")
            if sha256_file(path) != record.get("sha256"):
                raise _mixed(folder, path, "sha256 differs from the one dataset.json records")
        frames[name] = frame
    ds = Dataset(meta["name"], frames["interactions"], frames["items"], frames["users"], meta, folder)
    validate(ds)
    if verify_hash and content_hash(ds) != meta.get("content_hash"):
        raise DatasetError(f"{folder}: content hash differs from dataset.json; the folder was changed after prepare")
    return ds


def trainability_problems(ds: Dataset, max_k: int = MAX_EVAL_K) -> list[str]:
    """What keeps ``ds`` from being trained and evaluated at cut-offs up to ``max_k``; empty when nothing does."""
    per = {label: int((ds.interactions["split"] == label).sum()) for label in SPLIT_LABELS}
    needs = {
        SPLIT_TRAIN: ("training", "the model learns from them"),
        SPLIT_VALID: ("validation", "model selection and early stopping need them"),
        SPLIT_TEST: ("test", "the final evaluation needs them"),
    }
    problems = [
        f"no {what} interactions (split {label} is empty; {why})"
        for label, (what, why) in needs.items()
        if not per[label]
    ]
    if problems and ds.meta.get("split_rule") in ("random", "chrono"):
        problems[-1] += (
            "; the random and chrono splits hold out nothing of users with fewer than 3 interactions, "
            "so use more interactions per user or a source with its own split"
        )
    if ds.n_items < max_k:
        problems.append(
            f"only {ds.n_items} items, fewer than the largest evaluation cut-off K={max_k} "
            "(Recall@K and NDCG@K rank K items); use more items or lower the cut-offs"
        )
    return problems


def check_trainable(ds: Dataset, max_k: int = MAX_EVAL_K) -> None:
    """Raise :class:`DatasetError` naming every reason ``ds`` cannot be trained and evaluated up to ``max_k``.

    For the trainer to call before the first epoch (with the largest of its ``ks``), so that a dataset
    without validation or test interactions, or with fewer items than K, fails at once and says why. A
    cold-items split is refused too: the plain trainer would train on its held-out items; the cold-start
    trainer (``dprec.training.cold``) trains on a view without them.
    """
    problems = trainability_problems(ds, max_k)
    if COLD_META_KEY in ds.meta:
        problems.append(
            "it is a cold-items split, whose held-out items must stay out of training: train it in one process "
            "with python -m dprec.train (dprec.training.cold trains on its warm items and ranks the held-out ones)"
        )
    if problems:
        where = f"dataset {ds.name!r}" + (f" ({ds.folder})" if ds.folder is not None else "")
        raise DatasetError(f"{where} cannot be trained and evaluated: " + "; ".join(problems))
