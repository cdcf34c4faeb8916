"""A driver killed mid-run leaves only complete shards; the rerun writes the rest and ends byte-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dprec.features import read_features
from dprec.features.pipeline import run_extract
from dprec.features.shards import MANIFEST, load_manifest

pytestmark = pytest.mark.slow


def listed(out) -> int:
    try:
        return len(json.loads((out / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_driver_killed_after_some_shards_rerun_completes_identically(
    long_generated, long_reference, tmp_path, make_config, read_shard_bytes
):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "dprec.extract",
        "--executor",
        "local",
        "--dataset",
        str(long_generated),
        "--out",
        str(out),
        "--text-model",
        "minilm",
        "--text-batch-size",
        "4",
        "--image-batch-size",
        "4",
        "--items-per-shard",
        "4",
        "--torch-threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while listed(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    interrupted = load_manifest(out)
    done = {e["shard"] for e in interrupted["shards"]}
    assert not interrupted["complete"] and 2 <= len(done) < 8
    with pytest.raises(ValueError, match="incomplete"):
        read_features(out)
    reference = read_shard_bytes(long_reference)
    for name, data in read_shard_bytes(out).items():  # every shard on disk is whole (written, then renamed)
        assert data == reference[name]

    written = []
    summary = run_extract(make_config(long_generated, out), on_shard=lambda entry: written.append(entry["shard"]))
    assert summary.shards_skipped == len(done) and not set(written) & done
    assert sorted(written + sorted(done)) == list(range(8))
    assert read_shard_bytes(out) == reference
    assert (out / MANIFEST).read_bytes() == (long_reference / MANIFEST).read_bytes()
    assert not list(out.glob(".tmp-*"))
