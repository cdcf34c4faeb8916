"""MMRec dataset folders: ``<name>.inter`` (``userID itemID [rating] [timestamp] x_label``) and friends.

The MMRec integer IDs become the indices (users by ``userID``, items by ``itemID``), so when no
row is filtered out ``item_idx == itemID`` and MMRec's ``text_feat.npy`` / ``image_feat.npy`` rows
still line up (``dataset.json`` says so in ``source_ids_preserved_as_index``). Those feature
files are only recorded, never loaded or copied.

Optional companions (found in the folder, or named by flags):

- ``item2id.json`` (ASIN -> itemID): the original item IDs.
- ``<name>_image_urls.csv`` (``itemID, asin, imUrl``): image URLs.
- ``user_sequence.txt`` (``userASIN itemASIN ...``, chronological): original user and item IDs
  and a chronological position used as the timestamp. The ``.inter`` IDs are matched to it by
  structure (see :func:`align_to_user_sequence`), and any mismatch is an error.
- ``item_keywords.txt`` (``ASIN |tok|tok|...``): item keywords as the description; needs ASINs.
- ``item_text.tsv`` (header ``asin<TAB>short_title<TAB>attributes``): ``title`` = the short title,
  ``categories`` = the attribute names (`` | ``-separated in the file: brand and category path);
  needs ASINs. Items without a row keep empty fields (``item_text_missing`` in ``dataset.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dprec.data.dataset import DatasetError
from dprec.data.readers.common import (
    RawData,
    SkipLog,
    id_problem,
    id_strings,
    numbers,
    read_delimited,
    read_text_file,
    require_columns,
    require_file,
    text_lines,
    timestamps,
)
from dprec.data.schema import SPLIT_LABELS

FEATURE_FILES = {"text": "text_feat.npy", "image": "image_feat.npy"}
URL_COLUMNS = ("imUrl", "url", "image_url")


def _find_inter(folder: Path, inter: str | None) -> Path:
    if inter:
        path = Path(inter) if Path(inter).is_absolute() or Path(inter).exists() else folder / inter
        return require_file(path, " (--inter)")
    found = sorted(folder.glob("*.inter"))
    if len(found) != 1:
        raise DatasetError(
            f"{folder}: expected exactly one *.inter file, found {[p.name for p in found]}; name it with --inter"
        )
    return found[0]


def _companion(folder: Path, given: str | None, default: str) -> Path | None:
    """``given`` ('none' disables, a name is looked up in cwd then the folder), else ``default`` if present."""
    if given == "none":
        return None
    if given:
        path = Path(given)
        path = path if path.is_absolute() or path.exists() else folder / given
        return require_file(path)
    path = folder / default
    return path if path.is_file() else None


def _read_inter(path: Path, skips: SkipLog) -> pd.DataFrame:
    frame = read_delimited(path, skips, "tsv")
    require_columns(frame, path, ["userID", "itemID"])
    lines = frame["line"].to_numpy()
    user, ok_u = id_strings(frame["userID"], path, lines, skips, "userID", integer=True)
    item, ok_i = id_strings(frame["itemID"], path, lines, skips, "itemID", integer=True)
    keep = ok_u & ok_i
    out = pd.DataFrame({"user_id": user, "item_id": item, "line": lines})
    out["split"] = np.int8(-1)
    if "x_label" in frame:
        label = pd.to_numeric(frame["x_label"], errors="coerce")
        bad = ~label.isin(SPLIT_LABELS).to_numpy() & keep
        idx = np.flatnonzero(bad)
        skips.add(
            "malformed", path, lines[idx], lambda k: f"x_label {frame['x_label'].iloc[idx[k]]!r} is not 0, 1 or 2"
        )
        keep &= ~bad
        out["split"] = label.fillna(-1).astype("int8").to_numpy()
    out["rating"], out["timestamp"] = np.nan, -1
    if "rating" in frame:
        out["rating"], ok = numbers(frame["rating"], path, lines, skips, "rating")
        keep &= ok
    if "timestamp" in frame:
        out["timestamp"], ok = timestamps(frame["timestamp"], path, lines, skips)
        keep &= ok
    out = out[keep].reset_index(drop=True)
    out["user_key"] = out["user_id"].astype("int64")
    out["item_key"] = out["item_id"].astype("int64")
    return out


def _item2id(path: Path, item_keys: np.ndarray) -> pd.Series:
    """itemID -> ASIN from ``item2id.json``; every itemID of the interactions must be there."""
    try:
        mapping = json.loads(read_text_file(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise DatasetError(f"{path}: expected a JSON object mapping ASIN to integer itemID")
    asin = pd.Series(list(mapping), index=list(mapping.values()), dtype=object)
    if asin.index.duplicated().any():
        raise DatasetError(f"{path}: itemID {asin.index[asin.index.duplicated()][0]} has two ASINs")
    missing = np.setdiff1d(item_keys, asin.index.to_numpy())
    if len(missing):
        raise DatasetError(f"{path}: no ASIN for itemID {missing[0]} ({len(missing)} missing); wrong file?")
    return asin


def read_user_sequence(path: Path) -> pd.DataFrame:
    """``seq_line`` (0-based), ``user_asin``, ``item_asin``, ``position``; any malformed line is an error."""
    strict = SkipLog(strict=True)
    rows: list[tuple[int, str, str, int]] = []
    for lineno, line in text_lines(path, strict):
        tokens = line.split()
        if len(tokens) < 2:
            raise DatasetError(f"{path}:{lineno}: expected 'userASIN itemASIN ...', found {line[:60]!r}")
        if len(set(tokens[1:])) != len(tokens) - 1:
            raise DatasetError(f"{path}:{lineno}: an item appears twice in one user's sequence")
        problem = next((p for t in tokens if (p := id_problem(t, "ASIN"))), None)
        if problem:
            raise DatasetError(f"{path}:{lineno}: {problem}")
        rows.extend((lineno - 1, tokens[0], item, pos) for pos, item in enumerate(tokens[1:]))
    seq = pd.DataFrame(rows, columns=["seq_line", "user_asin", "item_asin", "position"])
    if seq.drop_duplicates("seq_line")["user_asin"].duplicated().any():
        raise DatasetError(f"{path}: a user ASIN appears on two lines")
    return seq


def _user_rule(inter: pd.DataFrame, seq_len: np.ndarray, inter_path: Path, seq_path: Path) -> tuple[str, pd.Series]:
    """Which .inter user is which sequence line: the first candidate rule whose per-user counts all agree."""
    counts = inter.groupby("user_key", sort=False).size()
    if len(counts) != len(seq_len):
        raise DatasetError(f"{inter_path}: {len(counts)} users, but {seq_path} has {len(seq_len)} lines")
    by_appearance = pd.Series(np.arange(len(counts)), index=counts.index)
    candidates = {"first appearance in the .inter file = line order": by_appearance}
    if counts.index.min() == 0 and counts.index.max() == len(counts) - 1:
        candidates = {"userID = line number": pd.Series(counts.index.to_numpy(), index=counts.index)} | candidates
    for rule, line_of in candidates.items():
        if np.array_equal(counts.to_numpy(), seq_len[line_of[counts.index].to_numpy()]):
            return rule, line_of
    first = np.flatnonzero(counts.to_numpy() != seq_len[by_appearance.to_numpy()])[0]
    raise DatasetError(
        f"{inter_path}: cannot match users to {seq_path} lines: by first appearance, userID "
        f"{counts.index[first]} has {counts.iloc[first]} interactions but line {first + 1} has "
        f"{seq_len[first]} items"
    )


def _signatures(keys: pd.Series, lines: pd.Series) -> pd.Series:
    """Each key's sorted set of sequence lines (the users who have the item), as bytes."""
    codes, uniques = pd.factorize(keys, sort=True)
    line = lines.to_numpy(np.int64)
    order = np.lexsort((line, codes))
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    groups = np.split(line[order], starts[1:])
    return pd.Series([g.tobytes() for g in groups], index=uniques, dtype=object)


def align_to_user_sequence(
    inter: pd.DataFrame, seq: pd.DataFrame, inter_path: Path, seq_path: Path
) -> tuple[pd.Series, pd.Series, np.ndarray, dict[str, Any]]:
    """Match ``.inter`` integer IDs to the ASINs of ``user_sequence.txt``.

    Users: the first rule whose per-user interaction counts equal the line lengths ("userID =
    line number", else "first appearance order in the .inter file = line order"). Items: an item
    is identified by the set of lines (users) that contain it; each set must be unique and occur
    on both sides. Finally every user's mapped item set must equal its line. Returns user ASIN by
    userID, item ASIN by itemID, each interaction's position in its line, and a meta record.
    """
    seq_len = seq.groupby("seq_line").size().to_numpy()
    rule, line_of = _user_rule(inter, seq_len, inter_path, seq_path)
    inter_line = inter["user_key"].map(line_of)
    sig_item = _signatures(inter["item_key"], inter_line)
    sig_asin = _signatures(seq["item_asin"], seq["seq_line"])
    for sig, where in ((sig_item, inter_path), (sig_asin, seq_path)):
        if sig.duplicated().any():
            twins = sig.index[sig == sig[sig.duplicated()].iloc[0]].tolist()
            raise DatasetError(
                f"{where}: items {twins[:2]} have exactly the same users, so they cannot be told "
                f"apart when matching IDs to {seq_path.name}"
            )
    asin_of_item = sig_item.map(pd.Series(sig_asin.index, index=sig_asin.to_numpy()))
    if asin_of_item.isna().any():
        item = asin_of_item.index[asin_of_item.isna()][0]
        raise DatasetError(f"{inter_path}: itemID {item} has users that match no item of {seq_path}")
    pairs = pd.DataFrame({"seq_line": inter_line.to_numpy(), "item_asin": inter["item_key"].map(asin_of_item)})
    merged = pairs.merge(seq[["seq_line", "item_asin", "position"]], on=["seq_line", "item_asin"], how="left")
    if merged["position"].isna().any() or len(merged) != len(seq):
        raise DatasetError(f"{inter_path}: user item sets do not equal the lines of {seq_path} after matching")
    user_asin = seq.drop_duplicates("seq_line").set_index("seq_line")["user_asin"]
    asin_of_user = line_of.map(user_asin)
    record = {"users": rule, "items": "unique set of users per item", "verified_pairs": int(len(merged))}
    return asin_of_user, asin_of_item, merged["position"].to_numpy(np.int64), record


def read_keywords(path: Path, skips: SkipLog) -> pd.DataFrame:
    """``ASIN |tok|tok|...`` lines: ``item_id``, ``description`` ("Keywords: a, b, ...") and ``extra``."""
    rows = []
    for lineno, line in text_lines(path, skips):
        if not line.strip():
            continue
        asin, _, rest = line.partition(" ")
        tokens = [t for t in rest.strip().split("|") if t]
        if not asin or not tokens:
            skips.add("malformed", path, [lineno], "expected 'ASIN |tok|tok|...'")
            continue
        problem = id_problem(asin, "ASIN")
        if problem:
            skips.add("malformed", path, [lineno], problem)
            continue
        words = [t.replace("\u2581", "").strip() for t in tokens]
        rows.append(
            (
                asin,
                "Keywords: " + ", ".join(w for w in words if w) + ".",
                json.dumps({"keywords": tokens}, ensure_ascii=False),
                lineno,
            )
        )
    frame = pd.DataFrame(rows, columns=["item_id", "description", "extra", "line"])
    dup = frame["item_id"].duplicated()
    skips.add("duplicate_item", path, frame.loc[dup, "line"].to_numpy(), "ASIN listed again; kept the first")
    return frame[~dup]


ITEM_TEXT_COLUMNS = ("asin", "short_title", "attributes")


def read_item_text(path: Path, skips: SkipLog) -> pd.DataFrame:
    """``asin<TAB>short_title<TAB>attributes`` rows (header first): ``item_id``, ``title``, ``categories``."""
    frame = read_delimited(path, skips, "tsv")
    if [c for c in frame.columns if c != "line"] != list(ITEM_TEXT_COLUMNS):
        found = "\t".join(c for c in frame.columns if c != "line")
        raise DatasetError(
            f"{path}:1: expected the header line 'asin<TAB>short_title<TAB>attributes', found {found[:80]!r}"
        )
    lines = frame["line"].to_numpy()
    asin, keep = id_strings(frame["asin"], path, lines, skips, "asin")
    frame = frame.assign(item_id=asin.to_numpy(object))[keep]
    dup = frame["item_id"].duplicated()
    skips.add("duplicate_item", path, frame.loc[dup, "line"].to_numpy(), "ASIN listed again; kept the first")
    frame = frame[~dup]
    title = frame["short_title"].map(lambda t: " ".join(t.split()))
    categories = frame["attributes"].map(
        lambda a: "|".join(dict.fromkeys(n.strip().replace("|", "/") for n in a.split(" | ") if n.strip()))
    )
    return pd.DataFrame(
        {"item_id": frame["item_id"].to_numpy(object), "title": title.to_numpy(object), "categories": categories}
    )


def _image_urls(path: Path, skips: SkipLog, asin_of_item: pd.Series | None) -> pd.Series:
    """itemID -> URL; an ``asin`` column must agree with the known ASINs."""
    frame = read_delimited(path, skips, "csv")
    url_col = next((c for c in URL_COLUMNS if c in frame), None)
    require_columns(frame, path, ["itemID", url_col or URL_COLUMNS[0]])
    lines = frame["line"].to_numpy()
    key, ok = id_strings(frame["itemID"], path, lines, skips, "itemID", integer=True)
    frame = frame[ok].assign(item_key=key[ok].astype("int64"))
    if "asin" in frame and asin_of_item is not None:
        known = frame["item_key"].map(asin_of_item)
        wrong = known.notna() & (known != frame["asin"])
        if wrong.any():
            row = frame[wrong].iloc[0]
            raise DatasetError(
                f"{path}:{row['line']}: itemID {row['item_key']} has ASIN {row['asin']!r} here but "
                f"{known[wrong].iloc[0]!r} in the ID map; the files are from different datasets"
            )
    dup = frame["item_key"].duplicated()
    skips.add("duplicate_item", path, frame.loc[dup, "line"].to_numpy(), "itemID listed again; kept the first")
    frame = frame[~dup]
    return pd.Series(frame[url_col].to_numpy(), index=frame["item_key"].to_numpy())


def read_mmrec(
    folder: str | Path,
    skips: SkipLog,
    inter: str | None = None,
    item_ids: str | None = None,
    image_urls: str | None = None,
    user_sequence: str | None = None,
    item_keywords: str | None = None,
    item_text: str | None = None,
) -> RawData:
    """Read an MMRec folder with its split; companions as in the module docstring ('none' disables one)."""
    folder = Path(folder).resolve()
    if folder.is_file():
        raise DatasetError(f"{folder}: is a file, not an MMRec folder (give the folder that holds the .inter file)")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    inter_path = _find_inter(folder, inter)
    frame = _read_inter(inter_path, skips)
    if frame.empty:
        raise DatasetError(f"{inter_path}: no interactions")
    item_keys = np.unique(frame["item_key"].to_numpy())
    source: dict[str, Any] = {"kind": "mmrec", "interactions": str(inter_path)}
    meta: dict[str, Any] = {}

    asin_of_item = None
    id_path = _companion(folder, item_ids, "item2id.json")
    if id_path is not None:
        asin_of_item = _item2id(id_path, item_keys)
        source["item_ids"] = str(id_path)

    asin_of_user = None
    if user_sequence:
        seq_path = _companion(folder, user_sequence, "user_sequence.txt")
        seq = read_user_sequence(seq_path)
        asin_of_user, seq_asin, position, meta["id_alignment"] = align_to_user_sequence(
            frame, seq, inter_path, seq_path
        )
        if asin_of_item is not None and not (seq_asin == asin_of_item.reindex(seq_asin.index)).all():
            raise DatasetError(f"{seq_path}: the ASINs matched by structure disagree with {id_path}")
        asin_of_item = seq_asin
        frame["timestamp"] = position
        source["user_sequence"] = str(seq_path)
        meta["timestamp"] = f"position in the user's line of {seq_path.name} (chronological order)"

    if asin_of_user is not None:
        frame["user_id"] = frame["user_key"].map(asin_of_user).astype(object)
    items = pd.DataFrame({"item_key": item_keys})
    items["item_id"] = (
        items["item_key"].map(asin_of_item) if asin_of_item is not None else items["item_key"].astype(str)
    )
    items["item_id"] = items["item_id"].astype(object)
    frame["item_id"] = frame["item_key"].map(pd.Series(items["item_id"].to_numpy(), index=item_keys)).astype(object)

    url_path = _companion(folder, image_urls, f"{inter_path.stem}_image_urls.csv")
    if url_path is not None:
        items["image_url"] = items["item_key"].map(_image_urls(url_path, skips, asin_of_item)).fillna("")
        source["image_urls"] = str(url_path)
    for what, given in (("item keywords are", item_keywords), ("item text is", item_text)):
        if given and asin_of_item is None:
            raise DatasetError(
                f"{folder}: {what} keyed by ASIN, but the item IDs have no ASINs; "
                "pass --user-sequence (or provide item2id.json)"
            )
    if item_text:
        text_path = _companion(folder, item_text, "item_text.tsv")
        text = read_item_text(text_path, skips)
        items = items.merge(text, on="item_id", how="left")
        matched = items["title"].notna()
        meta["item_text_matched"] = int(matched.sum())
        meta["item_text_missing"] = int((~matched).sum())
        meta["item_text_rows_unmatched"] = int((~text["item_id"].isin(items["item_id"])).sum())
        source["item_text"] = str(text_path)
    if item_keywords:
        kw_path = _companion(folder, item_keywords, "item_keywords.txt")
        keywords = read_keywords(kw_path, skips)
        items = items.merge(keywords.drop(columns="line"), on="item_id", how="left")
        meta["keywords_matched"] = int(items["description"].notna().sum())
        source["item_keywords"] = str(kw_path)
    features = {m: str(folder / f) for m, f in FEATURE_FILES.items() if (folder / f).is_file()}
    if features:
        meta["mmrec_features"] = features
    items["line"] = 0
    return RawData(
        name=inter_path.stem,
        source=source,
        interactions=frame,
        interactions_path=str(inter_path),
        items=items,
        items_path=str(folder),
        meta=meta,
        default_kcore=1,
        default_split="given" if (frame["split"] >= 0).any() else "random",
        inputs=[str(Path(p).resolve()) for k, p in source.items() if k != "kind"] + list(features.values()),
        source_folders=[str(folder)],
    )
