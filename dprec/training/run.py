"""A saved run folder: what ``python -m dprec.train`` leaves behind, and how to load it again.

``<out>/config.yaml`` (the resolved run config), ``<out>/model.pt`` (the best state dict,
tensors only, loaded with ``weights_only=True``) and ``<out>/metrics.json`` (the fit result:
history, best epoch, best validation and test metrics, plus the dataset's content hash).
Each file is written atomically (:mod:`dprec.io`). :func:`load_run` refuses a run whose
dataset changed since it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from dprec.io import atomic_write_text, atomic_write_with
from dprec.training.config import load_config
from dprec.training.loop import Trainer


def save_run(trainer: Trainer, result: dict[str, Any], out: str | Path) -> Path:
    """Write config.yaml, model.pt (state dict, tensors only) and metrics.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(trainer.cfg.as_dict(), sort_keys=False))
    state = trainer.model.state_dict()
    atomic_write_with(out / "model.pt", lambda tmp: torch.save(state, tmp))
    meta = {"dataset_hash": trainer.ds.meta.get("content_hash"), **dict(result)}
    atomic_write_text(out / "metrics.json", json.dumps(meta, indent=2) + "\n")
    return out


def load_run(folder: str | Path) -> Trainer:
    """A trainer with the best model of a saved run loaded (for evaluation: ``trainer.evaluate(split)``)."""
    folder = Path(folder)
    cfg = load_config(folder / "config.yaml")
    trainer = Trainer(cfg)
    saved = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("dataset_hash")
    if saved != trainer.ds.meta.get("content_hash"):
        raise ValueError(f"{folder}: the dataset {cfg.dataset} changed since this run was trained")
    trainer.model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return trainer
