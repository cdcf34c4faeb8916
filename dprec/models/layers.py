"""Building blocks that the multimodal models (DPRec, MGCN, LGMRec) share.

- modalities: ``check_modality_names`` (a config's ``modalities`` list), ``select_features`` (the chosen
  feature matrices, float32, checked), ``register_feature_buffers`` / ``feature_buffer``;
- graphs from the training pairs: ``unique_pairs``, ``user_mean_graph`` (out[u] = mean of x over u's items),
  ``user_item_block`` (the user-item block R of Â, out[u] = sum_i x[i] / sqrt(d_u d_i));
- propagation: ``propagate_rounds`` (x after n rounds over a graph, the last round kept), ``memory_rounds``
  (users start as the mean of their items, then rounds over Â), ``hypergraph_rounds``;
- layers: ``AttentionGate`` (per-node softmax of q^T tanh(W h + b) over candidates, MGCN), ``projection``
  (the per-modality MLP of DPRec), ``xavier`` (a Xavier-uniform parameter);
- losses: ``info_nce`` (cosine InfoNCE, through ``logsumexp_of_products``: blocks of a @ c.T that stay in
  cache, recomputed in the backward), ``norm_penalty`` (LGMRec's reg_loss); ``gumbel_or_soft``.

BPR and the squared L2 penalty are in ``dprec.models.base``.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dprec.graph import PropagationGraph, build_weighted_graph, hypergraph_conv
from dprec.models.base import ModelContext


def check_modality_names(modalities: list[str] | None) -> None:
    """Raise a ValueError unless ``modalities`` is None or a list of distinct, non-empty names without '.'."""
    if modalities is None:
        return
    if not isinstance(modalities, list | tuple) or not all(
        isinstance(m, str) and m and "." not in m for m in modalities
    ):
        raise ValueError(f"modalities must be null or a list of non-empty names without '.', got {modalities!r}")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must not repeat a name, got {modalities}")


def select_features(features: dict[str, np.ndarray], modalities: list[str] | None, n_items: int) -> dict[str, Tensor]:
    """The chosen modalities' features as float32 tensors (all of ``features`` when ``modalities`` is None), checked."""
    names = list(features) if modalities is None else list(modalities)
    check_modality_names(names)
    missing = [name for name in names if name not in features]
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


def register_feature_buffers(module: nn.Module, features: dict[str, Tensor]) -> None:
    """Hold each modality's features as buffer ``features_<name>``, not persistent: they come from the shards at
    load time, not from the checkpoint."""
    for name, matrix in features.items():
        module.register_buffer(f"features_{name}", matrix, persistent=False)


def feature_buffer(module: nn.Module, name: str) -> Tensor:
    """The features of modality ``name`` held by ``register_feature_buffers`` (on the module's device)."""
    return getattr(module, f"features_{name}")


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


def take_rows(x: Tensor, rows: Tensor | slice | None) -> Tensor:
    """The ``rows`` of x (all of x for None): ``index_select`` for an index tensor, whose backward is a fast
    ``index_add_`` (x[rows]'s backward, an accumulating ``index_put_``, cost 10x more on this CPU)."""
    if rows is None:
        return x
    return x.index_select(0, rows) if isinstance(rows, Tensor) else x[rows]


def propagate_rounds(graph: PropagationGraph, x: Tensor, n_rounds: int) -> Tensor:
    """x after ``n_rounds`` rounds over ``graph`` (the last round kept, not a mean over rounds as LightGCN)."""
    for _ in range(n_rounds):
        x = graph.propagate(x)
    return x


def memory_rounds(ui_graph: PropagationGraph, user_mean: PropagationGraph, items: Tensor, n_rounds: int) -> Tensor:
    """[users; items] after ``n_rounds`` over Â, users starting as the mean of their items (LGMRec's modality part)."""
    return propagate_rounds(ui_graph, torch.cat([user_mean.propagate(items), items]), n_rounds)


def hypergraph_rounds(
    incidence: Tensor, x: Tensor, n_rounds: int, backend: str, rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(nodes, hyperedges) after ``n_rounds`` hypergraph convolutions node -> hyperedge -> node from x (n_rounds >= 1);
    with ``rows`` (node indices) only those nodes of the last round, read out of a dense incidence for those rows
    alone (H[rows] (H^T x): the same sums, without the other nodes' products)."""
    for _ in range(n_rounds - 1):
        x, _ = hypergraph_conv(incidence, x, backend)
    if rows is not None and isinstance(incidence, Tensor):
        hyperedges = incidence.T @ x
        return take_rows(incidence, rows) @ hyperedges, hyperedges
    x, hyperedges = hypergraph_conv(incidence, x, backend)
    return take_rows(x, rows), hyperedges


def cosine_bound(tau: float) -> float:
    """A bound on |cos(a, c) / tau| for ``logsumexp_of_products``: |cosine| <= 1, and a little for rounding."""
    return 1.0 / tau + 1e-3


def info_nce(
    anchor: Tensor,
    positive: Tensor,
    tau: float,
    candidates: Tensor | None = None,
    reduction: str = "mean",
    group_size: int = 0,
    candidate_factors: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """InfoNCE over cosine similarities: -log( exp(cos(a_i, p_i)/tau) / sum_j exp(cos(a_i, c_j)/tau) ).

    The candidates c are the positives (in-batch negatives, MGCN) unless given (LGMRec: all nodes).
    ``reduction`` "mean" (MGCN) or "sum" (LGMRec) over the anchors, or "none" (one loss per anchor).

    ``group_size`` > 0 (in-batch candidates only): with more anchors than that, the anchors are split at random
    (torch's generator) into ``ceil(n / group_size)`` groups of near-equal size and each anchor's negatives are the
    positives of its group: the loss of a batch of ``group_size`` rows, at a cost linear in n instead of quadratic.
    n <= group_size (or 0) is the plain in-batch loss, and draws no random numbers.

    ``candidate_factors`` (L, R) with ``candidates == L @ R`` (n x K times K x d, K < d: a hypergraph read-out, every
    node a mix of K hyperedges): the same loss with the products over K columns instead of d,
    <a_i, c_j> / |c_j| = <a_i R^T, L_j> / |c_j| (the norms from ``candidates``), so the all-node denominator costs
    K / d of the dense one.
    """
    a, p = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    cos_bound = cosine_bound(tau)
    if candidates is None and 0 < group_size < len(a):
        n_groups = -(-len(a) // group_size)
        order = torch.randperm(len(a), device=a.device)
        # one gather into a random order: the groups are then contiguous slices, views of it
        a, p = take_rows(a, order), take_rows(p, order)
        bounds = [k * len(a) // n_groups for k in range(n_groups + 1)]
        loss = (
            torch.cat([logsumexp_of_products(a[i:j] / tau, p[i:j], cos_bound) for i, j in itertools.pairwise(bounds)])
            - (a * p).sum(1) / tau
        )
    elif candidate_factors is not None:
        if candidates is None:
            raise ValueError("candidate_factors need the candidates they factor (for the norms)")
        left, right = candidate_factors
        if left.shape[0] != candidates.shape[0] or right.shape[1] != candidates.shape[1] or left.shape[1] != len(right):
            raise ValueError(
                f"candidate_factors {tuple(left.shape)} x {tuple(right.shape)} do not factor candidates "
                f"{tuple(candidates.shape)}"
            )
        norms = torch.linalg.vector_norm(candidates, dim=1, keepdim=True).clamp_min(1e-12)  # F.normalize's
        loss = logsumexp_of_products((a / tau) @ right.T, left / norms, cos_bound) - (a * p).sum(1) / tau
    else:
        c = p if candidates is None else F.normalize(candidates, dim=1)
        loss = logsumexp_of_products(a / tau, c, cos_bound) - (a * p).sum(1) / tau
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def sampled_softmax_loss(users: Tensor, pos: Tensor, negatives: Tensor, tau: float) -> Tensor:
    """Mean over the (user, positive) rows of -log( e^{s(u, p)} / (e^{s(u, p)} + sum_j e^{s(u, n_j)}) ), s = cos / tau.

    Every row is ranked against the same negatives (the batch's uniform draws: a sampled softmax with no popularity
    correction to make; Wu et al., "On the Effectiveness of Sampled Softmax Loss for Item Recommendation", 2024).
    """
    u, p, n = F.normalize(users, dim=1), F.normalize(pos, dim=1), F.normalize(negatives, dim=1)
    s_pos = (u * p).sum(1) / tau
    return (torch.logaddexp(logsumexp_of_products(u / tau, n, cosine_bound(tau)), s_pos) - s_pos).mean()


LSE_BLOCK_FLOATS = 1 << 20
"""Entries of one block of ``a @ c.T`` in ``logsumexp_of_products`` (4 MiB: big enough for an efficient matmul, small
enough for the cache; 1 and 4 MiB were fastest of 1-64 MiB for 2,048 x 19,445 on this CPU)."""

LSE_KEEP_FLOATS = 1 << 22
"""Largest ``a @ c.T`` (entries, 16 MiB) whose softmax ``logsumexp_of_products`` keeps for the backward instead of
recomputing it (in-batch InfoNCE groups: 2,048 x 2,048); a larger one (against all users) is recomputed by blocks."""


NO_SHIFT_BOUND = 40.0
"""Largest bound on |<a_i, c_j>| for which ``logsumexp_of_products`` sums exp(<a_i, c_j>) without a shift: e^40 is
far from float32's overflow (e^88.7) and e^-40 far above its smallest normal (e^-87.3); InfoNCE over cosines passes
1 / tau, so every temperature above 0.025 skips the row maxima and the subtractions (two passes over each block)."""


NARROW_COLUMNS = 16
"""Widest a, c (columns) for which the backward of ``logsumexp_of_products`` multiplies by c^T stored contiguously:
with 4 columns (LGMRec's hyperedges) weights @ c and weights^T @ a took 733 and 905 us per 53 x 19,445 block, against
171 and 313 us the transposed way; with 64 the plain way is faster (1,036 and 1,066 us against 1,193 and 2,649)."""


class _LogSumExpOfProducts(torch.autograd.Function):
    """lse_i = log sum_j exp(<a_i, c_j>) by row blocks. The backward needs the softmax rows exp(<a_i, c_j> - lse_i):
    kept from the forward when the whole matrix is at most ``LSE_KEEP_FLOATS`` entries, else recomputed block by
    block, so no large similarity matrix is ever held. With ``bound`` (every |<a_i, c_j>| <= bound <=
    ``NO_SHIFT_BOUND``) no row maximum is subtracted: exp of the products directly, the recomputed softmax rows as
    exp(<a_i, c_j>) * (grad_i e^-lse_i)."""

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor, bound: float | None) -> Tensor:
        rows = max(1, LSE_BLOCK_FLOATS // max(len(c), 1))
        keep = len(a) * len(c) <= LSE_KEEP_FLOATS
        shift = bound is None or bound > NO_SHIFT_BOUND
        lse = torch.empty(len(a), dtype=a.dtype, device=a.device)
        softmax = []
        for start in range(0, len(a), rows):
            block = a[start : start + rows] @ c.T
            if shift:
                top = block.amax(1, keepdim=True)
                total = block.sub_(top).exp_().sum(1, keepdim=True)
                lse[start : start + rows] = total.log().add_(top).squeeze(1)
            else:
                total = block.exp_().sum(1, keepdim=True)
                lse[start : start + rows] = total.log().squeeze(1)
            if keep:
                softmax.append(block.div_(total))
        ctx.save_for_backward(a, c, lse, *softmax)
        ctx.rows, ctx.shift = rows, shift
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        a, c, lse, *softmax = ctx.saved_tensors
        grad_a = torch.empty_like(a)
        # few columns (LGMRec's hyperedges): both products against c run 3-4x faster on c^T stored contiguously
        narrow = a.shape[1] <= NARROW_COLUMNS
        c_t = c.T.contiguous() if narrow else None
        grad_c = torch.zeros_like(c_t if narrow else c)
        scale = None if softmax or ctx.shift else grad * torch.exp(-lse)
        for block, start in enumerate(range(0, len(a), ctx.rows)):
            sl = slice(start, start + ctx.rows)
            if softmax:
                weights = softmax[block] * grad[sl, None]  # kept (not scaled in place: a second backward reads them)
            elif ctx.shift:
                weights = (a[sl] @ c.T).sub_(lse[sl, None]).exp_().mul_(grad[sl, None])  # recomputed
            else:
                weights = (a[sl] @ c.T).exp_().mul_(scale[sl, None])  # recomputed, no shift
            if narrow:
                grad_a[sl] = weights @ c_t.T
                grad_c.addmm_(a[sl].T, weights)  # grad_c^T
            else:
                grad_a[sl] = weights @ c
                grad_c.addmm_(weights.T, a[sl])
        return grad_a, grad_c.T if narrow else grad_c, None


def logsumexp_of_products(a: Tensor, c: Tensor, bound: float | None = None) -> Tensor:
    """``torch.logsumexp(a @ c.T, dim=1)`` with its gradients, in cache-sized row blocks (module docstring).

    ``bound``: a known bound on every |<a_i, c_j>| (cosines over tau: 1 / tau), which lets a small one skip the
    row maxima (``NO_SHIFT_BOUND``); a wrong bound is the caller's error, not checked (checking costs a pass)."""
    if a.dim() != 2 or c.dim() != 2 or a.shape[1] != c.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) matrices, got {tuple(a.shape)} and {tuple(c.shape)}")
    if len(c) == 0:
        raise ValueError("logsumexp over zero candidates")
    return _LogSumExpOfProducts.apply(a, c, bound)


def norm_penalty(*tensors: Tensor) -> Tensor:
    """LGMRec's reg_loss: sum of the (not squared) L2 norms of the matrices, divided by the batch size."""
    return sum(torch.linalg.norm(t) for t in tensors) / tensors[-1].shape[0]


def gumbel_or_soft(logits: Tensor, tau: float, gumbel: bool) -> Tensor:
    """Gumbel-softmax(logits, tau) when ``gumbel`` (training), else the noise-free softmax(logits / tau)."""
    return F.gumbel_softmax(logits, tau=tau, dim=1, hard=False) if gumbel else torch.softmax(logits / tau, dim=1)


class BitDropout(nn.Module):
    """Dropout whose mask comes from packed random bits: each 63-bit draw of torch's generator
    (``random_`` on int64) gives three 16-bit uniforms (its low 48 bits, read as int16), an entry is kept where its
    uniform is among the lowest ``threshold`` = round((1 - p) 65536) of the 65536 values, and kept entries are
    scaled by 65536 / threshold, so the expectation is x exactly and the keep probability is 1 - p to within 2^-17
    (p = 0.2: 0.80000305). ``nn.Dropout`` draws one Bernoulli per entry, which on this 2-core CPU cost 21-29 ms for
    a 7,050 x 256 view (DPRec's feature dropout: 0.6 s of an 8 s epoch on Baby), against about 8 ms here.
    Same seed, same mask: the bits come from torch's default generator."""

    LOW = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)
    """The three int16 of an int64 that hold its low 48 bits."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p
        self.threshold = round((1.0 - p) * 65536)

    def keep(self, shape: torch.Size, device: torch.device) -> Tensor:
        """A bool mask of ``shape``, True where an entry is kept."""
        n = shape.numel()
        words = torch.empty(-(-n // 3), dtype=torch.int64, device=device).random_()
        uniforms = words.view(torch.int16).view(-1, 4)[:, self.LOW]  # each uniform over the 65536 int16 values
        return (uniforms < self.threshold - 32768).reshape(-1)[:n].view(shape)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return (x * self.keep(x.shape, x.device)).mul_(65536.0 / self.threshold)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AttentionGate(nn.Module):
    """Per-node softmax over candidate embeddings of q^T tanh(W h + b) (MGCN's ``query_common``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))

    def forward(self, candidates: Tensor) -> Tensor:
        """candidates: (n_candidates, n_nodes, d) -> (n_nodes, d), a convex combination per node."""
        return (torch.softmax(self.score(candidates), dim=0) * candidates).sum(0)


def projection(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """The per-modality MLP; its output is centred over items, which would cancel a bias on the last layer."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, d_out, bias=False))


def xavier(rows: int, cols: int) -> nn.Parameter:
    """A (rows x cols) parameter, Xavier-uniform initialised."""
    return nn.Parameter(nn.init.xavier_uniform_(torch.empty(rows, cols)))
