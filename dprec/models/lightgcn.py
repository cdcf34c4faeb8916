"""LightGCN (He et al., SIGIR'20) as MMRec trains it.

E^(l+1) = D^-1/2 A D^-1/2 E^(l) over the user-item graph; final embedding = mean of layers
0..L; score = <e_u, e_i>; loss = BPR + reg_weight * L2 of the layer-0 embeddings of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dprec.config import check_types
from dprec.graph import build_user_item_graph, lightgcn_propagate
from dprec.models.base import ModelContext, Recommender, bpr_loss, l2_reg
from dprec.models.layers import take_rows, xavier


@dataclass
class LightGCNConfig:
    """LightGCN hyper-parameters (MMRec defaults)."""

    embedding_dim: int = 64
    """Size of user and item ID embeddings."""
    n_layers: int = 2
    """Propagation layers over the normalised user-item graph."""
    reg_weight: float = 1e-4
    """Weight of the L2 penalty on the batch's layer-0 embeddings."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {self.n_layers}")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")


class LightGCN(Recommender):
    uses_features = False

    def __init__(self, cfg: LightGCNConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        self.user_emb = xavier(ctx.n_users, cfg.embedding_dim)
        self.item_emb = xavier(ctx.n_items, cfg.embedding_dim)
        self.graph = build_user_item_graph(
            ctx.n_users, ctx.n_items, ctx.train_users, ctx.train_items, backend=ctx.graph_backend
        )

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        ego = torch.cat([self.user_emb, self.item_emb], 0)
        out = lightgcn_propagate(self.graph, ego, self.cfg.n_layers)
        return out[: self.n_users], out[self.n_users :]

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self()

    def calculate_loss(self, users, pos, neg):
        user_all, item_all = self()
        u, p, n = take_rows(user_all, users), take_rows(item_all, pos), take_rows(item_all, neg)
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = self.cfg.reg_weight * l2_reg(
            take_rows(self.user_emb, users), take_rows(self.item_emb, pos), take_rows(self.item_emb, neg)
        )
        return bpr + reg, {"bpr": float(bpr.detach()), "reg": float(reg.detach())}
