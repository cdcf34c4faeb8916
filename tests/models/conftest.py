"""Shared fixtures of the model tests: the embedded default dataset with informative features."""

import pytest
import torch

from dprec.data.synthetic import generate
from dprec.training.config import RunConfig, TrainConfig
from dprec.training.loop import Trainer
from tests.synthetic_features import informative_features


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
