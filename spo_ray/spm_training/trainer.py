"""One Ray Train worker: the SPM under DeepSpeed; train on the stream, evaluate per timestep bucket, save."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo_ray.spm_training.config import CHECKPOINT_NAME, SPMConfig, spm_config_from_dict
from spo_ray.spm_training.data import bucket_names, bucket_of, keyed_shuffle

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


def _start_tracking(cfg: SPMConfig, resume_run_id: str | None) -> Any:
    """Rank 0's MLflow run (as the SPO engines': one store per output dir, the config as params); a
    resume continues the checkpoint's run and logs no step twice."""
    from spo_ray.tracking import RunTracker

    tracker = RunTracker(cfg, engine="ray-spm", background=True)  # duck-typed: SPMConfig has the fields it reads
    tracker.start(resume_run_id=resume_run_id)
    tracker.set_tags({"spo_ray.kind": "spm-training"})
    return tracker


@dataclass
class SPMProgress:
    """What an SPM checkpoint saves besides tensors (``RunProgress.extra``); with the consumed rows
    (per-rank ``extra`` shards: epoch and example id of every row trained on) a resume continues
    exactly where the checkpoint was taken."""

    step: int = 0  # optimizer steps (accumulation boundaries)
    rows: int = 0  # training rows consumed, all ranks
    seconds: float = 0.0  # training time before this attempt
    window: list[float] = field(default_factory=lambda: [0.0] * 4)  # loss sum, micro-batches, correct, counted since the last log


class ConsumedRows:
    """Epoch and example id of every training row this rank trained on (8 + 8 bytes a row: SPM
    training on Pick-a-Pic v2's ~1 M pairs keeps 16 MB an epoch, split over the ranks); rank 0
    also carries those of the checkpoint it resumed from."""

    def __init__(self, earlier: list[dict[str, torch.Tensor]] | None = None):
        self.parts = [(s["epoch"].numpy(), s["example_id"].numpy()) for s in earlier or []]

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.parts.append((np.asarray(batch["epoch"], np.int64), np.asarray(batch["example_id"], np.int64)))

    def tensors(self) -> dict[str, torch.Tensor]:
        epochs = np.concatenate([p[0] for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        ids = np.concatenate([p[1] for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        return {"epoch": torch.from_numpy(epochs.astype(np.int64)), "example_id": torch.from_numpy(ids.astype(np.int64))}


def consumed_by_epoch(shards: list[dict[str, torch.Tensor]]) -> dict[int, np.ndarray]:
    """A checkpoint's consumed rows (every rank's shard) as sorted example ids per epoch."""
    if not shards:
        return {}
    epochs = np.concatenate([s["epoch"].numpy() for s in shards])
    ids = np.concatenate([s["example_id"].numpy() for s in shards])
    return {int(e): np.sort(ids[epochs == e]) for e in np.unique(epochs)}


def _read_resume(spm: torch.nn.Module, path: Path, rank: int) -> tuple[tuple[Any, ...], SPMProgress, ConsumedRows]:
    """A checkpoint's weights into the module (before DeepSpeed starts: they become its working
    copy) and what ``learner.load_state`` then takes; its progress and (rank 0) consumed rows."""
    from spo_ray.checkpointing import extra_shards, load_checkpoint, load_trainable_weights

    run, weights, moments = load_checkpoint(path)
    load_trainable_weights(spm, weights, source=str(path))
    progress = SPMProgress(**run.extra["spm"])
    if rank != 0:  # the window's sums were all-reduced when saved: rank 0 carries them
        progress.window = [0.0] * 4
    log.info("resuming from %s: step %d, %d rows trained", path, progress.step, progress.rows)
    return (weights, moments, run.applied_steps), progress, ConsumedRows(extra_shards(path) if rank == 0 else None)


def _checkpoint(cfg: SPMConfig, learner: Any, progress: SPMProgress, consumed: ConsumedRows,
                mlflow_run_id: str | None, rank: int, world: int) -> None:
    """Every rank writes its share (the parameters it owns, whole, fp32 masters and Adam moments)
    and its consumed rows; rank 0 the state (checkpointing.save_checkpoint: atomic, pruned)."""
    from spo_ray.checkpointing import RunProgress, save_checkpoint
    from spo_ray.learner import checkpoint_shard

    started = time.time()
    weights, moments = checkpoint_shard(learner)
    run = RunProgress(position=progress.step, applied_steps=learner.applied_steps(), mlflow_run_id=mlflow_run_id,
                      engine="ray-spm", extra={"spm": asdict(progress)})
    path = save_checkpoint(cfg.run_dir, run, weights=weights, optimizer=moments, keep=cfg.run.keep_checkpoints,
                           rank=rank, world=world, barrier=lambda: learner.all_reduce_sum([0.0]), extra=consumed.tensors())
    if path is not None:
        log.info("checkpoint %s (%.1f s)", path, time.time() - started)


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


def _stopped_early(reason: str, *, step: int, skipped: int, rows: int, world: int, run_dir: Path, tracker: Any,
                   device: torch.device) -> None:
    """A run stopped by diverged training: no evaluation and no final weights; the summary says why
    and which checkpoint a resume (after the cause is fixed) would start from."""
    from spo_ray.checkpointing import latest_checkpoint
    from spo_ray.ray.common import all_reduce_sum

    total_rows = all_reduce_sum([rows], device)[0]
    if tracker is None:
        return
    latest = latest_checkpoint(run_dir)
    reason += f"; the latest checkpoint stands: {latest}" if latest else "; no checkpoint was written before it"
    log.error("%s", reason)
    summary = {"stopped_by": reason, "optimizer_steps": step, "skipped_steps_this_attempt": skipped,
               "train_rows": int(total_rows), "world_size": world, "mlflow_run_id": tracker.run_id}
    tracker.log_dict(summary, "trainer_summary.json")
    tracker.end("FAILED")
    (run_dir / "trainer_summary.json").write_text(json.dumps(summary, indent=2))


def _report_step(step: int, window: list[float], lr: float, rows: int, rows_per_s: float, metrics_path: Path,
                 tracker: Any) -> None:
    """A step record from the window's sums over all ranks: metrics.jsonl, MLflow and the log (rank 0)."""
    if tracker is None:
        return
    record = {"kind": "step", "step": step, "loss": window[0] / max(window[1], 1),
              "train_accuracy": window[2] / max(window[3], 1), "lr": lr, "rows": rows, "rows_per_s": rows_per_s}
    with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    tracker.log_metrics({k: record[k] for k in ("loss", "train_accuracy", "lr", "rows_per_s")}, step=step)
    log.info("step %d | rows %d | loss %.4f | train acc %.3f | lr %.2e | rows/s %.1f", step, rows, record["loss"],
             record["train_accuracy"], lr, rows_per_s)


def spm_train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the SPM under DeepSpeed; train on the stream (checkpointing every
    ``run.checkpoint_every`` steps, resuming ``config["resume_from"]``), evaluate per bucket, save."""
    import ray.train

    from spo_ray.learner import NonFiniteError, check_nonfinite_streak
    from spo_ray.ray.common import all_reduce_sum, trainer_device, worker_setup
    from spo_ray.ray.deepspeed_learner import DeepSpeedLearner
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
    progress, mlflow_run_id, consumed = SPMProgress(), None, ConsumedRows()
    if config.get("resume_from"):
        state, progress, consumed = _read_resume(spm, Path(config["resume_from"]), rank)
        mlflow_run_id = config.get("mlflow_run_id")  # the run's own checkpoint: its MLflow run goes on
    # The one AdamW (weight decay 0.3 here) under DeepSpeed, as the SPO trainer's; micro-batches per rank.
    learner = DeepSpeedLearner(spm, cfg, device, micro_batch=t.batch_size)
    if config.get("resume_from"):
        learner.load_state(*state)  # fp32 masters, Adam moments, Adam's step and the lr schedule
    engine = learner.engine
    edges = cfg.eval.bucket_edges
    run_dir = cfg.run_dir
    metrics_path = run_dir / "metrics.jsonl"
    tracker = _start_tracking(cfg, mlflow_run_id) if rank == 0 else None
    mlflow_run_id = tracker.run_id if tracker is not None else None
    started, rows = time.time(), progress.rows // world  # this rank's rows (the split is equal)
    rows_at_start, micro, window, skipped, in_a_row = rows, 0, progress.window, 0, 0
    stopped_by: str | None = None
    newest_epoch = -1
    shard = ray.train.get_dataset_shard("train")
    chunks = shard.iter_batches(batch_size=t.batch_size, batch_format="numpy")
    for batch in keyed_shuffle(chunks, buffer_rows=t.shuffle_buffer, batch_size=t.batch_size, seed=t.seed):
        epoch = int(batch["epoch"].max())  # a resumed buffer may still release an earlier epoch's rows
        if rank == 0 and epoch > newest_epoch:
            log.info("epoch %d/%d: first rows trained after %d rows", epoch + 1, t.epochs, rows * world)
        newest_epoch = max(newest_epoch, epoch)
        logits = pair_logits(engine.module, tokenizer, batch, device)
        label_0 = torch.tensor(batch["label_0"], device=device)
        loss = preference_loss(logits, label_0, torch.tensor(batch["weight"], device=device))
        micro += 1
        boundary = micro % t.grad_accum_steps == 0
        learner.backward(loss / t.grad_accum_steps, boundary=boundary)
        correct, counted = _correct(logits.detach(), label_0)
        window = [a + b for a, b in zip(window, (float(loss.detach()), 1, int(correct.sum()), int(counted.sum())), strict=True)]
        rows += len(batch["t"])
        consumed.add(batch)
        if not boundary:
            continue
        progress.step += 1  # optimizer steps count skipped ones too, as SPO's accounting does
        if not learner.step().applied:  # a non-finite gradient: DeepSpeed skipped the update (on every rank)
            skipped, in_a_row = skipped + 1, in_a_row + 1
            log.warning("step %d: non-finite gradient, update skipped (%d so far)", progress.step, skipped)
            try:
                check_nonfinite_streak(in_a_row, t.max_nonfinite_steps)
            except NonFiniteError as err:  # no checkpoint at this step: the latest one stands
                stopped_by = str(err)
                break
        else:
            in_a_row = 0
        if progress.step % cfg.run.log_every == 0:
            rate = (rows - rows_at_start) * world / max(time.time() - started, 1e-9)
            _report_step(progress.step, all_reduce_sum(window, device), learner.lr(), rows * world, rate, metrics_path, tracker)
            window = [0.0] * 4
        if cfg.run.checkpoint_every and progress.step % cfg.run.checkpoint_every == 0:
            total = all_reduce_sum(window, device)  # saved summed; rank 0 carries them after a resume
            saved = SPMProgress(progress.step, rows * world, progress.seconds + time.time() - started, total)
            _checkpoint(cfg, learner, saved, consumed, mlflow_run_id, rank, world)
    train_seconds = progress.seconds + time.time() - started
    step = progress.step
    if stopped_by is not None:  # every rank broke at the same step (DeepSpeed's overflow check is global)
        _stopped_early(stopped_by, step=step, skipped=skipped, rows=rows, world=world, run_dir=run_dir,
                       tracker=tracker, device=device)
        ray.train.report({"optimizer_steps": step})
        return

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
    state = _final_state(engine, engine.bfloat16_enabled())
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
            "skipped_steps_this_attempt": skipped,
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
