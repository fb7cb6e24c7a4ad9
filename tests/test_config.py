"""Presets, YAML files and overrides; unknown keys and impossible values are clear errors."""

import pytest

from spo_ray.config import ConfigError, available_presets, config_from_dict, load_config


def test_paper_presets():
    sd15, sdxl = load_config("sd15"), load_config("sdxl")
    assert (sd15.train.lora_rank, sdxl.train.lora_rank) == (4, 64)
    assert (sd15.train.learning_rate, sdxl.train.learning_rate) == (6e-5, 1e-5)
    assert (sd15.sampling.prompts_per_round, sd15.train.train_batch_size, sd15.train.grad_accum_steps) == (40, 40, 1)
    assert (sdxl.sampling.prompts_per_round, sdxl.train.train_batch_size, sdxl.train.grad_accum_steps) == (8, 8, 2)
    assert (sd15.sampling.pool_size, sd15.sampling.num_inner_steps) == (4, 0)
    assert (sdxl.sampling.pool_size, sdxl.sampling.num_inner_steps) == (2, 3)
    assert (sd15.scorer.threshold, sdxl.scorer.threshold) == (0.3, 0.4)
    for cfg in (sd15, sdxl):
        assert cfg.train.max_grad_norm is None  # the reference never clipped
        assert cfg.train.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
        assert cfg.train.lora_alpha is None  # = rank
        assert (cfg.train.adam_beta1, cfg.train.adam_beta2, cfg.train.adam_weight_decay, cfg.train.adam_epsilon) == (
            0.9, 0.999, 1e-4, 1e-8)
        assert (cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.guidance_scale, cfg.sampling.divert_start_step) == (
            20, 1.0, 5.0, 4)
        assert (cfg.data.max_prompts, cfg.train.epochs, cfg.train.seed, cfg.train.beta, cfg.train.clip_eps) == (
            4000, 10, 42, 10.0, 0.1)
    assert sdxl.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert {"sd15", "sdxl", "tiny-sd15", "tiny-sdxl"} <= set(available_presets())
    assert not any(p.startswith(("eval-", "spm-")) for p in available_presets())
    with pytest.raises(ConfigError, match="spo-ray evaluate"):
        load_config("eval-tiny")


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1.0e-4\n  lora_rank: 8\n")
    cfg = load_config("sd15", config_file=f, overrides=["train.learning_rate=1e-5", "scorer.threshold=0.5"])
    assert cfg.train.learning_rate == 1e-5 and cfg.train.lora_rank == 8 and cfg.scorer.threshold == 0.5
    cfg2 = config_from_dict(cfg.to_dict())
    assert cfg2 == cfg
    assert cfg.run.output_dir.startswith("/")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lerning_rate=1", "unknown config key 'train.lerning_rate' (did you mean 'train.learning_rate'?)"),
        ("nope.x=1", "unknown config key 'nope"),
        ("sampling.pool_size=1", "pool_size (k) must be >= 2"),
        ("scorer.threshold=1.0", "threshold must be in [0, 1)"),
        ("scorer.threshold=-0.1", "threshold must be in [0, 1)"),
        ("sampling.divert_start_step=20", "divert_start_step must be in [0, num_steps=20)"),
        ("sampling.eta=0", "eta must be > 0"),
        ("train.learning_rate=abc", "'train.learning_rate' expects float"),
        ("train.lora_rank=2.5", "'train.lora_rank' expects int"),
        ("ray.zero_stage=4", "zero_stage must be 0, 1, 2 or 3"),
        ("model.kind=sd3", "model.kind must be"),
        ("train.max_grad_norm=0", "max_grad_norm must be > 0 or null"),
        ("scorer.type=spm", "scorer.clip_dir is required"),
        ("ray.sampler.torch_threads=0", "ray.sampler.torch_threads must be >= 1 or null, got 0"),
        ("scorer.dtype=auto", "scorer.dtype must be fp32/bf16/fp16, got 'auto'"),
    ],
)
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sd15", overrides=[override])
    assert message in str(err.value)


def test_errors_for_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'sd3'"):
        load_config("sd3")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("sd15", config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config("sd15", config_file=bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("sd15", overrides=["train.learning_rate"])


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sd15", overrides=["sampling.pool_size=1", "sampling.eta=-1"])
    assert "pool_size" in str(err.value) and "eta" in str(err.value)


def test_role_threads_and_role_checks_for_every_config_kind():
    """One per-role thread rule and one set of role checks for the SPO, evaluation and SPM configs."""
    from spo_ray.config import role_threads
    from spo_ray.evaluation import load_eval_config
    from spo_ray.spm_training.config import load_spm_config

    spo = load_config("tiny-sd15", overrides=["ray.trainer.torch_threads=3"])
    assert (role_threads(spo.ray, "trainer"), role_threads(spo.ray, "sampler")) == (3, 1)  # preset: 1 per actor
    spm = load_spm_config("spm-tiny", overrides=["data.train=x.parquet", "ray.renderer.torch_threads=2"])
    assert (role_threads(spm.ray, "renderer"), role_threads(spm.ray, "trainer")) == (2, 1)
    evaluation = load_eval_config("eval-tiny")
    assert role_threads(evaluation.ray, "generator") is None  # torch's default
    with pytest.raises(ConfigError, match=r"ray.generator.torch_threads must be >= 1 or null, got 0"):
        load_eval_config("eval-tiny", overrides=["ray.generator.torch_threads=0"])
    with pytest.raises(ConfigError, match=r"ray.trainer.num_gpus above 1 must be a whole number, got 1.5"):
        load_spm_config("spm-tiny", overrides=["data.train=x.parquet", "ray.trainer.num_gpus=1.5"])


@pytest.mark.parametrize(("preset", "prompts", "rows"), [("sd15", 40, 40), ("sdxl", 8, 16)])
@pytest.mark.parametrize(("samplers", "trainers"), [(1, 1), (4, 4), (8, 8), (3, 5)])
def test_paper_presets_keep_the_paper_batch_whatever_the_world(preset, prompts, rows, samplers, trainers) -> None:
    """The paper's global numbers (DESIGN.md: SD1.5 40 prompts per round and 40 rows per optimizer
    step; SDXL 8 and 16) hold for any number of samplers and trainer ranks."""
    from spo_ray.learner import local_rows, plan_microbatches
    from spo_ray.preflight import check_world
    from spo_ray.ray.stream import plan_rows

    cfg = load_config(preset, overrides=[f"ray.num_samplers={samplers}", f"ray.num_trainers={trainers}"])
    check_world(cfg)
    names = [f"p{i}" for i in range(4000)]
    tasks = [row for row in plan_rows(cfg, len(names), names, 0) if row["round"] == 0]
    assert sum(len(t["prompt_ids"]) for t in tasks) == prompts
    assert len(tasks) == samplers  # every sampler has prompts in every round
    t = cfg.train
    micro = plan_microbatches(10 * rows, t.train_batch_size, seed=t.seed, epoch=0, round_index=0)
    step = micro[: t.grad_accum_steps]  # one optimizer step
    per_rank = [sum(len(local_rows(m, r, trainers)) for m in step) for r in range(trainers)]
    assert sum(per_rank) == rows and min(per_rank) > 0


def test_scorer_runs_in_its_own_dtype_fp32_by_default():
    """The SPM runs in fp32 (as the reference's) even where the diffusion model runs in bf16;
    scorer.dtype chooses otherwise."""
    import torch

    from spo_ray.components import build_pool_scorer, load_model

    cpu = torch.device("cpu")
    spm = ["scorer.type=spm", "scorer.clip_dir=tiny", "scorer.kwargs={}", "model.dtype=bf16"]
    for dtype, expected in ((None, torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cfg = load_config("tiny-sd15", overrides=spm + ([f"scorer.dtype={dtype}"] if dtype else []))
        assert cfg.scorer.dtype == (dtype or "fp32")
        model = load_model(cfg, cpu, ("vae",))
        assert model.dtype == torch.bfloat16
        scorer = build_pool_scorer(cfg, model, cpu).scorer
        assert {p.dtype for p in scorer.model.parameters()} == {expected}
    for preset in ("sd15", "sdxl"):
        assert load_config(preset).scorer.dtype == "fp32"
