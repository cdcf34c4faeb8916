"""The training loop: BPR with sampled negatives, full-ranking validation, early stopping, one test read.

Every epoch shuffles the training pairs with a generator seeded by (seed, epoch), draws one
uniform negative per positive (:class:`~dprec.training.sampler.NegativeSampler`) and takes Adam
steps on BPR + the model's regulariser, at lr * lr_decay ** (epoch // lr_decay_every). Every
``eval_every`` epochs the validation users are ranked over all items; early stopping watches
validation Recall@20 with ``patience`` evaluations. At the end the best validation state is
restored and the test split is evaluated exactly once (DESIGN §4). Because shuffling, negatives
and model noise are functions of (seed, epoch), a resumed fit reproduces an uninterrupted one.

:class:`Trainer` runs in one process; :class:`dprec.training.distributed.DeepSpeedTrainer`
overrides its hooks (``make_optimizer``, ``step``, ``reduce_sums``, ``check_loss``, ``on_epoch_end``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dprec.config import ConfigError, DPRecError
from dprec.data.dataset import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Dataset, check_trainable, load_dataset
from dprec.data.interactions import UserItemSets
from dprec.features.modalities import load_features
from dprec.features.reduction import reduce_width
from dprec.graph import resolve_backend
from dprec.models import MODELS, ModelContext, Recommender
from dprec.training.config import RunConfig
from dprec.training.metrics import evaluate_ranking, finalize, format_metrics
from dprec.training.sampler import NegativeSampler

SPLITS = {"train": SPLIT_TRAIN, "valid": SPLIT_VALID, "test": SPLIT_TEST}

EpochObserver = Callable[[dict[str, Any]], object]
"""Called with each epoch's history row (``epoch``, losses, timings, ``valid_*`` metrics) once it is complete."""


class TrainingDiverged(DPRecError, FloatingPointError):
    """The loss became NaN or infinite: the settings (learning rate, features) make training diverge."""


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def build_model(
    cfg: RunConfig, ds: Dataset, features: dict[str, np.ndarray] | None = None, device: torch.device | None = None
) -> Recommender:
    """The model of ``cfg`` for ``ds``, its graphs built with the backend that works on ``device``
    (``dprec.graph.resolve_backend``: DGL's CPU wheel on a GPU falls back to torch.sparse, logged once)."""
    users, items = ds.pairs(SPLIT_TRAIN)
    ctx = ModelContext(
        n_users=ds.n_users,
        n_items=ds.n_items,
        train_users=users,
        train_items=items,
        graph_backend=resolve_backend(cfg.train.graph_backend, device),
        features=features or {},
    )
    model_cls, _ = MODELS[cfg.model["name"]]
    model_cfg = cfg.model_config()
    try:
        return model_cls(model_cfg, ctx)
    except ValueError as exc:  # the model refuses its config for these data (no feature view, unknown modality ...)
        if isinstance(exc, DPRecError):
            raise
        raise ConfigError(f"model ({cfg.model['name']}): {exc}") from exc
    except (MemoryError, RuntimeError) as exc:  # torch's "can't allocate memory" for absurd sizes
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        raise ConfigError(
            f"model ({cfg.model['name']}): does not fit in memory for {ds.n_users} users and {ds.n_items} items "
            f"with {model_cfg} ({str(exc).strip().splitlines()[0] if str(exc).strip() else 'MemoryError'})"
        ) from exc


@dataclass
class FitState:
    """Everything the loop carries from epoch to epoch; a checkpoint stores it to resume."""

    next_epoch: int = 0
    best_epoch: int = -1
    best_recall: float = -math.inf
    best_valid: dict[str, float] | None = None
    waited: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    tracking_run_id: str | None = None
    """The MLflow run this fit logs into, if any: kept in checkpoints so that a resumed fit continues it."""


@dataclass(frozen=True)
class TrainedModel:
    """What serving needs of a fitted model: final embeddings, training items and the dataset's identity."""

    user_embeddings: torch.Tensor
    """(n_users x d) float32 on the CPU; score(u, i) = <user_embeddings[u], item_embeddings[i]>."""
    item_embeddings: torch.Tensor
    """(n_items x d) float32 on the CPU."""
    train_sets: UserItemSets
    """Each user's training items (masked when recommending; their counts are the popularity fallback)."""
    user_ids: list[str]
    """Original user IDs in index order."""
    item_ids: list[str]
    """Original item IDs in index order."""
    dataset_name: str
    dataset_hash: str
    model_section: dict[str, Any]
    """The run config's ``model`` section (name and hyper-parameters)."""


class Trainer:
    """The training loop in one process (``rank`` of ``world`` when a subclass runs it data-parallel).

    Construction has two steps: ``__init__`` loads the data and builds the model; ``build_optimizer``
    creates the optimiser (``fit`` and ``train_epoch`` call it; a subclass whose ``make_optimizer``
    needs its own attributes calls it at the end of its ``__init__``). Hooks a subclass overrides:
    ``make_optimizer()``, ``step(loss)`` (backward + optimiser step), ``reduce_sums(sums)`` (add
    sums over ranks), ``check_loss(loss, epoch)`` (stop on a diverged loss), ``on_epoch_end(state,
    improved)`` (checkpoints). Construction refuses, before anything is trained, a dataset without
    validation or test interactions or with fewer items than the largest K (``check_trainable``).
    """

    logger = logging.getLogger(__name__)
    """Where ``fit`` reports progress unless it is given ``log``."""

    def __init__(
        self,
        cfg: RunConfig,
        ds: Dataset | None = None,
        features: dict[str, np.ndarray] | None = None,
        *,
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
    ):
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.device = device if device is not None else torch.device("cpu")
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.ds = ds if ds is not None else load_dataset(cfg.dataset)
        check_trainable(
            self.ds, max(cfg.train.ks)
        )  # no valid / test rows, too few items: fail now, not at the first evaluation
        self.feature_manifests: dict[str, Any] = {}
        if features is None and cfg.features:
            features, self.feature_manifests = load_features(cfg.features, self.ds)
        if features and cfg.train.feature_rank and MODELS[cfg.model["name"]][0].uses_features:
            features = self.reduce_features(features, cfg.train.feature_rank)
        set_seed(cfg.train.seed)
        self.train_users, self.train_items = self.ds.pairs(SPLIT_TRAIN)
        n_u, n_i = self.ds.n_users, self.ds.n_items
        self.train_sets = UserItemSets.from_pairs(self.train_users, self.train_items, n_u, n_i)
        self.truth = {
            name: UserItemSets.from_pairs(*self.ds.pairs(label), n_u, n_i)
            for name, label in SPLITS.items()
            if name != "train"
        }
        self.model = build_model(cfg, self.ds, features, self.device)
        if self.device.type != "cpu":
            self.model.to_device(self.device)
        self.sampler = NegativeSampler(self.train_sets)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def reduce_features(self, features: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
        """Each view wider than ``rank`` reduced to ``rank`` dims (``train.feature_rank``), one log line per view."""
        out = {}
        for name, matrix in features.items():
            out[name], done = reduce_width(matrix, rank)
            if done.dim_out < done.dim_in:
                self.logger.info(
                    "feature view %s: %d -> %d dims (truncated SVD, %.1f %% of the energy kept)",
                    name,
                    done.dim_in,
                    done.dim_out,
                    100 * done.energy,
                )
        return out

    @property
    def trainable(self) -> bool:
        return self.model.trainable and any(p.requires_grad for p in self.model.parameters())

    def build_optimizer(self) -> None:
        """The second construction step: ``make_optimizer()`` once, when the model has trainable parameters."""
        if self.optimizer is None and self.trainable:
            self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.train.lr)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def check_loss(self, loss: torch.Tensor, epoch: int) -> None:
        """Raise :class:`TrainingDiverged` when the loss is NaN or infinite (before the optimiser step)."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"epoch {epoch}: the loss is {float(loss)}; training diverged (lower train.lr, currently "
                f"{self.cfg.train.lr}, or check the features)"
            )

    def on_epoch_end(self, state: FitState, improved: bool) -> None:
        """Called after every epoch (after validation, if any, and after the epoch observer)."""

    def epoch_batches(
        self, epoch: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """This rank's (users, pos, neg, share) batches of one epoch; every rank gets the same number of steps.

        The permutation and negatives depend only on (seed, epoch): the global batch b holds
        pairs [b*B, (b+1)*B) of the permutation, and rank r takes the r-th contiguous part.
        ``share`` = world * local size / global size: scaling each rank's mean loss by it makes
        the average over ranks (what data-parallel all-reduce computes) equal the global mean.
        """
        rng = np.random.default_rng((self.cfg.train.seed, epoch))
        perm = rng.permutation(len(self.train_users))
        users, pos = self.train_users[perm], self.train_items[perm]
        per_positive = self.model.negatives_per_positive()
        if per_positive == 1:
            neg = self.sampler.sample(users, rng)
        else:  # candidates for a model that picks among them (rows: the pairs; the same draws on every rank)
            neg = self.sampler.sample(np.repeat(users, per_positive), rng).reshape(len(users), per_positive)
        bs = self.cfg.train.batch_size
        for start in range(0, len(perm), bs):
            sl = slice(start, start + bs)
            global_n = len(users[sl])
            parts = np.array_split(np.arange(global_n), world)[rank]
            u, p, n = (torch.from_numpy(a[sl][parts]).to(self.device) for a in (users, pos, neg))
            yield u, p, n, world * len(parts) / global_n

    def epoch_lr(self, epoch: int) -> float:
        """The step-decayed learning rate of ``epoch`` (a function of the epoch alone, so resuming keeps it)."""
        tc = self.cfg.train
        return tc.lr * tc.lr_decay ** (epoch // tc.lr_decay_every)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of optimiser steps; returns the mean loss (and loss parts) over the global batches."""
        self.build_optimizer()
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.epoch_lr(epoch)
        # Model-side randomness (dropout, Gumbel noise) is reseeded per epoch, so a resumed run
        # draws exactly what an uninterrupted one draws.
        torch.manual_seed(self.cfg.train.seed * 100_003 + epoch)
        self.model.start_epoch(epoch, self.cfg.train.seed)
        totals: dict[str, float] = {}
        steps = 0
        for users, pos, neg, share in self.epoch_batches(epoch, self.rank, self.world):
            if len(users):
                loss, parts = self.model.calculate_loss(users, pos, neg)
                loss = loss * share
            else:  # this rank's part of a tiny last batch is empty; it still joins the all-reduce
                loss, parts = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0, {}
            self.check_loss(loss, epoch)
            self.step(loss)
            steps += 1
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
        # Share-scaled rank losses average to the global batch loss.
        return {k: v / max(steps, 1) / self.world for k, v in self.reduce_sums(totals).items()}

    def evaluation_sums(
        self, split: str, users: np.ndarray | None = None, chunk_size: int | None = None
    ) -> dict[str, float]:
        """Metric sums (with ``n_users``) of ``split`` over ``users`` (default: all with truth items).

        Each rank ranks its share of the users; the sums are added over ranks by ``reduce_sums``.
        """
        self.model.eval()
        self.model.prepare_eval()
        if users is None:
            users = self.truth[split].users_with_items()
        sums = evaluate_ranking(
            lambda u: self.model.full_sort_predict(u.to(self.device)),
            self.truth[split],
            self.train_sets,
            ks=self.cfg.train.ks,
            chunk_size=chunk_size or self.cfg.train.eval_chunk_size,
            users=users[self.rank :: self.world],
            factors=self.model.score_factors(),
        )
        return self.reduce_sums(sums)

    def evaluate(self, split: str, users: np.ndarray | None = None, chunk_size: int | None = None) -> dict[str, float]:
        """Metric means (``recall@K``, ``ndcg@K``, ``precision@K``) of ``split``: :meth:`evaluation_sums` finalized."""
        return finalize(self.evaluation_sums(split, users=users, chunk_size=chunk_size))

    def fit(
        self,
        log: Callable[[str], object] | None = None,
        state: FitState | None = None,
        observer: EpochObserver | None = None,
    ) -> dict[str, Any]:
        """Train with early stopping (from ``state`` when resuming); returns history, best epoch,
        best validation and test metrics. The test split is evaluated once, at the end.

        ``log`` receives the progress lines (default: ``self.logger.info``); ``observer`` each
        completed history row (e.g. an MLflow tracker's ``log_epoch``).
        """
        log = log or self.logger.info
        tc = self.cfg.train
        state = state or FitState()
        self.build_optimizer()
        epochs = tc.epochs if self.optimizer is not None else 1
        while state.next_epoch < epochs and not state.stopped:
            epoch = state.next_epoch
            t0 = time.perf_counter()
            losses = self.train_epoch(epoch) if self.optimizer is not None else {}
            row: dict[str, Any] = {"epoch": epoch, **losses, "train_seconds": time.perf_counter() - t0}
            improved = False
            if (epoch + 1) % tc.eval_every == 0 or epoch == epochs - 1:
                t1 = time.perf_counter()
                valid = self.evaluate("valid")
                row.update({f"valid_{k}": v for k, v in valid.items()}, eval_seconds=time.perf_counter() - t1)
                improved = valid["recall@20"] > state.best_recall
                if improved:
                    state.best_epoch, state.best_recall, state.best_valid, state.waited = (
                        epoch,
                        valid["recall@20"],
                        valid,
                        0,
                    )
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                else:
                    state.waited += 1
                log(
                    f"epoch {epoch:4d}  loss {losses.get('loss', float('nan')):.4f}  valid {format_metrics(valid)}  "
                    f"train {row['train_seconds']:.2f}s eval {row['eval_seconds']:.2f}s"
                )
            state.history.append(row)
            state.next_epoch = epoch + 1
            if state.waited >= tc.patience:
                log(f"early stop at epoch {epoch}: no better valid Recall@20 in {tc.patience} evaluations")
                state.stopped = True
            if observer is not None:
                observer(row)
            self.on_epoch_end(state, improved)
        self.model.load_state_dict(self.best_state)
        test = self.evaluate("test")
        log(f"best epoch {state.best_epoch}  test {format_metrics(test)}")
        return {"history": state.history, "best_epoch": state.best_epoch, "valid": state.best_valid, "test": test}

    def trained_model(self) -> TrainedModel:
        """The model as it is now (after ``fit``: its best validation state) in the form serving needs."""
        self.model.eval()
        with torch.no_grad():
            user, item = self.model.final_embeddings()
        return self.serving_form(user, item, self.ds, self.train_sets)

    def serving_form(
        self, user: torch.Tensor, item: torch.Tensor, ds: Dataset, train_sets: UserItemSets
    ) -> TrainedModel:
        """:class:`TrainedModel` of these embeddings over ``ds``'s users and items (float32, CPU)."""
        return TrainedModel(
            user_embeddings=user.detach().float().cpu().contiguous(),
            item_embeddings=item.detach().float().cpu().contiguous(),
            train_sets=train_sets,
            user_ids=ds.users["user_id"].astype(str).tolist(),
            item_ids=ds.items["item_id"].astype(str).tolist(),
            dataset_name=ds.name,
            dataset_hash=ds.meta.get("content_hash", ""),
            model_section=self.cfg.as_dict()["model"],
        )
