"""Heavy-ball momentum (HB, GHVB): reduction to the base methods at beta = 1, measured orders, stability
regions, diffusers schedulers, bad input."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.samplers import (GHVB, ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, HeavyBall, ModelDenoiser, Sampler,
                      TimeUniform, momentum_number)
from fewstep.testbed.convergence import endpoint_error, measured_order
from fewstep.samplers.momentum import ghvb_coefficients
from fewstep.testbed.stability import real_stability_interval

# The plot lives with the benchmark that draws it (benchmarks/ is scripts, not a package).
_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "stability_regions.py"
_spec = importlib.util.spec_from_file_location("stability_regions", _BENCH)
stability_regions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stability_regions)
plot_stability_regions = stability_regions.plot_stability_regions
from fewstep.testbed import ExactDenoiser, GaussianMixture

GAUSS = GaussianMixture(means=[[0.5, -1.0, 0.2, 0.0]], variances=[[0.3, 0.05, 1.0, 2.0]])
EDM, VP = EDMSchedule(), ContinuousVPSchedule("linear")
EDM_WINDOW = TimeUniform(t_start=3.0, t_end=0.5)  # uniform in sigma_bar: fixed-step AB is genuine AB


pytestmark = pytest.mark.usefixtures("one_thread")


def x_start(n=64):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run(denoiser, name, steps=8, **options):
    return Sampler(denoiser, name, steps=steps, **options).sample(x_start())


# -- beta = 1 is the base method ---------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_beta_one_reproduces_plms(order):
    den = ExactDenoiser(GAUSS, DiscreteVPSchedule.from_diffusers_config({}))
    plms = run(den, "plms", order=order, warmup="lower_order")
    assert torch.allclose(run(den, "hb", order=order, beta=1.0), plms, rtol=0, atol=1e-12)
    assert torch.allclose(run(den, "ghvb", order=order, beta=1.0), plms, rtol=0, atol=1e-12)
    assert torch.allclose(run(den, "ghvb", momentum=order), plms, rtol=0, atol=1e-12)


def test_ghvb_five_at_beta_one_is_ab5():
    den = ExactDenoiser(GAUSS, DiscreteVPSchedule.from_diffusers_config({}))
    assert torch.allclose(run(den, "ghvb", order=5, beta=1.0), run(den, "plms", order=5, warmup="lower_order"),
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_beta_one_reproduces_dpm_solver_pp_2m(steps):
    den = ExactDenoiser(GAUSS, DiscreteVPSchedule.from_diffusers_config({}))
    for lof in [True, False]:
        assert torch.allclose(run(den, "hb", steps, base="dpmsolver++", beta=1.0, lower_order_final=lof),
                              run(den, "dpmpp_2m", steps, lower_order_final=lof), rtol=0, atol=1e-12)


def test_beta_one_reproduces_base_methods_on_a_unet(make_tiny_unet):
    from diffusers import DDPMScheduler

    den = ModelDenoiser.from_diffusers(make_tiny_unet(), DDPMScheduler().config)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in [6, 10]:
        base = Sampler(den, "plms", steps=steps, warmup="lower_order").sample(x)
        assert torch.allclose(Sampler(den, "ghvb", steps=steps, momentum=4).sample(x), base, atol=1e-6)
        assert torch.allclose(Sampler(den, "hb", steps=steps, order=4, beta=1.0).sample(x), base, atol=1e-6)
        dpm = Sampler(den, "dpmpp_2m", steps=steps).sample(x)
        assert torch.allclose(Sampler(den, "hb", steps=steps, base="dpmsolver++", beta=1.0).sample(x), dpm, atol=1e-6)
        assert not torch.allclose(Sampler(den, "ghvb", steps=steps, momentum=3.8).sample(x), base, atol=1e-4)


def test_momentum_changes_the_result():
    den = ExactDenoiser(GAUSS, DiscreteVPSchedule.from_diffusers_config({}))
    assert not torch.allclose(run(den, "hb", beta=0.8), run(den, "hb", beta=1.0))
    assert not torch.allclose(run(den, "hb", beta=0.8, nesterov=True), run(den, "hb", beta=0.8))
    assert not torch.allclose(run(den, "hb", base="dpmsolver++", beta=0.8), run(den, "dpmpp_2m"))


# -- orders ----------------------------------------------------------------------------------------


ORDER_CASES = [
    # (sampler, options, schedule, timesteps, exact warm-up, steps, expected order)
    ("hb", dict(order=4, beta=0.8), EDM, EDM_WINDOW, 3, [32, 64, 128, 256], 1),
    ("hb", dict(order=2, beta=0.5), EDM, EDM_WINDOW, 1, [32, 64, 128, 256], 1),
    ("hb", dict(order=4, beta=0.8, nesterov=True), EDM, EDM_WINDOW, 3, [32, 64, 128, 256], 1),
    ("hb", dict(base="dpmsolver++", beta=0.8, lower_order_final=False), VP, "log_snr", 0, [32, 64, 128, 256], 1),
    ("ghvb", dict(order=1, beta=0.8), EDM, EDM_WINDOW, 0, [32, 64, 128, 256], 1),
    ("ghvb", dict(order=2, beta=0.8), EDM, EDM_WINDOW, 1, [32, 64, 128, 256], 2),
    ("ghvb", dict(order=2, beta=0.5), EDM, EDM_WINDOW, 1, [32, 64, 128, 256], 2),
    ("ghvb", dict(order=3, beta=0.8), EDM, EDM_WINDOW, 2, [32, 64, 128, 256], 3),
    ("ghvb", dict(momentum=3.8), EDM, EDM_WINDOW, 3, [32, 64, 128], 4),
]


@pytest.mark.parametrize("name,options,schedule,timesteps,exact_start,steps,order", ORDER_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES])
def test_measured_order(name, options, schedule, timesteps, exact_start, steps, order):
    errors = [endpoint_error(Sampler(ExactDenoiser(GAUSS, schedule), name, steps=n, timesteps=timesteps,
                                     final="t_min", **options), GAUSS, x_start(), exact_start) for n in steps]
    # GHVB's velocity starts at v = eps (no history), a transient that slows the approach to order 4
    assert measured_order(errors, steps) == pytest.approx(order, abs=0.6 if order == 4 else 0.4), errors


# -- stability regions -------------------------------------------------------------------------------


@pytest.mark.parametrize("order,interval", [(1, -2.0), (2, -1.0), (3, -6 / 11), (4, -3 / 10)])
def test_adams_bashforth_real_stability_intervals(order, interval):
    assert real_stability_interval("hb", order=order, beta=1.0) == pytest.approx(interval, abs=1e-6)
    assert real_stability_interval("ghvb", order=order, beta=1.0) == pytest.approx(interval, abs=1e-6)


@pytest.mark.parametrize("beta", [0.9, 0.8, 0.5])
def test_heavy_ball_euler_interval_matches_closed_form(beta):
    # x' = x + V', V' = (1 - b) V + b z x: stable on the real axis for z > -2 (2 - b) / b
    assert real_stability_interval("hb", order=1, beta=beta) == pytest.approx(-2 * (2 - beta) / beta, abs=1e-6)


def test_momentum_enlarges_the_stability_interval():
    plms4 = real_stability_interval("hb", order=4, beta=1.0)
    assert real_stability_interval("hb", order=4, beta=0.8) < plms4
    assert real_stability_interval("ghvb", order=4, beta=0.8) < plms4
    assert real_stability_interval("ghvb", order=4, beta=0.5) < real_stability_interval("ghvb", order=4, beta=0.8)


def test_ghvb_coefficients_sum_to_one():
    for order in range(1, 6):
        for beta in [0.1, 0.5, 0.8, 1.0]:
            assert sum(ghvb_coefficients(order, beta)) == pytest.approx(1.0, abs=1e-12)


def test_stability_plot_is_written(tmp_path):
    path = plot_stability_regions({"PLMS4": dict(method="hb", order=4, beta=1.0),
                                   "GHVB 3.8": dict(method="ghvb", order=4, beta=0.8)},
                                  str(tmp_path / "stability.png"), resolution=41)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- diffusers ----------------------------------------------------------------------------------------


def test_schedulers_in_ddpm_pipeline_match_the_native_samplers(make_tiny_unet):
    from diffusers import DDPMPipeline, DDPMScheduler

    from fewstep.samplers.schedulers import GHVBScheduler, HeavyBallScheduler

    unet, config = make_tiny_unet(), DDPMScheduler().config
    den = ModelDenoiser.from_diffusers(unet, config)
    for scheduler, name, options in [
        (GHVBScheduler.from_config(config, momentum=3.8), "ghvb", dict(momentum=3.8)),
        (HeavyBallScheduler.from_config(config, base="plms", beta=0.8), "hb", dict(beta=0.8)),
        (HeavyBallScheduler.from_config(config, base="dpmsolver++", beta=0.8), "hb",
         dict(base="dpmsolver++", beta=0.8)),
    ]:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
        native = Sampler(den, name, steps=8, **options).sample(x_T)
        expected = (native / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert np.abs(images - expected).max() <= 1e-5, name


def test_scheduler_round_trip_keeps_momentum(tmp_path):
    from diffusers import DDIMScheduler

    from fewstep.samplers.schedulers import GHVBScheduler

    s = GHVBScheduler.from_config(DDIMScheduler().config, momentum=2.5)
    s.save_pretrained(tmp_path)
    loaded = GHVBScheduler.from_pretrained(tmp_path)
    assert (loaded.solver.order, loaded.solver.beta) == (3, 0.5)


def test_heavy_ball_dpm_in_stable_diffusion_with_cfg_matches_diffusers_at_beta_one(tiny_sd_components):
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

    from fewstep.samplers.schedulers import HeavyBallScheduler

    sd_config = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False).config
    pipe = StableDiffusionPipeline(**tiny_sd_components, scheduler=PNDMScheduler.from_config(sd_config),
                                   tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        cond = pipe.text_encoder(torch.randint(0, 100, (1, 16), generator=g))[0]
        uncond = pipe.text_encoder(torch.randint(0, 100, (1, 16), generator=g))[0]

    def latents(scheduler):
        pipe.scheduler = scheduler
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5, num_inference_steps=8,
                    height=8, width=8, output_type="latent", generator=torch.Generator().manual_seed(5)).images

    ref = latents(DPMSolverMultistepScheduler.from_config(sd_config, timestep_spacing="trailing"))
    hb1 = latents(HeavyBallScheduler.from_config(sd_config, base="dpmsolver++", beta=1.0, timestep_spacing="trailing"))
    hb8 = latents(HeavyBallScheduler.from_config(sd_config, base="dpmsolver++", beta=0.8, timestep_spacing="trailing"))
    assert (hb1 - ref).abs().max() <= 1e-5
    assert (hb8 - ref).abs().max() > 1e-4
    assert torch.isfinite(hb8).all()


# -- bad input ------------------------------------------------------------------------------------------


def test_momentum_number_shorthand():
    assert momentum_number(3.8) == (4, pytest.approx(0.8))
    assert momentum_number(2.5) == (3, 0.5)
    assert momentum_number(1) == (1, 1.0)
    assert momentum_number(0.5) == (1, 0.5)
    assert (GHVB(momentum=3.8).order, GHVB(momentum=3.8).beta) == (4, pytest.approx(0.8))


@pytest.mark.parametrize("ctor,match", [
    (lambda: momentum_number(0), "positive"),
    (lambda: momentum_number(-1.5), "positive"),
    (lambda: momentum_number(6.2), "orders 1..5"),
    (lambda: momentum_number(float("nan")), "positive"),
    (lambda: GHVB(momentum=6.2), "orders 1..5"),
    (lambda: GHVB(order=4, beta=0.0), "beta"),
    (lambda: GHVB(order=4, beta=1.2), "beta"),
    (lambda: GHVB(order=6, beta=0.5), "order"),
    (lambda: HeavyBall(order=5, beta=0.5), "order"),
    (lambda: HeavyBall(beta=-0.1), "beta"),
    (lambda: HeavyBall(base="unipc"), "base"),
    (lambda: HeavyBall(base="dpmsolver++", momentum=3.8), "2M"),
    (lambda: HeavyBall(base="dpmsolver++", nesterov=True), "Nesterov"),
    (lambda: real_stability_interval("euler"), "unknown method"),
])
def test_bad_momentum_arguments_raise(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_bad_momentum_in_diffusers_config_raises():
    from fewstep.samplers.schedulers import GHVBScheduler

    with pytest.raises(ValueError, match="orders 1..5"):
        GHVBScheduler(momentum=6.2)


# -- side by side with the official momentum code (sWizad/momentum-diffusion) ---------------------------
# Its loops re-derived from ``momentum_scheduler.py`` (``AdamBmixer``, ``PLMSWithHBScheduler``,
# ``GHVBScheduler``, ``PLMSWithNTScheduler``, ``MomentumDPMSolverMultistepScheduler``) in its own variables:
# ``x' = (x / s0 + del_g update) s_1`` with ``s = sqrt(abar)``, ``g = sqrt(1 - abar) / s``.

DDPM = DiscreteVPSchedule.from_diffusers_config({})
_MIXER = {1: ((0, 1),), 2: ((2, 1), (-2, 1)), 3: ((18, 5), (-24, 8), (6, -1)),
          4: ((46, 9), (-78, 19), (42, -5), (-10, 1)),
          5: ((1650, 251), (-3420, 646), (2880, -264), (-1380, 106), (270, -19))}
_DENOM = {1: 1, 2: 2, 3: 12, 4: 24, 5: 720}


def adam_b_mixer(order, ets, b):
    """AdamBmixer: the b-dependent AB combination of the newest ``min(order, len(ets))`` entries, / b."""
    k = min(order, len(ets))
    prime = sum((c0 + c1 * b) * e for (c0, c1), e in zip(_MIXER[k], reversed(ets[-k:]))) / _DENOM[k]
    return prime / b


def official_plms_momentum(den, grid, x, kind, order, beta):
    s, g = grid.alpha, grid.sigma / grid.alpha
    ets, vel = [], None
    for i in range(grid.n_steps):
        grads = den(x, grid.t[i].item()).eps
        vel = grads if vel is None else vel
        if kind == "ghvb":
            vel = (1 - beta) * vel + beta * grads
            ets = (ets + [vel])[-order:]
            update = adam_b_mixer(order, ets, beta)
        else:
            ets = (ets + [grads])[-order:]
            prime = adam_b_mixer(order, ets, 1.0)
            vel = (1 - beta) * vel + beta * prime
            update = vel if kind == "hb" else (1 - beta) * vel + beta * prime
        x = (x / s[i] + (g[i + 1] - g[i]) * update) * s[i + 1]
    return x


def official_dpm_hb(den, grid, x, beta):
    """diffusers-0.18 DPM-Solver++(2M, midpoint) with lower_order_final (< 15 steps) and the official
    override of its second-order update (HB on D0 + D1 / 2)."""
    a, s = grid.alpha, grid.sigma
    lam = torch.log(a) - torch.log(s)
    ms, vel, n = [], None, grid.n_steps
    for i in range(n):
        ms = (ms + [den(x, grid.t[i].item()).x0])[-2:]
        h = lam[i + 1] - lam[i]
        if i == 0 or (i == n - 1 and n < 15):
            x = (s[i + 1] / s[i]) * x - a[i + 1] * torch.expm1(-h) * ms[-1]
            continue
        diff = ms[-1] + 0.5 * (ms[-1] - ms[-2]) / ((lam[i] - lam[i - 1]) / h)
        vel = diff if vel is None else (1 - beta) * vel + beta * diff
        x = (s[i + 1] / s[i]) * x - a[i + 1] * torch.expm1(-h) * vel
    return x


OFFICIAL_CASES = ([("ghvb", GHVB, dict(), o, b) for o in (1, 2, 3, 4, 5) for b in (0.5, 0.8)]
                  + [("hb", HeavyBall, dict(), o, b) for o in (1, 2, 3, 4) for b in (0.5, 0.8)]
                  + [("nt", HeavyBall, dict(nesterov=True), o, 0.8) for o in (2, 4)])


#: max |ours - official| allowed per dtype. Measured: 9e-14 in float64; in float32 up to 4.7e-5 for
#: GHVB5 (weights up to ~4 in magnitude, 12 steps of compounding round-off), 4e-6 below order 5.
PARITY = {torch.float64: 1e-11, torch.float32: 2e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,cls,extra,order,beta", OFFICIAL_CASES,
                         ids=[f"{c[0]}{c[3]}-beta{c[4]}" for c in OFFICIAL_CASES])
def test_momentum_equals_the_official_code(kind, cls, extra, order, beta, dtype):
    den = ExactDenoiser(GAUSS, DDPM)
    sampler = Sampler(den, cls(order=order, beta=beta, **extra), steps=12, final="t_min")
    x_T = x_start().to(dtype)
    official = official_plms_momentum(den, sampler.grid, x_T, kind, order, beta)
    assert official.dtype == dtype
    assert (sampler.sample(x_T) - official).abs().max() <= PARITY[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.5, 0.8, 1.0])
def test_heavy_ball_dpm_solver_equals_the_official_code(beta, dtype):
    den = ExactDenoiser(GAUSS, DDPM)
    sampler = Sampler(den, HeavyBall("dpmsolver++", beta=beta), steps=10, final="t_min")
    x_T = x_start().to(dtype)
    official = official_dpm_hb(den, sampler.grid, x_T, beta)
    assert official.dtype == dtype
    assert (sampler.sample(x_T) - official).abs().max() <= PARITY[dtype]
