"""``python -m dprec.extract import-codes``: discrete per-item codes -> one-hot-per-level feature shards.

Small datasets and code files made in ``tmp_path`` carry planted codes and faults (exact vectors,
flags and counts are asserted); the real Amazon Instruments text and image codes from
``../shared/data`` (or ``$DPREC_SHARED_DATA``) are joined through the item map and checked entry
by entry, and skip where absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dprec import extract
from dprec.data.dataset import load_dataset, make_dataset, save_dataset
from dprec.data.readers import BuildOptions, SkipLog, build_dataset, read_sequence
from dprec.features import read_features
from dprec.features.codes import read_code_file
from dprec.features.modalities import load_features
from dprec.features.shards import load_manifest
from tests.shared_data import shared

N = 6


def run(capsys, argv: list) -> tuple[int, dict, str]:
    """extract.main(["import-codes", ...]) -> (rc, the JSON summary or {}, stderr)."""
    rc = extract.main(["import-codes", *[str(a) for a in argv]])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("{")]
    return rc, json.loads(lines[-1]) if rc == 0 else {}, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extract: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six items whose IDs are "10".."15" (the code files below are keyed by item ID)."""
    items = pd.DataFrame({"item_idx": range(N), "item_id": [str(10 + i) for i in range(N)]})
    inter = pd.DataFrame({"user_idx": [0] * N, "item_idx": range(N), "split": [0] * N})
    ds = make_dataset("codes", inter, items, pd.DataFrame({"user_idx": [0], "user_id": ["u"]}))
    return save_dataset(ds, tmp_path / "ds")


PLANTED = {
    "10": ["<a_3>", "<b_0>", "<c_1>"],
    "11": ["<a_0>", "<b_4>", "<c_4>"],  # the largest value: 5 values per level
    "12": ["<b_1>", "<a_1>", "<c_1>"],  # levels out of order: malformed
    "13": ["<a_2>", "<b_2>", "c_2"],  # not a code: malformed
    # "14" is absent
    "015": [" <a_1>", "<b_1>", "<c_0>"],  # the key "015" is item "15"; spaces around a code are stripped
    "99": ["<a_1>", "<b_1>", "<c_1>"],  # no such item: skipped and counted
}


def one_hot(codes: list[int], values: int) -> np.ndarray:
    vec = np.zeros(len(codes) * values, np.float32)
    for level, value in enumerate(codes):
        vec[level * values + value] = 1.0
    return vec


def test_planted_codes_become_exact_one_hot_vectors(dataset, tmp_path, capsys):
    (tmp_path / "codes.json").write_text(json.dumps(PLANTED, indent=2))
    out = tmp_path / "feats"
    argv = ["--dataset", dataset, "--codes", tmp_path / "codes.json", "--modality", "text_codes", "--out", out]
    rc, summary, err = run(capsys, [*argv, "--items-per-shard", "4", "--max-missing-share", "0.5"])
    assert rc == 0, err
    assert summary["failures"] == {
        "text_codes_code_malformed": 2,
        "text_codes_code_missing": 1,
        "text_codes_code_not_in_dataset": 1,
    }
    feats = read_features(out, dataset=dataset)
    expected = np.zeros((N, 15), np.float32)
    expected[0], expected[1], expected[5] = one_hot([3, 0, 1], 5), one_hot([0, 4, 4], 5), one_hot([1, 1, 0], 5)
    np.testing.assert_array_equal(feats["text_codes"], expected)
    assert feats["text_codes_missing"].tolist() == [False, False, True, True, True, False]
    manifest = load_manifest(out)
    assert manifest["dims"] == {"text_codes": 15} and manifest["complete"]
    spec = manifest["spec"]["modalities"]["text_codes"]
    assert spec["encoding"] == {
        "kind": "one-hot per level, levels concatenated",
        "code_format": "<level_value>",
        "levels": ["a", "b", "c"],
        "values_per_level": 5,
        "values_per_level_from": "largest value in the file + 1",
        "dim": 15,
    }
    assert spec["join"]["map"] is None and spec["revision"]["sha256"]
    prov = manifest["provenance"]["text_codes"]
    assert (prov["entries"], prov["entries_not_in_dataset"], prov["entries_not_in_dataset_examples"]) == (6, 1, ["99"])
    assert (prov["items_coded"], prov["items_absent"], prov["items_malformed"]) == (3, 1, 2)
    assert manifest["counts"] == {"text_codes_code_malformed": 2, "text_codes_code_missing": 1}
    # the flags are in each item's meta.json, and the modality reads as folder#modality
    loaded, manifests = load_features({"codes": f"{out}#text_codes"}, load_dataset(dataset))
    np.testing.assert_array_equal(loaded["codes"], expected)
    assert list(manifests) == [str(out)]
    # a rerun keeps the shards
    rc, summary, _ = run(capsys, [*argv, "--items-per-shard", "4", "--max-missing-share", "0.5"])
    assert rc == 0 and summary["shards_skipped"] == 2 and summary["shards_written"] == 0


def test_values_per_level_given_and_two_files_in_one_folder(dataset, tmp_path, capsys):
    text = {str(10 + i): [f"<a_{i}>", f"<b_{7 - i}>"] for i in range(N)}
    image = {str(10 + i): [f"<A_{i % 2}>", f"<B_{i}>", "<C_9>", f"<D_{i + 10}>"] for i in range(N)}
    image["12"] = ["<A_0>", "<B_1>", "<C_9>", "<D_16>"]  # 16 is beyond --values-per-level 16: malformed
    (tmp_path / "t.json").write_text(json.dumps(text))
    (tmp_path / "i.json").write_text(json.dumps(image))
    out = tmp_path / "both"
    argv = ["--dataset", dataset, "--codes", tmp_path / "t.json", tmp_path / "i.json"]
    argv += ["--modality", "text_codes", "image_codes", "--values-per-level", "16", "--max-missing-share", "0.2"]
    rc, summary, err = run(capsys, [*argv, "--out", out, "--store-dtype", "float16"])
    assert rc == 0, err
    assert summary["failures"] == {"image_codes_code_malformed": 1}
    feats = read_features(out, dataset=dataset)
    assert feats["text_codes"].shape == (N, 32) and feats["image_codes"].shape == (N, 64)
    for i in range(N):
        np.testing.assert_array_equal(feats["text_codes"][i], one_hot([i, 7 - i], 16))
        if i != 2:
            np.testing.assert_array_equal(feats["image_codes"][i], one_hot([i % 2, i, 9, i + 10], 16))
    assert not feats["image_codes"][2].any() and feats["image_codes_missing"].tolist() == [i == 2 for i in range(N)]
    assert not feats["text_codes_missing"].any()
    encodings = {m: s["encoding"] for m, s in load_manifest(out)["spec"]["modalities"].items()}
    assert encodings["image_codes"]["levels"] == ["A", "B", "C", "D"] and encodings["image_codes"]["dim"] == 64
    assert encodings["text_codes"]["values_per_level_from"] == "given (--values-per-level)"
    # a later call into the same folder with another set of modalities is another configuration
    rc, _, err = run(capsys, [*argv[:4], "--modality", "text_codes", "--values-per-level", "16", "--out", out])
    assert rc == 2 and "holds features of another configuration" in one_error_line(err)


def test_read_code_file_infers_the_levels_from_the_majority(tmp_path):
    codes = {str(k): [f"<x_{k}>", f"<y_{k % 3}>"] for k in range(5)}
    codes["5"] = ["<y_1>", "<x_1>"]
    codes["6"] = ["<x_1>"]
    codes["7"] = "<x_1> <y_1>"
    (tmp_path / "c.json").write_text(json.dumps(codes))
    read = read_code_file(tmp_path / "c.json")
    assert read.encoding.levels == ["x", "y"] and read.encoding.values_per_level == 5
    assert [p is None for p in read.problems] == [True] * 5 + [False] * 3
    assert "does not have the levels x y in this order" in read.problems[5]
    assert read.values[:5].tolist() == [[k, k % 3] for k in range(5)] and (read.values[5:] == -1).all()


def test_the_key_map_prepare_read_is_used(tmp_path, capsys):
    """A sequence dataset stores ASINs; the code file's index keys go through the map recorded at prepare."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "s.inter.json").write_text(json.dumps({"0": [0, 1, 2], "1": [2, 3, 1]}))
    (src / "s.item2id").write_text("B0\t0\nB1\t1\nB2\t2\nB3\t3\nB9\t9\n")
    (src / "codes.json").write_text(
        json.dumps({"3": ["<a_0>", "<b_1>"], "0": ["<a_1>", "<b_0>"], "1": ["<a_1>", "<b_1>"], "2": ["<a_0>", "<b_0>"]})
    )
    skips = SkipLog()
    ds = build_dataset(read_sequence(src / "s.inter.json", skips, item_ids=src / "s.item2id"), BuildOptions(), skips)
    folder = save_dataset(ds, tmp_path / "ds")
    assert ds.items["item_id"].tolist() == ["B0", "B1", "B2", "B3"]
    rc, summary, err = run(
        capsys, ["--dataset", folder, "--codes", src / "codes.json", "--modality", "codes", "--out", tmp_path / "f"]
    )
    assert rc == 0 and summary["failures"] == {}, err
    feats = read_features(tmp_path / "f", dataset=folder)
    expected = [one_hot(c, 2) for c in ([1, 0], [1, 1], [0, 0], [0, 1])]
    np.testing.assert_array_equal(feats["codes"], np.stack(expected))
    manifest = load_manifest(tmp_path / "f")
    join = manifest["spec"]["modalities"]["codes"]["join"]
    assert join["map"] == "s.item2id" and len(join["map_sha256"]) == 64
    assert manifest["provenance"]["join"]["map_from"].startswith("recorded by prepare")
    # without the map the keys name no item (they are indices, the dataset's IDs are ASINs)
    argv = ["--dataset", folder, "--codes", src / "codes.json", "--modality", "codes", "--item-ids", "none"]
    rc, _, err = run(capsys, [*argv, "--out", tmp_path / "g"])
    line = one_error_line(err)
    assert rc == 2 and "none of its 4 keys (like ['3', '0']) names an item of dataset" in line
    assert "pass --item-ids MAP" in line and not (tmp_path / "g" / "manifest.json").exists()


def test_mistakes_are_one_line_and_write_nothing(dataset, tmp_path, capsys):
    (tmp_path / "broken.json").write_text('{"10": ["<a_1>",\n "<b_2>"\n "11": []}')
    (tmp_path / "list.json").write_text('[["<a_1>"]]')
    (tmp_path / "words.json").write_text('{"10": ["kettle"], "11": "teapot"}')
    (tmp_path / "few.json").write_text(json.dumps({"10": ["<a_1>", "<b_1>"], "11": ["<a_0>", "<b_1>"]}))
    base = ["--dataset", dataset, "--modality", "m"]
    cases = {
        "missing file": (
            [*base, "--codes", tmp_path / "nope.json"],
            f"{tmp_path / 'nope.json'}: no such file (--codes)",
        ),
        "malformed JSON": (
            [*base, "--codes", tmp_path / "broken.json"],
            f"{tmp_path / 'broken.json'}:3: not valid JSON",
        ),
        "not an object": ([*base, "--codes", tmp_path / "list.json"], "expected one JSON object"),
        "no codes": ([*base, "--codes", tmp_path / "words.json"], "no entry is a list of codes like"),
        "too many items without a code": (
            [*base, "--codes", tmp_path / "few.json"],
            "4 of 6 items of dataset 'codes' have no well-formed code (4 absent, 0 malformed), more than "
            "--max-missing-share 0.01",
        ),
        "no --codes": (["--dataset", dataset], "give --codes FILE [FILE ...] and --modality NAME"),
        "names and files differ": (
            [*base, "n", "--codes", tmp_path / "few.json"],
            "1 --codes file(s) but 2 --modality name(s)",
        ),
        "a bad modality name": (
            ["--dataset", dataset, "--modality", "text_missing", "--codes", tmp_path / "few.json"],
            "--modality 'text_missing': use lower-case letters",
        ),
        "a missing map": (
            [*base, "--codes", tmp_path / "few.json", "--item-ids", tmp_path / "nope.tsv"],
            f"{tmp_path / 'nope.tsv'}: no such file (--item-ids)",
        ),
        "a missing dataset": (
            ["--dataset", tmp_path / "nods", "--modality", "m", "--codes", tmp_path / "few.json"],
            str(tmp_path / "nods"),
        ),
    }
    for name, (argv, expected) in cases.items():
        rc, _, err = run(capsys, [*argv, "--out", tmp_path / "out"])
        assert rc == 2 and expected in one_error_line(err), (name, err)
        assert not (tmp_path / "out" / "manifest.json").exists(), name


# ---------------------------------------------------------------- the real Instruments codes


def test_instruments_text_and_image_codes(tmp_path, capsys):
    folder = shared("amazon-instruments")
    skips = SkipLog()
    raw = read_sequence(
        folder / "Instruments.inter.json",
        skips,
        item_ids=folder / "Instruments.item2id",
        user_ids=folder / "Instruments.user2id",
    )
    ds = build_dataset(raw, BuildOptions(split="random"), skips)
    data = save_dataset(ds, tmp_path / "instruments")
    out = tmp_path / "codes"
    files = [folder / "Instruments.text_codes.json", folder / "Instruments.image_codes.json"]
    argv = ["--dataset", data, "--codes", *files, "--modality", "text_codes", "image_codes", "--out", out]
    rc, summary, err = run(capsys, [*argv, "--items-per-shard", "1024", "--store-dtype", "float16"])
    assert rc == 0, err
    assert summary["failures"] == {} and summary["items"] == 6250 and summary["shards_written"] == 7
    manifest = load_manifest(out)
    for m, levels in (("text_codes", ["a", "b", "c", "d"]), ("image_codes", ["A", "B", "C", "D"])):
        enc = manifest["spec"]["modalities"][m]["encoding"]
        assert (enc["levels"], enc["values_per_level"], enc["dim"]) == (levels, 256, 1024)
        prov = manifest["provenance"][m]
        assert (prov["entries"], prov["items_coded"], prov["entries_not_in_dataset"]) == (6250, 6250, 0)
    feats = read_features(out, dataset=data)
    # by hand: dataset item -> ASIN -> index in Instruments.item2id -> that key's codes in the file
    index_of = dict(line.split("\t") for line in (folder / "Instruments.item2id").read_text().split("\n") if line)
    for m, path in zip(("text_codes", "image_codes"), files, strict=True):
        codes = json.loads(path.read_text())
        vectors = feats[m]
        assert vectors.shape == (6250, 1024) and (vectors.sum(axis=1) == 4).all()
        for item in (0, 1, 17, 3155, 6249):
            key = index_of[ds.items["item_id"].iloc[item]]
            values = [int(c.split("_")[1].rstrip(">")) for c in codes[key]]
            np.testing.assert_array_equal(vectors[item], one_hot(values, 256), err_msg=f"{m} item {item}")
    assert ds.items["item_id"].iloc[0] == "B002SQJL9U"
    np.testing.assert_array_equal(np.flatnonzero(feats["text_codes"][0]), [170, 256 + 224, 512 + 251, 768 + 151])
