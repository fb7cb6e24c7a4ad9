"""The LoRA export carries its adapter config (rank AND alpha): a LoRA trained with lora_alpha != rank
loads in diffusers, and in ``spo-ray evaluate``, at the strength it was trained with."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spo_ray.checkpointing import latest_checkpoint, load_checkpoint, load_trainable_weights
from spo_ray.components import load_model
from spo_ray.config import load_config
from spo_ray.export import LORA_WEIGHT_NAME
from spo_ray.local_engine import run_in_process
from spo_ray.tiny import ensure_tiny_pipeline
from spo_ray.training import setup_policy

CPU = torch.device("cpu")


def _unet_out(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([501, 201]), encoder_hidden_states=ehs).sample


def _pipeline_unet(lora_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(ensure_tiny_pipeline("sd15")), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(lora_dir))
    return pipe.unet


def test_lora_alpha_twice_the_rank_round_trips(tmp_path: Path) -> None:
    from spo_ray.evaluation import GenerationWorker, load_eval_config, resolve_model_spec

    cfg = load_config("tiny-sd15", overrides=[
        f"run.output_dir={tmp_path}", "run.progress=false", "run.max_rounds=1", "data.max_prompts=4",
        "train.lora_alpha=8", "run.checkpoint_every_rounds=1", "tracking.enabled=false",
    ])
    assert (cfg.train.lora_rank, cfg.train.lora_alpha) == (4, 8)
    result = run_in_process(cfg)
    final = Path(result["final_dir"])
    with safe_open(str(final / LORA_WEIGHT_NAME), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 8)

    # The trained policy: base UNet + the adapter (alpha 8) + the checkpointed trainable weights.
    model = load_model(cfg, CPU, ("unet",))
    setup_policy(model.unet, cfg.train)
    _, weights, _ = load_checkpoint(latest_checkpoint(cfg.run_dir))
    load_trainable_weights(model.unet, weights, source="final checkpoint")
    ours = _unet_out(model.unet)
    model.unet.disable_adapters()
    base = _unet_out(model.unet)
    assert (ours - base).abs().max() > 1e-3  # one round of training moved the policy

    theirs = _pipeline_unet(final)
    assert {c.lora_alpha for c in theirs.peft_config.values()} == {8}
    torch.testing.assert_close(_unet_out(theirs), ours, atol=1e-5, rtol=1e-4)

    # The same tensors without the adapter config (what the export wrote before) load at alpha = rank.
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(str(final / LORA_WEIGHT_NAME)), str(bare / LORA_WEIGHT_NAME), metadata={"format": "pt"})
    weak = _unet_out(_pipeline_unet(bare))
    assert (weak - ours).abs().max() > 10 * (1e-5 + 1e-4 * ours.abs().max())

    # spo-ray evaluate attaches the export as a named adapter of the base UNet: alpha picked up too.
    eval_cfg = load_eval_config("eval-tiny", overrides=[f"run.output_dir={tmp_path / 'eval'}"])
    spec = resolve_model_spec("spo", str(final))
    worker = GenerationWorker(eval_cfg.to_dict(), [dataclasses.asdict(spec)])
    unet = worker._unet("spo")
    assert unet.peft_config["spo"].lora_alpha == 8
    torch.testing.assert_close(_unet_out(unet), ours, atol=1e-5, rtol=1e-4)
