"""Shared fixtures: one real local Ray cluster per test session (token auth on, 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = int(os.environ.get("SPO_TEST_DASHBOARD_PORT", "8299"))
GCS_PORT = int(os.environ.get("SPO_TEST_GCS_PORT", "6399"))
JOB_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # ray.train.report blocks ~1.5 s per call otherwise
    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions"),  # DeepSpeed's op compiles once
    "OMP_NUM_THREADS": "1",
}


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **JOB_ENV}


@pytest.fixture(scope="session")
def ray_cluster():
    """Start `ray start --head` on 127.0.0.1 for the session; yield the job API address."""
    env = _env()
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
    subprocess.run(
        [
            "ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(DASHBOARD_PORT), "--port", str(GCS_PORT), "--num-cpus", "8",
            "--disable-usage-stats",
        ],
        env=env, check=True, capture_output=True,
    )
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        yield address
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)


def submit_job(address: str, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`ray job submit` of a jobs/ script from the repository root (waits for the job to finish)."""
    runtime_env = json.dumps({"env_vars": JOB_ENV})
    cmd = [
        "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--runtime-env-json", runtime_env, "--", "python", script, *args,
    ]
    started = time.time()
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(f"[submit_job] {script} {' '.join(args)} took {time.time() - started:.0f}s rc={proc.returncode}\n")
    return proc
