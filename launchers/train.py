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
logs, tracks, writes the run folder, then registers, and prints the final JSON line; every rank
writes its checkpoint part. Checkpoints are loaded weights-only (no pickled code runs). A
mistake in the config, data, paths or checkpoints fails every rank and is printed once, by rank
0, as ``launchers/train.py: error: ...`` (exit code 2 on every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import deepspeed

from dprec.config import load_yaml, positive_int, run_stage
from dprec.io import log_to_console
from dprec.tracking.fit import tracked_fit
from dprec.training.config import load_config
from dprec.training.distributed import (
    CHECKPOINT_DIR,
    DeepSpeedTrainer,
    RankFailure,
    agree,
    close_process_group,
    init_distributed,
    wait_for_rank_zero,
)
from dprec.training.run import new_run_folder, save_run
from dprec.training.signals import Interrupted, stop_on_signals

PROG = "launchers/train.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override run config keys")
    parser.add_argument("--save-every", type=positive_int, default=5, help="checkpoint every N epochs")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in <out>")
    parser.add_argument("--no-register", action="store_true", help="track the run but do not register the model")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (e.g. launchers/zero1.json)")
    return args


def global_rank() -> int:
    """This process's global rank, from the launcher's environment (0 when started alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_to_console()
    # SIGTERM / SIGINT (the deepspeed launcher forwards them) raise, so rank 0 ends its MLflow run as KILLED
    with stop_on_signals():
        try:
            return run_stage(PROG, lambda: train_reporting_once(args))
        except Interrupted as exc:
            if global_rank() == 0:
                print(f"{PROG}: {exc}", file=sys.stderr)
            return exc.exit_code


def train_reporting_once(args: argparse.Namespace) -> int:
    """:func:`train`; a user error that every rank hit (:class:`RankFailure`) is printed by rank 0 only, rc 2."""
    try:
        return train(args)
    except RankFailure as exc:
        if not exc.quiet:
            print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        try:
            wait_for_rank_zero()  # no rank exits (and gets the others killed) before rank 0 has printed
            close_process_group()  # then leave with rc 2, not an abort in the teardown of a live group
        except RuntimeError:
            pass
        return 2


def train(args: argparse.Namespace) -> int:
    init_distributed()
    with ExitStack() as stack:
        # a mistake fails every rank here and is printed once; every rank writes its checkpoint part into out
        cfg, ds_json = agree(lambda: (load_config(args.config, args.set), load_yaml(args.deepspeed_config)))
        agree(lambda: stack.enter_context(new_run_folder(Path(cfg.out) / CHECKPOINT_DIR)))
        trainer = DeepSpeedTrainer(cfg, ds_json, cfg.out, save_every=args.save_every)
        state = trainer.resume() if args.resume else None
        # rank 0 writes the run folder inside tracked_fit, before the model is registered
        save = (lambda result: save_run(trainer, result, cfg.out)) if trainer.rank == 0 else None
        result = tracked_fit(
            trainer, state, register=not args.no_register, deepspeed_config=trainer.ds_config, save=save
        )
    if trainer.rank == 0:
        summary = {"run": cfg.out, "world": trainer.world, "best_epoch": result["best_epoch"], "test": result["test"]}
        extra = {"tracking_run_id": result["tracking_run_id"], "registration": result.get("registration")}
        print(json.dumps({**summary, **extra}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
