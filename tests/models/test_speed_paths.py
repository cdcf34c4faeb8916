"""The faster paths keep the arithmetic: each is compared with the path it replaced (written out here), loss and
every gradient within 1e-5.

- ``logsumexp_of_products`` (row blocks, the softmax kept or recomputed in the backward) against
  ``torch.logsumexp(a @ c.T)``;
- ``info_nce`` through it against the plain formula;
- DPRec's and MGCN's batch-rows forward (per-node parts for the batch's nodes only) against the full pass indexed
  after; LGMRec's InfoNCE over distinct anchors (weighted by their count), its all-node denominator over the
  hyperedges (``info_nce``'s candidate_factors), against one dense term per batch row.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import dprec.models.layers as layers
from dprec.graph import available_backends
from dprec.models.base import bpr_loss, l2_reg
from dprec.models.dprec import DPRec
from dprec.models.layers import info_nce, logsumexp_of_products
from tests.models.test_dprec import batch, make_model

TOL = {"rtol": 1e-5, "atol": 1e-6}


def old_info_nce(anchor, positive, tau, candidates=None, reduction="mean"):
    a, p = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    c = p if candidates is None else F.normalize(candidates, dim=1)
    loss = torch.logsumexp(a @ c.T / tau, dim=1) - (a * p).sum(1) / tau
    return loss.mean() if reduction == "mean" else loss.sum()


@pytest.mark.parametrize("keep", [0, layers.LSE_KEEP_FLOATS], ids=["recomputed", "kept"])
@pytest.mark.parametrize("block", [7, 64, layers.LSE_BLOCK_FLOATS])
@pytest.mark.parametrize("width", [8, layers.NARROW_COLUMNS + 8], ids=["narrow", "wide"])  # the two backward forms
def test_logsumexp_of_products_equals_torch(monkeypatch, block, keep, width):
    monkeypatch.setattr(layers, "LSE_BLOCK_FLOATS", block)
    monkeypatch.setattr(layers, "LSE_KEEP_FLOATS", keep)  # the softmax kept for the backward, or recomputed
    gen = torch.Generator().manual_seed(0)
    scale = 3 * (8 / width) ** 0.5  # products of the same size at either width
    a = (scale * torch.randn(37, width, generator=gen)).requires_grad_()
    c = (scale * torch.randn(23, width, generator=gen)).requires_grad_()
    upstream = torch.randn(37, generator=gen)
    got = logsumexp_of_products(a, c)
    (got * upstream).sum().backward()
    grads = a.grad.clone(), c.grad.clone()
    # the old path, torch.logsumexp, in float64: products up to ~70 here, where float32 torch itself is off by 3e-5
    a64, c64 = (t.detach().double().requires_grad_() for t in (a, c))
    want = torch.logsumexp(a64 @ c64.T, dim=1)
    (want * upstream.double()).sum().backward()
    # gradients are sums of terms ~10 that cancel to ~0.3: within 1e-5 absolute
    torch.testing.assert_close(got, want.float(), **TOL)
    torch.testing.assert_close(grads[0], a64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], c64.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [0, layers.LSE_KEEP_FLOATS], ids=["recomputed", "kept"])
def test_logsumexp_of_products_with_a_bound_skips_the_shift_and_equals_torch(monkeypatch, keep):
    """Products bounded by 1 / tau (cosines over tau): exp without row maxima, the same values and gradients."""
    monkeypatch.setattr(layers, "LSE_BLOCK_FLOATS", 64)
    monkeypatch.setattr(layers, "LSE_KEEP_FLOATS", keep)
    gen = torch.Generator().manual_seed(3)
    tau = 0.05  # products up to 20: exp(20) = 5e8, where a shift-free float32 sum must still be exact to 1e-5
    a = (F.normalize(torch.randn(37, 8, generator=gen), dim=1) / tau).requires_grad_()
    c = F.normalize(torch.randn(23, 8, generator=gen), dim=1).requires_grad_()
    upstream = torch.randn(37, generator=gen)
    got = logsumexp_of_products(a, c, bound=1 / tau + 1e-3)
    (got * upstream).sum().backward()
    a64, c64 = (t.detach().double().requires_grad_() for t in (a, c))
    want = torch.logsumexp(a64 @ c64.T, dim=1)
    (want * upstream.double()).sum().backward()
    torch.testing.assert_close(got, want.float(), **TOL)
    torch.testing.assert_close(a.grad, a64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.grad, c64.grad.float(), rtol=1e-5, atol=1e-5)


def test_logsumexp_of_products_is_stable_for_large_products():
    a, c = torch.full((2, 1), 100.0), torch.tensor([[1.0], [2.0]])  # products 100 and 200: exp overflows float32
    assert torch.isfinite(logsumexp_of_products(a, c)).all()
    torch.testing.assert_close(logsumexp_of_products(a, c), torch.logsumexp(a @ c.T, 1))
    with pytest.raises(ValueError, match="matrices"):
        logsumexp_of_products(torch.ones(3), c)


@pytest.mark.parametrize("keep", [0, layers.LSE_KEEP_FLOATS], ids=["recomputed", "kept"])
@pytest.mark.parametrize(("candidates", "reduction"), [(False, "mean"), (True, "sum")])
def test_info_nce_equals_the_plain_formula(monkeypatch, candidates, reduction, keep):
    monkeypatch.setattr(layers, "LSE_BLOCK_FLOATS", 50)  # several blocks
    monkeypatch.setattr(layers, "LSE_KEEP_FLOATS", keep)
    gen = torch.Generator().manual_seed(1)
    leaves = [torch.randn(n, 6, generator=gen).requires_grad_() for n in (20, 20, 45)]
    results = []
    for f in (info_nce, old_info_nce):
        for t in leaves:
            t.grad = None
        loss = f(leaves[0], leaves[1], 0.2, leaves[2] if candidates else None, reduction)
        loss.backward()
        results.append((loss.detach(), *(t.grad.clone() for t in leaves[: 3 if candidates else 2])))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("keep", [0, layers.LSE_KEEP_FLOATS], ids=["recomputed", "kept"])
def test_info_nce_over_candidate_factors_equals_the_dense_candidates(monkeypatch, keep):
    """LGMRec's all-node denominator over the K hyperedges of a hypergraph read-out, against the d columns."""
    monkeypatch.setattr(layers, "LSE_BLOCK_FLOATS", 50)
    monkeypatch.setattr(layers, "LSE_KEEP_FLOATS", keep)
    gen = torch.Generator().manual_seed(2)
    anchor, positive = (torch.randn(15, 16, generator=gen).requires_grad_() for _ in range(2))
    left = torch.rand(40, 3, generator=gen).requires_grad_()  # incidence: 40 nodes x 3 hyperedges
    right = torch.randn(3, 16, generator=gen).requires_grad_()  # hyperedges
    leaves = (anchor, positive, left, right)
    results = []
    for factored in (True, False):
        for t in leaves:
            t.grad = None
        candidates = left @ right
        loss = info_nce(
            anchor, positive, 0.2, candidates, "none", candidate_factors=(left, right) if factored else None
        )
        (loss * torch.arange(1.0, 16.0)).sum().backward()
        results.append((loss.detach(), *(t.grad.clone() for t in leaves)))
    for got, want in zip(*results, strict=True):  # the bar, 1e-5 (gradients here are sums weighted up to 15)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not factor"):
        info_nce(anchor, positive, 0.2, left @ right, candidate_factors=(left[:5], right))
    with pytest.raises(ValueError, match="need the candidates"):
        info_nce(anchor, positive, 0.2, None, candidate_factors=(left, right))


def full_pass_loss(model: DPRec, users, pos, neg):
    """DPRec's loss before batch rows: the full pass over all N nodes, indexed afterwards."""
    emb = model()
    n_users = model.n_users
    u, p, n = emb.e[users], emb.e[n_users + pos], emb.e[n_users + neg]
    bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
    rows = [torch.unique(users), n_users + torch.unique(pos)]
    align = {}
    tau = model.cfg.align_tau

    def cross(per_modality, row_sets):
        pairs = list(itertools.combinations(per_modality, 2))
        return sum(old_info_nce(per_modality[a][r], per_modality[b][r], tau) for a, b in pairs for r in row_sets) / len(
            pairs
        )

    if model.align["node"]:
        align["node"] = cross(emb.g_modality if model.has_hypergraph else emb.h_modality, rows)
    if model.align["hyperedge"]:
        align["hyperedge"] = cross(emb.hyperedges, [slice(None)])
    if model.align["behaviour"]:
        align["behaviour"] = sum(old_info_nce(emb.h_mm[r], emb.h_id[r], tau) for r in rows)
    reg = model.cfg.lambda_reg * l2_reg(model.user_emb[users], model.item_emb[pos], model.item_emb[neg])
    return bpr + reg + model.cfg.lambda_align * sum(align.values())


def loss_and_grads(model, loss_fn, users, pos, neg):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same Gumbel noise and dropout
    loss = loss_fn(users, pos, neg)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_equal_to_the_old_path(model, old_loss_fn):
    """The model's calculate_loss and ``old_loss_fn`` give the same loss and gradients on one batch."""
    users, pos, neg = batch(size=24)
    new_loss, new_grads = loss_and_grads(model, lambda u, p, n: model.calculate_loss(u, p, n)[0], users, pos, neg)
    old_loss, old_grads = loss_and_grads(model, lambda u, p, n: old_loss_fn(model, u, p, n), users, pos, neg)
    torch.testing.assert_close(new_loss, old_loss, **TOL)
    assert new_grads.keys() == old_grads.keys() and len(new_grads) > 4
    for name in old_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("backend", available_backends())
def test_memory_of_the_modalities_side_by_side_equals_one_by_one(backend):
    """DPRec's memory perspective: every modality in one sparse product per round, against one product each."""
    model = make_model(backend, views=("text", "image", "audio"))
    gen = torch.Generator().manual_seed(4)
    xs = {m: torch.randn(model.n_items, 8, generator=gen).requires_grad_() for m in model.modality_names}
    rows = torch.tensor([0, 3, 7, model.n_users + 2, model.n_users + 5])
    upstream = torch.randn(len(rows), 8, generator=gen)
    results = []
    for fn in (
        lambda: model._memories(xs, rows),
        lambda: {  # the old path: each modality on its own
            m: F.normalize(layers.memory_rounds(model.ui_graph, model.user_mean, x, model.cfg.n_mm_layers)[rows], dim=1)
            for m, x in xs.items()
        },
    ):
        for x in xs.values():
            x.grad = None
        out = fn()
        sum(((o * upstream).sum() * (k + 1) for k, o in enumerate(out.values()))).backward()
        results.append([o.detach() for o in out.values()] + [x.grad.clone() for x in xs.values()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


VARIANTS = [
    {},
    {"fusion": "sum"},
    {"use_hypergraph": False},
    {"use_memory": False},
    {"use_expansion": False, "n_hyper_layers": 2},
    {"expand_ids": True, "n_hyper_layers": 2},
]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("views", [("text", "image"), ("text",)])
def test_batch_rows_forward_equals_the_full_pass(backend, overrides, views):
    model = make_model(backend, views=views, **overrides)
    assert_equal_to_the_old_path(model, full_pass_loss)


def test_batch_rows_cover_only_the_batch():
    model = make_model()
    users, pos, neg = batch(size=8)
    rows = torch.unique(torch.cat([users, model.n_users + pos, model.n_users + neg]))
    model.train()
    emb = model(rows)
    assert (
        emb.e.shape == (len(rows), model.cfg.embedding_dim) < (model.n_users + model.n_items, model.cfg.embedding_dim)
    )
    assert emb.h_id.shape[0] == model.n_users + model.n_items  # the graph part covers every node
    model.eval()
    with torch.no_grad():
        full = model()
        torch.testing.assert_close(model(rows).e, full.e[rows], **TOL)


def mgcn_full_pass_loss(model, users, pos, neg):
    """MGCN's loss before batch rows: the full pass over all nodes, indexed afterwards."""
    e, side, h_id = model()
    u, p, n = e[users], e[model.n_users + pos], e[model.n_users + neg]
    bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
    reg = model.cfg.reg_weight * l2_reg(u, p, n)
    items = model.n_users + pos
    tau = model.cfg.cl_tau
    cl = old_info_nce(side[items], h_id[items], tau) + old_info_nce(side[users], h_id[users], tau)
    return bpr + reg + model.cfg.cl_weight * cl


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("views", [("text", "image"), ("text",)])
def test_mgcn_batch_rows_equal_the_full_pass(backend, views):
    from dprec.models.mgcn import MGCN, MGCNConfig
    from tests.models.test_dprec import random_context

    torch.manual_seed(0)
    model = MGCN(MGCNConfig(embedding_dim=8, knn_k=4), random_context(backend, views))
    assert_equal_to_the_old_path(model, mgcn_full_pass_loss)


def lgmrec_every_row_loss(model, users, pos, neg):
    """LGMRec's loss before distinct anchors: one InfoNCE term per batch row, duplicates computed again."""
    e, global_ = model()
    u, p, n = e[users], e[model.n_users + pos], e[model.n_users + neg]
    bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
    cl = torch.zeros(())
    for a, b in itertools.combinations(global_, 2):
        for rows, every in ((users, slice(None, model.n_users)), (model.n_users + pos, slice(model.n_users, None))):
            cl = cl + old_info_nce(global_[a][rows], global_[b][rows], model.cfg.tau, global_[b][every], "sum")
    return bpr + model.cfg.cl_weight * cl + model.cfg.reg_weight * layers.norm_penalty(u, p, n)


@pytest.mark.parametrize("backend", available_backends())
def test_lgmrec_distinct_anchors_equal_every_row(backend):
    from dprec.models.lgmrec import LGMRec, LGMRecConfig
    from tests.models.test_dprec import random_context

    users, pos, _ = batch(size=24)
    assert len(torch.unique(users)) < 24 and len(torch.unique(pos)) < 24  # duplicates: the case that changed
    torch.manual_seed(0)
    model = LGMRec(LGMRecConfig(embedding_dim=8, n_hyperedges=3, cl_weight=0.05), random_context(backend))
    assert_equal_to_the_old_path(model, lgmrec_every_row_loss)
