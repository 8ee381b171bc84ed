"""Claims: on flow-matching configs (SD3 / Flux / Sana style) ``FewstepScheduler`` builds diffusers' own
sigmas and timesteps bit for bit; our ``euler`` equals ``FlowMatchEulerDiscreteScheduler`` and our
``dpmpp_2m`` / ``dpmpp_3m`` equal ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` on the same model
and noise, in the scheduler loop and in tiny SD3 / Flux pipelines built offline; every sampler of ours
(momentum, Time-Shift, stochastic ones) runs there with the one-line swap and converges on the exact
testbed; a config that cannot be read is refused. diffusers' flow schedulers compute in float32 (they
upcast), so parity is ~1e-6 in both float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from fewstep.samplers import SAMPLERS, FlowMatchingSchedule  # noqa: E402
from fewstep.samplers.flow import calculate_shift, flow_sigmas  # noqa: E402
from fewstep.samplers.schedulers import FewstepScheduler, GHVBScheduler, HeavyBallScheduler  # noqa: E402

try:
    from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution
except ImportError:  # pragma: no cover - before the testbed moved
    from fewstep.samplers.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution

pytestmark = pytest.mark.usefixtures("one_thread")

TIME_SHIFT = {"sampler": "time_shift", "sampler_options": {"solver": "ddim", "window": 0.05, "cutoff": 0.2}}
EVERY_SAMPLER = [(name, {"sampler": name}) for name in SAMPLERS] + [("time_shift", TIME_SHIFT)]


def dpm_flow(**kw):
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", **kw)


FM_CONFIGS = {
    "default": {}, "shift3": {"shift": 3.0}, "dynamic": {"use_dynamic_shifting": True, "shift": 3.0},
    "dynamic-linear": {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    "karras": {"shift": 3.0, "use_karras_sigmas": True}, "exponential": {"shift": 3.0, "use_exponential_sigmas": True},
    "terminal": {"shift": 2.0, "shift_terminal": 0.1},
}


@pytest.mark.parametrize("pipeline_sigmas", [False, True], ids=["scheduler-sigmas", "flux-sigmas"])
@pytest.mark.parametrize("name", FM_CONFIGS)
def test_flow_match_grid_is_diffusers_own(name, pipeline_sigmas):
    ref = FlowMatchEulerDiscreteScheduler(**FM_CONFIGS[name])
    ours = FewstepScheduler.from_config(ref.config, sampler="euler")
    mu = 0.8 if ref.config.use_dynamic_shifting else None
    kw = {"sigmas": np.linspace(1.0, 1 / 7, 7), "mu": mu} if pipeline_sigmas else {"num_inference_steps": 7, "mu": mu}
    ref.set_timesteps(**kw)
    ours.set_timesteps(**kw)
    assert ours.is_flow and torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)


@pytest.mark.parametrize("config, mu", [({"flow_shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.9),
                                        ({"flow_shift": 1.0}, None)])
def test_dpm_flow_grid_is_diffusers_own(config, mu):
    ref = dpm_flow(**config)
    ours = FewstepScheduler.from_config(ref.config, sampler="dpmpp_2m")
    ref.set_timesteps(9, mu=mu)
    ours.set_timesteps(9, mu=mu)
    assert ours.config.timestep_spacing == "flow_dpm"
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps.float())


@pytest.mark.parametrize("config, kw", [({"flow_shift": 3.0}, {"num_inference_steps": 9}),
                                        ({"use_dynamic_shifting": True}, {"num_inference_steps": 9, "mu": 0.8}),
                                        ({"flow_shift": 5.0}, {"sigmas": np.linspace(1.0, 0.1, 9)})])
def test_unipc_flow_grid_is_diffusers_own(config, kw):
    """Wan's scheduler: the grid is UniPC's own (its first sigma 1 - 1e-6 is pure noise to float precision,
    so our first step from there is DDIM; our unipc therefore differs from diffusers' by ~1e-3 there)."""
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", **config)
    ours = FewstepScheduler.from_config(ref.config, sampler="euler")
    ref.set_timesteps(**kw)
    ours.set_timesteps(**kw)
    assert ours.config.timestep_spacing == "flow_unipc"
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps.float())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = loop(ref, x, **kw), loop(FewstepScheduler.from_config(ref.config, sampler="pndm"), x, **kw)
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.2  # PNDM vs UniPC: near, not equal


def velocity_model(x, t):
    """A smooth, time-dependent stand-in for a flow transformer."""
    return torch.tanh(x) * (1 + t / 1000) - 0.3 * x


def loop(scheduler, x, **kw):
    scheduler.set_timesteps(**kw)
    for t in scheduler.timesteps:
        x = scheduler.step(velocity_model(x, t), t, x).prev_sample
    return x


PARITY = {  # name -> (reference scheduler, our keywords, set_timesteps keywords)
    "euler-vs-FlowMatchEuler(shift=3)": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), {"sampler": "euler"},
                                          {"num_inference_steps": 8}),
    "euler-vs-FlowMatchEuler(dynamic, Flux sigmas)": (
        lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), {"sampler": "euler"},
        {"sigmas": np.linspace(1, 1 / 8, 8), "mu": 0.7}),
    "dpmpp_2m-vs-DPMSolver(flow, shift=3)": (lambda: dpm_flow(flow_shift=3.0), {"sampler": "dpmpp_2m"},
                                              {"num_inference_steps": 8}),
    "dpmpp_2m-vs-DPMSolver(flow, dynamic)": (lambda: dpm_flow(use_dynamic_shifting=True), {"sampler": "dpmpp_2m"},
                                              {"num_inference_steps": 8, "mu": 0.8}),
    "dpmpp_3m(reference)-vs-DPMSolver(flow, order 3)": (
        lambda: dpm_flow(flow_shift=3.0, solver_order=3),
        {"sampler": "dpmpp_3m", "sampler_options": {"third_order": "reference"}}, {"num_inference_steps": 8}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", PARITY)
def test_scheduler_loop_parity(case, dtype):
    make_ref, ours_kw, kw = PARITY[case]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = make_ref()
    ours = FewstepScheduler.from_config(ref.config, **ours_kw)
    a, b = loop(ref, x, **kw), loop(ours, x, **kw)
    diff = (a - b).abs().max().item()
    print(f"{case} {dtype}: max|diff| {diff:.2e}")
    assert b.dtype == dtype and diff < 3e-6


def test_first_step_from_pure_noise_is_flow_euler():
    """From sigma = 1 (alpha = 0) every sampler's first step is DDIM, which is FlowMatchEuler's step."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("dpmpp_2m", "pndm", "ghvb", "heun", "lms"):
        ref, ours = FlowMatchEulerDiscreteScheduler(), FewstepScheduler.from_config(
            FlowMatchEulerDiscreteScheduler().config, sampler=name)
        ref.set_timesteps(6)
        ours.set_timesteps(6)
        t = ours.timesteps[0]
        v = velocity_model(x, t)
        assert (ours.step(v, t, x).prev_sample - ref.step(v, t, x).prev_sample).abs().max() < 1e-6


# -- the exact testbed on a flow path -----------------------------------------------------------

MIX = GaussianMixture(means=[[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 1.0]],
                      variances=[[0.3, 0.2, 0.5, 0.4], [0.2, 0.5, 0.3, 0.6]])
PATH = FlowMatchingSchedule(0.0, 1.0)
EXACT = ExactDenoiser(MIX, PATH)


def exact_velocity(x, timestep):
    """The mixture's exact flow velocity ``eps - x0`` at ``t = timestep / 1000``."""
    pred = EXACT(x, float(timestep) / 1000)
    return pred.eps - pred.x0


def flow_run(kw, steps, x, shift=1.0):
    s = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=shift).config, **kw)
    s.set_timesteps(steps)
    out, g = x, torch.Generator().manual_seed(1)
    for t in s.timesteps:
        out = s.step(exact_velocity(out, t), t, out, generator=g).prev_sample
    return out, s


@pytest.mark.parametrize("name, kw", EVERY_SAMPLER, ids=[n for n, _ in EVERY_SAMPLER])
def test_every_sampler_converges_on_a_flow_path(name, kw):
    """From pure noise (sigma = 1) on FlowMatchEuler's grid, the error against the exact PF-ODE solution
    falls at least 2x from 10 to 40 steps (stochastic samplers: finite and on the data's scale)."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mixture_pf_ode_solution(MIX, FlowMatchingSchedule(1e-6, 1 - 1e-9), x, 1 - 1e-9)
    errors = []
    for steps in (10, 40):
        out, s = flow_run(kw, steps, x)
        assert torch.isfinite(out).all()
        errors.append((out - exact).abs().max().item())
    print(f"{name}: max error at 10 / 40 steps {errors[0]:.2e} / {errors[1]:.2e}")
    if s.solver.stochastic:
        assert out.abs().max() < 10
    elif name != "time_shift":  # Time-Shift moves off the ODE by design (its window below)
        assert errors[1] < errors[0] / 2 and errors[1] < 0.15  # the step to data is first order: sigma_last 0.025


def test_time_shift_with_no_window_is_its_solver():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    off = {"sampler": "time_shift", "sampler_options": {"solver": "plms", "window": 0.0, "cutoff": 0.2}}
    assert torch.equal(flow_run(off, 10, x)[0], flow_run({"sampler": "plms"}, 10, x)[0])


# -- tiny SD3 / Flux pipelines -------------------------------------------------------------------


def _vae(latent_channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035).eval()


@pytest.fixture(scope="module")
def sd3_pipe():
    """A randomly initialised SD3 pipeline (one joint block, 8x8 latents, no text encoders)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe():
    """A randomly initialised Flux pipeline (one double and one single block), dynamic shifting as Flux-dev."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=[4, 4, 8]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(1), text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, scheduler, steps=6):
    """Latents from ``pipe`` with ``scheduler``, prompt embeddings given directly (no tokenizer files)."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        embeds = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
        pooled = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0, num_inference_steps=steps,
                    height=8, width=8, output_type="latent", generator=torch.Generator().manual_seed(3)).images
    finally:
        pipe.scheduler = original


def _pipe(request, which):
    return request.getfixturevalue(f"{which}_pipe")


PIPELINE_PARITY = {  # (pipeline, reference scheduler, our sampler)
    "sd3-euler": ("sd3", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "euler"),
    "sd3-dpmpp_2m": ("sd3", lambda: dpm_flow(flow_shift=3.0), "dpmpp_2m"),
    "flux-euler": ("flux", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), "euler"),
    "flux-dpmpp_2m": ("flux", lambda: dpm_flow(use_dynamic_shifting=True), "dpmpp_2m"),
}


@pytest.mark.parametrize("case", PIPELINE_PARITY)
def test_pipeline_parity(request, case):
    which, make_ref, sampler = PIPELINE_PARITY[case]
    pipe = _pipe(request, which)
    ref_scheduler = make_ref()
    ours = FewstepScheduler.from_config(ref_scheduler.config, sampler=sampler)  # the README's one-line swap
    ref, got = generate(pipe, ref_scheduler), generate(pipe, ours)
    diff = (got - ref).abs().max().item()
    print(f"{case}: max|diff| {diff:.2e} (latents up to {ref.abs().max().item():.2f})")
    assert diff < 5e-6


@pytest.mark.parametrize("name, kw", EVERY_SAMPLER, ids=[n for n, _ in EVERY_SAMPLER])
def test_every_sampler_runs_in_a_flux_pipeline(flux_pipe, name, kw):
    calls = []
    handle = flux_pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        scheduler = FewstepScheduler.from_config(flux_pipe.scheduler.config, **kw)
        out = generate(flux_pipe, scheduler, steps=5)
    finally:
        handle.remove()
    assert torch.isfinite(out).all() and len(calls) == scheduler.nfe


def test_momentum_schedulers_swap_into_sd3(sd3_pipe):
    for cls, kw in [(HeavyBallScheduler, {"beta": 0.8}), (GHVBScheduler, {"momentum": 3.8})]:
        scheduler = cls.from_config(sd3_pipe.scheduler.config, **kw)
        assert scheduler.is_flow and torch.isfinite(generate(sd3_pipe, scheduler)).all()


def test_sd3_img2img_matches_flow_match_euler(sd3_pipe):
    """Mid-schedule start: ``scale_noise`` and ``set_begin_index`` as SD3's img2img pipeline calls them."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))

    def run(scheduler):
        pipe.scheduler = scheduler
        return pipe(image=image, strength=0.6, prompt_embeds=torch.ones(1, 5, 16), pooled_prompt_embeds=torch.ones(1, 8),
                    guidance_scale=1.0, num_inference_steps=10, output_type="latent",
                    generator=torch.Generator().manual_seed(3)).images

    ref = run(FlowMatchEulerDiscreteScheduler(shift=3.0))
    got = run(FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, sampler="euler"))
    assert (got - ref).abs().max().item() < 5e-6


# -- reading configs ---------------------------------------------------------------------------------


def test_flow_config_round_trips():
    ours = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config,
                                        sampler="ghvb")
    assert ours.config.noise_schedule == "flow" and ours.shift == 3.0 and ours.config.use_dynamic_shifting
    back = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert back.config.shift == 3.0 and back.config.use_dynamic_shifting
    again = FewstepScheduler.from_config(back.config)
    assert again.is_flow and again.sampler_name == "ghvb"


@pytest.mark.parametrize("config, match", [
    (lambda: FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config, "invert_sigmas"),
    (lambda: FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True).config, "use_beta_sigmas"),
    (lambda: {**dict(DPMSolverMultistepScheduler(use_flow_sigmas=True).config), "_class_name": "DEISMultistepScheduler"},
     "flow sigmas of DEIS"),
    (lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction").config, "without flow sigmas"),
    (lambda: {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5, "prediction_type": "sample"},
     "EDM config predicts 'sample'"),
    (lambda: {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 1348.0}, "VE"),
])
def test_unreadable_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        FewstepScheduler.from_config(config(), sampler="euler")


def test_flow_input_errors():
    s = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="mu"):
        s.set_timesteps(6)
    with pytest.raises(ValueError, match="same length"):
        s.set_timesteps(6, sigmas=[1.0, 0.5], mu=0.5)
    with pytest.raises(ValueError, match="flow-matching rule"):
        FewstepScheduler(noise_schedule="flow", timestep_spacing="leading")
    with pytest.raises(ValueError, match="noise_schedule"):
        FewstepScheduler(noise_schedule="ve")
    ddpm = FewstepScheduler()
    with pytest.raises(ValueError, match="sigmas"):
        ddpm.set_timesteps(sigmas=[1.0, 0.5])


def test_calculate_shift_is_fluxs():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as reference

    assert calculate_shift(1024, 256, 4096, 0.5, 1.15) == reference(1024, 256, 4096, 0.5, 1.15)
    s, t = flow_sigmas({"shift": 1.0}, "flow_match", 4)
    assert s[0] == 1.0 and np.array_equal(t, s * 1000)


# -- diffusers' scheduler-test conventions on a flow schedule --------------------------------------


def test_flow_scheduler_conventions(tmp_path):
    """save / load, step shape, scale_noise == FlowMatchEuler's, a mid-schedule start with and without
    set_begin_index, and the momentum adapters switching in both directions."""
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    ours = GHVBScheduler.from_config(ref.config, momentum=3.8)
    ours.save_pretrained(tmp_path)
    loaded = GHVBScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == \
        {k: v for k, v in ours.config.items() if not k.startswith("_")}
    assert loaded.is_flow and loaded.sampler_name == "ghvb"

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for s in (ref, ours):
        s.set_timesteps(10, mu=0.6)
    t = ours.timesteps[3:4]
    assert torch.allclose(ours.scale_noise(x0, t, noise), ref.scale_noise(x0, t, noise), atol=1e-6)
    out = ours.step(velocity_model(noise, ours.timesteps[0]), ours.timesteps[0], noise).prev_sample
    assert out.shape == noise.shape

    def mid_run(begin, set_begin):
        s = FewstepScheduler.from_config(ref.config, sampler="dpmpp_2m")
        s.set_timesteps(10, mu=0.6)
        if set_begin:
            s.set_begin_index(begin)
        x = s.scale_noise(x0, s.timesteps[begin:begin + 1], noise)
        for t in s.timesteps[begin:]:
            x = s.step(velocity_model(x, t), t, x).prev_sample
        return x

    assert torch.equal(mid_run(4, True), mid_run(4, False)) and torch.isfinite(mid_run(4, True)).all()
    assert torch.equal(mid_run(0, True), mid_run(0, False))

    hb = HeavyBallScheduler.from_config(ours.config)
    assert hb.is_flow and hb.sampler_name == "hb" and FewstepScheduler.from_config(hb.config).is_flow


def test_a_flow_unet_pipeline_samples_through_model_denoiser_as_diffusers_does(tmp_path):
    # What `fewstep train-teacher` with objective: flow exports: a DDPMPipeline with FlowMatchEuler. fewstep's
    # ModelDenoiser.from_diffusers reads it (velocity, called at N t), and Euler on the scheduler's sigmas is the
    # pipeline's own loop. (Its default grid, FlowUniform, is 1 - i / n; FlowMatchEuler's ends at 1 / N.)
    from diffusers import DDPMPipeline, UNet2DModel

    from fewstep.samplers import ModelDenoiser, Sampler
    from fewstep.samplers.timesteps import ExplicitTimesteps

    from conftest import TINY_UNET

    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    den = ModelDenoiser.from_diffusers(pipe.unet, pipe.scheduler)
    assert isinstance(den.schedule, FlowMatchingSchedule) and den.prediction_type == "flow"
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(6)
    sigmas = ExplicitTimesteps(pipe.scheduler.sigmas[:-1].double().tolist())
    ours = Sampler(den, "euler", steps=6, timesteps=sigmas).sample(x_T)
    assert Sampler(den, "euler", steps=4).grid.t[:-1].tolist() == [1.0, 0.75, 0.5, 0.25]
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=6,
                  output_type="np").images
    torch.testing.assert_close(((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1), torch.from_numpy(theirs),
                               atol=1e-5, rtol=0)


def test_model_denoiser_tells_a_flow_config_built_in_code_from_a_ddpm_one():
    # a config built in code has no _class_name: its keys say flow (never a DDPM schedule of default betas)
    from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel

    from fewstep.samplers import DiscreteVPSchedule, ModelDenoiser

    from conftest import TINY_UNET

    unet = UNet2DModel(**TINY_UNET)
    assert isinstance(ModelDenoiser.from_diffusers(unet, FlowMatchEulerDiscreteScheduler().config).schedule,
                      FlowMatchingSchedule)
    assert isinstance(ModelDenoiser.from_diffusers(unet, DDPMScheduler().config).schedule, DiscreteVPSchedule)
    with pytest.raises(ValueError, match="preconditioned inputs"):
        ModelDenoiser.from_diffusers(unet, EDMEulerScheduler().config)
