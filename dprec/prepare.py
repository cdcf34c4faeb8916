"""Stage 1, prepare: real inputs -> the canonical dataset folder (DESIGN §2, ``dprec.data.dataset``).

Local commands (the same on a cluster head node; prepare runs on one machine)::

    # MMRec folder, kept with its split (x_label); MMRec IDs stay the indices
    python -m dprec.prepare mmrec ../shared/data/amazon-baby --out data/baby
    # Sports: original ASINs, keyword text and chronological positions through user_sequence.txt
    python -m dprec.prepare mmrec ../shared/data/amazon-sports --user-sequence user_sequence.txt \\
        --item-keywords item_keywords.txt --split chrono --out data/sports-chrono
    # raw Amazon reviews (2014 or 2018, JSON lines, .gz or plain), 5-core, MMRec-style random 8:1:1
    python -m dprec.prepare amazon --reviews reviews_Baby_5.json.gz --meta meta_Baby.json.gz --out data/baby-raw
    # generic tables through a shipped preset or your own YAML (see dprec/data/readers/table.py)
    python -m dprec.prepare table --preset ml-100k --root ../shared/data/ml-100k --out data/ml-100k
    python -m dprec.prepare table --preset hm-sample --root ../shared/data/hm-sample --out data/hm-sample
    python -m dprec.prepare table --interactions ratings.csv --user-col uid --item-col iid --time-col ts \\
        --items items.parquet --item-key iid --item-field title=name --item-field categories=genre,style --out data/x
    # the embedded synthetic default (what the demo uses)
    python -m dprec.prepare synthetic --out data/default

Common options: ``--split {given,random,chrono}`` (default: ``given`` where the source has
labels, else the source's default), ``--seed N`` (random split), ``--kcore K`` (default 5 for raw
Amazon, 1 = no filtering for MMRec and presets), ``--keep-cold-items``, ``--strict``,
``--max-malformed N``. Splits are described in ``dprec.data.splits``.

Bad input (details in ``dprec.data.readers.common`` and ``.build``):

==============================================  =============================================
case                                            what happens
==============================================  =============================================
file not what its name says (.gz not gzip,      error naming the file and what it looks like
.parquet that is text, text that is binary)
malformed line (field count, non-integer ID,    skipped, counted ``malformed``, first ones
bad JSON, bad number/date, blank ID)            printed; error above ``--max-malformed``
duplicate (user, item)                          earliest kept, counted ``duplicate_interaction``
interaction naming an item not in the items     skipped, counted ``unknown_item``
item listed twice in an item table              first kept, counted ``duplicate_item``
nothing left after k-core                       error: lower ``--kcore``
==============================================  =============================================

``--strict`` turns every counted skip into an error naming its ``path:line``. The counts are
in ``dataset.json`` (``skipped``) and in the one-line JSON summary printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dprec.config import ConfigError
from dprec.data.dataset import Dataset, DatasetError, save_dataset
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
from dprec.data.splits import SPLIT_RULES


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    parser.add_argument("--name", help="dataset name (default: from the source)")
    parser.add_argument("--split", choices=SPLIT_RULES, help="split rule (default: the source's)")
    parser.add_argument("--seed", type=int, help="seed of the random split (default 0)")
    parser.add_argument("--kcore", type=int, help="min interactions per user and item, iterated (1 = no filter)")
    parser.add_argument(
        "--keep-cold-items",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep catalogue items without interactions",
    )
    parser.add_argument("--strict", action="store_true", help="any skipped input is an error")
    parser.add_argument("--max-malformed", type=int, default=100, help="error above this many malformed lines")


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


def _table_overrides(args: argparse.Namespace) -> dict[str, Any]:
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
        "keep_all": args.keep_cold_items,
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
    return {
        "interactions": inter,
        "items": items if any(v is not None for v in items.values()) else None,
        "integer_user_ids": args.integer_user_ids,
        "integer_item_ids": args.integer_item_ids,
    }


def read_source(args: argparse.Namespace, skips: SkipLog) -> RawData:
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
            keep_cold_items=bool(args.keep_cold_items),
        )
    spec = load_spec(args.preset, _table_overrides(args))
    if spec.items is None and args.keep_cold_items:
        raise ConfigError("--keep-cold-items needs an item table (--items or a preset with items)")
    return read_table_source(spec, args.root, skips)


def prepare(args: argparse.Namespace) -> tuple[Dataset, SkipLog]:
    """Read, build and write the dataset that ``args`` describe."""
    skips = SkipLog(strict=args.strict, max_malformed=args.max_malformed)
    if args.source == "synthetic":
        from dprec.data.synthetic import SyntheticSpec, generate

        spec = SyntheticSpec() if args.seed is None else SyntheticSpec(seed=args.seed)
        ds = generate(spec, split=args.split or "random")
    else:
        raw = read_source(args, skips)
        if args.name:
            raw.name = args.name
        options = BuildOptions(
            split=args.split, seed=args.seed or 0, kcore=args.kcore, keep_cold_items=args.keep_cold_items
        )
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
        "interactions": {"train": per["0"], "valid": per["1"], "test": per["2"]},
        "skipped": ds.meta.get("skipped", {}),
        "kcore_removed": ds.meta.get("kcore_removed_interactions", 0),
        "content_hash": ds.meta["content_hash"],
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        ds, skips = prepare(args)
    except (DatasetError, ConfigError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    for message in skips.examples:
        print(f"prepare: skipped {message}", file=sys.stderr)
    print(json.dumps(summary(ds, args.out, time.perf_counter() - start)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
