"""The open relatives MGCN and LGMRec: shapes, gradients, dense references, backends, seeds and learning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dprec.graph import available_backends, lightgcn_propagate
from dprec.graph.knn import item_knn_edges
from dprec.models import MODELS, ModelContext
from dprec.models.lgmrec import LGMRec, LGMRecConfig
from dprec.models.mgcn import MGCN, MGCNConfig

N_USERS, N_ITEMS = 40, 30
RELATIVES = ["mgcn", "lgmrec"]
requires_dgl = pytest.mark.skipif("dgl" not in available_backends(), reason="DGL does not import here")


def random_context(backend: str = "torch", views: tuple[str, ...] = ("text", "image")) -> ModelContext:
    """40 users with 6 random items each out of 30; random features of 12 (text) and 8 (image) dims."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(N_USERS), 6)
    items = np.concatenate([rng.choice(N_ITEMS, 6, replace=False) for _ in range(N_USERS)])
    dims = {"text": 12, "image": 8}
    features = {v: rng.standard_normal((N_ITEMS, dims[v])).astype(np.float32) for v in views}
    return ModelContext(N_USERS, N_ITEMS, users, items, graph_backend=backend, features=features)


def make_model(
    name: str, backend: str = "torch", views: tuple[str, ...] = ("text", "image"), seed: int = 0, **overrides
):
    model_cls, cfg_cls = MODELS[name]
    sizes = {"embedding_dim": 8, "knn_k": 4} if name == "mgcn" else {"embedding_dim": 8, "n_hyperedges": 3}
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**sizes, **overrides), random_context(backend, views))


def batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, N_USERS, (size,), generator=gen),
        torch.randint(0, N_ITEMS, (size,), generator=gen),
        torch.randint(0, N_ITEMS, (size,), generator=gen),
    )


def train_loss(model, seed: int = 2):
    model.train()
    torch.manual_seed(seed)
    return model.calculate_loss(*batch())


def eval_embeddings(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat(model.final_embeddings())


def test_registered() -> None:
    assert MODELS["mgcn"] == (MGCN, MGCNConfig) and MODELS["lgmrec"] == (LGMRec, LGMRecConfig)


@pytest.mark.parametrize("name", RELATIVES)
@pytest.mark.parametrize("views", [("text", "image"), ("text",)])
def test_shapes_finiteness_and_gradient_to_every_parameter(name: str, views: tuple[str, ...]) -> None:
    model = make_model(name, views=views)
    loss, parts = train_loss(model)
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in parts.values())
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{param_name} gets no gradient"
    users, items = eval_embeddings(model).split([N_USERS, N_ITEMS])
    assert users.shape == (N_USERS, 8) and items.shape == (N_ITEMS, 8) and torch.isfinite(items).all()


@requires_dgl
@pytest.mark.parametrize("name", RELATIVES)
def test_dgl_and_torch_backends_agree(name: str) -> None:
    dgl_model, torch_model = make_model(name, backend="dgl"), make_model(name, backend="torch")
    assert (eval_embeddings(dgl_model) - eval_embeddings(torch_model)).abs().max() < 1e-5
    (_, dgl_parts), (_, torch_parts) = train_loss(dgl_model), train_loss(torch_model)
    assert dgl_parts == pytest.approx(torch_parts, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", RELATIVES)
def test_same_seed_same_result_and_noise_free_evaluation(name: str) -> None:
    a, b = make_model(name, seed=5), make_model(name, seed=5)
    (loss_a, parts_a), (loss_b, parts_b) = train_loss(a), train_loss(b)
    assert torch.equal(loss_a, loss_b) and parts_a == parts_b
    assert torch.equal(eval_embeddings(a), eval_embeddings(a))
    assert torch.equal(eval_embeddings(a), eval_embeddings(b))


@pytest.mark.parametrize("name", RELATIVES)
def test_no_features_is_an_error(name: str) -> None:
    with pytest.raises(ValueError, match="needs at least one feature view"):
        make_model(name, views=())


def test_mgcn_item_item_view_equals_dense_reference() -> None:
    model = make_model("mgcn").eval()
    ctx = random_context()
    block = np.zeros((N_USERS, N_ITEMS))
    block[ctx.train_users, ctx.train_items] = 1
    block = block / np.sqrt(block.sum(1, keepdims=True)) / np.sqrt(block.sum(0, keepdims=True).clip(min=1))
    with torch.no_grad():
        for name, features in ctx.features.items():
            rows, cols, values = item_knn_edges(features, k=4)
            knn = torch.zeros(N_ITEMS, N_ITEMS, dtype=torch.float64)
            knn[rows, cols] = values.double()
            purified = model.item_emb * torch.sigmoid(
                model.purifier[name][0](model.transform[name](model.features[name]))
            )
            items = knn @ purified.double()
            expected = torch.cat([torch.from_numpy(block) @ items, items])
            torch.testing.assert_close(model._item_item_view(name).double(), expected, rtol=1e-5, atol=1e-6)


def test_mgcn_trains_its_features_on_a_copy() -> None:
    ctx = random_context()
    original = {k: v.copy() for k, v in ctx.features.items()}
    torch.manual_seed(0)
    model = MGCN(MGCNConfig(embedding_dim=8, knn_k=4), ctx)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.calculate_loss(*batch())[0].backward()
    optimizer.step()
    assert not torch.allclose(model.features["text"], torch.from_numpy(original["text"]))
    assert all(np.array_equal(ctx.features[k], original[k]) for k in original)
    frozen = MGCN(MGCNConfig(embedding_dim=8, knn_k=4, train_features=False), ctx)
    assert not any(p.requires_grad for p in frozen.features.parameters())


@pytest.mark.parametrize("backend", [pytest.param("dgl", marks=requires_dgl), "torch"])
def test_lgmrec_global_part_equals_dense_reference(backend: str) -> None:
    model = make_model("lgmrec", backend=backend, n_hyper_layers=2).eval()
    ctx = random_context()
    interactions = np.zeros((N_USERS, N_ITEMS))
    interactions[ctx.train_users, ctx.train_items] = 1
    with torch.no_grad():
        ego = torch.cat([model.user_emb, model.item_emb])
        h_id_items = lightgcn_propagate(model.ui_graph, ego, model.cfg.n_ui_layers)[N_USERS:]
        _, global_ = model()
        for name, weight in model.hyperedge_assign.items():
            logits = torch.from_numpy(ctx.features[name]).double() @ weight.double()
            item_incidence = torch.softmax(logits / 0.2, dim=1)
            user_incidence = torch.softmax(torch.from_numpy(interactions) @ logits / 0.2, dim=1)
            nodes = h_id_items.double()
            for _ in range(2):
                hyperedges = item_incidence.T @ nodes
                nodes = item_incidence @ hyperedges
            expected = torch.cat([user_incidence @ hyperedges, nodes])
            torch.testing.assert_close(global_[name].double(), expected, rtol=1e-5, atol=1e-5)


def test_lgmrec_one_modality_turns_the_infonce_off_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dprec.models.lgmrec"):
        model = make_model("lgmrec", views=("image",))
    assert [r.getMessage() for r in caplog.records] == ["LGMRec: one modality (image): the cross-modal InfoNCE is off"]
    _, parts = train_loss(model)
    assert parts["cl"] == 0.0


@pytest.mark.parametrize("name", RELATIVES)
def test_learns_and_beats_popularity(fit_synthetic, name: str) -> None:
    popularity = fit_synthetic({"name": "popularity"}, epochs=1)
    result = fit_synthetic({"name": name}, epochs=4)
    bpr = [row["bpr"] for row in result["history"]]
    assert bpr[-1] < 0.7 * bpr[0]
    assert result["valid"]["recall@20"] > popularity["valid"]["recall@20"] + 0.15
    assert result["test"]["recall@20"] > popularity["test"]["recall@20"] + 0.15
