"""Train a recommender on a canonical dataset folder, select on validation, report test once.

One process::

    python -m dprec.train --config configs/lightgcn.yaml [--set train.epochs=5 model.n_layers=3]

Multi-process and multi-node training goes through ``deepspeed launchers/train.py`` and
reuses this module's pieces (sampling, evaluation, early stopping).

The loop: every epoch shuffles the training pairs with a generator seeded by (seed, epoch),
draws one uniform negative per positive among the items the user has not trained on, and
takes Adam steps on BPR (+ the model's regulariser). Every ``eval_every`` epochs it ranks
all items for the validation users; early stopping watches validation Recall@20 with
``patience`` evaluations. At the end the best validation state is restored and the test
split is evaluated exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dprec.config import ConfigError, from_dict, load_yaml, to_dict
from dprec.data.dataset import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Dataset, load_dataset
from dprec.evaluate import DEFAULT_KS, UserItemSets, evaluate_ranking, finalize, format_metrics
from dprec.models import MODELS, ModelContext, Recommender

SPLITS = {"train": SPLIT_TRAIN, "valid": SPLIT_VALID, "test": SPLIT_TEST}


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings (MMRec's defaults)."""

    epochs: int = 1000
    """Upper bound on epochs; early stopping usually ends the run sooner."""
    batch_size: int = 2048
    """Positive pairs per step (each with one sampled negative)."""
    lr: float = 1e-3
    """Adam learning rate."""
    lr_decay: float = 1.0
    """Step decay: the learning rate of epoch e is lr * lr_decay ** (e // lr_decay_every) (MGCN: 0.96 per 50)."""
    lr_decay_every: int = 50
    seed: int = 2024
    """Seeds model initialisation and every epoch's shuffling and negative sampling."""
    patience: int = 20
    """Evaluations without a better validation Recall@20 before stopping."""
    eval_every: int = 1
    """Epochs between validation evaluations."""
    ks: tuple[int, ...] = DEFAULT_KS
    """Cut-offs of the reported metrics; 20 must be among them (model selection)."""
    eval_chunk_size: int = 2048
    """Users scored at once during evaluation."""
    graph_backend: str = "dgl"
    """Graph implementation: "dgl" or "torch" (torch.sparse)."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"train.lr_decay must lie in (0, 1], got {self.lr_decay}")
        for name in ("epochs", "batch_size", "patience", "eval_every", "eval_chunk_size", "lr_decay_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if 20 not in self.ks:
            raise ValueError(f"train.ks must contain 20 (model selection uses Recall@20), got {self.ks}")
        if self.graph_backend not in ("dgl", "torch"):
            raise ValueError(f"train.graph_backend must be 'dgl' or 'torch', got {self.graph_backend!r}")


@dataclass
class RunConfig:
    """A whole training run: which data, which model, how to train, where to write."""

    dataset: str = ""
    """Canonical dataset folder (written by python -m dprec.prepare)."""
    out: str = "runs/default"
    """Run folder: resolved config, best model state and metrics are written here."""
    features: dict[str, str] = field(default_factory=dict)
    """Item feature views: ``name: <shard folder>`` or ``name: <shard folder>#<modality>`` (the
    modality defaults to the name), e.g. ``text: data_shards/default/llm``. Empty = IDs only."""
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lightgcn"})
    """``name`` picks the model (see dprec.models.MODELS, default lightgcn); other keys are its hyper-parameters."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("dataset: a dataset folder is required")
        self.model = {"name": "lightgcn", **self.model}
        name = self.model["name"]
        if name not in MODELS:
            raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")

    def model_config(self):
        _, cfg_cls = MODELS[self.model["name"]]
        params = {k: v for k, v in self.model.items() if k != "name"}
        return from_dict(cfg_cls, params, f"model ({self.model['name']})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "out": self.out,
            "features": dict(self.features),
            "model": dict(self.model),
            "train": to_dict(self.train),
        }


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``a.b=value`` strings -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = load_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RunConfig, data, str(path or "config"))
    cfg.model_config()  # validate the model section now, not after the data is loaded
    return cfg


class NegativeSampler:
    """One uniform negative per positive, drawn among the items the user has not trained on."""

    def __init__(self, train: UserItemSets, max_rounds: int = 100) -> None:
        self.train = train
        self.max_rounds = max_rounds
        full = np.flatnonzero(train.sizes() >= train.n_items)
        if len(full):
            raise ValueError(f"user {full[0]} has trained on every item; no negative can be drawn")

    def sample(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        neg = rng.integers(0, self.train.n_items, size=len(users))
        todo = np.flatnonzero(self.train.contains(users, neg))
        for _ in range(self.max_rounds):
            if not len(todo):
                return neg
            neg[todo] = rng.integers(0, self.train.n_items, size=len(todo))
            todo = todo[self.train.contains(users[todo], neg[todo])]
        raise RuntimeError(f"negative sampling did not converge for {len(todo)} pairs")


def load_features(specs: dict[str, str], ds: Dataset) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read the configured feature views from their shards (manifest and dataset hash checked).

    Returns ({view: (n_items x d) float32}, {folder: manifest}).
    """
    from dprec.features.shards import load_manifest, read_features

    read: dict[str, dict[str, np.ndarray]] = {}
    views: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        folder, _, modality = spec.partition("#")
        modality = modality or name
        if folder not in read:
            read[folder] = read_features(folder, ds)
        if modality not in read[folder] or read[folder][modality].ndim != 2:
            have = sorted(k for k, v in read[folder].items() if getattr(v, "ndim", 0) == 2)
            raise ConfigError(f"features.{name}: {folder} has no modality {modality!r} (it has {have})")
        views[name] = read[folder][modality]
    return views, {folder: load_manifest(folder) for folder in read}


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def build_model(cfg: RunConfig, ds: Dataset, features: dict[str, np.ndarray] | None = None) -> Recommender:
    users, items = ds.pairs(SPLIT_TRAIN)
    ctx = ModelContext(
        n_users=ds.n_users,
        n_items=ds.n_items,
        train_users=users,
        train_items=items,
        graph_backend=cfg.train.graph_backend,
        features=features or {},
    )
    model_cls, _ = MODELS[cfg.model["name"]]
    return model_cls(cfg.model_config(), ctx)


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


class Trainer:
    """The training loop. One process by default; ``dprec.distributed`` subclasses it for DeepSpeed.

    Hooks a subclass overrides: ``step(loss)`` (backward + optimiser step), ``reduce_sums(sums)``
    (add evaluation sums over ranks), ``on_epoch_end(state, improved)`` (checkpoints, tracking).
    """

    rank = 0
    world = 1
    device = torch.device("cpu")
    tracker = None
    """A ``dprec.tracking.RunTracker`` (or None): per-epoch rows are logged to it."""

    def __init__(self, cfg: RunConfig, ds: Dataset | None = None, features: dict[str, np.ndarray] | None = None):
        self.cfg = cfg
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.ds = ds if ds is not None else load_dataset(cfg.dataset)
        self.feature_manifests: dict[str, Any] = {}
        if features is None and cfg.features:
            features, self.feature_manifests = load_features(cfg.features, self.ds)
        set_seed(cfg.train.seed)
        self.train_users, self.train_items = self.ds.pairs(SPLIT_TRAIN)
        n_u, n_i = self.ds.n_users, self.ds.n_items
        self.train_sets = UserItemSets.from_pairs(self.train_users, self.train_items, n_u, n_i)
        self.truth = {
            name: UserItemSets.from_pairs(*self.ds.pairs(label), n_u, n_i)
            for name, label in SPLITS.items()
            if name != "train"
        }
        self.model = build_model(cfg, self.ds, features)
        self.sampler = NegativeSampler(self.train_sets)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.optimizer = self.make_optimizer() if self.trainable else None

    @property
    def trainable(self) -> bool:
        return self.model.trainable and any(p.requires_grad for p in self.model.parameters())

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.train.lr)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def on_epoch_end(self, state: FitState, improved: bool) -> None:
        """Called after every epoch (after validation, if any)."""
        if self.tracker is not None:
            self.tracker.log_epoch(state.history[-1], step=state.next_epoch - 1)

    def log(self, line: str) -> None:
        print(line, flush=True)

    def epoch_batches(self, epoch: int, rank: int = 0, world: int = 1):
        """This rank's (users, pos, neg, share) batches of one epoch; every rank gets the same number of steps.

        The permutation and negatives depend only on (seed, epoch): the global batch b holds
        pairs [b*B, (b+1)*B) of the permutation, and rank r takes the r-th contiguous part.
        ``share`` = world * local size / global size: scaling each rank's mean loss by it makes
        the average over ranks (what data-parallel all-reduce computes) equal the global mean.
        """
        rng = np.random.default_rng((self.cfg.train.seed, epoch))
        perm = rng.permutation(len(self.train_users))
        users, pos = self.train_users[perm], self.train_items[perm]
        neg = self.sampler.sample(users, rng)
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
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.epoch_lr(epoch)
        # Model-side randomness (dropout, Gumbel noise) is reseeded per epoch, so a resumed run
        # draws exactly what an uninterrupted one draws.
        torch.manual_seed(self.cfg.train.seed * 100_003 + epoch)
        totals: dict[str, float] = {}
        steps = 0
        for users, pos, neg, share in self.epoch_batches(epoch, self.rank, self.world):
            if len(users):
                loss, parts = self.model.calculate_loss(users, pos, neg)
                loss = loss * share
            else:  # this rank's part of a tiny last batch is empty; it still joins the all-reduce
                loss, parts = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0, {}
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: loss is {float(loss)}; lower train.lr or check the features")
            self.step(loss)
            steps += 1
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
        # Share-scaled rank losses average to the global batch loss.
        return {k: v / max(steps, 1) / self.world for k, v in self.reduce_sums(totals).items()}

    def evaluate(self, split: str, users: np.ndarray | None = None, chunk_size: int | None = None) -> dict[str, float]:
        """Metric sums (with ``n_users``) over this rank's share of ``users`` (default: all with truth),
        added over ranks by ``reduce_sums``."""
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
        )
        return self.reduce_sums(sums)

    def fit(self, log=None, state: FitState | None = None) -> dict[str, Any]:
        """Train with early stopping (from ``state`` when resuming); returns history, best epoch,
        best validation and test metrics. The test split is evaluated once, at the end."""
        log = log or self.log
        tc = self.cfg.train
        state = state or FitState()
        epochs = tc.epochs if self.optimizer is not None else 1
        while state.next_epoch < epochs and not state.stopped:
            epoch = state.next_epoch
            t0 = time.perf_counter()
            losses = self.train_epoch(epoch) if self.optimizer is not None else {}
            row: dict[str, Any] = {"epoch": epoch, **losses, "train_seconds": time.perf_counter() - t0}
            improved = False
            if (epoch + 1) % tc.eval_every == 0 or epoch == epochs - 1:
                t1 = time.perf_counter()
                valid = finalize(self.evaluate("valid"))
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
            self.on_epoch_end(state, improved)
        self.model.load_state_dict(self.best_state)
        test = finalize(self.evaluate("test"))
        log(f"best epoch {state.best_epoch}  test {format_metrics(test)}")
        return {"history": state.history, "best_epoch": state.best_epoch, "valid": state.best_valid, "test": test}


def save_run(trainer: Trainer, result: dict[str, Any], out: str | Path) -> Path:
    """Write config.yaml, model.pt (state dict, tensors only) and metrics.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(trainer.cfg.as_dict(), sort_keys=False), encoding="utf-8")
    torch.save(trainer.model.state_dict(), out / "model.pt")
    meta = {"dataset_hash": trainer.ds.meta.get("content_hash"), **{k: v for k, v in result.items()}}
    (out / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_run(folder: str | Path) -> Trainer:
    """A trainer with the best model of a saved run loaded (for evaluation)."""
    folder = Path(folder)
    cfg = load_config(folder / "config.yaml")
    trainer = Trainer(cfg)
    saved = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("dataset_hash")
    if saved != trainer.ds.meta.get("content_hash"):
        raise ValueError(f"{folder}: the dataset {cfg.dataset} changed since this run was trained")
    trainer.model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    trainer.evaluate = _finalizing(trainer.evaluate)
    return trainer


def _finalizing(evaluate):
    return lambda split, **kw: finalize(evaluate(split, **kw))


def tracked_fit(
    trainer: Trainer,
    state: FitState | None = None,
    resume_run_id: str | None = None,
    register: bool = True,
    deepspeed_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``fit`` inside an MLflow run (rank 0 writes): config, curves, test metrics, model registration.

    Returns the fit result with ``tracking_run_id`` and, when registered, ``registration``
    (name, version, alias, champion, model_uri).
    """
    from dprec.tracking import RunTracker

    tracker = RunTracker(enabled=trainer.rank == 0)
    trainer.tracker = tracker
    tracker.start(
        trainer.cfg.as_dict(),
        run_name=trainer.cfg.model["name"],
        experiment=f"dprec-{trainer.ds.name}",
        resume_run_id=resume_run_id,
        deepspeed_config=deepspeed_config,
        feature_manifest=trainer.feature_manifests or None,
    )
    try:
        result = trainer.fit(state=state)
        tracker.log_test(result["test"], result["best_epoch"], valid=result["valid"])
        registration = tracker.register(trainer, result) if register else None
    except BaseException:
        tracker.finish(state.history if state else [], status="FAILED")
        raise
    tracker.finish(result["history"])
    result["tracking_run_id"] = tracker.run_id
    if registration is not None:
        result["registration"] = {
            k: getattr(registration, k) for k in ("name", "version", "alias", "champion", "model_uri")
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="YAML run config (dataset, out, model, train)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. train.epochs=5"
    )
    parser.add_argument("--no-register", action="store_true", help="track the run but do not register the model")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg)
    result = tracked_fit(trainer, register=not args.no_register)
    out = save_run(trainer, result, cfg.out)
    print(
        json.dumps(
            {
                "run": str(out),
                "best_epoch": result["best_epoch"],
                "test": result["test"],
                "registration": result.get("registration"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
