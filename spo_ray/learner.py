"""One learner interface, two implementations, and the one round of training both engines run.

    learner = TorchLearner(model.unet, cfg.train)            # the in-process engine: plain torch
    learner = DeepSpeedLearner(engine, cfg, device)          # a Ray Train worker (spo_ray/ray/deepspeed_learner.py)
    records = train_round(learner, loss_fn, rows, cfg.train, state, epoch=e, round_index=r)

What every ``train.*`` setting means, in both engines:

- ``train_batch_size``: transition pairs in one micro-batch **across all trainer ranks** (a global
  number: the run's optimization does not depend on the world size). Rank r takes every
  world-th row of each global micro-batch (``plan_microbatches``).
- ``grad_accum_steps``: micro-batches per optimizer step. A round's last step may hold fewer; its
  gradient is the mean over the micro-steps it has (not divided by the full count).
- The gradient of a step is ``mean over its micro-steps of (mean over the micro-batch's rows)``:
  each rank back-propagates ``local mean x (local rows x world / global rows) / micro-steps``,
  and the data-parallel average (DeepSpeed divides by the world size) restores the global mean.
- A micro-batch whose loss is non-finite on any rank is *dropped*: every rank back-propagates a
  zero for it (so DeepSpeed's reduction hooks stay aligned), the step goes on with the rest.
  A step whose micro-batches were all dropped, or whose reduced gradient is non-finite, is
  *skipped*: no weight, Adam-moment or lr-schedule change (the DeepSpeed learner makes such a
  step's gradient non-finite on purpose, so that ZeRO's own overflow check skips it and clears its
  partitioned buffers). ``max_nonfinite_steps`` counts
  optimizer steps in a row with a dropped micro-batch or a skipped update; reaching it raises
  :class:`NonFiniteError`. (Dropping, not skipping, is what both engines can do exactly: once a
  ZeRO-2 rank has reduced a micro-batch's gradient it cannot be taken back without DeepSpeed
  internals, while a zero contribution is exact.)
- ``max_grad_norm``: the pre-clip global norm is reported; with a value it really clips
  (DeepSpeed's ``gradient_clipping`` in the DeepSpeed learner).

Optimizer state is exchanged by parameter name (``<name>.exp_avg``, ``<name>.exp_avg_sq``,
whole tensors, fp32) plus the count of applied steps (Adam's step and the lr schedule's
position), so a checkpoint of either engine resumes in the other at any world size.

Cost at scale (per optimizer step): one all-reduce of one float per micro-step (the non-finite
flag) and one of ~9 floats per micro-step at the boundary (the step's statistics), on the
trainer's device: a few microseconds each on NVLink, ~30 us across nodes, against seconds of
compute per micro-batch (SD1.5 LoRA on 8 GPUs, SDXL LoRA on 32, SDXL full fine-tuning on 64
alike: the messages do not grow with the model or the world).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from spo_ray import rng
from spo_ray.config import TrainConfig

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
# What a micro-batch's loss function reports next to the loss (means over its rows).
LOSS_STATS = ("ratio_win", "ratio_lose", "clip_frac", "accuracy", "score_win", "score_lose")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row met a non-finite loss or gradient; the run stops."""


def check_nonfinite_streak(in_a_row: int, limit: int) -> None:
    """Raise :class:`NonFiniteError` once ``limit`` optimizer steps in a row were non-finite (the
    SPO and SPM trainers' ``train.max_nonfinite_steps``): past a few, the run diverged."""
    if in_a_row >= limit:
        raise NonFiniteError(f"{in_a_row} optimizer steps in a row met a non-finite loss or gradient "
                             f"(train.max_nonfinite_steps={limit}); stopping")


# ----------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class StepOutcome:
    applied: bool  # False: skipped (no weight, moment or schedule change)
    grad_norm: float  # the pre-clip global norm (nan when skipped)


class Learner(Protocol):
    """What :func:`train_round` needs from an optimizer implementation."""

    module: torch.nn.Module  # what the training forwards run through
    rank: int
    world_size: int

    def trainables(self) -> dict[str, torch.nn.Parameter]: ...
    def all_reduce_sum(self, values: Sequence[float]) -> list[float]: ...
    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None: ...
    def backward_zero(self, zero_loss: Callable[[], torch.Tensor], *, boundary: bool, skip_step: bool) -> None: ...
    def step(self) -> StepOutcome: ...
    def lr(self) -> float: ...
    def applied_steps(self) -> int: ...
    def full_tensors(self, name: str) -> dict[str, torch.Tensor]: ...
    def load_state(self, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], applied_steps: int) -> None: ...


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """The one AdamW (betas, weight decay, eps from the config) and its warm-up schedule.

    A torch optimizer everywhere: DeepSpeed wraps it (no fused op to compile on CPU; ZeRO
    partitions its state). With ``ray.offload_optimizer`` DeepSpeed builds its own CPU Adam."""
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.lr_warmup_steps))


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def set_schedule_position(optimizer: torch.optim.Optimizer, schedule: Any, applied_steps: int) -> None:
    """Put a LambdaLR at ``applied_steps`` (what a fresh schedule reaches after that many steps)."""
    schedule.last_epoch = applied_steps
    schedule._step_count = applied_steps + 1
    lrs = [base * fn(applied_steps) for base, fn in zip(schedule.base_lrs, schedule.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    schedule._last_lr = lrs


def trainable_mismatch(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size]) -> str | None:
    """What differs between the trainable parameters' names/shapes and a checkpoint's (None: it fits)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    details = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if names:
            details.append(f"{label} ({len(names)}): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    return "; ".join(details) or None


def check_fits(named: Mapping[str, torch.nn.Parameter], weights: Mapping[str, torch.Tensor], *, source: str) -> None:
    """A checkpoint's weights fit the trainable parameters (names and whole shapes), or a ValueError listing why."""
    shapes = {n: torch.Size(getattr(p, "ds_shape", p.shape)) for n, p in named.items()}
    problem = trainable_mismatch(shapes, {n: w.shape for n, w in weights.items()})
    if problem:
        raise ValueError(f"checkpoint {source} does not fit the model (different LoRA rank/targets or base model?): {problem}")


def weights_finite(named: Mapping[str, torch.Tensor]) -> None:
    """Raise NonFiniteError naming the non-finite trainable tensors (checked before a publish)."""
    bad = [name for name, w in named.items() if not bool(torch.isfinite(w.detach()).all())]
    if bad:
        raise NonFiniteError(f"{len(bad)} trainable tensor(s) are non-finite after an optimizer step "
                             f"(e.g. {bad[0]}); the policy was not used further")


def named_trainables(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class TorchLearner:
    """The in-process learner: plain torch AdamW on the UNet's trainable parameters."""

    rank = 0
    world_size = 1

    def __init__(self, module: torch.nn.Module, cfg: TrainConfig):
        self.module = module
        self.cfg = cfg
        self.named = named_trainables(module)
        self.params = list(self.named.values())
        self.optimizer, self.schedule = build_optimizer(self.params, cfg)
        self._applied = 0

    def trainables(self) -> dict[str, torch.nn.Parameter]:
        return self.named

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values]

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        loss.backward()

    def backward_zero(self, zero_loss: Callable[[], torch.Tensor], *, boundary: bool, skip_step: bool) -> None:
        pass  # one process: a zero contribution needs no backward, and a step without gradients is skipped

    def step(self) -> StepOutcome:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads or not all(torch.isfinite(g).all() for g in grads):  # all dropped, or non-finite
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(False, float("nan"))
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._applied += 1
        return StepOutcome(True, grad_norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def applied_steps(self) -> int:
        return self._applied

    def full_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A trainable parameter's weight and Adam moments, whole, fp32, on the CPU (copies)."""
        param = self.named[name]
        out = {"weight": param.detach().float().cpu().clone()}
        state = self.optimizer.state.get(param, {})
        out.update({key: state[key].detach().float().cpu().clone() for key in ADAM_STATE_KEYS if key in state})
        return out

    def load_state(self, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], applied_steps: int) -> None:
        """A checkpoint's weights and moments by parameter name, Adam's step and the lr schedule at
        ``applied_steps``."""
        check_fits(self.named, weights, source="to load")
        with torch.no_grad():
            for name, param in self.named.items():
                param.copy_(weights[name].to(param.dtype))
        for name, param in self.named.items():
            found = {key: moments.get(f"{name}.{key}") for key in ADAM_STATE_KEYS}
            if any(v is None for v in found.values()):
                continue  # never stepped (e.g. a parameter that got no gradient yet)
            self.optimizer.state[param] = {
                "step": torch.tensor(float(applied_steps)),
                **{key: v.to(param.device, torch.float32).reshape(param.shape).clone() for key, v in found.items()},
            }
        self._applied = applied_steps
        set_schedule_position(self.optimizer, self.schedule, applied_steps)


def owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Each parameter to one rank, largest first to the least-loaded rank: whole tensors, about
    1/world of the bytes per rank (a pure function of names and sizes: every rank agrees)."""
    load = [0] * world
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += sizes[name]
    return out


def checkpoint_shard(learner: Learner) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's share of a checkpoint: the fp32 weights (DeepSpeed's master copy) and Adam
    moments of the parameters it owns, whole. Collective under ZeRO: every rank visits every
    parameter in the same order and keeps only its own, so a rank's host memory holds its share
    plus one parameter (SDXL full fine-tuning on 64 ranks: ~0.5 GB a rank instead of 31 GB)."""
    named = learner.trainables()
    sizes = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in named.items()}
    mine = owners(sizes, learner.world_size)
    weights, moments = {}, {}
    for name in sorted(named):
        tensors = learner.full_tensors(name)
        if mine[name] != learner.rank:
            continue
        weights[name] = tensors.pop("weight")
        moments.update({f"{name}.{key}": value for key, value in tensors.items()})
    return weights, moments


# ----------------------------------------------------------------------------- planning a round


def plan_microbatches(num: int, batch_size: int, *, seed: int, epoch: int, round_index: int) -> list[torch.Tensor]:
    """A round's transitions shuffled (a pure function of ids) and cut into global micro-batches
    of ``batch_size`` rows; rank r of w trains ``micro[i][r::w]``. The plan does not depend on
    the world size, so any number of ranks trains the same micro-batches as one process."""
    order = rng.permutation(num, "pair_shuffle", seed, epoch, round_index)
    return [order[lo : lo + batch_size] for lo in range(0, num, batch_size)]


def local_rows(global_rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of a global micro-batch (possibly empty for the last one)."""
    return global_rows[rank::world_size]


@dataclass
class RoundRows:
    """A round's transitions in canonical order: ``num`` of them, and how this rank gets the rows
    at global indices it was assigned (``take``) and some row it holds (``any_row``, for a
    zero-weight forward when its share is empty)."""

    num: int
    take: Callable[[torch.Tensor], dict[str, Any]]
    any_row: Callable[[], dict[str, Any]]


# ----------------------------------------------------------------------------- records


@dataclass
class StepRecord:
    """One optimizer step, the same keys from both engines (metrics.jsonl, MLflow, the console)."""

    step: int
    round: int
    epoch: int
    loss: float
    ratio_win: float
    ratio_lose: float
    clip_frac: float
    accuracy: float
    score_win: float
    score_lose: float
    score_margin: float
    lr: float
    grad_norm: float
    skipped: bool
    dropped_microbatches: int
    num_transitions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainState:
    """Counters the round loop carries across rounds (and a checkpoint carries across runs)."""

    global_step: int = 0
    micro_step: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0


# ----------------------------------------------------------------------------- one round


LossFn = Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


def train_round(
    learner: Learner,
    loss_fn: LossFn,
    rows: RoundRows,
    cfg: TrainConfig,
    state: TrainState,
    *,
    epoch: int,
    round_index: int,
) -> list[StepRecord]:
    """Train on one round's transitions: global micro-batches, accumulation, one record per step.

    Every rank calls it with the same ``rows.num``; collectives happen at the same points on
    every rank (one per micro-step, one per step). See the module docstring for the semantics.
    """
    if rows.num == 0:
        return []
    plan = plan_microbatches(rows.num, cfg.train_batch_size, seed=cfg.seed, epoch=epoch, round_index=round_index)
    accum = cfg.grad_accum_steps
    records = []
    learner.module.train()
    try:
        for lo in range(0, len(plan), accum):
            records.append(_train_step(learner, loss_fn, rows, plan[lo : lo + accum], state, epoch, round_index, cfg))
    finally:
        learner.module.eval()
    return records


def _train_step(learner: Learner, loss_fn: LossFn, rows: RoundRows, window: list[torch.Tensor], state: TrainState,
                epoch: int, round_index: int, cfg: TrainConfig) -> StepRecord:
    rank, world, micro_steps = learner.rank, learner.world_size, len(window)
    sums: list[float] = []  # per micro-step: stats x local rows ..., local rows
    dropped = 0
    for j, global_rows in enumerate(window):
        boundary = j == micro_steps - 1
        mine = local_rows(global_rows, rank, world)
        batch = rows.take(mine) if len(mine) else rows.any_row()
        loss, stats = loss_fn(batch)
        n_local = len(mine)
        nonfinite = learner.all_reduce_sum([0.0 if torch.isfinite(loss) or n_local == 0 else 1.0])[0] > 0
        state.micro_step += 1
        if nonfinite or n_local == 0:
            dropped += int(nonfinite)
            finite_loss = bool(torch.isfinite(loss))

            def zero_loss(loss: torch.Tensor = loss, batch: dict[str, Any] = batch, finite: bool = finite_loss) -> torch.Tensor:
                # A zero through the whole graph: every trainable parameter gets an exact zero.
                return loss * 0.0 if finite else loss_fn(rows.any_row())[0].nan_to_num() * 0.0

            # The last micro-batch of a step whose micro-batches were all dropped: the step is skipped.
            learner.backward_zero(zero_loss, boundary=boundary, skip_step=boundary and dropped == micro_steps)
            sums += [0.0] * (len(LOSS_STATS) + 2)
            continue
        learner.backward(loss * (n_local * world / len(global_rows) / micro_steps), boundary=boundary)
        sums += [float(loss.detach()) * n_local] + [stats[k] * n_local for k in LOSS_STATS] + [float(n_local)]
    width = len(LOSS_STATS) + 2
    totals = learner.all_reduce_sum(sums)
    means = [
        [totals[j * width + i] / totals[j * width + width - 1] for i in range(width - 1)]
        for j in range(micro_steps) if totals[j * width + width - 1] > 0
    ]
    outcome = learner.step()
    state.global_step += 1
    if dropped or not outcome.applied:
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
    else:
        state.nonfinite_in_a_row = 0
    mean = [sum(m[i] for m in means) / len(means) if means else float("nan") for i in range(width - 1)]
    named = dict(zip(("loss", *LOSS_STATS), mean, strict=True))
    record = StepRecord(
        step=state.global_step, round=round_index, epoch=epoch, **named,
        score_margin=named["score_win"] - named["score_lose"], lr=learner.lr(), grad_norm=outcome.grad_norm,
        skipped=not outcome.applied, dropped_microbatches=dropped, num_transitions=sum(len(g) for g in window),
    )
    check_nonfinite_streak(state.nonfinite_in_a_row, cfg.max_nonfinite_steps)
    return record
