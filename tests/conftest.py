"""Shared fixtures: one real local Ray cluster per test session (token auth on, 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray reads its auth mode once, when it is imported: clients in this test process (the job SDK,
# the state API) talk to a cluster with token authentication on.
os.environ["RAY_AUTH_MODE"] = "token"

REPO = Path(__file__).resolve().parents[1]
# Every fixed port of the test cluster moves by SPO_TEST_PORT_OFFSET, so two test sessions (two
# checkouts) can each run their own cluster on one machine.
_OFFSET = int(os.environ.get("SPO_TEST_PORT_OFFSET", "0"))
DASHBOARD_PORT = 8299 + _OFFSET
GCS_PORT = 6399 + _OFFSET
AGENT_PORT = 52399 + _OFFSET
CLIENT_PORT = 9001 + _OFFSET  # below the worker port range (10002-19999)
METRICS_PORT = 8399 + _OFFSET  # Prometheus endpoint of the node's metrics agent
JOB_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # ray.train.report blocks ~1.5 s per call otherwise
    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions"),  # DeepSpeed's op compiles once
    "OMP_NUM_THREADS": "1",
}


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **JOB_ENV}


def _wait_for_dashboard(address: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # answered (e.g. 401 without the token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {timeout:.0f} s")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real `ray start --head` on 127.0.0.1 for the session; yields the job API address.

    It runs with --block in its own process group and its own temp dir, so stopping it kills
    exactly this cluster (`ray stop` would kill every Ray process on the machine).
    """
    env = _env()
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    temp_dir = Path(f"/tmp/ray-spo-tests-{_OFFSET}" if _OFFSET else "/tmp/ray-spo-tests")
    proc = subprocess.Popen(
        [
            "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(DASHBOARD_PORT), "--port", str(GCS_PORT), "--num-cpus", "8",
            "--dashboard-agent-listen-port", str(AGENT_PORT), "--ray-client-server-port", str(CLIENT_PORT),
            "--metrics-export-port", str(METRICS_PORT), "--disable-usage-stats", "--temp-dir", str(temp_dir),
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        _wait_for_dashboard(address, proc)
        yield address
    finally:
        # `ray start --block` takes longer than this to exit on SIGTERM; the group kill ends it.
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


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
    if os.environ.get("SPO_TEST_JOB_LOGS"):  # a folder: each job's output kept, to read where its time went
        logs = Path(os.environ["SPO_TEST_JOB_LOGS"])
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{int(started)}-{Path(script).stem}.log").write_text(proc.stdout + proc.stderr)
    return proc


def scrape_once(run: str) -> dict[str, float]:
    """The test cluster's Prometheus endpoint now: each metric's value for ``run`` (summed over its
    series: roles, workers; a histogram by its ``_count``)."""
    import re
    import urllib.request

    line = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    found: dict[str, float] = {}
    for match in map(line.match, text.splitlines()):
        if match and f'run="{run}"' in match["labels"]:
            found[match["name"]] = found.get(match["name"], 0.0) + float(match["value"])
    return found


def scrape_ray_metrics(run: str, want: dict[str, float | None], timeout: float = 60.0) -> dict[str, float]:
    """Polls :func:`scrape_once` until every wanted metric is there and equals its wanted value
    (None: any value); Ray exports every ~10 s. Counters and histograms stay after the process
    that recorded them ends; Ray drops a gauge ~2 export intervals after its process stops
    reporting it, so gauges are read while the run is live."""
    deadline = time.time() + timeout
    while True:
        found = scrape_once(run)
        if all(k in found and (v is None or found[k] == v) for k, v in want.items()) or time.time() > deadline:
            return found
        time.sleep(2)
