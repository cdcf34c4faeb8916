"""Hostile and careless input to training, evaluation and the DeepSpeed launcher, one class at a time.

1. Code from a file: a pickle planted among the checkpoints (or as a run's model.pt) is refused,
   and the code in it never runs (the marker file it would write does not appear).
2. A failed run does not publish: nothing is registered unless the run folder was written, and a
   run stopped by SIGTERM / SIGINT or an exception ends as KILLED / FAILED, never RUNNING.
3. Config values: every bad type or range is exit code 2 with the key named.
4. The user's own mistakes (paths, files, folders) are one ``<stage>: error:`` line and exit code 2,
   printed once per launch also under DeepSpeed with 2 processes.
5. A dataset that cannot be trained or evaluated (no validation or test rows, fewer items than K,
   a user who trained on every item) is refused before the first epoch.

Tests marked ``slow`` start the real ``deepspeed`` launcher (tens of seconds each on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from dprec import evaluate as evaluate_cli
from dprec import train as train_cli
from dprec.config import ConfigError, DPRecError
from dprec.data.dataset import make_dataset, save_dataset
from dprec.training.config import RunConfig
from dprec.training.distributed import (
    CheckpointError,
    DeepSpeedTrainer,
    agree,
    check_deepspeed_config,
    client_fit_state,
    complete_deepspeed_config,
    load_weights_only,
    weights_only_loads,
)
from dprec.training.signals import Interrupted, deferred_signals, stop_on_signals

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TRAIN = {"epochs": 2, "batch_size": 256, "lr": 0.01, "patience": 50, "seed": 1, "graph_backend": "torch"}


# ---------------------------------------------------------------------------------------------- helpers


def clustered(n_users=60, n_items=60, per_user=10, seed=0, splits=(1, 1, 2, 2), name="clustered"):
    """Users in 4 groups buying mostly from their own quarter of the items; ``splits`` labels the last rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        own = np.arange((u % 4) * n_items // 4, (u % 4 + 1) * n_items // 4)
        picks = rng.choice(own, size=min(per_user, len(own)), replace=False).tolist()
        labels = [0] * (len(picks) - len(splits)) + list(splits)
        rows += [(u, i, s) for i, s in zip(picks, labels, strict=True)]
    inter = pd.DataFrame(rows, columns=["user_idx", "item_idx", "split"])
    items = pd.DataFrame({"item_idx": np.arange(n_items), "item_id": [f"i{i}" for i in range(n_items)]})
    users = pd.DataFrame({"user_idx": np.arange(n_users), "user_id": [f"u{u}" for u in range(n_users)]})
    return make_dataset(name, inter, items, users, {"source": "test"})


def write_config(path: Path, dataset: Path, out: Path, train: dict | None = None, model: dict | None = None) -> Path:
    cfg = {
        "dataset": str(dataset),
        "out": str(out),
        "model": model or {"name": "lightgcn", "n_layers": 1},
        "train": {**TRAIN, **(train or {})},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_main(argv: list[str]) -> int:
    try:
        return train_cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def evaluate_main(argv: list[str]) -> int:
    try:
        return evaluate_cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def one_error_line(err: str, prog: str) -> str:
    """The stage's error output is exactly one ``<prog>: error: ...`` line, without a traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if f"{prog}: error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


class Payload:
    """A pickle whose loading creates ``marker``: what a planted checkpoint would do with real code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a torch file whose unpickling runs code (opens ``marker`` for writing)."""
    path.unlink(missing_ok=True)
    torch.save({"module": Payload(marker)}, path)


def registered_versions(uri: str) -> list:
    client = MlflowClient(uri)
    return [v for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")]


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return save_dataset(clustered(), tmp_path_factory.mktemp("data") / "clustered")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An initialised MLflow sqlite store, copied per test (creating one takes seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch, template) -> str:
    """Every test tracks into its own store in its own folder, never into the repository's mlflow.db."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def subprocess_env(uri: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": uri,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, uri: str, procs: int = 2, extra: list[str] | None = None, timeout: int = 400):
    """``deepspeed launchers/train.py`` with ``procs`` local processes; (returncode, stdout + stderr)."""
    cmd = [
        str(DEEPSPEED),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--num_accelerators",
        str(procs),
        str(ROOT / "launchers" / "train.py"),
        "--config",
        str(config),
        "--deepspeed_config",
        str(ROOT / "launchers" / "zero1.json"),
        *(extra or []),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=subprocess_env(uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout


# ---------------------------------------------------------------------------------------------- 1. code from a file


def test_weights_only_loading_refuses_a_planted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_weights_only(tmp_path / "mp_rank_00_model_states.pt")
    assert not marker.exists()
    # a truncated file and a file that is not torch's are refused the same way, with the path named
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3), "n": 1, "name": "x"}, good)
    assert load_weights_only(good)["n"] == 1
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(CheckpointError, match=name):
            load_weights_only(tmp_path / name)


def test_deepspeeds_own_unsafe_loads_are_forced_weights_only(tmp_path):
    """What DeepSpeed calls inside load_checkpoint (``torch.load(..., weights_only=False)``) cannot run code either."""
    import pickle

    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pt", marker)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "x.pt", weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # put back afterwards


def test_latest_must_name_an_epoch_checkpoint_inside_the_folder(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "epoch-0001").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    fake = type("T", (), {"checkpoint_dir": ckpt})()
    for tag, match in (("../elsewhere", "not an epoch checkpoint"), ("epoch-0009", "is not a folder")):
        (ckpt / "latest").write_text(tag)
        with pytest.raises(CheckpointError, match=match):
            DeepSpeedTrainer.latest_tag(fake)
    (ckpt / "latest").write_text("epoch-0001\n")
    assert DeepSpeedTrainer.latest_tag(fake) == "epoch-0001"


def test_client_state_is_checked_field_by_field(tmp_path):
    good = {
        "fit_state": {
            "next_epoch": 2,
            "best_epoch": 1,
            "best_recall": 0.5,
            "best_valid": {"recall@20": 0.5},
            "waited": 0,
            "history": [],
            "stopped": False,
            "tracking_run_id": None,
        },
        "best_state": {"w": torch.zeros(2)},
    }
    state, best = client_fit_state(good, tmp_path)
    assert state.next_epoch == 2 and set(best) == {"w"}
    for bad in (
        {},
        {"fit_state": {**good["fit_state"], "extra": 1}},
        {"fit_state": {**good["fit_state"], "next_epoch": "2"}},
        {**good, "best_state": {"w": [0.0, 0.0]}},
    ):
        with pytest.raises(CheckpointError):
            client_fit_state(bad, tmp_path)


def test_evaluate_refuses_a_planted_model_file(data_dir, store, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", data_dir, out, {"epochs": 1})
    assert train_main(["--config", str(config), "--no-register"]) == 0
    marker = tmp_path / "pwned"
    plant(out / "model.pt", marker)
    capsys.readouterr()
    assert evaluate_main(["--run", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert "model.pt" in line and "refused" in line
    assert not marker.exists()


@pytest.fixture(scope="module")
def two_process_checkpoints(data_dir, tmp_path_factory, template):
    """A finished 2-process run with a checkpoint per epoch (its MLflow store beside it)."""
    root = tmp_path_factory.mktemp("ds-run")
    shutil.copy(template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = write_config(root / "run.yaml", data_dir, root / "run", {"epochs": 2})
    rc, output = launch(config, uri, extra=["--save-every", "1", "--no-register"])
    assert rc == 0, output[-4000:]
    assert (root / "run" / "checkpoints" / "epoch-0001").is_dir()
    return root, config, uri


def resume_copy(two_process_checkpoints, tmp_path) -> tuple[Path, Path, str]:
    root, _, _ = two_process_checkpoints
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    shutil.copy(root / "mlflow.db", tmp_path / "mlflow.db")
    config = write_config(tmp_path / "run.yaml", yaml.safe_load((root / "run.yaml").read_text())["dataset"], run)
    return run, config, f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "planted",
    ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    ids=["model-states-read-by-every-rank", "optimizer-part-of-rank-1"],
)
def test_resume_refuses_a_planted_checkpoint_and_runs_no_code(two_process_checkpoints, tmp_path, planted):
    run, config, uri = resume_copy(two_process_checkpoints, tmp_path)
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / "epoch-0001" / planted, marker)
    rc, output = launch(config, uri, extra=["--save-every", "1", "--resume", "--no-register"])
    assert rc != 0, output[-4000:]
    assert not marker.exists()
    line = one_error_line(output, "launchers/train.py")  # once per launch, not once per rank
    assert planted in line and "refused to load" in line


# ---------------------------------------------------------------------------------------------- 2. failed runs do not publish


def test_an_unwritable_run_folder_fails_before_training_and_registers_nothing(data_dir, store, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the run folder should go")
    for out in (blocker, blocker / "run"):
        config = write_config(tmp_path / "run.yaml", data_dir, out)
        assert train_main(["--config", str(config)]) == 2
        captured = capsys.readouterr()
        assert "out" in one_error_line(captured.err, "train") and str(blocker) in captured.err
        assert "epoch" not in captured.out  # refused before the first epoch
    assert registered_versions(store) == []
    assert all_runs(store) == []


def test_a_run_folder_that_fails_at_the_end_registers_nothing(data_dir, store, tmp_path, capsys, monkeypatch):
    def disk_full(trainer, result, out):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(train_cli, "save_run", disk_full)
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run")
    assert train_main(["--config", str(config)]) == 2
    assert "No space left" in one_error_line(capsys.readouterr().err, "train")
    assert registered_versions(store) == []
    assert [r.info.status for r in all_runs(store)] == ["FAILED"]


def test_an_exception_in_training_ends_the_run_failed(data_dir, store, tmp_path, monkeypatch):
    from dprec.training.loop import Trainer

    def broken(self, epoch):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(Trainer, "train_epoch", broken)
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run")
    with pytest.raises(RuntimeError, match="a bug"):
        train_cli.main(["--config", str(config)])
    assert [r.info.status for r in all_runs(store)] == ["FAILED"]
    assert registered_versions(store) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_train_process_ends_its_mlflow_run_killed(data_dir, tmp_path, template, signum):
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = {"epochs": 100_000, "patience": 100_000}  # the run never ends by itself: only the signal stops it
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", train)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dprec.train", "--config", str(config)],
        cwd=tmp_path,
        env=subprocess_env(uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        for line in proc.stdout:  # wait until training has started (an epoch line)
            if line.startswith("epoch") or time.time() > deadline:
                break
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert [r.info.status for r in all_runs(uri)] == ["KILLED"]
    assert registered_versions(uri) == []
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_signals_raise_once_and_wait_for_deferred_blocks():
    with stop_on_signals():
        with pytest.raises(Interrupted) as caught:
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                reached = True  # the deferred block runs to its end
        assert reached and caught.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.slow
def test_launcher_registers_only_after_the_run_folder_is_written(data_dir, tmp_path, template):
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    (out / "metrics.json").mkdir(parents=True)  # the run folder is writable, but metrics.json cannot be written
    config = write_config(tmp_path / "run.yaml", data_dir, out, {"epochs": 1})
    rc, output = launch(config, uri, procs=1)
    assert rc == 2, output[-4000:]
    assert "metrics.json" in one_error_line(output, "launchers/train.py")
    assert registered_versions(uri) == []
    assert [r.info.status for r in all_runs(uri)] == ["FAILED"]


# ---------------------------------------------------------------------------------------------- 3. config values

BAD_VALUES = [
    ("train", "ks", [-5, 20]),
    ("train", "ks", [0, 20]),
    ("train", "ks", [10, 20, 20]),
    ("train", "ks", [10, 2.5, 20]),
    ("train", "ks", []),
    ("train", "threads", -4),
    ("train", "threads", 100_000),
    ("train", "seed", -1),
    ("train", "seed", 2**32),
    ("train", "epochs", 0),
    ("train", "epochs", 2.5),
    ("train", "epochs", True),
    ("train", "ks", [True, 20]),
    ("train", "batch_size", -256),
    ("train", "lr", 0),
    ("train", "lr", -0.001),
    ("train", "lr", "fast"),
    ("train", "lr", float("nan")),
    ("train", "lr", float("inf")),
    ("train", "lr_decay", 0),
    ("train", "lr_decay", 1.5),
    ("train", "lr_decay_every", 0),
    ("train", "patience", 0),
    ("train", "patience", 0.5),
    ("train", "eval_every", -1),
    ("train", "eval_chunk_size", 0),
    ("train", "graph_backend", "numpy"),
    ("lightgcn", "embedding_dim", 0),
    ("lightgcn", "n_layers", -1),
    ("lightgcn", "n_layers", True),
    ("lightgcn", "reg_weight", -1e-4),
    ("dprec", "embedding_dim", -64),
    ("dprec", "projection_hidden", 0),
    ("dprec", "knn_k", 0),
    ("dprec", "knn_k", False),
    ("dprec", "knn_block_size", 0),
    ("dprec", "n_hyperedges", 0),
    ("dprec", "n_ui_layers", -1),
    ("dprec", "hyperedge_tau", 0),
    ("dprec", "keep_rate", 0),
    ("dprec", "keep_rate", 1.5),
    ("dprec", "alpha", -0.3),
    ("dprec", "beta", -1),
    ("dprec", "align_tau", -0.2),
    ("dprec", "lambda_align", -0.01),
    ("dprec", "lambda_reg", -1),
    ("mgcn", "knn_k", -3),
    ("mgcn", "cl_tau", 0),
    ("mgcn", "cl_weight", -1),
    ("mgcn", "n_ii_layers", 0),
    ("lgmrec", "tau", 0),
    ("lgmrec", "keep_rate", 2),
    ("lgmrec", "n_hyperedges", 0),
    ("lgmrec", "cl_weight", -1),
]


@pytest.mark.parametrize(("section", "key", "value"), BAD_VALUES, ids=[f"{s}.{k}={v!r}" for s, k, v in BAD_VALUES])
def test_a_bad_config_value_is_exit_2_naming_the_key(data_dir, tmp_path, capsys, section, key, value):
    if section == "train":
        config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", {key: value})
    else:
        config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", model={"name": section, key: value})
    assert train_main(["--config", str(config)]) == 2
    assert key in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(("key", "value"), [("out", ""), ("dataset", ""), ("model", {"name": "nope"})])
def test_a_bad_top_level_value_is_exit_2_naming_the_key(data_dir, tmp_path, capsys, key, value):
    cfg = yaml.safe_load(write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run").read_text())
    cfg[key] = value
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "run.yaml")]) == 2
    assert key in one_error_line(capsys.readouterr().err, "train")


def test_yaml_scientific_notation_is_a_number(data_dir, tmp_path):
    from dprec.training.config import load_config

    (tmp_path / "run.yaml").write_text(f"dataset: {data_dir}\ntrain:\n  lr: 1e-3\n  seed: 4294967295\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.train.lr == 0.001 and cfg.train.seed == 2**32 - 1


# ---------------------------------------------------------------------------------------------- 4. the user's own mistakes


def test_train_path_mistakes_are_one_line(data_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-dataset"
    config = write_config(tmp_path / "run.yaml", missing, tmp_path / "run")
    assert train_main(["--config", str(config)]) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err, "train")
    assert train_main(["--config", str(tmp_path / "no-such.yaml")]) == 2
    assert "no-such.yaml" in one_error_line(capsys.readouterr().err, "train")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_line(data_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        config = write_config(tmp_path / "run.yaml", data_dir, ro / "run")
        assert train_main(["--config", str(config)]) == 2
        assert "ro" in one_error_line(capsys.readouterr().err, "train")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize(
    "model", [{"name": "mgcn"}, {"name": "lgmrec"}, {"name": "dprec", "modalities": ["nope"]}], ids=lambda m: m["name"]
)
def test_a_model_that_needs_features_it_lacks_is_one_line(data_dir, tmp_path, capsys, model):
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", model=model)
    assert train_main(["--config", str(config)]) == 2
    assert "feature view" in one_error_line(capsys.readouterr().err, "train")


def test_a_model_too_large_for_memory_is_one_line(data_dir, tmp_path, template):
    """``embedding_dim: 1e9`` asks for hundreds of GB; under an address-space limit torch refuses at once."""
    import resource

    shutil.copy(template, tmp_path / "mlflow.db")
    config = write_config(
        tmp_path / "run.yaml", data_dir, tmp_path / "run", model={"name": "lightgcn", "embedding_dim": 10**9}
    )

    def limit() -> None:  # so that no machine's overcommit setting lets the allocation through
        resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))

    proc = subprocess.run(
        [sys.executable, "-m", "dprec.train", "--config", str(config), "--no-register"],
        cwd=tmp_path,
        env=subprocess_env(f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "memory" in one_error_line(proc.stderr, "train")


def test_a_deepspeed_json_deepspeed_refuses_is_a_config_error():
    cfg = RunConfig(dataset="x")
    for ds_json, named in (
        ({"zero_optimization": {"stage": 7}}, "stage"),
        ({"zero_optimization": {"stagee": 1}}, "stagee"),
    ):
        with pytest.raises(ConfigError, match=named):
            check_deepspeed_config(complete_deepspeed_config(ds_json, cfg, world=1))
    check_deepspeed_config(complete_deepspeed_config({"zero_optimization": {"stage": 1}}, cfg, world=1))


def test_launcher_refuses_a_non_positive_save_every(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launcher_train", ROOT / "launchers" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    with pytest.raises(SystemExit) as caught:
        launcher.parse_args(["--config", "x.yaml", "--deepspeed_config", "z.json", "--save-every", "0"])
    assert caught.value.code == 2 and "--save-every" in capsys.readouterr().err


def test_a_diverging_run_is_one_line(data_dir, store, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", {"lr": 1e30, "epochs": 3})
    assert train_main(["--config", str(config), "--no-register"]) == 2
    assert "train.lr" in one_error_line(capsys.readouterr().err, "train")
    assert [r.info.status for r in all_runs(store)] == ["FAILED"]


def test_evaluate_mistakes_are_one_line(data_dir, store, tmp_path, capsys):
    assert evaluate_main(["--run", str(tmp_path / "missing")]) == 2
    assert "missing" in one_error_line(capsys.readouterr().err, "evaluate")
    (tmp_path / "file").write_text("x")
    assert evaluate_main(["--run", str(tmp_path / "file")]) == 2
    one_error_line(capsys.readouterr().err, "evaluate")

    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", data_dir, out, {"epochs": 1})
    assert train_main(["--config", str(config), "--no-register"]) == 0
    capsys.readouterr()
    assert evaluate_main(["--run", str(out), "--chunk-size", "0"]) == 2
    assert "--chunk-size" in capsys.readouterr().err
    good_metrics = (out / "metrics.json").read_text()
    (out / "metrics.json").write_text("{not json")
    assert evaluate_main(["--run", str(out)]) == 2
    assert "metrics.json" in one_error_line(capsys.readouterr().err, "evaluate")
    (out / "metrics.json").write_text(json.dumps({**json.loads(good_metrics), "dataset_hash": "other"}))
    assert evaluate_main(["--run", str(out)]) == 2
    assert "changed" in one_error_line(capsys.readouterr().err, "evaluate")
    (out / "metrics.json").write_text(good_metrics)
    torch.save({"not.a.weight": torch.zeros(1)}, out / "model.pt")
    assert evaluate_main(["--run", str(out)]) == 2
    assert "model.pt" in one_error_line(capsys.readouterr().err, "evaluate")
    (out / "model.pt").unlink()
    assert evaluate_main(["--run", str(out)]) == 2
    assert "model.pt" in one_error_line(capsys.readouterr().err, "evaluate")


def test_agree_without_peers_raises_the_message_once():
    with pytest.raises(DPRecError, match="bad value") as caught:
        agree(lambda: (_ for _ in ()).throw(DPRecError("bad value")))
    assert not getattr(caught.value, "quiet", True)
    with pytest.raises(DPRecError, match="nope: No such file"):
        agree(lambda: (_ for _ in ()).throw(FileNotFoundError(2, "No such file or directory", "nope")))
    assert agree(lambda: 7) == 7


@pytest.mark.slow
def test_launcher_prints_a_config_mistake_once_for_two_processes(data_dir, tmp_path, template):
    shutil.copy(template, tmp_path / "mlflow.db")
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", {"ks": [-5, 20]})
    rc, output = launch(config, f"sqlite:///{tmp_path / 'mlflow.db'}", procs=2)
    assert rc == 2, output[-4000:]
    assert "train.ks" in one_error_line(output, "launchers/train.py")


@pytest.mark.slow
def test_launcher_prints_a_diverged_loss_once_for_two_processes(data_dir, tmp_path, template):
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", {"lr": 1e30, "epochs": 3})
    rc, output = launch(config, uri, procs=2, extra=["--no-register"])
    assert rc == 2, output[-4000:]
    assert "train.lr" in one_error_line(output, "launchers/train.py")
    assert [r.info.status for r in all_runs(uri)] == ["FAILED"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM-to-the-job"])
def test_a_stopped_launch_does_not_leave_its_mlflow_run_running(data_dir, tmp_path, template, signum):
    """The whole launch (runner, launcher, ranks) gets the signal, as from Ctrl-C or a scheduler."""
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", {"epochs": 100_000, "patience": 100_000})
    cmd = [str(DEEPSPEED), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--num_accelerators", "2"]
    cmd += [str(ROOT / "launchers" / "train.py"), "--config", str(config)]
    cmd += ["--deepspeed_config", str(ROOT / "launchers" / "zero1.json"), "--no-register"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=subprocess_env(uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        for line in proc.stdout:
            if line.startswith("epoch    2") or time.time() > deadline:
                break
        assert proc.poll() is None
        os.killpg(proc.pid, signum)
        output, _ = proc.communicate(timeout=120)  # EOF once every rank has exited
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    runs = all_runs(uri)
    assert [r.info.status for r in runs] in (["KILLED"], ["FAILED"]), output[-4000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_launcher_prints_an_unwritable_out_once_for_two_processes(data_dir, tmp_path, template):
    shutil.copy(template, tmp_path / "mlflow.db")
    (tmp_path / "taken").write_text("a file")
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "taken")
    rc, output = launch(config, f"sqlite:///{tmp_path / 'mlflow.db'}", procs=2)
    assert rc == 2, output[-4000:]
    assert "taken" in one_error_line(output, "launchers/train.py")


# ---------------------------------------------------------------------------------------------- 5. untrainable data


@pytest.mark.parametrize(
    ("spec", "train", "named"),
    [
        ({"splits": (2, 2)}, {}, "validation"),
        ({"splits": (1, 1)}, {}, "test"),
        ({"splits": (1, 2), "n_items": 40}, {"ks": [10, 20, 50]}, "items"),
        ({"splits": (1, 2), "n_items": 16, "per_user": 4}, {"ks": [10, 20]}, "items"),
    ],
    ids=["no-validation", "no-test", "fewer-items-than-K50", "fewer-items-than-K20"],
)
def test_an_untrainable_dataset_is_refused_before_training(tmp_path, store, capsys, spec, train, named):
    data = save_dataset(clustered(**spec), tmp_path / "data")
    config = write_config(tmp_path / "run.yaml", data, tmp_path / "run", train)
    assert train_main(["--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert named in one_error_line(captured.err, "train")
    assert "epoch" not in captured.out
    assert all_runs(store) == []  # refused before the MLflow run was opened
    assert not (tmp_path / "run").exists()  # and no empty run folder is left behind


def test_a_user_who_trained_on_every_item_is_a_dataset_error(tmp_path, store, capsys):
    ds = clustered(n_items=24, per_user=6)
    inter = ds.interactions
    extra = pd.DataFrame({"user_idx": 0, "item_idx": range(24), "split": 0})
    extra = extra[~extra["item_idx"].isin(inter.loc[inter["user_idx"] == 0, "item_idx"])]
    inter = pd.concat([inter[inter["user_idx"] != 0], inter[inter["user_idx"] == 0].assign(split=0), extra])
    data = save_dataset(make_dataset("full-user", inter, ds.items, ds.users, {"source": "test"}), tmp_path / "data")
    config = write_config(tmp_path / "run.yaml", data, tmp_path / "run", {"ks": [10, 20]})
    assert train_main(["--config", str(config)]) == 2
    assert "every item" in one_error_line(capsys.readouterr().err, "train")


@pytest.mark.slow
def test_launcher_refuses_an_untrainable_dataset_once_for_two_processes(tmp_path, template):
    shutil.copy(template, tmp_path / "mlflow.db")
    data = save_dataset(clustered(splits=(2, 2)), tmp_path / "data")
    config = write_config(tmp_path / "run.yaml", data, tmp_path / "run")
    rc, output = launch(config, f"sqlite:///{tmp_path / 'mlflow.db'}", procs=2)
    assert rc == 2, output[-4000:]
    assert "validation" in one_error_line(output, "launchers/train.py")
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_launcher_trains_a_model_without_parameters_and_refuses_to_resume_it(data_dir, tmp_path, template):
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "run", model={"name": "popularity"})
    rc, output = launch(config, uri, procs=1, extra=["--no-register"])
    assert rc == 0, output[-4000:]  # used to die at the end of epoch 0 (no DeepSpeed engine to checkpoint)
    assert (tmp_path / "run" / "metrics.json").is_file()
    rc, output = launch(config, uri, procs=1, extra=["--no-register", "--resume"])
    assert rc == 2, output[-4000:]
    assert "no trainable parameters" in one_error_line(output, "launchers/train.py")
