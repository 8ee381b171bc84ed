"""The MR Sampler as a diffusers scheduler (``MRScheduler``). Importing this module imports diffusers;
``fewstep.samplers.mr`` loads it on first access of ``MRScheduler`` only."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..denoisers import broadcast_like
from ..schedulers import BeginIndexMixin
from ..timesteps import Grid, check_steps, make_timesteps
from .denoiser import MR_PREDICTION_TYPES, check_mu_shape, mr_prediction
from .schedule import MRLinspace, MRSchedule
from .solvers import make_mr_solver

__all__ = ["MRScheduler"]

_F64 = torch.float64


class MRScheduler(BeginIndexMixin, SchedulerMixin, ConfigMixin):
    """The MR Sampler as a diffusers scheduler, for restoration loops that call the network on ``x``:

        sched = MRScheduler(prediction_type="noise")          # IR-SDE defaults: T=100, sigma 50/255
        sched.set_timesteps(20, mu=degraded)
        x = sched.noise_state(degraded, generator=g)          # mu + sigma_inf z
        for t in sched.timesteps:
            x = sched.step(net(x, t, mu=degraded), t, x).prev_sample

    ``step`` works on ``y = x - mu`` inside and returns ``x``; the solver is ``make_mr_solver(method,
    parameterization, solver_order, solver_type, lower_order_final)``, the same generator ``MRSampler``
    drives, so both give the same samples. ``timestep_spacing``: ``"linspace"`` (MRS) or a fewstep
    spacing name (``"log_snr"``, ``"time_uniform"``, ``"karras"``, ``"time_quadratic"``).
    ``reference=True`` runs as the MRS code does (``MRSampler(reference=True)``; docs/faithfulness.md).
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 100, max_sigma: float = 50 / 255, eps: float = 0.005,
                 theta_schedule: str = "cosine", prediction_type: str = "noise", method: str = "ode",
                 parameterization: str = "data", solver_order: int = 2, solver_type: str = "heun",
                 lower_order_final: bool = False, timestep_spacing: str = "linspace", t_min: float | None = None,
                 reference: bool = False):
        # reference=True: the MRS code's runs, as MRSampler(reference=True) (theta_0 kept in the schedule,
        # the last step full order to its noisy t = 0, MRS's order rule)
        self.noise_schedule = MRSchedule(max_sigma, num_train_timesteps, theta_schedule, eps, t_min=t_min,
                                         theta_offset=reference)
        self.solver = make_mr_solver(method, parameterization, solver_order, solver_type, lower_order_final,
                                     order_rule="mrs" if reference else "diffusers")
        self._final = "t_min" if reference else "zero"
        if prediction_type not in MR_PREDICTION_TYPES:
            raise ValueError(f"unsupported MR parameterisation {prediction_type!r}; expected one of "
                             f"{sorted(MR_PREDICTION_TYPES)}")
        self._spacing = MRLinspace() if timestep_spacing == "linspace" else make_timesteps(timestep_spacing)
        self.init_noise_sigma = float(max_sigma)
        self.mu: Tensor | None = None
        self.timesteps = torch.arange(num_train_timesteps, 0, -1)
        self.num_inference_steps: int | None = None
        self.grid: Grid | None = None
        self._run, self._plan, self._step_index, self._generator = None, [], None, None
        self._begin_index: int | None = None
        self._variance_noise: Tensor | None = None

    def set_mu(self, mu: Tensor) -> None:
        """The condition (degraded input) of the current run, ``[B, *S]``."""
        check_mu_shape(mu, None, None)
        self.mu = mu

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      mu: Tensor | None = None):
        """Grid and a fresh solver run of ``num_inference_steps`` steps; optionally the condition ``mu``."""
        from ..schedulers import _as_timestep_tensor

        if mu is not None:
            self.set_mu(mu)
        self.num_inference_steps = check_steps(num_inference_steps)
        self.grid = self._spacing.grid(self.noise_schedule, self.num_inference_steps, final=self._final)
        self._plan = self.solver.plan(self.grid)
        self._start(self.grid)
        self.timesteps = _as_timestep_tensor(self._plan, device)
        self._begin_index = None

    def _start(self, grid: Grid):
        self._run = self.solver.steps(grid, self._noise)
        next(self._run)
        self._step_index = None

    def _begin_at(self, begin: int):
        if not 0 <= begin < len(self._plan):
            raise ValueError(f"begin index {begin} is outside this run's {len(self._plan)} model calls")
        i = self.grid.t.tolist().index(self._plan[begin]) if self._plan[begin] in self.grid.t.tolist() else None
        tail = None if i is None else Grid(self.grid.t[i:], self.grid.alpha[i:], self.grid.sigma[i:],
                                           schedule=self.grid.schedule)
        if tail is None or self.solver.plan(tail) != self._plan[begin:]:
            raise ValueError(f"the MR solver cannot start at model call {begin}")
        self._start(tail)

    def _first_index(self, timestep) -> int:
        from ..schedulers import _same_time

        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        matches = [k for k, p in enumerate(self._plan) if _same_time(t, p)]
        if not matches:
            raise ValueError(f"step got timestep {t:g}, which is not on this run's grid; the MR solver calls "
                             f"the model at timesteps {self._plan}")
        if matches[0] > 0:
            self._begin_at(matches[0])
        return matches[0]

    @property
    def nfe(self) -> int:
        return len(self._plan)

    def _noise(self, like: Tensor) -> Tensor:
        if self._variance_noise is not None:
            if self._variance_noise.shape != like.shape:
                raise ValueError(f"variance_noise has shape {tuple(self._variance_noise.shape)}, the sample "
                                 f"{tuple(like.shape)}")
            return self._variance_noise.to(device=like.device, dtype=like.dtype)
        return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    def noise_state(self, mu: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """IR-SDE's start ``x_T = mu + sigma_inf z``."""
        z = randn_tensor(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + self.init_noise_sigma * z

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True, variance_noise: Tensor | None = None):
        """Consume the network output at ``x = sample`` for the current planned call; return the next ``x``.
        The SDE solvers draw from ``generator``, or use ``variance_noise`` as this step's noise."""
        if self._run is None:
            raise RuntimeError("call set_timesteps before step")
        if self.mu is None:
            raise ValueError("no condition mu: call set_mu(mu) or set_timesteps(..., mu=mu) first")
        if generator is not None and variance_noise is not None:
            raise ValueError("pass either generator or variance_noise to step, not both")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._first_index(timestep)
        k = self._step_index
        if k >= len(self._plan):
            raise RuntimeError(f"step called {k + 1} times for a run of {len(self._plan)} model calls")
        t = self._plan[k]
        if abs(float(torch.as_tensor(timestep).reshape(-1)[0]) - t) > 1e-3 * max(1.0, abs(t)):
            raise ValueError(f"step got timestep {timestep} but model call {k} of this run is at {t}")
        dtype = sample.dtype
        x = sample.float() if dtype in (torch.float16, torch.bfloat16) else sample
        mu = self.mu.to(device=x.device, dtype=x.dtype)
        check_mu_shape(mu, None, x)
        tt = torch.tensor(t, dtype=_F64)
        a, s = self.noise_schedule.alpha(tt).item(), self.noise_schedule.sigma(tt).item()
        y = x - mu
        pred = mr_prediction(model_output.to(x.dtype), y, mu, a, s, self.config.prediction_type,
                             self.noise_schedule.sigma_inf)
        self._generator, self._variance_noise = generator, variance_noise
        try:
            y_next, _ = self._run.send((y, pred))
        finally:
            self._generator = self._variance_noise = None
        self._step_index = k + 1
        prev_sample = (y_next + mu).to(dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The MR forward marginal ``alpha x0 + (1 - alpha) mu + sigma eps`` at (per-sample) ``timesteps``."""
        if self.mu is None:
            raise ValueError("add_noise needs the condition: call set_mu(mu) first")
        t = torch.as_tensor(timesteps, dtype=_F64).reshape(-1).cpu()
        x0 = original_samples
        a = broadcast_like(self.noise_schedule.alpha(t).to(x0.device), x0)
        s = broadcast_like(self.noise_schedule.sigma(t).to(x0.device), x0)
        mu = self.mu.to(device=x0.device, dtype=x0.dtype)
        return (a * x0 + (1 - a) * mu + s * noise).to(x0.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
