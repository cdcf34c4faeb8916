"""A trainer's ``fit`` inside an MLflow run: config, curves, test metrics, model registration (DESIGN §5).

Every rank calls :func:`tracked_fit`; only rank 0's tracker writes. The run id is kept in the
fit state, so the checkpoints of a DeepSpeed run carry it and a resumed fit (``state`` from
``DeepSpeedTrainer.resume``) continues the same MLflow run at later steps.

Order: fit, test metrics, then ``save(result)`` (the caller writes the run folder), and only
when that succeeded the model is registered: a run that could not leave its files never
publishes a model. On a failure the run ends as ``FAILED`` (``KILLED`` when SIGTERM / SIGINT / SIGHUP
stopped it, see :mod:`dprec.training.signals`) with the history so far, and the exception
propagates. Opening the run, every metric write, registering and closing it run under
:func:`~dprec.training.signals.deferred_signals`, so a signal cannot leave the run ``RUNNING``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dprec.tracking.tracker import RunTracker
from dprec.training.loop import FitState, Trainer
from dprec.training.signals import deferred_signals


def end_status(exc: BaseException) -> str:
    """The MLflow status of a run that ``exc`` ended: ``KILLED`` for an interruption, else ``FAILED``."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def log_epoch(tracker: RunTracker, row: dict[str, Any]) -> None:
    """Log one epoch's row; a stop signal waits for the write (one cut inside an sqlite transaction leaves the
    database locked for the ``KILLED`` status that follows)."""
    with deferred_signals():
        tracker.log_epoch(row, step=row["epoch"])


def tracked_fit(
    trainer: Trainer,
    state: FitState | None = None,
    register: bool = True,
    deepspeed_config: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """``trainer.fit`` (from ``state`` when resuming) tracked in MLflow, the model registered unless ``register``
    is False.

    ``save(result)``, if given, runs after the fit and before the registration (write the run
    folder there; ``result`` already holds ``tracking_run_id``); when it raises, nothing is
    registered and the run ends as ``FAILED``.
    Returns the fit result with ``tracking_run_id`` and, when registered, ``registration``
    (name, version, alias, champion, model_uri).
    """
    state = state if state is not None else FitState()
    tracker = RunTracker(enabled=trainer.rank == 0)
    history = state.history
    try:
        with deferred_signals():
            tracker.start(
                trainer.cfg.as_dict(),
                run_name=trainer.cfg.model["name"],
                experiment=f"dprec-{trainer.ds.name}",
                resume_run_id=state.tracking_run_id,
                deepspeed_config=deepspeed_config,
                feature_manifest=trainer.feature_manifests or None,
            )
        state.tracking_run_id = tracker.run_id
        result = trainer.fit(state=state, observer=lambda row: log_epoch(tracker, row))
        history = result["history"]
        with deferred_signals():
            tracker.log_test(result["test"], result["best_epoch"], valid=result["valid"])
        result["tracking_run_id"] = tracker.run_id
        if save is not None:
            save(result)  # everything the run leaves is on disk before the model is published
        with deferred_signals():
            registration = tracker.register(trainer.trained_model(), result) if register and tracker.active else None
            tracker.finish(history)
    except BaseException as exc:
        if tracker.active:
            with deferred_signals():
                tracker.finish(history, status=end_status(exc))
        raise
    if registration is not None:
        result["registration"] = {
            k: getattr(registration, k) for k in ("name", "version", "alias", "champion", "model_uri")
        }
    return result
