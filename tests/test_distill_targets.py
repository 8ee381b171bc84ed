"""Exact identities of the trajectory-distillation targets (research note distill.md 9.1, 9.4), float64."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.distill.targets import (addim_transfer, consistency_target, ddim_transfer, inverse_ddim,
                                     progressive_target, pseudo_huber, snr_plus_one_weight, truncated_snr_weight)
from fewstep.samplers import ContinuousVPSchedule
from fewstep.testbed import GaussianMixture, gaussian_pf_ode_solution

F64 = torch.float64


def cosine_coefficients(t) -> tuple[torch.Tensor, torch.Tensor]:
    """PD's cosine log-SNR schedule on [-20, 20]: ``lambda(t) = -2 log tan(a t + b)`` (log of alpha^2/sigma^2)."""
    t = torch.as_tensor(t, dtype=F64)
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    lam = -2 * torch.log(torch.tan(a * t + b))
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def _pair(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.9 * torch.rand(batch, generator=g, dtype=F64)
    s = t * torch.rand(batch, generator=g, dtype=F64)
    x = torch.randn(batch, 3, 4, 4, generator=g, dtype=F64)
    eps = torch.randn(batch, 3, 4, 4, generator=g, dtype=F64)
    return x, eps, cosine_coefficients(t), cosine_coefficients(s), g


def test_ddim_of_inverse_ddim_returns_the_target_point():
    x, eps, (a_t, s_t), (a_s, s_s), g = _pair(64)
    z_t = a_t[:, None, None, None] * x + s_t[:, None, None, None] * eps
    z_s = torch.randn(z_t.shape, generator=g, dtype=F64)
    x_inv = inverse_ddim(z_s, z_t, a_t, s_t, a_s, s_s)
    assert (ddim_transfer(x_inv, z_t, a_t, s_t, a_s, s_s) - z_s).abs().max() < 1e-12


def test_inverse_ddim_of_a_ddim_step_is_the_clean_estimate_it_used():
    x, eps, (a_t, s_t), (a_s, s_s), _ = _pair(64, seed=1)
    z_t = a_t[:, None, None, None] * x + s_t[:, None, None, None] * eps
    x_hat = 0.7 * x
    z_s = ddim_transfer(x_hat, z_t, a_t, s_t, a_s, s_s)
    assert (inverse_ddim(z_s, z_t, a_t, s_t, a_s, s_s) - x_hat).abs().max() < 1e-11


def test_one_student_step_from_the_pd_target_reproduces_two_teacher_steps():
    mix = GaussianMixture.random(dim=48, n_components=4, seed=3)
    x, eps, _, _, _ = _pair(32, seed=2)
    n = 8  # student steps; the teacher takes 2n
    i = torch.arange(32) % n
    t, mid, s = (i + 1) / n, (i + 0.5) / n, i / n
    (a_t, s_t), (a_m, s_m), (a_s, s_s) = map(cosine_coefficients, (t, mid, s))
    z_t = a_t[:, None, None, None] * x + s_t[:, None, None, None] * eps

    def teacher(z, a, sig):  # the exact denoiser as a frozen teacher
        return mix.posterior(z.flatten(1), a, sig).x0.reshape(z.shape)

    x_hat_t = teacher(z_t, a_t, s_t)
    z_mid = ddim_transfer(x_hat_t, z_t, a_t, s_t, a_m, s_m)
    x_hat_mid = teacher(z_mid, a_m, s_m)
    target, z_s = progressive_target(x_hat_t, x_hat_mid, z_t, (a_t, s_t), (a_m, s_m), (a_s, s_s), last_step=i == 0)
    two_teacher_steps = ddim_transfer(x_hat_mid, z_mid, a_m, s_m, a_s, s_s)
    assert (z_s - two_teacher_steps).abs().max() < 1e-12
    inner = i > 0
    one_student_step = ddim_transfer(target, z_t, a_t, s_t, a_s, s_s)
    assert (one_student_step[inner] - two_teacher_steps[inner]).abs().max() < 1e-11
    # The final step to data: the target is the teacher's midpoint estimate itself.
    assert torch.equal(target[~inner], x_hat_mid[~inner])


def test_consistency_training_with_one_teacher_step_per_segment_is_x_regression():
    # MCM eq. 8-9: CT (teacher = data x), n_rel = 1 so s is the segment end: the target is x exactly.
    x, eps, (a_t, s_t), (a_s, s_s), _ = _pair(64, seed=4)
    z_t = a_t[:, None, None, None] * x + s_t[:, None, None, None] * eps
    z_s = addim_transfer(x, z_t, a_t, s_t, a_s, s_s, x_var=0.0)  # |x - x_teacher| = 0: aDDIM is DDIM
    x_hat_ref = torch.randn_like(x)  # the student's own estimate at s: irrelevant when s is the end
    target = consistency_target(x_hat_ref, z_s, z_t, (a_t, s_t), (a_s, s_s), (a_s, s_s))
    assert (target - x).abs().max() < 1e-11


def test_a_perfect_multistep_student_has_zero_consistency_loss():
    # One Gaussian: the PF-ODE map is closed form. The perfect S-segment student is the x whose DDIM step
    # to the segment end lands on the exact ODE solution there; its target equals its own output.
    schedule = ContinuousVPSchedule("linear")
    mix = GaussianMixture.gaussian(dim=16, mean=0.5, std=1.3)
    t, s, end = 0.9, 0.7, 0.5

    def coef(u):
        return float(schedule.alpha(u)), float(schedule.sigma(u))

    def perfect_student(z, u):
        z_end = gaussian_pf_ode_solution(mix, schedule, z, u, end)
        return inverse_ddim(z_end, z, *coef(u), *coef(end))

    z_t = torch.randn(32, 16, generator=torch.Generator().manual_seed(5), dtype=F64)
    z_s = gaussian_pf_ode_solution(mix, schedule, z_t, t, s)  # an exact teacher step
    target = consistency_target(perfect_student(z_s, s), z_s, z_t, coef(t), coef(s), coef(end))
    assert (target - perfect_student(z_t, t)).abs().max() < 1e-10


def _posterior_variance_per_dim(mix: GaussianMixture, z: torch.Tensor, a, s) -> torch.Tensor:
    """``tr Var[x | z_t] / d`` of a mixture with diagonal components (closed form, per example)."""
    m, v = mix.means, mix.variances
    s2 = a**2 * v + s**2  # [K, D]
    diff = z[:, None, :] - a * m
    log_n = -0.5 * (diff**2 / s2 + torch.log(s2)).sum(-1)
    r = torch.softmax(mix.log_weights() + log_n, dim=-1)[..., None]
    mean_k = m + a * v * diff / s2
    var_k = v * s**2 / s2
    mean = (r * mean_k).sum(1)
    second = (r * (var_k + mean_k**2)).sum(1)
    return (second - mean**2).mean(-1)


def _sample_norm(mix, n_steps: int, adjusted: bool, z_1: torch.Tensor, eta: float = 0.75) -> float:
    z = z_1
    times = torch.linspace(1.0, 0.0, n_steps + 1, dtype=F64)
    for t, s in zip(times[:-1], times[1:]):
        (a_t, s_t), (a_s, s_s) = cosine_coefficients(t), cosine_coefficients(s)
        x_hat = mix.posterior(z, a_t, s_t).x0
        if adjusted:
            x_var = eta * _posterior_variance_per_dim(mix, z, a_t, s_t)
            z = addim_transfer(x_hat, z, a_t, s_t, a_s, s_s, x_var)
        else:
            z = ddim_transfer(x_hat, z, a_t, s_t, a_s, s_s)
    return float(z.square().mean())


def test_addim_iterates_have_a_larger_norm_than_ddim_in_64_dimensions():
    # Note 9.4 / MCM eq. 12-13: DDIM's samples are too small (its norm deficit is tr Var[z_s | z_t]);
    # aDDIM inflates the eps component. On 64-D data: aDDIM norm >= DDIM norm; DDIM below the truth;
    # DDIM's deficit shrinks with the number of steps.
    mix = GaussianMixture.random(dim=64, n_components=8, spread=0.8, std=0.5, seed=0)
    true_norm = float(mix.sample(20000, torch.Generator().manual_seed(1)).square().mean())
    z_1 = torch.randn(1000, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    ddim = [_sample_norm(mix, n, False, z_1) for n in (2, 4, 16)]
    addim = [_sample_norm(mix, n, True, z_1) for n in (2, 4, 16)]
    assert all(a > d for a, d in zip(addim, ddim)), (addim, ddim)
    assert all(d < true_norm for d in ddim), (ddim, true_norm)
    assert ddim[0] < ddim[1] < ddim[2]
    assert true_norm - ddim[2] < 0.5 * (true_norm - ddim[0])


def test_weights_and_pseudo_huber():
    alpha, sigma = torch.tensor([0.1, 0.6, 0.99], dtype=F64), None
    sigma = (1 - alpha**2).sqrt()
    snr = alpha**2 / sigma**2
    assert torch.allclose(truncated_snr_weight(alpha, sigma), torch.maximum(snr, torch.ones(3, dtype=F64)))
    assert torch.allclose(snr_plus_one_weight(alpha, sigma), 1 / sigma**2)  # SNR + 1 = 1 / sigma^2 on VP
    diff = torch.tensor([[3.0, 4.0], [1e-3, 0.0]], dtype=F64)
    loss = pseudo_huber(diff, c=1e-2)
    assert loss[0] == pytest.approx(math.sqrt(25 + 1e-4) - 1e-2)
    assert loss[1] == pytest.approx(1e-6 / (2 * 1e-2), rel=1e-2)  # quadratic for small errors
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(diff, 0.0)
