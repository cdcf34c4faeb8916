"""The one place in DPRec that imports DGL.

DGL's releases stop at torch 2.4, but DGL 2.1.0's core (graphs, heterographs, ``update_all`` with
``dgl.function`` builtins, forward and backward) works on newer torch. Two parts of it do not:

- ``dgl.graphbolt`` (the new data loader) imports ``torchdata.datapipes``, which torchdata >= 0.10
  no longer ships, and loads a C++ library built only for torch 2.0-2.2; ``import dgl`` imports it
  eagerly. DPRec never uses graphbolt, so an empty module is registered under its name before the
  first ``import dgl``.
- ``dgl.sparse`` needs a C++ library built for the exact torch version (the wheel has 2.0.0 only)
  and does not load; DPRec does not use it.

Everything else in the project reaches DGL through ``import_dgl()``.
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
