"""The resumable grid runner (benchmarks/experiments.py): one result file per finished run, a rerun trains nothing
and rebuilds the summary from the files; the identity of a run holds the model-dependent train defaults."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from dprec.data.dataset import save_dataset
from dprec.data.synthetic import generate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments.py"


@pytest.fixture(scope="module")
def experiments():
    spec = importlib.util.spec_from_file_location("bench_experiments", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_trains_nothing_and_rebuilds_the_summary(experiments, tmp_path, monkeypatch):
    data = save_dataset(generate(), tmp_path / "synthetic")
    grid = {
        "train": {"epochs": 2, "lr": 0.01, "patience": 5, "graph_backend": "torch", "ks": [10, 20]},
        "datasets": {"syn": {"dataset": str(data)}},
        "models": {"lightgcn": {"name": "lightgcn", "search": {"reg_weight": [1e-4, 1e-2]}}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(grid))
    args = ["--grid", str(path), "--seeds", "1", "2", "--threads", "1", "--no-mlflow"]
    args += ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]
    assert experiments.main(args) == 0
    files = sorted((tmp_path / "results" / "syn").glob("*.json"))
    assert len(files) == 3  # two search points with seed 1, the kept one with seed 2
    runs = [json.loads(f.read_text()) for f in files]
    assert {r["seed"] for r in runs} == {1, 2}
    for r in runs:
        assert f"-{r['config_hash']}-s{r['seed']}.json" in str(files[runs.index(r)])
        assert r["config"]["train"]["batch_size"] == 2048 and r["config"]["train"]["feature_rank"] == 0
        assert 0 <= r["valid"]["recall@20"] <= 1 and 0 <= r["test"]["recall@20"] <= 1
    summary = json.loads((tmp_path / "results" / "syn.summary.json").read_text())
    entry = summary["lightgcn"]
    assert entry["recall@20"]["n"] == 2 and entry["recall@20"]["mean"] > 0

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiments, "Trainer", no_training)
    (tmp_path / "results" / "syn.summary.json").unlink()
    assert experiments.main(args) == 0
    assert json.loads((tmp_path / "results" / "syn.summary.json").read_text()) == summary
    assert sorted((tmp_path / "results" / "syn").glob("*.json")) == files
