"""Preference pairs: files (Pick-a-Pic or plain layouts), checks before any cluster resource, per-example
tags (split, example id, weight, epoch, t: pure functions of ids) and image decoding."""

from __future__ import annotations

import glob
import hashlib
import heapq
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spo_ray import rng
from spo_ray.spm_training.config import FORMATS, NUM_TIMESTEPS, PICKAPIC_COLUMNS, PLAIN_COLUMNS, SPMConfig

log = logging.getLogger(__name__)

class PreferenceDataError(ValueError):
    """A preference file that cannot be used; the message names the file and the problem."""


@dataclass
class PreferenceSource:
    """What the driver learned about one split's files before any cluster resource is used."""

    files: list[str]
    fmt: str  # "parquet" | "json" | "csv"
    layout: str  # "pickapic" | "plain"
    image_root: str | None  # plain layout: where relative image paths start
    prompt_counts: dict[str, int]  # examples per prompt (the weight is 1 / count)
    num_examples: int
    num_ties: int
    units: list[tuple[str, int]]  # what one read task reads: (file, parquet row group), -1 = the whole file


def resolve_files(spec: str) -> list[str]:
    """A file, a directory (its supported files) or a glob -> sorted files of one format."""
    p = Path(spec)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in FORMATS)
    else:
        files = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
        if not files and not glob.has_magic(spec):
            raise PreferenceDataError(f"preference data not found: {spec}")
    if not files:
        raise PreferenceDataError(f"no preference files ({', '.join(FORMATS)}) in {spec}")
    bad = [str(f) for f in files if f.suffix not in FORMATS]
    if bad:
        raise PreferenceDataError(f"unsupported preference file type: {bad[0]} (use {', '.join(FORMATS)})")
    if len({FORMATS[f.suffix] for f in files}) > 1:
        raise PreferenceDataError(f"{spec} mixes file formats; use one of parquet, jsonl or csv")
    return [str(f) for f in files]


def _read_table(path: str, fmt: str, columns: list[str] | None = None):
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(path, columns=columns)
        table = pyarrow.json.read_json(path) if fmt == "json" else pyarrow.csv.read_csv(path)
        return table.select(columns) if columns is not None else table
    except Exception as err:  # any reader failure means the same thing to the user
        raise PreferenceDataError(f"could not read {path}: {type(err).__name__}: {err}") from err


def _columns_and_units(path: str, fmt: str) -> tuple[list[str], list[tuple[str, int]]]:
    """A file's column names and its read units: each parquet row group (one footer read), or the
    whole json/csv file (-1)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
            return list(meta.schema.to_arrow_schema().names), [(path, g) for g in range(meta.num_row_groups)]
        except Exception as err:
            raise PreferenceDataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    return list(_read_table(path, fmt).column_names), [(path, -1)]


def detect_layout(columns: list[str], layout: str, path: str) -> str:
    """``pickapic`` (caption, jpg_0, jpg_1, label_0) or ``plain`` (prompt, image_0, image_1, label)."""
    if layout == "auto":
        layout = "pickapic" if "jpg_0" in columns else "plain" if "image_0" in columns else ""
        if not layout:
            raise PreferenceDataError(
                f"{path}: cannot tell the layout from its columns {columns}; expected Pick-a-Pic "
                f"({', '.join(PICKAPIC_COLUMNS)}) or plain ({', '.join(PLAIN_COLUMNS)})"
            )
    required = PICKAPIC_COLUMNS if layout == "pickapic" else PLAIN_COLUMNS
    missing = [c for c in required if c not in columns]
    if missing:
        raise PreferenceDataError(
            f"{path}: missing column(s) {', '.join(missing)} for the {layout} layout "
            f"(needs {', '.join(required)}; has {', '.join(columns)})"
        )
    return layout


def label_0_of(layout: str, label: np.ndarray) -> np.ndarray:
    """P(image_0 preferred). Pick-a-Pic's ``label_0`` already is; the plain layout's ``label`` is the index of
    the preferred image (0 -> image_0, 1 -> image_1, 0.5 -> a tie), so label_0 = 1 - label."""
    label = np.asarray(label, dtype=np.float64)
    return label if layout == "pickapic" else 1.0 - label


def in_eval_split(prompt: str, seed: int, eval_fraction: float) -> bool:
    """Held-out by prompt (a pure function of the prompt), so no eval prompt is ever trained on."""
    return eval_fraction > 0 and rng.derive_seed("spm-split", seed, prompt) % 1_000_000 < eval_fraction * 1_000_000


def inspect_preferences(spec: str, layout: str, image_root: str | None, *, keep=None) -> PreferenceSource:
    """Check columns, labels and (plain layout) image files of a split on the driver; count examples per
    prompt. Reads only the small columns (never the image bytes). ``keep(prompt)`` filters the split."""
    files = resolve_files(spec)
    fmt = FORMATS[Path(files[0]).suffix]
    found = None
    counts: dict[str, int] = {}
    num, ties = 0, 0
    units: list[tuple[str, int]] = []
    for path in files:
        columns, file_units = _columns_and_units(path, fmt)
        units += file_units
        lay = detect_layout(columns, layout, path)
        if found is not None and lay != found:
            raise PreferenceDataError(f"{path} is in the {lay} layout but {files[0]} is {found}")
        found = lay
        prompt_col, _, _, label_col = PICKAPIC_COLUMNS if lay == "pickapic" else PLAIN_COLUMNS
        cols = [prompt_col, label_col] + (["image_0", "image_1"] if lay == "plain" else [])
        table = _read_table(path, fmt, cols).to_pydict()
        prompts, labels = table[prompt_col], table[label_col]
        bad = [i for i, (p, lab) in enumerate(zip(prompts, labels, strict=True))
               if not isinstance(p, str) or not isinstance(lab, (int, float)) or not 0 <= lab <= 1]
        if bad:
            i = bad[0]
            raise PreferenceDataError(
                f"{path}: {len(bad)} row(s) with a missing prompt or a {label_col} outside [0, 1] "
                f"(first: row {i}, prompt {prompts[i]!r}, {label_col} {labels[i]!r})"
            )
        if lay == "plain":
            root = Path(image_root) if image_root else Path(path).parent
            missing = [f for f in table["image_0"] + table["image_1"] if not isinstance(f, str) or not (root / f).is_file()]
            if missing:
                raise PreferenceDataError(
                    f"{path}: {len(missing)} image file(s) not found under {root} (first: {missing[0]!r})"
                )
        for p, lab in zip(prompts, labels, strict=True):
            if keep is None or keep(p):
                counts[p] = counts.get(p, 0) + 1
                num += 1
                ties += float(lab) == 0.5
    if num == 0:
        raise PreferenceDataError(f"{spec}: no preference pairs in this split")
    assert found is not None
    if found == "plain" and not image_root and len({Path(f).parent for f in files}) > 1:
        raise PreferenceDataError(f"{spec}: files in several directories; set data.image_root for their image paths")
    root = (image_root or str(Path(files[0]).parent)) if found == "plain" else None
    return PreferenceSource(files, fmt, found, root, counts, num, ties, units)


def bucket_of(t: Any, edges: list[int]) -> np.ndarray:
    """Index of the bucket [edges[i], edges[i+1]) each timestep falls in."""
    return np.searchsorted(np.asarray(edges[1:]), np.asarray(t), side="right")


def bucket_names(edges: list[int]) -> list[str]:
    return [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)]


def _digest(value: Any) -> str:
    data = value if isinstance(value, bytes) else str(value).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def tag_examples(
    batch: Any,
    *,
    layout: str,
    split: str,
    epoch: int,
    seed: int,
    prompt_counts: dict[str, int],
    eval_fraction: float,
    image_root: str | None,
    bucket_edges: list[int],
    timesteps_per_bucket: int,
    consumed: np.ndarray | None = None,
) -> Any:
    """One Ray Data batch (pandas) of raw pairs -> rows the renderer takes, all keyed by pure functions.

    Keeps the split's rows, reads plain-layout images as bytes, and adds ``example_id`` (a hash of the
    prompt and both images: independent of file order), ``label_0``, ``weight`` = 1 / examples-per-prompt,
    and the timestep: a training row gets t ~ U{0..999} keyed by (seed, epoch, example id); a held-out pair
    becomes ``timesteps_per_bucket`` rows per bucket, t uniform inside the bucket. ``consumed``
    (sorted example ids of this epoch a resumed run already trained on) are dropped here, before
    the expensive rendering.
    """
    import pandas as pd

    prompt_col, img0, img1, label_col = PICKAPIC_COLUMNS if layout == "pickapic" else PLAIN_COLUMNS
    rows = []
    for _, row in batch.iterrows():
        prompt = row[prompt_col]
        if eval_fraction > 0 and in_eval_split(prompt, seed, eval_fraction) != (split == "eval"):
            continue
        if layout == "plain":
            root = Path(image_root or ".")
            images = [(root / row[c]).read_bytes() for c in (img0, img1)]
        else:
            images = [row[img0], row[img1]]
            images = [im["bytes"] if isinstance(im, dict) else bytes(im) for im in images]  # HF Image feature
        example_id = rng.derive_seed("spm-example", prompt, _digest(images[0]), _digest(images[1]))
        if consumed is not None and _contains(consumed, example_id):
            continue
        base = {
            "prompt": prompt, "image_0": images[0], "image_1": images[1],
            "label_0": float(label_0_of(layout, np.array([row[label_col]]))[0]),
            "weight": 1.0 / prompt_counts.get(prompt, 1), "example_id": example_id, "epoch": epoch,
        }
        if split == "train":
            rows.append({**base, "slot": 0, "t": rng.randint(NUM_TIMESTEPS, "spm-t", seed, epoch, example_id)})
            continue
        for b, (lo, hi) in enumerate(zip(bucket_edges, bucket_edges[1:], strict=False)):
            for r in range(timesteps_per_bucket):
                slot = 1 + b * timesteps_per_bucket + r
                rows.append({**base, "slot": slot, "t": lo + rng.randint(hi - lo, "spm-eval-t", seed, example_id, slot)})
    columns = ["prompt", "image_0", "image_1", "label_0", "weight", "example_id", "epoch", "slot", "t"]
    return pd.DataFrame(rows, columns=columns)


def _contains(sorted_ids: np.ndarray, value: int) -> bool:
    i = int(np.searchsorted(sorted_ids, value))
    return i < len(sorted_ids) and int(sorted_ids[i]) == value


READ_CHUNK_ROWS = 256  # rows a read task hands on at a time (Pick-a-Pic: ~1 MB of images a row)


def _unfinished_epochs(epochs: int, consumed: dict[int, np.ndarray], num_examples: int) -> list[int]:
    return [e for e in range(epochs) if len(consumed.get(e, ())) < num_examples]


def epochs_to_read(epochs: int, consumed: dict[int, np.ndarray], num_examples: int) -> list[int]:
    """The training epochs a (resumed) stream reads: those not trained on in full. When every epoch
    was, the last one (:func:`read_plan` then reads one unit of it, every row dropped)."""
    return _unfinished_epochs(epochs, consumed, num_examples) or [epochs - 1]


def read_plan(units: list[tuple[str, int]], *, split: str, epochs: int, consumed: dict[int, np.ndarray],
              num_examples: int, seed: int) -> list[dict[str, Any]]:
    """The read tasks of a split's stream: the training epochs not yet trained on in full, in order
    (:func:`unit_plan`), or the held-out units once. A resume after the last row reads a single
    unit, all its rows dropped as consumed: an empty stream (Ray Data passes no empty batch to the
    renderer; the trainer goes straight to evaluation) without reading an epoch for nothing."""
    if split != "train":
        return unit_plan(units, [-1], seed=seed, shuffle=False)
    items = unit_plan(units, epochs_to_read(epochs, consumed, num_examples), seed=seed, shuffle=True)
    return items if _unfinished_epochs(epochs, consumed, num_examples) else items[:1]


def unit_plan(units: list[tuple[str, int]], epochs: list[int], *, seed: int, shuffle: bool) -> list[dict[str, Any]]:
    """The stream's read tasks in order: every epoch's units one epoch after another, each epoch in
    its own seeded order (``shuffle``; held-out rows keep file order). Ray Data keeps this order
    through the pipeline (``preserve_order``), so the epochs follow one another in the stream; a
    union of per-epoch reads would interleave them block by block."""
    items = []
    for epoch in epochs:
        order = rng.permutation(len(units), "spm-units", seed, epoch).tolist() if shuffle else range(len(units))
        items += [{"file": units[i][0], "row_group": units[i][1], "epoch": epoch} for i in order]
    return items


def read_and_tag(
    items: Any, *, fmt: str, layout: str, consumed: dict[int, np.ndarray] | None = None, **tag_kwargs: Any
) -> Iterator[Any]:
    """Read the units of ``items`` (a pandas batch of :func:`unit_plan` rows) in chunks of
    ``READ_CHUNK_ROWS`` rows and tag each chunk (:func:`tag_examples`) with its unit's epoch,
    dropping the rows a resumed run already trained on (``consumed``: sorted ids per epoch)."""
    import pyarrow.parquet as pq

    cols = list(PICKAPIC_COLUMNS if layout == "pickapic" else PLAIN_COLUMNS)
    for item in items.itertuples(index=False):
        epoch = int(item.epoch)
        if fmt == "parquet":
            chunks = pq.ParquetFile(item.file).iter_batches(READ_CHUNK_ROWS, row_groups=[int(item.row_group)], columns=cols)
        else:
            chunks = _read_table(item.file, fmt, cols).to_batches(READ_CHUNK_ROWS)
        for chunk in chunks:
            yield tag_examples(chunk.to_pandas(), layout=layout, epoch=epoch,
                               consumed=(consumed or {}).get(epoch), **tag_kwargs)


def keyed_shuffle(
    chunks: Iterable[dict[str, np.ndarray]], *, buffer_rows: int, batch_size: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Training batches from a stream of row chunks, shuffled through a buffer of ``buffer_rows``
    rows that always releases its row with the smallest key (a pure function of seed, epoch and
    example id); a last partial batch is dropped (ranks step together).

    Unlike a random shuffle buffer this one resumes exactly: at a batch boundary the buffer holds
    the ``buffer_rows`` earliest rows not yet trained on, so a resumed stream without the rows
    already trained on (``tag_examples(consumed=...)``) refills it with the same rows and yields the
    same batches from there. Memory: ``buffer_rows`` rendered rows (2 x 3 x 224 x 224 fp32 = 1.2 MB
    each: 300 MB at 256), as Ray's local shuffle buffer holds."""
    heap: list[tuple[int, int, int, dict[str, np.ndarray]]] = []
    arrived = 0  # ties (the same pair twice in an epoch) keep stream order, in a resumed stream too
    ready: list[dict[str, np.ndarray]] = []

    def batch() -> dict[str, np.ndarray]:
        out = {k: np.stack([r[k] for r in ready]) for k in ready[0]}
        ready.clear()
        return out

    for chunk in chunks:
        for i in range(len(chunk["example_id"])):
            row = {k: np.array(v[i]) for k, v in chunk.items()}  # a copy: the chunk is not kept alive
            key = rng.derive_seed("spm-shuffle", seed, int(row["epoch"]), int(row["example_id"]))
            heapq.heappush(heap, (key, int(row["example_id"]), arrived, row))
            arrived += 1
            if len(heap) > buffer_rows:
                ready.append(heapq.heappop(heap)[3])
                if len(ready) == batch_size:
                    yield batch()
    while heap:
        ready.append(heapq.heappop(heap)[3])
        if len(ready) == batch_size:
            yield batch()


def inspect_splits(cfg: SPMConfig) -> tuple[PreferenceSource, PreferenceSource | None]:
    """Both splits checked on the driver (columns, labels, image files), before any cluster resource."""
    d, seed = cfg.data, cfg.train.seed
    if d.eval is not None:
        train = inspect_preferences(d.train, d.layout, d.image_root)
        return train, inspect_preferences(d.eval, d.layout, d.image_root)
    train = inspect_preferences(d.train, d.layout, d.image_root, keep=lambda p: not in_eval_split(p, seed, d.eval_fraction))
    if d.eval_fraction == 0:
        return train, None
    held = inspect_preferences(d.train, d.layout, d.image_root, keep=lambda p: in_eval_split(p, seed, d.eval_fraction))
    return train, held
