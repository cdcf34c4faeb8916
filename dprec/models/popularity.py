"""Popularity: every user gets the items with the most training interactions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dprec.config import check_types
from dprec.models.base import ModelContext, Recommender


@dataclass
class PopularityConfig:
    """Popularity has no hyper-parameters."""

    def __post_init__(self) -> None:
        check_types(self)


class Popularity(Recommender):
    uses_features = False
    trainable = False

    def __init__(self, cfg: PopularityConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        counts = np.bincount(ctx.train_items, minlength=ctx.n_items).astype(np.float32)
        self.register_buffer("counts", torch.from_numpy(counts))

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(self.n_users, 1), self.counts.unsqueeze(1)
