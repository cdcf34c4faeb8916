"""A saved run folder: what ``python -m dprec.train`` leaves behind, and how to load it again.

``<out>/config.yaml`` (the resolved run config), ``<out>/model.pt`` (the best state dict,
tensors only, loaded with ``weights_only=True``) and ``<out>/metrics.json`` (the fit result:
history, best epoch, best validation and test metrics, the MLflow run id, plus the dataset's
content hash). Each file is written atomically (:mod:`dprec.io`). :func:`check_run_folder`
is called before training, so a run folder that cannot be written fails in a second, not
after the fit. :func:`load_run` refuses a run whose dataset changed since it was trained, and
a folder that is not a run folder, with a :class:`RunFolderError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from dprec.config import DPRecError
from dprec.io import atomic_write_text, atomic_write_with
from dprec.training.cold import make_trainer
from dprec.training.config import load_config
from dprec.training.loop import Trainer

RUN_FILES = ("config.yaml", "model.pt", "metrics.json")


class RunFolderError(DPRecError, ValueError):
    """A run folder that cannot be written, or read back as a run; the message names the path."""


def check_run_folder(out: str | Path) -> Path:
    """Create the run folder ``out`` (and its parents) and prove it writable; raise :class:`RunFolderError` if not."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"out: {out} cannot be a run folder: {parent} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".tmp-write-check-"):
            pass
    except OSError as exc:
        raise RunFolderError(f"out: cannot write the run folder {out} ({exc.strerror or exc})") from exc
    return out


@contextmanager
def new_run_folder(out: str | Path) -> Iterator[Path]:
    """:func:`check_run_folder` for the block; folders it created are removed again if the block fails while empty.

    So a run that stops before writing anything (a dataset error, Ctrl-C while loading) leaves no
    empty run folder behind.
    """
    out = Path(out)
    created = [p for p in [out, *out.parents] if not p.exists()]
    out = check_run_folder(out)
    try:
        yield out
    except BaseException:
        for folder in created:  # innermost first
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        raise


def save_run(trainer: Trainer, result: dict[str, Any], out: str | Path) -> Path:
    """Write config.yaml, model.pt (state dict, tensors only) and metrics.json."""
    out = check_run_folder(out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(trainer.cfg.as_dict(), sort_keys=False))
    state = trainer.model.state_dict()
    atomic_write_with(out / "model.pt", lambda tmp: torch.save(state, tmp))
    meta = {"dataset_hash": trainer.ds.meta.get("content_hash"), **dict(result)}
    atomic_write_text(out / "metrics.json", json.dumps(meta, indent=2) + "\n")
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved by :func:`save_run`, unpickled with ``weights_only=True`` (tensors and plain values only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"{path}: not a model state this project wrote; refused to load it ({first})") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise RunFolderError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def run_result(folder: str | Path) -> dict[str, Any]:
    """A run folder's ``metrics.json``: the fit result (best epoch, valid and test metrics, MLflow run id)."""
    path = Path(folder) / "metrics.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot read ({exc.strerror or exc}); is {folder} a run folder?") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    return meta


def load_run(folder: str | Path) -> Trainer:
    """A trainer with the best model of a saved run loaded (for evaluation: ``trainer.evaluate(split)``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: no such run folder (write one with python -m dprec.train)")
    missing = [name for name in RUN_FILES if not (folder / name).is_file()]
    if missing:
        raise RunFolderError(
            f"{folder}: not a run folder, {', '.join(missing)} missing (written by python -m dprec.train)"
        )
    cfg = load_config(folder / "config.yaml")
    meta = run_result(folder)
    trainer = make_trainer(cfg)
    if meta.get("dataset_hash") != trainer.ds.meta.get("content_hash"):
        raise RunFolderError(f"{folder}: the dataset {cfg.dataset} changed since this run was trained")
    state = load_state_dict_file(folder / "model.pt")
    try:
        trainer.model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RunFolderError(f"{folder / 'model.pt'}: does not fit the model of config.yaml ({first})") from exc
    return trainer
