"""MLflow tracking of a real (tiny) training run: params, curves, test metrics, artifacts, resume, grids."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from mlflow.tracking import MlflowClient
from test_train import clustered_dataset

from dprec.data.dataset import make_dataset
from dprec.tracking.registry import aliases_of
from dprec.tracking.store import metric_name, tracking_uri
from dprec.tracking.tracker import RunTracker, flatten
from dprec.training.config import RunConfig, TrainConfig
from dprec.training.loop import Trainer


def grouped_dataset(n_users=120, n_items=80, per_user=12, seed=0):
    """test_train's grouped users and items, relabelled with numeric user ids as in MovieLens."""
    base = clustered_dataset(n_users, n_items, per_user, seed)
    items = base.items.assign(item_id=[f"I{i:04d}" for i in range(n_items)])
    users = base.users.assign(user_id=[str(1000 + u) for u in range(n_users)])
    return make_dataset("grouped", base.interactions, items, users, {"source": "test"})


def run_config(model=None, **train):
    base = dict(epochs=4, batch_size=256, lr=0.01, patience=50, seed=1, graph_backend="torch", ks=(10, 20))
    return RunConfig(
        dataset="in-memory",
        out="unused",
        model=model or {"name": "lightgcn", "n_layers": 2},
        train=TrainConfig(**base | train),
    )


def template_store(base: Path) -> Path:
    """An initialised MLflow sqlite store, made once per session and copied per test (creating one takes ~10 s)."""
    path = base / "mlflow-template.db"
    if not path.exists():
        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def use_fresh_store(tmp_path: Path, monkeypatch, template: Path) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    return uri


def release_store() -> None:
    """End runs left open by a failed test and forget the test's store (set_tracking_uri also sets the env var)."""
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    return template_store(tmp_path_factory.getbasetemp())


@pytest.fixture
def store(tmp_path, monkeypatch, template):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    yield use_fresh_store(tmp_path, monkeypatch, template)
    release_store()


@pytest.fixture(scope="module")
def dataset():
    return grouped_dataset()


def test_names_and_uri(monkeypatch, tmp_path):
    assert metric_name("valid_recall@20") == "valid_recall_at_20"
    assert metric_name("test ndcg@10 (mean)") == "test ndcg_at_10 _mean_"
    assert flatten({"train": {"lr": 0.01, "ks": [10, 20]}, "model": {"name": "x"}}) == {
        "train.lr": "0.01",
        "train.ks": "[10, 20]",
        "model.name": "x",
    }
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_run_logs_config_curves_test_metrics_and_artifacts(store, dataset, tmp_path):
    trainer = Trainer(run_config(), ds=dataset)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"dataset_hash": dataset.meta["content_hash"], "dims": {"text": 8}}))
    tracker = RunTracker()
    run_id = tracker.start(
        trainer.cfg.as_dict(),
        run_name="lightgcn",
        experiment="dprec-test",
        deepspeed_config={"train_batch_size": 256, "zero_optimization": {"stage": 1}},
        feature_manifest=manifest,
        tags={"dataset_hash": dataset.meta["content_hash"]},
    )
    result = trainer.fit(log=lambda s: None)
    for row in result["history"]:
        tracker.log_epoch(row, step=row["epoch"])
    tracker.log_test(result["test"], result["best_epoch"], valid=result["valid"])
    tracker.finish(result["history"])

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lightgcn"
    assert run.data.params["model.name"] == "lightgcn" and run.data.params["train.lr"] == "0.01"
    assert run.data.params["train.ks"] == "[10, 20]" and run.data.params["deepspeed.zero_optimization.stage"] == "1"
    assert run.data.tags["dataset_hash"] == dataset.meta["content_hash"]
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [0, 1, 2, 3]
    assert [m.value for m in losses] == pytest.approx([row["loss"] for row in result["history"]])
    r20 = client.get_metric_history(run_id, "valid_recall_at_20")
    assert [m.value for m in r20] == pytest.approx([row["valid_recall@20"] for row in result["history"]])
    assert run.data.metrics["test_recall_at_20"] == pytest.approx(result["test"]["recall@20"])
    assert client.get_metric_history(run_id, "test_recall_at_20")[0].step == result["best_epoch"]
    assert run.data.metrics["best_valid_recall_at_20"] == pytest.approx(result["valid"]["recall@20"])
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)

    files = {a.path for folder in ("", "config", "features", "plots") for a in client.list_artifacts(run_id, folder)}
    assert {
        "config/run_config.yaml",
        "config/deepspeed_config.json",
        "features/manifest.json",
        "plots/training_curve.png",
        "history.csv",
    } <= files
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert (local / "plots/training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((local / "features/manifest.json").read_text())["dims"] == {"text": 8}
    assert "lightgcn" in (local / "config/run_config.yaml").read_text()
    assert len(pd.read_csv(local / "history.csv")) == 4
    assert str(tmp_path) in run.info.artifact_uri  # artifacts live beside the sqlite store


def test_resume_continues_the_same_run(store, dataset):
    trainer = Trainer(run_config(epochs=4), ds=dataset)
    history = trainer.fit(log=lambda s: None)["history"]
    first = RunTracker()
    run_id = first.start(run_config(epochs=2).as_dict(), run_name="resumable", experiment="dprec-test")
    for row in history[:2]:
        first.log_epoch(row, step=row["epoch"])
    mlflow.end_run("KILLED")  # the process dies here; a new one resumes from the checkpoint

    second = RunTracker()
    assert (
        second.start(run_config(epochs=4).as_dict(), run_name="ignored", experiment="dprec-test", resume_run_id=run_id)
        == run_id
    )
    for row in history[2:]:
        second.log_epoch(row, step=row["epoch"])
    second.finish(history)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dprec.resumed"] == "true"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2, 3]
    assert run.data.params["train.epochs"] == "2"
    assert json.loads(run.data.tags["dprec.params_changed_on_resume"]) == {"train.epochs": ["2", "4"]}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_grid_table_and_chart(store, tmp_path):
    rows = [
        {"variant": "full", "valid_recall@20": 0.31, "test_recall@20": 0.30},
        {"variant": "no_hypergraph", "valid_recall@20": 0.28, "test_recall@20": 0.27},
    ]
    tracker = RunTracker()
    run_id = tracker.start({"grid": {"variants": ["full", "no_hypergraph"]}}, run_name="ablation", experiment="grid")
    tracker.log_grid(rows)
    with pytest.raises(ValueError, match="test_recall@20"):
        tracker.log_grid([{"variant": "x"}])
    tracker.finish([])
    local = Path(MlflowClient(store).download_artifacts(run_id, "grid", str(tmp_path / "dl")))
    assert (local / "ablation.md").read_text().splitlines()[2] == "| full | 0.3100 | 0.3000 |"
    assert pd.read_csv(local / "ablation.csv")["variant"].tolist() == ["full", "no_hypergraph"]
    assert (local / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_disabled_tracker_writes_nothing(store):
    tracker = RunTracker(enabled=False)
    assert tracker.start({"a": 1}, run_name="rank1", experiment="ranks") is None
    tracker.log_epoch({"epoch": 0, "loss": 1.0}, step=0)
    tracker.log_test({"recall@20": 0.5}, best_epoch=0)
    tracker.log_grid([{"variant": "x", "test_recall@20": 0.1}])
    assert tracker.register(None, {}) is None
    tracker.finish([{"epoch": 0, "loss": 1.0}])
    assert MlflowClient(store).get_experiment_by_name("ranks") is None and mlflow.active_run() is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or too busy to answer in time
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
        time.sleep(1)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group started with start_new_session=True (the server and its workers)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_tracking_server_on_loopback(dataset, template, tmp_path, monkeypatch):
    """The same calls against cluster/start_mlflow_server.sh on 127.0.0.1 (artifacts proxied by the server)."""
    shutil.copy(template, tmp_path / "server.db")
    port = free_port()
    env = {
        **os.environ,
        "DPREC_MLFLOW_PORT": str(port),
        "DPREC_MLFLOW_BACKEND": f"sqlite:///{tmp_path}/server.db",
        "DPREC_MLFLOW_ARTIFACTS": str(tmp_path / "artifacts"),
    }
    script = Path(__file__).resolve().parents[1] / "cluster" / "start_mlflow_server.sh"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(script)], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        wait_for(f"{uri}/health", server, log)
        trainer = Trainer(run_config(model={"name": "popularity"}), ds=dataset)
        tracker = RunTracker()
        assert tracker.uri == uri
        run_id = tracker.start(trainer.cfg.as_dict(), run_name="popularity", experiment="dprec-server")
        result = trainer.fit(log=lambda s: None)
        tracker.log_epoch(result["history"][0], step=0)
        tracker.log_test(result["test"], result["best_epoch"])
        registration = tracker.register(trainer.trained_model(), result)
        tracker.finish(result["history"])
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert run.data.metrics["test_recall_at_20"] == pytest.approx(result["test"]["recall@20"])
        assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/training_curve.png"}
        assert aliases_of(client, "dprec-grouped") == {"champion": registration.version}
        answer = mlflow.pyfunc.load_model("models:/dprec-grouped@champion").predict(pd.DataFrame({"user_id": ["1000"]}))
        assert len(answer) == 10
        assert any((tmp_path / "artifacts").rglob("embeddings.safetensors"))
    finally:
        stop_group(server)
        release_store()
