"""Image loading faults and the image encoders (MobileNetV2 and Hugging Face vision models)."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dprec.features import mobilenet
from dprec.features.config import ImageConfig
from dprec.features.image import ImageEncoder, ImageModelError, load_image, resolve_image_model


def jpeg(colour=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_sources_and_failure_kinds(tmp_path):
    good = jpeg()
    (tmp_path / "a.jpg").write_bytes(good)
    img, kind, _ = load_image(good, None, None, False, 1.0)
    assert img.size == (64, 48) and kind is None
    assert load_image(b"", str(tmp_path / "a.jpg"), None, False, 1.0)[0].mode == "RGB"
    assert load_image(b"", str(tmp_path / "nope.jpg"), None, False, 1.0)[1] == "image_file_missing"
    assert load_image(good[: len(good) // 2], None, None, False, 1.0)[1] == "image_decode_error"  # truncated JPEG
    assert load_image(b"\xff\xd8\xff\xe0garbage", None, None, False, 1.0)[1] == "image_decode_error"
    assert load_image(b"", "", "http://example.invalid/x.jpg", False, 1.0)[1] == "image_url_not_fetched"
    assert load_image(b"", "", "", False, 1.0)[1] == "image_none"


def test_url_fetch_fails_fast_without_network():
    t0 = time.perf_counter()
    img, kind, message = load_image(b"", "", f"http://127.0.0.1:{closed_port()}/x.jpg", True, 2.0)
    assert img is None and kind == "image_url_error" and "127.0.0.1" in message
    assert time.perf_counter() - t0 < 5


def test_mobilenet_encoder_equals_direct_model():
    resolved = resolve_image_model(ImageConfig(), "cpu")
    assert resolved.revision["weights_sha256"] and resolved.dtype == "float32"
    enc = ImageEncoder(resolved, batch_size=2)
    images = [Image.open(io.BytesIO(jpeg(c))).convert("RGB") for c in ((200, 30, 30), (20, 200, 30), (0, 0, 250))]
    vectors, errors = enc.encode(images)
    assert vectors.shape == (3, 1280) and errors == [None] * 3
    model = mobilenet.load_mobilenet_v2()
    with torch.inference_mode():
        direct = np.stack([model.embed(torch.from_numpy(mobilenet.preprocess(im))[None])[0].numpy() for im in images])
    np.testing.assert_allclose(vectors, direct, rtol=1e-5, atol=1e-5)


def _tiny_vit(folder):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    ViTModel(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=99
        ),
        vision_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=20,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=12,
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_vision_model_uses_pooler_output(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    folder = _tiny_vit(tmp_path / "vit")
    resolved = resolve_image_model(ImageConfig(model=str(folder)), "cpu")
    assert resolved.kind == "hf" and "model.safetensors" in resolved.revision["weights_sha256"]
    enc = ImageEncoder(resolved, batch_size=2)
    images = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    vectors, _ = enc.encode(images)
    assert vectors.shape == (3, 32)
    model, proc = AutoModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)
    with torch.inference_mode():
        direct = model(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"]).pooler_output.numpy()
    np.testing.assert_allclose(vectors, direct, rtol=1e-5, atol=1e-6)


def test_clip_uses_image_features(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    folder = _tiny_clip(tmp_path / "clip")
    resolved = resolve_image_model(ImageConfig(model=str(folder)), "cpu")
    assert resolved.pooling == "get_image_features"
    enc = ImageEncoder(resolved, batch_size=4)
    images = [Image.new("RGB", (50, 40), (i * 60, 100, 30)) for i in range(3)]
    vectors, _ = enc.encode(images)
    assert vectors.shape == (3, 12)
    model, proc = AutoModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)
    with torch.inference_mode():
        feats = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    np.testing.assert_allclose(vectors, feats.numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_image_model_is_a_clear_error(tmp_path):
    with pytest.raises(ImageModelError, match="image model .*cannot read its config"):
        resolve_image_model(ImageConfig(model=str(tmp_path / "no-such-model")), "cpu")
    with pytest.raises(ImageModelError, match="weights file .* not found"):
        resolve_image_model(ImageConfig(model=str(tmp_path / "w.pth")), "cpu")
