"""Claims: ``UniPC`` reproduces diffusers' ``UniPCMultistepScheduler`` (bh1 / bh2, orders 1-3, UniC on
and off, data and noise prediction) and has the convergence order the paper claims on the exact
Gaussian-mixture testbed: UniP-p order p, UniPC-p (UniC on) order p + 1, at NFE = steps.

Parity runs twice: in float32 against diffusers as shipped (its sigmas and coefficients are float32),
and in float64 with diffusers' sigmas replaced by float64 ones (then every coefficient is float64 on
both sides). Run with ``-s`` to see every measured max |difference| (docs/unipc_lms.md lists them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UniPCMultistepScheduler  # noqa: E402

from fewstep.samplers import (ContinuousVPSchedule, DiffusersSpacing, DiscreteVPSchedule, DPMSolverPP,  # noqa: E402
                              ModelDenoiser, Sampler)
from fewstep.samplers.unipc import UniPC, phi, unic_coefficients, unip_coefficients  # noqa: E402

try:  # the testbed is moving from fewstep.samplers to fewstep.testbed
    from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution
except ImportError:  # pragma: no cover - before the move
    from fewstep.samplers.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution

SHAPE = (2, 3, 8, 8)
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}  # max |difference| per unit of max |reference|
ENDPOINT = {"zero": "zero", "sigma_min": "t_min"}  # diffusers' final_sigmas_type -> our Grid endpoint

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"), pytest.mark.usefixtures("one_thread")]  # tiny tensors: one thread


@pytest.fixture(scope="module")
def unets(make_tiny_unet):
    unet = make_tiny_unet("epsilon")
    return {torch.float32: unet, torch.float64: make_tiny_unet("epsilon").double()}


def x_T(dtype):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)


@torch.no_grad()
def diffusers_unipc(unet, steps, dtype, **config):
    """diffusers' sampling loop; in float64 its float32 sigmas are replaced by float64 ones."""
    sched = UniPCMultistepScheduler(timestep_spacing="trailing", **config)
    sched.set_timesteps(steps)
    if dtype == torch.float64:
        ac = sched.alphas_cumprod.double()
        last = 0.0 if sched.config.final_sigmas_type == "zero" else ((1 - ac[0]) / ac[0]).sqrt().item()
        sched.sigmas = torch.cat([((1 - ac) / ac).sqrt()[sched.timesteps], torch.tensor([last], dtype=torch.float64)])
    x = x_T(dtype)
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x, sched


def ours(unet, sched, steps, dtype, **options):
    den = ModelDenoiser(unet, DiscreteVPSchedule.from_diffusers_config(sched.config), "epsilon")
    sampler = Sampler(den, UniPC(**options), steps=steps, timesteps=DiffusersSpacing("trailing"),
                      final=ENDPOINT[sched.config.final_sigmas_type])
    assert sampler.nfe == len(sched.timesteps) == steps, "UniC reuses the next model call: NFE = steps"
    return sampler.sample(x_T(dtype))


def assert_same(a, ref, label, tol):
    diff, scale = (a - ref).abs().max().item(), ref.abs().max().item()
    print(f"max|diff| {label:<58} {diff:.2e}  (|ref| <= {scale:.2f})")
    assert 0.05 < scale < 50, "reference sample is not of order one: the test would be vacuous"
    assert diff <= tol * max(1.0, scale), f"{label}: max |ours - diffusers| = {diff:.3e}"


# (variant, order, final_sigmas_type, lower_order_final, prediction); bh1 and noise prediction need
# final_sigmas_type="sigma_min": diffusers returns NaN on the step to sigma = 0 there (see below).
CASES = ([(v, p, "zero" if v == "bh2" else "sigma_min", True, "data") for v in ("bh1", "bh2") for p in (1, 2, 3)]
         + [(v, p, "sigma_min", False, "data") for v in ("bh1", "bh2") for p in (2, 3)]
         + [(v, p, "sigma_min", True, "noise") for v in ("bh1", "bh2") for p in (1, 2, 3)]
         + [(v, 3, "sigma_min", False, "noise") for v in ("bh1", "bh2")])


def _ids(c):
    return f"{c[0]}-order{c[1]}-{c[2]}-{'lof' if c[3] else 'nolof'}-{c[4]}"


# diffusers' float32 coefficients of the noise form differ from float64 ones by up to 1e-3 (measured):
# noise prediction is compared in float64 only.
PARITY = ([(c, torch.float32, 7) for c in CASES if c[4] == "data"] + [(c, torch.float64, 7) for c in CASES]
          + [(("bh2", 2, "zero", True, "data"), dtype, n) for dtype in (torch.float32, torch.float64) for n in (5, 20)])


@pytest.mark.parametrize("case, dtype, steps", PARITY,
                         ids=[f"{_ids(c)}-{str(d)[-7:]}-{n}steps" for c, d, n in PARITY])
def test_unipc_reproduces_diffusers(case, dtype, steps, unets):
    variant, order, final, lower_order_final, prediction = case
    unet = unets[dtype]
    ref, sched = diffusers_unipc(unet, steps, dtype, solver_order=order, solver_type=variant, final_sigmas_type=final,
                                 lower_order_final=lower_order_final, predict_x0=prediction == "data")
    out = ours(unet, sched, steps, dtype, order=order, variant=variant, lower_order_final=lower_order_final,
               prediction=prediction)
    assert_same(out, ref, f"{_ids((variant, order, final, lower_order_final, prediction))} {dtype} {steps}",
                TOL[dtype])


@pytest.mark.parametrize("disabled", [None, [1, 2]], ids=["all", "steps1-2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_corrector_off_matches_diffusers_disable_corrector(disabled, dtype, unets):
    steps = 8
    off = list(range(steps)) if disabled is None else disabled
    ref, sched = diffusers_unipc(unets[dtype], steps, dtype, solver_order=3, disable_corrector=off)
    options = dict(corrector=False) if disabled is None else dict(disable_corrector=disabled)
    out = ours(unets[dtype], sched, steps, dtype, order=3, **options)
    assert_same(out, ref, f"bh2 order3 disable_corrector={off} {dtype}", TOL[dtype])
    with_corrector, _ = diffusers_unipc(unets[dtype], steps, dtype, solver_order=3)
    assert (with_corrector - ref).abs().max() > 100 * TOL[dtype] * ref.abs().max(), "the corrector changes the sample"


def test_bh1_to_clean_data_is_finite_where_diffusers_is_not(unets):
    """diffusers' bh1 multiplies ``B(h) = -h = -inf`` by a zero residual on the step to sigma = 0 (NaN);
    our step to clean data is first order, whose limit is ``x0_hat``."""
    ref, sched = diffusers_unipc(unets[torch.float32], 6, torch.float32, solver_type="bh1")
    out = ours(unets[torch.float32], sched, 6, torch.float32, variant="bh1")
    assert torch.isfinite(out).all()
    if torch.isfinite(ref).all():  # fixed upstream: then the two must agree
        assert_same(out, ref, "bh1 order2 zero (diffusers fixed)", TOL[torch.float32])
    else:
        print("diffusers UniPC bh1 with final_sigmas_type='zero' returns NaN; ours is finite")


# ---------------------------------------------------------------------------------------------
# Equivalences and coefficients


MIX = GaussianMixture(means=[[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 1.0]],
                      variances=[[0.3, 0.2, 0.5, 0.4], [0.2, 0.5, 0.3, 0.6]])
VP = ContinuousVPSchedule("linear")


def x_start(n=64):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_unip2_bh2_without_corrector_is_dpm_solver_pp_2m():
    """UniP-2 with ``B(h) = e^h - 1`` and ``a_1 = 1/2`` is DPM-Solver++(2M) (midpoint), term for term."""
    den, x = ExactDenoiser(MIX, VP), x_start(8)
    a = Sampler(den, UniPC(order=2, corrector=False), steps=8, timesteps="log_snr").sample(x)
    b = Sampler(den, DPMSolverPP(order=2), steps=8, timesteps="log_snr").sample(x)
    assert (a - b).abs().max() < 1e-12
    c = Sampler(den, UniPC(order=1, corrector=False), steps=8, timesteps="log_snr").sample(x)
    d = Sampler(den, "ddim", steps=8, timesteps="log_snr").sample(x)
    assert (c - d).abs().max() < 1e-12, "UniP-1 is DDIM"


def test_phi_series_and_recursion_agree():
    for k in (1, 2, 3, 4):
        for z in (-0.999999, 0.999999):
            inside, outside = phi(k, z), phi(k, z * 1.000002)
            assert inside == pytest.approx(outside, rel=1e-5), (k, z)
    assert phi(1, -0.3) == pytest.approx(math.expm1(-0.3) / -0.3, rel=1e-15)
    assert phi(2, 1e-8) == pytest.approx(0.5, rel=1e-7)  # the recursion would cancel to garbage here


def test_unic2_tends_to_adams_moulton_as_h_vanishes():
    """On a uniform log-SNR grid (``r_1 = -1``) and ``h -> 0``, ``g_k / B(h) -> 1 / (k + 1)`` for both
    variants, and UniC-2's combination ``m_0 + a_1 (m_0 - m_-1) + a_2 (m_new - m_0)`` of the data
    predictions becomes the Adams-Moulton weights ``(5 m_new + 8 m_0 - m_-1) / 12``."""
    for variant in ("bh1", "bh2"):
        a1, a2 = unic_coefficients([-1.0], -1e-6, variant)
        weights = (a2, 1 + a1 - a2, -a1)  # on m_new, m_0, m_-1
        assert np.allclose(weights, (5 / 12, 8 / 12, -1 / 12), atol=1e-5), (variant, weights)
        assert unip_coefficients([-1.0], -0.3, variant) == [0.5]  # UniP-2's fixed a_1


# ---------------------------------------------------------------------------------------------
# Convergence order on the exact testbed


def endpoint_error(solver, steps, timesteps):
    """Max |error| at the grid end against the exact PF-ODE solution from the same ``x_T``."""
    sampler = Sampler(ExactDenoiser(MIX, VP), solver, steps=steps, timesteps=timesteps, final="t_min")
    x = x_start()
    exact = mixture_pf_ode_solution(MIX, VP, x, sampler.grid.t[0].item(), sampler.grid.t[-1].item())
    return (sampler.sample(x) - exact).abs().max().item()


def measured_order(errors, steps):
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


ORDER_CASES = [
    # (order, variant, corrector, prediction, timesteps, steps, expected order)
    (1, "bh2", False, "data", "log_snr", [16, 32, 64, 128], 1),
    (1, "bh2", True, "data", "log_snr", [16, 32, 64, 128], 2),
    (2, "bh2", False, "data", "log_snr", [16, 32, 64, 128], 2),
    (2, "bh1", True, "data", "log_snr", [16, 32, 64, 128], 3),
    (2, "bh2", True, "data", "log_snr", [16, 32, 64, 128], 3),
    (2, "bh2", True, "noise", "log_snr", [16, 32, 64, 128], 3),
    (3, "bh2", False, "data", "log_snr", [32, 64, 128, 256], 3),
    # UniPC-3 approaches 4 slowly (3.6 over 16..256 steps, 3.9 over 128..512)
    (3, "bh2", True, "data", "karras", [128, 256, 512], 4),
]


@pytest.mark.parametrize("order, variant, corrector, prediction, timesteps, steps, expected", ORDER_CASES,
                         ids=[f"unipc{c[0]}-{c[1]}-{'UniC' if c[2] else 'noUniC'}-{c[3]}" for c in ORDER_CASES])
def test_convergence_order(order, variant, corrector, prediction, timesteps, steps, expected):
    solver = UniPC(order=order, variant=variant, corrector=corrector, prediction=prediction, lower_order_final=False)
    errors = [endpoint_error(solver, n, timesteps) for n in steps]
    measured = measured_order(errors, steps)
    print(f"order {solver!r} {timesteps} {steps}: {measured:.2f}  errors {['%.2e' % e for e in errors]}")
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert measured == pytest.approx(expected, abs=0.35), errors


def test_bad_options_raise():
    for kwargs, match in [(dict(order=4), "order"), (dict(variant="bh3"), "variant"),
                          (dict(prediction="v"), "prediction")]:
        with pytest.raises(ValueError, match=match):
            UniPC(**kwargs)
