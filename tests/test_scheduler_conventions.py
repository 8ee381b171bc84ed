"""Claims: every fewstep scheduler meets the conventions diffusers' own scheduler tests check
(``tests/schedulers/test_schedulers.py``: save / load, step shape, tuple output, add_noise, compatibles;
``test_scheduler_dpm_multi.py``: a full loop from noise added mid-schedule), and the defects of issue 16
stay fixed: a start mid-schedule without ``set_begin_index``, heun / pndm / plms in img2img, sampler
switching and keyword checks in ``from_config``, the spacing a swap takes, and ``variance_noise``.

As in diffusers' tests the model is ``dummy_model`` (``sample * t / (t + 1)``, here plus a small
nonlinear term so that multistep history matters) and samples are tiny.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                       UniPCMultistepScheduler)

from fewstep.samplers import PNDM, SAMPLERS, DiscreteVPSchedule, ExplicitTimesteps, ModelDenoiser, Sampler  # noqa: E402
from fewstep.samplers.mr import MRScheduler  # noqa: E402
from fewstep.samplers.schedulers import FewstepScheduler, GHVBScheduler, HeavyBallScheduler  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]

STEPS = 5
TEACHER_CONFIG = Path(__file__).resolve().parents[1] / "teachers/fmnist/scheduler/scheduler_config.json"
#: Stable Diffusion v1's scheduler_config.json (keys of PNDM that are not ours: skip_prk_steps, set_alpha_to_one).
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}

#: Every scheduler of ours: FewstepScheduler with each registered sampler, and the momentum classes.
OURS = {**{f"fewstep-{name}": (FewstepScheduler, dict(sampler=name)) for name in sorted(SAMPLERS)},
        "HeavyBallScheduler": (HeavyBallScheduler, {}),
        "HeavyBallScheduler-dpmpp": (HeavyBallScheduler, dict(base="dpmsolver++")),
        "GHVBScheduler": (GHVBScheduler, dict(momentum=3.8))}
DIFFUSERS = [DDIMScheduler, DDPMScheduler, PNDMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
             HeunDiscreteScheduler, UniPCMultistepScheduler]


def get_scheduler_config(**kwargs) -> dict:
    """A DDPM-family training schedule with every field explicit (as a saved scheduler_config.json has it)."""
    config = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    config.update(kwargs)
    return config


def make(name: str, **kwargs):
    cls, options = OURS[name]
    return cls(**get_scheduler_config(**{**options, **kwargs}))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dummy_sample() -> torch.Tensor:
    return torch.rand((4, 3, 8, 8), generator=gen(0))


def dummy_sample_deter() -> torch.Tensor:
    n = 4 * 3 * 8 * 8
    return (torch.arange(n) / n).reshape(3, 8, 8, 4).permute(3, 0, 1, 2)


def dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """diffusers' dummy model, ``sample * t / (t + 1)``, plus a small nonlinear term."""
    t = torch.as_tensor(t, dtype=sample.dtype).reshape(-1, *(1,) * (sample.ndim - 1))
    return sample * t / (t + 1) + 0.05 * torch.sin(3 * sample)


def loop(scheduler, sample, timesteps, generator=None):
    """The pipelines' loop: one model call and one step per entry of ``timesteps``."""
    for t in timesteps:
        sample = scheduler.step(dummy_model(scheduler.scale_model_input(sample, t), t), t, sample,
                                generator=generator).prev_sample
    return sample


def diffusers_pick(timesteps: torch.Tensor, b: int) -> int:
    """The model call diffusers' ``index_for_timestep`` picks for ``timesteps[b]`` on a first step: the
    second occurrence of a repeated timestep."""
    matches = (timesteps == timesteps[b]).nonzero().flatten().tolist()
    return matches[1] if len(matches) > 1 else matches[0]


# ---------------------------------------------------------------------------------------------
# 1. diffusers' common scheduler conventions, for every scheduler of ours


@pytest.mark.parametrize("name", OURS)
def test_from_save_pretrained_gives_the_same_scheduler(name, tmp_path):
    scheduler = make(name, sampler_options=None)
    scheduler.save_pretrained(tmp_path)
    new_scheduler = type(scheduler).from_pretrained(tmp_path)
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    assert dict(new_scheduler.config) == config  # as diffusers' test_from_pretrained
    assert repr(new_scheduler.solver) == repr(scheduler.solver)
    scheduler.set_timesteps(STEPS)
    new_scheduler.set_timesteps(STEPS)
    sample = dummy_sample()
    output = loop(scheduler, sample, scheduler.timesteps, generator=gen(1))
    new_output = loop(new_scheduler, sample, new_scheduler.timesteps, generator=gen(1))
    assert torch.equal(output, new_output), "Scheduler outputs are not identical"


@pytest.mark.parametrize("name", OURS)
def test_step_shape_and_tuple_output(name):
    scheduler = make(name)
    scheduler.set_timesteps(STEPS)
    sample = dummy_sample()
    residual = 0.1 * sample
    t0, t1 = scheduler.timesteps[:2]
    output_0 = scheduler.step(residual, t0, sample, generator=gen(0)).prev_sample
    output_1 = scheduler.step(residual, t1, output_0, generator=gen(0)).prev_sample
    assert output_0.shape == sample.shape == output_1.shape
    scheduler.set_timesteps(STEPS)
    (as_tuple,) = scheduler.step(residual, t0, sample, generator=gen(0), return_dict=False)
    assert torch.equal(as_tuple, output_0)


@pytest.mark.parametrize("name", OURS)
def test_add_noise_is_the_forward_process(name):
    ours, ref = make(name), DDPMScheduler(**get_scheduler_config())
    x0, noise = dummy_sample(), torch.randn(4, 3, 8, 8, generator=gen(1))
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    assert len(ours) == ours.config.num_train_timesteps


@pytest.mark.parametrize("name", OURS)
def test_full_loop_with_noise_with_and_without_set_begin_index(name):
    """diffusers' ``test_full_loop_with_noise``: noise added at ``timesteps[t_start * order]``, the loop
    over the rest. With ``set_begin_index`` (img2img) it spends exactly the remaining calls; without it
    the first step locates its timestep (diffusers' pick) and gives the same as ``set_begin_index``
    there; where the solver restarts at that call, the result is the native sampler on the rest of the grid."""
    scheduler = make(name)
    scheduler.set_timesteps(STEPS)
    t_start = STEPS - 2
    b = t_start * scheduler.order
    noise = torch.randn(4, 3, 8, 8, generator=gen(3))

    def run(begin, set_begin):
        scheduler.set_timesteps(STEPS)
        if set_begin:
            scheduler.set_begin_index(begin)
        timesteps = scheduler.timesteps[begin:]
        x = scheduler.add_noise(dummy_sample_deter(), noise, timesteps[:1])
        out = loop(scheduler, x, timesteps, generator=gen(4))
        assert scheduler.step_index == len(scheduler.timesteps), "the run did not reach its last model call"
        return x, out

    _, img2img = run(b, set_begin=True)
    assert torch.isfinite(img2img).all() and img2img.abs().max() < 10
    k = diffusers_pick(scheduler.timesteps, b)
    x_k, located = run(k, set_begin=False)
    assert torch.equal(located, run(k, set_begin=True)[1])
    grid_t = scheduler.grid.t.tolist()
    if scheduler._plan[k] in grid_t[:-1]:
        tail = grid_t[grid_t.index(scheduler._plan[k]):-1]
        denoiser = ModelDenoiser(dummy_model, DiscreteVPSchedule.from_diffusers_config(scheduler.config))
        restarts = [scheduler.solver]  # PNDM / PLMS restart with their one-call-per-step warm-up
        if isinstance(scheduler.solver, PNDM):
            restarts.append(PNDM(scheduler.solver.order, warmup="lower_order"))
        for solver in restarts:
            native = Sampler(denoiser, solver, steps=len(tail), timesteps=ExplicitTimesteps(tail))
            if native.plan == scheduler._plan[k:]:
                torch.testing.assert_close(located, native.sample(x_k, generator=gen(4)), atol=1e-5, rtol=0)
                break


@pytest.mark.parametrize("diffusers_cls", DIFFUSERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", OURS)
def test_from_config_switches_between_diffusers_and_ours(name, diffusers_cls):
    """diffusers' ``test_compatibles`` both ways: ours from a diffusers scheduler's config takes its noise
    schedule and prediction type; the diffusers scheduler from ours takes them back, with the same config."""
    cls, options = OURS[name]
    theirs = diffusers_cls(**get_scheduler_config(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012, prediction_type="v_prediction"))
    ours = cls.from_config(theirs.config, **options)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.config.prediction_type == "v_prediction"
    back = diffusers_cls.from_config(ours.config)
    assert torch.equal(back.alphas_cumprod, theirs.alphas_cumprod)
    shared = {k: v for k, v in back.config.items() if k in theirs.config and not k.startswith("_")}
    assert shared == {k: v for k, v in theirs.config.items() if k in shared}


@pytest.mark.parametrize("name", ["fewstep-ddim", "fewstep-plms", "GHVBScheduler"])
def test_every_compatible_scheduler_reads_our_config(name):
    scheduler = make(name)
    assert scheduler.compatibles and all(c is not None for c in scheduler.compatibles)
    for compatible in scheduler.compatibles:
        other = compatible.from_config(scheduler.config)
        assert type(scheduler).from_config(other.config).sampler_name == scheduler.sampler_name


#: Our schedulers as a user makes them: the sampler left to the class default, only its options given.
BY_OPTIONS = {"HeavyBallScheduler": (HeavyBallScheduler, {}),
              "HeavyBallScheduler-dpmpp": (HeavyBallScheduler, dict(base="dpmsolver++", beta=0.8)),
              "GHVBScheduler": (GHVBScheduler, dict(momentum=3.8)),
              "FewstepScheduler": (FewstepScheduler, {}),
              "FewstepScheduler-ddim": (FewstepScheduler, dict(sampler="ddim", sampler_options={"eta": 0.0}))}


@pytest.mark.parametrize("name", BY_OPTIONS)
def test_a_round_trip_through_each_compatible_gives_back_the_same_config(name):
    """diffusers' ``test_compatibles``, through every compatible scheduler: ours -> it -> ours is the same
    config, ``_use_default_values`` included, and adds no key of ``__init__``. The sampler's name is
    never listed as a default: diffusers' ``from_config`` drops listed keys, and with the name gone the
    way back lost the options given beside it (``base``, ``momentum``) and re-listed the noise schedule."""
    cls, options = BY_OPTIONS[name]
    scheduler = cls(**get_scheduler_config(**options))
    assert "sampler" not in scheduler.config["_use_default_values"]
    init_keys = set(inspect.signature(cls.__init__).parameters)
    for compatible in scheduler.compatibles:
        back = cls.from_config(compatible.from_config(scheduler.config).config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config), compatible
        assert not init_keys & (set(back.config) - set(scheduler.config)), compatible
        assert repr(back.solver) == repr(scheduler.solver)


@pytest.mark.parametrize("name", ["fewstep-pndm", "fewstep-plms", "fewstep-heun", "fewstep-dpmpp_2m",
                                  "GHVBScheduler"])
def test_a_loop_from_any_timestep_without_set_begin_index_is_the_set_begin_index_run(name):
    """diffusers' ``test_full_loop_with_noise`` (noise added at ``timesteps[b]``, then a loop over
    ``timesteps[b:]`` without ``set_begin_index``) from every ``b``: it is the run ``set_begin_index(b)``
    gives. PNDM and PLMS count every call (``order = 1``), so ``b`` can be the first of two calls at one
    timestep (PNDM's Runge-Kutta stages, a step's last call and the next step's first), where the first
    ``step`` cannot tell which of the two it is (it takes the second, as diffusers does)."""
    scheduler = make(name)
    noise = torch.randn(4, 3, 8, 8, generator=gen(3))

    def run(begin, set_begin):
        scheduler.set_timesteps(10)
        if set_begin:
            scheduler.set_begin_index(begin)
        timesteps = scheduler.timesteps[begin:]
        x = scheduler.add_noise(dummy_sample_deter(), noise, timesteps[:1])
        out = loop(scheduler, x, timesteps, generator=gen(4))
        assert scheduler.step_index == len(scheduler.timesteps)
        return out

    scheduler.set_timesteps(10)
    n, timesteps = len(scheduler.timesteps), scheduler.timesteps.tolist()
    twins = [b for b in range(n - 1) if timesteps[b] == timesteps[b + 1]]
    assert bool(twins) == (name in ("fewstep-pndm", "fewstep-plms", "fewstep-heun"))
    for begin in range(n):
        assert torch.equal(run(begin, set_begin=False), run(begin, set_begin=True)), begin


def test_mr_scheduler_conventions(tmp_path):
    """MRScheduler: save / load, step shape, a full loop from noise mid-schedule with and without
    set_begin_index, and the MR forward marginal."""
    mu = dummy_sample()
    scheduler = MRScheduler(method="sde")
    scheduler.save_pretrained(tmp_path)
    new_scheduler = MRScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in scheduler.config.items() if k != "_use_default_values"} == dict(new_scheduler.config)

    def run(s, begin, set_begin):
        s.set_timesteps(STEPS, mu=mu)
        if set_begin:
            s.set_begin_index(begin)
        x = s.add_noise(dummy_sample_deter(), torch.randn(mu.shape, generator=gen(3)), s.timesteps[begin:begin + 1])
        return loop(s, x, s.timesteps[begin:], generator=gen(4))

    full = run(scheduler, 0, False)
    assert full.shape == mu.shape and torch.isfinite(full).all()
    assert torch.equal(run(new_scheduler, 0, False), full)
    assert torch.equal(run(scheduler, 2, True), run(scheduler, 2, False))
    t = torch.tensor([1, 50, 100])
    a = scheduler.noise_schedule.alpha(t.double()).float().reshape(-1, 1, 1, 1)
    x0, z = dummy_sample()[:3], torch.randn(3, 3, 8, 8, generator=gen(5))
    scheduler.set_mu(mu[:3])
    s = scheduler.noise_schedule.sigma(t.double()).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(scheduler.add_noise(x0, z, t), a * x0 + (1 - a) * mu[:3] + s * z)


# ---------------------------------------------------------------------------------------------
# 2. Issue 16, item 1: a run may start mid-schedule without set_begin_index


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "ghvb", "sde_dpmpp_2m"])
def test_first_step_locates_its_timestep_in_the_schedule(sampler):
    """Video-to-video style: loop over ``timesteps[k:]`` without ``set_begin_index``; it is the run
    ``set_begin_index(k)`` gives."""
    scheduler = FewstepScheduler(sampler=sampler)
    x = dummy_sample()

    def run(set_begin):
        scheduler.set_timesteps(10)
        if set_begin:
            scheduler.set_begin_index(4)
        return loop(scheduler, x, scheduler.timesteps[4:], generator=gen(0))

    assert torch.equal(run(False), run(True))


def test_a_first_timestep_off_the_grid_is_an_error_naming_the_grid():
    scheduler = FewstepScheduler(sampler="plms")
    scheduler.set_timesteps(3)  # trailing: 999, 666, 666, 332
    x = dummy_sample()
    with pytest.raises(ValueError, match=r"step got timestep 500, which is not on this run's grid; plms calls the "
                                         r"model at timesteps \[999.0, 666.0, 666.0, 332.0\]"):
        scheduler.step(x, 500, x)


# ---------------------------------------------------------------------------------------------
# 3. Issue 16, item 2: heun, pndm and plms in StableDiffusionImg2ImgPipeline


@pytest.fixture(scope="module")
def img2img(tiny_sd_components):
    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_components, scheduler=PNDMScheduler.from_config(SD_CONFIG),
                                          tokenizer=None, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond = pipe.text_encoder(torch.randint(0, 100, (1, 16), generator=gen(11)))[0]
    return pipe, cond


class CountCalls:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


def img2img_latents(pipe, cond, scheduler, strength, steps=STEPS):
    pipe.scheduler = scheduler
    image = torch.rand(1, 3, 8, 8, generator=gen(2))
    counter = CountCalls(pipe.unet)
    try:
        latents = pipe(image=image, prompt_embeds=cond, guidance_scale=1.0, strength=strength,
                       num_inference_steps=steps, output_type="latent", generator=gen(5)).images
    finally:
        counter.handle.remove()
    return latents, counter.n


@pytest.mark.parametrize("strength", [0.9, 0.6, 0.3])
@pytest.mark.parametrize("sampler, reference", [("heun", HeunDiscreteScheduler), ("pndm", PNDMScheduler),
                                                ("plms", PNDMScheduler)])
def test_heun_pndm_plms_run_in_img2img(img2img, sampler, reference, strength):
    pipe, cond = img2img
    config = PNDMScheduler.from_config(SD_CONFIG).config
    _, ref_calls = img2img_latents(pipe, cond, reference.from_config(config), strength)  # diffusers' own runs
    ours = FewstepScheduler.from_config(config, sampler=sampler)
    assert ours.order == (2 if sampler == "heun" else 1) == reference.from_config(config).order
    latents, calls = img2img_latents(pipe, cond, ours, strength)
    t_start = STEPS - int(STEPS * strength)
    assert calls == len(ours.timesteps) - t_start * ours.order
    assert ours.step_index == len(ours.timesteps) and torch.isfinite(latents).all()
    if sampler == "heun":  # the same number of calls as diffusers' Heun, which starts at the same step
        assert calls == ref_calls


# ---------------------------------------------------------------------------------------------
# 4. Issue 16, items 3 and 4: from_config switches samplers and checks what it is given


#: A non-default schedule, so that a switch visibly takes it.
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                timestep_spacing="leading", steps_offset=1)
SWITCHES = {
    # name: (source scheduler, target class, kwargs, expected solver); the first four are issue 16's
    "dpmpp_2m -> GHVB momentum": (lambda: FewstepScheduler(sampler="dpmpp_2m", **SCHEDULE), GHVBScheduler,
                                  dict(momentum=2.5), "GHVB(order=3, beta=0.5)"),
    "ddim eta -> dpmpp_2m": (lambda: FewstepScheduler(sampler="ddim", sampler_options={"eta": 0.5}, **SCHEDULE),
                             FewstepScheduler, dict(sampler="dpmpp_2m"), "DPMSolverPP(order=2"),
    "dpmpp_2m -> HeavyBall": (lambda: FewstepScheduler(sampler="dpmpp_2m", **SCHEDULE), HeavyBallScheduler, {},
                              "HeavyBall(base='plms'"),
    "ddim -> GHVB": (lambda: FewstepScheduler(sampler="ddim", **SCHEDULE), GHVBScheduler, {}, "GHVB(order=4, beta=0.8)"),
    "GHVB -> Fewstep default": (lambda: GHVBScheduler(momentum=2.5, **SCHEDULE), FewstepScheduler, {},
                                "DPMSolverPP(order=2"),
    "GHVB -> Fewstep ghvb keeps momentum": (lambda: GHVBScheduler(momentum=2.5, **SCHEDULE), FewstepScheduler,
                                            dict(sampler="ghvb"), "GHVB(order=3, beta=0.5)"),
    "Fewstep ghvb -> GHVB keeps momentum": (lambda: FewstepScheduler(sampler="ghvb", momentum=2.5, **SCHEDULE),
                                            GHVBScheduler, {}, "GHVB(order=3, beta=0.5)"),
    "GHVB -> GHVB new momentum": (lambda: GHVBScheduler(momentum=2.5, **SCHEDULE), GHVBScheduler,
                                  dict(momentum=3.8), "GHVB(order=4, beta=0.8)"),
}


@pytest.mark.parametrize("saved", [False, True], ids=["in-memory", "saved"])
@pytest.mark.parametrize("case", SWITCHES)
def test_from_config_switch_takes_the_schedule_and_drops_the_old_sampler(case, saved, tmp_path):
    make_source, target, kwargs, expected = SWITCHES[case]
    config = make_source().config
    if saved:
        make_source().save_config(tmp_path)
        config = target.load_config(tmp_path)
    switched = target.from_config(config, **kwargs)
    assert repr(switched.solver).startswith(expected), repr(switched.solver)
    for key, value in SCHEDULE.items():
        assert switched.config[key] == value, key


def test_from_config_refuses_unknown_keywords_with_the_known_ones():
    config = FewstepScheduler(sampler="ddim").config
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['samplr'\]; known: .*'sampler'.*'sampler_options'"):
        FewstepScheduler.from_config(config, samplr="ddim")
    with pytest.raises(ValueError, match=r"GHVBScheduler.from_config got unknown keyword\(s\) \['momentun'\].*"
                                         r"options of sampler 'ghvb': \['beta', 'momentum', 'order'\]"):
        GHVBScheduler.from_config(config, momentun=3.8)
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['eta'\].*sampler 'dpmpp_2m'"):
        FewstepScheduler.from_config(DDPMScheduler().config, eta=0.5)  # eta is not a DPM-Solver++ option


def test_from_config_routes_top_level_sampler_options_to_the_sampler():
    config = DDPMScheduler(**get_scheduler_config()).config
    assert FewstepScheduler.from_config(config, sampler="ddim", eta=0.5).solver.eta == 0.5
    assert FewstepScheduler.from_config(config, sampler="ddim", eta=0.5).config.sampler_options == {"eta": 0.5}
    assert GHVBScheduler.from_config(config, order=3, beta=0.6).solver.order == 3
    ddim = FewstepScheduler(sampler="ddim", sampler_options={"eta": 0.3}).config
    assert FewstepScheduler.from_config(ddim, eta=0.5).solver.eta == 0.5  # same sampler: the new value wins


@pytest.mark.parametrize("config", [SD_CONFIG, DPMSolverMultistepScheduler(solver_order=3).config,
                                    json.loads(TEACHER_CONFIG.read_text())], ids=["sd-pndm", "dpm", "teacher-ddpm"])
def test_other_schedulers_config_keys_stay_ignored_quietly(config, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        scheduler = FewstepScheduler.from_config(config, sampler="dpmpp_2m")
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    assert scheduler.sampler_name == "dpmpp_2m"


# ---------------------------------------------------------------------------------------------
# 5. Issue 16, item 5: which timestep spacing a swap takes


def test_swap_keeps_the_pipelines_timestep_spacing_and_trailing_matches_native():
    """Decision: the pipeline config's ``timestep_spacing`` wins (``leading`` in the teacher's config, so
    10 steps start at 900), as it does for every diffusers scheduler swapped in by ``from_config``.
    ``timestep_spacing="trailing"`` gives the native ``Sampler``'s grid and the same samples."""
    config = json.loads(TEACHER_CONFIG.read_text())
    swapped = FewstepScheduler.from_config(config, sampler="dpmpp_2m")
    swapped.set_timesteps(10)
    assert swapped.timesteps.tolist() == list(range(900, -1, -100))
    denoiser = ModelDenoiser(dummy_model, DiscreteVPSchedule.from_diffusers_config(config))
    native = Sampler(denoiser, "dpmpp_2m", steps=10)
    trailing = FewstepScheduler.from_config(config, sampler="dpmpp_2m", timestep_spacing="trailing",
                                            clip_sample=False)
    trailing.set_timesteps(10)
    assert trailing.timesteps.tolist() == native.plan and native.plan[0] == 999
    x_T = torch.randn(4, 3, 8, 8, generator=gen(0))
    torch.testing.assert_close(loop(trailing, x_T, trailing.timesteps), native.sample(x_T), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# 6. Issue 16, item 6: step(..., variance_noise=...)


@pytest.mark.parametrize("sampler, reference", [
    ("ddim", lambda c: DDIMScheduler.from_config(c, clip_sample=False)),  # leading, DDIM's default
    ("sde_dpmpp_2m", lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="sde-dpmsolver++",
                                                                       timestep_spacing="trailing"))])
def test_variance_noise_is_the_steps_noise_as_in_diffusers(sampler, reference):
    config = DDPMScheduler(**get_scheduler_config()).config
    spacing = "leading" if sampler == "ddim" else "trailing"
    ours = FewstepScheduler.from_config(config, sampler=sampler, timestep_spacing=spacing, clip_sample=False,
                                        **({"eta": 0.7} if sampler == "ddim" else {}))
    theirs = reference(config)
    noises = torch.randn(STEPS, 4, 3, 8, 8, generator=gen(7))
    outputs = []
    for scheduler, kwargs in ((ours, {}), (theirs, {"eta": 0.7} if sampler == "ddim" else {})):
        scheduler.set_timesteps(STEPS)
        x = dummy_sample()
        for t, z in zip(scheduler.timesteps, noises):
            x = scheduler.step(dummy_model(x, t), t, x, variance_noise=z, **kwargs).prev_sample
        outputs.append(x)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    ours.set_timesteps(STEPS)
    t = ours.timesteps[0]
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        ours.step(dummy_sample(), t, dummy_sample(), generator=gen(0), variance_noise=noises[0])


@pytest.mark.parametrize("sampler", ["ddpm", "sde_dpmpp_2m", "ddim"])
def test_variance_noise_replaces_the_generators_draw(sampler):
    """A step given ``variance_noise = z`` equals the step whose generator draws ``z``."""
    scheduler = FewstepScheduler(sampler=sampler, sampler_options={"eta": 1.0} if sampler == "ddim" else None)
    x = dummy_sample()
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    from_generator = scheduler.step(dummy_model(x, t), t, x, generator=gen(8)).prev_sample
    scheduler.set_timesteps(STEPS)
    z = torch.randn(x.shape, generator=gen(8))
    given = scheduler.step(dummy_model(x, t), t, x, variance_noise=z).prev_sample
    assert torch.equal(given, from_generator)


def test_trained_betas_survive_a_save_and_load_and_are_the_schedule(tmp_path):
    """diffusers' ``test_trained_betas``: ``betas`` is an attribute, kept through save / load, and the noise
    schedule is built from it."""
    import numpy as np

    from fewstep.samplers.schedulers import FewstepScheduler

    sched = FewstepScheduler(num_train_timesteps=2, trained_betas=np.array([0.1, 0.3]))
    sched.save_pretrained(tmp_path)
    loaded = FewstepScheduler.from_pretrained(tmp_path)
    assert sched.betas.tolist() == loaded.betas.tolist() == torch.tensor([0.1, 0.3]).tolist()
    torch.testing.assert_close(loaded.alphas_cumprod, torch.cumprod(1 - loaded.betas, 0))
