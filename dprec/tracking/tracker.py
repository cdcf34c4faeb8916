"""One MLflow run of a training: config, per-epoch curves, test metrics, system metrics, plots, grids.

Every rank builds a tracker; only rank 0's is enabled and writes (DESIGN §5)::

    tracker = RunTracker(enabled=rank == 0)
    tracker.start(cfg.as_dict(), run_name="lightgcn", experiment="dprec-default",
                  resume_run_id=None, deepspeed_config=ds_json, feature_manifest=manifests)
    trainer.fit(observer=lambda row: tracker.log_epoch(row, step=row["epoch"]))
    tracker.log_test(result["test"], result["best_epoch"], valid=result["valid"])
    tracker.register(trainer.trained_model(), result)   # dprec.tracking.registry: pyfunc + aliases
    tracker.finish(result["history"])

Every per-epoch value is logged at ``step = epoch``, so a resumed run (``resume_run_id``)
continues the same curves at later steps. :func:`dprec.tracking.fit.tracked_fit` does all of this.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from dprec.tracking.plots import csv_text, grid_bar_png, markdown_table, training_curve_png
from dprec.tracking.registry import Registration, register_model
from dprec.tracking.store import ensure_experiment, metric_name, tracking_uri

if TYPE_CHECKING:
    from dprec.training.loop import TrainedModel

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value; the YAML artifact keeps the whole value


def numeric_items(row: Mapping[str, Any], prefix: str = "", skip: Sequence[str] = ()) -> dict[str, float]:
    """The finite-or-not numeric values of ``row`` (bools and strings dropped) under legal names."""
    return {
        metric_name(prefix + key): float(value)
        for key, value in row.items()
        if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"train.lr": "0.001", ...}``; lists become JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:MAX_PARAM_LENGTH]
    return out


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder whose files are uploaded as artifacts, then deleted."""
    with tempfile.TemporaryDirectory(prefix="dprec-mlflow-") as tmp:
        yield Path(tmp)


def _read_json_or_dict(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    return json.loads(Path(source).read_text(encoding="utf-8"))


class RunTracker:
    """One MLflow run of a training; a no-op when ``enabled`` is False (ranks other than 0)."""

    def __init__(self, enabled: bool = True, uri: str | None = None) -> None:
        self.enabled = enabled
        self.uri = uri or tracking_uri()
        self.run_id: str | None = None
        """The MLflow run id once started (kept after ``finish``); None on a disabled tracker."""
        self.active = False
        """True between ``start`` and ``finish`` on an enabled tracker: the only state in which it writes."""
        self.client = MlflowClient(self.uri) if enabled else None

    def start(
        self,
        cfg: Mapping[str, Any],
        run_name: str,
        experiment: str,
        resume_run_id: str | None = None,
        deepspeed_config: Mapping[str, Any] | str | Path | None = None,
        feature_manifest: Mapping[str, Any] | str | Path | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str | None:
        """Open (or, with ``resume_run_id``, reopen) the run and log config, DeepSpeed config and manifest.

        Returns the run id (None on a disabled tracker). A resumed run keeps its id; params
        that changed since are not re-logged (MLflow forbids it) but listed in the tag
        ``dprec.params_changed_on_resume``.
        """
        if not self.enabled:
            return None
        mlflow.set_tracking_uri(self.uri)
        system = importlib.util.find_spec("psutil") is not None
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system)
        else:
            experiment_id = ensure_experiment(experiment, self.client, self.uri)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, log_system_metrics=system)
        self.run_id = run.info.run_id
        self.active = True
        params = flatten(cfg)
        with scratch_dir() as folder:
            (folder / "run_config.yaml").write_text(yaml.safe_dump(dict(cfg), sort_keys=False), encoding="utf-8")
            if deepspeed_config is not None:
                ds = _read_json_or_dict(deepspeed_config)
                params.update(flatten(ds, "deepspeed."))
                (folder / "deepspeed_config.json").write_text(json.dumps(ds, indent=2) + "\n", encoding="utf-8")
            self.client.log_artifacts(self.run_id, str(folder), "config")
        if feature_manifest is not None:
            with scratch_dir() as folder:
                manifest = _read_json_or_dict(feature_manifest)
                (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
                self.client.log_artifacts(self.run_id, str(folder), "features")
        self._log_params(params, resumed=bool(resume_run_id))
        run_tags = {"dprec.resumed": "true"} if resume_run_id else {}
        run_tags.update(tags or {})
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in run_tags.items()])
        return self.run_id

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        """Every numeric value of one history row (loss parts, ``valid_*`` metrics, timings) at ``step``."""
        if self.active:
            self._log_metrics(numeric_items(row, skip=("epoch",)), step)

    def log_test(self, metrics: Mapping[str, float], best_epoch: int, valid: Mapping[str, float] | None = None) -> None:
        """Test metrics of the best validation epoch as ``test_*`` (step = best epoch); best valid as ``best_valid_*``."""
        if not self.active:
            return
        values = numeric_items(metrics, prefix="test_") | numeric_items(valid or {}, prefix="best_valid_")
        values["best_epoch"] = float(best_epoch)
        self._log_metrics(values, best_epoch)
        self.client.set_tag(self.run_id, "best_epoch", str(best_epoch))

    def register(
        self, trained: TrainedModel, result: Mapping[str, Any], unknown_user: str = "error"
    ) -> Registration | None:
        """Log ``trained`` into this run as a pyfunc and register it (see :mod:`dprec.tracking.registry`)."""
        if not self.active:
            return None
        return register_model(trained, result, run_id=self.run_id, unknown_user=unknown_user, uri=self.uri)

    def log_grid(
        self,
        rows: Sequence[Mapping[str, Any]],
        label: str = "variant",
        metric: str = "test_recall@20",
        name: str = "ablation",
    ) -> None:
        """An experiment grid's table (``grid/<name>.md`` and ``.csv``) and a bar chart of ``metric`` per ``label``."""
        if not self.active:
            return
        if not rows:
            raise ValueError("log_grid: no rows")
        missing = [i for i, row in enumerate(rows) if label not in row or metric not in row]
        if missing:
            raise ValueError(
                f"log_grid: row {missing[0]} lacks {label!r} or {metric!r}; keys are {sorted(rows[missing[0]])}"
            )
        with scratch_dir() as folder:
            (folder / f"{name}.md").write_text(markdown_table(rows), encoding="utf-8")
            (folder / f"{name}.csv").write_text(csv_text(rows), encoding="utf-8")
            grid_bar_png(rows, label, metric, folder / f"{name}.png")
            self.client.log_artifacts(self.run_id, str(folder), "grid")

    def finish(self, history: Sequence[Mapping[str, Any]], status: str = "FINISHED") -> None:
        """Log the training curve (``plots/training_curve.png``) and ``history.csv``; end the run with ``status``."""
        if not self.active:
            return
        if history:
            with scratch_dir() as folder:
                training_curve_png(history, folder / "training_curve.png")
                self.client.log_artifacts(self.run_id, str(folder), "plots")
            self.client.log_text(self.run_id, csv_text(history), "history.csv")
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        else:
            self.client.set_terminated(self.run_id, status)
        self.active = False

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, timestamp, step) for k, v in values.items()])

    def _log_params(self, params: Mapping[str, str], resumed: bool) -> None:
        existing = self.client.get_run(self.run_id).data.params if resumed else {}
        changed = {k: [existing[k], v] for k, v in params.items() if k in existing and existing[k] != v}
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        self.client.log_batch(self.run_id, params=new)
        if changed:
            self.client.set_tag(self.run_id, "dprec.params_changed_on_resume", json.dumps(changed)[:MAX_PARAM_LENGTH])
