"""Item features of the embedded synthetic catalogue that carry its hidden structure (for the model tests)."""

from __future__ import annotations

import numpy as np


def informative_features(ds, seed: int = 0) -> dict[str, np.ndarray]:
    """'text' = one-hot hidden category, 'image' = one-hot hidden colour, each with noise and noise-only dims
    (16 and 12 wide)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, key, n_values in (("text", "category", 8), ("image", "colour", 6)):
        onehot = np.eye(n_values)[np.asarray(ds.meta["hidden"][key])]
        padded = np.concatenate([onehot, np.zeros_like(onehot)], 1)
        out[name] = (padded + 0.3 * rng.standard_normal(padded.shape)).astype(np.float32)
    return out
