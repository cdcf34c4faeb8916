"""A catalogue that grows: new items appended to a dataset, which keeps every index it had (DESIGN §6).

    python -m dprec.prepare add-items --dataset data/scientific --items new_items.json --out data/scientific-v2

The new items come as ``{"<item id>": {"title", "description", "brand", "categories", "image_path",
"image_url", ...}}`` (the item records of ``prepare sequence``: :func:`dprec.data.readers.sequence.read_item_records`;
``image_path`` relative to the JSON file's folder, or absolute). They get the indices after the last item,
in the file's order; users, interactions and their split labels stay as they were, so the new items have
no interaction at all (nobody has bought them yet). Because the first items are unchanged, the grown
catalogue's first ``n`` items hash as the old catalogue (:func:`dprec.data.dataset.items_prefix_hash`):
extraction keeps the old feature shards and writes the new items' only, and a trained model's items map
onto the grown catalogue by index. ``dataset.json`` records ``grown_from`` (the old content hash, item
count, items hash and the file the items came from).

An item ID that the catalogue already has, or that the file repeats, is an error naming it: adding
an item twice is a mistake, not an update.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.data.dataset import Dataset, DatasetError, items_hash, make_dataset
from dprec.data.readers.common import SkipLog
from dprec.data.readers.sequence import read_item_records
from dprec.data.schema import ITEM_COLUMNS

IMAGE_FIELDS = ("image_path", "image_url")


def read_new_items(path: str | Path, skips: SkipLog) -> pd.DataFrame:
    """The records of ``path`` as item rows (``item_id``, text fields, image references, ``extra``)."""
    path = Path(path)
    records = read_item_records(path, skips)
    if records.empty:
        raise DatasetError(f'{path}: no item records (expected {{"<item id>": {{"title": ...}}, ...}})')
    rows = records.rename(columns={"item_key": "item_id"}).drop(columns=["line"])
    images: dict[str, list[str]] = {field: [] for field in IMAGE_FIELDS}
    extras = []
    for value in rows["extra"]:
        attrs = json.loads(value) if value else {}
        for field in IMAGE_FIELDS:
            ref = attrs.pop(field, "")
            ref = ref if isinstance(ref, str) else ""
            if field == "image_path" and ref and not Path(ref).is_absolute():
                ref = str((path.parent / ref).resolve())
            images[field].append(ref)
        extras.append(json.dumps(attrs, ensure_ascii=False, sort_keys=True) if attrs else "")
    rows = rows.assign(extra=extras, **images)
    rows["item_id"] = rows["item_id"].astype(str)
    return rows


def append_items(ds: Dataset, new_items: pd.DataFrame, source: str = "") -> Dataset:
    """``ds`` with ``new_items`` appended after its last item (see the module docstring). The folder of ``source``
    is recorded as the new items' image root (``grown_from[-1].image_root``, which extraction reads images from)."""
    known = set(ds.items["item_id"].astype(str))
    clash = next((i for i in new_items["item_id"] if i in known), None)
    if clash is not None:
        raise DatasetError(f"{source or 'new items'}: item {clash!r} is already in the catalogue of {ds.name!r}")
    repeated = new_items["item_id"].duplicated()
    if repeated.any():
        raise DatasetError(f"{source or 'new items'}: item {new_items['item_id'][repeated].iloc[0]!r} is listed twice")
    added = new_items.copy()
    added["item_idx"] = np.arange(ds.n_items, ds.n_items + len(added))
    for col in ITEM_COLUMNS:
        if col not in added:
            added[col] = b"" if col == "image_bytes" else ""
    items = pd.concat([ds.items, added[list(ITEM_COLUMNS)]], ignore_index=True)
    meta: dict[str, Any] = {k: v for k, v in ds.meta.items() if k not in ("files", "content_hash")}
    growth = {
        "content_hash": ds.meta.get("content_hash", ""),
        "n_items": ds.n_items,
        "items_hash": items_hash(ds),
        "added": len(added),
        "source": source,
    }
    if source and (added["image_path"] != "").any():
        growth["image_root"] = str(Path(source).resolve().parent)
    meta["grown_from"] = [*ds.meta.get("grown_from", []), growth]
    return make_dataset(ds.name, ds.interactions, items, ds.users, meta)
