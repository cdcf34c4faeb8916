"""From :class:`RawData` to the canonical :class:`Dataset`: clean, filter, re-index, split.

Order of operations, each counted in ``dataset.json``:

1. duplicate (user, item) interactions: the earliest is kept (by timestamp, then source line);
   the others are skipped as ``duplicate_interaction`` (repeat purchases, double-submitted reviews).
2. interactions naming an item that the item table lacks: skipped as ``unknown_item``.
3. k-core: users and items with fewer than ``kcore`` interactions are removed, repeated until
   stable (``kcore: 1`` keeps everything). Nothing left is an error.
4. dense indices: users and items sorted by the source's integer keys when it has them (MMRec
   IDs stay the indices), else by ID (numerically when every ID is an integer, else as text).
   Catalogue items without interactions are dropped unless ``keep_cold_items``.
5. split (:mod:`dprec.data.splits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dprec.config import check_types
from dprec.data.dataset import Dataset, DatasetError, make_dataset
from dprec.data.readers.common import RawData, SkipLog, contains
from dprec.data.schema import ITEM_COLUMNS
from dprec.data.splits import (
    COLD_ITEMS,
    COLD_META_KEY,
    DEFAULT_COLD_SHARE,
    DEFAULT_RATIOS,
    SplitRule,
    assign_split,
    choose_cold_items,
    cold_split_meta,
)

STRING_ITEM_FIELDS = tuple(c for c in ITEM_COLUMNS if c not in ("item_idx", "item_id", "image_bytes"))


@dataclass
class BuildOptions:
    """How to turn raw data into the dataset; ``None`` means the source's default."""

    split: SplitRule | None = None
    """Split rule (see dprec.data.splits); default: the source's."""
    seed: int = 0
    """Seed of the random split (synthetic: of the generator, default 7)."""
    kcore: int | None = None
    """Minimum interactions per user and per item, applied until stable; 1 keeps everything."""
    keep_cold_items: bool | None = None
    """Keep catalogue items that have no interactions (content-only items)."""
    ratios: tuple[float, float, float] = field(default=DEFAULT_RATIOS, metadata={"cli": False})
    """Train, valid and test shares of each user's interactions."""
    cold_share: float = DEFAULT_COLD_SHARE
    """Split cold-items: the share of the items with interactions held out of training (half of them validation
    items, half test items; see dprec.data.splits)."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.kcore is not None and self.kcore < 1:
            raise DatasetError(f"kcore must be at least 1 (1 = no filtering), got {self.kcore}")
        if not 0 < self.cold_share < 1:
            raise DatasetError(f"cold_share must lie strictly between 0 and 1, got {self.cold_share}")


def drop_duplicates(inter: pd.DataFrame, path: str, skips: SkipLog) -> pd.DataFrame:
    """Keep each (user, item) pair's earliest interaction (timestamp, then line); count the rest."""
    users, _ = pd.factorize(inter["user_id"])
    items, item_ids = pd.factorize(inter["item_id"])
    pair = users.astype(np.int64) * max(len(item_ids), 1) + items
    order = np.lexsort((inter["line"].to_numpy(), inter["timestamp"].to_numpy()))
    dup = np.zeros(len(inter), bool)
    dup[order] = pd.Series(pair[order]).duplicated(keep="first").to_numpy()
    dropped = inter[dup]
    skips.add(
        "duplicate_interaction",
        path,
        dropped["line"].to_numpy(),
        lambda k: (
            f"user {dropped['user_id'].iloc[k]!r} and item {dropped['item_id'].iloc[k]!r} again; kept the earliest"
        ),
    )
    return inter[~dup]


def drop_unknown_items(inter: pd.DataFrame, items: pd.DataFrame, path: str, skips: SkipLog) -> pd.DataFrame:
    unknown = ~contains(items["item_id"], inter["item_id"])
    bad = inter[unknown]
    skips.add(
        "unknown_item",
        path,
        bad["line"].to_numpy(),
        lambda k: f"item {bad['item_id'].iloc[k]!r} is not in the item table",
    )
    return inter[~unknown]


def kcore_filter(inter: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Rows of users and items with at least ``k`` interactions, iterated until stable; and the round count."""
    users, _ = pd.factorize(inter["user_id"])
    items, _ = pd.factorize(inter["item_id"])
    keep = np.ones(len(inter), bool)
    rounds = 0
    while k > 1:
        rounds += 1
        user_n = np.bincount(users[keep], minlength=users.max() + 1 if len(users) else 0)
        item_n = np.bincount(items[keep], minlength=items.max() + 1 if len(items) else 0)
        new_keep = keep & (user_n[users] >= k) & (item_n[items] >= k)
        if new_keep.sum() == keep.sum():
            break
        keep = new_keep
    return inter[keep], rounds


def id_order(ids: pd.Series, keys: pd.Series | None = None) -> np.ndarray:
    """A permutation sorting ``ids``: by ``keys`` if given, else numerically if all IDs are integers, else as text."""
    text = ids.astype(str).to_numpy()
    if keys is not None:
        return np.lexsort((text, keys.to_numpy(np.int64)))
    numeric = pd.to_numeric(ids, errors="coerce")
    if numeric.notna().all() and (numeric == numeric.round()).all():
        return np.lexsort((text, numeric.to_numpy()))
    return np.argsort(text, kind="stable")


def _users(inter: pd.DataFrame) -> pd.DataFrame:
    first = inter.drop_duplicates("user_id")
    keys = first["user_key"] if "user_key" in first else None
    ids = first["user_id"].to_numpy()[id_order(first["user_id"], keys)]
    return pd.DataFrame({"user_idx": np.arange(len(ids)), "user_id": ids})


def _items(inter: pd.DataFrame, catalogue: pd.DataFrame | None, keep_cold: bool) -> pd.DataFrame:
    if catalogue is None:
        items = inter.drop_duplicates("item_id")[["item_id", *(["item_key"] if "item_key" in inter else [])]]
    elif keep_cold:
        items = catalogue
    else:
        items = catalogue[contains(inter["item_id"], catalogue["item_id"])]
    keys = items["item_key"] if "item_key" in items else None
    items = items.iloc[id_order(items["item_id"], keys)].reset_index(drop=True)
    items["item_idx"] = np.arange(len(items))
    for col in STRING_ITEM_FIELDS:
        items[col] = items[col].fillna("").astype(str) if col in items else ""
    return items


def _keys_are_index(frame: pd.DataFrame, key: str) -> bool:
    return key in frame and np.array_equal(frame[key].to_numpy(np.int64), np.arange(len(frame)))


def build_dataset(raw: RawData, options: BuildOptions, skips: SkipLog) -> Dataset:
    """Clean, filter, re-index and split ``raw`` (see the module docstring); counts go to ``meta``."""
    split = options.split or raw.default_split
    kcore = options.kcore if options.kcore is not None else raw.default_kcore
    keep_cold = options.keep_cold_items if options.keep_cold_items is not None else raw.keep_cold_items
    inter = drop_duplicates(raw.interactions, raw.interactions_path, skips)
    catalogue = raw.items
    if catalogue is not None:
        dup = catalogue["item_id"].duplicated()
        skips.add(
            "duplicate_item",
            raw.items_path,
            catalogue.loc[dup, "line"].to_numpy(),
            lambda k: f"item {catalogue.loc[dup, 'item_id'].iloc[k]!r} listed again; kept the first",
        )
        catalogue = catalogue[~dup]
        inter = drop_unknown_items(inter, catalogue, raw.interactions_path, skips)
    before = len(inter)
    inter, rounds = kcore_filter(inter, kcore)
    if inter.empty:
        raise DatasetError(
            f"{raw.interactions_path}: no interactions left after {kcore}-core filtering "
            f"({before} before); lower --kcore (1 = no filtering)"
        )

    users = _users(inter)
    items = _items(inter, catalogue, keep_cold)
    frame = pd.DataFrame(
        {
            "user_idx": inter["user_id"]
            .map(pd.Series(users["user_idx"].to_numpy(), index=users["user_id"]))
            .to_numpy(),
            "item_idx": inter["item_id"]
            .map(pd.Series(items["item_idx"].to_numpy(), index=items["item_id"]))
            .to_numpy(),
            "timestamp": inter["timestamp"].to_numpy(np.int64),
            "rating": inter["rating"].to_numpy(np.float64),
            "split": inter["split"].to_numpy(np.int8),
        }
    )
    held_out = (
        choose_cold_items(frame["item_idx"].to_numpy(), options.seed, options.cold_share)
        if split == COLD_ITEMS
        else None
    )
    frame["split"] = assign_split(frame, split, seed=options.seed, ratios=options.ratios, held_out=held_out)
    frame = frame.sort_values(["user_idx", "item_idx"], kind="stable").reset_index(drop=True)

    meta: dict[str, Any] = {
        "source": raw.source,
        "split_rule": split,
        "seed": options.seed,
        "split_ratios": list(options.ratios),
        "kcore": kcore,
        "kcore_rounds": rounds,
        "kcore_removed_interactions": before - len(inter),
        "keep_cold_items": keep_cold,
        "cold_items": int(len(items) - frame["item_idx"].nunique()),
        "skipped": skips.summary(),
        **raw.meta,
    }
    if held_out is not None:
        meta[COLD_META_KEY] = cold_split_meta(held_out, options.seed, options.cold_share)
    if "user_key" in inter and "item_key" in items:
        meta["source_ids_preserved_as_index"] = bool(
            _keys_are_index(items, "item_key") and _keys_are_index(_user_keys(inter, users), "user_key")
        )
    return make_dataset(raw.name, frame, items.drop(columns=["item_key", "line"], errors="ignore"), users, meta)


def _user_keys(inter: pd.DataFrame, users: pd.DataFrame) -> pd.DataFrame:
    keys = inter.drop_duplicates("user_id").set_index("user_id")["user_key"]
    return users.assign(user_key=users["user_id"].map(keys).to_numpy())
