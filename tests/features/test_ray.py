"""The Ray Data pipeline on a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

Every run uses the configuration of ``make_config`` (1 torch thread per actor), so its shards
must be byte-identical to the local executor's reference shards: two actors per stage spread
over two nodes, and one actor per stage with the text actor killed mid-run, both. Every server
listens on 127.0.0.1. (``ray job submit`` against a head started by a script: test_ray_cluster.py.)
"""

from __future__ import annotations

import ipaddress
import signal
import tarfile

import psutil
import pytest

from dprec.features import read_features
from dprec.features.pipeline import ExtractError, run_extract

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow
GENERATED_FAILURES = {
    "image_decode_error": 1,
    "image_file_missing": 1,
    "image_none": 1,
    "image_url_not_fetched": 1,
    "text_empty": 1,
    "text_truncated": 1,
}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"}
    )
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=c.address)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def cluster_pids(cluster) -> list[int]:
    """This test's own Ray processes: every node's servers and their descendants (workers, actors)."""
    roots = [
        p.process.pid
        for node in [cluster.head_node, *cluster.worker_nodes]
        for procs in node.all_processes.values()
        for p in procs
    ]
    kids = [c.pid for r in roots if psutil.pid_exists(r) for c in psutil.Process(r).children(recursive=True)]
    return roots + kids


def stage_actors(cluster, stage: str) -> list[psutil.Process]:
    found = []
    for pid in cluster_pids(cluster):
        try:
            if f"MapWorker(MapBatches({stage}))" in " ".join(psutil.Process(pid).cmdline()):
                found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def listening_beyond_loopback(pids: list[int]) -> list[str]:
    return [
        f"pid {c.pid} on {c.laddr.ip}:{c.laddr.port}"
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids and not is_loopback(c.laddr.ip)
    ]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_two_nodes_two_actors_each_write_the_local_executor_bytes(
    cluster, generated, generated_reference, tmp_path, make_config, read_shard_bytes
):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    summary = run_extract(
        make_config(generated, tmp_path, executor="ray", text_actors=2, image_actors=2, cpus_per_actor=0.5)
    )
    assert summary.nodes == 2, "actors did not run on both nodes"
    assert summary.shards_written == 4 and summary.failures == GENERATED_FAILURES
    assert read_shard_bytes(tmp_path) == read_shard_bytes(generated_reference)
    assert ray.is_initialized(), "the pipeline must use the Ray it found connected, and leave it"
    assert not listening_beyond_loopback(cluster_pids(cluster))


def test_actor_killed_mid_run_every_item_once(
    cluster, long_generated, long_reference, tmp_path, make_config, read_shard_bytes
):
    killed: list[int] = []

    def kill_text_actor(entry):
        if not killed:
            victims = stage_actors(cluster, "TextStage")
            assert victims, "no TextStage actor process found to kill"
            victims[0].send_signal(signal.SIGKILL)
            killed.append(victims[0].pid)

    summary = run_extract(
        make_config(long_generated, tmp_path, executor="ray", cpus_per_actor=1.0), on_shard=kill_text_actor
    )
    assert killed and not alive(killed[0])
    assert summary.items_computed == 32 and summary.shards_written == 8
    keys = []
    for path in sorted(tmp_path.glob("items-*.tar")):
        with tarfile.open(path) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".meta.json")]
    assert keys == [f"{i:09d}" for i in range(32)], "an item is missing or appears twice"
    read_features(tmp_path, dataset=long_generated)
    assert read_shard_bytes(tmp_path) == read_shard_bytes(long_reference)


def test_gpu_request_on_a_cpu_cluster_fails_at_once(cluster, generated, tmp_path, make_config):
    assert ray.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(ExtractError, match="GPUs, the Ray cluster has 0"):
        run_extract(make_config(generated, tmp_path, executor="ray", gpus_per_actor=1))
    with pytest.raises(ExtractError, match="CPUs, the Ray cluster has 2"):
        run_extract(make_config(generated, tmp_path, executor="ray", text_actors=3, cpus_per_actor=1.0))
