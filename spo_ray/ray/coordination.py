"""Coordination actors of the Ray engine: the policy store (versions and the staleness gate) and the
round ledger (each scored prompt counted once; a round's end marker).

Both are small named actors per run (``actor_names``), no GPUs, no tensors beyond what is stated:
the ledger holds a few counters per scored prompt (~100 bytes; 4,000 prompts x 10 epochs = 4 MB
for a whole paper run), the store what its docstring says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import ray

from spo_ray.config import SPOConfig
from spo_ray.ray.metrics import observe_gate_wait
from spo_ray.run_log import RoundScores


def actor_names(cfg: SPOConfig) -> dict[str, str]:
    return {
        "store": f"spo-policy-store-{cfg.run.name}", "ledger": f"spo-round-ledger-{cfg.run.name}",
        "renderer": f"spo-renderer-{cfg.run.name}",
    }


@ray.remote(num_cpus=0)
class PolicyStore:
    """The policy's published versions as object references: the staleness gate, reset and rollback.

    The weights never pass through this actor: trainer rank 0 ``ray.put``s each version into its
    own node's object store and publishes the reference; each sampler ``ray.get``s it from there
    (peer to peer; a node's samplers share one fetched copy). Per version this actor handles one
    reference (~100 bytes) whatever the model. A reference's owner is the rank-0 worker, so a
    version dies with it: a restart resets the store and rank 0 republishes the checkpoint's.
    Keeps at most ``keep`` versions (max_policy_lag + 1).
    """

    def __init__(self, keep: int, run: str = ""):
        self.keep, self.run = keep, run
        self.versions: dict[int, tuple[list[ray.ObjectRef], float]] = {}  # version -> ([ref], published at)
        self.changed = asyncio.Condition()
        self.blocked_waits = 0
        self.wait_seconds = 0.0
        self.published = 0
        self.bytes_in = 0

    async def publish(self, version: int, refs: list[ray.ObjectRef], published_at: float) -> None:
        """``refs``: a one-element list, so that Ray passes the reference, not the weights."""
        async with self.changed:
            self.versions[version] = (refs, published_at)
            self.published += 1
            self.bytes_in += len(ray.cloudpickle.dumps(refs))  # what this actor handles per version
            for old in sorted(self.versions)[: -self.keep]:
                del self.versions[old]
            self.changed.notify_all()

    async def reset(self) -> None:
        """Forget every version (a restarted stream): samplers wait until the trainer publishes the
        checkpoint's version, instead of sampling with weights the crash threw away."""
        async with self.changed:
            self.versions = {}

    async def rollback(self, version: int, refs: list[ray.ObjectRef], published_at: float) -> None:
        async with self.changed:
            self.versions = {version: (refs, published_at)}
            self.published += 1
            self.changed.notify_all()

    def newest(self) -> int:
        return max(self.versions, default=-1)

    async def wait_newest(self, min_version: int, have: int) -> tuple[int, list[ray.ObjectRef] | None, float]:
        """Block until a version >= min_version exists; return the newest as (version, [ref] or None
        when the caller ``have``s it, its publish time)."""
        started = time.monotonic()
        async with self.changed:
            if self.newest() < min_version:
                self.blocked_waits += 1
                await self.changed.wait_for(lambda: self.newest() >= min_version)
                observe_gate_wait(self.run, time.monotonic() - started)
            self.wait_seconds += time.monotonic() - started
            version = self.newest()
            refs, published_at = self.versions[version]
            return version, (None if version == have else refs), published_at

    def stats(self) -> dict[str, float]:
        return {"newest": self.newest(), "blocked_waits": self.blocked_waits, "wait_seconds": self.wait_seconds,
                "published": self.published, "bytes_in": self.bytes_in}


@ray.remote(num_cpus=0)
class RoundLedger:
    """Counts every scored prompt once, keyed by (round, prompt id): redone work is not counted
    twice, and a round is complete exactly when each of its prompts has been scored."""

    def __init__(self, round_sizes: dict[int, int], baseline: dict[str, int] | None = None):
        self.round_sizes = round_sizes
        self.baseline = baseline or {}  # counts of the rounds before a resumed run's checkpoint
        self.scored: dict[int, dict[int, ScoredPrompt]] = {}
        self.duplicates = 0
        self.strips: dict[int, tuple[int, bytes]] = {}  # round -> (smallest prompt id, PNG)
        # Each (re)built stream is a generation; after a trainer restart the rounds from the
        # checkpoint's position are redone, and what was scored for them before is set apart.
        self.generation = 0
        self.redone = {"prompts": 0, "scoring_events": 0, "kept": 0, "rejected": 0, "nonfinite": 0}
        self.stale_reports = 0
        self.changed = asyncio.Condition()  # notified on every report: the trainer long-polls
        self.pair_refs: dict[tuple[int, int], list[list[ray.ObjectRef]]] = {}  # (round, dest rank) -> references
        self.stop_reason: str | None = None

    def begin_stream(self, position: int) -> int:
        """A new stream from prompt-plan ``position`` (round index): returns its generation."""
        self.generation += 1
        self.pair_refs.clear()  # a dead worker group's pairs in transit are not the new group's
        for round_index in [r for r in self.scored if r >= position]:
            for row in self.scored.pop(round_index).values():
                for key, value in (("prompts", 1), ("scoring_events", row.events), ("kept", row.kept),
                                   ("rejected", row.rejected), ("nonfinite", row.nonfinite)):
                    self.redone[key] += value
            self.strips.pop(round_index, None)
        return self.generation

    async def report(self, round_index: int, rows: list[ScoredPrompt], generation: int = 0) -> None:
        if generation != self.generation:  # a dead stream's scorer finishing late: not counted
            self.stale_reports += len(rows)
            return
        seen = self.scored.setdefault(round_index, {})
        for row in rows:
            if row.prompt_id in seen:
                self.duplicates += 1
                continue
            seen[row.prompt_id] = row
        async with self.changed:
            self.changed.notify_all()

    async def wait_status(self, round_index: int, timeout_s: float) -> tuple[bool, int, int, int, int]:
        """``status`` once the round is complete or after ``timeout_s``, whichever comes first (a
        long poll: the trainer does not call every few milliseconds while a round is sampled)."""
        async with self.changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.status(round_index)[0]), timeout_s)
        return self.status(round_index)

    def status(self, round_index: int) -> tuple[bool, int, int, int, int]:
        """(complete, events, kept, rejected, non-finite) of a round."""
        seen = self.scored.get(round_index, {}).values()
        counts = [sum(getattr(r, key) for r in seen) for key in ("events", "kept", "rejected", "nonfinite")]
        return (len(seen) == self.round_sizes[round_index], *counts)

    def round_scores(self, round_index: int) -> RoundScores:
        """What the scorers reported for one round (the round record's scoring part)."""
        seen = list(self.scored.get(round_index, {}).values())
        return RoundScores(
            events=sum(r.events for r in seen), kept=sum(r.kept for r in seen), rejected=sum(r.rejected for r in seen),
            nonfinite=sum(r.nonfinite for r in seen),
            score_sum=sum(r.score_sum for r in seen), images=sum(r.images for r in seen), buckets=_bucket_totals(seen),
        )

    def request_stop(self, reason: str) -> None:
        """The driver was asked to stop (SIGTERM from ``ray job stop``, or Ctrl-C)."""
        self.stop_reason = self.stop_reason or reason

    def stop_requested(self) -> str | None:
        return self.stop_reason

    def post_pairs(self, round_index: int, src: int, outgoing: dict[int, list[ray.ObjectRef]]) -> None:
        """A trainer rank's pairs for the others (references, one per destination: transition routing)."""
        for dest, refs in outgoing.items():
            self.pair_refs.setdefault((round_index, dest), []).append(refs)

    def take_pairs(self, round_index: int, dest: int) -> list[list[ray.ObjectRef]]:
        return self.pair_refs.pop((round_index, dest), [])

    def offer_strip(self, round_index: int, first_prompt_id: int, png: bytes) -> None:
        """A scorer's win/lose strip; the one with the round's smallest prompt id is kept (whoever
        scored it, and however often it was redone), so the logged strip is deterministic."""
        held = self.strips.get(round_index)
        if held is None or first_prompt_id < held[0]:
            self.strips[round_index] = (first_prompt_id, png)

    def take_strip(self, round_index: int) -> bytes | None:
        held = self.strips.pop(round_index, None)
        return None if held is None else held[1]

    def totals(self) -> dict[str, Any]:
        rows = [r for seen in self.scored.values() for r in seen.values()]
        base = self.baseline
        return {
            "prompts": base.get("prompts", 0) + len(rows),
            "scoring_events": base.get("scoring_events", 0) + sum(r.events for r in rows),
            "kept": base.get("kept", 0) + sum(r.kept for r in rows),
            "rejected": base.get("rejected", 0) + sum(r.rejected for r in rows),
            "nonfinite": base.get("dropped_nonfinite", 0) + sum(r.nonfinite for r in rows),
            "duplicate_reports": self.duplicates,
            "redone_after_restart": dict(self.redone),
            "stale_reports": self.stale_reports,
            "by_bucket": {b: list(v) for b, v in _bucket_totals(rows).items()},
        }


@dataclass(frozen=True)
class ScoredPrompt:
    """What a scorer reports to the ledger for one prompt of a round."""

    prompt_id: int
    events: int
    kept: int
    rejected: int
    buckets: dict[str, tuple[int, int]]  # timestep bucket -> (events, kept)
    score_sum: float
    images: int
    nonfinite: int = 0


def _bucket_totals(rows: list[ScoredPrompt]) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for row in rows:
        for bucket, (events, kept) in row.buckets.items():
            had = totals.get(bucket, (0, 0))
            totals[bucket] = (had[0] + events, had[1] + kept)
    return totals
