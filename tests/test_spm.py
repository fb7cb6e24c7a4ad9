"""The step-aware preference model: released key layout, init == plain CLIP, strict loading, preprocessing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from spo_ray.fidelity import natural_images
from spo_ray.spm import (
    CLIP_MEAN,
    CLIP_STD,
    CheckpointLoadError,
    StepAwarePreferenceModel,
    load_clip_processor,
    load_image_normalization,
    preprocess_images,
    read_state_dict,
    resolve_clip_dir,
    timestep_embedding,
)
from spo_ray.tiny import build_tiny_clip

PROMPTS = ["a photo of the cat", "and a dog", "an oil painting of a castle in the mountains"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def tokens(clip_dir: Path) -> dict[str, torch.Tensor]:
    tok = load_clip_processor(clip_dir)
    return dict(tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt"))


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g)


def _perturb(spm: StepAwarePreferenceModel, seed: int = 1, std: float = 0.05) -> None:
    """Random non-zero modulation, so the timestep matters (as in a trained SPM)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if "adaLN_modulation" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _plain_clip_scores(clip: CLIPModel, px: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    img = clip.get_image_features(pixel_values=px)
    txt = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output  # transformers 5 returns ModelOutput
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return clip.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)


# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_new_spm_scores_exactly_like_plain_clip(clip_dir: Path, tokens: dict[str, torch.Tensor]) -> None:
    clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    px = _pixels(3)
    ref = _plain_clip_scores(clip, px, tokens)
    text = spm.text_embeds(tokens["input_ids"], tokens["attention_mask"])
    for t in (0, 1, 251, 951, 999):
        got = spm.score(px, torch.full((3,), t), text)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # mixed timesteps in one batch, and a scalar timestep broadcast
    torch.testing.assert_close(spm.score(px, torch.tensor([0, 500, 999]), text), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(spm.score(px, 951, text), ref, atol=1e-5, rtol=0)
    # scores are on the ~100 x cosine scale (tiny CLIP uses PickScore's logit scale)
    assert spm.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


@torch.no_grad()
def test_from_clip_wraps_in_place_and_initialises_as_identity(clip_dir: Path, tokens: dict) -> None:
    clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    px = _pixels(2, seed=3)
    ref = _plain_clip_scores(clip, px, {k: v[:2] for k, v in tokens.items()})
    spm = StepAwarePreferenceModel.from_clip(clip)
    assert spm.model is clip
    d = clip.config.vision_config.hidden_size
    for layer in clip.vision_model.encoder.layers:
        lin = layer.adaLN_modulation[1]
        assert isinstance(layer.adaLN_modulation[0], torch.nn.SiLU)
        assert lin.weight.shape == (6 * d, d) and torch.count_nonzero(lin.weight) == 0
        chunks = lin.bias.chunk(6)
        for i, c in enumerate(chunks):  # shift, scale, GATE, shift, scale, GATE
            assert torch.all(c == (1.0 if i in (2, 5) else 0.0))
    final = clip.vision_model.adaLN_modulation[1]
    assert final.weight.shape == (2 * d, d)
    assert torch.count_nonzero(final.weight) == 0 and torch.count_nonzero(final.bias) == 0
    assert clip.t_embedder.mlp[0].weight.shape == (d, 256) and clip.t_embedder.mlp[2].weight.shape == (d, d)
    text = spm.text_embeds(tokens["input_ids"][:2], tokens["attention_mask"][:2])
    torch.testing.assert_close(spm.score(px, torch.tensor([7, 800]), text), ref, atol=1e-5, rtol=0)


def test_wrapper_rejects_clip_without_spm_modules(clip_dir: Path) -> None:
    clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True)
    with pytest.raises(ValueError, match="from_clip"):
        StepAwarePreferenceModel(clip)


@torch.no_grad()
def test_timestep_changes_score_after_perturbing_modulation(clip_dir: Path, tokens: dict) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    _perturb(spm)
    px = _pixels(3)
    text = spm.text_embeds(tokens["input_ids"], tokens["attention_mask"])
    s0 = spm.score(px, torch.zeros(3), text)
    s1 = spm.score(px, torch.full((3,), 951), text)
    assert (s0 - s1).abs().min() > 1e-3
    # per-sample conditioning: a mixed batch equals the per-t results row by row
    mixed = spm.score(px, torch.tensor([0, 951, 0]), text)
    torch.testing.assert_close(mixed, torch.stack([s0[0], s1[1], s0[2]]), atol=1e-5, rtol=0)
    # forward() = score with tokenised prompts
    torch.testing.assert_close(
        spm(px, torch.zeros(3), tokens["input_ids"], tokens["attention_mask"]), s0, atol=1e-6, rtol=0
    )


def test_timestep_embedding_matches_closed_form() -> None:
    ts = torch.tensor([0.0, 1.0, 37.0, 951.0])
    emb = timestep_embedding(ts)
    assert emb.shape == (4, 256) and emb.dtype == torch.float32
    for row, t in zip(emb, ts.tolist(), strict=True):
        for i in (0, 1, 5, 64, 127):
            f = math.exp(-math.log(10000.0) * i / 128)
            assert row[i].item() == pytest.approx(math.cos(t * f), abs=1e-4)
            assert row[128 + i].item() == pytest.approx(math.sin(t * f), abs=1e-4)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    # integer timesteps are accepted as raw values
    torch.testing.assert_close(timestep_embedding(torch.tensor([951])), emb[3:4])


def test_t_embedder_consumes_closed_form_features(clip_dir: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    mlp = spm.model.t_embedder.mlp
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = mlp[2](F.silu(mlp[0](timestep_embedding(t.float()))))
        torch.testing.assert_close(spm.time_condition(t, 2), expected)
    with pytest.raises(ValueError, match="timesteps"):
        spm.time_condition(torch.tensor([1, 2, 3]), 2)


# ---- released layout and strict loading ------------------------------------------------------------------------


def test_released_key_layout(clip_dir: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    keys = set(spm.state_dict())
    clip_keys = set(CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).state_dict())
    assert all(k.startswith("model.") for k in keys)
    assert {f"model.{k}" for k in clip_keys} <= keys  # plain CLIP / PickScore keys map 1:1 under model.
    spm_keys = {
        "model.t_embedder.mlp.0.weight",
        "model.t_embedder.mlp.0.bias",
        "model.t_embedder.mlp.2.weight",
        "model.t_embedder.mlp.2.bias",
        "model.vision_model.adaLN_modulation.1.weight",
        "model.vision_model.adaLN_modulation.1.bias",
    }
    for n in range(2):
        spm_keys |= {
            f"model.vision_model.encoder.layers.{n}.adaLN_modulation.1.{p}" for p in ("weight", "bias")
        }
    assert keys - {f"model.{k}" for k in clip_keys} == spm_keys
    assert not any("text_model" in k and "adaLN" in k for k in keys)  # the text tower stays plain


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_checkpoint_round_trip(clip_dir: Path, tokens: dict, tmp_path: Path, suffix: str) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    _perturb(spm, seed=7)
    with torch.no_grad():
        spm.model.logit_scale.fill_(4.0)
        spm.model.vision_model.encoder.layers[1].mlp.fc1.weight.mul_(1.5)  # CLIP weights round-trip too
    path = tmp_path / f"spm{suffix}"
    (spm.save_released_format if suffix == ".bin" else spm.save_safetensors)(path)
    raw = read_state_dict(path)
    assert "model.t_embedder.mlp.0.weight" in raw
    assert "model.vision_model.encoder.layers.0.adaLN_modulation.1.weight" in raw
    assert "model.vision_model.adaLN_modulation.1.bias" in raw
    if suffix == ".bin":  # a plain torch state dict, loadable with weights_only=True like the released files
        plain = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(plain, dict) and set(plain) == set(spm.state_dict())
    loaded = StepAwarePreferenceModel.from_pretrained(clip_dir, path)
    for k, v in spm.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0, msg=k)
    px = _pixels(3)
    with torch.no_grad():
        text = spm.text_embeds(tokens["input_ids"], tokens["attention_mask"])
        t = torch.tensor([0, 400, 951])
        torch.testing.assert_close(loaded.score(px, t, text), spm.score(px, t, text), atol=0, rtol=0)


def _saved(spm: StepAwarePreferenceModel, tmp_path: Path, edit) -> Path:
    sd = {k: v.clone() for k, v in spm.state_dict().items()}
    edit(sd)
    path = tmp_path / "edited.bin"
    torch.save(sd, path)
    return path


def test_extra_position_id_buffers_equal_to_model_are_accepted(clip_dir: Path, tmp_path: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)

    def add_buffers(sd: dict) -> None:  # what checkpoints from transformers < 4.31 carry
        sd["model.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
        sd["model.vision_model.embeddings.position_ids"] = torch.arange(50).unsqueeze(0)

    StepAwarePreferenceModel.from_pretrained(clip_dir, _saved(spm, tmp_path, add_buffers))

    def bad_buffer(sd: dict) -> None:
        sd["model.text_model.embeddings.position_ids"] = torch.arange(77).flip(0).unsqueeze(0)

    with pytest.raises(CheckpointLoadError, match=r"model\.text_model\.embeddings\.position_ids"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, _saved(spm, tmp_path, bad_buffer))


def test_missing_key_is_an_error_naming_it(clip_dir: Path, tmp_path: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    key = "model.vision_model.encoder.layers.1.adaLN_modulation.1.weight"
    path = _saved(spm, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointLoadError, match="missing") as err:
        StepAwarePreferenceModel.from_pretrained(clip_dir, path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_plain_clip_checkpoint_lists_missing_spm_keys(clip_dir: Path, tmp_path: Path) -> None:
    """A PickScore-only state dict is not an SPM: the error lists (a bounded number of) the missing keys."""
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    dropped = [k for k in spm.state_dict() if "adaLN" in k or "t_embedder" in k or ".mlp." in k]
    path = _saved(spm, tmp_path, lambda sd: [sd.pop(k) for k in dropped])
    with pytest.raises(CheckpointLoadError) as err:
        StepAwarePreferenceModel.from_pretrained(clip_dir, path)
    msg = str(err.value)
    assert len(dropped) > 20
    assert f"missing {len(dropped)} key(s)" in msg and f"({len(dropped) - 20} more)" in msg
    assert sum(k in msg for k in dropped) == 20


def test_unexpected_key_is_an_error_naming_it(clip_dir: Path, tmp_path: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    path = _saved(
        spm, tmp_path, lambda sd: sd.__setitem__("model.vision_model.extra_head.weight", torch.ones(2))
    )
    with pytest.raises(CheckpointLoadError, match=r"unexpected.*model\.vision_model\.extra_head\.weight"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, path)


def test_shape_mismatch_is_an_error(clip_dir: Path, tmp_path: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    key = "model.vision_model.adaLN_modulation.1.weight"
    path = _saved(spm, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(CheckpointLoadError, match="shape mismatch"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, path)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_corrupt_checkpoint_is_a_clear_error(clip_dir: Path, tmp_path: Path, suffix: str) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    good = tmp_path / f"good{suffix}"
    (spm.save_released_format if suffix == ".bin" else spm.save_safetensors)(good)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])  # truncated download
    with pytest.raises(CheckpointLoadError, match="could not read checkpoint") as err:
        StepAwarePreferenceModel.from_pretrained(clip_dir, bad)
    assert str(bad) in str(err.value)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\x00not a checkpoint\xff" * 10)
    with pytest.raises(CheckpointLoadError, match=str(garbage.name)):
        read_state_dict(garbage)


def test_non_state_dict_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "list.pt"
    torch.save([torch.ones(1)], p)
    with pytest.raises(CheckpointLoadError, match="not a state dict"):
        read_state_dict(p)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_state_dict(tmp_path / "nope.bin")


def test_from_pretrained_dtype_device_and_missing_dir(clip_dir: Path, tmp_path: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in spm.parameters()} == {torch.bfloat16}
    assert not spm.training
    with torch.no_grad():
        px = _pixels(2).to(torch.bfloat16)
        text = spm.text_embeds(torch.tensor([[516, 70, 517]] * 2))
        assert torch.isfinite(spm.score(px, torch.tensor([0, 951]), text)).all()
    with pytest.raises(FileNotFoundError, match="does-not-exist does not exist"):
        StepAwarePreferenceModel.from_pretrained(tmp_path / "does-not-exist")


def test_torch_dtype_names() -> None:
    from spo_ray.devices import torch_dtype as resolve_dtype

    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float7")


# ---- preprocessing ---------------------------------------------------------------------------------------------


def _norm(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_preprocess_shapes_and_dtype() -> None:
    for h, w in [(64, 64), (224, 224), (512, 512), (512, 768), (1024, 768)]:
        out = preprocess_images(torch.rand(2, 3, h, w) * 2 - 1)
        assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    assert preprocess_images(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        preprocess_images(torch.zeros(3, 64, 64))


def test_preprocess_constant_image_normalisation() -> None:
    for v in (-1.0, -0.3, 0.0, 0.5, 1.0):
        out = preprocess_images(torch.full((2, 3, 300, 500), v))
        expected = _norm(torch.full((1, 3, 1, 1), (v + 1) / 2))
        torch.testing.assert_close(out, expected.expand_as(out), atol=1e-5, rtol=0)
    # out-of-range decodes are clamped to [0, 1] like an 8-bit image would be
    torch.testing.assert_close(
        preprocess_images(torch.full((1, 3, 224, 224), 1.7)), _norm(torch.ones(1, 3, 224, 224))
    )
    # custom normalisation (e.g. from preprocessor_config.json)
    out = preprocess_images(torch.zeros(1, 3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(out, torch.zeros_like(out))


def test_preprocess_non_square_short_side_resize_and_centre_crop() -> None:
    # short side already 224: no resampling, exactly the centre 224 columns survive
    cols = torch.linspace(-1, 1, 448)
    img = cols.view(1, 1, 1, 448).expand(2, 3, 224, 448).clone()
    out = preprocess_images(img)
    expected = _norm(((cols[112:336] + 1) / 2).view(1, 1, 1, 224).expand(2, 3, 224, 224))
    torch.testing.assert_close(out, expected)
    # a tall 896 x 448 image: short side 448 -> 224 (bicubic, no antialias), long side 896 -> 448, centre rows
    g = torch.Generator().manual_seed(0)
    tall = torch.rand(1, 3, 896, 448, generator=g) * 2 - 1
    resized = F.interpolate(tall, size=(448, 224), mode="bicubic", align_corners=False)
    expected = _norm(((resized[..., 112:336, :] + 1) / 2).clamp(0, 1))
    torch.testing.assert_close(preprocess_images(tall), expected)
    # the content in the centre is what survives: a bright centre band stays, dark margins are cut
    band = torch.full((1, 3, 224, 672), -1.0)
    band[..., 224:448] = 1.0
    torch.testing.assert_close(preprocess_images(band), _norm(torch.ones(1, 3, 224, 224)))


def _reference_preference_preprocess(images: torch.Tensor, img_size: int = 224) -> torch.Tensor:
    """A transcription of the SPO reference's ``StepAwarePreferenceModel.get_preference_score`` up to the
    SPM call: resize the raw decode, centre-crop (torchvision's ``CenterCrop`` rounding) only when the
    resized image is not square, then map to [0, 1], clamp and normalise."""
    shortest = min(images.size(-2), images.size(-1))
    scale = img_size / shortest
    new_size = (int(images.size(-2) * scale + 0.5), int(images.size(-1) * scale + 0.5))
    images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False)
    if new_size[0] != new_size[1]:
        top = int(round((new_size[0] - img_size) / 2.0))
        left = int(round((new_size[1] - img_size) / 2.0))
        images = images[..., top : top + img_size, left : left + img_size]
    images = (images / 2 + 0.5).clamp(0, 1).float()
    return _norm(images)


@pytest.mark.parametrize("h, w", [(512, 512), (1024, 1024), (512, 768), (1024, 768)])
def test_preprocess_equals_the_reference_on_raw_decodes(h: int, w: int) -> None:
    images = natural_images(2, h, w, seed=h + w)
    assert (images.abs() > 1).float().mean() > 0.01  # values outside [-1, 1] are part of the check
    out = preprocess_images(images)
    expected = _reference_preference_preprocess(images)
    assert out.shape == expected.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if h == w:  # what it replaced (clamp first, antialiased resize) is far off here: the check can fail
        old = F.interpolate((images.clamp(-1, 1) + 1) / 2, size=(224, 224), mode="bicubic", antialias=True)
        assert (_norm(old.clamp(0, 1)) - expected).norm() / expected.norm() > 0.2


def test_load_image_normalization_reads_processor_config(clip_dir: Path, tmp_path: Path) -> None:
    mean, std = load_image_normalization(clip_dir)
    assert mean == pytest.approx(CLIP_MEAN) and std == pytest.approx(CLIP_STD)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert load_image_normalization(bare) == (CLIP_MEAN, CLIP_STD)
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    assert load_image_normalization(custom) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


# ---- tiny offline model ----------------------------------------------------------------------------------------


def test_build_tiny_clip_is_deterministic_and_loads_offline(clip_dir: Path, tmp_path: Path) -> None:
    assert {"config.json", "preprocessor_config.json", "tokenizer_config.json"} <= {
        p.name for p in clip_dir.iterdir()
    }
    again = build_tiny_clip(tmp_path / "again", seed=0)
    a = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).state_dict()
    b = CLIPModel.from_pretrained(str(again), local_files_only=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = CLIPModel.from_pretrained(str(again), local_files_only=True).config
    assert cfg.vision_config.image_size == 224 and cfg.text_config.vocab_size == len(
        load_clip_processor(again)
    )
    assert resolve_clip_dir(again) == again
