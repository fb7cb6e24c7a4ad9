"""Evaluation in the paper's format (spo_ray/evaluation.py, jobs/evaluate.py).

Fast: the aesthetic head's released key layout and its errors, config errors, missing inputs failing
before any cluster resource. Slow: one `ray job submit` of jobs/evaluate.py on tiny SD1.5 with a random
LoRA as the tuned model and the tiny CLIP behind PickScore / CLIP / aesthetic: the table (markdown,
CSV, MLflow), skipped scorers named, grids of the documented size, determinism and base != tuned.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from spo_ray.cli import main as cli_main
from spo_ray.config import ConfigError, TrainConfig
from spo_ray.evaluation import (
    GenerationWorker,
    ModelSpec,
    load_eval_config,
    prepare_evaluation,
    resolve_model_spec,
)
from spo_ray.scorers import AestheticHead, AestheticScorer, load_aesthetic_head
from spo_ray.spm import CheckpointLoadError
from tests.conftest import submit_job

RELEASED_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
PROMPTS = ["a red apple on a table", "a lighthouse at dusk", "a cat wearing a hat", "an old stone bridge"]


def _random_head(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AestheticHead(width).state_dict()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tuned model (a seeded random LoRA on the tiny UNet, exported as the SPO job exports it), a prompt
    file and an aesthetic head over the tiny CLIP's embeddings."""
    from spo_ray.export import export_policy
    from spo_ray.model_loading import load_diffusion_model
    from spo_ray.tiny import ensure_tiny_clip
    from spo_ray.training import add_lora

    root = tmp_path_factory.mktemp("eval-inputs")
    model = load_diffusion_model("tiny:sd15", "sd15", components=("unet",))
    add_lora(model.unet, TrainConfig(lora_rank=4, seed=1))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gaussian init leaves B = 0 (a no-op adapter): make every LoRA weight random
        for name, param in model.unet.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    export_policy(model.unet, kind="sd15", lora=True, directory=root / "run" / "final")
    width = json.loads((ensure_tiny_clip() / "config.json").read_text())["projection_dim"]
    torch.save(_random_head(width), root / "head.pth")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "HPS_v2_compressed.pt").write_bytes(b"")  # configured, but the hpsv2 package is not installed
    return {"final": root / "run" / "final", "run": root / "run", "head": root / "head.pth",
            "prompts": root / "prompts.txt", "hps": root / "HPS_v2_compressed.pt"}


# ----------------------------------------------------------------------------- fast


def test_aesthetic_head_released_layout_and_errors(tmp_path, inputs):
    state = _random_head(768)
    assert set(state) == RELEASED_KEYS  # sac+logos+ava1-l14-linearMSE.pth's keys
    assert tuple(state["layers.0.weight"].shape) == (1024, 768) and tuple(state["layers.7.weight"].shape) == (1, 16)
    torch.save(state, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    x = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    reference = AestheticHead(768)
    reference.load_state_dict(state)
    expected = reference.eval()(x)
    for file in ("head.pth", "head.safetensors"):
        head = load_aesthetic_head(tmp_path / file)
        assert head.input_dim == 768 and not head.training
        torch.testing.assert_close(head(x), expected)
    # The input width comes from the weights: a head over the tiny CLIP's 16-wide embeddings loads too.
    assert load_aesthetic_head(inputs["head"]).input_dim == 16

    renamed = {k.replace("layers.7.", "layers.8."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointLoadError) as err:
        load_aesthetic_head(tmp_path / "renamed.pth")
    assert "missing" in str(err.value) and "layers.7.weight" in str(err.value)
    assert "unexpected" in str(err.value) and "layers.8.weight" in str(err.value)
    wrong = {**state, "layers.2.weight": torch.zeros(128, 512)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointLoadError, match=r"shape mismatch.*layers\.2\.weight"):
        load_aesthetic_head(tmp_path / "wrong.pth")
    # A 768-wide head over a CLIP that projects to 16: named, not silently broadcast.
    with pytest.raises(ValueError, match="takes 768-wide embeddings.*projects to 16"):
        AestheticScorer("tiny", tmp_path / "head.pth")
    scores = AestheticScorer("tiny", inputs["head"]).score(torch.rand(2, 3, 64, 64) * 2 - 1, ["a", "b"], 0)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_config_errors_are_listed_before_anything_runs():
    with pytest.raises(ConfigError, match=r"unknown config key 'sampling.num_step' \(did you mean 'sampling.num_steps'"):
        load_eval_config("eval-tiny", overrides=["sampling.num_step=4"])
    with pytest.raises(ConfigError) as err:
        load_eval_config("eval-tiny", overrides=[
            "sampling.num_steps=0", "sampling.eta=-1", "sampling.seeds=[1, 1]", "base_name=a b", "tuned.x/y=/tmp",
            "run.device=tpu",
        ])
    message = str(err.value)
    for key in ("sampling.num_steps", "sampling.eta", "sampling.seeds", "base_name", "'x/y'", "run.device"):
        assert key in message, key
    with pytest.raises(ConfigError, match="unknown evaluation preset 'nope'.*eval-paper.*eval-tiny"):
        load_eval_config("nope")
    with pytest.raises(ConfigError, match="data.prompt_file must be set"):
        load_eval_config("eval-paper")
    cfg = load_eval_config("eval-paper", overrides=["data.prompt_file=demo", "tuned.a=/x", "tuned.b=/y"])
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.model_names) == (20, 5.0, ["base", "a", "b"])


def test_checkpoints_of_a_run_are_models_and_a_curve(tmp_path):
    """checkpoints_of=<run dir>: every checkpoint holding a diffusers LoRA (written through the
    engines' save_checkpoint export, in training order) and final/ become tuned models the input
    checks accept; the results are also written as a curve over training rounds."""
    from spo_ray.checkpointing import RunProgress, save_checkpoint
    from spo_ray.evaluation.report import write_over_training
    from spo_ray.export import checkpoint_lora_exporter, export_policy
    from spo_ray.model_loading import load_diffusion_model
    from spo_ray.training import add_lora

    model = load_diffusion_model("tiny:sd15", "sd15", components=("unet",))
    add_lora(model.unet, TrainConfig(lora_rank=4, seed=1))
    weights = {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
    run = tmp_path / "run"
    for position in (10, 2):  # written out of order: the models follow the recorded positions
        save_checkpoint(run, RunProgress(position=position), weights=weights, optimizer={},
                        export=checkpoint_lora_exporter(model.unet, kind="sd15", lora=True))
    export_policy(model.unet, kind="sd15", lora=True, directory=run / "final")
    cfg = load_eval_config("eval-tiny", overrides=[f"checkpoints_of={run}"])
    assert cfg.model_names == ["base", "round-0000002", "round-0000010", "final"]
    assert [spec.name for spec in prepare_evaluation(cfg).specs] == cfg.model_names  # each loads as a LoRA export

    stats = {name: {"n": 8, "pickscore": {"mean": float(i), "std": 0.5, "n": 8}} for i, name in enumerate(cfg.model_names)}
    csv_path, png_path = write_over_training(tmp_path, stats, ["pickscore"], "base", final_round=12)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["model"], r["pickscore_mean"]) for r in rows] == [
        ("0", "base", "0.0"), ("2", "round-0000002", "1.0"), ("10", "round-0000010", "2.0"), ("12", "final", "3.0")]
    assert Image.open(png_path).format == "PNG"

    with pytest.raises(ConfigError, match="no such run directory"):
        load_eval_config("eval-tiny", overrides=[f"checkpoints_of={tmp_path / 'nowhere'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint with a LoRA"):
        load_eval_config("eval-tiny", overrides=[f"checkpoints_of={tmp_path / 'empty'}"])


def test_missing_inputs_fail_up_front(tmp_path, inputs, capsys):
    # Tuned models resolve from a run's final/, the run directory, or a full-UNet export.
    assert resolve_model_spec("spo", str(inputs["run"])) == ModelSpec(
        "spo", "lora", str(inputs["final"]), "pytorch_lora_weights.safetensors"
    )
    (tmp_path / "full" / "unet").mkdir(parents=True)
    (tmp_path / "full" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert resolve_model_spec("ft", str(tmp_path / "full")).kind == "unet"
    (tmp_path / "empty").mkdir()
    base = ["--preset", "eval-tiny", f"run.output_dir={tmp_path / 'out'}", "tracking.enabled=false"]
    cases = {
        f"{tmp_path / 'nowhere'} does not exist": [f"tuned.spo={tmp_path / 'nowhere'}"],
        "holds neither a LoRA export": [f"tuned.spo={tmp_path / 'empty'}"],
        "prompt file not found": [f"data.prompt_file={tmp_path / 'missing.txt'}"],
        "scorers.aesthetic_head: file": [f"scorers.aesthetic_head={tmp_path / 'no-head.pth'}"],
        "unknown config key 'scorers.pickscore'": ["scorers.pickscore=tiny"],
    }
    for expected, overrides in cases.items():
        assert cli_main(["evaluate", *base, *overrides]) == 2, expected
        assert expected in capsys.readouterr().err, expected
    assert not (tmp_path / "out").exists()  # nothing was started or written
    plan = prepare_evaluation(load_eval_config("eval-tiny", overrides=[f"scorers.hpsv2_checkpoint={inputs['hps']}"]))
    assert plan.metrics == ["pickscore", "clip"]
    assert "hpsv2" in plan.skipped["hpsv2"] and "not importable" in plan.skipped["hpsv2"]
    assert plan.skipped["aesthetic"] == "scorers.aesthetic_head not set"


# ----------------------------------------------------------------------------- the job


def _read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
@pytest.mark.extended
def test_evaluate_job_writes_table_grids_and_mlflow(ray_cluster, tmp_path, inputs):
    out = tmp_path / "out"
    overrides = [
        f"run.output_dir={out}", "sampling.num_steps=4", f"data.prompt_file={inputs['prompts']}",
        f"tuned.spo={inputs['final']}", f"scorers.aesthetic_head={inputs['head']}",
        f"scorers.hpsv2_checkpoint={inputs['hps']}", "sampling.batch_size=8",
    ]
    proc = submit_job(ray_cluster, "jobs/evaluate.py", "--preset", "eval-tiny", *overrides)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout.lower()
    run_dir = out / "eval-tiny"
    # Skipped scorers are named, with the reason, in the log and under the table.
    assert "skipped: HPSv2 - package 'hpsv2' is not importable" in proc.stdout
    assert "skipped: ImageReward - scorers.imagereward_checkpoint and scorers.imagereward_med_config not set" in proc.stdout
    assert "16/16 images generated and scored" in proc.stdout

    available = ["pickscore", "aesthetic", "clip"]
    md = (run_dir / "results.md").read_text()
    header = "| model | n | PickScore | HPSv2 | ImageReward | Aesthetic | CLIP |"
    assert header in md and "skipped: HPSv2" in md and "skipped: ImageReward" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line != header]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "spo"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "8"  # 4 prompts x 2 seeds
        assert cells[3] == cells[4] == "-"  # HPSv2, ImageReward skipped
        for cell in (cells[2], cells[5], cells[6]):
            assert math.isfinite(float(cell.split("±")[0])), row
    with (run_dir / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["base", "spo"]
    for r in table:
        assert r["n"] == "8" and r["hpsv2_mean"] == "" and r["imagereward_mean"] == ""
        assert all(math.isfinite(float(r[f"{m}_mean"])) and float(r[f"{m}_std"]) >= 0 for m in available)
    with (run_dir / "scores.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 16

    # Grids: base above tuned per seed; tracking.image_grid's size for 4 prompts x (2 seeds x 2 models).
    images = {p.relative_to(run_dir / "images").as_posix(): _read_png(p) for p in (run_dir / "images").rglob("*.png")}
    assert len(images) == 16
    h, w, _ = images["base/00000_0.png"].shape
    grid = Image.open(run_dir / "grids" / "base_vs_spo.png")
    grid.verify()
    assert Image.open(run_dir / "grids" / "base_vs_spo.png").size == (4 * (w + 2) + 2, 4 * (h + 2) + 2)
    # The tuned model differs from the base on the same seeds.
    assert any(not np.array_equal(images[f"base/{pid:05d}_{s}.png"], images[f"spo/{pid:05d}_{s}.png"])
               for pid in range(4) for s in (0, 1))

    # MLflow: eval/<model>/<metric> in the default sqlite store of the output directory.
    from mlflow.tracking import MlflowClient

    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")  # one store per output dir
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["spo_ray.kind"] == "evaluation"
    for model, r in zip(("base", "spo"), table, strict=True):
        for metric in available:
            assert run.data.metrics[f"eval/{model}/{metric}"] == pytest.approx(float(r[f"{metric}_mean"]))
        assert f"eval/{model}/hpsv2" not in run.data.metrics

    # Determinism: the base images again, in this process (a second run, no Ray, no LoRA attached), with
    # the same seeds, batch composition and thread count as the job's actor (OMP_NUM_THREADS=1: CPU
    # kernels sum in a thread-dependent order): identical pixels.
    cfg = load_eval_config("eval-tiny", overrides=overrides)
    plan = prepare_evaluation(cfg)
    rows = [r for r in plan.rows(cfg.sampling.seeds) if r["model"] == "base"]
    worker = GenerationWorker(cfg.to_dict(), [dataclasses.asdict(plan.specs[0])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = worker({k: np.array([r[k] for r in rows]) for k in rows[0]})["image"]
    finally:
        torch.set_num_threads(threads)
    for r, image in zip(rows, again, strict=True):
        assert np.array_equal(image, images[f"base/{r['prompt_id']:05d}_{r['seed']}.png"]), r
