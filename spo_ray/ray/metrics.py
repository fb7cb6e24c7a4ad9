"""Ray-native metrics: the engine's counters and round figures through ``ray.util.metrics``, so
they reach the Ray dashboard's metrics view and Prometheus (``ray start --metrics-export-port``;
on KubeRay the pods' ``metrics`` port 8080) with no extra service. Grafana:
``cluster/monitoring/spo-ray-dashboard.json``.

Every metric carries the tags ``run`` (run.name) and, per role, ``role``; Ray adds its own
(node, worker, session). Prometheus names get Ray's ``ray_`` prefix (counters also ``_total``):

- counters, per role, from each process' :class:`~spo_ray.telemetry.RoleMeter` at each report:
  ``ray_spo_busy_seconds_total`` and one per meter counter (``ray_spo_prompts_total``,
  ``ray_spo_unet_forwards_total``, ``ray_spo_images_scored_total``, ``ray_spo_scoring_events_total``,
  ``ray_spo_kept_total``, ``ray_spo_bytes_out_total``, ``ray_spo_policy_fetches_total``, ...);
- gauges from trainer rank 0 after each round: ``ray_spo_round``, ``ray_spo_policy_version``,
  ``ray_spo_loss``, ``ray_spo_mean_score``, ``ray_spo_kept_fraction``, ``ray_spo_policy_lag``,
  ``ray_spo_pairs_per_second``, ``ray_spo_busy_fraction{role}``;
- histograms: ``ray_spo_round_seconds`` (trainer rank 0) and ``ray_spo_gate_wait_seconds`` (each
  sampler wait at the PolicyStore's staleness gate that blocked).

Cost: a few hundred bytes per report to the node's metrics agent (in-process OpenTelemetry
recorders, exported every ~10 s), whatever the model: nothing at SD1.5 LoRA on 8 GPUs or full
SDXL on 64. Series: (metrics ~25) x (roles 3) x (processes) per run, e.g. ~1,600 at 64 GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

ROUND_GAUGES = {  # round-record key -> gauge (no role tag)
    "round": "spo_round",
    "round_loss": "spo_loss",
    "mean_score": "spo_mean_score",
    "kept_fraction": "spo_kept_fraction",
    "policy_lag": "spo_policy_lag",
    "pairs_per_s": "spo_pairs_per_second",
}
# The meters' counters (spo_ray.telemetry.RoleMeter keys the roles record), exported as counters.
METER_COUNTERS = (
    "busy_seconds",
    "prompts", "unet_forwards", "policy_fetches", "policy_bytes_in", "policy_fetch_seconds",  # sampler
    "publish_to_usable_s",
    "images_scored", "scoring_events", "kept",  # scorer
    "bytes_out", "min_bytes_out",  # sampler and scorer: the bytes they hand on and that hop's minimum
    "bytes_in", "transitions_held", "rounds", "train_seconds", "wait_seconds", "publish_seconds",  # trainer
    "report_seconds", "checkpoint_seconds", "route_seconds", "checkpoint_wait_seconds",
    "publish_cpu_seconds", "report_cpu_seconds", "checkpoint_cpu_seconds", "route_cpu_seconds",
    "checkpoint_wait_cpu_seconds",
)
HISTOGRAMS = ("spo_round_seconds", "spo_gate_wait_seconds")
SECONDS_BUCKETS = [0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800]

_metrics: dict[str, Any] = {}  # name -> metric, per process (Ray refuses none, but one object per name is cheaper)
_exported: dict[tuple[str, str, str], float] = {}  # (run, role, key) -> the total this process exported so far


def prometheus_names() -> set[str]:
    """Every name this module can put on a Prometheus endpoint (with Ray's prefix and suffixes)."""
    names = {f"ray_spo_{key}_total" for key in METER_COUNTERS}
    names |= {f"ray_{name}" for name in (*ROUND_GAUGES.values(), "spo_policy_version", "spo_busy_fraction")}
    names |= {f"ray_{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "count", "sum")}
    return names


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    if name not in _metrics:
        from ray.util import metrics

        if kind == "histogram":
            _metrics[name] = metrics.Histogram(name, description, boundaries=SECONDS_BUCKETS, tag_keys=tag_keys)
        else:
            _metrics[name] = getattr(metrics, kind.capitalize())(name, description, tag_keys=tag_keys)
    return _metrics[name]


def export_meter(meter: Any) -> None:
    """One process' meter totals as counters (the increments since this process' last export)."""
    if not meter.run:
        return
    totals = {"busy_seconds": meter.busy_seconds, **meter.counters}
    tags = {"run": meter.run, "role": meter.role}
    try:
        for key, total in totals.items():
            delta = total - _exported.get((meter.run, meter.role, key), 0.0)
            if delta > 0:
                _metric("counter", f"spo_{key}", f"SPO {meter.role} {key} (running total)", ("run", "role")).inc(delta, tags)
                _exported[(meter.run, meter.role, key)] = total
    except Exception as err:  # noqa: BLE001 - metrics are observability, never a reason to stop a run
        log.debug("Ray metrics export failed: %s", err)


def report_meter(sink: Any, meter: Any, *, wait: bool = False) -> None:
    """A Ray process' meter to the run's telemetry sink (summary.json, MLflow busy fractions) and
    to Ray's metrics (Prometheus)."""
    from spo_ray import telemetry

    telemetry.report(sink, meter, wait=wait)
    export_meter(meter)


def export_round(run: str, record: Mapping[str, Any], policy_version: int) -> None:
    """Trainer rank 0's round record as gauges (and the round's seconds as a histogram)."""
    try:
        _metric("gauge", "spo_policy_version", "SPO newest published policy version", ("run",)).set(
            float(policy_version), {"run": run})
        for key, name in ROUND_GAUGES.items():
            value = record.get(key)
            if isinstance(value, (int, float)):
                _metric("gauge", name, f"SPO {key} of the latest round", ("run",)).set(float(value), {"run": run})
        for key, value in record.items():
            if key.startswith("busy/") and isinstance(value, (int, float)):
                _metric("gauge", "spo_busy_fraction", "SPO busy fraction per role over the latest round",
                        ("run", "role")).set(float(value), {"run": run, "role": key.removeprefix("busy/")})
        if isinstance(record.get("round_seconds"), (int, float)):
            _metric("histogram", "spo_round_seconds", "SPO seconds per round (trainer view)",
                    ("run",)).observe(float(record["round_seconds"]), {"run": run})
    except Exception as err:  # noqa: BLE001
        log.debug("Ray metrics export failed: %s", err)


def observe_gate_wait(run: str, seconds: float) -> None:
    """A sampler's blocked wait at the staleness gate."""
    try:
        _metric("histogram", "spo_gate_wait_seconds", "SPO sampler waits at the policy staleness gate",
                ("run",)).observe(seconds, {"run": run})
    except Exception as err:  # noqa: BLE001
        log.debug("Ray metrics export failed: %s", err)
