"""fewstep.samplers: schedules, denoisers, timestep grids, solvers and diffusers adapters."""

if __name__ != "fewstep.samplers":  # the checkout's folder imported as a top-level package
    raise ImportError(f"this folder is the package fewstep.samplers; `import fewstep.samplers` instead of "
                      f"`import {__name__}` (install it once with `pip install -e .` from the repository root)")

from .denoisers import CFGDenoiser, Denoiser, ModelDenoiser, Prediction, convert_prediction, diffusers_unet_fn
from .momentum import GHVB, HeavyBall, momentum_number
from .registry import ALIASES, SAMPLERS, make_solver
from .sampler import Sampler
from .schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, FlowMatchingSchedule,
                        Schedule)
from .solvers import DDIM, DDPM, PNDM, DPMSolver, DPMSolverPP, Euler, Heun, SDEDPMSolver, SDEDPMSolverPP, Solver
from .timeshift import TimeShift, TimeShiftDenoiser, TimeShiftUNet
from .timesteps import (DiffusersSpacing, ExplicitTimesteps, Grid, Karras, LogSNRUniform, TimeQuadratic,
                        Timesteps, TimeUniform, make_timesteps)
from . import mr  # noqa: E402  (MR diffusion: schedule, denoiser, MRSampler)
from . import kdiffusion  # noqa: E402  (sample_<name>(model, x, sigmas, ...) for k-diffusion code)

__all__ = [
    "Schedule", "DiscreteVPSchedule", "ContinuousVPSchedule", "EDMSchedule", "FlowMatchingSchedule",
    "Denoiser", "ModelDenoiser", "CFGDenoiser", "Prediction", "convert_prediction", "diffusers_unet_fn",
    "Timesteps", "Grid", "TimeUniform", "TimeQuadratic", "LogSNRUniform", "Karras", "DiffusersSpacing",
    "ExplicitTimesteps", "make_timesteps",
    "Solver", "DDIM", "DDPM", "DPMSolverPP", "SDEDPMSolverPP", "DPMSolver", "SDEDPMSolver", "PNDM", "Euler", "Heun",
    "Sampler", "SAMPLERS", "ALIASES", "make_solver",
    "HeavyBall", "GHVB", "momentum_number",
    "TimeShift", "TimeShiftDenoiser", "TimeShiftUNet",
    "mr", "kdiffusion",
]
