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
