"""Data-parallel training with DeepSpeed: the library side of ``launchers/train.py`` (DESIGN §4).

Every rank holds the full graph and model. Each epoch's global batches are split across ranks
(``Trainer.epoch_batches``: same permutation and negatives on every rank, rank r takes the r-th
part, every rank takes the same number of steps); DeepSpeed averages the gradients and
partitions the optimizer state (ZeRO stage from the JSON). Evaluation is split over ranks by
users and the metric sums are all-reduced. All ranks save checkpoints; only rank 0 logs.

Checkpoints (DeepSpeed format, ``<out>/checkpoints``): tag ``epoch-NNNN`` every ``save_every``
epochs and at the end, tag ``best`` when validation improves (without moving ``latest``). The
client state carries the loop state (with the tracking run id) and the best weights, so
:meth:`DeepSpeedTrainer.resume` continues from ``latest`` and reaches the same result as an
uninterrupted run. Reference: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models" (SC 2020).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dprec.config import ConfigError
from dprec.data.dataset import Dataset
from dprec.training.config import RunConfig
from dprec.training.loop import FitState, Trainer

CHECKPOINT_DIR = "checkpoints"


def _on_rank_zero(record: logging.LogRecord) -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


logger = logging.getLogger(__name__)
logger.addFilter(_on_rank_zero)  # this module's records come from rank 0 only


def complete_deepspeed_config(ds_config: dict[str, Any], cfg: RunConfig, world: int) -> dict[str, Any]:
    """Fill batch sizes and the learning rate from the run config; refuse values that contradict it.

    The run config is the one source of truth for the global batch and the learning rate, so a
    1-process and a 2-process run with the same run config optimise the same objective.
    """
    out = copy.deepcopy(ds_config)
    batch = cfg.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size={batch} must be divisible by the number of processes ({world})")
    want = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch // world,
        "gradient_accumulation_steps": 1,
    }
    for key, value in want.items():
        if key in out and out[key] != value:
            raise ConfigError(
                f"deepspeed config {key}={out[key]} contradicts the run config (expected {value}); "
                f"remove it from the JSON: it is derived from train.batch_size"
            )
        out[key] = value
    optimizer = out.setdefault("optimizer", {"type": "Adam", "params": {"torch_adam": True}})
    params = optimizer.setdefault("params", {})
    if "lr" in params and params["lr"] != cfg.train.lr:
        raise ConfigError(f"deepspeed optimizer lr={params['lr']} contradicts train.lr={cfg.train.lr}")
    params["lr"] = cfg.train.lr
    if optimizer.get("type", "").lower() in ("adam", "adamw") and not params.get("torch_adam", False):
        raise ConfigError("set optimizer.params.torch_adam: true (the fused Adam needs a compiler at run time)")
    return out


def init_distributed() -> torch.device:
    """Start torch.distributed through DeepSpeed (gloo on CPU, the accelerator's backend otherwise); the device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    if accelerator.device_name() != "cpu":
        return torch.device(accelerator.current_device_name())
    return torch.device("cpu")


class DeepSpeedTrainer(Trainer):
    """The Trainer with DeepSpeed's engine as optimiser and torch.distributed for evaluation sums."""

    logger = logger

    def __init__(
        self,
        cfg: RunConfig,
        ds_config: dict[str, Any],
        out: str | Path,
        save_every: int = 5,
        ds: Dataset | None = None,
        features: dict[str, np.ndarray] | None = None,
    ):
        device = init_distributed()
        world = dist.get_world_size()
        ds_config = complete_deepspeed_config(ds_config, cfg, world)  # refuse a bad JSON before loading data
        super().__init__(cfg, ds, features, rank=dist.get_rank(), world=world, device=device)
        self.ds_config = ds_config
        self.out = Path(out)
        self.checkpoint_dir = self.out / CHECKPOINT_DIR
        self.save_every = save_every
        self.engine = None
        self.build_optimizer()  # a collective call: every rank builds its engine now, before any resume

    def make_optimizer(self):
        import deepspeed

        self.model.to_device(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=params, config=self.ds_config
        )
        return optimizer

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return dict(zip(keys, values.tolist(), strict=True))

    def client_state(self, state: FitState) -> dict[str, Any]:
        return {"fit_state": dataclasses.asdict(state), "best_state": self.best_state}

    def on_epoch_end(self, state: FitState, improved: bool) -> None:
        epoch = state.next_epoch - 1
        if improved:
            self.engine.save_checkpoint(
                str(self.checkpoint_dir), tag="best", client_state=self.client_state(state), save_latest=False
            )
        last = state.stopped or state.next_epoch >= self.cfg.train.epochs
        if (epoch + 1) % self.save_every == 0 or last:
            self.engine.save_checkpoint(
                str(self.checkpoint_dir), tag=f"epoch-{epoch:04d}", client_state=self.client_state(state)
            )

    def resume(self) -> FitState:
        """Load ``latest`` (weights, optimizer, loop state); raises if there is nothing to resume."""
        latest = self.checkpoint_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {self.checkpoint_dir} (no 'latest' file)")
        path, client = self.engine.load_checkpoint(str(self.checkpoint_dir))
        if path is None:
            raise RuntimeError(f"--resume: DeepSpeed could not load {self.checkpoint_dir}/{latest.read_text().strip()}")
        state = FitState(**client["fit_state"])
        self.best_state = client["best_state"]
        self.logger.info(f"resumed from {path} at epoch {state.next_epoch}")
        return state
