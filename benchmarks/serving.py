"""Latency and throughput of a registered DPRec model behind ``mlflow models serve`` on loopback.

    python benchmarks/serving.py                          # 1,000 requests, 1 user each, k = 10, 1 and 4 clients
    python benchmarks/serving.py --requests 5000 --clients 1 8 --workers 2 --users-per-request 16

The script trains LightGCN for a few epochs on the embedded default dataset (600 users,
400 items, seeded), registers it in a throw-away sqlite store, starts ``mlflow models serve
-m models:/dprec-default@champion --env-manager local`` on a free 127.0.0.1 port, checks one
answer against the in-process pyfunc, sends ``--requests`` POST /invocations per client
count (random users from a fixed seed, one keep-alive session per client thread, after a
warm-up) and prints one row per client count: errors (non-200 or no answer; goal 0), p50
and p99 latency, requests per second. The server's process group is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import requests

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per client-count row")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent client threads per row")
    parser.add_argument("--users-per-request", type=int, default=1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of mlflow models serve")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_limits(parser, args)
    return args


def check_limits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a load the served model would answer with 400s (its request limits, serving.DEFAULT_LIMITS)."""
    from dprec.tracking.registry import SERVING_LIMITS

    limits = {
        "--users-per-request": (args.users_per_request, SERVING_LIMITS["max_users_per_request"]),
        "--k": (args.k, min(SERVING_LIMITS["max_k"], 400)),  # 400 items in the embedded default dataset
        "--users-per-request x --k": (args.users_per_request * args.k, SERVING_LIMITS["max_results_per_request"]),
    }
    for flag, (value, limit) in limits.items():
        if not 1 <= value <= limit:
            parser.error(f"{flag} must be between 1 and {limit} (the served model's request limit), got {value}")


def train_and_register(store: Path, epochs: int):
    """LightGCN on the embedded default dataset, registered as dprec-default in ``store``; returns the trainer."""
    from dprec.data.synthetic import generate
    from dprec.tracking.registry import register_model
    from dprec.training.config import RunConfig, TrainConfig
    from dprec.training.loop import Trainer

    cfg = RunConfig(
        dataset="embedded-default",
        out=str(store / "run"),
        model={"name": "lightgcn"},
        train=TrainConfig(epochs=epochs, batch_size=1024, lr=0.01, graph_backend="torch"),
    )
    trainer = Trainer(cfg, ds=generate())
    result = trainer.fit(log=lambda s: None)
    registration = register_model(trainer.trained_model(), result, uri=os.environ["MLFLOW_TRACKING_URI"])
    return trainer, registration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_uri: str, port: int, workers: int, log_path: Path) -> subprocess.Popen:
    """``mlflow models serve`` in its own process group (so that it and its workers stop together)."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(workers),
    ]
    with log_path.open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {server.returncode}")
        try:
            if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:  # not listening yet, or too busy to answer in time
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/ping did not answer in {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@dataclass
class Row:
    clients: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rps: float


def run_load(url: str, bodies: list[dict], clients: int) -> Row:
    """Send ``bodies`` from ``clients`` threads (each its own keep-alive session); latency of every request."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(part: list[dict]) -> None:
        with requests.Session() as session:
            for body in part:
                t0 = time.perf_counter()
                try:
                    ok = session.post(f"{url}/invocations", json=body, timeout=30).status_code == 200
                except requests.RequestException:
                    ok = False
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    errors[0] += not ok

    threads = [threading.Thread(target=client, args=(bodies[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return Row(
        clients, len(bodies), errors[0], float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(bodies) / wall
    )


def request_bodies(user_ids: list[str], n: int, per_request: int, k: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(user_ids), size=(n, per_request))
    return [{"dataframe_records": [{"user_id": user_ids[i], "k": k} for i in row]} for row in picks]


def check_answer(url: str, model_uri: str, body: dict) -> None:
    """The served answer equals the in-process pyfunc's (items, ranks; scores to 1e-6)."""
    import mlflow

    served = pd.DataFrame(requests.post(f"{url}/invocations", json=body, timeout=30).json()["predictions"])
    local = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame(body["dataframe_records"]))
    same = served[["user_id", "rank", "item_id"]].equals(local[["user_id", "rank", "item_id"]])
    if not same or not np.allclose(served["score"], local["score"], atol=1e-6):
        raise AssertionError(f"served answer differs from the in-process model:\n{served}\n{local}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dprec-serving-bench-") as tmp:
        store = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
        t0 = time.perf_counter()
        trainer, registration = train_and_register(store, args.epochs)
        model_uri = f"models:/{registration.name}@champion"
        print(f"trained and registered {registration.model_uri} in {time.perf_counter() - t0:.1f} s")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model_uri, port, args.workers, store / "serve.log")
        try:
            print(f"mlflow models serve ready in {wait_ready(url, server):.1f} s on {url} ({args.workers} worker(s))")
            user_ids = trainer.ds.users["user_id"].tolist()
            check_answer(url, model_uri, request_bodies(user_ids, 1, 8, args.k, args.seed + 1)[0])
            run_load(url, request_bodies(user_ids, 50, args.users_per_request, args.k, args.seed + 2), 1)
            bodies = request_bodies(user_ids, args.requests, args.users_per_request, args.k, args.seed)
            rows = [run_load(url, bodies, clients) for clients in args.clients]
        finally:
            stop_server(server)
    print(
        f"\n{args.users_per_request} user(s) per request, k = {args.k}, "
        f"{trainer.ds.n_users} users x {trainer.ds.n_items} items, loopback\n"
    )
    print("| clients | requests | errors | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.clients} | {r.requests} | {r.errors} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.rps:.0f} |")
    return 0 if all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
