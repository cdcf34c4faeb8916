"""The canonical dataset's columns and labels (DESIGN §2), named once for every stage.

``interactions.parquet``: ``INTERACTION_DTYPES`` (timestamp -1 and rating NaN when unknown; split
one of ``SPLIT_LABELS``). ``items.parquet``: ``ITEM_COLUMNS`` in this order (text fields str, "" when
missing; ``categories`` "|"-joined; ``image_path`` absolute or relative to the dataset folder;
``image_bytes`` binary, b"" when none; ``extra`` a JSON object of further attributes, "" when none).
``users.parquet``: ``USER_COLUMNS``. Indices are dense from 0.

``ITEM_TEXT_FIELDS`` is in prompt order: the order in which a text model sees the fields
(:func:`dprec.features.prompt.render_item`), so it decides the features' numbers.
"""

from __future__ import annotations

SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
SPLIT_LABELS = (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST)
SPLIT_NAMES = {SPLIT_TRAIN: "train", SPLIT_VALID: "valid", SPLIT_TEST: "test"}
COLD_META_KEY = "cold_start"
"""``dataset.json`` key of a cold-items split (:mod:`dprec.data.splits`): the items held out of training."""

ITEM_TEXT_FIELDS = ("title", "brand", "categories", "description")
ITEM_IMAGE_COLUMNS = ("image_path", "image_url", "image_bytes")
ITEM_COLUMNS = ("item_idx", "item_id", "title", "description", "brand", "categories", *ITEM_IMAGE_COLUMNS, "extra")
INTERACTION_DTYPES = {
    "user_idx": "int64",
    "item_idx": "int64",
    "timestamp": "int64",
    "rating": "float32",
    "split": "int8",
}
INTERACTION_COLUMNS = tuple(INTERACTION_DTYPES)
USER_COLUMNS = ("user_idx", "user_id")
