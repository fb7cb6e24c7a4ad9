"""Tiny pipelines and the SD1.5/SDXL model adapter, checked against diffusers' own pipelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spo_ray.model_loading import load_diffusion_model
from spo_ray.models import Conditioning, DiffusionModel
from spo_ray.tiny import (
    _SUBFOLDERS,
    build_clip_tokenizer,
    build_tiny_pipeline,
    ensure_tiny_pipeline,
    write_clip_tokenizer_files,
)

PROMPTS = ["a photo of the cat on a mat", "an oil painting of a lighthouse at dusk, dramatic light!"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny_pipeline(kind, root / kind) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def models(tiny_dirs: dict[str, Path]) -> dict[str, DiffusionModel]:
    return {kind: load_diffusion_model(str(path), kind) for kind, path in tiny_dirs.items()}


# -- tiny pipelines -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_pipeline_layout(tiny_dirs: dict[str, Path], kind: str) -> None:
    path = tiny_dirs[kind]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    for sub in _SUBFOLDERS[kind]:
        assert (path / sub).is_dir(), sub
    assert (path / "unet" / "config.json").is_file()
    assert list((path / "unet").glob("*.safetensors"))
    if kind == "sdxl":
        assert index["force_zeros_for_empty_prompt"] is True
        assert json.loads((path / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(0.13025)
    else:
        assert json.loads((path / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(0.18215)
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["clip_sample"] is False and sched["set_alpha_to_one"] is False
    assert sched["steps_offset"] == 1 and sched["timestep_spacing"] == "leading"


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    again = build_tiny_pipeline("sd15", tmp_path / "again", seed=0)
    other = build_tiny_pipeline("sd15", tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(str(p / weights)) for p in (tiny_dirs["sd15"], again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_ensure_tiny_pipeline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPO_RAY_CACHE", str(tmp_path))
    path = ensure_tiny_pipeline("sd15")
    assert path == tmp_path / "tiny-sd15"
    stamp = (path / "spo_ray_tiny.json").stat().st_mtime_ns
    assert ensure_tiny_pipeline("sd15") == path
    assert (path / "spo_ray_tiny.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd15"]  # no temp dirs left behind
    # An incomplete copy (e.g. a crash before the stamp) is rebuilt.
    (path / "spo_ray_tiny.json").unlink()
    assert ensure_tiny_pipeline("sd15") == path
    assert (path / "spo_ray_tiny.json").is_file()
    model = load_diffusion_model("tiny:sd15", "sd15", components=("unet",))
    assert model.pretrained == str(path)


def test_tokenizer_files(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp_path, pad_token="!")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok.model_max_length == 77 and tok.pad_token == "!"
    ids = tok(["The cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.eos_token_id == len(tok) - 1  # largest id, like the real CLIP vocab
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["the</w>", "c"]


def test_tokenizer_is_a_real_clip_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_clip_tokenizer_files(tmp_path / "tok", model_max_length=32)
    assert (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert type(tok).__name__.startswith("CLIPTokenizer")
    assert tok.model_max_length == 32
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    enc = tok(["the cat", "a much longer prompt " * 20], padding=True, truncation=True, return_tensors="pt")
    ids = enc["input_ids"]
    assert ids.shape == (2, 32)
    assert (
        ids[0, 0] == tok.bos_token_id and tok.convert_ids_to_tokens(int(ids[0, 1])) == "the</w>"
    )  # merges apply
    assert (ids[:, -1] == tok.eos_token_id).all() and int(ids.max()) < len(tok)
    tok2 = build_clip_tokenizer(tmp_path / "tok2")
    assert len(tok2) == len(tok) and tok2.model_max_length == 77


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_load_shapes_and_scheduler(models: dict[str, DiffusionModel], kind: str) -> None:
    model = models[kind]
    assert model.kind == kind
    assert model.vae_scale_factor == 8
    assert model.resolution == 64
    assert model.latent_shape == (4, 8, 8)
    assert model.latent_shape_for(128) == (4, 16, 16)
    assert len(model.text_encoders) == len(model.tokenizers) == (2 if kind == "sdxl" else 1)
    assert model.scheduler.timesteps.tolist() == list(range(951, 0, -50))
    assert model.make_scheduler(10).timesteps.tolist() == list(range(901, 0, -100))


def test_load_components_subset(tiny_dirs: dict[str, Path]) -> None:
    scorer = load_diffusion_model(str(tiny_dirs["sdxl"]), "sdxl", components=("vae",), resolution=128)
    assert scorer.unet is None and not scorer.text_encoders and scorer.vae is not None
    assert scorer.latent_shape == (4, 16, 16)
    with pytest.raises(RuntimeError, match="text encoders"):
        scorer.encode_prompts(["x"])
    # A separate VAE directory (as for madebyollin/sdxl-vae-fp16-fix) is loaded without subfolder.
    separate = load_diffusion_model(
        str(tiny_dirs["sdxl"]), "sdxl", vae=str(tiny_dirs["sdxl"] / "vae"), components=("vae",)
    )
    assert separate.vae.config.scaling_factor == pytest.approx(0.13025)


def test_load_errors(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_dirs["sd15"], broken, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(FileNotFoundError, match=r"missing component subfolder\(s\) unet/"):
        load_diffusion_model(str(broken), "sd15")
    # Roles that do not need the UNet still load (its config is not needed either when resolution is given).
    assert load_diffusion_model(str(broken), "sd15", components=("vae",), resolution=64).vae is not None
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_diffusion_model(str(tmp_path / "nowhere"), "sd15")
    with pytest.raises(ValueError, match="SDXL"):
        load_diffusion_model(str(tiny_dirs["sd15"]), "sdxl")
    with pytest.raises(ValueError, match="kind='sdxl'"):
        load_diffusion_model(str(tiny_dirs["sdxl"]), "sd15")
    with pytest.raises(ValueError, match="tiny:sd15"):
        load_diffusion_model("tiny:sd15", "sdxl")
    with pytest.raises(ValueError, match="unknown component"):
        load_diffusion_model(str(tiny_dirs["sd15"]), "sd15", components=("unet", "spm"))


# -- conditioning -------------------------------------------------------------------------------


def test_encode_prompt_shapes(models: dict[str, DiffusionModel]) -> None:
    sd15 = models["sd15"].encode_prompts(PROMPTS)
    assert sd15.prompt_embeds.shape == (2, 77, 32)
    assert sd15.pooled_embeds is None and sd15.time_ids is None
    xl = models["sdxl"].encode_prompts(PROMPTS)
    assert xl.prompt_embeds.shape == (2, 77, 64)
    assert xl.pooled_embeds.shape == (2, 32)
    assert xl.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert models["sdxl"].encode_prompts(PROMPTS[:1], resolution=128).time_ids.tolist() == [[128, 128, 0, 0, 128, 128]]


def test_negative_conditioning(models: dict[str, DiffusionModel]) -> None:
    sd15 = models["sd15"]
    neg = sd15.negative_conditioning(3)
    assert neg.batch_size == 3
    torch.testing.assert_close(neg.prompt_embeds, sd15.encode_prompts([""]).prompt_embeds.expand(3, -1, -1))
    assert neg.prompt_embeds.abs().sum() > 0

    xl = models["sdxl"].negative_conditioning(2)
    assert xl.prompt_embeds.shape == (2, 77, 64) and xl.pooled_embeds.shape == (2, 32)
    assert torch.count_nonzero(xl.prompt_embeds) == 0 and torch.count_nonzero(xl.pooled_embeds) == 0
    assert xl.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def test_sd15_matches_diffusers_encode_prompt(models: dict[str, DiffusionModel], tiny_dirs: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd15"]))
    pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    model = models["sd15"]
    torch.testing.assert_close(model.encode_prompts(PROMPTS).prompt_embeds, pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.negative_conditioning(2).prompt_embeds, neg, rtol=0, atol=1e-6)


def test_sdxl_matches_diffusers_encode_prompt(models: dict[str, DiffusionModel], tiny_dirs: dict[str, Path]) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dirs["sdxl"]))
    assert pipe.config.force_zeros_for_empty_prompt
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=None
    )
    model = models["sdxl"]
    cond, uncond = model.encode_prompts(PROMPTS), model.negative_conditioning(2)
    torch.testing.assert_close(cond.prompt_embeds, pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond.prompt_embeds, neg, rtol=0, atol=0)
    torch.testing.assert_close(uncond.pooled_embeds, neg_pooled, rtol=0, atol=0)
    time_ids = pipe._get_add_time_ids(
        (64, 64), (0, 0), (64, 64), dtype=pos.dtype, text_encoder_projection_dim=pooled.shape[-1]
    )
    torch.testing.assert_close(cond.time_ids, time_ids.repeat(2, 1))
    torch.testing.assert_close(uncond.time_ids, time_ids.repeat(2, 1))


def test_conditioning_helpers(models: dict[str, DiffusionModel]) -> None:
    cond = models["sdxl"].encode_prompts(PROMPTS)
    back = Conditioning.from_dict(cond.as_dict())
    assert set(cond.as_dict()) == {"prompt_embeds", "pooled_embeds", "time_ids"}
    assert all(isinstance(v, np.ndarray) for v in cond.as_dict().values())
    torch.testing.assert_close(back.pooled_embeds, cond.pooled_embeds)
    assert cond.index(1).batch_size == 1
    torch.testing.assert_close(cond.index(-1).prompt_embeds, cond.prompt_embeds[1:])
    torch.testing.assert_close(cond.index(torch.tensor([False, True])).time_ids, cond.time_ids[1:])
    torch.testing.assert_close(cond.index([1]).prompt_embeds, cond.prompt_embeds[1:])
    rep = cond.repeat_interleave(3)
    assert rep.batch_size == 6
    torch.testing.assert_close(rep.index(torch.tensor([2, 3])).pooled_embeds, cond.pooled_embeds)
    cat = Conditioning.cat([cond.index(1), cond.index(0)])
    torch.testing.assert_close(cat.prompt_embeds, cond.prompt_embeds.flip(0))
    assert cond.to(dtype=torch.bfloat16).as_dict()["prompt_embeds"].dtype == np.float32

    sd = models["sd15"].encode_prompts(PROMPTS[:1])
    assert set(sd.as_dict()) == {"prompt_embeds"}
    assert Conditioning.from_dict(sd.as_dict()).pooled_embeds is None
    with pytest.raises(ValueError):
        Conditioning.cat([sd, cond.index(0)])


def test_free_text_encoders_keeps_negative(tiny_dirs: dict[str, Path]) -> None:
    model = load_diffusion_model(str(tiny_dirs["sd15"]), "sd15", components=("unet", "text"))
    expected = model.negative_conditioning(2).prompt_embeds.clone()
    model.free_text_encoders()
    assert model.text_encoders == [] and model.tokenizers == []
    torch.testing.assert_close(model.negative_conditioning(2).prompt_embeds, expected)
    with pytest.raises(RuntimeError):
        model.encode_prompts(["x"])


# -- UNet and VAE -------------------------------------------------------------------------------


def _two_pass(model: DiffusionModel, latents, t, cond, neg, scale):
    def run(c: Conditioning) -> torch.Tensor:
        added = None if c.pooled_embeds is None else {"text_embeds": c.pooled_embeds, "time_ids": c.time_ids}
        return model.unet(latents, t, encoder_hidden_states=c.prompt_embeds, added_cond_kwargs=added).sample

    e_u, e_c = run(neg), run(cond)
    return e_u + scale * (e_c - e_u), e_c


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_guided_noise_pred_matches_two_passes(models: dict[str, DiffusionModel], kind: str) -> None:
    model = models[kind]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *model.latent_shape, generator=gen)
    cond, neg = model.encode_prompts(PROMPTS), model.negative_conditioning(2)
    timesteps = torch.tensor([951, 451])
    with torch.no_grad():
        guided = model.guided_noise_pred(model.unet, latents, timesteps, cond, neg, 5.0)
        expected, cond_only = _two_pass(model, latents, timesteps, cond, neg, 5.0)
        # One batched forward vs two: fp32 rounding of ~5e-6 per noise prediction (batch-size
        # dependent kernels), amplified by the guidance e_u + s (e_c - e_u): |1 - s| + |s| = 9 times.
        torch.testing.assert_close(guided, expected, rtol=0, atol=9 * 5e-6)
        assert not torch.allclose(guided, cond_only, atol=1e-3)
        one = model.guided_noise_pred(model.unet, latents, timesteps, cond, neg, 1.0)
        torch.testing.assert_close(one, cond_only, rtol=0, atol=1e-5)
        # An int timestep broadcasts; a 1-row negative broadcasts too.
        scalar = model.guided_noise_pred(model.unet, latents, 451, cond, model.negative_conditioning(1), 5.0)
        vector = model.guided_noise_pred(model.unet, latents, torch.tensor([451, 451]), cond, neg, 5.0)
        torch.testing.assert_close(scalar, vector, rtol=0, atol=1e-6)
    assert guided.shape == latents.shape and guided.dtype == torch.float32


def test_guided_noise_pred_has_gradients(models: dict[str, DiffusionModel]) -> None:
    model = models["sd15"]
    latents = torch.randn(1, *model.latent_shape)
    cond, neg = model.encode_prompts(PROMPTS[:1]), model.negative_conditioning(1)
    out = model.guided_noise_pred(model.unet, latents, 501, cond, neg, 5.0)
    out.square().mean().backward()
    assert model.unet.conv_in.weight.grad is not None
    model.unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_decode(models: dict[str, DiffusionModel], kind: str) -> None:
    model = models[kind]
    latents = torch.randn(2, *model.latent_shape) * 3.0
    images = model.decode(latents)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    raw = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, raw.clamp(-1, 1))
    # the preference model's input: the raw decode, values beyond [-1, 1] kept
    unclamped = model.decode(latents, clamp=False)
    torch.testing.assert_close(unclamped, raw)
    assert unclamped.abs().max() > 1.0


def test_fast_path_switches_and_channels_last_keeps_the_numbers() -> None:
    """Unset (None) is on for a GPU and off for a CPU; channels-last changes the memory layout of the
    UNet's and VAE's conv weights, not what they compute."""
    from spo_ray.components import apply_fast_path, load_model, resolve_vae_dtype, switch_on
    from spo_ray.config import load_config

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert switch_on(None, gpu) and not switch_on(None, cpu)
    assert switch_on(True, cpu) and not switch_on(False, gpu)
    sdxl = load_config("sdxl")
    assert resolve_vae_dtype(sdxl, gpu) == torch.float16 and resolve_vae_dtype(sdxl, cpu) is None
    cfg = load_config("tiny-sd15", overrides=["model.channels_last=true", "model.compile_unet=false"])
    model = load_model(cfg, cpu)
    latents = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond, neg = model.encode_prompts(["a cat", "a dog"]), model.negative_conditioning(2)
    with torch.no_grad():
        before = model.guided_noise_pred(model.unet, latents, 500, cond, neg, 5.0), model.decode(latents)
        apply_fast_path(model, cfg, cpu, inference_only=True)
        conv = next(m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        after = model.guided_noise_pred(model.unet, latents, 500, cond, neg, 5.0), model.decode(latents)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
