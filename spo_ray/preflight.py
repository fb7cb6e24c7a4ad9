"""Checks of everything a user gives, run before any cluster resource is requested.

The Ray engine's driver runs :func:`preflight` first: a bad prompt file, a model directory
missing files, an SPM checkpoint with the wrong keys, a checkpoint that does not fit the model on
resume, or an unreachable MLflow server is then a clear error in the job's first seconds instead
of a crash inside an actor minutes later. Nothing here loads model weights: models are built on
the meta device and checkpoints are read for their key names and shapes only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from spo_ray.checkpointing import (
    RESUME_MODES,
    checkpoint_problem,
    latest_checkpoint,
    resume_checkpoint,
)
from spo_ray.components import fit_prompts_to_tokenizer, load_prompt_set
from spo_ray.config import SPOConfig
from spo_ray.learner import trainable_mismatch
from spo_ray.prompts import PromptSet
from spo_ray.run_log import resume_changes

log = logging.getLogger("spo_ray")


class InputError(ValueError):
    """Something the user gave is unusable; the message names it and what is wrong."""


def preflight(cfg: SPOConfig, *, ray: bool = True) -> PromptSet:
    """Validate the run's inputs; returns the prompt set, cut to the text encoder's context.

    Raises :class:`InputError` (with the underlying error chained) for any bad input.
    """
    from spo_ray.spm import CheckpointLoadError
    from spo_ray.tracking import TrackingError, check_reachable, resolve_tracking_uri

    try:
        if ray:  # the in-process engine has no samplers or trainer ranks to check
            check_world(cfg)
        prompt_set = load_prompt_set(cfg)  # missing / empty / undecodable file
        if prompt_set.blank_lines_skipped:
            log.warning("%d blank line(s) in %s skipped", prompt_set.blank_lines_skipped, prompt_set.source)
        check_output_dir(cfg)
        source = check_model_files(cfg)
        _meta_policy_shapes(cfg, source)  # LoRA targets that match nothing fail here
        prompt_set = fit_prompts_to_tokenizer(prompt_set, load_tokenizer(source))
        check_scorer_files(cfg)
        check_scorer_checkpoint(cfg)
        check_user_scorer(cfg)
        check_resume_mode(cfg)
        check_resume_checkpoint(cfg, source)
        check_resume_config(cfg)
        if cfg.tracking.enabled:
            check_reachable(resolve_tracking_uri(cfg))  # an unreachable MLflow server fails fast
    except (OSError, ValueError, CheckpointLoadError, TrackingError) as err:
        raise InputError(str(err)) from err
    return prompt_set


def check_world(cfg: SPOConfig) -> None:
    """The round and the micro-batch are global numbers: each sampler needs prompts of every round,
    and each trainer rank rows of every micro-batch, or it idles (and a rank without rows still
    runs a zero-weight forward and backward to join the collectives)."""
    problems = []
    s, t, r = cfg.sampling, cfg.train, cfg.ray
    if s.prompts_per_round < r.num_samplers:
        problems.append(
            f"sampling.prompts_per_round ({s.prompts_per_round}) is the whole round, split across "
            f"ray.num_samplers ({r.num_samplers}): {r.num_samplers - s.prompts_per_round} sampler(s) would idle "
            f"every round; use at most {s.prompts_per_round} samplers or raise sampling.prompts_per_round"
        )
    if t.train_batch_size < r.num_trainers:
        problems.append(
            f"train.train_batch_size ({t.train_batch_size}) is the micro-batch across all trainer ranks and must be "
            f">= ray.num_trainers ({r.num_trainers}); use at most {t.train_batch_size} trainer workers or raise "
            "train.train_batch_size (with train.grad_accum_steps to keep the rows per optimizer step)"
        )
    if problems:
        raise ValueError("; ".join(problems))


def check_output_dir(cfg: SPOConfig) -> None:
    """``run.output_dir`` is a directory (or can be one) that this process can write."""
    out = Path(cfg.run.output_dir)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"run.output_dir={out}: {existing} exists and is not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"run.output_dir={out}: {existing} is not writable by this user")


def check_model_files(cfg: SPOConfig) -> str:
    """The base model's directory holds every component the roles load (config and weights)."""
    from spo_ray.model_loading import _resolve_source, check_local_layout, resolve_pretrained
    from spo_ray.models import COMPONENTS

    source, is_local = resolve_pretrained(cfg.model.pretrained, cfg.model.kind)
    if cfg.model.vae is not None:
        _resolve_source(str(cfg.model.vae), "VAE")
    if is_local:
        check_local_layout(Path(source), cfg.model.kind, COMPONENTS, cfg.model.vae is not None, True)
    return source


def load_tokenizer(source: str) -> Any:
    """The first text encoder's tokenizer alone (for cutting prompts without loading any model)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=Path(source).is_dir())


def _meta_spm(clip_dir: str) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    from spo_ray.spm import StepAwarePreferenceModel, resolve_clip_dir

    config = CLIPConfig.from_pretrained(str(resolve_clip_dir(clip_dir)), local_files_only=True)
    with torch.device("meta"):
        return StepAwarePreferenceModel.from_clip(CLIPModel(config))


def check_scorer_files(cfg: SPOConfig) -> None:
    """The scorer's CLIP folder (local, hub id or "tiny") is there and its tokenizer files are in
    ``scorer.processor_dir`` or beside the weights."""
    if cfg.scorer.type not in ("spm", "clip"):
        return
    from spo_ray.spm import load_clip_processor, resolve_clip_dir

    if cfg.scorer.clip_dir is None:
        raise ValueError(f"scorer.type={cfg.scorer.type} needs scorer.clip_dir (PickScore: a folder, "
                         "yuvalkirstain/PickScore_v1, or 'tiny')")
    resolve_clip_dir(cfg.scorer.clip_dir)
    load_clip_processor(cfg.scorer.processor_dir or cfg.scorer.clip_dir)


def check_scorer_checkpoint(cfg: SPOConfig) -> None:
    """An SPM checkpoint's keys and shapes fit the model built from ``scorer.clip_dir`` (listed if not)."""
    if cfg.scorer.type != "spm" or cfg.scorer.checkpoint is None:
        return
    from spo_ray.spm import CheckpointLoadError, read_state_dict, state_dict_problems

    found = read_state_dict(cfg.scorer.checkpoint, mmap=True)
    problems = state_dict_problems(_meta_spm(cfg.scorer.clip_dir or "tiny"), found, check_buffer_values=False)
    if problems:
        raise CheckpointLoadError(f"checkpoint {cfg.scorer.checkpoint} does not match the model: " + "; ".join(problems))


def check_user_scorer(cfg: SPOConfig) -> None:
    """A user scorer (``scorer.type=package.module:Class``) imports, takes its ``scorer.kwargs``
    and scores two small images as a [2] tensor of finite floats, before any resource is taken."""
    if ":" not in cfg.scorer.type:
        return
    from spo_ray.scorers import build_scorer
    from spo_ray.scoring import check_scores

    images = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    try:  # the user's code may raise anything: each is the user's to fix, named as such
        scorer = build_scorer(cfg.scorer.type, device="cpu", **cfg.scorer.kwargs)
        scores = check_scores(scorer.score(images, ["a red apple", "a blue car"], torch.tensor([0, 500])), 2, scorer)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"scorer.type={cfg.scorer.type}: {err}") from err
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scorer.type={cfg.scorer.type} returned non-finite scores {scores.tolist()} for two test images")


def _meta_policy_shapes(cfg: SPOConfig, source: str) -> dict[str, torch.Size]:
    from diffusers import UNet2DConditionModel

    from spo_ray.training import setup_policy

    config = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=Path(source).is_dir())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        if cfg.train.lora:
            setup_policy(unet, cfg.train)
        else:
            unet.requires_grad_(True)
    return {name: p.shape for name, p in unet.named_parameters() if p.requires_grad}


RUN_FILES = ("checkpoints", "summary.json", "metrics.jsonl")  # what makes a directory a run's


def check_resume_mode(cfg: SPOConfig) -> None:
    """``run.resume=never`` refuses a run directory that already holds a run; a checkpoint path
    must be a whole checkpoint (once the run has its own checkpoints, those win, with a note)."""
    resume = cfg.run.resume
    if resume == "never":
        held = [name for name in RUN_FILES if (cfg.run_dir / name).exists()]
        if held:
            raise ValueError(f"run.resume=never but {cfg.run_dir} already holds a run ({', '.join(held)}): "
                             "choose another run.name or run.output_dir, or run.resume=auto to continue it")
    elif resume not in RESUME_MODES:
        own = latest_checkpoint(cfg.run_dir)
        if own is not None:
            log.info("run.resume=%s: %s has checkpoints of its own; continuing from its latest, %s",
                     resume, cfg.run.name, own)
            return
        if not Path(resume).is_dir():
            raise ValueError(f"run.resume={resume}: no such checkpoint folder (expected 'auto', 'never' or "
                             "a checkpoint folder such as runs/<name>/checkpoints/checkpoint-0000010)")
        problem = checkpoint_problem(Path(resume))
        if problem:
            raise ValueError(f"run.resume={resume}: {problem}")


def check_resume_config(cfg: SPOConfig) -> None:
    changes = resume_changes(cfg)
    if changes:
        log.info("resuming %s with changed settings: %s", cfg.run.name,
                 "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))


def check_resume_checkpoint(cfg: SPOConfig, source: str) -> None:
    """The run's latest valid checkpoint (a resume) fits the model and the LoRA settings. Damaged
    ones beside a valid one are skipped (with a warning); checkpoints that are all damaged are an
    error, not a fresh start."""
    from safetensors import safe_open

    from spo_ray.checkpointing import PREFIX, checkpoint_dir, checkpoint_problem, shard_files

    found = resume_checkpoint(cfg.run_dir, cfg.run.resume)
    if found is None:
        damaged = sorted(p for p in checkpoint_dir(cfg.run_dir).glob(f"{PREFIX}*") if p.is_dir())
        if damaged:
            raise ValueError(f"no usable checkpoint to resume {cfg.run.name} from: {checkpoint_problem(damaged[-1])}")
        return
    shapes: dict[str, torch.Size] = {}
    for path in shard_files(found, "weights"):
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes.update({k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as err:  # a truncated or corrupt file reads as any of several errors
            raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from err
    problem = trainable_mismatch(_meta_policy_shapes(cfg, source), shapes)
    if problem:
        raise ValueError(f"checkpoint {found} does not fit the model (different LoRA rank/targets or base model?): {problem}")
