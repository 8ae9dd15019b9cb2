"""mlflow tracking through ``MlflowClient`` (no global fluent state).

The default store is ``sqlite:///mlflow.db`` in the working directory (mlflow 3 refuses a
bare ``./mlruns`` file store); artifacts of a local sqlite store go to ``mlartifacts/``
beside the database file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from imgx3d.errors import Imgx3dError

PARAM_MAX_CHARS = 500  # mlflow's limit on a param value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` → ``{'a.b': 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute.

    mlflow caches its store per URI string, so a relative path would keep pointing at the
    first working directory a process used.
    """
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _artifact_location(uri: str, experiment: str) -> str | None:
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


_OPEN_ATTEMPTS = 5


def _lost_a_race(err: Exception) -> bool:
    """True for the errors of two processes creating the same sqlite store or experiment at once."""
    text = str(err).lower()
    return "already exists" in text or "database is locked" in text


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.lock`` while opening a sqlite store: mlflow creates and migrates its tables
    on first use, and two processes doing that at once corrupt the migration (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; Tracker still retries
        fcntl = None
    if fcntl is None or not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri[len("sqlite:///"):] + ".lock", "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Tracker:
    """One mlflow run: params, metrics, tags and artifacts.

    Args:
        uri: tracking URI.
        experiment: experiment name (created if missing).
        run_name: display name of a new run.
        tags: tags of a new run (method, dataset, split, seed).
        run_id: continue this existing run instead of creating one (resume).
    """

    def __init__(self, uri: str, experiment: str, run_name: str = "", tags: dict[str, str] | None = None,
                 run_id: str | None = None):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        for name in ("alembic", "mlflow"):  # their INFO lines (db migrations) are noise to a user
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = uri = resolve_uri(uri)
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                with _store_lock(uri):
                    self.client = MlflowClient(tracking_uri=uri)
                    self.run_id = self._open_run(experiment, run_name, tags, run_id)
                break
            except Imgx3dError:
                raise
            except Exception as err:  # mlflow raises many types for an unreachable or broken store
                if attempt + 1 < _OPEN_ATTEMPTS and _lost_a_race(err):
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise Imgx3dError(f"mlflow tracking URI '{uri}' unusable ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]}); start the server, fix --tracking-uri, "
                                  "or pass --no-track") from None

    def _open_run(self, experiment: str, run_name: str, tags: dict[str, str] | None, run_id: str | None) -> str:
        """Create the experiment if missing; return a new run's id, or reopen ``run_id``."""
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=_artifact_location(self.uri, experiment))
        if run_id:
            run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(exp_id, run_name=run_name or None, tags=tags or {}).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log short scalar params (long values are truncated to mlflow's limit)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        batch = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in params.items() if k not in existing]
        for start in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (NaNs are skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace(" ", "_"), float(v), now, step) for k, v in metrics.items() if v == v]
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished (or FAILED / KILLED)."""
        self.client.set_terminated(self.run_id, status=status)


class NullTracker:
    """Stands in for :class:`Tracker` when tracking is off."""

    run_id = None

    def log_params(self, params: dict[str, Any]) -> None:
        """No-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """No-op."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """No-op."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """No-op."""

    def end(self, status: str = "FINISHED") -> None:
        """No-op."""


def download_run_checkpoint(run_id: str, uri: str, dst: Path) -> Path:
    """Fetch ``checkpoint/best.pt`` of an mlflow run into ``dst``."""
    from mlflow.artifacts import download_artifacts

    try:
        return Path(download_artifacts(run_id=run_id, artifact_path="checkpoint/best.pt", dst_path=str(dst),
                                       tracking_uri=resolve_uri(uri)))
    except Exception as err:
        raise Imgx3dError(f"run '{run_id}' at '{uri}': no checkpoint/best.pt artifact ({type(err).__name__}); "
                          "pass --tracking-uri of the run's store or --checkpoint PATH") from None
