"""DeepSpeed entry point: train a recommender data-parallel over processes and nodes.

Local, 2 CPU processes (gloo)::

    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launchers/train.py \\
        --config runs/default.yaml --deepspeed_config launchers/zero1.json

Cluster (hostfile lists the nodes and their slots; see cluster/)::

    deepspeed --hostfile cluster/hostfile --num_nodes 2 --num_gpus 8 launchers/train.py \\
        --config <run.yaml> --deepspeed_config launchers/zero2.json

Runs are tracked in MLflow (``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db`` in the working
folder) and the model is registered as ``dprec-<dataset>`` (``@champion`` when its validation
Recall@20 beats the current champion's, else ``@challenger``).

Resume after an interruption (same MLflow run, same final metrics)::

    deepspeed ... launchers/train.py --config <run.yaml> --deepspeed_config ... --resume

The run config (YAML, see ``dprec.train.RunConfig``) fixes the data, features, model and the
global batch; the DeepSpeed JSON adds the ZeRO stage and engine settings (batch sizes and the
learning rate are filled from the run config). The optimizer is torch's Adam
(``"torch_adam": true``), so nothing is compiled at run time. Only rank 0 prints, tracks
and registers; every rank writes its part of the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys

import deepspeed

from dprec.config import load_yaml
from dprec.distributed import DeepSpeedTrainer
from dprec.train import load_config, save_run, tracked_fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override run config keys")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every N epochs")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in <out>")
    parser.add_argument("--no-register", action="store_true", help="track the run but do not register the model")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.deepspeed_config:
        print("launchers/train.py: --deepspeed_config is required (e.g. launchers/zero1.json)", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)
    trainer = DeepSpeedTrainer(cfg, load_yaml(args.deepspeed_config), cfg.out, save_every=args.save_every)
    state = trainer.resume() if args.resume else None
    result = tracked_fit(
        trainer,
        state,
        resume_run_id=trainer.resumed_run_id,
        register=not args.no_register,
        deepspeed_config=trainer.ds_config,
    )
    if trainer.rank == 0:
        save_run(trainer, result, cfg.out)
        print(
            json.dumps(
                {
                    "run": cfg.out,
                    "world": trainer.world,
                    "best_epoch": result["best_epoch"],
                    "test": result["test"],
                    "tracking_run_id": result["tracking_run_id"],
                    "registration": result.get("registration"),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
