"""Time-Shift sampling: identity when disabled, no shift for an exact model, the retargeting formula,
diffusers use, bad input."""

import math

import numpy as np
import pytest
import torch

from fewstep.samplers import DiffusersSpacing, DiscreteVPSchedule, ModelDenoiser, Sampler
from fewstep.samplers.denoisers import Prediction, broadcast_like
from fewstep.samplers.updates import ddim_step
from fewstep.testbed import ExactDenoiser, GaussianMixture, sliced_wasserstein
from fewstep.samplers.timeshift import TimeShift, TimeShiftDenoiser, TimeShiftUNet, variance_matched_times

SCHEDULE = DiscreteVPSchedule.from_diffusers_config({})
# Isotropic data in many dimensions: a sample's variance over its coordinates is a sharp estimate.
DATA = GaussianMixture.gaussian(256, mean=0.0, std=0.7)
LEADING = DiffusersSpacing("leading")


pytestmark = pytest.mark.usefixtures("one_thread")


def x_start(n=64, dim=256, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample(denoiser, solver, steps=10, **kw):
    return Sampler(denoiser, solver, steps=steps, timesteps=LEADING, **kw).sample(x_start())


class Biased(ExactDenoiser):
    """An exact denoiser whose eps is 5% too large: samples lose variance, as under exposure bias."""

    def forward(self, x, t):
        a, s = self.coefficients(t, x)
        return Prediction(eps=1.05 * super().forward(x, t).eps, x=x, alpha=broadcast_like(a, x),
                          sigma=broadcast_like(s, x))


@pytest.mark.parametrize("solver", ["ddim", "pndm", "plms", "dpmpp_2m", "heun", "ghvb"])
def test_disabled_shift_reproduces_the_wrapped_sampler(solver):
    den = Biased(DATA, SCHEDULE)
    plain = sample(den, solver)
    for window, cutoff in [(0.0, 300.0), (40.0, SCHEDULE.t_max)]:
        assert torch.equal(sample(TimeShiftDenoiser(den, window, cutoff), solver), plain)
        assert torch.equal(sample(den, TimeShift(solver, window, cutoff)), plain)


def test_shift_changes_the_result_when_enabled():
    den = Biased(DATA, SCHEDULE)
    plain = sample(den, "ddim")
    assert not torch.allclose(sample(TimeShiftDenoiser(den, 40, 100), "ddim"), plain)
    assert not torch.allclose(sample(den, TimeShift("ddim", 40, 100)), plain)


def test_exact_model_has_no_exposure_bias_to_correct():
    """With the exact denoiser (and the data's variance in the match) the systematic shift, the mean over
    samples, is small where a sample's variance identifies its time (150 < t < 500) and shrinks with
    more steps: what remains is the solver's own discretisation bias. Quality does not degrade."""
    data = GaussianMixture.gaussian(4096, std=0.7)
    den = ExactDenoiser(data, SCHEDULE)
    x_T = torch.randn(16, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def mean_shift(steps):
        shifted = TimeShiftDenoiser(den, window=40, cutoff=100, data_variance=0.49)
        out = Sampler(shifted, "ddim", steps=steps, timesteps=LEADING).sample(x_T)
        shifts = [float((r["t_shifted"] - r["t"]).mean()) for r in shifted.record if 150 < float(r["t"]) < 500]
        return sum(abs(v) for v in shifts) / len(shifts), out

    coarse, _ = mean_shift(20)
    fine, out = mean_shift(100)
    assert fine < coarse and fine < 5.0, (coarse, fine)  # of a +-20 window
    ref = data.sample(16, generator=torch.Generator().manual_seed(3))
    plain = Sampler(den, "ddim", steps=100, timesteps=LEADING).sample(x_T)
    assert sliced_wasserstein(out, ref) <= 1.05 * sliced_wasserstein(plain, ref)


def test_biased_model_is_shifted_towards_its_variance():
    den = Biased(DATA, SCHEDULE)
    shifted = TimeShiftDenoiser(den, window=40, cutoff=100, data_variance=0.49)
    sample(shifted, "ddim", steps=20)
    late = [r for r in shifted.record if 100 < float(r["t"]) < 600]
    # the samples carry less variance than nominal: their matched times are earlier (less noise)
    assert all(float((r["t_shifted"] - r["t"]).mean()) < 0 for r in late)


def test_variance_matched_times_picks_the_matching_noise_level():
    # zero data with noise at t_true; 65536 coordinates pin the variance to ~0.6%, i.e. t to ~+-5
    x = torch.randn(4, 65536, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_true = 420.0
    x = x * SCHEDULE.sigma(t_true)
    t_s = variance_matched_times(x, 400.0, SCHEDULE, window=60)
    assert torch.all((t_s - t_true).abs() <= 8), t_s
    assert torch.all(t_s == torch.round(t_s))  # integer timesteps on a discrete schedule
    wide = variance_matched_times(x, 300.0, SCHEDULE, window=40)
    assert torch.all(wide == 320)  # clipped to the window's edge


def test_target_time_step_is_ddim_to_the_shifted_time():
    """For DDIM the retargeted step equals a DDIM step from x_i straight to t_s (per sample)."""
    den = Biased(DATA, SCHEDULE)
    wrapper = TimeShift("ddim", window=40, cutoff=100)
    sampler = Sampler(den, wrapper, steps=4, timesteps=LEADING)  # 750, 500, 250, 0: step 1 -> 2 is shifted
    grid = sampler.grid
    x_T = x_start()
    # run the first step by hand, then the shifted second step
    x1 = ddim_step(*den(x_T, grid.t[0].item()), grid.alpha[1].item(), grid.sigma[1].item())
    pred = den(x1, grid.t[1].item())
    t_s = variance_matched_times(x1, grid.t[2].item(), SCHEDULE, 40)
    a, s = SCHEDULE.alpha(t_s)[:, None], SCHEDULE.sigma(t_s)[:, None]
    expected = a * pred.x0 + s * pred.eps

    seen = []
    sampler.sample(x_T, callback=seen.append)
    assert torch.allclose(seen[2]["x"], expected, atol=1e-10)
    assert len(wrapper.record) >= 1 and wrapper.record[0]["t_shifted"].shape == (64,)


def test_time_shift_unet_in_a_pipeline_equals_the_native_model_time_shift(make_tiny_unet):
    from diffusers import DDPMPipeline, DDPMScheduler

    from fewstep.samplers.schedulers import FewstepScheduler

    unet, config = make_tiny_unet(), DDPMScheduler().config
    wrapped = TimeShiftUNet(unet, config, window=40, cutoff=100, skip_first=False)
    pipe = DDPMPipeline(unet=wrapped, scheduler=FewstepScheduler.from_config(config, sampler="ddim",
                                                                             timestep_spacing="leading"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert len(wrapped.record) > 0

    native_den = TimeShiftDenoiser(ModelDenoiser.from_diffusers(unet, config), window=40, cutoff=100,
                                   skip_first=False)
    x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    native = Sampler(native_den, "ddim", steps=8, timesteps=LEADING).sample(x_T)
    expected = (native / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - expected).max() <= 1e-5


@pytest.mark.parametrize("make,match", [
    (lambda: TimeShiftDenoiser(ExactDenoiser(DATA, SCHEDULE), window=-1), "window"),
    (lambda: TimeShiftDenoiser(ExactDenoiser(DATA, SCHEDULE), cutoff=5000), "outside"),
    (lambda: TimeShiftDenoiser(ExactDenoiser(DATA, SCHEDULE), cutoff=math.nan), "cutoff"),
    (lambda: Sampler(ExactDenoiser(DATA, SCHEDULE), TimeShift("ddim", cutoff=-3), steps=4), "outside"),
    (lambda: TimeShift("ddpm"), "deterministic"),
    (lambda: TimeShift("sde_dpmpp_2m"), "deterministic"),
    (lambda: TimeShift("ddim", eta=0.5), "deterministic"),
    (lambda: TimeShift("nope"), "unknown sampler"),
    (lambda: TimeShift("ddim", rule="deis"), "unknown time-shift rule"),
    (lambda: TimeShift("pndm", prk="rk4"), "unknown prk"),
    (lambda: TimeShift("pndm", prk_midpoint="round"), "unknown prk_midpoint"),
    (lambda: TimeShift("pndm", prk="stretch", prk_midpoint="floor"), "official PNDM loop"),
    (lambda: TimeShift("ddim", rule="adm", prk_midpoint="floor"), "official PNDM loop"),
    (lambda: TimeShift("ddim", variance_of="prediction"), "variance_of"),
    (lambda: TimeShift("ddim", rule="dpm_solver"), "re-times DPM-Solver"),
    (lambda: TimeShift("dpmpp_3m", rule="dpm_solver"), "re-times DPM-Solver"),
    (lambda: TimeShiftUNet(torch.nn.Identity(), {"prediction_type": "v_prediction"}), "eps prediction"),
])
def test_bad_time_shift_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# Side by side with the official loops, re-derived from their formulas (TS-DPM's PNMSolver and
# DPM-Solver backbones, TS-DPM-ADM's ddim_sample) on the same denoiser and noise.

OFFICIAL_TIMES = [801, 701, 601, 501, 401, 301, 201, 101, 1]  # PNMSolver's grid for sample_speed 10


def abar(t):
    return SCHEDULE.alpha(torch.as_tensor(t, dtype=torch.float64)) ** 2


def official_shift(x, j, window, cutoff):
    """apply_time_shift: argmin over integer tau in [j - window//2, j + window//2] of (Var(x) - (1 - abar))^2."""
    half = int(window) // 2
    taus = torch.arange(max(j - half, 0), j + half + 1, dtype=torch.float64)
    var = x.reshape(x.shape[0], -1).var(dim=1)
    best = ((var[:, None] - (1 - abar(taus))[None, :]) ** 2).argmin(dim=1)
    return taus[best] if j > cutoff else torch.full((x.shape[0],), float(j), dtype=torch.float64)


def pndm_transfer(x, t, t_next, et, floor=True):
    """PNDM's eq. (9) as the official transfer writes it, per sample: abar read at ``alphas_cump[t.long()]``,
    the floor of a fractional time (``floor=False``: the schedule interpolated there, fewstep's default)."""
    at, an = (abar(torch.floor(v) if floor else v).reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) for v in (t, t_next))
    return x + (an - at) * (x / (at.sqrt() * (at.sqrt() + an.sqrt()))
                            - et / (at.sqrt() * (((1 - an) * at).sqrt() + ((1 - at) * an).sqrt())))


def official_pnm(den, x, method, window=40.0, cutoff=100.0, floor=True):
    """TS-DPM's PNMSolver.sample for 'euler' (DDIM), 's_pndm' and 'f_pndm' with time shift; the network
    gets the Runge-Kutta midpoint's fractional time, the transfer reads abar at its floor (``floor``)."""
    model = lambda x, t: den(x, t).eps  # noqa: E731
    transfer = lambda x, t, t_next, et: pndm_transfer(x, t, t_next, et, floor)  # noqa: E731
    ets, n = [], x.shape[0]
    for k, (i, j) in enumerate(zip(OFFICIAL_TIMES, OFFICIAL_TIMES[1:] + [0])):
        t = torch.full((n,), float(i), dtype=torch.float64)
        t_next = official_shift(x, j, window, cutoff) if k > 0 else torch.full((n,), float(j), dtype=torch.float64)
        if method == "euler":
            et = model(x, t)
        elif method == "s_pndm" and not ets:  # improved Euler
            e1 = model(x, t)
            ets.append(e1)
            et = (e1 + model(transfer(x, t, t_next, e1), t_next)) / 2
        elif method == "f_pndm" and len(ets) <= 2:  # Runge-Kutta, stages between t and the shifted t_next
            tm = (t + t_next) / 2
            e1 = model(x, t)
            ets.append(e1)
            e2 = model(transfer(x, t, tm, e1), tm)
            e3 = model(transfer(x, t, tm, e2), tm)
            e4 = model(transfer(x, t, t_next, e3), t_next)
            et = (e1 + 2 * e2 + 2 * e3 + e4) / 6
        else:
            ets = (ets + [model(x, t)])[-(2 if method == "s_pndm" else 4):]
            coeffs = (3 / 2, -1 / 2) if method == "s_pndm" else (55 / 24, -59 / 24, 37 / 24, -9 / 24)
            et = sum(c * e for c, e in zip(coeffs, reversed(ets)))
        x = transfer(x, t, t_next, et)
    return x


OURS = {"euler": lambda **kw: TimeShift("ddim", 40, 100, **kw),
        "s_pndm": lambda **kw: TimeShift("pndm", 40, 100, order=2, warmup="heun", **kw),
        "f_pndm": lambda **kw: TimeShift("pndm", 40, 100, **kw)}


#: max |ours - official| per dtype; measured 5.6e-15 (float64) and 1.7e-6 (float32)
PARITY = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["euler", "s_pndm", "f_pndm"])
def test_target_time_equals_the_official_pnm_loop(method, dtype):
    """``prk_midpoint="floor"`` is the official loop, floor of the half-integer midpoint included; the default
    ("interpolate") is the same loop with the schedule interpolated there, 4.5e-4 away on this testbed."""
    den, x_T = Biased(DATA, SCHEDULE), x_start().to(dtype)
    from fewstep.samplers import ExplicitTimesteps

    run = lambda wrapper: Sampler(den, wrapper, steps=9, timesteps=ExplicitTimesteps(OFFICIAL_TIMES),  # noqa: E731
                                  final="t_min").sample(x_T)
    floored, interpolated = OURS[method](prk_midpoint="floor"), OURS[method]()
    ours, ours_interpolated = run(floored), run(interpolated)
    assert len(floored.record) == 6 and any(bool((r["t_shifted"] != r["t"]).any()) for r in floored.record)
    official = official_pnm(den, x_T, method)
    assert official.dtype == ours.dtype == dtype
    assert (ours - official).abs().max() <= PARITY[dtype]
    assert (ours_interpolated - official_pnm(den, x_T, method, floor=False)).abs().max() <= PARITY[dtype]
    if method != "f_pndm":  # no midpoints: both rules are the official loop
        assert (ours_interpolated - official).abs().max() <= PARITY[dtype]
        return
    # the shifted warm-up steps (701 -> t_s, 601 -> t_s) have half-integer midpoints for some samples
    warm_up = [r["t_shifted"] + t_i for r, t_i in zip(floored.record[:2], (701, 601))]
    assert any(bool((s % 2 == 1).any()) for s in warm_up)
    assert 1e-4 < (ours_interpolated - official).abs().max() < 1e-3  # measured 4.5e-4 (float64)


def test_f_pndm_stretch_is_a_named_departure_from_the_official_warm_up():
    den, x_T = Biased(DATA, SCHEDULE), x_start()
    from fewstep.samplers import ExplicitTimesteps

    run = lambda prk: Sampler(den, TimeShift("pndm", 40, 100, prk=prk), steps=9,  # noqa: E731
                              timesteps=ExplicitTimesteps(OFFICIAL_TIMES), final="t_min").sample(x_T)
    official, stretch = run("official"), run("stretch")
    assert (official - official_pnm(den, x_T, "f_pndm", floor=False)).abs().max() <= 1e-12
    assert (stretch - official).abs().max() > 1e-2  # measured 0.04


def official_dpm_solver(den, x, times, window=40.0, cutoff=100.0, order=2):
    """TS-DPM's DPM_Solver.sample (multistep, noise prediction, 'dpm_solver' type, lower_order_final)
    with time shift: the target matched to the variance of the newest *noise prediction*, re-timed."""
    n, B = len(times) - 1, x.shape[0]
    full = lambda t: torch.full((B,), float(t), dtype=torch.float64)  # noqa: E731
    lam = lambda t: torch.log(SCHEDULE.alpha(t)) - torch.log(SCHEDULE.sigma(t))  # noqa: E731
    col = lambda v: v.reshape(-1, *[1] * (x.ndim - 1))  # noqa: E731

    def update(x, ms, ts, t, step_order):
        h = col(lam(t) - lam(ts[-1]))
        x_t = col(SCHEDULE.alpha(t) / SCHEDULE.alpha(ts[-1])) * x - col(SCHEDULE.sigma(t)) * torch.expm1(h) * ms[-1]
        if step_order == 1:
            return x_t
        d1 = (ms[-1] - ms[-2]) / (col(lam(ts[-1]) - lam(ts[-2])) / h)
        return x_t - 0.5 * col(SCHEDULE.sigma(t)) * torch.expm1(h) * d1

    ts = [full(times[0])]
    ms = [den(x, ts[0]).eps]
    for init in range(1, order):
        vec = full(times[init])
        x = update(x, ms, ts, vec, init)
        ms, ts = ms + [den(x, vec).eps], ts + [vec]
    for step in range(order, n + 1):
        vec = official_shift(ms[-1], int(times[step]), window, cutoff)
        x = update(x, ms, ts, vec, min(order, n + 1 - step))
        ts = (ts + [vec])[-order:]
        if step < n:
            ms = (ms + [den(x, vec).eps])[-order:]
    return x


def test_dpm_solver_rule_equals_the_official_dpm_solver_loop():
    den, x_T = Biased(DATA, SCHEDULE), x_start()
    trailing = DiffusersSpacing("trailing")
    wrapper = TimeShift("dpmsolver_2m", 40, 100, rule="dpm_solver")
    ours = Sampler(den, wrapper, steps=10, timesteps=trailing, final="t_min").sample(x_T)
    times = trailing.grid(SCHEDULE, 10, final="t_min").t.tolist()
    assert any(bool((r["t_shifted"] != r["t"]).any()) for r in wrapper.record)
    assert (ours - official_dpm_solver(den, x_T, times)).abs().max() <= 1e-12  # measured 7e-16
    # the official code watches the noise prediction's variance, not the sample's: variance_of="x" differs
    sane = TimeShift("dpmsolver_2m", 40, 100, rule="dpm_solver", variance_of="x")
    Sampler(den, sane, steps=10, timesteps=trailing, final="t_min").sample(x_T)
    assert any(bool((a["t_shifted"] != b["t_shifted"]).any()) for a, b in zip(wrapper.record, sane.record))


def test_adm_rule_centres_the_window_on_the_current_time():
    """TS-DPM-ADM: t_s matched to Var(x_i) around t_i (gated by t_i > cutoff); the DDIM step goes to
    t_{i+1} + (t_s - t_i)."""
    den = Biased(DATA, SCHEDULE)
    sampler = Sampler(den, TimeShift("ddim", window=40, cutoff=100, rule="adm"), steps=4, timesteps=LEADING)
    grid, x_T = sampler.grid, x_start()  # 750, 500, 250, 0
    x1 = ddim_step(*den(x_T, grid.t[0].item()), grid.alpha[1].item(), grid.sigma[1].item())
    pred = den(x1, grid.t[1].item())
    t_s = official_shift(x1, int(grid.t[1]), 40, 100)
    target = grid.t[2].item() + (t_s - grid.t[1].item())
    a, s = SCHEDULE.alpha(target)[:, None], SCHEDULE.sigma(target)[:, None]
    seen = []
    sampler.sample(x_T, callback=seen.append)
    assert torch.allclose(seen[2]["x"], a * pred.x0 + s * pred.eps, atol=1e-12)
    assert bool((t_s != grid.t[1]).any())


def test_model_time_never_shifts_the_first_call_wherever_the_grid_starts():
    from fewstep.samplers import ExplicitTimesteps

    den = Biased(DATA, SCHEDULE)
    grid = ExplicitTimesteps(OFFICIAL_TIMES)  # starts at 801, not at t_max
    for skip_first in (True, False):
        shifted = TimeShiftDenoiser(den, window=40, cutoff=100, skip_first=skip_first)
        for _ in range(2):  # the second run (no reset) is told apart by its first time rising again
            Sampler(shifted, "ddim", steps=9, timesteps=grid, final="t_min").sample(x_start())
        firsts = [r for r in shifted.record if float(r["t"]) == 801]
        assert len(firsts) == 2
        assert all(bool((r["t_shifted"] == 801).all()) == skip_first for r in firsts)
