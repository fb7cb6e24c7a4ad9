"""Training the step-aware preference model: loss, data tagging, readers, and a `ray job submit` that learns.

The synthetic preference data: every image is a dark field with one bright square; the image whose square
is in the top half wins (a tie when both are on the same side). Location survives the tiny random VAE
(GroupNorm erases global colour and brightness, not layout), so it is visible in x0_hat at small t.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spo_ray.config import ConfigError
from spo_ray.spm_training.config import load_spm_config
from spo_ray.spm_training.data import (
    PreferenceDataError,
    bucket_of,
    epochs_to_read,
    inspect_preferences,
    read_and_tag,
    read_plan,
    tag_examples,
    unit_plan,
)
from spo_ray.spm_training.render import relabel_from_scores
from spo_ray.spm_training.trainer import preference_loss
from tests.conftest import submit_job

NOUNS = ["apple", "car", "house", "bird", "flower", "boat", "hat", "chair", "lamp", "kite", "cup", "door"]
EDGES = [0, 200, 400, 600, 800, 1000]


def patch_image(top: bool, g: np.random.Generator) -> bytes:
    x = np.full((64, 64, 3), g.uniform(0, 60)) + g.normal(0, 10, (64, 64, 3))
    s = int(g.integers(16, 28))
    r, c = int(g.integers(0, 32 - s)) + (0 if top else 32), int(g.integers(0, 64 - s))
    x[r : r + s, c : c + s] = g.uniform(180, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_pickapic(path: Path, n: int, seed: int, tie_every: int = 10) -> pd.DataFrame:
    """Pick-a-Pic layout: caption, jpg_0, jpg_1 (JPEG bytes), label_0 (1, 0, or 0.5 for a tie)."""
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        top0 = bool(g.integers(2))
        top1 = top0 if i % tie_every == 0 else not top0
        label_0 = 0.5 if top0 == top1 else float(top0)
        rows.append({"caption": f"a {NOUNS[g.integers(len(NOUNS))]}", "jpg_0": patch_image(top0, g),
                     "jpg_1": patch_image(top1, g), "label_0": label_0})
    df = pd.DataFrame(rows)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return df


@pytest.fixture(scope="module")
def unit_latent_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1.5 with its VAE scaling factor set for unit-variance latents (what SD's 0.18215 does for
    its trained VAE); at the tiny pipeline's own factor the latents are ~20x smaller than the noise."""
    from diffusers import AutoencoderKL

    from spo_ray.tiny import ensure_tiny_pipeline

    base = tmp_path_factory.mktemp("base") / "tiny-sd15-unit-latents"
    shutil.copytree(ensure_tiny_pipeline("sd15"), base)
    vae = AutoencoderKL.from_pretrained(base / "vae")
    g = np.random.default_rng(0)
    x = torch.stack([
        torch.from_numpy(np.asarray(Image.open(io.BytesIO(patch_image(bool(i % 2), g))), dtype=np.float32)).permute(2, 0, 1)
        for i in range(8)
    ]) / 127.5 - 1
    with torch.no_grad():
        std = float(vae.encode(x).latent_dist.mean.std())
    config = json.loads((base / "vae" / "config.json").read_text())
    config["scaling_factor"] = 1.0 / std
    (base / "vae" / "config.json").write_text(json.dumps(config))
    return base


# ----------------------------------------------------------------------------- fast unit tests


def test_preference_loss_on_hand_values_with_ties_and_weights():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0], [2.0, 0.0]])
    label_0 = torch.tensor([1.0, 0.5, 0.0, 0.5])
    weight = torch.tensor([1.0, 0.5, 0.5, 1.0])
    a = np.log1p(np.exp(-2.0))  # -log softmax of the logit 2 above its partner
    ce = [a, np.log(2.0), a, 0.5 * a + 0.5 * np.log1p(np.exp(2.0))]  # a tie is 0.5 / 0.5 cross-entropy
    expected = sum(w * c for w, c in zip(weight.tolist(), ce, strict=True)) / weight.sum().item()
    assert preference_loss(logits, label_0, weight).item() == pytest.approx(expected, rel=1e-6)
    # Weights are normalised over the batch: scaling them all changes nothing.
    assert preference_loss(logits, label_0, 3 * weight).item() == pytest.approx(expected, rel=1e-6)


def test_relabel_gap_rule_and_buckets():
    s0, s1 = torch.tensor([21.0, 20.0, 20.1, 18.0]), torch.tensor([20.0, 21.0, 20.0, 18.0])
    # softmax gaps: 0.46, 0.46, 0.05, 0 -> wins, wins, tie, tie
    assert relabel_from_scores(s0, s1, 0.1).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert bucket_of(np.array([0, 199, 200, 999]), EDGES).tolist() == [0, 0, 1, 4]


def test_tagging_weights_timesteps_and_ids_are_pure_functions(tmp_path: Path):
    df = write_pickapic(tmp_path / "p.parquet", 12, seed=3, tie_every=4)
    src = inspect_preferences(str(tmp_path / "p.parquet"), "auto", None)
    assert src.layout == "pickapic" and src.num_examples == 12 and src.num_ties == 3
    kw = dict(layout="pickapic", split="train", seed=7, prompt_counts=src.prompt_counts, eval_fraction=0.0,
              image_root=None, bucket_edges=EDGES, timesteps_per_bucket=2)
    out = tag_examples(df, epoch=0, **kw)
    counts = df["caption"].value_counts()
    assert out["weight"].tolist() == pytest.approx([1 / counts[c] for c in df["caption"]])
    assert out["label_0"].tolist() == df["label_0"].tolist()
    assert ((out["t"] >= 0) & (out["t"] < 1000)).all()
    # t and the id depend on (seed, epoch, example), not on the row order.
    shuffled = tag_examples(df.iloc[::-1], epoch=0, **kw).iloc[::-1].reset_index(drop=True)
    assert shuffled["t"].tolist() == out["t"].tolist()
    assert shuffled["example_id"].tolist() == out["example_id"].tolist()
    assert tag_examples(df, epoch=1, **kw)["t"].tolist() != out["t"].tolist()
    # A held-out pair becomes timesteps_per_bucket rows per bucket, t inside its bucket.
    ev = tag_examples(df, epoch=-1, **{**kw, "split": "eval"})
    assert len(ev) == 12 * 5 * 2
    assert np.bincount(bucket_of(ev["t"].to_numpy(), EDGES)).tolist() == [24] * 5
    # A split by prompt hash keeps every prompt on one side.
    tr = tag_examples(df, epoch=0, **{**kw, "eval_fraction": 0.5})
    ho = tag_examples(df, epoch=-1, **{**kw, "split": "eval", "eval_fraction": 0.5})
    assert set(tr["prompt"]).isdisjoint(ho["prompt"]) and set(tr["prompt"]) | set(ho["prompt"]) == set(df["caption"])


def test_read_plan_keeps_epochs_in_order_and_drops_consumed_rows(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = write_pickapic(tmp_path / "p.parquet", 40, seed=5)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "p.parquet", row_group_size=16)
    src = inspect_preferences(str(tmp_path / "p.parquet"), "auto", None)
    assert src.units == [(str(tmp_path / "p.parquet"), g) for g in range(3)]  # 16 + 16 + 8 rows
    items = unit_plan(src.units, [0, 1, 2], seed=3, shuffle=True)
    assert [i["epoch"] for i in items] == [0] * 3 + [1] * 3 + [2] * 3  # one epoch after another
    orders = [[i["row_group"] for i in items[e * 3:(e + 1) * 3]] for e in range(3)]
    assert all(sorted(o) == [0, 1, 2] for o in orders) and len({tuple(o) for o in orders}) > 1  # seeded per epoch
    assert unit_plan(src.units, [0, 1, 2], seed=3, shuffle=True) == items
    assert [i["row_group"] for i in unit_plan(src.units, [-1], seed=3, shuffle=False)] == [0, 1, 2]

    kw = dict(fmt="parquet", layout="pickapic", split="train", seed=3, prompt_counts=src.prompt_counts, eval_fraction=0.0,
              image_root=None, bucket_edges=EDGES, timesteps_per_bucket=1)
    rows = pd.concat(list(read_and_tag(pd.DataFrame(items), **kw)))
    assert rows["epoch"].tolist() == [0] * 40 + [1] * 40 + [2] * 40
    whole = tag_examples(df, epoch=1, **{k: v for k, v in kw.items() if k != "fmt"})
    assert sorted(rows[rows["epoch"] == 1]["t"]) == sorted(whole["t"])  # the same tags, read in units
    # A resume's consumed rows (sorted ids per epoch) are dropped before rendering.
    done = np.sort(rows[rows["epoch"] == 1]["example_id"].to_numpy()[:25])
    resumed = pd.concat(list(read_and_tag(pd.DataFrame(items), consumed={1: done}, **kw)))
    assert (resumed["epoch"] == 1).sum() == 15 and not set(done) & set(resumed[resumed["epoch"] == 1]["example_id"])
    # A resume reads only the epochs not trained on in full; after the last row of the last epoch, an
    # empty stream (that epoch again, every row dropped).
    ids = {e: np.sort(rows[rows["epoch"] == e]["example_id"].to_numpy()) for e in range(3)}
    assert epochs_to_read(3, {0: ids[0], 1: done}, 40) == [1, 2]
    assert epochs_to_read(3, ids, 40) == [2]
    last = unit_plan(src.units, epochs_to_read(3, ids, 40), seed=3, shuffle=True)
    assert sum(len(c) for c in read_and_tag(pd.DataFrame(last), consumed=ids, **kw)) == 0
    # The stream's plan: epochs 1 and 2 for that resume; one unit (not a whole epoch) after the last row.
    plan = dict(split="train", epochs=3, num_examples=40, seed=3)
    assert read_plan(src.units, consumed={0: ids[0], 1: done}, **plan) == unit_plan(src.units, [1, 2], seed=3, shuffle=True)
    empty = read_plan(src.units, consumed=ids, **plan)
    assert len(empty) == 1 and sum(len(c) for c in read_and_tag(pd.DataFrame(empty), consumed=ids, **kw)) == 0
    assert read_plan(src.units, consumed={}, **{**plan, "split": "eval"}) == unit_plan(src.units, [-1], seed=3, shuffle=False)


def test_plain_layout_and_reader_errors(tmp_path: Path):
    g = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(patch_image(True, g))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a cat", "image_0": "a.jpg", "image_1": "b.jpg", "label": 1},
        {"prompt": "a cat", "image_0": "b.jpg", "image_1": "a.jpg", "label": 0.5},
    ]))
    src = inspect_preferences(str(plain), "auto", None)
    assert src.layout == "plain" and src.prompt_counts == {"a cat": 2} and src.num_ties == 1
    rows = tag_examples(pd.read_json(plain, lines=True), layout="plain", split="train", epoch=0, seed=0,
                        prompt_counts=src.prompt_counts, eval_fraction=0.0, image_root=src.image_root,
                        bucket_edges=EDGES, timesteps_per_bucket=1)
    assert rows["label_0"].tolist() == [0.0, 0.5]  # plain "label" is the index of the preferred image
    assert rows["image_0"][0] == (tmp_path / "a.jpg").read_bytes() and rows["weight"].tolist() == [0.5, 0.5]

    def error(path: Path, layout: str = "auto") -> str:
        with pytest.raises(PreferenceDataError) as info:
            inspect_preferences(str(path), layout, None)
        return str(info.value)

    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "x", "image_0": "a.jpg", "image_1": "nope.jpg", "label": 0}))
    assert "not found" in error(tmp_path / "missing.jsonl") and "nope.jpg" in error(tmp_path / "missing.jsonl")
    (tmp_path / "cols.csv").write_text("prompt,image_0,label\nx,a.jpg,0\n")
    assert "missing column(s) image_1" in error(tmp_path / "cols.csv", "plain")
    (tmp_path / "other.csv").write_text("text,left,right,winner\nx,a.jpg,b.jpg,0\n")
    assert "cannot tell the layout" in error(tmp_path / "other.csv")
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""], "jpg_1": [b""], "label_0": [2.0]}), tmp_path / "bad.parquet")
    assert "label_0 outside [0, 1]" in error(tmp_path / "bad.parquet")
    assert "not found" in error(tmp_path / "absent.parquet")


def test_renderer_shares_noise_is_keyed_and_relabels(tmp_path: Path, unit_latent_base: Path):
    from spo_ray.scorers import ClipScorer
    from spo_ray.spm_training.render import X0Renderer, decode_image, render_x0_pairs, resize_straight

    df = write_pickapic(tmp_path / "p.parquet", 6, seed=5, tie_every=3)
    cfg = load_spm_config("spm-tiny", overrides=[
        f"data.train={tmp_path / 'p.parquet'}", f"model.pretrained={unit_latent_base}",
        "data.relabel.enabled=true", "data.relabel.clip_dir=tiny", "data.relabel.gap=0.05",
    ])
    rows = tag_examples(df, layout="pickapic", split="train", epoch=0, seed=1, prompt_counts={}, eval_fraction=0.0,
                        image_root=None, bucket_edges=EDGES, timesteps_per_bucket=1)
    batch = {c: rows[c].to_numpy() for c in rows.columns}
    renderer = X0Renderer(cfg.to_dict())
    out, again = renderer(batch), renderer({k: v[::-1] for k, v in batch.items()})
    assert out["pixels_0"].shape == (6, 3, 224, 224)
    np.testing.assert_array_equal(out["pixels_1"], again["pixels_1"][::-1])  # keyed by example, not by batch position
    fewer = renderer({k: v[:4] for k, v in batch.items()})  # a shorter batch (as a resume's): padded, so bit-identical
    assert all(np.array_equal(out[k][:4], fewer[k]) for k in ("pixels_0", "pixels_1", "label_0"))
    clean = [torch.stack([decode_image(b, 64) for b in df[c]]) for c in ("jpg_0", "jpg_1")]
    scorer = ClipScorer("tiny")
    s0, s1 = (scorer.score(resize_straight(c, 224), list(df["caption"]), torch.zeros(6)) for c in clean)
    assert out["label_0"].tolist() == relabel_from_scores(s0, s1, 0.05).tolist()
    # Both images of a pair see one t and one noise: identical images give identical x0_hat decodes.
    d0, d1 = render_x0_pairs(renderer.model, clean[0], clean[0], ["a cat"] * 6, torch.full((6,), 400), [(0, i) for i in range(6)], 5.0)
    torch.testing.assert_close(d0, d1)


def test_renderer_prepares_spm_inputs_as_the_reference_spm_training(tmp_path: Path, unit_latent_base: Path):
    """At 512 px (the resize to 224 shrinks, where antialiasing would matter) the renderer's pixels equal a
    transcription of the reference's SPM training: the x0_hat decode mapped to [0, 1] and clamped, a plain
    bicubic ``F.interpolate`` to 224 x 224 (no antialias), clamped again, normalised."""
    from spo_ray.spm_training.render import X0Renderer, decode_image, render_x0_pairs

    df = write_pickapic(tmp_path / "p.parquet", 2, seed=6)
    cfg = load_spm_config("spm-tiny", overrides=[
        f"data.train={tmp_path / 'p.parquet'}", f"model.pretrained={unit_latent_base}", "model.resolution=512",
        "ray.render_batch_size=2",  # the batch as rendered below: the same kernels, so within 1e-5
    ])
    rows = tag_examples(df, layout="pickapic", split="train", epoch=0, seed=1, prompt_counts={}, eval_fraction=0.0,
                        image_root=None, bucket_edges=EDGES, timesteps_per_bucket=1)
    batch = {c: rows[c].to_numpy() for c in rows.columns}
    renderer = X0Renderer(cfg.to_dict())
    out = renderer(batch)
    keys = [(cfg.train.seed, int(e), int(x), int(s))
            for e, x, s in zip(batch["epoch"], batch["example_id"], batch["slot"], strict=True)]
    pics = [torch.stack([decode_image(b, 512) for b in batch[c]]) for c in ("image_0", "image_1")]
    dec0, _ = render_x0_pairs(renderer.model, pics[0], pics[1], [str(p) for p in batch["prompt"]],
                              torch.as_tensor(batch["t"].astype(np.int64)), keys, cfg.model.guidance_scale)
    assert dec0.shape[-1] == 512
    img = F.interpolate((dec0 / 2 + 0.5).clamp(0, 1), size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (renderer.mean, renderer.std))
    np.testing.assert_allclose(out["pixels_0"], ((img - mean) / std).numpy(), atol=1e-5, rtol=0)


def _stream(n_rows: int, epochs: int, chunk: int, skip: dict[int, set[int]] | None = None):
    """Row chunks as the trainer's shard yields them: epochs in turn, rows of an epoch in a fixed order."""
    rows = [(e, 1000 + (i * 7919) % 997) for e in range(epochs) for i in range(n_rows)]
    rows = [r for r in rows if r[1] not in (skip or {}).get(r[0], set())]
    for lo in range(0, len(rows), chunk):
        part = rows[lo : lo + chunk]
        yield {"epoch": np.array([e for e, _ in part]), "example_id": np.array([x for _, x in part]),
               "value": np.array([float(e * 10_000 + x) for e, x in part])}


@pytest.mark.parametrize("buffer_rows", [0, 1, 16, 200])
def test_keyed_shuffle_resumes_exactly_without_the_rows_trained_on(buffer_rows: int):
    from spo_ray.spm_training.data import keyed_shuffle
    from spo_ray.spm_training.trainer import ConsumedRows, consumed_by_epoch

    full = list(keyed_shuffle(_stream(90, 2, 7), buffer_rows=buffer_rows, batch_size=8, seed=3))
    assert len(full) == (2 * 90) // 8  # the last partial batch is dropped
    order = np.concatenate([b["value"] for b in full])
    assert len(set(order.tolist())) == len(order)
    if buffer_rows >= 16:  # a real shuffle: not the stream order, and a pure function of the seed
        assert not np.array_equal(order, np.sort(order))
        again = list(keyed_shuffle(_stream(90, 2, 7), buffer_rows=buffer_rows, batch_size=8, seed=3))
        assert all(np.array_equal(a["value"], b["value"]) for a, b in zip(full, again, strict=True))
    for stop in (1, 5, 11, 19):  # interrupted after ``stop`` batches (mid-epoch, across epochs, in the drain)
        consumed = ConsumedRows()
        for batch in full[:stop]:
            consumed.add(batch)
        by_epoch = consumed_by_epoch([consumed.tensors()])
        skip = {e: set(ids.tolist()) for e, ids in by_epoch.items()}
        resumed = list(keyed_shuffle(_stream(90, 2, 5, skip), buffer_rows=buffer_rows, batch_size=8, seed=3))
        assert len(resumed) == len(full) - stop
        for a, b in zip(full[stop:], resumed, strict=True):
            assert np.array_equal(a["value"], b["value"]) and np.array_equal(a["example_id"], b["example_id"])


def test_resume_point_reads_consumed_rows_and_refuses_what_cannot_be_exact(tmp_path: Path):
    import yaml

    from spo_ray.checkpointing import RunProgress, save_checkpoint
    from spo_ray.spm_training.driver import _resume_point

    overrides = ["data.train=x.parquet", f"run.output_dir={tmp_path}"]
    cfg = load_spm_config("spm-tiny", overrides=overrides)
    assert _resume_point(cfg) == (None, {})  # a fresh run
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    shards = [{"epoch": torch.tensor([0, 0, 1]), "example_id": torch.tensor([9, 4, 7])},
              {"epoch": torch.tensor([0]), "example_id": torch.tensor([2])}]
    barrier = threading.Barrier(2)

    def write(rank: int) -> None:  # two ranks' shares, written as two trainer ranks write them
        save_checkpoint(cfg.run_dir, RunProgress(position=12, extra={"spm": {"step": 12}}), weights={f"w{rank}": torch.ones(2)},
                        optimizer={}, rank=rank, world=2, extra=shards[rank], barrier=barrier.wait)

    threads = [threading.Thread(target=write, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (cfg.run_dir / "checkpoints" / ".tmp-round-0000020").mkdir()  # a crash's leftover
    path, consumed = _resume_point(cfg)
    assert path.name == "round-0000012" and not (cfg.run_dir / "checkpoints" / ".tmp-round-0000020").exists()
    assert {e: v.tolist() for e, v in consumed.items()} == {0: [2, 4, 9], 1: [7]}
    from spo_ray.preflight import InputError  # a user error: the entry point prints it without a traceback

    with pytest.raises(InputError, match="run.resume=never but .* already holds checkpoints"):
        _resume_point(load_spm_config("spm-tiny", overrides=[*overrides, "run.resume=never"]))
    with pytest.raises(InputError, match="train.seed: 42 -> 7; train.shuffle_buffer: 64 -> 0"):
        _resume_point(load_spm_config("spm-tiny", overrides=[*overrides, "train.seed=7", "train.shuffle_buffer=0"]))
    _resume_point(load_spm_config("spm-tiny", overrides=[*overrides, "train.learning_rate=1e-3"]))  # lr may change


def test_a_diverged_spm_run_stops_without_final_weights_and_names_its_checkpoint(tmp_path: Path):
    """The trainer's early stop (train.max_nonfinite_steps skipped steps in a row): no evaluation, no
    final weights; its summary says why and which checkpoint stands; its MLflow run ends FAILED."""
    from mlflow.tracking import MlflowClient

    from spo_ray.checkpointing import RunProgress, save_checkpoint
    from spo_ray.learner import NonFiniteError, check_nonfinite_streak
    from spo_ray.spm_training.trainer import _start_tracking, _stopped_early

    cfg = load_spm_config("spm-tiny", overrides=[f"data.train={tmp_path / 'p.parquet'}", f"run.output_dir={tmp_path}",
                                                 "train.max_nonfinite_steps=3"])
    check_nonfinite_streak(2, cfg.train.max_nonfinite_steps)  # two in a row: go on
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row .*\(train.max_nonfinite_steps=3\)") as err:
        check_nonfinite_streak(3, cfg.train.max_nonfinite_steps)
    cfg.run_dir.mkdir(parents=True)
    ckpt = save_checkpoint(cfg.run_dir, RunProgress(position=40), weights={"w": torch.zeros(2)}, optimizer={})
    tracker = _start_tracking(cfg, None)
    _stopped_early(str(err.value), step=43, skipped=3, rows=344, world=1, run_dir=cfg.run_dir, tracker=tracker,
                   device=torch.device("cpu"))
    summary = json.loads((cfg.run_dir / "trainer_summary.json").read_text())
    assert summary["stopped_by"].endswith(f"the latest checkpoint stands: {ckpt}") and "max_nonfinite_steps=3" in summary["stopped_by"]
    assert (summary["optimizer_steps"], summary["skipped_steps_this_attempt"], summary["train_rows"]) == (43, 3, 344)
    assert not (cfg.run_dir / "final").exists() and "accuracy_by_bucket" not in summary
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run.info.status == "FAILED"


def test_config_errors_before_anything_runs():
    with pytest.raises(ConfigError, match="did you mean 'train.learning_rate'"):
        load_spm_config("spm-tiny", overrides=["train.learning_rat=1e-3", "data.train=x.parquet"])
    with pytest.raises(ConfigError) as info:
        load_spm_config("spm-tiny", overrides=["train.epochs=0", "eval.bucket_edges=[0, 500]", "ray.zero_stage=3",
                                               "train.max_nonfinite_steps=0"])
    for key in ("data.train", "train.epochs", "eval.bucket_edges", "ray.zero_stage", "train.max_nonfinite_steps"):
        assert key in str(info.value)
    cfg = load_spm_config("spm-sd15")
    assert (cfg.train.learning_rate, cfg.train.adam_weight_decay, cfg.train.lr_warmup_steps) == (3e-6, 0.3, 500)
    assert cfg.ray.zero_stage == 2 and not cfg.data.relabel.enabled
    xl = load_spm_config("spm-sdxl")
    assert xl.train.learning_rate == 1e-6 and xl.data.relabel.enabled and xl.data.relabel.gap == 0.1


# ----------------------------------------------------------------------------- the Ray job


def summary_cfg_lr(out: Path) -> float:
    import yaml

    return yaml.safe_load((out / "spm-tiny" / "config.yaml").read_text())["train"]["learning_rate"]


@pytest.mark.slow
@pytest.mark.extended
def test_train_spm_job_learns_small_t_and_saves_for_the_spo_scorer(ray_cluster, tmp_path, unit_latent_base):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_pickapic(data / "train.parquet", 256, seed=0)
    held = write_pickapic(data / "eval.parquet", 48, seed=1, tie_every=12)
    proc = submit_job(
        ray_cluster, "jobs/train_spm.py", "--preset", "spm-tiny", f"data.train={data / 'train.parquet'}",
        f"data.eval={data / 'eval.parquet'}", f"model.pretrained={unit_latent_base}", f"run.output_dir={out}",
        "run.checkpoint_every=40", "run.keep_checkpoints=3", timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "spo_ray.spm_training.trainer: step 10 |" in proc.stdout, proc.stdout[-6000:]
    assert "eval t   0-199: accuracy" in proc.stdout, proc.stdout[-6000:]
    summary = json.loads((out / "spm-tiny" / "summary.json").read_text())
    acc, before = summary["accuracy_by_bucket"], summary["initial_accuracy_by_bucket"]
    print("\n".join(line for line in proc.stdout.splitlines() if "spm_training.trainer:" in line))
    assert list(acc) == ["0-199", "200-399", "400-599", "600-799", "800-999"]
    ties = int((held["label_0"] == 0.5).sum())
    assert all(b["pairs_counted"] == 48 - ties and b["ties"] == ties for b in summary["eval_buckets"])
    assert summary["train_rows"] == 3 * 256 and summary["optimizer_steps"] == 3 * 256 // 8
    assert summary["skipped_steps_this_attempt"] == 0  # a non-finite step would be counted and logged
    assert acc["0-199"] >= 0.75 and before["0-199"] <= 0.65, (acc, before)

    # MLflow, as the SPO engines log: one store per output dir, per-step training metrics, the
    # held-out accuracy per bucket at the last step, the SPM files.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["spo_ray.kind"] == "spm-training"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(10, summary["optimizer_steps"] + 1, 10))
    for bucket, value in acc.items():
        assert run.data.metrics[f"eval/accuracy/{bucket}"] == pytest.approx(value)
    assert run.data.params["train.learning_rate"] == str(summary_cfg_lr(out))
    files = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert {"final/step-aware_preference_model.bin", "final/step-aware_preference_model.safetensors"} <= files

    # The result loads through the SPO job's scorer path, in both formats, with the released keys.
    from safetensors.torch import load_file

    from spo_ray.components import build_pool_scorer, load_model
    from spo_ray.config import load_config
    from spo_ray.spm import StepAwarePreferenceModel

    released = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert set(released) == set(StepAwarePreferenceModel.from_pretrained("tiny").state_dict())
    assert all(k.startswith("model.") for k in released)
    st = load_file(summary["checkpoint_safetensors"])
    assert st.keys() == released.keys() and all(torch.equal(st[k], released[k]) for k in st)
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    scores = []
    for path in (summary["checkpoint"], summary["checkpoint_safetensors"]):
        cfg = load_config("tiny-sd15", overrides=["scorer.type=spm", "scorer.clip_dir=tiny", "scorer.kwargs={}", f"scorer.checkpoint={path}"])
        scorer = build_pool_scorer(cfg, load_model(cfg, torch.device("cpu"), ("vae",)), torch.device("cpu")).scorer
        scores.append(scorer.score(images, ["a cat"] * 4, torch.tensor([0, 100, 500, 900])))
    assert torch.isfinite(scores[0]).all() and torch.equal(scores[0], scores[1])

    # Resume: a run that stopped after its step-80 checkpoint (mid epoch 3, with rows in the shuffle
    # buffer; epochs 1 and 2 done, so not read again) continues from there and ends bit-identical to
    # the uninterrupted run.
    checkpoints = sorted(p.name for p in (out / "spm-tiny" / "checkpoints").iterdir())
    assert checkpoints == ["round-0000040", "round-0000080"], checkpoints
    again = tmp_path / "again"
    shutil.copytree(out / "spm-tiny" / "checkpoints" / "round-0000080", again / "spm-tiny" / "checkpoints" / "round-0000080")
    shutil.copy(out / "mlflow.db", again / "mlflow.db")  # the store as it was: the MLflow run goes on
    proc = submit_job(  # without the held-out pairs (read only after training, so a resume may drop them)
        ray_cluster, "jobs/train_spm.py", "--preset", "spm-tiny", f"data.train={data / 'train.parquet'}",
        f"model.pretrained={unit_latent_base}", f"run.output_dir={again}", "run.checkpoint_every=40", timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "resuming from" in proc.stdout and "640 rows already trained on are skipped" in proc.stdout, proc.stdout[-6000:]
    resumed = json.loads((again / "spm-tiny" / "summary.json").read_text())
    assert resumed["optimizer_steps"] == summary["optimizer_steps"] and resumed["train_rows"] == summary["train_rows"]
    first, second = load_file(summary["checkpoint_safetensors"]), load_file(resumed["checkpoint_safetensors"])
    assert all(torch.equal(first[k], second[k]) for k in first), [k for k in first if not torch.equal(first[k], second[k])][:5]
    steps = [json.loads(line)["step"] for line in (again / "spm-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [90]
    client = MlflowClient(tracking_uri=f"sqlite:///{again / 'mlflow.db'}")
    assert resumed["mlflow_run_id"] == summary["mlflow_run_id"]  # the checkpoint's run, continued
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")  # step 90 was logged before: not twice
    assert sorted(m.step for m in losses) == list(range(10, summary["optimizer_steps"] + 1, 10))


@pytest.mark.slow
@pytest.mark.extended
def test_a_diverging_spm_job_stops_with_exit_status_3(ray_cluster, tmp_path, unit_latent_base):
    """A learning rate that sends the weights to ~1e30 after the first step: every later gradient
    is non-finite, DeepSpeed skips the updates, and after train.max_nonfinite_steps of them in a
    row the job stops: exit status 3 (the job FAILED), no evaluation, no final weights, the
    summary names the checkpoint that stands, the MLflow run FAILED."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_pickapic(data / "train.parquet", 64, seed=0)
    proc = submit_job(
        ray_cluster, "jobs/train_spm.py", "--preset", "spm-tiny", f"data.train={data / 'train.parquet'}",
        f"model.pretrained={unit_latent_base}", f"run.output_dir={out}", "train.learning_rate=1e30",
        "train.lr_warmup_steps=0", "train.max_nonfinite_steps=2", "run.checkpoint_every=1", timeout=400,
    )
    assert proc.returncode != 0 and "exit code 3" in proc.stdout + proc.stderr, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "non-finite gradient, update skipped" in proc.stdout, proc.stdout[-6000:]
    assert "spo-ray: stopped:" in proc.stdout + proc.stderr and "max_nonfinite_steps=2" in proc.stdout, proc.stdout[-6000:]
    run_dir = out / "spm-tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    # step 1 applied (the weights blow up), steps 2 and 3 skipped: the stop at step 3, no checkpoint there
    assert summary["skipped_steps_this_attempt"] == 2 and summary["optimizer_steps"] == 3, summary
    assert summary["stopped_by"].endswith(f"the latest checkpoint stands: {run_dir / 'checkpoints' / 'round-0000002'}")
    assert not (run_dir / "final").exists() and "accuracy_by_bucket" not in summary
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run.info.status == "FAILED"
