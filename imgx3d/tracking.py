"""mlflow tracking through ``MlflowClient`` (no global fluent state).

The default store is ``sqlite:///mlflow.db`` in the working directory (mlflow 3 refuses a
bare ``./mlruns`` file store); artifacts of a local sqlite store go to ``mlartifacts/``
beside the database file.

A tracking server that stops answering mid-run does not stop training: the first failure is
reported in one line, every later call is kept in memory and in a local JSON-lines file
(``keep_locally``), the server is tried again every ``RETRY_SECONDS``, and whatever was kept is
sent, in order, as soon as it answers (at the latest when the run ends).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
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
RETRY_SECONDS = 60.0  # while the server is away, how often a call tries it again


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
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self._local_path: Path | None = None
        self._monitor: Any = None
        self._pending: list[tuple[str, Any]] = []
        self._away_since: float | None = None
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

    def keep_locally(self, path: str | Path) -> None:
        """Where calls are written while the server does not answer (JSON lines)."""
        self._local_path = Path(path)

    def _send(self, op: str, payload: Any) -> None:
        """Perform a call, or keep it (in order) while the server is away."""
        pending, away_since = self._pending, self._away_since
        if away_since is not None and time.monotonic() - away_since < RETRY_SECONDS:
            self._keep(op, payload)
            return
        try:
            while pending:
                self._perform(*pending[0])
                pending.pop(0)
            self._perform(op, payload)
        except Exception as err:  # any transport or server error: keep going, keep the data
            if away_since is None:
                print(f"imgx3d: warning: mlflow at '{self.uri}' stopped answering ({type(err).__name__}); training "
                      f"goes on, tracking calls are kept{' in ' + str(self._local_path) if self._local_path else ''} "
                      "and sent when it answers again", file=sys.stderr)
            self._away_since = time.monotonic()
            self._keep(op, payload)
            return
        if away_since is not None:
            print(f"imgx3d: mlflow at '{self.uri}' answers again; the kept tracking calls were sent", file=sys.stderr)
            self._away_since = None

    def _keep(self, op: str, payload: Any) -> None:
        self._pending.append((op, payload))
        if self._local_path is not None:
            with open(self._local_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"run_id": self.run_id, "op": op, "payload": payload}, default=str) + "\n")

    def _perform(self, op: str, payload: Any) -> None:
        from mlflow.entities import Metric, Param

        if op == "params":
            existing = self.client.get_run(self.run_id).data.params
            batch = [Param(k, v) for k, v in payload.items() if k not in existing]
            for start in range(0, len(batch), 100):
                self.client.log_batch(self.run_id, params=batch[start:start + 100])
        elif op == "metrics":
            batch = [Metric(k, v, ts, step) for k, v, ts, step in payload]
            for start in range(0, len(batch), 500):
                self.client.log_batch(self.run_id, metrics=batch[start:start + 500])
        elif op == "tags":
            for key, value in payload.items():
                self.client.set_tag(self.run_id, key, value)
        elif op == "artifact":
            path, artifact_path = Path(payload[0]), payload[1]
            log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            log(self.run_id, str(path), artifact_path)
        elif op == "end":
            self.client.set_terminated(self.run_id, status=payload)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log short scalar params (long values are truncated to mlflow's limit)."""
        self._send("params", {k: str(v)[:PARAM_MAX_CHARS] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (NaNs are skipped)."""
        now = int(time.time() * 1000)
        self._send("metrics", [(k.replace(" ", "_"), float(v), now, step) for k, v in metrics.items() if v == v])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        self._send("tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder."""
        self._send("artifact", (str(path), artifact_path))

    def register_model(self, name: str, artifact_path: str) -> str | None:
        """Register the run's mlflow model at ``artifact_path`` as a new version of ``name``; its
        ``models:/NAME/VERSION`` URI, or None (with a warning) when the registry cannot take it."""
        try:
            if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
                self.client.create_registered_model(name)
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
            version = self.client.create_model_version(name, source, run_id=self.run_id).version
        except Exception as err:  # a store without a registry, or the server away
            print(f"imgx3d: warning: model '{name}' not registered at '{self.uri}' ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:200]}); register it later with mlflow.register_model("
                  f"'runs:/{self.run_id}/{artifact_path}', '{name}')", file=sys.stderr)
            return None
        self.set_tags({"registered_model": f"models:/{name}/{version}"})
        return f"models:/{name}/{version}"

    def monitor_system(self, seconds: float, resume: bool = False) -> None:
        """Record the machine's CPU, memory, disk and network use (and GPU utilisation and memory where
        ``nvidia-ml-py`` finds a GPU) as ``system/...`` metrics every ``seconds``, until :meth:`end`
        (mlflow's system metrics monitor, on this run; ``resume``: continue a resumed run's steps)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as err:  # psutil missing
            print(f"imgx3d: warning: no mlflow system metrics ({err}); pip install psutil, or set "
                  "tracking.system_metrics: false", file=sys.stderr)
            return
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=seconds, resume_logging=resume,
                                             tracking_uri=self.uri)
        self._monitor.start()

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished (or FAILED / KILLED), first sending anything kept while the server was away."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._away_since = None  # one last try, whatever the retry interval
        self._send("end", status)
        if self._pending:
            where = f"; they are in {self._local_path}" if self._local_path else ""
            print(f"imgx3d: warning: mlflow at '{self.uri}' still does not answer: {len(self._pending)} tracking "
                  f"call(s) of run {self.run_id} were not sent{where}", file=sys.stderr)


class NullTracker:
    """Stands in for :class:`Tracker` when tracking is off."""

    run_id = None

    def monitor_system(self, seconds: float, resume: bool = False) -> None:
        """No-op."""

    def keep_locally(self, path: str | Path) -> None:
        """No-op."""

    def log_params(self, params: dict[str, Any]) -> None:
        """No-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """No-op."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """No-op."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """No-op."""

    def register_model(self, name: str, artifact_path: str) -> str | None:
        """No-op."""
        return None

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
