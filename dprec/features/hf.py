"""Hugging Face model helpers the text and image encoders share: pinning a model, device and dtype.

A model is pinned for the manifest either by the sha256 of every weight file of a local folder
(:func:`weights_digest`) or by the hub commit its id and revision resolve to (:func:`hub_commit`:
given, asked of the hub when online, else read from the local HF cache). Packaged models are
found without importing their package (:func:`package_dir`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from dprec.config import DPRecError
from dprec.io import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelError(DPRecError, ValueError):
    """A model cannot be resolved or loaded; the message names it and what to do."""


def one_line(text: object, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters: fit for a one-line error."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed; install it or name another model")
    return Path(spec.submodule_search_locations[0])


def weights_digest(folder: Path) -> dict[str, str]:
    """sha256 of every weight file in a local model folder (the revision of a local model)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in this model folder")
    return {str(p.relative_to(folder)): sha256_file(p) for p in files}


def check_weights(load_path: str | Path, pinned: Any, what: str) -> None:
    """Refuse to load weights other than those pinned for the run (and so named in its manifest's spec).

    ``pinned`` is a model folder's ``{file: sha256}`` (:func:`weights_digest`) or one weight file's
    sha256; anything else (a hub commit) is not checked here.
    """
    path = Path(load_path)
    if isinstance(pinned, dict) and path.is_dir():
        got = weights_digest(path)
        changed = sorted(k for k in set(got) | set(pinned) if got.get(k) != pinned.get(k))
    elif isinstance(pinned, str) and path.is_file():
        changed = [path.name] if sha256_file(path) != pinned else []
    else:
        return
    if changed:
        raise ModelError(
            f"{what}: the weights in {path} differ from those pinned for this run ({', '.join(changed)} changed "
            "after the run resolved the model); make the model files the same on every node, or rerun extract"
        )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other values as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> ``bfloat16`` on CUDA, ``float32`` elsewhere; other values as given."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub id resolves to: given, from the hub when online, or from the local HF cache."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            from huggingface_hub import model_info

            return model_info(repo, revision=revision).sha
        except Exception:  # noqa: BLE001 - unreachable hub: fall back to the cache
            pass
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def pin_hf_model(model: str, revision: str | None) -> tuple[str, str, dict[str, Any], str | None]:
    """(name, load path, revision record, revision to load) of a local model folder or a hub id."""
    local = Path(model).expanduser()
    if local.is_dir():
        local = local.resolve()
        return local.name, str(local), {"weights_sha256": weights_digest(local)}, None
    commit = hub_commit(model, revision)
    return model, model, {"hub_id": model, "requested": revision or "main", "commit": commit}, commit or revision
