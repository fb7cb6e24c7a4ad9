"""The Ray engine's role actors: samplers (policy UNet + text encoders), scorers (VAE + preference
model) and the validation renderer (policy UNet + text encoders + VAE, one actor).

Samplers pass the PolicyStore's staleness gate before each task and load a newer policy version
when there is one; scorers report every scored prompt to the RoundLedger (the round's end marker)
before they return the round's kept pairs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from spo_ray import records, telemetry
from spo_ray.checkpointing import load_trainable_weights
from spo_ray.components import apply_fast_path, build_pool_scorer, load_model, resolve_device
from spo_ray.config import config_from_dict
from spo_ray.ray.common import worker_setup
from spo_ray.ray.coordination import ScoredPrompt, actor_names
from spo_ray.ray.metrics import report_meter
from spo_ray.rendering import png_bytes, render_pair_strip, render_validation_grid
from spo_ray.sampling import CandidatePoolSampler
from spo_ray.training import add_lora, setup_policy


def fetch_policy(unet: torch.nn.Module, refs: list[ray.ObjectRef], *, source: str) -> int:
    """A published version (trainable parameters by name, packed) into a sampler's or renderer's
    UNet, fetched from the object store of the trainer rank that put it; returns the bytes."""
    packed = ray.get(refs[0])
    load_trainable_weights(unet, records.unpack_tensors(packed), source=source)
    return records.packed_bytes(packed)


class SamplerWorker:
    """Ray Data actor: policy UNet + text encoders; one plan row (a slice of a round) -> records."""

    def __init__(self, cfg_dict: dict[str, Any]):
        self.cfg = config_from_dict(cfg_dict)
        worker_setup(self.cfg.ray, "sampler")
        device = resolve_device(self.cfg)
        self.model = load_model(self.cfg, device, ("unet", "text"))
        if self.cfg.train.lora:
            add_lora(self.model.unet, self.cfg.train)
        self.model.unet.eval()
        apply_fast_path(self.model, self.cfg, device, inference_only=True)
        self.sampler = CandidatePoolSampler(self.model, self.cfg.sampling, self.cfg.train.seed)
        self.store = ray.get_actor(actor_names(self.cfg)["store"])
        self.version = -1
        self.meter = telemetry.RoleMeter("sampler", run=self.cfg.run.name)
        self.telemetry = telemetry.connect(self.cfg.run.name)

    def _sync_policy(self, round_index: int) -> None:
        """Pass the staleness gate; load the newest version when it is newer than the one held."""
        min_version = max(round_index - self.cfg.ray.max_policy_lag, 0)
        while True:
            version, refs, published_at = ray.get(self.store.wait_newest.remote(min_version, self.version))
            if refs is None:
                break
            fetch_started = time.time()
            try:
                nbytes = fetch_policy(self.model.unet, refs, source=f"policy version {version}")
            except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
                continue  # the trainer restarted: the store is reset and rank 0 republishes
            # publish_to_usable_s counts from the version's registration, so it includes this
            # sampler finishing the task it was on; policy_fetch_seconds is the transfer and load alone.
            self.meter.add(policy_fetches=1, policy_bytes_in=nbytes, policy_fetch_seconds=time.time() - fetch_started,
                           publish_to_usable_s=time.time() - published_at)
            break
        self.version = version

    def __call__(self, batch: dict[str, np.ndarray]):
        for i in range(len(batch["round"])):
            round_index = int(batch["round"][i])
            self._sync_policy(round_index)
            wall_started, forwards = time.time(), self.sampler.unet_forwards
            prompt_ids = [int(p) for p in batch["prompt_ids"][i]]
            prompts = [str(p) for p in batch["prompts"][i]]
            rec = self.sampler.sample(
                prompts, prompt_ids, epoch=int(batch["epoch"][i]), round_index=round_index, policy_version=self.version
            )
            out = records.to_numpy(rec)
            self.meter.record(  # sampler -> scorer hop: the yielded block against its tensor minimum
                wall_started, time.time(), unet_forwards=self.sampler.unet_forwards - forwards, prompts=len(prompts),
                bytes_out=telemetry.payload_bytes(out),
                min_bytes_out=telemetry.trajectory_min_bytes(rec, self.model.dtype.itemsize),
            )
            report_meter(self.telemetry, self.meter)
            yield out


class ScorerWorker:
    """Ray Data actor: VAE decoder + preference model; trajectory records -> kept pairs."""

    def __init__(self, cfg_dict: dict[str, Any], generation: int = 0, strip_prompt_ids: dict[int, int] | None = None):
        self.cfg = config_from_dict(cfg_dict)
        self.generation = generation
        self.strip_prompt_ids = strip_prompt_ids or {}  # round -> the prompt whose slice renders the strip
        worker_setup(self.cfg.ray, "scorer")
        device = resolve_device(self.cfg)
        self.model = load_model(self.cfg, device, ("vae",))
        apply_fast_path(self.model, self.cfg, device, inference_only=True)
        self.pool_scorer = build_pool_scorer(self.cfg, self.model, device)
        self.ledger = ray.get_actor(actor_names(self.cfg)["ledger"])
        self.meter = telemetry.RoleMeter("scorer", run=self.cfg.run.name)
        self.telemetry = telemetry.connect(self.cfg.run.name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wall_started = time.time()
        rec = records.to_torch(batch)
        pairs, stats = self.pool_scorer(rec)
        if hasattr(self.pool_scorer.scorer, "reset_text_cache"):
            self.pool_scorer.scorer.reset_text_cache()
        self._offer_pair_strip(rec, pairs)  # before the report: the round is complete only after it
        # Report per prompt (idempotent in the ledger) so a redone batch is not counted twice.
        events_per_row, k = rec["x0_hat"].shape[1], rec["x0_hat"].shape[2]
        by_round: dict[int, list[ScoredPrompt]] = {}
        for b, (round_index, prompt_id) in enumerate(zip(rec["round"].tolist(), rec["prompt_id"].tolist(), strict=True)):
            kept, nonfinite = stats.kept_per_row[b], stats.nonfinite_per_row[b]
            by_round.setdefault(round_index, []).append(ScoredPrompt(
                prompt_id, events_per_row, kept, events_per_row - kept - nonfinite, stats.buckets_per_row[b],
                stats.score_sum_per_row[b], (events_per_row - nonfinite) * k, nonfinite,
            ))
        ray.get([self.ledger.report.remote(r, rows, self.generation) for r, rows in by_round.items()])
        out = records.group_by_prompt(pairs)  # one row per prompt: its conditioning once
        self.meter.record(  # scorer -> trainer hop: the returned block against its tensor minimum
            wall_started, time.time(), images_scored=stats.images, scoring_events=stats.events, kept=stats.kept,
            bytes_out=telemetry.payload_bytes(out), min_bytes_out=telemetry.pair_min_bytes(pairs, self.model.dtype.itemsize),
        )
        report_meter(self.telemetry, self.meter)
        return out

    def _offer_pair_strip(self, rec: dict[str, Any], pairs: dict[str, Any]) -> None:
        """Every tracking.log_pair_images_every rounds: the kept pairs' x0_hat as scored, decoded
        here (the scorer holds the VAE and the candidates; the trainer holds neither). Only the
        slice holding the round's smallest prompt id renders one (none if it kept no pair)."""
        every = self.cfg.tracking.log_pair_images_every
        if not (self.cfg.tracking.enabled and every > 0 and records.num_rows(pairs)):
            return
        round_index = int(rec["round"][0])
        if (round_index + 1) % every or self.strip_prompt_ids.get(round_index) not in rec["prompt_id"].tolist():
            return
        strip = render_pair_strip(self.model, rec, pairs)
        ray.get(self.ledger.offer_strip.remote(round_index, int(rec["prompt_id"].min()), png_bytes(strip)))


@ray.remote
class ValidationRenderer:
    """Renders the per-epoch validation grid (base row above current policy row, fixed prompts
    and seeds): it holds the policy UNet, the text encoders and a VAE, which the trainer does not
    (under ZeRO-3 the trainer does not even hold whole weights)."""

    def __init__(self, cfg_dict: dict[str, Any], prompts: list[str], seeds: list[int]):
        self.cfg = config_from_dict(cfg_dict)
        worker_setup(self.cfg.ray, "renderer")
        device = resolve_device(self.cfg)
        self.model = load_model(self.cfg, device, ("unet", "vae", "text"))
        self.frozen_copy = setup_policy(self.model.unet, self.cfg.train)  # LoRA: the adapter, off for the base row
        apply_fast_path(self.model, self.cfg, device, inference_only=False)  # LoRA toggling would recompile
        self.prompts, self.seeds = prompts, seeds
        self.base_images = None

    def render(self, refs: list[ray.ObjectRef]) -> bytes:
        """The grid for the policy version ``refs`` holds (a one-element list: Ray passes the reference)."""
        fetch_policy(self.model.unet, refs, source="the published policy")
        grid, self.base_images = render_validation_grid(
            self.model, self.frozen_copy, self.prompts, self.seeds, self.cfg.sampling, base_images=self.base_images
        )
        return png_bytes(grid)
