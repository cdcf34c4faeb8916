"""The plain-torch MobileNetV2 loads torchvision's checkpoint strictly and classifies real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dprec.features import mobilenet

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos")

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def model():
    return mobilenet.load_mobilenet_v2()


def top5(model, array: np.ndarray) -> set[int]:
    x = torch.from_numpy(mobilenet.preprocess(Image.fromarray(array)))[None]
    with torch.inference_mode():
        return set(model(x)[0].topk(5).indices.tolist())


def test_checkpoint_matches_the_architecture_exactly(model):
    state = torch.load(mobilenet.default_weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert model.features[18][0].weight.shape == (1280, 320, 1, 1)
    assert model.classifier[1].weight.shape == (1000, 1280)


def test_cat_photo_is_a_cat(model):
    assert top5(model, skimage_data.chelsea()) & CAT_CLASSES


def test_coffee_photo_is_a_cup(model):
    assert top5(model, skimage_data.coffee()) & CUP_CLASSES


def test_preprocess_follows_torchvision():
    img = Image.fromarray(np.full((300, 400, 3), 255, np.uint8))
    x = mobilenet.preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    expected = (1.0 - np.asarray(mobilenet.IMAGENET_MEAN)) / np.asarray(mobilenet.IMAGENET_STD)
    np.testing.assert_allclose(x[:, 100, 100], expected, rtol=1e-6)


def test_embed_is_the_pooled_classifier_input(model):
    x = torch.from_numpy(mobilenet.preprocess(Image.fromarray(skimage_data.chelsea())))[None]
    with torch.inference_mode():
        feats = model.embed(x)
        logits = model(x)
        from_feats = model.classifier[1](feats)
    assert feats.shape == (1, 1280) and (feats >= 0).all()
    torch.testing.assert_close(from_feats, logits)
