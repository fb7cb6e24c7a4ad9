"""Static guards for the security rules: weights load only through safetensors or
torch.load(weights_only=True); no remote code; no pickle; local services bind to 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "spo_ray").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])


def calls(pattern: str) -> list[tuple[Path, str]]:
    """Each call of ``pattern`` in the sources, with its arguments (up to the closing paren)."""
    found = []
    for path in SOURCES:
        text = path.read_text()
        for match in re.finditer(pattern, text):
            depth, end = 0, match.end()
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            found.append((path, text[match.start() : end + 1]))
    return found


def test_every_torch_load_is_weights_only() -> None:
    loads = calls(r"\btorch\.load\(")
    assert loads, "the scan found no torch.load at all: the pattern is broken"
    for path, call in loads:
        assert "weights_only=True" in call, f"{path.relative_to(REPO)}: {call}"


def test_no_remote_code_and_no_pickle() -> None:
    for path in SOURCES:
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"\bpickle\.loads?\(", text), path


def test_local_services_bind_to_loopback() -> None:
    script = (REPO / "scripts" / "local_cluster.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in script and "--node-ip-address 127.0.0.1" in script
    assert "0.0.0.0" not in script
