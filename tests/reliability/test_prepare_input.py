"""Hostile and careless input to ``prepare`` and the dataset folder, by class.

1. source data lost: an ``--out`` that is, holds or lies inside an input; replacing a dataset folder
   unasked; a write failing midway; a folder whose files do not belong together.
2. OS errors (an ``--out`` that is a file, a read-only parent, a folder given for a file, a missing
   input): one ``prepare: error: ...`` line, exit code 2, no traceback.
3. late or misleading failures: deeply nested JSON, binary files, byte order marks, control
   characters in IDs, datasets that cannot be evaluated.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dprec.data.dataset import DatasetError, check_trainable, load_dataset, make_dataset, save_dataset
from dprec.prepare import main


def run(argv: list) -> tuple[int, dict, str]:
    """main(argv) -> (return code, the JSON summary or {}, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    lines = out.getvalue().strip().splitlines()
    return rc, json.loads(lines[-1]) if rc == 0 else {}, err.getvalue()


def one_error_line(err: str) -> str:
    """The single ``prepare: error:`` line of ``err`` (and nothing else: no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: "), err
    assert "Traceback" not in err
    return lines[0]


def write_interactions(path: Path, n_users: int = 30, n_items: int = 60, per_user: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{i}") for u in range(n_users) for i in rng.choice(n_items, per_user, replace=False)]
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in rows))
    return path


def table_args(path: Path, *more) -> list:
    return ["table", "--interactions", path, "--user-col", "user", "--item-col", "item", *more]


@pytest.fixture
def source(tmp_path) -> Path:
    """``tmp_path/src/inter.csv``: 30 users, 60 items, 10 interactions each."""
    folder = tmp_path / "src"
    folder.mkdir()
    return write_interactions(folder / "inter.csv")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. source data lost


def _mmrec_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mm"
    folder.mkdir()
    (folder / "mm.inter").write_text(
        "userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t{(u + i) % 3}\n" for u in range(4) for i in range(5))
    )
    return folder


@pytest.mark.parametrize(
    "case",
    ["out is the input folder", "out is an ancestor of the input", "out is the input file", "out is the table root"],
)
def test_out_that_is_or_holds_a_table_input_is_refused(source, case):
    out = {
        "out is the input folder": source.parent,
        "out is an ancestor of the input": source.parent.parent,
        "out is the input file": source,
        "out is the table root": source.parent,
    }[case]
    extra = ["--root", source.parent] if case == "out is the table root" else []
    before = snapshot(source.parent)
    for overwrite in ([], ["--overwrite"]):
        rc, _, err = run(table_args(source, *extra, *overwrite, "--out", out))
        line = one_error_line(err)
        assert rc == 2 and "input" in line and "Choose another --out" in line, line
    assert snapshot(source.parent) == before


@pytest.mark.parametrize("where", ["the folder", "inside the folder", "above the folder"])
def test_out_that_is_in_or_holds_an_mmrec_source_folder_is_refused(tmp_path, where):
    folder = _mmrec_folder(tmp_path)
    out = {"the folder": folder, "inside the folder": folder / "prepared", "above the folder": tmp_path}[where]
    before = snapshot(folder)
    rc, _, err = run(["mmrec", folder, "--overwrite", "--out", out])
    line = one_error_line(err)
    assert rc == 2 and "input folder" in line and str(folder) in line
    assert snapshot(folder) == before and not (folder / "prepared").exists()


def test_out_that_holds_amazon_reviews_is_refused(tmp_path):
    reviews = tmp_path / "raw" / "reviews.json"
    reviews.parent.mkdir()
    reviews.write_text(json.dumps({"reviewerID": "u", "asin": "a", "overall": 5, "unixReviewTime": 1}) + "\n")
    rc, _, err = run(["amazon", "--reviews", reviews, "--kcore", "1", "--out", reviews.parent])
    assert rc == 2 and f"holds the input {reviews}" in one_error_line(err)
    rc, _, err = run(["amazon", "--reviews", reviews, "--kcore", "1", "--out", reviews])
    assert rc == 2 and f"is the input {reviews}" in one_error_line(err)


def test_existing_dataset_folder_is_replaced_only_with_overwrite(source, tmp_path):
    out = tmp_path / "ds"
    rc, first, err = run(table_args(source, "--split", "random", "--seed", 1, "--out", out))
    assert rc == 0, err
    before = snapshot(out)
    rc, _, err = run(table_args(source, "--split", "random", "--seed", 2, "--out", out))
    line = one_error_line(err)
    assert rc == 2 and line == (
        f"prepare: error: {out}: this folder already holds a dataset; choose another --out or pass --overwrite"
    )
    assert snapshot(out) == before
    rc, second, err = run(table_args(source, "--split", "random", "--seed", 2, "--overwrite", "--out", out))
    assert rc == 0, err
    assert second["content_hash"] != first["content_hash"]
    assert load_dataset(out, verify_hash=True).meta["content_hash"] == second["content_hash"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_folder_that_is_not_a_dataset_is_never_replaced(source, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = run(table_args(source, "--overwrite", "--out", out))
    line = one_error_line(err)
    assert rc == 2 and "is not empty and is not a dataset folder" in line and "'notes.txt'" in line
    assert snapshot(out) == {"notes.txt": b"keep me"}
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(table_args(source, "--out", empty))  # an empty folder is fine without --overwrite
    assert rc == 0, err


def _fail_after_first_parquet(monkeypatch, exc: BaseException) -> list:
    written = []
    original = pd.DataFrame.to_parquet

    def flaky(self, *args, **kwargs):
        if written:
            raise exc
        written.append(args[0] if args else kwargs.get("path"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    return written


def test_write_failing_midway_leaves_the_old_folder_intact(source, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    rc, old, err = run(table_args(source, "--split", "random", "--seed", 1, "--out", out))
    assert rc == 0, err
    before = snapshot(out)
    written = _fail_after_first_parquet(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    rc, _, err = run(table_args(source, "--split", "random", "--seed", 2, "--overwrite", "--out", out))
    line = one_error_line(err)
    assert rc == 2 and "No space left on device" in line and str(out) in line
    assert len(written) == 1  # the failure came after the first table file
    assert snapshot(out) == before
    assert load_dataset(out, verify_hash=True).meta["content_hash"] == old["content_hash"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # the library call: any exception, the old folder stays, nothing half-written appears
    monkeypatch.undo()
    ds = load_dataset(out)
    fresh = tmp_path / "fresh"
    _fail_after_first_parquet(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        save_dataset(ds, out, overwrite=True)
    with pytest.raises(RuntimeError, match="boom"):
        save_dataset(ds, fresh)
    assert snapshot(out) == before and not fresh.exists()


def test_folder_whose_files_do_not_belong_together_is_refused(source, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, seed in ((a, 1), (b, 2)):  # same users, items and row counts; other splits
        rc, _, err = run(table_args(source, "--split", "random", "--seed", seed, "--out", out))
        assert rc == 0, err
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / "interactions.parquet", mixed / "interactions.parquet")  # new interactions, old rest
    with pytest.raises(DatasetError, match=r"interactions.parquet: .*do not belong together"):
        load_dataset(mixed)
    shutil.copy(b / "dataset.json", mixed / "dataset.json")  # new interactions and dataset.json, old items
    with pytest.raises(DatasetError, match=r"items.parquet: .*do not belong together"):
        load_dataset(mixed)
    edited = tmp_path / "edited"
    shutil.copytree(a, edited)
    frame = pd.read_parquet(edited / "interactions.parquet")  # keeps the file's own metadata
    frame.loc[0, "split"] = 2 if frame.loc[0, "split"] != 2 else 0
    frame.to_parquet(edited / "interactions.parquet", index=False)
    with pytest.raises(DatasetError, match=r"interactions.parquet: .*do not belong together"):
        load_dataset(edited)
    half = tmp_path / "half"
    shutil.copytree(a, half)
    (half / "dataset.json").unlink()  # what an interrupted writer that puts dataset.json last leaves
    with pytest.raises(DatasetError, match=r"half-written dataset folder .*run `python -m dprec.prepare` again"):
        load_dataset(half)
    (a / "users.parquet").unlink()
    with pytest.raises(DatasetError, match=r"users.parquet: missing, but dataset.json is there"):
        load_dataset(a)


# ---------------------------------------------------------------- 2. OS errors: one line, exit code 2


def test_out_that_is_a_file_or_under_a_file(source, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run(table_args(source, "--out", afile))
    assert rc == 2 and one_error_line(err) == (
        f"prepare: error: {afile}: exists and is a file, not a folder; --out must name a dataset folder"
    )
    rc, _, err = run(table_args(source, "--out", afile / "sub" / "ds"))
    assert rc == 2 and f"{afile} is a file, not a folder" in one_error_line(err)
    assert afile.read_text() == "x"


def test_read_only_parent(source, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        rc, _, err = run(table_args(source, "--out", parent / "ds"))
        assert rc == 2 and f"{parent} is read-only (Permission denied)" in one_error_line(err)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_write_error_from_the_os_is_one_line(source, tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    rc, _, err = run(table_args(source, "--out", tmp_path / "ds"))
    line = one_error_line(err)
    assert rc == 2 and line.startswith(f"prepare: error: cannot write the dataset folder {tmp_path / 'ds'}: ")
    assert "Permission denied" in line


def test_folder_where_a_file_is_expected_and_missing_inputs(source, tmp_path):
    folder = source.parent
    cases = {
        "table interactions": (table_args(folder), f"{folder}: is a folder, not a file"),
        "table items": (
            table_args(source, "--items", folder, "--item-key", "item"),
            f"{folder}: is a folder, not a file",
        ),
        "amazon reviews": (["amazon", "--reviews", folder], f"{folder}: is a folder, not a file (--reviews)"),
        "amazon meta": (
            ["amazon", "--reviews", source, "--meta", folder],
            f"{folder}: is a folder, not a file (--meta)",
        ),
        "mmrec folder is a file": (["mmrec", source], f"{source}: is a file, not an MMRec folder"),
        "table --root is a file": (table_args(Path("inter.csv"), "--root", source), f"{source}: is a file"),
        "missing table": (table_args(folder / "nope.csv"), f"{folder / 'nope.csv'}: no such file"),
        "missing reviews": (["amazon", "--reviews", folder / "nope.json"], f"{folder / 'nope.json'}: no such file"),
        "missing mmrec folder": (["mmrec", folder / "nope"], f"{folder / 'nope'}: no such folder"),
    }
    for name, (argv, expected) in cases.items():
        rc, _, err = run([*argv, "--out", tmp_path / "out"])
        assert rc == 2 and expected in one_error_line(err), (name, err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3. late or misleading failures


def _reviews(n_users: int = 6, n_items: int = 6) -> list[str]:
    return [
        json.dumps({"reviewerID": f"u{u}", "asin": f"a{i}", "overall": 5, "unixReviewTime": 10 * u + i})
        for u in range(n_users)
        for i in range(n_items)
    ]


@pytest.mark.parametrize("depth", [100_000, 5_000, 150])
def test_deeply_nested_json_line_is_skipped_and_counted(tmp_path, depth):
    lines = _reviews()
    lines.insert(3, "[" * depth + "]" * depth)
    lines.insert(5, json.dumps({"reviewerID": "u9", "asin": "a1", "deep": json.loads("[" * 120 + "]" * 120)}))
    reviews = tmp_path / "reviews.json"
    reviews.write_text("\n".join(lines) + "\n")
    rc, summary, err = run(["amazon", "--reviews", reviews, "--kcore", "1", "--out", tmp_path / "out"])
    assert rc == 0, err
    assert summary["skipped"]["malformed"] == 2 and summary["users"] == 6
    assert f"[malformed] {reviews}:4: " in err and f"[malformed] {reviews}:6: JSON nested more than 100" in err
    # the same line in a JSON-lines table
    table = tmp_path / "inter.jsonl"
    records = [json.dumps({"user": f"u{u}", "item": f"i{i}"}) for u in range(4) for i in range(4)]
    table.write_text("\n".join([*records[:2], "{" + '"x":' * 1 + "[" * depth + "]" * depth + "}", *records[2:]]) + "\n")
    rc, summary, err = run(table_args(table, "--out", tmp_path / "table"))
    assert rc == 0, err
    assert summary["skipped"]["malformed"] == 1 and f"{table}:3: " in err
    # and as an element of a JSON array (line = element number)
    array = tmp_path / "inter.json"
    array.write_text("[\n" + ",\n".join([*records[:2], "[" * depth + "]" * depth, *records[2:]]) + "\n]\n")
    rc, summary, err = run(table_args(array, "--out", tmp_path / "array"))
    assert rc == 0, err
    assert summary["skipped"]["malformed"] == 1 and f"[malformed] {array}:3: " in err and summary["users"] == 4


@pytest.mark.parametrize("kind", ["control bytes", "png", "gzip of binary"])
def test_binary_file_is_not_a_text_file(tmp_path, kind):
    rng = np.random.default_rng(3)
    path = tmp_path / ("inter.csv.gz" if kind == "gzip of binary" else "inter.csv")
    if kind == "control bytes":
        path.write_bytes(bytes(range(1, 256)) * 40)  # no NUL byte: passed the old first-64-bytes check
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.bytes(4000))
    else:
        with gzip.open(path, "wb") as f:
            f.write(bytes(range(1, 256)) * 40)
    rc, _, err = run(table_args(path, "--out", tmp_path / "out"))
    line = one_error_line(err)
    assert rc == 2 and line.startswith(f"prepare: error: {path}: not a text file"), line
    assert "the file has" not in line


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json"])
def test_utf8_byte_order_mark_is_read(tmp_path, fmt):
    rows = [(f"u{u}", f"i{i}") for u in range(4) for i in range(5)]
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        text = f"user{sep}item\n" + "".join(f"{u}{sep}{i}\n" for u, i in rows)
    elif fmt == "jsonl":
        text = "\n".join(json.dumps({"user": u, "item": i}) for u, i in rows) + "\n"
    else:
        text = json.dumps([{"user": u, "item": i} for u, i in rows])
    path = tmp_path / f"inter.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rc, summary, err = run(table_args(path, "--out", tmp_path / "out"))
    assert rc == 0, err
    assert (summary["users"], summary["items"], sum(summary["interactions"].values())) == (4, 5, 20)
    assert load_dataset(tmp_path / "out").users["user_id"].tolist() == ["u0", "u1", "u2", "u3"]


def test_utf16_file_is_refused_with_advice(tmp_path):
    path = tmp_path / "inter.csv"
    path.write_text("user,item\nu1,i1\n", encoding="utf-16")
    rc, _, err = run(table_args(path, "--out", tmp_path / "out"))
    assert rc == 2 and "is UTF-16 text, not UTF-8; convert it to UTF-8" in one_error_line(err)


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\u200b", "\x7f"])
@pytest.mark.parametrize("fmt", ["csv", "parquet", "amazon"])
def test_control_character_in_an_id_is_a_malformed_line(tmp_path, char, fmt):
    rows = [(f"u{u}", f"i{i}") for u in range(5) for i in range(6)]
    bad = [(f"u{char}1", "i1"), ("u2", f"i{char}3")]  # would be a phantom user and a phantom item
    if fmt == "csv":
        path = tmp_path / "inter.csv"
        path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in rows + bad))
        argv = table_args(path)
        lines = (len(rows) + 2, len(rows) + 3)
    elif fmt == "parquet":
        path = tmp_path / "inter.parquet"
        pd.DataFrame(rows + bad, columns=["user", "item"]).to_parquet(path)
        argv = table_args(path)
        lines = (len(rows) + 1, len(rows) + 2)
    else:
        path = tmp_path / "reviews.json"
        recs = [{"reviewerID": u, "asin": i, "overall": 5, "unixReviewTime": 1} for u, i in rows + bad]
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        argv = ["amazon", "--reviews", path, "--kcore", "1"]
        lines = (len(rows) + 1, len(rows) + 2)
    rc, summary, err = run([*argv, "--out", tmp_path / "out"])
    assert rc == 0, err
    assert (summary["users"], summary["items"]) == (5, 6) and summary["skipped"]["malformed"] == 2
    assert f"{path}:{lines[0]}: " in err and f"{path}:{lines[1]}: " in err and "contains a control character" in err
    ds = load_dataset(tmp_path / "out")
    assert not ds.users["user_id"].str.contains(char, regex=False).any()
    assert not ds.items["item_id"].str.contains(char, regex=False).any()


def test_dataset_that_cannot_be_evaluated_is_warned_about_and_refused_by_check_trainable(tmp_path):
    path = write_interactions(tmp_path / "inter.csv", n_users=20, n_items=30, per_user=2)  # 2 each: all train
    rc, summary, err = run(table_args(path, "--out", tmp_path / "out"))
    assert rc == 0, err
    warnings = " | ".join(summary["warnings"])
    assert "no validation interactions" in warnings and "no test interactions" in warnings
    n_items = summary["items"]
    assert n_items < 50 and f"only {n_items} items, fewer than the largest evaluation cut-off K=50" in warnings
    assert "prepare: warning: no validation interactions" in err
    ds = load_dataset(tmp_path / "out")
    with pytest.raises(DatasetError) as info:
        check_trainable(ds, max_k=50)
    message = str(info.value)
    assert "cannot be trained and evaluated" in message and str(tmp_path / "out") in message
    for part in ("no validation interactions", "no test interactions", f"only {n_items} items"):
        assert part in message
    with pytest.raises(DatasetError, match="no validation interactions") as info:
        check_trainable(ds, max_k=10)
    assert "evaluation cut-off" not in str(info.value)  # enough items for K=10


def test_check_trainable_names_each_missing_part(tmp_path):
    items = pd.DataFrame({"item_idx": range(60), "item_id": [f"i{k}" for k in range(60)]})
    users = pd.DataFrame({"user_idx": [0, 1], "user_id": ["a", "b"]})
    inter = pd.DataFrame({"user_idx": [0, 0, 1, 1], "item_idx": [0, 1, 2, 3], "split": [0, 1, 0, 0]})
    ds = make_dataset("no-test", inter, items, users)
    with pytest.raises(DatasetError, match=r"dataset 'no-test' cannot be trained and evaluated: no test interactions"):
        check_trainable(ds)
    ds = make_dataset("complete", inter.assign(split=[0, 1, 2, 0]), items, users)
    check_trainable(ds)  # 60 items >= 50, every split present
    with pytest.raises(DatasetError, match="only 60 items, fewer than the largest evaluation cut-off K=100"):
        check_trainable(ds, max_k=100)
    rc, summary, err = run(["synthetic", "--out", tmp_path / "syn"])
    assert rc == 0 and summary["warnings"] == [] and "warning" not in err
    check_trainable(load_dataset(tmp_path / "syn"))


def test_old_folder_layout_still_loads(tmp_path):
    """A folder written before ``files`` was recorded (no sizes, no tokens) still loads; its counts are checked."""
    items = pd.DataFrame({"item_idx": [0, 1], "item_id": ["a", "b"]})
    ds = make_dataset(
        "old",
        pd.DataFrame({"user_idx": [0], "item_idx": [1], "split": [0]}),
        items,
        pd.DataFrame({"user_idx": [0], "user_id": ["u"]}),
    )
    save_dataset(ds, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "dataset.json").read_text())
    del meta["files"]
    (tmp_path / "old" / "dataset.json").write_text(json.dumps(meta))
    for name in ("interactions", "items", "users"):
        frame = pd.read_parquet(tmp_path / "old" / f"{name}.parquet")
        frame.attrs = {}
        frame.to_parquet(tmp_path / "old" / f"{name}.parquet", index=False)
    assert load_dataset(tmp_path / "old", verify_hash=True).n_items == 2
    meta["n_items"] = 3
    (tmp_path / "old" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"items.parquet: 2 rows, dataset.json records 3"):
        load_dataset(tmp_path / "old")


def test_unreadable_dataset_json_is_one_clear_error(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset.json").write_bytes(b"\x00\xff{")
    with pytest.raises(DatasetError, match=r"dataset.json: not valid JSON"):
        load_dataset(folder)
    assert os.path.exists(folder / "dataset.json")
