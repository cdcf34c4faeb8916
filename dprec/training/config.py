"""The run config: which data, which features, which model, how to train, where to write.

A run config is YAML (e.g. ``configs/default/lightgcn.yaml``) read into :class:`RunConfig` by
:func:`load_config`, with ``--set a.b=value`` overrides laid over it (:func:`dprec.config.merge`,
:func:`dprec.config.parse_overrides`). :func:`dprec.config.from_dict` refuses unknown keys and
checks every value against its annotation (allowed values are ``Literal`` types); range checks
live in ``__post_init__``. The ``model`` section is validated against the chosen model's config
class (``dprec.models.MODELS``) when the config is loaded, before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dprec.config import check_types, from_dict, load_yaml, merge, parse_overrides, to_dict
from dprec.models import MODELS
from dprec.models.base import Recommender
from dprec.training.metrics import DEFAULT_KS

MAX_THREADS = 1024
"""Largest ``train.threads`` (torch crashes on absurd counts: 100000 threads is a segmentation fault)."""
MAX_SEED = 2**32 - 1
"""Largest ``train.seed``: numpy's legacy seed range (``torch.manual_seed(seed * 100003 + epoch)`` stays in range too)."""


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings (MMRec's defaults)."""

    epochs: int = 1000
    """Upper bound on epochs; early stopping usually ends the run sooner."""
    batch_size: int | None = None
    """Positive pairs per step (each with one sampled negative); None = the model's default (its class's
    ``train_defaults``: 8,192 for DPRec, MGCN and LGMRec, whose epochs are full-graph passes, else MMRec's 2,048)."""
    lr: float | None = None
    """Adam learning rate; None = the model's default (``train_defaults``: 1e-3, MMRec's; scaled with the batch
    for the models that train at 8,192)."""
    lr_decay: float = 1.0
    """Step decay: the learning rate of epoch e is lr * lr_decay ** (e // lr_decay_every) (MGCN: 0.96 per 50)."""
    lr_decay_every: int = 50
    seed: int = 2024
    """Seeds model initialisation and every epoch's shuffling and negative sampling (0 to 2**32 - 1)."""
    patience: int = 20
    """Evaluations without a better validation Recall@20 before stopping."""
    eval_every: int = 1
    """Epochs between validation evaluations."""
    ks: tuple[int, ...] = DEFAULT_KS
    """Cut-offs of the reported metrics, each K >= 1 and at most the number of items; 20 must be among them
    (model selection)."""
    eval_chunk_size: int = 2048
    """Users scored at once during evaluation."""
    graph_backend: Literal["dgl", "torch"] = "dgl"
    """Graph implementation: "dgl" or "torch" (torch.sparse)."""
    threads: int = 0
    """torch intra-op threads (at most 1024); 0 keeps torch's default."""
    feature_rank: int | None = None
    """Feature views wider than this are reduced at load to their top ``feature_rank`` right-singular directions
    (uncentred truncated SVD, dprec.features.reduction; exact when it is >= the view's rank); 0 keeps raw widths;
    None = the model's default (``train_defaults``: 256 for DPRec, MGCN and LGMRec, else 0)."""

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"train.lr_decay must lie in (0, 1], got {self.lr_decay}")
        for name in ("epochs", "batch_size", "patience", "eval_every", "eval_chunk_size", "lr_decay_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"train.seed must be an integer in [0, {MAX_SEED}], got {self.seed}")
        if self.feature_rank is not None and self.feature_rank < 0:
            raise ValueError(f"train.feature_rank must be >= 0 (0 keeps raw widths), got {self.feature_rank}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(
                f"train.threads must be an integer in [0, {MAX_THREADS}] (0 keeps torch's default), got {self.threads}"
            )
        bad = [k for k in self.ks if k <= 0]
        if bad:
            raise ValueError(f"train.ks must hold positive cut-offs K >= 1, got {list(self.ks)}")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"train.ks must not repeat a cut-off, got {list(self.ks)}")
        if 20 not in self.ks:
            raise ValueError(f"train.ks must contain 20 (model selection uses Recall@20), got {self.ks}")


ColdTarget = Literal["cold", "all", "warm"]


@dataclass
class ColdStartConfig:
    """Cold-start evaluation and the embeddings of items a model never trained on (docs/cold-start.md).

    Read on a dataset prepared with ``--split cold-items`` (the model trains on its warm items alone), and by
    ``python -m dprec.register add-items`` (new items of a grown catalogue)."""

    target: ColdTarget = "cold"
    """What validation (model selection, early stopping) ranks on a cold-items split: ``cold`` the held-out items
    of the split alone, ``all`` every item (held-out and warm targets together), ``warm`` the trained items and
    their targets. The test split reports all three (``cold_*``, ``all_*``, ``warm_*``)."""
    embedding: Literal["knn", "random"] = "knn"
    """A new item's embedding: ``knn`` the similarity-weighted mean of the final embeddings of its ``neighbours``
    most similar trained items (cosine of the features, mean over modalities), ``random`` a seeded random vector
    with the trained items' per-dimension mean and spread (what an ID embedding without training is; for
    popularity a random count, so the new items come in a random order)."""
    neighbours: int = 20
    """Trained items whose embeddings a new item's ``knn`` embedding averages."""
    own_content: bool = True
    """Add the model's own view of the item's content where it has one: content-kNN's item vector (which then
    replaces the kNN mean), DPRec's projections (beta times the sum over modalities of the normalised projection,
    centred by the trained items' mean). No effect on the other models."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.neighbours < 1:
            raise ValueError(f"cold.neighbours must be a positive integer, got {self.neighbours}")


@dataclass
class RunConfig:
    """A whole training run: which data, which model, how to train, where to write."""

    dataset: str = ""
    """Canonical dataset folder (written by python -m dprec.prepare)."""
    out: str = "runs/default"
    """Run folder: resolved config, best model state and metrics are written here."""
    features: dict[str, str] = field(default_factory=dict)
    """Item feature modalities: ``name: <shard folder>`` or ``name: <shard folder>#<modality>`` (the
    modality defaults to the name), e.g. ``text: data_shards/default/llm``. Empty = IDs only."""
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lightgcn"})
    """``name`` picks the model (see dprec.models.MODELS, default lightgcn); other keys are its hyper-parameters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    cold: ColdStartConfig = field(default_factory=ColdStartConfig)
    """Cold-start evaluation and new items' embeddings; read on a cold-items split (docs/cold-start.md)."""

    def __post_init__(self) -> None:
        check_types(self)
        if not self.dataset:
            raise ValueError("dataset: a dataset folder is required")
        if not self.out.strip():
            raise ValueError("out: a run folder is required (got an empty string)")
        self.model = {"name": "lightgcn", **self.model}
        name = self.model["name"]
        if name not in MODELS:
            raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
        defaults = {**Recommender.train_defaults, **MODELS[name][0].train_defaults}
        for key, value in defaults.items():  # train settings left open take the model's
            if getattr(self.train, key) is None:
                setattr(self.train, key, value)

    def model_config(self):
        _, cfg_cls = MODELS[self.model["name"]]
        params = {k: v for k, v in self.model.items() if k != "name"}
        where = f"model ({self.model['name']})"
        return from_dict(cfg_cls, params, where)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "out": self.out,
            "features": dict(self.features),
            "model": dict(self.model),
            "train": to_dict(self.train),
            "cold": to_dict(self.cold),
        }


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The run config of YAML file ``path`` (or none) with ``key.sub=value`` ``overrides`` laid over it."""
    data = load_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RunConfig, data, str(path or "config"))
    cfg.model_config()  # validate the model section now, not after the data is loaded
    return cfg
