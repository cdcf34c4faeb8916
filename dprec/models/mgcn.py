"""MGCN (Yu et al., "Multi-View Graph Convolutional Network for Multimedia Recommendation", MM'23).

- ID embeddings: H_id = LightGCN over the normalised user-item graph Â (mean over n_ui_layers layers);
- purifier: per modality m, items' X_m = E_item ⊙ sigmoid(gate_m(trs_m(F_m))) (ID embedding gated by the feature);
- item-item view: X_m goes n_ii_layers rounds over the kNN graph Ŝ_m of F_m (cosine, top knn_k with values,
  D^-1/2 S D^-1/2, built once); users: the user-item block R of Â, so H_m = [R Ŝ_m X_m ; Ŝ_m X_m];
- fuser: common = attention over modalities (q^T tanh(W h + b)); specific_m = (H_m - common) ⊙ sigmoid(P_m H_id);
  side = (common + sum_m specific_m) / (n_modalities + 1);  e = H_id + side;  score = <e_u, e_i>;
- loss: BPR + reg_weight * L2(the batch's final embeddings) + cl_weight * (InfoNCE(side, H_id) of the batch's
  positive items + of its users), in-batch, temperature cl_tau.

Defaults are MGCN's published ones (MMRec's MGCN.yaml). Where and why this differs from the original:
docs/design-notes.md#modelsmgcn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from dprec.config import check_types
from dprec.graph import build_user_item_graph, lightgcn_propagate
from dprec.graph.knn import DEFAULT_BLOCK_SIZE, build_item_knn_graph
from dprec.models.base import ModelContext, Recommender, bpr_loss, l2_reg
from dprec.models.layers import (
    AttentionGate,
    check_modality_names,
    info_nce,
    propagate_rounds,
    select_features,
    take_rows,
    user_item_block,
    xavier,
)


@dataclass
class MGCNConfig:
    """MGCN hyper-parameters (MGCN's published defaults)."""

    embedding_dim: int = 64
    """Size of ID embeddings and projected features."""
    n_ui_layers: int = 2
    """LightGCN layers over the user-item graph (ID view)."""
    n_ii_layers: int = 1
    """Rounds over each item-item kNN graph (MGCN's n_layers)."""
    knn_k: int = 10
    """Neighbours per item in the kNN graphs."""
    knn_block_size: int = DEFAULT_BLOCK_SIZE
    """Items per block when the kNN graphs are built (memory only)."""
    cl_weight: float = 0.01
    """Weight of the InfoNCE between the side (content) and ID embeddings (MGCN's cl_loss)."""
    cl_tau: float = 0.2
    """InfoNCE temperature."""
    cl_group: int = 2048
    """Most anchors one in-batch InfoNCE compares (``layers.info_nce``): a larger batch is split at random into
    groups of at most this many, the in-batch negatives of MGCN's batch of 2,048 at a linear cost; 0 = whole batch."""
    reg_weight: float = 1e-4
    """Weight of the L2 penalty on the batch's final embeddings."""
    train_features: bool = True
    """Fine-tune the raw features, as MGCN does; False keeps them fixed (less memory)."""
    modalities: list[str] | None = None
    """Modalities (feature views) to use, by name; None = every one given (at least one is needed)."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("embedding_dim", "n_ii_layers", "knn_k", "knn_block_size", "cl_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_ui_layers", "cl_weight", "reg_weight", "cl_group"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.train_features, bool):
            raise ValueError(f"train_features must be true or false, got {self.train_features!r}")
        check_modality_names(self.modalities)


def sigmoid_gate(dim: int) -> nn.Sequential:
    """x -> sigmoid(W x + b): MGCN's purifier gate and its preference gate."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())


class MGCN(Recommender):
    train_defaults: ClassVar[dict[str, int | float]] = {"batch_size": 8192, "feature_rank": 256, "lr": 0.004}
    """Every step is a full-graph pass through the feature projections, so larger steps over reduced views, at a
    learning rate for 4x fewer steps an epoch (switches chosen on validation: docs/benchmarks.md#speed-switches)."""

    def __init__(self, cfg: MGCNConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        d = cfg.embedding_dim
        features = select_features(ctx.features, cfg.modalities, ctx.n_items)
        if not features:
            raise ValueError(
                f"MGCN needs at least one feature view (modalities={cfg.modalities}); use lightgcn for IDs only"
            )
        self.user_emb = xavier(ctx.n_users, d)
        self.item_emb = xavier(ctx.n_items, d)
        self.ui_graph = build_user_item_graph(
            ctx.n_users, ctx.n_items, ctx.train_users, ctx.train_items, ctx.graph_backend
        )
        self.user_block = user_item_block(ctx)
        self.knn = {
            m: build_item_knn_graph(f, cfg.knn_k, True, cfg.knn_block_size, ctx.graph_backend, ctx.device)
            for m, f in features.items()
        }
        # a copy: Adam updates trained features in place, and the caller's arrays must stay as they are
        self.features = nn.ParameterDict(
            {m: nn.Parameter(f.clone(), requires_grad=cfg.train_features) for m, f in features.items()}
        )
        self.transform = nn.ModuleDict({m: nn.Linear(f.shape[1], d) for m, f in features.items()})
        self.purifier = nn.ModuleDict({m: sigmoid_gate(d) for m in features})
        # the fuser splits common from specific parts, which takes two modalities: with one, common = H_m
        fuse = len(features) > 1
        self.preference = nn.ModuleDict({m: sigmoid_gate(d) for m in features}) if fuse else None
        self.common_query = AttentionGate(d) if fuse else None

    def _item_item_view(self, name: str) -> Tensor:
        """[users; items] of modality ``name``: purified ID embeddings over the kNN graph, users through R."""
        items = self.item_emb * self.purifier[name](self.transform[name](self.features[name]))
        items = propagate_rounds(self.knn[name], items, self.cfg.n_ii_layers)
        return torch.cat([self.user_block.propagate(items), items])

    def forward(self, rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(final embeddings e, side embeddings, ID embeddings H_id) of the nodes ``rows`` (sorted distinct node
        indices, users first; None = all nodes). The graphs propagate over all nodes; the fuser, a per-node
        computation, runs for ``rows`` only (the same numbers for those rows)."""
        h_id = lightgcn_propagate(self.ui_graph, torch.cat([self.user_emb, self.item_emb]), self.cfg.n_ui_layers)
        modal = {m: self._item_item_view(m) for m in self.features}
        if rows is not None:
            h_id, modal = take_rows(h_id, rows), {m: take_rows(h, rows) for m, h in modal.items()}
        if self.common_query is None:
            side = next(iter(modal.values())) / 2  # the fuser's formula with a zero specific part
        else:
            common = self.common_query(torch.stack(list(modal.values())))
            specific = sum(self.preference[m](h_id) * (h - common) for m, h in modal.items())
            side = (common + specific) / (len(modal) + 1)
        return h_id + side, side, h_id

    def final_embeddings(self) -> tuple[Tensor, Tensor]:
        e, _, _ = self()
        return e[: self.n_users], e[self.n_users :]

    def calculate_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, float]]:
        """BPR + reg + cl_weight * InfoNCE, from the batch's nodes only (``forward(rows)``)."""
        nodes = users, self.n_users + pos, self.n_users + neg
        rows = torch.unique(torch.cat(nodes))
        e, side, h_id = self(rows)
        users, items, negs = (torch.searchsorted(rows, n) for n in nodes)  # positions in rows
        u, p, n = (take_rows(e, i) for i in (users, items, negs))
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = self.cfg.reg_weight * l2_reg(u, p, n)
        tau, group = self.cfg.cl_tau, self.cfg.cl_group
        cl = sum(
            info_nce(take_rows(side, rows), take_rows(h_id, rows), tau, group_size=group) for rows in (items, users)
        )
        loss = bpr + reg + self.cfg.cl_weight * cl
        return loss, {"bpr": float(bpr.detach()), "reg": float(reg.detach()), "cl": float(cl.detach())}
