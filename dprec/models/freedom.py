"""FREEDOM (Zhou & Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal
Recommendation", MM'23) as MMRec implements it.

- frozen item-item graph, built once: per modality m, S_m = the binary kNN graph of the raw features F_m (cosine,
  top knn_k), Ŝ_m = D^-1/2 S_m D^-1/2;  Ŝ = sum_m w_m Ŝ_m  (w = modality_weights / their sum), one sparse graph;
- h = Ŝ^n_mm_layers E_item  (the item ID embeddings over the frozen graph, the last round kept);
- denoised user-item graph: in training, once per epoch, int(|E| (1 - dropout)) distinct interactions are drawn
  without replacement with probability proportional to 1/sqrt(d_u d_i) (degrees of the full training graph),
  and Ã = D^-1/2 A D^-1/2 is re-normalised on the kept edges (both directions); evaluation uses the full Â.
  The draw is a function of (seed, epoch) alone (``start_epoch``), so resumed and data-parallel runs agree;
- H = LightGCN over Ã in training, Â at evaluation (mean over n_ui_layers layers);
  e_u = H_u,  e_i = H_i + h_i;  score = <e_u, e_i>;
- loss: BPR(e) + reg_weight * sum_m BPR(e_u, F_m W_m [pos], F_m W_m [neg]), W_m a (d_m x d) projection that only
  this per-modality BPR uses.

Defaults are FREEDOM's published ones (MMRec's FREEDOM.yaml), with dropout and reg_weight picked from its grids.
Where and why this differs from the original: docs/design-notes.md#modelsfreedom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from dprec.config import check_types
from dprec.graph import PropagationGraph, build_user_item_graph, build_weighted_graph, lightgcn_propagate
from dprec.graph.knn import DEFAULT_BLOCK_SIZE, item_knn_edges
from dprec.models.base import ModelContext, Recommender, bpr_loss
from dprec.models.layers import (
    check_modality_names,
    feature_buffer,
    propagate_rounds,
    register_feature_buffers,
    select_features,
    take_rows,
    unique_pairs,
    xavier,
)

MULTINOMIAL_LIMIT = 2**24
"""The most categories ``torch.multinomial`` accepts; larger edge sets are drawn by exponential keys instead."""
ITEM_GRAPH_BACKEND = "torch"
"""Backend of the frozen mixture whatever ``graph_backend`` says: its general per-edge weights take DGL's slow
``u_mul_e`` path (5x torch's CSR product at Amazon Baby's size); the backends give the same numbers."""
PRUNE_STREAM = 0x46524545
"""Third word of the pruning generator's seed sequence (seed, epoch, stream): apart from the trainer's streams."""


class DegreePruning:
    """FREEDOM's denoising of the user-item graph: each training epoch keeps int(|E| (1 - dropout)) distinct
    interactions, drawn with probability proportional to 1/sqrt(d_u d_i) (degrees of the full training graph) from a
    generator of (seed, epoch) alone, and re-normalises Ã = D^-1/2 A D^-1/2 on the kept edges."""

    def __init__(self, ctx: ModelContext, dropout: float) -> None:
        users, items = unique_pairs(ctx)
        self.n_users, self.n_items, self.dropout, self.backend = ctx.n_users, ctx.n_items, dropout, ctx.graph_backend
        self.edge_users, self.edge_items = torch.from_numpy(users), torch.from_numpy(items)
        degree_u = np.bincount(users, minlength=ctx.n_users)[users]
        degree_i = np.bincount(items, minlength=ctx.n_items)[items]
        self.edge_weights = torch.from_numpy(1.0 / np.sqrt(degree_u * degree_i.astype(np.float64))).float()

    def edges(self, epoch: int, seed: int) -> tuple[Tensor, Tensor]:
        """(users, items) of the interactions kept in ``epoch``."""
        # int() as FREEDOM, after a nudge: 240 * (1 - 0.8) is 47.99999999999999 in floating point
        n_keep = int(len(self.edge_weights) * (1.0 - self.dropout) + 1e-6)
        kept = sample_without_replacement(self.edge_weights, n_keep, epoch_generator(seed, epoch))
        return self.edge_users[kept], self.edge_items[kept]

    def graph(self, epoch: int, seed: int, device: torch.device) -> PropagationGraph:
        """The normalised user-item graph of the edges kept in ``epoch``, on ``device``."""
        users, items = self.edges(epoch, seed)
        return build_user_item_graph(self.n_users, self.n_items, users, items, self.backend).to(device)


@dataclass
class FREEDOMConfig:
    """FREEDOM hyper-parameters (its published defaults; dropout and reg_weight from its grids)."""

    embedding_dim: int = 64
    """Size of ID embeddings and of the modality projections (FREEDOM's embedding_size = feat_embed_dim)."""
    n_ui_layers: int = 2
    """LightGCN layers over the (pruned) user-item graph."""
    n_mm_layers: int = 1
    """Rounds of the item ID embeddings over the frozen item-item graph."""
    knn_k: int = 10
    """Neighbours per item in each modality's binary kNN graph."""
    knn_block_size: int = DEFAULT_BLOCK_SIZE
    """Items per block when the kNN graphs are built (memory only)."""
    modality_weights: dict[str, float] | None = None
    """Weight of each modality's normalised kNN graph in the frozen mixture, by name, divided by their sum;
    None = equal weights. FREEDOM's published mixture is {image: 0.1, text: 0.9} (its mm_image_weight 0.1)."""
    dropout: float = 0.8
    """Share of the interactions pruned from the training graph each epoch (degree-sensitive); 0 = none."""
    reg_weight: float = 1e-4
    """Weight of the per-modality BPR on the projected features (FREEDOM's reg_weight)."""
    train_features: bool = False
    """Fine-tune the raw features, as FREEDOM does; False (the default here) keeps them fixed."""
    modalities: list[str] | None = None
    """Modalities (feature views) to use, by name; None = every one given (at least one is needed)."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("embedding_dim", "n_mm_layers", "knn_k", "knn_block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_ui_layers", "reg_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.train_features, bool):
            raise ValueError(f"train_features must be true or false, got {self.train_features!r}")
        check_modality_names(self.modalities)
        if self.modality_weights is not None:
            check_modality_names(list(self.modality_weights))
            if any(w < 0 for w in self.modality_weights.values()) or sum(self.modality_weights.values()) <= 0:
                raise ValueError(f"modality_weights must be >= 0 with a positive sum, got {self.modality_weights}")


def mixture_weights(weights: dict[str, float] | None, names: list[str]) -> dict[str, float]:
    """Each modality's share of the frozen graph: ``weights`` over their sum (None: equal), checked against
    the modalities in use (every one needs a weight; naming one not in use is an error, as a typo would be)."""
    if weights is None:
        return {m: 1.0 / len(names) for m in names}
    missing, unused = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or unused:
        raise ValueError(
            f"modality_weights must name exactly the modalities in use {names}, got {sorted(weights)}"
            + (f" (no weight for {missing})" if missing else "")
            + (f" ({unused} not in use: drop them or set modality_weights to null)" if unused else "")
        )
    total = sum(weights[m] for m in names)
    if total <= 0:
        raise ValueError(f"modality_weights of the modalities in use must have a positive sum, got {weights}")
    return {m: weights[m] / total for m in names}


def frozen_item_graph(
    features: dict[str, Tensor], shares: dict[str, float], cfg: FREEDOMConfig, backend: str, device: str
) -> PropagationGraph:
    """Ŝ = sum_m shares[m] D_m^-1/2 S_m D_m^-1/2 (binary kNN graphs) as one weighted graph, items -> items."""
    rows, cols, values = [], [], []
    for name, matrix in features.items():
        if shares[name] == 0:
            continue  # a zero-weight modality adds nothing to the graph: its kNN is not searched
        r, c, v = item_knn_edges(matrix, cfg.knn_k, False, cfg.knn_block_size, device)
        rows.append(r)
        cols.append(c)
        values.append(v * shares[name])
    n = next(iter(features.values())).shape[0]
    # an edge found in several modalities is merged into one carrying the sum of its weighted entries
    return build_weighted_graph(n, n, torch.cat(cols), torch.cat(rows), torch.cat(values), backend)


def sample_without_replacement(weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` distinct indices drawn with probability proportional to ``weights`` (successive sampling).

    ``torch.multinomial`` up to its 2^24 categories; beyond, the top n of weights / Exp(1) keys, the same
    distribution (and the algorithm torch.multinomial runs without replacement).
    """
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    if len(weights) <= MULTINOMIAL_LIMIT:
        return torch.multinomial(weights, n, replacement=False, generator=generator)
    keys = weights / torch.empty_like(weights).exponential_(1.0, generator=generator)
    return keys.topk(n).indices


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch) alone: every rank and every resumed run draws the same."""
    state = np.random.SeedSequence((seed, epoch, PRUNE_STREAM)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class FREEDOM(Recommender):
    def __init__(self, cfg: FREEDOMConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        d = cfg.embedding_dim
        features = select_features(ctx.features, cfg.modalities, ctx.n_items)
        if not features:
            raise ValueError(
                f"FREEDOM needs at least one feature view (modalities={cfg.modalities}); use lightgcn for IDs only"
            )
        self.modality_names = list(features)
        self.backend = ctx.graph_backend
        shares = mixture_weights(cfg.modality_weights, self.modality_names)
        self.item_graph = frozen_item_graph(features, shares, cfg, ITEM_GRAPH_BACKEND, ctx.device)
        self.user_emb = xavier(ctx.n_users, d)
        self.item_emb = xavier(ctx.n_items, d)
        self.ui_graph = build_user_item_graph(
            ctx.n_users, ctx.n_items, ctx.train_users, ctx.train_items, ctx.graph_backend
        )
        self.pruning = DegreePruning(ctx, cfg.dropout)
        self.pruned_graph: PropagationGraph | None = None
        self.pruned_for: tuple[int, int] | None = None  # (epoch, seed) of pruned_graph
        self.gather_buffers: dict[str, Tensor] = {}  # reused rows of fixed features, see _difference
        if cfg.train_features:  # a copy: Adam updates it in place, and the caller's arrays must stay as they are
            self.features = nn.ParameterDict({m: nn.Parameter(f.clone()) for m, f in features.items()})
        else:
            self.features = None
            register_feature_buffers(self, features)
        # no bias: it cancels in the BPR difference u.(W f_p + b) - u.(W f_n + b) (FREEDOM's never moves)
        self.projection = nn.ModuleDict({m: nn.Linear(f.shape[1], d, bias=False) for m, f in features.items()})

    def _feature(self, name: str) -> Tensor:
        return self.features[name] if self.features is not None else feature_buffer(self, name)

    def pruned_edges(self, epoch: int, seed: int) -> tuple[Tensor, Tensor]:
        """(users, items) of the interactions kept in ``epoch``: int(|E| (1 - dropout)) distinct ones, drawn
        with probability proportional to 1/sqrt(d_u d_i) from a generator of (seed, epoch) alone."""
        return self.pruning.edges(epoch, seed)

    def start_epoch(self, epoch: int, seed: int) -> None:
        """Draw this epoch's pruned user-item graph (re-normalised on its kept edges); no-op without dropout."""
        if self.cfg.dropout == 0:
            return
        self.pruned_graph = self.pruning.graph(epoch, seed, self.user_emb.device)
        self.pruned_for = (epoch, seed)

    def training_graph(self) -> PropagationGraph:
        """The user-item graph of the training loss: the epoch's pruned one (epoch 0 of seed 0 if none was drawn:
        a model used outside the trainer), the full one without dropout."""
        if self.cfg.dropout == 0:
            return self.ui_graph
        if self.pruned_graph is None:
            self.start_epoch(0, 0)
        return self.pruned_graph

    def forward(self, graph: PropagationGraph) -> tuple[Tensor, Tensor]:
        """(users, items) final embeddings with LightGCN over ``graph``: (H_u, H_i + h)."""
        h = propagate_rounds(self.item_graph, self.item_emb, self.cfg.n_mm_layers)
        e = lightgcn_propagate(graph, torch.cat([self.user_emb, self.item_emb]), self.cfg.n_ui_layers)
        return e[: self.n_users], e[self.n_users :] + h

    def final_embeddings(self) -> tuple[Tensor, Tensor]:
        return self(self.ui_graph)

    def _difference(self, name: str, pos: Tensor, neg: Tensor) -> Tensor:
        """F_m[pos] - F_m[neg]. Fixed features are gathered into a buffer kept from step to step: a fresh
        2 x batch x d_m allocation (64 MB for 4,096-d) costs more in page faults than the product it feeds. The
        result is that buffer: the next call overwrites it (autograd refuses a backward through an overwritten one)."""
        features = self._feature(name)
        if features.requires_grad:
            return features[pos] - features[neg]
        n = len(pos)
        buffer = self.gather_buffers.get(name)
        if buffer is None or len(buffer) < 2 * n or buffer.device != features.device:
            buffer = self.gather_buffers[name] = features.new_empty(2 * n, features.shape[1])
        both = buffer[: 2 * n]
        torch.index_select(features, 0, torch.cat([pos, neg]), out=both)
        return both[:n].sub_(both[n:])

    def modality_bpr(self, u: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """sum_m BPR(u, W_m F_m[pos], W_m F_m[neg]), as u.W_m (F_m[pos] - F_m[neg]): one product of batch rows."""
        total = torch.zeros((), device=u.device)
        for name in self.modality_names:
            margin = (u * self.projection[name](self._difference(name, pos, neg))).sum(1)
            total = total + bpr_loss(margin, torch.zeros_like(margin))
        return total

    def calculate_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, float]]:
        user_all, item_all = self(self.training_graph())
        u, p, n = take_rows(user_all, users), take_rows(item_all, pos), take_rows(item_all, neg)
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        modal = self.modality_bpr(u, pos, neg)
        loss = bpr + self.cfg.reg_weight * modal
        return loss, {"bpr": float(bpr.detach()), "modal": float(modal.detach())}
