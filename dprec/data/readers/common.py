"""What every reader shares: the raw-data hand-over, the skip log, and file opening that checks contents.

A reader turns one kind of input into :class:`RawData` (string IDs, source line numbers);
:func:`dprec.data.readers.build.build_dataset` turns that into the canonical dataset.
Bad input (the full table: docs/data-and-features.md): a file that is not what its name says,
unreadable JSON documents or missing required columns are a :class:`DatasetError`; a malformed
line or row (wrong field count, non-integer ID where one is required, bad JSON, number or date,
JSON nested deeper than ``MAX_JSON_DEPTH``, missing ID, an ID holding a control character) is
skipped and counted as ``malformed``, and more than ``max_malformed`` of them is an error; with
``strict`` every skip is an error (checks run per kind over the whole file, so the first error
reported is the first of the first failing check). Every message names ``path:line`` (for
Parquet the 1-based row number) and what was wrong; blank lines are ignored.

Text files are UTF-8; a UTF-8 byte order mark is dropped (``utf-8-sig``). A file whose first
``SNIFF_BYTES`` (after gunzipping) are mostly not text (NUL and other control bytes, invalid
UTF-8) is refused as "not a text file"; UTF-16/32 files are refused with the advice to convert.
"""

from __future__ import annotations

import ast
import codecs
import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.data.dataset import DatasetError

SKIP_KINDS = ("malformed", "duplicate_interaction", "duplicate_item", "unknown_item")
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
TEXT_FORMATS = ("csv", "tsv", "json", "jsonl")
FORMATS = (*TEXT_FORMATS, "parquet")
_EXTENSION_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "tsv",
    ".inter": "tsv",
    ".item": "tsv",
    ".user": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_TYPED_HEADER = re.compile(r"^([^:]+):(token|token_seq|float|float_seq)$")
MAX_EXAMPLES = 5
MAX_JSON_DEPTH = 100
"""A JSON record nested deeper than this (lists and objects) is malformed: real records are a few levels deep."""
SNIFF_BYTES = 8192
"""How much of a text file (after gunzipping) is looked at to tell text from binary data."""
BINARY_SHARE = 0.1
"""A file whose sniffed head has more than this share of control bytes or invalid UTF-8 is not text."""
UTF8_BOM = codecs.BOM_UTF8
_WIDE_BOMS = {
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}
# characters that may not appear in a user or item ID: C0/C1 controls (NUL included), zero-width and
# bidirectional formatting characters, line and paragraph separators, the BOM; they make IDs that look
# equal but are not (phantom users and items)
ID_CONTROL_CHARS = "\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_ID_CONTROL = re.compile(f"[{ID_CONTROL_CHARS}]")
_TEXT_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")


@dataclass
class SkipLog:
    """Counts skipped input by kind, keeps the first messages, and enforces ``strict`` / ``max_malformed``."""

    strict: bool = False
    """Any skipped input is an error naming its ``path:line``."""
    max_malformed: int = 100
    """More malformed lines than this is an error (the file is probably not the format you think)."""
    counts: dict[str, int] = field(init=False, default_factory=lambda: dict.fromkeys(SKIP_KINDS, 0))
    examples: list[str] = field(init=False, default_factory=list)

    def add(
        self, kind: str, path: str | Path, lines: Sequence[int] | np.ndarray, what: str | Callable[[int], str]
    ) -> None:
        """Record ``len(lines)`` skips of ``kind``; ``what(k)`` describes the k-th one (built only when shown)."""
        if len(lines) == 0:
            return
        describe = (lambda _k: what) if isinstance(what, str) else what
        first = f"{path}:{int(lines[0])}: {describe(0)}"
        if self.strict:
            raise DatasetError(f"{first} (--strict: {kind} input is an error)")
        self.counts[kind] = self.counts.get(kind, 0) + len(lines)
        shown = sum(m.startswith(f"[{kind}]") for m in self.examples)
        for k in range(min(len(lines), MAX_EXAMPLES - shown)):
            self.examples.append(f"[{kind}] {path}:{int(lines[k])}: {describe(k)}")
        if kind == "malformed" and self.counts[kind] > self.max_malformed:
            raise DatasetError(
                f"{first}; {self.counts[kind]} malformed lines so far, more than --max-malformed "
                f"{self.max_malformed}: is {path} the format you think? (raise the limit to skip them)"
            )

    def summary(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}


@dataclass
class RawData:
    """A source read into memory, before filtering, re-indexing and splitting.

    ``interactions``: ``user_id`` str, ``item_id`` str, ``timestamp`` int64 (-1 unknown), ``rating``
    float64 (NaN unknown), ``split`` int8 (-1 none), ``line`` int64 (source line, for messages and
    tie-breaks); optional ``user_key`` / ``item_key`` int64 give the index order (else the IDs do).
    ``items``: ``item_id`` plus any of the canonical item fields and ``extra`` (JSON text); optional
    ``item_key``; ``line`` for messages. ``None`` means the source has no catalogue.
    """

    name: str
    source: dict[str, Any]
    interactions: pd.DataFrame
    interactions_path: str
    items: pd.DataFrame | None = None
    items_path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    default_kcore: int = 1
    default_split: str = "random"
    keep_cold_items: bool = False
    inputs: list[str] = field(default_factory=list)
    """Every file the reader read (absolute): ``prepare`` refuses an ``--out`` that is or holds one."""
    source_folders: list[str] = field(default_factory=list)
    """Folders read as a whole (an MMRec folder): ``prepare`` also refuses an ``--out`` inside one."""


def detect_format(path: Path, declared: str | None = None) -> str:
    """The table format: ``declared`` if given, else from the extension (``.gz`` stripped)."""
    if declared and declared != "auto":
        if declared not in FORMATS:
            raise DatasetError(f"{path}: unknown format {declared!r}; use one of {', '.join(FORMATS)}")
        return declared
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    fmt = _EXTENSION_FORMATS.get(suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: cannot tell the format from {suffix!r}; pass it ({', '.join(FORMATS)})")
    return fmt


def _head(path: Path, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror})") from exc


def text_problem(head: bytes) -> str | None:
    """Why ``head`` (the first bytes of a file) is not UTF-8 text, or None if it looks like text."""
    for bom, name in _WIDE_BOMS.items():
        if head.startswith(bom):
            return f"is {name} text, not UTF-8; convert it to UTF-8 (e.g. iconv -f {name} -t UTF-8)"
    if not head:
        return None
    if head[:2].count(0) == 1 and head.count(0) * 3 > len(head):
        return "not a text file (it looks like UTF-16 text without a byte order mark; convert it to UTF-8)"
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    bad = len(_TEXT_CONTROL.findall(text))
    if text and bad > BINARY_SHARE * len(text) and (bad >= 8 or 2 * bad > len(text)):
        return (
            f"not a text file ({bad} of its first {len(text)} characters are control bytes or invalid UTF-8: "
            "binary data, or text in another encoding, which must be converted to UTF-8)"
        )
    return None


def open_binary_lines(path: Path) -> Iterator[bytes]:
    """Lines of a UTF-8 text file (byte order mark dropped), gunzipped when named ``.gz``.

    The content must match the name (gzip or not), and must look like text (see the module docstring).
    """
    head = _head(path)
    gz_named, gz_content = path.suffix == ".gz", head.startswith(GZIP_MAGIC)
    if gz_named and not gz_content:
        raise DatasetError(
            f"{path}: named .gz but is not gzip data (starts with {head[:16]!r}); "
            "decompress it properly or drop the .gz"
        )
    if gz_content and not gz_named:
        raise DatasetError(f"{path}: is gzip-compressed but not named .gz; rename it to {path.name}.gz")
    opener = gzip.open if gz_named else open
    try:
        stream = opener(path, "rb")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    with stream as f:
        try:
            head = f.read(SNIFF_BYTES)
            if head.startswith(PARQUET_MAGIC):
                raise DatasetError(f"{path}: is Parquet, not text; give the file its real extension")
            problem = text_problem(head)
            if problem:
                raise DatasetError(f"{path}: {problem}")
            f.seek(0)
            first = True
            for line in f:
                if first:
                    line, first = line.removeprefix(UTF8_BOM), False
                yield line
        except (OSError, EOFError, zlib.error) as exc:
            what = "corrupt gzip stream" if gz_named else "cannot read"
            raise DatasetError(f"{path}: {what} ({getattr(exc, 'strerror', None) or exc})") from exc


def read_text_file(path: Path) -> str:
    """A whole UTF-8 text file (checked as :func:`open_binary_lines` does); undecodable text is an error."""
    data = b"".join(open_binary_lines(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def text_lines(path: Path, skips: SkipLog) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without newline); undecodable lines are malformed skips."""
    for lineno, raw in enumerate(open_binary_lines(path), 1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            skips.add("malformed", path, [lineno], f"not UTF-8 text ({exc.reason} at byte {exc.start})")


def _strip_types(header: list[str]) -> list[str]:
    """RecBole atomic files type their headers (``user_id:token``); strip when every column is typed."""
    matches = [_TYPED_HEADER.match(h) for h in header]
    return [m.group(1) for m in matches] if all(matches) else header


def read_text(path: Path, skips: SkipLog) -> list[str]:
    """All lines of a text file, newline-free; undecodable lines are malformed skips (and left blank)."""
    data = b"".join(open_binary_lines(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return ["" if line is None else line for line in _decode_lines(data.split(b"\n"), path, skips)]
    return text.replace("\r\n", "\n").split("\n")


def _decode_lines(raw: list[bytes], path: Path, skips: SkipLog) -> Iterator[str | None]:
    for lineno, line in enumerate(raw, 1):
        try:
            yield line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            skips.add("malformed", path, [lineno], f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            yield None


def _read_tsv(path: Path, skips: SkipLog) -> pd.DataFrame:
    """Tab-separated, no quoting: field counts are checked per line, then the C parser reads the good lines."""
    lines = read_text(path, skips)
    if not lines or not lines[0].strip():
        raise DatasetError(f"{path}: empty file or blank first line (a header line is needed)")
    header = _strip_types([h.strip() for h in lines[0].split("\t")])
    body = lines[1:]
    tabs = np.fromiter((line.count("\t") for line in body), np.int64, len(body))
    blank = np.fromiter((not line.strip() for line in body), bool, len(body))
    bad = np.flatnonzero(~blank & (tabs != len(header) - 1))
    skips.add(
        "malformed", path, bad + 2, lambda k: f"expected {len(header)} tab-separated fields, found {tabs[bad[k]] + 1}"
    )
    good = np.flatnonzero(~blank & (tabs == len(header) - 1))
    if len(good) == 0:
        frame = pd.DataFrame({h: pd.Series([], dtype=str) for h in header})
    else:
        frame = pd.read_csv(
            io.StringIO("\n".join(body[k] for k in good)),
            sep="\t",
            header=None,
            names=header,
            dtype=str,
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            na_filter=False,
        )
    frame["line"] = good.astype(np.int64) + 2
    return frame


def _read_csv(path: Path, skips: SkipLog) -> pd.DataFrame:
    """Comma-separated with quoting (fields may span lines); rows with the wrong field count are malformed."""
    reader = csv.reader((line + "\n" for line in read_text(path, skips)), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{path}: empty file (a header line is needed)") from None
    header = _strip_types([h.strip() for h in header])
    rows: list[list[str]] = []
    lines: list[int] = []
    prev = reader.line_num
    try:
        for row in reader:
            start, prev = prev + 1, reader.line_num
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                skips.add("malformed", path, [start], f"expected {len(header)} fields, found {len(row)}")
                continue
            rows.append(row)
            lines.append(start)
    except csv.Error as exc:
        raise DatasetError(f"{path}:{reader.line_num}: unreadable CSV ({exc})") from exc
    frame = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    frame["line"] = np.asarray(lines, dtype=np.int64)
    return frame


def read_delimited(path: Path, skips: SkipLog, fmt: str = "tsv") -> pd.DataFrame:
    """A header-first CSV/TSV as strings plus ``line``; rows with the wrong field count are malformed."""
    return _read_tsv(path, skips) if fmt == "tsv" else _read_csv(path, skips)


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if ``value`` nests lists, tuples or mappings more than ``limit`` levels deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, (list, tuple)):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in node if isinstance(child, (list, tuple, dict)))
    return False


def _nesting_bound(text: str) -> int:
    """An upper bound on the nesting depth of a JSON text (its count of opening brackets)."""
    return text.count("[") + text.count("{") + text.count("(")


def parse_record(text: str) -> dict[str, Any]:
    """One JSON object; falls back to a Python literal (2014 Amazon meta). Never ``eval``.

    A record nested deeper than ``MAX_JSON_DEPTH`` is refused (ValueError) before it can exhaust the stack.
    """
    deep = ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except RecursionError:
        raise deep from None
    except json.JSONDecodeError as exc:
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"bad JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    if _nesting_bound(text) > MAX_JSON_DEPTH and too_deep(value):
        raise deep
    return value


def read_json_lines(path: Path, skips: SkipLog) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; bad lines are malformed skips."""
    for lineno, line in text_lines(path, skips):
        if not line.strip():
            continue
        try:
            yield lineno, parse_record(line)
        except ValueError as exc:
            skips.add("malformed", path, [lineno], str(exc))


_TOO_DEEP = object()  # stands for an array element nested beyond what the JSON parser can read
TOO_DEEP = _TOO_DEEP
"""A JSON value nested beyond what the parser can read (from :func:`read_json_object`)."""
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _value_end(text: str, start: int) -> int:
    """The index after the JSON value (array or object) that starts at ``start``, by bracket counting."""
    depth, k, in_string = 0, start, False
    while k < len(text):
        ch = text[k]
        if in_string:
            if ch == "\\":
                k += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1
    return len(text)


def _array_elements(text: str, path: Path) -> list[Any]:
    """The elements of a JSON array, one at a time; an element too deep to parse becomes ``_TOO_DEEP``."""
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> DatasetError:
        return DatasetError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON ({what})")

    pos = _WHITESPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        raise fail(pos, "expected a JSON array")
    pos = _WHITESPACE.match(text, pos + 1).end()
    out: list[Any] = []
    if text.startswith("]", pos):
        return out
    while True:
        try:
            value, pos = decoder.raw_decode(text, pos)
        except RecursionError:
            value, pos = _TOO_DEEP, _value_end(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from exc
        out.append(value)
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith("]", pos):
            return out
        if not text.startswith(",", pos):
            raise fail(pos, "Expecting ',' delimiter")
        pos = _WHITESPACE.match(text, pos + 1).end()


def read_json_object(path: Path) -> list[tuple[str, Any, int]]:
    """The entries of a file holding one JSON object, in file order: (key, value, line of the key).

    The object is read entry by entry, so a repeated key is seen (both are returned; json.loads
    would keep the last silently), each entry carries the line it starts on, and a value nested
    too deeply to parse becomes ``TOO_DEEP`` instead of failing the file. Invalid JSON, or a
    document that is not one object, is a :class:`DatasetError` naming ``path:line``.
    """
    text = read_text_file(path)
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> DatasetError:
        return DatasetError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON ({what})")

    pos = _WHITESPACE.match(text, 0).end()
    if pos == len(text):
        raise DatasetError(f"{path}: empty file (expected one JSON object)")
    if not text.startswith("{", pos):
        found = "an array" if text.startswith("[", pos) else "something else"
        raise DatasetError(f"{path}: expected one JSON object {{key: value, ...}}, found {found}")
    entries: list[tuple[str, Any, int]] = []
    line, counted = 1, 0
    pos = _WHITESPACE.match(text, pos + 1).end()
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise fail(pos, "Expecting property name enclosed in double quotes")
            try:
                key, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, exc.msg) from exc
            line, counted = line + text.count("\n", counted, pos), pos
            pos = _WHITESPACE.match(text, end).end()
            if not text.startswith(":", pos):
                raise fail(pos, "Expecting ':' delimiter")
            pos = _WHITESPACE.match(text, pos + 1).end()
            try:
                value, pos = decoder.raw_decode(text, pos)
            except RecursionError:
                value, pos = TOO_DEEP, _value_end(text, pos)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, exc.msg) from exc
            entries.append((key, value, line))
            pos = _WHITESPACE.match(text, pos).end()
            if text.startswith("}", pos):
                pos += 1
                break
            if not text.startswith(",", pos):
                raise fail(pos, "Expecting ',' delimiter")
            pos = _WHITESPACE.match(text, pos + 1).end()
    if _WHITESPACE.match(text, pos).end() != len(text):
        raise fail(pos, "Extra data after the object")
    return entries


def read_json_table(path: Path, skips: SkipLog) -> pd.DataFrame:
    """A JSON array of records, or JSON lines; a broken array is an error at its line."""
    lines = list(open_binary_lines(path))
    first = next((ln.strip() for ln in lines if ln.strip()), b"")
    if not first.startswith(b"["):
        records = list(read_json_lines(path, skips))
        frame = pd.DataFrame([r for _, r in records])
        frame["line"] = np.asarray([n for n, _ in records], dtype=np.int64)
        return frame
    try:
        text = b"".join(lines).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
    except RecursionError:  # an element nested beyond the parser's limit: read element by element
        data = _array_elements(text, path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    bad = [k for k, rec in enumerate(data) if not isinstance(rec, dict) and rec is not _TOO_DEEP]
    skips.add("malformed", path, [k + 1 for k in bad], "array element is not a JSON object (line = element number)")
    deep = [k for k, rec in enumerate(data) if isinstance(rec, dict) and too_deep(rec)]
    skips.add(
        "malformed",
        path,
        [k + 1 for k in deep],
        f"JSON nested more than {MAX_JSON_DEPTH} levels deep (line = element number)",
    )
    too_deep_at = set(deep)
    data = [None if k in too_deep_at else rec for k, rec in enumerate(data)]
    unreadable = [k for k, rec in enumerate(data) if rec is _TOO_DEEP]
    skips.add(
        "malformed",
        path,
        [k + 1 for k in unreadable],
        "JSON nested too deeply to read (line = element number)",
    )
    frame = pd.DataFrame([rec for rec in data if isinstance(rec, dict)])
    frame["line"] = np.asarray([k + 1 for k, rec in enumerate(data) if isinstance(rec, dict)], dtype=np.int64)
    return frame


def read_parquet(path: Path) -> pd.DataFrame:
    """A Parquet table plus ``line`` (1-based row number); text in disguise is an error."""
    head = _head(path)
    if not head.startswith(PARQUET_MAGIC):
        if head.startswith(GZIP_MAGIC):
            looks = "gzip data"
        elif text_problem(head):
            looks = f"binary data starting {head[:16]!r}"
        else:
            looks = f"text starting {head[:24]!r}"
        raise DatasetError(f"{path}: not a Parquet file (it is {looks}); give it its real extension or --format")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; re-raised with the file named
        raise DatasetError(f"{path}: cannot read Parquet ({exc})") from exc
    frame["line"] = np.arange(1, len(frame) + 1, dtype=np.int64)
    return frame


def read_table(path: Path, skips: SkipLog, fmt: str | None = None) -> pd.DataFrame:
    """Any supported table, by declared or detected format, with a ``line`` column."""
    fmt = detect_format(path, fmt)
    require_file(path)
    if fmt == "parquet":
        return read_parquet(path)
    if fmt in ("json", "jsonl"):
        return read_json_table(path, skips)
    return read_delimited(path, skips, fmt)


def require_file(path: Path, hint: str = "") -> Path:
    """``path`` if it is a file; else an error saying it is missing or a folder."""
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder, not a file{hint}")
    if path.exists() and not path.is_file():
        raise DatasetError(f"{path}: is not a regular file (a device, pipe or socket){hint}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file{hint}")
    return path


def require_columns(frame: pd.DataFrame, path: str | Path, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = [c for c in frame.columns if c != "line"]
        if not have:
            raise DatasetError(f"{path}: missing column(s) {missing}; the file has no columns (an empty table?)")
        raise DatasetError(f"{path}: missing column(s) {missing}; the file has {have}")


def id_problem(value: Any, what: str) -> str | None:
    """Why ``value`` is not usable as an ID (blank, or holding a control character), or None."""
    text = "" if value is None else str(value).strip()
    if not text:
        return f"{what} is missing or blank"
    if _ID_CONTROL.search(text):
        return f"{what} {text!r} contains a control character"
    return None


def contains(pool: pd.Series, values: pd.Series) -> np.ndarray:
    """``values.isin(pool)``, fast for long pools (pandas' arrow-string ``isin`` is slow on them)."""
    return pd.Index(pool.unique()).get_indexer(values) >= 0


def is_blank(values: pd.Series) -> np.ndarray:
    """True where a cell is missing or only whitespace."""
    text = values.astype(object).where(values.notna(), "").astype(str)
    return text.str.strip().eq("").to_numpy(bool)


def id_strings(
    values: pd.Series, path: str | Path, lines: np.ndarray, skips: SkipLog, what: str, integer: bool = False
) -> tuple[pd.Series, np.ndarray]:
    """IDs as strings and a keep-mask; blank (and, with ``integer``, non-integer) IDs are malformed.

    With ``integer`` the IDs are normalised (``"007"`` -> ``"7"``), so tables that write them
    differently still join.
    """
    values = values.reset_index(drop=True)
    if pd.api.types.is_integer_dtype(values.dtype) and not values.isna().any():
        return values.astype("int64").astype(str), np.ones(len(values), bool)
    if pd.api.types.is_float_dtype(values.dtype):
        values = values.map(lambda v: "" if v != v else str(int(v)) if float(v).is_integer() else str(v))
    if isinstance(values.dtype, pd.StringDtype):
        text = values.fillna("").str.strip()
    else:
        text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    blank = text.eq("").to_numpy(bool)
    control = text.str.contains(_ID_CONTROL.pattern, regex=True).fillna(False).to_numpy(bool) & ~blank
    bad = blank | control
    if integer:
        is_int = text.str.fullmatch(r"[+-]?\d{1,18}").to_numpy(bool)
        bad = bad | ~is_int
        if not text[is_int].str.fullmatch(r"-?[1-9]\d*|0").all():
            text = text.copy()
            text[is_int] = text[is_int].astype("int64").astype(str)
    idx = np.flatnonzero(bad)

    def describe(k: int) -> str:
        if control[idx[k]]:
            return f"{what} {text.iloc[idx[k]]!r} contains a control character"
        return f"{what} {text.iloc[idx[k]]!r} is not {'an integer' if integer else 'a non-empty ID'}"

    skips.add("malformed", path, lines[idx], describe)
    return text, ~bad


def numbers(
    values: pd.Series, path: str | Path, lines: np.ndarray, skips: SkipLog, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Float values (NaN where blank) and a keep-mask; non-blank non-numbers are malformed."""
    num = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
    bad = np.isnan(num) & ~is_blank(values)
    idx = np.flatnonzero(bad)
    skips.add("malformed", path, lines[idx], lambda k: f"{what} {values.iloc[idx[k]]!r} is not a number")
    return num, ~bad


def timestamps(values: pd.Series, path: str | Path, lines: np.ndarray, skips: SkipLog) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds (int64, -1 where blank) from numbers, dates or datetimes; anything else is malformed."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        dt = pd.to_datetime(values, utc=True)
        secs = np.where(dt.notna(), (dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1), -1)
        return secs.astype(np.int64), np.ones(len(values), bool)
    blank = is_blank(values)
    num = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
    if np.isnan(num[~blank]).all() and (~blank).any():
        dt = pd.to_datetime(values.where(~blank, None), errors="coerce", utc=True, format="ISO8601")
        num = np.where(dt.notna(), (dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1), np.nan)
        num = num.astype("float64")
    bad = np.isnan(num) & ~blank
    idx = np.flatnonzero(bad)
    skips.add("malformed", path, lines[idx], lambda k: f"timestamp {values.iloc[idx[k]]!r} is not a number or date")
    return np.where(np.isnan(num), -1, np.round(num)).astype(np.int64), ~bad


def resolve(root: Path, path: str | Path) -> Path:
    """``path`` if absolute, else under ``root``."""
    p = Path(path)
    return p if p.is_absolute() else root / p


def apply_image_template(item_ids: pd.Series, template: str, root: Path) -> pd.Series:
    """Absolute image paths from ``template`` (``{item_id}`` formatted), where the file exists; else ""."""

    def path_of(item_id: str) -> str:
        try:
            path = resolve(root, template.format(item_id=item_id)).resolve()
        except (KeyError, IndexError, ValueError) as exc:
            raise DatasetError(f"image template {template!r}: cannot format with item_id ({exc})") from exc
        return str(path) if path.is_file() else ""

    return item_ids.map(path_of).astype(object)


def extra_json(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Per row, a JSON object of the non-missing values of ``columns`` (lists kept as lists)."""

    def clean(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return [clean(v) for v in value.tolist()]
        if isinstance(value, np.generic):
            return value.item()
        return value

    def row_json(row: tuple) -> str:
        pairs = {
            c: clean(v)
            for c, v in zip(columns, row, strict=True)
            if isinstance(v, (list, np.ndarray)) or (v is not None and not pd.isna(v) and str(v) != "")
        }
        return json.dumps(pairs, ensure_ascii=False, sort_keys=True) if pairs else ""

    if not columns:
        return pd.Series("", index=frame.index, dtype=object)
    return pd.Series(
        [row_json(r) for r in frame[columns].itertuples(index=False, name=None)], index=frame.index, dtype=object
    )
