"""Tests of the diffusion math: schedules, forward process, posteriors, respacing and samplers."""

import math

import pytest
import torch

from unclip.diffusion import (
    PARAMETERIZATIONS,
    SAMPLERS,
    GaussianDiffusion,
    classifier_free_guidance,
    cosine_betas,
    linear_betas,
    make_betas,
    respace,
    respace_to_steps,
    row_noise,
    sample,
    space_timesteps,
    two_condition_guidance,
)

T = 1000


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def long(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# -- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_are_increasing_and_alphas_cumprod_in_unit_interval(name):
    betas = make_betas(name, T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert (betas[1:] >= betas[:-1]).all()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert (alphas_cumprod > 0).all() and (alphas_cumprod <= 1).all()
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert alphas_cumprod[-1] < 1e-3  # the signal is (almost) gone at t = T - 1


def test_linear_betas_endpoints_scale_with_length():
    assert linear_betas(1000)[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    assert linear_betas(100)[[0, -1]].tolist() == pytest.approx([1e-3, 0.2])
    with pytest.raises(ValueError, match="more than 20"):
        linear_betas(20)  # the last beta would reach 1


def test_cosine_betas_follow_the_cosine_and_cap_the_end():
    s = 0.008

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_betas(T, s=s, max_beta=0.999)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    for t in [0, 10, 500, 900]:
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas[-1].item() == 0.999  # f(T) = 0 would make the last beta 1 without the cap
    assert betas[0].item() < 1e-3
    assert cosine_betas(T, max_beta=0.5).max().item() == 0.5


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match=r"cosine.*linear"):
        make_betas("quadratic", T)


# -- construction ---------------------------------------------------------------------------------


def test_invalid_parameterization_and_betas_raise():
    with pytest.raises(ValueError, match="parameterization"):
        GaussianDiffusion(cosine_betas(10), parameterization="score")
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError):
        GaussianDiffusion(cosine_betas(10), timestep_map=torch.arange(9))
    with pytest.raises(ValueError, match="arithmetic"):
        GaussianDiffusion(cosine_betas(10), arithmetic="float16")


def test_float32_arithmetic_rounds_every_coefficient_to_float32():
    """float32 arithmetic holds float32 values (as float64) that differ from the exact ones."""
    exact, rounded = GaussianDiffusion(cosine_betas(1000)), GaussianDiffusion(cosine_betas(1000), arithmetic="float32")
    for name in ("alphas_cumprod", "posterior_mean_coef_x0", "posterior_mean_coef_xt", "posterior_log_variance_clipped"):
        ours = getattr(rounded, name)
        assert torch.equal(ours, ours.float().double()), name
        assert not torch.equal(ours, getattr(exact, name)), name
        torch.testing.assert_close(ours, getattr(exact, name), rtol=1e-3, atol=1e-6)


# -- forward process ------------------------------------------------------------------------------


def test_q_sample_is_exactly_the_scaled_mean_without_noise():
    diffusion = GaussianDiffusion(linear_betas(T))
    x0 = torch.randn(4, 3, 2, dtype=torch.float64)
    t = long(0, 10, 500, 999)
    x_t = diffusion.q_sample(x0, t, torch.zeros_like(x0))
    acp = torch.cumprod(1 - linear_betas(T), 0)[t].reshape(4, 1, 1)
    torch.testing.assert_close(x_t, acp.sqrt() * x0)


def test_q_sample_statistics_match_the_marginal():
    diffusion = GaussianDiffusion(cosine_betas(T))
    n = 200_000
    x0 = torch.full((n,), 1.5)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0))
    for t in [0, 300, 800]:
        x_t = diffusion.q_sample(x0, torch.full((n,), t), noise)
        acp = diffusion.alphas_cumprod[t].item()
        assert x_t.dtype == torch.float32
        assert x_t.mean().item() == pytest.approx(math.sqrt(acp) * 1.5, abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - acp, rel=0.02, abs=1e-5)


def test_extracted_coefficients_broadcast_and_take_the_dtype_of_x():
    diffusion = GaussianDiffusion(linear_betas(T))
    x0 = torch.ones(2, 3, 4, 5, dtype=torch.float16)
    x_t = diffusion.q_sample(x0, long(1, 2), torch.zeros_like(x0))
    assert x_t.shape == x0.shape and x_t.dtype == torch.float16


# -- posterior ------------------------------------------------------------------------------------


def bayes_posterior(betas: list[float], t: int, x0: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """q(x_{t-1} | x_t, x_0) by multiplying q(x_t | x_{t-1}) and q(x_{t-1} | x_0) in closed form."""
    alpha = 1 - betas[t]
    acp_prev = math.prod(1 - b for b in betas[:t])
    if t == 0:
        return x0, 0.0
    precision = alpha / betas[t] + 1 / (1 - acp_prev)
    variance = 1 / precision
    mean = variance * (math.sqrt(alpha) / betas[t] * x_t + math.sqrt(acp_prev) / (1 - acp_prev) * x0)
    return mean, variance


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule):
    betas = make_betas(schedule, T)
    diffusion = GaussianDiffusion(betas)
    x0 = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_t = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for t in [0, 1, 7, 250, 999]:
        mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, torch.full((3,), t))
        expected_mean, expected_variance = bayes_posterior(betas.tolist(), t, x0, x_t)
        torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
        assert variance.shape == (3, 1) and variance[0].item() == pytest.approx(expected_variance, rel=1e-9)
        if t > 0:
            assert log_variance[0].item() == pytest.approx(math.log(expected_variance), rel=1e-9)
        else:
            assert math.isfinite(log_variance[0].item())


# -- parameterizations ----------------------------------------------------------------------------


def test_eps_and_x0_conversions_round_trip():
    diffusion = GaussianDiffusion(cosine_betas(T))
    x0 = torch.randn(4, 6, dtype=torch.float64)
    noise = torch.randn(4, 6, dtype=torch.float64)
    t = long(0, 5, 600, 998)
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, t, x0), noise)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, noise), x0)
    v = diffusion.v_target(x0, noise, t)
    torch.testing.assert_close(diffusion.predict_x0_from_v(x_t, t, v), x0)
    torch.testing.assert_close(diffusion.predict_eps_from_v(x_t, t, v), noise)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_training_target_splits_back_into_x0_and_eps(parameterization):
    diffusion = GaussianDiffusion(linear_betas(T), parameterization)
    x0 = torch.randn(4, 2, 3, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, dtype=torch.float64)
    t = long(0, 100, 500, 999)
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.training_target(x0, noise, t)
    x0_pred, eps_pred = diffusion.split_model_output(target, x_t, t)
    torch.testing.assert_close(x0_pred, x0)
    torch.testing.assert_close(eps_pred, noise)


def test_training_target_per_parameterization():
    x0, noise, t = torch.randn(2, 3), torch.randn(2, 3), long(3, 400)
    assert torch.equal(GaussianDiffusion(linear_betas(T), "eps").training_target(x0, noise, t), noise)
    assert torch.equal(GaussianDiffusion(linear_betas(T), "x0").training_target(x0, noise, t), x0)
    v_process = GaussianDiffusion(linear_betas(T), "v")
    acp = v_process.alphas_cumprod[t].float().reshape(2, 1)
    torch.testing.assert_close(v_process.training_target(x0, noise, t), acp.sqrt() * noise - (1 - acp).sqrt() * x0)


def test_training_losses_are_per_example_mse():
    diffusion = GaussianDiffusion(linear_betas(T), "eps")
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = long(1, 2, 3)
    prediction = noise.clone()
    prediction[1] += 2.0
    losses = diffusion.training_losses(prediction, x0, noise, t)
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.tensor([0.0, 4.0, 0.0]))


def test_mismatched_model_output_shape_raises():
    diffusion = GaussianDiffusion(linear_betas(T))
    with pytest.raises(ValueError, match="shape"):
        diffusion.split_model_output(torch.zeros(2, 1), torch.zeros(2, 4), long(1, 1))


# -- respacing ------------------------------------------------------------------------------------


def test_space_timesteps_is_even_and_includes_both_ends():
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(10, 10) == list(range(10))
    assert space_timesteps(1000, 1) == [999]
    for steps in [2, 3, 7, 50, 999]:
        spaced = space_timesteps(1000, steps)
        assert len(set(spaced)) == steps and spaced == sorted(spaced)
        assert spaced[0] == 0 and spaced[-1] == 999


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_space_timesteps_rejects_out_of_range_steps(steps):
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        space_timesteps(1000, steps)


def test_respacing_to_all_steps_reproduces_the_betas():
    base = GaussianDiffusion(cosine_betas(T), "v")
    full = respace(base, range(T))
    torch.testing.assert_close(full.betas, base.betas, rtol=1e-9, atol=1e-12)
    assert torch.equal(full.timestep_map, torch.arange(T))
    assert full.parameterization == "v"


def test_respaced_alphas_cumprod_equal_the_originals_at_kept_timesteps():
    base = GaussianDiffusion(linear_betas(T))
    kept = space_timesteps(T, 25)
    respaced = respace(base, kept)
    assert respaced.num_timesteps == 25
    torch.testing.assert_close(respaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert respaced.timestep_map.tolist() == kept
    assert respaced.model_timesteps(long(0, 24, 3)).tolist() == [kept[0], kept[24], kept[3]]


def test_respacing_a_respaced_process_keeps_original_timesteps():
    once = respace(GaussianDiffusion(linear_betas(T)), [0, 100, 200, 500, 999])
    twice = respace(once, [1, 3])
    assert twice.timestep_map.tolist() == [100, 500]


def test_respace_to_steps_is_cached():
    base = GaussianDiffusion(linear_betas(T))
    assert respace_to_steps(base, 20) is respace_to_steps(base, 20)
    assert respace_to_steps(base, 20) is not respace_to_steps(base, 21)


# -- guidance and noise ---------------------------------------------------------------------------


def test_classifier_free_guidance_endpoints():
    cond, uncond = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_two_condition_guidance_endpoints():
    uncond, first_only, both = torch.randn(3, 2, 3)
    torch.testing.assert_close(two_condition_guidance(uncond, first_only, both, 0.0, 0.0), uncond)
    torch.testing.assert_close(two_condition_guidance(uncond, first_only, both, 1.0, 0.0), first_only)
    torch.testing.assert_close(two_condition_guidance(uncond, first_only, both, 1.0, 1.0), both)
    # Equal scales: plain guidance, whatever the first condition alone predicts.
    torch.testing.assert_close(
        two_condition_guidance(uncond, first_only, both, 3.0, 3.0), classifier_free_guidance(both, uncond, 3.0)
    )
    torch.testing.assert_close(
        two_condition_guidance(uncond, first_only, both, 5.0, 2.0),
        uncond + 5 * (first_only - uncond) + 2 * (both - first_only),
    )


def test_row_noise_rows_depend_only_on_their_generator():
    batch = row_noise(generators(1, 2, 3), (4, 5))
    alone = row_noise(generators(2), (4, 5))
    assert batch.shape == (3, 4, 5)
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[1])
    assert torch.equal(row_noise(generators(2), (4, 5), dtype=torch.float64), alone.double())


# -- single reverse steps -------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_reverse_steps_add_noise_only_where_t_is_positive(step):
    diffusion = GaussianDiffusion(linear_betas(T))
    x0_pred = torch.randn(2, 8, dtype=torch.float64)
    x_t = torch.randn(2, 8, dtype=torch.float64)
    t = long(0, 500)
    eps_pred = diffusion.predict_eps_from_x0(x_t, t, x0_pred)
    noise = torch.randn(2, 8, dtype=torch.float64)

    def run(noise):
        if step == "ddpm":
            return diffusion.ddpm_step(x0_pred, x_t, t, noise)
        return diffusion.ddim_step(x0_pred, eps_pred, x_t, t, 1.0, noise)

    noisy, noiseless = run(noise), run(torch.zeros_like(noise))
    torch.testing.assert_close(noisy[0], x0_pred[0])  # the posterior at t = 0 is x0 itself
    std = diffusion.posterior_variance[500].sqrt().item()
    torch.testing.assert_close(noisy[1] - noiseless[1], std * noise[1])
    with pytest.raises(ValueError, match="noise"):
        run(None)
    torch.testing.assert_close(diffusion.ddpm_step(x0_pred, x_t, long(0, 0), None), x0_pred)


def test_ddim_with_eta_zero_ignores_noise():
    diffusion = GaussianDiffusion(linear_betas(T))
    x0_pred, eps_pred, x_t, t = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), long(3, 900)
    expected = diffusion.ddim_step(x0_pred, eps_pred, x_t, t, 0.0)
    torch.testing.assert_close(diffusion.ddim_step(x0_pred, eps_pred, x_t, t, 0.0, torch.randn(2, 4)), expected)
    acp_prev = diffusion.alphas_cumprod_prev[t].float().reshape(2, 1)
    torch.testing.assert_close(expected, acp_prev.sqrt() * x0_pred + (1 - acp_prev).sqrt() * eps_pred)


# -- sampling -------------------------------------------------------------------------------------

MU, SIGMA = 0.3, 0.5


def ideal_gaussian_model(diffusion: GaussianDiffusion):
    """The exact E[output | x_t] for data x_0 ~ N(MU, SIGMA^2), in the diffusion's parameterization.

    It reads alphas_cumprod at the timesteps it is given, so it is only right when called with
    original (not respaced) timesteps.
    """

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        acp = diffusion.alphas_cumprod[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        gain = acp.sqrt() * SIGMA**2 / (acp * SIGMA**2 + 1 - acp)
        x0 = MU + gain * (x_t - acp.sqrt() * MU)
        eps = diffusion.predict_eps_from_x0(x_t, t, x0)
        return {"eps": eps, "x0": x0, "v": diffusion.v_target(x0, eps, t)}[diffusion.parameterization]

    return model_fn


# Few steps under-disperse (the std error shrinks like 1/steps: DDIM gets 0.36 with 10 steps and
# 0.47 with 50), so "many steps" here means 250 for DDIM and the full 1000 for the noisier samplers.
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize(("sampler", "eta", "steps"), [("ddim", 0.0, 250), ("ddim", 1.0, T), ("ddpm", 0.0, T)])
def test_sampling_with_the_ideal_denoiser_recovers_the_data_distribution(parameterization, sampler, eta, steps):
    diffusion = GaussianDiffusion(linear_betas(T), parameterization)
    model_fn = ideal_gaussian_model(diffusion)
    samples = sample(diffusion, model_fn, (4, 4096), generators(0, 1, 2, 3), steps=steps, sampler=sampler, eta=eta)
    assert samples.shape == (4, 4096)
    assert samples.mean().item() == pytest.approx(MU, abs=0.015)
    assert samples.std().item() == pytest.approx(SIGMA, rel=0.03)


def test_ddim_with_eta_one_is_ddpm():
    # With sigma equal to the posterior std, the DDIM mean is algebraically the posterior mean.
    diffusion = GaussianDiffusion(cosine_betas(T), "eps")
    model_fn = ideal_gaussian_model(diffusion)
    ddim = sample(diffusion, model_fn, (2, 64), generators(3, 4), steps=20, sampler="ddim", eta=1.0)
    ddpm = sample(diffusion, model_fn, (2, 64), generators(3, 4), steps=20, sampler="ddpm")
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


def test_ddim_eta_zero_uses_no_randomness_after_x_T():
    diffusion = GaussianDiffusion(linear_betas(T))
    ideal = ideal_gaussian_model(diffusion)
    gens = generators(5, 6)

    def model_that_disturbs_the_generators(x_t, t):
        for g in gens:
            torch.randn(7, generator=g)
        return ideal(x_t, t)

    first = sample(diffusion, ideal, (2, 16), generators(5, 6), steps=10)
    again = sample(diffusion, ideal, (2, 16), generators(5, 6), steps=10)
    disturbed = sample(diffusion, model_that_disturbs_the_generators, (2, 16), gens, steps=10)
    assert torch.equal(first, again)
    assert torch.equal(first, disturbed)
    x_T = row_noise(generators(5, 6), (16,))
    assert torch.equal(first, sample(diffusion, ideal, (2, 16), generators(8, 9), steps=10, x_T=x_T))


@pytest.mark.parametrize(("sampler", "eta", "draws"), [("ddim", 0.0, 1), ("ddim", 0.5, 6), ("ddpm", 0.0, 6)])
def test_each_row_draws_x_T_then_one_noise_per_stochastic_step(sampler, eta, draws):
    diffusion = GaussianDiffusion(linear_betas(T))
    used = generators(21, 22)
    sample(diffusion, ideal_gaussian_model(diffusion), (2, 5), used, steps=6, sampler=sampler, eta=eta)
    reference = generators(21, 22)
    for _ in range(draws):  # x_T, then every step but the last (whose posterior has no variance)
        row_noise(reference, (5,))
    assert torch.equal(row_noise(used, (3,)), row_noise(reference, (3,)))


def test_ddpm_depends_on_the_seed_and_on_noise_after_x_T():
    diffusion = GaussianDiffusion(linear_betas(T))
    ideal = ideal_gaussian_model(diffusion)
    x_T = row_noise(generators(0), (16,))

    def ddpm(seed: int) -> torch.Tensor:
        return sample(diffusion, ideal, (1, 16), generators(seed), steps=10, sampler="ddpm", x_T=x_T)

    assert torch.equal(ddpm(1), ddpm(1))
    assert not torch.allclose(ddpm(1), ddpm(2))


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_a_row_is_the_same_alone_or_in_a_batch(sampler, eta):
    diffusion = GaussianDiffusion(cosine_betas(T), "v")
    ideal = ideal_gaussian_model(diffusion)
    batch = sample(diffusion, ideal, (3, 2, 8), generators(11, 12, 13), steps=12, sampler=sampler, eta=eta)
    alone = sample(diffusion, ideal, (1, 2, 8), generators(12), steps=12, sampler=sampler, eta=eta)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_model_fn_receives_original_timesteps():
    diffusion = GaussianDiffusion(linear_betas(T))
    seen: list[list[int]] = []

    def model_fn(x_t, t):
        assert t.dtype == torch.long
        seen.append(t.tolist())
        return torch.zeros_like(x_t)

    sample(diffusion, model_fn, (2, 3), generators(0, 1), steps=4)
    assert seen == [[999, 999], [666, 666], [333, 333], [0, 0]]


def test_check_cancelled_stops_before_the_next_model_call():
    diffusion = GaussianDiffusion(linear_betas(T))
    model_calls = 0
    checks = 0

    def model_fn(x_t, t):
        nonlocal model_calls
        model_calls += 1
        return torch.zeros_like(x_t)

    def check_cancelled():
        nonlocal checks
        checks += 1
        if checks == 4:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        sample(diffusion, model_fn, (1, 3), generators(0), steps=10, check_cancelled=check_cancelled)
    assert model_calls == 3


def test_progress_is_reported_after_every_step():
    diffusion = GaussianDiffusion(linear_betas(T), "x0")
    calls = []

    def model_fn(x_t, t):
        return torch.full_like(x_t, 0.25)

    result = sample(diffusion, model_fn, (2, 3), generators(0, 1), steps=5, progress=lambda i, n, x0: calls.append((i, n, x0)))
    assert [(i, n) for i, n, _ in calls] == [(i, 5) for i in range(5)]
    assert all(torch.equal(x0, torch.full((2, 3), 0.25)) for _, _, x0 in calls)
    torch.testing.assert_close(result, torch.full((2, 3), 0.25))


def test_denoised_fn_is_applied_and_eps_rederived_from_it():
    diffusion = GaussianDiffusion(linear_betas(T), "eps")
    inputs: list[torch.Tensor] = []

    def model_fn(x_t, t):
        inputs.append(x_t.clone())
        return torch.full_like(x_t, 3.0)  # a wild eps, whose x0 lies far outside [-1, 1]

    x_T = row_noise(generators(0), (64,))
    result = sample(diffusion, model_fn, (1, 64), generators(0), steps=2, x_T=x_T, denoised_fn=lambda x0: torch.zeros_like(x0))
    torch.testing.assert_close(result, torch.zeros(1, 64))
    # With x0 replaced by 0 the re-derived eps is x_T / sqrt(1 - acp), and DDIM moves to
    # sqrt(1 - acp_prev) * eps. Had the model's eps (3.0) been kept, x_t would be constant.
    acp_T, acp_prev = diffusion.alphas_cumprod[[999, 0]].tolist()
    torch.testing.assert_close(inputs[1], x_T * math.sqrt((1 - acp_prev) / (1 - acp_T)))


def test_denoised_fn_clamps_every_prediction():
    diffusion = GaussianDiffusion(cosine_betas(T), "x0")
    clamped_predictions = []

    def progress(i, n, x0):
        clamped_predictions.append(x0)

    result = sample(
        diffusion,
        lambda x_t, t: 5 * x_t,
        (2, 32),
        generators(0, 1),
        steps=8,
        sampler="ddpm",
        denoised_fn=lambda x0: x0.clamp(-1, 1),
        progress=progress,
    )
    assert len(clamped_predictions) == 8
    assert all(x0.abs().max() <= 1 for x0 in clamped_predictions)
    assert result.abs().max() <= 1


def test_sample_argument_errors():
    diffusion = GaussianDiffusion(linear_betas(T))
    model_fn = lambda x_t, t: torch.zeros_like(x_t)
    with pytest.raises(ValueError, match="sampler"):
        sample(diffusion, model_fn, (1, 2), generators(0), steps=2, sampler="euler")
    with pytest.raises(ValueError, match="generator"):
        sample(diffusion, model_fn, (2, 2), generators(0), steps=2)
    with pytest.raises(ValueError, match="steps"):
        sample(diffusion, model_fn, (1, 2), generators(0), steps=T + 1)
    with pytest.raises(ValueError, match="x_T"):
        sample(diffusion, model_fn, (1, 2), generators(0), steps=2, x_T=torch.zeros(1, 3))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_the_known_region_and_samples_the_rest(sampler):
    diffusion = GaussianDiffusion(linear_betas(T), "eps")
    known = torch.full((2, 4096), 5.0)  # far from the data distribution, so leaks would show
    keep = torch.zeros(2, 4096)
    keep[:, :2048] = 1.0
    samples = sample(
        diffusion,
        ideal_gaussian_model(diffusion),
        (2, 4096),
        generators(0, 1),
        steps=T if sampler == "ddpm" else 250,
        sampler=sampler,
        known=(known, keep),
    )
    assert torch.equal(samples[:, :2048], known[:, :2048])
    # The free half still follows the data distribution: the ideal model is per element, so the
    # known half must not pull it anywhere.
    free = samples[:, 2048:]
    assert free.mean().item() == pytest.approx(MU, abs=0.03)
    assert free.std().item() == pytest.approx(SIGMA, rel=0.05)
    again = sample(
        diffusion,
        ideal_gaussian_model(diffusion),
        (1, 4096),
        generators(1),
        steps=T if sampler == "ddpm" else 250,
        sampler=sampler,
        known=(known[1:], keep[1:]),
    )
    assert torch.equal(again[0], samples[1])  # per-row noise, inpainting included


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weighting_is_a_clipped_x0_loss_in_every_parameterization(parameterization):
    diffusion = GaussianDiffusion(cosine_betas(T), parameterization)
    gamma = 5.0
    t = torch.arange(0, T, 7)
    acp = diffusion.alphas_cumprod[t].reshape(-1, 1).float()
    x0, noise = torch.randn(len(t), 6), torch.randn(len(t), 6)
    x0_error = torch.randn(len(t), 6)
    # The network output that predicts x0 + x0_error from x_t, in each parameterization's units.
    output = {
        "x0": x0 + x0_error,
        "eps": noise - (acp / (1 - acp)).sqrt() * x0_error,
        "v": diffusion.training_target(x0, noise, t) - x0_error / (1 - acp).sqrt(),
    }[parameterization]
    snr = (acp / (1 - acp)).squeeze(1)
    expected = snr.clamp(max=gamma) * x0_error.square().mean(dim=1)
    weighted = diffusion.training_losses(output, x0, noise, t, min_snr_gamma=gamma)
    torch.testing.assert_close(weighted, expected, rtol=1e-3, atol=1e-5)
    # Without gamma the loss is the plain squared error of the output.
    plain = diffusion.training_losses(output, x0, noise, t)
    torch.testing.assert_close(plain, (output - diffusion.training_target(x0, noise, t)).square().mean(dim=1))
