"""One record of a run: the step and round records both engines write, and the one writer that
fans them out to ``metrics.jsonl``, MLflow and the console.

    run_log = RunLog(run_dir, tracker, resume_position=progress.position)
    run_log.steps(step_records)                       # one StepRecord per optimizer step
    run_log.round(round_record(...), mlflow_step=s)   # one record per round, same keys from both engines

metrics.jsonl holds each step and each round once, also after a resume from an older checkpoint:
opening the log for a resume cuts the records of the rounds the run is about to redo. MLflow
skips steps a metric already has (tracking.RunTracker), so it never has a step twice either.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_ray.accounting import Accounting

if TYPE_CHECKING:  # torch stays out of the processes that only log (the coordination actors)
    from spo_ray.learner import StepRecord

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Round-record keys that are not MLflow metrics (lists, the record's own bookkeeping).
NOT_METRICS = ("kind", "time", "pair_ids")


@dataclass
class RoundScores:
    """What the scorers saw in one round (from ``ScoringStats`` in process, the ledger on Ray)."""

    events: int = 0
    kept: int = 0
    rejected: int = 0
    nonfinite: int = 0
    score_sum: float = 0.0
    images: int = 0
    buckets: dict[str, tuple[int, int]] = field(default_factory=dict)  # timestep bucket -> (events, kept)

    @classmethod
    def from_stats(cls, stats: Any) -> RoundScores:
        """From a round's ``scoring.ScoringStats`` (the in-process engine scores a round at once)."""
        buckets = {b: (n, stats.kept_by_bucket.get(b, 0)) for b, n in stats.events_by_bucket.items()}
        return cls(stats.events, stats.kept, stats.rejected, stats.nonfinite, stats.score_sum, stats.images, buckets)


def round_record(
    *,
    round_index: int,
    epoch: int,
    prompts: int,
    policy_lag: int,
    scores: RoundScores,
    steps: list[StepRecord],
    pair_ids: list[int],
    transitions: int,
    seconds: float,
    wait_seconds: float,
    train_seconds: float,
    busy: Mapping[str, float],
    accounting: Accounting,
) -> dict[str, Any]:
    """The one round record (both engines): what was sampled, scored, kept and trained, and how long it took."""
    record: dict[str, Any] = {
        "kind": "round", "time": time.time(), "round": round_index, "epoch": epoch, "prompts": prompts,
        "policy_lag": policy_lag, "scoring_events": scores.events, "kept": scores.kept, "rejected": scores.rejected,
        "nonfinite": scores.nonfinite,
        "kept_fraction": scores.kept / max(scores.events, 1),
        "mean_score": scores.score_sum / max(scores.images, 1),
        "pairs": len(pair_ids), "transitions": transitions,
        "round_loss": sum(s.loss for s in steps) / len(steps) if steps else None,
        "optimizer_steps": len(steps),
        "pairs_per_s": len(pair_ids) / max(seconds, 1e-9), "round_seconds": seconds, "wait_seconds": wait_seconds,
        "busy/trainer": train_seconds / max(seconds, 1e-9),
    }
    for bucket, (events, kept) in sorted(scores.buckets.items()):
        record[f"kept_fraction/{bucket}"] = kept / max(events, 1)
    record.update({f"busy/{role}": value for role, value in busy.items()})
    record.update({f"accounting/{k}": v for k, v in accounting.to_dict().items()})
    record["pair_ids"] = sorted(pair_ids)
    return record


def cut_redone(path: Path, key: str, position: int) -> int:
    """Drop the metrics.jsonl records whose ``key`` (``round``, or ``step`` in SPM training) is >=
    ``position``, and lines a crash cut short: a resume redoes that work and writes them again."""
    if not path.is_file():
        return 0
    kept, cut = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            cut += 1
            continue
        if record.get(key, -1) >= position:
            cut += 1
        else:
            kept.append(line)
    if cut:
        path.write_text("".join(line + "\n" for line in kept))
        log.info("%s: cut %d record(s) of %ss >= %d (redone after the resume)", path.name, cut, key, position)
    return cut


class RunLog:
    """Writes step and round records to metrics.jsonl, MLflow (a ``RunTracker`` or None) and the log."""

    def __init__(self, run_dir: Path, tracker: Any = None, *, resume_position: int = 0, total_rounds: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker
        self.total_rounds = total_rounds
        cut_redone(self.path, "round", resume_position)

    def _append(self, records: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def steps(self, steps: list[StepRecord]) -> None:
        self._append([{"kind": "step", "time": time.time(), **s.to_dict()} for s in steps])
        if self.tracker is not None:
            for s in steps:
                values = s.to_dict()
                self.tracker.log_metrics({k: v for k, v in values.items() if k not in ("step", "round", "epoch")},
                                         step=s.step)

    def round(self, record: dict[str, Any], *, mlflow_step: int) -> None:
        self._append([record])
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in record.items() if k not in NOT_METRICS}, step=mlflow_step)
        loss = record["round_loss"]
        of = f"/{self.total_rounds}" if self.total_rounds else ""
        log.info(
            "round %d%s | prompts %d | pairs kept %d rejected %d | optimizer steps %d | loss %s | lag %d | pairs/s %.2f",
            record["round"] + 1, of, record["accounting/prompts"], record["accounting/kept"],
            record["accounting/rejected"], record["accounting/optimizer_steps"],
            "-" if loss is None or not math.isfinite(loss) else f"{loss:.4f}", record["policy_lag"], record["pairs_per_s"],
        )


def write_run_config(run_dir: Path, cfg: Any) -> None:
    """config.yaml holds the run's current config; what a resume changed is appended to
    config_history.jsonl (time and each changed setting, old and new). Written after the checks."""
    import yaml

    changes = resume_changes(cfg)
    if changes:
        with (Path(run_dir) / "config_history.jsonl").open("a") as f:
            f.write(json.dumps({"time": time.time(), "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Settings a resume may not change: they define the run's model, its pairs, its prompt plan and the
# shape of what the checkpoint holds. Everything else (learning rate and the other optimizer
# settings, max_rounds, epochs, batch sizes, checkpointing, tracking, resources) may change.
FROZEN_ON_RESUME = ("model.", "sampling.", "data.", "scorer.type", "scorer.clip_dir", "scorer.checkpoint",
                    "scorer.kwargs", "scorer.threshold", "scorer.dtype", "train.lora", "train.lora_rank",
                    "train.lora_alpha", "train.lora_targets", "train.seed", "train.beta", "train.clip_eps")


def resume_changes(cfg: Any, frozen: tuple[str, ...] = FROZEN_ON_RESUME) -> dict[str, tuple[Any, Any]]:
    """Settings that differ from the run's saved config.yaml when there is a checkpoint to resume
    (dotted key -> (saved, now)); empty for a new run. Raises ValueError listing the changes a
    resume may not make (``frozen``: dotted keys or prefixes), before anything is written."""
    import yaml

    from spo_ray.checkpointing import is_own_checkpoint, resume_checkpoint

    found = resume_checkpoint(cfg.run_dir, cfg.run.resume)
    if found is None:
        return {}
    own = is_own_checkpoint(cfg.run_dir, found)
    saved_file = (cfg.run_dir if own else Path(found).parent.parent) / "config.yaml"  # a fork: its source's
    if not saved_file.is_file():
        return {}
    saved, now = _flat(yaml.safe_load(saved_file.read_text()) or {}), _flat(cfg.to_dict())
    changes = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and k not in ("preset", "run.resume")}
    refused = [k for k in changes if k.startswith(frozen) or (own and k == "run.name")]
    if refused:
        listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ValueError(f"run {cfg.run.name} has a checkpoint and these settings cannot change across a resume: "
                         f"{listed} (start a new run.name for them)")
    return changes


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "kwargs":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO, in_ray_worker: bool = False) -> None:
    """INFO lines to stderr with time and module (every entry point and every Ray worker calls it;
    a second call changes nothing). A Ray Train worker's root logger already has Ray's plain
    handler, so there the ``spo_ray`` loggers get their own handler with this format (and stop
    propagating, or every line would print twice)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if not (in_ray_worker and _inside_a_ray_worker()):  # a role built in this process (tests) keeps the root's
        return
    package_log = logging.getLogger("spo_ray")
    package_log.setLevel(level)
    if not any(getattr(h, "spo_ray_handler", False) for h in package_log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.spo_ray_handler = True  # type: ignore[attr-defined]
        package_log.addHandler(handler)
        package_log.propagate = False


def _inside_a_ray_worker() -> bool:
    """Whether this process is a Ray worker (an actor or a task), not a driver or a plain process."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - an older or newer Ray without these: keep the root's handlers
        return False


def next_round_step(global_step: int, last_round_step: int) -> int:
    """The MLflow step of a round record: the round's last optimizer step; a round that trained
    nothing moves one step on, so no round metric has a step twice."""
    return global_step if global_step > last_round_step else last_round_step + 1


def end_of_run_summary(result: Mapping[str, Any]) -> str:
    """A few lines for a person at the end of a job: what was done, at what rate, how stale the
    pairs were, how busy each role was, and where the outputs are. The full record (telemetry of
    every actor, per-bucket counts) stays in ``summary.json``."""
    if "accounting" not in result:  # evaluation / SPM training: their scalar results
        return "\n".join(f"{key}: {value}" for key, value in result.items() if not isinstance(value, (dict, list)))
    a, seconds = result["accounting"], max(float(result.get("seconds") or 0.0), 1e-9)
    lines = ["already finished: nothing was run; the summary of the run as it finished:"] if result.get("already_finished") else []
    lines += [
        f"run {result['run_dir']} ({result.get('engine', '?')} engine): {a['prompts']} prompts, "
        f"{a['optimizer_steps']} optimizer steps ({a['skipped_steps']} skipped) in {seconds:.0f} s",
        f"pairs: scored {a['scoring_events']} = kept {a['kept']} + rejected {a['rejected']} + non-finite "
        f"{a.get('dropped_nonfinite', 0)}; trained {a['trained']} ({a['trained'] / seconds:.2f} pairs/s, "
        f"{a['dropped_rank_balance']} dropped for rank balance)",
    ]
    if "max_policy_lag_seen" in result:
        lines.append(f"policy lag: max {result['max_policy_lag_seen']} (policy version {result['policy_version']})")
    roles = (result.get("telemetry") or {}).get("roles") or {}
    busy = [f"{role} {info['busy_fraction']:.0%}" for role, info in roles.items() if info.get("busy_fraction") is not None]
    if busy:
        lines.append("busy: " + ", ".join(busy))
    lines.append(f"outputs in {result['run_dir']}: final/ (weights), summary.json (full record), {METRICS_FILE}")
    if result.get("mlflow_run_id"):
        lines.append(f"MLflow: run {result['mlflow_run_id']} at {result.get('mlflow_tracking_uri', '?')}")
    for problem in result.get("accounting_problems") or []:
        lines.append(f"ACCOUNTING PROBLEM: {problem}")
    return "\n".join(lines)


def finished_run(run_dir: Path, end: int) -> dict[str, Any] | None:
    """The summary of a run that already reached round ``end`` and was not stopped early, else
    None (a run to start or continue). A re-submitted finished run reports it instead of redoing
    its last rounds and re-exporting."""
    from spo_ray.checkpointing import latest_checkpoint, read_progress

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("stopped_by") or summary.get("position", -1) < end:
        return None
    own = latest_checkpoint(run_dir)
    if own is not None and read_progress(own).position > summary["position"]:
        return None
    return summary


def report_finished(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Log that the run is finished and what to change to train on; the stored summary."""
    log.info("run %s is finished (%d rounds done, outputs in %s): nothing to do; raise run.max_rounds to "
             "train on, or choose a new run.name for a new run", cfg.run.name, summary["position"], cfg.run_dir)
    return {**summary, "already_finished": True}
