"""Training components: transition pairs, the shared-x_t forward, the LoRA / full fine-tuning
reference, and the round loop's semantics with the in-process learner (clipping, accumulation,
non-finite steps). Everything runs on the tiny models with real forwards and backwards.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from spo_ray import training
from spo_ray.components import build_pool_scorer, load_model
from spo_ray.config import load_config
from spo_ray.diffusion import ddim_mean_std, gaussian_logprob
from spo_ray.learner import NonFiniteError, plan_microbatches
from spo_ray.loss import spo_loss
from spo_ray.models import Conditioning
from spo_ray.sampling import CandidatePoolSampler
from spo_ray.tiny import ensure_tiny_pipeline
from spo_ray.training import (
    LocalTrainer,
    conditioning_of,
    expand_transitions,
    microbatch_loss,
    reference_unet,
    setup_policy,
    take_rows,
    trainable_parameters,
    transition_logprobs,
)

CPU = torch.device("cpu")
PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff", "a bowl of ramen"]


def _setup(kind: str, *overrides: str):
    cfg = load_config(f"tiny-{kind}", overrides=["scorer.threshold=0.0", *overrides])
    return cfg, load_model(cfg, CPU)


def _pairs(cfg, model, n_prompts: int, *, epoch: int = 0) -> dict[str, object]:
    """Kept pairs of one sampled round (threshold 0: every pool with distinct scores is kept)."""
    sampler = CandidatePoolSampler(model, cfg.sampling, cfg.train.seed)
    records = sampler.sample(PROMPTS[:n_prompts], list(range(n_prompts)), epoch=epoch, round_index=0, policy_version=0)
    pairs, stats = build_pool_scorer(cfg, model, CPU)(records)
    assert stats.kept == stats.events  # threshold 0 keeps every pool
    return pairs


def _perturb_lora(unet: torch.nn.Module, std: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(std * torch.randn(param.shape, generator=gen))


def _grad_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))


# ----------------------------------------------------------------------------- expand_transitions


def test_expand_transitions_hand_built() -> None:
    C, H, W, M = 2, 3, 3, 3
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, C, H, W, generator=gen)
    win = torch.randn(2, M, C, H, W, generator=gen)
    lose = torch.randn(2, M, C, H, W, generator=gen)
    pairs = {
        "pair_id": torch.tensor([100, 200]),
        "policy_version": torch.tensor([4, 5]),
        "seg_len": torch.tensor([1, 3]),
        "timesteps": torch.tensor([[501, 0, 0], [301, 251, 201]]),
        "x_t": x_t,
        "win": win,
        "lose": lose,
        "score_win": torch.tensor([10.0, 20.0]),
        "score_lose": torch.tensor([1.0, 2.0]),
        "cond_prompt_embeds": torch.tensor([[[1.0]], [[2.0]]]),
    }
    out = expand_transitions(pairs)
    assert out["pair_id"].tolist() == [100, 200, 200, 200]
    assert out["transition"].tolist() == [0, 0, 1, 2]
    assert out["shared"].tolist() == [True, True, False, False]
    assert out["timestep"].tolist() == [501, 301, 251, 201]
    assert out["policy_version"].tolist() == [4, 5, 5, 5]
    assert out["score_win"].tolist() == [10.0, 20.0, 20.0, 20.0]
    assert out["cond_prompt_embeds"].flatten().tolist() == [1.0, 2.0, 2.0, 2.0]
    # n = 0: both sides start at the shared x_t
    assert torch.equal(out["win_in"][0], x_t[0]) and torch.equal(out["lose_in"][0], x_t[0])
    assert torch.equal(out["win_in"][1], x_t[1]) and torch.equal(out["lose_in"][1], x_t[1])
    # later transitions start at the previous state of their own chain
    for row, n in ((2, 1), (3, 2)):
        assert torch.equal(out["win_in"][row], win[1, n - 1])
        assert torch.equal(out["lose_in"][row], lose[1, n - 1])
        assert not torch.equal(out["win_in"][row], out["lose_in"][row])
    for row, (p, n) in enumerate(((0, 0), (1, 0), (1, 1), (1, 2))):
        assert torch.equal(out["win_out"][row], win[p, n])
        assert torch.equal(out["lose_out"][row], lose[p, n])


# ----------------------------------------------------------------------------- shared-x_t forwards


def _naive_logprobs(model, unet, batch, *, guidance_scale, eta):
    """One separate CFG forward for every winner input and every loser input."""
    cond = conditioning_of(batch)
    neg = model.negative_conditioning(1)
    out_w, out_l = [], []
    for i in range(len(batch["pair_id"])):
        t = int(batch["timestep"][i])
        for side, acc in (("win", out_w), ("lose", out_l)):
            x_in = batch[f"{side}_in"][i : i + 1]
            eps = model.guided_noise_pred(unet, x_in, t, cond.index(i), neg, guidance_scale)
            mean, std, _ = ddim_mean_std(model.scheduler, eps, t, x_in, eta=eta)
            acc.append(gaussian_logprob(batch[f"{side}_out"][i : i + 1], mean, std))
    return torch.cat(out_w), torch.cat(out_l)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_shared_forward_equals_naive_and_counts_forwards(kind: str) -> None:
    # sd15 with one inner step so that the batch mixes shared (n = 0) and own (n = 1) inputs.
    extra = ["sampling.num_inner_steps=1", "sampling.pool_size=2"] if kind == "sd15" else []
    cfg, model = _setup(kind, *extra)
    unet = model.unet
    setup_policy(unet, cfg.train)
    _perturb_lora(unet, 3e-3)
    transitions = expand_transitions(_pairs(cfg, model, 2))
    shared_rows = transitions["shared"].nonzero().flatten()
    own_rows = (~transitions["shared"]).nonzero().flatten()
    idx = torch.cat([shared_rows[:3], own_rows[:4]])[torch.tensor([0, 3, 1, 4, 5, 2, 6])]  # interleaved
    batch = take_rows(transitions, idx)
    n, n_shared = 7, 3
    assert int(batch["shared"].sum()) == n_shared
    kwargs = {"guidance_scale": cfg.sampling.guidance_scale, "eta": cfg.sampling.eta}

    # UNet rows: CFG doubles each distinct input; shared rows add only the winner's input.
    rows: list[int] = []
    handle = unet.register_forward_pre_hook(lambda _module, args: rows.append(int(args[0].shape[0])))
    try:
        with torch.no_grad():
            transition_logprobs(model, unet, batch, **kwargs)
    finally:
        handle.remove()
    inputs = torch.cat([batch["win_in"], batch["lose_in"]])
    distinct = len({x.numpy().tobytes() for x in inputs})
    assert distinct == 2 * n - n_shared
    assert rows == [2 * distinct]

    # loss and LoRA gradients: batched shared forwards == separate naive forwards
    params = trainable_parameters(unet)
    assert params and all("lora" in name for name, p in unet.named_parameters() if p.requires_grad)
    unet.zero_grad(set_to_none=True)
    loss, _ = microbatch_loss(model, unet, None, batch, cfg.train, cfg.sampling)
    loss.backward()
    grads = [p.grad.clone() for p in params]

    unet.zero_grad(set_to_none=True)
    logp_w, logp_l = _naive_logprobs(model, unet, batch, **kwargs)
    with torch.no_grad(), reference_unet(unet, None) as ref:
        ref_w, ref_l = _naive_logprobs(model, ref, batch, **kwargs)
    naive_loss, _ = spo_loss(logp_w, ref_w, logp_l, ref_l, beta=cfg.train.beta, eps=cfg.train.clip_eps)
    naive_loss.backward()
    naive_grads = [p.grad.clone() for p in params]

    # the policy really differs from the reference and the gradient is not trivially zero
    assert not torch.allclose(logp_w, ref_w, atol=1e-7, rtol=0)
    torch.testing.assert_close(loss, naive_loss, atol=1e-6, rtol=1e-5)
    scale = max(float(g.abs().max()) for g in naive_grads)
    assert scale > 1e-6
    for got, want in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-3)


# ----------------------------------------------------------------------------- the reference model


def test_lora_reference_is_the_base_model() -> None:
    cfg, model = _setup("sd15")
    unet = model.unet
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *model.latent_shape, generator=gen)
    cond = model.encode_prompts(PROMPTS[:2])
    neg = model.negative_conditioning(2)

    def pred(net):
        with torch.no_grad():
            return model.guided_noise_pred(net, x, 601, cond, neg, cfg.sampling.guidance_scale)

    base = pred(unet)
    assert setup_policy(unet, cfg.train) is None
    torch.testing.assert_close(pred(unet), base, atol=1e-6, rtol=1e-6)  # gaussian init: B = 0
    _perturb_lora(unet, 0.1)
    policy = pred(unet)
    assert (policy - base).abs().max() > 1e-3

    with reference_unet(unet, None) as ref:
        assert ref is unet
        torch.testing.assert_close(pred(ref), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pred(unet), policy, atol=0, rtol=0)

    with pytest.raises(RuntimeError, match="inside"), reference_unet(unet, None) as ref:
        torch.testing.assert_close(pred(ref), base, atol=1e-6, rtol=1e-6)
        raise RuntimeError("failure inside the reference context")
    torch.testing.assert_close(pred(unet), policy, atol=0, rtol=0)  # adapters are back on


def test_full_finetuning_reference_is_a_frozen_copy() -> None:
    cfg, model = _setup("sd15", "train.lora=false", "train.learning_rate=1e-3")
    unet = model.unet
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=CPU)
    frozen = trainer.frozen_copy
    assert frozen is not None and frozen is not unet
    assert all(p.requires_grad for p in unet.parameters())
    assert len(trainer.learner.params) == len(list(unet.parameters()))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    assert not {p.data_ptr() for p in frozen.parameters()} & {p.data_ptr() for p in unet.parameters()}
    with reference_unet(unet, frozen) as ref:
        assert ref is frozen

    pairs = _pairs(cfg, model, 1)
    steps = trainer.train_round(pairs, epoch=0, round_index=0)
    assert steps and not any(s.skipped for s in steps)
    assert all(p.grad is None for p in frozen.parameters())

    # the policy moved; the reference is still the base checkpoint
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(str(ensure_tiny_pipeline("sd15") / "unet")).state_dict()
    frozen_state, policy_state = frozen.state_dict(), unet.state_dict()
    assert all(torch.equal(frozen_state[k], v) for k, v in base.items())
    assert any(not torch.equal(policy_state[k], v) for k, v in base.items())


# ----------------------------------------------------------------------------- the optimizer loop


def _record_step_grads(trainer: LocalTrainer, record) -> None:
    """Call ``record()`` at every optimizer.step, i.e. after clipping, before the update."""
    original = trainer.learner.optimizer.step

    @functools.wraps(original)  # keeps the lr scheduler's marker on the wrapped step
    def step(*args, **kwargs):
        record()
        return original(*args, **kwargs)

    trainer.learner.optimizer.step = step


@pytest.mark.parametrize("max_grad_norm", [1e-6, None])
def test_gradient_clipping_really_clips(max_grad_norm) -> None:
    cfg, model = _setup("sd15", f"train.max_grad_norm={max_grad_norm if max_grad_norm else 'null'}",
                        "train.train_batch_size=64")
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=CPU)
    norms: list[float] = []
    _record_step_grads(trainer, lambda: norms.append(_grad_norm(trainer.learner.params)))
    steps = trainer.train_round(_pairs(cfg, model, 1), epoch=0, round_index=0)
    assert len(steps) == 1 and len(norms) == 1 and not steps[0].skipped
    reported = steps[0].grad_norm  # the pre-clip norm
    assert reported > 1e-3
    if max_grad_norm is None:
        assert norms[0] == pytest.approx(reported, rel=1e-4)
    else:
        assert 0.5 * max_grad_norm < norms[0] <= max_grad_norm * (1 + 1e-3)


def test_gradient_accumulation_averages_over_the_micro_steps_a_step_has() -> None:
    """grad_accum_steps=3 over 32 transitions in micro-batches of 7: steps of [7, 7, 7] and [7, 4].
    Each step's gradient is the mean over its micro-steps of each micro-batch's mean gradient; the
    round's last, partial step is averaged over the 2 micro-steps it has (not divided by 3)."""
    cfg, model = _setup("sd15", "train.grad_accum_steps=3", "train.train_batch_size=7")
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=CPU)
    _perturb_lora(model.unet, 3e-3)  # so that every LoRA parameter gets a gradient
    pairs = _pairs(cfg, model, 2)
    transitions = expand_transitions(pairs)
    assert len(transitions["pair_id"]) == 32
    micro = plan_microbatches(32, 7, seed=cfg.train.seed, epoch=0, round_index=3)
    assert [len(m) for m in micro] == [7, 7, 7, 7, 4]

    def micro_grads(i: int) -> list[torch.Tensor]:
        loss, _ = microbatch_loss(model, model.unet, None, take_rows(transitions, micro[i]), cfg.train, cfg.sampling)
        return list(torch.autograd.grad(loss, trainer.learner.params))

    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def record() -> None:
        # at step time: the accumulated grads, and what each micro-batch gives at these weights
        accumulated = [p.grad.clone() for p in trainer.learner.params]
        window = [0, 1, 2] if not seen else [3, 4]
        grads = [micro_grads(i) for i in window]
        expected = [sum(gs) / len(window) for gs in zip(*grads, strict=True)]
        seen.append((accumulated, expected))

    _record_step_grads(trainer, record)
    steps = trainer.train_round(pairs, epoch=0, round_index=3)
    assert [s.num_transitions for s in steps] == [21, 11]
    assert trainer.state.global_step == 2 and trainer.state.micro_step == 5 and len(seen) == 2
    for accumulated, expected in seen:
        scale = max(float(g.abs().max()) for g in expected)
        assert scale > 0
        for got, want in zip(accumulated, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-3)
    # the old rule (the partial step divided by grad_accum_steps=3) would give 2/3 of it: detectable
    last, expected = seen[1]
    assert not torch.allclose(last[0], expected[0] * 2 / 3, atol=1e-4 * float(expected[0].abs().max()))


def _nan_on_calls(monkeypatch, nan_calls) -> list[int]:
    """Make spo_ray.training.spo_loss return NaN on the given (1-based) calls."""
    real = spo_loss  # the real one, also when a previous patch is still in place
    calls: list[int] = []

    def fake(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        if nan_calls == "all" or len(calls) in nan_calls:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(training, "spo_loss", fake)
    return calls


def _snapshot(trainer: LocalTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.learner.params]


def test_nonfinite_step_is_skipped(monkeypatch) -> None:
    cfg, model = _setup("sd15", "train.train_batch_size=8", "train.max_nonfinite_steps=5")
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=CPU)
    pairs = _pairs(cfg, model, 1)  # 16 transitions: 2 micro-batches, 2 steps
    updates: list[int] = []
    _record_step_grads(trainer, lambda: updates.append(1))

    # every micro-batch non-finite: both steps skipped, nothing changes
    before = _snapshot(trainer)
    calls = _nan_on_calls(monkeypatch, "all")
    steps = trainer.train_round(pairs, epoch=0, round_index=0)
    assert len(calls) == 2 and [s.skipped for s in steps] == [True, True]
    assert all(math.isnan(s.grad_norm) and math.isnan(s.loss) for s in steps)
    assert updates == [] and not trainer.learner.optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(trainer), strict=True))
    assert all(p.grad is None for p in trainer.learner.params)
    assert trainer.state.nonfinite_steps == 2 and trainer.state.nonfinite_in_a_row == 2
    assert trainer.state.global_step == 2 and trainer.state.micro_step == 2

    # only the first micro-batch non-finite: the first step is skipped, the second one updates
    calls = _nan_on_calls(monkeypatch, {1})
    steps = trainer.train_round(pairs, epoch=0, round_index=1)
    assert [s.skipped for s in steps] == [True, False]
    assert math.isfinite(steps[1].loss) and steps[1].grad_norm > 0
    assert len(updates) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, _snapshot(trainer), strict=True))
    assert trainer.state.nonfinite_steps == 3 and trainer.state.nonfinite_in_a_row == 0
    assert trainer.state.global_step == 4 and trainer.state.micro_step == 4

    # a finite loss with a non-finite gradient is skipped too
    monkeypatch.undo()
    after = _snapshot(trainer)
    handle = trainer.learner.params[0].register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        steps = trainer.train_round(pairs, epoch=0, round_index=2)
    finally:
        handle.remove()
    assert [s.skipped for s in steps] == [True, True]
    assert all(math.isfinite(s.loss) for s in steps)
    assert len(updates) == 1
    assert all(torch.equal(a, b) for a, b in zip(after, _snapshot(trainer), strict=True))
    assert trainer.state.nonfinite_steps == 5 and trainer.state.nonfinite_in_a_row == 2


def test_too_many_nonfinite_steps_in_a_row_raise(monkeypatch) -> None:
    cfg, model = _setup("sd15", "train.train_batch_size=4", "train.max_nonfinite_steps=3")
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=CPU)
    pairs = _pairs(cfg, model, 1)  # 16 transitions: 4 micro-batches

    # NaN, NaN, finite, NaN: never 3 in a row
    _nan_on_calls(monkeypatch, {1, 2, 4})
    steps = trainer.train_round(pairs, epoch=0, round_index=0)
    assert [s.skipped for s in steps] == [True, True, False, True]
    assert trainer.state.nonfinite_in_a_row == 1

    # the streak carries over into the next round: the 2nd NaN step there is the 3rd in a row
    before = _snapshot(trainer)
    calls = _nan_on_calls(monkeypatch, "all")
    with pytest.raises(NonFiniteError, match="max_nonfinite_steps=3"):
        trainer.train_round(pairs, epoch=0, round_index=1)
    assert len(calls) == 2 and trainer.state.nonfinite_in_a_row == 3
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(trainer), strict=True))


def test_conditioning_round_trips_through_pairs() -> None:
    """The training forward sees exactly the sampler's conditioning (SDXL: pooled + time ids)."""
    cfg, model = _setup("sdxl")
    pairs = _pairs(cfg, model, 2)
    cond = conditioning_of(expand_transitions(pairs))
    assert isinstance(cond, Conditioning) and cond.is_sdxl
    fresh = model.encode_prompts([pairs["prompt"][0]])
    torch.testing.assert_close(cond.index(0).prompt_embeds, fresh.prompt_embeds)
    torch.testing.assert_close(cond.index(0).pooled_embeds, fresh.pooled_embeds)
    torch.testing.assert_close(cond.index(0).time_ids, fresh.time_ids)
