"""Every run config in configs/ reads and validates (keys, types, model section), so the docs cite live files."""

from __future__ import annotations

from pathlib import Path

import pytest

from dprec.training.config import load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))


def test_configs_exist_for_the_demo_and_every_model():
    names = {p.relative_to(ROOT).as_posix() for p in CONFIGS}
    assert "demo.yaml" in names
    for dataset in ("default", "ml-100k", "sports"):
        for model in ("popularity", "lightgcn", "freedom", "mgcn", "lgmrec", "dprec"):
            assert f"{dataset}/{model}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.dataset
    assert cfg.model["name"] == ("dprec" if path.stem == "demo" else path.stem)
    assert cfg.train.epochs > 0
