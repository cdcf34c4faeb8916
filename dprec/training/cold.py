"""Cold start in the training harness: train on the warm items of a cold-items split, rank the held-out ones.

A dataset prepared with ``--split cold-items`` (:mod:`dprec.data.splits`) holds a share of its items out of
training; ``dataset.json`` names them. :func:`make_trainer` gives such a dataset a :class:`ColdStartTrainer`
(any other dataset the plain :class:`~dprec.training.loop.Trainer`), which

1. trains the model on the *warm view*: the catalogue without the held-out items, re-indexed (the model, its
   graphs, its negatives and its feature reduction never see a held-out item; that is what a new item is);
2. embeds the held-out items from their content alone (:func:`dprec.models.cold.new_item_embeddings`, settings
   in the run config's ``cold`` section, :class:`~dprec.training.config.ColdStartConfig`), appended to the warm
   items' final embeddings, which stay exactly the model's;
3. evaluates with MMRec's full-ranking metrics (:mod:`dprec.training.metrics`) on three targets of a split:
   ``cold`` the split's held-out items ranked among themselves (the other split's held-out items are not
   candidates), ``all`` every item ranked for every target of the split (held-out and warm together, training
   items masked), ``warm`` the trained items and their targets (what the same model scores on the warm view).
   Validation (early stopping, model selection) ranks ``cold.target`` (default ``cold``); the test split, read
   once, reports all three: the selected target's metrics under their plain names and every target's as
   ``cold_recall@20``, ``all_recall@20``, ``warm_recall@20``, ...

The rest of the loop (epochs, early stopping, checkpoints, tracking, registration) is the plain Trainer's.
``trained_model()`` serves the whole catalogue: a registered model of a cold-items run recommends the held-out
items from their content. Distributed training (``launchers/train.py``) refuses a cold-items split: its trainer
is the plain one (``dprec.data.dataset.check_trainable`` names the reason).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dprec.config import ConfigError
from dprec.data.dataset import (
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    Dataset,
    DatasetError,
    items_hash,
    items_prefix_hash,
    load_dataset,
    make_dataset,
)
from dprec.data.interactions import UserItemSets
from dprec.data.splits import COLD_META_KEY, HeldOutItems, held_out_items
from dprec.features.modalities import load_features
from dprec.features.reduction import Reduction, reduce_width
from dprec.models import MODELS
from dprec.models.cold import Neighbours, new_item_embeddings
from dprec.training.config import RunConfig
from dprec.training.loop import SPLITS, TrainedModel, Trainer
from dprec.training.metrics import evaluate_ranking, finalize

TARGETS = ("cold", "all", "warm")
WARM_VIEW_KEY = "warm_view_of"
"""``meta`` key of a warm view: the content hash of the cold-items dataset it was cut from."""


def cold_split_of(ds: Dataset) -> HeldOutItems | None:
    """The held-out items of a cold-items split (None for any other dataset), checked against its interactions:
    a held-out item with a training interaction, or with targets of the other split, is refused."""
    held = held_out_items(ds.meta, ds.n_items)
    if held is None:
        return None
    inter = ds.interactions
    where = f"dataset {ds.name!r}" + (f" ({ds.folder})" if ds.folder is not None else "")
    for split, items in ((SPLIT_VALID, held.valid), (SPLIT_TEST, held.test)):
        rows = inter[inter["item_idx"].isin(items)]
        wrong = rows[rows["split"] != split]
        if len(wrong):
            raise DatasetError(
                f"{where}: held-out item {int(wrong['item_idx'].iloc[0])} has an interaction labelled "
                f"{int(wrong['split'].iloc[0])} (every interaction of a held-out item is a target of its split); "
                "prepare the dataset again"
            )
    return held


def warm_view(ds: Dataset, held: HeldOutItems) -> tuple[Dataset, np.ndarray]:
    """(the dataset without the held-out items, re-indexed; the warm items' indices in ``ds``, ascending)."""
    warm_items = np.setdiff1d(np.arange(ds.n_items), held.all)
    new_index = np.full(ds.n_items, -1, dtype=np.int64)
    new_index[warm_items] = np.arange(len(warm_items))
    inter = ds.interactions[new_index[ds.interactions["item_idx"].to_numpy()] >= 0].copy()
    inter["item_idx"] = new_index[inter["item_idx"].to_numpy()]
    items = ds.items.iloc[warm_items].copy()
    items["item_idx"] = np.arange(len(warm_items))
    meta = {k: v for k, v in ds.meta.items() if k not in (COLD_META_KEY, "files", "content_hash")}
    meta[WARM_VIEW_KEY] = ds.meta.get("content_hash", "")
    view = make_dataset(ds.name, inter, items, ds.users, meta)
    view.folder = ds.folder
    return view, warm_items


class ColdStartTrainer(Trainer):
    """The Trainer on the warm view of a cold-items split, evaluated on the held-out items (module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        ds: Dataset | None = None,
        features: dict[str, np.ndarray] | None = None,
        **kwargs: Any,
    ):
        full = ds if ds is not None else load_dataset(cfg.dataset)
        held = cold_split_of(full)
        if held is None:
            raise DatasetError(f"dataset {full.name!r} is not a cold-items split (prepare it with --split cold-items)")
        few = {name: len(held.of(label)) for name, label in (("valid", SPLIT_VALID), ("test", SPLIT_TEST))}
        few = {name: n for name, n in few.items() if n < max(cfg.train.ks)}
        if few:
            raise DatasetError(
                f"dataset {full.name!r}: the cold ranking of a split ranks its held-out items, and "
                + ", ".join(f"{name} has {n}" for name, n in few.items())
                + f", fewer than the largest cut-off K={max(cfg.train.ks)}; hold out more items (--cold-share) "
                "or lower train.ks"
            )
        self.full, self.held = full, held
        view, self.warm_items = warm_view(full, held)
        manifests: dict[str, Any] = {}
        if features is None and cfg.features:
            features, manifests = load_features(cfg.features, full)
        self.raw_features = {m: np.asarray(f, dtype=np.float32) for m, f in (features or {}).items()}
        if cfg.cold.embedding == "knn" and not self.raw_features:
            raise ConfigError(
                "cold.embedding 'knn' embeds the held-out items from their features, and this run names none "
                "(features: in the run config); name the feature folders, or set cold.embedding=random"
            )
        warm = {m: f[self.warm_items] for m, f in self.raw_features.items()}
        self.reductions: dict[str, Reduction] = {}
        if warm and cfg.train.feature_rank and MODELS[cfg.model["name"]][0].uses_features:
            for m, f in warm.items():  # fitted on the trained items alone, applied to the held-out ones
                warm[m], self.reductions[m] = reduce_width(f, cfg.train.feature_rank)
        super().__init__(cfg, view, warm or None, **kwargs)
        self.feature_manifests = manifests
        n_u, n_i = full.n_users, full.n_items
        self.full_train = UserItemSets.from_pairs(*full.pairs(SPLIT_TRAIN), n_u, n_i)
        self.full_truth = {name: UserItemSets.from_pairs(*full.pairs(SPLITS[name]), n_u, n_i) for name in self.truth}
        self.neighbours = None
        if cfg.cold.embedding == "knn" and self.raw_features:  # the features are fixed: found once, not per epoch
            raw, _ = self.new_item_features(held.all)
            self.neighbours = Neighbours.of(
                {m: f[self.warm_items] for m, f in self.raw_features.items()}, raw, cfg.cold.neighbours
            )

    def new_item_features(self, items: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(raw, model view) feature rows of catalogue items ``items`` (the model view: reduced as the warm rows)."""
        raw = {m: f[items] for m, f in self.raw_features.items()}
        return raw, {m: self.reductions[m].apply(f) if m in self.reductions else f for m, f in raw.items()}

    def catalogue_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, every catalogue item) final embeddings: warm rows the model's, held-out rows from content."""
        self.model.eval()
        with torch.no_grad():
            users, warm = self.model.final_embeddings()
        users, warm = users.detach().float().cpu(), warm.detach().float().cpu()
        cold = self.held.all
        _, model_view = self.new_item_features(cold)
        cold_rows = new_item_embeddings(
            self.model,
            warm,
            self.neighbours,
            model_view,
            n_new=len(cold),
            embedding=self.cfg.cold.embedding,
            own_content=self.cfg.cold.own_content,
            seed=self.cfg.train.seed,
        )
        items = torch.empty((self.full.n_items, warm.shape[1]), dtype=torch.float32)
        items[torch.from_numpy(self.warm_items)] = warm
        items[torch.from_numpy(cold)] = cold_rows
        return users, items

    def target_sums(
        self, target: str, split: str, users_emb: torch.Tensor, items_emb: torch.Tensor, chunk_size: int | None
    ) -> dict[str, float]:
        """Metric sums of ``target`` on ``split`` (this rank's share of the users, added over ranks)."""
        if target == "cold":
            candidates = self.held.of(SPLITS[split])
            full_truth = self.full_truth[split]
            local = np.full(self.full.n_items, -1, dtype=np.int64)
            local[candidates] = np.arange(len(candidates))
            rows, cols = full_truth.rows_cols(np.arange(full_truth.n_users))
            keep = local[cols] >= 0
            truth = UserItemSets.from_pairs(rows[keep], local[cols[keep]], full_truth.n_users, len(candidates))
            mask = UserItemSets.from_pairs(np.empty(0, np.int64), np.empty(0, np.int64), truth.n_users, len(candidates))
        elif target == "warm":
            candidates, truth, mask = self.warm_items, self.truth[split], self.train_sets
        else:
            candidates, truth, mask = np.arange(self.full.n_items), self.full_truth[split], self.full_train
        scored = items_emb[torch.from_numpy(candidates)]
        users = truth.users_with_items()
        sums = evaluate_ranking(
            lambda u: users_emb[u] @ scored.T,
            truth,
            mask,
            ks=self.cfg.train.ks,
            chunk_size=chunk_size or self.cfg.train.eval_chunk_size,
            users=users[self.rank :: self.world],
            factors=(users_emb, scored),
        )
        return self.reduce_sums(sums)

    def evaluate(self, split: str, users: np.ndarray | None = None, chunk_size: int | None = None) -> dict[str, float]:
        """Validation: the metrics of ``cold.target``; test: those, and every target's under ``<target>_<metric>``."""
        if users is not None:
            raise ValueError("the cold-start evaluation ranks every user with targets; it takes no user subset")
        users_emb, items_emb = self.catalogue_embeddings()
        chosen = self.cfg.cold.target
        targets = [chosen] if split != "test" else [chosen, *(t for t in TARGETS if t != chosen)]
        out: dict[str, float] = {}
        for target in targets:
            metrics = finalize(self.target_sums(target, split, users_emb, items_emb, chunk_size))
            if target == chosen:
                out.update(metrics)
            if split == "test":
                out.update({f"{target}_{k}": v for k, v in metrics.items()})
        return out

    def trained_model(self) -> TrainedModel:
        """The whole catalogue for serving: the held-out items embedded from content, in the dataset's indices."""
        users, items = self.catalogue_embeddings()
        return self.serving_form(users, items, self.full, self.full_train)


def make_trainer(
    cfg: RunConfig, ds: Dataset | None = None, features: dict[str, np.ndarray] | None = None, **kwargs: Any
) -> Trainer:
    """The trainer for ``cfg``'s dataset: :class:`ColdStartTrainer` for a cold-items split, else the plain one."""
    ds = ds if ds is not None else load_dataset(cfg.dataset)
    if held_out_items(ds.meta, ds.n_items) is not None:
        return ColdStartTrainer(cfg, ds, features, **kwargs)
    return Trainer(cfg, ds, features, **kwargs)


def grown_catalogue(trainer: Trainer, grown: Dataset) -> TrainedModel:
    """The trainer's model serving ``grown``'s catalogue: the run's items as trained, then the items ``grown``
    added (``prepare add-items``) embedded from their content like held-out items (``cfg.cold``), no training.

    ``grown`` must extend the run's catalogue (its first items and every user and interaction unchanged) and its
    feature folders must hold the new items (``python -m dprec.extract`` on ``grown``: only their shards are new).
    """
    trained = trainer.trained_model()
    catalogue = trainer.full if isinstance(trainer, ColdStartTrainer) else trainer.ds
    n_old = catalogue.n_items
    where = f"dataset {grown.name!r}" + (f" ({grown.folder})" if grown.folder is not None else "")
    if grown.n_items <= n_old or items_prefix_hash(grown, n_old) != items_hash(catalogue):
        raise DatasetError(
            f"{where}: does not extend the catalogue of the run ({n_old} items of {catalogue.name!r}, it has "
            f"{grown.n_items}); make it with python -m dprec.prepare add-items --dataset <the run's dataset>"
        )
    if grown.users["user_id"].astype(str).tolist() != trained.user_ids:
        raise DatasetError(f"{where}: its users differ from the run's; only items may be added")
    cfg = trainer.cfg
    if not cfg.features:
        raise DatasetError("the run has no item features (features: in its config); new items need content")
    raw, _ = load_features(cfg.features, grown)
    raw = {m: np.asarray(f, dtype=np.float32) for m, f in raw.items()}
    if isinstance(trainer, ColdStartTrainer):
        trained_rows, reductions = trainer.warm_items, trainer.reductions
    else:
        trained_rows, reductions = np.arange(n_old), {}
        if cfg.train.feature_rank and MODELS[cfg.model["name"]][0].uses_features:
            reductions = {m: reduce_width(f[:n_old], cfg.train.feature_rank)[1] for m, f in raw.items()}
    new = {m: f[n_old:] for m, f in raw.items()}
    model_view = {m: reductions[m].apply(f) if m in reductions else f for m, f in new.items()}
    neighbours = None
    if cfg.cold.embedding == "knn":
        neighbours = Neighbours.of({m: f[trained_rows] for m, f in raw.items()}, new, cfg.cold.neighbours)
    trainer.model.eval()
    rows = new_item_embeddings(
        trainer.model,
        trained.item_embeddings[torch.from_numpy(trained_rows)],
        neighbours,
        model_view,
        n_new=grown.n_items - n_old,
        embedding=cfg.cold.embedding,
        own_content=cfg.cold.own_content,
        seed=cfg.train.seed,
    )
    sets = trained.train_sets
    return TrainedModel(
        user_embeddings=trained.user_embeddings,
        item_embeddings=torch.cat([trained.item_embeddings, rows]).contiguous(),
        train_sets=UserItemSets(sets.indptr, sets.indices, grown.n_items),
        user_ids=trained.user_ids,
        item_ids=grown.items["item_id"].astype(str).tolist(),
        dataset_name=trained.dataset_name,
        dataset_hash=grown.meta.get("content_hash", ""),
        model_section=trained.model_section,
    )
