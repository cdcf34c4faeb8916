"""LGMRec (Guo et al., "LGMRec: Local and Global Graph Learning for Multimodal Recommendation", AAAI'24).

- collaborative (local) part: H_id = LightGCN over the normalised user-item graph Â (mean over n_ui_layers layers);
- modality (local) part, per modality m, no ID coupling: items X_m = F_m W_m (bias-free), users start as the mean
  of their items' X_m, then n_mm_layers rounds over Â, last layer kept: M_m;  local = H_id + sum_m normalise(M_m);
- hypergraph (global) part: item-hyperedge weights A_m = Gumbel-softmax(F_m V_m, tau), user-hyperedge weights
  Gumbel-softmax(R F_m V_m, tau) with R the binary interaction matrix, dropout (1 - keep_rate) on both; each of
  n_hyper_layers layers: hyperedges = A_m^T items, items = A_m hyperedges, users = A_m(users) hyperedges, starting
  from the collaborative item embeddings (no degree normalisation): G_m;
- e = local + alpha * normalise(sum_m G_m);  score = <e_u, e_i>;
- loss: BPR + cl_weight * InfoNCE(G_a vs G_b of the batch's users, against all users; same for the positive items,
  against all items; summed over the batch) + reg_weight * sum of the L2 norms of the batch's final embeddings / batch.

Defaults are LGMRec's settings for Amazon Baby (MMRec's LGMRec.yaml); its other datasets' settings, and where and
why this differs from the original: docs/design-notes.md#modelslgmrec.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dprec.config import check_types
from dprec.graph import build_user_item_graph, build_weighted_graph, lightgcn_propagate
from dprec.models.base import ModelContext, Recommender, bpr_loss
from dprec.models.layers import (
    check_modality_names,
    feature_buffer,
    gumbel_or_soft,
    hypergraph_rounds,
    info_nce,
    memory_rounds,
    norm_penalty,
    register_feature_buffers,
    select_features,
    take_rows,
    unique_pairs,
    user_mean_graph,
    xavier,
)

logger = logging.getLogger(__name__)


@dataclass
class LGMRecConfig:
    """LGMRec hyper-parameters (its Amazon Baby setting)."""

    embedding_dim: int = 64
    """Size of ID embeddings and projected features."""
    n_ui_layers: int = 2
    """LightGCN layers over the user-item graph (collaborative part)."""
    n_mm_layers: int = 2
    """Rounds of the projected features over the user-item graph (modality part)."""
    n_hyper_layers: int = 1
    """Hypergraph layers (global part)."""
    n_hyperedges: int = 4
    """Learnable hyperedges per modality."""
    keep_rate: float = 0.5
    """Probability of keeping an incidence entry in training (dropout 1 - keep_rate)."""
    alpha: float = 0.3
    """Weight of the normalised global part in the final embeddings."""
    tau: float = 0.2
    """Temperature of the Gumbel-softmax and of the InfoNCE."""
    cl_weight: float = 1e-4
    """Weight of the cross-modal InfoNCE (a sum over the batch, hence small)."""
    reg_weight: float = 1e-6
    """Weight of the L2-norm penalty on the batch's final embeddings."""
    modalities: list[str] | None = None
    """Modalities (feature views) to use, by name; None = every one given (at least one is needed)."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("embedding_dim", "n_hyper_layers", "n_hyperedges", "tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_ui_layers", "n_mm_layers", "alpha", "cl_weight", "reg_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must lie in (0, 1], got {self.keep_rate}")
        check_modality_names(self.modalities)


class LGMRec(Recommender):
    train_defaults: ClassVar[dict[str, int | float]] = {"batch_size": 8192, "feature_rank": 256, "lr": 0.004}
    """Every step is a full-graph pass through the feature projections, so larger steps over reduced views, at a
    learning rate for 4x fewer steps an epoch (switches chosen on validation: docs/benchmarks.md#speed-switches)."""

    def __init__(self, cfg: LGMRecConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        features = select_features(ctx.features, cfg.modalities, ctx.n_items)
        if not features:
            raise ValueError(
                f"LGMRec needs at least one feature view (modalities={cfg.modalities}); use lightgcn for IDs only"
            )
        if len(features) == 1:
            logger.warning("LGMRec: one modality (%s): the cross-modal InfoNCE is off", next(iter(features)))
        self.modality_names = list(features)
        self.backend = ctx.graph_backend
        register_feature_buffers(self, features)
        self.user_emb = xavier(ctx.n_users, cfg.embedding_dim)
        self.item_emb = xavier(ctx.n_items, cfg.embedding_dim)
        self.projection = nn.ParameterDict({m: xavier(f.shape[1], cfg.embedding_dim) for m, f in features.items()})
        self.hyperedge_assign = nn.ParameterDict({m: xavier(f.shape[1], cfg.n_hyperedges) for m, f in features.items()})
        self.incidence_dropout = nn.Dropout(1.0 - cfg.keep_rate)
        self.ui_graph = build_user_item_graph(
            ctx.n_users, ctx.n_items, ctx.train_users, ctx.train_items, ctx.graph_backend
        )
        self.user_mean = user_mean_graph(ctx)
        users, items = unique_pairs(ctx)
        self.interactions = build_weighted_graph(ctx.n_items, ctx.n_users, items, users, None, ctx.graph_backend)

    def _modality(self, name: str) -> Tensor:
        """M_m: users start as the mean of their items' projections; n_mm_layers rounds over Â, last kept."""
        items = feature_buffer(self, name) @ self.projection[name]
        return memory_rounds(self.ui_graph, self.user_mean, items, self.cfg.n_mm_layers)

    def _hypergraph(self, name: str, items: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(G_m of all nodes, its factors (incidence of all nodes, hyperedges): G_m = incidence @ hyperedges):
        hyperedges gather from items only, users and items read them back."""
        gumbel = self.training  # noise-free soft assignment at evaluation
        item_logits = feature_buffer(self, name) @ self.hyperedge_assign[name]
        item_incidence = self.incidence_dropout(gumbel_or_soft(item_logits, self.cfg.tau, gumbel))
        user_logits = self.interactions.propagate(item_logits)
        user_incidence = self.incidence_dropout(gumbel_or_soft(user_logits, self.cfg.tau, gumbel))
        items, hyperedges = hypergraph_rounds(item_incidence, items, self.cfg.n_hyper_layers, self.backend)
        return torch.cat([user_incidence @ hyperedges, items]), (
            torch.cat([user_incidence, item_incidence]),
            hyperedges,
        )

    def _parts(self) -> tuple[Tensor, dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        h_id = lightgcn_propagate(self.ui_graph, torch.cat([self.user_emb, self.item_emb]), self.cfg.n_ui_layers)
        local = h_id + sum(F.normalize(self._modality(m), dim=1) for m in self.modality_names)
        hyper = {m: self._hypergraph(m, h_id[self.n_users :]) for m in self.modality_names}
        global_ = {m: g for m, (g, _) in hyper.items()}
        factors = {m: f for m, (_, f) in hyper.items()}
        return local + self.cfg.alpha * F.normalize(sum(global_.values()), dim=1), global_, factors

    def forward(self) -> tuple[Tensor, dict[str, Tensor]]:
        """(final embeddings e, {modality: G_m}) of all nodes, users first."""
        e, global_, _ = self._parts()
        return e, global_

    def final_embeddings(self) -> tuple[Tensor, Tensor]:
        e, _ = self()
        return e[: self.n_users], e[self.n_users :]

    def _cross_modal(
        self,
        global_: dict[str, Tensor],
        factors: dict[str, tuple[Tensor, Tensor]],
        users: Tensor,
        pos: Tensor,
    ) -> Tensor:
        """Sum over modality pairs of InfoNCE(a vs b) on the batch's users (against all users) and items.

        A node drawn k times in the batch has k equal terms: each distinct node is computed once and counted k
        times (the same sum; the InfoNCE against all nodes costs per distinct anchor). The candidates G_b are a
        mix of n_hyperedges rows (``factors``): with fewer hyperedges than dimensions the products against all
        nodes run over the hyperedges (``info_nce``'s candidate_factors, the same loss)."""
        total = torch.zeros((), device=users.device)
        for a, b in itertools.combinations(global_, 2):
            incidence, hyperedges = factors[b]
            narrow = len(hyperedges) < hyperedges.shape[1]
            for nodes, every in ((users, slice(None, self.n_users)), (self.n_users + pos, slice(self.n_users, None))):
                rows, counts = torch.unique(nodes, return_counts=True)
                low_rank = (incidence[every], hyperedges) if narrow else None
                terms = info_nce(
                    take_rows(global_[a], rows),
                    take_rows(global_[b], rows),
                    self.cfg.tau,
                    global_[b][every],
                    "none",
                    candidate_factors=low_rank,
                )
                total = total + (terms * counts).sum()
        return total

    def calculate_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, float]]:
        e, global_, factors = self._parts()
        u, p, n = (take_rows(e, i) for i in (users, self.n_users + pos, self.n_users + neg))
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        cl = self._cross_modal(global_, factors, users, pos)
        reg = self.cfg.reg_weight * norm_penalty(u, p, n)
        loss = bpr + self.cfg.cl_weight * cl + reg
        return loss, {"bpr": float(bpr.detach()), "cl": float(cl.detach()), "reg": float(reg.detach())}
