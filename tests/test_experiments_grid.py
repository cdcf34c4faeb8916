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

    monkeypatch.setattr(experiments, "make_trainer", no_training)
    (tmp_path / "results" / "syn.summary.json").unlink()
    assert experiments.main(args) == 0
    assert json.loads((tmp_path / "results" / "syn.summary.json").read_text()) == summary
    assert sorted((tmp_path / "results" / "syn").glob("*.json")) == files


def test_a_train_key_in_the_search_goes_to_the_train_section(experiments, tmp_path):
    data = save_dataset(generate(), tmp_path / "synthetic")
    grid = {
        "train": {"epochs": 1, "patience": 5, "graph_backend": "torch", "ks": [10, 20]},
        "datasets": {"syn": {"dataset": str(data)}},
        "models": {"lightgcn": {"name": "lightgcn", "search": {"train.lr": [0.002, 0.02], "reg_weight": [1e-4]}}},
    }
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(grid))
    args = ["--grid", str(path), "--seeds", "1", "--threads", "1", "--no-mlflow"]
    args += ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]
    assert experiments.main(args) == 0
    runs = [json.loads(f.read_text()) for f in (tmp_path / "results" / "syn").glob("*.json")]
    assert sorted(r["config"]["train"]["lr"] for r in runs) == [0.002, 0.02]
    assert all(r["config"]["model"] == {"name": "lightgcn", "reg_weight": 1e-4} for r in runs)
    assert len({r["config_hash"] for r in runs}) == 2
    selected = json.loads((tmp_path / "results" / "syn.summary.json").read_text())["lightgcn"]["selected"]
    assert selected["train.lr"] in (0.002, 0.02) and selected["reg_weight"] == 1e-4


def test_search_points_run_apart_are_the_full_runs_files(experiments, tmp_path, monkeypatch):
    """--points trains only the named points (no selection, no summary); the full run then finds their files."""
    data = save_dataset(generate(), tmp_path / "synthetic")
    grid = {
        "train": {"epochs": 1, "patience": 5, "graph_backend": "torch", "ks": [10, 20]},
        "datasets": {"syn": {"dataset": str(data)}},
        "models": {"lightgcn": {"name": "lightgcn", "search": {"reg_weight": [1e-4, 1e-3, 1e-2]}}},
    }
    path = tmp_path / "apart.yaml"
    path.write_text(yaml.safe_dump(grid))
    args = ["--grid", str(path), "--seeds", "1", "2", "--threads", "1", "--no-mlflow"]
    args += ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]
    assert experiments.main(args + ["--points", "1", "3"]) == 0
    runs = [json.loads(f.read_text()) for f in (tmp_path / "results" / "syn").glob("*.json")]
    assert sorted(r["config"]["model"]["reg_weight"] for r in runs) == [1e-4, 1e-2]
    assert {r["seed"] for r in runs} == {1}
    assert not (tmp_path / "results" / "syn.summary.json").exists()
    assert experiments.main(args + ["--points", "2"]) == 0
    trained = []
    original = experiments.make_trainer
    monkeypatch.setattr(experiments, "make_trainer", lambda *a, **k: (trained.append(1), original(*a, **k))[1])
    assert experiments.main(args) == 0
    assert len(trained) == 1  # only the kept point's second seed: the three search points were read back
    summary = json.loads((tmp_path / "results" / "syn.summary.json").read_text())["lightgcn"]
    assert summary["recall@20"]["n"] == 2 and summary["selected"]["reg_weight"] in (1e-4, 1e-3, 1e-2)


def test_the_accuracy_verdict_needs_a_margin_above_the_larger_std():
    spec = importlib.util.spec_from_file_location("bench_table", SCRIPT.parent / "accuracy_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def entry(mean, std):
        cell = {"mean": mean, "std": std, "n": 3}
        return {m: cell for m in module.METRICS} | {"features": "text=x", "selected": {}}

    wins = {"dprec": entry(0.210, 0.002), "mgcn": entry(0.205, 0.003)}
    assert module.verdict(wins, "dprec").startswith("dprec beats every model")
    close = {"dprec": entry(0.210, 0.002), "mgcn": entry(0.205, 0.003), "freedom": entry(0.2085, 0.001)}
    line = module.verdict(close, "dprec")
    assert line.startswith("dprec does not beat") and "freedom +0.0015 (std 0.0020)" in line
    assert "| dprec | 0.2100 ± 0.0020" in module.table("sci", close, "dprec")


def test_a_result_of_older_model_defaults_is_trained_again(experiments, tmp_path, monkeypatch):
    """The hash covers what the grid spells; a changed default shows in the stored resolved config."""
    import dataclasses

    from dprec.models import lightgcn

    data = save_dataset(generate(), tmp_path / "synthetic")
    grid = {
        "train": {"epochs": 1, "patience": 5, "graph_backend": "torch", "ks": [10, 20]},
        "datasets": {"syn": {"dataset": str(data)}},
        "models": {"lightgcn": {"name": "lightgcn"}},
    }
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(grid))
    args = ["--grid", str(path), "--seeds", "1", "--threads", "1", "--no-mlflow"]
    args += ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]
    assert experiments.main(args) == 0
    [file] = (tmp_path / "results" / "syn").glob("*.json")
    first = json.loads(file.read_text())
    assert first["model_resolved"]["n_layers"] == 2

    trained = []
    real = experiments.make_trainer

    def counting(*a, **k):
        trained.append(1)
        return real(*a, **k)

    monkeypatch.setattr(experiments, "make_trainer", counting)
    assert experiments.main(args) == 0
    assert trained == []  # same defaults: the file is the result
    fields = {f.name: f for f in dataclasses.fields(lightgcn.LightGCNConfig)}
    monkeypatch.setattr(fields["n_layers"], "default", 1)
    monkeypatch.setattr(lightgcn.LightGCNConfig.__init__, "__defaults__", (64, 1, 1e-4))
    assert experiments.main(args) == 0
    assert trained == [1]
    [again] = (tmp_path / "results" / "syn").glob("*.json")
    assert again == file and json.loads(file.read_text())["model_resolved"]["n_layers"] == 1


def test_a_cold_items_grid_validates_on_held_out_items_and_searches_cold_settings(experiments, tmp_path):
    """A grid on a cold-items split trains on the warm items; ``cold.<key>`` search points go to the cold section."""
    import numpy as np

    from dprec.features.config import MMRecImportConfig
    from dprec.features.pipeline import import_mmrec

    ds = generate(split="cold-items")
    data = save_dataset(ds, tmp_path / "cold")
    hidden = np.eye(8)[np.asarray(ds.meta["hidden"]["category"])]
    np.save(
        tmp_path / "text.npy",
        (hidden + 0.3 * np.random.default_rng(0).standard_normal(hidden.shape)).astype(np.float32),
    )
    import_mmrec(MMRecImportConfig(dataset=str(data), out=str(tmp_path / "feat"), text_feat=str(tmp_path / "text.npy")))
    grid = {
        "train": {"epochs": 1, "patience": 5, "graph_backend": "torch", "ks": [10, 20]},
        "cold": {"neighbours": 5},
        "datasets": {"cold": {"dataset": str(data), "features": {"text": str(tmp_path / "feat")}}},
        "models": {
            "lightgcn": {"name": "lightgcn", "search": {"cold.own_content": [True, False]}},
            "popularity": {"name": "popularity", "cold": {"embedding": "random"}},
        },
    }
    path = tmp_path / "cold.yaml"
    path.write_text(yaml.safe_dump(grid))
    args = ["--grid", str(path), "--seeds", "1", "--threads", "1", "--no-mlflow"]
    args += ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]
    assert experiments.main(args) == 0
    runs = [json.loads(f.read_text()) for f in sorted((tmp_path / "results" / "cold").glob("*.json"))]
    colds = sorted((r["config"]["model"]["name"], json.dumps(r["config"]["cold"], sort_keys=True)) for r in runs)
    assert colds == [
        ("lightgcn", '{"neighbours": 5, "own_content": false}'),
        ("lightgcn", '{"neighbours": 5, "own_content": true}'),
        ("popularity", '{"embedding": "random", "neighbours": 5}'),
    ]
    for r in runs:
        assert r["test"]["recall@20"] == r["test"]["cold_recall@20"] and "warm_recall@20" in r["test"]
        assert r["config"]["model"] == {"name": r["config"]["model"]["name"]}  # cold keys stay out of the model
    summary = json.loads((tmp_path / "results" / "cold.summary.json").read_text())
    assert summary["lightgcn"]["cold_recall@20"]["n"] == 1 and "warm_ndcg@20" in summary["popularity"]
    popularity = next(r for r in runs if r["config"]["model"]["name"] == "popularity")
    assert 0.3 < popularity["test"]["cold_recall@20"] < 0.7  # 40 held-out test items in a random order


def test_the_cold_start_verdict_needs_a_margin_above_the_larger_std():
    spec = importlib.util.spec_from_file_location("bench_cold_table", SCRIPT.parent / "cold_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def entry(mean, std):
        cell = {"mean": mean, "std": std, "n": 3}
        return {key: cell for _, key in module.COLUMNS} | {"recall@20": cell, "features": "text=x", "selected": {}}

    summary = {"dprec": entry(0.120, 0.004), "content_knn": entry(0.110, 0.0)}
    assert module.margin_line(summary, "dprec", "content_knn").startswith("dprec beats content_knn")
    summary["dprec"] = entry(0.113, 0.004)
    line = module.margin_line(summary, "dprec", "content_knn")
    assert line.startswith("dprec does not beat content_knn") and "+0.0030 (std 0.0040)" in line
    assert "| content_knn | 0.1100 ± 0.0000" in module.table("sci", summary, "dprec", "content_knn")


@pytest.mark.parametrize("grid_path", sorted(SCRIPT.parent.joinpath("grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_committed_grid_resolves_to_valid_run_configs(experiments, grid_path):
    """Each model of each grid, at each search point, is a RunConfig the trainer accepts (a misspelt switch or an
    out-of-range value fails here, not hours into a grid)."""
    from dprec.config import from_dict, load_yaml
    from dprec.training.config import RunConfig

    grid = load_yaml(grid_path)
    checked = 0
    for spec in grid["models"].values():
        model = {k: v for k, v in spec.items() if k not in ("search", "train", "cold", "modalities_from")}
        train = {**grid.get("train", {}), **spec.get("train", {})}
        for point in experiments.search_points(spec.get("search", {})):
            m, t, c = experiments.split_point(model, train, point, {**(grid.get("cold") or {}), **spec.get("cold", {})})
            sections = {"dataset": "unused", "model": m, "train": t, **({"cold": c} if c else {})}
            cfg = from_dict(RunConfig, sections, grid_path.name)
            assert cfg.model_config() is not None
            checked += 1
    assert checked >= len(grid["models"]) > 0
