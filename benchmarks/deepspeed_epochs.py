"""Training seconds per epoch through the DeepSpeed launcher: 1 and 2 CPU processes x ZeRO 0 / 1 / 2.

    DS_ACCELERATOR=cpu python benchmarks/deepspeed_epochs.py [--dataset baby] [--epochs 3] [--model lightgcn]

Each configuration is one real ``deepspeed --num_accelerators P launchers/train.py`` run on the
prepared dataset (Amazon Baby from ../shared/data by default, splits as given; the embedded
default with ``--dataset default``). The table reports the mean training seconds of the epochs
after the first (the first pays warm-up), the mean evaluation seconds, the wall time of the
whole launch and the test R@20 (equal across configurations: same global batch, same steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def prepare(name: str, workdir: Path) -> Path:
    from dprec.prepare import main as prepare_main

    out = workdir / "data" / name
    if not (out / "dataset.json").is_file():
        source = ["synthetic"] if name == "default" else ["mmrec", str(SHARED / f"amazon-{name}")]
        prepare_main([*source, "--out", str(out)])
    return out


def run(config: Path, out: Path, procs: int, stage: int) -> dict:
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_accelerators",
        str(procs),
        "--master_addr",
        "127.0.0.1",
        str(ROOT / "launchers" / "train.py"),
        "--config",
        str(config),
        "--deepspeed_config",
        str(ROOT / "launchers" / f"zero{stage}.json"),
        "--set",
        f"out={out}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    saved = json.loads((out / "metrics.json").read_text())
    hist = saved["history"]
    return {
        "epoch_s": float(np.mean([h["train_seconds"] for h in hist[1:] or hist])),
        "eval_s": float(np.mean([h["eval_seconds"] for h in hist])),
        "wall_s": wall,
        "recall@20": saved["test"]["recall@20"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="baby", choices=("baby", "sports", "default"))
    parser.add_argument("--model", default="lightgcn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    data = prepare(args.dataset, args.workdir)
    config = args.workdir / f"ds-{args.dataset}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": str(data),
                "model": {"name": args.model},
                "train": {"epochs": args.epochs, "patience": args.epochs, "graph_backend": "dgl"},
            }
        )
    )
    rows = []
    for procs in (1, 2):
        for stage in (0, 1, 2):
            r = run(config, args.workdir / f"ds-{args.dataset}-p{procs}-z{stage}", procs, stage)
            rows.append((procs, stage, r))
            print(f"processes {procs} ZeRO {stage}: {r}", flush=True)
    print(f"\n{args.model} on {args.dataset}, global batch 2048, {args.epochs} epochs per run")
    print("| processes | ZeRO | train s/epoch | eval s | launch wall s | test R@20 |")
    print("|---|---|---|---|---|---|")
    for procs, stage, r in rows:
        print(
            f"| {procs} | {stage} | {r['epoch_s']:.2f} | {r['eval_s']:.2f} | {r['wall_s']:.0f} | {r['recall@20']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
