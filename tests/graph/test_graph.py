"""dprec.graph: both backends against dense references and against each other (outputs and gradients)."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

from dprec.graph import (
    DGLUnavailableError,
    SparseIncidence,
    available_backends,
    build_user_item_graph,
    build_weighted_graph,
    dgl_shim,
    hypergraph_conv,
    lightgcn_propagate,
)

requires_dgl = pytest.mark.skipif(
    "dgl" not in available_backends(),
    reason="DGL does not import here (pip install dgl==2.1.0); only the torch backend is tested",
)
BACKENDS = [pytest.param("dgl", marks=requires_dgl), "torch"]
BACKEND_NAMES = ("dgl", "torch")
SEEDS = [0, 1, 2]
TOL = 1e-5


def random_pairs(seed: int, n_users: int, n_items: int, n_pairs: int, unique: bool = False):
    """Random training pairs that leave the last 3 users and the last 2 items isolated."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users - 3, n_pairs)
    items = rng.integers(0, n_items - 2, n_pairs)
    if unique:
        pairs = np.unique(np.stack([users, items], 1), axis=0)
        users, items = pairs[:, 0], pairs[:, 1]
    return users, items


def dense_normalised_adjacency(n_users: int, n_items: int, users, items) -> torch.Tensor:
    n = n_users + n_items
    adj = torch.zeros(n, n, dtype=torch.float64)
    adj[users, n_users + items] = 1.0
    adj[n_users + items, users] = 1.0
    degree = adj.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1).rsqrt(), torch.zeros_like(degree))
    return inv_sqrt[:, None] * adj * inv_sqrt[None, :]


def value_and_grad(fn, *inputs: torch.Tensor, seed: int = 0):
    """Outputs of fn and the gradients of a random linear function of them w.r.t. each input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=gen).to(out.dtype)).sum() for out in outputs)
    loss.backward()
    return [out.detach() for out in outputs], [t.grad for t in inputs]


def assert_close(actual, expected, tol: float = TOL) -> None:
    """max |a - e| < tol, relative to max |e| where that exceeds 1 (float32 sums of many terms)."""
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        scale = max(1.0, e.abs().max().item())
        assert (a.double() - e.double()).abs().max().item() < tol * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_user_item_graph_equals_dense_normalised_adjacency(backend: str, seed: int) -> None:
    n_users, n_items = 30, 20
    users, items = random_pairs(seed, n_users, n_items, 80)
    graph = build_user_item_graph(n_users, n_items, users, items, backend=backend)
    adj = dense_normalised_adjacency(n_users, n_items, users, items)
    x = torch.randn(n_users + n_items, 8, generator=torch.Generator().manual_seed(seed))
    out, grad = value_and_grad(graph.propagate, x, seed=seed)
    expected_out, expected_grad = value_and_grad(lambda z: adj @ z.double(), x, seed=seed)
    assert graph.backend == backend
    assert_close(out + grad, expected_out + expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_isolated_nodes_get_zero_rows(backend: str) -> None:
    n_users, n_items = 30, 20
    graph = build_user_item_graph(n_users, n_items, *random_pairs(0, n_users, n_items, 80), backend=backend)
    out = graph.propagate(torch.randn(n_users + n_items, 4))
    isolated = [27, 28, 29, n_users + 18, n_users + 19]
    assert torch.isfinite(out).all()
    assert (out[isolated] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_interaction_is_one_edge(backend: str) -> None:
    users, items = random_pairs(3, 30, 20, 60, unique=True)
    once = build_user_item_graph(30, 20, users, items, backend=backend)
    repeated = np.concatenate([users, users[:10]]), np.concatenate([items, items[:10]])
    twice = build_user_item_graph(30, 20, *repeated, backend=backend)
    x = torch.randn(50, 4)
    assert once.num_edges == twice.num_edges == 2 * len(users)
    assert_close([twice.propagate(x)], [once.propagate(x)])


@requires_dgl
@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_user_item_backends_agree_in_value_and_gradient(seed: int, unique: bool) -> None:
    n_users, n_items = 400, 300
    users, items = random_pairs(seed, n_users, n_items, 3000, unique=unique)
    graphs = [build_user_item_graph(n_users, n_items, users, items, backend=b) for b in BACKEND_NAMES]
    x = torch.randn(n_users + n_items, 16, generator=torch.Generator().manual_seed(seed))
    (dgl_out, dgl_grad), (torch_out, torch_grad) = (value_and_grad(g.propagate, x, seed=seed) for g in graphs)
    assert graphs[0].num_edges == graphs[1].num_edges
    assert_close(dgl_out, torch_out)
    assert_close(dgl_grad, torch_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factors", ["weight", "scales", "weight+scales"])
@pytest.mark.parametrize("seed", SEEDS)
def test_weighted_graph_equals_dense_matrix(backend: str, factors: str, seed: int) -> None:
    """M[j, i] = dst_scale[j] * (sum of the weights of the edges i->j) * src_scale[i], repeated edges included."""
    rng = np.random.default_rng(seed)
    n_src, n_dst, n_edges = 25, 15, 90  # rectangular, with repeated edges
    src, dst = rng.integers(0, n_src, n_edges), rng.integers(0, n_dst, n_edges)
    weight = rng.random(n_edges) if "weight" in factors else None
    src_scale, dst_scale = (rng.random(n_src), rng.random(n_dst)) if "scales" in factors else (None, None)
    matrix = np.zeros((n_dst, n_src))
    np.add.at(matrix, (dst, src), np.ones(n_edges) if weight is None else weight)
    if src_scale is not None:
        matrix = dst_scale[:, None] * matrix * src_scale[None, :]
    graph = build_weighted_graph(
        n_src, n_dst, src, dst, weight, backend=backend, src_scale=src_scale, dst_scale=dst_scale
    )
    x = torch.randn(n_src, 6, generator=torch.Generator().manual_seed(seed))
    out, grad = value_and_grad(graph.propagate, x, seed=seed)
    expected_out, expected_grad = value_and_grad(lambda z: torch.from_numpy(matrix) @ z.double(), x, seed=seed)
    assert graph.num_edges == len(set(zip(src, dst, strict=True)))
    assert_close(out + grad, expected_out + expected_grad)


@requires_dgl
@pytest.mark.parametrize("seed", SEEDS)
def test_weighted_backends_agree_in_value_and_gradient(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src, dst, weight = rng.integers(0, 500, 4000), rng.integers(0, 300, 4000), rng.random(4000)
    graphs = [build_weighted_graph(500, 300, src, dst, weight, backend=b) for b in BACKEND_NAMES]
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(seed))
    (dgl_out, dgl_grad), (torch_out, torch_grad) = (value_and_grad(g.propagate, x, seed=seed) for g in graphs)
    assert_close(dgl_out, torch_out)
    assert_close(dgl_grad, torch_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightgcn_propagate_is_mean_of_adjacency_powers(backend: str) -> None:
    users, items = random_pairs(4, 30, 20, 80)
    graph = build_user_item_graph(30, 20, users, items, backend=backend)
    adj = dense_normalised_adjacency(30, 20, users, items)
    x = torch.randn(50, 8)
    layers = [x.double(), adj @ x.double(), adj @ adj @ x.double(), adj @ adj @ adj @ x.double()]
    assert_close([lightgcn_propagate(graph, x, 3)], [torch.stack(layers).mean(0)])
    assert_close([lightgcn_propagate(graph, x, 0)], [x])


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_to_device_keeps_values(backend: str) -> None:
    graph = build_user_item_graph(30, 20, *random_pairs(5, 30, 20, 80), backend=backend)
    x = torch.randn(50, 4)
    moved = graph.to("cpu")
    assert moved.backend == backend and moved.num_edges == graph.num_edges
    assert_close([moved.propagate(x)], [graph.propagate(x)])


def dense_hypergraph_reference(incidence: torch.Tensor, x: torch.Tensor):
    hyperedge = incidence.double().T @ x.double()
    return incidence.double() @ hyperedge, hyperedge


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_hypergraph_conv_equals_dense_products(backend: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    incidence = torch.softmax(torch.randn(40, 6, generator=gen), dim=1)
    x = torch.randn(40, 8, generator=gen)
    out, grads = value_and_grad(functools.partial(hypergraph_conv, backend=backend), incidence, x, seed=seed)
    expected_out, expected_grads = value_and_grad(dense_hypergraph_reference, incidence, x, seed=seed)
    assert_close(out + grads, expected_out + expected_grads)


@requires_dgl
@pytest.mark.parametrize("seed", SEEDS)
def test_hypergraph_backends_agree_in_value_and_gradient(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    incidence = torch.nn.functional.gumbel_softmax(torch.randn(700, 16, generator=gen), tau=0.5)
    x = torch.randn(700, 32, generator=gen)
    results = [value_and_grad(functools.partial(hypergraph_conv, backend=b), incidence, x) for b in BACKEND_NAMES]
    (dgl_out, dgl_grads), (torch_out, torch_grads) = results
    assert_close(dgl_out, torch_out)
    assert_close(dgl_grads, torch_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_incidence_equals_dense_incidence(backend: str) -> None:
    gen = torch.Generator().manual_seed(7)
    n_nodes, k, nnz = 40, 9, 70
    rows, cols = torch.randint(0, n_nodes, (nnz,), generator=gen), torch.randint(0, k, (nnz,), generator=gen)
    values, x = torch.rand(nnz, generator=gen), torch.randn(n_nodes, 5, generator=gen)

    def sparse_conv(v: torch.Tensor, z: torch.Tensor):
        return hypergraph_conv(SparseIncidence(rows, cols, v, n_nodes, k), z, backend=backend)

    def dense_conv(v: torch.Tensor, z: torch.Tensor):
        dense = torch.zeros(n_nodes, k, dtype=v.dtype).index_put((rows, cols), v, accumulate=True)
        return dense_hypergraph_reference(dense, z)

    out, grads = value_and_grad(sparse_conv, values, x)
    expected_out, expected_grads = value_and_grad(dense_conv, values, x)
    assert_close(out + grads, expected_out + expected_grads)


def test_unknown_backend_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown graph backend 'scipy'.*'dgl', 'torch'"):
        build_user_item_graph(3, 2, [0, 1], [1, 0], backend="scipy")


@pytest.mark.filterwarnings("error")
def test_read_only_arrays_are_accepted_without_warning() -> None:
    users, items = random_pairs(6, 30, 20, 80)
    users.flags.writeable = items.flags.writeable = False  # as memory-mapped or Arrow-backed arrays are
    graph = build_user_item_graph(30, 20, users, items, backend="torch")
    assert graph.num_edges == 2 * len(set(zip(users, items, strict=True)))


def test_out_of_range_index_is_named() -> None:
    with pytest.raises(ValueError, match=r"items: indices must lie in \[0, 2\)"):
        build_user_item_graph(3, 2, [0, 1], [1, 2], backend="torch")


def test_non_finite_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"weight: 1 values are NaN or infinite"):
        build_weighted_graph(3, 2, [0, 1], [1, 0], [1.0, float("nan")], backend="torch")


def test_missing_dgl_error_suggests_torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dgl", None)  # makes `import dgl` fail
    dgl_shim.import_dgl.cache_clear()
    try:
        with pytest.raises(DGLUnavailableError, match=r"pip install dgl==2\.1\.0.*backend='torch'"):
            dgl_shim.import_dgl()
    finally:
        dgl_shim.import_dgl.cache_clear()
