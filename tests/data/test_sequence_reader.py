"""The JSON sequence reader (``prepare sequence``) and the Sports item text (``prepare mmrec --item-text``).

Small files made in ``tmp_path`` carry planted values (a duplicate, malformed entries, ID maps,
comma-holding category names); the real Amazon sets from ``../shared/data`` (or
``$DPREC_SHARED_DATA``) are checked for their published counts and skip where absent.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dprec.data.dataset import Dataset, load_dataset
from dprec.data.readers import BuildOptions, SkipLog, build_dataset, read_sequence
from dprec.data.readers.sequence import split_categories
from dprec.data.splits import chrono_split, holdout_sizes, random_split
from dprec.prepare import main
from tests.shared_data import shared


def run(argv: list) -> tuple[int, dict, str]:
    """main(argv) -> (return code, the JSON summary or {}, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    lines = out.getvalue().strip().splitlines()
    return rc, json.loads(lines[-1]) if rc == 0 else {}, err.getvalue()


def prepared(argv: list) -> tuple[dict, Dataset]:
    rc, summary, err = run(argv)
    assert rc == 0, err
    return summary, load_dataset(summary["out"], verify_hash=True)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: "), err
    assert "Traceback" not in err
    return lines[0]


def split_sizes(ds: Dataset) -> tuple[int, int, int]:
    return tuple(int((ds.interactions["split"] == k).sum()) for k in (0, 1, 2))


def expected_sizes(lengths: list[int]) -> tuple[int, int, int]:
    """Train / valid / test sizes of the 8:1:1 rule for users with these sequence lengths."""
    n = np.asarray(lengths)
    n_valid, n_test = holdout_sizes(n)
    return int(n.sum() - n_valid.sum() - n_test.sum()), int(n_valid.sum()), int(n_test.sum())


# ---------------------------------------------------------------- small planted files

SEQUENCES = """{
  "0": [0, 1, 2, 3, 4],
  "1": [2, 3, 0, 1],
  "2": [4, 1, 4, 0, 2, 3],
  "3": {"not": "a list"},
  "4": [1, null, 3, 1.5, 0],
  "1": [9, 9, 9],
  "5": []
}
"""
ITEMS = {
    "0": {
        "title": "Kettle",
        "description": "Boils water.",
        "brand": "Acme",
        "categories": "Home,Kitchen, Dining,Kettles",
    },
    "1": {"title": "Trowel", "description": ["Digs", "soil."], "brand": "", "categories": ["Garden", "Tools"]},
    "2": {"title": "Lantern", "description": "", "brand": "Globex", "categories": "", "color": "red"},
    "3": "not an object",
    "7": {"title": "Cold item", "description": "", "brand": "", "categories": "Misc"},
    "8": {"title": "No ASIN"},
}


@pytest.fixture
def planted(tmp_path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.inter.json").write_text(SEQUENCES)
    (src / "x.item.json").write_text(json.dumps(ITEMS, indent=1))
    (src / "x.item2id").write_text("".join(f"ASIN{i}\t{i}\n" for i in (0, 1, 2, 4, 7)))  # no ASIN for item 3
    (src / "x.user2id").write_text("".join(f"U{u}\t{u}\n" for u in (0, 1, 2, 5)))  # user 4 has no ASIN
    return {p.name.split(".", 1)[1]: p for p in src.iterdir()}


def test_planted_sequences_text_and_skips(planted, tmp_path):
    skips = SkipLog()
    raw = read_sequence(planted["inter.json"], skips, items=planted["item.json"])
    ds = build_dataset(raw, BuildOptions(), skips)
    # "3" is not a list, the second "1" is a repeated user, user 4 has two non-ID items: 4 malformed;
    # item.json "3" is not an object: 1 more; user 2 lists item 4 twice: 1 duplicate
    assert skips.summary() == {"duplicate_interaction": 1, "duplicate_item": 0, "malformed": 5, "unknown_item": 0}
    assert any("[malformed]" in m and "user '1' listed again" in m for m in skips.examples)
    assert any(":5: user '3': expected a list of items, found a JSON object" in m for m in skips.examples)
    assert ds.users["user_id"].tolist() == ["0", "1", "2", "4"]  # "5" has no items
    assert ds.items["item_id"].tolist() == ["0", "1", "2", "3", "4"]  # index order; cold item 7 dropped
    assert ds.meta["source_ids_preserved_as_index"] is False  # user "3" was skipped: user "4" has index 3
    assert ds.meta["items_without_text"] == 2 and ds.meta["users_without_items"] == 1  # items 3 and 4
    assert ds.meta["item_records_without_interactions"] == 2  # items 7 and 8
    kettle, trowel, lantern = (ds.items.iloc[k] for k in range(3))
    assert (kettle["title"], kettle["brand"], kettle["description"]) == ("Kettle", "Acme", "Boils water.")
    assert kettle["categories"] == "Home|Kitchen, Dining|Kettles"  # ", " belongs to a name
    assert (trowel["description"], trowel["categories"]) == ("Digs soil.", "Garden|Tools")
    assert json.loads(lantern["extra"]) == {"color": "red"} and ds.items.iloc[3]["title"] == ""
    # timestamps are positions in the user's list; the duplicate keeps the earlier position
    inter = ds.interactions
    user2 = inter[inter["user_idx"] == 2].sort_values("timestamp")
    assert user2["item_idx"].tolist() == [4, 1, 0, 2, 3] and user2["timestamp"].tolist() == [0, 1, 3, 4, 5]
    user4 = inter[inter["user_idx"] == 3].sort_values("timestamp")
    assert user4["item_idx"].tolist() == [1, 3, 0] and user4["timestamp"].tolist() == [0, 2, 4]
    # default split: chrono, by position; users with 5 items hold out their last one as test, one before valid
    assert ds.meta["split_rule"] == "chrono"
    user0 = inter[inter["user_idx"] == 0].sort_values("timestamp")
    assert user0["split"].tolist() == [0, 0, 0, 1, 2]


def test_planted_id_maps_store_asins(planted, tmp_path):
    argv = ["sequence", "--interactions", planted["inter.json"], "--items", planted["item.json"]]
    argv += ["--item-ids", planted["item2id"], "--user-ids", planted["user2id"], "--keep-cold-items"]
    summary, ds = prepared([*argv, "--split", "random", "--seed", "3", "--out", tmp_path / "ds"])
    assert ds.users["user_id"].tolist() == ["U0", "U1", "U2"]
    assert ds.items["item_id"].tolist() == ["ASIN0", "ASIN1", "ASIN2", "ASIN4", "ASIN7"]  # kept cold: ASIN7
    assert ds.items.iloc[4]["title"] == "Cold item" and ds.meta["item_records_without_id"] == 1  # record "8"
    # item 3 has no ASIN: its 3 interactions are unknown_item; user 4 has no ASIN: malformed (once per user)
    skipped = summary["skipped"]
    assert skipped["unknown_item"] == 3 and skipped["malformed"] == 6 and skipped["duplicate_interaction"] == 1
    inter = ds.interactions
    labels = random_split(inter["user_idx"].to_numpy(), inter["item_idx"].to_numpy(), 3)
    assert np.array_equal(inter["split"].to_numpy(), labels) and ds.meta["split_rule"] == "random"
    assert ds.meta["source"]["item_ids"] == str(planted["item2id"].resolve())


def test_split_categories():
    assert split_categories("A,B, C,D") == "A|B, C|D"
    assert split_categories("A, B") == "A, B" and split_categories(" A ,A,,B|C ") == "A|B/C"
    assert split_categories(["x", None, "y", "x"]) == "x|y" and split_categories(None) == ""


def test_cli_mistakes_are_one_line(planted, tmp_path):
    src = planted["inter.json"].parent
    (src / "broken.json").write_text('{"0": [1, 2,\n  "1": [3]}\n')
    (src / "array.json").write_text("[[1, 2], [3]]")
    (src / "conflict.item2id").write_text("A\t0\nB\t0\n")
    (src / "empty.json").write_text("{}")
    cases = {
        "missing file": (
            ["--interactions", src / "nope.json"],
            f"{src / 'nope.json'}: no such file (--interactions)",
        ),
        "missing items": (
            ["--interactions", planted["inter.json"], "--items", src / "nope.json"],
            f"{src / 'nope.json'}: no such file (--items)",
        ),
        "malformed JSON": (["--interactions", src / "broken.json"], f"{src / 'broken.json'}:2: not valid JSON"),
        "an array": (
            ["--interactions", src / "array.json"],
            "expected one JSON object {key: value, ...}, found an array",
        ),
        "no interactions": (["--interactions", src / "empty.json"], f"{src / 'empty.json'}: no interactions"),
        "two ASINs for one index": (
            ["--interactions", planted["inter.json"], "--item-ids", src / "conflict.item2id"],
            f"{src / 'conflict.item2id'}:2: index '0' has two ASINs",
        ),
        "a folder": (["--interactions", src], f"{src}: is a folder, not a file (--interactions)"),
    }
    for name, (argv, expected) in cases.items():
        rc, _, err = run(["sequence", *argv, "--out", tmp_path / "out"])
        assert rc == 2 and expected in one_error_line(err), (name, err)
    assert not (tmp_path / "out").exists()
    rc, _, err = run(["sequence", "--interactions", planted["inter.json"], "--out", src])
    assert rc == 2 and "holds the input" in one_error_line(err)


def test_strict_refuses_the_first_skip(planted, tmp_path):
    rc, _, err = run(["sequence", "--interactions", planted["inter.json"], "--strict", "--out", tmp_path / "o"])
    assert rc == 2 and "--strict: malformed input is an error" in one_error_line(err)


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def scientific(tmp_path_factory) -> tuple[dict, Dataset]:
    folder = shared("amazon-scientific")
    out = tmp_path_factory.mktemp("sci") / "scientific-chrono"
    argv = ["sequence", "--interactions", folder / "Scientific.inter.json", "--items", folder / "Scientific.item.json"]
    return prepared([*argv, "--split", "chrono", "--out", out])


def test_scientific_counts_text_and_chrono_split(scientific):
    summary, ds = scientific
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (8317, 4344, 58492)
    assert summary["skipped"] == {"duplicate_interaction": 0, "duplicate_item": 0, "malformed": 0, "unknown_item": 0}
    folder = shared("amazon-scientific")
    sequences = json.loads((folder / "Scientific.inter.json").read_text())
    assert split_sizes(ds) == expected_sizes([len(s) for s in sequences.values()]) == (41592, 8450, 8450)
    assert ds.meta["source_ids_preserved_as_index"] is True and ds.meta["items_without_text"] == 0
    inter = ds.interactions
    for user in ("0", "17", "8316"):  # each user's last item is test, the one before it valid
        items = sequences[user]
        rows = inter[inter["user_idx"] == int(user)].set_index("item_idx")
        assert rows.loc[items[-1], "split"] == 2 and rows.loc[items[-2], "split"] == 1
        assert rows.loc[items, "timestamp"].tolist() == list(range(len(items)))
    records = json.loads((folder / "Scientific.item.json").read_text())
    first = ds.items.iloc[0]
    assert first["title"] == records["0"]["title"] and first["brand"] == "Sealed Unit Parts Co., Inc."
    assert first["categories"] == "Industrial & Scientific|Industrial Electrical|Passive Components|Capacitors"
    assert ds.meta["missing_fields"] == {"title": 0, "brand": 12, "categories": 131, "description": 123, "image": 4344}
    names = {n for c in ds.items["categories"] for n in c.split("|") if n}
    assert "Tapes, Adhesives & Sealants" in names and "Tapes" not in names


def test_scientific_random_split_is_mmrec_8_1_1(scientific):
    _, ds = scientific
    inter = ds.interactions
    labels = random_split(inter["user_idx"].to_numpy(), inter["item_idx"].to_numpy(), seed=0)
    random = Dataset("s", inter.assign(split=labels), ds.items, ds.users)
    assert split_sizes(random) == split_sizes(ds) == (41592, 8450, 8450)
    chrono = chrono_split(inter["user_idx"].to_numpy(), inter["timestamp"].to_numpy())
    assert np.array_equal(chrono, inter["split"].to_numpy()) and not np.array_equal(labels, chrono)


def test_instruments_counts_and_asin_maps(tmp_path):
    folder = shared("amazon-instruments")
    argv = ["sequence", "--interactions", folder / "Instruments.inter.json"]
    argv += ["--item-ids", folder / "Instruments.item2id", "--user-ids", folder / "Instruments.user2id"]
    summary, ds = prepared([*argv, "--split", "random", "--out", tmp_path / "instruments"])
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (17112, 6250, 136226)
    assert sum(summary["skipped"].values()) == 0
    sequences = json.loads((folder / "Instruments.inter.json").read_text())
    assert split_sizes(ds) == expected_sizes([len(s) for s in sequences.values()])
    item_map = pd.read_csv(folder / "Instruments.item2id", sep="\t", header=None, names=["asin", "index"])
    user_map = pd.read_csv(folder / "Instruments.user2id", sep="\t", header=None, names=["asin", "index"])
    assert ds.items["item_id"].tolist() == item_map.sort_values("index")["asin"].tolist()
    assert ds.users["user_id"].tolist() == user_map.sort_values("index")["asin"].tolist()
    assert ds.items["item_id"].iloc[0] == "B002SQJL9U" and ds.users["user_id"].iloc[0] == "A3LXYBBLOOEOMQ"
    assert ds.meta["source_ids_preserved_as_index"] is True
    assert ds.meta["missing_fields"]["title"] == 6250  # no item text file for this set
    user0 = ds.interactions[ds.interactions["user_idx"] == 0]
    assert sorted(user0["item_idx"]) == sorted(sequences["0"])


# ---------------------------------------------------------------- Sports item text


def test_sports_item_text_gives_every_item_a_title_and_categories(tmp_path):
    folder = shared("amazon-sports")
    argv = ["mmrec", folder, "--user-sequence", "user_sequence.txt", "--item-text", "item_text.tsv"]
    argv += ["--item-keywords", "item_keywords.txt", "--out", tmp_path / "sports"]
    summary, ds = prepared(argv)
    assert ds.n_items == 18357 and sum(summary["skipped"].values()) == 0
    assert (ds.meta["item_text_matched"], ds.meta["item_text_missing"], ds.meta["item_text_rows_unmatched"]) == (
        18357,
        0,
        0,
    )
    assert ds.meta["missing_fields"]["title"] == 0 and ds.meta["missing_fields"]["categories"] == 0
    ghost = ds.items[ds.items["item_id"] == "1881509818"].iloc[0]
    assert ghost["title"] == "ghost armorers tool 332 punch hunting fishing"
    assert ghost["categories"] == "Ghost|Sports & Outdoors|Hunting & Fishing|Hunting|Gun Maintenance|Gunsmithing Tools"
    rack = ds.items[ds.items["item_id"] == "B00307W7EW"].iloc[0]
    assert rack["description"] == "Keywords: rack, fenders, ender, grand, appearance, bonus, steal."
    assert split_sizes(ds) == (218409, 40029, 37899)


def _small_sports(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "mm"
    folder.mkdir()
    (folder / "x.inter").write_text(
        "userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t0\n" for u, i in ((0, 0), (0, 1), (1, 1), (1, 2)))
    )
    (folder / "user_sequence.txt").write_text("UA IA IB\nUB IB IC\n")
    (folder / "item_text.tsv").write_text(text)
    return folder


def test_item_text_rows_header_and_missing_items(tmp_path):
    text = (
        "asin\tshort_title\tattributes\nIA\tred  kettle\tAcme | Home | Kitchen\nIB\tbroken line\nIB\tgreen trowel\t\n"
    )
    folder = _small_sports(tmp_path, text)
    summary, ds = prepared(
        [
            "mmrec",
            folder,
            "--user-sequence",
            "user_sequence.txt",
            "--item-text",
            "item_text.tsv",
            "--out",
            tmp_path / "o",
        ]
    )
    assert summary["skipped"]["malformed"] == 1  # "IB\tbroken line": two fields
    assert ds.items["title"].tolist() == ["red kettle", "green trowel", ""]
    assert ds.items["categories"].tolist() == ["Acme|Home|Kitchen", "", ""]
    assert (ds.meta["item_text_matched"], ds.meta["item_text_missing"]) == (2, 1)  # IC has no row
    (folder / "item_text.tsv").write_text("IA\tred kettle\tAcme | Home\n")
    rc, _, err = run(
        [
            "mmrec",
            folder,
            "--user-sequence",
            "user_sequence.txt",
            "--item-text",
            "item_text.tsv",
            "--out",
            tmp_path / "p",
        ]
    )
    assert (
        rc == 2
        and "item_text.tsv:1: expected the header line 'asin<TAB>short_title<TAB>attributes'" in one_error_line(err)
    )
    rc, _, err = run(["mmrec", folder, "--item-text", "item_text.tsv", "--out", tmp_path / "q"])
    assert rc == 2 and "item text is keyed by ASIN" in one_error_line(err)
