"""Distillation on the core: PD and MCM students end to end on a tiny teacher (exported, loaded, equal to
their diffusers pipeline), exact resume, clear errors; and the exact-teacher toys of research note 9.2 / 9.5."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fewstep.config import DistillConfig, from_dict
from fewstep.distill.consistency import MultistepConsistency
from fewstep.distill.core import CoreConfig, OptimizerConfig, fit
from fewstep.distill.progressive import ProgressiveDistillation, halve
from fewstep.distill.run import distill
from fewstep.distill.students import load_student, student_sampler
from fewstep.samplers import ContinuousVPSchedule, ModelDenoiser, Sampler
from fewstep.samplers.timesteps import TimeUniform
from fewstep.testbed import ExactDenoiser, GaussianMixture

from conftest import TINY_UNET



@pytest.fixture
def tiny_teacher(tmp_path):
    """A randomly initialised 8x8 DDPM teacher saved as a DDPMPipeline (64 training timesteps)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    path = tmp_path / "teacher"
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET, dropout=0.1), scheduler=DDPMScheduler(num_train_timesteps=64)).save_pretrained(path)
    return path


def _config(tiny_teacher, idx_folder, out, **sections):
    values = {"teacher": str(tiny_teacher),
              "train": {"output_dir": str(out), "steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 1,
                        "log_every": 1, "progress": False, "cpu": True, "ema_decay": 0.0},
              "data": {"name": "fashion_mnist", "root": str(idx_folder), "size": 8}}
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(DistillConfig, values)


def test_pd_exports_one_student_per_round_and_each_equals_its_diffusers_pipeline(tiny_teacher, idx_folder, tmp_path):
    from diffusers import DDPMPipeline

    config = _config(tiny_teacher, idx_folder, tmp_path / "pd", progressive={"start_steps": 8})
    paths = distill(config)
    assert [p.name for p in paths] == ["progressive-4", "progressive-2", "progressive-1"]
    assert (tmp_path / "pd" / "training_curves.png").is_file()
    for path, steps in zip(paths, (4, 2, 1)):
        sampler = load_student(path)
        assert sampler.nfe == steps
        pipe = DDPMPipeline.from_pretrained(path)
        g = torch.Generator().manual_seed(1)
        ours = sampler.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
        theirs = pipe(batch_size=2, generator=g, num_inference_steps=steps, output_type="np").images
        ours01 = ((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        assert abs(ours01 - theirs).max() < 1e-5, path.name
        assert sampler.student["training"]["updates"] == {4: 2, 2: 4, 1: 6}[steps]


def test_mcm_exports_a_student_of_its_segment_count(tiny_teacher, idx_folder, tmp_path):
    config = _config(tiny_teacher, idx_folder, tmp_path / "mcm", method="consistency",
                     consistency={"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 16,
                                  "anneal_updates": 4})
    (path,) = distill(config)
    assert path.name == "consistency-2" and load_student(path).nfe == 2


def test_mcm_can_start_from_another_student(tiny_teacher, idx_folder, tmp_path):
    from diffusers import UNet2DModel

    mcm = {"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 16, "anneal_updates": 4}
    (first,) = distill(_config(tiny_teacher, idx_folder, tmp_path / "s2", method="consistency", consistency=mcm))
    config = _config(tiny_teacher, idx_folder, tmp_path / "s1", method="consistency",
                     consistency={**mcm, "student_steps": 1, "student_init": str(first)}, train={"steps": 1, "lr": 1e-12})
    (second,) = distill(config)
    assert load_student(second).student["student_init"] == str(first)
    start, end = UNet2DModel.from_pretrained(first / "unet"), UNet2DModel.from_pretrained(second / "unet")
    for a, b in zip(start.parameters(), end.parameters()):  # one step of lr 1e-12: still the init's weights
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="student_init .* is not a fewstep student"):
        distill(_config(tiny_teacher, idx_folder, tmp_path / "bad", method="consistency",
                        consistency={**mcm, "student_init": str(tiny_teacher)}))
    with pytest.raises(ValueError, match="predicts 'v_prediction', the new student 'sample'"):
        distill(_config(tiny_teacher, idx_folder, tmp_path / "bad2", method="consistency",
                        consistency={**mcm, "student_init": str(first), "prediction_type": "sample"}))


@pytest.mark.parametrize("method,options", [("progressive", {"progressive": {"start_steps": 4}}),
                                            ("consistency", {"consistency": {"student_steps": 2, "teacher_steps": 4}})])
def test_an_interrupted_distillation_resumes_bitwise_across_a_round(tiny_teacher, idx_folder, tmp_path, method, options):
    # accumulation 2 and a teacher (and so student) with dropout 0.1; PD with start 4: rounds of 3 steps (2, 1 steps)
    def run(out, max_steps=None):
        config = _config(tiny_teacher, idx_folder, out, method=method, **options,
                         train={"gradient_accumulation_steps": 2})
        distill(config, max_steps=max_steps)
        return torch.load(sorted(out.glob("checkpoint-*.pt"))[-1], weights_only=False)["state"]["networks"]

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", max_steps=4)  # past PD's round boundary at step 3
    resumed = run(tmp_path / "split")
    for name, weights in whole.items():
        for key, value in weights.items():
            assert torch.equal(resumed[name][key], value), (name, key)


@pytest.mark.parametrize("change,match", [
    ({"progressive": {"start_steps": 6}}, "power of two"),
    ({"progressive": {"start_steps": 4, "prediction_type": "epsilon"}}, "eps-parameterised student"),
    ({"method": "consistency", "consistency": {"student_steps": 1, "prediction_type": "epsilon"}}, "eps-parameterised"),
    ({"method": "distillation"}, "unknown distillation method"),
    ({"teacher": "/no/such/teacher"}, "not a diffusers pipeline folder"),
])
def test_bad_distillation_configs_fail_clearly(tiny_teacher, idx_folder, tmp_path, change, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        distill(_config(tiny_teacher, idx_folder, tmp_path / "bad", **change))


def test_unknown_keys_and_an_unsupported_schedule_are_refused(tiny_teacher, idx_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        from_dict(DistillConfig, {"progressive": {"start_step": 8}})
    from diffusers import CMStochasticIterativeScheduler, DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(tiny_teacher)
    odd = tmp_path / "odd"
    DDPMPipeline(unet=pipe.unet, scheduler=CMStochasticIterativeScheduler()).save_pretrained(odd)
    with pytest.raises(ValueError, match="DDPM-family .* flow-matching and EDM schedulers"):
        distill(_config(odd, idx_folder, tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------
# Exact-teacher toys (note 9.2 / 9.5): a 1-D two-mode mixture, its closed-form denoiser as the teacher.

MIXTURE = GaussianMixture(torch.tensor([[-2.0], [2.0]]), 0.25)
SCHEDULE = ContinuousVPSchedule("cosine")


class TimeMLP(nn.Module):
    """A small MLP on (x, log-SNR(t)) predicting v."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, x, t):
        lam = SCHEDULE.log_snr(t.double()).float().reshape(-1, 1).expand(len(x), 1)
        return self.net(torch.cat([x, lam / 5], 1))


class MixtureData(torch.utils.data.Dataset):
    def __init__(self, n=4096):
        self.x = MIXTURE.sample(n, torch.Generator().manual_seed(1)).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _w1(samples):
    data = MIXTURE.sample(len(samples), torch.Generator().manual_seed(9)).float()
    return float((samples.flatten().sort().values - data.flatten().sort().values).abs().mean())


def _toy_config(tmp_path, steps):
    return CoreConfig(output_dir=str(tmp_path), steps=steps, batch_size=512, seed=0, checkpoint_every=steps,
                      log_every=steps, progress=False, cpu=True)


def test_pd_toy_halves_an_exact_teacher_down_to_one_step(tmp_path):
    teacher = ExactDenoiser(MIXTURE, SCHEDULE)
    students = {}

    def keep(steps, module, grid, state):
        students[steps] = (copy.deepcopy(module), grid)

    torch.manual_seed(0)
    method = ProgressiveDistillation(teacher, "x0", SCHEDULE, start_steps=16, end_steps=1, student=TimeMLP(),
                                     timesteps=TimeUniform(), on_student=keep,
                                     optim=OptimizerConfig(lr=2e-3, anneal="linear"))
    result = fit(method, _toy_config(tmp_path, 4 * 1500), MixtureData(), log=lambda *_: None)
    keep(*method.final_student(result.state))
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(2))
    for steps, (module, grid) in sorted(students.items()):
        w1 = _w1(student_sampler(ModelDenoiser(module, SCHEDULE, "v_prediction"), grid).sample(z))
        ddim = _w1(student_sampler(teacher, grid).sample(z.double()).float())  # the teacher on the same grid
        print(f"PD toy: {steps} steps: student W1 {w1:.3f}, exact-teacher DDIM {ddim:.3f}")
        assert w1 < 0.2
        if steps <= 2:  # where DDIM collapses towards the mean, the student does not
            assert w1 < 0.25 * ddim


@pytest.mark.slow  # ~100 s alone on 2 cores
def test_mcm_toy_students_against_ddim_at_the_same_nfe(tmp_path):
    teacher = ExactDenoiser(MIXTURE, SCHEDULE)
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(2))
    results = {}
    for steps in (1, 2, 4):
        torch.manual_seed(0)
        method = MultistepConsistency(teacher, "x0", SCHEDULE, student_steps=steps, teacher_steps=16,
                                      teacher_steps_end=64, anneal_updates=1500, student=TimeMLP(),
                                      timesteps=TimeUniform(), huber_c=1e-3, optim=OptimizerConfig(lr=2e-3))
        result = fit(method, _toy_config(tmp_path / str(steps), 3000), MixtureData(), log=lambda *_: None)
        _, module, grid, _ = method.final_student(result.state)
        w1 = _w1(student_sampler(ModelDenoiser(module, SCHEDULE, "v_prediction"), grid).sample(z))
        ddim = _w1(student_sampler(teacher, grid).sample(z.double()).float())
        results[steps] = w1
        print(f"MCM toy: S={steps}: student W1 {w1:.3f}, exact-teacher DDIM {ddim:.3f}")
        assert w1 < ddim
    assert results[1] < 0.4  # DDIM-1 collapses to the mean (W1 ~2)


_TWO_PROCESS_SCRIPT = """
import sys, torch
from fewstep.config import DistillConfig, from_dict
from fewstep.distill.run import distill
teacher, data, out, method = sys.argv[1:5]
config = from_dict(DistillConfig, {
    "teacher": teacher, "method": method, "progressive": {"start_steps": 4},
    "consistency": {"student_steps": 1, "teacher_steps": 4, "teacher_steps_end": 16, "anneal_updates": 4},
    "train": {"output_dir": out, "steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 4, "log_every": 4,
              "progress": False, "cpu": True, "ema_decay": 0.0},
    "data": {"name": "fashion_mnist", "root": data, "size": 8}})
distill(config)
"""


@pytest.mark.parametrize("method", ["progressive", pytest.param("consistency", marks=pytest.mark.slow)])
def test_two_cpu_processes_train_the_same_student_as_one(tiny_teacher, idx_folder, tmp_path, method):
    import shutil
    import subprocess
    import sys

    from diffusers import DDPMPipeline, UNet2DModel

    # Without dropout the two runs see the same batches and noise; only the gradient all-reduce differs.
    pipe = DDPMPipeline.from_pretrained(tiny_teacher)
    unet = UNet2DModel(**TINY_UNET)
    unet.load_state_dict(pipe.unet.state_dict())
    no_dropout = tmp_path / "teacher_nodrop"
    DDPMPipeline(unet=unet, scheduler=pipe.scheduler).save_pretrained(no_dropout)
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    args = [str(no_dropout), str(idx_folder)]
    subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one"), method], check=True,
                   capture_output=True)
    from conftest import free_port

    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--main_process_port", free_port(), "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args,
                          str(tmp_path / "two"), method], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = UNet2DModel.from_pretrained(tmp_path / "one" / "students" / f"{method}-1" / "unet").state_dict()
    b = UNet2DModel.from_pretrained(tmp_path / "two" / "students" / f"{method}-1" / "unet").state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    changed = max(float((a[k] - unet.state_dict()[k]).abs().max()) for k in a)
    assert changed > 1e-3  # the students did train
    # Adam normalises the update, so float-rounding differences in the all-reduced gradient show at ~1e-5
    # after 4 steps of lr 1e-3; a wrong batch split or noise would differ at the size of the updates.
    assert diff < 1e-4 and diff < 0.01 * changed, (diff, changed)
    # the logged losses are the whole batch's (all-reduced), not process 0's half
    import json

    logs = [json.loads((tmp_path / run / "history.json").read_text())[-1] for run in ("one", "two")]
    losses = [k for k in logs[0] if k not in ("step", "round", "steps_per_s", "seconds")]
    assert losses and all(abs(logs[0][k] - logs[1][k]) <= 1e-4 * abs(logs[0][k]) for k in losses), logs


@pytest.mark.parametrize("name,steps", [("progressive-8", 8), ("progressive-4", 4), ("progressive-2", 2),
                                        ("progressive-1", 1)])
def test_committed_students_load_offline_as_samplers_and_as_pipelines(name, steps):
    from diffusers import DDPMPipeline

    from fewstep.teachers import FMNIST_STUDENTS

    sampler = load_student(FMNIST_STUDENTS / name)
    assert sampler.nfe == steps and sampler.student["method"] == "progressive"
    x = sampler.sample(torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(x).all() and x.abs().max() < 3
    pipe = DDPMPipeline.from_pretrained(FMNIST_STUDENTS / name)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
