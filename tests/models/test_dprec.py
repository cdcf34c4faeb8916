"""DPRec (dprec.models.dprec): shapes, switches, gradients, references, backends, degradation and learning."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from dprec.config import ConfigError
from dprec.graph import available_backends
from dprec.models import ModelContext
from dprec.models.dprec import EVERY_PART, DPRec, DPRecConfig
from dprec.models.layers import BitDropout, info_nce, sampled_softmax_loss
from dprec.models.lightgcn import LightGCN, LightGCNConfig
from dprec.training.config import RunConfig

N_USERS, N_ITEMS = 40, 30
requires_dgl = pytest.mark.skipif("dgl" not in available_backends(), reason="DGL does not import here")


def random_context(backend: str = "torch", views: tuple[str, ...] = ("text", "image"), seed: int = 0) -> ModelContext:
    """40 users with 6 random items each out of 30; random features of 12 (text) and 8 (image) dims."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(N_USERS), 6)
    items = np.concatenate([rng.choice(N_ITEMS, 6, replace=False) for _ in range(N_USERS)])
    dims = {"text": 12, "image": 8, "audio": 5}
    features = {v: rng.standard_normal((N_ITEMS, dims[v])).astype(np.float32) for v in views}
    return ModelContext(N_USERS, N_ITEMS, users, items, graph_backend=backend, features=features)


SWITCH_BASE = {**EVERY_PART, "ui_dropout": 0.0}
"""The switch tests start from every part on and the full graph (the defaults leave the expansion off and prune)."""


def make_model(backend: str = "torch", views: tuple[str, ...] = ("text", "image"), seed: int = 0, **overrides) -> DPRec:
    small = {"n_hyperedges": 3, "knn_k": 4, "projection_hidden": 16, "embedding_dim": 8}
    cfg = DPRecConfig(**{**small, **SWITCH_BASE, **overrides})
    torch.manual_seed(seed)
    return DPRec(cfg, random_context(backend, views))


def batch(seed: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, N_USERS, (size,), generator=gen),
        torch.randint(0, N_ITEMS, (size,), generator=gen),
        torch.randint(0, N_ITEMS, (size,), generator=gen),
    )


def eval_embeddings(model: DPRec) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        users, items = model.final_embeddings()
    return torch.cat([users, items])


def train_loss(model: DPRec, seed: int = 2) -> tuple[torch.Tensor, dict[str, float]]:
    model.train()
    torch.manual_seed(seed)  # the same Gumbel noise and dropout for models that are compared
    return model.calculate_loss(*batch())


def test_shapes_finiteness_and_loss_parts() -> None:
    model = make_model()
    loss, parts = train_loss(model)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(parts) == {"bpr", "reg", "align_node", "align_hyperedge", "align_behaviour"}
    assert all(math.isfinite(v) for v in parts.values())
    model.eval()
    users, items = model.final_embeddings()
    assert users.shape == (N_USERS, 8) and items.shape == (N_ITEMS, 8)
    assert torch.isfinite(users).all() and torch.isfinite(items).all()
    scores = model.full_sort_predict(torch.tensor([0, 3]))
    torch.testing.assert_close(scores, users[[0, 3]] @ items.T)


ALL_GROUPS = {"user_emb", "item_emb", "projection", "perspective_gate", "modality_gate", "hyperedge_assign"}


@pytest.mark.parametrize(
    ("overrides", "views", "groups"),
    [
        ({}, ("text", "image"), ALL_GROUPS),
        ({"use_memory": False}, ("text", "image"), ALL_GROUPS - {"perspective_gate"}),
        ({"use_expansion": False}, ("text", "image"), ALL_GROUPS - {"perspective_gate"}),
        (
            {"use_memory": False, "use_expansion": False},
            ("text", "image"),
            {"user_emb", "item_emb", "hyperedge_assign"},
        ),
        ({"use_hypergraph": False}, ("text", "image"), ALL_GROUPS - {"hyperedge_assign"}),
        ({"fusion": "sum"}, ("text", "image"), ALL_GROUPS - {"perspective_gate", "modality_gate"}),
        ({"align_node": False, "align_hyperedge": False, "align_behaviour": False}, ("text", "image"), ALL_GROUPS),
        ({}, ("text",), ALL_GROUPS - {"modality_gate"}),
        ({}, ("text", "image", "audio"), ALL_GROUPS),
        ({}, (), {"user_emb", "item_emb"}),
    ],
)
def test_gradient_reaches_exactly_the_parts_switched_on(overrides: dict, views: tuple[str, ...], groups: set) -> None:
    model = make_model(views=views, **overrides)
    loss, _ = train_loss(model)
    loss.backward()
    present = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert present == groups
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_memory": False},
        {"use_expansion": False},
        {"use_hypergraph": False},
        {"fusion": "sum"},
        {"knn_weighted": False},
        {"expand_ids": True},
        {"n_mm_layers": 1},
        {"n_ii_layers": 2},
        {"n_hyper_layers": 2},
        {"alpha": 0.0},
        {"modalities": ["text"]},
    ],
)
def test_each_structural_switch_changes_the_output(overrides: dict) -> None:
    base = make_model()
    switched = make_model(**overrides)
    switched.load_state_dict(base.state_dict(), strict=False)  # same weights for the parts both have
    assert not torch.allclose(eval_embeddings(switched), eval_embeddings(base), atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "part"),
    [
        ({"align_node": False}, "align_node"),
        ({"align_hyperedge": False}, "align_hyperedge"),
        ({"align_behaviour": False}, "align_behaviour"),
        ({"hyperedge_assignment": "soft"}, None),
        ({"align_tau": 0.5}, None),
        ({"lambda_align": 0.1}, None),
        ({"keep_rate": 1.0}, None),
        ({"feature_dropout": 0.5}, None),
        ({"lambda_id_cl": 0.1}, None),
    ],
)
def test_each_training_switch_changes_the_loss(overrides: dict, part: str | None) -> None:
    base = make_model()
    switched = make_model(**overrides)
    switched.load_state_dict(base.state_dict())
    (base_loss, base_parts), (loss, parts) = train_loss(base), train_loss(switched)
    assert abs(float(loss.detach()) - float(base_loss.detach())) > 1e-6
    if part is not None:
        assert part in base_parts and part not in parts


def test_info_nce_equals_hand_computation() -> None:
    anchor = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positive = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    r = 1 / math.sqrt(2)  # cos between an axis and (1, 1)
    first = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(r / tau)))
    second = -math.log(math.exp(r / tau) / (math.exp(0 / tau) + math.exp(r / tau)))
    assert float(info_nce(anchor, positive, tau)) == pytest.approx((first + second) / 2, rel=1e-6)
    candidates = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    third = -math.log(math.exp(r / tau) / (math.exp(0) + math.exp(r / tau) + math.exp(0)))
    got = info_nce(anchor[1:], positive[1:], tau, candidates=candidates, reduction="sum")
    assert float(got) == pytest.approx(third, rel=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("dgl", marks=requires_dgl), "torch"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_hypergraph_view_equals_dense_reference(backend: str, n_layers: int) -> None:
    model = make_model(backend=backend, n_hyper_layers=n_layers).eval()
    ctx = random_context()
    mean = np.zeros((N_USERS, N_ITEMS))
    mean[ctx.train_users, ctx.train_items] = 1
    mean = torch.from_numpy(mean / mean.sum(1, keepdims=True))
    with torch.no_grad():
        views = model()
        for name, weight in model.hyperedge_assign.items():
            logits = torch.from_numpy(ctx.features[name]).double() @ weight.double()
            items = torch.softmax(logits / model.cfg.hyperedge_tau, dim=1)
            incidence = torch.cat([mean @ items, items])
            nodes = views.h_id.double()
            for _ in range(n_layers):
                hyperedges = incidence.T @ nodes
                nodes = incidence @ hyperedges
            torch.testing.assert_close(views.g_modality[name].double(), nodes, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(views.hyperedges[name].double(), hyperedges, rtol=1e-5, atol=1e-5)


@requires_dgl
def test_dgl_and_torch_backends_agree_on_the_full_model() -> None:
    dgl_model, torch_model = make_model(backend="dgl"), make_model(backend="torch")
    assert (eval_embeddings(dgl_model) - eval_embeddings(torch_model)).abs().max() < 1e-5
    (dgl_loss, dgl_parts), (torch_loss, torch_parts) = train_loss(dgl_model), train_loss(torch_model)
    assert abs(float(dgl_loss.detach()) - float(torch_loss.detach())) < 1e-5
    assert dgl_parts == pytest.approx(torch_parts, abs=1e-5)
    dgl_loss.backward()
    torch_loss.backward()
    for (name, p_dgl), (_, p_torch) in zip(dgl_model.named_parameters(), torch_model.named_parameters(), strict=True):
        assert (p_dgl.grad - p_torch.grad).abs().max() < 1e-5, name


def test_same_seed_same_result_and_noise_free_evaluation() -> None:
    a, b = make_model(seed=3), make_model(seed=3)
    (loss_a, parts_a), (loss_b, parts_b) = train_loss(a), train_loss(b)
    assert torch.equal(loss_a, loss_b) and parts_a == parts_b
    assert torch.equal(eval_embeddings(a), eval_embeddings(a))
    assert torch.equal(eval_embeddings(a), eval_embeddings(b))


def test_one_modality_switches_cross_modal_levels_off_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dprec.models.dprec"):
        model = make_model(views=("text",))
        _, parts = train_loss(model)
        train_loss(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "node level (it needs two modalities)" in warnings[0]
    assert "hyperedge level (it needs two modalities)" in warnings[0]
    assert "align_node" not in parts and "align_hyperedge" not in parts and "align_behaviour" in parts


def test_no_features_is_lightgcn_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dprec.models.dprec"):
        model = make_model(views=())
    assert any("reduces to LightGCN" in r.getMessage() for r in caplog.records)
    lightgcn = LightGCN(LightGCNConfig(embedding_dim=8, n_layers=2), random_context())
    lightgcn.load_state_dict({"user_emb": model.user_emb.detach(), "item_emb": model.item_emb.detach()})
    torch.testing.assert_close(eval_embeddings(model), torch.cat(lightgcn.final_embeddings()).detach())
    users, pos, neg = batch()
    torch.testing.assert_close(model.calculate_loss(users, pos, neg)[0], lightgcn.calculate_loss(users, pos, neg)[0])


def test_config_errors_name_the_field() -> None:
    for overrides, message in [
        ({"fusion": "concat"}, "fusion: expected one of .attention., .sum."),
        ({"keep_rate": 0.0}, "keep_rate"),
        ({"hyperedge_tau": 0}, "hyperedge_tau must be positive"),
        ({"n_hyper_layers": 0}, "n_hyper_layers must be positive"),
        ({"use_memory": "no"}, "use_memory: expected true or false"),
        ({"modalities": ["text", "text"]}, "must not repeat"),
        ({"hyperedge_assignment": "hard"}, "hyperedge_assignment"),
    ]:
        with pytest.raises(ValueError, match=message):
            DPRecConfig(**overrides)
    with pytest.raises(ValueError, match=r"feature view\(s\) \['audio'\] not found"):
        DPRec(DPRecConfig(modalities=["audio"]), random_context())
    with pytest.raises(ConfigError, match="use_hypergrap"):
        RunConfig(dataset="x", model={"name": "dprec", "use_hypergrap": False}).model_config()


def test_learns_and_beats_popularity(fit_synthetic) -> None:
    popularity = fit_synthetic({"name": "popularity"}, epochs=1)
    result = fit_synthetic({"name": "dprec"}, epochs=4)
    bpr = [row["bpr"] for row in result["history"]]
    assert bpr[-1] < 0.7 * bpr[0]
    assert result["valid"]["recall@20"] > popularity["valid"]["recall@20"] + 0.15
    assert result["test"]["recall@20"] > popularity["test"]["recall@20"] + 0.15


def test_beta_weighs_the_content_view_in_the_prediction() -> None:
    model = make_model(alpha=0.0, beta=0.25)
    model.eval()
    with torch.no_grad():
        views = model()
        e = model.predict_embeddings(views)
    torch.testing.assert_close(e, views.h_id + 0.25 * views.h_mm)
    with pytest.raises(ValueError, match="beta"):
        DPRecConfig(beta=-1.0)


def test_expand_ids_adds_the_knn_propagated_item_ids_to_the_id_view() -> None:
    base, expanded = make_model(), make_model(expand_ids=True)
    expanded.load_state_dict(base.state_dict())
    base.eval(), expanded.eval()
    with torch.no_grad():
        h_base, h_exp = base().h_id, expanded().h_id
        # the kNN graphs as dense matrices (propagating the identity), then the ID embeddings through them
        knn = {m: expanded.knn[m].propagate(torch.eye(N_ITEMS)) for m in expanded.modality_names}
        dense = (knn["text"] @ expanded.item_emb + knn["image"] @ expanded.item_emb) / 2
    torch.testing.assert_close(h_exp[:N_USERS], h_base[:N_USERS])
    torch.testing.assert_close(h_exp[N_USERS:] - h_base[N_USERS:], dense, atol=1e-5, rtol=1e-5)
    # part of the expansion perspective: off with it
    assert not make_model(expand_ids=True, use_expansion=False).expand_ids


def test_purified_ids_add_the_gated_id_view_over_the_knn_graphs_to_every_row() -> None:
    base, purified = make_model(), make_model(purified_ids=True)
    purified.load_state_dict(base.state_dict(), strict=False)  # the purifier gates are new
    base.eval(), purified.eval()
    with torch.no_grad():
        h_base, h_pure = base().h_id, purified().h_id
        views = []
        for m in purified.modality_names:
            knn = purified.knn[m].propagate(torch.eye(N_ITEMS))  # the kNN graph as a dense matrix
            gate = torch.sigmoid(purified.purifier[m][0](purified._projection(m)))
            items = knn @ (purified.item_emb * gate)
            views.append(torch.cat([purified.user_block.propagate(items), items]))
        expected = (views[0] + views[1]) / 2
    torch.testing.assert_close(h_pure - h_base, expected, atol=1e-5, rtol=1e-5)
    assert expected[:N_USERS].abs().sum() > 0 and expected[N_USERS:].abs().sum() > 0  # users and items both gain
    # independent of the content expansion: it builds its own kNN graphs
    alone = make_model(purified_ids=True, use_expansion=False)
    assert alone.purified_ids and set(alone.knn) == {"text", "image"}
    assert not make_model(purified_ids=False, use_expansion=False).knn


def test_ui_dropout_prunes_the_id_graph_in_training_only_and_reproducibly() -> None:
    model = make_model(ui_dropout=0.5)
    full = make_model()
    full.load_state_dict(model.state_dict())
    model.start_epoch(3, 7)
    edges = model.pruning.edges(3, 7)
    assert len(edges[0]) == 120  # 240 distinct interactions, half kept
    assert all(torch.equal(a, b) for a, b in zip(edges, model.pruning.edges(3, 7), strict=True))
    assert not torch.equal(edges[0], model.pruning.edges(4, 7)[0])  # another epoch, another draw
    torch.testing.assert_close(eval_embeddings(model), eval_embeddings(full))  # evaluation: the full graph
    model.train(), full.train()
    with torch.no_grad():
        assert not torch.allclose(model._id_memory({}), full._id_memory({}))
    with pytest.raises(ValueError, match="ui_dropout"):
        DPRecConfig(ui_dropout=1.0)


def test_lambda_behaviour_weights_the_behaviour_level_alone() -> None:
    """loss = bpr + reg + lambda_align * (node + hyperedge) + lambda_behaviour * behaviour; None = lambda_align."""
    shared = make_model(lambda_align=0.01)
    own = make_model(lambda_align=0.01, lambda_behaviour=0.3)
    loss_shared, parts = train_loss(shared)
    loss_own, parts_own = train_loss(own)
    assert parts_own == parts  # the same model and batch: only the weighting differs
    base = parts["bpr"] + parts["reg"] + 0.01 * (parts["align_node"] + parts["align_hyperedge"])
    assert float(loss_shared) == pytest.approx(base + 0.01 * parts["align_behaviour"], rel=1e-5)
    assert float(loss_own) == pytest.approx(base + 0.3 * parts["align_behaviour"], rel=1e-5)
    assert parts["align_behaviour"] > 0.1  # an InfoNCE of random embeddings: the weight shows in the loss
    with pytest.raises(ValueError, match="lambda_behaviour must be >= 0"):
        DPRecConfig(lambda_behaviour=-0.1)


def test_sampled_softmax_equals_hand_computation() -> None:
    gen = torch.Generator().manual_seed(3)
    u, p, n = (torch.randn(size, 6, generator=gen, dtype=torch.float64) for size in (5, 5, 7))
    tau = 0.2
    cos = torch.nn.functional.cosine_similarity
    expected = 0.0
    for row in range(5):
        pos = cos(u[row], p[row], dim=0) / tau
        negs = cos(u[row][None], n, dim=1) / tau
        expected += (torch.logsumexp(torch.cat([pos[None], negs]), 0) - pos) / 5
    assert float(sampled_softmax_loss(u, p, n, tau)) == pytest.approx(float(expected), rel=1e-10)


def test_softmax_loss_ranks_by_cosine_and_differs_from_bpr() -> None:
    bpr, softmax = make_model(), make_model(rec_loss="softmax", softmax_tau=0.2)
    users, pos, neg = batch()
    loss_bpr, parts_bpr = bpr.calculate_loss(users, pos, neg)
    torch.manual_seed(5)  # the same Gumbel noise and incidence dropout for the loss and the check below
    loss_softmax, parts_softmax = softmax.calculate_loss(users, pos, neg)
    assert "bpr" in parts_bpr and "softmax" in parts_softmax and "bpr" not in parts_softmax
    # the softmax part: the batch's rows against its distinct drawn negatives
    torch.manual_seed(5)
    with torch.no_grad():
        emb = softmax(None)
    u, p = emb.e[users], emb.e[softmax.n_users + pos]
    negatives = emb.e[softmax.n_users + torch.unique(neg)]
    assert parts_softmax["softmax"] == pytest.approx(float(sampled_softmax_loss(u, p, negatives, 0.2)), rel=1e-5)
    assert float(loss_softmax) != pytest.approx(float(loss_bpr), rel=1e-3)
    rows = eval_embeddings(softmax)
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-5)  # served dot product = cosine
    assert not torch.allclose(eval_embeddings(bpr).norm(dim=1), torch.ones(len(rows)), atol=1e-3)


def test_softmax_loss_learns_and_beats_popularity(fit_synthetic) -> None:
    popularity = fit_synthetic({"name": "popularity"}, epochs=1)  # test R@20 0.205 here
    result = fit_synthetic({"name": "dprec", "rec_loss": "softmax"}, epochs=8)  # 0.545 when written
    assert result["test"]["recall@20"] > popularity["test"]["recall@20"] + 0.2


def test_feature_dropout_acts_in_training_only() -> None:
    base, dropped = make_model(), make_model(feature_dropout=0.5)
    dropped.load_state_dict(base.state_dict())
    assert torch.equal(eval_embeddings(dropped), eval_embeddings(base))  # evaluation reads the whole features
    dropped.train()
    torch.manual_seed(0)
    x = dropped._projection("text")
    torch.manual_seed(0)
    kept = BitDropout(0.5).train()(dropped.features_text)  # the same mask: the same draws of the generator
    assert 0.3 < float((kept == 0).float().mean()) < 0.7
    expected = dropped.projection["text"](kept)
    assert torch.allclose(x, expected - expected.mean(0, keepdim=True), atol=1e-6)
    whole = dropped.projection["text"](dropped.features_text)
    assert not torch.allclose(x, whole - whole.mean(0, keepdim=True), atol=1e-3)


def test_id_contrast_is_the_info_nce_of_two_noisy_lightgcn_views() -> None:
    model = make_model(lambda_id_cl=0.5, id_cl_eps=0.0)
    users, pos, _ = batch()
    clean = lightgcn_mean_without_ego(model)
    expected = info_nce(clean[torch.unique(users)], clean[torch.unique(users)], 0.2) + info_nce(
        clean[model.n_users + torch.unique(pos)], clean[model.n_users + torch.unique(pos)], 0.2
    )
    assert float(model.id_contrast(users, pos)) == pytest.approx(float(expected), rel=1e-5)  # eps 0: equal views
    noisy = make_model(lambda_id_cl=0.5, id_cl_eps=0.1)
    noisy.load_state_dict(model.state_dict())
    view = noisy._noisy_id_view()
    shift = (view - clean).norm(dim=1)
    assert 0 < float(shift.min()) and float(shift.max()) < 0.3  # noise of norm 0.1 per layer, carried one round on
    torch.manual_seed(0)
    loss_on, parts = noisy.calculate_loss(users, pos, _)
    assert parts["id_cl"] > 0
    off = make_model(lambda_id_cl=0.0, id_cl_eps=0.1)
    off.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    loss_off, parts_off = off.calculate_loss(users, pos, _)
    assert "id_cl" not in parts_off
    assert float(loss_on) == pytest.approx(float(loss_off) + 0.5 * parts["id_cl"], rel=1e-5)


def lightgcn_mean_without_ego(model: DPRec) -> torch.Tensor:
    x, layers = torch.cat([model.user_emb, model.item_emb]).detach(), []
    for _ in range(model.cfg.n_ui_layers):
        x = model.ui_graph.propagate(x)
        layers.append(x)
    return torch.stack(layers).mean(0)


def test_dynamic_negatives_train_against_the_hardest_candidate() -> None:
    """negative_candidates N: the trainer gives N candidates per pair, the BPR part takes the one scored highest."""
    model = make_model(negative_candidates=4)
    assert model.negatives_per_positive() == 4 and make_model().negatives_per_positive() == 1
    users, pos, _ = batch()
    cands = torch.randint(0, N_ITEMS, (len(users), 4), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(5)
    _, parts = model.calculate_loss(users, pos, cands)
    torch.manual_seed(5)  # the same Gumbel noise and dropout: the same embeddings
    with torch.no_grad():
        emb = model(None)
    u, p = emb.e[users], emb.e[model.n_users + pos]
    scores = torch.einsum("bd,bmd->bm", u, emb.e[model.n_users + cands])
    hardest = cands[torch.arange(len(users)), scores.argmax(1)]
    n = emb.e[model.n_users + hardest]
    expected = torch.nn.functional.softplus((u * n).sum(1) - (u * p).sum(1)).mean()
    assert parts["bpr"] == pytest.approx(float(expected), rel=1e-5)
    # the hardest candidate's loss is above any fixed candidate's: the choice is not the first column
    first = torch.nn.functional.softplus((u * emb.e[model.n_users + cands[:, 0]]).sum(1) - (u * p).sum(1)).mean()
    assert parts["bpr"] > float(first) + 1e-4
    with pytest.raises(ValueError, match="negative_candidates must be >= 1"):
        DPRecConfig(negative_candidates=0)


def test_the_trainer_draws_candidates_outside_each_users_training_items(synthetic) -> None:
    from dprec.training.config import TrainConfig
    from dprec.training.loop import Trainer

    ds, features = synthetic
    train = TrainConfig(epochs=1, batch_size=256, seed=3, graph_backend="torch")
    model = {"name": "dprec", "negative_candidates": 5, "embedding_dim": 8, "projection_hidden": 16}
    trainer = Trainer(RunConfig(dataset="synthetic", model=model, train=train), ds, features=features)
    batches = list(trainer.epoch_batches(0))
    users = torch.cat([b[0] for b in batches]).numpy()
    negs = torch.cat([b[2] for b in batches]).numpy()
    assert negs.shape == (len(trainer.train_users), 5)
    assert not trainer.train_sets.contains(np.repeat(users, 5), negs.reshape(-1)).any()
    assert len(np.unique(negs)) > 0.5 * ds.n_items  # uniform draws, not one repeated item
    plain = Trainer(RunConfig(dataset="synthetic", model={**model, "negative_candidates": 1}, train=train), ds)
    assert next(iter(plain.epoch_batches(0)))[2].dim() == 1  # one candidate: the vector every model takes
