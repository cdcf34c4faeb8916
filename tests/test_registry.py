"""Registry and consumer contract: no-pickle pyfunc, champion rule, concurrent registration, serving."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from test_tracking import (
    free_port,
    grouped_dataset,
    release_store,
    run_config,
    stop_group,
    template_store,
    use_fresh_store,
    wait_for,
)

from dprec.recommend import main as recommend_main
from dprec.tracking.registry import (
    ELIGIBLE_TAG,
    aliases_of,
    best_version,
    export_bundle,
    register_model,
    settle_aliases,
)
from dprec.training.loop import Trainer

NAME = "dprec-grouped"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    return template_store(tmp_path_factory.getbasetemp())


@pytest.fixture
def store(tmp_path, monkeypatch, template):
    yield use_fresh_store(tmp_path, monkeypatch, template)
    release_store()


@pytest.fixture(scope="module")
def trained():
    """Three fitted trainers whose validation Recall@20 is ordered popularity < short < long."""
    ds = grouped_dataset()
    out = {}
    for key, model, epochs in [("popularity", {"name": "popularity"}, 1), ("short", None, 1), ("long", None, 12)]:
        trainer = Trainer(run_config(model=model, epochs=epochs), ds=ds)
        out[key] = (trainer, trainer.fit(log=lambda s: None))
    r20 = [out[k][1]["valid"]["recall@20"] for k in ("popularity", "short", "long")]
    assert r20 == sorted(r20) and len(set(r20)) == 3, r20
    return out


def register(trained, key, **kw):
    trainer, result = trained[key]
    return register_model(trainer.trained_model(), result, **kw)


def in_process_top_k(trainer, k):
    """Top-k item indices and scores per user straight from the model, training items masked."""
    with torch.no_grad():
        users, items = trainer.model.final_embeddings()
        scores = users @ items.T
    rows, cols = trainer.train_sets.rows_cols(np.arange(trainer.ds.n_users))
    scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
    top = torch.topk(scores, k, dim=1)
    return top.indices.numpy(), top.values.numpy()


def assert_matches_model(table, trainer, k):
    top_items, top_scores = in_process_top_k(trainer, k)
    user_index = {u: i for i, u in enumerate(trainer.ds.users["user_id"])}
    item_ids = trainer.ds.items["item_id"].to_numpy()
    assert list(table.columns) == ["user_id", "rank", "item_id", "score", "fallback"]
    assert not table["fallback"].any()
    for user, rows in table.groupby("user_id", sort=False):
        u = user_index[user]
        assert rows["rank"].tolist() == list(range(1, k + 1))
        assert set(rows["item_id"]) == set(item_ids[top_items[u]])
        np.testing.assert_allclose(rows["score"].to_numpy(), top_scores[u], atol=1e-5)
        trained_ids = set(
            item_ids[trainer.train_sets.indices[trainer.train_sets.indptr[u] : trainer.train_sets.indptr[u + 1]]]
        )
        assert not trained_ids & set(rows["item_id"])


def test_champion_moves_only_on_better_validation_recall(store, trained):
    first = register(trained, "short")
    assert (first.name, first.version, first.alias) == (NAME, "1", "champion")
    worse = register(trained, "popularity")
    assert (worse.version, worse.alias, worse.champion) == ("2", "challenger", "1")
    assert aliases_of(MlflowClient(store), NAME) == {"champion": "1", "challenger": "2"}
    better = register(trained, "long")
    assert (better.version, better.alias) == ("3", "champion")
    client = MlflowClient(store)
    assert aliases_of(client, NAME) == {"champion": "3", "challenger": "2"}
    tags = client.get_model_version(NAME, "3").tags
    assert float(tags["valid_recall_at_20"]) == pytest.approx(trained["long"][1]["valid"]["recall@20"])
    assert float(tags["test_ndcg_at_20"]) == pytest.approx(trained["long"][1]["test"]["ndcg@20"])
    assert tags["dataset_hash"] == trained["long"][0].ds.meta["content_hash"]

    # A racing registration that wrote a stale @champion last is repaired by the next settle;
    # a rollback is a tag, not a hand-moved alias.
    client.set_registered_model_alias(NAME, "champion", "2")
    assert settle_aliases(client, NAME) == "3"
    client.set_model_version_tag(NAME, "3", ELIGIBLE_TAG, "false")
    assert settle_aliases(client, NAME) == "1"
    client.set_registered_model_alias(NAME, "challenger", "1")
    settle_aliases(client, NAME)
    assert aliases_of(client, NAME) == {"champion": "1"}


def test_model_is_code_and_tensors_without_pickles(store, trained, tmp_path):
    registration = register(trained, "long")
    local = Path(mlflow.artifacts.download_artifacts(registration.model_uri, dst_path=str(tmp_path / "model")))
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "serving.py" in names and not [n for n in names if n.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert {
        "artifacts/embeddings.safetensors",
        "artifacts/train_items.npz",
        "artifacts/ids.json",
        "artifacts/popularity.npy",
        "artifacts/config.json",
    } <= set(names)
    code = (local / "serving.py").read_text()
    assert "import dprec" not in code and "from dprec" not in code
    assert not {"ray", "deepspeed", "dgl"} & {
        line.split()[1].split(".")[0] for line in code.splitlines() if line.startswith(("import ", "from "))
    }
    with np.load(local / "artifacts/train_items.npz", allow_pickle=False) as train:
        assert np.array_equal(train["indices"], trained["long"][0].train_sets.indices)
    config = json.loads((local / "artifacts/config.json").read_text())
    assert config["dataset"]["name"] == "grouped" and config["best_epoch"] == trained["long"][1]["best_epoch"]


def test_pyfunc_answers_like_the_model(store, trained, monkeypatch, capsys):
    register(trained, "long")
    trainer = trained["long"][0]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    users = trainer.ds.users["user_id"].tolist()
    assert_matches_model(model.predict(pd.DataFrame({"user_id": users})), trainer, k=10)
    assert_matches_model(model.predict(pd.DataFrame({"user_id": users[:5], "k": 3})), trainer, k=3)
    as_int = model.predict(pd.DataFrame({"user_id": [int(users[7])], "k": [4]}))
    assert as_int.equals(model.predict(pd.DataFrame({"user_id": [users[7]], "k": [4]})))
    # a user who trained on all but j < k items gets j rows, never a training item
    n_items = trainer.ds.n_items
    everything = model.predict(pd.DataFrame({"user_id": [users[0]], "k": [n_items]}))
    assert len(everything) == n_items - int(np.diff(trainer.train_sets.indptr)[0])

    assert (
        recommend_main(["--model", f"models:/{NAME}@champion", "--user", users[0], "--user", users[1], "--k", "2"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["user_id", "rank", "item_id", "score", "fallback"]
    assert [line.split()[:2] for line in lines[1:]] == [
        [users[0], "1"],
        [users[0], "2"],
        [users[1], "1"],
        [users[1], "2"],
    ]
    assert recommend_main(["--model", f"models:/{NAME}@champion", "--user", "ghost"]) == 2
    assert "ghost" in capsys.readouterr().err


def test_unknown_users_and_malformed_requests(store, trained):
    register(trained, "long")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    n_items = trained["long"][0].ds.n_items
    with pytest.raises(MlflowException, match="unknown user_id 'ghost'") as err:
        model.predict(pd.DataFrame({"user_id": ["1000", "ghost"]}))
    assert err.value.get_http_status_code() == 400
    bad = {
        "user_id": pd.DataFrame({"uid": ["1000"]}),
        "k must be a positive integer, got 2.5": pd.DataFrame({"user_id": ["1000"], "k": [2.5]}),
        "k must be a positive integer, got 'five'": pd.DataFrame({"user_id": ["1000"], "k": ["five"]}),
        "got 0": pd.DataFrame({"user_id": ["1000"], "k": [0]}),
        f"number of items \\({n_items}\\), got {n_items + 1}": pd.DataFrame({"user_id": ["1000"], "k": [n_items + 1]}),
        "user_id must be a string or an integer, got 1.5": pd.DataFrame({"user_id": [1.5]}),
    }
    for message, frame in bad.items():
        with pytest.raises(MlflowException, match=message) as err:
            model.predict(frame)
        assert err.value.get_http_status_code() == 400

    fallback = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", model_config={"unknown_user": "popularity"})
    out = fallback.predict(pd.DataFrame({"user_id": ["ghost", "1000"], "k": [3, None]}))
    ghost = out[out["user_id"] == "ghost"]
    popularity = np.bincount(trained["long"][0].train_sets.indices)
    assert ghost["fallback"].all() and len(ghost) == 3
    assert ghost["score"].tolist() == sorted(popularity, reverse=True)[:3]
    assert (~out.loc[out["user_id"] == "1000", "fallback"]).sum() == 10


def test_concurrent_registrations_leave_one_best_champion(store, trained, tmp_path):
    register(trained, "short")
    bundles = [
        export_bundle(trained[key][0].trained_model(), trained[key][1], tmp_path / key)
        for key in ("popularity", "long")
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dprec.register", "register", "--bundle", str(b)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for b in bundles
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    client = MlflowClient(store)
    versions = client.search_model_versions(f"name='{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    champion = aliases_of(client, NAME)["champion"]
    assert champion == best_version(versions) == results[1]["version"]
    assert results[0]["alias"] == "challenger" and results[1]["alias"] == "champion"
    assert aliases_of(client, NAME)["challenger"] == results[0]["version"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_in_process(store, trained, tmp_path):
    register(trained, "long")
    trainer = trained["long"][0]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                f"models:/{NAME}@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ping", server, log)
        users = trainer.ds.users["user_id"].tolist()[:20]
        records = [{"user_id": u, "k": 5} for u in users]
        answer = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=30)
        assert answer.status_code == 200, answer.text
        served = pd.DataFrame(answer.json()["predictions"])
        local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame(records))
        assert served[["user_id", "rank", "item_id", "fallback"]].equals(
            local[["user_id", "rank", "item_id", "fallback"]]
        )
        np.testing.assert_allclose(served["score"], local["score"], atol=1e-6)
        assert_matches_model(served, trainer, k=5)
        unknown = requests.post(f"{url}/invocations", json={"dataframe_records": [{"user_id": "ghost"}]}, timeout=30)
        assert unknown.status_code == 400 and "unknown user_id 'ghost'" in unknown.json()["message"]
        malformed = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"user_id": users[0], "k": -1}]}, timeout=30
        )
        assert malformed.status_code == 400 and "k must be between 1" in malformed.json()["message"]
    finally:
        stop_group(server)
