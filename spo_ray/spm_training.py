"""Training the step-aware preference model (SPM) on Ray (DESIGN.md, "The step-aware preference model").

    preference files (Pick-a-Pic parquet, or prompt/image paths/label as parquet, jsonl or csv)
      -> Ray Data read -> map_batches(tag_examples)      split, example id, weight, epoch, t (pure functions)
      -> map_batches(X0Renderer, actor pool)             base model: VAE encode, shared noise at t, one CFG
                                                         UNet step -> x0_hat, decode, straight resize to 224
      -> streaming_split -> TorchTrainer + DeepSpeed      SPM scores both at t, cross-entropy, AdamW
    rank 0 -> per-bucket eval accuracy, the released state-dict layout (.bin) and safetensors

The frozen base model lives only in the renderer actors; the trainer holds only the SPM. Every random draw
(t and the noise both images of a pair share) is a pure function of (seed, epoch, example id), so a row
renders the same whichever actor renders it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spo_ray import rng
from spo_ray.config import (
    ConfigError,
    ConfigRoot,
    RoleResources,
    _merge,
    layer_config,
)

log = logging.getLogger("spo_ray")

NUM_TIMESTEPS = 1000  # t ~ U{0..999}: the SD1.5 / SDXL training schedules
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PLAIN_COLUMNS = ("prompt", "image_0", "image_1", "label")
LAYOUTS = ("auto", "pickapic", "plain")
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
CHECKPOINT_NAME = "step-aware_preference_model"


# ----------------------------------------------------------------------------- configuration


@dataclass
class BaseModelConfig:
    """The frozen diffusion model whose one-step x0 predictions the SPM learns to judge."""

    kind: str = "sd15"
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local dir, hub id, or tiny:<kind>
    vae: str | None = None
    resolution: int | None = None  # VAE input size (images are resized straight to it); None = native
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    guidance_scale: float = 5.0


@dataclass
class NetConfig:
    """The SPM being trained: a CLIP (PickScore) directory, optionally an SPM checkpoint to start from."""

    clip_dir: str = "tiny"
    processor_dir: str | None = None  # tokenizer / image normalisation, if clip_dir lacks them
    init_checkpoint: str | None = None
    image_size: int = 224


@dataclass
class RelabelConfig:
    """SDXL SPM: relabel pairs with a clean-image scorer (softmax gap > ``gap`` wins, else a tie)."""

    enabled: bool = False
    scorer: str = "clip"  # "clip" (PickScore) | "spm" (an SPM at t = 0)
    clip_dir: str | None = None
    checkpoint: str | None = None
    gap: float = 0.1


@dataclass
class SPMDataConfig:
    train: str = ""  # a file, a directory of files or a glob (.parquet, .jsonl/.json, .csv)
    eval: str | None = None  # held-out pairs; None = hold out ``eval_fraction`` of the prompts
    eval_fraction: float = 0.0
    layout: str = "auto"  # "auto" | "pickapic" | "plain"
    image_root: str | None = None  # plain layout: image paths are relative to this (default: the file's dir)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)


@dataclass
class SPMTrainConfig:
    learning_rate: float = 3e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.3
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 500
    batch_size: int = 16  # pairs per micro-batch per trainer worker
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    epochs: int = 1
    seed: int = 42
    shuffle_buffer: int = 256  # rows; a local shuffle on top of the per-epoch block order


@dataclass
class SPMEvalConfig:
    bucket_edges: list[int] = field(default_factory=lambda: [0, 200, 400, 600, 800, 1000])
    timesteps_per_bucket: int = 1  # each held-out pair is judged at this many t in every bucket
    batch_size: int = 64
    include_initial: bool = False  # also score the held-out rows with the untrained SPM (a second copy)


@dataclass
class SPMRayConfig:
    address: str | None = None
    num_renderers: int = 1
    num_trainers: int = 1
    zero_stage: int = 2
    render_batch_size: int = 16
    renderer: RoleResources = field(default_factory=RoleResources)
    trainer: RoleResources = field(default_factory=RoleResources)
    torch_threads_per_actor: int | None = None


@dataclass
class SPMRunConfig:
    name: str = "spm"
    output_dir: str = "runs"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    log_every: int = 10  # optimizer steps between progress lines


@dataclass
class SPMConfig(ConfigRoot):
    preset: str = ""
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    spm: NetConfig = field(default_factory=NetConfig)
    data: SPMDataConfig = field(default_factory=SPMDataConfig)
    train: SPMTrainConfig = field(default_factory=SPMTrainConfig)
    eval: SPMEvalConfig = field(default_factory=SPMEvalConfig)
    ray: SPMRayConfig = field(default_factory=SPMRayConfig)
    run: SPMRunConfig = field(default_factory=SPMRunConfig)


def _absolute(path: str | None) -> str | None:
    # A job's working directory is a temporary copy: paths must not depend on it.
    if not path or path == "tiny" or path.startswith("tiny:"):
        return path
    return str(Path(path).expanduser().resolve())


def _local(path: str | None) -> str | None:
    """Absolute if it exists here (a local model directory); else unchanged ("tiny", a hub id)."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def load_spm_config(
    preset: str | None = None, *, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> SPMConfig:
    """Preset (``spm-sd15`` / ``spm-sdxl`` / ``spm-tiny`` or a YAML path), then a YAML file, then dotted
    overrides; unknown keys and impossible values raise :class:`ConfigError` (all values at once)."""
    cfg = layer_config(SPMConfig(), "spm", preset, config_file, overrides)
    d = cfg.data
    d.train, d.eval, d.image_root = _absolute(d.train) or "", _absolute(d.eval), _absolute(d.image_root)
    n, rl = cfg.spm, d.relabel
    n.clip_dir, n.processor_dir, n.init_checkpoint = _local(n.clip_dir) or "", _local(n.processor_dir), _local(n.init_checkpoint)
    rl.clip_dir, rl.checkpoint = _local(rl.clip_dir), _local(rl.checkpoint)
    validate_spm_config(cfg)
    return cfg


def spm_config_from_dict(data: dict[str, Any]) -> SPMConfig:
    """Rebuild a config from ``to_dict()`` output (shipped to Ray actors and trainer workers)."""
    cfg = SPMConfig()
    _merge(cfg, data, "")
    validate_spm_config(cfg)
    return cfg


def validate_spm_config(cfg: SPMConfig) -> None:
    """Raise ConfigError listing every impossible value, before any data, model or cluster is touched."""
    m, d, t, e, r = cfg.model, cfg.data, cfg.train, cfg.eval, cfg.ray
    edges = e.bucket_edges
    checks: list[tuple[bool, str]] = [
        (m.kind in ("sd15", "sdxl"), f"model.kind must be 'sd15' or 'sdxl', got {m.kind!r}"),
        (m.dtype in ("auto", "fp32", "bf16", "fp16"), f"model.dtype must be auto/fp32/bf16/fp16, got {m.dtype!r}"),
        (m.resolution is None or (m.resolution > 0 and m.resolution % 8 == 0),
         f"model.resolution must be a positive multiple of 8, got {m.resolution}"),
        (m.guidance_scale >= 1, f"model.guidance_scale must be >= 1, got {m.guidance_scale}"),
        (bool(cfg.spm.clip_dir), "spm.clip_dir must be set (a local CLIP/PickScore directory, or 'tiny')"),
        (cfg.spm.image_size > 0, f"spm.image_size must be > 0, got {cfg.spm.image_size}"),
        (bool(d.train), "data.train must be set (a preference file, directory or glob)"),
        (0 <= d.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}"),
        (d.eval is None or d.eval_fraction == 0, "set data.eval or data.eval_fraction, not both"),
        (d.layout in LAYOUTS, f"data.layout must be one of {', '.join(LAYOUTS)}, got {d.layout!r}"),
        (d.relabel.scorer in ("clip", "spm"), f"data.relabel.scorer must be clip or spm, got {d.relabel.scorer!r}"),
        (not d.relabel.enabled or bool(d.relabel.clip_dir), "data.relabel.clip_dir is required when relabelling"),
        (0 <= d.relabel.gap < 1, f"data.relabel.gap must be in [0, 1), got {d.relabel.gap}"),
        (t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}"),
        (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1/adam_beta2 must be in [0, 1)"),
        (t.adam_weight_decay >= 0, f"train.adam_weight_decay must be >= 0, got {t.adam_weight_decay}"),
        (t.adam_epsilon > 0, f"train.adam_epsilon must be > 0, got {t.adam_epsilon}"),
        (t.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0, got {t.lr_warmup_steps}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}"),
        (t.max_grad_norm is None or t.max_grad_norm > 0, f"train.max_grad_norm must be > 0 or null, got {t.max_grad_norm}"),
        (t.mixed_precision in ("auto", "fp32", "bf16"), f"train.mixed_precision must be auto/fp32/bf16, got {t.mixed_precision!r}"),
        (t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}"),
        (t.seed >= 0, f"train.seed must be >= 0, got {t.seed}"),
        (t.shuffle_buffer >= 0, f"train.shuffle_buffer must be >= 0, got {t.shuffle_buffer}"),
        (len(edges) >= 2 and edges[0] == 0 and edges[-1] == NUM_TIMESTEPS and all(a < b for a, b in zip(edges, edges[1:], strict=False)),
         f"eval.bucket_edges must increase strictly from 0 to {NUM_TIMESTEPS}, got {edges}"),
        (e.timesteps_per_bucket >= 1, f"eval.timesteps_per_bucket must be >= 1, got {e.timesteps_per_bucket}"),
        (e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}"),
        (r.num_renderers >= 1 and r.num_trainers >= 1, "ray.num_renderers and ray.num_trainers must be >= 1"),
        # ZeRO-3 would partition logit_scale, which the score reads outside a submodule forward; the SPM fits.
        (r.zero_stage in (0, 1, 2), f"ray.zero_stage must be 0, 1 or 2 for the SPM, got {r.zero_stage}"),
        (r.render_batch_size >= 1, f"ray.render_batch_size must be >= 1, got {r.render_batch_size}"),
        (cfg.run.device in ("auto", "cpu", "cuda"), f"run.device must be auto/cpu/cuda, got {cfg.run.device!r}"),
        (cfg.run.log_every >= 1, f"run.log_every must be >= 1, got {cfg.run.log_every}"),
        (bool(cfg.run.name) and "/" not in cfg.run.name, f"run.name must be a non-empty name without '/', got {cfg.run.name!r}"),
    ]
    problems = [message for ok, message in checks if not ok]
    for role in ("renderer", "trainer"):
        problems += getattr(r, role).problems(f"ray.{role}")
    if problems:
        raise ConfigError("invalid SPM config:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- preference data


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


def _column_names(path: str, fmt: str) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as err:
            raise PreferenceDataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    return list(_read_table(path, fmt).column_names)


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
    for path in files:
        lay = detect_layout(_column_names(path, fmt), layout, path)
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
    return PreferenceSource(files, fmt, found, root, counts, num, ties)


def bucket_of(t: np.ndarray | torch.Tensor, edges: list[int]) -> np.ndarray:
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
) -> Any:
    """One Ray Data batch (pandas) of raw pairs -> rows the renderer takes, all keyed by pure functions.

    Keeps the split's rows, reads plain-layout images as bytes, and adds ``example_id`` (a hash of the
    prompt and both images: independent of file order), ``label_0``, ``weight`` = 1 / examples-per-prompt,
    and the timestep: a training row gets t ~ U{0..999} keyed by (seed, epoch, example id); a held-out pair
    becomes ``timesteps_per_bucket`` rows per bucket, t uniform inside the bucket.
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


# ----------------------------------------------------------------------------- rendering x0_hat


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> RGB ``[3, size, size]`` in [-1, 1], resized straight (no crop)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    x = x.permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return resize_straight(x, size)[0]


def resize_straight(images: torch.Tensor, size: int, *, antialias: bool = True) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, 3, size, size]`` (aspect ratio not kept, as the SPM was trained).

    ``antialias=False`` is the reference's SPM-training resize of the decoded x0_hat (plain bicubic
    ``F.interpolate``, clamped before and after); the default stands in for the PIL resize its dataset
    applies to the clean images.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)
    return out.clamp(-1.0, 1.0)


def encode_latents(model, images: torch.Tensor) -> torch.Tensor:
    """VAE encode to the posterior mean, scaled as the UNet expects (the inverse of ``DiffusionModel.decode``).

    The mean, not a posterior sample: a trained VAE's posterior std is negligible, and a random test VAE's
    (std ~1) would drown the image in noise before the diffusion noise is even added.
    """
    from spo_ray.models import module_dtype

    vae = model.vae
    z = vae.encode(images.to(device=model.device, dtype=module_dtype(vae))).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


@torch.no_grad()
def render_x0_pairs(
    model,
    images_0: torch.Tensor,
    images_1: torch.Tensor,
    prompts: list[str],
    timesteps: torch.Tensor,
    keys: list[tuple[int, ...]],
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's one-step view of both images of each pair at t: decoded x0_hat in [-1, 1].

    Both images of a pair share t and one noise (keyed by ``keys[i]``), so the SPM compares them under the
    same corruption; x0_hat comes from one CFG UNet forward (:func:`predict_x0`).
    """
    from spo_ray.diffusion import predict_x0
    from spo_ray.models import Conditioning

    n = len(prompts)
    shape = model.latent_shape
    noise = torch.stack([rng.randn(shape, "spm-noise", *k) for k in keys]).to(model.device)
    latents = torch.cat([encode_latents(model, images_0), encode_latents(model, images_1)])
    t = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).repeat(2).to(model.device)
    x_t = model.scheduler.add_noise(latents, noise.repeat(2, 1, 1, 1), t)
    cond = model.encode_prompts(prompts)
    cond = Conditioning.cat([cond, cond])
    eps = model.guided_noise_pred(model.unet, x_t, t, cond, model.negative_conditioning(2 * n), guidance_scale)
    decoded = model.decode(predict_x0(model.scheduler, eps, t.cpu(), x_t))
    return decoded[:n].cpu(), decoded[n:].cpu()


def relabel_from_scores(s0: torch.Tensor, s1: torch.Tensor, gap: float) -> torch.Tensor:
    """label_0 from clean-image scores: the softmax gap above ``gap`` wins (1 / 0), otherwise a tie (0.5)."""
    p0, p1 = torch.softmax(torch.stack([s0.float(), s1.float()], dim=-1), dim=-1).unbind(-1)
    decided = (p0 - p1).abs() > gap
    return torch.where(decided, (s0 > s1).float(), torch.full_like(p0, 0.5))


def _device(cfg: SPMConfig) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.run.device)


def _base_dtype(cfg: SPMConfig, device: torch.device) -> torch.dtype:
    from spo_ray.components import DTYPES

    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.model.dtype]


class X0Renderer:
    """Ray Data actor: the frozen base model (text encoders, VAE, UNet) and the optional relabel scorer;
    tagged rows -> (pixels_0, pixels_1, t, prompt, label_0, weight) ready for the SPM."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from spo_ray.models import load_diffusion_model
        from spo_ray.ray.common import worker_setup
        from spo_ray.spm import load_image_normalization

        self.cfg = spm_config_from_dict(cfg_dict)
        worker_setup(self.cfg.ray, "renderer")
        device = _device(self.cfg)
        m = self.cfg.model
        self.model = load_diffusion_model(
            m.pretrained, m.kind, vae=m.vae, dtype=_base_dtype(self.cfg, device), device=device,
            resolution=m.resolution,
        )
        self.model.unet.requires_grad_(False)
        steps = int(self.model.scheduler.config.num_train_timesteps)
        if steps != NUM_TIMESTEPS:
            raise ValueError(f"{m.pretrained}: the scheduler has {steps} training timesteps, expected {NUM_TIMESTEPS}")
        self.mean, self.std = load_image_normalization(self.cfg.spm.processor_dir or self.cfg.spm.clip_dir)
        self.relabel = None
        rl = self.cfg.data.relabel
        if rl.enabled:
            from spo_ray.scorers import build_scorer

            self.relabel = build_scorer(rl.scorer, clip_dir=rl.clip_dir, checkpoint=rl.checkpoint, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from spo_ray.spm import preprocess_images

        res, size, seed = self.model.resolution, self.cfg.spm.image_size, self.cfg.train.seed
        prompts = [str(p) for p in batch["prompt"]]
        clean = [torch.stack([decode_image(b, res) for b in batch[c]]) for c in ("image_0", "image_1")]
        keys = [(seed, int(e), int(x), int(s)) for e, x, s in zip(batch["epoch"], batch["example_id"], batch["slot"], strict=True)]
        t = torch.as_tensor(batch["t"].astype(np.int64))
        dec0, dec1 = render_x0_pairs(self.model, clean[0], clean[1], prompts, t, keys, self.cfg.model.guidance_scale)
        label_0 = torch.from_numpy(batch["label_0"].astype(np.float32))
        if self.relabel is not None:
            s0, s1 = (self.relabel.score(resize_straight(c, size), prompts, torch.zeros(len(prompts))) for c in clean)
            label_0 = relabel_from_scores(s0, s1, self.cfg.data.relabel.gap)
        # The reference's SPM training: clamped decode -> bicubic to size x size, no antialias -> clamp -> normalise.
        pix = [preprocess_images(resize_straight(d, size, antialias=False), size, self.mean, self.std) for d in (dec0, dec1)]
        return {
            "pixels_0": pix[0].numpy(), "pixels_1": pix[1].numpy(), "t": t.numpy(), "prompt": np.array(prompts, dtype=object),
            "label_0": label_0.numpy(), "weight": batch["weight"].astype(np.float32), "epoch": batch["epoch"].astype(np.int64),
            "example_id": batch["example_id"].astype(np.int64),
        }


# ----------------------------------------------------------------------------- the loss and the trainer


def pair_cross_entropy(logits: torch.Tensor, label_0: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy of the two scores ``[B, 2]`` against [label_0, 1 - label_0] (a tie: 0.5 / 0.5)."""
    target = torch.stack([label_0, 1.0 - label_0], dim=-1).to(logits.dtype)
    return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1)


def preference_loss(logits: torch.Tensor, label_0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`pair_cross_entropy` with each example weighted by ``weight`` (1 / examples-per-prompt),
    normalised over the batch, as PickScore trains."""
    w = weight.to(logits.dtype)
    return (pair_cross_entropy(logits, label_0) * w).sum() / w.sum().clamp(min=1e-12)


def pair_logits(spm, tokenizer, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """``[B, 2]`` SPM scores of (image_0, image_1) at the row's t; the prompt is encoded once per pair."""
    from spo_ray.models import module_dtype

    prompts = [str(p) for p in batch["prompt"]]
    max_len = int(spm.model.config.text_config.max_position_embeddings)
    enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    text = spm.text_embeds(enc["input_ids"].to(device), enc["attention_mask"].to(device))
    dtype = module_dtype(spm)
    # torch.tensor copies: Ray hands out read-only arrays.
    px = torch.cat([torch.tensor(batch["pixels_0"]), torch.tensor(batch["pixels_1"])]).to(device, dtype)
    t = torch.tensor(batch["t"]).to(device).repeat(2)
    scores = spm.score(px, t, text.repeat(2, 1))
    return torch.stack(scores.float().chunk(2), dim=-1)


def spm_deepspeed_config(cfg: SPMConfig, device: torch.device) -> dict[str, Any]:
    """DeepSpeed for the SPM: ZeRO 0-2, bf16 on GPU (fp32 on CPU), torch AdamW (no fused op to compile)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "bf16": {"enabled": device.type == "cuda" and t.mixed_precision != "fp32"},
        "zero_optimization": {"stage": cfg.ray.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _correct(logits: torch.Tensor, label_0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) per row: ties (label 0.5) are not counted."""
    counted = label_0 != 0.5
    return ((logits[:, 0] > logits[:, 1]) == (label_0 > 0.5)) & counted, counted


def _final_state(engine, bf16: bool) -> dict[str, torch.Tensor]:
    """fp32 weights on CPU (every rank calls: under bf16 the fp32 masters are gathered collectively)."""
    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    if bf16:
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None:
                state[name] = full.detach().float().cpu().reshape(p.shape)
    state["model.logit_scale"] = state["model.logit_scale"].reshape(())  # the released layout's scalar
    return state


def spm_train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the SPM under DeepSpeed; train on the stream, evaluate per bucket, save."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from spo_ray.ray.common import all_reduce_sum, worker_setup
    from spo_ray.spm import StepAwarePreferenceModel, load_clip_processor
    from spo_ray.training import warmup_lambda

    cfg = spm_config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_setup(cfg.ray, "trainer")
    device = ray.train.torch.get_device() if cfg.ray.trainer.num_gpus else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    spm = StepAwarePreferenceModel.from_pretrained(cfg.spm.clip_dir, cfg.spm.init_checkpoint, device=device)
    spm.train().requires_grad_(True)
    # DeepSpeed's initial parameter broadcast cannot send a 0-dim tensor on CPU (gloo): hold CLIP's scalar
    # logit_scale as shape [1] while training (it broadcasts the same) and restore [] when saving.
    spm.model.logit_scale = torch.nn.Parameter(spm.model.logit_scale.detach().reshape(1))
    tokenizer = load_clip_processor(cfg.spm.processor_dir or cfg.spm.clip_dir)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        spm.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(t.lr_warmup_steps))
    ds_config = spm_deepspeed_config(cfg, device)
    engine, _, _, schedule = deepspeed.initialize(model=spm, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    edges = cfg.eval.bucket_edges
    run_dir = cfg.run_dir
    metrics_path = run_dir / "metrics.jsonl"
    started = time.time()
    step, rows, window = 0, 0, []
    epochs_seen: set[int] = set()
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_batches(
        batch_size=t.batch_size, batch_format="numpy", drop_last=True,  # equal batches: ranks step together
        local_shuffle_buffer_size=t.shuffle_buffer or None, local_shuffle_seed=t.seed + rank,
    )
    for batch in batches:
        new = set(batch["epoch"].tolist()) - epochs_seen
        if rank == 0 and new:
            print(f"[spm] epoch {max(new) + 1}/{t.epochs}: first rows arrived after {rows} rows", flush=True)
        epochs_seen |= new
        logits = pair_logits(engine.module, tokenizer, batch, device)
        label_0 = torch.tensor(batch["label_0"], device=device)
        loss = preference_loss(logits, label_0, torch.tensor(batch["weight"], device=device))
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        correct, counted = _correct(logits.detach(), label_0)
        window.append((float(loss.detach()), int(correct.sum()), int(counted.sum())))
        rows += len(batch["t"])
        if not boundary:
            continue
        step += 1
        if step % cfg.run.log_every == 0:
            total = all_reduce_sum([sum(w[0] for w in window), len(window), sum(w[1] for w in window), sum(w[2] for w in window)], device)
            record = {
                "kind": "step", "step": step, "loss": total[0] / max(total[1], 1),
                "train_accuracy": total[2] / max(total[3], 1), "lr": schedule.get_last_lr()[0],
                "rows": rows * world, "rows_per_s": rows * world / max(time.time() - started, 1e-9),
            }
            window = []
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(
                    f"[spm] step {step} | rows {record['rows']} | loss {record['loss']:.4f} | "
                    f"train acc {record['train_accuracy']:.3f} | lr {record['lr']:.2e} | rows/s {record['rows_per_s']:.1f}",
                    flush=True,
                )
    train_seconds = time.time() - started

    # Held-out accuracy per timestep bucket (ties excluded), summed over ranks.
    engine.eval()
    n_buckets = len(edges) - 1
    sums = np.zeros((5, n_buckets))  # correct, counted, loss sum, rows, correct before training
    eval_shard = ray.train.get_dataset_shard("eval") if config["has_eval"] else None
    initial = None
    if eval_shard is not None and cfg.eval.include_initial:  # the same deterministic load as the start
        initial = StepAwarePreferenceModel.from_pretrained(cfg.spm.clip_dir, cfg.spm.init_checkpoint, device=device)
    if eval_shard is not None:
        with torch.no_grad():
            for batch in eval_shard.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
                logits = pair_logits(engine.module, tokenizer, batch, device)
                label_0 = torch.tensor(batch["label_0"], device=device)
                correct, counted = _correct(logits, label_0)
                before = _correct(pair_logits(initial, tokenizer, batch, device), label_0)[0] if initial else correct
                b = bucket_of(batch["t"], edges)
                per_row = (correct, counted, pair_cross_entropy(logits, label_0), torch.ones_like(label_0), before)
                for col, values in enumerate(per_row):
                    np.add.at(sums[col], b, values.float().cpu().numpy())
    sums = np.array(all_reduce_sum(sums.reshape(-1).tolist(), device)).reshape(5, n_buckets)
    state = _final_state(engine, ds_config["bf16"]["enabled"])
    total_rows = all_reduce_sum([rows], device)[0]
    if rank == 0:
        buckets = [
            {"bucket": name, "t_min": lo, "t_max": hi - 1, "rows": int(sums[3, i]), "pairs_counted": int(sums[1, i]),
             "ties": int(sums[3, i] - sums[1, i]), "accuracy": sums[0, i] / sums[1, i] if sums[1, i] else None,
             "loss": sums[2, i] / sums[3, i] if sums[3, i] else None,
             **({"initial_accuracy": sums[4, i] / sums[1, i] if sums[1, i] else None} if initial else {})}
            for i, (name, lo, hi) in enumerate(zip(bucket_names(edges), edges, edges[1:], strict=False))
        ]
        final = run_dir / "final"
        out = StepAwarePreferenceModel.from_pretrained(cfg.spm.clip_dir)
        out.load_state_dict(state)
        bin_path = out.save_released_format(final / f"{CHECKPOINT_NAME}.bin")
        st_path = out.save_safetensors(final / f"{CHECKPOINT_NAME}.safetensors")
        summary = {
            "checkpoint": str(bin_path), "checkpoint_safetensors": str(st_path), "optimizer_steps": step,
            "train_rows": int(total_rows), "world_size": world, "train_seconds": train_seconds,
            "eval_buckets": buckets,
            "accuracy_by_bucket": {b["bucket"]: b["accuracy"] for b in buckets},
            **({"initial_accuracy_by_bucket": {b["bucket"]: b["initial_accuracy"] for b in buckets}} if initial else {}),
            "eval_accuracy": float(sums[0].sum() / sums[1].sum()) if sums[1].sum() else None,
        }
        (run_dir / "trainer_summary.json").write_text(json.dumps(summary, indent=2))
        for b in buckets:
            acc = "-" if b["accuracy"] is None else f"{b['accuracy']:.3f}"
            before = f" (untrained {b['initial_accuracy']:.3f})" if b.get("initial_accuracy") is not None else ""
            print(f"[spm] eval t {b['bucket']:>7}: accuracy {acc}{before} on {b['pairs_counted']} pairs, {b['ties']} ties", flush=True)
    ray.train.report({"optimizer_steps": step})


# ----------------------------------------------------------------------------- the driver


def _read_ray_dataset(src: PreferenceSource):
    import ray.data

    if src.fmt == "parquet":
        cols = list(PICKAPIC_COLUMNS if src.layout == "pickapic" else PLAIN_COLUMNS)
        return ray.data.read_parquet(src.files, columns=cols)
    if src.fmt == "json":
        return ray.data.read_json(src.files, lines=True, file_extensions=None)
    return ray.data.read_csv(src.files)


def build_stream(cfg: SPMConfig, src: PreferenceSource, split: str):
    """Tagged rows (all epochs for ``train``) -> the renderer actor pool -> SPM-ready rows."""
    import ray.data


    kwargs = dict(
        layout=src.layout, split=split, seed=cfg.train.seed, prompt_counts=src.prompt_counts,
        eval_fraction=cfg.data.eval_fraction if cfg.data.eval is None else 0.0, image_root=src.image_root,
        bucket_edges=cfg.eval.bucket_edges, timesteps_per_bucket=cfg.eval.timesteps_per_bucket,
    )
    epochs = range(cfg.train.epochs) if split == "train" else [-1]
    parts = []
    for epoch in epochs:
        ds = _read_ray_dataset(src)
        if split == "train":  # a different block order every epoch (a cheap, seeded shuffle)
            ds = ds.randomize_block_order(seed=rng.derive_seed("spm-blocks", cfg.train.seed, epoch) % 2**31)
        parts.append(ds.map_batches(tag_examples, batch_format="pandas", fn_kwargs={**kwargs, "epoch": epoch}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        X0Renderer,
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict()},
        batch_size=cfg.ray.render_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_renderers),
        **cfg.ray.renderer.ray_options(),
    )


def _split_config():
    import ray.train

    class _Split(ray.train.DataConfig):
        """Training rows split equally (every rank takes the same number of DeepSpeed steps) and in order (the
        epochs one after another, and with one worker a run is a pure function of data and seeds); held-out
        rows split without dropping any (eval sums are reduced over ranks)."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                ds.context.execution_options.preserve_order |= name == "train"
                for i, split in enumerate(ds.streaming_split(world_size, equal=name == "train")):
                    output[i][name] = split
            return output

    return _Split()


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


def run_spm_training(cfg: SPMConfig) -> dict[str, Any]:
    """Train an SPM on the Ray cluster this process is connected to (or a local one); returns the summary."""
    import yaml
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_src, eval_src = inspect_splits(cfg)  # bad data fails here, before any cluster resource
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    print(
        f"[spm] {cfg.run.name}: {train_src.num_examples} training pairs ({train_src.num_ties} ties, "
        f"{len(train_src.prompt_counts)} prompts, {train_src.layout} layout) x {cfg.train.epochs} epoch(s); "
        f"held-out pairs: {eval_src.num_examples if eval_src else 0}",
        flush=True,
    )
    from spo_ray.components import connect_ray

    connect_ray(cfg.ray.address)
    datasets = {"train": build_stream(cfg, train_src, "train")}
    if eval_src is not None:
        datasets["eval"] = build_stream(cfg, eval_src, "eval")
    for ds in datasets.values():
        ds.context.execution_no_progress_timeout_s = -1  # the trainer consumes eval only at the end
    res = cfg.ray.trainer
    resources = {"CPU": res.num_cpus, **res.resources}
    if res.num_gpus:
        resources["GPU"] = res.num_gpus
    trainer = TorchTrainer(
        spm_train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "has_eval": eval_src is not None},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_trainers, use_gpu=bool(res.num_gpus), resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(run_dir / "ray_train"), failure_config=FailureConfig(max_failures=0)),
        datasets=datasets,
        dataset_config=_split_config(),
    )
    started = time.time()
    trainer.fit()
    summary = {
        "run_dir": str(run_dir),
        **json.loads((run_dir / "trainer_summary.json").read_text()),
        "data": {
            "layout": train_src.layout, "train_pairs": train_src.num_examples, "train_ties": train_src.num_ties,
            "train_prompts": len(train_src.prompt_counts), "eval_pairs": eval_src.num_examples if eval_src else 0,
            "relabelled": cfg.data.relabel.enabled,
        },
        "seconds": time.time() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
