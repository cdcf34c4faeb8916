"""Shared fixtures of the model tests: the embedded default dataset with informative features."""

import numpy as np
import pytest
import torch

from dprec.data.synthetic import generate
from dprec.training.config import RunConfig, TrainConfig
from dprec.training.loop import Trainer


def informative_features(ds, seed: int = 0) -> dict[str, np.ndarray]:
    """'text' = one-hot hidden category, 'image' = one-hot hidden colour, each with noise and noise-only dims."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, key, n_values in (("text", "category", 8), ("image", "colour", 6)):
        onehot = np.eye(n_values)[np.asarray(ds.meta["hidden"][key])]
        padded = np.concatenate([onehot, np.zeros_like(onehot)], 1)
        out[name] = (padded + 0.3 * rng.standard_normal(padded.shape)).astype(np.float32)
    return out


@pytest.fixture(scope="session")
def synthetic():
    ds = generate()
    return ds, informative_features(ds)


@pytest.fixture
def fit_synthetic(synthetic):
    """``fit(model_section, epochs) -> result`` on the synthetic set, with one torch thread
    (2 threads on a busy 2-core machine are many times slower), restored afterwards."""
    ds, features = synthetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def fit(model: dict, epochs: int) -> dict:
        train = TrainConfig(epochs=epochs, batch_size=512, lr=0.01, seed=1, graph_backend="torch", ks=(10, 20))
        return Trainer(RunConfig(dataset="synthetic", model=model, train=train), ds, features=features).fit(
            log=lambda s: None
        )

    yield fit
    torch.set_num_threads(threads)
