"""Claims: ``LMS`` reproduces k-diffusion's ``sample_lms`` (coefficients and samples) on a k-diffusion
style denoiser built from the exact testbed, in EDM (VE) and VP schedules, and is fourth order.

k-diffusion is loaded without its package ``__init__`` (which imports training-only dependencies):
only ``k_diffusion/utils.py`` and ``k_diffusion/sampling.py`` are executed. Install it with
``pip install --no-deps k-diffusion`` (``torchsde`` and ``torchdiffeq`` come with fewstep[test]).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.samplers import ContinuousVPSchedule, EDMSchedule, Sampler, TimeUniform
from fewstep.samplers.lms import LMS, lms_coefficients

from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution
from _k_diffusion import k_diffusion_sampling

MIX = GaussianMixture(means=[[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 1.0]],
                      variances=[[0.3, 0.2, 0.5, 0.4], [0.2, 0.5, 0.3, 0.6]])
EDM = EDMSchedule()
VP = ContinuousVPSchedule("linear")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors run fastest on one thread

def x_start(n=64):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def k_sampling():
    """``k_diffusion.sampling``, loaded by file path under a bare ``k_diffusion`` package."""
    with k_diffusion_sampling() as sampling:
        yield sampling


def test_coefficients_match_k_diffusion(k_sampling):
    """Exact Lagrange integrals == k-diffusion's ``scipy.integrate.quad`` ones (to its quadrature)."""
    sigmas = np.array([80.0, 31.0, 14.6, 7.0, 3.1, 1.2, 0.5, 0.1, 0.0])
    worst = 0.0
    for order in (1, 2, 3, 4):
        for i in range(len(sigmas) - 1):
            k = min(i + 1, order)
            ref = [k_sampling.linear_multistep_coeff(k, sigmas, i, j) for j in range(k)]
            ours = lms_coefficients([sigmas[i - j] for j in range(k)], sigmas[i + 1])
            worst = max(worst, float(np.max(np.abs(np.subtract(ours, ref)) / np.maximum(1.0, np.abs(ref)))))
    print(f"max|coefficient diff| {worst:.2e}")
    assert worst < 1e-12


def test_coefficients_are_adams_bashforth_on_a_uniform_grid():
    h = -0.25
    assert np.allclose(lms_coefficients([1.0, 1.25, 1.5, 1.75], 1.0 + h), np.array([55, -59, 37, -9]) / 24 * h)


class KDenoiser:
    """k-diffusion's model contract ``D(x_bar, sigma_bar) -> x0_hat`` from a fewstep denoiser on the
    grid's times: ``x = alpha x_bar`` is fed at the time whose ``sigma_bar`` was asked for."""

    def __init__(self, denoiser, grid):
        self.denoiser, self.grid, self.calls = denoiser, grid, 0

    def __call__(self, x_bar, sigma_bar):
        i, self.calls = self.calls, self.calls + 1  # sample_lms asks for the grid's sigmas in order
        assert float(sigma_bar[0]) == pytest.approx(self.grid.sigma_bar[i].item(), rel=1e-6)
        return self.denoiser(self.grid.alpha[i].item() * x_bar, self.grid.t[i].item()).x0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("order", [1, 2, 4])
@pytest.mark.parametrize("schedule, timesteps", [(EDM, "karras"), (VP, "log_snr")], ids=["edm-karras", "vp-log_snr"])
def test_sample_lms_parity(k_sampling, schedule, timesteps, order, dtype):
    den = ExactDenoiser(MIX, schedule)
    sampler = Sampler(den, LMS(order), steps=10, timesteps=timesteps)
    grid = sampler.grid
    x_T = (x_start(16) * (1.0 if schedule.variance_preserving else grid.sigma[0].item())).to(dtype)
    ref = k_sampling.sample_lms(KDenoiser(den, grid), x_T / grid.alpha[0].item(), grid.sigma_bar.to(dtype),
                                disable=True, order=order)
    ours = sampler.sample(x_T)  # ends at clean data, alpha = 1: x == x_bar
    diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    print(f"max|diff| lms order {order} {timesteps} {dtype}: {diff:.2e} (|ref| <= {scale:.2f})")
    assert 0.05 < scale < 50
    assert diff <= (1e-5 if dtype == torch.float32 else 1e-12) * max(1.0, scale)
    if order == 4:  # the tolerance is discriminating: order 3 is far off
        other = Sampler(den, LMS(3), steps=10, timesteps=timesteps).sample(x_T)
        assert (other - ref).abs().max() > 1e3 * diff + 1e-4


def endpoint_error(schedule, solver, steps, timesteps, exact_start=0):
    """Max |error| at the grid end; the first ``exact_start`` results are replaced by the exact solution."""
    sampler = Sampler(ExactDenoiser(MIX, schedule), solver, steps=steps, timesteps=timesteps, final="t_min")
    grid = sampler.grid
    x0 = x_start() * (1.0 if schedule.variance_preserving else grid.sigma[0].item())

    def exact(k):
        return mixture_pf_ode_solution(MIX, schedule, x0, grid.t[0].item(), grid.t[k].item())

    run = solver.steps(grid, torch.zeros_like)
    _, t = next(run)
    x, k = x0, 0
    while t is not None:
        x, t = run.send((x, sampler.denoiser(x, t)))
        k += 1
        if k <= exact_start:
            x = exact(k)
    return (x - exact(grid.n_steps)).abs().max().item()


def measured_order(errors, steps):
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


# On EDM's schedule t = sigma_bar, so a time-uniform window is a uniform grid in the ODE's own variable.
WINDOW = TimeUniform(t_start=3.0, t_end=0.5)
ORDER_CASES = [
    # (order, schedule, timesteps, exact warm-up steps, steps, expected order)
    (2, EDM, WINDOW, 1, [32, 64, 128], 2),
    (3, EDM, WINDOW, 2, [32, 64, 128], 3),
    (4, EDM, WINDOW, 3, [64, 128, 256], 4),
    (4, VP, "log_snr", 0, [64, 128, 256], 4),  # full range: the warm-up at high noise is nearly exact
    # ... but on a window the Euler first step's O(h^2) error caps the global order at 2 eventually
    (4, EDM, WINDOW, 0, [256, 512, 1024], 2),
]


@pytest.mark.parametrize("order, schedule, timesteps, exact_start, steps, expected", ORDER_CASES,
                         ids=[f"lms{c[0]}-{'edm' if c[1] is EDM else 'vp'}-exact{c[3]}-{c[4][0]}" for c in ORDER_CASES])
def test_convergence_order(order, schedule, timesteps, exact_start, steps, expected):
    errors = [endpoint_error(schedule, LMS(order), n, timesteps, exact_start) for n in steps]
    measured = measured_order(errors, steps)
    print(f"order LMS({order}) {steps}: {measured:.2f}  errors {['%.2e' % e for e in errors]}")
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert measured == pytest.approx(expected, abs=0.35), errors


def test_nfe_and_bad_order():
    sampler = Sampler(ExactDenoiser(MIX, EDM), LMS(), steps=7, timesteps="karras")
    assert sampler.nfe == 7
    with pytest.raises(ValueError, match="order"):
        LMS(0)
