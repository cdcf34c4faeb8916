import numpy as np
import pandas as pd
import pytest
import torch

from dprec.config import ConfigError
from dprec.data.dataset import make_dataset, save_dataset
from dprec.data.interactions import UserItemSets
from dprec.training.config import RunConfig, TrainConfig, load_config
from dprec.training.loop import Trainer
from dprec.training.run import load_run, save_run
from dprec.training.sampler import NegativeSampler


def clustered_dataset(n_users=120, n_items=80, per_user=12, seed=0):
    """Users in 4 groups, each buying mostly from its own quarter of the items: learnable structure."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        group = u % 4
        own = np.arange(group * n_items // 4, (group + 1) * n_items // 4)
        picks = rng.choice(own, size=per_user - 2, replace=False).tolist()
        picks += rng.choice(np.setdiff1d(np.arange(n_items), own), size=2, replace=False).tolist()
        split = np.array([0] * (per_user - 4) + [1, 1, 2, 2])
        rng.shuffle(split)
        rows += [(u, i, s) for i, s in zip(picks, split, strict=True)]
    inter = pd.DataFrame(rows, columns=["user_idx", "item_idx", "split"])
    items = pd.DataFrame({"item_idx": np.arange(n_items), "item_id": [f"i{i}" for i in range(n_items)]})
    users = pd.DataFrame({"user_idx": np.arange(n_users), "user_id": [f"u{u}" for u in range(n_users)]})
    return make_dataset("clustered", inter, items, users, {"source": "test"})


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return save_dataset(clustered_dataset(), tmp_path_factory.mktemp("data") / "clustered")


def run_cfg(dataset_dir, tmp_path, model=None, backend="torch", **train):
    base = dict(epochs=15, batch_size=256, lr=0.01, patience=50, seed=1, graph_backend=backend, ks=(10, 20))
    base.update(train)
    return RunConfig(
        dataset=str(dataset_dir),
        out=str(tmp_path / "run"),
        model=model or {"name": "lightgcn", "n_layers": 2},
        train=TrainConfig(**base),
    )


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: x\ntrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(path)
    with pytest.raises(ConfigError, match="lr must be positive"):
        load_config(None, ["dataset=x", "train.lr=-1"])
    with pytest.raises(ConfigError, match="must contain 20"):
        load_config(None, ["dataset=x", "train.ks=[10]"])
    with pytest.raises(ConfigError, match="n_layers"):
        load_config(None, ["dataset=x", "model.name=lightgcn", "model.n_layers=-1"])
    cfg = load_config(None, ["dataset=x", "train.epochs=7", "model.n_layers=3"])
    assert cfg.train.epochs == 7 and cfg.model_config().n_layers == 3


def test_negative_sampler_avoids_training_items():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 400)
    items = rng.integers(0, 20, 400)
    sets = UserItemSets.from_pairs(*np.unique(np.stack([users, items]), axis=1), 30, 20)
    sampler = NegativeSampler(sets)
    neg = sampler.sample(users, np.random.default_rng(1))
    assert not sets.contains(users, neg).any()
    assert np.array_equal(neg, sampler.sample(users, np.random.default_rng(1)))
    full = UserItemSets.from_pairs(np.zeros(10, int), np.arange(10), 1, 10)
    with pytest.raises(ValueError, match="every item"):
        NegativeSampler(full)


def test_rank_batches_partition_the_global_batch(dataset_dir, tmp_path):
    trainer = Trainer(run_cfg(dataset_dir, tmp_path, batch_size=100))
    whole = list(trainer.epoch_batches(3))
    parts = [list(trainer.epoch_batches(3, rank=r, world=3)) for r in range(3)]
    assert all(len(p) == len(whole) for p in parts)
    for b, (u, _pos, n, share) in enumerate(whole):
        assert share == 1.0
        assert torch.equal(torch.cat([parts[r][b][0] for r in range(3)]), u)
        assert torch.equal(torch.cat([parts[r][b][2] for r in range(3)]), n)
        # share-weighted local means average (over ranks) to the global mean
        x = u.double()
        local = [parts[r][b][0].double().mean() * parts[r][b][3] for r in range(3)]
        assert float(sum(local) / 3) == pytest.approx(float(x.mean()))


def test_lightgcn_learns_and_beats_popularity(dataset_dir, tmp_path):
    pop = Trainer(run_cfg(dataset_dir, tmp_path, model={"name": "popularity"})).fit(log=lambda s: None)
    trainer = Trainer(run_cfg(dataset_dir, tmp_path))
    result = trainer.fit(log=lambda s: None)
    losses = [row["loss"] for row in result["history"]]
    assert losses[-1] < 0.7 * losses[0]
    assert result["valid"]["recall@20"] > pop["valid"]["recall@20"] + 0.1
    assert result["test"]["recall@20"] > pop["test"]["recall@20"] + 0.1


def test_same_seed_same_result_and_reload(dataset_dir, tmp_path):
    a = Trainer(run_cfg(dataset_dir, tmp_path, epochs=4))
    ra = a.fit(log=lambda s: None)
    rb = Trainer(run_cfg(dataset_dir, tmp_path, epochs=4)).fit(log=lambda s: None)
    assert ra["test"] == rb["test"]
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    out = save_run(a, ra, tmp_path / "saved")
    reloaded = load_run(out)
    assert reloaded.evaluate("test")["recall@20"] == pytest.approx(ra["test"]["recall@20"], abs=1e-12)


def test_early_stopping_reads_test_once_at_best_epoch(dataset_dir, tmp_path):
    trainer = Trainer(run_cfg(dataset_dir, tmp_path, epochs=40, patience=3, lr=0.05))
    calls = []
    original = trainer.evaluate
    trainer.evaluate = lambda split, **kw: (calls.append(split), original(split, **kw))[1]
    result = trainer.fit(log=lambda s: None)
    assert calls.count("test") == 1 and calls[-1] == "test"
    valid = [h["valid_recall@20"] for h in result["history"]]
    assert result["best_epoch"] == int(np.argmax(valid))
    assert len(valid) - 1 - result["best_epoch"] == 3 or len(valid) == 40


def test_lr_step_decay_is_a_function_of_the_epoch(dataset_dir, tmp_path):
    trainer = Trainer(run_cfg(dataset_dir, tmp_path, epochs=5, lr=0.04, lr_decay=0.5, lr_decay_every=2))
    seen = []
    original = trainer.train_epoch
    trainer.train_epoch = lambda epoch: (original(epoch), seen.append(trainer.optimizer.param_groups[0]["lr"]))[0]
    trainer.fit(log=lambda s: None)
    assert seen == pytest.approx([0.04, 0.04, 0.02, 0.02, 0.01])
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay=1.5)
    plain = Trainer(run_cfg(dataset_dir, tmp_path, epochs=1))
    assert plain.epoch_lr(999) == pytest.approx(0.01)  # no decay by default


@pytest.mark.parametrize(
    ("model", "batch", "rank", "lr"),
    [
        ("dprec", 8192, 256, 0.005),
        ("mgcn", 8192, 256, 0.004),
        ("lgmrec", 8192, 256, 0.004),
        ("lightgcn", 2048, 0, 1e-3),
        ("freedom", 2048, 0, 1e-3),
    ],
)
def test_open_train_settings_take_the_models_defaults(model, batch, rank, lr):
    cfg = RunConfig(dataset="x", model={"name": model})
    assert (cfg.train.batch_size, cfg.train.feature_rank, cfg.train.lr) == (batch, rank, lr)
    assert cfg.as_dict()["train"]["batch_size"] == batch  # the resolved value is what a run records
    given = RunConfig(dataset="x", model={"name": model}, train=TrainConfig(batch_size=512, feature_rank=0))
    assert (given.train.batch_size, given.train.feature_rank) == (512, 0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="feature_rank"):
        TrainConfig(feature_rank=-1)
