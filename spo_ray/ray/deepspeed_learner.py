"""The DeepSpeed learner (ZeRO 0-3) and the DeepSpeed config every trainer here builds.

``DeepSpeedLearner`` implements :class:`spo_ray.learner.Learner` over a DeepSpeed engine with the
same meaning of every ``train.*`` setting as the in-process ``TorchLearner`` (see learner.py):
the caller scales each micro-batch's loss (``engine.backward(..., scale_wrt_gas=False)``), the
accumulation boundary is set explicitly, a micro-batch dropped as non-finite back-propagates an
exact zero on every rank, and a step is skipped when its reduced gradient is non-finite (ZeRO
1-3 detect that themselves and skip the update; at stage 0 the learner checks the all-reduced
``param.grad``) or when all its micro-batches were dropped (the engine is then not stepped: the
accumulated gradient is exactly zero and the next window accumulates onto it).

Optimizer state leaves and enters by parameter name (DeepSpeed's ``safe_get/set_full_optimizer_state``),
whole and fp32, so checkpoints are independent of the world size and of the engine.
Collective under ZeRO: every rank calls ``optimizer_state``/``load_optimizer_state``/``gathered``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from spo_ray.learner import (
    ADAM_STATE_KEYS,
    StepOutcome,
    build_optimizer,
    named_trainables,
    set_schedule_position,
)
from spo_ray.ray.common import all_reduce_sum


def deepspeed_config(
    *,
    micro_batch: int,
    grad_accum_steps: int,
    max_grad_norm: float | None,
    bf16: bool,
    zero_stage: int,
    offload_optimizer: bool = False,
) -> dict[str, Any]:
    """DeepSpeed's config for a torch optimizer (no fused op to compile on CPU).

    ``gradient_clipping`` is DeepSpeed's own: under ZeRO-1/2 ``param.grad`` is freed after the
    reduction, so ``clip_grad_norm_`` on module parameters would clip nothing there."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedLearner:
    """A trainable module under DeepSpeed with the learner interface (one per trainer rank)."""

    def __init__(self, module: torch.nn.Module, cfg: Any, device: torch.device):
        import deepspeed
        import torch.distributed as dist

        self.cfg = cfg.train
        self.device = device
        self.zero_stage = cfg.ray.zero_stage
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.named = named_trainables(module)
        optimizer, schedule = build_optimizer(list(self.named.values()), cfg.train)
        micro = -(-cfg.train.train_batch_size // self.world_size)  # the per-rank share of a global micro-batch
        config = deepspeed_config(
            micro_batch=micro, grad_accum_steps=cfg.train.grad_accum_steps, max_grad_norm=cfg.train.max_grad_norm,
            bf16=device.type == "cuda" and cfg.train.mixed_precision != "fp32", zero_stage=self.zero_stage,
            offload_optimizer=cfg.ray.offload_optimizer,
        )
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=config
        )
        self.inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW under ZeRO
        self.module = self.engine
        self._applied = 0

    def trainables(self) -> dict[str, torch.nn.Parameter]:
        return self.named

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return all_reduce_sum(values, self.device)

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)  # train_round scales each micro-batch itself
        if not boundary:
            self.engine.step()  # advances DeepSpeed's micro-step bookkeeping; no update off the boundary

    def backward_zero(self, zero_loss: Callable[[], torch.Tensor], *, boundary: bool) -> None:
        self.backward(zero_loss(), boundary=boundary)  # every rank joins the reduction hooks

    def step(self) -> StepOutcome:
        grad_norm = None
        if self.zero_stage == 0:  # the torch optimizer steps on the all-reduced param.grad as is
            grads = [p.grad for p in self.named.values() if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else float("nan")
            if not math.isfinite(grad_norm):
                self.discard()
                return StepOutcome(False, float("nan"))
        self.engine.step()
        if not self.engine.was_step_applied():  # ZeRO found a non-finite gradient and skipped
            return StepOutcome(False, float("nan"))
        self._applied += 1
        if grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        return StepOutcome(True, grad_norm)

    def discard(self) -> None:
        self.engine.zero_grad()

    def lr(self) -> float:
        return float(self.inner.param_groups[0]["lr"])

    def applied_steps(self) -> int:
        return self._applied

    @contextlib.contextmanager
    def gathered(self, everything: bool = False) -> Iterator[None]:
        """Whole trainable parameters (all parameters with ``everything``) on every rank for the
        duration: ZeRO-3 partitions them. Collective."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        params = list(self.engine.module.parameters()) if everything else list(self.named.values())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def trainable_weights(self) -> dict[str, torch.Tensor] | None:
        """The trainable weights on CPU on rank 0 (None elsewhere); collective under ZeRO-3."""
        with self.gathered():
            if self.rank != 0:
                return None
            return {name: p.detach().cpu().clone() for name, p in self.named.items()}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Adam moments per trainable parameter name, whole (not partitioned). Collective."""
        from deepspeed.utils import safe_get_full_optimizer_state

        out = {}
        for name, param in self.named.items():
            for key in ADAM_STATE_KEYS:
                value = safe_get_full_optimizer_state(param, key)
                if value is None:  # ZeRO stage 0: the torch optimizer holds per-parameter state
                    value = self.inner.state.get(param, {}).get(key)
                if value is not None:  # ZeRO-3 holds an empty placeholder; ds_shape is the whole shape
                    out[f"{name}.{key}"] = value.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape)).clone()
        return out

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], applied_steps: int) -> None:
        """Inverse of :meth:`optimizer_state` (every rank calls it), with Adam's step counters and
        the lr schedule set to ``applied_steps``."""
        from deepspeed.utils import safe_set_full_optimizer_state

        # torch's Adam creates its state at the first step, and ZeRO links each parameter to its
        # fragment of that state only then: create it now (zeros) and link, so it can be filled.
        # (ZeRO-3 hands its fp32 partitions to the optimizer one sub-group at a time, so they are
        # listed apart from its param_groups.)
        flats = [p for group in self.inner.param_groups for p in group["params"]]
        flats += list(getattr(self.optimizer, "fp32_partitioned_groups_flat", []))
        for flat in flats:
            if not self.inner.state[flat]:
                self.inner.state[flat].update(
                    step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat)
                )
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()
        for name, param in self.named.items():
            for key in ADAM_STATE_KEYS:
                value = tensors.get(f"{name}.{key}")
                if value is None:
                    continue
                if hasattr(param, "ds_id"):
                    _set_zero3_state(param, value, key)
                elif hasattr(param, "_hp_mapping"):
                    safe_set_full_optimizer_state(param, value.to(param.device), key)
                else:
                    self.inner.state[param][key] = value.to(param.device).reshape(param.shape).clone()
        for state in self.inner.state.values():
            state["step"] = torch.tensor(float(applied_steps))
        self._applied = applied_steps
        set_schedule_position(self.inner, self.schedule, applied_steps)


def _set_zero3_state(param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This rank's partition of a whole optimizer-state tensor under ZeRO-3.

    DeepSpeed's ``safe_set_full_optimizer_state`` narrows the unpadded tensor at
    ``partition size x rank``, which fails for a parameter smaller than the world's padded
    partitions (e.g. a 4-element bias on 8+ ranks: every SDXL UNet has some). The same copy,
    from the tensor zero-padded to ``partition size x world``."""
    import torch.distributed as dist

    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    size, rank = part.numel(), optimizer._get_param_partition_rank(param)
    padded = torch.zeros(size * dist.get_world_size(), dtype=part.dtype)
    padded[: value.numel()] = value.flatten().to(part.dtype)
    part.data.copy_(padded[size * rank : size * (rank + 1)].to(part.device))
