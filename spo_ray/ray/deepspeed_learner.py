"""The DeepSpeed learner (ZeRO 0-3) and the DeepSpeed config every trainer here builds.

``DeepSpeedLearner`` implements :class:`spo_ray.learner.Learner` over a DeepSpeed engine with the
same meaning of every ``train.*`` setting as the in-process ``TorchLearner`` (see learner.py):
the caller scales each micro-batch's loss (``engine.backward(..., scale_wrt_gas=False)``), the
accumulation boundary is set explicitly, a micro-batch dropped as non-finite back-propagates an
exact zero on every rank, and a step is skipped when its reduced gradient is non-finite (ZeRO
1-3 detect that themselves, skip the update and clear their partitioned buffers; at stage 0 the
learner checks the all-reduced ``param.grad``) or when all its micro-batches were dropped (its
last backward is made non-finite on purpose, so that the same path skips it: not stepping the
engine would leave ZeRO-3's accumulated partitions behind for the next step).

Weights (DeepSpeed's fp32 masters) and optimizer state leave and enter by parameter name
(DeepSpeed's ``safe_get/set_full_fp32_param`` / ``_optimizer_state``), whole and fp32, so
checkpoints are independent of the world size and of the engine, and a bf16 resume is exact.
Collective under ZeRO: every rank calls ``full_tensors``/``load_state``/``trainable_weights``/``gathered``.
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
    extra: dict[str, Any] = {}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # The torch AdamW steps the offloaded fp32 partitions on the CPU (DeepSpeed would insist on
        # its own compiled CPU Adam otherwise): the same optimizer and state layout everywhere.
        extra["zero_force_ds_cpu_optimizer"] = False
    return {
        **extra,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def bf16_training(train_cfg: Any, device: torch.device) -> bool:
    """bf16 weights with fp32 masters: ``auto`` on a GPU, ``bf16`` anywhere (the CPU too, for tests)."""
    mode = train_cfg.mixed_precision
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


class DeepSpeedLearner:
    """A trainable module under DeepSpeed with the learner interface (one per trainer rank)."""

    def __init__(self, module: torch.nn.Module, cfg: Any, device: torch.device, *, micro_batch: int | None = None):
        """``cfg``: an SPO config, or any with its train.* optimizer fields and ray.zero_stage (SPM
        training, which gives its per-rank ``micro_batch`` instead of a global one)."""
        import deepspeed
        import torch.distributed as dist

        self.cfg = cfg.train
        self.device = device
        self.zero_stage = cfg.ray.zero_stage
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.named = named_trainables(module)
        optimizer, schedule = build_optimizer(list(self.named.values()), cfg.train)
        micro = micro_batch or -(-cfg.train.train_batch_size // self.world_size)  # per rank: a global micro-batch's share
        config = deepspeed_config(
            micro_batch=micro, grad_accum_steps=cfg.train.grad_accum_steps, max_grad_norm=cfg.train.max_grad_norm,
            bf16=bf16_training(cfg.train, device), zero_stage=self.zero_stage,
            offload_optimizer=getattr(cfg.ray, "offload_optimizer", False),
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

    def backward_zero(self, zero_loss: Callable[[], torch.Tensor], *, boundary: bool, skip_step: bool) -> None:
        """Every rank joins the reduction hooks with an exact zero; for a step to skip, with a
        non-finite one: ZeRO's overflow check then skips the update and clears its partitioned
        gradient buffers itself (at stage 0 ``step`` sees it in ``param.grad``)."""
        loss = zero_loss()
        self.backward(loss * float("nan") if skip_step else loss, boundary=boundary)

    def step(self) -> StepOutcome:
        grad_norm = None
        if self.zero_stage == 0:  # the torch optimizer steps on the all-reduced param.grad as is
            grads = [p.grad for p in self.named.values() if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else float("nan")
            if not math.isfinite(grad_norm):
                self.engine.zero_grad()
                return StepOutcome(False, float("nan"))
        self.engine.step()
        if not self.engine.was_step_applied():  # ZeRO found a non-finite gradient and skipped
            return StepOutcome(False, float("nan"))
        self._applied += 1
        if grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        return StepOutcome(True, grad_norm)

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
        """What samplers load, on rank 0 (None elsewhere): LoRA as its fp32 master weights, full
        fine-tuning in the module's dtype (bf16 on GPU, what the samplers run). Collective under ZeRO."""
        if self.cfg.lora:
            out = {name: self._master(param) for name, param in self.named.items()}
            return out if self.rank == 0 else None
        with self.gathered():
            if self.rank != 0:
                return None
            return {name: p.detach().cpu().clone() for name, p in self.named.items()}

    def _master(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master of a parameter, whole, on the CPU (collective under ZeRO)."""
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is None:  # ZeRO stage 0 in fp32: the parameter is its own master
            value = param.detach()
        return value.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape)).clone()

    def full_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A parameter's fp32 master weight and Adam moments, whole, on the CPU. Collective."""
        from deepspeed.utils import safe_get_full_optimizer_state

        param = self.named[name]
        out = {"weight": self._master(param)}
        for key in ADAM_STATE_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:  # ZeRO stage 0: the torch optimizer holds per-parameter state
                value = self.inner.state.get(param, {}).get(key)
            if value is not None:  # ZeRO-3 holds an empty placeholder; ds_shape is the whole shape
                out[key] = value.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape)).clone()
        return out

    def load_state(self, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], applied_steps: int) -> None:
        """A checkpoint's fp32 master weights and Adam moments (every rank calls it), with Adam's
        step counters and the lr schedule set to ``applied_steps``. The module's weights were loaded
        before DeepSpeed started (they are the masters in the module's dtype); setting the masters
        here makes a bf16 resume exact too."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

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
            if hasattr(param, "ds_id"):
                _set_zero3_state(param, weights[name], None)
            elif hasattr(param, "_hp_mapping"):
                safe_set_full_fp32_param(param, weights[name].to(param.device))
            else:
                with torch.no_grad():
                    param.copy_(weights[name].to(param.device, param.dtype).reshape(param.shape))
            for key in ADAM_STATE_KEYS:
                value = moments.get(f"{name}.{key}")
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


def _set_zero3_state(param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's partition of a whole fp32 master (``key`` None) or optimizer-state tensor under ZeRO-3.

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
