"""The trainers on every schedule family (distill.noise): DDPM, rectified flow (SD3's shift, Flux's dynamic
shift), EDM. Readers, grids, exports, and each trainer's target on the exact testbed under flow and EDM."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.distill.consistency import MultistepConsistency, consistency_loss
from fewstep.distill.matching import dsm_loss
from fewstep.distill.noise import (EDMNoise, FlowNoise, UnsupportedSchedule, noise_for,
                                   noise_from_config)
from fewstep.distill.progressive import ProgressiveDistillation
from fewstep.distill.targets import ddim_transfer, inverse_ddim
from fewstep.samplers import EDMSchedule, FlowMatchingSchedule
from fewstep.samplers.denoisers import Denoiser, Prediction
from fewstep.samplers.flow import calculate_shift, static_shift
from fewstep.samplers.timesteps import DiffusersSpacing
from fewstep.testbed import ExactDenoiser, GaussianMixture, gaussian_pf_ode_solution

from conftest import TINY_UNET

F64 = torch.float64


def _config(scheduler) -> dict:
    return {"_class_name": type(scheduler).__name__, **scheduler.config}


# -- readers ---------------------------------------------------------------------------------------------


def test_each_diffusers_scheduler_family_is_read_as_its_noise():
    from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)

    ddpm = noise_from_config(_config(DDPMScheduler(num_train_timesteps=1000)))
    karras = noise_from_config(_config(EulerDiscreteScheduler(use_karras_sigmas=True)))
    # a VP network saved with Karras sampling sigmas is the same network: its grid is a sampling choice
    assert ddpm.kind == karras.kind == "ddpm"
    assert torch.equal(ddpm.schedule.alphas_cumprod, karras.schedule.alphas_cumprod)
    sd3 = noise_from_config(_config(FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert (sd3.kind, sd3.shift, sd3.mu, sd3.prediction_type) == ("flow", 3.0, None, "flow_prediction")
    flux = noise_from_config(_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)), image_seq_len=1024)
    assert flux.mu == pytest.approx(calculate_shift(1024))
    sana = noise_from_config(_config(DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                                 prediction_type="flow_prediction")))
    assert (sana.kind, sana.shift) == ("flow", 3.0)
    edm = noise_from_config(_config(EDMEulerScheduler(sigma_data=0.5, prediction_type="v_prediction")))
    assert (edm.kind, edm.edm_prediction, edm.prediction_type) == ("edm", "v_prediction", "sample")


def test_schedules_the_trainers_cannot_read_are_refused_in_one_line():
    from diffusers import CMStochasticIterativeScheduler, FlowMatchEulerDiscreteScheduler

    with pytest.raises(UnsupportedSchedule, match="DDPM-family .* flow-matching and EDM"):
        noise_from_config(_config(CMStochasticIterativeScheduler()))
    with pytest.raises(UnsupportedSchedule, match="use_karras_sigmas"):
        noise_from_config(_config(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)))
    with pytest.raises(UnsupportedSchedule, match="image tokens"):
        noise_from_config(_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)))


NOISES = {"ddpm": lambda: noise_from_config({"_class_name": "DDPMScheduler"}),
          "flow": lambda: FlowNoise(shift=3.0),
          "flux": lambda: FlowNoise(mu=calculate_shift(4096)),
          "edm": lambda: EDMNoise(0.002, 80.0)}


@pytest.mark.parametrize("name", sorted(NOISES))
def test_student_grids_are_nested_under_halving_and_run_from_the_most_noise_to_data(name):
    noise = NOISES[name]()
    for n in (1, 2, 4, 8):
        coarse, fine = noise.grid(n), noise.grid(2 * n)
        assert coarse.ends_at_data and coarse.n_steps == n
        assert torch.equal(fine.t[:-1:2], coarse.t[:-1])  # PD's rounds share points
        assert torch.all(coarse.t[:-2] > coarse.t[1:-1])
    top = float(noise.grid(1).t[0])
    assert top == {"ddpm": 999.0, "flow": 1.0, "flux": 1.0, "edm": 80.0}[name]


def test_the_ddpm_grid_is_diffusers_trailing_and_the_flow_grid_is_the_schedulers_shift():
    ddpm = NOISES["ddpm"]()
    assert torch.equal(ddpm.grid(4).t[:-1], DiffusersSpacing("trailing").grid(ddpm.schedule, 4).t[:-1])
    flow = FlowNoise(shift=3.0)
    u = 1 - torch.arange(4, dtype=F64) / 4
    assert torch.allclose(flow.grid(4).t[:-1], static_shift(u, 3.0), rtol=0, atol=1e-15)
    # training times come from the same map: the fractions [lo, hi] mean the same on every family
    assert flow.time_range(0.02, 0.98) == pytest.approx((float(static_shift(torch.tensor(0.02), 3.0)),
                                                        float(static_shift(torch.tensor(0.98), 3.0))))
    edm = EDMNoise(0.002, 80.0)
    assert edm.time_range(0.0, 1.0) == pytest.approx((0.002, 80.0))


@pytest.mark.parametrize("name", ["flow", "flux", "edm"])
def test_the_exported_scheduler_runs_the_students_grid_in_a_pipeline_loop(name):
    noise = NOISES[name]()
    grid = noise.grid(4)
    scheduler = noise.student_scheduler(grid, "flow_prediction" if noise.kind == "flow" else "sample")
    scheduler.set_timesteps(4, mu=0.5) if noise.kind == "flow" else scheduler.set_timesteps(4)
    assert torch.allclose(scheduler.grid.t[:-1], grid.t[:-1], rtol=1e-6)
    expected = noise.model_time(grid.t[:-1]).float()
    assert torch.allclose(scheduler.timesteps, expected, rtol=1e-5, atol=1e-5)


def test_a_ddpm_student_grid_diffusers_cannot_visit_is_said_to_be_unexportable():
    ddpm = NOISES["ddpm"]()
    assert ddpm.exportable(ddpm.grid(4), "v_prediction") is None
    assert "not an integer" in ddpm.exportable(ddpm.grid(3), "v_prediction")


# -- EDM's preconditioning is diffusers' ------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_preconditioning_equals_diffusers_edm_euler(prediction):
    from diffusers import EDMEulerScheduler

    scheduler = EDMEulerScheduler(sigma_data=0.5, prediction_type=prediction)
    noise = noise_from_config(_config(scheduler))
    sigma = torch.tensor([0.3, 2.0, 40.0], dtype=torch.float32)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    x_in, state = noise.precondition(x, sigma)
    ref_in = torch.stack([scheduler.precondition_inputs(x[i:i + 1], sigma[i])[0] for i in range(3)])
    assert torch.allclose(x_in, ref_in, atol=1e-6)
    assert torch.allclose(noise.model_time(sigma), torch.stack([scheduler.precondition_noise(s) for s in sigma]))
    ref_out = torch.stack([scheduler.precondition_outputs(x[i:i + 1], out[i:i + 1], sigma[i])[0] for i in range(3)])
    assert torch.allclose(noise.output(out, x, sigma, state), ref_out, atol=1e-5)


# -- the targets on the exact testbed, per family ---------------------------------------------------------

GAUSS = GaussianMixture.gaussian(dim=8, mean=0.4, std=0.8)
FAMILIES = {"flow": (FlowNoise(shift=3.0), lambda s: ExactDenoiser(GAUSS, s)),
            "edm": (noise_for(EDMSchedule(0.002, 80.0)), lambda s: ExactDenoiser(GAUSS, s))}


class _PerfectPD(Denoiser):
    """The PD student whose one DDIM step from each point of the student grid equals two exact-teacher DDIM
    steps: ``x = invDDIM_{t->s}(DDIM_{mid->s}(DDIM_{t->mid}(z)))``, by definition of PD's target."""

    def __init__(self, teacher, grid):
        super().__init__()
        self.teacher, self.grid, self.schedule = teacher, grid, teacher.schedule

    def forward(self, z, t):
        out = torch.empty_like(z)
        for row, ti in enumerate(torch.as_tensor(t).reshape(-1).expand(len(z)).tolist()):
            k = int((self.grid.t[:-1] == ti).nonzero()[0, 0])
            c = [(self.grid.alpha[j], self.grid.sigma[j]) for j in (k, k + 1, k + 2)]
            zr = z[row:row + 1]
            x_t = self.teacher(zr, self.grid.t[k]).x0
            z_mid = ddim_transfer(x_t, zr, *c[0], *c[1])
            x_mid = self.teacher(z_mid, self.grid.t[k + 1]).x0
            z_s = ddim_transfer(x_mid, z_mid, *c[1], *c[2])
            out[row] = x_mid[0] if k + 2 == len(self.grid.t) - 1 else inverse_ddim(z_s, zr, *c[0], *c[2])[0]
        a, s = self.coefficients(t, z)
        return Prediction(x0=out, x=z, alpha=a.reshape(-1, *[1] * (z.ndim - 1)) if a.ndim else float(a),
                          sigma=s.reshape(-1, *[1] * (z.ndim - 1)) if s.ndim else float(s))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pd_target_is_two_teacher_steps_on_the_familys_grid(family):
    noise, exact = FAMILIES[family]
    teacher = exact(noise.schedule)
    method = ProgressiveDistillation(teacher, "x0", noise.schedule, start_steps=8, end_steps=4,
                                     prediction_type="sample", student=teacher, noise=noise)
    grid = method.teacher_grid(0)
    assert torch.equal(grid.t[:-1], noise.grid(8).t[:-1])
    x = GAUSS.sample(16, torch.Generator().manual_seed(0)).to(F64)
    eps = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    index = torch.arange(16) % 4
    perfect = method.loss(x, index, eps, student=_PerfectPD(teacher, grid), teacher=teacher)
    assert perfect.abs().max() < 1e-18 * max(1.0, float(noise.schedule.t_max)) ** 2
    assert method.loss(x, index, eps, student=teacher, teacher=teacher).mean() > 1e-6  # the test can fail


class _PerfectMCM(Denoiser):
    """The MCM student that maps each point to its segment end along the exact PF-ODE (one Gaussian: closed
    form), read as the x of a DDIM step there: the fixed point of the consistency target."""

    def __init__(self, schedule, ends):
        super().__init__()
        self.schedule, self.ends = schedule, ends

    def forward(self, z, t):
        t = torch.as_tensor(t, dtype=F64).reshape(-1).expand(len(z))
        out = torch.empty_like(z)
        for row, ti in enumerate(t.tolist()):
            end = self.ends(ti)
            a_t, s_t = float(self.schedule.alpha(ti)), float(self.schedule.sigma(ti))
            if end is None:  # the segment ends at clean data
                out[row] = gaussian_pf_ode_solution(GAUSS, self.schedule, z[row:row + 1], ti, None)[0]
                continue
            z_end = gaussian_pf_ode_solution(GAUSS, self.schedule, z[row:row + 1], ti, end)
            a_e, s_e = float(self.schedule.alpha(end)), float(self.schedule.sigma(end))
            out[row] = inverse_ddim(z_end, z[row:row + 1], a_t, s_t, a_e, s_e)[0]
        a, s = self.coefficients(t, z)
        return Prediction(x0=out, x=z, alpha=a.reshape(-1, 1), sigma=s.reshape(-1, 1))


class _ODETeacher(Denoiser):
    """A teacher whose DDIM step is the exact PF-ODE step (one Gaussian): its x0 at ``z_t`` is the x that
    DDIM carries to the exact solution at the next fine point."""

    def __init__(self, schedule, nxt):
        super().__init__()
        self.schedule, self.nxt = schedule, nxt

    def forward(self, z, t):
        t = torch.as_tensor(t, dtype=F64).reshape(-1).expand(len(z))
        out = torch.empty_like(z)
        for row, ti in enumerate(t.tolist()):
            s = self.nxt(ti)
            z_s = gaussian_pf_ode_solution(GAUSS, self.schedule, z[row:row + 1], ti, s)
            if s is None:
                out[row] = z_s[0]
                continue
            coef = [float(f(u)) for u in (ti, s) for f in (self.schedule.alpha, self.schedule.sigma)]
            out[row] = inverse_ddim(z_s, z[row:row + 1], *coef)[0]
        a, s_ = self.coefficients(t, z)
        return Prediction(x0=out, x=z, alpha=a.reshape(-1, 1), sigma=s_.reshape(-1, 1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_perfect_multistep_consistency_student_has_zero_loss_on_the_familys_grid(family):
    noise, _ = FAMILIES[family]
    schedule = noise.schedule
    steps, per = 2, 4
    fine = noise.grid(steps * per)
    times = [float(t) for t in fine.t[:-1]]

    def nxt(t):
        k = times.index(t)
        return times[k + 1] if k + 1 < len(times) else None

    def end(t):
        k = times.index(t)
        e = (k // per + 1) * per
        return times[e] if e < len(times) else None

    student, teacher = _PerfectMCM(schedule, end), _ODETeacher(schedule, nxt)
    x = GAUSS.sample(24, torch.Generator().manual_seed(2)).to(F64)
    eps = torch.randn(24, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    point = torch.arange(24) % fine.n_steps
    loss = consistency_loss(student, teacher, x, fine, steps, point, eps, huber_c=1e-6, xvar_frac=0.0)
    assert loss.max() < 1e-9
    wrong = consistency_loss(_ODETeacher(schedule, nxt), teacher, x, fine, steps, point, eps, 1e-6, 0.0)
    assert wrong.max() > 1e-3  # a student that is not consistent across a segment is penalised
    method = MultistepConsistency(teacher, "x0", schedule, student_steps=steps, teacher_steps=steps * per,
                                  teacher_steps_end=steps * per, student=teacher, noise=noise)
    assert torch.equal(method.grid_at(0).t[:-1], fine.t[:-1])


def test_the_fake_scores_flow_loss_is_the_flow_teachers_own():
    # Rectified flow's teacher loss |u - (eps - x)|^2; the fake score of a flow teacher trains on the same.
    from fewstep.samplers.denoisers import convert_prediction

    g = torch.Generator().manual_seed(4)
    x, eps, u = (torch.randn(6, 3, 4, 4, generator=g, dtype=F64) for _ in range(3))
    t = torch.rand(6, generator=g, dtype=F64) * 0.98 + 0.01
    schedule = FlowMatchingSchedule(0.0, 1.0)
    shape = (-1, 1, 1, 1)
    a, s = schedule.alpha(t).reshape(shape), schedule.sigma(t).reshape(shape)
    x_t = a * x + s * eps
    pred = convert_prediction(u, x_t, a, s, "flow", schedule.alpha_dot(t).reshape(shape),
                              schedule.sigma_dot(t).reshape(shape))
    ours = dsm_loss(pred, x, eps, a, s, "flow_prediction", alpha_dot=-torch.ones_like(a), sigma_dot=torch.ones_like(s))
    assert float(ours) == pytest.approx(float((u - (eps - x)).square().mean()), rel=1e-6)  # dsm_loss sums in fp32


def test_a_one_step_generator_starts_from_the_familys_prior():
    z = torch.randn(4, 3)
    assert torch.equal(FlowNoise().prior(z, FlowNoise().grid(1)), z)
    edm = EDMNoise(0.002, 80.0)
    assert torch.equal(edm.prior(z, edm.grid(1)), (80.0 ** 2 + 1) ** 0.5 * z)  # diffusers' EDM start


# -- PD down to one step on the exact flow teacher (slow; benchmarks/flow_testbed_students.py prints it) ----


@pytest.mark.slow  # ~5 min on 2 cores
def test_pd_chain_on_an_exact_flow_teacher_beats_euler_and_dpmpp_at_the_same_nfe(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from flow_testbed_students import pd_chain_on_exact_flow

    rows = pd_chain_on_exact_flow(tmp_path, updates_per_round=1500)
    for steps, row in rows.items():
        assert row["student"] < 0.2, row
        if steps <= 2:  # where Euler collapses towards the mean, the student does not
            assert row["student"] < 0.5 * min(row["euler"], row["dpmpp_2m"]), row


# -- every method through `fewstep distill` on a flow-matching DDPMPipeline, and back through diffusers ----


@pytest.fixture
def flow_teacher(tmp_path):
    """A random 8x8 UNet on the rectified-flow objective's schedule: a DDPMPipeline whose scheduler is
    FlowMatchEulerDiscreteScheduler (what `fewstep train-teacher` with objective: flow exports), shift 3."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel


    torch.manual_seed(0)
    path = tmp_path / "flow_teacher"
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(path)
    return path


@pytest.mark.parametrize("method,section,steps", [
    ("progressive", {"start_steps": 4, "end_steps": 2, "prediction_type": "teacher"}, 2),
    ("consistency", {"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 8, "prediction_type": "teacher"}, 2),
    ("fdistill", {"prediction_type": "teacher", "update_ratio": 2}, 1),
    ("sim", {"prediction_type": "v_prediction", "update_ratio": 1}, 1),
])
def test_every_method_distils_a_flow_teacher_into_a_pipeline_diffusers_runs(flow_teacher, idx_folder, tmp_path, method,
                                                                           section, steps):
    from diffusers import DDPMPipeline

    from fewstep.config import DistillConfig, from_dict
    from fewstep.distill import load_student
    from fewstep.distill.run import distill

    config = from_dict(DistillConfig, {
        "teacher": str(flow_teacher), "method": method, method: section,
        "train": {"output_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2,
                  "log_every": 2, "progress": False, "cpu": True, "ema_decay": 0.0},
        "data": {"name": "fashion_mnist", "root": str(idx_folder), "size": 8}})
    path = distill(config)[-1]
    assert path.name == f"{method}-{steps}"
    student = load_student(path)
    assert student.student["noise"] == "flow" and student.nfe == steps
    pipe = DDPMPipeline.from_pretrained(path)
    assert type(pipe.scheduler).__name__ == "FewstepScheduler" and pipe.scheduler.config.noise_schedule == "flow"
    g = torch.Generator().manual_seed(1)
    theirs = pipe(batch_size=2, generator=g, num_inference_steps=steps, output_type="np").images
    ours = student.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    ours01 = ((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert abs(ours01 - theirs).max() < 1e-5
    grid = FlowNoise(shift=3.0).grid(steps)
    assert student.student["timesteps"] == pytest.approx(grid.t[:-1].tolist(), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_a_student_scheduler_from_pure_noise_starts_where_fluxpipeline_starts_it(steps):
    # FluxPipeline calls set_begin_index(0) before its loop; a one-step grid's only call is at sigma = 1
    noise = FlowNoise(shift=3.0)
    scheduler = noise.student_scheduler(noise.grid(steps), "flow_prediction")
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    u = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:
        x = scheduler.step(u, t, x).prev_sample
    grid = noise.grid(steps)  # a constant velocity u: Euler lands at x - (sigma_0 - 0) u
    start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, start - float(grid.t[0]) * u, atol=1e-5, rtol=0)


class _Ctx:
    """The training step's shared uniforms (``ctx.rand``), from a seeded generator."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def rand(self, rows):
        return torch.rand(rows, generator=self.g)


def test_training_time_laws_stay_in_range_and_follow_their_papers():
    from scipy import stats

    flow = FlowNoise(shift=3.0)
    t = flow.draw(_Ctx(), 20000, 0.02, 0.98, "logit_normal")
    lo, hi = flow.time_range(0.02, 0.98)
    assert lo <= float(t.min()) and float(t.max()) <= hi
    # unshift, take the logit: a normal N(0, 1) truncated to [logit 0.02, logit 0.98]
    u = t / (3.0 - 2.0 * t)
    n = torch.log(u) - torch.log1p(-u)
    a, b = math.log(0.02 / 0.98), math.log(0.98 / 0.02)
    assert stats.kstest(n.numpy(), stats.truncnorm(a, b).cdf).pvalue > 1e-3
    edm = EDMNoise(0.002, 80.0)
    s = edm.draw(_Ctx(1), 20000, 0.0, 1.0, "log_normal")
    assert 0.002 <= float(s.min()) and float(s.max()) <= 80.0 + 1e-9
    z = (torch.log(s) + 1.2) / 1.2
    ends = ((math.log(0.002) + 1.2) / 1.2, (math.log(80.0) + 1.2) / 1.2)
    assert stats.kstest(z.numpy(), stats.truncnorm(*ends).cdf).pvalue > 1e-3
    with pytest.raises(ValueError, match="not one of this ddpm teacher's: uniform"):
        NOISES["ddpm"]().draw(_Ctx(), 4, 0.02, 0.98, "logit_normal")
    with pytest.raises(ValueError, match="log_normal"):
        flow.check_sampling("log_normal")
