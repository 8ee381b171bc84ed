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
    wrapped = TimeShiftUNet(unet, config, window=40, cutoff=100)
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
    (lambda: TimeShiftUNet(torch.nn.Identity(), {"prediction_type": "v_prediction"}), "eps prediction"),
])
def test_bad_time_shift_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
