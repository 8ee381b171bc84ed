"""Claims: fewstep reproduces diffusers' own schedulers, natively and as a drop-in diffusers scheduler.

The models are tiny random diffusers UNets made near-consistent (``tests/conftest.py``), so samples
stay of order one and a float32 discrepancy of 1e-5 means the same algorithm on the same grid. The
reference is always diffusers itself: its scheduler classes, ``DDPMPipeline`` and
``StableDiffusionPipeline``. Run with ``-s`` to see every measured max |difference|.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fewstep.samplers import (SAMPLERS, CFGDenoiser, DiffusersSpacing, DiscreteVPSchedule, ExplicitTimesteps,  # noqa: E402
                      ModelDenoiser, Sampler, diffusers_unet_fn)
from fewstep.samplers.schedulers import FewstepScheduler  # noqa: E402

TOL = 1e-5  # max |difference| in float32 for "the same sample"
SHAPE = (2, 3, 8, 8)
STEPS = [5, 10, 20]
#: A DDPM config with every field explicit, so ``from_config`` carries it (defaults are not carried).
DDPM_CONFIG = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                            clip_sample=True, variance_type="fixed_small", prediction_type="epsilon").config
#: Stable Diffusion v1's scheduler_config.json.
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
ENDPOINT = {"zero": "zero", "t_min": "sigma_min"}  # our Grid endpoint -> the adapter's final_sigmas_type

# diffusers' own numpy-2 deprecation noise (np.array(tensor, copy=False) in its set_timesteps).
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"), pytest.mark.usefixtures("one_thread")]  # tiny tensors: one thread


@pytest.fixture(scope="module")
def unets(make_tiny_unet):
    """The same random weights, read as an eps-predictor and as a v-predictor."""
    return {kind: make_tiny_unet(kind) for kind in ("epsilon", "v_prediction")}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same(ours, ref, label: str, tol: float = TOL):
    ours, ref = torch.as_tensor(ours), torch.as_tensor(ref)
    diff = (ours - ref).abs().max().item()
    print(f"max|diff| {label:<48} {diff:.2e}  (|ref| <= {ref.abs().max().item():.2f})")
    assert 0.05 < ref.abs().max().item() < 50, "reference sample is not of order one: the test would be vacuous"
    assert diff <= tol, f"{label}: max |ours - diffusers| = {diff:.3e} > {tol:.0e}"


@torch.no_grad()
def diffusers_loop(scheduler, unet, x_T, steps=None, generator=None, timesteps=None, **step_kwargs):
    """Stable Diffusion's sampling loop, without the pipeline: init_noise_sigma, scale_model_input, step."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def denoiser(unet, config, clip=None) -> ModelDenoiser:
    return ModelDenoiser(unet, DiscreteVPSchedule.from_diffusers_config(config), unet.prediction_type, clip=clip)


# ---------------------------------------------------------------------------------------------
# 1. Native API parity: samplers.Sampler == diffusers' scheduler, step for step


@dataclass(frozen=True)
class Case:
    """A diffusers scheduler and the fewstep sampler that should reproduce it."""

    reference: type
    reference_kwargs: dict
    sampler: str
    spacing: str
    final: str  # our Grid endpoint: "zero" or "t_min"
    options: dict = field(default_factory=dict)  # solver options
    steps_offset: int = 0
    clip: float | None = None
    step_kwargs: dict = field(default_factory=dict)  # extra kwargs of the diffusers step()

    def diffusers_scheduler(self, prediction_type="epsilon"):
        return self.reference(prediction_type=prediction_type, **self.reference_kwargs)

    def native(self, unet, config, steps) -> Sampler:
        return Sampler(denoiser(unet, config, self.clip), self.sampler, steps=steps,
                       timesteps=DiffusersSpacing(self.spacing, self.steps_offset), final=self.final, **self.options)

    def adapter(self, config) -> FewstepScheduler:
        """Our scheduler from the reference's config; prediction_type, steps_offset, clip_sample carry over."""
        return FewstepScheduler.from_config(config, sampler=self.sampler, sampler_options=self.options or None,
                                            timestep_spacing=self.spacing, final_sigmas_type=ENDPOINT[self.final])


DPM = DPMSolverMultistepScheduler
ODE_CASES = {
    "ddim": Case(DDIMScheduler, dict(clip_sample=False), "ddim", "leading", "zero"),
    # diffusers re-derives eps from the clipped x0 only with use_clipped_model_output=True, which is what
    # ModelDenoiser(clip=...) does; the adapter's clip_sample follows diffusers' default (raw eps).
    "ddim-clip": Case(DDIMScheduler, dict(clip_sample=True), "ddim", "leading", "zero", clip=1.0,
                      step_kwargs=dict(use_clipped_model_output=True)),
    "ddim-sd": Case(DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1), "ddim",
                    "leading", "t_min", steps_offset=1),
    "dpmpp_2m": Case(DPM, dict(timestep_spacing="trailing"), "dpmpp_2m", "trailing", "zero"),
    # diffusers' 3M is the reference code's (half-weight second difference); ours defaults to the Taylor one.
    "dpmpp_3m": Case(DPM, dict(timestep_spacing="trailing", solver_order=3), "dpmpp_3m", "trailing", "zero",
                     options=dict(third_order="reference")),
    "dpmpp_2m-heun": Case(DPM, dict(timestep_spacing="trailing", solver_type="heun"), "dpmpp_2m", "trailing",
                          "zero", options=dict(solver_type="heun")),
    "dpmpp_2m-no_lower_order_final": Case(DPM, dict(timestep_spacing="trailing", lower_order_final=False),
                                          "dpmpp_2m", "trailing", "zero", options=dict(lower_order_final=False)),
    "dpmpp_3m-no_lower_order_final": Case(DPM, dict(timestep_spacing="trailing", solver_order=3,
                                                    lower_order_final=False),
                                          "dpmpp_3m", "trailing", "zero",
                                          options=dict(lower_order_final=False, third_order="reference")),
    "dpmpp_2m-sigma_min": Case(DPM, dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"), "dpmpp_2m",
                               "trailing", "t_min"),
    "pndm": Case(PNDMScheduler, dict(skip_prk_steps=False), "pndm", "leading", "t_min"),
    "plms": Case(PNDMScheduler, dict(skip_prk_steps=True), "plms", "leading", "t_min"),
    "euler": Case(EulerDiscreteScheduler, dict(timestep_spacing="leading"), "euler", "leading", "zero"),
}
V_CASES = ["ddim", "dpmpp_2m", "dpmpp_3m", "euler"]
PARITY = [(name, "epsilon") for name in ODE_CASES] + [(name, "v_prediction") for name in V_CASES]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name, prediction_type", PARITY, ids=[f"{n}-{p}" for n, p in PARITY])
def test_sampler_and_adapter_reproduce_diffusers_scheduler(name, prediction_type, steps, unets):
    case, unet = ODE_CASES[name], unets[prediction_type]
    reference = case.diffusers_scheduler(prediction_type)
    x_T = torch.randn(SHAPE, generator=gen(1))
    ref = diffusers_loop(reference, unet, x_T, steps, **case.step_kwargs)

    sampler = case.native(unet, reference.config, steps)
    assert sampler.nfe == len(reference.timesteps), "same number of model calls as diffusers"
    assert_same(sampler.sample(x_T), ref, f"native {name} {prediction_type} {steps} steps")

    adapter = case.adapter(reference.config)
    assert adapter.config.prediction_type == prediction_type
    if case.step_kwargs:  # the adapter meets diffusers' default step(), as a pipeline calls it
        ref = diffusers_loop(reference, unet, x_T, steps)
    assert_same(diffusers_loop(adapter, unet, x_T, steps), ref, f"adapter {name} {prediction_type} {steps} steps")


def test_parity_tolerance_detects_a_changed_second_order_term(unets):
    """The 1e-5 criterion is discriminating: DPM-Solver++(2M) midpoint vs heun differ far beyond it."""
    config = DPM(timestep_spacing="trailing").config
    x_T = torch.randn(SHAPE, generator=gen(1))
    mid = ODE_CASES["dpmpp_2m"].native(unets["epsilon"], config, 10).sample(x_T)
    heun = ODE_CASES["dpmpp_2m-heun"].native(unets["epsilon"], config, 10).sample(x_T)
    assert (mid - heun).abs().max() > 100 * TOL


def test_custom_timesteps_match_dpm_solver(unets):
    """``set_timesteps(timesteps=[...])`` (diffusers' custom grids) runs the same grid as DPM-Solver++."""
    unet, custom = unets["epsilon"], [999, 800, 600, 450, 300, 200, 120, 60, 20]
    reference = DPM()
    x_T = torch.randn(SHAPE, generator=gen(1))
    ref = diffusers_loop(reference, unet, x_T, timesteps=custom)
    ours = diffusers_loop(FewstepScheduler(sampler="dpmpp_2m"), unet, x_T, timesteps=custom)
    native = Sampler(denoiser(unet, reference.config), "dpmpp_2m", steps=len(custom),
                     timesteps=ExplicitTimesteps(custom)).sample(x_T)
    assert_same(ours, ref, "adapter dpmpp_2m custom timesteps")
    assert_same(native, ref, "native dpmpp_2m custom timesteps")


@pytest.mark.parametrize("final", ["zero", "t_min"])
def test_ddim_eta_draws_the_same_noise_as_diffusers(final, unets):
    """DDIM with eta > 0: one ``randn`` per step from the caller's generator, as diffusers draws it."""
    unet, steps, eta = unets["epsilon"], 10, 0.5
    reference = DDIMScheduler(clip_sample=False, set_alpha_to_one=final == "zero")
    g = gen(7)
    ref = diffusers_loop(reference, unet, randn_tensor(SHAPE, generator=g), steps, generator=g, eta=eta)

    g = gen(7)
    sampler = Sampler(denoiser(unet, reference.config), "ddim", steps=steps, timesteps="leading", final=final, eta=eta)
    native = sampler.sample(torch.randn(SHAPE, generator=g), generator=g)
    assert_same(native, ref, f"native ddim eta={eta} final={final}")

    adapter = FewstepScheduler.from_config(reference.config, sampler="ddim", sampler_options={"eta": eta},
                                           timestep_spacing="leading", final_sigmas_type=ENDPOINT[final])
    g = gen(7)
    assert_same(diffusers_loop(adapter, unet, randn_tensor(SHAPE, generator=g), steps, generator=g), ref,
                f"adapter ddim eta={eta} final={final}")

    deterministic = Sampler(denoiser(unet, reference.config), "ddim", steps=steps, timesteps="leading",
                            final=final).sample(torch.randn(SHAPE, generator=gen(7)))
    assert (native - deterministic).abs().max() > 1e-2, "the noise must matter, or the claim is vacuous"


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [5, 10])
def test_sde_dpmpp_2m_draws_the_same_noise_as_diffusers(solver_type, steps, unets):
    """SDE-DPM-Solver++(2M): diffusers draws one float32 ``randn`` per step (the last included), as we do."""
    unet = unets["epsilon"]
    reference = DPM(algorithm_type="sde-dpmsolver++", timestep_spacing="trailing", solver_type=solver_type)
    g = gen(3)
    ref = diffusers_loop(reference, unet, randn_tensor(SHAPE, generator=g), steps, generator=g)

    g = gen(3)
    sampler = Sampler(denoiser(unet, reference.config), "sde_dpmpp_2m", steps=steps, timesteps="trailing",
                      solver_type=solver_type)
    assert_same(sampler.sample(torch.randn(SHAPE, generator=g), generator=g), ref,
                f"native sde_dpmpp_2m {solver_type} {steps} steps")

    adapter = FewstepScheduler.from_config(reference.config, sampler="sde_dpmpp_2m",
                                           sampler_options={"solver_type": solver_type}, timestep_spacing="trailing")
    g = gen(3)
    assert_same(diffusers_loop(adapter, unet, randn_tensor(SHAPE, generator=g), steps, generator=g), ref,
                f"adapter sde_dpmpp_2m {solver_type} {steps} steps")


# ---------------------------------------------------------------------------------------------
# 2. Adapter parity inside a real diffusers.DDPMPipeline


def ddpm_images(unet, scheduler, steps=10, seed=0) -> np.ndarray:
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=SHAPE[0], generator=gen(seed), num_inference_steps=steps, output_type="np").images


PIPELINE_CASES = {
    # name: (diffusers scheduler from DDPM_CONFIG, FewstepScheduler.from_config overrides)
    "ddpm": (lambda: DDPMScheduler.from_config(DDPM_CONFIG),
             dict(sampler="ddpm", timestep_spacing="leading")),
    "ddpm-fixed_large": (lambda: DDPMScheduler.from_config(DDPM_CONFIG, variance_type="fixed_large"),
                         dict(sampler="ddpm", sampler_options={"variance": "large"}, timestep_spacing="leading")),
    "ddim": (lambda: DDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False),
             dict(sampler="ddim", timestep_spacing="leading", clip_sample=False)),
    "ddim-sigma_min": (lambda: DDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False, set_alpha_to_one=False),
                       dict(sampler="ddim", timestep_spacing="leading", final_sigmas_type="sigma_min",
                            clip_sample=False)),
    "dpmpp_2m": (lambda: DPM.from_config(DDPM_CONFIG, timestep_spacing="trailing"),
                 dict(sampler="dpmpp_2m", timestep_spacing="trailing", clip_sample=False)),
    "dpmpp_3m": (lambda: DPM.from_config(DDPM_CONFIG, timestep_spacing="trailing", solver_order=3),
                 dict(sampler="dpmpp_3m", sampler_options={"third_order": "reference"}, timestep_spacing="trailing",
                      clip_sample=False)),
    "dpmpp_2m-sigma_min": (lambda: DPM.from_config(DDPM_CONFIG, timestep_spacing="trailing",
                                                   final_sigmas_type="sigma_min"),
                           dict(sampler="dpmpp_2m", timestep_spacing="trailing", final_sigmas_type="sigma_min",
                                clip_sample=False)),
    "sde_dpmpp_2m": (lambda: DPM.from_config(DDPM_CONFIG, timestep_spacing="trailing",
                                             algorithm_type="sde-dpmsolver++"),
                     dict(sampler="sde_dpmpp_2m", timestep_spacing="trailing", clip_sample=False)),
}


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_adapter_in_ddpm_pipeline_gives_the_same_images(name, unets):
    make_reference, overrides = PIPELINE_CASES[name]
    unet = unets["epsilon"]
    ref = ddpm_images(unet, make_reference())
    ours = ddpm_images(unet, FewstepScheduler.from_config(DDPM_CONFIG, **overrides))
    assert ((ref > 0) & (ref < 1)).mean() > 0.5, "most pixels must be unclamped, or the claim is vacuous"
    assert_same(ours, ref, f"DDPMPipeline {name}")


def test_adapter_ddim_clip_sample_matches_diffusers_default(unets):
    unet = unets["epsilon"]
    ref = ddpm_images(unet, DDIMScheduler.from_config(DDPM_CONFIG))  # clip_sample=True carried
    ours = ddpm_images(unet, FewstepScheduler.from_config(DDPM_CONFIG, sampler="ddim", timestep_spacing="leading"))
    assert_same(ours, ref, "DDPMPipeline ddim clip_sample=True")


# ---------------------------------------------------------------------------------------------
# 3. A Stable-Diffusion pipeline with classifier-free guidance


@pytest.fixture(scope="module")
def sd(tiny_sd_components):
    """A StableDiffusionPipeline built offline from tiny components, plus prompt embeddings from its encoder."""
    pipe = StableDiffusionPipeline(**tiny_sd_components, scheduler=PNDMScheduler.from_config(SD_CONFIG),
                                   tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = gen(11)
    with torch.no_grad():
        cond = pipe.text_encoder(torch.randint(0, 100, (2, 16), generator=g))[0]
        uncond = pipe.text_encoder(torch.randint(0, 100, (2, 16), generator=g))[0]
    return pipe, cond, uncond


SD_CASES = {
    # name: (diffusers scheduler from SD's config, adapter overrides, native timesteps, native endpoint)
    "dpmpp_2m": (lambda c: DPM.from_config(c, timestep_spacing="trailing"),
                 dict(timestep_spacing="trailing"), DiffusersSpacing("trailing"), "zero"),
    "ddim": (lambda c: DDIMScheduler.from_config(c),  # leading, steps_offset=1, set_alpha_to_one=False
             dict(timestep_spacing="leading", final_sigmas_type="sigma_min"), DiffusersSpacing("leading", 1), "t_min"),
    "plms": (lambda c: PNDMScheduler.from_config(c),  # SD's own scheduler
             dict(timestep_spacing="leading", final_sigmas_type="sigma_min"), DiffusersSpacing("leading", 1), "t_min"),
}


def sd_latents(pipe, scheduler, cond, uncond, steps, scale=7.5):
    pipe.scheduler = scheduler
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=scale, num_inference_steps=steps,
                height=8, width=8, output_type="latent", generator=gen(5)).images


@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("name", SD_CASES)
def test_stable_diffusion_cfg_adapter_and_native_match_diffusers(name, steps, sd):
    pipe, cond, uncond = sd
    make_reference, overrides, spacing, final = SD_CASES[name]
    config = PNDMScheduler.from_config(SD_CONFIG).config
    ref = sd_latents(pipe, make_reference(config), cond, uncond, steps)
    ours = sd_latents(pipe, FewstepScheduler.from_config(config, sampler=name, **overrides), cond, uncond, steps)
    assert_same(ours, ref, f"StableDiffusionPipeline CFG {name} {steps} steps")

    schedule = DiscreteVPSchedule.from_diffusers_config(config)
    guided = CFGDenoiser(ModelDenoiser(diffusers_unet_fn(pipe.unet, encoder_hidden_states=cond), schedule),
                         ModelDenoiser(diffusers_unet_fn(pipe.unet, encoder_hidden_states=uncond), schedule), 7.5)
    x_T = randn_tensor(ref.shape, generator=gen(5))  # as the pipeline's prepare_latents draws it
    native = Sampler(guided, name, steps=steps, timesteps=spacing, final=final).sample(x_T)
    assert_same(native, ref, f"native CFGDenoiser {name} {steps} steps")
    if name == "dpmpp_2m" and steps == 10:
        unguided = sd_latents(pipe, make_reference(config), cond, uncond, steps, scale=1.0)
        assert (unguided - ref).abs().max() > 1e-2, "guidance must matter, or the claim is vacuous"


# ---------------------------------------------------------------------------------------------
# 4. The scheduler contract


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_save_pretrained_round_trip_keeps_sampler_and_options(tmp_path, unets):
    sched = FewstepScheduler.from_config(DDPM_CONFIG, sampler="ddim", sampler_options={"eta": 0.3},
                                         timestep_spacing="leading", final_sigmas_type="sigma_min", clip_sample=False)
    sched.save_pretrained(tmp_path)
    loaded = FewstepScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(sched.config)
    assert (loaded.config.sampler, loaded.solver.eta, repr(loaded.solver)) == ("ddim", 0.3, repr(sched.solver))
    assert torch.equal(loaded.alphas_cumprod, sched.alphas_cumprod)
    unet = unets["epsilon"]
    assert np.array_equal(ddpm_images(unet, loaded), ddpm_images(unet, sched))


class CountCalls:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_pipeline_visits_every_planned_model_call(name, unets):
    """``len(timesteps) == nfe`` for every sampler; DDPMPipeline makes exactly that many UNet calls and
    its images equal the native sampler's (stochastic ones included: same generator, same draws)."""
    unet, steps = unets["epsilon"], 5
    sched = FewstepScheduler.from_config(DDPM_CONFIG, sampler=name, clip_sample=False)
    sched.set_timesteps(steps)
    native = Sampler(denoiser(unet, DDPM_CONFIG), name, steps=steps)
    assert len(sched.timesteps) == sched.nfe == native.nfe

    counter = CountCalls(unet)
    try:
        images = ddpm_images(unet, sched, steps=steps)
    finally:
        counter.handle.remove()
    assert counter.n == native.nfe
    g = gen(0)
    x0 = native.sample(torch.randn(SHAPE, generator=g), generator=g)
    assert_same(images, (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), f"DDPMPipeline vs native {name}")


@pytest.mark.parametrize("name", ["dpmpp_3m", "plms", "pndm", "heun", "sde_dpmpp_2m"])
def test_set_timesteps_resets_every_per_run_state(name, unets):
    unet = unets["epsilon"]
    sched = FewstepScheduler.from_config(DDPM_CONFIG, sampler=name, clip_sample=False)
    first = ddpm_images(unet, sched)
    assert np.array_equal(ddpm_images(unet, sched), first), "two consecutive runs differ"
    sched.set_timesteps(10)  # abandon a run half-way, with its multistep history filled
    x = torch.randn(SHAPE, generator=gen(9))
    with torch.no_grad():
        for t in sched.timesteps[:4]:
            x = sched.step(unet(x, t).sample, t, x, generator=gen(9)).prev_sample
    assert np.array_equal(ddpm_images(unet, sched), first), "a run after an abandoned one differs"


@pytest.mark.parametrize("name, begin", [("ddim", 3), ("dpmpp_2m", 3), ("heun", 2)])
def test_set_begin_index_runs_the_tail_of_the_grid(name, begin, unets):
    """img2img: ``set_begin_index(k)`` then stepping through ``timesteps[k:]`` equals the native
    sampler run on the tail of the grid from the same noised image (and diffusers' DPM-Solver++)."""
    unet = unets["epsilon"]
    sched = FewstepScheduler.from_config(DDPM_CONFIG, sampler=name, clip_sample=False)
    sched.set_timesteps(10)
    tail_times = sched.grid.t[sched.grid.t.tolist().index(float(sched.timesteps[begin])):-1].tolist()
    image = torch.rand(SHAPE, generator=gen(2)) * 2 - 1
    x_start = sched.add_noise(image, torch.randn(SHAPE, generator=gen(3)), sched.timesteps[begin:begin + 1])

    def img2img(scheduler):
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(begin)
        x = x_start
        with torch.no_grad():
            for t in scheduler.timesteps[begin:]:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        return x

    ours = img2img(sched)
    assert sched.nfe == len(sched.timesteps)
    native = Sampler(denoiser(unet, DDPM_CONFIG), name, steps=len(tail_times),
                     timesteps=ExplicitTimesteps(tail_times)).sample(x_start)
    assert_same(ours, native, f"set_begin_index {name} k={begin} vs native tail")
    if name == "dpmpp_2m":
        assert_same(ours, img2img(DPM.from_config(DDPM_CONFIG, timestep_spacing="trailing")),
                    f"set_begin_index {name} k={begin} vs diffusers")


def test_set_begin_index_inside_a_multi_call_step_bridges_to_the_next_step():
    """Heun's call 1 is step 0's corrector at t1, call 2 step 1's predictor at t1: a start at call 1 returns
    its sample unchanged (the next call is at the same timestep), then runs Heun from t1."""
    x_start = torch.randn(SHAPE, generator=gen(4))
    model = _Echo()

    def run(begin):
        sched = FewstepScheduler(sampler="heun")
        sched.set_timesteps(5)
        sched.set_begin_index(begin)
        x = x_start
        for t in sched.timesteps[begin:]:
            x = sched.step(model(x, t) * 0.9, t, x).prev_sample
        return x

    assert torch.equal(run(1), run(2))


@pytest.mark.parametrize("config", [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear",
                                    beta_start=0.00085, beta_end=0.012), dict(beta_schedule="squaredcos_cap_v2")])
def test_add_noise_and_velocity_equal_ddpm_scheduler(config):
    ours, ref = FewstepScheduler(**config), DDPMScheduler(**config)
    x0 = torch.randn(4, 3, 8, 8, generator=gen(0))
    noise = torch.randn(4, 3, 8, 8, generator=gen(1))
    t = torch.tensor([0, 10, 500, 999])
    assert_same(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), f"add_noise {config}", tol=1e-6)
    assert_same(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), f"get_velocity {config}",
                tol=1e-6)


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


SOURCE_CONFIGS = {
    "ddim": lambda: DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                                  prediction_type="v_prediction").config,
    "pndm-sd": lambda: PNDMScheduler.from_config(SD_CONFIG).config,
    "sd-json": lambda: SD_CONFIG,
    "euler": lambda: EulerDiscreteScheduler(timestep_spacing="leading", use_karras_sigmas=True).config,
    "dpm": lambda: DPM(solver_order=3, timestep_spacing="trailing", final_sigmas_type="sigma_min",
                       prediction_type="v_prediction").config,
    "ddpm": lambda: DDPM_CONFIG,
}


@pytest.mark.parametrize("source", SOURCE_CONFIGS)
def test_from_config_reads_diffusers_configs_without_warnings(source):
    """The noise schedule is bit-identical to the source's; explicit shared keys carry over; nothing
    the source legitimately has is reported as unexpected."""
    config = SOURCE_CONFIGS[source]()
    handler = LogRecords()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        ours = FewstepScheduler.from_config(config, sampler="dpmpp_2m")
    finally:
        logger.removeHandler(handler)
    assert not [m for m in handler.messages if "not expected" in m or "ignored" in m], handler.messages
    ref = DDPMScheduler.from_config(config)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    explicit = set(config) - set(config.get("_use_default_values", []))
    for key in {"prediction_type", "steps_offset", "timestep_spacing", "final_sigmas_type", "beta_schedule"} & explicit:
        assert ours.config[key] == config[key], key


def test_from_config_does_report_an_unknown_key():
    """Control for the test above: the log capture does see diffusers' unexpected-key warning."""
    handler = LogRecords()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        FewstepScheduler.from_config({**DDPM_CONFIG, "smaple_max_value": 2.0})
    finally:
        logger.removeHandler(handler)
    assert any("smaple_max_value" in m and "not expected" in m for m in handler.messages), handler.messages


# ---------------------------------------------------------------------------------------------
# 5. Bad input fails early, with a message that names the problem


BAD_CONSTRUCTION = {
    "unknown sampler": (lambda: FewstepScheduler(sampler="dpm++2m"), r"unknown sampler 'dpm\+\+2m'"),
    "unknown sampler option": (lambda: FewstepScheduler(sampler="ddim", sampler_options={"etaa": 0.1}),
                               r"bad option for sampler 'ddim'.*etaa"),
    "option fixed by the name": (lambda: FewstepScheduler(sampler="dpmpp_2m", sampler_options={"order": 3}),
                                 r"fixed by this sampler's name"),
    "unknown prediction type": (lambda: FewstepScheduler(prediction_type="noise"), r"unknown prediction type 'noise'"),
    "non-diffusers prediction type": (lambda: FewstepScheduler(prediction_type="flow"),
                                      r"not a diffusers DDPM prediction type"),
    "unknown timestep_spacing": (lambda: FewstepScheduler(timestep_spacing="uniform"), r"unknown timesteps 'uniform'"),
    "unknown final_sigmas_type": (lambda: FewstepScheduler(final_sigmas_type="last"), r"unknown final_sigmas_type"),
    "unreadable config": (lambda: FewstepScheduler.from_config({**DDPM_CONFIG, "beta_schedule": "bogus"}),
                          r"unknown beta_schedule 'bogus'"),
    "betas that do not decay": (lambda: FewstepScheduler(trained_betas=[0.0] * 1000), r"strictly decreasing"),
    "native unknown sampler": (lambda: Sampler(denoiser(_Echo(), DDPM_CONFIG), "dpm2"), r"unknown sampler 'dpm2'"),
    "native zero steps": (lambda: Sampler(denoiser(_Echo(), DDPM_CONFIG), "ddim", steps=0),
                          r"number of steps must be an integer >= 1, got 0"),
}


class _Echo(torch.nn.Module):
    prediction_type = "epsilon"

    def forward(self, x, t):
        return x


@pytest.mark.parametrize("case", BAD_CONSTRUCTION)
def test_bad_construction_raises_a_clear_value_error(case):
    make, message = BAD_CONSTRUCTION[case]
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_set_timesteps_calls_raise():
    sched = FewstepScheduler()
    with pytest.raises(ValueError, match=r"number of steps must be an integer >= 1, got 0"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="needs num_inference_steps or timesteps"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="not `sigmas`"):
        sched.set_timesteps(sigmas=[14.6, 1.0, 0.1])
    with pytest.raises(RuntimeError, match="call set_timesteps before set_begin_index"):
        FewstepScheduler().set_begin_index(2)


def test_misordered_step_calls_raise():
    x = torch.zeros(SHAPE)
    sched = FewstepScheduler(sampler="ddim", timestep_spacing="trailing")
    with pytest.raises(RuntimeError, match="call set_timesteps before step"):
        sched.step(x, 999, x)
    sched.set_timesteps(2)  # timesteps 999, 499
    with pytest.raises(ValueError, match=r"step got timestep 500, which is not on this run's grid; ddim calls "
                                         r"the model at timesteps \[999.0, 499.0\]"):
        sched.step(x, 500, x)
    x = sched.step(x, 999, x).prev_sample
    with pytest.raises(ValueError, match="step got timestep 999 but model call 1 of this run is at 499"):
        sched.step(x, 999, x)
    x = sched.step(x, 499, x).prev_sample
    with pytest.raises(RuntimeError, match="step called 3 times for a run of 2 model calls"):
        sched.step(x, 499, x)
