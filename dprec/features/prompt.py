"""What a text model reads of an item: its fields cleaned and put into a prompt template.

An item's ``{item}`` text is its non-empty fields in ``ITEM_TEXT_FIELDS`` order, one per line::

    Title: <title>
    Brand: <brand>
    Categories: <categories, "|" shown as ", ">
    Description: <description>

A template names ``{item}``, single fields (``{title}``) or attributes of the items' ``extra``
object (``{director}``; lists joined by ", ", a missing one empty). Decoder LLMs default to a
PromptEOL-style template whose last token summarises the item (Jiang et al. 2023, "Scaling
sentence embeddings with large language models"), encoders to ``{item}``. Fields are capped at
``max_chars`` characters before tokenising; bytes that are not UTF-8 are decoded with U+FFFD.
"""

from __future__ import annotations

import functools
import json
import string
from typing import Any

import numpy as np

from dprec.data.schema import ITEM_TEXT_FIELDS

LLM_TEMPLATE = 'This item: "{item}" means in one word:"'
ENCODER_TEMPLATE = "{item}"
FIELD_LABELS = {"title": "Title", "brand": "Brand", "categories": "Categories", "description": "Description"}


@functools.lru_cache(maxsize=64)
def template_fields(template: str) -> frozenset[str]:
    """The ``{name}`` fields of a prompt template; positional, indexed or formatted fields are refused.

    Cached: it is asked for every item that is rendered.
    """
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"field {{{name}}} must be a plain name such as {{title}} or {{director}}")
        names.add(name)
    return frozenset(names)


def extra_fields(template: str) -> list[str]:
    """Template fields that are not ``{item}`` or a standard text field: they come from items' ``extra``."""
    return sorted(template_fields(template) - {"item", *ITEM_TEXT_FIELDS})


def extra_value_text(value: Any) -> str:
    """An ``extra`` attribute as prompt text: lists joined by ", ", None as empty, the rest as str."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value).strip()


def clean_field(value: Any, max_chars: int) -> tuple[str, list[str]]:
    """A text field as str, with flags: bytes that are not UTF-8 are decoded with U+FFFD (``text_not_utf8``).

    Bytes reach here when an items table stores a text column as binary (written by another
    tool than ``make_dataset``) or when items are handed to the library directly.
    """
    flags = []
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "", flags
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("utf-8", errors="replace")
            flags.append("text_not_utf8")
    value = str(value).strip()
    if len(value) > max_chars:
        value = value[:max_chars]
        flags.append("text_truncated")
    return value, flags


def render_item(fields: dict[str, str], template: str) -> str:
    """The prompt of one item: labelled non-empty fields joined by newlines, put into the template.

    ``fields`` holds the standard text fields and, for templates that name them, ``extra`` attributes
    already rendered as text (:func:`extra_value_text`); absent ones render empty.
    """
    shown = dict(fields, categories=", ".join(c for c in fields.get("categories", "").split("|") if c))
    lines = [f"{FIELD_LABELS[k]}: {shown[k]}" for k in ITEM_TEXT_FIELDS if shown.get(k)]
    values = {name: shown.get(name, "") for name in template_fields(template) if name != "item"}
    return template.format_map({**values, "item": "\n".join(lines)})


def has_text(fields: dict[str, str], template: str) -> bool:
    """Whether any field the template shows (``{item}`` = all standard fields) is non-empty."""
    names = template_fields(template)
    used = (names - {"item"}) | (set(ITEM_TEXT_FIELDS) if "item" in names else set())
    return any(fields.get(k) for k in used)
