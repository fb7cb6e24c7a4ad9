"""Candidate-pool sampling: one trajectory per prompt, branching into k candidates per segment.

Steps with index < divert_start_step are plain DDIM steps. From there the trajectory is cut
into segments of 1 + num_inner_steps transitions (the last as the reference plans it: see
:func:`plan_segments`). A segment branches ONE x_t (and its ONE noise
prediction) into k candidates, each continues num_inner_steps single-sample steps, and its
x0_hat at the segment's end timestep is what the scorer sees (the finished image, t = 0, for
the last segment). The trajectory then continues from a uniformly random candidate, so it never
depends on scores: scoring can run asynchronously (DESIGN.md section 1).

The output is a *trajectory record batch*: one row per prompt, columns as in ``records.py``.
The trajectory itself (x_t, every candidate state) is kept in float32 whatever the model dtype:
those tensors enter the log-prob, where sigma is ~0.02 at the last steps and bf16 rounding of a
latent would move (x - mu) / sigma by several percent. Only the UNet's input is cast down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spo_ray import rng
from spo_ray.config import SamplingConfig
from spo_ray.diffusion import ddim_mean_std, predict_x0
from spo_ray.models import Conditioning, DiffusionModel


@dataclass(frozen=True)
class Segment:
    start_step: int  # index into the scheduler's timesteps of the shared x_t
    num_transitions: int


def plan_segments(num_steps: int, divert_start_step: int, num_inner_steps: int) -> list[Segment]:
    """The reference's step plan: segments of 1 + num_inner_steps transitions from divert_start_step.

    The last segment ends with the finished image: it may be shorter, and with inner steps a lone
    last step is folded into the segment before it (2 + num_inner_steps transitions, no branching
    at the last step), as the reference's SDXL loop does. Without inner steps every step from
    divert_start_step branches, the last one included, as its SD1.5 loop does.
    """
    starts = list(range(divert_start_step, num_steps, 1 + num_inner_steps))
    if num_inner_steps > 0 and len(starts) > 1 and starts[-1] == num_steps - 1:
        starts.pop()
    ends = [*starts[1:], num_steps]
    return [Segment(start, end - start) for start, end in zip(starts, ends, strict=True)]


TRAJECTORY_DTYPE = torch.float32  # x_t and the candidate chains, whatever the model dtype


def _noise(shape: tuple[int, ...], keys: list[tuple], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([rng.randn(shape, *key) for key in keys]).to(device=device, dtype=dtype)


class CandidatePoolSampler:
    """Samples candidate pools for a batch of prompts with the current policy UNet."""

    def __init__(self, model: DiffusionModel, cfg: SamplingConfig, seed: int):
        self.model = model
        self.cfg = cfg
        self.seed = seed
        self.segments = plan_segments(cfg.num_steps, cfg.divert_start_step, cfg.num_inner_steps)
        self.unet_forwards = 0  # samples pushed through the UNet (CFG counts once), for benchmarks

    def _eps(self, latents: torch.Tensor, timestep: int, cond: Conditioning, neg: Conditioning) -> torch.Tensor:
        self.unet_forwards += latents.shape[0]
        return self.model.guided_noise_pred(
            self.model.unet, latents, timestep, cond, neg, self.cfg.guidance_scale
        )

    def _step(self, latents, eps, step: int, noise_keys: list[tuple]) -> torch.Tensor:
        """x_{t-1} = mu + sigma z in float32 (the trajectory's dtype; see the module docstring)."""
        timestep = int(self.model.scheduler.timesteps[step])
        mean, std, _ = ddim_mean_std(self.model.scheduler, eps, timestep, latents, eta=self.cfg.eta)
        noise = _noise(tuple(latents.shape[1:]), noise_keys, latents.device, mean.dtype)
        return (mean + std * noise).to(TRAJECTORY_DTYPE)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        prompt_ids: list[int],
        *,
        epoch: int,
        round_index: int,
        policy_version: int,
        cond: Conditioning | None = None,
    ) -> dict[str, object]:
        """Run the trajectories of ``prompts`` and return their trajectory record batch."""
        model, cfg, seed = self.model, self.cfg, self.seed
        batch = len(prompts)
        k = cfg.pool_size
        device = next(model.unet.parameters()).device
        dtype = next(model.unet.parameters()).dtype
        timesteps = [int(t) for t in model.scheduler.timesteps]
        num_steps = len(timesteps)
        cond = (cond if cond is not None else model.encode_prompts(prompts)).to(device, dtype)
        neg = model.negative_conditioning(batch).to(device, dtype)
        cond_k, neg_k = Conditioning.cat([cond] * k), Conditioning.cat([neg] * k)

        shape = model.latent_shape
        x = _noise(shape, [("init", seed, epoch, pid) for pid in prompt_ids], device, TRAJECTORY_DTYPE)
        for step in range(cfg.divert_start_step):
            eps = self._eps(x, timesteps[step], cond, neg)
            x = self._step(x, eps, step, [("noise", seed, epoch, pid, step, 0) for pid in prompt_ids])
        eps = self._eps(x, timesteps[cfg.divert_start_step], cond, neg)

        # M: the longest segment (a folded last segment has 2 + num_inner_steps transitions)
        num_segments, max_len = len(self.segments), max(seg.num_transitions for seg in self.segments)
        x_t = torch.zeros(batch, num_segments, *shape, dtype=TRAJECTORY_DTYPE)
        chains = torch.zeros(batch, num_segments, k, max_len, *shape, dtype=TRAJECTORY_DTYPE)
        x0_hat = torch.zeros(batch, num_segments, k, *shape, dtype=dtype)  # only decoded: the model dtype
        seg_timesteps = torch.zeros(batch, num_segments, max_len, dtype=torch.long)
        score_t = torch.zeros(batch, num_segments, dtype=torch.long)
        choice = torch.zeros(batch, num_segments, dtype=torch.long)

        for s, seg in enumerate(self.segments):
            x_t[:, s] = x.cpu()
            # k candidates from one x_t and one noise prediction: only z differs.
            keys = [("noise", seed, epoch, pid, seg.start_step, j) for j in range(k) for pid in prompt_ids]
            ones = (1,) * (x.dim() - 1)
            y = self._step(x.repeat(k, *ones), eps.repeat(k, *ones), seg.start_step, keys)
            chains[:, s, :, 0] = y.view(k, batch, *shape).transpose(0, 1).cpu()
            seg_timesteps[:, s, 0] = timesteps[seg.start_step]
            for n in range(1, seg.num_transitions):
                step = seg.start_step + n
                eps_y = self._eps(y, timesteps[step], cond_k, neg_k)
                keys = [("noise", seed, epoch, pid, step, j) for j in range(k) for pid in prompt_ids]
                y = self._step(y, eps_y, step, keys)
                chains[:, s, :, n] = y.view(k, batch, *shape).transpose(0, 1).cpu()
                seg_timesteps[:, s, n] = timesteps[step]
            end = seg.start_step + seg.num_transitions
            if end < num_steps:
                # This forward is needed anyway to keep denoising; its x0_hat is what gets scored.
                eps_y = self._eps(y, timesteps[end], cond_k, neg_k)
                x0 = predict_x0(model.scheduler, eps_y, timesteps[end], y)
                score_t[:, s] = timesteps[end]
            else:
                eps_y, x0 = None, y  # the finished image, scored at t = 0
            x0_hat[:, s] = x0.view(k, batch, *shape).transpose(0, 1).cpu()
            picks = torch.tensor([rng.randint(k, "choice", seed, epoch, pid, seg.start_step) for pid in prompt_ids])
            choice[:, s] = picks
            rows = picks.to(device) * batch + torch.arange(batch, device=device)
            x = y[rows]
            if eps_y is not None:
                eps = eps_y[rows]

        record: dict[str, object] = {
            "prompt_id": torch.tensor(prompt_ids, dtype=torch.long),
            "prompt": list(prompts),
            "epoch": torch.full((batch,), epoch, dtype=torch.long),
            "round": torch.full((batch,), round_index, dtype=torch.long),
            "policy_version": torch.full((batch,), policy_version, dtype=torch.long),
            "seg_start": torch.tensor([[seg.start_step for seg in self.segments]] * batch, dtype=torch.long),
            "seg_len": torch.tensor([[seg.num_transitions for seg in self.segments]] * batch, dtype=torch.long),
            "seg_timesteps": seg_timesteps,
            "score_t": score_t,
            "x_t": x_t,
            "chains": chains,
            "x0_hat": x0_hat,
            "choice": choice,
            "final": x.cpu(),
        }
        for key in ("prompt_embeds", "pooled_embeds", "time_ids"):  # the model dtype: not in the log-prob
            value = getattr(cond, key)
            if value is not None:
                record[f"cond_{key}"] = value.detach().cpu()
        return record


@torch.no_grad()
def generate_latents(
    model: DiffusionModel,
    prompts: list[str],
    seeds: list[int],
    *,
    cfg: SamplingConfig,
    unet: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Plain DDIM sampling (no pools) of one image per (prompt, seed): for evaluation and image grids.

    Noise is keyed by the seed alone, so a base model and a tuned one see the same noise.
    """
    unet = unet if unet is not None else model.unet
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    cond = model.encode_prompts(prompts).to(device, dtype)
    neg = model.negative_conditioning(len(prompts)).to(device, dtype)
    x = _noise(model.latent_shape, [("eval_init", s) for s in seeds], device, dtype)
    for step, t in enumerate(model.scheduler.timesteps.tolist()):
        eps = model.guided_noise_pred(unet, x, int(t), cond, neg, cfg.guidance_scale)
        mean, std, _ = ddim_mean_std(model.scheduler, eps, int(t), x, eta=cfg.eta)
        noise = _noise(tuple(x.shape[1:]), [("eval_noise", s, step) for s in seeds], device, mean.dtype)
        x = (mean + std * noise).to(dtype)
    return x
