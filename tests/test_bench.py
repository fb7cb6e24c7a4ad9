"""The benchmark suite (issue 7) and its FLOP accounting (issue 9).

- FlopCounterMode on the published SD1.5 UNet config (meta device, nothing downloaded) gives the
  reference 0.80 TFLOP per forward at 64x64 latents; the training FLOPs per kept pair halve with
  one forward per distinct x_t.
- A short smoke of `spo-ray bench` at the tiny size: both engines on a real local Ray cluster,
  the table and JSON carry every field with sane values. The full run is its own command.
"""

from __future__ import annotations

import json

import pytest

from spo_ray import bench


def test_sd15_unet_forward_flops_on_meta_device():
    flops = bench.unet_flops(bench.shapes_for("sd15"))
    assert flops["forward"] == pytest.approx(0.80e12, rel=0.01)
    assert flops["policy_fwd_bwd"] > flops["forward"]


def test_sd15_flops_per_kept_pair_before_and_after():
    report = bench.flops_report("sd15", num_steps=20, divert_start_step=4, pool_size=4, num_inner_steps=0,
                                kept_fraction=0.8)
    assert report["vae_decode_per_image"] == pytest.approx(2.51e12, rel=0.01)
    assert report["spm_vision_per_image"] == pytest.approx(0.33e12, rel=0.03)
    after, before = report["after"], report["before"]
    # SD1.5 pairs are one transition sharing x_t: one policy and one reference forward, not two.
    assert after["per_kept_pair"]["trainer"] == pytest.approx(before["per_kept_pair"]["trainer"] / 2, rel=1e-6)
    assert after["per_kept_pair"]["scorer"] < before["per_kept_pair"]["scorer"]  # text tower once per prompt
    assert after["training_share"] < before["training_share"]
    assert 20e12 < after["total_per_kept_pair"] < 35e12  # ~28 TFLOP per kept pair


def test_guided_forward_count_matches_the_sampler_plan():
    assert bench.guided_forwards_per_prompt(20, 4, 4, 0) == 65  # 4 plain + 1 + 15 segments x 4
    assert bench.guided_forwards_per_prompt(20, 4, 2, 3) == 35  # SDXL: 4 segments of 1 + 3 inner


@pytest.fixture
def local_ray():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.extended
def test_bench_smoke_tiny(tmp_path, local_ray):
    opts = bench.BenchOptions(size="tiny", samplers=[1], rounds=2, prompts_per_round=2, steps=8, out=str(tmp_path))
    result = bench.run_bench(opts)
    saved = json.loads((tmp_path / "bench.json").read_text())
    table = (tmp_path / "bench.md").read_text()
    assert saved["runs"] and table == result["markdown"]
    for phrase in ("kept pairs/s", "UNet forwards/s per sampler", "images scored/s per scorer", "optimizer steps/s",
                   "busy fraction", "wall split", "bytes per scoring event", "bytes per kept pair", "peak RSS",
                   "policy lag", "ratio distributed / in-process (kept pairs/s)", "prompts/s", "bottleneck", "training share", "Machine:"):
        assert phrase in table, phrase
    local, ray_run = saved["runs"]
    assert local["engine"] == "in-process" and ray_run["engine"] == "ray"
    for row in (local, ray_run):
        assert row["kept"] > 0 and row["kept_pairs_per_s"] > 0 and row["optimizer_steps_per_s"] > 0
        # one steady round (round 2 of 2) of 2 prompts over the steady window
        assert row["prompts_per_s"] == pytest.approx(2 / row["steady_window_s"])
        assert row["unet_forwards"] == row["prompts"] * bench.guided_forwards_per_prompt(8, 4, 4, 0)
        for fraction in (*row["busy_fraction"].values(), *row["wall_split"].values()):
            assert 0.0 <= fraction <= 1.0
        assert all(mib > 0 for mib in row["peak_rss_mib"].values())
    assert set(ray_run["policy_lag"]) <= {"0", "1"}
    assert ray_run["torch_threads"] == {"sampler": 1, "scorer": 1, "trainer": 1}
    assert "sampler 1 / scorer 1 / trainer 1" in table
    assert ray_run["prompt_ratio_vs_in_process"] == pytest.approx(ray_run["prompts_per_s"] / local["prompts_per_s"])
    assert ray_run["ratio_vs_in_process"] > 0 and ray_run["bottleneck"] in ("sampler", "scorer", "trainer")
    for hop in ray_run["hops"].values():
        assert hop["bytes"] >= hop["min_bytes"] > 0
    flops = saved["flops"]
    assert flops["unet_forward_per_sample"] > 0 and flops["after"]["total_per_kept_pair"] > 0
    assert flops["after"]["per_kept_pair"]["trainer"] < flops["before"]["per_kept_pair"]["trainer"]
    measured = flops["measured_training"]  # the project's microbatch_loss: one forward per distinct x_t
    assert 0 < measured["after"] < measured["before"]
    assert measured["before"] == pytest.approx(2 * measured["after"], rel=0.05)  # SD1.5: every pair shares x_t
    roles = flops["roles_measured"]  # each role's compute timed on this CPU
    assert set(roles["roles"]) == {"sampler", "scorer", "trainer"} and "Per-role compute" in table
    assert all(r["flops_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in roles["roles"].values())
    assert roles["seconds_per_kept_pair"] > roles["bound_seconds_per_kept_pair"] > 0
    assert {t["target"].split(" ")[0] for t in saved["targets"]} >= {"ray", "sampler_to_scorer", "scorer_to_trainer"}
