"""Candidate-pool sampling (DESIGN.md section 1): segments, the shared x_t of a pool, the
continuation from a random candidate, the scored x0_hat, and randomness keyed by ids only.

The expected values are recomputed independently: a fresh CFG forward of the tiny UNet and the
DDIM formulas of ``diffusion.py`` with the noise drawn from ``rng`` under the documented keys.
"""

from __future__ import annotations

import pytest
import torch

from spo_ray import rng
from spo_ray.components import load_model
from spo_ray.config import load_config
from spo_ray.diffusion import ddim_mean_std, predict_x0
from spo_ray.models import Conditioning
from spo_ray.sampling import CandidatePoolSampler, Segment, plan_segments

SEED = 42
PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff"]
IDS = [3, 7]


# ----------------------------------------------------------------------------- plan_segments


def test_plan_segments_sd15_preset() -> None:
    s = load_config("sd15").sampling
    segments = plan_segments(s.num_steps, s.divert_start_step, s.num_inner_steps)
    assert segments == [Segment(start, 1) for start in range(4, 20)]
    assert len(segments) == 16


def test_plan_segments_sdxl_preset() -> None:
    s = load_config("sdxl").sampling
    segments = plan_segments(s.num_steps, s.divert_start_step, s.num_inner_steps)
    assert [seg.start_step for seg in segments] == [4, 8, 12, 16]
    assert [seg.num_transitions for seg in segments] == [4, 4, 4, 4]


def test_plan_segments_short_last_segment() -> None:
    segments = plan_segments(20, 5, 3)
    assert [(seg.start_step, seg.num_transitions) for seg in segments] == [(5, 4), (9, 4), (13, 4), (17, 3)]
    # every step from divert_start_step on belongs to exactly one segment
    covered = [seg.start_step + n for seg in segments for n in range(seg.num_transitions)]
    assert covered == list(range(5, 20))


def test_plan_segments_folds_a_lone_last_step_with_inner_steps() -> None:
    # (20 - 4) % 3 == 1: the reference does not branch at the last step; it joins the segment before
    segments = plan_segments(20, 4, 2)
    assert [(seg.start_step, seg.num_transitions) for seg in segments] == [(4, 3), (7, 3), (10, 3), (13, 3), (16, 4)]
    # without inner steps every step branches, the last one included (the reference's SD1.5 loop)
    assert plan_segments(6, 4, 0) == [Segment(4, 1), Segment(5, 1)]


def _reference_plan(num_steps: int, divert: int, inner: int) -> list[tuple[list[int], int | None]]:
    """A transcription of the reference's sampling loops: each segment's transition step indices and the
    step index whose x0_hat is scored (None: the finished image, t = 0).

    Inner steps (multi_sample_pipeline_sdxl.py): a step branches or scores when ``i >= divert`` and no
    inner step is left, or at the last step; the last step never branches (unless it is ``divert``): its
    transition joins the current segment, whatever its length, and the finished images are scored.
    No inner steps (multi_sample_pipeline.py): every step from ``divert`` on scores the previous
    segment at its own t and branches, the last one too; then the finished images are scored.
    """
    segments: list[tuple[list[int], int | None]] = []
    current: list[int] = []
    if inner == 0:
        for i in range(divert, num_steps):
            if i > divert:
                segments.append((current, i))
            current = [i]
        segments.append((current, None))
        return segments
    inner_left = 0
    for i in range(num_steps):
        if (i >= divert and inner_left == 0) or i == num_steps - 1:
            inner_left = inner
            if i == divert:
                current = [i]
            elif i > divert and i != num_steps - 1:
                segments.append((current, i))
                current = [i]
            else:
                current.append(i)
                segments.append((current, None))
        elif i >= divert:
            inner_left -= 1
            current.append(i)
    return segments


def test_plan_segments_match_the_reference_loops() -> None:
    checked = folded = 0
    for num_steps in range(2, 14):
        for divert in range(num_steps):
            for inner in range(5):
                plan = plan_segments(num_steps, divert, inner)
                ours = [
                    (list(range(seg.start_step, seg.start_step + seg.num_transitions)),
                     seg.start_step + seg.num_transitions if seg.start_step + seg.num_transitions < num_steps else None)
                    for seg in plan
                ]
                if inner > 0 and divert == num_steps - 1:
                    # The reference branches at its last step and scores nothing (its torch.cat of no
                    # pairs then fails): here that lone step is one segment scored at t = 0.
                    assert ours == [([divert], None)]
                    continue
                assert ours == _reference_plan(num_steps, divert, inner), (num_steps, divert, inner)
                checked += 1
                folded += any(seg.num_transitions == inner + 2 for seg in plan) and inner > 0
    assert checked > 300 and folded > 30


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sd15():
    cfg = load_config("tiny-sd15")
    return cfg, load_model(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def sdxl():
    cfg = load_config("tiny-sdxl")
    return cfg, load_model(cfg, torch.device("cpu"))


def _eps(model, cfg, x: torch.Tensor, timestep: int, prompts: list[str]) -> torch.Tensor:
    """A fresh CFG noise prediction for x (one row per prompt, or k rows per prompt, k-major)."""
    cond = model.encode_prompts(prompts)
    reps = x.shape[0] // len(prompts)
    cond = Conditioning.cat([cond] * reps)
    neg = model.negative_conditioning(x.shape[0])
    with torch.no_grad():
        return model.guided_noise_pred(model.unet, x, timestep, cond, neg, cfg.sampling.guidance_scale)


def _keyed_noise(shape, epoch: int, ids: list[int], step: int, j: int) -> torch.Tensor:
    return torch.stack([rng.randn(tuple(shape), "noise", SEED, epoch, pid, step, j) for pid in ids])


def _check_transition(model, cfg, x_in, out, timestep, step, j, ids, epoch, prompts, atol=1e-5):
    eps = _eps(model, cfg, x_in, timestep, prompts)
    mean, std, _ = ddim_mean_std(model.scheduler, eps, timestep, x_in, eta=cfg.sampling.eta)
    z = _keyed_noise(x_in.shape[1:], epoch, ids, step, j)
    expected = mean + std * z
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-4)
    # the noise really matters: another candidate's noise would not fit
    other = mean + std * _keyed_noise(x_in.shape[1:], epoch, ids, step, j + 1)
    assert (out - other).abs().max() > 100 * atol


# ----------------------------------------------------------------------------- SD1.5-shaped


def test_record_shapes_sd15(sd15) -> None:
    cfg, model = sd15
    sampler = CandidatePoolSampler(model, cfg.sampling, SEED)
    rec = sampler.sample(PROMPTS, IDS, epoch=0, round_index=5, policy_version=2)
    B, S, k, M = 2, 16, 4, 1
    C, H, W = model.latent_shape
    assert rec["x_t"].shape == (B, S, C, H, W)
    assert rec["chains"].shape == (B, S, k, M, C, H, W)
    assert rec["x0_hat"].shape == (B, S, k, C, H, W)
    assert rec["seg_timesteps"].shape == (B, S, M)
    assert rec["score_t"].shape == (B, S)
    assert rec["choice"].shape == (B, S)
    assert rec["final"].shape == (B, C, H, W)
    assert rec["seg_start"].tolist() == [list(range(4, 20))] * B
    assert rec["seg_len"].tolist() == [[1] * S] * B
    assert rec["prompt_id"].tolist() == IDS
    assert rec["round"].tolist() == [5, 5] and rec["policy_version"].tolist() == [2, 2]
    assert rec["cond_prompt_embeds"].shape[0] == B
    assert ((rec["choice"] >= 0) & (rec["choice"] < k)).all()
    timesteps = [int(t) for t in model.scheduler.timesteps]
    assert timesteps[0] == 951 and timesteps[-1] == 1
    assert rec["seg_timesteps"][0, :, 0].tolist() == timesteps[4:]
    # pools are real pools: the k candidates differ
    assert (rec["chains"][:, :, 0] - rec["chains"][:, :, 1]).abs().amax(dim=(-1, -2, -3, -4)).min() > 1e-3


def test_pool_shares_x_t_and_one_noise_prediction_sd15(sd15) -> None:
    cfg, model = sd15
    sampler = CandidatePoolSampler(model, cfg.sampling, SEED)
    epoch = 1
    rec = sampler.sample(PROMPTS, IDS, epoch=epoch, round_index=0, policy_version=0)
    timesteps = [int(t) for t in model.scheduler.timesteps]
    for s in (0, 7, 15):
        step = 4 + s
        x_t = rec["x_t"][:, s]
        for j in range(cfg.sampling.pool_size):
            _check_transition(
                model, cfg, x_t, rec["chains"][:, s, j, 0], timesteps[step], step, j, IDS, epoch, PROMPTS
            )


def test_continuation_and_scored_x0_sd15(sd15) -> None:
    cfg, model = sd15
    sampler = CandidatePoolSampler(model, cfg.sampling, SEED)
    rec = sampler.sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
    timesteps = [int(t) for t in model.scheduler.timesteps]
    chains, choice, x_t, x0_hat = rec["chains"], rec["choice"], rec["x_t"], rec["x0_hat"]
    B, S, k = chains.shape[:3]
    for b in range(B):
        for s in range(S - 1):
            chosen_end = chains[b, s, choice[b, s], 0]
            assert torch.equal(x_t[b, s + 1], chosen_end)
        assert torch.equal(rec["final"][b], chains[b, S - 1, choice[b, S - 1], 0])
    # the choice is uniform over candidates, not always the same index
    assert len(set(choice.flatten().tolist())) > 1
    # last segment: the finished image, scored at t = 0
    assert rec["score_t"][:, S - 1].tolist() == [0] * B
    assert torch.equal(x0_hat[:, S - 1], chains[:, S - 1, :, 0])
    # other segments: scored at the next timestep, x0_hat = predict_x0 of the end state there
    assert rec["score_t"][0, : S - 1].tolist() == timesteps[5:]
    for s in (0, 9, S - 2):
        t_next = timesteps[4 + s + 1]
        ends = chains[:, s].transpose(0, 1).reshape(k * B, *chains.shape[-3:])  # k-major rows
        eps = _eps(model, cfg, ends, t_next, PROMPTS)
        expected = predict_x0(model.scheduler, eps, t_next, ends).view(k, B, *ends.shape[1:]).transpose(0, 1)
        torch.testing.assert_close(x0_hat[:, s], expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(x0_hat[:, s], chains[:, s, :, 0], atol=1e-2)


def test_randomness_is_a_function_of_ids(sd15) -> None:
    cfg, model = sd15
    sampler = CandidatePoolSampler(model, cfg.sampling, SEED)
    both = sampler.sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
    alone = sampler.sample(PROMPTS[1:], IDS[1:], epoch=0, round_index=3, policy_version=1)
    for key in ("x_t", "chains", "x0_hat", "final"):
        torch.testing.assert_close(both[key][1], alone[key][0], atol=1e-4, rtol=1e-4, msg=key)
    assert torch.equal(both["choice"][1], alone["choice"][0])

    again = sampler.sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
    for key in ("x_t", "chains", "x0_hat", "final", "choice"):
        assert torch.equal(both[key], again[key]), key

    other_epoch = sampler.sample(PROMPTS, IDS, epoch=1, round_index=0, policy_version=0)
    assert (other_epoch["final"] - both["final"]).abs().max() > 1e-2
    assert (other_epoch["x_t"][:, 0] - both["x_t"][:, 0]).abs().max() > 1e-2

    # the same prompt text under another id is another trajectory
    swapped = sampler.sample(PROMPTS[1:], [8], epoch=0, round_index=0, policy_version=0)
    assert (swapped["final"][0] - alone["final"][0]).abs().max() > 1e-2


def test_short_last_segment(sd15) -> None:
    cfg = load_config("tiny-sd15", overrides=["sampling.divert_start_step=5", "sampling.num_inner_steps=3",
                                              "sampling.pool_size=2"])
    _, model = sd15
    sampler = CandidatePoolSampler(model, cfg.sampling, SEED)
    rec = sampler.sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
    assert rec["chains"].shape[1:4] == (4, 2, 4)
    assert rec["seg_len"][0].tolist() == [4, 4, 4, 3]
    assert rec["seg_start"][0].tolist() == [5, 9, 13, 17]
    timesteps = [int(t) for t in model.scheduler.timesteps]
    assert rec["seg_timesteps"][0, 3].tolist() == timesteps[17:20] + [0]
    # the unused slot stays empty; the finished image is the 3rd transition's output
    assert torch.count_nonzero(rec["chains"][:, 3, :, 3]) == 0
    assert torch.equal(rec["x0_hat"][:, 3], rec["chains"][:, 3, :, 2])
    assert rec["score_t"][0].tolist() == [timesteps[9], timesteps[13], timesteps[17], 0]
    b_choice = rec["choice"][:, 3]
    for b in range(2):
        assert torch.equal(rec["final"][b], rec["chains"][b, 3, b_choice[b], 2])


def test_folded_last_segment_downstream(sd15) -> None:
    """A segment of 2 + num_inner_steps transitions: records padded to it, chains that follow DDIM to the
    finished image, pairs of its length, one training row per transition, and the forward count."""
    from spo_ray import bench
    from spo_ray.scorers import BrightnessScorer
    from spo_ray.scoring import PoolScorer
    from spo_ray.training import expand_transitions

    cfg = load_config("tiny-sd15", overrides=["sampling.num_steps=6", "sampling.divert_start_step=1",
                                              "sampling.num_inner_steps=1", "sampling.pool_size=2"])
    _, model = sd15
    original, model.scheduler = model.scheduler, model.make_scheduler(6)
    try:
        sampler = CandidatePoolSampler(model, cfg.sampling, SEED)
        rec = sampler.sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
        timesteps = [int(t) for t in model.scheduler.timesteps]
        # the folded segment's later transitions continue each candidate's chain with plain DDIM steps
        for n in (1, 2):
            for j in range(2):
                _check_transition(model, cfg, rec["chains"][:, 1, j, n - 1], rec["chains"][:, 1, j, n],
                                  timesteps[3 + n], 3 + n, j, IDS, 0, PROMPTS)
    finally:
        model.scheduler = original
    assert rec["seg_start"][0].tolist() == [1, 3] and rec["seg_len"][0].tolist() == [2, 3]
    assert rec["chains"].shape[1:4] == (2, 2, 3)
    assert rec["seg_timesteps"][0].tolist() == [timesteps[1:3] + [0], timesteps[3:6]]
    assert rec["score_t"][0].tolist() == [timesteps[3], 0]
    assert torch.count_nonzero(rec["chains"][:, 0, :, 2]) == 0  # padding of the shorter segment
    assert torch.equal(rec["x0_hat"][:, 1], rec["chains"][:, 1, :, 2])  # the finished image after 3 transitions
    for b in range(2):
        assert torch.equal(rec["final"][b], rec["chains"][b, 1, rec["choice"][b, 1], 2])
    # 1 plain step + the first x_t's forward, 2 x (1 inner + 1 scored) for (1, 2), 2 x 2 inner for (3, 3)
    assert sampler.unet_forwards == len(PROMPTS) * bench.guided_forwards_per_prompt(6, 1, 2, 1) == 2 * 10

    pairs, _ = PoolScorer(model.decode, BrightnessScorer(scale=5000.0), threshold=0.0)(rec)
    assert pairs["win"].shape[1] == 3 and sorted(pairs["seg_len"].tolist()) == [2, 2, 3, 3]
    rows = expand_transitions(pairs)
    assert len(rows["pair_id"]) == 10 and rows["shared"].sum() == 4
    last = pairs["seg_len"] == 3
    assert rows["timestep"][rows["pair_id"] == pairs["pair_id"][last][0]].tolist() == timesteps[3:6]


# ----------------------------------------------------------------------------- SDXL-shaped


def test_sdxl_chains_follow_ddim_steps(sdxl) -> None:
    cfg, model = sdxl
    sampler = CandidatePoolSampler(model, cfg.sampling, SEED)
    epoch = 0
    rec = sampler.sample(PROMPTS, IDS, epoch=epoch, round_index=0, policy_version=0)
    B, S, k, M = 2, 4, 2, 4
    assert rec["chains"].shape[:4] == (B, S, k, M)
    assert rec["seg_len"][0].tolist() == [4, 4, 4, 4]
    assert rec["cond_pooled_embeds"].shape[0] == B and rec["cond_time_ids"].shape == (B, 6)
    timesteps = [int(t) for t in model.scheduler.timesteps]
    assert rec["seg_timesteps"][0, 1].tolist() == timesteps[8:12]
    chains = rec["chains"]

    # first transition of a segment: from the shared x_t
    for j in range(k):
        _check_transition(model, cfg, rec["x_t"][:, 1], chains[:, 1, j, 0], timesteps[8], 8, j, IDS, epoch, PROMPTS)
    # inner transitions: from the previous state of the same candidate's chain
    for s, n in ((1, 2), (2, 1), (3, 3)):
        step = 4 + 4 * s + n
        for j in range(k):
            _check_transition(
                model, cfg, chains[:, s, j, n - 1], chains[:, s, j, n], timesteps[step], step, j, IDS, epoch, PROMPTS
            )
    # continuation from the chosen chain's END state, scored at the next segment's timestep
    for b in range(B):
        for s in range(S - 1):
            assert torch.equal(rec["x_t"][b, s + 1], chains[b, s, rec["choice"][b, s], M - 1])
    assert rec["score_t"][0].tolist() == [timesteps[8], timesteps[12], timesteps[16], 0]
    assert torch.equal(rec["x0_hat"][:, S - 1], chains[:, S - 1, :, M - 1])


# ----------------------------------------------------------------------------- scoring input


class _RecordingScorer:
    """A real (if trivial) scorer that keeps what it was given: the images and timesteps."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        self.images.append(images.clone())
        return images.mean(dim=(1, 2, 3)) * 100


def test_pool_scorer_scores_the_raw_decode(sd15) -> None:
    """The SPM gets the VAE decode before any clamp (the reference resizes it, then clamps)."""
    from spo_ray.scoring import PoolScorer

    cfg, model = sd15
    rec = CandidatePoolSampler(model, cfg.sampling, SEED).sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
    recorder = _RecordingScorer()
    PoolScorer(model.decode, recorder, threshold=0.3, max_batch=1000)(rec)
    seen = torch.cat(recorder.images)
    x0 = rec["x0_hat"].reshape(-1, *rec["x0_hat"].shape[3:])
    torch.testing.assert_close(seen, model.decode(x0, clamp=False))
    assert seen.abs().max() > 1.0  # the tiny VAE overshoots: a clamped decode would differ


# ----------------------------------------------------------------------------- trajectory precision


@pytest.fixture(scope="module")
def sd15_bf16():
    cfg = load_config("tiny-sd15", overrides=["model.dtype=bf16", "sampling.num_steps=6", "sampling.divert_start_step=2"])
    return cfg, load_model(cfg, torch.device("cpu"))


def test_trajectory_is_float32_under_a_bf16_model(sd15_bf16) -> None:
    """x_t and the chains enter the log-prob: stored in float32, so (x_{t-1} - mu) / sigma recovers the
    drawn noise even at the last step (sigma ~0.02), where bf16 rounding would move it by several percent."""
    cfg, model = sd15_bf16
    assert model.dtype == torch.bfloat16
    rec = CandidatePoolSampler(model, cfg.sampling, SEED).sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
    assert rec["x_t"].dtype == rec["chains"].dtype == rec["final"].dtype == torch.float32
    assert rec["x0_hat"].dtype == rec["cond_prompt_embeds"].dtype == torch.bfloat16  # decoded / conditioning only
    timesteps = [int(t) for t in model.scheduler.timesteps]
    B, S, k = rec["chains"].shape[:3]
    # The last segment branches from the chosen end of the one before: redo that segment's k*B forward.
    prev = rec["chains"][:, S - 2, :, 0].transpose(0, 1).reshape(k * B, *model.latent_shape)
    eps = _eps(model, cfg, prev, timesteps[-1], PROMPTS)
    rows = rec["choice"][:, S - 2] * B + torch.arange(B)
    x_t = rec["x_t"][:, S - 1]
    assert torch.equal(x_t, prev[rows])
    mean, std, _ = ddim_mean_std(model.scheduler, eps[rows], timesteps[-1], x_t, eta=cfg.sampling.eta)
    assert 0.015 < float(std.flatten()[0]) < 0.03
    for j in range(k):
        z = _keyed_noise(x_t.shape[1:], 0, IDS, S - 1 + cfg.sampling.divert_start_step, j)
        out = rec["chains"][:, S - 1, j, 0]
        torch.testing.assert_close((out - mean) / std, z, atol=2e-3, rtol=0)
        rounded = (out.to(torch.bfloat16).float() - mean) / std
        assert (rounded - z).abs().max() > 2e-2  # what a bf16 trajectory would have stored


def test_tensor_minimum_bytes_count_latents_in_float32(sd15_bf16) -> None:
    from spo_ray import records, telemetry
    from spo_ray.scorers import BrightnessScorer
    from spo_ray.scoring import PoolScorer

    cfg, model = sd15_bf16
    rec = CandidatePoolSampler(model, cfg.sampling, SEED).sample(PROMPTS, IDS, epoch=0, round_index=0, policy_version=0)
    B, S, k, M = rec["chains"].shape[:4]
    chw = int(torch.tensor(model.latent_shape).prod())
    cond = rec["cond_prompt_embeds"].numel()
    expected = B * S * (1 + k * M) * chw * 4 + B * S * k * chw * 2 + cond * 2
    out = records.to_numpy(rec)
    assert telemetry.trajectory_min_bytes(rec, 2) == expected <= telemetry.payload_bytes(out)
    # bf16 columns travel as their bits, never upcast: x0_hat and the conditioning at 2 bytes each
    assert out["x0_hat" + records.BF16_SUFFIX].nbytes == rec["x0_hat"].numel() * 2
    assert out["cond_prompt_embeds" + records.BF16_SUFFIX].nbytes == cond * 2
    back = records.to_torch(out)
    assert back.keys() == rec.keys() and all(
        torch.equal(back[key], value) and back[key].dtype == value.dtype for key, value in rec.items() if torch.is_tensor(value))
    pairs, _ = PoolScorer(model.decode, BrightnessScorer(scale=5000.0), threshold=0.0)(rec)
    assert pairs["x_t"].dtype == pairs["win"].dtype == pairs["lose"].dtype == torch.float32
    n = len(pairs["pair_id"])
    prompts = len(set(pairs["prompt_id"].tolist()))  # the conditioning: once per prompt with a kept pair
    assert n > prompts > 0 and telemetry.pair_min_bytes(pairs, 2) == n * (1 + 2 * M) * chw * 4 + prompts * cond // B * 2
