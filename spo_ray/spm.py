"""The step-aware preference model (SPM): a CLIP whose vision tower is conditioned on the diffusion timestep.

SPO compares candidates at every denoising step, so the preference model must judge the x0 prediction of a
*noisy* latent and know how noisy it was. The SPM is PickScore (a CLIP model) with a DiT-style timestep
embedder and adaLN modulation (shift / scale / gate) in every vision encoder layer plus a final adaLN on the
pooled output. Layout and semantics follow the released checkpoints exactly (see DESIGN.md, "The step-aware
preference model"), so ``sd-v1-5_step-aware_preference_model.bin`` / ``sdxl_step-aware_preference_model.bin``
load strictly into :class:`StepAwarePreferenceModel`.

Implementation note: instead of re-implementing CLIP, the adaLN modules are *attached* to the submodules of a
stock transformers ``CLIPModel`` (``t_embedder`` on the model, ``adaLN_modulation`` on the vision tower and on
each vision encoder layer) and the time-conditioned vision forward is written here, reusing the original
embeddings / LayerNorms / attention / MLP. That keeps every CLIP key 1:1 under ``model.`` and makes a freshly
initialised SPM numerically identical to the plain CLIP.

Everything works from local files only: there is no model hub here. ``clip_dir="tiny"`` resolves to a tiny random
CLIP + offline tokenizer for tests and CPU runs (:func:`spo_ray.tiny.ensure_tiny_clip`), saved with
``save_pretrained`` so the real loading path runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .devices import torch_dtype
from .tiny import ensure_tiny_clip

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "TIME_FREQ_DIM",
    "CheckpointLoadError",
    "StepAwarePreferenceModel",
    "TimestepEmbedder",
    "load_clip_processor",
    "load_image_normalization",
    "load_state_dict_strict",
    "preprocess_images",
    "read_state_dict",
    "resolve_clip_dir",
    "timestep_embedding",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep features fed to ``t_embedder.mlp.0``


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be read, or its keys / shapes do not match the model exactly."""


# --------------------------------------------------------------------------------------------------------------
# Timestep embedding and adaLN modules
# --------------------------------------------------------------------------------------------------------------


def timestep_embedding(
    t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal features ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = exp(-ln(max_period) * i / (dim/2))``.

    ``t`` is the raw diffusion timestep (float, e.g. 951.0), as the released SPM was trained with; computed in
    float32 whatever the model dtype, because fp16/bf16 would destroy the high-frequency phases.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1).to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep -> conditioning vector c (Linear 256->d, SiLU, Linear d->d); keys ``mlp.0`` / ``mlp.2``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = TIME_FREQ_DIM) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        for lin in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def _adaln(hidden_size: int, chunks: int, gate_chunks: Sequence[int] = ()) -> nn.Sequential:
    """SiLU -> Linear(d, chunks*d), zero weights; bias zero except gate chunks = 1 (identity at init)."""
    mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size, bias=True))
    lin = mod[1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        for g in gate_chunks:
            lin.bias[g * hidden_size : (g + 1) * hidden_size] = 1.0
    return mod


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with [B, d] conditioning broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _pooled(out: object) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and a ModelOutput (pooler_output) in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP features output of type {type(out).__name__}")
    return pooled


# --------------------------------------------------------------------------------------------------------------
# Checkpoint I/O
# --------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a plain state dict from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``).

    Any read failure (truncated / corrupt / not a state dict) becomes a :class:`CheckpointLoadError` naming the
    path, so a bad download is diagnosed at load time rather than as a confusing shape error later.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            # mmap: key names and shapes without reading every weight (a preflight check)
            sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any reader failure means the same thing to the user
        raise CheckpointLoadError(f"could not read checkpoint {p}: {type(e).__name__}: {e}") from e
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise CheckpointLoadError(f"checkpoint {p} is not a state dict (got {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointLoadError(f"checkpoint {p} has non-tensor entries: {_list_keys(bad)}")
    return dict(sd)


def _list_keys(keys: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {shown}{more}"


def state_dict_problems(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, check_buffer_values: bool = True
) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` against ``module``, listed.

    The one tolerated extra: buffers the module has but does not persist (``position_ids`` in
    transformers >= 4.31), accepted when their values equal the module's own (not comparable for a
    meta-device module: ``check_buffer_values=False``), since the released SPM files carry them.
    """
    own = module.state_dict()
    buffers = dict(module.named_buffers())
    missing = [k for k in own if k not in state_dict]
    unexpected: list[str] = []
    differing: list[str] = []
    for k, v in state_dict.items():
        if k in own:
            continue
        b = buffers.get(k)
        if b is None:
            unexpected.append(k)
        elif b.shape != v.shape or (
            check_buffer_values and not torch.equal(b.detach().cpu(), v.to(dtype=b.dtype, device="cpu"))
        ):
            differing.append(k)
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)})"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {_list_keys(unexpected)}")
    if differing:
        problems.append(f"extra buffers whose values differ from the model's: {_list_keys(differing)}")
    if mismatched:
        problems.append(f"shape mismatch for {_list_keys(mismatched)}")
    return problems


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = ""
) -> None:
    """Load ``state_dict`` into ``module`` strictly; any of :func:`state_dict_problems` is an error."""
    problems = state_dict_problems(module, state_dict)
    if problems:
        where = f" in {source}" if source else ""
        raise CheckpointLoadError(f"checkpoint{where} does not match the model: " + "; ".join(problems))
    own = module.state_dict()
    module.load_state_dict({k: state_dict[k] for k in own}, strict=True)


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# Local directories, dtypes, tokenizer, preprocessing
# --------------------------------------------------------------------------------------------------------------


def resolve_clip_dir(clip_dir: str | os.PathLike) -> Path:
    """A CLIP / PickScore folder: a local directory, a hub id (``yuvalkirstain/PickScore_v1``: the
    HF cache first, then the hub; spo_ray.hub) or ``"tiny"`` (the cached tiny CLIP, built on first use)."""
    if str(clip_dir) == "tiny":
        return ensure_tiny_clip()
    p = Path(clip_dir).expanduser()
    if p.is_dir():
        return p
    from .hub import hub_folder, is_hub_id

    if is_hub_id(str(clip_dir)):
        return hub_folder(str(clip_dir))
    raise FileNotFoundError(f"CLIP directory {p} does not exist (a local directory, a hub id such as "
                            "yuvalkirstain/PickScore_v1, or 'tiny')")


def load_clip_processor(clip_dir: str | os.PathLike):
    """Tokenizer of a local CLIP / PickScore directory (the SPM's text side needs nothing else).

    The directory must hold the tokenizer files: transformers 5 otherwise silently builds an *empty* CLIP
    tokenizer from ``config.json`` (vocab of 2), which would score every prompt as the same garbage.
    """
    from transformers import AutoTokenizer

    path = resolve_clip_dir(clip_dir)
    if not (path / "tokenizer.json").is_file() and not (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    ):
        raise FileNotFoundError(
            f"no tokenizer files (tokenizer.json, or vocab.json + merges.txt) in {path}; "
            "use the CLIP processor directory that goes with the model (processor_dir=...)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_image_normalization(
    clip_dir: str | os.PathLike,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` from ``preprocessor_config.json`` if the directory has one, else OpenAI CLIP's."""
    cfg_path = resolve_clip_dir(clip_dir) / "preprocessor_config.json"
    mean, std = CLIP_MEAN, CLIP_STD
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        mean = tuple(float(x) for x in cfg.get("image_mean", mean))
        std = tuple(float(x) for x in cfg.get("image_std", std))
    return mean, std


def preprocess_images(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    antialias: bool = False,
) -> torch.Tensor:
    """Raw decoded images ``[N,3,H,W]`` (about [-1, 1], not clamped) -> CLIP pixel values ``[N,3,size,size]`` (float32).

    The defaults are the reference's ``get_preference_score``, in its order: the short side resized to ``size``
    (size ``int(h * scale + 0.5)``) with ``F.interpolate(mode="bicubic", align_corners=False)`` and no
    antialias, on the raw decode; centre-cropped (torchvision's rounding); then mapped to [0, 1], clamped and
    CLIP-normalised. The released SPMs were trained on inputs made this way, so the SPM scorer uses exactly
    this. ``antialias=True`` approximates a PIL resize (what Hugging Face CLIP processors do), for metrics
    computed the processor's way. Pure torch so it runs batched on the GPU right after the VAE decode.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
    x = images.to(torch.float32)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    if (new_h, new_w) != (h, w):  # a same-size bicubic resize is the identity
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    # Clamped only now: bicubic overshoot and out-of-range decodes are resized first, as in the reference.
    x = (x / 2 + 0.5).clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class StepAwarePreferenceModel(nn.Module):
    """CLIP with a time-conditioned vision tower; state-dict keys are the released files' (``model.`` + CLIP).

    Build with :meth:`from_clip` (new SPM == plain CLIP at init) or :meth:`from_pretrained` (local CLIP dir +
    optional released checkpoint).
    """

    def __init__(self, clip_model: nn.Module) -> None:
        """Wrap ``clip_model`` (a transformers ``CLIPModel``) that already carries the adaLN / t_embedder modules.

        Use :meth:`from_clip` to add freshly initialised ones.
        """
        super().__init__()
        vm = clip_model.vision_model
        missing = [
            name
            for name, ok in [
                ("t_embedder", hasattr(clip_model, "t_embedder")),
                ("vision_model.adaLN_modulation", hasattr(vm, "adaLN_modulation")),
                (
                    "vision_model.encoder.layers.*.adaLN_modulation",
                    all(hasattr(layer, "adaLN_modulation") for layer in vm.encoder.layers),
                ),
            ]
            if not ok
        ]
        if missing:
            raise ValueError(
                f"CLIP model lacks SPM modules {missing}; use StepAwarePreferenceModel.from_clip"
            )
        self.model = clip_model

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_clip(cls, clip_model: nn.Module) -> StepAwarePreferenceModel:
        """Turn a ``CLIPModel`` (in place, no copy) into a new SPM that scores exactly like the plain CLIP.

        Adds ``t_embedder`` (normal init), per-layer ``adaLN_modulation`` (Linear d->6d, zero except gate biases
        = 1) and the pooled-output ``adaLN_modulation`` (d->2d, zero). Any existing SPM modules are replaced.
        """
        vm = clip_model.vision_model
        d = clip_model.config.vision_config.hidden_size
        ref = next(clip_model.parameters())
        to = {"device": ref.device, "dtype": ref.dtype}
        clip_model.t_embedder = TimestepEmbedder(d).to(**to)
        for layer in vm.encoder.layers:
            # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
            layer.adaLN_modulation = _adaln(d, 6, gate_chunks=(2, 5)).to(**to)
        vm.adaLN_modulation = _adaln(d, 2).to(**to)  # shift, scale on the pooled output
        return cls(clip_model)

    @classmethod
    def from_pretrained(
        cls,
        clip_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> StepAwarePreferenceModel:
        """CLIPModel from the local ``clip_dir`` (``"tiny"`` allowed), wrapped; then ``checkpoint`` loaded strictly.

        Without a checkpoint this is a *new* SPM (identical to the CLIP). The checkpoint is a plain state dict
        (``.bin``/``.pt`` via ``torch.load(weights_only=True)``, or ``.safetensors``) in the released layout.
        """
        from transformers import CLIPModel

        path = resolve_clip_dir(clip_dir)
        clip = CLIPModel.from_pretrained(str(path), local_files_only=True)
        clip = clip.to(torch.float32)
        spm = cls.from_clip(clip)
        if checkpoint is not None:
            load_state_dict_strict(spm, read_state_dict(checkpoint), source=str(checkpoint))
        spm = spm.to(device=torch.device(device), dtype=torch_dtype(dtype))
        return spm.eval()

    # ---- saving -------------------------------------------------------------------------------------------

    def save_released_format(self, path: str | os.PathLike) -> Path:
        """Write the plain torch state dict the released ``*_step-aware_preference_model.bin`` files use."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_cpu_state_dict(self), str(p))
        return p

    def save_safetensors(self, path: str | os.PathLike) -> Path:
        """Same keys as :meth:`save_released_format`, as safetensors (safe to load from untrusted sources)."""
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(_cpu_state_dict(self), str(p))
        return p

    # ---- forward pieces -----------------------------------------------------------------------------------

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def time_condition(self, timesteps: torch.Tensor | float | int, n: int) -> torch.Tensor:
        """Conditioning vector c ``[n, d]`` for raw timesteps (a scalar is broadcast to all ``n`` images)."""
        t = torch.as_tensor(timesteps, device=self.model.logit_scale.device).reshape(-1)
        if t.numel() == 1 and n != 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"got {t.numel()} timesteps for {n} images")
        return self.model.t_embedder(t)

    def image_embeds(self, pixel_values: torch.Tensor, timesteps: torch.Tensor | float | int) -> torch.Tensor:
        """Projected (unnormalised) image embeddings ``[N, proj_dim]`` of CLIP pixel values at timesteps t."""
        vm = self.model.vision_model
        c = self.time_condition(timesteps, pixel_values.shape[0])
        x = vm.embeddings(pixel_values)
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.adaLN_modulation(c).chunk(
                6, dim=-1
            )
            h = _modulate(layer.layer_norm1(x), shift_msa, scale_msa)
            h = layer.self_attn(hidden_states=h, attention_mask=None)[0]
            x = x + gate_msa.unsqueeze(1) * h
            h = _modulate(layer.layer_norm2(x), shift_mlp, scale_mlp)
            h = layer.mlp(h)
            x = x + gate_mlp.unsqueeze(1) * h
        pooled = vm.post_layernorm(x[:, 0, :])
        shift, scale = vm.adaLN_modulation(c).chunk(2, dim=-1)
        pooled = pooled * (1 + scale) + shift
        return self.model.visual_projection(pooled)

    def text_embeds(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected (unnormalised) text embeddings ``[N, proj_dim]``; the text tower is plain CLIP."""
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def score(
        self, pixel_values: torch.Tensor, timesteps: torch.Tensor | float | int, text_embeds: torch.Tensor
    ) -> torch.Tensor:
        """``logit_scale.exp() * cosine(image_embeds(pixel_values, t), text_embeds)`` -> ``[N]``."""
        img = self.image_embeds(pixel_values, timesteps)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = text_embeds.to(img.dtype)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores ``[N]`` for (image, t, tokenised prompt) triples; the training entry point."""
        return self.score(pixel_values, timesteps, self.text_embeds(input_ids, attention_mask))
