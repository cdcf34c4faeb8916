"""Embeddings of items a trained model has never seen (cold start, DESIGN §6), from their content alone.

Model-agnostic: it reads the model's ``final_embeddings()`` (score(u, i) = <user[u], item[i]>) and the item
features, never the model's internals, and appends rows for the new items; the trained items' rows and every
user's row stay exactly what the model gives, so warm scores do not change.

- ``knn``: a new item's ``k`` most similar trained items by feature cosine (each modality's cosine, mean over
  modalities: :func:`~dprec.models.content_knn.content_vectors`) give it the similarity-weighted mean of their
  final item embeddings (weights: the positive similarities, normalised; uniform if none is positive).
- the model's own content view, where it has one: a model with ``content_item_embeddings(features)``
  (content-kNN) embeds a new item exactly as a trained one, which replaces the kNN mean; DPRec (a ``projection``
  ModuleDict of per-modality MLPs) adds beta * sum_m normalise(MLP_m(F_m[i]) - mean over trained items), its
  content embedding of the item computed as for the trained items' first layer.
- ``random``: a seeded normal vector with the trained items' per-dimension mean and standard deviation.

Feature matrices passed here are the model's view for ``model_features`` (after any width reduction, rows of
the trained items) and raw rows for the kNN similarities.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dprec.graph.knn import knn_between
from dprec.models.base import Recommender
from dprec.models.content_knn import content_vectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbours:
    """Each new item's most similar trained items: (n_new x k) cosines ``sims`` and trained-item indices ``cols``."""

    sims: Tensor
    cols: Tensor

    @classmethod
    def of(
        cls, trained_features: Mapping[str, np.ndarray], new_features: Mapping[str, np.ndarray], k: int
    ) -> Neighbours:
        """The ``k`` nearest trained items of each new item, by the mean over modalities of the feature cosine."""
        names = sorted(trained_features)
        if not names or sorted(new_features) != names:
            raise ValueError(
                f"new items' embeddings from content need the same feature views for trained and new items "
                f"(trained: {names}, new: {sorted(new_features)}); name them under features: in the run config"
            )
        trained = content_vectors({m: trained_features[m] for m in names})
        new = content_vectors({m: new_features[m] for m in names})
        sims, cols = knn_between(new, trained, k)
        return cls(sims, cols)

    def mean(self, item_embeddings: Tensor) -> Tensor:
        """(n_new x d): the similarity-weighted mean of the neighbours' rows of ``item_embeddings`` (weights: the
        positive similarities, normalised; uniform where none is positive)."""
        weights = self.sims.clamp(min=0)
        total = weights.sum(1, keepdim=True)
        uniform = torch.full_like(weights, 1.0 / max(self.cols.shape[1], 1))
        weights = torch.where(total > 0, weights / total.clamp(min=torch.finfo(weights.dtype).tiny), uniform)
        return torch.einsum("nk,nkd->nd", weights.to(item_embeddings.dtype), item_embeddings[self.cols])


def random_rows(item_embeddings: Tensor, n_new: int, seed: int) -> Tensor:
    """``n_new`` seeded normal rows with the per-dimension mean and standard deviation of ``item_embeddings``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_new, item_embeddings.shape[1], generator=generator, dtype=item_embeddings.dtype)
    std = item_embeddings.std(0) if len(item_embeddings) > 1 else torch.ones(item_embeddings.shape[1])
    return item_embeddings.mean(0) + noise * std


def projection_content(model: nn.Module, new_features: Mapping[str, np.ndarray | Tensor]) -> Tensor | None:
    """DPRec's content embedding of new items (see the module docstring), or None for a model without projections.

    ``new_features`` in the model's view (reduced widths). Uses the model's ``projection`` MLPs and the trained
    items' features it holds (buffers ``features_<modality>``), both guarded: None when either is absent.
    """
    projection = getattr(model, "projection", None)
    names = getattr(model, "modality_names", None)
    if not isinstance(projection, nn.ModuleDict) or not names:
        return None
    trained = {m: getattr(model, f"features_{m}", None) for m in names}
    if any(m not in projection or not isinstance(trained[m], Tensor) or m not in new_features for m in names):
        return None
    beta = float(getattr(getattr(model, "cfg", None), "beta", 1.0))
    with torch.no_grad():
        total = 0
        for m in names:
            mlp = projection[m]
            new = torch.as_tensor(np.asarray(new_features[m]), dtype=torch.float32, device=trained[m].device)
            total = total + F.normalize(mlp(new) - mlp(trained[m]).mean(0, keepdim=True), dim=1)
    return beta * total.cpu()


def new_item_embeddings(
    model: Recommender,
    item_embeddings: Tensor,
    neighbours: Neighbours | None,
    model_new_features: Mapping[str, np.ndarray],
    *,
    n_new: int,
    embedding: str = "knn",
    own_content: bool = True,
    seed: int = 0,
) -> Tensor:
    """(n_new x d) embeddings of ``n_new`` new items for ``model``, whose trained items' final embeddings are
    ``item_embeddings``.

    ``neighbours``: the new items' nearest trained items (:meth:`Neighbours.of`; needed for ``knn``);
    ``model_new_features``: the new items' rows in the model's view (for its own content view).
    ``embedding`` and ``own_content``: :class:`dprec.training.config.ColdStartConfig`.
    """
    item_embeddings = item_embeddings.detach().float().cpu()
    if n_new == 0:
        return item_embeddings.new_zeros((0, item_embeddings.shape[1]))
    exact = getattr(model, "content_item_embeddings", None)
    if own_content and callable(exact):
        return exact(model_new_features).detach().float().cpu()
    if embedding == "random":
        return random_rows(item_embeddings, n_new, seed)
    if embedding != "knn":
        raise ValueError(f"new item embedding must be 'knn' or 'random', got {embedding!r}")
    if neighbours is None or len(neighbours.cols) != n_new:
        raise ValueError("the knn embedding of new items needs their neighbours among the trained items")
    out = neighbours.mean(item_embeddings)
    content = projection_content(model, model_new_features) if own_content else None
    if content is not None:
        if content.shape != out.shape:
            logger.warning(
                "new items: the model's content view has shape %s, its embeddings %s; kNN mean only",
                tuple(content.shape),
                tuple(out.shape),
            )
        else:
            out = out + content
    return out
