"""DPRec, as DESIGN.md §3 reads it: dual-perspective encoding, hypergraph multi-level cross-modal alignment.

N = n_users + n_items nodes (users first), Â the normalised user-item graph, F_m the features of modality m,
d the embedding size. ``DPRec.forward`` runs parts 1-6 in order; each part has a switch in ``DPRecConfig``.

1. Projection   X_m = MLP_m(dropout(F_m)), centred over items                               (items x d)
2. Memory       H_id = LightGCN(Â, ID embeddings);  H_m^mem = Â^L [mean_{i in N(u)} X_m[i] ; X_m]
3. Expansion    H_m^exp = [B Ŝ_m^L' X_m ; Ŝ_m^L' X_m]    (Ŝ_m: kNN graph of F_m, B: user-item block of Â)
4. Fusion       H_m = attention_p(H_m^mem, H_m^exp) per node;  H_mm = attention_m(H_m over modalities)
5. Hypergraph   A_m = softmax((F_m W_m + Gumbel noise) / tau), user rows the mean of their items' rows;
                G_m = (H H^T)^L H_id, H = [A_m(users) ; A_m(items)].  Alignment (InfoNCE, in-batch): node
                (G_m under modality a vs b), hyperedge (H^T x under a vs b), behaviour (H_mm vs H_id)
6. Prediction   e = H_id + beta * H_mm + alpha * normalise(sum_m G_m);  score(u, i) = <e_u, e_i>
7. Loss         BPR + lambda_align * (node + hyperedge) + lambda_behaviour * behaviour + lambda_reg * L2(ID emb.)
                (lambda_behaviour = lambda_align unless set; ``rec_loss`` "softmax" for a sampled softmax instead of
                BPR, ``lambda_id_cl`` for SimGCL's noisy-view contrast of the IDs: both off, they lost on validation)

Changed from §3 by the sparse catalogues (docs/design-notes.md#what-the-sparse-catalogues-changed): the expansion
perspective is off by default (``use_expansion``: it smoothed the content a second time and lowered validation on
Scientific and Instruments), the content counts half in the prediction (``beta`` 0.5: on Instruments' two code
views, nearly item identifiers, the full weight cost 0.009 validation R@20; on Scientific the two tie), H_id's
LightGCN runs on FREEDOM's degree-sensitively pruned graph in training (``ui_dropout`` 0.5: the ID view over-fitted
the few interactions), the raw features pass a dropout in training
(``feature_dropout`` 0.2: the content part fitted the interactions before the ID part had converged); every part
keeps its switch, and ``purified_ids`` (MGCN's item-item view of the IDs) and ``expand_ids`` are the ID-side
expansions.

One modality switches the cross-modal levels off, no features leave LightGCN on IDs (each logged once).
Defaults, the choices where §3 is silent, and why: docs/design-notes.md#modelsdprec.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dprec.config import check_types
from dprec.graph import build_user_item_graph, lightgcn_propagate
from dprec.graph.knn import DEFAULT_BLOCK_SIZE, build_item_knn_graph
from dprec.models.base import ModelContext, Recommender, bpr_loss, l2_reg
from dprec.models.freedom import DegreePruning
from dprec.models.layers import (
    AttentionGate,
    BitDropout,
    check_modality_names,
    feature_buffer,
    gumbel_or_soft,
    hypergraph_rounds,
    info_nce,
    memory_rounds,
    projection,
    propagate_rounds,
    register_feature_buffers,
    sampled_softmax_loss,
    select_features,
    take_rows,
    user_item_block,
    user_mean_graph,
    xavier,
)

logger = logging.getLogger(__name__)

Fusion = Literal["attention", "sum"]
Assignment = Literal["gumbel", "soft"]
RecLoss = Literal["bpr", "softmax"]
ALIGN_LEVELS = ("node", "hyperedge", "behaviour")
EVERY_PART: dict[str, object] = {"use_expansion": True}
"""The switches that put back the parts that are off by default (every part of DESIGN §3 on): what the speed and
scale benchmarks time, so their tables are the cost of the whole model, kNN graphs included."""


@dataclass
class DPRecConfig:
    """DPRec hyper-parameters and the switch of every part of DESIGN.md §3 (defaults: docs/design-notes.md)."""

    embedding_dim: int = 64
    """d: size of ID embeddings, projections and every node embedding."""
    projection_hidden: int = 256
    """Hidden width of the per-modality projection MLP (part 1)."""
    feature_dropout: float = 0.2
    """Dropout on the raw features F_m before the projection, in training (part 1; ``layers.BitDropout``, the same
    Bernoulli mask from packed random bits): the content part fitted the few interactions long before the ID part had
    converged (best epochs 21-33 on Scientific); 0.2 raised validation R@20 there on every seed
    (docs/design-notes.md#what-the-sparse-catalogues-changed). 0 = off."""
    n_ui_layers: int = 2
    """LightGCN layers over the user-item graph for the ID embeddings H_id (part 2)."""
    ui_dropout: float = 0.5
    """FREEDOM's denoising for H_id: in training, each epoch's LightGCN over Â runs on a degree-sensitively pruned
    graph keeping 1 - ui_dropout of the interactions (``freedom.DegreePruning``); evaluation uses the full Â.
    0 = the full graph always."""
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
    """Expansion perspective also over the IDs: the item rows of H_id gain the mean over modalities of
    Ŝ_m^L' E_items, the item ID embeddings propagated over the kNN graphs (FREEDOM's item-item convolution)."""
    purified_ids: bool = False
    """Purified ID expansion (MGCN's item-item view): every row of H_id gains the mean over modalities of
    [B Ŝ_m^L' P_m ; Ŝ_m^L' P_m], P_m = E_items * sigmoid(W_m X_m + b_m), the item ID embeddings gated by the
    modality's projection, so the kNN graph of the content spreads behaviour, not content (the content view alone
    was weaker where it lagged the IDs). Independent of use_expansion (it builds the kNN graphs itself)."""
    n_hyperedges: int = 4
    """K: number of learnable hyperedges shared by all modalities (part 5)."""
    n_hyper_layers: int = 1
    """Hypergraph convolutions node -> hyperedge -> node (part 5)."""
    hyperedge_assignment: Assignment = "gumbel"
    """Training-time item-to-hyperedge assignment: "gumbel" (Gumbel-softmax, LGMRec) or "soft" (softmax)."""
    hyperedge_tau: float = 0.2
    """Temperature of the hyperedge assignment softmax."""
    keep_rate: float = 0.5
    """Probability of keeping an incidence entry in training (dropout 1 - keep_rate on the hypergraph)."""
    alpha: float = 0.3
    """Weight of the normalised hypergraph embeddings in the prediction (part 6)."""
    beta: float = 0.5
    """Weight of the content embeddings H_mm in the prediction (part 6). H_mm is built from unit-norm
    perspectives, so its scale is fixed; a smaller beta lets the ID embeddings lead where content is weak. 0.5 since
    the Instruments probe: valid R@20 0.2227 against 0.2129 at 1.0 there (seed 1), 0.1991 against 0.1990 on Scientific
    (docs/design-notes.md, "The content at half weight")."""
    align_tau: float = 0.2
    """InfoNCE temperature of every alignment level."""
    align_group: int = 2048
    """Most rows one in-batch alignment InfoNCE compares: a batch touching more users (items) is split at random
    into groups of at most this many, each row's negatives the other rows of its group (``layers.info_nce``), so a
    large batch keeps the negatives of a batch of this size at a linear cost; 0 = the whole batch."""
    lambda_align: float = 0.01
    """Weight of the sum of the alignment levels in the loss (part 7); the behaviour level's unless
    ``lambda_behaviour`` sets its own."""
    lambda_behaviour: float | None = None
    """Weight of the behaviour level alone (content vs IDs); None = lambda_align. Tells the levels apart: on
    Instruments the behaviour level at 0.1 with the cross-modal levels at 0.01 over-fitted as lambda_align 0.1 did
    (docs/design-notes.md#what-the-sparse-catalogues-changed), where one view (Scientific) wanted 0.1."""
    lambda_reg: float = 1e-4
    """Weight of the L2 penalty on the batch's layer-0 ID embeddings (part 7)."""
    lambda_id_cl: float = 0.0
    """Weight of the ID-view contrast (SimGCL: Yu et al., "Are Graph Augmentations Necessary?", SIGIR 2022): two
    LightGCN passes of the ID embeddings over H_id's graph, each layer perturbed by random noise of norm
    ``id_cl_eps``, and InfoNCE (``align_tau``, in-batch, ``align_group``) between the two views of the batch's users
    and items. It spreads the ID embeddings (uniformity) where few interactions leave them crowded. 0 = off."""
    id_cl_eps: float = 0.1
    """Norm of the noise added to every layer of the ID views (``lambda_id_cl``)."""
    rec_loss: RecLoss = "bpr"
    """The ranking loss (part 7): "bpr" (each positive against its own sampled negative, score = dot product) or
    "softmax": sampled softmax over cosine scores, each user's positive against every negative item the batch drew
    (uniform, so no popularity correction), temperature ``softmax_tau``; the model then ranks by cosine (its final
    embeddings are unit rows)."""
    softmax_tau: float = 0.1
    """Temperature of the sampled softmax (``rec_loss`` "softmax")."""
    negative_candidates: int = 1
    """Dynamic negative sampling (Zhang et al., "Optimizing Top-N Collaborative Filtering via Dynamic Negative Item
    Sampling", SIGIR 2013): each positive draws this many uniform negatives among the items its user has not trained
    on, and the ranking loss takes the one the model scores highest now (the choice is not differentiated); with
    ``rec_loss`` "softmax" every candidate is a negative. 1 = one uniform negative (off)."""
    fusion: Fusion = "attention"
    """How perspectives and modalities are combined (part 4): "attention" gates or a plain "sum"."""
    modalities: list[str] | None = None
    """Modalities (feature views) to use, by name; None = every one given; [] = none (ID only)."""
    use_memory: bool = True
    """Memory perspective of the modalities, H_m^mem (part 2)."""
    use_expansion: bool = False
    """Expansion perspective of the modalities, H_m^exp (part 3)."""
    use_hypergraph: bool = True
    """Hypergraph embeddings G_m, their alpha term in the prediction and the node / hyperedge alignment levels
    (part 5)."""
    align_node: bool = True
    """Node-level alignment: modality a vs modality b of the same user / item (part 5)."""
    align_hyperedge: bool = True
    """Hyperedge-level alignment: hyperedge k under modality a vs under modality b (part 5)."""
    align_behaviour: bool = True
    """Behaviour-level alignment: the content embeddings H_mm vs the ID embeddings H_id (part 5)."""

    def __post_init__(self) -> None:
        check_types(self)
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
        for name in (
            "n_ui_layers",
            "n_mm_layers",
            "alpha",
            "beta",
            "lambda_align",
            "lambda_reg",
            "align_group",
            "lambda_id_cl",
            "id_cl_eps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.negative_candidates < 1:
            raise ValueError(f"negative_candidates must be >= 1, got {self.negative_candidates}")
        for name in ("hyperedge_tau", "align_tau", "softmax_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lambda_behaviour is not None and self.lambda_behaviour < 0:
            raise ValueError(f"lambda_behaviour must be >= 0, got {self.lambda_behaviour}")
        if not 0 <= self.feature_dropout < 1:
            raise ValueError(f"feature_dropout must lie in [0, 1), got {self.feature_dropout}")
        if not 0 <= self.ui_dropout < 1:
            raise ValueError(f"ui_dropout must lie in [0, 1), got {self.ui_dropout}")
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must lie in (0, 1], got {self.keep_rate}")
        check_modality_names(self.modalities)


@dataclass
class DPRecEmbeddings:
    """What one full-graph pass (``DPRec.forward``) gives, for every node: rows users first, then items."""

    h_id: Tensor
    """Part 2: ID embeddings after LightGCN over Â (item rows + the kNN-expanded IDs with ``expand_ids``)."""
    h_modality: dict[str, Tensor] = field(default_factory=dict)
    """Part 4: per modality, the fusion H_m of its memory and expansion perspectives."""
    h_mm: Tensor | None = None
    """Part 4: the content embeddings H_mm, the fusion of H_m over modalities (None without content)."""
    g_modality: dict[str, Tensor] = field(default_factory=dict)
    """Part 5: per modality, the hypergraph embeddings G_m."""
    hyperedges: dict[str, Tensor] = field(default_factory=dict)
    """Part 5: per modality, the K x d hyperedge embeddings of the last hypergraph convolution."""
    e: Tensor | None = None
    """Part 6: the final embeddings, score(u, i) = <e_u, e_i>."""
    rows: Tensor | None = None
    """The nodes (sorted, distinct) that the per-node fields h_modality, h_mm, g_modality and e hold, in this
    order; None = all N nodes. h_id and hyperedges always cover everything."""

    def position(self, nodes: Tensor) -> Tensor:
        """Where ``nodes`` are in the per-node fields."""
        return nodes if self.rows is None else torch.searchsorted(self.rows, nodes)


def missing_for_alignment(level: str, n_modalities: int, has_content: bool, has_hypergraph: bool) -> str | None:
    """Why alignment ``level`` cannot run with these modalities and parts, or None when it can."""
    if level in ("node", "hyperedge") and n_modalities < 2:
        return "it needs two modalities"
    if level == "node" and not (has_hypergraph or has_content):
        return "it needs the hypergraph or a content perspective"
    if level == "hyperedge" and not has_hypergraph:
        return "it needs the hypergraph"
    if level == "behaviour" and not has_content:
        return "it needs content embeddings (the memory or expansion perspective)"
    return None


def active_alignment(cfg: DPRecConfig, n_modalities: int, has_content: bool, has_hypergraph: bool) -> dict[str, bool]:
    """The alignment levels that are switched on and can run; one that cannot is switched off and logged once."""
    wanted = [level for level in ALIGN_LEVELS if getattr(cfg, f"align_{level}")]
    off = {level: missing_for_alignment(level, n_modalities, has_content, has_hypergraph) for level in wanted}
    off = {level: why for level, why in off.items() if why}
    if off:
        logger.warning(
            "DPRec: alignment switched off: %s", "; ".join(f"{level} level ({why})" for level, why in off.items())
        )
    return {level: level in wanted and level not in off for level in ALIGN_LEVELS}


class DPRec(Recommender):
    train_defaults: ClassVar[dict[str, int | float]] = {"batch_size": 8192, "feature_rank": 256, "lr": 0.005}
    """Every step is a full-graph pass through the feature projections, so larger steps over reduced views, at a
    learning rate for 4x fewer steps an epoch (switches chosen on validation: docs/benchmarks.md#speed-switches)."""

    def __init__(self, cfg: DPRecConfig, ctx: ModelContext) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        d = cfg.embedding_dim
        features = select_features(ctx.features, cfg.modalities, ctx.n_items)
        self.modality_names = list(features)
        n_perspectives = int(cfg.use_memory) + int(cfg.use_expansion)
        self.has_content = bool(features) and n_perspectives > 0
        self.has_hypergraph = bool(features) and cfg.use_hypergraph
        if features:
            self.align = active_alignment(cfg, len(features), self.has_content, self.has_hypergraph)
        else:
            logger.warning(
                "DPRec: no item features (modalities=%s, given %s): it reduces to LightGCN on IDs, no alignment",
                cfg.modalities,
                sorted(ctx.features),
            )
            self.align = dict.fromkeys(ALIGN_LEVELS, False)
        self.backend = ctx.graph_backend

        self.user_emb = xavier(ctx.n_users, d)
        self.item_emb = xavier(ctx.n_items, d)
        self.ui_graph = build_user_item_graph(
            ctx.n_users, ctx.n_items, ctx.train_users, ctx.train_items, ctx.graph_backend
        )
        register_feature_buffers(self, features)
        # Every part below exists only when it is switched on, so a part that is off has no parameters at all.
        self.use_memory = self.has_content and cfg.use_memory
        self.use_expansion = self.has_content and cfg.use_expansion
        self.expand_ids = self.use_expansion and cfg.expand_ids
        self.purified_ids = bool(features) and cfg.purified_ids
        attend = self.has_content and cfg.fusion == "attention"
        self.pruning = DegreePruning(ctx, cfg.ui_dropout) if cfg.ui_dropout > 0 else None
        self.pruned_graph = None
        self.user_mean = user_mean_graph(ctx) if self.use_memory or self.has_hypergraph else None
        self.user_block = user_item_block(ctx) if self.use_expansion or self.purified_ids else None
        self.knn = (
            {
                m: build_item_knn_graph(
                    f, cfg.knn_k, cfg.knn_weighted, cfg.knn_block_size, ctx.graph_backend, ctx.device
                )
                for m, f in features.items()
            }
            if self.use_expansion or self.purified_ids
            else {}
        )
        self.projection = (
            nn.ModuleDict({m: projection(f.shape[1], cfg.projection_hidden, d) for m, f in features.items()})
            if self.has_content or self.purified_ids
            else None
        )
        self.purifier = (
            nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.Sigmoid()) for m in features})
            if self.purified_ids
            else None
        )
        self.perspective_gate = (
            nn.ModuleDict({m: AttentionGate(d) for m in features}) if attend and n_perspectives == 2 else None
        )
        self.modality_gate = AttentionGate(d) if attend and len(features) > 1 else None
        self.hyperedge_assign = (
            nn.ParameterDict({m: xavier(f.shape[1], cfg.n_hyperedges) for m, f in features.items()})
            if self.has_hypergraph
            else None
        )
        self.incidence_dropout = nn.Dropout(1.0 - cfg.keep_rate)
        self.feature_dropout = BitDropout(cfg.feature_dropout) if cfg.feature_dropout > 0 else nn.Identity()

    def forward(self, rows: Tensor | None = None) -> DPRecEmbeddings:
        """One full-graph pass through DESIGN.md §3, parts 1-6 in order (users first).

        The graph parts propagate over all nodes; the per-node parts (normalisation, fusion, the last hypergraph
        read-out, the prediction) run only for ``rows`` (sorted distinct node indices; None = all N nodes), the
        nodes a training batch touches: the same numbers for those rows, a fraction of the work.
        """
        needs_x = self.has_content or self.purified_ids
        xs = {name: self._projection(name) for name in self.modality_names} if needs_x else {}  # 1
        out = DPRecEmbeddings(h_id=self._id_memory(xs), rows=rows)  # 2 (and 3 for the IDs: expand/purified_ids)
        if self.has_content:
            memories = self._memories(xs, rows) if self.use_memory else {}  # 2
            for name in self.modality_names:
                x = xs[name]
                memory = memories.get(name)
                expansion = self._expansion(name, x, rows) if self.use_expansion else None  # 3
                out.h_modality[name] = self._fuse_perspectives(name, memory, expansion)  # 4, per modality
            out.h_mm = self._fuse(list(out.h_modality.values()), self.modality_gate)  # 4, over modalities
        if self.has_hypergraph:
            for name in self.modality_names:
                out.g_modality[name], out.hyperedges[name] = self._hypergraph(name, out.h_id, rows)  # 5
        out.e = self.predict_embeddings(out)  # 6
        return out

    def _id_memory(self, xs: dict[str, Tensor]) -> Tensor:
        """H_id = LightGCN(Â, ID embeddings); with expand_ids its item rows gain the mean over modalities of Ŝ_m^L' E;
        with purified_ids every row gains the mean over modalities of the purified ID view (MGCN's item-item view)."""
        h_id = lightgcn_propagate(self._id_graph(), torch.cat([self.user_emb, self.item_emb]), self.cfg.n_ui_layers)
        names = self.modality_names
        if self.expand_ids:
            expanded = sum(propagate_rounds(self.knn[m], self.item_emb, self.cfg.n_ii_layers) for m in names)
            h_id = torch.cat([h_id[: self.n_users], h_id[self.n_users :] + expanded / len(names)])
        if self.purified_ids:
            views = []
            for m in names:
                items = propagate_rounds(self.knn[m], self.item_emb * self.purifier[m](xs[m]), self.cfg.n_ii_layers)
                views.append(torch.cat([self.user_block.propagate(items), items]))
            h_id = h_id + sum(views) / len(names)
        return h_id

    def _id_graph(self):
        """The graph of H_id's LightGCN: this epoch's pruned graph in training (``ui_dropout``), else the full Â."""
        if self.pruning is None or not self.training:
            return self.ui_graph
        if self.pruned_graph is None:  # a model used outside the trainer: epoch 0 of seed 0
            self.start_epoch(0, 0)
        return self.pruned_graph

    def _noisy_id_view(self) -> Tensor:
        """SimGCL's view of the IDs: n_ui_layers rounds over H_id's graph, each layer plus sign(x) * eps * a random
        unit vector, the mean of the perturbed layers (layer 0 left out, as SimGCL)."""
        graph, x, layers = self._id_graph(), torch.cat([self.user_emb, self.item_emb]), []
        for _ in range(max(1, self.cfg.n_ui_layers)):
            x = graph.propagate(x)
            x = x + torch.sign(x) * F.normalize(torch.rand_like(x), dim=1) * self.cfg.id_cl_eps
            layers.append(x)
        return torch.stack(layers).mean(0)

    def id_contrast(self, users: Tensor, pos: Tensor) -> Tensor:
        """``lambda_id_cl``'s InfoNCE between two noisy ID views, over the batch's distinct users and items."""
        first, second = self._noisy_id_view(), self._noisy_id_view()
        nodes = [torch.unique(users), self.n_users + torch.unique(pos)]
        return sum(
            info_nce(take_rows(first, r), take_rows(second, r), self.cfg.align_tau, group_size=self.cfg.align_group)
            for r in nodes
        )

    def negatives_per_positive(self) -> int:
        return self.cfg.negative_candidates

    def start_epoch(self, epoch: int, seed: int) -> None:
        """Draw this epoch's pruned user-item graph for H_id (ui_dropout > 0; otherwise nothing to do)."""
        if self.pruning is not None:
            self.pruned_graph = self.pruning.graph(epoch, seed, self.user_emb.device)

    def _projection(self, name: str) -> Tensor:
        """X_m = MLP_m(F_m), centred over items (docs/design-notes.md#modelsdprec: why centred)."""
        x = self.projection[name](self.feature_dropout(feature_buffer(self, name)))
        return x - x.mean(0, keepdim=True)

    def _memories(self, xs: dict[str, Tensor], rows: Tensor | None) -> dict[str, Tensor]:
        """H_m^mem of every modality: users start as the mean of their items' projections, then n_mm_layers rounds
        over Â (last kept). The modalities travel side by side as the columns of one matrix: each round is one
        sparse product for all of them (the same sums per column, one pass over the graph's edges)."""
        names = list(xs)
        side_by_side = memory_rounds(
            self.ui_graph, self.user_mean, torch.cat([xs[m] for m in names], 1), self.cfg.n_mm_layers
        )
        parts = take_rows(side_by_side, rows).split([xs[m].shape[1] for m in names], dim=1)
        return {m: F.normalize(part, dim=1) for m, part in zip(names, parts, strict=True)}

    def _expansion(self, name: str, items: Tensor, rows: Tensor | None) -> Tensor:
        """H_m^exp: n_ii_layers rounds over the kNN graph of F_m; users aggregate through the block of Â."""
        items = propagate_rounds(self.knn[name], items, self.cfg.n_ii_layers)
        return F.normalize(take_rows(torch.cat([self.user_block.propagate(items), items]), rows), dim=1)

    def _fuse_perspectives(self, name: str, memory: Tensor | None, expansion: Tensor | None) -> Tensor:
        """H_m: the perspectives of modality ``name`` that are switched on, fused by its gate (or summed)."""
        gate = None if self.perspective_gate is None else self.perspective_gate[name]
        return self._fuse([p for p in (memory, expansion) if p is not None], gate)

    def _fuse(self, candidates: list[Tensor], gate: AttentionGate | None) -> Tensor:
        """Sum of the candidates, attention-weighted with weights that sum to len(candidates): uniform = plain sum."""
        if len(candidates) == 1:
            return candidates[0]
        stacked = torch.stack(candidates)
        return stacked.sum(0) if gate is None else len(candidates) * gate(stacked)

    def _incidence(self, name: str) -> Tensor:
        """[users; items] x K incidence of modality ``name``: item rows from F_m W_m, user rows their mean."""
        gumbel = self.training and self.cfg.hyperedge_assignment == "gumbel"
        logits = feature_buffer(self, name) @ self.hyperedge_assign[name]
        items = gumbel_or_soft(logits, self.cfg.hyperedge_tau, gumbel)
        return self.incidence_dropout(torch.cat([self.user_mean.propagate(items), items]))

    def _hypergraph(self, name: str, h_id: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """(G_m of ``rows``, hyperedge embeddings) of modality ``name``: n_hyper_layers convolutions from H_id."""
        return hypergraph_rounds(self._incidence(name), h_id, self.cfg.n_hyper_layers, self.backend, rows)

    def predict_embeddings(self, emb: DPRecEmbeddings) -> Tensor:
        """Part 6: e = H_id + beta * H_mm + alpha * normalise(sum_m G_m), for the nodes ``emb.rows``."""
        e = take_rows(emb.h_id, emb.rows)
        if emb.h_mm is not None:
            e = e + self.cfg.beta * emb.h_mm
        if emb.g_modality:
            e = e + self.cfg.alpha * F.normalize(sum(emb.g_modality.values()), dim=1)
        return e

    def final_embeddings(self) -> tuple[Tensor, Tensor]:
        e = self().e
        if self.cfg.rec_loss == "softmax":  # trained on cosines: unit rows make the served dot product the cosine
            e = F.normalize(e, dim=1)
        return e[: self.n_users], e[self.n_users :]

    def _cross_modal(self, per_modality: dict[str, Tensor], rows: list[Tensor | slice]) -> Tensor:
        """Mean over modality pairs (a, b) of the summed InfoNCE of a vs b on each set of ``rows``."""
        pairs = list(itertools.combinations(per_modality, 2))
        total = sum(
            info_nce(
                take_rows(per_modality[a], r),
                take_rows(per_modality[b], r),
                self.cfg.align_tau,
                group_size=self.cfg.align_group,
            )
            for a, b in pairs
            for r in rows
        )
        return total / len(pairs)

    def alignment_losses(self, emb: DPRecEmbeddings, users: Tensor, pos: Tensor) -> dict[str, Tensor]:
        """Each active alignment level (part 5), in-batch over the batch's distinct users and positive items."""
        nodes = [torch.unique(users), self.n_users + torch.unique(pos)]
        rows = [emb.position(r) for r in nodes]
        losses = {}
        if self.align["node"]:
            losses["node"] = self._cross_modal(emb.g_modality if self.has_hypergraph else emb.h_modality, rows)
        if self.align["hyperedge"]:
            losses["hyperedge"] = self._cross_modal(emb.hyperedges, [slice(None)])
        if self.align["behaviour"]:
            losses["behaviour"] = sum(
                info_nce(
                    take_rows(emb.h_mm, r),
                    take_rows(emb.h_id, node),
                    self.cfg.align_tau,
                    group_size=self.cfg.align_group,
                )
                for r, node in zip(rows, nodes, strict=True)
            )
        return losses

    def align_weight(self, level: str) -> float:
        """The loss weight of alignment ``level``: ``lambda_behaviour`` for the behaviour level where set, else
        ``lambda_align``."""
        if level == "behaviour" and self.cfg.lambda_behaviour is not None:
            return self.cfg.lambda_behaviour
        return self.cfg.lambda_align

    def calculate_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Part 7: BPR + each active alignment level times its weight (``align_weight``) + lambda_reg * L2.

        The per-node parts run for the batch's nodes only (``forward(rows)``).
        """
        users_at, pos_at, neg_at = users, self.n_users + pos, self.n_users + neg
        emb = self(torch.unique(torch.cat([users_at, pos_at, neg_at.reshape(-1)])))
        u, p = (take_rows(emb.e, emb.position(nodes)) for nodes in (users_at, pos_at))
        if self.cfg.rec_loss == "softmax":
            negatives = take_rows(emb.e, emb.position(torch.unique(neg_at)))
            rank = sampled_softmax_loss(u, p, negatives, self.cfg.softmax_tau)
        else:
            if neg.dim() == 2:  # dynamic negative sampling: each pair's hardest candidate under the current model
                with torch.no_grad():
                    candidates = take_rows(emb.e, emb.position(neg_at.reshape(-1))).reshape(*neg.shape, -1)
                    hardest = torch.einsum("bd,bmd->bm", u, candidates).argmax(1)
                neg = neg.gather(1, hardest[:, None]).squeeze(1)
                neg_at = self.n_users + neg
            n = take_rows(emb.e, emb.position(neg_at))
            rank = bpr_loss((u * p).sum(1), (u * n).sum(1))
        align = self.alignment_losses(emb, users, pos)
        ids = take_rows(self.user_emb, users), take_rows(self.item_emb, pos), take_rows(self.item_emb, neg)
        reg = self.cfg.lambda_reg * l2_reg(*ids)
        loss = rank + reg + sum(self.align_weight(level) * value for level, value in align.items())
        parts = {self.cfg.rec_loss: float(rank.detach()), "reg": float(reg.detach())}
        if self.cfg.lambda_id_cl > 0:
            id_cl = self.id_contrast(users, pos)
            loss = loss + self.cfg.lambda_id_cl * id_cl
            parts["id_cl"] = float(id_cl.detach())
        parts.update({f"align_{level}": float(value.detach()) for level, value in align.items()})
        return loss, parts
