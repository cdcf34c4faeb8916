"""``python -m dprec.extract``: the CLI entry point, its summary line, errors, and ``import-mmrec``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dprec import extract
from dprec.data.dataset import make_dataset, save_dataset
from dprec.features import read_features
from dprec.features.config import ExtractConfig, TextConfig
from dprec.features.shards import load_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
N = 7


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path):
    items = pd.DataFrame(
        {
            "item_idx": range(N),
            "item_id": [f"A{i}" for i in range(N)],
            "title": [f"thing {i}" for i in range(N)],
            "image_bytes": [png((30 * i, 90, 200)) if i != 3 else b"" for i in range(N)],
        }
    )
    inter = pd.DataFrame({"user_idx": [0] * N, "item_idx": range(N), "split": [0] * N})
    ds = make_dataset("cli", inter, items, pd.DataFrame({"user_idx": [0], "user_id": ["u"]}))
    return save_dataset(ds, tmp_path / "ds")


def summary_line(capsys) -> dict:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "the job must end with exactly one JSON summary line"
    return json.loads(lines[0])


def test_cli_local_run_prints_one_json_summary(dataset, tmp_path, capsys):
    out = tmp_path / "feats"
    argv = ["--dataset", str(dataset), "--out", str(out), "--executor", "local", "--text-model", "none"]
    argv += ["--items-per-shard", "3", "--store-dtype", "float16", "--torch-threads", "1"]
    rc = extract.main(argv)
    assert rc == 0
    summary = summary_line(capsys)
    assert summary["event"] == "extract_summary"
    assert (summary["items"], summary["shards_written"], summary["shards_skipped"]) == (N, 3, 0)
    assert summary["failures"] == {"image_none": 1} and summary["items_per_second"] > 0
    feats = read_features(out, dataset=dataset)
    assert feats["image"].shape == (N, 1280) and feats["image_missing"].tolist() == [i == 3 for i in range(N)]
    assert load_manifest(out)["spec"]["store_dtype"] == "float16"
    assert json.loads((out / "extract_config.json").read_text())["items_per_shard"] == 3

    rc = extract.main(argv)
    assert rc == 0
    again = summary_line(capsys)
    assert (again["shards_written"], again["shards_skipped"]) == (0, 3)


def test_cli_errors_return_2_with_a_message(dataset, tmp_path, capsys):
    rc = extract.main(
        ["--dataset", str(dataset), "--out", str(tmp_path / "o"), "--text-model", "none", "--image-model", "none"]
    )
    assert rc == 2 and "nothing to extract" in capsys.readouterr().err
    rc = extract.main(["--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--executor", "local"])
    err = capsys.readouterr().err
    assert rc == 2 and ("no such dataset folder" in err or "not a dataset folder" in err)
    rc = extract.main(
        [
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / "o"),
            "--executor",
            "local",
            "--text-model",
            str(tmp_path / "no-model"),
            "--image-model",
            "none",
        ]
    )
    assert rc == 2 and "cannot read its config" in capsys.readouterr().err
    rc = extract.main(["--dataset", str(dataset), "--out", str(tmp_path / "o"), "--items-per-shard", "0"])
    assert rc == 2 and "items_per_shard must be >= 1" in capsys.readouterr().err


def test_cli_flags_are_the_config_fields(dataset, tmp_path):
    """Every flag maps to one config field; ``none`` drops a modality; unnamed fields keep their defaults."""
    args = extract._extract_parser().parse_args(
        [
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / "o"),
            "--text-model",
            "minilm",
            "--pooling",
            "mean",
            "--text-batch-size",
            "4",
            "--text-dtype",
            "float32",
            "--image-model",
            "none",
            "--no-spread",
            "--gpus-per-actor",
            "0",
        ]
    )
    cfg = extract.config_from_args(args)
    assert cfg.image is None and cfg.spread is False and cfg.gpus_per_actor == 0.0
    assert (cfg.text.model, cfg.text.pooling, cfg.text.batch_size, cfg.text.dtype) == ("minilm", "mean", 4, "float32")
    assert cfg.items_per_shard == ExtractConfig.__dataclass_fields__["items_per_shard"].default == 256
    assert cfg.text.max_padding == TextConfig().max_padding


def test_import_mmrec_features(dataset, tmp_path, capsys):
    rng = np.random.default_rng(0)
    text, image = rng.normal(size=(N, 5)).astype(np.float32), rng.normal(size=(N, 3))
    image[4, 1] = np.nan
    np.save(tmp_path / "text_feat.npy", text)
    np.save(tmp_path / "image_feat.npy", image)
    out = tmp_path / "mmrec"
    argv = [
        "import-mmrec",
        "--dataset",
        str(dataset),
        "--text-feat",
        str(tmp_path / "text_feat.npy"),
        "--image-feat",
        str(tmp_path / "image_feat.npy"),
        "--out",
        str(out),
        "--items-per-shard",
        "4",
    ]
    assert extract.main(argv) == 0
    summary = summary_line(capsys)
    assert (summary["shards_written"], summary["failures"]) == (2, {"image_nonfinite": 1})
    feats = read_features(out, dataset=dataset)
    np.testing.assert_array_equal(feats["text"], text)
    expected = image.astype(np.float32)
    expected[4] = 0.0
    np.testing.assert_array_equal(feats["image"], expected)
    assert feats["image_missing"].tolist() == [i == 4 for i in range(N)]
    manifest = load_manifest(out)
    assert manifest["spec"]["modalities"]["text"]["name"] == "mmrec-import" and manifest["dims"] == {
        "text": 5,
        "image": 3,
    }
    assert extract.main(argv) == 0
    assert summary_line(capsys)["shards_skipped"] == 2


def test_import_mmrec_refuses_a_row_count_mismatch(dataset, tmp_path, capsys):
    np.save(tmp_path / "text_feat.npy", np.zeros((N + 1, 4), np.float32))
    rc = extract.main(
        [
            "import-mmrec",
            "--dataset",
            str(dataset),
            "--text-feat",
            str(tmp_path / "text_feat.npy"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and f"text_feat.npy: shape ({N + 1}, 4), expected ({N}, dim)" in capsys.readouterr().err
    rc = extract.main(["import-mmrec", "--dataset", str(dataset), "--out", str(tmp_path / "o")])
    assert rc == 2 and "give --text-feat and/or --image-feat" in capsys.readouterr().err


def test_module_exit_code_is_mains_return_code(dataset, tmp_path):
    """``python -m dprec.extract``: exit status 0 after a successful run, 2 after a failed one."""
    np.save(tmp_path / "text_feat.npy", np.ones((N, 4), np.float32))
    cmd = [sys.executable, "-m", "dprec.extract", "import-mmrec", "--dataset", str(dataset), "--out"]
    ok = subprocess.run(
        [*cmd, str(tmp_path / "o"), "--text-feat", str(tmp_path / "text_feat.npy")], capture_output=True
    )
    assert ok.returncode == 0, ok.stderr.decode()
    assert json.loads(ok.stdout.decode().splitlines()[-1])["shards_written"] == 1
    bad = subprocess.run([*cmd, str(tmp_path / "o2"), "--text-feat", str(tmp_path / "none.npy")], capture_output=True)
    assert bad.returncode == 2 and b"extract: error: " in bad.stderr


def test_docstring_gives_local_and_cluster_commands():
    assert "python -m dprec.extract --dataset" in extract.__doc__
    assert "ray job submit --address http://HEAD:8265 --working-dir ." in extract.__doc__
    assert "import-mmrec" in extract.__doc__
