"""Scorer interface: SPM / CLIP / brightness scorers, text cache, batching, build_scorer."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spo_ray import tiny as tiny_mod
from spo_ray.scorers import (
    SCORER_KINDS,
    BrightnessScorer,
    ClipScorer,
    PreferenceScorer,
    StepAwareScorer,
    build_scorer,
)
from spo_ray.spm import CheckpointLoadError, StepAwarePreferenceModel, preprocess_images
from spo_ray.tiny import build_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def spm_checkpoint(clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SPM whose modulation is non-zero, so the timestep matters."""
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if "adaLN_modulation" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return spm.save_released_format(tmp_path_factory.mktemp("ckpt") / "spm.bin")


def _images(n: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def _count_text_rows(monkeypatch: pytest.MonkeyPatch, scorer, encode_attr: str) -> list[int]:
    """Wrap ``scorer.model.<encode_attr>``; returns the list of batch sizes it was called with."""
    calls: list[int] = []
    obj = scorer.model
    orig = getattr(obj, encode_attr)

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(int(ids.shape[0]))
        return orig(*args, **kwargs)

    monkeypatch.setattr(obj, encode_attr, counting)
    return calls


# ---- rule-based scorer -----------------------------------------------------------------------------------------


def test_brightness_scorer_scale_and_order() -> None:
    s = BrightnessScorer()
    imgs = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 0.0, 0.5, 1.0, 3.0)])
    out = s.score(imgs, ["x"] * 5, torch.tensor([951, 0, 0, 1, 0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 50.0, 75.0, 100.0, 100.0]))
    assert out.dtype == torch.float32
    # deterministic, ignores prompts and t
    assert torch.equal(out, s.score(imgs, ["other"] * 5, torch.zeros(5, dtype=torch.long)))
    assert torch.equal(BrightnessScorer(scale=10.0).score(imgs, ["x"] * 5, torch.zeros(5)), out / 10)
    # on the SPM's scale: a modest brightness gap clears the 0.3 softmax-gap pair threshold
    pair = s.score(
        torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.08)]), ["p", "p"], torch.zeros(2)
    )
    p = torch.softmax(pair, 0)
    assert p[0] - p[1] > 0.3
    assert isinstance(s, PreferenceScorer)


def test_input_validation() -> None:
    s = BrightnessScorer()
    with pytest.raises(ValueError, match="prompts"):
        s.score(_images(2), ["only one"], torch.zeros(2))
    with pytest.raises(ValueError, match="timesteps"):
        s.score(_images(2), ["a", "b"], torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        s.score(torch.zeros(3, 8, 8), ["a"], torch.zeros(1))
    with pytest.raises(TypeError, match="list of strings"):
        s.score(_images(1), "a", torch.zeros(1))


# ---- SPM / CLIP scorers ----------------------------------------------------------------------------------------


def test_step_aware_scorer_matches_spm_and_uses_t(clip_dir: Path, spm_checkpoint: Path) -> None:
    scorer = StepAwareScorer(clip_dir, spm_checkpoint)
    assert isinstance(scorer, PreferenceScorer)
    imgs = _images(4, 96, 128)
    prompts = ["a cat", "a dog", "a cat", "the castle"]
    t = torch.tensor([951, 951, 0, 501])
    out = scorer.score(imgs, prompts, t)
    assert out.shape == (4,) and out.dtype == torch.float32
    # same numbers as driving the SPM by hand
    model = scorer.model
    enc = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.score(
            preprocess_images(imgs), t, model.text_embeds(enc["input_ids"], enc["attention_mask"])
        )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # the timestep matters for a trained (non-identity) SPM
    assert (scorer.score(imgs, prompts, torch.zeros(4, dtype=torch.long)) - out)[[0, 1, 3]].abs().min() > 1e-4
    # batching does not change the numbers
    small = StepAwareScorer(clip_dir, spm_checkpoint, max_batch=3)
    torch.testing.assert_close(small.score(imgs, prompts, t), out, atol=1e-4, rtol=0)
    assert scorer.score(imgs[:0], [], t[:0]).shape == (0,)


def test_text_cache_encodes_each_prompt_once(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = StepAwareScorer(clip_dir, max_batch=2)
    calls = _count_text_rows(monkeypatch, scorer, "text_embeds")
    prompts = ["a cat", "a dog", "a cat", "a cat", "a bird", "a dog"]
    first = scorer.score(_images(6), prompts, torch.full((6,), 951))
    assert sum(calls) == 3  # three distinct prompts, encoded in batches of at most max_batch
    assert max(calls) <= 2
    scorer.score(_images(6, seed=1), prompts, torch.full((6,), 501))  # next step of the same round
    scorer.score(_images(2), ["a bird", "a cat"], torch.zeros(2))
    assert sum(calls) == 3
    scorer.score(_images(1), ["new prompt"], torch.zeros(1))
    assert sum(calls) == 4
    scorer.reset_text_cache()  # next round: recomputed
    again = scorer.score(_images(6), prompts, torch.full((6,), 951))
    assert sum(calls) == 7
    torch.testing.assert_close(again, first, atol=1e-4, rtol=0)


def test_clip_scorer_ignores_t_and_equals_new_spm(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = ClipScorer(clip_dir)
    imgs = _images(3, 80, 60)
    prompts = ["a cat", "a dog", "a cat"]
    s0 = clip.score(imgs, prompts, torch.zeros(3))
    torch.testing.assert_close(clip.score(imgs, prompts, torch.tensor([951, 3, 500])), s0, atol=0, rtol=0)
    # a freshly initialised SPM (no checkpoint) is the plain CLIP
    spm = StepAwareScorer(clip_dir)
    torch.testing.assert_close(spm.score(imgs, prompts, torch.tensor([951, 3, 500])), s0, atol=1e-4, rtol=0)
    calls = _count_text_rows(monkeypatch, clip, "get_text_features")
    clip.reset_text_cache()
    clip.score(imgs, prompts, torch.zeros(3))
    clip.score(imgs, prompts, torch.zeros(3))
    assert sum(calls) == 2


def test_resize_is_the_references_unless_antialias_is_asked_for(clip_dir: Path) -> None:
    """The SPO scorers resize as the reference's SPM does (no antialias); evaluation metrics ask for the
    CLIP processor's antialiased resize. At 512 px the two differ."""
    imgs, prompts = _images(2, 512, 512), ["a cat", "a dog"]
    plain, smooth = ClipScorer(clip_dir), ClipScorer(clip_dir, antialias=True)
    assert not StepAwareScorer(clip_dir).antialias and not plain.antialias
    text = plain.text_embeddings(prompts)
    with torch.no_grad():
        for scorer, antialias in ((plain, False), (smooth, True)):
            ref = scorer._score_pixels(preprocess_images(imgs, antialias=antialias), torch.zeros(2), text)
            torch.testing.assert_close(scorer.score(imgs, prompts, torch.zeros(2)), ref, atol=1e-5, rtol=0)
    assert (plain.score(imgs, prompts, torch.zeros(2)) - smooth.score(imgs, prompts, torch.zeros(2))).abs().min() > 1e-3


def test_clip_scorer_checkpoint(clip_dir: Path, spm_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True)
    with torch.no_grad():
        clip.logit_scale.fill_(2.0)
    prefixed = tmp_path / "clip.safetensors"
    from safetensors.torch import save_file

    save_file({f"model.{k}": v.contiguous() for k, v in clip.state_dict().items()}, str(prefixed))
    scorer = ClipScorer(clip_dir, prefixed)
    assert scorer.model.logit_scale.item() == pytest.approx(2.0)
    # an SPM checkpoint has t_embedder / adaLN keys a plain CLIP cannot take: rejected, not half-loaded
    with pytest.raises(CheckpointLoadError, match="t_embedder"):
        ClipScorer(clip_dir, spm_checkpoint)


def test_processor_dir_for_weights_only_directory(clip_dir: Path, tmp_path: Path) -> None:
    """PickScore weights + a separate CLIP processor directory, as the released SPMs are distributed."""
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, weights_only / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        StepAwareScorer(weights_only)
    s = StepAwareScorer(weights_only, processor_dir=clip_dir)
    ref = StepAwareScorer(clip_dir)
    imgs = _images(2)
    torch.testing.assert_close(
        s.score(imgs, ["a", "b"], torch.zeros(2)),
        ref.score(imgs, ["a", "b"], torch.zeros(2)),
        atol=1e-4,
        rtol=0,
    )
    c = build_scorer("clip", clip_dir=weights_only, processor_dir=clip_dir)
    assert c.processor_dir == clip_dir


def test_dtype_strings(clip_dir: Path) -> None:
    scorer = build_scorer("spm", clip_dir=clip_dir, dtype="bf16")
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    out = scorer.score(_images(2), ["a", "b"], torch.tensor([0, 951]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- build_scorer ----------------------------------------------------------------------------------------------


def test_build_scorer_builtin_kinds(clip_dir: Path, spm_checkpoint: Path) -> None:
    assert set(SCORER_KINDS) == {"spm", "clip", "brightness"}
    s = build_scorer("spm", clip_dir=clip_dir, checkpoint=spm_checkpoint, max_batch=8)
    assert isinstance(s, StepAwareScorer) and s.max_batch == 8
    assert isinstance(build_scorer("clip", clip_dir=str(clip_dir)), ClipScorer)
    b = build_scorer("brightness", scale=50.0)
    assert isinstance(b, BrightnessScorer) and b.scale == 50.0
    for kind in ("spm", "clip"):
        with pytest.raises(ValueError, match="clip_dir"):
            build_scorer(kind)
    with pytest.raises(ValueError, match="spm, clip, brightness"):
        build_scorer("pickscore-v9")


def test_build_scorer_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "my_scorers_for_spo_test.py"
    mod.write_text(
        textwrap.dedent(
            """
            import torch

            class RedScorer:
                def __init__(self, weight=1.0):
                    self.weight = weight

                def score(self, images, prompts, timesteps):
                    return self.weight * 100.0 * (images[:, 0] + 1).mean(dim=(1, 2)) / 2

            class NoScore:
                pass

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_scorers_for_spo_test", raising=False)
    s = build_scorer("my_scorers_for_spo_test:RedScorer", weight=2.0)
    assert type(s).__name__ == "RedScorer" and s.weight == 2.0
    assert isinstance(s, PreferenceScorer)
    img = torch.full((1, 3, 4, 4), 0.0)
    assert s.score(img, ["p"], torch.zeros(1)).item() == pytest.approx(100.0)
    with pytest.raises(TypeError, match="score"):
        build_scorer("my_scorers_for_spo_test:NoScore")
    with pytest.raises(TypeError, match="not callable"):
        build_scorer("my_scorers_for_spo_test:NOT_CALLABLE")
    with pytest.raises(ImportError, match="no attribute"):
        build_scorer("my_scorers_for_spo_test:Missing")
    with pytest.raises(ImportError, match="cannot import module"):
        build_scorer("no_such_module_for_spo_test:X")
    with pytest.raises(ValueError, match="package.module:Class"):
        build_scorer(":X")


def test_tiny_clip_dir_is_built_once_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPO_RAY_CACHE", str(tmp_path / "cache"))
    built: list[Path] = []
    real_build = tiny_mod.build_tiny_clip

    def counting_build(save_dir, **kw):
        built.append(Path(save_dir))
        return real_build(save_dir, **kw)

    monkeypatch.setattr(tiny_mod, "build_tiny_clip", counting_build)
    s = build_scorer("spm", clip_dir="tiny")
    target = tmp_path / "cache" / "tiny-clip"
    assert s.clip_dir == target and (target / "config.json").is_file()
    assert len(built) == 1 and built[0] != target  # built elsewhere, then renamed into place
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-clip"]  # no temp dirs left behind
    c = build_scorer("clip", clip_dir="tiny")
    assert c.clip_dir == target and len(built) == 1
    out = s.score(_images(2), ["a", "b"], torch.tensor([0, 951]))
    torch.testing.assert_close(out, c.score(_images(2), ["a", "b"], torch.zeros(2)), atol=1e-4, rtol=0)
    # a stale build (older version marker) is replaced
    (target / tiny_mod._TINY_CLIP_MARKER).write_text("0")
    assert tiny_mod.ensure_tiny_clip() == target and len(built) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-clip"]


def test_clip_folders_come_from_a_hub_id_through_the_hf_cache(tmp_path, monkeypatch) -> None:
    """scorer.clip_dir / processor_dir take a hub id: the HF cache is read first (here a cache
    holding the tiny CLIP under test-org/tiny-pickscore, the hub itself switched off), and an id in
    neither the cache nor the hub is an error naming it."""
    import huggingface_hub.constants

    from spo_ray.scorers import build_scorer
    from spo_ray.spm import resolve_clip_dir

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-pickscore"
    shutil.copytree(tiny_mod.ensure_tiny_clip(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert resolve_clip_dir("test-org/tiny-pickscore") == repo / "snapshots" / revision
    scorer = build_scorer("spm", clip_dir="test-org/tiny-pickscore", processor_dir="test-org/tiny-pickscore")
    scores = scorer.score(torch.zeros(2, 3, 64, 64), ["a red apple", "a blue car"], torch.tensor([0, 500]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    with pytest.raises(FileNotFoundError, match="test-org/missing: no such local directory, and the hub copy"):
        resolve_clip_dir("test-org/missing")
