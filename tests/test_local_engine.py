"""The in-process engine end to end through ``spo-ray train`` (cli.main): accounting, metrics,
exports that diffusers loads (LoRA and full UNet), exact resume, and early clear errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spo_ray import cli
from spo_ray.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint, load_trainable_weights
from spo_ray.components import load_model
from spo_ray.config import load_config
from spo_ray.export import LORA_WEIGHT_NAME
from spo_ray.preflight import InputError
from spo_ray.tiny import ensure_tiny_pipeline
from spo_ray.training import setup_policy

CPU = torch.device("cpu")


def _train(preset: str, output_dir: Path, *overrides: str) -> tuple[Path, dict]:
    rc = cli.main(["train", "--preset", preset, f"run.output_dir={output_dir}", "run.progress=false", *overrides])
    assert rc == 0
    cfg = load_config(preset, overrides=[f"run.output_dir={output_dir}", *overrides])
    run_dir = cfg.run_dir
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path, kind: str = "step") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _check_accounting(summary: dict, *, prompts: int, segments: int) -> dict:
    acc = summary["accounting"]
    assert summary["accounting_problems"] == []
    assert acc["prompts"] == prompts
    assert acc["scoring_events"] == prompts * segments
    assert acc["scoring_events"] == acc["kept"] + acc["rejected"]
    assert acc["kept"] == acc["trained"] and acc["dropped_rank_balance"] == 0
    assert acc["kept"] > 0
    assert acc["skipped_steps"] == 0
    return acc


def _check_steps(run_dir: Path, acc: dict, rounds: set[int]) -> list[dict]:
    steps = _metrics(run_dir)
    assert len(steps) == acc["optimizer_steps"] > 0
    assert {s["round"] for s in steps} == rounds
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) and not s["skipped"] for s in steps)
    assert sum(s["num_transitions"] for s in steps) == acc["transitions_trained"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    return steps


def _unet_inputs(kind: str, unet) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    kwargs: dict = {"encoder_hidden_states": ehs}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    return (x, torch.tensor([501, 201])), kwargs


def _check_lora_export(kind: str, run_dir: Path) -> None:
    """diffusers' load_lora_weights takes the export, changes the output, and gives OUR policy."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    final_dir = run_dir / "final"
    assert (final_dir / LORA_WEIGHT_NAME).is_file()
    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = pipeline_cls.from_pretrained(str(ensure_tiny_pipeline(kind)), **extra)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return pipe("a red fox in the snow", num_inference_steps=2, generator=gen, output_type="latent").images

    base = generate()
    pipe.load_lora_weights(str(final_dir))
    tuned = generate()
    assert torch.isfinite(tuned).all()
    assert (tuned - base).abs().max() > 1e-4

    # the loaded LoRA is exactly the trained policy (names, rank and alpha scale all right)
    cfg = load_config(f"tiny-{kind}")
    model = load_model(cfg, CPU, components=("unet",))
    setup_policy(model.unet, cfg.train)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    _, weights, _ = load_checkpoint(ckpt)
    load_trainable_weights(model.unet, weights, source=str(ckpt))
    args, kwargs = _unet_inputs(kind, model.unet)
    with torch.no_grad():
        ours = model.unet(*args, **kwargs).sample
        theirs = pipe.unet(*args, **kwargs).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_train_sd15_lora(tmp_path: Path) -> None:
    run_dir, summary = _train("tiny-sd15", tmp_path, "run.max_rounds=2", "data.max_prompts=8")
    assert summary["engine"] == "in-process" and summary["position"] == 2 and summary["policy_version"] == 2
    assert summary["stopped_by"] is None
    acc = _check_accounting(summary, prompts=8, segments=16)
    assert acc["transitions_trained"] == acc["trained"]  # one transition per SD1.5 segment
    _check_steps(run_dir, acc, {0, 1})
    rounds = _metrics(run_dir, "round")
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(0 <= r["kept_fraction"] <= 1 for r in rounds)
    assert [p.name for p in list_checkpoints(run_dir)] == ["round-0000002"]
    _check_lora_export("sd15", run_dir)


def test_train_sdxl_lora(tmp_path: Path) -> None:
    run_dir, summary = _train(
        "tiny-sdxl", tmp_path, "run.max_rounds=1", "data.max_prompts=4", "run.checkpoint_every_rounds=1"
    )
    acc = _check_accounting(summary, prompts=4, segments=4)
    assert acc["transitions_trained"] == 4 * acc["trained"]  # segments of 1 + 3 inner transitions
    _check_steps(run_dir, acc, {0})
    _check_lora_export("sdxl", run_dir)


def test_train_full_finetuning_exports_a_unet(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    run_dir, summary = _train(
        "tiny-sd15", tmp_path, "train.lora=false", "train.learning_rate=1e-3", "run.max_rounds=1",
        "data.max_prompts=4", "run.checkpoint_every_rounds=1",
    )
    acc = _check_accounting(summary, prompts=4, segments=16)
    _check_steps(run_dir, acc, {0})
    unet_dir = run_dir / "final" / "unet"
    assert (unet_dir / "config.json").is_file()
    assert not (run_dir / "final" / LORA_WEIGHT_NAME).exists()
    tuned = UNet2DConditionModel.from_pretrained(str(unet_dir))
    base = UNet2DConditionModel.from_pretrained(str(ensure_tiny_pipeline("sd15") / "unet"))
    tuned_state, base_state = tuned.state_dict(), base.state_dict()
    assert tuned_state.keys() == base_state.keys()
    changed = [k for k in base_state if not torch.equal(tuned_state[k], base_state[k])]
    assert len(changed) > len(base_state) // 2
    # the export is the trained policy: it equals the checkpointed weights
    _, weights, _ = load_checkpoint(latest_checkpoint(run_dir))
    assert weights.keys() == tuned_state.keys()
    assert all(torch.equal(weights[k], tuned_state[k]) for k in weights)


RESUME = ["run.name=resume", "data.max_prompts=8", "train.epochs=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    """Four rounds without a stop (the reference of both resume tests)."""
    return _train("tiny-sd15", tmp_path_factory.mktemp("a"), *RESUME, "run.checkpoint_every_rounds=2", "run.max_rounds=4")


def _assert_same_as_uninterrupted(dir_b: Path, summary_b: dict, uninterrupted: tuple[Path, dict], resumed_at: int) -> None:
    dir_a, summary_a = uninterrupted
    assert summary_a["position"] == summary_b["position"] == 4
    assert summary_a["policy_version"] == summary_b["policy_version"] == 4
    assert summary_a["accounting"] == summary_b["accounting"]  # counters carried over the restart
    steps_a, steps_b = _metrics(dir_a), _metrics(dir_b)
    # resumed, not restarted: the rounds before the stop were trained once
    assert [s["round"] for s in steps_a] == [s["round"] for s in steps_b]
    assert [s["step"] for s in steps_a] == [s["step"] for s in steps_b]
    late_a = [s for s in steps_a if s["round"] >= resumed_at]
    late_b = [s for s in steps_b if s["round"] >= resumed_at]
    assert late_a and {s["round"] for s in late_a} == set(range(resumed_at, 4))
    for a, b in zip(late_a, late_b, strict=True):
        assert a["num_transitions"] == b["num_transitions"]
        for key in ("loss", "grad_norm", "ratio_win", "score_win", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    lora_a = load_file(str(dir_a / "final" / LORA_WEIGHT_NAME))
    lora_b = load_file(str(dir_b / "final" / LORA_WEIGHT_NAME))
    assert lora_a.keys() == lora_b.keys() and lora_a
    for key in lora_a:
        torch.testing.assert_close(lora_b[key], lora_a[key], atol=1e-5, rtol=1e-5)


def test_resume_is_exact(tmp_path: Path, uninterrupted) -> None:
    common = [*RESUME, "run.checkpoint_every_rounds=2"]
    _, first = _train("tiny-sd15", tmp_path / "b", *common, "run.max_rounds=2")
    assert first["position"] == 2
    dir_b, summary_b = _train("tiny-sd15", tmp_path / "b", *common, "run.max_rounds=4")
    _assert_same_as_uninterrupted(dir_b, summary_b, uninterrupted, resumed_at=2)


def test_checkpoints_hold_a_diffusers_lora(uninterrupted) -> None:
    """Every checkpoint of a LoRA run holds the LoRA in diffusers' format (listed in its manifest):
    the last one's equals final/, and a pipeline loads it with load_lora_weights(<checkpoint>)."""
    from spo_ray.checkpointing import MANIFEST

    dir_a, _ = uninterrupted
    checkpoints = list_checkpoints(dir_a)
    assert [load_checkpoint(p)[0].position for p in checkpoints] == [2, 4]
    for path in checkpoints:
        assert LORA_WEIGHT_NAME in json.loads((path / MANIFEST).read_text())["files"]
    last, final = (load_file(str(d / LORA_WEIGHT_NAME)) for d in (checkpoints[-1], dir_a / "final"))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_tiny_pipeline("sd15")), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(checkpoints[0]))  # the round-2 checkpoint, as it is
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    assert loaded and all(torch.isfinite(v).all() for v in loaded.values())


def test_resume_modes_fork_finished_and_never(tmp_path: Path, uninterrupted, capsys) -> None:
    """run.resume: a checkpoint of another run starts a fork that trains on exactly as that run
    did (in a new MLflow run); a finished run re-submitted says so and runs nothing; `never`
    refuses a directory that holds a run; a bad path is a clear error."""
    dir_a, summary_a = uninterrupted
    at_2 = next(p for p in list_checkpoints(dir_a) if load_checkpoint(p)[0].position == 2)
    fork_args = [*RESUME, "run.name=fork", f"run.resume={at_2}", "run.checkpoint_every_rounds=2", "run.max_rounds=4"]
    dir_f, summary_f = _train("tiny-sd15", tmp_path, *fork_args)
    assert summary_f["accounting"] == summary_a["accounting"] and summary_f["position"] == 4
    assert summary_f["mlflow_run_id"] != summary_a["mlflow_run_id"]
    late_a = [s for s in _metrics(dir_a) if s["round"] >= 2]
    steps_f = _metrics(dir_f)
    assert [s["round"] for s in steps_f] == [s["round"] for s in late_a]  # only the rounds after the fork point
    for a, f in zip(late_a, steps_f, strict=True):
        assert f["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
    lora_a, lora_f = (load_file(str(d / "final" / LORA_WEIGHT_NAME)) for d in (dir_a, dir_f))
    for key in lora_a:
        torch.testing.assert_close(lora_f[key], lora_a[key], atol=1e-5, rtol=1e-5)

    capsys.readouterr()
    metrics_before = (dir_f / "metrics.jsonl").read_bytes()
    assert cli.main(["train", "--preset", "tiny-sd15", f"run.output_dir={tmp_path}", "run.progress=false", *fork_args]) == 0
    assert "already finished: nothing was run" in capsys.readouterr().out
    assert (dir_f / "metrics.jsonl").read_bytes() == metrics_before

    base = ["train", "--preset", "tiny-sd15", f"run.output_dir={tmp_path}", *RESUME, "run.name=fork"]
    assert cli.main([*base, "run.resume=never"]) == 2
    assert f"run.resume=never but {dir_f} already holds a run" in capsys.readouterr().err
    assert cli.main([*base, "run.name=fork2", f"run.resume={tmp_path / 'nowhere'}"]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "fork2").exists()


def test_ctrl_c_checkpoints_after_the_round_and_the_resume_is_exact(tmp_path: Path, uninterrupted) -> None:
    """SIGINT in the middle of a run (no periodic checkpoints): the round finishes, a checkpoint is
    written, the process says where and exits 130; resuming from it equals the uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "spo_ray", "train", "--preset", "tiny-sd15", f"run.output_dir={tmp_path}",
            *RESUME, "run.max_rounds=4", "run.checkpoint_every_rounds=0", "run.progress=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "resume" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and '"round"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "stopping after this round" in err and "resume with the same run.name" in err
    stopped = latest_checkpoint(tmp_path / "resume")
    assert stopped is not None and 1 <= (position := load_checkpoint(stopped)[0].position) < 4
    dir_b, summary_b = _train("tiny-sd15", tmp_path, *RESUME, "run.checkpoint_every_rounds=0", "run.max_rounds=4")
    _assert_same_as_uninterrupted(dir_b, summary_b, uninterrupted, resumed_at=position)


def test_missing_prompt_file_fails_before_loading_models(tmp_path: Path, monkeypatch, capsys) -> None:
    import spo_ray.local_engine as local_engine

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompt file was checked")

    monkeypatch.setattr(local_engine, "load_model", no_models)
    rc = cli.main(["train", "--preset", "tiny-sd15", f"run.output_dir={tmp_path}", "data.prompt_file=/nonexistent.txt"])
    assert rc == 2  # one line naming the file, as every command's user errors
    err = capsys.readouterr().err
    assert err.startswith("spo-ray: ") and "/nonexistent.txt" in err and "Traceback" not in err
    assert not (tmp_path / "tiny-sd15").exists()
    with pytest.raises(InputError, match="/nonexistent.txt"):  # the preflight's error, for library use
        local_engine.run_in_process(load_config("tiny-sd15", overrides=[
            f"run.output_dir={tmp_path}", "data.prompt_file=/nonexistent.txt"]))


def test_unknown_key_exits_2(tmp_path: Path, capsys) -> None:
    rc = cli.main(["train", "--preset", "tiny-sd15", f"run.output_dir={tmp_path}", "train.learnin_rate=1e-3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.learnin_rate" in err and "train.learning_rate" in err
    assert not (tmp_path / "tiny-sd15").exists()
