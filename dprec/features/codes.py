"""Per-item discrete codes -> one-hot-per-level feature shards (``python -m dprec.extract import-codes``).

A code file is one JSON object, ``{"<item key>": ["<a_170>", "<b_224>", "<c_251>", "<d_151>"], ...}``:
per item one code ``<level_value>`` per level of a residual quantiser (TIGER / LC-Rec style
semantic IDs). The encoding is inferred from the file and recorded in the manifest's spec:

- the number of levels is the most common list length, and level ``j`` is named by the most
  common level name at position ``j`` (``a b c d``, or ``A B C D``);
- ``values_per_level`` is the largest value in the file + 1 (or given with ``--values-per-level``);
- an item's vector is ``levels x values_per_level`` float32 numbers, one-hot per level and the
  levels concatenated: code ``<b_224>`` sets entry ``1 * values_per_level + 224``.

The join: a key goes through the item map (``ASIN<TAB>index`` lines; by default the one ``prepare``
read, recorded as ``source.item_ids`` in ``dataset.json``; ``--item-ids none``: no map) to an item
ID of the dataset. Per-item faults never fail the import: a dataset item absent from the file,
or whose list is malformed (not a list of the levels in order, a value out of range, a repeated
key), gets a zero vector flagged ``<m>_code_missing`` / ``<m>_code_malformed`` and counted in the
manifest; a file entry naming no dataset item is skipped and counted (``<m>_code_not_in_dataset``
in the summary, with examples in the manifest's provenance). Above ``--max-missing-share`` of the
items without a code, or with no entry matching at all, the import fails before writing a shard:
that is a wrong file or a wrong key map, not a few bad entries.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.config import DPRecError
from dprec.data.dataset import load_dataset
from dprec.data.readers.common import SkipLog, read_json_object, require_file
from dprec.data.readers.sequence import read_id_map
from dprec.features.config import CodesImportConfig
from dprec.features.pipeline import ExtractError, RunSummary, dataset_spec, write_precomputed
from dprec.io import sha256_file

CODE = re.compile(r"<([A-Za-z][A-Za-z0-9]*)_(\d{1,9})>")
MAX_EXAMPLES = 5
MISSING, MALFORMED = -1, -2
log = logging.getLogger(__name__)


@dataclass
class CodeEncoding:
    """How a code list becomes a vector: one-hot per level, levels concatenated."""

    levels: list[str]
    values_per_level: int
    values_from: str

    @property
    def dim(self) -> int:
        return len(self.levels) * self.values_per_level

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "one-hot per level, levels concatenated",
            "code_format": "<level_value>",
            "levels": list(self.levels),
            "values_per_level": self.values_per_level,
            "values_per_level_from": self.values_from,
            "dim": self.dim,
        }


@dataclass
class CodeFile:
    """A code file read and checked: per entry its key, its values per level (or None) and why not."""

    path: Path
    keys: list[str]
    values: np.ndarray
    """(entries, levels) int64; rows of bad entries are -1."""
    problems: list[str | None]
    lines: list[int]
    encoding: CodeEncoding


def _parse(value: Any) -> list[tuple[str, int]] | None:
    """``["<a_1>", ...]`` -> [("a", 1), ...]; None when it is not a list of codes."""
    if not isinstance(value, list) or not value:
        return None
    parsed = []
    for code in value:
        match = CODE.fullmatch(code.strip()) if isinstance(code, str) else None
        if match is None:
            return None
        parsed.append((match.group(1), int(match.group(2))))
    return parsed


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_code_file(path: str | Path, values_per_level: int | None = None) -> CodeFile:
    """Read ``path``, infer its encoding (module docstring) and check every entry against it."""
    path = Path(path)
    try:
        entries = read_json_object(require_file(path, " (--codes)"))
    except DPRecError as exc:
        raise ExtractError(str(exc)) from exc
    parsed = [_parse(value) for _, value, _ in entries]
    good = [p for p in parsed if p is not None]
    if not good:
        raise ExtractError(f'{path}: no entry is a list of codes like ["<a_170>", "<b_224>"]; is this a code file?')
    n_levels = Counter(len(p) for p in good).most_common(1)[0][0]
    full = [p for p in good if len(p) == n_levels]
    levels = [Counter(p[j][0] for p in full).most_common(1)[0][0] for j in range(n_levels)]
    if len(set(levels)) != n_levels:
        raise ExtractError(f"{path}: cannot tell the code levels apart (the positions are named {levels})")
    largest = max(v for p in full for (name, v), level in zip(p, levels, strict=True) if name == level)
    if values_per_level is None:
        encoding = CodeEncoding(levels, largest + 1, "largest value in the file + 1")
    else:
        encoding = CodeEncoding(levels, values_per_level, "given (--values-per-level)")
    values = np.full((len(entries), n_levels), -1, np.int64)
    problems: list[str | None] = []
    for row, p in enumerate(parsed):
        raw = entries[row][1]
        if p is None:
            problems.append(f"{_shown(raw)} is not a list of codes <level_value>")
        elif [name for name, _ in p] != levels:
            problems.append(f"{_shown(raw)} does not have the levels {' '.join(levels)} in this order")
        elif max(v for _, v in p) >= encoding.values_per_level:
            problems.append(f"{_shown(raw)} has a value above {encoding.values_per_level - 1}")
        else:
            problems.append(None)
            values[row] = [v for _, v in p]
    keys = []
    for key, _, _ in entries:
        key = key.strip()
        keys.append(str(int(key)) if re.fullmatch(r"[+-]?\d{1,18}", key) else key)
    return CodeFile(path, keys, values, problems, [line for _, _, line in entries], encoding)


def _item_map(cfg: CodesImportConfig, dataset: Any) -> tuple[Path | None, str]:
    """The key map to use and where it came from (given, recorded by prepare, or none)."""
    if cfg.item_ids == "none":
        return None, "none (--item-ids none): the keys are the dataset's item IDs"
    if cfg.item_ids:
        return Path(cfg.item_ids), "given (--item-ids)"
    source = dataset.meta.get("source") if isinstance(dataset.meta.get("source"), dict) else {}
    recorded = source.get("item_ids")
    if source.get("kind") != "sequence" or not isinstance(recorded, str):
        return None, "none: the keys are the dataset's item IDs (prepare read no ASIN<TAB>index item map)"
    if not Path(recorded).is_file():
        raise ExtractError(
            f"dataset {dataset.name!r} was prepared with the item map {recorded}, which is gone; "
            "pass --item-ids MAP (or --item-ids none if the code file is keyed by item ID)"
        )
    return Path(recorded), "recorded by prepare (source.item_ids in dataset.json)"


class _Join:
    """Which entry of a code file each dataset item takes (a row, MISSING or MALFORMED), and what was left over."""

    def __init__(self, codes: CodeFile, item_ids: pd.Series, key_map: pd.Series | None):
        ids = pd.Series(codes.keys, dtype=object)
        if key_map is not None:
            ids = ids.map(key_map)
        position = pd.Series(np.arange(len(item_ids)), index=item_ids.astype(str).to_numpy())
        target = ids.map(position)
        self.rows = np.full(len(item_ids), MISSING, np.int64)
        self.not_in_dataset: list[int] = []
        self.repeated: list[int] = []
        self.malformed: dict[int, str] = {}
        for entry, item in enumerate(target.to_numpy()):
            if item != item:  # NaN: no dataset item
                self.not_in_dataset.append(entry)
                continue
            item = int(item)
            if self.rows[item] != MISSING or item in self.malformed:
                self.repeated.append(entry)
                self.rows[item] = MALFORMED
                self.malformed[item] = f"listed again (key {codes.keys[entry]!r}, line {codes.lines[entry]})"
                continue
            problem = codes.problems[entry]
            if problem is None:
                self.rows[item] = entry
            else:
                self.rows[item] = MALFORMED
                self.malformed[item] = f"{problem} (key {codes.keys[entry]!r}, line {codes.lines[entry]})"

    def vectors(self, codes: CodeFile, first: int, stop: int) -> tuple[np.ndarray, list[str | None]]:
        """The one-hot vectors of items ``first..stop-1`` and each one's fault kind (None: coded)."""
        enc = codes.encoding
        rows = self.rows[first:stop]
        out = np.zeros((stop - first, enc.dim), np.float32)
        ok = np.flatnonzero(rows >= 0)
        if len(ok):
            columns = codes.values[rows[ok]] + np.arange(len(enc.levels)) * enc.values_per_level
            out[np.repeat(ok, len(enc.levels)), columns.ravel()] = 1.0
        kinds = [None if r >= 0 else "code_missing" if r == MISSING else "code_malformed" for r in rows]
        return out, kinds


def import_codes(cfg: CodesImportConfig) -> RunSummary:
    """Per-item code files -> shards of the ``dprec-item-features`` format, one modality per file."""
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.dataset)
    map_path, map_from = _item_map(cfg, dataset)
    key_map = None
    if map_path is not None:
        try:
            key_map = read_id_map(require_file(map_path, " (--item-ids)"), SkipLog(strict=True), "item")
        except DPRecError as exc:
            raise ExtractError(str(exc)) from exc
    item_ids = dataset.items["item_id"].astype(str)
    files: dict[str, CodeFile] = {}
    joins: dict[str, _Join] = {}
    modalities: dict[str, Any] = {}
    provenance: dict[str, Any] = {"executor": "import-codes", "dataset_content_hash": dataset.meta["content_hash"]}
    unmatched: dict[str, int] = {}
    join: dict[str, Any] = {"map": map_path.name if map_path else None}  # map_from is provenance: not the numbers
    if map_path is not None:
        join["map_sha256"] = sha256_file(map_path)
    provenance["join"] = {"map_path": str(map_path.resolve()) if map_path else None, "map_from": map_from}
    for m, path in zip(cfg.modality, cfg.codes, strict=True):
        codes = read_code_file(path, cfg.values_per_level)
        matched = _Join(codes, item_ids, key_map)
        n_missing = int((matched.rows == MISSING).sum())
        n_bad = int((matched.rows == MALFORMED).sum())
        if n_missing == dataset.n_items:
            hint = "pass --item-ids MAP (ASIN<TAB>index)" if key_map is None else "is --item-ids the right map?"
            raise ExtractError(
                f"{path}: none of its {len(codes.keys)} keys (like {codes.keys[:2]}) names an item of dataset "
                f"{dataset.name!r} (item IDs like {item_ids.iloc[:2].tolist()}); {hint}"
            )
        if n_missing + n_bad > cfg.max_missing_share * dataset.n_items:
            raise ExtractError(
                f"{path}: {n_missing + n_bad} of {dataset.n_items} items of dataset {dataset.name!r} have no "
                f"well-formed code ({n_missing} absent, {n_bad} malformed), more than --max-missing-share "
                f"{cfg.max_missing_share:g}: the wrong file, or the wrong key map ({map_from}); nothing was written"
            )
        files[m], joins[m] = codes, matched
        enc = codes.encoding
        log.info(
            "[codes] %s: %s, %d entries; levels %s x %d values = %d-d; %d of %d items coded, %d absent, "
            "%d malformed; %d entries name no dataset item",
            m,
            Path(path).name,
            len(codes.keys),
            "".join(enc.levels),
            enc.values_per_level,
            enc.dim,
            dataset.n_items - n_missing - n_bad,
            dataset.n_items,
            n_missing,
            n_bad,
            len(matched.not_in_dataset),
        )
        for item, why in list(matched.malformed.items())[:MAX_EXAMPLES]:
            log.info("[codes] %s: item %d (%s): %s; stored as zeros", m, item, item_ids.iloc[item], why)
        modalities[m] = {
            "name": "code-import",
            "source_file": Path(path).name,
            "revision": {"sha256": sha256_file(Path(path))},
            "pooling": "precomputed",
            "encoding": enc.describe(),
            "join": join,
        }
        provenance[m] = {
            "load_path": str(Path(path).resolve()),
            "entries": len(codes.keys),
            "entries_not_in_dataset": len(matched.not_in_dataset),
            "entries_not_in_dataset_examples": [codes.keys[e] for e in matched.not_in_dataset[:MAX_EXAMPLES]],
            "entries_repeated": len(matched.repeated),
            "items_coded": dataset.n_items - n_missing - n_bad,
            "items_absent": n_missing,
            "items_malformed": n_bad,
            "malformed_examples": [f"item {i}: {why}" for i, why in list(matched.malformed.items())[:MAX_EXAMPLES]],
        }
        if matched.not_in_dataset:
            unmatched[f"{m}_code_not_in_dataset"] = len(matched.not_in_dataset)
    spec = {
        "dataset": dataset_spec(dataset),
        "items_per_shard": cfg.items_per_shard,
        "store_dtype": cfg.store_dtype,
        "modalities": modalities,
    }

    def shard_vectors(first: int, stop: int) -> tuple[dict[str, np.ndarray], list[list[str]]]:
        flags: list[list[str]] = [[] for _ in range(stop - first)]
        vectors = {}
        for m, codes in files.items():
            vectors[m], kinds = joins[m].vectors(codes, first, stop)
            for row, kind in enumerate(kinds):
                if kind is not None:
                    flags[row].append(f"{m}_{kind}")
        return vectors, flags

    return write_precomputed(cfg.out, cfg.overwrite, dataset, spec, provenance, shard_vectors, t0, unmatched)
