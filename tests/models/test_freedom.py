"""FREEDOM (dprec.models.freedom): config, the frozen item-item mixture, degree-sensitive pruning, backends,
gradients and learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprec.config import ConfigError, from_dict
from dprec.graph import available_backends, lightgcn_propagate
from dprec.models import MODELS, ModelContext
from dprec.models.freedom import FREEDOM, FREEDOMConfig, mixture_weights, sample_without_replacement
from dprec.training.config import RunConfig, TrainConfig
from dprec.training.loop import Trainer

N_USERS, N_ITEMS = 40, 30
requires_dgl = pytest.mark.skipif("dgl" not in available_backends(), reason="DGL does not import here")


def random_context(backend: str = "torch", views: tuple[str, ...] = ("text", "image")) -> ModelContext:
    """40 users with 6 random items each out of 30; random features of 12 (text) and 8 (image) dims."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(N_USERS), 6)
    items = np.concatenate([rng.choice(N_ITEMS, 6, replace=False) for _ in range(N_USERS)])
    dims = {"text": 12, "image": 8}
    features = {v: rng.standard_normal((N_ITEMS, dims[v])).astype(np.float32) for v in views}
    return ModelContext(N_USERS, N_ITEMS, users, items, graph_backend=backend, features=features)


def make_model(backend: str = "torch", views: tuple[str, ...] = ("text", "image"), seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return FREEDOM(FREEDOMConfig(embedding_dim=8, knn_k=4, **overrides), random_context(backend, views))


def batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, N_USERS, (size,), generator=gen),
        torch.randint(0, N_ITEMS, (size,), generator=gen),
        torch.randint(0, N_ITEMS, (size,), generator=gen),
    )


def dense(graph, n: int) -> torch.Tensor:
    """The matrix M of a graph (out = M @ x), read by propagating the identity."""
    return graph.propagate(torch.eye(n))


def test_registered_and_config_checks() -> None:
    assert MODELS["freedom"] == (FREEDOM, FREEDOMConfig)
    cfg = FREEDOMConfig()
    assert (cfg.dropout, cfg.reg_weight, cfg.knn_k, cfg.n_mm_layers, cfg.n_ui_layers) == (0.8, 1e-4, 10, 1, 2)
    assert cfg.train_features is False and cfg.modality_weights is None
    for bad in ({"dropout": 1.0}, {"dropout": -0.1}, {"knn_k": 0}, {"reg_weight": -1.0}, {"n_mm_layers": 0}):
        with pytest.raises(ValueError):
            FREEDOMConfig(**bad)
    for weights in ({"image": -0.1, "text": 1.0}, {"image": 0.0}, {"a.b": 1.0}):
        with pytest.raises(ValueError, match="modality_weights|modalities"):
            FREEDOMConfig(modality_weights=weights)
    with pytest.raises(ConfigError):
        from_dict(FREEDOMConfig, {"modality_weights": {"image": "heavy"}})
    assert mixture_weights(None, ["text", "image"]) == {"text": 0.5, "image": 0.5}
    assert mixture_weights({"image": 1, "text": 9}, ["text", "image"]) == pytest.approx({"text": 0.9, "image": 0.1})
    with pytest.raises(ValueError, match=r"no weight for \['image'\]"):
        mixture_weights({"text": 1.0}, ["text", "image"])
    with pytest.raises(ValueError, match="not in use"):
        mixture_weights({"text": 1.0, "image": 1.0}, ["text"])
    with pytest.raises(ValueError, match="needs at least one feature view"):
        make_model(views=())


@pytest.mark.parametrize("views", [("text", "image"), ("text",)])
def test_shapes_and_finiteness(views: tuple[str, ...]) -> None:
    model = make_model(views=views)
    loss, parts = model.calculate_loss(*batch())
    assert loss.shape == () and torch.isfinite(loss) and set(parts) == {"bpr", "modal"}
    assert loss.item() == pytest.approx(parts["bpr"] + 1e-4 * parts["modal"], rel=1e-6)
    with torch.no_grad():
        users, items = model.final_embeddings()
    assert users.shape == (N_USERS, 8) and items.shape == (N_ITEMS, 8) and torch.isfinite(items).all()


def test_frozen_graph_is_the_hand_computed_mixture() -> None:
    # image, k=2: 0 ~ {1} (cos(0, 2) = 0 is dropped), 1 ~ {0, 2}, 2 ~ {1}, 3 none (all cosines <= 0);
    # degrees 1, 2, 1, 0, so every kept entry is 1/sqrt(2).
    image = np.array([[1, 0], [1, 1], [0, 1], [-1, 0]], np.float32)
    # text, k=2: 0 ~ {3, 2}, 1 ~ {2, 3}, 2 ~ {1, 3}, 3 ~ {0, 2}; every degree 2, so entries 1/2.
    text = np.array([[1, 0], [0, 1], [0.1, 1], [1, 0.1]], np.float32)
    r = 2**-0.5
    s_image = torch.tensor([[0, r, 0, 0], [r, 0, r, 0], [0, r, 0, 0], [0, 0, 0, 0]])
    s_text = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 0]]) / 2
    ctx = ModelContext(2, 4, np.array([0, 0, 1]), np.array([0, 1, 2]), "torch", {"image": image, "text": text})
    for weights, (w_image, w_text) in (({"image": 0.1, "text": 0.9}, (0.1, 0.9)), (None, (0.5, 0.5))):
        model = FREEDOM(FREEDOMConfig(embedding_dim=4, knn_k=2, modality_weights=weights), ctx)
        expected = w_image * s_image + w_text * s_text
        torch.testing.assert_close(dense(model.item_graph, 4), expected)
        with torch.no_grad():  # items = LightGCN items + Ŝ E_item; users = LightGCN users
            ego = torch.cat([model.user_emb, model.item_emb])
            lightgcn = lightgcn_propagate(model.ui_graph, ego, 2)
            users, items = model.final_embeddings()
            torch.testing.assert_close(users, lightgcn[:2])
            torch.testing.assert_close(items, lightgcn[2:] + expected @ model.item_emb)
    only_text = FREEDOM(FREEDOMConfig(embedding_dim=4, knn_k=2, modality_weights={"image": 0, "text": 1}), ctx)
    torch.testing.assert_close(dense(only_text.item_graph, 4), s_text)


def test_pruning_keeps_the_expected_edges_renormalised_and_reproducibly() -> None:
    model = make_model(dropout=0.8)
    ctx = random_context()
    n_edges = len(set(zip(ctx.train_users.tolist(), ctx.train_items.tolist(), strict=True)))
    assert n_edges == 240 and len(model.pruning.edge_weights) == 240
    users, items = model.pruned_edges(3, 7)
    kept = set(zip(users.tolist(), items.tolist(), strict=True))
    assert len(users) == len(kept) == int(240 * 0.2) == 48
    assert kept <= set(zip(ctx.train_users.tolist(), ctx.train_items.tolist(), strict=True))
    again = model.pruned_edges(3, 7)
    assert torch.equal(users, again[0]) and torch.equal(items, again[1])
    for epoch, seed in ((4, 7), (3, 8)):
        other = set(zip(*(t.tolist() for t in model.pruned_edges(epoch, seed)), strict=True))
        assert other != kept
    # the epoch's graph: D^-1/2 A D^-1/2 of the kept edges alone, both directions
    model.start_epoch(3, 7)
    assert model.pruned_for == (3, 7) and model.pruned_graph.num_edges == 2 * 48
    a = torch.zeros(N_USERS + N_ITEMS, N_USERS + N_ITEMS)
    a[users, N_USERS + items] = a[N_USERS + items, users] = 1
    degree = a.sum(1)
    scale = torch.where(degree > 0, degree.clamp(min=1).rsqrt(), 0.0)
    torch.testing.assert_close(dense(model.pruned_graph, N_USERS + N_ITEMS), scale[:, None] * a * scale)
    # training reads the pruned graph; evaluation the full one, whatever the epoch
    with torch.no_grad():
        full = torch.cat(model.final_embeddings())
        loss_3 = model.calculate_loss(*batch())[0]
        model.start_epoch(4, 7)
        assert not torch.equal(loss_3, model.calculate_loss(*batch())[0])
        assert torch.equal(full, torch.cat(model.final_embeddings()))
    no_dropout = make_model(dropout=0.0)
    no_dropout.start_epoch(0, 1)
    assert no_dropout.pruned_graph is None and no_dropout.training_graph() is no_dropout.ui_graph


def test_pruning_prefers_edges_between_low_degree_nodes() -> None:
    # 10 users -> hub item 0; hub user 10 -> items 1..10 (weights 1/sqrt(10)); 10 edges of degree-1 pairs (weight 1)
    users = np.concatenate([np.arange(10), np.full(10, 10), np.arange(11, 21)])
    items = np.concatenate([np.zeros(10, int), np.arange(1, 11), np.arange(11, 21)])
    features = {"text": np.random.default_rng(0).standard_normal((21, 4)).astype(np.float32)}
    model = FREEDOM(FREEDOMConfig(embedding_dim=4, knn_k=2), ModelContext(21, 21, users, items, "torch", features))
    survived = {"hub": 0, "degree-1": 0}
    for epoch in range(300):
        kept_users, _ = model.pruned_edges(epoch, 1)
        assert len(kept_users) == 6  # int(30 * 0.2)
        survived["degree-1"] += int((kept_users >= 11).sum())
        survived["hub"] += int((kept_users <= 10).sum())
    assert survived["hub"] + survived["degree-1"] == 1800
    # per edge: a degree-1 pair survives ~0.35 of the epochs, a hub edge ~0.12 (uniform: 0.2 each)
    per_edge = {"degree-1": survived["degree-1"] / (10 * 300), "hub": survived["hub"] / (20 * 300)}
    assert 0.3 < per_edge["degree-1"] < 0.42 and 0.09 < per_edge["hub"] < 0.15, per_edge
    # the exponential-key path for edge sets beyond torch.multinomial's 2^24 categories prefers them as much
    weights = model.pruning.edge_weights
    keys_path = torch.zeros(30)
    for epoch in range(300):
        gen = torch.Generator().manual_seed(epoch)
        keys = weights / torch.empty_like(weights).exponential_(1.0, generator=gen)
        keys_path[keys.topk(6).indices] += 1
    assert 0.3 < float(keys_path[20:].sum()) / 3000 < 0.42 and 0.09 < float(keys_path[:20].sum()) / 6000 < 0.15
    assert len(sample_without_replacement(weights, 0, torch.Generator())) == 0


@requires_dgl
def test_dgl_and_torch_backends_agree() -> None:
    models = {backend: make_model(backend) for backend in ("dgl", "torch")}
    grads = {}
    for backend, model in models.items():
        model.start_epoch(2, 5)
        loss, parts = model.calculate_loss(*batch())
        loss.backward()
        grads[backend] = (loss.detach(), parts, {k: p.grad for k, p in model.named_parameters()})
    (loss_d, parts_d, grad_d), (loss_t, parts_t, grad_t) = grads["dgl"], grads["torch"]
    assert abs(float(loss_d - loss_t)) < 1e-5 and parts_d == pytest.approx(parts_t, rel=1e-5, abs=1e-5)
    assert grad_d.keys() == grad_t.keys()
    for name in grad_d:
        assert (grad_d[name] - grad_t[name]).abs().max() < 1e-5, name
    with torch.no_grad():
        diff = torch.cat(models["dgl"].final_embeddings()) - torch.cat(models["torch"].final_embeddings())
    assert diff.abs().max() < 1e-5


@pytest.mark.parametrize("train_features", [False, True])
def test_gradients_reach_the_expected_parameters(train_features: bool) -> None:
    ctx = random_context()
    original = {k: v.copy() for k, v in ctx.features.items()}
    torch.manual_seed(0)
    model = FREEDOM(FREEDOMConfig(embedding_dim=8, knn_k=4, train_features=train_features), ctx)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.calculate_loss(*batch())[0].backward()
    expected = {"user_emb", "item_emb", "projection.text.weight", "projection.image.weight"}
    if train_features:
        expected |= {"features.text", "features.image"}
    assert {name for name, _ in model.named_parameters()} == expected
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} gets no gradient"
    if not train_features:  # fixed features are (non-persistent) buffers: no gradient, not in checkpoints
        assert all(not model.get_buffer(f"features_{m}").requires_grad for m in ("text", "image"))
        assert not any(k.startswith("features") for k in model.state_dict())
    optimizer.step()
    assert all(np.array_equal(ctx.features[k], original[k]) for k in original)  # the caller's arrays: untouched
    if train_features:
        assert not torch.allclose(model.features["text"], torch.from_numpy(original["text"]))


def test_the_reused_gather_buffer_never_gives_a_silently_wrong_gradient() -> None:
    model = make_model()
    first, _ = model.calculate_loss(*batch())
    second, _ = model.calculate_loss(*batch())  # overwrites the rows the first loss saved for its backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
    second.backward()  # the latest loss is intact
    assert model.projection["image"].weight.grad.abs().sum() > 0


def test_learns_the_planted_content_signal_and_the_trainer_prunes_per_epoch(synthetic) -> None:
    ds, features = synthetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = TrainConfig(epochs=4, batch_size=512, lr=0.01, seed=3, graph_backend="torch", ks=(10, 20))
        cfg = RunConfig(
            dataset="synthetic", model={"name": "freedom", "modality_weights": {"image": 0.1, "text": 0.9}}, train=train
        )
        trainer = Trainer(cfg, ds, features=features)
        untrained = trainer.evaluate("valid")["recall@20"]
        result = trainer.fit(log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert trainer.model.pruned_for == (3, 3)  # Trainer.train_epoch called start_epoch(epoch, seed) each epoch
    bpr = [row["bpr"] for row in result["history"]]
    assert bpr[-1] < 0.8 * bpr[0]
    assert untrained < 0.15 and result["valid"]["recall@20"] > untrained + 0.2, (untrained, result["valid"])
