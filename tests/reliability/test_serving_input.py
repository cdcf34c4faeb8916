"""Hostile and careless input to the served model, ``recommend`` and ``register`` (by class).

1. Unbounded requests and echoes: request rows, k and the sum of k are limited by the model
   config; an over-long ID, a control character or an ID too long to print is a 400 naming the
   limit, and no error message repeats more than a short prefix of what the client sent.
2. Read-only commands (``recommend``, ``register settle``) against a local sqlite store that does
   not exist refuse with exit code 2 and create nothing; registering (a write) may create it.
3. The user's own mistakes in the registry CLI and in ``recommend`` are one error line and exit
   code 2; a bundle is read without unpickling and a tampered one is refused at registration.
"""

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file
from test_tracking import (
    free_port,
    grouped_dataset,
    release_store,
    run_config,
    stop_group,
    template_store,
    wait_for,
)

from dprec.recommend import main as recommend_main
from dprec.register import main as register_main
from dprec.tracking.registry import SERVING_LIMITS, BundleError, check_bundle, export_bundle, log_and_register
from dprec.training.loop import Trainer

NAME = "dprec-grouped"
MODEL = f"models:/{NAME}/1"
REPO = Path(__file__).resolve().parents[2]
SERVING = REPO / "dprec" / "tracking" / "serving.py"
HUGE = "A" * 1_000_000  # a megabyte-long ID
MAX_MESSAGE = 600  # no error message about one value needs more


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real (tiny) LightGCN bundle: 120 users, 80 items."""
    trainer = Trainer(run_config(epochs=1), ds=grouped_dataset())
    result = trainer.fit(log=lambda s: None)
    return export_bundle(trainer.trained_model(), result, tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory, bundle):
    """A sqlite store holding version 1 of dprec-grouped, registered from ``bundle``."""
    folder = tmp_path_factory.mktemp("store")
    shutil.copy(template_store(tmp_path_factory.getbasetemp()), folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        assert log_and_register(bundle, uri=uri).version == "1"
    finally:
        release_store()
    return uri


@pytest.fixture
def store(store_uri, monkeypatch):
    """The module's store as this test's ``MLFLOW_TRACKING_URI`` (working folder: the store's folder)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.chdir(Path(store_uri[len("sqlite:///") :]).parent)
    mlflow.set_tracking_uri(store_uri)
    yield store_uri
    release_store()


@pytest.fixture(scope="module")
def model(store_uri):
    mlflow.set_tracking_uri(store_uri)
    try:
        return mlflow.pyfunc.load_model(MODEL)
    finally:
        release_store()


@pytest.fixture(scope="module")
def users(bundle):
    return json.loads((bundle / "ids.json").read_text())["user_ids"]


def refused(model, frame) -> str:
    """The message of the 400 ``model`` answers ``frame`` with (fails if it answers anything else)."""
    with pytest.raises(MlflowException) as err:
        model.predict(frame)
    assert err.value.get_http_status_code() == 400 and err.value.error_code == "INVALID_PARAMETER_VALUE"
    message = err.value.message
    assert len(message) < MAX_MESSAGE, message[:MAX_MESSAGE]
    return message


def one_error_line(capsys, prog: str) -> str:
    """The stage's stderr: exactly one ``<prog>: error: ...`` line, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def versions(uri: str) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient(uri).search_model_versions(f"name='{NAME}'"))


# ---------------------------------------------------------------------------------------------- 1. limits, echoes


def test_limits_agree_with_serving_and_are_in_the_model_config(store):
    """registry.py writes serving.py's defaults (it may not import it); an override at load takes effect."""
    tree = ast.parse(SERVING.read_text())
    defaults = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DEFAULT_LIMITS"
    )
    assert (
        defaults
        == SERVING_LIMITS
        == {
            "max_users_per_request": 10_000,
            "max_k": 1_000,
            "max_results_per_request": 100_000,
            "max_id_length": 256,
        }
    )
    config = mlflow.models.get_model_info(MODEL).flavors["python_function"]["config"]
    assert {key: config[key] for key in SERVING_LIMITS} == SERVING_LIMITS
    for bad in (0, -3, "lots", 2.5, None):
        with pytest.raises(MlflowException, match="model config max_k must be a positive integer"):
            mlflow.pyfunc.load_model(MODEL, model_config={"max_k": bad})


def test_request_size_limits_are_400_naming_the_limit(store, model, users):
    too_many = pd.DataFrame({"user_id": [users[i % len(users)] for i in range(10_001)]})
    assert "max_users_per_request=10000" in refused(model, too_many)
    assert len(model.predict(too_many.iloc[:10_000].assign(k=1))) == 10_000  # at the limit: answered

    too_much = pd.DataFrame({"user_id": [users[i % len(users)] for i in range(10_000)], "k": 11})
    message = refused(model, too_much)
    assert "max_results_per_request=100000" in message and "110000" in message

    small = mlflow.pyfunc.load_model(MODEL, model_config={"max_k": 5, "max_users_per_request": 3})
    assert "max_k=5" in refused(small, pd.DataFrame({"user_id": users[:1], "k": [6]}))
    assert len(small.predict(pd.DataFrame({"user_id": users[:1], "k": [5]}))) == 5
    assert "max_users_per_request=3" in refused(small, pd.DataFrame({"user_id": users[:4]}))
    n_items = 80  # below max_k: the number of items bounds k, as before
    assert f"number of items ({n_items}), got {n_items + 1}" in refused(
        model, pd.DataFrame({"user_id": users[:1], "k": [n_items + 1]})
    )


def test_long_ids_are_refused_and_never_echoed(store, model, users):
    fallback = mlflow.pyfunc.load_model(MODEL, model_config={"unknown_user": "popularity"})
    for m in (model, fallback):
        message = refused(m, pd.DataFrame({"user_id": [users[0], HUGE]}))
        assert "row 1" in message and "max_id_length=256" in message and "(1000000 characters)" in message
    # at the limit an unknown ID is answered (popularity) or named, but only by a short prefix
    assert len(fallback.predict(pd.DataFrame({"user_id": ["B" * 256], "k": [2]}))) == 2
    message = refused(model, pd.DataFrame({"user_id": ["B" * 256, "ghost"]}))
    assert "unknown user_id 'B" in message and "(256 characters)" in message and "B" * 40 not in message
    assert "'ghost'" in message

    # other values a client sends are cut the same way
    assert "(1000000 characters)" in refused(model, pd.DataFrame({"user_id": users[:1], "k": [HUGE]}))
    # a request without user_id: MLflow's own schema check would repeat the whole request
    assert "needs a 'user_id' column" in refused(model, pd.DataFrame({HUGE: ["x"] * 1000}))
    message = refused(model, pd.DataFrame({"k": [1], HUGE: [2]}))
    assert "needs a 'user_id' column; got columns ['k', 'AAAA" in message and "(1000000 characters)]" in message
    wide = pd.DataFrame({f"c{i}": [1] for i in range(1000)})
    assert "and 990 more" in refused(model, wide)
    # an integer ID with more digits than Python prints (old code: ValueError, an HTTP 500)
    message = refused(model, pd.DataFrame({"user_id": pd.Series([10**5000], dtype=object)}))
    assert "max_id_length=256" in message
    message = refused(model, pd.DataFrame({"user_id": users[:1], "k": pd.Series([10**5000], dtype=object)}))
    assert "k must be between 1 and the number of items" in message


@pytest.mark.parametrize("bad", ["10\x0000", "a\nb", "tab\there", "\x7f", "\x85", "lone\ud800"])
def test_ids_with_control_characters_are_400(store, model, bad):
    fallback = mlflow.pyfunc.load_model(MODEL, model_config={"unknown_user": "popularity"})
    for m in (model, fallback):
        message = refused(m, pd.DataFrame({"user_id": pd.Series(["1000", bad], dtype=object)}))
        assert "row 1" in message and "U+" in message and "control characters" in message
        assert bad not in message  # shown escaped, never raw


@pytest.mark.slow
def test_served_over_http_limits_are_400(store, tmp_path, users):
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local"]
            + ["-h", "127.0.0.1", "-p", str(port)],
            env={**os.environ, "MLFLOW_TRACKING_URI": store},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, log)
        ok = requests.post(url, json={"dataframe_records": [{"user_id": users[0], "k": 3}]}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3
        cases = {
            "max_id_length=256": {"dataframe_records": [{"user_id": HUGE}]},
            "max_users_per_request=10000": {"dataframe_split": {"columns": ["user_id"], "data": [["x"]] * 10_001}},
            "U+0000": {"dataframe_records": [{"user_id": "10\x0000"}]},
        }
        for needle, body in cases.items():
            answer = requests.post(url, json=body, timeout=60)
            assert answer.status_code == 400, answer.text[:1000]
            reply = answer.json()
            assert reply["error_code"] == "INVALID_PARAMETER_VALUE" and needle in reply["message"]
            assert len(answer.content) < 2 * MAX_MESSAGE + 200, answer.text[:1000]  # nothing echoed in bulk
    finally:
        stop_group(server)


# ---------------------------------------------------------------------------------------------- 2. no store


def test_read_only_commands_refuse_a_missing_store_and_create_nothing(store_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert recommend_main(["--model", f"models:/{NAME}@champion", "--user", "1000"]) == 2
    line = one_error_line(capsys, "recommend")
    assert str(tmp_path / "mlflow.db") in line and "MLFLOW_TRACKING_URI" in line
    assert register_main(["settle", "--name", NAME]) == 2
    line = one_error_line(capsys, "register")
    assert str(tmp_path / "mlflow.db") in line and "MLFLOW_TRACKING_URI" in line
    # the same for a MLFLOW_TRACKING_URI naming a sqlite file that is not there
    missing = tmp_path / "elsewhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    assert recommend_main(["--model", f"runs:/{'0' * 32}/model", "--user", "1000"]) == 2
    assert str(missing) in one_error_line(capsys, "recommend")
    assert list(tmp_path.rglob("*")) == []  # no mlflow.db, no lock file, no mlruns

    # the whole command, as a user runs it from the wrong folder
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "dprec.recommend", "--model", f"models:/{NAME}@champion", "--user", "1000"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
    assert (
        proc.stderr.startswith("recommend: error: no MLflow tracking store at ")
        and "MLFLOW_TRACKING_URI" in proc.stderr
    )
    assert list(tmp_path.rglob("*")) == []


def test_recommend_from_a_model_folder_needs_no_store(store, tmp_path, monkeypatch, capsys, users):
    local = mlflow.artifacts.download_artifacts(MODEL, dst_path=str(tmp_path / "model"))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(empty)
    assert recommend_main(["--model", local, "--user", users[0], "--k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert list(empty.iterdir()) == []


def test_registering_may_create_the_store(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        assert register_main(["register", "--bundle", str(bundle)]) == 0
    finally:
        release_store()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["alias"] == "champion"
    assert (tmp_path / "mlflow.db").is_file()
    assert versions(f"sqlite:///{tmp_path / 'mlflow.db'}") == ["1"]


# ---------------------------------------------------------------------------------------------- 3. CLI mistakes


def tamper(bundle: Path, folder: Path, **changes) -> Path:
    """A copy of ``bundle`` with files replaced: name -> bytes, or a callable writing the file."""
    shutil.copytree(bundle, folder)
    for name, change in changes.items():
        path = folder / name.replace("__", ".")
        path.unlink()
        change(path) if callable(change) else path.write_bytes(change)
    return folder


class Payload:
    """Unpickling this touches a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tampered_bundles(bundle: Path, root: Path) -> dict[str, Path]:
    """Bundle variants -> the words the refusal must contain."""
    tensors = load_file(bundle / "embeddings.safetensors")
    ids = json.loads((bundle / "ids.json").read_text())
    config = json.loads((bundle / "config.json").read_text())
    nan_user = tensors["user"].clone()
    nan_user[3, 1] = float("nan")
    marker = root / "unpickled"
    with np.load(bundle / "train_items.npz", allow_pickle=False) as train:
        csr = {key: train[key] for key in ("indptr", "indices")}

    def embeddings(**t):
        return lambda p: save_file({**tensors, **t}, p)

    cases = {
        "not a model bundle": root / "empty",
        "missing ['ids.json']": tamper(bundle, root / "missing", ids__json=lambda p: None),
        "config.json: not valid JSON": tamper(bundle, root / "badjson", config__json=b'{"dataset": '),
        "ids.json: not UTF-8 text": tamper(bundle, root / "badids", ids__json=b"\xff\xfe garbage"),
        "valid.'recall@20' must be a finite number": tamper(
            bundle,
            root / "nanmetric",
            config__json=json.dumps({**config, "valid": {"recall@20": float("nan")}}).encode(),
        ),
        "NaN or infinite": tamper(bundle, root / "nan", embeddings__safetensors=embeddings(user=nan_user)),
        "differ in dimension": tamper(
            bundle, root / "dims", embeddings__safetensors=embeddings(item=tensors["item"][:, :3].contiguous())
        ),
        "2-D float matrix": tamper(
            bundle, root / "shape", embeddings__safetensors=embeddings(user=tensors["user"].reshape(-1))
        ),
        "not a safetensors file": tamper(bundle, root / "notst", embeddings__safetensors=b"\x00" * 64),
        "119 user_ids but 120 user embeddings": tamper(
            bundle, root / "ids", ids__json=json.dumps({**ids, "user_ids": ids["user_ids"][:-1]}).encode()
        ),
        "user_ids repeats '1001'": tamper(
            bundle, root / "dup", ids__json=json.dumps({**ids, "user_ids": ["1001"] + ids["user_ids"][1:]}).encode()
        ),
        "control character": tamper(
            bundle, root / "ctrl", ids__json=json.dumps({**ids, "item_ids": ["I\x00"] + ids["item_ids"][1:]}).encode()
        ),
        "without pickles": tamper(bundle, root / "pickled", train_items__npz=pickle.dumps(Payload(marker))),
        "popularity.npy: not a numpy .npy file without pickles": tamper(
            bundle,
            root / "objnpy",
            popularity__npy=lambda p: np.save(p, np.array([Payload(marker)] * 80, dtype=object), allow_pickle=True),
        ),
        "indices must lie in [0, 80)": tamper(
            bundle,
            root / "csr",
            train_items__npz=lambda p: np.savez(p, indptr=csr["indptr"], indices=np.full_like(csr["indices"], 80)),
        ),
    }
    (root / "empty").mkdir()
    return cases


def test_tampered_bundles_are_refused_at_registration(store, bundle, tmp_path, capsys):
    cases = tampered_bundles(bundle, tmp_path)
    for needle, folder in cases.items():
        with pytest.raises(BundleError) as err:
            check_bundle(folder)
        assert needle in str(err.value), (needle, str(err.value))
        assert register_main(["register", "--bundle", str(folder)]) == 2
        line = one_error_line(capsys, "register")
        assert needle in line and str(folder) in line
    assert not (tmp_path / "unpickled").exists()  # nothing was unpickled
    assert versions(store) == ["1"]  # nothing was registered
    assert check_bundle(bundle)[0]["dataset"]["name"] == "grouped"  # the untampered bundle passes


def test_registry_cli_mistakes_are_one_line(store, bundle, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert register_main(["register", "--bundle", str(tmp_path / "file")]) == 2
    assert "not a model bundle folder" in one_error_line(capsys, "register")
    assert register_main(["register", "--bundle", str(bundle), "--run-id", "f" * 32]) == 2
    assert "not found" in one_error_line(capsys, "register")
    assert register_main(["settle", "--name", "dprec-nope"]) == 2
    line = one_error_line(capsys, "register")
    assert "'dprec-nope': no such registered model" in line and NAME in line
    assert register_main(["settle", "--name", HUGE]) == 2
    assert len(one_error_line(capsys, "register")) < MAX_MESSAGE
    assert versions(store) == ["1"]

    # the whole command, as a user runs it: one line on stderr, exit code 2
    broken = tamper(bundle, tmp_path / "broken", config__json=b"{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "dprec.register", "register", "--bundle", str(broken)],
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
    assert proc.stderr.startswith("register: error: ") and "not valid JSON" in proc.stderr


def test_recommend_mistakes_are_one_line(store, capsys, users):
    cases = {
        ("--model", "models:/dprec-nope@champion", "--user", users[0]): "cannot load it",
        ("--model", "runs:/0123/model", "--user", users[0]): "cannot load it",
        ("--model", "/nonexistent/model", "--user", users[0]): "cannot load it",
        ("--model", f"models:/{HUGE}@champion", "--user", users[0]): "(1000017 characters)",
        ("--model", MODEL, "--user", users[0], "--k", "0"): "--k must be a positive integer, got 0",
        ("--model", MODEL, "--user", users[0], "--k", "-1"): "--k must be a positive integer, got -1",
        ("--model", MODEL, "--user", users[0], "--k", "abc"): "--k must be a positive integer, got 'abc'",
        ("--model", MODEL, "--user", users[0], "--k", "2.5"): "--k must be a positive integer, got '2.5'",
        ("--model", MODEL, "--user", users[0], "--k", "81"): "number of items (80), got 81",
        ("--model", MODEL, "--user", "ghost"): "unknown user_id 'ghost'",
        ("--model", MODEL, "--user", HUGE): "max_id_length=256",
        ("--model", MODEL, "--user", "a\x00b"): "U+0000",
    }
    for argv, needle in cases.items():
        assert recommend_main(list(argv)) == 2, argv[:4]
        line = one_error_line(capsys, "recommend")
        assert needle in line and len(line) < MAX_MESSAGE + 300, (needle, line[:1000])
