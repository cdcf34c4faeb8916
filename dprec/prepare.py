"""Stage 1, prepare: real inputs -> the canonical dataset folder (DESIGN §2, ``dprec.data.dataset``).

Local commands (the same on a cluster head node; prepare runs on one machine)::

    python -m dprec.prepare mmrec ../shared/data/amazon-baby --out data/baby       # MMRec folder, its split
    python -m dprec.prepare sequence --interactions Scientific.inter.json --items Scientific.item.json \\
        --split chrono --out data/scientific-chrono                             # {"user": [items in time order]}
    python -m dprec.prepare amazon --reviews reviews_Baby_5.json.gz --meta meta_Baby.json.gz --out data/baby-raw
    python -m dprec.prepare table --preset ml-100k --root ../shared/data/ml-100k --out data/ml-100k
    python -m dprec.prepare table --interactions ratings.csv --user-col uid --item-col iid --time-col ts \\
        --items items.parquet --item-key iid --item-field title=name --item-field categories=genre,style --out data/x
    python -m dprec.prepare synthetic --out data/default                         # the embedded default
    python -m dprec.prepare add-items --dataset data/default --items new_items.json --out data/default-v2
    python -m dprec.prepare sequence ... --split cold-items --cold-share 0.2 --out data/scientific-cold   # new items

``--split cold-items`` (any source) holds a seeded share of the items out of training: their interactions
are the validation and test targets of the cold-start evaluation; ``add-items`` appends new items to a
prepared catalogue, keeping every index it had (``dprec.data.catalogue``; docs/cold-start.md).

Splits are described in ``dprec.data.splits``, the table mapping in ``dprec.data.readers.table``.
Bad input is skipped and counted, or refused with an error naming ``path:line`` (``--strict``
refuses every skip); the rules, more commands and the table of cases: docs/data-and-features.md.
The counts are in ``dataset.json`` (``skipped``) and in the one-line JSON summary printed last;
``main`` returns 0, or 2 with one ``prepare: error: ...`` line on stderr.

The source data is never put at risk: an ``--out`` that is an input file, holds one (an input's
folder or any folder above it) or lies inside an MMRec source folder is refused before anything
is read. The dataset folder is written whole to a hidden sibling and renamed into place at the
end (``dprec.data.dataset.save_dataset``), so a failure midway (a full disk) leaves any old folder
as it was; an existing dataset folder is replaced only with ``--overwrite``, and a non-empty
folder that is not a dataset folder never. A dataset that cannot be trained and evaluated (no
validation or test interactions, fewer items than the largest cut-off K) is written, but the
summary's ``warnings`` (and stderr) say so; the trainer refuses it with
``dprec.data.dataset.check_trainable``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from dprec.config import ConfigError, add_arguments, args_dict, from_args, run_stage
from dprec.data.catalogue import append_items, read_new_items
from dprec.data.dataset import (
    Dataset,
    DatasetError,
    check_target,
    load_dataset,
    save_dataset,
    trainability_problems,
)
from dprec.data.readers import (
    BuildOptions,
    RawData,
    SkipLog,
    build_dataset,
    load_spec,
    read_amazon,
    read_mmrec,
    read_sequence,
    read_table_source,
)
from dprec.data.readers.table import TableSpec, preset_path
from dprec.data.schema import COLD_META_KEY, SPLIT_NAMES
from dprec.data.splits import held_out_items
from dprec.io import TMP_PREFIX, log_to_console

log = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the dataset folder --out if it already holds one"
    )
    parser.add_argument("--name", help="dataset name (default: from the source)")
    add_arguments(parser, BuildOptions)
    add_arguments(parser, SkipLog)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dprec.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)

    mmrec = sub.add_parser("mmrec", help="an MMRec folder (<name>.inter with x_label)")
    mmrec.add_argument("folder", type=Path)
    mmrec.add_argument("--inter", help="the .inter file (default: the only *.inter in the folder)")
    mmrec.add_argument("--item-ids", help="ASIN->itemID JSON (default: item2id.json if present; 'none' to skip)")
    mmrec.add_argument("--image-urls", help="itemID,asin,imUrl CSV (default: <name>_image_urls.csv if present)")
    mmrec.add_argument("--user-sequence", help="userASIN itemASIN... per line: ASINs and chronological positions")
    mmrec.add_argument("--item-keywords", help="'ASIN |tok|tok' per line: keywords as item description")
    mmrec.add_argument(
        "--item-text", help="'asin<TAB>short_title<TAB>attributes' TSV with that header: title and categories"
    )

    sequence = sub.add_parser("sequence", help='per-user item lists in time order, {"<user>": [item, ...]} (JSON)')
    sequence.add_argument("--interactions", type=Path, required=True, help='{"<user>": [item, ...]} JSON file')
    sequence.add_argument(
        "--items", type=Path, help='{"<item>": {"title", "description", "brand", "categories"}} JSON file'
    )
    sequence.add_argument("--item-ids", type=Path, help="'ASIN<TAB>index' lines: store item ASINs, not indices")
    sequence.add_argument("--user-ids", type=Path, help="'ASIN<TAB>index' lines: store user ASINs, not indices")

    amazon = sub.add_parser("amazon", help="raw Amazon reviews + meta (2014 or 2018, JSON lines, .gz ok)")
    amazon.add_argument("--reviews", type=Path, required=True)
    amazon.add_argument("--meta", type=Path)
    amazon.add_argument("--image-template", help="local image path with {item_id}, e.g. img/{item_id}.jpg")

    table = sub.add_parser("table", help="CSV/TSV/Parquet/JSON tables with a column mapping")
    table.add_argument("--preset", help="shipped preset name (ml-100k, hm-sample) or a YAML spec file")
    table.add_argument("--root", type=Path, default=Path("."), help="folder that relative table paths are under")
    table.add_argument("--interactions", help="interaction table path")
    table.add_argument("--format", help="interaction table format (default: from the extension)")
    for flag in ("user", "item", "time", "rating", "split"):
        table.add_argument(f"--{flag}-col", help=f"{flag} column of the interaction table")
    table.add_argument("--items", help="item table path")
    table.add_argument("--items-format", help="item table format (default: from the extension)")
    table.add_argument("--item-key", help="item ID column of the item table")
    table.add_argument(
        "--item-field",
        action="append",
        default=[],
        metavar="FIELD=COL[,COL]",
        help="title/description/brand/categories/image_url/image_path from column(s)",
    )
    table.add_argument("--item-extra", action="append", default=[], metavar="COL", help="column kept in items.extra")
    table.add_argument("--categories-sep", help="split category cells on this string")
    table.add_argument("--image-template", help="image path under --root with {item_id}")
    table.add_argument(
        "--integer-user-ids",
        action="store_true",
        default=None,
        help="user IDs must be integers (others are malformed); '007' and '7' are one ID",
    )
    table.add_argument(
        "--integer-item-ids", action="store_true", default=None, help="item IDs must be integers, in every table"
    )

    sub.add_parser("synthetic", help="the embedded seeded default dataset (dprec.data.synthetic)")
    for child in sub.choices.values():
        _common(child)

    grow = sub.add_parser("add-items", help="a dataset folder with new items appended (dprec.data.catalogue)")
    grow.add_argument("--dataset", type=Path, required=True, help="the dataset folder whose catalogue grows")
    grow.add_argument(
        "--items", type=Path, required=True, help='{"<item id>": {"title", ..., "image_path"}} JSON of the new items'
    )
    grow.add_argument("--out", type=Path, required=True, help="dataset folder to write (not --dataset itself)")
    grow.add_argument("--overwrite", action="store_true", help="replace the dataset folder --out if it holds one")
    add_arguments(grow, SkipLog)
    return parser


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the flags not given (None) and without mappings left empty."""
    out = {k: _given(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}
    return {k: v for k, v in out.items() if v != {}}


def _table_overrides(args: argparse.Namespace, keep_cold_items: bool | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for item in args.item_field:
        name, sep, cols = item.partition("=")
        if not sep or not cols:
            raise ConfigError(f"--item-field {item!r}: expected FIELD=COL or FIELD=COL1,COL2")
        fields[name] = cols.split(",") if "," in cols else cols
    items = {
        "path": args.items,
        "format": args.items_format,
        "key": args.item_key,
        **fields,
        "categories_sep": args.categories_sep,
        "image_template": args.image_template,
        "extra": args.item_extra or None,
        "keep_all": keep_cold_items,
    }
    inter = {
        "path": args.interactions,
        "format": args.format,
        "user": args.user_col,
        "item": args.item_col,
        "timestamp": args.time_col,
        "rating": args.rating_col,
        "split": args.split_col,
    }
    return _given(
        {
            "interactions": inter,
            "items": items,
            "integer_user_ids": args.integer_user_ids,
            "integer_item_ids": args.integer_item_ids,
        }
    )


def table_spec(args: argparse.Namespace, keep_cold_items: bool | None) -> TableSpec:
    return load_spec(args.preset, _table_overrides(args, keep_cold_items))


def declared_inputs(args: argparse.Namespace, spec: TableSpec | None = None) -> tuple[list[Path], list[Path]]:
    """(files, source folders) that the command line names, before anything is read."""
    files: list[Path] = []
    folders: list[Path] = []
    if args.source == "mmrec":
        folders.append(args.folder)
        named = (args.inter, args.item_ids, args.image_urls, args.user_sequence, args.item_keywords, args.item_text)
        for given in named:
            if given and given != "none":
                files += [Path(given), args.folder / given]
    elif args.source == "amazon":
        files += [args.reviews, *([args.meta] if args.meta else [])]
    elif args.source == "sequence":
        files += [p for p in (args.interactions, args.items, args.item_ids, args.user_ids) if p is not None]
    elif args.source == "table" and spec is not None:
        if args.preset:
            try:
                files.append(preset_path(args.preset))
            except ConfigError:
                pass
        tables = [spec.interactions.path]
        if spec.items is not None:
            tables += [spec.items.path, *(j.get("path") for j in spec.items.joins if isinstance(j, dict))]
        files += [Path(t) if Path(t).is_absolute() else args.root / t for t in tables if t]
    return files, folders


def refuse_inputs(out: Path, files: list[str | Path], folders: list[str | Path] = ()) -> None:
    """Raise :class:`DatasetError` if writing the dataset folder ``out`` could overwrite or replace an input."""
    target = out.resolve()
    for file in files:
        path = Path(file).resolve()
        if path == target:
            raise DatasetError(
                f"--out {out} is the input {path}; writing the dataset there would destroy it. Choose another --out"
            )
        if target in path.parents:
            raise DatasetError(
                f"--out {out} holds the input {path}; writing the dataset there would replace your source data. "
                "Choose another --out"
            )
    for folder in folders:
        path = Path(folder).resolve()
        if path == target or target in path.parents:
            raise DatasetError(
                f"--out {out} is or holds the input folder {path}; writing the dataset there would replace your "
                "source data. Choose another --out"
            )
        if path in target.parents:
            raise DatasetError(
                f"--out {out} is inside the input folder {path}; write the dataset outside the source data. "
                "Choose another --out"
            )


def _image_files(ds: Dataset) -> list[str]:
    """One referenced local image file per folder (enough to tell whether --out holds any)."""
    paths = ds.items["image_path"]
    paths = paths[paths != ""]
    if paths.empty:
        return []
    firsts = pd.Series(paths.to_numpy()).groupby(paths.map(lambda p: str(Path(p).parent)).to_numpy()).first()
    return [p for p in firsts if Path(p).is_absolute()]


def read_source(
    args: argparse.Namespace, options: BuildOptions, skips: SkipLog, spec: TableSpec | None = None
) -> RawData:
    """Dispatch to the reader of ``args.source``."""
    if args.source == "mmrec":
        return read_mmrec(
            args.folder,
            skips,
            inter=args.inter,
            item_ids=args.item_ids,
            image_urls=args.image_urls,
            user_sequence=args.user_sequence,
            item_keywords=args.item_keywords,
            item_text=args.item_text,
        )
    if args.source == "sequence":
        return read_sequence(args.interactions, skips, args.items, args.item_ids, args.user_ids)
    if args.source == "amazon":
        return read_amazon(
            args.reviews,
            args.meta,
            skips,
            image_template=args.image_template,
            keep_cold_items=bool(options.keep_cold_items),
        )
    spec = spec if spec is not None else table_spec(args, options.keep_cold_items)
    if spec.items is None and options.keep_cold_items:
        raise ConfigError("--keep-cold-items needs an item table (--items or a preset with items)")
    return read_table_source(spec, args.root, skips)


def grown_dataset(args: argparse.Namespace, skips: SkipLog) -> Dataset:
    """``add-items``: the dataset ``--dataset`` with the items of ``--items`` appended (``--out`` checked first)."""
    refuse_inputs(args.out, [args.items], [args.dataset])
    check_target(args.out, bool(args.overwrite))
    return append_items(load_dataset(args.dataset), read_new_items(args.items, skips), str(args.items))


def prepare(args: argparse.Namespace) -> tuple[Dataset, SkipLog]:
    """Check ``--out``, then read, build and write the dataset that ``args`` describe."""
    skips = from_args(SkipLog, args)
    overwrite = bool(getattr(args, "overwrite", False))
    if args.source == "add-items":
        ds = grown_dataset(args, skips)
        return _save(ds, args, overwrite), skips
    options = from_args(BuildOptions, args)
    spec = table_spec(args, options.keep_cold_items) if args.source == "table" else None
    refuse_inputs(args.out, *declared_inputs(args, spec))
    check_target(args.out, overwrite)  # before reading: a refusal should not wait for a long read
    if args.source == "synthetic":
        from dprec.data.synthetic import SyntheticSpec, generate

        seed = args_dict(BuildOptions, args).get("seed")
        spec = SyntheticSpec() if seed is None else SyntheticSpec(seed=seed)
        ds = generate(spec, split=options.split or "random", cold_share=options.cold_share)
    else:
        raw = read_source(args, options, skips, spec)
        if args.name:
            raw.name = args.name
        ds = build_dataset(raw, options, skips)
        refuse_inputs(args.out, [*raw.inputs, *_image_files(ds)], raw.source_folders)
    return _save(ds, args, overwrite), skips


def _save(ds: Dataset, args: argparse.Namespace, overwrite: bool) -> Dataset:
    """Record the command line in ``ds.meta`` and write the dataset folder ``--out``."""
    ds.meta["prepare"] = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in sorted(vars(args).items())
        if v not in (None, [], False) and k not in ("out", "overwrite")
    }
    try:
        save_dataset(ds, args.out, overwrite=overwrite)
    except OSError as exc:
        # the file is named unless it is one of the hidden temporaries the write makes
        where = f"{exc.filename}: " if exc.filename and TMP_PREFIX not in str(exc.filename) else ""
        raise DatasetError(
            f"cannot write the dataset folder {args.out}: {where}{exc.strerror or exc}; nothing was changed there"
        ) from exc
    return ds


def _cold_counts(ds: Dataset) -> dict[str, int]:
    """Held-out items and their target interactions per split, of a cold-items split."""
    held = held_out_items(ds.meta, ds.n_items)
    items = ds.interactions["item_idx"]
    return {
        "valid_items": len(held.valid),
        "test_items": len(held.test),
        "valid_interactions": int(items.isin(held.valid).sum()),
        "test_interactions": int(items.isin(held.test).sum()),
    }


def _added_now(ds: Dataset) -> bool:
    """Was ``ds`` made by ``add-items`` (its summary then counts the items added)?"""
    return bool(ds.meta.get("prepare", {}).get("source") == "add-items" and ds.meta.get("grown_from"))


def summary(ds: Dataset, out: Path, seconds: float) -> dict[str, Any]:
    per = ds.meta["n_per_split"]
    return {
        "dataset": ds.name,
        "out": str(out),
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": {name: per[str(label)] for label, name in SPLIT_NAMES.items()},
        "skipped": ds.meta.get("skipped", {}),
        "kcore_removed": ds.meta.get("kcore_removed_interactions", 0),
        "content_hash": ds.meta["content_hash"],
        **({"cold_items": _cold_counts(ds)} if COLD_META_KEY in ds.meta else {}),
        **({"added_items": ds.meta["grown_from"][-1]["added"]} if _added_now(ds) else {}),
        "warnings": trainability_problems(ds),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Prepare the dataset ``argv`` describes; 0 on success, 2 (and the reason on stderr) on failure."""
    args = _parser().parse_args(argv)
    log_to_console()

    def body() -> int:
        start = time.perf_counter()
        ds, skips = prepare(args)
        for message in skips.examples:
            log.warning("prepare: skipped %s", message)
        result = summary(ds, args.out, time.perf_counter() - start)
        for message in result["warnings"]:
            log.warning("prepare: warning: %s", message)
        print(json.dumps(result), flush=True)
        return 0

    return run_stage("prepare", body)


if __name__ == "__main__":
    raise SystemExit(main())
