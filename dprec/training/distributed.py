"""Data-parallel training with DeepSpeed: the library side of ``launchers/train.py`` (DESIGN §4).

Every rank holds the full graph and model. Each epoch's global batches are split across ranks
(``Trainer.epoch_batches``: same permutation and negatives on every rank, rank r takes the r-th
part, every rank takes the same number of steps); DeepSpeed averages the gradients and
partitions the optimizer state (ZeRO stage from the JSON). Evaluation is split over ranks by
users and the metric sums are all-reduced. All ranks save checkpoints; only rank 0 logs.

Checkpoints (DeepSpeed format, ``<out>/checkpoints``): tag ``epoch-NNNN`` every ``save_every``
epochs and at the end, tag ``best`` when validation improves (without moving ``latest``);
``latest`` is written by rank 0 (atomically) once every rank has written the tag's files, so a
rank killed while saving leaves it naming the previous, complete checkpoint. The
client state carries the loop state (with the tracking run id) and the best weights, so
:meth:`DeepSpeedTrainer.resume` continues from ``latest`` and reaches the same result as an
uninterrupted run. Reference: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models" (SC 2020).

Loading never unpickles code: the engine's checkpoint engine loads with ``torch.load(...,
weights_only=True)`` (:func:`load_weights_only`; DeepSpeed's own loads with
``weights_only=False``), allowing only the few plain DeepSpeed types its files hold, and any
other ``torch.load`` inside ``engine.load_checkpoint`` is forced weights-only too
(:func:`weights_only_loads`). Before DeepSpeed reads anything, every rank checks its share of
the tag's files that way, so a planted file fails every rank at the same point with a
:class:`CheckpointError`.

User errors on several ranks are reported once: :func:`agree` runs a setup step on every rank
and, when it fails on any, makes every rank raise :class:`RankFailure`; rank 0's carries the
message(s), the others' are quiet (``launchers/train.py`` prints rank 0's and exits 2 on all).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from dprec.config import ConfigError, DPRecError
from dprec.data.dataset import Dataset
from dprec.io import atomic_write_text
from dprec.training.config import RunConfig
from dprec.training.loop import FitState, Trainer

CHECKPOINT_DIR = "checkpoints"
EPOCH_TAG = re.compile(r"epoch-\d{4,}")
"""The tags ``latest`` may name: the epoch checkpoints :meth:`DeepSpeedTrainer.on_epoch_end` writes."""

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
T = TypeVar("T")


class CheckpointError(DPRecError, ValueError):
    """A checkpoint that cannot be resumed from (not this project's, tampered with, truncated); names the file."""


class RankFailure(DPRecError):
    """A user error raised on every rank by :func:`agree`; only rank 0's is printed (``quiet`` elsewhere)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def describe(exc: BaseException) -> str:
    """One line for a user error, as :func:`dprec.config.run_stage` prints it (an OSError with its file)."""
    if isinstance(exc, OSError) and not isinstance(exc, DPRecError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return str(exc)


def agree(step: Callable[[], T]) -> T:
    """``step()`` on every rank; if it raises a user error (DPRecError, OSError) on any, every rank raises.

    Collective (every rank must call it at the same point). Rank 0 raises a :class:`RankFailure`
    with the message (each distinct one followed by the ranks that hit it, unless every rank hit
    the same), the other ranks a quiet one, so that the launch prints the error once. Other
    exceptions propagate as they are.
    """
    error: BaseException | None = None
    result: Any = None
    try:
        result = step()
    except (DPRecError, OSError) as exc:
        error = exc
    rank, world = _rank_world()
    mine = None if error is None else describe(error)
    messages: list[str | None] = [mine]
    if world > 1:
        messages = [None] * world
        dist.all_gather_object(messages, mine)
    failed = {r: m for r, m in enumerate(messages) if m is not None}
    if not failed:
        return result
    if rank != 0:
        raise RankFailure("reported by rank 0", quiet=True) from error
    distinct = sorted(set(failed.values()), key=list(failed.values()).index)
    if len(distinct) == 1 and len(failed) == world:
        message = distinct[0]
    else:
        message = "; ".join(
            f"{text} (rank {', '.join(str(r) for r, m in failed.items() if m == text)} of {world})" for text in distinct
        )
    raise RankFailure(message) from error


def wait_for_rank_zero() -> None:
    """After a :class:`RankFailure`: every rank waits here until rank 0 has printed it (a barrier)."""
    if _rank_world()[1] > 1:
        dist.barrier()


def close_process_group() -> None:
    """Destroy the default process group if one is up: a rank that leaves with a live gloo group can abort in the
    interpreter's teardown ("terminate called without an active exception", rc -6 instead of its own)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed stores in its checkpoints, allowed for ``weights_only`` loading (plain data)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _load_failure(exc: BaseException) -> str:
    text = str(exc).strip()
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = found.group(1) if found else (text.splitlines()[0] if text else type(exc).__name__)
    return line.split(". Please use")[0].rstrip(".")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every ``torch.load`` is weights-only, also one that passes ``weights_only=False`` (DeepSpeed's).

    Sets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (torch reads it at each load and it overrides the
    argument) and allows :func:`deepspeed_safe_globals`; both are put back on exit.
    """
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def load_weights_only(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`deepspeed_safe_globals` allowed; never runs pickled code.

    Raises :class:`CheckpointError` for a file that holds anything else (a planted pickle), or
    is truncated or not a torch file. Installed as the DeepSpeed engine's checkpoint ``load``.
    """
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: refused to load this checkpoint file: it is not one this project wrote, or it was changed "
            f"or cut short ({_load_failure(exc)}); delete {Path(path).parent} or resume from another checkpoint"
        ) from exc


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
    if accelerator.device_name() != "cpu" and "LOCAL_RANK" in os.environ:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))  # one device per local rank, before any collective
    deepspeed.init_distributed(dist_backend=backend)
    if accelerator.device_name() != "cpu":
        return torch.device(accelerator.current_device_name())
    return torch.device("cpu")


def check_deepspeed_config(ds_config: dict[str, Any]) -> None:
    """Parse ``ds_config`` as DeepSpeed will; a key or value it refuses becomes a :class:`ConfigError`."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(copy.deepcopy(ds_config))
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith("For further information")]
        # pydantic: "1 validation error for DeepSpeedZeroConfig", "stage", "Input should be ..."
        raise ConfigError(f"deepspeed config: {' '.join(lines[:3]) or type(exc).__name__}") from exc


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

        def setup() -> dict[str, Any]:
            full = complete_deepspeed_config(ds_config, cfg, world)  # refuse a bad JSON before loading data
            check_deepspeed_config(full)
            super(DeepSpeedTrainer, self).__init__(cfg, ds, features, rank=dist.get_rank(), world=world, device=device)
            return full

        # a mistake in the config or the data fails every rank here, before the first collective, and is told once
        self.ds_config = agree(setup)
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
        # DeepSpeed's engine loads with weights_only=False, which runs whatever a planted pickle holds
        self.engine.checkpoint_engine.load = load_weights_only
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
        if self.engine is None:  # nothing trainable (popularity): no engine, nothing to checkpoint
            return
        epoch = state.next_epoch - 1
        if improved:
            self.engine.save_checkpoint(
                str(self.checkpoint_dir), tag="best", client_state=self.client_state(state), save_latest=False
            )
        last = state.stopped or state.next_epoch >= self.cfg.train.epochs
        if (epoch + 1) % self.save_every == 0 or last:
            tag = f"epoch-{epoch:04d}"
            # DeepSpeed's rank 0 writes 'latest' before the closing barrier, while other ranks may still be writing
            # their optimizer shards: a rank killed then left 'latest' naming a cut-short checkpoint. The call returns
            # after that barrier (every rank has written its files), and only then does 'latest' name the tag.
            self.engine.save_checkpoint(
                str(self.checkpoint_dir), tag=tag, client_state=self.client_state(state), save_latest=False
            )
            if self.rank == 0:
                atomic_write_text(self.checkpoint_dir / "latest", tag)

    def check_loss(self, loss: torch.Tensor, epoch: int) -> None:
        """A non-finite loss on any rank stops every rank at the same step (one message, from rank 0)."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], device=self.device)
        dist.all_reduce(bad)
        if bad.item():
            agree(lambda: super(DeepSpeedTrainer, self).check_loss(loss, epoch))

    def nothing_to_resume(self) -> None:
        raise CheckpointError(
            f"--resume: model {self.cfg.model['name']!r} has no trainable parameters, so its runs write no "
            f"checkpoints; run it again without --resume"
        )

    def latest_tag(self) -> str:
        """The tag ``latest`` names, checked: an ``epoch-NNNN`` folder inside the checkpoint folder."""
        latest = self.checkpoint_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(f"--resume: no checkpoint in {self.checkpoint_dir} (no 'latest' file)")
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not EPOCH_TAG.fullmatch(tag):
            raise CheckpointError(f"{latest}: names {tag[:80]!r}, not an epoch checkpoint (epoch-NNNN)")
        if not (self.checkpoint_dir / tag).is_dir():
            raise CheckpointError(f"{latest}: names {tag}, but {self.checkpoint_dir / tag} is not a folder")
        return tag

    def check_checkpoint_files(self, tag: str) -> None:
        """Load this rank's share of the tag's ``.pt`` files weights-only: a planted or broken file fails here."""
        folder = self.checkpoint_dir / tag
        files = sorted(p for p in folder.rglob("*.pt"))
        if not any(p.name.startswith("mp_rank_") for p in files):
            raise CheckpointError(f"{folder}: no model states file (mp_rank_*_model_states.pt); not a checkpoint")
        for path in files[self.rank :: self.world]:
            if path.is_symlink() or not path.is_file():
                raise CheckpointError(f"{path}: not a regular file (DeepSpeed writes plain files)")
            load_weights_only(path, map_location="cpu")

    def resume(self) -> FitState:
        """Load ``latest`` (weights, optimizer, loop state); raises if there is nothing to resume.

        Collective. The tag and every file of it are checked first (weights-only, on all ranks
        between them), so a bad checkpoint fails every rank before DeepSpeed reads it.
        """
        if self.engine is None:
            agree(self.nothing_to_resume)
        tag = agree(self.latest_tag)
        agree(lambda: self.check_checkpoint_files(tag))

        def load() -> tuple[str, FitState, dict[str, torch.Tensor] | None]:
            try:
                with weights_only_loads():  # also DeepSpeed's own torch.load calls, whatever path they take
                    path, client = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{self.checkpoint_dir / tag}: refused to load ({_load_failure(exc)})") from exc
            except (RuntimeError, KeyError) as exc:  # e.g. weights of another model or another run config
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(
                    f"{self.checkpoint_dir / tag}: does not fit this run's model and settings ({first})"
                ) from exc
            if path is None:
                raise CheckpointError(f"--resume: DeepSpeed could not load {self.checkpoint_dir / tag}")
            return path, *client_fit_state(client, self.checkpoint_dir / tag)

        path, state, self.best_state = agree(load)
        self.logger.info(f"resumed from {path} at epoch {state.next_epoch}")
        return state


def client_fit_state(client: Any, where: Path) -> tuple[FitState, dict[str, torch.Tensor] | None]:
    """The loop state and best weights of a checkpoint's client state, checked field by field."""
    if not isinstance(client, dict) or not isinstance(client.get("fit_state"), dict):
        raise CheckpointError(f"{where}: no loop state (fit_state) in the checkpoint; not written by this launcher")
    raw = client["fit_state"]
    names = {f.name for f in dataclasses.fields(FitState)}
    if set(raw) != names:
        raise CheckpointError(f"{where}: fit_state has keys {sorted(raw)}, expected {sorted(names)}")
    ints = ("next_epoch", "best_epoch", "waited")
    if not all(isinstance(raw[k], int) and not isinstance(raw[k], bool) for k in ints):
        raise CheckpointError(f"{where}: fit_state {', '.join(ints)} must be integers")
    if not isinstance(raw["best_recall"], (int, float)) or not isinstance(raw["history"], list):
        raise CheckpointError(f"{where}: fit_state best_recall must be a number and history a list")
    if not isinstance(raw["stopped"], bool) or not isinstance(raw["tracking_run_id"], (str, type(None))):
        raise CheckpointError(f"{where}: fit_state stopped must be true/false and tracking_run_id a string")
    if raw["best_valid"] is not None and not isinstance(raw["best_valid"], dict):
        raise CheckpointError(f"{where}: fit_state best_valid must be a mapping")
    best = client.get("best_state")
    if best is not None and not (
        isinstance(best, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in best.items())
    ):
        raise CheckpointError(f"{where}: best_state must map parameter names to tensors")
    return FitState(**raw), best
