"""Where the tests find the real datasets (../shared/data beside the checkout, or $DPREC_SHARED_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared(name: str) -> Path:
    """The real dataset folder ``name``; the test is skipped, saying why, where it is absent."""
    root = Path(os.environ.get("DPREC_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (root / name).is_dir():
        pytest.skip(
            f"real dataset {name!r} not found under {root} (a fresh clone has no ../shared; "
            "set DPREC_SHARED_DATA to the shared data folder)"
        )
    return root / name
