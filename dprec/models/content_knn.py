"""Content-kNN: an item's score for a user is the mean cosine between its features and the user's training items'.

    score(u, i) = mean_{j in train(u)} mean_m cos(F_m[i], F_m[j])

A dot product: item vectors are the per-modality unit rows concatenated and scaled by 1 / sqrt(M), user vectors
the mean of their training items' vectors (zero for a user without any). It learns nothing (``trainable`` False)
and needs no interaction of the item itself, so it scores an item that nobody has bought exactly as any other:
:meth:`ContentKNN.content_item_embeddings` gives a new item's vector from its features alone (the cold-start
baseline, docs/cold-start.md). Items whose features are all zero (a missing modality) score 0 in that modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dprec.config import check_types
from dprec.models.base import ModelContext, Recommender
from dprec.models.layers import check_modality_names, select_features, user_mean_graph


@dataclass
class ContentKNNConfig:
    """Content-kNN has no weights; only the feature views it compares."""

    modalities: list[str] | None = None
    """Modalities (feature views) to compare, by name; None = every one given."""

    def __post_init__(self) -> None:
        check_types(self)
        check_modality_names(self.modalities)


def content_vectors(features: dict[str, Tensor | np.ndarray]) -> Tensor:
    """Per-modality unit rows, concatenated and scaled by 1 / sqrt(M): their dot product is the mean cosine."""
    if not features:
        raise ValueError("content-kNN needs at least one feature view (features: in the run config)")
    parts = [F.normalize(torch.as_tensor(np.asarray(f), dtype=torch.float32), dim=1) for f in features.values()]
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


class ContentKNN(Recommender):
    trainable = False

    def __init__(self, cfg: ContentKNNConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        features = select_features(ctx.features, cfg.modalities, ctx.n_items)
        self.modality_names = list(features)
        self.register_buffer("item_vectors", content_vectors(features), persistent=False)
        self.user_mean = user_mean_graph(ctx)

    def final_embeddings(self) -> tuple[Tensor, Tensor]:
        return self.user_mean.propagate(self.item_vectors), self.item_vectors

    def content_item_embeddings(self, features: dict[str, Tensor | np.ndarray]) -> Tensor:
        """Vectors of items the model has not seen, from their features alone (the same modalities, raw widths)."""
        missing = [m for m in self.modality_names if m not in features]
        if missing:
            raise ValueError(f"content-kNN: new items lack the feature view(s) {missing}")
        return content_vectors({m: features[m] for m in self.modality_names})
