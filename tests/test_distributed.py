"""DeepSpeed training through the real launcher: 1 vs 2 processes, two nodes on one machine,
a rank killed mid-run, and resume.

Tolerance for "same metrics": 1e-6 absolute. The loss of each rank is scaled by its share of
the global batch, so 1 and 2 processes take the same Adam steps up to float summation order
(observed differences are below 1e-12).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dprec.config import ConfigError
from dprec.data.dataset import save_dataset
from dprec.data.synthetic import SyntheticSpec, generate
from dprec.training.config import RunConfig, TrainConfig
from dprec.training.distributed import DeepSpeedTrainer, complete_deepspeed_config
from dprec.training.loop import FitState

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(out: Path) -> dict[str, str]:
    """Each run tracks into an MLflow store beside its output folder, never into the repository."""
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": tracking_uri(out),
    }


def tracking_uri(out: Path) -> str:
    return f"sqlite:///{out.parent / 'mlflow.db'}"


def launch(
    config: Path,
    out: Path,
    procs: int = 1,
    extra: list[str] | None = None,
    node: tuple[int, Path] | None = None,
    port: int | None = None,
    **popen,
) -> subprocess.Popen:
    cmd = [str(DEEPSPEED), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
    if node is None:
        cmd += ["--num_accelerators", str(procs)]
    else:
        rank, hostfile = node
        cmd += [
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(rank),
            "--num_nodes",
            "2",
            "--num_gpus",
            "1",
        ]
    cmd += [
        str(ROOT / "launchers" / "train.py"),
        "--config",
        str(config),
        "--deepspeed_config",
        str(ROOT / "launchers" / "zero1.json"),
        "--set",
        f"out={out}",
        *(extra or []),
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finish(proc: subprocess.Popen, timeout: int = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def summary(output: str) -> dict:
    return json.loads([ln for ln in output.splitlines() if ln.startswith('{"run"')][-1])


def test_metrics(output: str) -> dict[str, float]:
    return summary(output)["test"]


test_metrics.__test__ = False  # a helper, not a test


def assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) < TOL, (k, a[k], b[k])


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    data = save_dataset(generate(SyntheticSpec(n_users=200, n_items=150)), root / "data")
    cfg = {
        "dataset": str(data),
        "out": str(root / "unused"),
        "model": {"name": "lightgcn", "n_layers": 2},
        "train": {"epochs": 6, "batch_size": 256, "lr": 0.01, "graph_backend": "torch", "patience": 50},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_process_run(run_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    return out, test_metrics(finish(launch(run_config, out, procs=2, extra=["--save-every", "2"])))


def test_deepspeed_config_is_completed_from_the_run_config():
    cfg = RunConfig(dataset="x", train=TrainConfig(batch_size=2048, lr=0.005))
    full = complete_deepspeed_config({"zero_optimization": {"stage": 2}}, cfg, world=2)
    assert full["train_batch_size"] == 2048 and full["train_micro_batch_size_per_gpu"] == 1024
    assert full["optimizer"]["params"] == {"torch_adam": True, "lr": 0.005}
    with pytest.raises(ConfigError, match="train_batch_size=512 contradicts"):
        complete_deepspeed_config({"train_batch_size": 512}, cfg, world=2)
    with pytest.raises(ConfigError, match="divisible"):
        complete_deepspeed_config({}, cfg, world=3)
    with pytest.raises(ConfigError, match="torch_adam"):
        complete_deepspeed_config({"optimizer": {"type": "Adam", "params": {}}}, cfg, world=1)


@pytest.mark.slow
def test_two_processes_equal_one_process(run_config, two_process_run, tmp_path):
    out2, metrics2 = two_process_run
    metrics1 = test_metrics(finish(launch(run_config, tmp_path / "one", procs=1)))
    assert_same(metrics1, metrics2)
    assert metrics2["recall@20"] > 0.2
    saved = json.loads((out2 / "metrics.json").read_text())
    valid = [row["valid_recall@20"] for row in saved["history"]]
    assert len(valid) == 6 and saved["best_epoch"] == valid.index(max(valid))
    tags = sorted(p.name for p in (out2 / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["best", "epoch-0001", "epoch-0003", "epoch-0005"]
    # every rank wrote its optimizer partition (ZeRO-1)
    assert len(list((out2 / "checkpoints" / "epoch-0005").glob("zero_pp_rank_*_optim_states.pt"))) == 2


@pytest.mark.slow
def test_two_nodes_on_one_machine_equal_two_processes(run_config, two_process_run, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = [launch(run_config, tmp_path / "nodes", node=(rank, hostfile), port=port) for rank in (0, 1)]
    outputs = [finish(p) for p in procs]
    assert_same(test_metrics(outputs[0]), two_process_run[1])
    assert not any(ln.startswith('{"run"') for ln in outputs[1].splitlines())  # only global rank 0 reports


def worker_pid(launcher: subprocess.Popen, local_rank: int) -> int | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in " ".join(child.cmdline()) and "train.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_killed_rank_fails_the_launcher_and_resume_matches(run_config, two_process_run, tmp_path):
    out = tmp_path / "killed"
    launcher = launch(run_config, out, procs=2, extra=["--save-every", "1"], start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "epoch-0002").is_dir():
            assert launcher.poll() is None and time.time() < deadline, "run ended before a checkpoint was written"
            time.sleep(0.2)
        pid = worker_pid(launcher, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=120)  # must not hang
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert "exits with return code = -9" in output
    assert not (out / "metrics.json").exists()

    resumed = finish(launch(run_config, out, procs=2, extra=["--save-every", "1", "--resume"]))
    assert "resumed from" in resumed
    assert_same(test_metrics(resumed), two_process_run[1])
    # the resumed run continued the same MLflow run, which is now finished and registered
    runs = MlflowClient(tracking_uri(out)).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri(out)).search_experiments()]
    )
    assert [r.info.run_id for r in runs] == [summary(resumed)["tracking_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["test_recall_at_20"] == pytest.approx(test_metrics(resumed)["recall@20"])
    assert summary(resumed)["registration"]["alias"] == "champion"


def test_latest_names_an_epoch_checkpoint_only_after_every_rank_wrote_it(tmp_path):
    """DeepSpeed's rank 0 writes 'latest' before the barrier that waits for the other ranks' optimizer shards (a rank
    killed there left 'latest' naming a cut-short checkpoint): epoch checkpoints are saved without it, and rank 0
    names the tag once the save (which ends with that barrier) has returned."""
    seen = []

    class Engine:
        def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
            latest = Path(save_dir) / "latest"
            seen.append((tag, save_latest, latest.read_text() if latest.exists() else None))
            (Path(save_dir) / tag).mkdir(parents=True)

    for rank in (0, 1):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        trainer = object.__new__(DeepSpeedTrainer)  # the checkpoint step alone: no engine, no process group
        trainer.engine, trainer.checkpoint_dir, trainer.save_every, trainer.rank = Engine(), folder, 1, rank
        trainer.cfg, trainer.best_state = SimpleNamespace(train=SimpleNamespace(epochs=5)), None
        seen.clear()
        trainer.on_epoch_end(FitState(next_epoch=1), improved=False)
        trainer.on_epoch_end(FitState(next_epoch=2), improved=True)
        assert [(tag, save_latest) for tag, save_latest, _ in seen] == [
            ("epoch-0000", False),
            ("best", False),
            ("epoch-0001", False),
        ]
        if rank == 0:
            assert [before for *_, before in seen] == [None, "epoch-0000", "epoch-0000"]  # named after each save
            assert (folder / "latest").read_text() == "epoch-0001"
        else:
            assert not (folder / "latest").exists()  # rank 0 alone names it
