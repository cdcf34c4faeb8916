"""``ray job submit`` against a head started by ``cluster/start_ray_head.sh`` on 127.0.0.1, on real data
(the H&M photos), checked against a direct, non-Ray computation; and the cluster files themselves.

The head is stopped by pid with the same script (never ``ray stop``, which would stop every Ray
instance on the machine). Tolerances as in test_pipeline.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from dprec.data.dataset import load_dataset
from dprec.features import read_features

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listening_beyond_loopback(pids: set[int]) -> list[str]:
    return [
        f"pid {c.pid} on {c.laddr.ip}:{c.laddr.port}"
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids and not is_loopback(c.laddr.ip)
    ]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head on 127.0.0.1 from cluster/start_ray_head.sh, stopped by the same script (by pid) afterwards."""
    env = dict(
        os.environ,
        RAY_HEAD_PORT=str(free_port()),
        RAY_DASHBOARD_PORT=str(free_port()),
        RAY_NUM_CPUS="2",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
    )
    start = subprocess.run(
        ["bash", str(REPO / "cluster" / "start_ray_head.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    lines = dict(line.split("=", 1) for line in start.stdout.splitlines() if line.startswith("RAY_"))
    temp_dir = lines.get("RAY_TEMP_DIR")
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        client_env = dict(env, RAY_AUTH_MODE=lines["RAY_AUTH_MODE"], RAY_AUTH_TOKEN_PATH=lines["RAY_AUTH_TOKEN_PATH"])
        yield {"address": lines["RAY_ADDRESS"], "temp_dir": temp_dir, "env": client_env}
    finally:
        if temp_dir:
            stop = subprocess.run(
                ["bash", str(REPO / "cluster" / "start_ray_head.sh"), "stop", temp_dir],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert stop.returncode == 0, stop.stdout + stop.stderr
            assert not [p for p in head_pids(temp_dir) if alive(p)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def head_pids(temp_dir: str) -> set[int]:
    roots = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    return {p.pid for p in roots} | {c.pid for p in roots for c in p.children(recursive=True)}


def test_ray_job_submit_on_real_photos_equals_direct_computation(ray_head, hm, tmp_path, direct):
    out = tmp_path / "job_out"
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        ray_head["address"],
        "--working-dir",
        str(REPO),
        "--runtime-env",
        str(REPO / "cluster" / "ray_job_runtime_env.yaml"),
        "--",
        "python",
        "-m",
        "dprec.extract",
        "--dataset",
        str(hm),
        "--out",
        str(out),
        "--text-model",
        "minilm",
        "--text-batch-size",
        "8",
        "--image-batch-size",
        "8",
        "--items-per-shard",
        "25",
        "--torch-threads",
        "1",
        "--cpus-per-actor",
        "1",
    ]
    job = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "[extract] wrote items-000003.tar" in job.stdout and "[image] shard" in job.stdout
    summary = json.loads(
        next(line for line in job.stdout.splitlines() if line.startswith('{"event": "extract_summary"'))
    )
    assert (summary["items"], summary["shards_written"], summary["failures"]) == (100, 4, {})
    dataset = load_dataset(hm)
    feats = read_features(out, dataset=dataset)
    rows = list(range(0, 100, 9))
    np.testing.assert_allclose(feats["text"][rows], direct.text(dataset, rows), atol=1e-5)
    np.testing.assert_allclose(feats["image"][rows], direct.image(dataset, rows), rtol=1e-4, atol=1e-5)
    assert not listening_beyond_loopback(head_pids(ray_head["temp_dir"]))


def test_runtime_env_excludes_outputs_and_environments():
    spec = yaml.safe_load((REPO / "cluster" / "ray_job_runtime_env.yaml").read_text())
    assert {"data_shards/", ".venv/", "mlflow.db", "mlruns/", "runs/"} <= set(spec["excludes"])


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert "dprec" in config["cluster_name"]
