"""MLflow tracking of the in-process engine and ``spo-ray compare``, against a real ``mlflow
server`` (SQLite backend, local artifact root) started for this module, and against the default
SQLite store in the run directory that ``mlflow ui`` serves.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from mlflow import MlflowClient
from PIL import Image

from spo_ray import cli
from spo_ray.config import load_config
from spo_ray.local_engine import run_in_process
from spo_ray.preflight import InputError
from spo_ray.rendering import image_grid, pair_strip
from spo_ray.tracking import (
    MAX_PARAM_VALUE,
    RunTracker,
    TrackingError,
    flatten_config,
    logged_images,
    metric_name,
)

EXPERIMENT = "spo-tracking-test"
COMMON = [  # 8 DDIM steps (6 branching segments) instead of 20 keep each round short
    "run.progress=false", "data.max_prompts=8", "sampling.num_steps=8", "sampling.divert_start_step=2", "train.epochs=2", "run.checkpoint_every_rounds=1",
    "tracking.log_pair_images_every=1", f"tracking.experiment={EXPERIMENT}", "tracking.upload_checkpoints_every=1",
]
STEP_METRICS = ("loss", "ratio_win", "ratio_lose", "clip_frac", "accuracy", "score_win", "score_lose",
                "score_margin", "lr", "grad_norm", "skipped")
ROUND_METRICS = ("mean_score", "kept_fraction", "policy_lag", "pairs_per_s", "busy/sampler", "busy/scorer",
                 "busy/trainer")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(args: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow <args>`` on a free port in its own process group; wait for /health."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = log_path.open("w")
    proc = subprocess.Popen(
        ["mlflow", *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow {args[0]} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return proc, uri
        except requests.RequestException:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"mlflow {args[0]} did not answer /health within 90 s: {log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own process group: uvicorn's worker goes with it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mlflow-server")
    proc, uri = _serve(
        ["server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
         str(root / "artifacts")],
        root / "server.log",
    )
    try:
        yield uri
    finally:
        _stop(proc)


def _cfg(output_dir: Path, *overrides: str):
    return load_config("tiny-sd15", overrides=[f"run.output_dir={output_dir}", *COMMON, *overrides])


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _png(client: MlflowClient, run_id: str, path: str, tmp: Path) -> Image.Image:
    local = Path(client.download_artifacts(run_id, path, str(tmp)))
    data = local.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def tracked(server, tmp_path_factory) -> dict:
    """Two rounds (one epoch of 8 prompts) of tiny SD1.5, tracked on the server, LoRA registered."""
    out = tmp_path_factory.mktemp("tracked")
    cfg = _cfg(out, "run.name=tracked", "run.max_rounds=2", f"tracking.tracking_uri={server}",
               "tracking.register_model=spo-tiny-lora")
    summary = run_in_process(cfg)
    return {"out": out, "summary": summary, "run_id": summary["mlflow_run_id"]}


def test_run_is_tracked(server, tracked, tmp_path) -> None:
    client = MlflowClient(tracking_uri=server)
    run_id, summary = tracked["run_id"], tracked["summary"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'tracked'")
    assert [r.info.run_id for r in found] == [run_id]
    run = found[0]
    assert run.info.status == "FINISHED"

    # the whole config as dotted params; tags
    params = run.data.params
    assert params["train.learning_rate"] == "0.02" and params["scorer.threshold"] == "0.3"
    assert params["run.max_rounds"] == "2" and params["scorer.kwargs.scale"] == "5000.0"
    assert params["train.lora_targets"] == '["to_q", "to_k", "to_v", "to_out.0"]'
    tags = run.data.tags
    assert tags["preset"] == "tiny-sd15" and tags["engine"] == "in-process"
    assert tags["base_model"] == "tiny:sd15" and tags["model_kind"] == "sd15"
    assert tags["git_commit"] and (tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40)
    assert "ray_job_id" not in tags  # no Ray here

    # per optimizer step: one entry per step, each step once
    steps = summary["accounting"]["optimizer_steps"]
    assert steps > 0
    for key in STEP_METRICS:
        assert _history(client, run_id, key) == list(range(1, steps + 1)), key
    margins = {m.step: m.value for m in client.get_metric_history(run_id, "score_margin")}
    wins = {m.step: m.value for m in client.get_metric_history(run_id, "score_win")}
    loses = {m.step: m.value for m in client.get_metric_history(run_id, "score_lose")}
    assert all(margins[s] == pytest.approx(wins[s] - loses[s], rel=1e-5) for s in margins)
    # per round: two rounds, logged at their last optimizer step
    for key in ROUND_METRICS:
        history = _history(client, run_id, key)
        assert len(history) == 2 and history == sorted(set(history)) and history[-1] == steps, key
    metrics = run.data.metrics
    assert 0 <= metrics["kept_fraction"] <= 1
    assert any(k.startswith("kept_fraction/t") for k in metrics)
    busy = [metrics[f"busy/{role}"] for role in ("sampler", "scorer", "trainer")]
    assert all(0 < b < 1 for b in busy) and sum(busy) <= 1.0 + 1e-6

    # images through log_image(key, step), at the rounds' steps: a validation grid every round (2
    # rounds: about 20 per run means every round) and so no extra one at the end, a win/lose strip
    # every round (log_pair_images_every=1)
    images = logged_images(client, run_id)
    round_steps = _history(client, run_id, "mean_score")
    assert [step for key, step, _ in images if key == "validation"] == round_steps
    assert [step for key, step, _ in images if key == "pairs"] == round_steps
    assert run.data.tags["mlflow.loggedImages"] == "True"  # the UI's image panel
    by_key = {key: path for key, _, path in images}  # the last of each
    grid = _png(client, run_id, by_key["validation"], tmp_path)  # base row above policy row, 4 prompts of 64 px
    assert grid.size == (4 * (64 + 2) + 2, 2 * (64 + 2) + 2)
    strip = _png(client, run_id, by_key["pairs"], tmp_path)
    assert strip.width >= 4 * 64 and 2 * 64 < strip.height < 2 * 64 + 60
    checkpoints = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert checkpoints == {f"checkpoints/round-000000{r}{ext}" for r in (1, 2) for ext in ("", ".json")}
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints/round-0000002")}
    assert {"weights-00000-of-00001.safetensors", "state.json", "optimizer-00000-of-00001.safetensors",
            "manifest.json"} <= files
    manifest = json.loads(Path(client.download_artifacts(run_id, "checkpoints/round-0000002.json", str(tmp_path))).read_text())
    shard = manifest["files"]["weights-00000-of-00001.safetensors"]
    assert manifest["path"].endswith("round-0000002") and len(shard["sha256"]) == 64
    assert run.data.tags["checkpoint.latest"] == manifest["path"]
    assert {a.path for a in client.list_artifacts(run_id, "final")} == {"final/pytorch_lora_weights.safetensors"}
    assert {"config.yaml", "summary.json"} <= {a.path for a in client.list_artifacts(run_id)}

    # the LoRA is a registered model version of this run
    versions = client.search_model_versions("name = 'spo-tiny-lora'")
    assert [v.run_id for v in versions] == [run_id]
    assert versions[0].source.endswith("/final")


def test_resume_continues_the_same_run(server, tracked) -> None:
    client = MlflowClient(tracking_uri=server)
    run_id = tracked["run_id"]
    before = _history(client, run_id, "loss")

    def resume(max_rounds: int) -> dict:
        cfg = _cfg(tracked["out"], "run.name=tracked", f"run.max_rounds={max_rounds}",
                   "run.checkpoint_every_rounds=2", f"tracking.tracking_uri={server}")
        summary = run_in_process(cfg)
        assert summary["mlflow_run_id"] == run_id and summary["position"] == max_rounds
        return summary

    # Round 3 ends the second call without a checkpoint (every 2 rounds now), so the third call
    # resumes from round 2 and redoes round 3, whose metrics are already logged: none twice.
    resume(3)
    assert len(_history(client, run_id, "mean_score")) == 3
    summary = resume(4)
    runs = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], filter_string="attributes.run_name = 'tracked'"
    )
    assert [r.info.run_id for r in runs] == [run_id]  # no second run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["run.max_rounds"] == "2"  # MLflow keeps the first value ...
    assert run.data.tags["resume_count"] == "2"
    assert run.data.tags["resume.1.run.max_rounds"] == "2 -> 3"  # ... and changes are tags
    assert run.data.tags["resume.2.run.max_rounds"] == "2 -> 4"
    loss = _history(client, run_id, "loss")
    assert len(loss) > len(before) and loss[: len(before)] == before
    assert loss == list(range(1, summary["accounting"]["optimizer_steps"] + 1))
    for key in (*STEP_METRICS, *ROUND_METRICS):
        history = _history(client, run_id, key)
        assert len(history) == len(set(history)) and history == sorted(history), f"{key}: {history}"
    assert len(_history(client, run_id, "mean_score")) == 4
    # one grid per round's step: the third call redid round 3, whose grid is not logged twice
    grid_steps = [step for key, step, _ in logged_images(client, run_id) if key == "validation"]
    assert grid_steps == _history(client, run_id, "mean_score")
    assert "checkpoints/round-0000004" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    state = (tracked["out"] / "tracked" / "checkpoints" / "round-0000004" / "state.json").read_text()
    assert run_id in state


def test_resumed_tracker_never_logs_a_step_twice(server, tmp_path) -> None:
    cfg = load_config("tiny-sd15", overrides=[
        f"run.output_dir={tmp_path}", "run.name=steps", f"tracking.tracking_uri={server}",
        "tracking.experiment=spo-tracking-steps", "tracking.system_metrics=false",
    ])
    first = RunTracker(cfg, engine="in-process")
    run_id = first.start()
    for step in range(1, 6):
        first.log_metrics({"loss": 1.0 / step, "eval/pick score (x)": step, "nothing": None}, step=step)
    first.log_metrics({"grad_norm": float("nan")}, step=1)
    first.end("FAILED")  # a crash after step 5, say with the last checkpoint at step 3
    second = RunTracker(cfg, engine="in-process")
    assert second.start(resume_run_id=run_id) == run_id
    assert second.last_step("loss") == 5 and second.last_step("eval/pick score (x)") == 5
    for step in range(4, 8):
        second.log_metrics({"loss": 10.0 + step}, step=step)
    second.end()
    client = MlflowClient(tracking_uri=server)
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6, 7]
    assert [m.value for m in loss][3:] == [0.25, 0.2, 16.0, 17.0]  # the first values of 4 and 5 stay
    run = client.get_run(run_id)
    assert "eval/pick score _x_" in run.data.metrics and "nothing" not in run.data.metrics
    assert math.isnan(client.get_metric_history(run_id, "grad_norm")[0].value)
    assert run.info.status == "FINISHED"


def test_compare_two_thresholds(server, tracked, tmp_path, capsys) -> None:
    cfg = _cfg(tmp_path / "runs", "run.name=threshold-0.5", "scorer.threshold=0.5", "run.max_rounds=1",
               f"tracking.tracking_uri={server}", "tracking.log_pair_images_every=0")
    other = run_in_process(cfg)["mlflow_run_id"]
    client = MlflowClient(tracking_uri=server)
    client.log_metric(tracked["run_id"], "eval/pickscore", 21.0)  # as an evaluation job would log
    client.log_metric(other, "eval/pickscore", 21.5)
    capsys.readouterr()
    out = tmp_path / "compare"
    rc = cli.main(["compare", "--experiment", EXPERIMENT, "--tracking-uri", server, "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert any(line.startswith("tracked ") and tracked["run_id"][:8] in line for line in lines), printed
    assert any(line.startswith("threshold-0.5 ") and other[:8] in line for line in lines), printed
    assert "loss final" in printed and "loss min" in printed and "mean_score max" in printed
    assert "scorer.threshold: tracked=0.3, threshold-0.5=0.5" in printed
    assert "eval/pickscore final" in printed  # eval/* metrics are always compared (as bars)
    for name in ("loss.png", "mean_score.png", "eval_pickscore.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert Image.open(out / name).size == (700, 400)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    comparisons = client.search_runs([experiment.experiment_id], filter_string="tags.`spo_ray.kind` = 'comparison'")
    assert len(comparisons) == 1 and comparisons[0].info.run_name.startswith("compare-")
    assert comparisons[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(comparisons[0].info.run_id, "plots")}
    assert {"plots/loss.png", "plots/mean_score.png", "plots/eval_pickscore.png"} <= logged
    text = client.download_artifacts(comparisons[0].info.run_id, "comparison.txt", str(tmp_path))
    assert "threshold-0.5" in Path(text).read_text()

    # by run ids, one metric
    rc = cli.main(["compare", "--runs", other, tracked["run_id"], "--metrics", "loss", "--tracking-uri", server,
                   "--out", str(tmp_path / "by-id")])
    printed = capsys.readouterr().out
    assert rc == 0 and "threshold-0.5" in printed and "mean_score" not in printed.split("params that differ")[0]
    assert (tmp_path / "by-id" / "loss.png").read_bytes().startswith(PNG_MAGIC)

    # no runs: a clear error, not a traceback
    rc = cli.main(["compare", "--experiment", "no-such-experiment", "--tracking-uri", server])
    assert rc == 1 and "no-such-experiment" in capsys.readouterr().err


def test_default_store_is_one_sqlite_per_output_dir(tmp_path, monkeypatch, capsys, caplog) -> None:
    """Two runs with different names under one output directory land in one store: one `mlflow ui`
    shows both, `spo-ray compare` with no URI compares both, and each run says how to open it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.INFO, logger="spo_ray")
    summaries = []
    for name in ("first", "second"):
        cfg = load_config("tiny-sd15", overrides=[
            f"run.output_dir={tmp_path}", f"run.name={name}", "run.progress=false", "run.max_rounds=1",
            "data.max_prompts=4", "sampling.num_steps=8", "sampling.divert_start_step=2",
        ])
        summaries.append(run_in_process(cfg))
    db = tmp_path / "mlflow.db"
    assert all(s["mlflow_tracking_uri"] == f"sqlite:///{db}" for s in summaries) and db.is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1" in caplog.text
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("spo-ray")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow's GenAI views
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(s["mlflow_run_id"] for s in summaries)
    assert {r.data.tags["preset"] for r in runs} == {"tiny-sd15"}
    summary = summaries[0]
    assert (tmp_path / "mlartifacts" / summary["mlflow_run_id"] / "artifacts" / "final").is_dir()
    monkeypatch.chdir(tmp_path.parent)
    rc = cli.main(["compare", "--output-dir", str(tmp_path), "--out", str(tmp_path / "compare")])
    table = capsys.readouterr().out
    assert rc == 0 and "first" in table and "second" in table

    # `mlflow ui` on that database serves the run
    proc, uri = _serve(["ui", "--backend-store-uri", f"sqlite:///{db}"], tmp_path / "ui.log")
    try:
        answer = requests.post(
            f"{uri}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment.experiment_id]}, timeout=10
        )
        assert answer.status_code == 200
        served = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
                  for r in answer.json()["runs"]}
        # both training runs and the comparison run `spo-ray compare` logged next to them
        comparisons = [run_id for run_id, tags in served.items() if tags.get("spo_ray.kind") == "comparison"]
        assert len(served) == 3 and len(comparisons) == 1
        assert set(served) - set(comparisons) == {s["mlflow_run_id"] for s in summaries}
    finally:
        _stop(proc)


def test_unreachable_server_fails_fast_before_models_load(tmp_path, monkeypatch) -> None:
    import spo_ray.local_engine as local_engine

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracking server was checked")

    monkeypatch.setattr(local_engine, "load_model", no_models)
    uri = f"http://127.0.0.1:{_free_port()}"
    cfg = _cfg(tmp_path, f"tracking.tracking_uri={uri}")
    started = time.time()
    with pytest.raises(InputError, match=f"{uri}.*unreachable") as err:  # the preflight's, as on Ray
        run_in_process(cfg)
    assert isinstance(err.value.__cause__, TrackingError)
    assert time.time() - started < 20
    assert not cfg.run_dir.exists()


def test_failure_after_start_marks_the_run_failed(server, tmp_path, monkeypatch) -> None:
    import spo_ray.local_engine as local_engine

    def broken(*args, **kwargs):
        raise RuntimeError("model store offline")

    monkeypatch.setattr(local_engine, "load_model", broken)
    cfg = _cfg(tmp_path, "run.name=broken", f"tracking.tracking_uri={server}")
    with pytest.raises(RuntimeError, match="model store offline"):
        run_in_process(cfg)
    client = MlflowClient(tracking_uri=server)
    runs = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], filter_string="attributes.run_name = 'broken'"
    )
    assert [r.info.status for r in runs] == ["FAILED"]


# ----------------------------------------------------------------------------- helpers, no server


def test_disabled_tracker_is_a_no_op(tmp_path) -> None:
    cfg = load_config("tiny-sd15", overrides=[f"run.output_dir={tmp_path}", "tracking.enabled=false"])
    tracker = RunTracker(cfg, engine="in-process")
    assert tracker.start() is None and tracker.run_id is None and not tracker.active
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_image(Image.new("RGB", (4, 4)), key="validation", step=1)
    tracker.end("FINISHED")
    assert not (tmp_path / "mlflow.db").exists()


def test_names_and_params() -> None:
    assert metric_name("kept_fraction/t1-250") == "kept_fraction/t1-250"
    assert metric_name("eval/pick score (x)") == "eval/pick score _x_"
    flat = flatten_config({"a": {"b": 1, "c": {}, "d": {"e": [1, 2]}}, "long": "x" * 7000})
    assert flat == {"a.b": "1", "a.c": "{}", "a.d.e": "[1, 2]", "long": "x" * (MAX_PARAM_VALUE - 3) + "..."}


def test_image_helpers() -> None:
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    images[0] = -1.0
    grid = image_grid(images, nrow=4)
    assert grid.size == (4 * 18 + 2, 2 * 18 + 2) and grid.mode == "RGB"
    assert grid.getpixel((2, 2)) == (0, 0, 0)  # -1 -> black, the first image's top-left corner
    assert grid.getpixel((0, 0)) == (255, 255, 255)  # padding
    strip = pair_strip(images[:3], images[3:], [2.5, 1.0, 3.25], [1.0, 0.5, 2.0], [701, 351, 0])
    assert strip.height > 2 * 16 and strip.width >= 3 * 16
    black = int((np.asarray(strip) == 0).all(axis=-1).sum())
    assert black >= 16 * 16  # the all-black first winner is in it (the labels add a few more)
