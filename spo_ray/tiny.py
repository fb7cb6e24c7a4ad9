"""Tiny random models for tests and CPU runs: SD1.5-/SDXL-shaped pipelines and a CLIP (DESIGN.md section 3).

No model hub is reachable in tests, so the real loading code is exercised on pipelines built
from config and written with ``save_pretrained`` in the diffusers layout (``model_index.json``
plus one subfolder per component). They load through exactly the path a real checkpoint takes.
The scheduler config carries the SD settings SPO relies on (``clip_sample=False``,
``set_alpha_to_one=False``, ``steps_offset=1``, "leading" spacing), so 20 DDIM steps give
t = 951, 901, ..., 1 as with the real models.

The tiny CLIP (:func:`build_tiny_clip`, for the preference-model scorers) shares the byte-level
BPE tokenizer of the pipelines' text encoders, and both caches go through :func:`build_cached`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

KINDS = ("sd15", "sdxl")

# Bump when the tiny configs change, so stale cached copies are rebuilt.
TINY_VERSION = "2"
_STAMP = "spo_ray_tiny.json"
TINY_CLIP_NAME = "tiny-clip"
# Bump when build_tiny_clip changes, so a stale cached tiny CLIP is rebuilt instead of silently reused.
TINY_CLIP_VERSION = "2"
_TINY_CLIP_MARKER = "SPO_RAY_TINY_CLIP_VERSION"

TEXT_HIDDEN = 32
TEXT_LAYERS = 2
TEXT_HEADS = 2
TEXT_PROJECTION = 32
MAX_LENGTH = 77
UNET_SAMPLE_SIZE = 8
TIME_EMBED_DIM = 8
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}

# A few merges so that BPE does real work on common letters; the vocab is byte-level.
_MERGES = ["t h", "th e</w>", "a n", "i n", "o n</w>", "e r</w>", "a t</w>", "e n", "o r"]

_SUBFOLDERS = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(
    save_dir: str | Path, *, model_max_length: int = MAX_LENGTH, pad_token: str = "<|endoftext|>"
) -> Path:
    """Write a tiny byte-level CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json).

    Load it with ``CLIPTokenizer.from_pretrained(save_dir)``: transformers 5 silently ignores
    ``vocab_file``/``merges_file`` constructor arguments. Like the real CLIP vocab, the byte
    symbols come first, then their ``</w>`` variants, the merges, and the two special tokens
    last (so ``<|endoftext|>`` has the largest id, which CLIP's pooling relies on).
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (save_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return save_dir


def build_clip_tokenizer(
    save_dir: str | Path, *, model_max_length: int = MAX_LENGTH, pad_token: str = "<|endoftext|>"
):
    """:func:`write_clip_tokenizer_files`, then load the tokenizer back from the directory and return it."""
    from transformers import CLIPTokenizer

    path = write_clip_tokenizer_files(save_dir, model_max_length=model_max_length, pad_token=pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token != pad_token or tokenizer.model_max_length != model_max_length:
        raise RuntimeError(f"tiny tokenizer did not load as written: {tokenizer!r}")
    return tokenizer


def _text_encoder(tokenizer, *, projection: bool, hidden_act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_PROJECTION,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


# Random-weight model sizes built by this module: "tiny" for tests; "bench", where UNet compute
# dominates a CPU run (widths 128/256, 32x32 latents), for `spo-ray bench`. The tiny shapes are fixed
# (tests depend on them); the VAE and text encoders stay tiny in both.
SIZES = {
    "tiny": {"block_out_channels": (32, 64), "sample_size": UNET_SAMPLE_SIZE, "attention_head_dim": 2},
    "bench": {"block_out_channels": (128, 256), "sample_size": 32, "attention_head_dim": 8},
}


def unet_config(kind: str, size: str = "tiny") -> dict:
    """The UNet2DConditionModel config of a tiny/bench ``kind`` pipeline (also for FLOP counting)."""
    common = dict(
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        **SIZES[size],
    )
    if kind == "sd15":
        return dict(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
        )
    return dict(
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN,  # te1 hidden + te2 hidden, concatenated
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_EMBED_DIM * 6 + TEXT_PROJECTION,
    )


def _unet(kind: str, size: str = "tiny"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(kind, size))


def vae_config(kind: str, size: str = "tiny") -> dict:
    """The AutoencoderKL config of a tiny/bench ``kind`` pipeline (also for FLOP counting)."""
    # 4 levels: the real scale factor 8, so code never gets away with assuming otherwise
    # (latents 8x8 -> 64x64 images), with few channels to stay fast on a CPU.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZES[size]["sample_size"] * 8,
        scaling_factor=VAE_SCALING[kind],
        force_upcast=kind == "sdxl",
    )


def _vae(kind: str, size: str = "tiny"):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(kind, size))


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_tiny_pipeline(kind: str, save_dir: str | Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Build a tiny ``kind`` ("sd15" | "sdxl") pipeline with random weights into ``save_dir``.

    ``size`` is a key of :data:`SIZES` ("bench": a wider UNet at 32x32 latents for benchmarks).

    Weights are a pure function of ``seed`` (the global RNG state is restored afterwards).
    Returns the directory, which then holds ``model_index.json`` and one subfolder per component.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {KINDS}")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spo_ray_tok_") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer(Path(tmp) / "tokenizer")
        text_encoder = _text_encoder(tokenizer, projection=False, hidden_act="quick_gelu")
        unet, vae, scheduler = _unet(kind, size), _vae(kind, size), _scheduler()
        if kind == "sd15":
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            # The real SDXL tokenizer_2 pads with "!"; keep that quirk.
            tokenizer_2 = build_clip_tokenizer(Path(tmp) / "tokenizer_2", pad_token="!")
            text_encoder_2 = _text_encoder(tokenizer_2, projection=True, hidden_act="gelu")
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=unet,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
        pipe.save_pretrained(str(save_dir))
        # transformers 5 saves only tokenizer.json; keep the classic BPE files beside it too.
        for name in ("tokenizer", "tokenizer_2") if kind == "sdxl" else ("tokenizer",):
            for file in ("vocab.json", "merges.txt"):
                shutil.copyfile(Path(tmp) / name / file, save_dir / name / file)
    (save_dir / _STAMP).write_text(json.dumps({"kind": kind, "version": TINY_VERSION, "seed": seed, "size": size}))
    return save_dir


def _is_complete(path: Path, kind: str, size: str = "tiny") -> bool:
    """A cached tiny pipeline is usable if its stamp matches and every component is there."""
    try:
        stamp = json.loads((path / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("kind") != kind or stamp.get("version") != TINY_VERSION or stamp.get("size", "tiny") != size:
        return False
    return (path / "model_index.json").is_file() and all((path / sub).is_dir() for sub in _SUBFOLDERS[kind])


def tiny_cache_dir() -> Path:
    """Where tiny pipelines and the tiny CLIP are cached: ``$SPO_RAY_CACHE`` or ``~/.cache/spo_ray``."""
    return Path(os.environ.get("SPO_RAY_CACHE") or Path.home() / ".cache" / "spo_ray")


def build_cached(target: Path, build: Callable[[Path], object], is_current: Callable[[Path], bool]) -> Path:
    """Return ``target`` if ``is_current(target)``; otherwise ``build`` a fresh copy there and return it.

    ``build(tmp)`` fills an empty temporary sibling directory, which is then renamed into place, so
    concurrent processes (Ray actors, pytest workers) never see a half-written copy. A stale or
    incomplete ``target`` is moved aside and deleted first; if another process wins the race to the
    rename, its copy is used provided it is current (otherwise the rename error is raised).
    """
    target = Path(target)
    if is_current(target):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build(tmp)
        if target.exists() and not is_current(target):
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=root))
            try:
                os.replace(target, stale / "old")
            except OSError:
                pass  # someone else moved it already
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_current(target):  # lost a race to a copy that is not usable: surface it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_pipeline(kind: str, size: str = "tiny") -> Path:
    """Path of the cached ``size`` ``kind`` pipeline (``<tiny_cache_dir()>/<size>-<kind>``), built once if needed."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {KINDS}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {tuple(SIZES)}")
    return build_cached(
        tiny_cache_dir() / f"{size}-{kind}",
        lambda tmp: build_tiny_pipeline(kind, tmp, size=size),
        lambda path: _is_complete(path, kind, size),
    )


# -- tiny CLIP (preference-model scorers) --------------------------------------------------------


def build_tiny_clip(save_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a tiny random CLIP (ViT 32-wide, 2 layers, patch 32 @ 224) + tokenizer + preprocessor config.

    ``logit_scale`` starts at ln(100) like PickScore, so scores are on the SPM's ~100 x cosine scale.
    Deterministic in ``seed`` without touching the caller's global RNG.
    """
    from transformers import CLIPConfig, CLIPModel

    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_clip_tokenizer(out)
    # Re-save through transformers too (adds tokenizer.json), as a real CLIP / PickScore directory has.
    tok.save_pretrained(str(out))
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_LENGTH,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
        logit_scale_init_value=math.log(100.0),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(str(out))
    try:
        from transformers import CLIPImageProcessorPil as _Proc  # no torchvision needed
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as _Proc
    _Proc().save_pretrained(str(out))  # its defaults are OpenAI CLIP's mean and std, as PickScore's
    return out


def _tiny_clip_is_current(path: Path) -> bool:
    marker = path / _TINY_CLIP_MARKER
    return (
        (path / "config.json").is_file()
        and marker.is_file()
        and marker.read_text().strip() == TINY_CLIP_VERSION
    )


def _build_marked_tiny_clip(path: Path) -> None:
    build_tiny_clip(path)
    (path / _TINY_CLIP_MARKER).write_text(TINY_CLIP_VERSION)


def ensure_tiny_clip(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny CLIP at ``<cache_dir or tiny_cache_dir()>/tiny-clip``, built once; stale versions are rebuilt."""
    root = Path(cache_dir) if cache_dir is not None else tiny_cache_dir()
    return build_cached(root / TINY_CLIP_NAME, _build_marked_tiny_clip, _tiny_clip_is_current)
