"""Every row of the bad-input table (docs/operations.md) is a test: the input gets the documented outcome,
with the documented message, from the preflight the Ray engine's driver runs before it asks the
cluster for anything (or from the config loader, before that)."""

from __future__ import annotations

import logging
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spo_ray.config import ConfigError, load_config
from spo_ray.preflight import InputError, preflight

TABLE_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
FAST = ["tracking.enabled=false", "run.progress=false"]


def table_rows() -> dict[str, str]:
    """bad input -> message excerpt, from the docs table between its markers."""
    text = TABLE_DOC.read_text()
    block = text.split("<!-- bad-input-table -->")[1].split("<!-- /bad-input-table -->")[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = re.fullmatch(r"`(.+)`", cells[2]).group(1)
    return rows


def cfg_with(tmp_path: Path, *overrides: str):
    return load_config("tiny-sd15", overrides=[f"run.output_dir={tmp_path}", *FAST, *overrides])


def prompt_file(tmp_path: Path, content: bytes, name: str = "prompts.txt") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return f"data.prompt_file={path}"


def copy_tiny_pipeline(tmp_path: Path) -> Path:
    from spo_ray.tiny import ensure_tiny_pipeline

    return Path(shutil.copytree(ensure_tiny_pipeline("sd15"), tmp_path / "model"))


def write_resume_checkpoint(cfg, weights: dict[str, torch.Tensor]) -> Path:
    from spo_ray.checkpointing import RunProgress, save_checkpoint

    return save_checkpoint(cfg.run_dir, RunProgress(position=1, policy_version=1), weights=weights, optimizer={}, keep=1)


def lora_weights(rank: int) -> dict[str, torch.Tensor]:
    from spo_ray.components import load_model
    from spo_ray.training import setup_policy

    cfg = load_config("tiny-sd15", overrides=[f"train.lora_rank={rank}"])
    model = load_model(cfg, torch.device("cpu"), ("unet",))
    setup_policy(model.unet, cfg.train)
    return {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each scenario runs the check and returns the text the user sees (the error, or the log).
def missing_prompt_file(tmp_path, caplog):
    return preflight(cfg_with(tmp_path, f"data.prompt_file={tmp_path / 'nope.txt'}"))


def empty_prompt_file(tmp_path, caplog):
    return preflight(cfg_with(tmp_path, prompt_file(tmp_path, b"\n  \n")))


def undecodable_prompt_file(tmp_path, caplog):
    return preflight(cfg_with(tmp_path, prompt_file(tmp_path, b"a cat\n\xff\xfe a dog\n")))


def blank_lines(tmp_path, caplog):
    prompt_set = preflight(cfg_with(tmp_path, prompt_file(tmp_path, b"a cat\n\n\na dog\n")))
    assert prompt_set.prompts == ["a cat", "a dog"] and prompt_set.blank_lines_skipped == 2
    return caplog.text


def over_long_prompt(tmp_path, caplog):
    long = " ".join(["word"] * 300)
    prompt_set = preflight(cfg_with(tmp_path, prompt_file(tmp_path, f"a cat\n{long}\n".encode())))
    assert prompt_set.truncated == 1 and len(prompt_set.prompts[1].split()) < 300
    return caplog.text


def unknown_config_key(tmp_path, caplog):
    return load_config("tiny-sd15", overrides=["train.learning_rat=1e-5"])


def out_of_range_value(tmp_path, caplog):
    return load_config("tiny-sd15", overrides=["scorer.threshold=1.5"])


def model_missing_files(tmp_path, caplog):
    model = copy_tiny_pipeline(tmp_path)
    for weights in (model / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    return preflight(cfg_with(tmp_path, f"model.pretrained={model}"))


def spm_wrong_keys(tmp_path, caplog):
    from spo_ray.spm import StepAwarePreferenceModel

    state = StepAwarePreferenceModel.from_pretrained("tiny").state_dict()
    state["model.not_a_layer.weight"] = torch.zeros(1)
    del state["model.t_embedder.mlp.0.weight"]
    path = tmp_path / "spm.bin"
    torch.save(state, path)
    return preflight(cfg_with(tmp_path, "scorer.type=spm", "scorer.clip_dir=tiny", f"scorer.checkpoint={path}"))


def spm_corrupt(tmp_path, caplog):
    path = tmp_path / "spm.bin"
    path.write_bytes(b"not a checkpoint")
    return preflight(cfg_with(tmp_path, "scorer.type=spm", "scorer.clip_dir=tiny", f"scorer.checkpoint={path}"))


def lora_does_not_fit(tmp_path, caplog):
    write_resume_checkpoint(cfg_with(tmp_path), lora_weights(rank=8))
    return preflight(cfg_with(tmp_path, "train.lora_rank=4"))


def corrupt_resume_checkpoint(tmp_path, caplog):
    from spo_ray.checkpointing import shard_file

    saved = write_resume_checkpoint(cfg_with(tmp_path), lora_weights(rank=4))
    weights = saved / shard_file("weights", 0, 1)
    weights.write_bytes(weights.read_bytes()[:100])
    return preflight(cfg_with(tmp_path))


def checkpoint_without_optimizer_state(tmp_path, caplog):
    from spo_ray.checkpointing import shard_file

    saved = write_resume_checkpoint(cfg_with(tmp_path), lora_weights(rank=4))
    (saved / shard_file("optimizer", 0, 1)).unlink()
    return preflight(cfg_with(tmp_path))


def duplicated_yaml_key(tmp_path, caplog):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 2\ntrain:\n  seed: 3\n")
    return load_config("tiny-sd15", config_file=path, overrides=[f"run.output_dir={tmp_path}"])


def output_dir_is_a_file(tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a directory")
    return preflight(load_config("tiny-sd15", overrides=[f"run.output_dir={tmp_path / 'a-file'}", *FAST]))


def fifo_prompt_file(tmp_path, caplog):
    import os

    os.mkfifo(tmp_path / "prompts.txt")
    return preflight(cfg_with(tmp_path, f"data.prompt_file={tmp_path / 'prompts.txt'}"))


SHORT_RUN = ["data.max_prompts=4", "sampling.num_steps=8", "sampling.divert_start_step=2",
             "run.checkpoint_every_rounds=1", "train.epochs=3"]


def resume_with_a_frozen_change(tmp_path, caplog):
    from spo_ray.local_engine import run_in_process

    run_in_process(cfg_with(tmp_path, *SHORT_RUN, "run.max_rounds=1"))
    saved = (tmp_path / "tiny-sd15" / "config.yaml").read_text()
    try:
        preflight(cfg_with(tmp_path, *SHORT_RUN, "run.max_rounds=2", "sampling.prompts_per_round=2"))
    finally:
        assert (tmp_path / "tiny-sd15" / "config.yaml").read_text() == saved  # nothing written


def resume_with_a_new_learning_rate(tmp_path, caplog):
    import json

    from spo_ray.local_engine import run_in_process

    run_in_process(cfg_with(tmp_path, *SHORT_RUN, "run.max_rounds=1"))
    caplog.set_level(logging.INFO, logger="spo_ray")
    run_in_process(cfg_with(tmp_path, *SHORT_RUN, "run.max_rounds=2", "train.learning_rate=0.005"))
    run_dir = tmp_path / "tiny-sd15"
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert {s["lr"] for s in steps if s["round"] == 0} == {0.02} and {s["lr"] for s in steps if s["round"] == 1} == {0.005}
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["train.learning_rate"] == [0.02, 0.005]
    return caplog.text


def damaged_newest_checkpoint(tmp_path, caplog):
    from spo_ray.checkpointing import RunProgress, latest_checkpoint, save_checkpoint, shard_file

    cfg = cfg_with(tmp_path)
    weights = lora_weights(rank=4)
    for position in (1, 2):
        newest = save_checkpoint(cfg.run_dir, RunProgress(position=position, policy_version=position),
                                 weights=weights, optimizer={}, keep=3)
    (newest / shard_file("weights", 0, 1)).write_bytes(b"damaged")
    caplog.set_level(logging.WARNING)
    preflight(cfg)
    assert latest_checkpoint(cfg.run_dir).name == "round-0000001"
    return caplog.text


def resume_never_on_a_run(tmp_path, caplog):
    cfg = cfg_with(tmp_path, "run.resume=never")
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    preflight(cfg, ray=False)


def resume_from_no_checkpoint(tmp_path, caplog):
    preflight(cfg_with(tmp_path, f"run.resume={tmp_path / 'nowhere'}"), ray=False)


def stale_temporary_checkpoint(tmp_path, caplog):
    from spo_ray.local_engine import run_in_process

    cfg = cfg_with(tmp_path, "run.max_rounds=1", "data.max_prompts=4", "sampling.num_steps=6",
                   "sampling.divert_start_step=4", "run.checkpoint_every_rounds=0")
    stale = cfg.run_dir / "checkpoints" / ".tmp-round-0000007"
    stale.mkdir(parents=True)
    caplog.set_level(logging.WARNING)
    run_in_process(cfg)
    assert not stale.exists()
    return caplog.text


def unreachable_mlflow(tmp_path, caplog):
    cfg = load_config("tiny-sd15", overrides=[
        f"run.output_dir={tmp_path}", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}",
    ])
    return preflight(cfg)


SCENARIOS: dict[str, Callable] = {
    "missing prompt file": missing_prompt_file,
    "empty prompt file": empty_prompt_file,
    "undecodable prompt file": undecodable_prompt_file,
    "blank lines in the prompt file": blank_lines,
    "over-long prompt": over_long_prompt,
    "unknown config key": unknown_config_key,
    "out-of-range config value": out_of_range_value,
    "model directory missing files": model_missing_files,
    "SPM checkpoint with wrong keys": spm_wrong_keys,
    "corrupt SPM checkpoint": spm_corrupt,
    "LoRA checkpoint that does not fit the model on resume": lora_does_not_fit,
    "corrupt resume checkpoint": corrupt_resume_checkpoint,
    "resume checkpoint without its optimizer state": checkpoint_without_optimizer_state,
    "unreachable MLflow server": unreachable_mlflow,
    "a float setting that is not finite (`train.learning_rate=inf`, `sampling.guidance_scale=nan`)":
        lambda tmp_path, caplog: cfg_with(tmp_path, "train.learning_rate=inf", "sampling.guidance_scale=nan"),
    "several bad keys and values": lambda tmp_path, caplog: cfg_with(tmp_path, "train.epochs=x", "train.lernrate=1"),
    "an override value that is not YAML (`train.learning_rate=[`)": lambda tmp_path, caplog: cfg_with(
        tmp_path, "train.learning_rate=["),
    "a YAML file with a key given twice": duplicated_yaml_key,
    "`run.name` with a path in it (`..`, `a/b`)": lambda tmp_path, caplog: cfg_with(tmp_path, "run.name=.."),
    "`run.output_dir` that is a file": output_dir_is_a_file,
    "a FIFO or device as the prompt file": fifo_prompt_file,
    "LoRA targets that match no module (`train.lora_targets=[to_qq]`)": lambda tmp_path, caplog: preflight(
        cfg_with(tmp_path, "train.lora_targets=[to_qq]")),
    "a user scorer that cannot be imported": lambda tmp_path, caplog: preflight(
        cfg_with(tmp_path, "scorer.type=tests.no_such_module:Scorer")),
    "a user scorer given arguments it does not take": lambda tmp_path, caplog: preflight(
        cfg_with(tmp_path, "scorer.type=tests.user_scorers:MeanScorer", "scorer.kwargs={shift: 1}")),
    "a user scorer that returns a list": lambda tmp_path, caplog: preflight(
        cfg_with(tmp_path, "scorer.type=tests.user_scorers:ListScorer")),
    "a user scorer that returns NaN": lambda tmp_path, caplog: preflight(
        cfg_with(tmp_path, "scorer.type=tests.user_scorers:NaNScorer")),
    "a temporary checkpoint folder left by a crash": stale_temporary_checkpoint,
    "a damaged newest checkpoint beside valid ones": damaged_newest_checkpoint,
    "a resume that changes a setting it may not (`sampling.prompts_per_round`, the model, the LoRA shape, the seed, "
    "the prompts, ...)": resume_with_a_frozen_change,
    "a resume that changes a setting it may (`train.learning_rate`, `run.max_rounds`, batch sizes, tracking, "
    "resources)": resume_with_a_new_learning_rate,
    "`run.resume=never` on a directory that holds a run": resume_never_on_a_run,
    "`run.resume=<path>` where there is no folder": resume_from_no_checkpoint,
    "more samplers than prompts per round": lambda tmp_path, caplog: preflight(
        cfg_with(tmp_path, "sampling.prompts_per_round=4", "ray.num_samplers=6")),
    "more trainer ranks than rows per micro-batch": lambda tmp_path, caplog: preflight(
        cfg_with(tmp_path, "train.train_batch_size=2", "ray.num_trainers=4")),
}
LOGGED = {"blank lines in the prompt file", "over-long prompt",  # handled, not refused
          "a temporary checkpoint folder left by a crash", "a damaged newest checkpoint beside valid ones",
          "a resume that changes a setting it may (`train.learning_rate`, `run.max_rounds`, batch sizes, tracking, "
          "resources)"}


def test_the_table_and_the_scenarios_match() -> None:
    assert set(table_rows()) == set(SCENARIOS)


@pytest.mark.parametrize("row", sorted(SCENARIOS))
def test_bad_input_row(row: str, tmp_path: Path, caplog) -> None:
    excerpt = table_rows()[row]
    caplog.set_level(logging.WARNING, logger="spo_ray")
    if row in LOGGED:
        assert excerpt in SCENARIOS[row](tmp_path, caplog)
        return
    with pytest.raises((InputError, ConfigError)) as err:
        SCENARIOS[row](tmp_path, caplog)
    assert excerpt in str(err.value)


def test_the_job_refuses_bad_input_before_touching_the_cluster(tmp_path: Path, capsys) -> None:
    import ray

    from spo_ray.entrypoints import job_main

    rc = job_main("spo", "tiny-sd15", [f"run.output_dir={tmp_path}", *FAST, f"data.prompt_file={tmp_path / 'nope.txt'}"])
    assert rc == 2 and "prompt file not found" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "tiny-sd15").exists()  # nothing written, nothing lost


def test_a_full_disk_is_named_and_the_previous_checkpoint_stays(tmp_path: Path) -> None:
    """A real full filesystem (a 256 KiB tmpfs): the checkpoint that does not fit fails with "no space
    left on device" naming it, leaves no temporary folder, and the previous one stays the latest."""
    import subprocess

    from spo_ray.checkpointing import (
        CheckpointError,
        RunProgress,
        checkpoint_problem,
        latest_checkpoint,
        save_checkpoint,
    )

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    try:
        run_dir = small / "run"
        first = save_checkpoint(run_dir, RunProgress(position=1), weights={"w": torch.zeros(1000)}, optimizer={})
        with pytest.raises(CheckpointError, match="round-0000002 could not be written: no space left on device") as err:
            save_checkpoint(run_dir, RunProgress(position=2), weights={"w": torch.zeros(200_000)}, optimizer={})
        assert str(first) in str(err.value)  # "the previous checkpoint ... stays valid"
        assert latest_checkpoint(run_dir) == first and checkpoint_problem(first) is None
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def _background_writer_rank(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from spo_ray.checkpointing import CheckpointWriter, RunProgress

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    writer = CheckpointWriter(run_dir, rank=rank, world=world, keep=3, barrier=lambda: dist.all_reduce(torch.zeros(1)))

    def agree(failed: bool) -> bool:  # as the Ray trainer agrees: an all-reduce of one number
        flag = torch.tensor([float(failed)])
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    settled = []
    # rank 1's second and third shards do not fit; at the third, the disk has no room for its
    # failure marker either (here: the marker is not written), so only the agreement tells rank 0
    for position, numel in ((1, 100), (2, 200_000 if rank == 1 else 100), (3, 200_000 if rank == 1 else 100)):
        if position == 3 and rank == 1:
            writer._leave_failure_marker = lambda tmp, error: None
        writer.submit(RunProgress(position=position), weights={f"w{rank}": torch.zeros(numel)}, optimizer={})
        done = writer.settle(agree)
        settled.append({"error": done.error, "path": str(done.path) if done.path else None})
    dist.barrier()
    Path(f"{out}.{rank}").write_text(json.dumps(settled))
    dist.destroy_process_group()


def test_a_background_checkpoint_that_one_rank_cannot_write_fails_on_every_rank(tmp_path: Path) -> None:
    """The Ray trainer's background writer on two gloo ranks and a real full filesystem (a 256 KiB
    tmpfs): rank 1's shard of the second checkpoint does not fit. Rank 1 names the full disk, rank 0
    does not complete the checkpoint and names rank 1's error; no temporary folder is left and
    the first checkpoint stays the latest. The third fails the same way where rank 1 cannot even
    leave its failure marker: rank 0 learns it from the ranks' agreement at settle, not by waiting."""
    import json
    import subprocess

    from spo_ray.checkpointing import checkpoint_problem, latest_checkpoint

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    try:
        run_dir, out, world = small / "run", str(tmp_path / "settled"), 2
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_background_writer_rank, args=(world, port, str(run_dir), out), nprocs=world, join=True)
        (first0, second0, third0), (first1, second1, third1) = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(world))
        assert first0 == {"error": None, "path": str(run_dir / "checkpoints" / "round-0000001")}
        assert first1 == {"error": None, "path": None}
        assert "round-0000002 could not be written: no space left on device" in second1["error"]
        assert "round-0000001" in second1["error"]  # "the previous checkpoint ... stays valid"
        assert second0["path"] is None and "round-0000002 was not completed: rank 1:" in second0["error"]
        assert "no space left on device" in second0["error"]  # rank 1's words, from its marker
        # No marker: rank 0 does not wait for ever; it stops at the agreement and says which rank
        assert "round-0000003 could not be written: no space left on device" in third1["error"]
        assert third0["path"] is None and third0["error"].endswith(
            "round-0000003 was not completed: rank 1: could not write its shards (its log names the error)")
        assert latest_checkpoint(run_dir).name == "round-0000001" and checkpoint_problem(latest_checkpoint(run_dir)) is None
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_background_checkpoint_error_of_any_kind_is_reported_not_lost(tmp_path: Path) -> None:
    """An exception other than OSError in the writer's thread (here: a shard that is not a tensor)
    becomes the settled result's error naming the checkpoint, instead of dying with the thread
    and leaving the checkpoint looking written; no folder of it is left."""
    from spo_ray.checkpointing import CheckpointWriter, RunProgress, latest_checkpoint

    writer = CheckpointWriter(tmp_path, rank=0, world=1, keep=3, barrier=lambda: None)
    writer.submit(RunProgress(position=3), weights={"w": "not a tensor"}, optimizer={})
    done = writer.settle()
    assert done.path is None and "checkpoint" in done.error and "round-0000003 could not be written: AttributeError" in done.error
    assert latest_checkpoint(tmp_path) is None and not list((tmp_path / "checkpoints").glob(".tmp-*"))
