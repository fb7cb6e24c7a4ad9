"""Chaos on a real local Ray cluster, in one tiny full fine-tuning run: kill a sampler actor, a
scorer actor and a trainer worker (each triggered by the run's own progress, not by sleeps), then
stop the job with `ray job stop` and resume it on another world size; the run completes with
exact accounting and no pair trained twice.

- a dead sampler/scorer actor: Ray Data restarts it and redoes the task; the RoundLedger counts
  each scored prompt once (redone reports are counted apart);
- a dead trainer worker: Ray Train restarts the worker group (FailureConfig); it resumes from the
  latest checkpoint, the policy store rolls back to that version and the stream is rebuilt from
  the checkpoint's prompt position;
- a stopped job: the trainer finishes its round and checkpoints; the same run name resumes there
  on one rank instead of two (DeepSpeed's fp32 masters and Adam moments are saved whole by
  parameter name, each rank's share, so the world size may change). The resume runs in the
  in-process engine, which merges the two ranks' shards by parameter name as every resume does
  (checkpointing.load_checkpoint): one job instead
  of two, because each job costs ~1.5-2 minutes of start-up on the CI machine (Ray resuming a Ray
  checkpoint: the killed trainer worker above; Ray and in-process resuming each other's:
  tests/test_ray_engine.py; DeepSpeed's state across world sizes: tests/test_learner.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from spo_ray.config import load_config
from spo_ray.local_engine import run_in_process
from tests.conftest import GCS_PORT, JOB_ENV, REPO

pytestmark = [pytest.mark.slow, pytest.mark.extended]


def _rounds_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines()) if r["kind"] == "round"]


def _alive_actor_pid(role: str) -> int | None:
    from ray.util.state import list_actors

    for actor in list_actors(address=f"127.0.0.1:{GCS_PORT}", filters=[("state", "=", "ALIVE")], detail=True):
        if role in f"{actor.class_name} {actor.repr_name or ''}" and actor.pid:
            return actor.pid
    return None


def _wait_for(client, job_id, done: set) -> str:
    while (status := client.get_job_status(job_id)) not in done:
        time.sleep(0.5)
    return status


def test_killed_actors_and_a_stopped_job_lose_nothing_and_resume_on_another_world_size(ray_cluster, tmp_path, caplog):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster)
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    rounds = 6  # kills after rounds 1, 2 and 3 (the trainer resumes at the position-2 checkpoint); stop at 4
    common = [
        "--preset", "tiny-sd15", f"run.output_dir={tmp_path}", f"run.max_rounds={rounds}", "run.checkpoint_every_rounds=2",
        "train.lora=false", "train.learning_rate=1e-4", "train.epochs=2",  # the tiny preset's 16 prompts: 4 rounds an epoch
        "ray.num_samplers=2", "ray.max_policy_lag=1",
        "tracking.enabled=false",  # MLflow: tests/test_ray_engine.py
    ]
    job_id = client.submit_job(
        entrypoint="python jobs/spo_sd15.py " + " ".join([*common, "ray.num_trainers=2", "train.test_delay_s=1.0"]),
        runtime_env={"working_dir": str(REPO), "env_vars": {**JOB_ENV, "RAY_JOB_STOP_WAIT_TIME_S": "240"}},
    )
    run_dir = tmp_path / "tiny-sd15"
    # Each kill waits for a progress counter: rounds trained so far (from the run's own log); the
    # stop waits for the checkpoint at position 4, written by the restarted worker group.
    plan = [(1, "SamplerWorker"), (2, "ScorerWorker"), (3, "RayTrainWorker")]
    killed: list[tuple[str, int]] = []
    deadline = time.time() + 900
    while time.time() < deadline and client.get_job_status(job_id) not in ended:
        if plan and len(_rounds_logged(run_dir)) >= plan[0][0]:
            pid = _alive_actor_pid(plan[0][1])
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append((plan.pop(0)[1], pid))
        if not plan and (run_dir / "checkpoints" / "round-0000004").is_dir():
            client.stop_job(job_id)
            break
        time.sleep(0.5)
    status = _wait_for(client, job_id, ended)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.STOPPED, logs[-6000:]
    assert [role for role, _ in killed] == ["SamplerWorker", "ScorerWorker", "RayTrainWorker"]
    # The trainer was killed after round index 2 with the latest checkpoint at position 2: the new
    # worker group resumed there, redid round 2, and the ledger set round 2's first scoring apart.
    assert "trainer resumed from" in logs and "(prompt-plan position 2," in logs
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["interrupted"] and "with a checkpoint at position" in stopped["stopped_by"], (
        {k: v for k, v in stopped.items() if k in ("interrupted", "stopped_by", "position")}, logs[-4000:])
    assert stopped["redone_after_restart"]["prompts"] >= 4
    position = stopped["position"]
    assert 4 <= position < rounds and (run_dir / "checkpoints" / f"round-{position:07d}").is_dir()

    # The stopped run resumed on one rank (the in-process engine) to its end.
    overrides = [*common[2:], "ray.num_trainers=1", "run.progress=false"]
    with caplog.at_level(logging.INFO, logger="spo_ray"):
        summary = run_in_process(load_config("tiny-sd15", overrides=overrides))
    assert f"resumed from {run_dir / 'checkpoints' / f'round-{position:07d}'} (written by the ray engine)" in caplog.text
    a = summary["accounting"]
    assert summary["accounting_problems"] == [] and summary["position"] == rounds and not summary["interrupted"]
    assert a["prompts"] == rounds * 4
    assert a["scoring_events"] == a["kept"] + a["rejected"] == rounds * 4 * 16
    assert a["kept"] == a["trained"] > 0
    # The restart and the resume re-ran rounds after their checkpoints: the record of each round is
    # the one whose weights survived. Across those, every kept pair was trained exactly once, and
    # metrics.jsonl holds each round once (each resume cut the records of the rounds it redid).
    last_by_round = {r["round"]: r for r in _rounds_logged(run_dir)}
    assert sorted(last_by_round) == list(range(rounds))
    trained_ids = [pid for r in last_by_round.values() for pid in r["pair_ids"]]
    assert len(trained_ids) == len(set(trained_ids)) == a["trained"]
    assert [r["round"] for r in _rounds_logged(run_dir)] == list(range(rounds))
    assert (run_dir / "final" / "unet" / "config.json").is_file()  # a full UNet export
