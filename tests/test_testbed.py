"""Claims about the ground-truth testbed: exact marginals, exact denoisers, exact PF-ODE solutions, distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fewstep.samplers.denoisers import CFGDenoiser, Denoiser, Prediction
from fewstep.samplers.schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, FlowMatchingSchedule,
                                Schedule)
from fewstep.testbed import (ExactDenoiser, GaussianMixture, gaussian_pf_ode_solution, mixture_pf_ode_solution,
                              mmd_rbf, reference_pf_ode_solution, sample_moments, sliced_wasserstein, w2_gaussian,
                              w2_to_gaussian)

F64 = torch.float64

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors, many calls: one thread avoids OpenMP barriers, which cost ~1 ms each under CPU contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SCHEDULES = {
    "ddpm-linear": lambda: DiscreteVPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000)),
    "vp-linear": lambda: ContinuousVPSchedule("linear"),
    "vp-cosine": lambda: ContinuousVPSchedule("cosine"),
    "edm": lambda: EDMSchedule(),
    "flow-matching": lambda: FlowMatchingSchedule(),
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def gaussian() -> GaussianMixture:
    return GaussianMixture.gaussian(3, mean=torch.tensor([1.0, -2.0, 0.5]), std=torch.tensor([0.3, 1.0, 2.0]))


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(2, 6, n_classes=3, spread=2.0, std=0.4, seed=1)


def noise_levels(schedule: Schedule):
    """``(alpha, sigma)`` at t_min, a middle time and t_max."""
    for t in (schedule.t_min, 0.5 * (schedule.t_min + schedule.t_max), schedule.t_max):
        yield float(schedule.alpha(t)), float(schedule.sigma(t))


# ---------------------------------------------------------------------------------------------
# The mixture


def test_constructor_broadcasts_variances_and_normalises_weights():
    means = torch.zeros(3, 2)
    assert torch.equal(GaussianMixture(means, 2.0).variances, torch.full((3, 2), 2.0, dtype=F64))
    assert torch.equal(GaussianMixture(means, [1.0, 2.0, 3.0]).variances[:, 1], torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    assert torch.allclose(GaussianMixture(means, 1.0, [1.0, 1.0, 2.0]).weights, torch.tensor([0.25, 0.25, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="variances must be > 0"):
        GaussianMixture(means, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(means, 1.0, [1.0, 1.0])


def test_random_mixture_is_seeded_and_labels_every_class():
    a, b = GaussianMixture.random(4, 5, n_classes=3, seed=7), GaussianMixture.random(4, 5, n_classes=3, seed=7)
    assert torch.equal(a.means, b.means) and torch.equal(a.variances, b.variances)
    assert (a.dim, a.n_components) == (4, 5) and sorted(set(a.classes.tolist())) == [0, 1, 2]
    assert not torch.equal(a.means, GaussianMixture.random(4, 5, seed=8).means)


def test_log_prob_matches_scipy(mixture):
    x = mixture.sample(50, gen(0))
    expected = sum(w * stats.multivariate_normal(m, np.diag(v)).pdf(x.numpy())
                   for w, m, v in zip(mixture.weights.numpy(), mixture.means.numpy(), mixture.variances.numpy()))
    assert np.allclose(mixture.log_prob(x).numpy(), np.log(expected), rtol=1e-12, atol=1e-12)


def test_mean_and_covariance_match_monte_carlo(mixture):
    x = mixture.sample(200_000, gen(1))
    mean, cov = sample_moments(x)
    assert torch.allclose(mean, mixture.mean(), atol=0.02)
    assert torch.allclose(cov, mixture.covariance(), atol=0.05)


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.5), (0.3, 0.95), (0.01, 3.0)])
def test_noised_is_the_marginal_of_alpha_x0_plus_sigma_eps(mixture, alpha, sigma):
    n = 200_000
    x0 = mixture.sample(n, gen(2))
    xt = alpha * x0 + sigma * torch.randn(n, mixture.dim, generator=gen(3), dtype=F64)
    marginal = mixture.noised(alpha, sigma)
    mean, cov = sample_moments(xt)
    scale = marginal.covariance().diagonal().sqrt()
    # within ~5 standard errors of the empirical moments
    assert torch.all((mean - marginal.mean()).abs() < 5 * scale / math.sqrt(n))
    assert torch.allclose(cov, marginal.covariance(), atol=5 * 2 * scale.max().item() ** 2 / math.sqrt(n))
    # and it is the distribution, not just its moments: a KS test per coordinate
    for d in range(mixture.dim):
        cdf = lambda u: sum(w * stats.norm(m, math.sqrt(v)).cdf(u) for w, m, v in
                            zip(marginal.weights.numpy(), marginal.means[:, d].numpy(), marginal.variances[:, d].numpy()))
        assert stats.kstest(xt[:20_000, d].numpy(), cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# The exact posterior


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_mean_is_tweedie(mixture, name):
    """E[x0 | x] = (x + sigma^2 grad log p_t(x)) / alpha, with the gradient by autograd of log_prob."""
    x = 3 * torch.randn(64, mixture.dim, generator=gen(4), dtype=F64)
    for alpha, sigma in noise_levels(SCHEDULES[name]()):
        x_req = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mixture.noised(alpha, sigma).log_prob(x_req).sum(), x_req)
        tweedie = (x + sigma**2 * grad) / alpha
        pred = mixture.posterior(x, alpha, sigma)
        assert rel_err(pred.x0, tweedie) < 1e-8
        assert rel_err(pred.eps, -sigma * grad) < 1e-8  # E[eps | x] = -sigma grad log p_t(x)
        assert torch.allclose(alpha * pred.x0 + sigma * pred.eps, x, rtol=1e-12, atol=1e-12)


def test_posterior_mean_matches_monte_carlo_bayes():
    """A brute-force Bayes average over prior samples weighted by the likelihood N(x; alpha x0, sigma^2)."""
    mix = GaussianMixture.random(1, 3, spread=1.5, std=0.6, seed=3)
    alpha, sigma, x = 0.8, 0.6, torch.tensor([[0.7]], dtype=F64)
    x0 = mix.sample(400_000, gen(5))
    log_lik = -0.5 * ((x - alpha * x0) / sigma) ** 2
    w = torch.softmax(log_lik[:, 0], 0)
    assert abs((w @ x0[:, 0]).item() - mix.posterior_mean(x, alpha, sigma).item()) < 5e-3


def test_posterior_limits_clean_data_and_pure_noise(mixture):
    x = torch.randn(32, mixture.dim, generator=gen(6), dtype=F64)
    assert torch.allclose(mixture.posterior_mean(x, 0.7, 0.0), x / 0.7, rtol=1e-14, atol=1e-14)
    assert torch.equal(mixture.posterior(x, 0.7, 0.0).eps, torch.zeros_like(x))
    far = mixture.posterior_mean(1e8 * x, 1.0, 1e8)  # SNR 1e-16: the posterior is the prior
    assert torch.allclose(far, mixture.mean().expand_as(x), atol=1e-6)
    assert torch.allclose(mixture.posterior_mean(x, 0.0, 1.0), mixture.mean().expand_as(x), atol=1e-14)


def test_per_sample_noise_levels_and_labels_match_a_loop(mixture):
    x = torch.randn(5, mixture.dim, generator=gen(7), dtype=F64)
    alpha = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.01], dtype=F64)
    sigma = torch.tensor([0.0, 0.4, 0.8, 1.0, 2.0], dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    batched = mixture.posterior(x, alpha, sigma, labels)
    for i in range(5):
        row = mixture.posterior(x[i:i + 1], alpha[i].item(), sigma[i].item(), int(labels[i]))
        assert torch.allclose(batched.x0[i], row.x0[0], rtol=1e-13, atol=1e-13)
        assert torch.allclose(batched.eps[i], row.eps[0], rtol=1e-13, atol=1e-13)


def test_class_conditional_posterior_uses_only_that_class(mixture):
    x = 2 * torch.randn(16, mixture.dim, generator=gen(8), dtype=F64)
    keep = mixture.classes == 1
    sub = GaussianMixture(mixture.means[keep], mixture.variances[keep], mixture.weights[keep])
    moved = GaussianMixture(torch.where(keep[:, None], mixture.means, mixture.means + 50.0), mixture.variances,
                            mixture.weights, mixture.classes)
    for alpha, sigma in [(1.0, 0.1), (0.6, 0.8), (0.05, 1.0)]:
        cond = mixture.posterior_mean(x, alpha, sigma, class_label=1)
        assert torch.allclose(cond, sub.posterior_mean(x, alpha, sigma), rtol=1e-12, atol=1e-12)
        assert torch.allclose(cond, mixture.conditional(1).posterior_mean(x, alpha, sigma), rtol=1e-12, atol=1e-12)
        assert torch.allclose(cond, moved.posterior_mean(x, alpha, sigma, class_label=1), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(cond, mixture.posterior_mean(x, alpha, sigma), atol=1e-3)
    with pytest.raises(ValueError, match="match no component"):
        mixture.posterior_mean(x, 1.0, 0.5, class_label=7)


def test_class_conditional_samples_come_from_that_class():
    means = 20.0 * torch.arange(6, dtype=F64)[:, None].expand(6, 2)  # far apart: no overlap
    mix = GaussianMixture(means, 1.0, [1, 2, 3, 1, 2, 3], classes=[0, 1, 2, 0, 1, 2])
    x = mix.sample(3000, gen(9), class_label=2)
    counts = torch.bincount(mix.component_log_probs(x).argmax(-1), minlength=6)
    assert counts[[0, 1, 3, 4]].sum() == 0
    assert abs(counts[2].item() / 3000 - 0.5) < 0.05  # equal weights within the class


# ---------------------------------------------------------------------------------------------
# The exact denoiser


def test_exact_denoiser_reshapes_keeps_dtype_and_is_consistent():
    mix = GaussianMixture.random(12, 4, seed=2)
    schedule = ContinuousVPSchedule("cosine")
    den = ExactDenoiser(mix, schedule)
    x = torch.randn(3, 3, 2, 2, generator=gen(10))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    pred = den(x, t)
    assert isinstance(pred, Prediction) and pred.x0.shape == x.shape and pred.x0.dtype == torch.float32
    alpha, sigma = schedule.alpha(t).reshape(-1, 1, 1, 1), schedule.sigma(t).reshape(-1, 1, 1, 1)
    assert torch.allclose(alpha * pred.x0.double() + sigma * pred.eps.double(), x.double(), atol=1e-5)
    expected = mix.posterior_mean(x.double().reshape(3, 12), schedule.alpha(t), schedule.sigma(t))
    assert torch.allclose(pred.x0.double().reshape(3, 12), expected, atol=1e-5)
    scalar = den(x.double(), 0.5)
    assert torch.allclose(scalar.x0[1], den(x.double(), t).x0[1], rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="does not flatten"):
        den(torch.randn(2, 5), 0.5)


# ---------------------------------------------------------------------------------------------
# The probability-flow ODE


@pytest.mark.parametrize("name", SCHEDULES)
def test_pf_ode_routes_agree_with_the_closed_form(gaussian, name):
    """Generic (ExactDenoiser) and mixture routes reproduce the one-Gaussian closed form to 1e-8."""
    schedule = SCHEDULES[name]()
    t_max, t_min, t_mid = schedule.t_max, schedule.t_min, 0.5 * (schedule.t_min + schedule.t_max)
    x = gaussian.noised(float(schedule.alpha(t_max)), float(schedule.sigma(t_max))).sample(32, gen(11))
    den = ExactDenoiser(gaussian, schedule)
    for t0, t1 in [(t_max, t_min), (t_max, t_mid), (t_mid, t_min), (t_max, None)]:
        exact = gaussian_pf_ode_solution(gaussian, schedule, x, t0, t1)
        assert rel_err(mixture_pf_ode_solution(gaussian, schedule, x, t0, t1), exact) < 1e-8
        assert rel_err(reference_pf_ode_solution(den, x, t0, t1), exact) < 1e-8


def test_closed_form_is_a_bijection_of_marginals(gaussian):
    """Standardised coordinates are preserved, so N(alpha m, alpha^2 v + sigma^2) maps onto the data."""
    schedule = EDMSchedule()
    z = torch.randn(16, 3, generator=gen(12), dtype=F64)
    x_t = gaussian.means[0] + torch.sqrt(gaussian.variances[0] + 80.0**2) * z
    x_0 = gaussian_pf_ode_solution(gaussian, schedule, x_t, 80.0)
    assert torch.allclose(x_0, gaussian.means[0] + gaussian.variances[0].sqrt() * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ddpm-linear", "edm"])
def test_generic_and_mixture_routes_agree_on_a_mixture(mixture, name):
    schedule = SCHEDULES[name]()
    x = mixture.noised(float(schedule.alpha(schedule.t_max)), float(schedule.sigma(schedule.t_max))).sample(32, gen(13))
    generic = reference_pf_ode_solution(ExactDenoiser(mixture, schedule), x, schedule.t_max, schedule.t_min)
    assert rel_err(generic, mixture_pf_ode_solution(mixture, schedule, x, schedule.t_max, schedule.t_min)) < 1e-8
    to_data = reference_pf_ode_solution(ExactDenoiser(mixture, schedule), x, schedule.t_max)
    assert rel_err(to_data, mixture_pf_ode_solution(mixture, schedule, x, schedule.t_max)) < 1e-8


def test_pf_ode_depends_on_the_schedule_only_through_sigma_bar(mixture):
    """x / alpha at equal sigma_bar evolves identically under VP and VE schedules."""
    vp, ve = ContinuousVPSchedule("linear"), EDMSchedule()
    t_vp = 0.6
    sb = float(vp.sigma_bar(t_vp))
    x_ve = mixture.noised(1.0, sb).sample(32, gen(14))
    out_ve = mixture_pf_ode_solution(mixture, ve, x_ve, sb)
    out_vp = mixture_pf_ode_solution(mixture, vp, float(vp.alpha(t_vp)) * x_ve, t_vp)
    assert rel_err(out_vp, out_ve) < 1e-8


def test_pf_ode_is_invertible(mixture):
    schedule = FlowMatchingSchedule()
    x0 = mixture.sample(32, gen(15))
    noise = mixture_pf_ode_solution(mixture, schedule, x0, None, schedule.t_max)
    back = mixture_pf_ode_solution(mixture, schedule, noise, schedule.t_max, None)
    assert rel_err(back, x0) < 1e-8


def test_pf_ode_transports_the_noise_marginal_to_the_data(mixture):
    """Exact samples of p_{t_max}, pushed through the ODE, are samples of the data distribution."""
    schedule = SCHEDULES["ddpm-linear"]()
    n = 1000
    alpha, sigma = float(schedule.alpha(schedule.t_max)), float(schedule.sigma(schedule.t_max))
    x_t = mixture.noised(alpha, sigma).sample(n, gen(16))
    x_0 = mixture_pf_ode_solution(mixture, schedule, x_t, schedule.t_max)
    data, other = mixture.sample(n, gen(17)), mixture.sample(n, gen(18))
    baseline_sw, baseline_mmd = sliced_wasserstein(data, other), mmd_rbf(data, other)
    assert sliced_wasserstein(x_0, data) < 2 * baseline_sw + 0.02
    assert mmd_rbf(x_0, data) < 3 * abs(baseline_mmd) + 2e-3
    # the metrics see the difference: stopping at sigma_bar = 1 leaves a measurably different distribution
    t_half = float(schedule.t_from_sigma_bar(1.0))
    early = mixture_pf_ode_solution(mixture, schedule, x_t, schedule.t_max, t_half) / schedule.alpha(t_half)
    assert sliced_wasserstein(early, data) > 3 * baseline_sw and mmd_rbf(early, data) > 5 * abs(baseline_mmd) + 2e-3
    # component frequencies match the weights
    freq = torch.bincount(mixture.component_log_probs(x_0).argmax(-1), minlength=mixture.n_components) / n
    assert torch.allclose(freq.double(), mixture.weights, atol=0.05)


def test_pf_ode_transports_a_gaussian_to_the_data_in_w2(gaussian):
    schedule = ContinuousVPSchedule("cosine")
    x_t = gaussian.noised(float(schedule.alpha(schedule.t_max)), float(schedule.sigma(schedule.t_max))).sample(4000, gen(19))
    x_0 = reference_pf_ode_solution(ExactDenoiser(gaussian, schedule), x_t, schedule.t_max, schedule.t_min)
    target = gaussian.noised(float(schedule.alpha(schedule.t_min)), float(schedule.sigma(schedule.t_min)))
    assert w2_to_gaussian(x_0, target.mean(), target.covariance()) < 0.06
    assert w2_to_gaussian(x_0 + 0.3, target.mean(), target.covariance()) > 0.45


def test_guided_ode_with_scale_one_is_the_conditional_ode_and_zero_the_unconditional(mixture):
    schedule = EDMSchedule()
    x = mixture.noised(1.0, 80.0).sample(16, gen(20))
    cond = mixture_pf_ode_solution(mixture, schedule, x, 80.0, class_label=0)
    uncond = mixture_pf_ode_solution(mixture, schedule, x, 80.0)
    assert rel_err(mixture_pf_ode_solution(mixture, schedule, x, 80.0, class_label=0, guidance_scale=1.0), cond) < 1e-9
    assert rel_err(mixture_pf_ode_solution(mixture, schedule, x, 80.0, class_label=0, guidance_scale=0.0), uncond) < 1e-9
    assert rel_err(mixture_pf_ode_solution(mixture, schedule, x, 80.0, class_label=0, guidance_scale=3.0), cond) > 1e-3


def test_cfg_denoiser_over_exact_denoisers_matches_the_guided_mixture_ode(mixture):
    schedule = ContinuousVPSchedule("linear")
    cfg = CFGDenoiser(ExactDenoiser(mixture, schedule, class_label=1), ExactDenoiser(mixture, schedule), 2.5)
    x = torch.randn(16, 2, generator=gen(21), dtype=F64)
    for t_end in (schedule.t_min, None):
        guided = mixture_pf_ode_solution(mixture, schedule, x, 1.0, t_end, class_label=1, guidance_scale=2.5)
        assert rel_err(reference_pf_ode_solution(cfg, x, 1.0, t_end), guided) < 1e-8


def test_generic_route_refuses_clean_data_for_an_opaque_denoiser(gaussian):
    class Opaque(Denoiser):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.schedule = inner, inner.schedule

        def forward(self, x, t):
            return self.inner(x, t)

    schedule = EDMSchedule()
    opaque = Opaque(ExactDenoiser(gaussian, schedule))
    x = gaussian.noised(1.0, 10.0).sample(8, gen(22))
    with pytest.raises(ValueError, match="clean data"):
        reference_pf_ode_solution(opaque, x, 10.0)
    with pytest.raises(ValueError, match="outside"):
        reference_pf_ode_solution(opaque, x, 100.0, 1.0)
    exact = gaussian_pf_ode_solution(gaussian, schedule, x, 10.0, schedule.t_min)
    assert rel_err(reference_pf_ode_solution(opaque, x, 10.0, schedule.t_min), exact) < 1e-8


def test_closed_form_needs_one_component(mixture):
    with pytest.raises(ValueError, match="one Gaussian"):
        gaussian_pf_ode_solution(mixture, EDMSchedule(), torch.zeros(1, 2), 1.0)


# ---------------------------------------------------------------------------------------------
# Distances


def test_w2_gaussian_in_one_dimension_is_the_textbook_formula():
    w = w2_gaussian(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]]))
    assert abs(w.item() - math.sqrt(1.5**2 + (2.0 - 0.5) ** 2)) < 1e-12


def test_w2_gaussian_is_zero_for_identical_symmetric_and_matches_commuting_case():
    g = gen(23)
    a, b = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    c1, c2 = a @ a.T + 0.1 * torch.eye(4, dtype=F64), b @ b.T + 0.1 * torch.eye(4, dtype=F64)
    m1, m2 = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    assert w2_gaussian(m1, c1, m1, c1) < 1e-6
    assert abs(w2_gaussian(m1, c1, m2, c2) - w2_gaussian(m2, c2, m1, c1)) < 1e-10
    # commuting (diagonal) covariances: W2^2 = |dm|^2 + |sqrt(v1) - sqrt(v2)|^2
    v1, v2 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64), torch.tensor([0.5, 2.0, 5.0, 1.0], dtype=F64)
    expected = math.sqrt(((m1 - m2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert abs(w2_gaussian(m1, torch.diag(v1), m2, torch.diag(v2)).item() - expected) < 1e-12
    # general case against scipy's sqrtm
    from scipy.linalg import sqrtm
    r2 = sqrtm(c2.numpy())
    cross = np.trace(sqrtm(r2 @ c1.numpy() @ r2)).real
    ref = math.sqrt(((m1 - m2) ** 2).sum().item() + np.trace(c1.numpy() + c2.numpy()) - 2 * cross)
    assert abs(w2_gaussian(m1, c1, m2, c2).item() - ref) < 1e-9


def test_w2_to_gaussian_fits_the_samples(gaussian):
    x = gaussian.sample(20_000, gen(24))
    assert w2_to_gaussian(x, gaussian.mean(), gaussian.covariance()) < 0.05
    shifted = w2_to_gaussian(x + torch.tensor([1.0, 0.0, 0.0], dtype=F64), gaussian.mean(), gaussian.covariance())
    assert abs(shifted - 1.0) < 0.05


def test_sliced_wasserstein_small_for_same_distribution_and_positive_for_shifted(mixture):
    x, y = mixture.sample(2000, gen(25)), mixture.sample(2000, gen(26))
    shift = torch.tensor([1.0, -1.0], dtype=F64)
    same, shifted = sliced_wasserstein(x, y), sliced_wasserstein(x, y + shift)
    assert same < 0.1 and shifted > 0.8
    # an exact shift c of the same points: SW^2 = mean over directions of (theta . c)^2 ~ |c|^2 / D
    assert abs(sliced_wasserstein(x, x + shift, n_projections=2048) - 1.0) < 0.03
    assert sliced_wasserstein(x, x) == 0
    # unequal sample counts go through quantile functions
    assert sliced_wasserstein(x, y[:1500]) < 0.1
    assert abs(sliced_wasserstein(x, x[:1500] + shift, n_projections=2048) - 1.0) < 0.1


def test_sliced_wasserstein_in_one_dimension_is_the_sorted_matching():
    x, y = torch.randn(100, 1, generator=gen(27), dtype=F64), torch.randn(100, 1, generator=gen(28), dtype=F64) + 0.5
    expected = ((x.sort(0).values - y.sort(0).values) ** 2).mean().sqrt()
    assert abs(sliced_wasserstein(x, y, n_projections=3) - expected) < 1e-12


def test_mmd_small_for_same_distribution_and_positive_for_shifted(mixture):
    x, y = mixture.sample(800, gen(29)), mixture.sample(800, gen(30))
    same = mmd_rbf(x, y)
    shifted = mmd_rbf(x, y + torch.tensor([1.0, 0.0], dtype=F64))
    assert abs(same) < 3e-3 and shifted > 0.03
    assert mmd_rbf(x.reshape(800, 1, 2), y.reshape(800, 2, 1), bandwidth=1.0) == mmd_rbf(x, y, bandwidth=1.0)
