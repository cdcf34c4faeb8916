"""benchmarks/scale.py: the generated Electronics-shaped catalogue has the requested counts and degrees,
and the script's main prints one table row per phase (at a tiny scale, two extrapolated steps)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_counts_are_electronics_times_the_scale(scale):
    assert dataclasses.asdict(scale.spec_for(1.0)) == {
        "n_users": 192_403,
        "n_items": 63_001,
        "n_interactions": 1_689_188,
        "min_degree": 5,
        "user_zipf": 0.5,
        "item_zipf": 0.6,
        "seed": 0,
    }
    spec = scale.spec_for(0.005)
    assert (spec.n_users, spec.n_items, spec.n_interactions) == (962, 315, 8446)
    with pytest.raises(ValueError, match="at least 5"):
        scale.spec_for(1e-5)


def test_power_law_degrees_sum_exactly_within_bounds(scale):
    rng = np.random.default_rng(0)
    degrees = scale.power_law_degrees(1000, 9000, 5, 0.8, 40, rng)
    assert degrees.sum() == 9000 and degrees.min() >= 5 and degrees.max() <= 40
    assert (degrees == 40).any()  # the cap binds at this exponent: the excess was redrawn, not lost


def test_generated_interactions_follow_the_requested_degrees(scale):
    spec = scale.spec_for(0.005)
    frame = scale.generate_interactions(spec)
    assert len(frame) == spec.n_interactions == 8446
    assert not frame.duplicated(["user_idx", "item_idx"]).any()
    users = np.bincount(frame["user_idx"], minlength=spec.n_users)
    items = np.bincount(frame["item_idx"], minlength=spec.n_items)
    assert len(users) == 962 and len(items) == 315
    assert users.sum() == items.sum() == 8446
    assert users.min() >= 5 and items.min() >= 5  # a 5-core set
    # power laws: a heavy head over a median near the floor (users) / the mean (items)
    assert users.max() >= 5 * np.median(users) and items.max() >= 5 * np.median(items)
    # the same seed gives the same catalogue
    again = scale.generate_interactions(spec)
    assert again.equals(frame)
    # per-user random 8:1:1: every user (>= 5 interactions) holds out max(1, floor(n / 10)) valid and test items
    per_user = frame.groupby("user_idx")["split"].value_counts().unstack(fill_value=0)
    expected = np.maximum(1, users // 10)
    np.testing.assert_array_equal(per_user[1].to_numpy(), expected)
    np.testing.assert_array_equal(per_user[2].to_numpy(), expected)


def test_features_have_the_mmrec_shapes(scale):
    feats = scale.generate_features(20, scale.MODALITIES)
    assert {k: v.shape for k, v in feats.items()} == {"image": (20, 4096), "text": (20, 384)}
    assert all(v.dtype == np.float32 for v in feats.values())


def test_main_prints_one_row_per_phase(scale, capsys):
    assert scale.main(["--scale", "0.005", "--steps", "2", "--threads", "1", "--set", "train.batch_size=2048"]) == 0
    out = capsys.readouterr().out
    generated = re.search(r"generated: ([\d,]+) users, ([\d,]+) items, ([\d,]+) interactions", out)
    assert generated and [int(g.replace(",", "")) for g in generated.groups()] == [962, 315, 8446]
    assert "user degrees: min 5," in out
    assert re.search(r"item degrees: min ([5-9]|\d\d+),", out)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, *rows = [[cell.strip() for cell in row] for row in rows]
    assert header[:3] == ["phase", "seconds", "peak RSS MiB (phase)"]
    assert [r[0] for r in rows] == [
        "generate",
        "model build (incl. kNN graphs)",
        "one training epoch",
        "full-ranking evaluation (valid)",
    ]
    for row in rows:
        assert float(row[1].replace(",", "")) >= 0 and float(row[2].replace(",", "")) > 0
    assert "kNN search" in rows[1][4] and "(2 graphs)" in rows[1][4]
    assert rows[2][4].startswith("EXTRAPOLATED from 2 of 4 steps")
    assert "962 users x 315 items" in rows[3][4]
