"""``fewstep tune``: fitted timestep grids (GITS dynamic programming + a search on the sampler's own endpoint
error), the scheduler that carries them, and the command."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from fewstep.samplers import ExplicitTimesteps, ModelDenoiser, Sampler
from fewstep.samplers.schedulers import FewstepScheduler
from fewstep.samplers.schedules import DiscreteVPSchedule
from fewstep.samplers.tune import (FIXED_GRIDS, PUBLISHED, TunedScheduler, candidate_times, ddim_cost_matrix,
                                   endpoint_errors, fit_timesteps, fixed_grid_times, gits_grid, published_scheduler,
                                   reference_trajectory, refine_grid, tuned_scheduler)
from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = DiscreteVPSchedule.from_diffusers_config({})


def test_gits_dynamic_programming_finds_the_cheapest_grid():
    g = torch.Generator().manual_seed(0)
    M, steps = 7, 3
    cost = torch.rand(M, M + 1, generator=g, dtype=torch.float64)
    cost = torch.where(torch.arange(M + 1)[None] > torch.arange(M)[:, None], cost, torch.inf)
    times = torch.arange(M, 0, -1, dtype=torch.float64) * 100
    best = min((sum(cost[a, b] for a, b in zip((0, *mid), (*mid, M))).item(), mid)
               for mid in itertools.combinations(range(1, M), steps - 1))
    assert gits_grid(cost, times, steps) == [float(times[i]) for i in (0, *best[1])]


def test_the_pattern_search_never_ends_worse_than_its_start():
    candidates = torch.arange(999, -1, -1, dtype=torch.float64)
    target = [999.0, 700.0, 420.0, 77.0]
    objective = lambda t: sum((a - b) ** 2 for a, b in zip(t, target))  # noqa: E731
    times, value, evals = refine_grid(objective, [999.0, 750.0, 500.0, 250.0], candidates)
    assert times == target and value == 0 and evals < 400


@pytest.fixture(scope="module")
def testbed():
    mixture = GaussianMixture.random(8, 6, seed=1)
    teacher = ExactDenoiser(mixture, SCHEDULE)
    g = torch.Generator().manual_seed(1)
    x_fit = torch.randn(512, 8, generator=g, dtype=torch.float64)
    x_val = torch.randn(512, 8, generator=g, dtype=torch.float64)
    reference = reference_trajectory(teacher, x_fit, steps=120)
    exact = mixture_pf_ode_solution(mixture, SCHEDULE, x_val, SCHEDULE.t_max, None, rtol=1e-8, atol=1e-8)
    return teacher, reference, ddim_cost_matrix(reference, SCHEDULE), x_val, exact


def test_the_teachers_reference_is_close_to_the_exact_ode(testbed):
    teacher, reference, *_ = testbed
    exact = mixture_pf_ode_solution(teacher.mixture, SCHEDULE, reference.x_T, SCHEDULE.t_max, None, rtol=1e-8, atol=1e-8)
    assert (reference.end - exact).pow(2).mean().sqrt() < 1e-2  # vs 0.1-1 at NFE 3-8
    assert reference.states.shape[:2] == (len(reference.times), 512) and reference.times[0] == SCHEDULE.t_max


@pytest.mark.parametrize("sampler, nfe", [("ddim", 3), ("dpmpp_2m", 4), ("unipc", 6)])
def test_a_fitted_grid_beats_every_fixed_grid_on_held_out_seeds_of_the_exact_testbed(testbed, sampler, nfe):
    teacher, reference, cost, x_val, exact = testbed
    fit = fit_timesteps(teacher, sampler, nfe, reference, cost=cost)
    assert len(fit.timesteps) == nfe and fit.timesteps[0] == SCHEDULE.t_max
    assert all(t == round(t) for t in fit.timesteps)  # integer timesteps on a DDPM schedule
    assert fit.fit_error <= min(fit.fit_errors_fixed.values())  # by construction on the fitting seeds
    fitted = endpoint_errors(teacher, sampler, fit.timesteps, x_val, exact).mean()
    for name in FIXED_GRIDS:
        fixed = endpoint_errors(teacher, sampler, fixed_grid_times(SCHEDULE, name, nfe), x_val, exact).mean()
        assert fitted <= fixed, (name, float(fitted), float(fixed))


def test_candidate_times_are_integer_log_snr_uniform_on_ddpm_schedules():
    t = candidate_times(SCHEDULE, 50)
    assert t[0] == 999 and t[-1] == 0 and torch.all(t[1:] < t[:-1]) and torch.all(t == t.round())


TUNED = {4: [999.0, 741.0, 603.0, 262.0], 2: [999.0, 480.0]}


def test_a_tuned_scheduler_saves_and_loads_its_grids(tmp_path):
    from diffusers import DDPMScheduler

    sched = tuned_scheduler(DDPMScheduler(clip_sample=True).config, TUNED, sampler="unipc")
    sched.save_pretrained(tmp_path)
    loaded = TunedScheduler.from_pretrained(tmp_path)
    assert loaded.config.sampler == "unipc" and loaded.tuned_steps == [2, 4] and not loaded.config.clip_sample
    loaded.set_timesteps(4)
    assert loaded.timesteps.tolist() == [999, 741, 603, 262]
    with pytest.warns(UserWarning, match="no tuned grid for 3 steps"):
        loaded.set_timesteps(3)
    assert loaded.timesteps.tolist() == [999, 666, 332]  # the config's spacing (trailing)
    with pytest.raises(ValueError, match="must be 3 descending times"):
        TunedScheduler(tuned_timesteps={"3": [999, 500]})


def test_a_tuned_scheduler_in_a_ddpm_pipeline_gives_the_native_samplers_images(make_tiny_unet, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = make_tiny_unet(channels=1)
    tuned_scheduler(DDPMScheduler().config, TUNED, sampler="dpmpp_2m").save_pretrained(tmp_path)
    pipe = DDPMPipeline(unet=unet, scheduler=TunedScheduler.from_pretrained(tmp_path))
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    x_T = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    native = Sampler(ModelDenoiser.from_diffusers(unet, DDPMScheduler().config), "dpmpp_2m", steps=4,
                     timesteps=ExplicitTimesteps(TUNED[4])).sample(x_T)
    expected = (native / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - expected).max() < 1e-5


def test_diffusers_dpm_solver_runs_a_tuned_grid_as_the_native_sampler_does(testbed):
    from diffusers import DPMSolverMultistepScheduler

    teacher = testbed[0]
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    native = Sampler(teacher, "dpmpp_2m", steps=4, timesteps=ExplicitTimesteps(TUNED[4])).sample(x)
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(timesteps=[int(t) for t in TUNED[4]])
    assert sched.timesteps.tolist() == [999, 741, 603, 262]
    for t in sched.timesteps:
        x = sched.step(teacher(x, float(t)).eps, t, x).prev_sample
    assert (x - native).abs().max() < 1e-4


def test_published_align_your_steps_lists_load_in_the_same_format():
    sched = published_scheduler("ays-sdxl")
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == PUBLISHED["ays-sdxl"] and sched.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="unknown published schedule"):
        published_scheduler("ays-sd3")


def test_fewstep_scheduler_alone_reads_the_tuned_grids(tmp_path):
    """A tuned folder loads as a plain ``FewstepScheduler`` too (the class any pipeline user reaches for) and
    runs the fitted grid, not its spacing."""
    from diffusers import DDPMScheduler

    tuned_scheduler(DDPMScheduler().config, TUNED).save_pretrained(tmp_path)
    plain = FewstepScheduler.from_pretrained(tmp_path)
    plain.set_timesteps(4)
    assert plain.timesteps.tolist() == [999, 741, 603, 262]
    assert plain.tuned_steps == [2, 4]
    with pytest.raises(ValueError, match="grids are flow times"):  # DDPM timesteps on a flow schedule
        FewstepScheduler(noise_schedule="flow", tuned_timesteps={"2": [999.0, 480.0]})
    FewstepScheduler(noise_schedule="flow", tuned_timesteps={"2": [1.0, 0.48]})


def _fewstep(capsys, *args):
    """``fewstep tune ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    from fewstep.cli import main

    capsys.readouterr()
    try:
        code = main(["tune", *args])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tune_refuses_what_a_user_can_get_wrong_in_one_line(tmp_path, capsys):
    code, _, err = _fewstep(capsys, "--pipeline", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().count("\n") == 0
    assert "not a diffusers pipeline folder" in err and not (tmp_path / "o").exists()
    code, _, err = _fewstep(capsys, "--pipeline", str(tmp_path), "--sampler", "sde_dpmpp_2m")
    assert code == 2 and "stochastic" in err
    code, _, err = _fewstep(capsys, "--pipeline", str(tmp_path), "--sampler", "nope")
    assert code == 2 and "unknown sampler" in err
    code, _, err = _fewstep(capsys, "--nfe", "3")
    assert code == 2 and "--pipeline DIR" in err


def test_the_measured_settings_load_from_their_config():
    from fewstep.cli import _load_config, build_parser

    config = Path(__file__).resolve().parents[1] / "configs" / "tune_fmnist.yaml"
    options = _load_config(str(config), build_parser()[1]["tune"])
    assert options["nfe"] == [3, 4, 6] and options["ref_steps"] == 50 and options["pipeline"] == "teachers/fmnist"


def test_tune_resumes_and_saves_a_scheduler_folder(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pipe")
    args = ["--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "out"), "--seeds", "4", "--val-seeds", "4",
            "--ref-steps", "12", "--batch-size", "4"]
    code, out, err = _fewstep(capsys, *args, "--nfe", "2")
    assert code == 0, err
    assert "teacher evaluations" in out
    code, out, err = _fewstep(capsys, *args, "--nfe", "2", "3")
    assert code == 0, err
    assert "NFE 2: done before, skipped" in out and "(cached)" in out
    summary = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert sorted(summary["nfe"]) == ["2", "3"] and set(summary["nfe"]["3"]["val_errors"]) >= {"tuned", *FIXED_GRIDS}
    loaded = TunedScheduler.from_pretrained(tmp_path / "out", subfolder="scheduler")
    assert loaded.tuned_steps == [2, 3] and loaded.config.num_train_timesteps == 100
    code, _, err = _fewstep(capsys, *args, "--nfe", "2", "--seeds", "5")
    assert code == 2 and "other settings (seeds)" in err


# -- rectified flow: a grid fitted to a flow teacher, saved where its pipeline reads it ---------------------


def test_a_fitted_grid_beats_the_flow_grids_on_an_exact_flow_teacher():
    from fewstep.samplers import FlowMatchingSchedule
    from fewstep.samplers.tune import FLOW_FIXED_GRIDS

    flow = FlowMatchingSchedule(0.0, 1.0)
    mixture = GaussianMixture.random(8, 6, seed=1)
    teacher = ExactDenoiser(mixture, flow)
    g = torch.Generator().manual_seed(1)
    x_fit, x_val = (torch.randn(256, 8, generator=g, dtype=torch.float64) for _ in range(2))
    reference = reference_trajectory(teacher, x_fit, steps=120)
    assert reference.times[0] == 1.0 and torch.isfinite(reference.end).all()  # from pure noise, t = 1
    exact = mixture_pf_ode_solution(mixture, flow, x_val, 1.0 - 1e-9, None, rtol=1e-8, atol=1e-8)
    fit = fit_timesteps(teacher, "dpmpp_2m", 4, reference)
    assert fit.timesteps[0] == 1.0 and set(fit.fit_errors_fixed) == set(FLOW_FIXED_GRIDS)
    fitted = endpoint_errors(teacher, "dpmpp_2m", fit.timesteps, x_val, exact).mean()
    for name in FLOW_FIXED_GRIDS:
        fixed = endpoint_errors(teacher, "dpmpp_2m", fixed_grid_times(flow, name, 4), x_val, exact).mean()
        assert fitted <= fixed, (name, float(fitted), float(fixed))


def test_tune_fits_a_flow_pipeline_and_its_pipeline_samples_the_tuned_grid(tmp_path, capsys):
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

    from fewstep.samplers import ModelDenoiser, Sampler
    from fewstep.samplers.timesteps import ExplicitTimesteps

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path / "pipe")
    code, out, err = _fewstep(capsys, "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "out"),
                              "--seeds", "4", "--val-seeds", "4", "--ref-steps", "12", "--batch-size", "4",
                              "--nfe", "3")
    assert code == 0, err
    assert "flow_uniform" in out and "invert_sigmas" not in out + err
    scheduler = TunedScheduler.from_pretrained(tmp_path / "out", subfolder="scheduler")
    assert scheduler.config.noise_schedule == "flow" and scheduler.tuned_steps == [3]
    times = scheduler.tuned(3)
    assert times[0] == 1.0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe", scheduler=scheduler)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                  output_type="np").images
    den = ModelDenoiser.from_diffusers(pipe.unet, FlowMatchEulerDiscreteScheduler())  # the teacher's own schedule
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = Sampler(den, "dpmpp_2m", steps=3, timesteps=ExplicitTimesteps(times)).sample(x_T)
    torch.testing.assert_close(((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1), torch.from_numpy(theirs),
                               atol=1e-5, rtol=0)
