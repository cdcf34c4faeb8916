"""The cold-start harness (dprec.training.cold): warm view, held-out items embedded from content, three targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprec.config import ConfigError
from dprec.data.dataset import DatasetError, save_dataset
from dprec.data.synthetic import generate
from dprec.training.cold import ColdStartTrainer, grown_catalogue, make_trainer, warm_view
from dprec.training.config import ColdStartConfig, RunConfig, TrainConfig, load_config
from dprec.training.loop import Trainer
from dprec.training.metrics import DEFAULT_KS
from dprec.training.run import load_run, save_run
from tests.synthetic_features import informative_features


@pytest.fixture(scope="module")
def cold():
    ds = generate(split="cold-items")
    return ds, informative_features(ds)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(model: dict, epochs: int = 3, cold: dict | None = None, **train) -> RunConfig:
    base = dict(epochs=epochs, batch_size=512, lr=0.01, seed=1, graph_backend="torch", ks=(10, 20))
    return RunConfig(
        dataset="in-memory",
        out="unused",
        model=model,
        train=TrainConfig(**base | train),
        cold=ColdStartConfig(**(cold or {})),
    )


def brute_force_recall(scores: np.ndarray, truth: list[set], mask: list[set], candidates: np.ndarray, k: int) -> float:
    """Mean over users with truth of |top-k of candidates (mask removed) ∩ truth| / |truth|."""
    values = []
    for u, items in enumerate(truth):
        if not items:
            continue
        ranked = [int(i) for i in candidates[np.argsort(-scores[u, candidates], kind="stable")] if i not in mask[u]]
        values.append(len(set(ranked[:k]) & items) / len(items))
    return float(np.mean(values))


def test_warm_view_drops_the_held_out_items_and_keeps_everything_else(cold):
    ds, _ = cold
    trainer = ColdStartTrainer(config({"name": "popularity"}, cold={"embedding": "random"}), ds)
    view, warm = trainer.ds, trainer.warm_items
    held = trainer.held
    assert view.n_items == ds.n_items - len(held.all) == len(warm) and view.n_users == ds.n_users
    assert np.intersect1d(warm, held.all).size == 0
    assert view.items["item_id"].tolist() == ds.items["item_id"].iloc[warm].tolist()
    kept = ds.interactions[~ds.interactions["item_idx"].isin(held.all)]
    assert len(view.interactions) == len(kept)
    assert np.array_equal(warm[view.interactions["item_idx"].to_numpy()], kept["item_idx"].to_numpy())
    assert "cold_start" not in view.meta and view.meta["warm_view_of"] == ds.meta["content_hash"]
    assert trainer.model.n_items == len(warm)  # the model (and its negatives) never sees a held-out item


def test_warm_scores_are_the_models_bit_for_bit(cold):
    """The held-out items' rows are appended: the trained items and users score exactly as the model alone.

    Validation on the warm target, so that both fits keep the same epoch's state."""
    ds, features = cold
    cfg = config({"name": "dprec", "n_hyperedges": 4}, cold={"target": "warm"})
    trainer = ColdStartTrainer(cfg, ds, features=features)
    result = trainer.fit(log=lambda s: None)
    view, _ = warm_view(ds, trainer.held)
    plain = Trainer(cfg, view, features={m: f[trainer.warm_items] for m, f in features.items()})
    plain_result = plain.fit(log=lambda s: None)
    users, items = trainer.catalogue_embeddings()
    with torch.no_grad():
        plain_users, plain_items = plain.model.final_embeddings()
    assert torch.equal(users, plain_users) and torch.equal(items[trainer.warm_items], plain_items)
    warm_test = {k[len("warm_") :]: v for k, v in result["test"].items() if k.startswith("warm_")}
    assert warm_test == plain.evaluate("test")
    assert result["best_epoch"] == plain_result["best_epoch"] and result["valid"] == plain_result["valid"]
    held = trainer.held.all
    assert torch.isfinite(items[held]).all() and not torch.equal(items[held[0]], items[held[1]])


def test_cold_and_all_targets_against_brute_force(cold):
    ds, features = cold
    trainer = ColdStartTrainer(config({"name": "content_knn"}), ds, features=features)
    result = trainer.fit(log=lambda s: None)
    users, items = trainer.catalogue_embeddings()
    scores = (users @ items.T).numpy()
    inter = ds.interactions
    empty = [set() for _ in range(ds.n_users)]

    def sets(rows) -> list[set]:
        out = [set() for _ in range(ds.n_users)]
        for u, i in zip(rows["user_idx"], rows["item_idx"], strict=True):
            out[u].add(int(i))
        return out

    train = sets(inter[inter["split"] == 0])
    for split, label, held in (("valid", 1, trainer.held.valid), ("test", 2, trainer.held.test)):
        targets = sets(inter[(inter["split"] == label) & inter["item_idx"].isin(held)])
        cold_r10 = brute_force_recall(scores, targets, empty, held, 10)
        metrics = result["valid"] if split == "valid" else result["test"]
        assert metrics["recall@10"] == pytest.approx(cold_r10, abs=1e-9)
    all_targets = sets(inter[inter["split"] == 2])
    assert result["test"]["all_recall@20"] == pytest.approx(
        brute_force_recall(scores, all_targets, train, np.arange(ds.n_items), 20), abs=1e-9
    )
    assert result["test"]["recall@20"] == result["test"]["cold_recall@20"]
    assert set(result["valid"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "precision") for k in (10, 20)}
    # content-kNN embeds a held-out item exactly as a trained one: its own normalised features
    held = trainer.held.all
    exact = trainer.model.content_item_embeddings({m: f[held] for m, f in features.items()})
    assert torch.allclose(items[held], exact)


def test_validation_ranks_the_chosen_target(cold):
    ds, features = cold
    results = {}
    for target in ("cold", "all", "warm"):
        trainer = ColdStartTrainer(config({"name": "content_knn"}, cold={"target": target}), ds, features=features)
        results[target] = trainer.fit(log=lambda s: None)
        assert results[target]["test"]["recall@20"] == results[target]["test"][f"{target}_recall@20"]
    assert len({r["valid"]["recall@20"] for r in results.values()}) == 3  # three different rankings
    view, warm = warm_view(ds, trainer.held)
    plain = Trainer(config({"name": "content_knn"}), view, features={m: f[warm] for m, f in features.items()})
    assert results["warm"]["valid"] == plain.evaluate("valid")


def test_popularity_ranks_new_items_at_random(cold):
    ds, _ = cold
    first = ColdStartTrainer(config({"name": "popularity"}, cold={"embedding": "random"}), ds).fit(log=lambda s: None)
    again = ColdStartTrainer(config({"name": "popularity"}, cold={"embedding": "random"}), ds).fit(log=lambda s: None)
    assert first["test"] == again["test"]  # seeded
    # 40 held-out test items: a random top 20 finds about half of each user's targets
    assert 0.35 < first["test"]["cold_recall@20"] < 0.65


def test_plain_trainer_refuses_a_cold_split_and_the_harness_refuses_too_few_held_out_items(cold):
    ds, _ = cold
    popularity = {"name": "popularity"}
    with pytest.raises(DatasetError, match="cold-items split, whose held-out items must stay out of training"):
        Trainer(config(popularity), ds)
    assert isinstance(make_trainer(config(popularity, cold={"embedding": "random"}), ds), ColdStartTrainer)
    assert type(make_trainer(config(popularity), generate())) is Trainer
    with pytest.raises(DatasetError, match="valid has 40, test has 40, fewer than the largest cut-off K=50"):
        ColdStartTrainer(config(popularity, ks=DEFAULT_KS), ds)
    with pytest.raises(DatasetError, match="not a cold-items split"):
        ColdStartTrainer(config(popularity), generate())
    with pytest.raises(ConfigError, match="cold.embedding 'knn' embeds the held-out items from their features"):
        ColdStartTrainer(config(popularity), ds)


def test_a_cold_run_folder_reloads_and_evaluates_the_same(cold, tmp_path):
    ds, features = cold
    folder = save_dataset(ds, tmp_path / "cold")
    cfg = config({"name": "lightgcn", "n_layers": 2}, epochs=2)
    cfg.dataset, cfg.out = str(folder), str(tmp_path / "run")
    trainer = make_trainer(cfg, features=features)
    result = trainer.fit(log=lambda s: None)
    save_run(trainer, result, cfg.out)
    assert load_config(tmp_path / "run" / "config.yaml").cold == cfg.cold
    # no feature folders in this config: the reloaded run has no content for its held-out items, and says so
    with pytest.raises(ConfigError, match="cold.embedding 'knn' embeds the held-out items from their features"):
        load_run(tmp_path / "run")


def test_held_out_items_with_training_interactions_are_refused(cold):
    ds, _ = cold
    meta = dict(ds.meta)
    warm_item = int(
        np.setdiff1d(np.arange(ds.n_items), meta["cold_start"]["valid_items"] + meta["cold_start"]["test_items"])[0]
    )
    meta["cold_start"] = {**meta["cold_start"], "valid_items": [*meta["cold_start"]["valid_items"], warm_item]}
    tampered = type(ds)(ds.name, ds.interactions, ds.items, ds.users, meta)
    with pytest.raises(DatasetError, match=f"held-out item {warm_item} has an interaction labelled 0"):
        ColdStartTrainer(config({"name": "popularity"}, cold={"embedding": "random"}), tampered)


def test_a_grown_catalogue_must_extend_the_runs(cold):
    ds, features = cold
    trainer = ColdStartTrainer(config({"name": "content_knn"}), ds, features=features)
    with pytest.raises(DatasetError, match="does not extend the catalogue of the run"):
        grown_catalogue(trainer, generate())  # the same 400 items: nothing added
