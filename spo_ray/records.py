"""Data contracts: the two record kinds that flow between roles, and their Arrow schema.

Trajectory records (sampler -> scorer), one row per prompt of a round:
    prompt_id, prompt, epoch, round, policy_version,
    seg_start [S], seg_len [S], seg_timesteps [S, M], score_t [S], choice [S],
    x_t [S, C, H, W]            the shared state each segment branches from
    chains [S, k, M, C, H, W]   each candidate's states after each of its transitions
    x0_hat [S, k, C, H, W]      what the preference model scores
    final [C, H, W], cond_prompt_embeds [L, D] (+ cond_pooled_embeds [P], cond_time_ids [6] for SDXL)
Pair records (scorer -> trainer), one row per kept pair:
    pair_id, prompt_id, prompt, epoch, round, policy_version, seg_start, seg_len,
    timesteps [M], x_t [C, H, W], win [M, C, H, W], lose [M, C, H, W],
    score_win, score_lose, score_t, cond_*
Prompt rows (scorer -> trainer, the Ray Data stream), one row per prompt with kept pairs: the
pair columns as ragged [n, ...] arrays (n = the prompt's kept pairs), the per-prompt columns
(``PROMPT_COLUMNS``: ids, text, policy version, the conditioning) once. ``group_by_prompt`` and
``ungroup_prompts`` convert, exactly; a prompt's pairs stay in one row, so no block split by Ray
Data can separate a pair from its conditioning.
Conditioning travels once per prompt on every hop (per trajectory row; per prompt row; per prompt
and destination between trainer ranks, ``share_conditioning``), never per pair or candidate.
The latents that enter the log-prob (x_t, chains; x_t, win, lose) are float32 whatever the model
dtype; x0_hat and cond_* are in the model's dtype, in torch batches and on the wire (numpy has no
bfloat16: :func:`to_numpy` carries bf16 as its bits, exactly).

In one process the batches are dicts of torch tensors (and a list of prompt strings); between
Ray actors they are dicts of numpy arrays; at rest (tests, debugging dumps) an Arrow table
with fixed-shape tensor columns, whose schema carries ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = 2  # 2: bf16 columns as their bits (``<name>__bf16``)
STRING_COLUMNS = ("prompt",)
TRAJECTORY_COLUMNS = (
    "prompt_id", "prompt", "epoch", "round", "policy_version", "seg_start", "seg_len", "seg_timesteps",
    "score_t", "choice", "x_t", "chains", "x0_hat", "final", "cond_prompt_embeds",
)
PAIR_COLUMNS = (
    "pair_id", "prompt_id", "prompt", "epoch", "round", "policy_version", "seg_start", "seg_len", "timesteps",
    "x_t", "win", "lose", "score_win", "score_lose", "score_t", "cond_prompt_embeds",
)
OPTIONAL_COLUMNS = ("cond_pooled_embeds", "cond_time_ids")
COND_PREFIX = "cond_"
# Pair columns that are the same for every pair of a prompt (one trajectory row): once per prompt row.
PROMPT_COLUMNS = ("prompt_id", "prompt", "epoch", "round", "policy_version")


def num_rows(batch: dict[str, Any]) -> int:
    return len(batch["prompt_id"])


BF16_SUFFIX = "__bf16"  # numpy has no bfloat16: such a column travels as its 16-bit pattern, under this name


def to_numpy(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Torch batch -> numpy batch (what Ray Data carries). Every tensor keeps its dtype: a bf16
    column travels as its bits (int16) under ``<name>__bf16``, never upcast (half the bytes, exact)."""
    out: dict[str, np.ndarray] = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                out[key + BF16_SUFFIX] = value.contiguous().view(torch.int16).numpy()
            else:
                out[key] = value.numpy()
        elif key in STRING_COLUMNS:
            out[key] = np.asarray(list(value), dtype=object)
        else:
            out[key] = np.asarray(value)
    return out


def to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    """Numpy batch -> torch batch (string columns become lists, ``__bf16`` columns bf16 again)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in STRING_COLUMNS:
            out[key] = [str(v) for v in value]
            continue
        value = np.ascontiguousarray(value)
        if not value.flags.writeable:  # Ray hands out read-only zero-copy arrays
            value = value.copy()
        if key.endswith(BF16_SUFFIX):
            out[key.removesuffix(BF16_SUFFIX)] = torch.from_numpy(value).view(torch.bfloat16)
        else:
            out[key] = torch.from_numpy(value)
    return out


def concat(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate torch batches with the same columns (empty list -> empty dict)."""
    if not batches:
        return {}
    out: dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        out[key] = torch.cat(values) if torch.is_tensor(values[0]) else [v for part in values for v in part]
    return out


def sort_rows(batch: dict[str, Any], key: str) -> dict[str, Any]:
    """Rows ordered by ``key`` (arrival order across actors is not deterministic; ids are)."""
    order = torch.argsort(batch[key], stable=True)
    return {k: (v[order] if torch.is_tensor(v) else [v[i] for i in order.tolist()]) for k, v in batch.items()}


def _arrow_type(array: np.ndarray) -> pa.DataType:
    if array.dtype == object:
        return pa.string()
    scalar = pa.from_numpy_dtype(array.dtype)
    return scalar if array.ndim == 1 else pa.fixed_shape_tensor(scalar, list(array.shape[1:]))


def arrow_schema(batch: dict[str, Any], kind: str) -> pa.Schema:
    """The Arrow schema of a record batch: tensor columns as fixed-shape tensors, versioned."""
    arrays = to_numpy(batch)
    fields = [pa.field(name, _arrow_type(arr)) for name, arr in arrays.items()]
    return pa.schema(fields, metadata={"spo_ray.schema_version": str(SCHEMA_VERSION), "spo_ray.kind": kind})


def validate_columns(batch: dict[str, Any], kind: str) -> None:
    """Raise ValueError when a batch misses a column of its kind or rows disagree in count."""
    wanted = TRAJECTORY_COLUMNS if kind == "trajectory" else PAIR_COLUMNS
    missing = [c for c in wanted if c not in batch]
    if missing:
        raise ValueError(f"{kind} batch is missing column(s): {', '.join(missing)}")
    counts = {key: len(value) for key, value in batch.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{kind} batch columns have different row counts: {counts}")


def to_arrow(batch: dict[str, Any], kind: str) -> pa.Table:
    """A record batch as an Arrow table (fixed-shape tensor columns)."""
    validate_columns(batch, kind)
    schema = arrow_schema(batch, kind)
    columns = []
    for field, arr in zip(schema, to_numpy(batch).values(), strict=True):
        if isinstance(field.type, pa.FixedShapeTensorType):
            columns.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr)))
        else:
            columns.append(pa.array(arr.tolist() if arr.dtype == object else arr, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def from_arrow(table: pa.Table) -> dict[str, Any]:
    """Inverse of :func:`to_arrow`; refuses a table written with another schema version."""
    version = (table.schema.metadata or {}).get(b"spo_ray.schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise ValueError(f"record table has schema version {version}, this spo_ray reads {SCHEMA_VERSION}")
    out: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[name] = column.to_numpy_ndarray()
        elif pa.types.is_string(column.type):
            out[name] = np.asarray(column.to_pylist(), dtype=object)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return to_torch(out)


# ----------------------------------------------------------------------------- tensors by name


def pack_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, np.ndarray]]:
    """Named CPU tensors as (dtype name, numpy array), bf16 as its 16-bit pattern: what travels
    through Ray's object store with zero-copy reads, bit-exact in every dtype."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        out[name] = (dtype, (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())
    return out


def unpack_tensors(packed: dict[str, tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_tensors`, without a copy: the tensors are views of the arrays (from
    Ray, read-only views of the object store's shared memory), for copying into parameters, never
    for writing. A copy here would cost a whole policy version of transient memory per fetch: at
    SDXL full fine-tuning 5.2 GB per sampler, 42 GB on a node of eight."""
    out = {}
    with warnings.catch_warnings():  # torch warns that the buffer is not writable: it is not written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (dtype, array) in packed.items():
            t = torch.from_numpy(array)
            out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


def packed_bytes(packed: dict[str, tuple[str, np.ndarray]]) -> int:
    return sum(array.nbytes for _, array in packed.values())


# ----------------------------------------------------------------------------- once per prompt


def _is_prompt_column(key: str) -> bool:
    return key.removesuffix(BF16_SUFFIX) in PROMPT_COLUMNS or key.startswith(COND_PREFIX)


def _ragged(parts: list[np.ndarray]) -> np.ndarray:
    """An object array of per-row arrays (Ray Data stores it as a fixed-shape tensor column
    when every row has the same shape, a variable-shaped one otherwise)."""
    out = np.empty(len(parts), dtype=object)
    for i, part in enumerate(parts):
        out[i] = part
    return out


def group_by_prompt(pairs: dict[str, Any]) -> dict[str, np.ndarray]:
    """A torch pair batch -> a numpy batch of prompt rows: each prompt's pairs in one row, the
    conditioning and the other ``PROMPT_COLUMNS`` once. Pairs of a prompt must be contiguous, as
    the scorer emits them (one trajectory row after another); rows keep the pairs' order."""
    arrays = to_numpy(pairs)
    n = num_rows(pairs)
    if n == 0:
        return {key: value[:0] for key, value in arrays.items()}
    key = np.stack([np.asarray(pairs["epoch"]), np.asarray(pairs["prompt_id"])], axis=1)
    starts = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]).any(axis=1)])
    if len({tuple(k) for k in key[starts]}) != len(starts):
        raise ValueError("group_by_prompt: the pairs of a prompt are not contiguous")
    bounds = np.r_[starts, n]
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if _is_prompt_column(name):
            out[name] = value[starts]
        else:
            out[name] = _ragged([value[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])
    return out


def ungroup_prompts(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`group_by_prompt`: a numpy batch with one row per pair (the conditioning
    repeated per pair in memory, as training takes it). Ragged columns arrive from Ray Data as
    object arrays of row arrays, or as one dense array when every row had the same count."""
    ragged = [k for k in batch if not _is_prompt_column(k)]
    if not ragged or len(batch[ragged[0]]) == 0:
        return {key: np.asarray(value)[:0] for key, value in batch.items()}
    counts = np.array([len(row) for row in batch[ragged[0]]])
    out: dict[str, np.ndarray] = {}
    for key, value in batch.items():
        if _is_prompt_column(key):
            out[key] = np.repeat(np.asarray(value), counts, axis=0)
        elif isinstance(value, np.ndarray) and value.dtype != object:
            out[key] = value.reshape(-1, *value.shape[2:])  # dense: [prompts, n, ...] -> [pairs, ...]
        else:
            out[key] = np.concatenate(list(value), axis=0)
    return out


def share_conditioning(rows: dict[str, Any], prompt_keys: torch.Tensor) -> dict[str, Any]:
    """Torch rows with each ``cond_*`` column once per distinct prompt key, and ``conditioning_row`` (the
    row's index into them): for transport, where several rows of one prompt travel together."""
    unique, inverse = torch.unique(prompt_keys, return_inverse=True)
    first = torch.full((len(unique),), len(prompt_keys), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(prompt_keys)), reduce="amin")
    out = {k: (v[first] if k.startswith(COND_PREFIX) else v) for k, v in rows.items()}
    out["conditioning_row"] = inverse
    return out


def unshare_conditioning(rows: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`share_conditioning`."""
    index = rows["conditioning_row"]
    return {k: (v[index] if k.startswith(COND_PREFIX) else v) for k, v in rows.items() if k != "conditioning_row"}
