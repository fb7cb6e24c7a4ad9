"""Per-role metering shared by both engines (busy time, work counters, bytes per hop, peak memory).

A :class:`RoleMeter` lives in each role's process (a sampler/scorer actor, a trainer worker, or
the one in-process engine). It accumulates busy seconds, counters (``unet_forwards``,
``images_scored``, ``optimizer_steps``, ...) and the bytes a role hands to the next one next to
that hop's tensor minimum. On Ray every meter sends its cumulative snapshot to a small named
actor per run (:class:`TelemetrySink`, like the RoundLedger); the driver (or trainer rank 0, for
MLflow) reads them with :func:`collect`.

    meter = RoleMeter("sampler")
    with meter.busy():
        ...
    meter.add(unet_forwards=130)
    report(sink, meter)            # Ray: fire-and-forget; the latest snapshot per actor wins
    collect(run_name)              # {"roles": {...}, "window": ...}
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ROLES = ("sampler", "scorer", "trainer")
MAX_INTERVALS = 10_000


def peak_memory_bytes() -> dict[str, int]:
    """This process' peak RSS (and peak CUDA allocation when a GPU is in use)."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001 - memory is best effort, never a reason to fail a run
        pass
    return out


@dataclass
class RoleMeter:
    """One process' metering of one role. Times are wall-clock (``time.time``) so meters in
    different processes of one node line up on a common window."""

    role: str
    actor: str = field(default_factory=lambda: f"pid{os.getpid()}")
    run: str = ""  # run.name: the tag of this meter's Ray metrics (spo_ray.ray.metrics)
    busy_seconds: float = 0.0
    first_start: float | None = None  # the first busy interval's start
    last_end: float | None = None  # the last busy interval's end
    counters: dict[str, float] = field(default_factory=dict)
    # Busy intervals (start, end, counts): rates and busy fractions over any window (e.g. steady
    # state, start-up excluded). The oldest are dropped beyond MAX_INTERVALS.
    intervals: list[tuple[float, float, dict[str, float]]] = field(default_factory=list)
    recorded: int = 0  # intervals ever recorded, and how many of them were reported (see report)
    reported: int = 0

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        started = time.time()
        try:
            yield
        finally:
            self.record(started, time.time())

    def record(self, started: float, ended: float, **counts: float) -> None:
        """A busy interval [started, ended] (wall clock) and the work done in it."""
        self.busy_seconds += max(ended - started, 0.0)
        self.first_start = started if self.first_start is None else min(self.first_start, started)
        self.last_end = ended if self.last_end is None else max(self.last_end, ended)
        self.add(**counts)
        self.intervals.append((started, ended, dict(counts)))
        del self.intervals[:-MAX_INTERVALS]
        self.recorded += 1

    def add(self, **counts: float) -> None:
        for key, value in counts.items():
            self.counters[key] = self.counters.get(key, 0) + value

    def snapshot(self) -> dict[str, Any]:
        # cpu_seconds: this process' CPU time (every thread), which other tenants of a shared
        # machine barely change, unlike wall-clock rates.
        return {**asdict(self), **peak_memory_bytes(), "cpu_seconds": time.process_time(), "time": time.time()}


# ----------------------------------------------------------------------------- bytes per hop


def payload_bytes(batch: dict[str, Any]) -> int:
    """Bytes of a numpy batch as Ray Data carries it: tensor buffers, plus UTF-8 text for string
    columns (an Arrow block of fixed-shape tensor columns holds exactly these buffers)."""
    total = 0
    for value in batch.values():
        arr = np.asarray(value)
        if arr.dtype == object:  # strings, or a ragged tensor column's row arrays
            total += sum(v.nbytes if isinstance(v, np.ndarray) else len(str(v).encode()) for v in arr.ravel())
        else:
            total += arr.nbytes
    return total


def _shape(value: Any) -> tuple[int, ...]:
    """A tensor's or array's shape (``np.shape`` would convert a bf16 tensor, which numpy cannot hold)."""
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _cond_elements(batch: dict[str, Any]) -> int:
    return sum(int(np.prod(_shape(v))) for k, v in batch.items() if k.startswith("cond_"))


LATENT_ITEMSIZE = 4  # the trajectory tensors that enter the log-prob are float32 whatever the model dtype


def trajectory_min_bytes(rec: dict[str, Any], itemsize: int) -> int:
    """Sampler -> scorer minimum: per segment x_t and each candidate's states (k x seg_len) in
    float32, each candidate's x0_hat and the conditioning (once per prompt) at the model's
    ``itemsize`` bytes per element."""
    chw = int(np.prod(_shape(rec["x_t"])[2:]))
    k = int(_shape(rec["x0_hat"])[2])
    seg_len = np.asarray(rec["seg_len"]).astype(np.int64)  # [B, S]
    latents = int((1 + k * seg_len).sum()) * chw * LATENT_ITEMSIZE
    return latents + seg_len.size * k * chw * itemsize + _cond_elements(rec) * itemsize


def pair_min_bytes(pairs: dict[str, Any], itemsize: int) -> int:
    """Scorer -> trainer minimum: per kept pair x_t and the winner's and loser's seg_len states in
    float32, and the conditioning once per prompt at the model's ``itemsize``."""
    n = len(pairs.get("pair_id", ()))
    if n == 0:
        return 0
    chw = int(np.prod(_shape(pairs["x_t"])[1:]))
    seg_len = np.asarray(pairs["seg_len"]).astype(np.int64)
    prompts = len({(int(e), int(p)) for e, p in zip(pairs["epoch"], pairs["prompt_id"], strict=True)})
    return int((1 + 2 * seg_len).sum()) * chw * LATENT_ITEMSIZE + _cond_elements(pairs) // n * prompts * itemsize


# ----------------------------------------------------------------------------- Ray side


def sink_name(run_name: str) -> str:
    return f"spo-telemetry-{run_name}"


class TelemetrySink:
    """Named per-run actor: the latest cumulative snapshot of every (role, actor)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, dict[str, Any]]] = {}

    def report(self, snapshot: dict[str, Any]) -> None:
        """A snapshot whose ``intervals`` are the ones new since the actor's previous report."""
        previous = self.snapshots.setdefault(snapshot["role"], {}).get(snapshot["actor"])
        if previous is not None:
            snapshot["intervals"] = (previous["intervals"] + snapshot["intervals"])[-MAX_INTERVALS:]
        self.snapshots[snapshot["role"]][snapshot["actor"]] = snapshot

    def all(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self.snapshots

    def busy_fractions(self) -> dict[str, float]:
        """Per role, busy seconds over the metered span per actor, from running totals: no
        history is reread, so a call costs O(actors) whatever the run's length."""
        out = {}
        for role, actors in self.snapshots.items():
            spans = [(s["first_start"], s["last_end"]) for s in actors.values() if s.get("first_start")]
            if not spans:
                continue
            span = max(end for _, end in spans) - min(start for start, _ in spans)
            busy = sum(s.get("busy_seconds", 0.0) for s in actors.values())
            out[role] = busy / max(span * len(actors), 1e-9)
        return out


def start_sink(run_name: str):
    """Create the run's sink (a previous attempt's is replaced); returns its handle."""
    import ray

    name = sink_name(run_name)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(name))
    return ray.remote(num_cpus=0)(TelemetrySink).options(name=name).remote()


def connect(run_name: str):
    """The run's sink, or None when the driver started none (telemetry is optional)."""
    import ray

    try:
        return ray.get_actor(sink_name(run_name))
    except ValueError:
        return None


def report(sink, meter: RoleMeter, *, wait: bool = False) -> None:
    """Send ``meter``'s snapshot (fire-and-forget unless ``wait``: a process about to exit waits)."""
    if sink is None:
        return
    snapshot = meter.snapshot()
    # Only the intervals since the last report travel (the sink appends): a long run's reports stay small.
    new = min(meter.recorded - meter.reported, len(meter.intervals))
    snapshot["intervals"] = snapshot["intervals"][len(snapshot["intervals"]) - new:]
    meter.reported = meter.recorded
    ref = sink.report.remote(snapshot)
    if wait:
        import ray

        ray.get(ref)


def collect(run_name: str) -> dict[str, Any]:
    """Every role's snapshots of a running (or just finished) Ray run, summarised per role."""
    import ray

    sink = connect(run_name)
    if sink is None:
        return {}
    return summarize(ray.get(sink.all.remote()))


def summarize(snapshots: dict[str, dict[str, dict[str, Any]]], window: tuple[float, float] | None = None) -> dict[str, Any]:
    """Per role over a common window (default: first busy start to last busy end, all roles):
    actors, busy seconds and fraction (per actor), counters of the work done in the window (an
    interval straddling its edge counts pro rata), whole-run totals, peak memory (max over actors)."""
    starts = [s["first_start"] for role in snapshots.values() for s in role.values() if s.get("first_start")]
    ends = [s["last_end"] for role in snapshots.values() for s in role.values() if s.get("last_end")]
    if window is None and starts and ends:
        window = (min(starts), max(ends))
    span = max(window[1] - window[0], 1e-9) if window else None
    roles: dict[str, Any] = {}
    for role, actors in snapshots.items():
        busy, counters, totals = 0.0, {}, {}
        metered = any(snap.get("intervals") for snap in actors.values())
        for snap in actors.values():
            for key, value in snap.get("counters", {}).items():
                totals[key] = totals.get(key, 0) + value
            for started, ended, counts in snap.get("intervals", []):
                overlap = max(0.0, min(ended, window[1]) - max(started, window[0])) if window else 0.0
                share = overlap / (ended - started) if ended > started else float(window is not None and window[0] <= started <= window[1])
                busy += overlap
                for key, value in counts.items():
                    counters[key] = counters.get(key, 0) + value * share
        roles[role] = {
            "actors": len(actors),
            "busy_seconds": busy,
            # None for a role that meters no intervals (the Ray trainer: its round records hold its waits).
            "busy_fraction": (busy / (span * len(actors))) if span and metered else None,
            "counters": counters,
            "totals": totals,
            "cpu_seconds": sum(s.get("cpu_seconds", 0.0) for s in actors.values()),
            "peak_rss_bytes": max((s.get("peak_rss_bytes", 0) for s in actors.values()), default=0),
            "peak_cuda_bytes": max((s.get("peak_cuda_bytes", 0) for s in actors.values()), default=0),
        }
    return {"roles": roles, "window": list(window) if window else None, "snapshots": snapshots}
