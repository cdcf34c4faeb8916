"""Stage 1, prepare: real inputs -> the canonical dataset folder (DESIGN §2, ``dprec.data.dataset``).

Local commands (the same on a cluster head node; prepare runs on one machine)::

    python -m dprec.prepare mmrec ../shared/data/amazon-baby --out data/baby       # MMRec folder, its split
    python -m dprec.prepare amazon --reviews reviews_Baby_5.json.gz --meta meta_Baby.json.gz --out data/baby-raw
    python -m dprec.prepare table --preset ml-100k --root ../shared/data/ml-100k --out data/ml-100k
    python -m dprec.prepare table --interactions ratings.csv --user-col uid --item-col iid --time-col ts \\
        --items items.parquet --item-key iid --item-field title=name --item-field categories=genre,style --out data/x
    python -m dprec.prepare synthetic --out data/default                         # the embedded default

Splits are described in ``dprec.data.splits``, the table mapping in ``dprec.data.readers.table``.
Bad input is skipped and counted, or refused with an error naming ``path:line`` (``--strict``
refuses every skip); the rules, more commands and the table of cases: docs/data-and-features.md.
The counts are in ``dataset.json`` (``skipped``) and in the one-line JSON summary printed last;
``main`` returns 0, or 1 with ``prepare: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from dprec.config import ConfigError, add_arguments, args_dict, from_args, run_stage
from dprec.data.dataset import Dataset, save_dataset
from dprec.data.readers import (
    BuildOptions,
    RawData,
    SkipLog,
    build_dataset,
    load_spec,
    read_amazon,
    read_mmrec,
    read_table_source,
)
from dprec.data.schema import SPLIT_NAMES
from dprec.io import log_to_console

log = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
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


def read_source(args: argparse.Namespace, options: BuildOptions, skips: SkipLog) -> RawData:
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
        )
    if args.source == "amazon":
        return read_amazon(
            args.reviews,
            args.meta,
            skips,
            image_template=args.image_template,
            keep_cold_items=bool(options.keep_cold_items),
        )
    spec = load_spec(args.preset, _table_overrides(args, options.keep_cold_items))
    if spec.items is None and options.keep_cold_items:
        raise ConfigError("--keep-cold-items needs an item table (--items or a preset with items)")
    return read_table_source(spec, args.root, skips)


def prepare(args: argparse.Namespace) -> tuple[Dataset, SkipLog]:
    """Read, build and write the dataset that ``args`` describe."""
    skips = from_args(SkipLog, args)
    options = from_args(BuildOptions, args)
    if args.source == "synthetic":
        from dprec.data.synthetic import SyntheticSpec, generate

        seed = args_dict(BuildOptions, args).get("seed")
        spec = SyntheticSpec() if seed is None else SyntheticSpec(seed=seed)
        ds = generate(spec, split=options.split or "random")
    else:
        raw = read_source(args, options, skips)
        if args.name:
            raw.name = args.name
        ds = build_dataset(raw, options, skips)
    ds.meta["prepare"] = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in sorted(vars(args).items())
        if v not in (None, [], False) and k != "out"
    }
    save_dataset(ds, args.out)
    return ds, skips


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
        print(json.dumps(summary(ds, args.out, time.perf_counter() - start)), flush=True)
        return 0

    return run_stage("prepare", body)


if __name__ == "__main__":
    raise SystemExit(main())
