"""DDIM with log-probabilities: the exact math of SPO's transitions (DESIGN.md section 1).

A DDIM step with eta > 0 is a Gaussian transition x_{t-1} ~ N(mu, sigma_t^2 I):
    x0_hat  = (x_t - sqrt(1 - a_t) e) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mu      = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) e
with a = alphas_cumprod and a_prev at the last step the scheduler's final alpha. The log-prob is
that Gaussian's density averaged (not summed) over C*H*W, as in the paper's reference code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler

Generators = torch.Generator | Sequence[torch.Generator] | None

# What SPO's log-prob needs from a scheduler config (DESIGN.md section 1).
REQUIRED_SCHEDULER_SETTINGS = {"clip_sample": False, "set_alpha_to_one": False, "prediction_type": "epsilon"}


def validate_scheduler_config(config: Any) -> None:
    """Raise ValueError when a DDIM config would make the step's log-prob wrong or undefined.

    ``clip_sample=True`` clamps x0_hat (the transition is then not the Gaussian we score) and
    ``set_alpha_to_one=True`` makes sigma zero at the last step (log-prob undefined there).
    """
    problems = []
    for key, wanted in REQUIRED_SCHEDULER_SETTINGS.items():
        value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
        if value is not None and value != wanted:
            problems.append(f"{key}={value!r} (SPO needs {key}={wanted!r})")
    if problems:
        raise ValueError("scheduler config not usable for SPO: " + "; ".join(problems))


def make_ddim_scheduler(scheduler_config: Any, num_steps: int) -> DDIMScheduler:
    """A DDIM scheduler from a model's own scheduler config, validated, with timesteps set."""
    config = dict(scheduler_config)
    validate_scheduler_config(config)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _alphas(scheduler: DDIMScheduler, timestep: int | torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_cumprod at t and at the previous timestep, float64, shape [B]."""
    t = torch.as_tensor(timestep, dtype=torch.long).reshape(-1).cpu()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch}")
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - step
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    alpha_t = alphas[t]
    alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final)
    return alpha_t, alpha_prev


def ddim_mean_std(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, sigma_t, x0_hat) of the DDIM transition from ``sample`` at ``timestep``.

    Computed in at least float32; sigma_t has shape [B, 1, ..., 1]. eta = 0 is deterministic DDIM
    (sigma_t = 0: plain sampling only, a transition then has no log-prob).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    dtype = torch.promote_types(sample.dtype, torch.float32)
    batch = sample.shape[0]
    alpha_t, alpha_prev = _alphas(scheduler, timestep, batch)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    sigma = eta * variance.sqrt()
    direction_coef = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt()
    view = (batch,) + (1,) * (sample.dim() - 1)

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.to(device=sample.device, dtype=dtype).view(view)

    x_t = sample.to(dtype)
    eps = noise_pred.to(dtype)
    x0_hat = (x_t - col((1 - alpha_t).sqrt()) * eps) / col(alpha_t.sqrt())
    mean = col(alpha_prev.sqrt()) * x0_hat + col(direction_coef) * eps
    return mean, col(sigma), x0_hat


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the batch dim -> [B]."""
    x = x.to(mean.dtype)
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.dim())))


def _draw_noise(shape: torch.Size, generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (device-independent), one generator per sample if a list."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator)
    return noise.to(device)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step and the log-prob of its result.

    Draws x_{t-1} = mu + sigma_t z unless ``prev_sample`` is given, in which case it returns the
    log-prob of that transition (what training needs). ``timestep`` is an int or a per-sample
    tensor. Returns (prev_sample in ``sample``'s dtype, log_prob of shape [B], float32 or wider).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic DDIM step with a log-prob, got {eta}")
    mean, std, _ = ddim_mean_std(scheduler, noise_pred, timestep, sample, eta=eta)
    if prev_sample is None:
        noise = _draw_noise(sample.shape, generator, sample.device).to(mean.dtype)
        prev_sample = (mean + std * noise).to(sample.dtype)
    log_prob = gaussian_logprob(prev_sample, mean, std)
    return prev_sample, log_prob


def sample_candidates(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    k: int,
    generator: Generators = None,
) -> torch.Tensor:
    """A pool of k candidates x_{t-1}^j = mu + sigma_t z_j from ONE x_t and ONE noise prediction.

    ``generator`` is None, one generator (drawn k times in order) or k generators, one per
    candidate. Returns a tensor of shape [k, B, C, H, W] in ``sample``'s dtype.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mean, std, _ = ddim_mean_std(scheduler, noise_pred, timestep, sample, eta=eta)
    if isinstance(generator, Sequence):
        if len(generator) != k:
            raise ValueError(f"{len(generator)} generators for a pool of {k}")
        noise = torch.stack([torch.randn(sample.shape, generator=g) for g in generator])
    else:
        noise = torch.randn((k, *sample.shape), generator=generator)
    noise = noise.to(device=sample.device, dtype=mean.dtype)
    return (mean.unsqueeze(0) + std.unsqueeze(0) * noise).to(sample.dtype)


def predict_x0(
    scheduler: DDIMScheduler, noise_pred: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - a_t) e) / sqrt(a_t): what the preference model scores at t."""
    alpha_t, _ = _alphas(scheduler, timestep, sample.shape[0])
    view = (sample.shape[0],) + (1,) * (sample.dim() - 1)
    dtype = torch.promote_types(sample.dtype, torch.float32)
    a = alpha_t.to(device=sample.device, dtype=dtype).view(view)
    return ((sample.to(dtype) - (1 - a).sqrt() * noise_pred.to(dtype)) / a.sqrt()).to(sample.dtype)
