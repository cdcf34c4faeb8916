"""Every stage through ``dprec <stage>`` (``dprec.__main__.main``): 0 on success, non-zero on failure.

One small pipeline in a temporary folder: prepare (synthetic) -> extract (import-mmrec, .npy features)
-> train (LightGCN, 2 epochs, tracked and registered in a temporary sqlite store) -> evaluate ->
register settle -> recommend; each stage is also called with a mistake and must say so with rc != 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from dprec.__main__ import STAGES
from dprec.__main__ import main as dprec


def call(argv: list[str]) -> int:
    """``dprec argv``: the return code, also when argparse exits."""
    try:
        return dprec(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)
    yield root
    mp.undo()


def test_every_stage_is_listed_and_help_exits_zero(capsys):
    assert set(STAGES) == {"prepare", "extract", "train", "evaluate", "register", "recommend", "demo"}
    for stage in STAGES:
        assert call([stage, "--help"]) == 0, stage
    assert call(["--help"]) == 0
    assert call([]) == 2
    assert call(["no-such-stage"]) == 2
    assert "recommend" in capsys.readouterr().out


def test_stages_return_zero_on_success_in_order(pipeline, capsys):
    root = pipeline
    data = root / "data"
    assert call(["prepare", "synthetic", "--out", str(data)]) == 0
    n_items = json.loads((data / "dataset.json").read_text())["n_items"]

    feats = root / "text_feat.npy"
    np.save(feats, np.random.default_rng(0).standard_normal((n_items, 8)).astype(np.float32), allow_pickle=False)
    shards = root / "shards"
    assert (
        call(["extract", "import-mmrec", "--dataset", str(data), "--text-feat", str(feats), "--out", str(shards)]) == 0
    )
    assert (shards / "manifest.json").is_file()

    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": str(data),
                "out": str(root / "run"),
                "model": {"name": "lightgcn"},
                "train": {"epochs": 2, "batch_size": 1024, "seed": 1, "graph_backend": "torch"},
            }
        )
    )
    capsys.readouterr()
    assert call(["train", "--config", str(config)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["registration"]["name"] == "dprec-default"
    assert 0.0 < result["test"]["recall@20"] <= 1.0

    assert call(["evaluate", "--run", str(root / "run"), "--split", "valid"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["recall@20"] == pytest.approx(result["valid"]["recall@20"], abs=1e-6)

    assert call(["register", "settle", "--name", "dprec-default"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["champion"] == "1"

    assert call(["recommend", "--model", "models:/dprec-default@champion", "--user", "U00000", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("U00000") == 3


def test_stages_return_nonzero_on_failure(pipeline, capsys):
    root = pipeline
    missing = str(root / "no-such-folder")
    assert call(["prepare", "mmrec", missing, "--out", str(root / "bad-data")]) != 0
    assert call(["extract", "import-mmrec", "--dataset", missing, "--text-feat", "x.npy", "--out", "s"]) != 0
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset": missing, "train": {"epochs": 2.5}}))
    assert call(["train", "--config", str(bad)]) != 0
    assert call(["evaluate", "--run", missing]) != 0
    assert call(["register", "register", "--bundle", missing]) != 0
    assert call(["recommend", "--model", "models:/dprec-nothing@champion", "--user", "U1"]) != 0
    assert call(["demo", "--epochs", "zero"]) != 0
    err = capsys.readouterr().err
    assert "epochs" in err
