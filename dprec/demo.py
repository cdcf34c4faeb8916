"""The whole pipeline on the embedded default dataset, end to end, on one machine.

    python -m dprec.demo [--workdir demo_output] [--model dprec] [--epochs 60]

1. prepare  ``python -m dprec.prepare synthetic``: the seeded default catalogue (text + PNG images)
2. extract  ``python -m dprec.extract`` on a local Ray instance: SmolLM2-135M-Instruct text and
            MobileNetV2 image embeddings into ``data_shards/default/smollm2-mobilenet``
3. train    ``deepspeed --num_accelerators 2 launchers/train.py`` (2 local CPU processes, gloo,
            ZeRO-1), tracked in MLflow (``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db``)
            and registered as ``dprec-default`` (``@champion`` if it beats the current one)
4. consume  ``python -m dprec.recommend --model models:/dprec-default@champion``: top-k for a user
5. compare  popularity and LightGCN trained in-process on the same split

and prints a summary table, where the run is, how to open ``mlflow ui``, and the total time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dprec.config import DPRecError, load_yaml, run_stage
from dprec.training.config import RunConfig, TrainConfig
from dprec.training.loop import Trainer
from dprec.training.metrics import format_metrics

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


class StepFailed(DPRecError, RuntimeError):
    """A stage of the demo exited with a non-zero code."""


def run_step(title: str, cmd: list[str], env: dict[str, str]) -> str:
    """Run one stage as its users run it; stream its output; return it (raise :class:`StepFailed` if it fails)."""
    print(f"\n== {title}\n   $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not line.startswith("[20") and "Warning" not in line:  # keep the launcher's INFO noise out
            print("   " + line.rstrip(), flush=True)
    if proc.wait():
        raise StepFailed(f"step '{title}' failed with exit code {proc.returncode}")
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return "".join(lines)


def last_json(output: str) -> dict:
    return json.loads([ln for ln in output.splitlines() if ln.startswith("{")][-1])


def baseline(model: dict, dataset: Path, seed: int) -> dict:
    cfg = RunConfig(dataset=str(dataset), model=model, train=TrainConfig(epochs=200, patience=10, seed=seed))
    return Trainer(cfg).fit(log=lambda line: None)["test"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dprec.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo_output"))
    parser.add_argument("--shards", type=Path, default=Path("data_shards/default/smollm2-mobilenet"))
    parser.add_argument("--model", default="dprec", help="model trained by DeepSpeed (dprec, lightgcn, ...)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--user", default="U00000", help="user asked for recommendations at the end")
    args = parser.parse_args(argv)
    return run_stage("demo", lambda: run_demo(args))


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    workdir, shards = (p if p.is_absolute() else ROOT / p for p in (args.workdir, args.shards))
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(ROOT),
    }
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    python = sys.executable
    data = workdir / "data" / "default"

    run_step(
        "1/5 prepare: embedded default dataset",
        [python, "-m", "dprec.prepare", "synthetic", "--out", str(data), "--overwrite"],
        env,
    )
    extract = last_json(
        run_step(
            "2/5 extract: text (SmolLM2) and image (MobileNetV2) features on Ray",
            [python, "-m", "dprec.extract", "--dataset", str(data), "--out", str(shards)],
            env,
        )
    )

    config = workdir / f"{args.model}.yaml"
    run = load_yaml(DEMO_CONFIG)  # configs/demo.yaml, with this demo's folders, model, epochs and seed
    run.update(
        dataset=str(data),
        out=str(workdir / "runs" / args.model),
        features={"text": f"{shards}#text", "image": f"{shards}#image"},
        model={"name": args.model},
        train={**run["train"], "epochs": args.epochs, "seed": args.seed},
    )
    config.write_text(yaml.safe_dump(run, sort_keys=False))
    trained = last_json(
        run_step(
            f"3/5 train: {args.model} with DeepSpeed on 2 local processes, tracked and registered in MLflow",
            [
                str(Path(python).parent / "deepspeed"),
                "--num_accelerators",
                "2",
                "--master_addr",
                "127.0.0.1",
                str(ROOT / "launchers" / "train.py"),
                "--config",
                str(config),
                "--deepspeed_config",
                str(ROOT / "launchers" / "zero1.json"),
            ],
            env,
        )
    )
    reg = trained["registration"]
    run_step(
        f"4/5 consume: top-5 for user {args.user} from the registry",
        [python, "-m", "dprec.recommend", "--model", "models:/dprec-default@champion", "--user", args.user, "--k", "5"],
        env,
    )

    print("\n== 5/5 compare: popularity and LightGCN on the same split (in-process)", flush=True)
    rows = {
        "popularity": baseline({"name": "popularity"}, data, args.seed),
        "lightgcn": baseline({"name": "lightgcn"}, data, args.seed),
        f"{args.model} (DeepSpeed, 2 processes)": trained["test"],
    }
    print("\n| model | test R@10 | R@20 | N@10 | N@20 |")
    print("|---|---|---|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t['recall@10']:.4f} | {t['recall@20']:.4f} | {t['ndcg@10']:.4f} | {t['ndcg@20']:.4f} |")
    uri = env["MLFLOW_TRACKING_URI"]
    total = time.perf_counter() - start
    print(f"""
features      {shards} ({extract.get("items")} items, {extract.get("seconds")} s)
run folder    {trained["run"]}
MLflow run    {trained["tracking_run_id"]} in {uri}
registered    {reg["name"]} version {reg["version"]} -> @{reg["alias"]} (champion: version {reg["champion"]})
look at it    mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000
demo time     {total:.0f} s""")
    print(json.dumps({"demo_seconds": round(total, 1), **{n: format_metrics(t) for n, t in rows.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
