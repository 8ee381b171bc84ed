"""Claims: from an EDM config (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``: VE samples,
``c_in`` input scaling, ``0.25 log sigma`` timesteps, preconditioned outputs) our euler / dpmpp_2m equal
diffusers' on the same model and noise. From a Karras-sigma config (``use_karras_sigmas=True``: Euler / Heun / LMS style, or
DPM-Solver / UniPC style) ``FewstepScheduler`` builds diffusers' own sigmas and timesteps; in the pipeline
loop (``init_noise_sigma``, ``scale_model_input``, ``step``, as EulerDiscreteScheduler's pipelines call
them) our euler / heun / dpmpp_2m equal diffusers' EulerDiscrete / HeunDiscrete / DPMSolverMultistep with
Karras sigmas on the same model and noise, and in a tiny Stable Diffusion pipeline; configs whose sigma
rules are not read are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,  # noqa: E402
                       KDPM2DiscreteScheduler, LMSDiscreteScheduler, UniPCMultistepScheduler)

from fewstep.samplers.schedulers import FewstepScheduler  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.usefixtures("one_thread")]

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SPACINGS = {"leading": dict(timestep_spacing="leading", steps_offset=1), "linspace": dict(timestep_spacing="linspace"),
            "trailing": dict(timestep_spacing="trailing")}
SOURCES = {EulerDiscreteScheduler: "euler", HeunDiscreteScheduler: "heun", LMSDiscreteScheduler: "lms",
           DPMSolverMultistepScheduler: "dpmpp_2m", UniPCMultistepScheduler: "unipc"}


@pytest.mark.parametrize("named", [False, True], ids=["built", "loaded"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("cls", SOURCES, ids=[c.__name__ for c in SOURCES])
def test_karras_grid_is_diffusers_own(cls, spacing, named):
    ref = cls(use_karras_sigmas=True, **SD, **SPACINGS[spacing])
    config = {**dict(ref.config), "_class_name": cls.__name__} if named else ref.config
    ours = FewstepScheduler.from_config(config, sampler=SOURCES[cls] if cls is HeunDiscreteScheduler else "euler")
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    theirs = ref.sigmas.double()
    if cls is HeunDiscreteScheduler:  # its sigmas repeat every interior point (two calls per step)
        theirs = torch.cat([theirs[:1], theirs[1::2]])
    assert (ours.grid.sigma_bar - theirs).abs().max() <= 1e-7 * theirs.max()
    assert (ours.timesteps.double() - ref.timesteps.double()).abs().max() <= 1e-4


def eps_model(x, t):
    """A smooth, time-dependent stand-in for an eps-prediction UNet (input is the VP sample)."""
    return 0.9 * x + 0.1 * torch.sin(3 * x + t / 300)


def pipeline_loop(scheduler, z):
    """What Stable Diffusion's pipelines do with any scheduler."""
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


PARITY = {
    "euler-vs-EulerDiscrete(karras, leading)": (lambda: EulerDiscreteScheduler(use_karras_sigmas=True, **SD,
                                                                               **SPACINGS["leading"]), "euler"),
    "euler-vs-EulerDiscrete(karras, linspace)": (lambda: EulerDiscreteScheduler(use_karras_sigmas=True, **SD), "euler"),
    "heun-vs-HeunDiscrete(karras)": (lambda: HeunDiscreteScheduler(use_karras_sigmas=True, **SD), "heun"),
    "dpmpp_2m-vs-DPMSolver(karras)": (lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD), "dpmpp_2m"),
    "dpmpp_2m-vs-DPMSolver(karras, trailing, v)": (
        lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True, prediction_type="v_prediction", **SD,
                                            **SPACINGS["trailing"]), "dpmpp_2m"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", PARITY)
def test_pipeline_loop_parity(case, dtype):
    make_ref, sampler = PARITY[case]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = make_ref()
    ours = FewstepScheduler.from_config(ref.config, sampler=sampler)
    for s in (ref, ours):
        s.set_timesteps(12)
    a, b = pipeline_loop(ref, z), pipeline_loop(ours, z)
    diff = (a - b).abs().max().item()
    print(f"{case} {dtype}: max|diff| {diff:.2e} (samples up to {a.abs().max().item():.2f})")
    assert b.dtype == dtype and diff < 2e-5 * max(1.0, a.abs().max().item())


@pytest.fixture(scope="module")
def sd(tiny_sd_components):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components, scheduler=EulerDiscreteScheduler(use_karras_sigmas=True, **SD),
                                   tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        cond = pipe.text_encoder(torch.randint(0, 100, (1, 16), generator=g))[0]
        uncond = pipe.text_encoder(torch.randint(0, 100, (1, 16), generator=g))[0]
    return pipe, cond, uncond


@pytest.mark.parametrize("source, sampler", [(lambda: EulerDiscreteScheduler(use_karras_sigmas=True, **SD), "euler"),
                                             (lambda: HeunDiscreteScheduler(use_karras_sigmas=True, **SD), "heun"),
                                             (lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD),
                                              "dpmpp_2m")], ids=["euler", "heun", "dpmpp_2m"])
def test_stable_diffusion_pipeline_parity(sd, source, sampler):
    pipe, cond, uncond = sd

    def run(scheduler):
        pipe.scheduler = scheduler
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=5.0, num_inference_steps=8,
                    height=8, width=8, output_type="latent", generator=torch.Generator().manual_seed(5)).images

    ref = run(source())
    got = run(FewstepScheduler.from_config(source().config, sampler=sampler))
    diff = (got - ref).abs().max().item()
    print(f"SD {sampler}: max|diff| {diff:.2e}")
    assert diff < 2e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("config, match", [
    (lambda: {**dict(KDPM2DiscreteScheduler(use_karras_sigmas=True).config), "_class_name": "KDPM2DiscreteScheduler"},
     "Karras sigmas of KDPM2"),
    (lambda: EulerDiscreteScheduler(use_exponential_sigmas=True).config, "use_exponential_sigmas"),
    (lambda: EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.1).config, "sigma_min"),
    (lambda: EulerDiscreteScheduler(use_karras_sigmas=True, timestep_type="continuous").config, "timestep_type"),
])
def test_unread_karras_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        FewstepScheduler.from_config(config(), sampler="euler")


def test_karras_config_round_trips():
    ours = FewstepScheduler.from_config(DPMSolverMultistepScheduler(use_karras_sigmas=True).config, sampler="ghvb")
    back = FewstepScheduler.from_config(ours.config)
    assert back.config.use_karras_sigmas and back.config.karras_style == "dpm" and back.sampler_name == "ghvb"
    plain = FewstepScheduler.from_config(DPMSolverMultistepScheduler().config)
    assert not plain.config.use_karras_sigmas
    np.testing.assert_array_equal(plain.alphas_cumprod.numpy(), back.alphas_cumprod.numpy())


# -- EDM-preconditioned schedulers (Playground v2.5 style) ------------------------------------------


def edm_model(x_in, c_noise):
    """A stand-in for an EDM-preconditioned network F(c_in x, c_noise)."""
    return 0.8 * torch.tanh(x_in) + 0.1 * torch.sin(x_in + c_noise)


def edm_loop(scheduler, z):
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(edm_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


EDM_PARITY = {
    "euler-vs-EDMEuler": ("EDMEulerScheduler", {}, "euler"),
    "euler-vs-EDMEuler(v, exponential)": ("EDMEulerScheduler",
                                          {"prediction_type": "v_prediction", "sigma_schedule": "exponential"}, "euler"),
    "dpmpp_2m-vs-EDMDPMSolver": ("EDMDPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    "dpmpp_2m-vs-EDMDPMSolver(sigma_min end)": ("EDMDPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"},
                                                "dpmpp_2m"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", EDM_PARITY)
def test_edm_parity(case, dtype):
    import diffusers

    cls, kw, sampler = EDM_PARITY[case]
    ref = getattr(diffusers, cls)(**kw)
    ours = FewstepScheduler.from_config(ref.config, sampler=sampler)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    assert ours.is_edm and ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma))
    assert (ours.timesteps - ref.timesteps).abs().max() < 1e-6
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    a, b = edm_loop(ref, z), edm_loop(ours, z)
    diff = (a - b).abs().max().item()
    print(f"{case} {dtype}: max|diff| {diff:.2e} (samples up to {a.abs().max().item():.2f})")
    assert diff < 2e-6 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("sampler", ["pndm", "ghvb", "unipc", "heun", "sde_dpmpp_2m", "lms"])
def test_every_kind_of_sampler_runs_on_edm(sampler):
    from diffusers import EDMDPMSolverMultistepScheduler

    ours = FewstepScheduler.from_config(EDMDPMSolverMultistepScheduler().config, sampler=sampler)
    ours.set_timesteps(8)
    out = edm_loop(ours, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(out).all() and out.abs().max() < 10
