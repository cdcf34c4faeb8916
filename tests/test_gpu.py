"""GPU checks (marked ``gpu``, skipped without a CUDA device): the torch.sparse graph backend on ``cuda``
gives the CPU's numbers; ``resolve_backend("dgl", "cuda")`` gives a backend that works there (PyPI's DGL is
a CPU build); one DPRec training step on ``cuda`` gives the CPU's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprec.graph import build_user_item_graph, lightgcn_propagate

pytestmark = pytest.mark.gpu


def test_lightgcn_propagation_on_cuda_equals_cpu():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 50, 400), rng.integers(0, 80, 400)
    x = torch.randn(130, 16, generator=torch.Generator().manual_seed(0))
    cpu = lightgcn_propagate(build_user_item_graph(50, 80, users, items, "torch"), x, 2)
    graph = build_user_item_graph(50, 80, users, items, "torch").to("cuda")
    gpu = lightgcn_propagate(graph, x.cuda(), 2)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


def test_resolve_backend_dgl_on_cuda_gives_a_working_backend(caplog):
    """PyPI's DGL is a CPU build: "dgl" then resolves to "torch" (one warning); a CUDA build keeps "dgl"."""
    from dprec.graph import resolve_backend

    backend = resolve_backend("dgl", "cuda")
    assert backend in ("dgl", "torch")
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 30, 200), rng.integers(0, 40, 200)
    x = torch.randn(70, 8, generator=torch.Generator().manual_seed(1))
    cpu = lightgcn_propagate(build_user_item_graph(30, 40, users, items, "torch"), x, 2)
    gpu = lightgcn_propagate(build_user_item_graph(30, 40, users, items, backend).to("cuda"), x.cuda(), 2)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


def _dprec_step_losses(device: str, backend: str) -> tuple[float, float]:
    """Losses of a tiny DPRec's first step and of the step after it (one Adam update later), on ``device``.

    Deterministic parts only (soft hyperedge assignment, no incidence dropout): CPU and CUDA draw
    different random numbers from the same seed, so Gumbel noise or dropout would differ.
    """
    from dprec.data.synthetic import SyntheticSpec, generate
    from dprec.training.config import RunConfig, TrainConfig
    from dprec.training.loop import Trainer

    ds = generate(SyntheticSpec(n_users=60, n_items=50, min_per_user=6, max_per_user=10, image_size=16, seed=3))
    rng = np.random.default_rng(0)
    feats = {
        name: rng.standard_normal((ds.n_items, dim)).astype(np.float32) for name, dim in (("text", 12), ("image", 8))
    }
    model = {
        "name": "dprec",
        "embedding_dim": 16,
        "projection_hidden": 16,
        "knn_k": 4,
        "n_hyperedges": 3,
        "hyperedge_assignment": "soft",
        "keep_rate": 1.0,
    }
    train = TrainConfig(epochs=2, batch_size=4096, lr=0.01, seed=1, ks=(10, 20), graph_backend=backend)
    trainer = Trainer(
        RunConfig(dataset="tiny", model=model, train=train), ds, features=feats, device=torch.device(device)
    )
    trainer.model.to_device(trainer.device)  # the single-process Trainer does not move the model itself
    first = trainer.train_epoch(0)["loss"]  # one step: the batch holds every training pair
    second = trainer.train_epoch(1)["loss"]
    assert next(trainer.model.parameters()).device.type == torch.device(device).type
    return first, second


def test_one_dprec_training_step_on_cuda_equals_cpu():
    from dprec.graph import resolve_backend

    backend = resolve_backend("dgl", "cuda")
    cpu = _dprec_step_losses("cpu", backend)
    gpu = _dprec_step_losses("cuda", backend)
    assert gpu == pytest.approx(cpu, abs=1e-4)
