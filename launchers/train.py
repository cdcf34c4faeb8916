"""DeepSpeed entry point: train a recommender data-parallel over processes and nodes (DESIGN §4, §5).

Local, 2 CPU processes (gloo)::

    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launchers/train.py \\
        --config configs/demo.yaml --deepspeed_config launchers/zero1.json

Cluster (the hostfile lists the nodes and their slots; see cluster/)::

    deepspeed --hostfile cluster/hostfile --num_nodes 2 --num_gpus 8 launchers/train.py \\
        --config <run.yaml> --deepspeed_config launchers/zero2.json

Add ``--resume`` to continue from the latest checkpoint in ``<out>/checkpoints`` (same MLflow run,
same final metrics). The run config fixes data, features, model and the global batch; the JSON
adds the ZeRO stage (batch sizes and lr are filled from the run config, Adam is torch's).
Library side: :mod:`dprec.training.distributed`, :func:`dprec.tracking.fit.tracked_fit`. Rank 0
logs, tracks, registers and prints the final JSON line; every rank writes its checkpoint part.
"""

from __future__ import annotations

import argparse
import json

import deepspeed

from dprec.config import load_yaml, run_stage
from dprec.io import log_to_console
from dprec.tracking.fit import tracked_fit
from dprec.training.config import load_config
from dprec.training.distributed import DeepSpeedTrainer
from dprec.training.run import save_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launchers/train.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override run config keys")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N epochs")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in <out>")
    parser.add_argument("--no-register", action="store_true", help="track the run but do not register the model")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (e.g. launchers/zero1.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_to_console()
    return run_stage("launchers/train.py", lambda: train(args))


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    trainer = DeepSpeedTrainer(cfg, load_yaml(args.deepspeed_config), cfg.out, save_every=args.save_every)
    state = trainer.resume() if args.resume else None
    result = tracked_fit(trainer, state, register=not args.no_register, deepspeed_config=trainer.ds_config)
    if trainer.rank == 0:
        save_run(trainer, result, cfg.out)
        summary = {"run": cfg.out, "world": trainer.world, "best_epoch": result["best_epoch"], "test": result["test"]}
        extra = {"tracking_run_id": result["tracking_run_id"], "registration": result.get("registration")}
        print(json.dumps({**summary, **extra}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
