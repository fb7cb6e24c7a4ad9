"""The fidelity measurements (docs/fidelity.md): their counts are consistent and measure what they say."""

from __future__ import annotations

from spo_ray.fidelity import scorer_dtype_flips


def test_scorer_dtype_flips_counts_are_consistent() -> None:
    result = scorer_dtype_flips("tiny", 2, dtypes=("bf16",), overrides=["sampling.num_steps=6",
                                                                        "sampling.divert_start_step=2"])
    assert (result["prompts"], result["segments_per_prompt"], result["pool_size"]) == (2, 4, 4)
    assert result["scoring_events"] == 8 and result["images"] == 32
    bf16 = result["by_dtype"]["bf16"]
    assert bf16["keep_flips"] == bf16["kept_to_rejected"] + bf16["rejected_to_kept"]
    assert bf16["kept"] == result["kept_fp32"] - bf16["kept_to_rejected"] + bf16["rejected_to_kept"]
    # bf16 keeps 8 mantissa bits: the scores move, by far less than the ~100 x cosine scale
    assert 0 < bf16["score_abs_error_mean"] <= bf16["score_abs_error_max"] < 5.0


def test_spm_input_difference_is_the_issue_size() -> None:
    from spo_ray.fidelity import spm_input_difference

    result = spm_input_difference(sizes=(512,), n=2)
    assert 0.02 < result["512"]["outside_unit_range"] < 0.1
    assert 0.2 < result["512"]["relative_l2"] < 0.45  # ~31 % (docs/fidelity.md, 8 images)
    assert result["512"]["relative_l2_antialias_only"] <= result["512"]["relative_l2"]


def test_trajectory_bf16_residual_at_the_last_steps() -> None:
    from spo_ray.fidelity import trajectory_bf16_residual

    steps = trajectory_bf16_residual(2, last=2)["steps"]
    assert list(steps) == [51, 1]
    assert abs(steps[51]["sigma"] - 0.041) < 1e-3 and abs(steps[1]["sigma"] - 0.021) < 1e-3
    # bf16 keeps 8 mantissa bits: ~0.1 % per latent, several percent of sigma at the last steps
    assert 0.02 < steps[51]["residual_change_rms_at_unit_latents"] < steps[1]["residual_change_rms_at_unit_latents"] < 0.2
