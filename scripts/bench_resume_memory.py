"""Host memory a resume takes: a checkpoint (checkpointing.save_checkpoint: fp32 weights + two Adam
moments) read with ``load_checkpoint`` and copied into parameters and optimizer state, as a trainer
rank's resume does.

    python scripts/bench_resume_memory.py [--mib 256]

``--mib`` is the fp32 weights' size (the checkpoint is 3x that). Runs in a fresh process and prints,
above the memory of the live parameters and moments themselves: the peak anonymous memory (the
process's own copies, sampled after every tensor read) and the peak RSS, which also counts the
checkpoint's memory-mapped file pages (the node's page cache: shared by every rank that maps the
same files, and reclaimable).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def _shapes(mib: int) -> dict[str, tuple[int, int]]:
    return {f"layer{i}.weight": (mib * 2**20 // 4 // 16 // 1024, 1024) for i in range(16)}


def child(path: str, mib: int) -> None:
    import torch

    from spo_ray.checkpointing import load_checkpoint

    params = {k: torch.zeros(s) for k, s in _shapes(mib).items()}  # the live model and optimizer state
    state = {f"{k}.{m}": torch.zeros(s) for k, s in _shapes(mib).items() for m in ("exp_avg", "exp_avg_sq")}
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = peak = _anon_mib()
    _, weights, moments = load_checkpoint(path)
    peak = max(peak, _anon_mib())
    for name, param in params.items():
        param.copy_(weights[name])
        for m in ("exp_avg", "exp_avg_sq"):
            state[f"{name}.{m}"].copy_(moments[f"{name}.{m}"])
        peak = max(peak, _anon_mib())
    print(f"{peak - base:.0f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.path, args.mib)
        return
    import torch

    from spo_ray.checkpointing import RunProgress, save_checkpoint

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {k: torch.randn(s) for k, s in _shapes(args.mib).items()}
        moments = {f"{k}.{m}": torch.rand(v.shape) for k, v in weights.items() for m in ("exp_avg", "exp_avg_sq")}
        path = save_checkpoint(tmp, RunProgress(position=1), weights=weights, optimizer=moments)
        del weights, moments
        run = subprocess.run([sys.executable, __file__, "--child", "--path", str(path), "--mib", str(args.mib)],
                             capture_output=True, text=True, check=True, env=env)
        anon, rss = (float(x) for x in run.stdout.strip().splitlines()[-1].split())
    print(f"resume from a {3 * args.mib} MiB checkpoint: peak anonymous memory {anon:.0f} MiB, peak RSS {rss:.0f} MiB "
          "(the mapped checkpoint files), above the live parameters and moments")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
