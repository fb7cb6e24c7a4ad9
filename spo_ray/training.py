"""Training components shared by both engines: policy setup, the per-transition log-probs, the
SPO loss over a micro-batch, micro-batch planning, and the in-process optimizer loop.

A kept pair of a segment with m transitions gives m transition pairs (win_in -> win_out,
lose_in -> lose_out at the same timestep); each is one loss term. The first transition of a
segment has win_in == lose_in (the shared x_t), so its two log-probs need ONE policy forward
and ONE reference forward, not two of each (issue 9): ``transition_logprobs`` batches the
distinct inputs only and the backward flows through the shared forward.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from spo_ray import rng
from spo_ray.config import SamplingConfig, TrainConfig
from spo_ray.diffusion import ddim_mean_std, gaussian_logprob
from spo_ray.loss import spo_loss
from spo_ray.models import Conditioning, DiffusionModel

COND_PREFIX = "cond_"


# ----------------------------------------------------------------------------- policy setup


def add_lora(unet: torch.nn.Module, cfg: TrainConfig) -> None:
    """Add the SPO LoRA (rank = alpha, gaussian init, attention projections) to a frozen UNet.

    The initial weights are a pure function of the seed, so every process that adds the
    adapter (trainer ranks, sampler actors, the in-process engine) starts from the same policy.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        init_lora_weights="gaussian",
        target_modules=list(cfg.lora_targets),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.derive_seed("lora_init", cfg.seed))
        unet.add_adapter(lora)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 trainables under mixed precision


def setup_policy(unet: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module | None:
    """Make ``unet`` the trainable policy; return a frozen reference UNet for full fine-tuning.

    LoRA: the reference is the same UNet with the adapter disabled, so no copy is returned.
    Full fine-tuning: every UNet weight trains and a frozen deep copy is the reference.
    """
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.lora:
        add_lora(unet, cfg)
        return None
    reference = copy.deepcopy(unet).requires_grad_(False).eval()
    unet.requires_grad_(True)
    return reference


@contextlib.contextmanager
def reference_unet(unet: torch.nn.Module, frozen_copy: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The frozen base model: the frozen copy, or the same UNet with its LoRA disabled."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- transitions


def expand_transitions(pairs: dict[str, object]) -> dict[str, object]:
    """One row per transition pair: (win_in, win_out, lose_in, lose_out, timestep, shared, cond)."""
    win, lose, x_t = pairs["win"], pairs["lose"], pairs["x_t"]
    rows_p, rows_n = [], []
    for p, length in enumerate(pairs["seg_len"].tolist()):
        rows_p += [p] * length
        rows_n += list(range(length))
    p_idx, n_idx = torch.tensor(rows_p, dtype=torch.long), torch.tensor(rows_n, dtype=torch.long)
    prev = (n_idx - 1).clamp(min=0)
    first = (n_idx == 0).view(-1, *(1,) * (x_t.dim() - 1))
    out: dict[str, object] = {
        "pair_id": pairs["pair_id"][p_idx],
        "transition": n_idx,
        "policy_version": pairs["policy_version"][p_idx],
        "timestep": pairs["timesteps"][p_idx, n_idx],
        "shared": n_idx == 0,
        "win_in": torch.where(first, x_t[p_idx], win[p_idx, prev]),
        "win_out": win[p_idx, n_idx],
        "lose_in": torch.where(first, x_t[p_idx], lose[p_idx, prev]),
        "lose_out": lose[p_idx, n_idx],
        "score_win": pairs["score_win"][p_idx],
        "score_lose": pairs["score_lose"][p_idx],
    }
    for key, value in pairs.items():
        if key.startswith(COND_PREFIX):
            out[key] = value[p_idx]
    return out


def round_transitions(pairs: dict[str, object]) -> dict[str, object]:
    """A round's transitions in canonical order: pairs sorted by pair id, then expanded.

    Pairs arrive in an order that depends on the engine (and, on Ray, on actor timing); the
    micro-batch shuffle is applied to this canonical order so both engines train identically.
    """
    from spo_ray.records import sort_rows

    return expand_transitions(sort_rows(pairs, "pair_id"))


def take_rows(batch: dict[str, object], idx: torch.Tensor) -> dict[str, object]:
    return {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]) for k, v in batch.items()}


def num_rows(batch: dict[str, object]) -> int:
    return len(batch["pair_id"])


def conditioning_of(batch: dict[str, object]) -> Conditioning:
    return Conditioning.from_dict({k[len(COND_PREFIX):]: v for k, v in batch.items() if k.startswith(COND_PREFIX)})


def transition_logprobs(
    model: DiffusionModel,
    unet: torch.nn.Module,
    batch: dict[str, object],
    *,
    guidance_scale: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(win_out | win_in) and log p(lose_out | lose_in) under ``unet`` with CFG.

    One UNet forward per distinct input: rows marked ``shared`` reuse the winner's forward.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype  # conv_in: a base weight (LoRA trainables stay fp32)
    shared: torch.Tensor = batch["shared"].to(device)
    n = shared.shape[0]
    own = ~shared
    win_in = batch["win_in"].to(device)
    lose_in = batch["lose_in"].to(device)
    timesteps = batch["timestep"].to(device)
    cond = conditioning_of(batch).to(device, dtype)
    inputs = torch.cat([win_in, lose_in[own]])
    input_t = torch.cat([timesteps, timesteps[own]])
    input_cond = Conditioning.cat([cond, cond.index(own)])
    neg = model.negative_conditioning(inputs.shape[0]).to(device, dtype)
    eps = model.guided_noise_pred(unet, inputs.to(dtype), input_t, input_cond, neg, guidance_scale)
    lose_rows = torch.where(shared, torch.arange(n, device=device), n + own.long().cumsum(0) - 1)
    eps_win, eps_lose = eps[:n], eps[lose_rows]
    scheduler = model.scheduler
    mean_w, std_w, _ = ddim_mean_std(scheduler, eps_win, timesteps.cpu(), win_in, eta=eta)
    mean_l, std_l, _ = ddim_mean_std(scheduler, eps_lose, timesteps.cpu(), lose_in, eta=eta)
    logp_win = gaussian_logprob(batch["win_out"].to(device), mean_w, std_w)
    logp_lose = gaussian_logprob(batch["lose_out"].to(device), mean_l, std_l)
    return logp_win, logp_lose


def microbatch_loss(
    model: DiffusionModel,
    unet: torch.nn.Module,
    frozen_copy: torch.nn.Module | None,
    batch: dict[str, object],
    train_cfg: TrainConfig,
    sampling_cfg: SamplingConfig,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SPO loss of one micro-batch of transition pairs, and its detached statistics."""
    device = next(unet.parameters()).device
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    kwargs = {"guidance_scale": sampling_cfg.guidance_scale, "eta": sampling_cfg.eta}
    with autocast:
        logp_w, logp_l = transition_logprobs(model, unet, batch, **kwargs)
        with torch.no_grad(), reference_unet(unet, frozen_copy) as ref:
            ref_w, ref_l = transition_logprobs(model, ref, batch, **kwargs)
    loss, stats = spo_loss(logp_w, ref_w, logp_l, ref_l, beta=train_cfg.beta, eps=train_cfg.clip_eps)
    out = {key: float(value) for key, value in stats.items()}
    out["score_win"] = float(batch["score_win"].float().mean())
    out["score_lose"] = float(batch["score_lose"].float().mean())
    return loss, out


def plan_microbatches(
    num: int, batch_size: int, *, seed: int, epoch: int, round_index: int, world_size: int = 1, rank: int = 0
) -> list[torch.Tensor]:
    """A round's transitions shuffled (a pure function of ids) and cut into micro-batches.

    With several trainer ranks every rank sees the whole round; global micro-batch i holds
    ``batch_size * world_size`` transitions and rank r takes every world_size-th of them, so one
    rank gives exactly the in-process engine's micro-batches. A rank whose share of the last
    micro-batch is empty gets an empty index (it must still join the collective step).
    """
    order = rng.permutation(num, "pair_shuffle", seed, epoch, round_index)
    step = batch_size * world_size
    return [order[lo : lo + step][rank::world_size] for lo in range(0, num, step)]


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# ----------------------------------------------------------------------------- in-process trainer


@dataclass
class StepMetrics:
    """What one optimizer step reports (means over its micro-batches)."""

    step: int
    loss: float
    ratio_win: float
    ratio_lose: float
    clip_frac: float
    accuracy: float
    score_win: float
    score_lose: float
    grad_norm: float
    lr: float
    skipped: bool
    num_transitions: int


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the run stops (after a checkpoint)."""


class LocalTrainer:
    """The optimizer loop of the in-process engine, with DeepSpeed's semantics (DESIGN.md section 2):
    the loss is divided by the accumulation steps, a non-finite step is skipped (the micro-step
    counter stays aligned), and gradient clipping really clips when ``max_grad_norm`` is set.
    """

    def __init__(self, model: DiffusionModel, train_cfg: TrainConfig, sampling_cfg: SamplingConfig, *, device: torch.device):
        self.model = model
        self.cfg = train_cfg
        self.sampling_cfg = sampling_cfg
        self.device = device
        self.frozen_copy = setup_policy(model.unet, train_cfg)
        self.params = trainable_parameters(model.unet)
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=train_cfg.learning_rate,
            betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            weight_decay=train_cfg.adam_weight_decay,
            eps=train_cfg.adam_epsilon,
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(train_cfg.lr_warmup_steps))
        self.autocast_dtype = torch.bfloat16 if (device.type == "cuda" and train_cfg.mixed_precision != "fp32") else None
        self.global_step = 0
        self.micro_step = 0
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0

    def _optimizer_step(self, partial: list[dict[str, float]], transitions: int) -> StepMetrics:
        grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in self.params)
        skipped = not grads_finite or any(not math.isfinite(m["loss"]) for m in partial)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm)) if not skipped else float("nan")
        if skipped:
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
        else:
            self.optimizer.step()
            self.lr_schedule.step()
            self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        mean = {key: sum(m[key] for m in partial) / len(partial) for key in partial[0]}
        metrics = StepMetrics(
            step=self.global_step,
            grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"],
            skipped=skipped,
            num_transitions=transitions,
            **{k: mean[k] for k in ("loss", "ratio_win", "ratio_lose", "clip_frac", "accuracy", "score_win", "score_lose")},
        )
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); stopping"
            )
        return metrics

    def train_round(self, pairs: dict[str, object], *, epoch: int, round_index: int) -> list[StepMetrics]:
        """Train on one round's kept pairs: shuffled transitions, micro-batches, accumulation.

        An optimizer step happens every ``grad_accum_steps`` micro-batches and at the round's
        end, so the next round samples with weights that saw every pair of this one.
        """
        if num_rows(pairs) == 0:
            return []
        transitions = round_transitions(pairs)
        micro = plan_microbatches(
            num_rows(transitions), self.cfg.train_batch_size, seed=self.cfg.seed, epoch=epoch, round_index=round_index
        )
        self.model.unet.train()
        results, partial, seen = [], [], 0
        for i, idx in enumerate(micro):
            batch = take_rows(transitions, idx)
            loss, stats = microbatch_loss(
                self.model, self.model.unet, self.frozen_copy, batch, self.cfg, self.sampling_cfg,
                autocast_dtype=self.autocast_dtype,
            )
            stats["loss"] = float(loss.detach())
            if torch.isfinite(loss):
                (loss / self.cfg.grad_accum_steps).backward()
            # else: no backward; the step that contains it is skipped and the counter stays aligned
            self.micro_step += 1
            partial.append(stats)
            seen += len(idx)
            if len(partial) == self.cfg.grad_accum_steps or i == len(micro) - 1:
                results.append(self._optimizer_step(partial, seen))
                partial, seen = [], 0
        self.model.unet.eval()
        return results
