"""The shard contract: deterministic tars, the manifest, resume rules and every reader error."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from dprec.data.dataset import items_hash, make_dataset
from dprec.features.shards import (
    MANIFEST,
    FeatureSetWriter,
    ShardError,
    extends,
    load_manifest,
    read_features,
    shard_bytes,
    shard_name,
    shard_ranges,
    spec_ranges,
    write_manifest,
)

N_ITEMS, PER_SHARD, DIMS = 10, 4, {"text": 6, "image": 3}


def tiny_dataset(name="tiny", n=N_ITEMS):
    items = pd.DataFrame(
        {"item_idx": range(n), "item_id": [f"I{i}" for i in range(n)], "title": [f"t{i}" for i in range(n)]}
    )
    inter = pd.DataFrame({"user_idx": [0] * n, "item_idx": range(n), "split": [0] * n})
    return make_dataset(name, inter, items, pd.DataFrame({"user_idx": [0], "user_id": ["u"]}))


def spec_of(ds, **kw):
    return {
        "dataset": {"name": ds.name, "items_hash": items_hash(ds), "n_items": ds.n_items},
        "items_per_shard": PER_SHARD,
        "store_dtype": "float32",
        "modalities": {"text": {"name": "t"}},
    } | kw


def vectors_for(first, stop):
    rng = np.random.default_rng(first)
    return {m: rng.normal(size=(stop - first, d)).astype(np.float32) for m, d in DIMS.items()}


def write_all(folder, ds, shards=None):
    writer = FeatureSetWriter(folder, spec_of(ds), {"executor": "test"})
    for s in shards if shards is not None else writer.pending():
        first, stop = writer.ranges[s]
        flags = [["image_decode_error"] if i == first else [] for i in range(first, stop)]
        writer.add(s, [f"I{i}" for i in range(first, stop)], vectors_for(first, stop), flags)
    return writer


@pytest.fixture
def written(tmp_path):
    ds = tiny_dataset()
    write_all(tmp_path, ds).finish()
    return tmp_path, ds


def test_round_trip_item_ordered_with_masks(written):
    folder, ds = written
    feats = read_features(folder, dataset=ds)
    assert feats["text"].shape == (N_ITEMS, 6) and feats["image"].shape == (N_ITEMS, 3)
    expected = np.concatenate(
        [vectors_for(a, min(a + PER_SHARD, N_ITEMS))["text"] for a in range(0, N_ITEMS, PER_SHARD)]
    )
    np.testing.assert_array_equal(feats["text"], expected)
    assert feats["image_missing"].tolist() == [i % PER_SHARD == 0 for i in range(N_ITEMS)]
    assert not feats["text_missing"].any()
    assert list(feats["item_id"]) == [f"I{i}" for i in range(N_ITEMS)]
    manifest = load_manifest(folder)
    assert manifest["complete"] and manifest["dims"] == DIMS
    assert [(s["first_item"], s["last_item"], s["count"]) for s in manifest["shards"]] == [
        (0, 3, 4),
        (4, 7, 4),
        (8, 9, 2),
    ]
    assert manifest["counts"] == {"image_decode_error": 3}


def test_tar_layout_and_byte_determinism(written, tmp_path_factory):
    folder, ds = written
    with tarfile.open(folder / shard_name(0)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.image.npy", "000000000.meta.json", "000000000.text.npy"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
    again = tmp_path_factory.mktemp("again")
    write_all(again, ds).finish()
    for s in range(3):
        assert (folder / shard_name(s)).read_bytes() == (again / shard_name(s)).read_bytes()


def test_webdataset_reads_the_shards(written):
    folder, _ = written
    urls = [str(folder / shard_name(s)) for s in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N_ITEMS)]
    assert samples[5]["text.npy"].shape == (6,) and samples[5]["meta.json"]["item_id"] == "I5"


def test_meta_and_npy_hold_no_pickles(written):
    folder, _ = written
    with tarfile.open(folder / shard_name(1)) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith(".npy"):
                assert np.load(io.BytesIO(data), allow_pickle=False).dtype == np.float32
            else:
                assert json.loads(data) == json.loads(data.decode("utf-8"))


def test_resume_skips_listed_shards_and_refuses_other_spec(tmp_path):
    ds = tiny_dataset()
    write_all(tmp_path, ds, shards=[0, 2])  # interrupted: shard 1 never written
    assert not load_manifest(tmp_path)["complete"]
    with pytest.raises(ShardError, match="incomplete"):
        read_features(tmp_path)
    writer = FeatureSetWriter(tmp_path, spec_of(ds), {"executor": "test"})
    assert writer.skipped == [0, 2] and writer.pending() == [1]
    (tmp_path / shard_name(2)).write_bytes(b"garbage")  # a listed shard changed on disk is recomputed
    assert FeatureSetWriter(tmp_path, spec_of(ds), {}).pending() == [1, 2]
    with pytest.raises(ShardError, match="another configuration.*store_dtype"):
        FeatureSetWriter(tmp_path, spec_of(ds, store_dtype="float16"), {})
    fresh = FeatureSetWriter(tmp_path, spec_of(ds, store_dtype="float16"), {}, overwrite=True)
    assert fresh.pending() == [0, 1, 2] and not list(tmp_path.glob("items-*.tar"))


def test_stale_temporary_files_are_removed_and_never_read(tmp_path):
    ds = tiny_dataset()
    write_all(tmp_path, ds, shards=[0])
    half = tmp_path / ".tmp-items-000001.tar.abc"
    half.write_bytes(b"half a shard")
    writer = FeatureSetWriter(tmp_path, spec_of(ds), {})
    assert not half.exists() and writer.pending() == [1, 2]


def test_float16_storage(tmp_path):
    ds = tiny_dataset()
    writer = FeatureSetWriter(tmp_path, spec_of(ds, store_dtype="float16"), {})
    for s in writer.pending():
        first, stop = writer.ranges[s]
        writer.add(s, [f"I{i}" for i in range(first, stop)], vectors_for(first, stop), [[]] * (stop - first))
    writer.finish()
    with tarfile.open(tmp_path / shard_name(0)) as tar:
        assert np.load(io.BytesIO(tar.extractfile("000000000.text.npy").read())).dtype == np.float16
    feats = read_features(tmp_path)
    assert feats["text"].dtype == np.float32
    np.testing.assert_allclose(feats["text"][:4], vectors_for(0, 4)["text"], atol=2e-3)


def _rewrite_shard(folder, shard, mutate_members):
    """Rebuild a shard with changed members and fix its sha256 in the manifest (so that structure is what fails)."""
    with tarfile.open(folder / shard_name(shard)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members = mutate_members(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / shard_name(shard)).write_bytes(buf.getvalue())
    manifest = load_manifest(folder)
    for entry in manifest["shards"]:
        if entry["shard"] == shard:
            entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    write_manifest(folder, manifest)


def test_reader_error_missing_shard(written):
    folder, _ = written
    (folder / shard_name(1)).unlink()
    with pytest.raises(ShardError, match="shard items-000001.tar: listed in the manifest but missing"):
        read_features(folder)


def test_reader_error_truncated_shard(written):
    folder, _ = written
    data = (folder / shard_name(2)).read_bytes()
    (folder / shard_name(2)).write_bytes(data[: len(data) // 3])
    with pytest.raises(ShardError, match="shard items-000002.tar: sha256 differs"):
        read_features(folder)
    with pytest.raises(ShardError, match="shard items-000002.tar"):
        read_features(folder, verify=False)


def test_reader_error_altered_byte(written):
    folder, _ = written
    data = bytearray((folder / shard_name(0)).read_bytes())
    data[700] ^= 0x01
    (folder / shard_name(0)).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard items-000000.tar: sha256 differs"):
        read_features(folder)


def test_reader_error_dim_mismatch(written):
    folder, _ = written

    def widen(members):
        buf = io.BytesIO()
        np.save(buf, np.zeros(7, np.float32))
        return members | {"000000005.text.npy": buf.getvalue()}

    _rewrite_shard(folder, 1, widen)
    with pytest.raises(
        ShardError, match=r"shard items-000001.tar: sample 000000005 text.npy has shape \(7,\), manifest dim is 6"
    ):
        read_features(folder)


def test_reader_error_count_mismatch(written, tmp_path_factory):
    folder, ds = written
    _rewrite_shard(folder, 1, lambda members: {k: v for k, v in members.items() if not k.startswith("000000007.")})
    with pytest.raises(ShardError, match="shard items-000001.tar: 3 samples, manifest says 4"):
        read_features(folder)
    other = tmp_path_factory.mktemp("count")
    write_all(other, ds).finish()
    manifest = load_manifest(other)
    manifest["shards"][2]["count"] = 3
    write_manifest(other, manifest)
    with pytest.raises(ShardError, match="shard items-000002.tar: manifest range"):
        read_features(other)


def test_reader_error_dataset_hash_mismatch(written):
    folder, ds = written
    other = tiny_dataset("tiny")
    other.items.loc[3, "title"] = "changed"
    other = make_dataset("tiny", other.interactions, other.items, other.users)
    with pytest.raises(ShardError, match=r"manifest.json: features were extracted from dataset items hash"):
        read_features(folder, dataset=other)
    with pytest.raises(ShardError, match="items in the features"):
        read_features(folder, dataset=tiny_dataset(n=N_ITEMS + 1))


def test_features_follow_the_catalogue_not_the_split(written):
    """Another split of the same items (a different content hash) reads the same features."""
    folder, ds = written
    resplit = ds.interactions.copy()
    resplit.loc[resplit.index[0], "split"] = 2
    other = make_dataset(ds.name, resplit, ds.items, ds.users)
    assert other.meta["content_hash"] != ds.meta["content_hash"]
    np.testing.assert_array_equal(read_features(folder, dataset=other)["text"], read_features(folder)["text"])


def test_reader_error_pickled_member(written):
    folder, _ = written

    def pickled(members):
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}] * 6, dtype=object), allow_pickle=True)
        return members | {"000000004.text.npy": buf.getvalue()}

    _rewrite_shard(folder, 1, pickled)
    with pytest.raises(ShardError, match="shard items-000001.tar: sample 000000004 text.npy is not a plain array"):
        read_features(folder)


def test_shard_bytes_pure_function():
    metas = [{"item_id": "a", "item_idx": 0, "flags": []}]
    vecs = {"text": np.ones((1, 3), np.float32)}
    assert shard_bytes(np.arange(1), vecs, metas, "float32") == shard_bytes(np.arange(1), vecs, metas, "float32")


def test_no_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match=f"no {MANIFEST}; run `python -m dprec.extract`"):
        read_features(tmp_path)


def test_a_grown_catalogue_starts_new_shards_where_the_old_one_ended():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(13, 4, grown_from=[10]) == [(0, 4), (4, 8), (8, 10), (10, 13)]  # the old shards unchanged
    assert shard_ranges(20, 4, grown_from=[10, 13]) == [(0, 4), (4, 8), (8, 10), (10, 13), (13, 17), (17, 20)]
    old = {"dataset": {"n_items": 10, "items_hash": "a"}, "items_per_shard": 4, "store_dtype": "float32"}
    grown = {**old, "dataset": {"n_items": 13, "items_hash": "b", "grown_from": [{"n_items": 10, "items_hash": "a"}]}}
    assert extends(old, grown) and spec_ranges(grown) == shard_ranges(13, 4, [10])
    assert not extends(old, {**grown, "store_dtype": "float16"})  # other settings: another feature set
    assert not extends(
        old, {**grown, "dataset": {**grown["dataset"], "grown_from": [{"n_items": 9, "items_hash": "a"}]}}
    )
