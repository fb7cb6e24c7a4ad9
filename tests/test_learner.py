"""The one learner: ``train_round`` means the same with the in-process TorchLearner and with the
DeepSpeed learner at ZeRO 0, 2 and 3, on one rank and on two (gloo, spawned processes): the same
steps, the same non-finite handling (dropped micro-batches, skipped steps, max_nonfinite_steps)
and the same weights; optimizer state moves between them by parameter name, exactly; and every
collective's tensor is on the trainer's device (NCCL serves CUDA tensors only).

A small MLP stands in for the UNet (the learner does not care what it trains), so DeepSpeed's
real engine, ZeRO partitioning and gloo collectives run in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from spo_ray.checkpointing import (
    CheckpointWriter,
    RunProgress,
    file_entry,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from spo_ray.config import load_config
from spo_ray.learner import (
    LOSS_STATS,
    NonFiniteError,
    RoundRows,
    TorchLearner,
    TrainState,
    checkpoint_shard,
    plan_microbatches,
    train_round,
)

ROWS = 40  # transitions per round: micro-batches of 6 -> [6]*6 + [4], steps of 3 micro-batches -> [3, 3, 1]
ROUNDS = 4
SEED = 42  # the tiny-sd15 preset's


def _micro(round_index: int, *which: int) -> set[int]:
    """The rows of the given micro-batches of a round's plan (rows are shuffled into micro-batches)."""
    plan = plan_microbatches(ROWS, 6, seed=SEED, epoch=0, round_index=round_index)
    return {int(r) for i in which for r in plan[i]}


# round -> rows whose loss is NaN: one row of micro-batch 1; micro-batches 3..6 (steps 2 and 3); everything
# (Round 2 leaves row 0 finite: it is the zero-weight forward's row, whose exact zero must not
# turn a step of all-dropped micro-batches into an update.)
NAN_ROWS = {1: {min(_micro(1, 1))}, 2: _micro(2, 3, 4, 5, 6) - {0}, 4: set(range(ROWS))}
INF_GRAD_ROWS = {3: {min(_micro(3, 3))}}  # round -> a row whose backward is inf (its loss is finite)


def _cfg(stage: int = 2, max_nonfinite_steps: int = 5, offload: bool = False):
    return load_config("tiny-sd15", overrides=[f"ray.offload_optimizer={str(offload).lower()}",
        "train.train_batch_size=6", "train.grad_accum_steps=3", "train.learning_rate=0.05", "train.lr_warmup_steps=3",
        f"train.max_nonfinite_steps={max_nonfinite_steps}", f"ray.zero_stage={stage}",
    ])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _rows(round_index: int) -> RoundRows:
    gen = torch.Generator().manual_seed(round_index)
    data = {"x": torch.randn(ROWS, 8, generator=gen), "y": torch.randn(ROWS, generator=gen), "row": torch.arange(ROWS)}
    return RoundRows(ROWS, take=lambda idx: {k: v[idx] for k, v in data.items()},
                     any_row=lambda: {k: v[:1] for k, v in data.items()})


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _loss_fn(module: torch.nn.Module, round_index: int):
    def loss_fn(batch):
        out = module(batch["x"].to(next(module.parameters()).dtype)).squeeze(-1).float()
        rows = set(batch["row"].tolist())
        if rows & INF_GRAD_ROWS.get(round_index, set()):
            out = _InfGrad.apply(out)
        loss = (out - batch["y"]).pow(2).mean()
        if rows & NAN_ROWS.get(round_index, set()):
            loss = loss * float("nan")
        return loss, {k: float(batch["y"].mean()) for k in LOSS_STATS}

    return loss_fn


def _run(learner, cfg, rounds=range(ROUNDS), default_device=None) -> tuple[list[dict], TrainState]:
    state, records = TrainState(), []
    for r in rounds:
        rows, loss_fn = _rows(r), _loss_fn(learner.module, r)
        with torch.device(default_device) if default_device else contextlib.nullcontext():
            steps = train_round(learner, loss_fn, rows, cfg.train, state, epoch=0, round_index=r)
        records += [s.to_dict() for s in steps]
    return records, state


def _worker(rank: int, world: int, port: int, out: str, stages: list[int]) -> None:
    import torch.distributed as dist

    from spo_ray.ray.deepspeed_learner import DeepSpeedLearner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for stage in stages:
        cfg = _cfg(stage)
        learner = DeepSpeedLearner(_model(), cfg, torch.device("cpu"))
        # Tensors made without a device land on `meta` here, as they land on the CPU of a GPU worker
        # whose trainer device is cuda: a control value that is not on the trainer's device makes
        # the gloo collective fail as NCCL would. (Not at ZeRO-0: DeepSpeed's CPU-accelerator path
        # itself makes its buffers on the default device.)
        records, state = _run(learner, cfg, default_device="meta" if stage else None)
        # A sharded checkpoint (each rank writes the parameters it owns), read back whole, into a
        # fresh learner as the trainer resumes: exact, and it trains on alike.
        weights, moments = _checkpoint_roundtrip(learner, Path(out).parent / f"ckpt-{stage}", rank, world)
        model = _model()
        model.load_state_dict(weights)  # as the trainer does: weights in before DeepSpeed starts
        resumed = DeepSpeedLearner(model, cfg, torch.device("cpu"))
        resumed.load_state(weights, moments, learner.applied_steps())
        reloaded = _checkpoint_roundtrip(resumed, Path(out).parent / f"again-{stage}", rank, world)
        next_round = _run(resumed, cfg, rounds=[ROUNDS + 1])[0]
        try:  # round 4: every loss NaN -> 3 non-finite steps in a row, max 2
            train_round(learner, _loss_fn(learner.module, 4), _rows(4), _cfg(stage, 2).train, state, epoch=0, round_index=4)
            raised = None
        except NonFiniteError as err:
            raised = str(err)
        results[stage] = {"records": records, "weights": weights, "moments": moments, "reloaded": reloaded,
                          "applied": learner.applied_steps(), "next_round": next_round, "raised": raised,
                          "state": vars(state)}
    results["wait_for_round"] = _wait_for_a_round(rank, world)
    offload = _cfg(2, offload=True)  # ZeRO-2 with the optimizer offloaded to the CPU (the torch AdamW steps it)
    results["offload"] = _run(DeepSpeedLearner(_model(), offload, torch.device("cpu")), offload, rounds=[0, 1])[0]
    results["bf16_resume"] = {stage: _bf16_resume(rank, world, Path(out).parent / f"bf16-{stage}", stage)
                              for stage in stages if stage}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _bf16_resume(rank: int, world: int, run_dir: Path, stage: int) -> tuple[list[float], list[float]]:
    """Full fine-tuning in bf16 with DeepSpeed's fp32 masters: a run checkpointed after round 2 and
    resumed trains round 5 as the uninterrupted run does, to the bit (the masters are saved)."""
    from spo_ray.ray.deepspeed_learner import DeepSpeedLearner

    cfg = load_config("tiny-sd15", overrides=["train.train_batch_size=6", "train.grad_accum_steps=3",
                                              "train.learning_rate=0.05", f"ray.zero_stage={stage}",
                                              "train.mixed_precision=bf16", "train.lora=false"])
    cpu = torch.device("cpu")
    whole = DeepSpeedLearner(_model(), cfg, cpu)
    uninterrupted = [s["loss"] for s in _run(whole, cfg, rounds=[0, 1, 2, 5])[0] if s["round"] == 5]
    first = DeepSpeedLearner(_model(), cfg, cpu)
    _run(first, cfg, rounds=[0, 1, 2])
    weights, moments = _checkpoint_roundtrip(first, run_dir, rank, world)
    model = _model()
    model.load_state_dict(weights)
    resumed = DeepSpeedLearner(model, cfg, cpu)
    assert next(resumed.engine.module.parameters()).dtype == torch.bfloat16
    resumed.load_state(weights, moments, first.applied_steps())
    return uninterrupted, [s["loss"] for s in _run(resumed, cfg, rounds=[5])[0]]


def _wait_for_a_round(rank: int, world: int) -> tuple[int, int, int, int]:
    """The trainer's wait for a round's end (ledger status from rank 0 + pairs arrived per rank),
    under the `meta` default device: its one collective runs on the trainer's device."""
    from spo_ray.ray.stream import wait_for_round

    class Pump:  # rank r holds 3 + r pairs of the round
        def drain(self) -> None:
            pass

        def count(self, round_index: int) -> int:
            return 3 + rank

    kept = sum(3 + r for r in range(world))
    polls: list[int] = []

    def ledger_status() -> tuple[bool, int, int, int, int]:  # the round completes at the 2nd poll
        polls.append(1)
        return len(polls) >= 2, 10, kept, 10 - kept, 0

    with torch.device("meta"):
        return wait_for_round(Pump(), ledger_status, 0, rank, torch.device("cpu"), poll_s=0.01)


def _checkpoint_roundtrip(learner, run_dir: Path, rank: int, world: int) -> tuple[dict, dict]:
    """save_checkpoint of every rank's shard, then load_checkpoint of the whole (on every rank)."""
    weights, moments = checkpoint_shard(learner)

    def barrier() -> None:
        learner.all_reduce_sum([0.0])

    save_checkpoint(run_dir, RunProgress(position=1), weights=weights, optimizer=moments, rank=rank, world=world,
                    barrier=barrier)
    barrier()  # rank 0 has completed it
    # The Ray trainer's background writer, from the same shard: the same checkpoint, file for file.
    writer = CheckpointWriter(run_dir.with_name(run_dir.name + "-background"), rank=rank, world=world, keep=3,
                              barrier=barrier)
    writer.submit(RunProgress(position=1), weights=weights, optimizer=moments)
    written = writer.settle()
    assert written.error is None and (written.path is not None) == (rank == 0)
    barrier()
    _, weights, moments = load_checkpoint(latest_checkpoint(run_dir))
    folder = latest_checkpoint(run_dir)
    assert len(list(folder.glob("weights-*"))) == world
    # the manifest: every file, hashed by the rank that wrote it (no hash sidecar left behind)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert manifest == {f.name: file_entry(f) for f in folder.iterdir() if f.name != "manifest.json"}
    assert len(manifest) == 2 * world + 1  # weights and optimizer shards, state.json
    background = latest_checkpoint(run_dir.with_name(run_dir.name + "-background"))
    assert json.loads((background / "manifest.json").read_text())["files"] == manifest
    assert sorted(f.name for f in background.iterdir()) == sorted(f.name for f in folder.iterdir())
    return weights, moments


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process learner's run: records, weights, moments; the round-4 NonFiniteError."""
    cfg = _cfg()
    learner = TorchLearner(_model(), cfg.train)
    records, state = _run(learner, cfg)
    weights, moments = _checkpoint_roundtrip(learner, tmp_path_factory.mktemp("ckpt-in-process"), 0, 1)
    fresh = TorchLearner(_model(), cfg.train)
    fresh.load_state(weights, moments, learner.applied_steps())
    next_round = _run(fresh, cfg, rounds=[ROUNDS + 1])[0]
    with pytest.raises(NonFiniteError, match="max_nonfinite_steps=2"):
        train_round(learner, _loss_fn(learner.module, 4), _rows(4), _cfg(2, 2).train, state, epoch=0, round_index=4)
    return {"records": records, "weights": weights, "moments": moments, "applied": learner.applied_steps(),
            "next_round": next_round, "state": vars(state)}


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """DeepSpeed learners: ZeRO 0, 2, 3 on one rank; ZeRO 2 and 3 on two ranks (spawned, gloo)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    out = {}
    for world, stages in ((1, [0, 2, 3]), (2, [2, 3])):
        path = tmp_path_factory.mktemp(f"ds{world}") / "results.pt"
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(path), stages), nprocs=world, join=True)
        out[world] = torch.load(path, weights_only=False)  # our own file, written by the test's workers
    return out


def test_round_semantics_in_process(reference) -> None:
    """Hand-checkable counts: dropped micro-batches, skipped steps and the non-finite streak."""
    records = reference["records"]
    per_round = [[s for s in records if s["round"] == r] for r in range(ROUNDS)]
    assert [len(steps) for steps in per_round] == [3, 3, 3, 3]  # 7 micro-batches in steps of 3, 3, 1
    assert [s["num_transitions"] for s in per_round[0]] == [18, 18, 4]
    assert not any(s["skipped"] or s["dropped_microbatches"] for s in per_round[0])
    # round 1: row 7's micro-batch is dropped, its step goes on with the other two
    assert sum(s["dropped_microbatches"] for s in per_round[1]) == 1
    assert not any(s["skipped"] for s in per_round[1])
    # round 2: rows 18..39 fill the last 4 micro-batches: step 2 dropped whole (skipped), step 3 too
    assert [s["skipped"] for s in per_round[2]] == [False, True, True]
    assert [s["dropped_microbatches"] for s in per_round[2]] == [0, 3, 1]
    # round 3: an inf gradient (finite loss) skips the second step, and drops nothing; its first
    # step follows the skipped steps of round 2 directly (nothing of theirs may leak into it)
    assert [s["skipped"] for s in per_round[3]] == [False, True, False]
    assert not any(s["dropped_microbatches"] for s in per_round[3])
    assert all(torch.isfinite(w).all() for w in reference["weights"].values())
    assert reference["applied"] == 12 - 3  # 12 steps, 3 skipped: no update, no moment, no schedule step
    assert reference["state"]["nonfinite_in_a_row"] == 2  # round 4 raised at its 2nd non-finite step


@pytest.mark.parametrize(("world", "stage"), [(1, 0), (1, 2), (1, 3), (2, 2), (2, 3)])
def test_deepspeed_learner_matches_the_in_process_learner(reference, deepspeed_runs, world, stage) -> None:
    got = deepspeed_runs[world][stage]
    want = reference
    assert len(got["records"]) == len(want["records"])
    for a, b in zip(got["records"], want["records"], strict=True):
        for key in ("step", "round", "skipped", "dropped_microbatches", "num_transitions"):
            assert a[key] == b[key], (key, a, b)
        for key in ("loss", "grad_norm", "lr", "ratio_win"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7, nan_ok=True), (key, a, b)
    assert got["applied"] == want["applied"]
    for name, value in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6)
    assert got["moments"].keys() == want["moments"].keys()
    for name, value in want["moments"].items():
        torch.testing.assert_close(got["moments"][name], value, rtol=1e-4, atol=1e-8)
    # a checkpoint loads back exactly (weights and moments), and training continues as in process
    for saved, reloaded in zip((got["weights"], got["moments"]), got["reloaded"], strict=True):
        assert saved.keys() == reloaded.keys()
        for name, value in saved.items():
            assert torch.equal(reloaded[name], value), name
    for a, b in zip(got["next_round"], want["next_round"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"], rel=1e-6)
    assert got["raised"] and "max_nonfinite_steps=2" in got["raised"]
    assert got["state"] == want["state"]
    for a, b in zip(deepspeed_runs[world]["offload"], [r for r in want["records"] if r["round"] < 2], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["skipped"] == b["skipped"]
    kept = 3 if world == 1 else 7
    assert deepspeed_runs[world]["wait_for_round"] == (10, kept, 10 - kept, 0)
    if stage:
        uninterrupted, resumed = deepspeed_runs[world]["bf16_resume"][stage]
        assert len(resumed) == 3 and resumed == uninterrupted  # bit-identical
