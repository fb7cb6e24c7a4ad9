"""MLflow tracking: params, tags, per-step and per-round metrics, images, checkpoints, registration.

    tracker = RunTracker(cfg, engine="in-process")
    tracker.start(resume_run_id=None)      # fails fast (TrackingError) on an unreachable server
    tracker.log_metrics({"loss": 0.69}, step=1)
    tracker.log_image(image_grid(images, nrow=4), key="validation", step=global_step)
    tracker.end("FINISHED")

Where runs go: ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else one SQLite store per
output directory (``sqlite:///<run.output_dir>/mlflow.db``, artifacts in
``<run.output_dir>/mlartifacts``), so one ``mlflow ui --backend-store-uri ...`` shows every run there.

Everything goes through an ``MlflowClient`` with an explicit run id (never the global fluent
active run), so the tracker is safe beside other threads and other MLflow users in the process.
A resumed run continues the same MLflow run, and no metric step is logged twice: steps at or
below the last one a metric already has are skipped. Once started, a logging failure (a server
restart, a full disk) is a warning, not the end of a training run; after a few failures in a
row the tracker stops logging for the rest of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from spo_ray.config import SPOConfig

log = logging.getLogger("spo_ray.tracking")

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
MAX_TAG_VALUE = 8000
BATCH = 100  # params / tags per log_batch call (MLflow's limit)
IMAGE_FILE = re.compile(r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]")  # log_image(key=, step=) files
FAILURES_BEFORE_GIVING_UP = 3
_INVALID_NAME = re.compile(r"[^A-Za-z0-9_\-./ ]")


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI."""


# ----------------------------------------------------------------------------- helpers


STORE_NAME = "mlflow.db"
# Tells MLflow's UI these are model-training experiments (not its GenAI views of traces and evaluations).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_store(output_dir: str | Path) -> str:
    """The SQLite store every run under one output directory shares (so one ``mlflow ui`` and one
    ``spo-ray compare`` see them all)."""
    return f"sqlite:///{(Path(output_dir) / STORE_NAME).resolve()}"


def resolve_tracking_uri(cfg: SPOConfig) -> str:
    """``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else SQLite in ``run.output_dir``."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_store(cfg.run.output_dir)


def ui_command(uri: str) -> str:
    """The command that shows a run's store in the browser."""
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def metric_name(name: str) -> str:
    """A name MLflow accepts: characters outside ``[A-Za-z0-9_-./ ]`` become ``_``."""
    return _INVALID_NAME.sub("_", name)


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.learning_rate": "0.02", ...}; values stringified and truncated."""
    out: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{metric_name(str(key))}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, dotted + "."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else str(value)
        out[dotted] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


def git_commit(directory: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding this package, else "unknown"."""
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else "unknown"


def ray_job_ids() -> dict[str, str]:
    """The Ray job id (env ``RAY_JOB_ID`` or the runtime context) and the job submission id, if any."""
    out: dict[str, str] = {}
    if os.environ.get("RAY_JOB_ID"):
        out["ray_job_id"] = os.environ["RAY_JOB_ID"]
    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is not None:
        try:
            if ray.is_initialized():
                context = ray.get_runtime_context()
                out.setdefault("ray_job_id", context.get_job_id())
                submission = getattr(context, "get_submission_id", lambda: None)()
                if submission:
                    out["ray_submission_id"] = submission
        except Exception:  # noqa: BLE001 - tags are best effort
            pass
    if "ray_submission_id" not in out:
        with contextlib.suppress(Exception):  # set by `ray job submit` for the entrypoint process
            metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
            if metadata.get("job_submission_id"):
                out["ray_submission_id"] = metadata["job_submission_id"]
    return out


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """Few retries and a short timeout for MLflow's REST calls (unless the user set them)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    added = [key for key in wanted if key not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError when an http(s) tracking server does not answer (any HTTP answer counts)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(err).__name__}: {err}); start it, fix "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false"
        ) from err


# ----------------------------------------------------------------------------- the tracker


def logged_images(client: Any, run_id: str) -> list[tuple[str, int, str]]:
    """(key, step, artifact path) of every image ``log_image(key=, step=)`` gave the run, by step
    (MLflow names the files ``images/<key, / as ~>+step+<step>+timestamp+...png``)."""
    found = []
    for artifact in client.list_artifacts(run_id, "images"):
        match = IMAGE_FILE.match(Path(artifact.path).name)
        if match and artifact.path.endswith(".png"):
            found.append((match["key"].replace("~", "/"), int(match["step"]), artifact.path))
    return sorted(found, key=lambda item: (item[0], item[1]))


class RunTracker:
    """One MLflow run of a training job; every method is a no-op when tracking is disabled."""

    def __init__(self, cfg: SPOConfig, *, engine: str, background: bool = False):
        self.cfg = cfg
        self.engine = engine
        self.enabled = bool(cfg.tracking.enabled)
        self.tracking_uri = resolve_tracking_uri(cfg) if self.enabled else None
        self.client: Any = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._run_id: str | None = None
        self._last_step: dict[str, int] = {}
        self._logged_images: set[tuple[str, int]] = set()  # (key, step): a resumed run logs none twice
        self._failures = 0
        self._monitor: Any = None
        self._ended = False
        self._end_called = False
        # With ``background``, logging calls run in one thread, in order, off the training loop:
        # a slow server or a large image costs the loop nothing (``end`` waits for them).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow") if background else None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def active(self) -> bool:
        return self.enabled and self._run_id is not None and not self._ended

    # --------------------------------------------------------------- start

    def start(self, resume_run_id: str | None = None) -> str | None:
        """Create/get the experiment, start (or continue) the run, log params and tags."""
        if not self.enabled:
            return None
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = self.tracking_uri
        check_reachable(uri)
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _quick_http():
                self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                self.experiment_id = self._experiment(db)
                self._open_run(resume_run_id)
                self._log_config_and_tags()
        except Exception as err:
            self._abandon()
            if isinstance(err, (MlflowException, OSError, ConnectionError)) or type(err).__module__.startswith(
                ("requests", "urllib3", "sqlalchemy")
            ):
                raise TrackingError(f"MLflow tracking at {uri} failed while starting the run: {err}") from err
            raise
        self._start_system_metrics()
        log.info("MLflow run %s (%s) at %s", self._run_id, "resumed" if self.resumed else "new", uri)
        return self._run_id

    def _abandon(self) -> None:
        """A start that failed half-way: mark a created run FAILED (best effort) and forget it."""
        if self._run_id is not None and self.client is not None:
            with contextlib.suppress(Exception):
                self.client.set_terminated(self._run_id, status="FAILED")
        self._run_id = None

    def _experiment(self, db: Path | None) -> str:
        name = self.cfg.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # A SQLite store keeps its artifacts beside the database (MLflow's default would be
            # ./mlruns in the working directory, which a Ray job deletes afterwards).
            location = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
            try:
                return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            except Exception:  # noqa: BLE001 - created concurrently by another run
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

    def _open_run(self, resume_run_id: str | None) -> None:
        from mlflow.exceptions import MlflowException

        if resume_run_id:
            try:
                run = self.client.get_run(resume_run_id)
            except MlflowException as err:
                log.warning("MLflow run %s to resume is not in %s (%s); starting a new run",
                            resume_run_id, self.tracking_uri, err)
                run = None
            if run is not None and run.info.lifecycle_stage == "deleted":
                log.warning("MLflow run %s to resume was deleted; starting a new run", resume_run_id)
                run = None
            if run is not None:
                self._run_id = run.info.run_id
                self.resumed = True
                self.client.update_run(self._run_id, status="RUNNING")
                self._last_step = self._metric_steps(run)
                self._logged_images = {(key, step) for key, step, _ in logged_images(self.client, self._run_id)}
                return
        run = self.client.create_run(self.experiment_id, run_name=self.cfg.run.name)
        self._run_id = run.info.run_id

    def _metric_steps(self, run: Any) -> dict[str, int]:
        """The largest step each metric of ``run`` already has (so a resumed run logs none twice)."""
        latest = getattr(run.data, "_metric_objs", None)
        if latest is not None:  # the latest value of each key is the one at its largest step
            return {m.key: int(m.step) for m in latest}
        return {
            key: max((int(m.step) for m in self.client.get_metric_history(run.info.run_id, key)), default=-1)
            for key in run.data.metrics
        }

    def _log_config_and_tags(self) -> None:
        from mlflow.entities import Param, RunTag

        cfg = self.cfg
        params = flatten_config(cfg.to_dict())
        tags = {
            "preset": cfg.preset or "none",
            "base_model": cfg.model.pretrained,
            "model_kind": cfg.model.kind,
            "engine": self.engine,
            "git_commit": git_commit(),
            "run_dir": str(cfg.run_dir),
            **ray_job_ids(),
        }
        if tags["git_commit"] != "unknown":
            tags["mlflow.source.git.commit"] = tags["git_commit"]
        if self.resumed:
            # MLflow refuses to change a logged param: new keys are logged, changed values become tags.
            logged = self.client.get_run(self._run_id).data
            old = logged.params
            changed = {k: v for k, v in params.items() if k in old and old[k] != v}
            params = {k: v for k, v in params.items() if k not in old}
            resumes = int(logged.tags.get("resume_count", "0")) + 1
            tags["resume_count"] = str(resumes)
            for key, value in changed.items():
                tags[f"resume.{resumes}.{key}"] = f"{old[key]} -> {value}"[:MAX_TAG_VALUE]
        param_items = [Param(k, v) for k, v in params.items()]
        tag_items = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        for lo in range(0, len(param_items), BATCH):
            self.client.log_batch(self._run_id, params=param_items[lo : lo + BATCH])
        for lo in range(0, len(tag_items), BATCH):
            self.client.log_batch(self._run_id, tags=tag_items[lo : lo + BATCH])
        self.client.log_dict(self._run_id, cfg.to_dict(), "config.yaml")

    def _start_system_metrics(self) -> None:
        """CPU/memory/disk/network (and GPU, with pynvml) as ``system/*`` metrics; optional."""
        if not self.cfg.tracking.system_metrics:
            return
        try:
            import psutil  # noqa: F401 - MLflow's monitor needs it
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self._run_id, resume_logging=self.resumed, tracking_uri=self.tracking_uri
            )
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - system metrics are a nice-to-have
            log.info("MLflow system metrics are not available: %s", err)
            self._monitor = None

    # --------------------------------------------------------------- logging

    def _call(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run one logging call -> (ok, result); failures are warnings, and after a few in a row
        logging stops for the rest of the run."""
        if not self.active:
            return False, None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - a tracking hiccup must not kill training
            self._failures += 1
            log.warning("MLflow %s failed (%d in a row): %s", what, self._failures, err,
                        exc_info=self._failures == 1)
            if self._failures >= FAILURES_BEFORE_GIVING_UP:
                log.error("MLflow logging failed %d times in a row; no more tracking for run %s",
                          self._failures, self._run_id)
                self._ended = True
            return False, None
        self._failures = 0
        return True, result

    def _submit(self, what: str, fn: Callable[[], Any]) -> None:
        """``_call`` in the background thread when there is one, else now."""
        if self._pool is None:
            self._call(what, fn)
        elif self.active:
            self._pool.submit(self._call, what, fn)

    def flush(self) -> None:
        """Wait for every logging call submitted so far."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def last_step(self, key: str) -> int:
        """The largest step logged for metric ``key`` (-1 when none)."""
        return self._last_step.get(metric_name(key), -1)

    def log_metrics(self, metrics: Mapping[str, float | int | bool | None], step: int) -> None:
        """Log metrics at ``step``; None values and steps a metric already has are skipped."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if value is None:
                continue
            name = metric_name(key)
            if step <= self._last_step.get(name, -1):
                continue  # logged before (a resumed run redoing work past its checkpoint)
            batch.append(Metric(name, float(value), now, int(step)))
        if not batch:
            return
        for metric in batch:  # at submission: a failed batch is not retried either way
            self._last_step[metric.key] = metric.step
        self._submit("log_metrics", lambda: self.client.log_batch(self._run_id, metrics=batch))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None, *, wait: bool = False) -> None:
        """A file, or a directory's contents under ``artifact_path`` (``wait``: now, for files that
        may change or go away later, such as checkpoints the run prunes)."""
        path = Path(local_path)
        if path.is_dir():
            what, fn = "log_artifacts", lambda: self.client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            what, fn = "log_artifact", lambda: self.client.log_artifact(self._run_id, str(path), artifact_path)
        if wait:
            self.flush()
            self._call(what, fn)
        else:
            self._submit(what, fn)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image under ``key`` at ``step`` (the MLflow UI's image panel, with a step slider);
        a step the run already has for that key (a resumed run redoing a round) is not logged again."""
        if (key, step) in self._logged_images:
            return
        self._logged_images.add((key, step))
        self._submit("log_image", lambda: self.client.log_image(self._run_id, image, key=key, step=step, synchronous=True))

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        self._submit("log_dict", lambda: self.client.log_dict(self._run_id, dictionary, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit("log_text", lambda: self.client.log_text(self._run_id, text, artifact_file))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        self._submit("set_tags", lambda: self.client.log_batch(self._run_id, tags=items))

    def log_checkpoint(self, path: Path, *, upload: bool = False) -> None:
        """A checkpoint's path and file hashes (its manifest) as ``checkpoints/<name>.json`` and the
        ``checkpoint.latest`` tag; with ``upload`` its files too (now: the run prunes old ones)."""
        manifest = json.loads((path / "manifest.json").read_text())
        self.log_dict({"path": str(path), **manifest}, f"checkpoints/{path.name}.json")
        self.set_tags({"checkpoint.latest": str(path)})
        if upload:
            self.log_artifact(path, f"checkpoints/{path.name}", wait=True)

    def register_lora(self, local_dir: str | Path, artifact_path: str = "final") -> Any:
        """Log the exported policy directory; register it when ``tracking.register_model`` is set.

        MLflow 3's ``register_model("runs:/...")`` only takes MLmodel directories or logged
        models, so the version is created from the run's artifact location directly.
        """
        self.log_artifact(local_dir, artifact_path, wait=True)
        name = self.cfg.tracking.register_model
        if not name or not self.active:
            return None

        def register() -> Any:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name)
            except MlflowException as err:
                if "ALREADY_EXISTS" not in str(err.error_code):
                    raise
            source = self.client.get_run(self._run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
            return self.client.create_model_version(
                name, source=source, run_id=self._run_id,
                tags={"base_model": self.cfg.model.pretrained, "preset": self.cfg.preset or "none"},
            )

        _, version = self._call("register_model", register)
        if version is not None:
            log.info("registered %s version %s from run %s", name, version.version, self._run_id)
        return version

    def end(self, status: str = "FINISHED") -> None:
        """Stop system metrics and close the run with ``status`` (FINISHED, FAILED or KILLED)."""
        if not self.enabled or self._run_id is None or self._end_called:
            return
        self._end_called = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # what was submitted is logged before the run closes
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None
        self._ended = False  # closing the run is worth one more try even after failures
        self._call("set_terminated", lambda: self.client.set_terminated(self._run_id, status=status))
        self._ended = True
        log.info("MLflow run %s (%s); to see it: %s", self._run_id, status, ui_command(self.tracking_uri))
