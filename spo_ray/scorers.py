"""One scoring interface for every preference model the sampler / scorer stages can use.

The SPO stream only needs ``score(images, prompts, timesteps) -> [N]`` on the SPM's scale (about 100 x
cosine, so the 0.3 / 0.4 softmax-gap pair thresholds are meaningful). Implementations:

- :class:`StepAwareScorer`: the step-aware preference model (the real thing);
- :class:`ClipScorer`: a plain CLIP / PickScore that ignores the timestep (ablations, evaluation);
- :class:`BrightnessScorer`: a deterministic rule for tests (brighter wins), on the same scale;
- anything importable as ``"package.module:Class"`` with a callable ``score``, via :func:`build_scorer`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .devices import torch_dtype
from .spm import (
    StepAwarePreferenceModel,
    _pooled,
    load_clip_processor,
    load_image_normalization,
    load_state_dict_strict,
    preprocess_images,
    read_state_dict,
    resolve_clip_dir,
)

__all__ = [
    "SCORER_KINDS",
    "AestheticHead",
    "AestheticScorer",
    "BrightnessScorer",
    "ClipScoreMetric",
    "ClipScorer",
    "PreferenceScorer",
    "StepAwareScorer",
    "build_scorer",
]

SCORER_KINDS: tuple[str, ...] = ("spm", "clip", "brightness")


@runtime_checkable
class PreferenceScorer(Protocol):
    """Scores decoded images for their prompts at the timestep their x0 prediction was made."""

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        """images ``[N,3,H,W]`` in [-1, 1]; N prompts; timesteps ``[N]`` (0 = finished image) -> float32 ``[N]``."""
        ...


def _check_inputs(images: torch.Tensor, prompts: Sequence[str], timesteps: Any) -> torch.Tensor:
    """Validate shapes once, for every scorer; returns timesteps as a 1-D tensor of length N (scalar broadcast)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [N, 3, H, W] tensor in [-1, 1], got {shape}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, one per image, not a single string")
    n = images.shape[0]
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images")
    t = torch.as_tensor(timesteps).reshape(-1)
    if t.numel() == 1 and n != 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"got {t.numel()} timesteps for {n} images")
    return t


class _ClipFamilyScorer:
    """Shared machinery of CLIP-based scorers: tokenizer, per-prompt text cache, preprocessing, batching.

    Subclasses load their model in :meth:`_load_model`; everything else about construction is shared.
    ``antialias`` picks the resize of :func:`preprocess_images`: off (the default) is the reference's SPM
    preprocessing; on approximates a Hugging Face CLIP processor's PIL resize (evaluation metrics).
    """

    def __init__(
        self,
        clip_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_batch: int = 64,
        *,
        processor_dir: str | os.PathLike | None = None,
        antialias: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.clip_dir = resolve_clip_dir(clip_dir)
        # The released SPMs pair PickScore weights with the CLIP-ViT-H-14 processor; if a directory lacks the
        # tokenizer / preprocessor config, point processor_dir at the one that has them.
        self.processor_dir = resolve_clip_dir(processor_dir) if processor_dir is not None else self.clip_dir
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.max_batch = int(max_batch)
        self.antialias = bool(antialias)
        self.tokenizer = load_clip_processor(self.processor_dir)
        self.image_mean, self.image_std = load_image_normalization(self.processor_dir)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.model = self._load_model(checkpoint).requires_grad_(False).eval()

    # subclasses implement these
    def _load_model(self, checkpoint: str | os.PathLike | None) -> torch.nn.Module:
        """The scoring model from ``self.clip_dir`` (+ optional ``checkpoint``) on ``self.device`` / ``self.dtype``."""
        raise NotImplementedError

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _score_pixels(
        self, pixel_values: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def _max_text_len(self) -> int:
        raise NotImplementedError

    def reset_text_cache(self) -> None:
        """Forget cached prompt embeddings (call between rounds so the cache does not grow without bound)."""
        self._text_cache.clear()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[N, proj_dim]`` prompt embeddings; each distinct prompt is encoded at most once until a reset.

        A pool of k candidates shares one prompt, so caching saves k-1 of every k text forwards.
        """
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        for i in range(0, len(todo), self.max_batch):
            chunk = todo[i : i + self.max_batch]
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self._max_text_len(),
                return_tensors="pt",
            )
            emb = self._encode_text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            for p, e in zip(chunk, emb, strict=True):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        """float32 ``[N]`` scores (~100 x cosine) on ``images.device``; batched by ``max_batch``."""
        t = _check_inputs(images, prompts, timesteps)
        if images.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=images.device)
        text = self.text_embeddings(prompts)
        out = []
        for i in range(0, images.shape[0], self.max_batch):
            sl = slice(i, i + self.max_batch)
            px = preprocess_images(
                images[sl].to(self.device), mean=self.image_mean, std=self.image_std, antialias=self.antialias
            )
            s = self._score_pixels(px.to(self.dtype), t[sl].to(self.device), text[sl])
            out.append(s.to(torch.float32))
        return torch.cat(out).to(images.device)


class StepAwareScorer(_ClipFamilyScorer):
    """The SPM as a scorer: candidates at step t are judged by the SPM conditioned on t."""

    model: StepAwarePreferenceModel

    def _load_model(self, checkpoint: str | os.PathLike | None) -> StepAwarePreferenceModel:
        return StepAwarePreferenceModel.from_pretrained(
            self.clip_dir, checkpoint, dtype=self.dtype, device=self.device
        )

    def _max_text_len(self) -> int:
        return int(self.model.model.config.text_config.max_position_embeddings)

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_embeds(input_ids, attention_mask)

    def _score_pixels(
        self, pixel_values: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        return self.model.score(pixel_values, timesteps, text)


class ClipScorer(_ClipFamilyScorer):
    """Plain CLIP / PickScore (``logit_scale.exp() * cosine``); ignores the timestep.

    ``checkpoint`` optionally overrides the directory's weights with a plain ``CLIPModel`` state dict (a
    ``model.`` prefix is stripped); it is loaded strictly, so an SPM checkpoint is rejected, not half-loaded.
    """

    def _load_model(self, checkpoint: str | os.PathLike | None) -> torch.nn.Module:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(str(self.clip_dir), local_files_only=True).to(torch.float32)
        if checkpoint is not None:
            sd = read_state_dict(checkpoint)
            if sd and all(k.startswith("model.") for k in sd):
                sd = {k.removeprefix("model."): v for k, v in sd.items()}
            load_state_dict_strict(model, sd, source=str(checkpoint))
        return model.to(device=self.device, dtype=self.dtype)

    def _max_text_len(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def _cosine(self, pixel_values: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        img = _pooled(self.model.get_image_features(pixel_values=pixel_values))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = text.to(img.dtype)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(dim=-1)

    def _score_pixels(
        self, pixel_values: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        return self.model.logit_scale.exp() * self._cosine(pixel_values, text)


class ClipScoreMetric(ClipScorer):
    """CLIP score as torchmetrics' ``CLIPScore`` reports it: ``100 * max(cosine, 0)`` (Hessel et al. use
    ``2.5 * max(cosine, 0)``); independent of the model's ``logit_scale``. Ignores the timestep."""

    def _score_pixels(
        self, pixel_values: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        return 100.0 * self._cosine(pixel_values, text).clamp(min=0.0)


class BrightnessScorer:
    """Rule-based test scorer: ``scale * mean(pixel in [0, 1])`` (brighter wins); ignores prompts and t.

    The default scale 100 puts it on the SPM's scale, so candidate gaps are several units and the softmax-gap
    pair threshold keeps pairs (a [0, 1] score would make every softmax ~50/50 and keep nothing).
    """

    def __init__(self, scale: float = 100.0) -> None:
        self.scale = float(scale)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        _check_inputs(images, prompts, timesteps)
        x = ((images.to(torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)
        return self.scale * x.mean(dim=(1, 2, 3))


def _import_object(path: str) -> Any:
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"scorer import path must look like 'package.module:Class', got {path!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {mod_name!r} for scorer {path!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ImportError(f"module {mod_name!r} has no attribute {attr!r} (scorer {path!r})") from e
    return obj


def _parameters(factory: Any) -> list[str]:
    try:
        return [n for n, p in inspect.signature(factory).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return []


def _unexpected_kwargs(factory: Any, kwargs: dict[str, Any]) -> set[str]:
    """The keyword arguments ``factory`` does not declare (none when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return set()
    return set(kwargs) - set(_parameters(factory))


def build_scorer(
    kind: str,
    *,
    clip_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    **kwargs: Any,
) -> PreferenceScorer:
    """Build a scorer from config: ``"spm"``, ``"clip"``, ``"brightness"`` or ``"package.module:Class"``.

    For an import path the object is called with ``**kwargs`` only and must expose a callable ``score``.
    ``clip_dir`` may be ``"tiny"`` (the cached tiny random CLIP, for tests and CPU runs).
    """
    if kind in ("spm", "clip"):
        if clip_dir is None:
            raise ValueError(
                f"scorer kind {kind!r} needs clip_dir (a local CLIP/PickScore directory, or 'tiny')"
            )
        cls = StepAwareScorer if kind == "spm" else ClipScorer
        return cls(clip_dir, checkpoint, device=device, dtype=dtype, **kwargs)
    if kind == "brightness":
        return BrightnessScorer(**kwargs)
    if ":" in kind:
        factory = _import_object(kind)
        if not callable(factory):
            raise TypeError(f"scorer {kind!r} is not callable (got {type(factory).__name__})")
        unexpected = _unexpected_kwargs(factory, kwargs)
        if unexpected:
            raise TypeError(f"scorer {kind!r} does not take {', '.join(sorted(unexpected))} (from scorer.kwargs); "
                            f"it takes: {', '.join(_parameters(factory)) or 'nothing'}")
        scorer = factory(**kwargs)
        if not callable(getattr(scorer, "score", None)):
            raise TypeError(
                f"scorer {kind!r} built a {type(scorer).__name__} without a callable "
                "score(images, prompts, timesteps) method"
            )
        return scorer
    raise ValueError(
        f"unknown scorer kind {kind!r}; valid kinds: {', '.join(SCORER_KINDS)}, or 'package.module:Class'"
    )


# ----------------------------------------------------------------------------- LAION aesthetic score

AESTHETIC_WIDTHS = (1024, 128, 64, 16)  # hidden widths of the released improved-aesthetic-predictor head


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP, with the released state dict's key layout.

    ``layers.0`` (in -> 1024), ``layers.2`` (1024 -> 128), ``layers.4`` (128 -> 64), ``layers.6`` (64 -> 16),
    ``layers.7`` (16 -> 1), dropouts between (``sac+logos+ava1-l14-linearMSE.pth``: in = 768, CLIP ViT-L/14).
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        w1, w2, w3, w4 = AESTHETIC_WIDTHS
        self.layers = nn.Sequential(
            nn.Linear(self.input_dim, w1), nn.Dropout(0.2),
            nn.Linear(w1, w2), nn.Dropout(0.2),
            nn.Linear(w2, w3), nn.Dropout(0.1),
            nn.Linear(w3, w4), nn.Linear(w4, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, in]`` -> scores ``[N]``."""
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | os.PathLike, *, input_dim: int | None = None) -> AestheticHead:
    """The head from a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    The input width comes from ``input_dim`` or else from ``layers.0.weight`` (768 for the released file), so a
    head over another CLIP's embeddings loads too. Missing, unexpected and mis-shaped keys are listed.
    """
    state = read_state_dict(path)
    first = state.get("layers.0.weight")
    if input_dim is None:
        input_dim = int(first.shape[1]) if first is not None and first.ndim == 2 else 768
    head = AestheticHead(input_dim)
    load_state_dict_strict(head, state, source=f"aesthetic head {path}")
    return head.eval().requires_grad_(False)


class AestheticScorer:
    """LAION aesthetic score: CLIP image embedding (ViT-L/14 for the released head), L2-normalised, through
    :class:`AestheticHead`. Ignores prompts and timesteps; about 1-10 (real images: ~5-6.5)."""

    def __init__(
        self,
        clip_dir: str | os.PathLike,
        head: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_batch: int = 64,
    ) -> None:
        from transformers import CLIPModel

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.clip_dir = resolve_clip_dir(clip_dir)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.max_batch = int(max_batch)
        self.image_mean, self.image_std = load_image_normalization(self.clip_dir)
        clip = CLIPModel.from_pretrained(str(self.clip_dir), local_files_only=True)
        width = int(clip.config.projection_dim)
        self.head = load_aesthetic_head(head)
        if self.head.input_dim != width:
            raise ValueError(
                f"aesthetic head {head} takes {self.head.input_dim}-wide embeddings but the CLIP in "
                f"{self.clip_dir} projects to {width} (the released head needs CLIP ViT-L/14)"
            )
        self.model = clip.requires_grad_(False).eval().to(device=self.device, dtype=self.dtype)
        self.head = self.head.to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: Any = 0) -> torch.Tensor:
        """float32 ``[N]`` aesthetic scores of ``images`` ``[N,3,H,W]`` in [-1, 1]."""
        _check_inputs(images, prompts, timesteps)
        out = [torch.empty(0, dtype=torch.float32)]
        for i in range(0, images.shape[0], self.max_batch):
            # Antialiased like the CLIP processor (PIL) the released aesthetic head was used with.
            px = preprocess_images(
                images[i : i + self.max_batch].to(self.device), mean=self.image_mean, std=self.image_std, antialias=True
            )
            emb = _pooled(self.model.get_image_features(pixel_values=px.to(self.dtype))).float()
            out.append(self.head(emb / emb.norm(dim=-1, keepdim=True)).cpu())
        return torch.cat(out).to(images.device)
