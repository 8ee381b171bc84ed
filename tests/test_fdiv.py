"""The math of f-distill and SIM on the exact toy of research note 9.3: a Gaussian student N(mu, s^2), the
two-mode teacher 0.5 N(-2, 0.5^2) + 0.5 N(2, 0.5^2), exact scores and ratios, no networks.

Expectations over the student's noise ``(z, eps)`` are taken on a trapezoid grid (spectrally accurate
for these smooth Gaussian-weighted integrands), so "the estimator's mean" is a number, not a sample."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.distill.fdiv import (F_DIVERGENCES, bin_totals, density_ratio, dmd_normaliser, f_function, f_weight,
                                  matching_gradient, normalise_by_bins, normalise_weight, sid_loss, sim_distance,
                                  sim_distance_grad, sim_loss, time_bins, vsd_loss)
from fewstep.testbed import GaussianMixture

F64 = torch.float64
MIX = GaussianMixture(torch.tensor([[-2.0], [2.0]]), 0.25)


def log_q(x, mu, s, a, sg):
    v = a * a * s * s + sg * sg
    return -0.5 * ((x - a * mu) ** 2 / v + torch.log(2 * math.pi * torch.as_tensor(v, dtype=F64)))


def log_p(x, a, sg):
    return MIX.noised(a, sg).log_prob(x[:, None])


def xhat_q(x, mu, s, a, sg):
    """E[x | x_t] under the student N(mu, s^2): mu + a s^2 (x_t - a mu) / (a^2 s^2 + sg^2)."""
    return mu + a * s * s * (x - a * mu) / (a * a * s * s + sg * sg)


def xhat_p(x, a, sg):
    return MIX.posterior_mean(x[:, None], a, sg)[:, 0]


def line(n=6001, half=16.0):
    x = torch.linspace(-half, half, n, dtype=F64)
    return x, x[1] - x[0]


def noise_grid(n=241, half=8.0):
    """(z, eps) points and their N(0, 1) x N(0, 1) trapezoid weights."""
    u = torch.linspace(-half, half, n, dtype=F64)
    w = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi) * (u[1] - u[0])
    z, e = torch.meshgrid(u, u, indexing="ij")
    return z.flatten(), e.flatten(), torch.outer(w, w).flatten()


def divergence(name, mu, s, a, sg):
    """D_f(p_t || q_t) = int q_t f(p_t / q_t) by quadrature."""
    x, dx = line()
    lq = log_q(x, mu, s, a, sg)
    r = torch.exp(log_p(x, a, sg) - lq)
    return float((torch.exp(lq) * f_function(name, r)).sum() * dx)


def fd_grad(fun, mu, s, step=1e-5):
    return torch.tensor([(fun(mu + step, s) - fun(mu - step, s)) / (2 * step),
                         (fun(mu, s + step) - fun(mu, s - step)) / (2 * step)], dtype=F64)


# ---------------------------------------------------------------------------------------------
# f-divergences


@pytest.mark.parametrize("name", list(F_DIVERGENCES))
def test_the_weight_is_f_second_derivative_times_r_squared(name):
    r = torch.logspace(-2, 1.5, 50, dtype=F64, requires_grad=True)
    (df,) = torch.autograd.grad(f_function(name, r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    torch.testing.assert_close(f_weight(name, r.detach()), d2f * r.detach() ** 2, rtol=1e-10, atol=1e-12)
    assert float(f_function(name, torch.ones(1, dtype=F64))) == pytest.approx(0.0, abs=1e-15)  # f(1) = 0


@pytest.mark.parametrize("name", list(F_DIVERGENCES))
def test_the_matching_gradient_is_the_gradient_of_the_divergence(name):
    """E_{z, eps}[h(r) (s_q - s_p) dx_t/dtheta] (the implemented per-sample gradient pushed through
    vsd_loss, exact ratio, no normalisation) equals the finite-difference gradient of D_f(p_t || q_t)."""
    mu0, s0, a, sg = 0.5, 1.2, 0.8, 0.6
    z, e, w = noise_grid()
    theta = torch.tensor([mu0, s0], dtype=F64, requires_grad=True)
    x = (theta[0] + theta[1] * z)[:, None]  # the generator's samples, [B, 1]
    xt = a * x.detach()[:, 0] + sg * e
    r = torch.exp(log_p(xt, a, sg) - log_q(xt, mu0, s0, a, sg))
    g = matching_gradient(xhat_q(xt, mu0, s0, a, sg)[:, None], xhat_p(xt, a, sg)[:, None], f_weight(name, r),
                          a * a / sg**2)
    (w * vsd_loss(x, g)).sum().backward()
    expected = fd_grad(lambda m, s: divergence(name, m, s, a, sg), mu0, s0)
    torch.testing.assert_close(theta.grad, expected, rtol=1e-5, atol=1e-7)


def _expected_grad(name, mu, s, a, sg, x, dx):
    """The estimator's mean in one dimension: E[g] and E[g z] = E_{x_t}[g E[z | x_t]] (Gaussian
    conditioning); checked against the two-dimensional grid in the test above's setting."""
    lq = log_q(x, mu, s, a, sg)
    r = torch.exp(log_p(x, a, sg) - lq)
    g = matching_gradient(xhat_q(x, mu, s, a, sg), xhat_p(x, a, sg), f_weight(name, r), a * a / sg**2)
    wq = torch.exp(lq) * dx
    ez = a * s * (x - a * mu) / (a * a * s * s + sg * sg)
    return torch.stack([(wq * g).sum(), (wq * g * ez).sum()])


def test_the_one_dimensional_reduction_equals_the_grid_mean():
    x, dx = line(4001)
    got = _expected_grad("js", 0.5, 1.2, 0.8, 0.6, x, dx)
    torch.testing.assert_close(got, fd_grad(lambda m, s: divergence("js", m, s, 0.8, 0.6), 0.5, 1.2),
                               rtol=1e-5, atol=1e-7)


def _descend(name, mu, s, steps=1200, lr=0.02, sigmas=(0.1, 0.3, 0.5, 1.0)):
    """Adam on (mu, log s) with the exact mean gradient, averaged over the note's noise levels (VE: a = 1)."""
    x, dx = line(1201, 12.0)
    theta = torch.tensor([mu, math.log(s)], dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        m, sd = float(theta[0].detach()), float(theta[1].detach().exp())
        g = sum(_expected_grad(name, m, sd, 1.0, sg, x, dx) for sg in sigmas)
        theta.grad = torch.stack([g[0], g[1] * sd])  # d/dlog s = s d/ds
        opt.step()
    return float(theta[0].detach()), float(theta[1].detach().exp())


def test_reverse_kl_from_a_skewed_start_seeks_a_mode_and_forward_kl_matches_moments():
    """Note 9.3's table: RKL ends at the mode (mu 1.98, s 0.52), FKL at (0, sqrt(0.25 + 4) = 2.06)."""
    mu, s = _descend("rkl", 1.5, 0.5)
    assert mu == pytest.approx(1.98, abs=0.02) and s == pytest.approx(0.52, abs=0.02)
    mu, s = _descend("kl", 1.5, 0.5)
    assert mu == pytest.approx(0.0, abs=0.02) and s == pytest.approx(math.sqrt(4.25), abs=0.02)


def test_a_logistic_discriminator_on_noised_real_vs_fake_recovers_log_r():
    """At the optimum of softplus(-D(real)) + softplus(D(fake)), D = log p_t / q_t."""
    torch.manual_seed(0)
    mu, s, sg, n = 0.5, 1.5, 0.5, 4096
    g = torch.Generator().manual_seed(0)
    real = MIX.sample(n, g)[:, 0] + sg * torch.randn(n, generator=g, dtype=F64)
    fake = mu + s * torch.randn(n, generator=g, dtype=F64) + sg * torch.randn(n, generator=g, dtype=F64)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32), torch.nn.SiLU(),
                              torch.nn.Linear(32, 1)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(400):
        loss = (torch.nn.functional.softplus(-net(real[:, None] / 2)).mean()
                + torch.nn.functional.softplus(net(fake[:, None] / 2)).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.linspace(-3, 3, 61, dtype=F64)
    with torch.no_grad():
        logit = net(x[:, None] / 2)[:, 0]
    true = log_p(x, 1.0, sg) - log_q(x, mu, s, 1.0, sg)
    weights = torch.exp(log_q(x, mu, s, 1.0, sg))  # where the student's samples are
    err = float((weights * (logit - true).abs()).sum() / weights.sum())
    assert err < 0.1, err
    # and through the clamps: r = exp(logit) within [0.1, 20]
    r = density_ratio(logit)
    assert float((weights * (r.log() - true.clamp(math.log(0.1), math.log(20))).abs()).sum() / weights.sum()) < 0.1


# ---------------------------------------------------------------------------------------------
# Ratio clamps and normalisations


def test_density_ratio_clamps_logits_then_ratios():
    logit = torch.tensor([-50.0, -3.0, 0.0, 2.0, 50.0, float("nan")])
    r = density_ratio(logit)
    assert r.tolist() == pytest.approx([0.1, 0.1, 1.0, math.exp(2.0), 20.0, 1.0])
    assert density_ratio(torch.tensor([[1.0, 3.0]])).item() == pytest.approx(math.exp(2.0))  # heads averaged
    with pytest.raises(ValueError, match="lower < upper"):
        density_ratio(logit, lower=20.0, upper=0.1)


def test_time_bin_normalisation_divides_by_each_bins_mean():
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    bins = time_bins(torch.tensor([0.05, 0.08, 0.95, 1.0]), 0.0, 1.0, 10)
    assert bins.tolist() == [0, 0, 9, 9]
    sums, counts = bin_totals(r, bins, 10)
    out, means = normalise_by_bins(r, bins, sums, counts)
    assert out.tolist() == pytest.approx([0.5, 1.5, 0.5, 1.5])
    assert means[0] == 2.0 and means[9] == 20.0 and means[5] == 1.0  # empty bins: 1
    # an EMA: rate 0.5 between the old mean 4 and the batch's 2; an unseen bin keeps its mean
    old = torch.full((10,), 4.0)
    out, means = normalise_by_bins(r, bins, sums, counts, old, 0.5)
    assert means[0] == 3.0 and means[5] == 4.0


def test_weight_normalisation_uses_the_global_batch_mean():
    h = torch.tensor([1.0, 3.0])
    # two processes: this one holds [1, 3], the other [4, 4] -> global mean 3
    assert normalise_weight(h, torch.tensor(12.0), 4).tolist() == pytest.approx([1 / 3, 1.0], rel=1e-5)


def test_reverse_kl_with_dmd_normalisation_is_dmd2s_gradient():
    g = torch.Generator().manual_seed(0)
    x, fake, real = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    ours = matching_gradient(fake, real, f_weight("rkl", torch.rand(3)), dmd_normaliser(x, real))
    # DMD2: p_real = x - real, p_fake = x - fake, grad = (p_real - p_fake) / |p_real|.mean
    p_real, p_fake = x - real, x - fake
    dmd2 = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
    torch.testing.assert_close(ours, dmd2, rtol=1e-4, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    vsd_loss(xg, ours).sum().backward()
    torch.testing.assert_close(xg.grad, ours)


# ---------------------------------------------------------------------------------------------
# SIM


def sim_objective(distance, c, mu, s, mu0, s0, a, sg):
    """D(theta) = E_{x_t ~ q_{theta0, t}} d(x_hat_p(x_t) - x_hat_{q_theta}(x_t)): sampling distribution
    held at theta0 (the stop-gradient), the student's score at theta."""
    x, dx = line()
    wq = torch.exp(log_q(x, mu0, s0, a, sg)) * dx
    y = (xhat_p(x, a, sg) - xhat_q(x, mu, s, a, sg))[:, None]
    return float((wq * sim_distance(y, distance, c)).sum())


def _sim_estimator_mean(loss_fn, mu0, s0, a, sg):
    z, e, w = noise_grid()
    theta = torch.tensor([mu0, s0], dtype=F64, requires_grad=True)
    x = (theta[0] + theta[1] * z)[:, None]
    xt = a * x[:, 0] + sg * e  # with the generator's gradient
    # the online score psi = the exact student score at theta0: fixed parameters, differentiable input
    loss = loss_fn(x, xhat_p(xt, a, sg)[:, None], xhat_q(xt, mu0, s0, a, sg)[:, None])
    (w * loss).sum().backward()
    return theta.grad


@pytest.mark.parametrize("distance,c", [("pseudo_huber", 0.5), ("pseudo_huber", 0.1), ("l2", 0.0)])
def test_the_sim_estimator_is_the_gradient_of_its_divergence(distance, c):
    mu0, s0, a, sg = 0.5, 1.2, 0.8, 0.6
    got = _sim_estimator_mean(lambda x, tp, tq: sim_loss(x, tp, tq, distance, c), mu0, s0, a, sg)
    expected = fd_grad(lambda m, s: sim_objective(distance, c, m, s, mu0, s0, a, sg), mu0, s0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_stopping_the_gradient_of_d_prime_or_the_papers_recalled_form_is_not_the_gradient():
    """What settles note 3.2's open question: only d'(y)^T (x_hat_psi - x) with the gradient through
    d'(y) too matches; d'(y) detached, or -d'(y)^T (x_hat_teacher - x) (the recalled paper form, in
    denoiser units) give other numbers."""
    mu0, s0, a, sg, c = 0.5, 1.2, 0.8, 0.6, 0.5
    expected = fd_grad(lambda m, s: sim_objective("pseudo_huber", c, m, s, mu0, s0, a, sg), mu0, s0)

    def detached(x, tp, tq):
        u = sim_distance_grad(tp - tq, "pseudo_huber", c).detach()
        return (u * (tq - x)).sum(1)

    def recalled(x, tp, tq):
        u = sim_distance_grad(tp - tq, "pseudo_huber", c)
        return -(u * (tp - x)).sum(1)

    for wrong in (detached, recalled):
        got = _sim_estimator_mean(wrong, mu0, s0, a, sg)
        assert (got - expected).norm() > 0.05 * expected.norm(), wrong.__name__


def test_sid_at_alpha_one_is_sim_with_squared_l2():
    g = torch.Generator().manual_seed(0)
    x, tp, tq = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(sid_loss(x, tp, tq, alpha=1.0), sim_loss(x, tp, tq, "l2") / 2)
    assert not torch.allclose(sid_loss(x, tp, tq, alpha=1.2), sim_loss(x, tp, tq, "l2") / 2)


def test_unknown_f_and_distance_are_refused():
    with pytest.raises(ValueError, match="unknown f-divergence"):
        f_weight("tv", torch.ones(1))
    with pytest.raises(ValueError, match="unknown SIM distance"):
        sim_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), "l1")
    with pytest.raises(ValueError, match="c must be > 0"):
        sim_distance_grad(torch.zeros(1, 1), "pseudo_huber", 0.0)
