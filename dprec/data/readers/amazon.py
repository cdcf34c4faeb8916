"""Raw Amazon review data (McAuley et al.), 2014 and 2018 releases, JSON lines, plain or ``.gz``.

Reviews: ``reviewerID``, ``asin``, ``overall`` (rating), ``unixReviewTime``. Meta, per item:

- 2014: ``title``, ``description`` (str), ``brand``, ``categories`` (list of lists), ``imUrl``;
  the lines are often Python literals (single quotes), read with ``ast.literal_eval``.
- 2018: ``title``, ``description`` (list), ``brand``, ``category`` (list),
  ``imageURLHighRes`` / ``imageURL`` (lists; the first high-resolution one is kept).

A review without ``reviewerID`` or ``asin``, or with a non-integer time or non-numeric rating,
(or an ID holding a control character, see ``common.id_problem``) is malformed. Reviews of
items missing from the meta file are ``unknown_item`` skips.
``image_template`` (e.g. ``/data/img/{item_id}.jpg``) sets ``image_path`` where the file exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.data.dataset import DatasetError
from dprec.data.readers.common import (
    RawData,
    SkipLog,
    apply_image_template,
    id_problem,
    read_json_lines,
    require_file,
)


def _review(rec: dict[str, Any]) -> tuple[str, str, float, int]:
    user, item = rec.get("reviewerID"), rec.get("asin")
    if not user or not item:
        raise ValueError("review without reviewerID or asin")
    problem = id_problem(user, "reviewerID") or id_problem(item, "asin")
    if problem:
        raise ValueError(problem)
    rating = rec.get("overall")
    when = rec.get("unixReviewTime")
    try:
        rating = float(rating) if rating is not None else np.nan
    except (TypeError, ValueError):
        raise ValueError(f"overall {rating!r} is not a number") from None
    if when is not None and not (isinstance(when, int) or (isinstance(when, str) and when.strip().isdigit())):
        raise ValueError(f"unixReviewTime {when!r} is not an integer")
    return str(user).strip(), str(item).strip(), rating, int(when) if when is not None else -1


def read_reviews(path: Path, skips: SkipLog) -> pd.DataFrame:
    rows = []
    for lineno, rec in read_json_lines(path, skips):
        try:
            rows.append((*_review(rec), lineno))
        except ValueError as exc:
            skips.add("malformed", path, [lineno], str(exc))
    if not rows:
        raise DatasetError(f"{path}: no readable reviews")
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp", "line"])
    frame["split"] = np.int8(-1)
    return frame.astype({"user_id": object, "item_id": object})


def _text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v).strip() for v in value if str(v).strip())
    return str(value).strip() if value is not None else ""


def _categories(rec: dict[str, Any]) -> str:
    """2014 ``categories`` (list of lists) or 2018 ``category`` (list), flattened, first occurrence kept."""
    raw = rec.get("categories", rec.get("category", []))
    flat = (
        [c for group in raw for c in (group if isinstance(group, list) else [group])] if isinstance(raw, list) else []
    )
    return "|".join(dict.fromkeys(str(c).strip() for c in flat if str(c).strip()))


def _image_url(rec: dict[str, Any]) -> str:
    for key in ("imageURLHighRes", "imageURL", "imUrl"):
        value = rec.get(key)
        if isinstance(value, list) and value:
            return str(value[0])
        if isinstance(value, str) and value:
            return value
    return ""


def read_meta(path: Path, skips: SkipLog, wanted: set[str] | None) -> pd.DataFrame:
    """Item rows of the meta file (only ``wanted`` ASINs when given)."""
    rows = []
    for lineno, rec in read_json_lines(path, skips):
        asin = rec.get("asin")
        if not asin:
            skips.add("malformed", path, [lineno], "meta record without asin")
            continue
        problem = id_problem(asin, "asin")
        if problem:
            skips.add("malformed", path, [lineno], problem)
            continue
        asin = str(asin).strip()
        if wanted is not None and asin not in wanted:
            continue
        rows.append(
            (
                str(asin),
                _text(rec.get("title")),
                _text(rec.get("description")),
                _text(rec.get("brand")),
                _categories(rec),
                _image_url(rec),
                lineno,
            )
        )
    columns = ["item_id", "title", "description", "brand", "categories", "image_url", "line"]
    return pd.DataFrame(rows, columns=columns).astype({"item_id": object})


def read_amazon(
    reviews: str | Path,
    meta: str | Path | None,
    skips: SkipLog,
    image_template: str | None = None,
    keep_cold_items: bool = False,
) -> RawData:
    """Reviews plus (optionally) meta; default 5-core and random split, as the MMRec benchmarks."""
    reviews_path = Path(reviews).resolve()
    require_file(reviews_path, " (--reviews)")
    if meta is not None:
        require_file(Path(meta).resolve(), " (--meta)")
    if image_template and meta is None:
        raise DatasetError("--image-template needs --meta (image paths are item fields)")
    inter = read_reviews(reviews_path, skips)
    source: dict[str, Any] = {"kind": "amazon", "reviews": str(reviews_path)}
    items = None
    meta_path = ""
    if meta is not None:
        meta_path = str(Path(meta).resolve())
        wanted = None if keep_cold_items else set(inter["item_id"])
        items = read_meta(Path(meta_path), skips, wanted)
        if image_template:
            items["image_path"] = apply_image_template(items["item_id"], image_template, Path.cwd())
        source["meta"] = meta_path
    name = reviews_path.name.split(".")[0]
    return RawData(
        name=name,
        source=source,
        interactions=inter,
        interactions_path=str(reviews_path),
        items=items,
        items_path=meta_path,
        default_kcore=5,
        default_split="random",
        keep_cold_items=keep_cold_items,
        inputs=[str(reviews_path), *([meta_path] if meta_path else [])],
    )
