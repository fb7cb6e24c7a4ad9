"""The pair stream: plan rows -> sampler actors -> scorer actors -> the trainer ranks, and how a
trainer rank waits for one whole round of it.

    plan rows (one per sampling task: a slice of a round's prompts)
      -> map_batches(SamplerWorker, actor pool)  trajectory records (candidate pools)
      -> map_batches(ScorerWorker, actor pool)   kept win/lose pairs, one row per prompt
                                                 (``records.group_by_prompt``: conditioning once)
      -> streaming_split(n, equal=False)         each rank pulls what arrives (ShardPump)

A round is complete when the RoundLedger says every prompt of it was scored and the kept pairs it
counted have all reached the ranks (``wait_for_round``): the ledger is the round's end marker,
so no rank waits for rows that never come (fixed-size batching at lag 0 would deadlock).
``streaming_split(equal=False)``: ``equal=True`` holds rows back to balance the ranks, which at
lag 0 withholds a round's last pairs until the next round, which waits for them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import ray.data
import torch

from spo_ray import records
from spo_ray.components import last_round, prompt_plan
from spo_ray.config import SPOConfig
from spo_ray.ray.common import all_reduce_sum
from spo_ray.ray.workers import SamplerWorker, ScorerWorker
from spo_ray.training import take_rows

log = logging.getLogger(__name__)


def plan_rows(cfg: SPOConfig, num_prompts: int, prompts: list[str], position: int) -> list[dict[str, Any]]:
    """One row per sampling task: a slice of one round's prompts (rounds never mix in a task)."""
    plan = prompt_plan(cfg, num_prompts)
    last = last_round(cfg, plan)
    rows = []
    for rnd in plan.rounds_from(position):
        if rnd.index >= last:
            break
        size = -(-len(rnd.prompt_ids) // cfg.ray.num_samplers)
        for lo in range(0, len(rnd.prompt_ids), size):
            ids = rnd.prompt_ids[lo : lo + size]
            rows.append({
                "round": rnd.index, "epoch": rnd.epoch, "prompt_ids": list(ids), "prompts": [prompts[i] for i in ids],
            })
    return rows


def build_pair_stream(cfg: SPOConfig, prompts: list[str], position: int, generation: int = 0) -> ray.data.Dataset:
    """The stream from the prompt plan's ``position`` on (rebuilt at every trainer restart; its
    scorers report to the ledger under ``generation``)."""
    rows = plan_rows(cfg, len(prompts), prompts, position)
    cfg_dict = cfg.to_dict()
    strip_prompt_ids: dict[int, int] = {}  # round -> its smallest prompt id: that slice renders the strip
    for row in rows:
        smallest = min(row["prompt_ids"])
        strip_prompt_ids[row["round"]] = min(smallest, strip_prompt_ids.get(row["round"], smallest))
    ds = ray.data.from_items(rows, override_num_blocks=max(len(rows), 1))
    ds = ds.map_batches(
        SamplerWorker,
        fn_constructor_kwargs={"cfg_dict": cfg_dict},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_samplers),
        **cfg.ray.sampler.ray_options(),
    )
    ds = ds.map_batches(
        ScorerWorker,
        fn_constructor_kwargs={"cfg_dict": cfg_dict, "generation": generation, "strip_prompt_ids": strip_prompt_ids},
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_scorers),
        **cfg.ray.scorer.ray_options(),
    )
    # Rounds, checkpoints and the lag gate pause the stream on purpose.
    ds.context.execution_no_progress_timeout_s = -1
    # Ray Data's bars print a line per update in `ray job logs` (thousands per run, rendered on the
    # driver's core); the trainer logs each round and the run's metrics carry the stream's rates.
    ds.context.enable_progress_bars = False
    return ds


class ShardPump:
    """Pulls this rank's split in a background thread, so waiting for a round never blocks on the
    iterator (which at lag 0 would wait for rows of a round that cannot start yet)."""

    def __init__(self, shard):
        self.queue: queue.Queue = queue.Queue()
        self.by_round: dict[int, list[dict[str, Any]]] = {}
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(shard,), daemon=True).start()

    def _run(self, shard) -> None:
        try:
            # prefetch_batches=0: with prefetching the iterator holds each block back until the next
            # one arrives, which at lag 0 is never (the next round waits for this one).
            for batch in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                self.queue.put(batch)
        except BaseException as err:  # noqa: BLE001 - surfaced in the training loop
            self.queue.put(err)

    def drain(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                raise RuntimeError("the pair stream failed") from item
            batch = records.to_torch(records.ungroup_prompts(item))
            for r in batch["round"].unique().tolist():
                rows = (batch["round"] == r).nonzero(as_tuple=True)[0]
                self.by_round.setdefault(int(r), []).append(take_rows(batch, rows))

    def count(self, round_index: int) -> int:
        return sum(records.num_rows(b) for b in self.by_round.get(round_index, []))

    def pop(self, round_index: int) -> list[dict[str, Any]]:
        return self.by_round.pop(round_index, [])


def wait_for_round(pump: ShardPump, ledger_status: Callable[[], tuple[bool, int, int, int]], round_index: int,
                   rank: int, device: torch.device, poll_s: float = 0.05) -> tuple[int, int, int, int]:
    """Block until every prompt of the round is scored and all its kept pairs reached the ranks;
    returns the round's (scoring events, kept, rejected, non-finite). Rank 0 calls ``ledger_status``
    (a long poll of the RoundLedger: complete and those counts) until the round is scored; the
    pairs each rank holds are counted locally every ``poll_s``. One all-reduce of 6 values per poll
    (rank 0's ledger status + every rank's arrived count), on the worker's device."""
    last_note = time.monotonic()
    while True:
        pump.drain()
        status = [0.0] * 5
        if rank == 0:
            complete, *counts = ledger_status()
            status = [float(complete), *counts]
        total = all_reduce_sum([*status, pump.count(round_index)], device)
        complete, events, kept, rejected, nonfinite, arrived = (int(v) for v in total)
        if complete and arrived == kept:
            return events, kept, rejected, nonfinite
        if complete and arrived > kept:
            raise RuntimeError(f"round {round_index}: {arrived} pairs arrived but the ledger kept {kept}")
        if rank == 0 and time.monotonic() - last_note > 30:
            last_note = time.monotonic()
            log.info("waiting for round %d: all prompts scored=%s, pairs arrived %d of %d kept so far",
                     round_index, bool(complete), arrived, kept)
        time.sleep(poll_s)
