"""Generic interaction and item tables (CSV, TSV, Parquet, JSON / JSON lines) with a column mapping.

The mapping is a YAML file (``--config``), a shipped preset (``--preset ml-100k``, files in
``dprec/data/presets/``) or CLI flags, which override the file. Paths are relative to ``--root``.
Every key but ``interactions.path`` is optional::

    name: hm-sample
    integer_user_ids: false            # user IDs must be integers ("007" and "7" are then the same ID)
    integer_item_ids: true             # item IDs (interactions, items and joins) must be integers
    kcore: 1                           # default minimum interactions per user / item (1 = no filtering)
    split: chrono                      # default split rule (given | random | chrono)
    interactions:
      path: transactions_sample.parquet
      format: parquet                  # csv | tsv | parquet | json | jsonl; default from the extension
      user: customer_id                # column names in the file (defaults: user_id, item_id)
      item: article_id
      timestamp: t_dat                 # unix seconds, or dates / datetimes (converted to unix seconds, UTC)
      rating: null
      split: null                      # a column of 0/1/2 labels, for --split given
    items:
      path: articles_sample.parquet
      key: article_id                  # the item ID column (default item_id)
      title: prod_name                 # a column, or a list of columns joined with ". "
      description: detail_desc
      brand: null
      categories: [product_type_name, colour_group_name]  # columns; list cells are flattened
      categories_sep: null             # split string cells on this (ml-100k genres: " ")
      image_url: null                  # a column of URLs
      image_path: null                 # a column of local paths (relative ones are under --root)
      image_template: "images/{item_id:0>10}.jpg"  # under --root; set where the file exists
      extra: [department_name]         # columns kept, as a JSON object, in items.extra
      keep_all: true                   # keep catalogue items without interactions
      joins:                           # further item tables, joined on their key
        - path: movielens100k_details.json
          key: movie_id
          description: description     # same field keys as items; a joined non-empty value wins
          extra: [director, cast]

Typed RecBole headers (``user_id:token``) are stripped to the name. Interactions naming an item
that the item table lacks are ``unknown_item`` skips; joined rows naming no item are counted in
``dataset.json`` (``join_unmatched``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.config import ConfigError, from_dict, load_yaml
from dprec.data.dataset import DatasetError
from dprec.data.readers.common import (
    RawData,
    SkipLog,
    apply_image_template,
    contains,
    extra_json,
    id_strings,
    numbers,
    read_table,
    require_columns,
    resolve,
    timestamps,
)
from dprec.data.splits import SPLIT_RULES

TEXT_FIELDS = ("title", "description", "brand")
Columns = str | list[str] | None


@dataclass
class InteractionTable:
    """Where the interactions are and which columns hold what."""

    path: str
    format: str | None = None
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = None
    rating: str | None = None
    split: str | None = None


@dataclass
class JoinTable:
    """A further item table joined on ``key``; its non-empty fields override the main table's."""

    path: str
    format: str | None = None
    key: str = "item_id"
    title: Columns = None
    description: Columns = None
    brand: Columns = None
    categories: Columns = None
    categories_sep: str | None = None
    image_url: str | None = None
    image_path: str | None = None
    extra: list[str] = field(default_factory=list)


@dataclass
class ItemTable(JoinTable):
    """The item catalogue."""

    image_template: str | None = None
    """Python format string with ``{item_id}``, under --root; sets ``image_path`` where the file exists."""
    keep_all: bool = False
    """Keep catalogue items without interactions (cold, content-only items)."""
    joins: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TableSpec:
    """A whole table source; see the module docstring for the YAML form."""

    interactions: InteractionTable
    items: ItemTable | None = None
    name: str = "table"
    description: str = ""
    integer_user_ids: bool = False
    integer_item_ids: bool = False
    kcore: int = 1
    split: str = "random"

    def __post_init__(self) -> None:
        if self.split not in SPLIT_RULES:
            raise ValueError(f"split {self.split!r} is not one of {', '.join(SPLIT_RULES)}")
        if self.kcore < 1:
            raise ValueError(f"kcore must be at least 1 (1 = no filtering), got {self.kcore}")


def preset_path(name: str) -> Path:
    """A shipped preset by name (``ml-100k``), or a YAML path."""
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return Path(name)
    path = Path(str(resources.files("dprec.data") / "presets" / f"{name}.yaml"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no preset {name!r}; shipped presets: {shipped}")
    return path


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            out[key] = _merge(out.get(key) or {}, value)
        elif value is not None:
            out[key] = value
    return out


def load_spec(preset: str | None = None, overrides: dict[str, Any] | None = None) -> TableSpec:
    """The spec of a preset (or YAML file) with ``overrides`` (nested dict, ``None`` values ignored) on top."""
    data: dict[str, Any] = {}
    where = "table spec"
    if preset:
        path = preset_path(preset)
        data, where = load_yaml(path), str(path)
        data.setdefault("name", path.stem)
    data = _merge(data, overrides or {})
    if not (data.get("interactions") or {}).get("path"):
        raise ConfigError(f"{where}: interactions.path is required (--interactions FILE, or a preset)")
    inter = from_dict(InteractionTable, data.pop("interactions"), f"{where}: interactions")
    items = from_dict(ItemTable, data.pop("items"), f"{where}: items") if data.get("items") else None
    data.pop("items", None)
    spec = from_dict(TableSpec, {**data, "interactions": inter, "items": items}, where)
    for k, join in enumerate(spec.items.joins if spec.items else []):
        from_dict(JoinTable, join, f"{where}: items.joins[{k}]")
    return spec


def _table_path(root: Path, path: str) -> Path:
    full = resolve(root, path)
    if not full.is_file():
        raise DatasetError(f"{full}: no such file (relative table paths are under --root {root})")
    return full


def read_interactions(spec: TableSpec, root: Path, skips: SkipLog) -> tuple[pd.DataFrame, Path]:
    t = spec.interactions
    path = _table_path(root, t.path)
    frame = read_table(path, skips, t.format)
    require_columns(frame, path, [c for c in (t.user, t.item, t.timestamp, t.rating, t.split) if c])
    lines = frame["line"].to_numpy()
    out = pd.DataFrame({"line": lines})
    out["user_id"], keep = id_strings(frame[t.user], path, lines, skips, t.user, spec.integer_user_ids)
    item, ok = id_strings(frame[t.item], path, lines, skips, t.item, spec.integer_item_ids)
    out["item_id"], keep = item, keep & ok
    out["timestamp"], out["rating"], out["split"] = -1, np.nan, np.int8(-1)
    if t.timestamp:
        out["timestamp"], ok = timestamps(frame[t.timestamp], path, lines, skips)
        keep &= ok
    if t.rating:
        out["rating"], ok = numbers(frame[t.rating], path, lines, skips, t.rating)
        keep &= ok
    if t.split:
        label = pd.to_numeric(frame[t.split], errors="coerce")
        bad = ~label.isin([0, 1, 2]).to_numpy()
        idx = np.flatnonzero(bad & keep)
        skips.add("malformed", path, lines[idx], lambda k: f"split label {frame[t.split].iloc[idx[k]]!r} is not 0/1/2")
        keep &= ~bad
        out["split"] = label.fillna(-1).astype("int8").to_numpy()
    return out[keep].reset_index(drop=True), path


def _cell_text(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(_cell_text(v) for v in value)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value).strip()


def _cell_categories(value: Any, sep: str | None) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [c for v in value for c in _cell_categories(v, sep)]
    text = _cell_text(value)
    parts = text.split(sep) if sep else [text]
    return [p.strip() for p in parts if p.strip()]


def _columns(spec: Columns) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def item_fields(frame: pd.DataFrame, spec: JoinTable, path: Path, root: Path) -> pd.DataFrame:
    """The canonical item fields that ``spec`` maps, from one item table."""
    mapped = {f: _columns(getattr(spec, f)) for f in (*TEXT_FIELDS, "categories", "image_url", "image_path")}
    require_columns(frame, path, sorted({c for cols in mapped.values() for c in cols} | set(spec.extra)))
    out = pd.DataFrame(index=frame.index)
    for name in TEXT_FIELDS:
        if mapped[name]:
            rows = frame[mapped[name]].itertuples(index=False, name=None)
            out[name] = [". ".join(t for t in map(_cell_text, row) if t) for row in rows]
    if mapped["categories"]:
        rows = frame[mapped["categories"]].itertuples(index=False, name=None)
        out["categories"] = [
            "|".join(dict.fromkeys(c for v in row for c in _cell_categories(v, spec.categories_sep))) for row in rows
        ]
    if spec.image_url:
        out["image_url"] = frame[spec.image_url].map(_cell_text)
    if spec.image_path:
        out["image_path"] = frame[spec.image_path].map(lambda v: str(resolve(root, t)) if (t := _cell_text(v)) else "")
    for col in spec.extra:
        out[f"extra:{col}"] = frame[col]
    return out


def _read_item_table(spec: JoinTable, integer_ids: bool, root: Path, skips: SkipLog) -> tuple[pd.DataFrame, Path]:
    path = _table_path(root, spec.path)
    frame = read_table(path, skips, spec.format)
    require_columns(frame, path, [spec.key])
    lines = frame["line"].to_numpy()
    ids, keep = id_strings(frame[spec.key], path, lines, skips, spec.key, integer_ids)
    out = item_fields(frame, spec, path, root)
    out.insert(0, "item_id", ids)
    out["line"] = lines
    out = out[keep]
    dup = out["item_id"].duplicated()
    dups = out[dup]
    skips.add(
        "duplicate_item",
        path,
        dups["line"].to_numpy(),
        lambda k: f"item {dups['item_id'].iloc[k]!r} listed again; kept the first",
    )
    return out[~dup].reset_index(drop=True), path


def _join(items: pd.DataFrame, extra: pd.DataFrame, spec: JoinTable) -> pd.DataFrame:
    """Left-join ``extra`` on item_id; its non-empty values replace the main table's."""
    joined = items.merge(extra.drop(columns="line"), on="item_id", how="left", suffixes=("", "__join"))
    for col in [c for c in joined.columns if c.endswith("__join")]:
        base = col.removesuffix("__join")
        value = joined[col]
        filled = value.notna() & (value.astype(str) != "") if not base.startswith("extra:") else value.notna()
        joined[base] = joined[base].where(~filled, value)
        joined = joined.drop(columns=col)
    return joined


def read_items(spec: TableSpec, root: Path, skips: SkipLog) -> tuple[pd.DataFrame, Path, dict[str, Any]]:
    t = spec.items
    items, path = _read_item_table(t, spec.integer_item_ids, root, skips)
    meta: dict[str, Any] = {}
    for k, join_dict in enumerate(t.joins):
        join = from_dict(JoinTable, join_dict, f"items.joins[{k}]")
        extra, join_path = _read_item_table(join, spec.integer_item_ids, root, skips)
        meta.setdefault("join_unmatched", {})[str(join_path)] = int(
            (~contains(items["item_id"], extra["item_id"])).sum()
        )
        items = _join(items, extra, join)
    if t.image_template:
        items["image_path"] = apply_image_template(items["item_id"], t.image_template, root)
    extra_cols = [c for c in items.columns if c.startswith("extra:")]
    renamed = items[extra_cols].rename(columns=lambda c: c.removeprefix("extra:"))
    items["extra"] = extra_json(renamed, list(renamed.columns))
    return items.drop(columns=extra_cols), path, meta


def read_table_source(spec: TableSpec, root: str | Path, skips: SkipLog) -> RawData:
    """Read a table source described by ``spec`` with relative paths under ``root``."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (--root)")
    inter, inter_path = read_interactions(spec, root, skips)
    if inter.empty:
        raise DatasetError(f"{inter_path}: no readable interactions")
    source: dict[str, Any] = {"kind": "table", "root": str(root), "spec": asdict(spec)}
    items, items_path, meta = (None, "", {})
    if spec.items is not None:
        items, path, meta = read_items(spec, root, skips)
        items_path = str(path)
    return RawData(
        name=spec.name,
        source=source,
        interactions=inter,
        interactions_path=str(inter_path),
        items=items,
        items_path=items_path,
        meta=meta,
        default_kcore=spec.kcore,
        default_split=spec.split,
        keep_cold_items=bool(spec.items and spec.items.keep_all),
    )
