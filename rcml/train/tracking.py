"""MLflow tracking on rank 0: params, per-step metrics, artifacts.

Default store: an embedded sqlite database in the run directory (``<out_dir>/mlflow.db``, artifacts in
``<out_dir>/mlartifacts``), opened with ``mlflow ui --backend-store-uri sqlite:///<out_dir>/mlflow.db``.
``MLFLOW_TRACKING_URI`` overrides it (a team server, for example). Other ranks get a no-op tracker.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rcml")


class NullTracker:
    uri = ""
    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def open_store(out_dir: Path, experiment: str) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` if one is configured, else at the embedded store in ``out_dir``
    (``mlflow.db``, artifacts in ``mlartifacts/``), and select ``experiment``. Returns the tracking URI.

    Whether a server is configured is decided before ``set_tracking_uri``: MLflow 3 exports the URI it is
    given to ``MLFLOW_TRACKING_URI``, so reading the environment afterwards always says "configured" and the
    embedded store's artifacts would go to ``<cwd>/mlruns``."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    out_dir = Path(out_dir).resolve()
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    uri = server or f"sqlite:///{out_dir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=None if server else (out_dir / "mlartifacts").as_uri())
    mlflow.set_experiment(experiment)
    return uri


def default_run_name(out_dir: Path) -> str:
    """``<run dir name>-<UTC time>``. MLflow's own generated names come from Python's ``random``, which the
    trainer seeds before the run starts, so every run of a seed would get the same name."""
    return f"{Path(out_dir).resolve().name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


class MlflowTracker(NullTracker):
    def __init__(self, out_dir: Path, experiment: str, run_name: str, resume_run_id: str = "") -> None:
        import mlflow

        self._mlflow = mlflow
        self.uri = open_store(out_dir, experiment)
        if resume_run_id:
            try:
                mlflow.get_run(resume_run_id)
            except mlflow.exceptions.MlflowException:
                log.warning("MLflow run %s of the checkpoint is not in %s (a copied checkpoint?): starting a new run",
                            resume_run_id, self.uri)
                resume_run_id = ""
        run = mlflow.start_run(run_id=resume_run_id or None,
                               run_name=None if resume_run_id else (run_name or default_run_name(out_dir)))
        self.run_id = run.info.run_id
        log.info("MLflow run %s at %s", self.run_id, self.uri)

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow params are immutable strings of <= 6000 chars; re-logging on resume must not fail.
        existing = self._mlflow.get_run(self.run_id).data.params
        fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
        items = list(fresh.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=subdir)
        elif path.exists():
            self._mlflow.log_artifact(str(path), artifact_path=subdir)

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def make_tracker(enabled: bool, is_main: bool, out_dir: Path, experiment: str, run_name: str,
                 resume_run_id: str = "") -> NullTracker:
    if not (enabled and is_main):
        return NullTracker()
    return MlflowTracker(out_dir, experiment, run_name, resume_run_id)


def flatten_ds_config(ds: dict[str, Any], prefix: str = "ds.") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in ds.items():
        if isinstance(value, dict):
            out.update(flatten_ds_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
