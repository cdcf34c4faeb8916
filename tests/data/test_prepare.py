"""The prepare stage: real datasets (counts, splits, ID maps, text, images), reproducibility, bad input.

Real data is read from ``../shared/data`` (or ``$DPREC_SHARED_DATA``); those tests skip where it
is absent. Everything else runs on small files made in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dprec.data.dataset import (
    Dataset,
    DatasetError,
    items_hash,
    items_prefix_hash,
    load_dataset,
    make_dataset,
    save_dataset,
)
from dprec.data.readers import BuildOptions, SkipLog, build_dataset, read_amazon, read_mmrec
from dprec.data.readers.mmrec import align_to_user_sequence, read_user_sequence
from dprec.data.splits import assign_split, held_out_items
from dprec.prepare import main
from tests.shared_data import shared


def run(argv: list[str]) -> tuple[int, dict, str]:
    """main(argv) -> (return code, the JSON summary or {}, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    lines = out.getvalue().strip().splitlines()
    return rc, json.loads(lines[-1]) if rc == 0 else {}, err.getvalue()


def prepared(argv: list[str]) -> tuple[dict, Dataset]:
    rc, summary, err = run(argv)
    assert rc == 0, err
    return summary, load_dataset(summary["out"], verify_hash=True)


def split_sizes(ds: Dataset) -> tuple[int, int, int]:
    return tuple(int((ds.interactions["split"] == k).sum()) for k in (0, 1, 2))


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> tuple[dict, Dataset]:
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    return prepared(["table", "--preset", "ml-100k", "--root", shared("ml-100k"), "--out", out])


def test_ml100k_counts_and_chrono_split(ml100k):
    summary, ds = ml100k
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (943, 1682, 100000)
    assert summary["interactions"] == {"train": 80808, "valid": 9596, "test": 9596}
    assert ds.meta["split_rule"] == "chrono" and ds.meta["kcore"] == 1
    inter = ds.interactions
    last_train = inter[inter["split"] == 0].groupby("user_idx")["timestamp"].max()
    first_test = inter[inter["split"] == 2].groupby("user_idx")["timestamp"].min()
    assert (first_test >= last_train).all()
    assert ds.users["user_id"].iloc[:3].tolist() == ["1", "2", "3"]


def test_ml100k_item_text_joins_details(ml100k):
    _, ds = ml100k
    toy = ds.items[ds.items["item_id"] == "1"].iloc[0]
    assert toy["item_idx"] == 0 and toy["title"] == "Toy Story"
    assert toy["categories"] == "Animation|Children's|Comedy"
    assert toy["description"].startswith("A cowboy doll is profoundly threatened")
    extra = json.loads(toy["extra"])
    assert extra["director"] == ["John Lasseter"] and extra["release_year"] == "1995" and "Tom Hanks" in extra["cast"]
    assert ds.meta["missing_fields"]["description"] == 1682 - 1591


def test_ml100k_random_split_is_byte_reproducible(tmp_path):
    root = shared("ml-100k")
    outs = [tmp_path / name for name in ("a", "b", "c")]
    summaries = [
        run(["table", "--preset", "ml-100k", "--root", root, "--split", "random", "--seed", seed, "--out", out])[1]
        for out, seed in zip(outs, (7, 7, 8), strict=True)
    ]
    for name in ("interactions.parquet", "items.parquet", "users.parquet", "dataset.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert summaries[0]["content_hash"] == summaries[1]["content_hash"] != summaries[2]["content_hash"]
    assert summaries[0]["interactions"] == {"train": 80808, "valid": 9596, "test": 9596}


@pytest.fixture(scope="module")
def baby_raw():
    return read_mmrec(shared("amazon-baby"), SkipLog())


def test_baby_given_split_ids_and_urls(baby_raw):
    ds = build_dataset(baby_raw, BuildOptions(), SkipLog())
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (19445, 7050, 160792)
    assert split_sizes(ds) == (119674, 20559, 20559)
    assert ds.meta["split_rule"] == "given" and ds.meta["source_ids_preserved_as_index"] is True
    item2id = json.loads((shared("amazon-baby") / "item2id.json").read_text())
    assert all(item2id[asin] == idx for asin, idx in zip(ds.items["item_id"], ds.items["item_idx"], strict=True))
    assert ds.items["image_url"].iloc[0].startswith("http://ecx.images-amazon.com/images/I/41Bb6wf")
    assert ds.meta["missing_fields"]["image"] == int((ds.items["image_url"] == "").sum()) < 20


def test_baby_random_split_reproduces_published_sizes(baby_raw):
    given = build_dataset(baby_raw, BuildOptions(), SkipLog())
    ds = build_dataset(baby_raw, BuildOptions(split="random", seed=1), SkipLog())
    assert split_sizes(ds) == (119674, 20559, 20559)
    assert not np.array_equal(ds.interactions["split"], given.interactions["split"])


@pytest.fixture(scope="module")
def sports(tmp_path_factory) -> tuple[dict, Dataset]:
    out = tmp_path_factory.mktemp("sports") / "sports"
    return prepared(
        [
            "mmrec",
            shared("amazon-sports"),
            "--user-sequence",
            "user_sequence.txt",
            "--item-keywords",
            "item_keywords.txt",
            "--out",
            out,
        ]
    )


def test_sports_counts_and_given_split(sports):
    summary, ds = sports
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (35598, 18357, 296337)
    assert summary["interactions"] == {"train": 218409, "valid": 40029, "test": 37899}
    assert ds.meta["id_alignment"]["users"] == "first appearance in the .inter file = line order"
    assert ds.meta["source_ids_preserved_as_index"] is True


def test_sports_asin_mapping_matches_both_files(sports):
    _, ds = sports
    folder = shared("amazon-sports")
    inter = pd.read_csv(folder / "sports.inter", sep="\t")
    ours = ds.interactions[["user_idx", "item_idx", "split"]].to_numpy()
    theirs = inter[["userID", "itemID", "x_label"]].sort_values(["userID", "itemID"]).to_numpy()
    assert np.array_equal(ours, theirs)  # indices are the MMRec IDs, labels kept
    lines = (folder / "user_sequence.txt").read_text().split("\n")
    seq = {
        (tokens[0], item): pos for tokens in (ln.split() for ln in lines if ln) for pos, item in enumerate(tokens[1:])
    }
    users = ds.users["user_id"].to_numpy()[ds.interactions["user_idx"]]
    items = ds.items["item_id"].to_numpy()[ds.interactions["item_idx"]]
    positions = [seq.get(pair) for pair in zip(users, items, strict=True)]
    assert len(seq) == len(positions) and positions == ds.interactions["timestamp"].tolist()
    rack = ds.items[ds.items["item_id"] == "B00307W7EW"].iloc[0]
    assert rack["description"] == "Keywords: rack, fenders, ender, grand, appearance, bonus, steal."


def test_sports_chrono_split_holds_out_the_last_items(sports):
    _, ds = sports
    inter = ds.interactions.assign(split=assign_split(ds.interactions, "chrono"))
    assert split_sizes(Dataset("s", inter, ds.items, ds.users)) == (220539, 37899, 37899)
    span = inter.groupby(["user_idx", "split"])["timestamp"].agg(["min", "max"]).unstack()
    assert (span[("min", 2)] > span[("max", 1)]).all() and (span[("min", 1)] > span[("max", 0)]).all()


def test_hm_sample_keeps_all_articles_with_real_images(tmp_path):
    folder = shared("hm-sample")
    summary, ds = prepared(["table", "--preset", "hm-sample", "--root", folder, "--out", tmp_path / "hm"])
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (4946, 1000, 4977)
    assert summary["skipped"]["duplicate_interaction"] == 23 and ds.meta["cold_items"] == 1000 - 606
    with_image = ds.items[ds.items["image_path"] != ""]
    assert len(with_image) == 100
    for item_id, path in zip(with_image["item_id"], with_image["image_path"], strict=True):
        assert Path(path).is_file() and Path(path).name == f"{int(item_id):010d}.jpg"
        assert Path(path).parent == (folder / "images").resolve()  # referenced, never copied
    assert ds.items["title"].ne("").all() and ds.items["categories"].str.count(r"\|").min() >= 3


def test_hm_sample_kcore_leaves_nothing(tmp_path):
    rc, _, err = run(
        ["table", "--preset", "hm-sample", "--root", shared("hm-sample"), "--kcore", "5", "--out", tmp_path / "hm"]
    )
    assert rc == 2 and "no interactions left after 5-core filtering (4977 before); lower --kcore" in err


# ---------------------------------------------------------------- MMRec fixtures

TOY_INTER = """userID\titemID\trating\tx_label
0\t0\t5\t0
0\t1\t4\t0
0\t2\t3\t1
1\t0\t1\t2
1\tx\t2\t0
1\t1\t0
1\t2\t2\t7
0\t1\t4\t0
1\t2\t2\t0
"""


@pytest.fixture
def toy_mmrec(tmp_path) -> Path:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.inter").write_text(TOY_INTER)
    np.save(folder / "text_feat.npy", np.zeros((3, 4), np.float32))
    np.save(folder / "image_feat.npy", np.zeros((3, 4), np.float32))
    return folder


def test_mmrec_skips_malformed_and_duplicates_and_records_features(toy_mmrec):
    skips = SkipLog()
    ds = build_dataset(read_mmrec(toy_mmrec, skips), BuildOptions(), skips)
    assert ds.meta["skipped"] == {"duplicate_interaction": 1, "duplicate_item": 0, "malformed": 3, "unknown_item": 0}
    path = toy_mmrec / "toy.inter"
    assert f"[malformed] {path}:6: itemID 'x' is not an integer" in skips.examples
    assert f"[malformed] {path}:7: expected 4 tab-separated fields, found 3" in skips.examples
    assert f"[malformed] {path}:8: x_label '7' is not 0, 1 or 2" in skips.examples
    assert f"[duplicate_interaction] {path}:9: user '0' and item '1' again; kept the earliest" in skips.examples
    assert ds.interactions[["user_idx", "item_idx", "split"]].to_numpy().tolist() == [
        [0, 0, 0],
        [0, 1, 0],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
    ]
    assert ds.meta["mmrec_features"] == {
        "text": str(toy_mmrec / "text_feat.npy"),
        "image": str(toy_mmrec / "image_feat.npy"),
    }


def test_mmrec_strict_and_malformed_limit(toy_mmrec):
    with pytest.raises(
        DatasetError, match=r"toy.inter:7: expected 4 tab-separated fields, found 3 \(--strict: malformed"
    ):
        read_mmrec(toy_mmrec, SkipLog(strict=True))
    with pytest.raises(DatasetError, match=r"toy.inter:8: .*3 malformed lines so far, more than --max-malformed 2"):
        read_mmrec(toy_mmrec, SkipLog(max_malformed=2))


def test_mmrec_cli_summary_and_strict_exit_code(toy_mmrec, tmp_path):
    rc, summary, err = run(["mmrec", toy_mmrec, "--out", tmp_path / "out"])
    assert rc == 0 and summary["skipped"]["malformed"] == 3 and summary["users"] == 2
    assert summary["interactions"] == {"train": 3, "valid": 1, "test": 1} and len(summary["content_hash"]) == 64
    assert "prepare: skipped [malformed]" in err
    rc, _, err = run(["mmrec", toy_mmrec, "--strict", "--out", tmp_path / "strict"])
    assert rc == 2 and err.startswith("prepare: error: ") and "toy.inter:7:" in err and "Traceback" not in err


def _sequence_fixture(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, dict, dict]:
    """A folder whose .inter uses shuffled integer IDs for the users and items of a user_sequence.txt."""
    n_users, n_items = 40, 30
    while True:
        sets = [rng.choice(n_items, size=rng.integers(4, 9), replace=False) for _ in range(n_users)]
        owners = [frozenset(u for u, s in enumerate(sets) if i in s) for i in range(n_items)]
        if len(set(owners)) == n_items and all(owners):
            break
    user_id = rng.permutation(n_users)
    item_id = rng.permutation(n_items)
    lines = [" ".join([f"U{u:03d}"] + [f"B{i:04d}" for i in s]) for u, s in enumerate(sets)]
    rows = [(user_id[u], item_id[i]) for u, s in enumerate(sets) for i in s]
    head = [rows[sum(len(s) for s in sets[:u])] for u in range(n_users)]  # users first appear in line order
    rest = [r for r in rows if r not in head]
    rest = [rest[k] for k in rng.permutation(len(rest))]
    folder = tmp_path / "seq"
    folder.mkdir()
    (folder / "seq.inter").write_text("userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t0\n" for u, i in head + rest))
    (folder / "user_sequence.txt").write_text("\n".join(lines) + "\n")
    return (
        folder,
        {str(user_id[u]): f"U{u:03d}" for u in range(n_users)},
        {item_id[i]: f"B{i:04d}" for i in range(n_items)},
    )


def test_user_sequence_alignment_recovers_shuffled_ids(tmp_path):
    folder, users, items = _sequence_fixture(tmp_path, np.random.default_rng(0))
    raw = read_mmrec(folder, SkipLog(), user_sequence="user_sequence.txt")
    ds = build_dataset(raw, BuildOptions(split="chrono"), SkipLog())
    assert raw.meta["id_alignment"]["users"] == "first appearance in the .inter file = line order"
    assert ds.users["user_id"].tolist() == [users[str(k)] for k in range(len(users))]
    assert ds.items["item_id"].tolist() == [items[k] for k in range(len(items))]
    last_items = {ln.split()[0]: ln.split()[-1] for ln in (folder / "user_sequence.txt").read_text().splitlines()}
    test = ds.interactions[ds.interactions["split"] == 2]
    assert len(test) == len(users)  # 4 to 8 items each: exactly one test item per user, the last one
    assert all(
        last_items[ds.users["user_id"][u]] == ds.items["item_id"][i]
        for u, i in zip(test["user_idx"], test["item_idx"], strict=True)
    )


def test_user_sequence_mismatch_fails_loudly(tmp_path):
    folder, _, _ = _sequence_fixture(tmp_path, np.random.default_rng(1))
    seq = folder / "user_sequence.txt"
    lines = seq.read_text().splitlines()
    tokens = lines[0].split()
    lines[0] = " ".join(tokens[:-1] + ["B9999"])  # one foreign item: that user's set no longer matches
    seq.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="match no item of"):
        read_mmrec(folder, SkipLog(), user_sequence="user_sequence.txt")
    lines[0] = " ".join(tokens[:-1])  # one item fewer: counts per user differ
    seq.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="cannot match users to .*user_sequence.txt lines"):
        read_mmrec(folder, SkipLog(), user_sequence="user_sequence.txt")


def test_user_sequence_twin_items_are_ambiguous(tmp_path):
    (tmp_path / "t.inter").write_text("userID\titemID\n0\t0\n0\t1\n1\t0\n1\t1\n")
    (tmp_path / "s.txt").write_text("UA B1 B2\nUB B2 B1\n")
    seq = read_user_sequence(tmp_path / "s.txt")
    inter = pd.DataFrame({"user_key": [0, 0, 1, 1], "item_key": [0, 1, 0, 1]})
    with pytest.raises(DatasetError, match="have exactly the same users"):
        align_to_user_sequence(inter, seq, tmp_path / "t.inter", tmp_path / "s.txt")


def test_keywords_need_asins(tmp_path):
    folder = tmp_path / "k"
    folder.mkdir()
    (folder / "k.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n")
    (folder / "item_keywords.txt").write_text("B1 |a|b\n")
    with pytest.raises(DatasetError, match="item keywords are keyed by ASIN"):
        read_mmrec(folder, SkipLog(), item_keywords="item_keywords.txt")


# ---------------------------------------------------------------- raw Amazon fixtures


def _reviews(rows: list[tuple[str, str, float, int]]) -> list[str]:
    return [json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t}) for u, i, r, t in rows]


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


META_2014 = [
    "{'asin': 'A1', 'title': 'Soft Blanket', 'description': 'Warm.', 'brand': 'Cosy', "
    "'categories': [['Baby', 'Bedding'], ['Baby']], 'imUrl': 'http://img/a1.jpg'}",
    "{'asin': 'A2', 'title': \"Kid's Cup\", 'categories': [['Baby', 'Feeding']], 'imUrl': 'http://img/a2.jpg'}",
    '{"asin": "A3", "title": "Rattle", "description": "Loud.", "categories": [["Baby", "Toys"]]}',
    "{'asin': 'A4', 'title': 'Bib'}",
    "{'title': 'no asin'}",
]


def test_amazon_2014_gz_reviews_and_literal_meta(tmp_path):
    rows = [
        ("u1", "A1", 5.0, 100),
        ("u1", "A2", 4.0, 101),
        ("u1", "A3", 3.0, 102),
        ("u2", "A1", 5.0, 200),
        ("u2", "A2", 2.0, 201),
        ("u2", "A3", 1.0, 202),
        ("u2", "A1", 1.0, 150),  # duplicate, earlier: kept instead of the t=200 one
        ("u3", "A9", 4.0, 300),
    ]  # A9 has no meta: unknown item
    lines = _reviews(rows)
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"reviewerID": "u3", "asin": "A1", "overall": 5, "unixReviewTime": "soon"}))
    reviews = _write_gz(tmp_path / "reviews_Baby.json.gz", lines)
    meta = tmp_path / "meta_Baby.json"
    meta.write_text("\n".join(META_2014) + "\n")
    skips = SkipLog()
    ds = build_dataset(read_amazon(reviews, meta, skips), BuildOptions(kcore=1), skips)
    assert ds.meta["skipped"] == {"duplicate_interaction": 1, "duplicate_item": 0, "malformed": 3, "unknown_item": 1}
    assert (
        f"[malformed] {reviews}:4: bad JSON (Expecting property name enclosed in double quotes at column 2)"
        in skips.examples
    )
    assert f"[malformed] {reviews}:6: unixReviewTime 'soon' is not an integer" in skips.examples
    assert f"[malformed] {meta}:5: meta record without asin" in skips.examples
    assert ds.name == "reviews_Baby" and ds.users["user_id"].tolist() == ["u1", "u2"]
    assert ds.items["item_id"].tolist() == ["A1", "A2", "A3"]  # A4 has no reviews
    a1 = ds.items.iloc[0]
    assert (a1["title"], a1["description"], a1["brand"], a1["categories"], a1["image_url"]) == (
        "Soft Blanket",
        "Warm.",
        "Cosy",
        "Baby|Bedding",
        "http://img/a1.jpg",
    )
    assert ds.items.iloc[1]["title"] == "Kid's Cup"
    kept = ds.interactions[(ds.interactions["user_idx"] == 1) & (ds.interactions["item_idx"] == 0)]
    assert kept[["timestamp", "rating"]].to_numpy().tolist() == [[150, 1.0]]


def test_amazon_2018_meta_and_default_5core(tmp_path):
    users = [f"u{k}" for k in range(6)]
    items = [f"I{k}" for k in range(6)]
    rows = [(u, i, 5.0, 10 * a + b) for a, u in enumerate(users) for b, i in enumerate(items) if (a + b) % 6 != 0]
    rows += [("lonely", "I0", 1.0, 999), ("u1", "rare", 1.0, 998)]  # below 5-core
    reviews = tmp_path / "Baby_5.json"
    reviews.write_text("\n".join(_reviews(rows)) + "\n")
    meta = [
        {
            "asin": i,
            "title": f"Item {i}",
            "description": ["Line one.", "Line two."],
            "brand": "B",
            "category": ["Baby", "Toys", "Baby"],
            "imageURLHighRes": [f"http://hi/{i}.jpg"],
            "imageURL": [f"http://lo/{i}.jpg"],
        }
        for i in [*items, "rare"]
    ]
    meta_path = _write_gz(tmp_path / "meta_Baby.json.gz", [json.dumps(m) for m in meta])
    skips = SkipLog()
    ds = build_dataset(read_amazon(reviews, meta_path, skips), BuildOptions(), skips)
    assert ds.meta["kcore"] == 5 and ds.meta["kcore_removed_interactions"] == 2
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (6, 6, 30)
    assert split_sizes(ds) == (18, 6, 6)
    item = ds.items.iloc[0]
    assert (item["description"], item["categories"], item["image_url"]) == (
        "Line one. Line two.",
        "Baby|Toys",
        "http://hi/I0.jpg",
    )
    rc, summary, err = run(["amazon", "--reviews", reviews, "--meta", meta_path, "--out", tmp_path / "cli"])
    assert rc == 0 and summary["interactions"] == {"train": 18, "valid": 6, "test": 6} and summary["kcore_removed"] == 2


def test_kcore_iterates_until_stable(tmp_path):
    # a chain: dropping item c (1 interaction) leaves u3 with 1, dropping u3 leaves b with 1, and so on
    rows = [
        ("u1", "a", 1.0, 1),
        ("u1", "x", 1.0, 2),
        ("u2", "a", 1.0, 3),
        ("u2", "x", 1.0, 4),
        ("u3", "b", 1.0, 5),
        ("u3", "c", 1.0, 6),
        ("u4", "b", 1.0, 7),
        ("u4", "a", 1.0, 8),
    ]
    reviews = tmp_path / "r.json"
    reviews.write_text("\n".join(_reviews(rows)) + "\n")
    skips = SkipLog()
    ds = build_dataset(read_amazon(reviews, None, skips), BuildOptions(kcore=2, split="random"), skips)
    assert ds.users["user_id"].tolist() == ["u1", "u2"] and ds.items["item_id"].tolist() == ["a", "x"]
    assert ds.meta["kcore_rounds"] == 5 and ds.meta["kcore_removed_interactions"] == 4
    with pytest.raises(DatasetError, match=r"r.json: no interactions left after 3-core filtering \(8 before\)"):
        build_dataset(read_amazon(reviews, None, SkipLog()), BuildOptions(kcore=3), SkipLog())


# ---------------------------------------------------------------- files that lie about themselves


def test_gz_that_is_not_gzip(tmp_path):
    fake = tmp_path / "reviews.json.gz"
    fake.write_text('{"reviewerID": "u", "asin": "a"}\n')
    with pytest.raises(DatasetError, match=r"reviews.json.gz: named .gz but is not gzip data"):
        read_amazon(fake, None, SkipLog())


def test_gzip_without_gz_name(tmp_path):
    path = _write_gz(tmp_path / "reviews.json", _reviews([("u", "a", 1.0, 1)]))
    with pytest.raises(DatasetError, match=r"reviews.json: is gzip-compressed but not named .gz"):
        read_amazon(path, None, SkipLog())


def test_parquet_that_is_csv_and_csv_that_is_parquet(tmp_path):
    fake = tmp_path / "inter.parquet"
    fake.write_text("user,item\n1,2\n")
    rc, _, err = run(
        ["table", "--interactions", fake, "--user-col", "user", "--item-col", "item", "--out", tmp_path / "o"]
    )
    assert rc == 2 and "inter.parquet: not a Parquet file (it is text starting b'user,item" in err
    real = tmp_path / "inter.csv"
    pd.DataFrame({"user": [1], "item": [2]}).to_parquet(real)
    rc, _, err = run(
        ["table", "--interactions", real, "--user-col", "user", "--item-col", "item", "--out", tmp_path / "o"]
    )
    assert rc == 2 and "inter.csv: is Parquet, not text" in err


def test_broken_json_array_names_the_line(tmp_path):
    (tmp_path / "inter.csv").write_text("u,i\n1,1\n")
    (tmp_path / "items.csv").write_text("i,name\n1,one\n")
    (tmp_path / "details.json").write_text('[\n  {"i": 1, "d": "x"},\n  {"i": 2 "d": "y"}\n]\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "interactions: {path: inter.csv, user: u, item: i}\n"
        "items: {path: items.csv, key: i, title: name, joins: [{path: details.json, key: i, "
        "description: d}]}\n"
    )
    rc, _, err = run(["table", "--preset", spec, "--root", tmp_path, "--out", tmp_path / "o"])
    assert rc == 2 and "details.json:3: not valid JSON (Expecting ',' delimiter" in err


# ---------------------------------------------------------------- generic tables via flags


@pytest.fixture
def shop(tmp_path) -> Path:
    (tmp_path / "inter.csv").write_text(
        "customer,article,when,stars\n"
        "c1,10,2024-01-03,5\n"
        "c1,11,2024-01-01,4\n"
        "c1,12,2024-01-02,3\n"
        "c2,10,2024-02-01,2\n"
        "c2,99,2024-02-02,1\n"  # line 6: unknown article
        "c2,11,2024-02-03\n"  # line 7: one field short
        "c2,010,2024-02-04,5\n"  # line 8: the same article written "010": duplicate
        "c3,abc,2024-02-05,5\n"  # line 9: non-integer article
        "c3,11,yesterday,5\n"  # line 10: bad date
    )
    pd.DataFrame(
        {
            "article": [10, 11, 12, 13],
            "name": ["Mug", "Cup", "Bowl", "Plate"],
            "about": ['Tall, "blue" mug', None, "Deep bowl", "Flat"],
            "kind": ["kitchen", "kitchen", "kitchen", "table"],
            "colour": [["blue", "white"], ["red"], [], ["white"]],
        }
    ).to_parquet(tmp_path / "articles.parquet")
    return tmp_path


SHOP_FLAGS = [
    "--interactions",
    "inter.csv",
    "--user-col",
    "customer",
    "--item-col",
    "article",
    "--time-col",
    "when",
    "--rating-col",
    "stars",
    "--items",
    "articles.parquet",
    "--item-key",
    "article",
    "--item-field",
    "title=name",
    "--item-field",
    "description=about",
    "--item-field",
    "categories=kind,colour",
    "--integer-item-ids",
]


def test_table_flags_counted_skips_and_fields(shop):
    rc, summary, err = run(
        ["table", "--root", shop, *SHOP_FLAGS, "--keep-cold-items", "--split", "chrono", "--out", shop / "out"]
    )
    assert rc == 0, err
    assert summary["skipped"] == {"duplicate_interaction": 1, "duplicate_item": 0, "malformed": 3, "unknown_item": 1}
    assert f"{shop / 'inter.csv'}:6: item '99' is not in the item table" in err
    assert f"{shop / 'inter.csv'}:7: expected 4 fields, found 3" in err
    assert f"{shop / 'inter.csv'}:8: user 'c2' and item '10' again; kept the earliest" in err
    assert f"{shop / 'inter.csv'}:9: article 'abc' is not an integer" in err
    assert f"{shop / 'inter.csv'}:10: timestamp 'yesterday' is not a number or date" in err
    ds = load_dataset(shop / "out")
    assert ds.items["item_id"].tolist() == ["10", "11", "12", "13"] and ds.meta["cold_items"] == 1
    assert ds.items["description"].tolist() == ['Tall, "blue" mug', "", "Deep bowl", "Flat"]
    assert ds.items["categories"].tolist() == ["kitchen|blue|white", "kitchen|red", "kitchen", "table|white"]
    c1 = ds.interactions[ds.interactions["user_idx"] == 0].sort_values("timestamp")
    assert c1["item_idx"].tolist() == [1, 2, 0] and c1["split"].tolist() == [0, 1, 2]
    assert c1["timestamp"].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC").timestamp()


def test_table_strict_turns_skips_into_errors(shop):
    rc, _, err = run(["table", "--root", shop, *SHOP_FLAGS, "--strict", "--out", shop / "out"])
    assert rc == 2 and f"{shop / 'inter.csv'}:7: expected 4 fields, found 3 (--strict" in err


def test_table_needs_interactions_path(tmp_path):
    rc, _, err = run(["table", "--out", tmp_path / "o"])
    assert rc == 2 and "interactions.path is required" in err


def test_synthetic_subcommand(tmp_path):
    summary, ds = prepared(["synthetic", "--out", tmp_path / "syn"])
    assert (summary["users"], summary["items"]) == (600, 400) and ds.items["image_bytes"].str.len().min() > 0


def test_folder_missing_a_column_is_refused_by_name(tmp_path):
    inter = pd.DataFrame({"user_idx": [0, 0], "item_idx": [0, 1], "split": [0, 2]})
    items = pd.DataFrame({"item_idx": [0, 1], "item_id": ["a", "b"]})
    ds = make_dataset("old", inter, items, pd.DataFrame({"user_idx": [0], "user_id": ["u"]}))
    save_dataset(ds, tmp_path)
    assert load_dataset(tmp_path, verify_hash=True).items["extra"].tolist() == ["", ""]
    pd.read_parquet(tmp_path / "items.parquet").drop(columns="extra").to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DatasetError, match=r"items.parquet: missing column\(s\) \['extra'\]"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- cold-items split, every reader


def _cold_source(source: str) -> list:
    if source == "sequence":
        root = shared("amazon-scientific")
        return ["sequence", "--interactions", root / "Scientific.inter.json", "--items", root / "Scientific.item.json"]
    if source == "table":
        return ["table", "--preset", "ml-100k", "--root", shared("ml-100k")]
    if source == "mmrec":
        return ["mmrec", shared("amazon-baby")]
    return ["synthetic"]


@pytest.mark.parametrize("source", ["sequence", "table", "mmrec", "synthetic"])
def test_cold_items_split_with_every_reader(source, tmp_path):
    argv = [*_cold_source(source), "--split", "cold-items", "--seed", "3", "--out", tmp_path / "cold"]
    summary, ds = prepared(argv)
    held = held_out_items(ds.meta, ds.n_items)
    assert ds.meta["split_rule" if source != "synthetic" else "split"] == "cold-items"
    with_interactions = ds.interactions["item_idx"].nunique()
    assert len(held.valid) + len(held.test) == round(0.2 * with_interactions)
    assert len(held.valid) - len(held.test) in (0, 1)
    inter = ds.interactions
    assert not inter.loc[inter["split"] == 0, "item_idx"].isin(held.all).any()
    for label, items in ((1, held.valid), (2, held.test)):
        assert (inter.loc[inter["item_idx"].isin(items), "split"] == label).all()
    assert summary["cold_items"] == {
        "valid_items": len(held.valid),
        "test_items": len(held.test),
        "valid_interactions": int(inter["item_idx"].isin(held.valid).sum()),
        "test_interactions": int(inter["item_idx"].isin(held.test).sum()),
    }
    again, _ = prepared([*argv[:-1], tmp_path / "again"])
    assert again["content_hash"] == summary["content_hash"]  # seeded: the same split again


# ---------------------------------------------------------------- add-items


def test_add_items_appends_new_items_and_keeps_every_index(tmp_path):
    _, base = prepared(["synthetic", "--out", tmp_path / "base"])
    new = {
        "NEW-1": {"title": "a red lamp", "categories": "Home,Lamps", "brand": "Lux", "colour": "red"},
        "NEW-2": {"title": "a blue chair", "description": "oak", "image_path": "img/chair.png"},
    }
    (tmp_path / "new.json").write_text(json.dumps(new))
    argv = ["add-items", "--dataset", tmp_path / "base", "--items", tmp_path / "new.json", "--out", tmp_path / "v2"]
    summary, grown = prepared(argv)
    assert summary["added_items"] == 2 and grown.n_items == base.n_items + 2
    assert grown.items["item_id"].tolist()[-2:] == ["NEW-1", "NEW-2"]
    assert grown.items["item_idx"].tolist() == list(range(grown.n_items))
    pd.testing.assert_frame_equal(grown.items.iloc[: base.n_items], base.items)
    pd.testing.assert_frame_equal(grown.interactions, base.interactions)
    assert items_prefix_hash(grown, base.n_items) == items_hash(base) != items_hash(grown)
    last = grown.items.iloc[-1]
    assert last["description"] == "oak" and last["image_path"] == str((tmp_path / "img" / "chair.png").resolve())
    assert json.loads(grown.items.iloc[-2]["extra"]) == {"colour": "red"}
    assert grown.items.iloc[-2]["categories"] == "Home|Lamps"
    record = grown.meta["grown_from"][-1]
    assert record["n_items"] == base.n_items and record["content_hash"] == base.meta["content_hash"]
    assert record["image_root"] == str(tmp_path.resolve())

    (tmp_path / "again.json").write_text(json.dumps({base.items["item_id"].iloc[0]: {"title": "x"}}))
    rc, _, err = run(
        ["add-items", "--dataset", tmp_path / "base", "--items", tmp_path / "again.json", "--out", tmp_path / "v4"]
    )
    assert rc == 2 and f"item {base.items['item_id'].iloc[0]!r} is already in the catalogue" in err
    rc, _, err = run(
        ["add-items", "--dataset", tmp_path / "base", "--items", tmp_path / "new.json", "--out", tmp_path / "base"]
    )
    assert rc == 2 and "input folder" in err and (tmp_path / "base" / "dataset.json").is_file()
