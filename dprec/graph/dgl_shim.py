"""The one place in DPRec that imports DGL.

DGL's releases stop at torch 2.4, but DGL 2.1.0's core (graphs, heterographs, ``update_all`` with
``dgl.function`` builtins, forward and backward) works on newer torch. Two parts of it do not:

- ``dgl.graphbolt`` (the new data loader) imports ``torchdata.datapipes``, which torchdata >= 0.10
  no longer ships, and loads a C++ library built only for torch 2.0-2.2; ``import dgl`` imports it
  eagerly. DPRec never uses graphbolt, so an empty module is registered under its name before the
  first ``import dgl``.
- ``dgl.sparse`` needs a C++ library built for the exact torch version (the wheel has 2.0.0 only)
  and does not load; DPRec does not use it.

Everything else in the project reaches DGL through ``import_dgl()``. The wheel on PyPI is a CPU build:
it cannot hold a graph on a GPU. ``dgl_device_problem(device)`` says why DGL cannot run on a device (or
None where it can), for ``dprec.graph.api.resolve_backend``.
"""

from __future__ import annotations

import functools
import sys
import types


class DGLUnavailableError(ImportError):
    """DGL is not installed or does not import beside this torch."""


@functools.cache
def import_dgl() -> types.ModuleType:
    """Return the ``dgl`` module, importing it once without graphbolt; raise DGLUnavailableError if it fails."""
    sys.modules.setdefault("dgl.graphbolt", types.ModuleType("dgl.graphbolt"))
    try:
        import dgl
    except Exception as err:
        raise DGLUnavailableError(
            f"the DGL graph backend is unavailable: `import dgl` failed ({type(err).__name__}: {err}). "
            "Install it with `pip install dgl==2.1.0 packaging pandas`, "
            "or use the torch.sparse backend (backend='torch'), which gives the same results."
        ) from err
    return dgl


CPU_DEVICE_TYPES = ("cpu",)


@functools.cache
def dgl_device_problem(device: str) -> str | None:
    """Why DGL cannot hold and propagate graphs on ``device`` (a torch device string), or None where it can.

    CPU: always None (whether DGL imports at all is ``import_dgl``'s to say). CUDA: the installed DGL's
    runtime must register the CUDA device API (a CPU build does not: its ``libdgl.so`` has only
    ``device_api.cpu``), and a two-node graph must go to the device and pass one message there (this
    catches a CUDA build that does not fit this driver or GPU). Other device types: DGL has no backend
    for them. Checked once per device string and process.
    """
    import torch

    dev = torch.device(device)
    if dev.type in CPU_DEVICE_TYPES:
        return None
    try:
        dgl = import_dgl()
    except DGLUnavailableError as err:
        return f"DGL does not import ({err.__cause__ or err})"
    version = getattr(dgl, "__version__", "?")
    if dev.type != "cuda":
        return f"DGL {version} runs on CPU and CUDA devices only, not on {dev.type!r}"
    try:
        from dgl._ffi.function import get_global_func

        has_cuda_api = get_global_func("device_api.cuda", allow_missing=True) is not None
    except (ImportError, AttributeError):  # a DGL without this registry: let the probe below decide
        has_cuda_api = True
    if not has_cuda_api:
        return f"the installed DGL {version} is a CPU-only build (its runtime has no CUDA device API)"
    try:
        graph = dgl.graph((torch.tensor([0]), torch.tensor([1])), num_nodes=2).to(dev)
        graph.ndata["h"] = torch.ones(2, 1, device=dev)
        graph.update_all(dgl.function.copy_u("h", "m"), dgl.function.sum("m", "h"))
        if float(graph.ndata["h"][1].cpu()) != 1.0:
            return f"DGL {version} gave a wrong result on {dev} in a two-node test"
    except Exception as err:  # noqa: BLE001 - any failure means: not usable there, and the message says why
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"DGL {version} cannot run a graph on {dev} ({type(err).__name__}: {first})"
    return None
