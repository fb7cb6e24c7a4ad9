"""The bench's targets and its markdown table."""

from __future__ import annotations

import math
from typing import Any

import torch

from spo_ray.bench.runs import TARGET_HOP, TARGET_RATIO


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _tflop(x: float) -> str:
    return f"{x / 1e12:.3g} T" if x >= 1e11 else f"{x / 1e9:.3g} G"


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each from this run: the kept-pairs ratio and the hop bytes of every Ray run."""
    base = next((r for r in rows if r["engine"] == "in-process"), None)
    targets = []
    for row in rows:
        if row["engine"] != "ray":
            continue
        if base is not None:
            ratio = row["kept_pairs_per_s"] / max(base["kept_pairs_per_s"], 1e-12)
            prompt_ratio = row["prompts_per_s"] / max(base["prompts_per_s"], 1e-12)
            row["ratio_vs_in_process"], row["prompt_ratio_vs_in_process"] = ratio, prompt_ratio
            # Met only if both rates are: kept pairs/s alone can be flattered by a lucky kept count.
            targets.append({"target": f"ray ({row['samplers']} sampler(s)) >= {TARGET_RATIO}x in-process "
                                      "kept pairs/s and prompts/s (the lower shown)",
                            "value": min(ratio, prompt_ratio), "met": min(ratio, prompt_ratio) >= TARGET_RATIO})
        for hop, h in row["hops"].items():
            targets.append({"target": f"{hop} bytes <= {TARGET_HOP}x tensor minimum ({row['samplers']} samplers)",
                            "value": h["ratio"], "met": h["ratio"] <= TARGET_HOP})
    return targets


def _threads_phrase(rows: list[dict[str, Any]]) -> str:
    ray_threads = [r["torch_threads"] for r in rows if "torch_threads" in r]
    if not ray_threads:
        return "in-process engine only"
    per_role = " / ".join(f"{role} {n}" for role, n in ray_threads[0].items())
    mixed = " (differs between runs: see bench.json)" if any(t != ray_threads[0] for t in ray_threads) else ""
    return f"torch threads per Ray actor: {per_role}{mixed}; the in-process engine uses {torch.get_num_threads()}"


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["runs"]
    heads = [("in-process" if r["engine"] == "in-process" else f"ray, {r['samplers']} sampler(s)") for r in rows]
    lines = [f"Size `{result['options']['size']}`: {result['options']['rounds']} rounds x "
             f"{result['options']['prompts_per_round']} prompts, {result['options']['steps']} DDIM steps, pool k=4, "
             f"lag 1, one trainer worker, one scorer; {_threads_phrase(rows)}.", "",
             "| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(rows)]

    def add(name: str, values: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    if not rows:  # the published sizes: FLOP counting only (the engines run at tiny and bench)
        lines = []

    if rows:
        add("**kept pairs/s** (steady: rounds 2..N; all rates below too)", [_fmt(r["kept_pairs_per_s"], 3) for r in rows])
        add("ratio distributed / in-process (kept pairs/s)", [_fmt(r.get("ratio_vs_in_process")) if r["engine"] == "ray" else "1.00" for r in rows])
        add("**prompts/s** (same sampling + scoring work per prompt)", [_fmt(r["prompts_per_s"], 3) for r in rows])
        add("ratio distributed / in-process (prompts/s)",
            [_fmt(r.get("prompt_ratio_vs_in_process")) if r["engine"] == "ray" else "1.00" for r in rows])
        add("kept pairs in the steady rounds", [str(r["steady_pairs"]) for r in rows])
        add("kept pairs/s end to end (incl. start-up)", [_fmt(r["kept_pairs_per_s_end_to_end"], 3) for r in rows])
        add("UNet forwards/s per sampler", [_fmt(r["unet_forwards_per_s_per_sampler"]) for r in rows])
        add("images scored/s per scorer", [_fmt(r["images_scored_per_s_per_scorer"]) for r in rows])
        add("optimizer steps/s", [_fmt(r["optimizer_steps_per_s"], 3) for r in rows])
        add("busy fraction sampler / scorer / trainer",
            [" / ".join(_fmt(r["busy_fraction"][k]) for k in ("sampler", "scorer", "trainer")) for r in rows])
        add("wall split sampling / scoring / training / waiting",
            [" / ".join(_fmt(r["wall_split"][k]) for k in ("sampling", "scoring", "training", "waiting")) for r in rows])
        add("sampler -> scorer bytes per scoring event (x min)",
            [f"{_fmt(r['hops']['sampler_to_scorer']['per_scoring_event'], 0)} ({_fmt(r['hops']['sampler_to_scorer']['ratio'], 3)}x)"
             if "hops" in r else "in memory" for r in rows])
        add("scorer -> trainer bytes per kept pair (x min)",
            [f"{_fmt(r['hops']['scorer_to_trainer']['per_kept_pair'], 0)} ({_fmt(r['hops']['scorer_to_trainer']['ratio'], 3)}x)"
             if "hops" in r else "in memory" for r in rows])
        add("peak RSS MiB sampler / scorer / trainer",
            [" / ".join(_fmt(r["peak_rss_mib"][k], 0) for k in ("sampler", "scorer", "trainer")) for r in rows])
        add("policy lag (rounds: count)", [", ".join(f"{k}: {v}" for k, v in r["policy_lag"].items()) for r in rows])
        add("bottleneck role", [r.get("bottleneck", "-") for r in rows])
        add("CPU seconds per kept pair (whole run, engine processes)", [_fmt(r["cpu_seconds_per_kept_pair"]) for r in rows])
        add("wall seconds", [_fmt(r["wall_s"], 0) for r in rows])
        add("machine load average (1 min) before / after", [" / ".join(_fmt(x, 1) for x in r["load_average"]) for r in rows])

    if result.get("flops"):
        f = result["flops"]
        lines += ["", f"FLOPs (FlopCounterMode; multiply-add = 2), size `{f['size']}`: UNet forward "
                  f"{_tflop(f['unet_forward_per_sample'])}FLOP per sample, VAE decode {_tflop(f['vae_decode_per_image'])}FLOP "
                  f"per image, SPM {_tflop(f['spm_vision_per_image'])}FLOP per image + {_tflop(f['spm_text_per_prompt'])}FLOP "
                  f"text; kept fraction {f['kept_fraction']:.2f}.", "",
                  "| per kept pair | sampler | scorer | trainer | total | training share |", "|---|---|---|---|---|---|"]
        for when in ("before", "after"):
            w = f[when]
            roles = w["per_kept_pair"]
            lines.append(f"| {when} | " + " | ".join(_tflop(roles[k]) + "FLOP" for k in ("sampler", "scorer", "trainer"))
                         + f" | {_tflop(w['total_per_kept_pair'])}FLOP | {w['training_share']:.1%} |")
        if "measured_training" in f:
            m = f["measured_training"]
            lines.append("")
            lines.append(f"Project code (`microbatch_loss` + backward, CPU) per transition pair: after "
                         f"{_tflop(m['after'])}FLOP, before {_tflop(m['before'])}FLOP (x{m['before'] / max(m['after'], 1):.2f}).")
        if "achieved" in f:
            a = f["achieved"]
            lines.append(f"Achieved {a['flops_per_s'] / 1e9:.1f} GFLOP/s (in-process, steady) = {a['mfu']:.1%} of this "
                         f"machine's measured fp32 matmul rate ({a['peak_flops_per_s'] / 1e9:.0f} GFLOP/s).")
    if result.get("flops", {}).get("roles_measured"):
        m = result["flops"]["roles_measured"]
        lines += ["", f"Per-role compute, measured on {m['device']} in {m['dtype']} (random weights at these shapes, "
                  f"batch {m['batch']}, CFG as one batch); MFU against the measured dense matmul rate "
                  f"({_tflop(m['peak_flops_per_s'])}FLOP/s):", "",
                  "| role | work timed | FLOP/s | MFU |", "|---|---|---|---|"]
        work = {"sampler": "guided UNet forward", "scorer": "VAE decode + SPM vision tower",
                "trainer": "LoRA policy fwd + bwd, reference fwd"}
        for role, r in m["roles"].items():
            lines.append(f"| {role} | {work[role]} | {_tflop(r['flops_per_s'])}FLOP/s | {r['mfu']:.1%} |")
        if "seconds_per_kept_pair" in m:
            lines += ["", f"Compute time per kept pair at these rates (roles one after the other on one device): "
                      f"{m['seconds_per_kept_pair'] * 1e3:.0f} ms, against the bound (FLOPs per kept pair / peak) "
                      f"{m['bound_seconds_per_kept_pair'] * 1e3:.0f} ms."]
    if result.get("targets"):
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {_fmt(t['value'], 3)} | {'yes' if t['met'] else '**no**'} |")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu_cores']} CPU cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}, "
              f"torch {m['torch']}; {result['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"
