"""cluster/rehearsal.sh: the KubeRay layout rehearsed on one machine, and each role on its node.

The script starts its own Ray cluster (a head with no work and one worker node per role group,
separate `ray start` processes with their own temp dir, ports and token), submits the tiny SD1.5
job with the roles pinned by custom resources, asks the state API where every actor ran (before
the nodes stop), writes placement.json, and stops only the processes it started. Here the test
re-checks that report and that nothing of the rehearsal cluster is left running.

Ports: SPO_REHEARSAL_GCS_PORT (6480) and SPO_REHEARSAL_DASHBOARD_PORT (8280, and the 5 ports
after it), so it never collides with the suite's shared cluster (conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "rehearsal.sh"
GCS_PORT = int(os.environ.get("SPO_REHEARSAL_GCS_PORT", "6480"))
DASHBOARD_PORT = int(os.environ.get("SPO_REHEARSAL_DASHBOARD_PORT", "8280"))

pytestmark = [pytest.mark.slow, pytest.mark.extended]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _processes_naming(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def test_rehearsal_each_role_runs_on_its_node():
    if shutil.which("ray") is None:
        pytest.skip("the ray CLI is not installed")
    busy = [p for p in (GCS_PORT, *range(DASHBOARD_PORT, DASHBOARD_PORT + 6)) if not _port_free(p)]
    assert not busy, (
        f"ports {busy} are in use; set SPO_REHEARSAL_GCS_PORT / SPO_REHEARSAL_DASHBOARD_PORT to free ones"
    )
    # A short path: Ray's unix sockets live under the temp dir (107-byte limit).
    work = Path(tempfile.mkdtemp(prefix="spo-rh-", dir="/tmp"))
    env = {
        **os.environ,
        "SPO_REHEARSAL_DIR": str(work),
        "SPO_REHEARSAL_GCS_PORT": str(GCS_PORT),
        "SPO_REHEARSAL_DASHBOARD_PORT": str(DASHBOARD_PORT),
    }
    env.pop("RAY_ADDRESS", None)
    try:
        started = time.time()
        proc = subprocess.run(
            ["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        seconds = time.time() - started
        sys.stderr.write(f"[rehearsal] took {seconds:.0f}s rc={proc.returncode}\n")
        log = proc.stdout[-6000:] + proc.stderr[-6000:]
        assert proc.returncode == 0, log
        assert "succeeded" in proc.stdout.lower(), log

        report = json.loads((work / "placement.json").read_text())
        assert report["problems"] == [], report["problems"]
        nodes = report["nodes"]
        role_node = {}
        for role in ("sampler", "scorer", "trainer"):
            (node,) = [n for n, roles in nodes.items() if roles == [role]]  # one node per role group
            role_node[role] = node
        assert len(nodes) == 4 and sum(1 for roles in nodes.values() if roles == []) == 1  # + the head
        actors = report["actors"]
        counts = {}
        for actor in actors:
            role = actor["role"]
            if role is not None:
                assert actor["node_id"] == role_node[role], actor
                counts[role] = counts.get(role, 0) + 1
        assert counts == {"sampler": 2, "scorer": 1, "trainer": 1}, counts
        sampler_names = {a["repr_name"] for a in actors if a["role"] == "sampler"}
        assert sampler_names == {"MapWorker(MapBatches(SamplerWorker))"}, sampler_names

        # The job really ran through: the run directory's summary and exact accounting.
        summary = json.loads((work / "outputs" / "rehearsal" / "summary.json").read_text())
        a = summary["accounting"]
        assert summary["accounting_problems"] == []
        assert a["prompts"] == 8 and a["scoring_events"] == a["kept"] + a["rejected"] > 0
        assert a["trained"] > 0 and summary["world_size"] == 1

        # Only the rehearsal's own processes were stopped, and all of them.
        deadline = time.time() + 15
        while _processes_naming(str(work / "ray")) and time.time() < deadline:
            time.sleep(0.5)
        assert _processes_naming(str(work / "ray")) == []
        assert _port_free(GCS_PORT) and _port_free(DASHBOARD_PORT)
    finally:
        shutil.rmtree(work, ignore_errors=True)
