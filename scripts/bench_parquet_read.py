"""Start-up cost and epoch order of the SPM stream's reads, side by side on a local Ray instance:

- ``union``: one ``ray.data.read_parquet`` per epoch, each with its own block order, unioned (what
  spm_training.driver built before; Ray 2.60's parquet reader starts 32 footer-reader actors per read);
- ``units``: what it builds now: ``from_items(unit_plan(...))`` -> ``map_batches(read_and_tag)``.

    python scripts/bench_parquet_read.py [--epochs 3] [--row-groups 4]

The file is small, so ``RAY_DATA_PARQUET_BIN_PACKING_BYTES=4096`` makes ``read_parquet`` emit a block
per row group, as it does for Pick-a-Pic's ~100 MB row groups (it packs up to 128 MiB per block).

Each variant runs in a fresh process (no warm workers carried over) and prints the seconds from
building the dataset to its last row and whether the epochs came out one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(variant: str, path: str, epochs: int) -> dict:
    import numpy as np
    import ray
    import ray.data

    from spo_ray.spm_training.data import inspect_preferences, read_and_tag, unit_plan

    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # as the SPM trainer's split asks for its training rows
    src = inspect_preferences(path, "auto", None)
    kw = dict(layout=src.layout, split="train", seed=0, prompt_counts=src.prompt_counts, eval_fraction=0.0,
              image_root=None, bucket_edges=[0, 1000], timesteps_per_bucket=1)
    started = time.time()
    if variant == "union":
        from spo_ray.spm_training.data import tag_examples

        parts = [ray.data.read_parquet(src.files).randomize_block_order(seed=e)
                 .map_batches(tag_examples, batch_format="pandas", fn_kwargs={**kw, "epoch": e}) for e in range(epochs)]
        ds = parts[0].union(*parts[1:])
    else:
        items = unit_plan(src.units, list(range(epochs)), seed=0, shuffle=True)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_and_tag, batch_size=1, batch_format="pandas", fn_kwargs={**kw, "fmt": src.fmt})
    seen = np.concatenate([b["epoch"] for b in ds.iter_batches(batch_format="numpy", batch_size=None)])
    seconds = time.time() - started
    ray.shutdown()
    return {"seconds": seconds, "rows": len(seen), "in_order": bool((np.diff(seen) >= 0).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--row-groups", type=int, default=4)
    ap.add_argument("--child", choices=["union", "units"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.path, args.epochs)))
        return
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 64 * args.row_groups
    rng = np.random.default_rng(0)
    table = pa.table({"caption": [f"prompt {i % 12}" for i in range(n)], "jpg_0": [rng.bytes(64) for _ in range(n)],
                      "jpg_1": [rng.bytes(64) for _ in range(n)], "label_0": rng.choice([0.0, 0.5, 1.0], n)})
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "pairs.parquet")
        pq.write_table(table, path, row_group_size=64)
        repo = str(Path(__file__).resolve().parents[1])  # this checkout's spo_ray, in the Ray workers too
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
               "RAY_DATA_PARQUET_BIN_PACKING_BYTES": "4096"}
        for variant in ("union", "units"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--path", path, "--epochs", str(args.epochs)],
                                 capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{variant:6s} {args.epochs} epochs x {args.row_groups} row groups: {r['seconds']:.1f} s to the last of "
                  f"{r['rows']} rows; epochs one after another: {r['in_order']}")


if __name__ == "__main__":
    main()
