"""Per-user item sequences in JSON (the LC-Rec layout): ``{"<user>": [item, item, ...]}``, each list in time order.

Companions, all optional:

- items, ``{"<item>": {"title", "description", "brand", "categories", ...}}`` keyed like the
  sequences' items: the item text. ``categories`` is a comma-separated path whose names may
  hold ", " themselves ("Industrial & Scientific,Tapes, Adhesives & Sealants,Adhesive Tapes":
  a comma followed by a space belongs to the name), or a list; it is stored "|"-joined. A list
  given for another field is joined with spaces; further keys are kept in ``extra``.
- ``item_ids`` / ``user_ids``: ``ASIN<TAB>index`` lines (no header). The stored ``item_id`` /
  ``user_id`` is then the ASIN; without a map it is the key of the files.

An interaction's timestamp is its position in the user's list (0, 1, ...), so ``--split chrono``
holds out each user's last items; ``random`` is MMRec's per-user 8:1:1 (:mod:`dprec.data.splits`).
When every key is an integer, users and items are indexed in key order, so with nothing filtered
``item_idx`` is the files' item index (``source_ids_preserved_as_index`` in ``dataset.json``) and
per-item files keyed by that index still line up. The whole file is one JSON document, so the
``path:line`` of a skipped entry is the line its key starts on.

Bad input: invalid JSON, or a document that is not one object, is an error naming ``path:line``.
A user entry that is not a list, an item that is not an integer or a string ID, a blank ID, a
repeated user (the first kept), a map line that is not ``ASIN<TAB>integer``, a user missing from
``user_ids`` and an item record that is not an object are ``malformed`` skips; an item missing
from ``item_ids`` is an ``unknown_item`` skip; an item listed twice in one sequence is a
``duplicate_interaction`` (the earlier position kept, as every reader). Two ASINs for one index,
or one ASIN for two indices, is an error. An item without a text record keeps its interactions
and has empty text (counted in ``dataset.json`` as ``items_without_text``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.data.dataset import DatasetError
from dprec.data.readers.common import (
    TOO_DEEP,
    RawData,
    SkipLog,
    id_problem,
    read_json_object,
    require_file,
    text_lines,
)

TEXT_FIELDS = ("title", "description", "brand")
CATEGORY_SEPARATOR = re.compile(r",(?!\s)")
"""A comma not followed by whitespace separates two category names; ", " is part of a name."""
_INTEGER = re.compile(r"[+-]?\d{1,18}")


def _key(value: Any) -> str | None:
    """An ID from a JSON key or list element: integers and non-blank strings (stripped); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and not id_problem(value, "ID"):
        return value.strip()
    return None


def _int_key(key: str) -> str:
    """``key`` normalised as an integer ("007" -> "7") when it is one, so that index files join."""
    return str(int(key)) if _INTEGER.fullmatch(key) else key


def _what(value: Any) -> str:
    if value is TOO_DEEP:
        return "a value nested too deeply to read"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_id_map(path: Path, skips: SkipLog, what: str) -> pd.Series:
    """``ASIN<TAB>index`` lines -> ASIN by index (integer strings, "007" read as "7").

    A line that is not two tab-separated fields with an integer index, or whose ASIN is blank or
    holds a control character, is malformed; two ASINs for one index (or the reverse) is an error.
    """
    asins, indices, lines = [], [], []
    for lineno, line in text_lines(path, skips):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not _INTEGER.fullmatch(fields[1].strip()):
            skips.add("malformed", path, [lineno], f"expected 'ASIN<TAB>integer index' ({what} map)")
            continue
        problem = id_problem(fields[0], "ASIN")
        if problem:
            skips.add("malformed", path, [lineno], problem)
            continue
        asins.append(fields[0].strip())
        indices.append(str(int(fields[1])))
        lines.append(lineno)
    frame = pd.DataFrame({"asin": asins, "index": indices, "line": lines})
    frame = frame.drop_duplicates(["asin", "index"])
    for col, other in (("index", "ASINs"), ("asin", "indices")):
        dup = frame[col].duplicated(keep=False)
        if dup.any():
            first = frame[dup].iloc[0][col]
            rows = frame[frame[col] == first]
            raise DatasetError(
                f"{path}:{rows['line'].iloc[1]}: {col} {first!r} has two {other} "
                f"({rows['asin' if col == 'index' else 'index'].iloc[0]!r} on line {rows['line'].iloc[0]} and "
                f"{rows['asin' if col == 'index' else 'index'].iloc[1]!r}); the {what} map must be one-to-one"
            )
    if frame.empty:
        raise DatasetError(f"{path}: no 'ASIN<TAB>index' lines ({what} map)")
    return pd.Series(frame["asin"].to_numpy(object), index=frame["index"].to_numpy(object))


def read_sequences(path: Path, skips: SkipLog) -> tuple[pd.DataFrame, dict[str, int]]:
    """The interactions of a sequence file: ``user_key``, ``item_key`` (strings), ``position``, ``line``."""
    users: list[str] = []
    items: list[str] = []
    positions: list[int] = []
    lines: list[int] = []
    seen: set[str] = set()
    empty = 0
    for key, value, line in read_json_object(path):
        user = _key(key)
        if user is None:
            skips.add("malformed", path, [line], f"user {key!r} is a blank ID or holds a control character")
            continue
        user = _int_key(user)
        if user in seen:
            skips.add("malformed", path, [line], f"user {key!r} listed again; kept the first")
            continue
        seen.add(user)
        if not isinstance(value, list):
            skips.add("malformed", path, [line], f"user {key!r}: expected a list of items, found {_what(value)}")
            continue
        if not value:
            empty += 1
        for pos, element in enumerate(value):
            item = _key(element)
            if item is None:
                skips.add(
                    "malformed",
                    path,
                    [line],
                    f"user {key!r}, position {pos}: item {_what(element)} is not an integer or string ID",
                )
                continue
            users.append(user)
            items.append(_int_key(item))
            positions.append(pos)
            lines.append(line)
    frame = pd.DataFrame(
        {
            "user_key": pd.Series(users, dtype=object),
            "item_key": pd.Series(items, dtype=object),
            "position": np.asarray(positions, np.int64),
            "line": np.asarray(lines, np.int64),
        }
    )
    return frame, {"users_read": len(seen), "users_without_items": empty}


def split_categories(value: Any) -> str:
    """A category path (comma-separated string or list) as "|"-joined names, first occurrence kept."""
    if isinstance(value, list):
        names = [str(v).strip() for v in value if v is not None and not isinstance(v, (dict, list))]
    elif value is None or isinstance(value, dict):
        names = []
    else:
        names = [n.strip() for n in CATEGORY_SEPARATOR.split(str(value))]
    return "|".join(dict.fromkeys(n.replace("|", "/") for n in names if n))


def _field_text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(t for t in (_field_text(v) for v in value) if t)
    if value is None or isinstance(value, dict):
        return ""
    return " ".join(str(value).split())


def read_item_records(path: Path, skips: SkipLog) -> pd.DataFrame:
    """Item text records: ``item_key``, the text fields, ``extra`` (further keys as JSON) and ``line``."""
    rows = []
    seen: set[str] = set()
    for key, value, line in read_json_object(path):
        item = _key(key)
        if item is None:
            skips.add("malformed", path, [line], f"item {key!r} is a blank ID or holds a control character")
            continue
        item = _int_key(item)
        if not isinstance(value, dict):
            skips.add("malformed", path, [line], f"item {key!r}: expected an object of fields, found {_what(value)}")
            continue
        if item in seen:
            skips.add("duplicate_item", path, [line], f"item {key!r} listed again; kept the first")
            continue
        seen.add(item)
        others = {k: v for k, v in value.items() if k not in (*TEXT_FIELDS, "categories") and v not in (None, "")}
        rows.append(
            (
                item,
                *(_field_text(value.get(f)) for f in TEXT_FIELDS),
                split_categories(value.get("categories")),
                json.dumps(others, ensure_ascii=False, sort_keys=True) if others else "",
                line,
            )
        )
    return pd.DataFrame(rows, columns=["item_key", *TEXT_FIELDS, "categories", "extra", "line"]).astype(
        {"item_key": object}
    )


def _integer_keys(keys: pd.Series) -> np.ndarray | None:
    """The keys as int64 when every one is an integer (they then give the index order), else None."""
    if keys.empty or not keys.map(lambda k: bool(_INTEGER.fullmatch(k))).all():
        return None
    return keys.astype("int64").to_numpy()


def read_sequence(
    interactions: str | Path,
    skips: SkipLog,
    items: str | Path | None = None,
    item_ids: str | Path | None = None,
    user_ids: str | Path | None = None,
) -> RawData:
    """Read a sequence file and its companions (see the module docstring) into :class:`RawData`."""
    inter_path = require_file(Path(interactions).resolve(), " (--interactions)")
    paths = {"items": items, "item_ids": item_ids, "user_ids": user_ids}
    paths = {k: require_file(Path(p).resolve(), f" (--{k.replace('_', '-')})") for k, p in paths.items() if p}
    frame, meta = read_sequences(inter_path, skips)
    if frame.empty:
        raise DatasetError(f'{inter_path}: no interactions (expected {{"<user>": [item, ...], ...}})')
    source: dict[str, Any] = {
        "kind": "sequence",
        "interactions": str(inter_path),
        **{k: str(p) for k, p in paths.items()},
    }
    meta["timestamp"] = f"position in the user's list of {inter_path.name} (chronological order)"

    if "user_ids" in paths:
        user_map = read_id_map(paths["user_ids"], skips, "user")
        asin = frame["user_key"].map(user_map)
        bad = frame[asin.isna()].drop_duplicates("user_key")
        skips.add(
            "malformed",
            inter_path,
            bad["line"].to_numpy(),
            lambda k: f"user {bad['user_key'].iloc[k]!r} is not in {paths['user_ids'].name}; its items are skipped",
        )
        frame = frame.assign(user_id=asin)[asin.notna().to_numpy()]
    else:
        frame = frame.assign(user_id=frame["user_key"])
    item_map = read_id_map(paths["item_ids"], skips, "item") if "item_ids" in paths else None
    if item_map is not None:
        asin = frame["item_key"].map(item_map)
        bad = frame[asin.isna()]
        skips.add(
            "unknown_item",
            inter_path,
            bad["line"].to_numpy(),
            lambda k: (
                f"item {bad['item_key'].iloc[k]!r} of user {bad['user_key'].iloc[k]!r} is not in "
                f"{paths['item_ids'].name}"
            ),
        )
        frame = frame.assign(item_id=asin)[asin.notna().to_numpy()]
    else:
        frame = frame.assign(item_id=frame["item_key"])
    if frame.empty:
        raise DatasetError(f"{inter_path}: no interactions left after matching the ID maps; wrong map files?")

    catalogue = pd.DataFrame({"item_key": pd.unique(frame["item_key"])})
    if "items" in paths:
        records = read_item_records(paths["items"], skips)
        if item_map is not None:
            mapped = records["item_key"].isin(item_map.index)
            meta["item_records_without_id"] = int((~mapped).sum())
            records = records[mapped.to_numpy()]
        has_inter = records["item_key"].isin(catalogue["item_key"])
        meta["item_records_without_interactions"] = int((~has_inter).sum())
        catalogue = pd.concat([records, catalogue[~catalogue["item_key"].isin(records["item_key"])]], ignore_index=True)
        meta["items_without_text"] = int(catalogue["line"].isna().sum())
    catalogue["item_id"] = catalogue["item_key"].map(item_map) if item_map is not None else catalogue["item_key"]
    catalogue["line"] = catalogue["line"].fillna(0).astype("int64") if "line" in catalogue else 0

    item_keys = _integer_keys(catalogue["item_key"])
    user_keys = _integer_keys(frame["user_key"])
    inter = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(object).to_numpy(),
            "item_id": frame["item_id"].astype(object).to_numpy(),
            "timestamp": frame["position"].to_numpy(np.int64),
            "rating": np.nan,
            "split": np.int8(-1),
            "line": frame["line"].to_numpy(np.int64),
        }
    )
    if user_keys is not None:
        inter["user_key"] = user_keys
    if item_keys is not None:
        catalogue["item_key"] = item_keys
        inter["item_key"] = frame["item_key"].astype("int64").to_numpy()
    else:
        catalogue = catalogue.drop(columns="item_key")
    return RawData(
        name=inter_path.name.split(".")[0],
        source=source,
        interactions=inter,
        interactions_path=str(inter_path),
        items=catalogue,
        items_path=str(paths.get("items", inter_path)),
        meta=meta,
        default_kcore=1,
        default_split="chrono",
        inputs=[str(inter_path), *(str(p) for p in paths.values())],
    )
