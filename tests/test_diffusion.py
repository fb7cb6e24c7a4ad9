"""The DDIM step, its log-prob and candidate pools against diffusers and closed forms."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spo_ray import rng
from spo_ray.diffusion import (
    ddim_mean_std,
    ddim_step_with_logprob,
    make_ddim_scheduler,
    predict_x0,
    sample_candidates,
    validate_scheduler_config,
)

SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    num_train_timesteps=1000,
)


def scheduler(dtype=torch.float32, steps=20):
    s = make_ddim_scheduler(SD_SCHEDULER, steps)
    if dtype == torch.float64:
        s.alphas_cumprod = s.alphas_cumprod.double()
        s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    return s


def test_sd_schedule_timesteps():
    s = scheduler()
    assert s.timesteps.tolist() == list(range(951, 0, -50))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("step_index", [0, 7, 13, 19])
def test_step_matches_diffusers(dtype, atol, step_index):
    s = scheduler(dtype)
    t = int(s.timesteps[step_index])
    g = torch.Generator().manual_seed(step_index)
    sample = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
    expected = s.step(eps, t, sample, eta=1.0, variance_noise=z).prev_sample
    mean, std, _ = ddim_mean_std(s, eps, t, sample, eta=1.0)
    ours = mean + std * z
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    # The mean alone is diffusers' step with zero noise.
    mean_expected = s.step(eps, t, sample, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
    torch.testing.assert_close(mean, mean_expected, atol=atol, rtol=0)
    # prev_sample from ddim_step_with_logprob is bit-compatible with the same noise draw.
    prev, _ = ddim_step_with_logprob(s, eps, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5))
    z2 = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    expected2 = s.step(eps, t, sample, eta=1.0, variance_noise=z2).prev_sample
    torch.testing.assert_close(prev, expected2, atol=atol, rtol=0)


def closed_form_logprob(s, eps, t, sample, prev, eta):
    """Independent float64 Gaussian density averaged over C*H*W, from the formulas of DESIGN.md."""
    ac = s.alphas_cumprod.double()
    step = 1000 // s.num_inference_steps
    a_t = ac[t].item()
    a_prev = ac[t - step].item() if t - step >= 0 else ac[0].item()
    x, e, y = sample.double(), eps.double(), prev.double()
    x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * e
    lp = -((y - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1), sigma


@pytest.mark.parametrize("step_index", [0, 10, 19])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_logprob_closed_form(step_index, eta):
    s = scheduler()
    t = int(s.timesteps[step_index])
    g = torch.Generator().manual_seed(1)
    sample, eps, prev = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    _, log_prob = ddim_step_with_logprob(s, eps, t, sample, eta=eta, prev_sample=prev)
    expected, sigma = closed_form_logprob(s, eps, t, sample, prev, eta)
    assert log_prob.shape == (2,)
    torch.testing.assert_close(log_prob.double(), expected, atol=1e-4, rtol=1e-5)
    assert sigma > 0  # including the last step: set_alpha_to_one=False keeps sigma positive


def test_per_sample_timesteps_equal_individual_steps():
    s = scheduler()
    ts = torch.tensor([951, 501, 1])
    g = torch.Generator().manual_seed(2)
    sample, eps, prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    _, lp = ddim_step_with_logprob(s, eps, ts, sample, eta=1.0, prev_sample=prev)
    for i, t in enumerate(ts.tolist()):
        _, lp_i = ddim_step_with_logprob(s, eps[i : i + 1], t, sample[i : i + 1], eta=1.0, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(lp[i : i + 1], lp_i)


def test_logprob_gradient_flows_to_noise_pred():
    s = scheduler()
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    sample, prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _, lp = ddim_step_with_logprob(s, eps, 501, sample, eta=1.0, prev_sample=prev)
    lp.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def test_candidates_share_mean_and_have_sigma_spread():
    s = scheduler()
    t = int(s.timesteps[6])
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    eps = torch.randn(2, 4, 16, 16, generator=g)
    k = 512
    cands = sample_candidates(s, eps, t, sample, eta=1.0, k=k, generator=torch.Generator().manual_seed(4))
    assert cands.shape == (k, 2, 4, 16, 16)
    mean, std, _ = ddim_mean_std(s, eps, t, sample, eta=1.0)
    # All candidates are mu + sigma z_j around ONE mean: empirical mean -> mu, spread -> sigma.
    resid = (cands - mean.unsqueeze(0)) / std.unsqueeze(0)
    assert abs(resid.mean().item()) < 0.01
    assert abs(resid.std().item() - 1.0) < 0.01
    # Independent draws: residuals of different candidates are uncorrelated.
    flat = resid.flatten(1)
    corr = torch.corrcoef(flat[:64])
    off_diag = corr[~torch.eye(64, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.1
    # Explicit per-candidate generators reproduce a candidate independently of the pool size.
    gens = [rng.generator("c", j) for j in range(3)]
    pool3 = sample_candidates(s, eps, t, sample, eta=1.0, k=3, generator=gens)
    pool1 = sample_candidates(s, eps, t, sample, eta=1.0, k=1, generator=[rng.generator("c", 2)])
    torch.testing.assert_close(pool3[2], pool1[0])


def test_predict_x0_matches_diffusers():
    s = scheduler()
    g = torch.Generator().manual_seed(9)
    sample, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = s.step(eps, 501, sample, eta=1.0, variance_noise=torch.zeros_like(sample))
    torch.testing.assert_close(predict_x0(s, eps, 501, sample), out.pred_original_sample, atol=1e-6, rtol=0)


def test_bad_scheduler_configs_and_eta():
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        validate_scheduler_config({**SD_SCHEDULER, "set_alpha_to_one": True})
    with pytest.raises(ValueError, match="clip_sample"):
        make_ddim_scheduler(DDIMScheduler().config, 20)  # diffusers' defaults clamp and zero sigma
    with pytest.raises(ValueError, match="prediction_type"):
        validate_scheduler_config({**SD_SCHEDULER, "prediction_type": "v_prediction"})
    s = scheduler()
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(s, x, 501, x, eta=0.0)


def test_eta_zero_is_diffusers_deterministic_ddim() -> None:
    """eta = 0 (evaluation's plain sampling): sigma_t = 0 and the mean is diffusers' DDIM step."""
    s = scheduler(torch.float64)
    gen = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    for t in (951, 501, 1):
        mean, std, _ = ddim_mean_std(s, eps, t, x, eta=0.0)
        expected = s.step(eps, t, x, eta=0.0).prev_sample
        assert float(std.abs().max()) == 0.0
        torch.testing.assert_close(mean, expected, atol=1e-10, rtol=0)
