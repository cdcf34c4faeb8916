"""A trainer's ``fit`` inside an MLflow run: config, curves, test metrics, model registration (DESIGN §5).

Every rank calls :func:`tracked_fit`; only rank 0's tracker writes. The run id is kept in the
fit state, so the checkpoints of a DeepSpeed run carry it and a resumed fit (``state`` from
``DeepSpeedTrainer.resume``) continues the same MLflow run at later steps. On a failure the run
ends as ``FAILED`` with the history so far, and the exception propagates.
"""

from __future__ import annotations

from typing import Any

from dprec.tracking.tracker import RunTracker
from dprec.training.loop import FitState, Trainer


def tracked_fit(
    trainer: Trainer,
    state: FitState | None = None,
    register: bool = True,
    deepspeed_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``trainer.fit`` (from ``state`` when resuming) tracked in MLflow, the model registered unless ``register``
    is False.

    Returns the fit result with ``tracking_run_id`` and, when registered, ``registration``
    (name, version, alias, champion, model_uri).
    """
    state = state if state is not None else FitState()
    tracker = RunTracker(enabled=trainer.rank == 0)
    tracker.start(
        trainer.cfg.as_dict(),
        run_name=trainer.cfg.model["name"],
        experiment=f"dprec-{trainer.ds.name}",
        resume_run_id=state.tracking_run_id,
        deepspeed_config=deepspeed_config,
        feature_manifest=trainer.feature_manifests or None,
    )
    state.tracking_run_id = tracker.run_id
    try:
        result = trainer.fit(state=state, observer=lambda row: tracker.log_epoch(row, step=row["epoch"]))
        tracker.log_test(result["test"], result["best_epoch"], valid=result["valid"])
        registration = tracker.register(trainer.trained_model(), result) if register and tracker.active else None
    except BaseException:
        tracker.finish(state.history, status="FAILED")
        raise
    tracker.finish(result["history"])
    result["tracking_run_id"] = tracker.run_id
    if registration is not None:
        result["registration"] = {
            k: getattr(registration, k) for k in ("name", "version", "alias", "champion", "model_uri")
        }
    return result
