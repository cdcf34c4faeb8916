"""GPU checks (marked ``gpu``, skipped without a CUDA device): the torch.sparse graph backend on ``cuda``
gives the CPU's numbers."""

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
