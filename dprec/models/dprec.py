"""DPRec, as DESIGN.md §3 reads it: dual-perspective encoding, hypergraph multi-level cross-modal alignment.

Notation: N = n_users + n_items nodes (users first), Â the normalised user-item graph, F_m the raw
features of modality ("view") m, d the embedding size. Each numbered part has a switch in ``DPRecConfig``.

1. Projection      X_m = MLP_m(F_m), centred over items                (items x d)
2. Memory          H_id = LightGCN(Â, ID embeddings);
                   H_m^mem = Â^L [mean_{i in N(u)} X_m[i] ; X_m]      (users start as the mean of their items)
3. Expansion       H_m^exp = [B Ŝ_m^L' X_m ; Ŝ_m^L' X_m]              (Ŝ_m: kNN graph of F_m, B: user-item block of Â)
4. Fusion          H_m = attention_p(H_m^mem, H_m^exp) per node;  H_mm = attention_m(H_m)
5. Hypergraph      A_m = softmax((F_m W_m + Gumbel noise) / tau) (items x K), users: mean of their items' rows;
                   G_m = (H H^T)^L H_id with H = [A_m(users) ; A_m(items)]  (``dprec.graph.hypergraph_conv``)
   Alignment       InfoNCE, in-batch over the batch's distinct users and positive items:
                   node (modality a vs b of G_m), hyperedge (row k of H^T x under a vs b), behaviour (H_mm vs H_id)
6. Prediction      e = H_id + beta * H_mm + alpha * normalise(sum_m G_m);  score(u, i) = <e_u, e_i>
7. Loss            BPR + lambda_align * (node + hyperedge + behaviour) + lambda_reg * L2(batch's ID embeddings)

Defaults and where they come from (BENCHMARKS.md, "The relatives in more detail"):
- embedding_dim 64, n_ui_layers 2, n_mm_layers 2: LGMRec (and MMRec's LightGCN);
- knn_k 10, knn_weighted (cosine values kept), n_ii_layers 1: MGCN;
- n_hyperedges 4, n_hyper_layers 1, keep_rate 0.5, alpha 0.3, Gumbel-softmax with hyperedge_tau 0.2: LGMRec on Baby;
- align_tau 0.2: MGCN and LGMRec; lambda_align 0.01: MGCN, whose InfoNCE is a batch mean as here
  (LGMRec's 1e-4 multiplies a batch sum); lambda_reg 1e-4: MGCN and MMRec's LightGCN.

Where §3 is silent, we chose:
- projection: Linear(d_m, 256) -> LeakyReLU -> Linear(256, d, no bias), its output centred over items (the item
  mean is removed). The MLP's biases, and the common direction that LLM embeddings share, otherwise give every item one
  shared component, which the memory perspective's smoothing over Â amplifies until all content views point the
  same way: on the synthetic data the mean item-item cosine of H_m^mem was 0.95 at initialisation (0.007 centred),
  and training sat on a LightGCN-level plateau for six epochs;
- H_m^mem keeps the last of its n_mm_layers rounds (LGMRec); H_id is LightGCN's mean over layers;
- H_m^mem and H_m^exp are L2-normalised per node before fusion (LGMRec normalises its modality parts),
  so the gate weighs directions, not feature scales, and H_mm lives on the scale of H_id;
- attention (both gates): MGCN's query q^T tanh(W h + b), softmax over the candidates of each node, times the number
  of candidates, so that uniform attention is the plain sum (fusion="sum") and H_mm keeps the scale of LGMRec's
  sum of normalised modality parts (a convex combination of unit vectors alone caps the content score at 1 and
  trailed LightGCN on the synthetic data); one gate per modality over its perspectives, one shared gate over
  modalities;
- hypergraph: users and items are both nodes of one hypergraph (node -> hyperedge -> node), started from H_id
  (LGMRec starts from its collaborative embeddings); the user rows of the incidence are the interaction-mean of
  the item rows, so they stay distributions; dropout (1 - keep_rate) on the incidence as LGMRec; evaluation uses the
  noise-free softmax(F_m W_m / tau) and no dropout;
- node alignment aligns G_m; with the hypergraph off it aligns H_m instead, so ``use_hypergraph=False`` removes the
  hypergraph, not the node level; with more than two modalities every pair (a, b), a before b, is aligned and the
  level is the mean over pairs; InfoNCE is one-directional (anchor a, candidates b), as MGCN's;
- L2 on the batch's layer-0 ID embeddings (MMRec's EmbLoss, as ``LightGCN`` here).

Degradation: with one modality the cross-modal levels (node, hyperedge) switch off; without features DPRec is
LightGCN on IDs. Either is logged once, as a warning, when the model is built.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dprec.graph import (
    PropagationGraph,
    build_user_item_graph,
    build_weighted_graph,
    hypergraph_conv,
    lightgcn_propagate,
)
from dprec.graph.knn import DEFAULT_BLOCK_SIZE, build_item_knn_graph
from dprec.models.base import ModelContext, Recommender, bpr_loss, l2_reg

log = logging.getLogger(__name__)

FUSIONS = ("attention", "sum")
ASSIGNMENTS = ("gumbel", "soft")
ALIGN_LEVELS = ("node", "hyperedge", "behaviour")


@dataclass
class DPRecConfig:
    """DPRec hyper-parameters and the switch of every part of DESIGN.md §3 (defaults: see the module docstring)."""

    embedding_dim: int = 64
    """d: size of ID embeddings, projections and every view."""
    projection_hidden: int = 256
    """Hidden width of the per-modality projection MLP (part 1)."""
    n_ui_layers: int = 2
    """LightGCN layers over the user-item graph for the ID view H_id (part 2)."""
    n_mm_layers: int = 2
    """Rounds of the modality projections over the user-item graph, memory perspective (part 2)."""
    knn_k: int = 10
    """Neighbours per item in the item-item kNN graph of each modality (part 3)."""
    knn_weighted: bool = True
    """Keep cosine values on kNN edges (MGCN); False binarises them (FREEDOM)."""
    knn_block_size: int = DEFAULT_BLOCK_SIZE
    """Items per block when the kNN graph is built (memory: block x n_items floats); no effect on the result."""
    n_ii_layers: int = 1
    """Rounds over the item-item kNN graph, expansion perspective (part 3)."""
    expand_ids: bool = False
    """Expansion perspective also over the ID view: the item rows of H_id gain the mean over modalities of
    Ŝ_m^L' E_items, the item ID embeddings propagated over the kNN graphs (FREEDOM's item-item convolution)."""
    n_hyperedges: int = 4
    """K: number of learnable hyperedges shared by all modalities (part 5)."""
    n_hyper_layers: int = 1
    """Hypergraph convolutions node -> hyperedge -> node (part 5)."""
    hyperedge_assignment: str = "gumbel"
    """Training-time item-to-hyperedge assignment: "gumbel" (Gumbel-softmax, LGMRec) or "soft" (softmax)."""
    hyperedge_tau: float = 0.2
    """Temperature of the hyperedge assignment softmax."""
    keep_rate: float = 0.5
    """Probability of keeping an incidence entry in training (dropout 1 - keep_rate on the hypergraph)."""
    alpha: float = 0.3
    """Weight of the normalised hypergraph view in the prediction (part 6)."""
    beta: float = 1.0
    """Weight of the content view H_mm in the prediction (part 6). H_mm is built from unit-norm
    perspectives, so its scale is fixed; a smaller beta lets the ID view lead where content is weak."""
    align_tau: float = 0.2
    """InfoNCE temperature of every alignment level."""
    lambda_align: float = 0.01
    """Weight of the sum of the alignment levels in the loss (part 7)."""
    lambda_reg: float = 1e-4
    """Weight of the L2 penalty on the batch's layer-0 ID embeddings (part 7)."""
    fusion: str = "attention"
    """How perspectives and modalities are combined (part 4): "attention" gates or a plain "sum"."""
    views: list[str] | None = None
    """Feature views (modalities) to use, by name; None = every view given; [] = none (ID only)."""
    use_memory: bool = True
    """Memory perspective of the modalities, H_m^mem (part 2)."""
    use_expansion: bool = True
    """Expansion perspective of the modalities, H_m^exp (part 3)."""
    use_hypergraph: bool = True
    """Hypergraph view G_m and its alpha term in the prediction (part 5)."""
    align_node: bool = True
    """Node-level alignment: modality a vs modality b of the same user / item (part 5)."""
    align_hyperedge: bool = True
    """Hyperedge-level alignment: hyperedge k under modality a vs under modality b (part 5)."""
    align_behaviour: bool = True
    """Behaviour-level alignment: the content view H_mm vs the ID view H_id (part 5)."""

    def __post_init__(self) -> None:
        for name in (
            "use_memory",
            "use_expansion",
            "use_hypergraph",
            "align_node",
            "align_hyperedge",
            "align_behaviour",
            "knn_weighted",
            "expand_ids",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # a part is removed by its use_* switch, so its layer counts must be positive (0 would be a hidden switch)
        for name in (
            "embedding_dim",
            "projection_hidden",
            "knn_k",
            "knn_block_size",
            "n_hyperedges",
            "n_ii_layers",
            "n_hyper_layers",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_ui_layers", "n_mm_layers", "alpha", "beta", "lambda_align", "lambda_reg"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hyperedge_tau", "align_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must lie in (0, 1], got {self.keep_rate}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.hyperedge_assignment not in ASSIGNMENTS:
            raise ValueError(f"hyperedge_assignment must be one of {ASSIGNMENTS}, got {self.hyperedge_assignment!r}")
        check_view_names(self.views)


def check_view_names(views: list[str] | None) -> None:
    """Raise a ValueError unless ``views`` is None or a list of distinct, non-empty names without '.'."""
    if views is None:
        return
    if not isinstance(views, list | tuple) or not all(isinstance(v, str) and v and "." not in v for v in views):
        raise ValueError(f"views must be null or a list of non-empty names without '.', got {views!r}")
    if len(set(views)) != len(views):
        raise ValueError(f"views must not repeat a name, got {views}")


def select_features(features: dict[str, np.ndarray], views: list[str] | None, n_items: int) -> dict[str, Tensor]:
    """The chosen feature views as float32 tensors (all of ``features`` when ``views`` is None), checked."""
    names = list(features) if views is None else list(views)
    check_view_names(names)
    missing = [v for v in names if v not in features]
    if missing:
        raise ValueError(f"feature view(s) {missing} not found; available: {sorted(features)}")
    out = {}
    for name in names:
        matrix = torch.as_tensor(np.asarray(features[name]), dtype=torch.float32)
        if matrix.dim() != 2 or matrix.shape[0] != n_items:
            raise ValueError(f"feature view {name!r}: expected shape ({n_items}, d), got {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError(f"feature view {name!r}: {int((~torch.isfinite(matrix)).any(1).sum())} rows hold NaN/inf")
        out[name] = matrix
    return out


def unique_pairs(ctx: ModelContext) -> tuple[np.ndarray, np.ndarray]:
    """The distinct training (user, item) pairs: a pair seen twice is one interaction, as in ``build_user_item_graph``."""
    pairs = np.unique(np.stack([np.asarray(ctx.train_users), np.asarray(ctx.train_items)], 1).astype(np.int64), axis=0)
    return pairs[:, 0], pairs[:, 1]


def user_mean_graph(ctx: ModelContext) -> PropagationGraph:
    """items -> users: out[u] = mean of x[i] over u's training items (0 for a user without items)."""
    users, items = unique_pairs(ctx)
    degree = np.bincount(users, minlength=ctx.n_users).astype(np.float32)
    scale = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
    return build_weighted_graph(ctx.n_items, ctx.n_users, items, users, None, ctx.graph_backend, dst_scale=scale)


def user_item_block(ctx: ModelContext) -> PropagationGraph:
    """items -> users: the user-item block of Â, out[u] = sum_i x[i] / sqrt(d_u d_i) (MGCN's R)."""
    users, items = unique_pairs(ctx)
    user_scale, item_scale = (
        np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1)), 0.0).astype(np.float32)
        for d in (np.bincount(users, minlength=ctx.n_users), np.bincount(items, minlength=ctx.n_items))
    )
    return build_weighted_graph(
        ctx.n_items, ctx.n_users, items, users, None, ctx.graph_backend, src_scale=item_scale, dst_scale=user_scale
    )


def info_nce(
    anchor: Tensor, positive: Tensor, tau: float, candidates: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """InfoNCE over cosine similarities: -log( exp(cos(a_i, p_i)/tau) / sum_j exp(cos(a_i, c_j)/tau) ).

    The candidates c are the positives (in-batch negatives, MGCN) unless given (LGMRec: all nodes).
    ``reduction`` "mean" (MGCN) or "sum" (LGMRec) over the anchors.
    """
    a, p = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    c = p if candidates is None else F.normalize(candidates, dim=1)
    loss = torch.logsumexp(a @ c.T / tau, dim=1) - (a * p).sum(1) / tau
    return loss.mean() if reduction == "mean" else loss.sum()


def gumbel_or_soft(logits: Tensor, tau: float, gumbel: bool) -> Tensor:
    """Gumbel-softmax(logits, tau) when ``gumbel`` (training), else the noise-free softmax(logits / tau)."""
    return F.gumbel_softmax(logits, tau=tau, dim=1, hard=False) if gumbel else torch.softmax(logits / tau, dim=1)


class AttentionGate(nn.Module):
    """Per-node softmax over candidate views of q^T tanh(W h + b) (MGCN's ``query_common``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))

    def forward(self, views: Tensor) -> Tensor:
        """views: (n_views, n_nodes, d) -> (n_nodes, d), a convex combination per node."""
        return (torch.softmax(self.score(views), dim=0) * views).sum(0)


def projection(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """The per-modality MLP; its output is centred over items, which would cancel a bias on the last layer."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, d_out, bias=False))


@dataclass
class DPRecViews:
    """One full-graph pass: every view of every node (rows: users first, then items)."""

    h_id: Tensor
    h_mm: Tensor | None = None
    h_modality: dict[str, Tensor] = field(default_factory=dict)
    g_modality: dict[str, Tensor] = field(default_factory=dict)
    hyperedges: dict[str, Tensor] = field(default_factory=dict)


def missing_for_alignment(level: str, n_views: int, has_content: bool, has_hypergraph: bool) -> str | None:
    """Why alignment ``level`` cannot run with these views and parts, or None when it can."""
    if level in ("node", "hyperedge") and n_views < 2:
        return "it needs two modalities"
    if level == "node" and not (has_hypergraph or has_content):
        return "it needs the hypergraph or a content perspective"
    if level == "hyperedge" and not has_hypergraph:
        return "it needs the hypergraph"
    if level == "behaviour" and not has_content:
        return "it needs a content view (the memory or expansion perspective)"
    return None


def active_alignment(cfg: DPRecConfig, n_views: int, has_content: bool, has_hypergraph: bool) -> dict[str, bool]:
    """The alignment levels that are switched on and can run; one that cannot is switched off and logged once."""
    wanted = [level for level in ALIGN_LEVELS if getattr(cfg, f"align_{level}")]
    off = {level: missing_for_alignment(level, n_views, has_content, has_hypergraph) for level in wanted}
    off = {level: why for level, why in off.items() if why}
    if off:
        log.warning(
            "DPRec: alignment switched off: %s", "; ".join(f"{level} level ({why})" for level, why in off.items())
        )
    return {level: level in wanted and level not in off for level in ALIGN_LEVELS}


class DPRec(Recommender):
    def __init__(self, cfg: DPRecConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        d = cfg.embedding_dim
        features = select_features(ctx.features, cfg.views, ctx.n_items)
        self.view_names = list(features)
        self.perspectives = [p for p, on in (("memory", cfg.use_memory), ("expansion", cfg.use_expansion)) if on]
        self.has_content = bool(features) and bool(self.perspectives)
        self.has_hypergraph = bool(features) and cfg.use_hypergraph
        if features:
            self.align = active_alignment(cfg, len(features), self.has_content, self.has_hypergraph)
        else:
            log.warning(
                "DPRec: no item features (views=%s, given %s): it reduces to LightGCN on IDs, no alignment",
                cfg.views,
                sorted(ctx.features),
            )
            self.align = dict.fromkeys(ALIGN_LEVELS, False)
        self.backend = ctx.graph_backend

        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(ctx.n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(ctx.n_items, d)))
        self.ui_graph = build_user_item_graph(
            ctx.n_users, ctx.n_items, ctx.train_users, ctx.train_items, ctx.graph_backend
        )
        for name, matrix in features.items():
            # not persistent: the features come from the shards at load time, not from the checkpoint
            self.register_buffer(f"features_{name}", matrix, persistent=False)
        # Every part below exists only when it is switched on, so a part that is off has no parameters at all.
        memory = self.has_content and cfg.use_memory
        expansion = self.has_content and cfg.use_expansion
        self.expand_ids = expansion and cfg.expand_ids
        attend = self.has_content and cfg.fusion == "attention"
        self.user_mean = user_mean_graph(ctx) if memory or self.has_hypergraph else None
        self.user_block = user_item_block(ctx) if expansion else None
        self.knn = (
            {
                m: build_item_knn_graph(
                    f, cfg.knn_k, cfg.knn_weighted, cfg.knn_block_size, ctx.graph_backend, ctx.device
                )
                for m, f in features.items()
            }
            if expansion
            else {}
        )
        self.projection = (
            nn.ModuleDict({m: projection(f.shape[1], cfg.projection_hidden, d) for m, f in features.items()})
            if self.has_content
            else None
        )
        self.perspective_gate = (
            nn.ModuleDict({m: AttentionGate(d) for m in features}) if attend and len(self.perspectives) == 2 else None
        )
        self.modality_gate = AttentionGate(d) if attend and len(features) > 1 else None
        self.hyperedge_assign = (
            nn.ParameterDict(
                {
                    m: nn.Parameter(nn.init.xavier_uniform_(torch.empty(f.shape[1], cfg.n_hyperedges)))
                    for m, f in features.items()
                }
            )
            if self.has_hypergraph
            else None
        )
        self.incidence_dropout = nn.Dropout(1.0 - cfg.keep_rate)

    def _features(self, name: str) -> Tensor:
        return getattr(self, f"features_{name}")

    def _combine(self, views: list[Tensor], gate: AttentionGate | None) -> Tensor:
        """Sum of the views, attention-weighted with weights that sum to len(views), so uniform attention = sum."""
        if len(views) == 1:
            return views[0]
        stacked = torch.stack(views)
        return stacked.sum(0) if gate is None else len(views) * gate(stacked)

    def _memory(self, items: Tensor) -> Tensor:
        """H_m^mem: users start as the mean of their items' projections, then n_mm_layers rounds over Â (last kept)."""
        nodes = torch.cat([self.user_mean.propagate(items), items])
        for _ in range(self.cfg.n_mm_layers):
            nodes = self.ui_graph.propagate(nodes)
        return F.normalize(nodes, dim=1)

    def _expansion(self, name: str, items: Tensor) -> Tensor:
        """H_m^exp: n_ii_layers rounds over the kNN graph of F_m; users aggregate through the block of Â."""
        items = self._over_knn(name, items)
        return F.normalize(torch.cat([self.user_block.propagate(items), items]), dim=1)

    def _over_knn(self, name: str, items: Tensor) -> Tensor:
        """Ŝ_m^L' items: n_ii_layers rounds over the kNN graph of modality ``name``."""
        for _ in range(self.cfg.n_ii_layers):
            items = self.knn[name].propagate(items)
        return items

    def _content(self, views: DPRecViews) -> None:
        """Parts 1-4: per-modality dual-perspective views H_m and the fused content view H_mm."""
        for name in self.view_names:
            x = self.projection[name](self._features(name))
            x = x - x.mean(0, keepdim=True)  # centred over items: see "Where §3 is silent"
            parts = [self._memory(x) if p == "memory" else self._expansion(name, x) for p in self.perspectives]
            gate = None if self.perspective_gate is None else self.perspective_gate[name]
            views.h_modality[name] = self._combine(parts, gate)
        views.h_mm = self._combine(list(views.h_modality.values()), self.modality_gate)

    def _incidence(self, name: str) -> Tensor:
        """[users; items] x K incidence of modality ``name``: item rows from F_m W_m, user rows their mean."""
        gumbel = self.training and self.cfg.hyperedge_assignment == "gumbel"
        items = gumbel_or_soft(self._features(name) @ self.hyperedge_assign[name], self.cfg.hyperedge_tau, gumbel)
        return self.incidence_dropout(torch.cat([self.user_mean.propagate(items), items]))

    def _hypergraph(self, views: DPRecViews) -> None:
        """Part 5: G_m and the hyperedge embeddings of every modality, from H_id."""
        for name in self.view_names:
            incidence, nodes = self._incidence(name), views.h_id
            for _ in range(self.cfg.n_hyper_layers):
                nodes, hyperedges = hypergraph_conv(incidence, nodes, self.backend)
            views.g_modality[name], views.hyperedges[name] = nodes, hyperedges

    def _expanded_ids(self) -> Tensor:
        """Mean over modalities of the item ID embeddings after n_ii_layers rounds over each kNN graph."""
        return sum(self._over_knn(name, self.item_emb) for name in self.view_names) / len(self.view_names)

    def forward(self) -> DPRecViews:
        h_id = lightgcn_propagate(self.ui_graph, torch.cat([self.user_emb, self.item_emb]), self.cfg.n_ui_layers)
        if self.expand_ids:
            h_id = torch.cat([h_id[: self.n_users], h_id[self.n_users :] + self._expanded_ids()])
        views = DPRecViews(h_id=h_id)
        if self.has_content:
            self._content(views)
        if self.has_hypergraph:
            self._hypergraph(views)
        return views

    def predict_embeddings(self, views: DPRecViews) -> Tensor:
        """Part 6: e = H_id + beta * H_mm + alpha * normalise(sum_m G_m), for all N nodes."""
        e = views.h_id
        if views.h_mm is not None:
            e = e + self.cfg.beta * views.h_mm
        if views.g_modality:
            e = e + self.cfg.alpha * F.normalize(sum(views.g_modality.values()), dim=1)
        return e

    def final_embeddings(self) -> tuple[Tensor, Tensor]:
        e = self.predict_embeddings(self())
        return e[: self.n_users], e[self.n_users :]

    def _cross_modal(self, per_modality: dict[str, Tensor], rows: list[Tensor | slice]) -> Tensor:
        """Mean over modality pairs (a, b) of the summed InfoNCE of a vs b on each set of ``rows``."""
        pairs = list(itertools.combinations(per_modality, 2))
        total = sum(
            info_nce(per_modality[a][r], per_modality[b][r], self.cfg.align_tau) for a, b in pairs for r in rows
        )
        return total / len(pairs)

    def alignment_losses(self, views: DPRecViews, users: Tensor, pos: Tensor) -> dict[str, Tensor]:
        """Each active alignment level, in-batch over the batch's distinct users and positive items."""
        rows = [torch.unique(users), self.n_users + torch.unique(pos)]
        losses = {}
        if self.align["node"]:
            losses["node"] = self._cross_modal(views.g_modality if self.has_hypergraph else views.h_modality, rows)
        if self.align["hyperedge"]:
            losses["hyperedge"] = self._cross_modal(views.hyperedges, [slice(None)])
        if self.align["behaviour"]:
            losses["behaviour"] = sum(info_nce(views.h_mm[r], views.h_id[r], self.cfg.align_tau) for r in rows)
        return losses

    def calculate_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, float]]:
        views = self()
        e = self.predict_embeddings(views)
        u, p, n = e[users], e[self.n_users + pos], e[self.n_users + neg]
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        align = self.alignment_losses(views, users, pos)
        reg = self.cfg.lambda_reg * l2_reg(self.user_emb[users], self.item_emb[pos], self.item_emb[neg])
        loss = bpr + reg + self.cfg.lambda_align * sum(align.values())
        parts = {"bpr": float(bpr.detach()), "reg": float(reg.detach())}
        parts.update({f"align_{level}": float(value.detach()) for level, value in align.items()})
        return loss, parts
