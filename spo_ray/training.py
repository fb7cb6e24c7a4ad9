"""Training components shared by both engines: policy setup, the per-transition log-probs and the
SPO loss over a micro-batch (the optimizer side is spo_ray/learner.py).

A kept pair of a segment with m transitions gives m transition pairs (win_in -> win_out,
lose_in -> lose_out at the same timestep); each is one loss term. The first transition of a
segment has win_in == lose_in (the shared x_t), so its two log-probs need ONE policy forward
and ONE reference forward, not two of each (issue 9): ``transition_logprobs`` batches the
distinct inputs only and the backward flows through the shared forward.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from spo_ray import rng
from spo_ray.config import SamplingConfig, TrainConfig
from spo_ray.diffusion import ddim_mean_std, gaussian_logprob
from spo_ray.loss import spo_loss
from spo_ray.models import Conditioning, DiffusionModel
from spo_ray.records import COND_PREFIX

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
    p_idx = torch.tensor(rows_p, dtype=torch.long, device=x_t.device)
    n_idx = torch.tensor(rows_n, dtype=torch.long, device=x_t.device)
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


def autocast_dtype(train_cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the training forwards on a GPU (fp32 trainables), none on a CPU."""
    return torch.bfloat16 if device.type == "cuda" and train_cfg.mixed_precision != "fp32" else None


def spo_loss_fn(
    model: DiffusionModel,
    unet: torch.nn.Module,
    frozen_copy: torch.nn.Module | None,
    train_cfg: TrainConfig,
    sampling_cfg: SamplingConfig,
    *,
    autocast: torch.dtype | None = None,
):
    """The loss function :func:`spo_ray.learner.train_round` calls on each micro-batch."""

    def loss_fn(batch: dict[str, object]) -> tuple[torch.Tensor, dict[str, float]]:
        return microbatch_loss(model, unet, frozen_copy, batch, train_cfg, sampling_cfg, autocast_dtype=autocast)

    return loss_fn


def round_rows(pairs: dict[str, object]):
    """All of a round's kept pairs as :class:`spo_ray.learner.RoundRows` (canonical order)."""
    from spo_ray.learner import RoundRows

    if not pairs or num_rows(pairs) == 0:
        return RoundRows(0, take=lambda idx: {}, any_row=lambda: {})
    transitions = round_transitions(pairs)
    return RoundRows(
        num=num_rows(transitions),
        take=lambda idx: take_rows(transitions, idx),
        any_row=lambda: take_rows(transitions, torch.zeros(1, dtype=torch.long, device="cpu")),
    )


class LocalTrainer:
    """The in-process trainer: the policy (LoRA or full), its frozen reference, a TorchLearner, the
    SPO loss and the round state; ``train_round`` is the learner's, as on Ray."""

    def __init__(self, model: DiffusionModel, train_cfg: TrainConfig, sampling_cfg: SamplingConfig, *,
                 device: torch.device):
        from spo_ray.learner import TorchLearner, TrainState

        self.train_cfg = train_cfg
        self.frozen_copy = setup_policy(model.unet, train_cfg)
        self.learner = TorchLearner(model.unet, train_cfg)
        self.loss_fn = spo_loss_fn(model, model.unet, self.frozen_copy, train_cfg, sampling_cfg,
                                   autocast=autocast_dtype(train_cfg, device))
        self.state = TrainState()

    def train_round(self, pairs: dict[str, object], *, epoch: int, round_index: int) -> list:
        from spo_ray.learner import train_round

        return train_round(self.learner, self.loss_fn, round_rows(pairs), self.train_cfg, self.state,
                           epoch=epoch, round_index=round_index)
