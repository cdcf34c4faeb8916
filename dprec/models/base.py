"""The model contract every recommender in ``dprec.models`` follows (after MMRec).

- ``calculate_loss(users, pos, neg)`` -> (scalar loss, {part: float}) for one BPR batch;
- ``final_embeddings()`` -> (user matrix, item matrix) whose inner products are the scores:
  every model here scores by a dot product, which is what the registry exports and serves;
- ``full_sort_predict(users)`` -> (len(users) x n_items) scores, from the embeddings cached by
  ``prepare_eval()`` (one full-graph propagation per evaluation, not per chunk);
- ``trainable`` is False for models that only count (popularity): the trainer skips the
  optimisation loop for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn


@dataclass
class ModelContext:
    """What a model may know about the data: sizes, training pairs and item features."""

    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    graph_backend: str = "dgl"
    features: dict[str, np.ndarray] = field(default_factory=dict)
    device: str = "cpu"


class Recommender(nn.Module, ABC):
    train_defaults: ClassVar[dict[str, int | float]] = {"batch_size": 2048, "feature_rank": 0, "lr": 1e-3}
    """The model's values of the train settings a run config leaves open (None): MMRec's batch, raw widths and
    learning rate."""
    trainable = True
    uses_features = True
    """False for models that never read item features (ID-only), so callers can skip loading them."""

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        self.n_users = ctx.n_users
        self.n_items = ctx.n_items

    def calculate_loss(
        self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise TypeError(f"{type(self).__name__} has no training loss (trainable = False)")

    def negatives_per_positive(self) -> int:
        """How many sampled negatives the trainer draws for each positive: 1 gives ``calculate_loss`` a vector of
        negatives, more a (batch x this) matrix of candidates (all among the items the user has not trained on)."""
        return 1

    def start_epoch(self, epoch: int, seed: int) -> None:
        """Called by the trainer before each training epoch; a model that resamples a structure per epoch
        (FREEDOM's pruned graph) does it here, from (seed, epoch) alone."""

    def to_device(self, device: torch.device) -> Recommender:
        """Move parameters, buffers and the graphs the model holds (which are not modules)."""
        from dprec.graph import PropagationGraph

        self.to(device)
        for name, value in list(vars(self).items()):
            if isinstance(value, PropagationGraph):
                setattr(self, name, value.to(device))
            elif isinstance(value, dict) and any(isinstance(v, PropagationGraph) for v in value.values()):
                setattr(
                    self, name, {k: v.to(device) if isinstance(v, PropagationGraph) else v for k, v in value.items()}
                )
        return self

    @abstractmethod
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_users x d, n_items x d) embeddings; score(u, i) = <user[u], item[i]>."""

    def prepare_eval(self) -> None:
        """Cache the final embeddings; called once before each evaluation."""
        with torch.no_grad():
            self._eval_cache = self.final_embeddings()

    def train(self, mode: bool = True) -> Recommender:
        self._eval_cache = None
        return super().train(mode)

    def full_sort_predict(self, users: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_eval_cache", None) is None:
            self.prepare_eval()
        user_all, item_all = self._eval_cache
        return user_all[users] @ item_all.T

    def score_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(users x d, items x d) whose products are :meth:`full_sort_predict`'s scores, so that an evaluation
        can compute them tile by tile; ``None`` where a subclass scores otherwise."""
        if type(self).full_sort_predict is not Recommender.full_sort_predict:
            return None
        if getattr(self, "_eval_cache", None) is None:
            self.prepare_eval()
        return self._eval_cache


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(s_pos - s_neg) (softplus form, numerically stable)."""
    return nn.functional.softplus(neg_scores - pos_scores).mean()


def l2_reg(*tensors: torch.Tensor) -> torch.Tensor:
    """MMRec's EmbLoss: sum of squared L2 norms divided by the batch size."""
    batch = tensors[0].shape[0]
    return sum(t.pow(2).sum() for t in tensors) / (2 * batch)
