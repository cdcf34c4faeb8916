"""New items' embeddings from content (dprec.models.cold) and the content-kNN baseline, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dprec.models import MODELS, ModelContext
from dprec.models.cold import Neighbours, new_item_embeddings, projection_content, random_rows
from dprec.models.content_knn import ContentKNN, ContentKNNConfig


def _ctx(features: dict[str, np.ndarray]) -> ModelContext:
    # user 0 bought items 0 and 1, user 1 bought item 2, user 2 nothing
    return ModelContext(
        n_users=3,
        n_items=3,
        train_users=np.array([0, 0, 1]),
        train_items=np.array([0, 1, 2]),
        graph_backend="torch",
        features=features,
    )


FEATURES = {
    "text": np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32),
    "image": np.array([[0.0, 3.0], [1.0, 0.0], [0.0, 1.0]], np.float32),
}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_content_knn_scores_the_mean_cosine_with_the_users_items():
    model = ContentKNN(ContentKNNConfig(), _ctx(FEATURES))
    assert MODELS["content_knn"] == (ContentKNN, ContentKNNConfig) and not model.trainable
    model.eval()
    scores = model.full_sort_predict(torch.arange(3))
    for u, bought in ((0, [0, 1]), (1, [2])):
        for i in range(3):
            expected = np.mean([np.mean([_cos(FEATURES[m][i], FEATURES[m][j]) for m in FEATURES]) for j in bought])
            assert scores[u, i].item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(scores[2], torch.zeros(3))  # nothing bought: no evidence
    new = {"text": np.array([[2.0, 0.0]], np.float32), "image": np.array([[0.0, 1.0]], np.float32)}
    vector = model.content_item_embeddings(new)
    user0, _ = model.final_embeddings()
    expected = np.mean([np.mean([_cos(new[m][0], FEATURES[m][j]) for m in FEATURES]) for j in (0, 1)])
    assert (user0[0] @ vector[0]).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"lack the feature view\(s\) \['image'\]"):
        model.content_item_embeddings({"text": new["text"]})


def test_neighbour_mean_is_the_similarity_weighted_mean_of_the_nearest_trained_items():
    trained = {"text": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], np.float32)}
    new = {"text": np.array([[2.0, 1.0], [-1.0, -1.0]], np.float32)}
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [-7.0, 0.0]])
    neighbours = Neighbours.of(trained, new, k=2)
    out = neighbours.mean(emb)
    # new 0: cos with item 0 = 2/sqrt5, with item 2 = 3/sqrt10 (the two nearest)
    w0, w2 = 2 / 5**0.5, 3 / 10**0.5
    assert torch.allclose(out[0], (w0 * emb[0] + w2 * emb[2]) / (w0 + w2), atol=1e-6)
    # new 1: nearest item 3 (cos 1/sqrt2) then item 0 or 1 (cos -1/sqrt2, weight 0): all weight on item 3
    assert torch.allclose(out[1], emb[3], atol=1e-6)
    flipped = Neighbours(torch.full((1, 2), -0.5), torch.tensor([[0, 1]]))
    assert torch.allclose(flipped.mean(emb), (emb[0] + emb[1]) / 2)  # no positive similarity: uniform
    with pytest.raises(ValueError, match="same feature views"):
        Neighbours.of(trained, {"image": new["text"]}, k=2)


class _Projected(nn.Module):
    """What DPRec exposes to the cold embedder: per-modality projections, its features and beta."""

    def __init__(self) -> None:
        super().__init__()
        self.modality_names = ["text"]
        self.projection = nn.ModuleDict({"text": nn.Linear(2, 2, bias=False)})
        with torch.no_grad():
            self.projection["text"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        self.register_buffer("features_text", torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        self.cfg = type("Cfg", (), {"beta": 0.5})()


def test_dprec_content_part_is_beta_times_the_centred_normalised_projection():
    model = _Projected()
    new = {"text": np.array([[3.0, 1.0]], np.float32)}
    content = projection_content(model, new)
    centred = np.array([3.0, 2.0]) - np.array([0.5, 1.0])  # W x minus the trained items' mean of W x
    assert np.allclose(content.numpy()[0], 0.5 * centred / np.linalg.norm(centred), atol=1e-6)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    neighbours = Neighbours.of({"text": np.eye(2, dtype=np.float32)}, new, k=2)
    both = new_item_embeddings(model, emb, neighbours, new, n_new=1)
    assert torch.allclose(both, neighbours.mean(emb) + content, atol=1e-6)
    knn_only = new_item_embeddings(model, emb, neighbours, new, n_new=1, own_content=False)
    assert torch.allclose(knn_only, neighbours.mean(emb))
    assert projection_content(nn.Linear(2, 2), new) is None  # a model without projections has no content part


def test_random_rows_follow_the_trained_items_scale_and_the_seed():
    emb = torch.tensor([[0.0, 10.0], [2.0, 30.0], [4.0, 50.0]])
    rows = random_rows(emb, 20000, seed=3)
    assert torch.allclose(rows.mean(0), emb.mean(0), atol=0.5)
    assert torch.allclose(rows.std(0), emb.std(0), rtol=0.05)
    assert torch.equal(rows, random_rows(emb, 20000, seed=3)) and not torch.equal(rows, random_rows(emb, 20000, 4))
