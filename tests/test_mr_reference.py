"""MRSampler(reference=True) side by side with the MRS code's loop (grrrute/mr-sampler, ``utils/sampler.py``),
re-derived here from its x-space formulas and fed its own schedule table; and the measured effect of
each departure of our default from it on the exact MR testbed (the numbers of docs/faithfulness.md)."""

import math

import pytest
import torch

from fewstep.samplers.mr import MRSampler, MRSchedule
from fewstep.samplers.solvers import DPMSolverPP, _multistep_order
from fewstep.testbed import ExactMRDenoiser, GaussianMixture, affine_output_law, w2_gaussian

F64 = torch.float64
MU = torch.tensor([0.3, 0.5, 0.1, 0.9], dtype=F64)
STRONG = GaussianMixture(means=[(MU + torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64)).tolist()],
                         variances=[[0.1, 0.2, 0.05, 0.1]])
OFFICIAL = MRSchedule(theta_offset=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def mrs_table(T=100, s=0.008, eps=0.005, max_sigma=50 / 255):
    """The MRS code's IR-SDE table at t = 0..T: cosine thetas over T + 2 steps truncated, thetas_cumsum
    *keeping* theta_0, dt = -log(eps) / thetas_cumsum[-1]; alpha = exp(-cumsum dt), sigma = sigma_bars."""
    steps = T + 2
    u = torch.linspace(0, steps, steps + 1, dtype=F64) / steps
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    thetas = 1 - (abar / abar[0])[1:-1]
    cumsum = torch.cumsum(thetas, 0)
    dt = -math.log(eps) / cumsum[-1]
    alpha = torch.exp(-cumsum * dt)
    return alpha, torch.sqrt(max_sigma**2 * (1 - torch.exp(-2 * cumsum * dt)))


def mrs_loop(eps_fn, mu, x, M, order, parameterization):
    """``MRSampler.sampling`` (ODE, linspace, fit_target noise) in x-space, on the table's integer times."""
    alpha_t, sigma_t = mrs_table()
    times = torch.linspace(0, 100, M + 1, dtype=F64).flip(0)
    idx = times.round().long()
    assert torch.equal(idx.to(F64), times)  # integer times: no interpolation of the table
    al, si = alpha_t[idx], sigma_t[idx]
    la = torch.log(al) - torch.log(si)
    q = []

    def step(x, i, o):
        e = eps_fn(x, float(times[i - 1]))
        out = e if parameterization == "noise" else (x - si[i - 1] * e) / al[i - 1] - (1 - al[i - 1]) / al[i - 1] * mu
        q.insert(0, out)
        h = la[i] - la[i - 1]
        d1 = d2 = 0.0
        if o >= 2:
            r0 = (la[i - 1] - la[i - 2]) / h
            d1_0 = (q[0] - q[1]) / r0
            d1 = d1_0
        if o == 3:
            r1 = (la[i - 2] - la[i - 3]) / h
            d1_1 = (q[1] - q[2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
        if parameterization == "data":
            p1 = torch.exp(-h) - 1
            p2 = p1 / h + 1
            p3 = p2 / h - 0.5
            D = p1 * q[0] - (p2 * d1 if o >= 2 else 0) + (p3 * d2 if o == 3 else 0)
            ratio = si[i] / si[i - 1]
            return ratio * x - al[i] * D + mu * (1 - ratio + ratio * al[i - 1] - al[i])
        p1 = torch.exp(h) - 1
        p2 = p1 / h - 1
        p3 = p2 / h - 0.5
        D = p1 * q[0] + (p2 * d1 if o >= 2 else 0) + (p3 * d2 if o == 3 else 0)
        return al[i] / al[i - 1] * x - si[i] * D + mu * (1 - al[i] / al[i - 1])

    for i in range(1, order):
        x = step(x, i, i)
    for i in range(order, M):
        x = step(x, i, min(order, M - i) if M < 10 else order)
    return step(x, M, order)


def test_theta_offset_schedule_is_the_mrs_table():
    alpha, sigma = mrs_table()
    t = torch.arange(0, 101, dtype=F64)
    assert torch.allclose(OFFICIAL.alpha(t), alpha, rtol=1e-14, atol=0)
    assert torch.allclose(OFFICIAL.sigma(t), sigma, rtol=1e-12, atol=0)
    assert OFFICIAL.sigma(0.0).item() == pytest.approx(2.2e-3, rel=0.02)  # the official t = 0 is not clean data
    assert MRSchedule(t_min=0.1)._c(torch.tensor(0.0, dtype=F64)).item() == 0.0  # ours: t = 0 is clean data


#: max |ours - official| per dtype; measured 3.6e-14 (float64) and 2.1e-6 (float32)
PARITY = {torch.float64: 4e-14, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("parameterization", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("M", [5, 10, 20])
def test_reference_run_equals_the_mrs_loop(parameterization, order, M, dtype):
    den = ExactMRDenoiser(STRONG, OFFICIAL, MU)
    y_T = (50 / 255 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=F64)).to(dtype)
    mu = MU.to(dtype)
    ours = MRSampler(den, M, order=order, parameterization=parameterization, reference=True).sample(
        mu.expand(16, 4), y_T=y_T)
    official = mrs_loop(lambda x, t: den(x - mu, t).eps, mu, y_T + mu, M, order, parameterization)
    assert official.dtype == ours.dtype == dtype
    assert (ours - official).abs().max() <= PARITY[dtype]


def test_mrs_order_pattern():
    pattern = lambda n, order: "".join(str(_multistep_order(i, n, order, False, False, "mrs")) for i in range(n))  # noqa: E731
    assert pattern(5, 2) == "12212"
    assert pattern(5, 3) == "12213"
    assert pattern(12, 2) == "1" + "2" * 11
    ours = "".join(str(_multistep_order(i, 5, 2, False, True)) for i in range(5))
    assert ours == "12221"


def test_bad_reference_options_raise():
    with pytest.raises(ValueError, match="theta_offset"):
        MRSampler(ExactMRDenoiser(STRONG, MRSchedule(), MU), 10, reference=True)
    with pytest.raises(ValueError, match="pass method/order, not solver"):
        MRSampler(ExactMRDenoiser(STRONG, OFFICIAL, MU), 10, reference=True, solver=DPMSolverPP(2))
    with pytest.raises(ValueError, match="order_rule"):
        DPMSolverPP(2, order_rule="official")
    with pytest.raises(ValueError, match="discrete"):
        MRSchedule(discrete=False, theta_offset=True)
    with pytest.raises(ValueError, match="noisy t = 0"):
        MRSampler(ExactMRDenoiser(STRONG, MRSchedule(t_min=0.1), MU), 10, final="t_min")


def test_mr_scheduler_reference_loop_equals_the_native_reference_sampler():
    pytest.importorskip("diffusers")
    from fewstep.samplers.mr import MRScheduler

    den = ExactMRDenoiser(STRONG, OFFICIAL, MU)
    sched = MRScheduler(prediction_type="noise", reference=True)
    mu = MU.expand(8, 4).clone()
    sched.set_timesteps(5, mu=mu)
    y_T = 50 / 255 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = y_T + mu
    for t in sched.timesteps:
        x = sched.step(den(x - mu, float(t)).eps, t, x).prev_sample
    native = MRSampler(den, 5, parameterization="data", reference=True).sample(mu, y_T=y_T)
    assert torch.allclose(x, native, atol=1e-12)
    assert float(sched.grid.sigma[-1]) == pytest.approx(2.2e-3, rel=0.02)
