"""Students are samplers: a distilled network plus the DDIM grid it was trained for.

A student folder is a diffusers ``DDPMPipeline`` (its UNet and a ``DDIMScheduler`` whose trailing
timesteps are the student's grid, no clipping), so ``DDPMPipeline.from_pretrained(path)`` loads it
offline and ``pipe(num_inference_steps=steps)`` reproduces its sampling, plus ``fewstep_student.json``
(method, steps, grid, prediction type, training cost). ``load_student(path)`` returns it as a
``Sampler`` with NFE = its steps, so the FID harness and sweeps treat it like any sampler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir
from ..samplers import Denoiser, ModelDenoiser, Sampler
from ..samplers.schedules import DiscreteVPSchedule
from ..samplers.timesteps import ExplicitTimesteps, Grid

__all__ = ["STUDENT_FILE", "diffusers_reproducible", "export_student", "load_student", "student_denoiser", "student_sampler"]

STUDENT_FILE = "fewstep_student.json"

#: The DDPM-family keys of a teacher's scheduler config that define its noise schedule.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")


def student_denoiser(model: nn.Module, schedule, prediction_type: str):
    """A network ``model(x, t)`` (a diffusers UNet, or any module) as a denoiser of ``schedule``; a
    ``Denoiser`` (e.g. an exact testbed teacher) is returned as it is."""
    if isinstance(model, Denoiser):
        return model
    return ModelDenoiser(model, schedule, prediction_type=prediction_type)


def student_sampler(denoiser, grid: Grid) -> Sampler:
    """DDIM over the student's ``N``-step grid (NFE = N), ending at clean data (PD's and MCM's sampler)."""
    if not grid.ends_at_data:
        raise ValueError("a student grid must end at clean data")
    return Sampler(denoiser, "ddim", steps=grid.n_steps, timesteps=ExplicitTimesteps(grid.t[:-1].tolist()))


def _ddim_config(teacher_scheduler_config: dict, prediction_type: str) -> dict:
    config = {k: teacher_scheduler_config[k] for k in _SCHEDULE_KEYS if k in teacher_scheduler_config}
    return {**config, "prediction_type": prediction_type, "timestep_spacing": "trailing", "steps_offset": 0,
            "set_alpha_to_one": True, "clip_sample": False, "thresholding": False}


def diffusers_reproducible(teacher_scheduler_config: dict, grid: Grid, prediction_type: str = "v_prediction") -> bool:
    """Whether a ``DDPMPipeline`` with diffusers' DDIM can run exactly this student grid."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**_ddim_config(dict(teacher_scheduler_config), prediction_type))
    return _diffusers_grid_matches(scheduler, [float(t) for t in grid.t[:-1].tolist()])


def _diffusers_grid_matches(scheduler, times: list[float]) -> bool:
    """Whether diffusers' DDIM visits exactly our grid (it steps ``t -> t - T // n``, which equals the next
    trailing timestep only when ``T / n`` is an integer)."""
    n = len(times)
    scheduler.set_timesteps(n)
    visited = scheduler.timesteps.tolist()
    stride = scheduler.config.num_train_timesteps // n
    nexts = [t - stride for t in visited]
    return visited == [int(t) for t in times] and nexts[:-1] == visited[1:] and nexts[-1] < 0


def export_student(model: nn.Module, teacher_scheduler_config: dict, grid: Grid, prediction_type: str,
                   path: str | os.PathLike, info: dict | None = None) -> Path:
    """Save a student as a ``DDPMPipeline`` folder plus ``fewstep_student.json``, atomically (``atomic_dir``:
    a killed export never leaves a half-written student)."""
    from diffusers import DDIMScheduler, DDPMPipeline

    path = Path(path)
    times = [float(t) for t in grid.t[:-1].tolist()]
    scheduler = DDIMScheduler(**_ddim_config(dict(teacher_scheduler_config), prediction_type))
    if not _diffusers_grid_matches(scheduler, times):
        raise ValueError(f"diffusers' DDIM cannot visit the student grid {times} (its stride is "
                         f"T // {len(times)}); export only students whose steps divide the training timesteps")
    record = {"steps": len(times), "timesteps": times, "prediction_type": prediction_type, **(info or {})}
    with atomic_dir(path) as tmp:
        DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp)
        (tmp / STUDENT_FILE).write_text(json.dumps(record, indent=1))
    return path


def load_student(path: str | os.PathLike, device: str | torch.device = "cpu") -> Sampler:
    """A committed or exported student as a ``Sampler`` (NFE = its steps)."""
    from diffusers import UNet2DModel

    path = Path(path)
    record_path = path / STUDENT_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{path} is not a fewstep student (no {STUDENT_FILE}); export one with "
                                "`fewstep distill`")
    record = json.loads(record_path.read_text())
    unet = UNet2DModel.from_pretrained(path / "unet").to(device).eval().requires_grad_(False)
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    schedule = DiscreteVPSchedule.from_diffusers_config(config)
    denoiser = student_denoiser(unet, schedule, record["prediction_type"])
    sampler = Sampler(denoiser, "ddim", steps=record["steps"], timesteps=ExplicitTimesteps(record["timesteps"]))
    sampler.student = record  # method, training cost, ... for reports
    return sampler
