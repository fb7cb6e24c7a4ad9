"""Chaos on a real local Ray cluster: kill a sampler actor, a scorer actor and a trainer worker
during one tiny run (each triggered by the run's own progress, not by sleeps) and check that the
run completes with exact accounting and that no pair is trained twice.

- a dead sampler/scorer actor: Ray Data restarts it and redoes the task; the RoundLedger counts
  each scored prompt once (redone reports are counted apart);
- a dead trainer worker: Ray Train restarts the worker group (FailureConfig); it resumes from the
  latest checkpoint, the policy store rolls back to that version and the stream is rebuilt from
  the checkpoint's prompt position.
- a job stopped with `ray job stop` and re-submitted with the same run name on another trainer
  world size (full fine-tuning) resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import GCS_PORT, JOB_ENV, REPO

pytestmark = pytest.mark.slow


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


def test_killed_sampler_scorer_and_trainer_lose_nothing(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster)
    rounds = 5  # kills after rounds 1, 2 and 3; the trainer's resume at the position-2 checkpoint
    args = [
        "--preset", "tiny-sd15", f"run.output_dir={tmp_path}", f"run.max_rounds={rounds}",
        "run.checkpoint_every_rounds=2", "ray.num_samplers=2", "ray.num_trainers=2", "ray.max_policy_lag=1",
        "train.test_delay_s=1.0", "train.epochs=2", "tracking.enabled=false",  # MLflow: tests/test_ray_engine.py
    ]
    job_id = client.submit_job(
        entrypoint="python jobs/spo_sd15.py " + " ".join(args),
        runtime_env={"working_dir": str(REPO), "env_vars": JOB_ENV},
    )
    run_dir = tmp_path / "tiny-sd15"
    # Each kill waits for a progress counter: rounds trained so far (from the run's own log).
    plan = [(1, "SamplerWorker"), (2, "ScorerWorker"), (3, "RayTrainWorker")]
    killed: list[tuple[str, int]] = []
    deadline = time.time() + 900
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if plan and len(_rounds_logged(run_dir)) >= plan[0][0]:
            pid = _alive_actor_pid(plan[0][1])
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append((plan.pop(0)[1], pid))
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]
    assert [role for role, _ in killed] == ["SamplerWorker", "ScorerWorker", "RayTrainWorker"]

    summary = json.loads((run_dir / "summary.json").read_text())
    a = summary["accounting"]
    assert summary["accounting_problems"] == []
    assert a["prompts"] == rounds * 4
    assert a["scoring_events"] == a["kept"] + a["rejected"] == rounds * 4 * 16
    assert a["kept"] == a["trained"]
    # The trainer restart re-ran the rounds after its checkpoint: the record of each round is the
    # one whose weights survived. Across those, every kept pair was trained exactly once.
    last_by_round: dict[int, dict] = {}
    for record in _rounds_logged(run_dir):
        last_by_round[record["round"]] = record
    assert sorted(last_by_round) == list(range(rounds))
    trained_ids = [pid for r in last_by_round.values() for pid in r["pair_ids"]]
    assert len(trained_ids) == len(set(trained_ids)) == a["trained"]
    # The trainer was killed after round index 2 with the latest checkpoint at position 2: the new
    # worker group resumed there, redid round 2, and the ledger set round 2's first scoring apart.
    assert "trainer resumed from" in logs and "(prompt-plan position 2," in logs
    # metrics.jsonl holds each round once: the resume cut the records of the rounds it redid.
    assert [r["round"] for r in _rounds_logged(run_dir)] == list(range(rounds))
    assert summary["redone_after_restart"]["prompts"] >= 4


def test_stopped_full_finetuning_job_resumes_on_another_world_size(ray_cluster, tmp_path):
    """`ray job stop` after the first periodic checkpoint: the trainer finishes its round, writes a
    checkpoint there and stops (the job's RAY_JOB_STOP_WAIT_TIME_S leaves it the time); the same run
    name re-submitted with one trainer worker instead of two resumes at that checkpoint: full
    fine-tuning (DeepSpeed's fp32 masters and Adam moments, each rank's share, so the world size may
    change) finishes with exact accounting and every round once."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster)
    rounds = 4
    common = [
        "--preset", "tiny-sd15", f"run.output_dir={tmp_path}", f"run.max_rounds={rounds}", "run.checkpoint_every_rounds=2",
        "train.lora=false", "train.learning_rate=1e-4", "ray.num_samplers=2", "tracking.enabled=false",
    ]
    job_id = client.submit_job(
        entrypoint="python jobs/spo_sd15.py " + " ".join([*common, "ray.num_trainers=2", "train.test_delay_s=1.0"]),
        runtime_env={"working_dir": str(REPO), "env_vars": {**JOB_ENV, "RAY_JOB_STOP_WAIT_TIME_S": "240"}},
    )
    run_dir = tmp_path / "tiny-sd15"
    deadline = time.time() + 600
    while time.time() < deadline and not (run_dir / "checkpoints" / "round-0000002").is_dir():
        assert client.get_job_status(job_id) not in (JobStatus.FAILED, JobStatus.SUCCEEDED), client.get_job_logs(job_id)[-4000:]
        time.sleep(0.5)
    client.stop_job(job_id)
    while client.get_job_status(job_id) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(0.5)
    assert client.get_job_status(job_id) == JobStatus.STOPPED
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["interrupted"] and "with a checkpoint at position" in stopped["stopped_by"]
    position = stopped["position"]
    assert 3 <= position < rounds and (run_dir / "checkpoints" / f"round-{position:07d}").is_dir()

    job_id = client.submit_job(
        entrypoint="python jobs/spo_sd15.py " + " ".join([*common, "ray.num_trainers=1"]),
        runtime_env={"working_dir": str(REPO), "env_vars": JOB_ENV},
    )
    while client.get_job_status(job_id) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]
    assert "trainer resumed from" in logs and f"(prompt-plan position {position}," in logs
    summary = json.loads((run_dir / "summary.json").read_text())
    a = summary["accounting"]
    assert summary["accounting_problems"] == [] and summary["world_size"] == 1
    assert a["prompts"] == rounds * 4 and a["kept"] == a["trained"] > 0
    last_by_round = {r["round"]: r for r in _rounds_logged(run_dir)}
    assert sorted(last_by_round) == list(range(rounds))
    trained_ids = [pid for r in last_by_round.values() for pid in r["pair_ids"]]
    assert len(trained_ids) == len(set(trained_ids)) == a["trained"]
    assert (run_dir / "final" / "unet" / "config.json").is_file()  # a full UNet export
