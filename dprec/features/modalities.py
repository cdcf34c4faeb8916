"""The item feature modalities a run config names, read from feature shards (DESIGN §2).

Each entry is ``name: <shard folder>`` or ``name: <shard folder>#<modality in the shards>`` (that
defaults to the name), e.g. ``text: data_shards/default/smollm2-mobilenet#text``. Each folder is
read once through :func:`dprec.features.shards.read_features`, which checks the manifest and the
dataset hash; a modality is one (n_items x d) float32 matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dprec.config import ConfigError
from dprec.features.shards import load_manifest, read_features

if TYPE_CHECKING:
    from dprec.data.dataset import Dataset


def load_features(specs: dict[str, str], ds: Dataset) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read the configured feature modalities from their shards (manifest and dataset hash checked).

    Returns ({modality: (n_items x d) float32}, {folder: manifest}).
    """
    read: dict[str, dict[str, np.ndarray]] = {}
    loaded: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        folder, _, modality = spec.partition("#")
        modality = modality or name
        if folder not in read:
            read[folder] = read_features(folder, ds)
        if modality not in read[folder] or read[folder][modality].ndim != 2:
            have = sorted(k for k, v in read[folder].items() if getattr(v, "ndim", 0) == 2)
            raise ConfigError(f"features.{name}: {folder} has no modality {modality!r} (it has {have})")
        loaded[name] = read[folder][modality]
    return loaded, {folder: load_manifest(folder) for folder in read}
