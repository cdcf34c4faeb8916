"""dprec.graph.resolve_backend: "dgl" on a device the installed DGL cannot use falls back to "torch", warning once."""

from __future__ import annotations

import logging

import pytest
import torch

from dprec.graph import api, available_backends, dgl_shim, resolve_backend

requires_dgl = pytest.mark.skipif("dgl" not in available_backends(), reason="DGL does not import here")


@pytest.fixture
def fresh_warning(monkeypatch):
    """As in a new process: the fallback warning not yet given."""
    monkeypatch.setattr(api, "_fallback_warned", False)


def fallback_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == api.logger.name and "cannot run on" in r.getMessage()]


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_cpu_keeps_dgl(device, fresh_warning, caplog, monkeypatch):
    monkeypatch.setattr(dgl_shim, "dgl_device_problem", lambda d: pytest.fail("no check is needed on the CPU"))
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("dgl", device) == "dgl"
    assert not fallback_records(caplog)


def test_non_cpu_device_without_dgl_support_falls_back_to_torch_with_one_warning(fresh_warning, caplog, monkeypatch):
    asked = []

    def problem(device: str) -> str:
        asked.append(device)
        return "the installed DGL 2.1.0 is a CPU-only build (its runtime has no CUDA device API)"

    monkeypatch.setattr(dgl_shim, "dgl_device_problem", problem)
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("dgl", "cuda") == "torch"
        assert resolve_backend("dgl", torch.device("cuda", 0)) == "torch"
    assert asked == ["cuda", "cuda:0"]
    records = fallback_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING and "\n" not in message
    assert "'dgl' cannot run on cuda: the installed DGL 2.1.0 is a CPU-only build" in message
    assert "torch.sparse backend instead" in message and "CUDA build of DGL" in message


def test_non_cpu_device_with_dgl_support_keeps_dgl(fresh_warning, caplog, monkeypatch):
    monkeypatch.setattr(dgl_shim, "dgl_device_problem", lambda device: None)
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("dgl", "cuda:1") == "dgl"
    assert not fallback_records(caplog)


@pytest.mark.parametrize("device", [None, "cpu", "cuda", "meta"])
def test_torch_passes_through(device, fresh_warning, caplog, monkeypatch):
    monkeypatch.setattr(dgl_shim, "dgl_device_problem", lambda d: pytest.fail("torch needs no DGL check"))
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("torch", device) == "torch"
    assert not fallback_records(caplog)


@pytest.mark.parametrize("backend", ["pyg", "DGL", ""])
def test_unknown_backend_raises(backend):
    with pytest.raises(ValueError, match="unknown graph backend"):
        resolve_backend(backend, "cpu")


@requires_dgl
def test_detection_of_the_installed_dgl():
    """Here: the CPU always works; DGL has no backend for "meta"; CUDA works only with a CUDA build of DGL."""
    assert dgl_shim.dgl_device_problem("cpu") is None
    assert "CPU and CUDA devices only" in dgl_shim.dgl_device_problem("meta")
    from dgl._ffi.function import get_global_func

    if get_global_func("device_api.cuda", allow_missing=True) is None:  # PyPI's CPU build
        assert "CPU-only build" in dgl_shim.dgl_device_problem("cuda")


def test_a_dgl_that_does_not_import_falls_back(fresh_warning, caplog, monkeypatch):
    def broken():
        raise dgl_shim.DGLUnavailableError("no dgl") from ImportError("No module named 'dgl'")

    monkeypatch.setattr(dgl_shim, "import_dgl", broken)
    dgl_shim.dgl_device_problem.cache_clear()
    try:
        assert "DGL does not import" in dgl_shim.dgl_device_problem("cuda")
        with caplog.at_level(logging.WARNING):
            assert resolve_backend("dgl", "cuda") == "torch"
        assert len(fallback_records(caplog)) == 1
    finally:
        dgl_shim.dgl_device_problem.cache_clear()
