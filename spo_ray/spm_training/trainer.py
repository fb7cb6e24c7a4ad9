"""One Ray Train worker: the SPM under DeepSpeed; train on the stream, evaluate per timestep bucket, save."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo_ray.spm_training.config import CHECKPOINT_NAME, SPMConfig, spm_config_from_dict
from spo_ray.spm_training.data import bucket_names, bucket_of

log = logging.getLogger(__name__)

def pair_cross_entropy(logits: torch.Tensor, label_0: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy of the two scores ``[B, 2]`` against [label_0, 1 - label_0] (a tie: 0.5 / 0.5)."""
    target = torch.stack([label_0, 1.0 - label_0], dim=-1).to(logits.dtype)
    return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1)


def preference_loss(logits: torch.Tensor, label_0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`pair_cross_entropy` with each example weighted by ``weight`` (1 / examples-per-prompt),
    normalised over the batch, as PickScore trains."""
    w = weight.to(logits.dtype)
    return (pair_cross_entropy(logits, label_0) * w).sum() / w.sum().clamp(min=1e-12)


def pair_logits(spm, tokenizer, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """``[B, 2]`` SPM scores of (image_0, image_1) at the row's t; the prompt is encoded once per pair."""
    from spo_ray.models import module_dtype

    prompts = [str(p) for p in batch["prompt"]]
    max_len = int(spm.model.config.text_config.max_position_embeddings)
    enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    text = spm.text_embeds(enc["input_ids"].to(device), enc["attention_mask"].to(device))
    dtype = module_dtype(spm)
    # torch.tensor copies: Ray hands out read-only arrays.
    px = torch.cat([torch.tensor(batch["pixels_0"]), torch.tensor(batch["pixels_1"])]).to(device, dtype)
    t = torch.tensor(batch["t"]).to(device).repeat(2)
    scores = spm.score(px, t, text.repeat(2, 1))
    return torch.stack(scores.float().chunk(2), dim=-1)


def _correct(logits: torch.Tensor, label_0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) per row: ties (label 0.5) are not counted."""
    counted = label_0 != 0.5
    return ((logits[:, 0] > logits[:, 1]) == (label_0 > 0.5)) & counted, counted


def _final_state(engine, bf16: bool) -> dict[str, torch.Tensor]:
    """fp32 weights on CPU (every rank calls: under bf16 the fp32 masters are gathered collectively)."""
    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    if bf16:
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None:
                state[name] = full.detach().float().cpu().reshape(p.shape)
    state["model.logit_scale"] = state["model.logit_scale"].reshape(())  # the released layout's scalar
    return state


def _start_tracking(cfg: SPMConfig) -> Any:
    """Rank 0's MLflow run (as the SPO engines': one store per output dir, the config as params)."""
    from spo_ray.tracking import RunTracker

    tracker = RunTracker(cfg, engine="ray-spm", background=True)  # duck-typed: SPMConfig has the fields it reads
    tracker.start()
    tracker.set_tags({"spo_ray.kind": "spm-training"})
    return tracker


def _finish_tracking(tracker: Any, summary: dict[str, Any], step: int, final: Path) -> str | None:
    """Held-out accuracy per bucket (``eval/accuracy/<bucket>``, untrained beside it), the SPM
    files and the summary; the run's id."""
    metrics = {f"eval/accuracy/{b['bucket']}": b["accuracy"] for b in summary["eval_buckets"]}
    metrics.update({f"eval/initial_accuracy/{b['bucket']}": b.get("initial_accuracy") for b in summary["eval_buckets"]})
    metrics["eval/accuracy"] = summary["eval_accuracy"]
    tracker.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=step)
    tracker.log_artifact(final, "final")
    tracker.log_dict(summary, "trainer_summary.json")
    tracker.end("FINISHED")
    return tracker.run_id


def spm_train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the SPM under DeepSpeed; train on the stream, evaluate per bucket, save."""
    import deepspeed
    import ray.train

    from spo_ray.learner import build_optimizer
    from spo_ray.ray.common import all_reduce_sum, trainer_device, worker_setup
    from spo_ray.ray.deepspeed_learner import bf16_training, deepspeed_config
    from spo_ray.spm import StepAwarePreferenceModel, load_clip_processor

    cfg = spm_config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_setup(cfg.ray, "trainer")
    device = trainer_device(cfg.ray.trainer)
    torch.manual_seed(cfg.train.seed)
    spm = StepAwarePreferenceModel.from_pretrained(cfg.spm.clip_dir, cfg.spm.init_checkpoint, device=device)
    spm.train().requires_grad_(True)
    # DeepSpeed's initial parameter broadcast cannot send a 0-dim tensor on CPU (gloo): hold CLIP's scalar
    # logit_scale as shape [1] while training (it broadcasts the same) and restore [] when saving.
    spm.model.logit_scale = torch.nn.Parameter(spm.model.logit_scale.detach().reshape(1))
    tokenizer = load_clip_processor(cfg.spm.processor_dir or cfg.spm.clip_dir)
    t = cfg.train
    optimizer, schedule = build_optimizer(list(spm.parameters()), t)  # the one AdamW (weight decay 0.3 here)
    ds_config = deepspeed_config(micro_batch=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                                 max_grad_norm=t.max_grad_norm, bf16=bf16_training(t, device), zero_stage=cfg.ray.zero_stage)
    engine, _, _, schedule = deepspeed.initialize(model=spm, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    edges = cfg.eval.bucket_edges
    run_dir = cfg.run_dir
    metrics_path = run_dir / "metrics.jsonl"
    started = time.time()
    step, rows, window = 0, 0, []
    epochs_seen: set[int] = set()
    tracker = _start_tracking(cfg) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_batches(
        batch_size=t.batch_size, batch_format="numpy", drop_last=True,  # equal batches: ranks step together
        local_shuffle_buffer_size=t.shuffle_buffer or None, local_shuffle_seed=t.seed + rank,
    )
    for batch in batches:
        new = set(batch["epoch"].tolist()) - epochs_seen
        if rank == 0 and new:
            log.info("epoch %d/%d: first rows arrived after %d rows", max(new) + 1, t.epochs, rows)
        epochs_seen |= new
        logits = pair_logits(engine.module, tokenizer, batch, device)
        label_0 = torch.tensor(batch["label_0"], device=device)
        loss = preference_loss(logits, label_0, torch.tensor(batch["weight"], device=device))
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        correct, counted = _correct(logits.detach(), label_0)
        window.append((float(loss.detach()), int(correct.sum()), int(counted.sum())))
        rows += len(batch["t"])
        if not boundary:
            continue
        step += 1
        if step % cfg.run.log_every == 0:
            total = all_reduce_sum([sum(w[0] for w in window), len(window), sum(w[1] for w in window), sum(w[2] for w in window)], device)
            record = {
                "kind": "step", "step": step, "loss": total[0] / max(total[1], 1),
                "train_accuracy": total[2] / max(total[3], 1), "lr": schedule.get_last_lr()[0],
                "rows": rows * world, "rows_per_s": rows * world / max(time.time() - started, 1e-9),
            }
            window = []
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                tracker.log_metrics({k: record[k] for k in ("loss", "train_accuracy", "lr", "rows_per_s")}, step=step)
                log.info("step %d | rows %d | loss %.4f | train acc %.3f | lr %.2e | rows/s %.1f", step, record["rows"],
                         record["loss"], record["train_accuracy"], record["lr"], record["rows_per_s"])
    train_seconds = time.time() - started

    # Held-out accuracy per timestep bucket (ties excluded), summed over ranks.
    engine.eval()
    n_buckets = len(edges) - 1
    sums = np.zeros((5, n_buckets))  # correct, counted, loss sum, rows, correct before training
    eval_shard = ray.train.get_dataset_shard("eval") if config["has_eval"] else None
    initial = None
    if eval_shard is not None and cfg.eval.include_initial:  # the same deterministic load as the start
        initial = StepAwarePreferenceModel.from_pretrained(cfg.spm.clip_dir, cfg.spm.init_checkpoint, device=device)
    if eval_shard is not None:
        with torch.no_grad():
            for batch in eval_shard.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
                logits = pair_logits(engine.module, tokenizer, batch, device)
                label_0 = torch.tensor(batch["label_0"], device=device)
                correct, counted = _correct(logits, label_0)
                before = _correct(pair_logits(initial, tokenizer, batch, device), label_0)[0] if initial else correct
                b = bucket_of(batch["t"], edges)
                per_row = (correct, counted, pair_cross_entropy(logits, label_0), torch.ones_like(label_0), before)
                for col, values in enumerate(per_row):
                    np.add.at(sums[col], b, values.float().cpu().numpy())
    sums = np.array(all_reduce_sum(sums.reshape(-1).tolist(), device)).reshape(5, n_buckets)
    state = _final_state(engine, ds_config["bf16"]["enabled"])
    total_rows = all_reduce_sum([rows], device)[0]
    if rank == 0:
        buckets = [
            {"bucket": name, "t_min": lo, "t_max": hi - 1, "rows": int(sums[3, i]), "pairs_counted": int(sums[1, i]),
             "ties": int(sums[3, i] - sums[1, i]), "accuracy": sums[0, i] / sums[1, i] if sums[1, i] else None,
             "loss": sums[2, i] / sums[3, i] if sums[3, i] else None,
             **({"initial_accuracy": sums[4, i] / sums[1, i] if sums[1, i] else None} if initial else {})}
            for i, (name, lo, hi) in enumerate(zip(bucket_names(edges), edges, edges[1:], strict=False))
        ]
        final = run_dir / "final"
        out = StepAwarePreferenceModel.from_pretrained(cfg.spm.clip_dir)
        out.load_state_dict(state)
        bin_path = out.save_released_format(final / f"{CHECKPOINT_NAME}.bin")
        st_path = out.save_safetensors(final / f"{CHECKPOINT_NAME}.safetensors")
        summary = {
            "checkpoint": str(bin_path), "checkpoint_safetensors": str(st_path), "optimizer_steps": step,
            "train_rows": int(total_rows), "world_size": world, "train_seconds": train_seconds,
            "eval_buckets": buckets,
            "accuracy_by_bucket": {b["bucket"]: b["accuracy"] for b in buckets},
            **({"initial_accuracy_by_bucket": {b["bucket"]: b["initial_accuracy"] for b in buckets}} if initial else {}),
            "eval_accuracy": float(sums[0].sum() / sums[1].sum()) if sums[1].sum() else None,
        }
        summary["mlflow_run_id"] = _finish_tracking(tracker, summary, step, final)
        (run_dir / "trainer_summary.json").write_text(json.dumps(summary, indent=2))
        for b in buckets:
            acc = "-" if b["accuracy"] is None else f"{b['accuracy']:.3f}"
            before = f" (untrained {b['initial_accuracy']:.3f})" if b.get("initial_accuracy") is not None else ""
            log.info("eval t %7s: accuracy %s%s on %d pairs, %d ties", b["bucket"], acc, before, b["pairs_counted"], b["ties"])
    ray.train.report({"optimizer_steps": step})
