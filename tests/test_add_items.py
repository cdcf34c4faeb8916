"""New items end to end, no training: prepare add-items -> extract (only the new shards) -> register add-items ->
the champion recommends a new item to a user whose history is near it (DESIGN §6)."""

from __future__ import annotations

import contextlib
import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_tracking import release_store, template_store, use_fresh_store

from dprec.data.dataset import load_dataset, make_dataset, save_dataset
from dprec.data.splits import assign_split
from dprec.extract import main as extract_main
from dprec.features.shards import load_manifest, read_features
from dprec.prepare import main as prepare_main
from dprec.register import main as register_main
from dprec.train import main as train_main

THEMES = {
    "kettle": "kettle teapot boil water steam spout whistle copper",
    "tent": "tent camping trail hiking lantern sleeping outdoor stove",
    "yoga": "yoga mat stretch pilates towel block strap balance",
    "garden": "garden trowel soil seed planter hose pruner compost",
}
PER_THEME, USERS_PER_THEME = 8, 12


def shop(rng: np.random.Generator):
    """4 themes x 8 items with theme words in their text; each user buys 6 items of one theme."""
    titles, categories = [], []
    for theme, words in THEMES.items():
        vocabulary = words.split()
        for _ in range(PER_THEME):
            titles.append(" ".join(rng.choice(vocabulary, size=4, replace=False)))
            categories.append(f"Home|{theme.title()}")
    n_items = len(titles)
    items = pd.DataFrame(
        {"item_idx": np.arange(n_items), "item_id": [f"P{i:03d}" for i in range(n_items)], "title": titles}
    ).assign(categories=categories)
    rows = []
    for u in range(len(THEMES) * USERS_PER_THEME):
        theme = u // USERS_PER_THEME
        for i in rng.choice(PER_THEME, size=6, replace=False):
            rows.append((u, theme * PER_THEME + int(i)))
    inter = pd.DataFrame(rows, columns=["user_idx", "item_idx"])
    inter["split"] = assign_split(inter, "random", seed=0)
    users = pd.DataFrame({"user_idx": np.arange(inter["user_idx"].max() + 1)})
    users["user_id"] = [f"U{u:03d}" for u in users["user_idx"]]
    return make_dataset("shop", inter, items, users, {"source": "test"})


def quiet(main, argv: list) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    lines = out.getvalue().strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 and lines else {}), err.getvalue()


@pytest.fixture
def store(tmp_path, monkeypatch):
    yield use_fresh_store(tmp_path, monkeypatch, template_store(tmp_path.parent))
    release_store()


@pytest.mark.slow
def test_new_items_reach_the_champion_without_training(store, tmp_path):
    torch.set_num_threads(1)
    data, shards = tmp_path / "data" / "shop", tmp_path / "shards" / "minilm"
    save_dataset(shop(np.random.default_rng(0)), data)
    extract = ["--text-model", "minilm", "--image-model", "none", "--executor", "local", "--items-per-shard", "8"]
    extract += ["--torch-threads", "1", "--out", shards]
    rc, first, err = quiet(extract_main, ["--dataset", data, *extract])
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in sorted(shards.glob("items-*.tar"))}
    assert first["shards_written"] == 4 and len(before) == 4

    config = {
        "dataset": str(data),
        "out": str(tmp_path / "runs" / "dprec"),
        "features": {"text": str(shards)},
        "model": {"name": "dprec"},
        "train": {"epochs": 30, "batch_size": 128, "lr": 0.01, "seed": 1, "graph_backend": "torch", "ks": [10, 20]},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    rc, trained, err = quiet(train_main, ["--config", tmp_path / "run.yaml"])
    assert rc == 0, err
    assert trained["registration"]["version"] == "1" and trained["registration"]["alias"] == "champion"

    new = {
        "NEW-KETTLE": {"title": "copper kettle whistle teapot", "categories": "Home,Kettle"},
        "NEW-TENT": {"title": "hiking tent lantern trail", "categories": "Home,Tent"},
    }
    (tmp_path / "new.json").write_text(json.dumps(new))
    grown = tmp_path / "data" / "shop-v2"
    rc, _, err = quiet(prepare_main, ["add-items", "--dataset", data, "--items", tmp_path / "new.json", "--out", grown])
    assert rc == 0, err

    # extraction of the grown catalogue into the same folder: one new shard, the old ones byte for byte
    rc, second, err = quiet(extract_main, ["--dataset", grown, *extract])
    assert rc == 0, err
    assert (second["shards_written"], second["shards_skipped"], second["items_computed"]) == (1, 4, 2)
    after = {p.name: p.read_bytes() for p in sorted(shards.glob("items-*.tar"))}
    assert {k: after[k] for k in before} == before and sorted(after) == [*before, "items-000004.tar"]
    manifest = load_manifest(shards)
    assert manifest["spec"]["dataset"]["grown_from"][0]["n_items"] == 32 and manifest["complete"]
    old_view, new_view = read_features(shards, load_dataset(data)), read_features(shards, load_dataset(grown))
    assert np.array_equal(old_view["text"], new_view["text"][:32]) and len(new_view["text"]) == 34

    rc, added, err = quiet(register_main, ["add-items", "--run", config["out"], "--dataset", grown])
    assert rc == 0, err
    assert (added["version"], added["alias"], added["champion"], added["added"]) == ("2", "champion", "2", 2)
    client = MlflowClient(store)
    old = client.get_model_version("dprec-shop", "1").tags
    assert old["champion_eligible"] == "false" and old["superseded_by"] == "2"

    champion = mlflow.pyfunc.load_model("models:/dprec-shop@champion")
    kettle_users = [f"U{u:03d}" for u in range(USERS_PER_THEME)]
    answer = champion.predict(pd.DataFrame({"user_id": kettle_users, "k": 5}))
    ranked = answer.groupby("user_id")["item_id"].apply(list)
    hits = sum("NEW-KETTLE" in items for items in ranked)
    assert hits >= USERS_PER_THEME - 2, ranked  # the new kettle comes in the kettle users' top 5
    assert not any("NEW-TENT" in items for items in ranked)
    trained_items = load_dataset(data).split(0)
    for user, items in ranked.items():  # the consumer contract: never an item the user trained on
        bought = set(trained_items[trained_items["user_idx"] == int(user[1:])]["item_idx"].map(lambda i: f"P{i:03d}"))
        assert not bought & set(items)
    v1 = mlflow.pyfunc.load_model("models:/dprec-shop/1").predict(pd.DataFrame({"user_id": kettle_users, "k": 32}))
    assert not v1["item_id"].str.startswith("NEW").any()  # an item unknown to a version is never returned
