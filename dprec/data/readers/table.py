"""Generic interaction and item tables (CSV, TSV, Parquet, JSON / JSON lines) with a column mapping.

The mapping (:class:`TableSpec`) is a YAML file or a shipped preset (``--preset ml-100k``, files in
``dprec/data/presets/``), with CLI flags laid over it; paths are relative to ``--root``. Only
``interactions.path`` is required; every field is documented below, and an annotated example is
in docs/data-and-features.md. Typed RecBole headers (``user_id:token``) are stripped to the name.
Interactions naming an item that the item table lacks are ``unknown_item`` skips; joined rows
naming no item are counted in ``dataset.json`` (``join_unmatched``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.config import ConfigError, check_types, from_dict, load_yaml, merge
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
    require_file,
    resolve,
    timestamps,
)
from dprec.data.schema import ITEM_TEXT_FIELDS, SPLIT_LABELS
from dprec.data.splits import SplitRule

JOINED_TEXT_FIELDS = tuple(f for f in ITEM_TEXT_FIELDS if f != "categories")  # several columns joined with ". "
Columns = str | list[str] | None


@dataclass
class InteractionTable:
    """Where the interactions are and which columns hold what."""

    path: str
    format: str | None = None
    """csv | tsv | parquet | json | jsonl; default from the extension (``.gz`` stripped)."""
    user: str = "user_id"
    """The user ID column."""
    item: str = "item_id"
    """The item ID column."""
    timestamp: str | None = None
    """Unix seconds, or dates / datetimes (converted to unix seconds, UTC)."""
    rating: str | None = None
    split: str | None = None
    """A column of 0/1/2 labels, for the ``given`` split rule."""

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class JoinTable:
    """A further item table joined on ``key``; its non-empty fields override the main table's."""

    path: str
    format: str | None = None
    """As for the interactions."""
    key: str = "item_id"
    """The item ID column."""
    title: Columns = None
    """A column, or a list of columns joined with ". " (so are ``description`` and ``brand``)."""
    description: Columns = None
    brand: Columns = None
    categories: Columns = None
    """Columns whose values (list cells flattened) become the "|"-joined categories."""
    categories_sep: str | None = None
    """Split string category cells on this (ml-100k genres: " ")."""
    image_url: str | None = None
    """A column of image URLs."""
    image_path: str | None = None
    """A column of local image paths (relative ones are under --root)."""
    extra: list[str] = field(default_factory=list)
    """Columns kept, as a JSON object, in ``items.extra``."""

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class ItemTable(JoinTable):
    """The item catalogue."""

    image_template: str | None = None
    """Python format string with ``{item_id}``, under --root; sets ``image_path`` where the file exists."""
    keep_all: bool = False
    """Keep catalogue items without interactions (cold, content-only items)."""
    joins: list[dict[str, Any]] = field(default_factory=list)
    """Further item tables (:class:`JoinTable` keys), joined on their key; a joined non-empty value wins."""


@dataclass
class TableSpec:
    """A whole table source; see the module docstring for the YAML form."""

    interactions: InteractionTable
    items: ItemTable | None = None
    name: str = "table"
    description: str = ""
    integer_user_ids: bool = False
    """User IDs must be integers (others are malformed); "007" and "7" are then one ID."""
    integer_item_ids: bool = False
    """Item IDs (in interactions, items and joins) must be integers."""
    kcore: int = 1
    """Default minimum interactions per user and item (1 = no filtering)."""
    split: SplitRule = "random"
    """Default split rule."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.kcore < 1:
            raise ValueError(f"kcore must be at least 1 (1 = no filtering), got {self.kcore}")


def preset_path(name: str) -> Path:
    """A shipped preset by name (``ml-100k``), or a YAML path."""
    if Path(name).is_dir():
        raise ConfigError(f"--preset {name}: is a folder, not a preset name or YAML spec file")
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return Path(name)
    path = Path(str(resources.files("dprec.data") / "presets" / f"{name}.yaml"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no preset {name!r}; shipped presets: {shipped}")
    return path


def load_spec(preset: str | None = None, overrides: dict[str, Any] | None = None) -> TableSpec:
    """The spec of a preset (or YAML file) with ``overrides`` (a nested dict, as :func:`dprec.config.merge`) on top."""
    data: dict[str, Any] = {}
    where = "table spec"
    if preset:
        path = preset_path(preset)
        data, where = load_yaml(path), str(path)
        data.setdefault("name", path.stem)
    data = merge(data, overrides or {})
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
    hint = "" if Path(path).is_absolute() else f" (relative table paths are under --root {root})"
    return require_file(full, hint)


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
        bad = ~label.isin(SPLIT_LABELS).to_numpy()
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
    mapped = {f: _columns(getattr(spec, f)) for f in (*JOINED_TEXT_FIELDS, "categories", "image_url", "image_path")}
    require_columns(frame, path, sorted({c for cols in mapped.values() for c in cols} | set(spec.extra)))
    out = pd.DataFrame(index=frame.index)
    for name in JOINED_TEXT_FIELDS:
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
    if root.is_file():
        raise DatasetError(f"{root}: is a file, not a folder (--root)")
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
        inputs=[str(inter_path), *([items_path] if items_path else []), *meta.get("join_unmatched", {})],
    )
