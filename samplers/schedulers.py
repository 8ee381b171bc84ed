"""diffusers interop: every fewstep sampler as a diffusers scheduler.

    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m")

The adapter is thin: ``set_timesteps`` builds our ``Grid`` and starts the solver's step generator;
``step`` turns the model output into ``(x0, eps)`` and sends it to the generator. The pipeline holds
VP samples (``init_noise_sigma = 1``, ``scale_model_input`` is the identity), so it works in
``DDPMPipeline`` (which calls neither) and in Stable-Diffusion-style pipelines alike.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .denoisers import Prediction, broadcast_like, canonical_prediction_type, convert_prediction, dynamic_threshold
from .registry import make_solver
from .schedules import DiscreteVPSchedule
from .timesteps import DiffusersSpacing, ExplicitTimesteps, Grid, Timesteps, check_steps, make_timesteps

__all__ = ["FewstepScheduler", "HeavyBallScheduler", "GHVBScheduler"]


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any fewstep sampler on a discrete VP (DDPM) noise schedule.

    Args:
        sampler: a name from ``samplers.SAMPLERS`` (``"ddim"``, ``"dpmpp_2m"``, ``"pndm"``, ``"ghvb"``, ...);
            default: the class's ``default_sampler``.
        sampler_options: keyword options of that sampler (e.g. ``{"eta": 0.3}``).
        momentum, beta, base: shorthands for the momentum samplers' options (``momentum=3.8``), merged
            into ``sampler_options`` when given.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr: the training noise schedule, as every DDPM-family diffusers scheduler
            reads it (so ``from_config`` of any of them carries it over).
        prediction_type: ``"epsilon"``, ``"sample"``, ``"v_prediction"``.
        timestep_spacing: diffusers' ``"leading"`` / ``"trailing"`` / ``"linspace"`` (integer
            timesteps, ``steps_offset`` applies to ``"leading"``), or a continuous fewstep spacing
            (``"karras"``, ``"log_snr"``, ``"time_uniform"``, ``"time_quadratic"``: fractional timesteps).
        final_sigmas_type: ``"zero"`` ends at clean data; ``"sigma_min"`` at ``alphas_cumprod[0]``
            (diffusers' ``set_alpha_to_one=False``).
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value:
            post-processing of the data prediction, with diffusers' meanings.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    default_sampler = "dpmpp_2m"

    @register_to_config
    def __init__(
        self,
        sampler: str | None = None,
        sampler_options: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "trailing",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        momentum: float | None = None,
        beta: float | None = None,
        base: str | None = None,
    ):
        # Validate everything up front: a bad key fails here, not mid-pipeline.
        options = dict(sampler_options or {})
        options.update({k: v for k, v in dict(momentum=momentum, beta=beta, base=base).items() if v is not None})
        self.solver = make_solver(sampler or self.default_sampler, **options)
        self.noise_schedule = DiscreteVPSchedule.from_diffusers_config(self.config)
        canonical_prediction_type(prediction_type)
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not a diffusers DDPM prediction type")
        self._spacing = self._make_spacing(timestep_spacing, steps_offset)
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}; expected 'zero' or 'sigma_min'")
        self.alphas_cumprod = self.noise_schedule.alphas_cumprod.float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.grid: Grid | None = None
        self._run = None
        self._plan: list[float] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._generator: torch.Generator | None = None

    @staticmethod
    def _make_spacing(spacing: str, steps_offset: int) -> Timesteps:
        if spacing in DiffusersSpacing.SPACINGS:
            return DiffusersSpacing(spacing, steps_offset)
        return make_timesteps(spacing)

    # -- diffusers' bookkeeping --------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at ``timesteps[begin_index]`` (img2img): the solver restarts on the rest of the grid."""
        if self.grid is None:
            raise RuntimeError("call set_timesteps before set_begin_index")
        if begin_index == 0:
            self._begin_index = 0
            return
        t_begin = self._plan[begin_index]
        starts = [i for i in range(self.grid.n_steps) if float(self.grid.t[i]) == t_begin]
        if not starts:
            raise ValueError(f"timestep {t_begin} is not a grid point of this {self.solver.name} run")
        i = starts[0]
        tail = Grid(self.grid.t[i:], self.grid.alpha[i:], self.grid.sigma[i:], schedule=self.grid.schedule)
        if self.solver.plan(tail) != self._plan[begin_index:]:
            raise ValueError(f"{self.solver.name} cannot start at model call {begin_index} (inside a multi-call step)")
        self._start(tail)  # the plan (and so the step indices) stay those of the whole run
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- the scheduler contract ----------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None, **kwargs):
        """Build the grid for ``num_inference_steps`` (or explicit descending ``timesteps``) and reset all
        per-run state. ``self.timesteps`` lists every model call, so its length is the NFE."""
        if kwargs.get("sigmas") is not None:
            raise ValueError("FewstepScheduler takes custom `timesteps`, not `sigmas`")
        if timesteps is not None:
            spacing, n = ExplicitTimesteps(timesteps), len(timesteps)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps or timesteps")
        else:
            spacing, n = self._spacing, check_steps(num_inference_steps)
        final = "zero" if self.config.final_sigmas_type == "zero" else "t_min"
        self.num_inference_steps = n
        self.grid = spacing.grid(self.noise_schedule, n, final=final)
        self._plan = self.solver.plan(self.grid)
        self._start(self.grid)
        self.timesteps = _as_timestep_tensor(self._plan, device)
        self._begin_index = None

    def _start(self, grid: Grid):
        """A fresh solver run over ``grid`` (the whole grid, or its tail for img2img)."""
        self._run = self.solver.steps(grid, self._noise)
        next(self._run)
        self._step_index = None

    def _noise(self, like: Tensor) -> Tensor:
        return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Consume the model output at the current planned call and return the next sample."""
        if self._run is None:
            raise RuntimeError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        k = self._step_index
        if k >= len(self._plan):
            raise RuntimeError(f"step called {k + 1} times for a run of {len(self._plan)} model calls; "
                               "call set_timesteps to start a new run")
        t = self._plan[k]
        if abs(float(torch.as_tensor(timestep).reshape(-1)[0]) - t) > 1e-3 * max(1.0, abs(t)):
            raise ValueError(f"step got timestep {timestep} but model call {k} of this run is at {t}")
        dtype = sample.dtype
        x = sample.float() if dtype in (torch.float16, torch.bfloat16) else sample
        pred = self._prediction(model_output.to(x.dtype), x, t)
        self._generator = generator
        x_next, _ = self._run.send((x, pred))
        self._step_index = k + 1
        prev_sample = x_next.to(dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _prediction(self, model_output: Tensor, x: Tensor, t: float) -> Prediction:
        tt = torch.tensor(t, dtype=torch.float64)
        alpha, sigma = self.noise_schedule.alpha(tt), self.noise_schedule.sigma(tt)
        pred = convert_prediction(model_output, x, alpha, sigma, self.config.prediction_type)
        if not (self.config.thresholding or self.config.clip_sample):
            return pred
        if self.config.thresholding:
            x0 = dynamic_threshold(pred.x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        else:
            r = self.config.clip_sample_range
            x0 = pred.x0.clamp(-r, r)
        # As diffusers' schedulers (DDIM's use_clipped_model_output=False): the clipped x0 with the
        # network's own eps. ModelDenoiser(clip=...) instead recomputes eps from the clipped x0.
        return Prediction(x0, pred.eps)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process ``alpha_t x0 + sigma_t eps`` at (per-sample) ``timesteps``."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        alpha = self.noise_schedule.alpha(t).to(original_samples.device)
        sigma = self.noise_schedule.sigma(t).to(original_samples.device)
        x = original_samples
        return (broadcast_like(alpha, x) * x + broadcast_like(sigma, x) * noise).to(x.dtype)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target ``alpha_t eps - sigma_t x0`` (for training with ``prediction_type='v_prediction'``)."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        alpha = self.noise_schedule.alpha(t).to(sample.device)
        sigma = self.noise_schedule.sigma(t).to(sample.device)
        return (broadcast_like(alpha, sample) * noise - broadcast_like(sigma, sample) * sample).to(sample.dtype)

    @property
    def nfe(self) -> int:
        """Model calls of the current run (``len(self.timesteps)``)."""
        return len(self._plan)


def _as_timestep_tensor(plan: list[float], device) -> Tensor:
    """Integer timesteps when every planned time is integral (what DDPM-trained UNets saw), else float."""
    t = torch.tensor(plan, dtype=torch.float64)
    if torch.all(t == torch.round(t)):
        return t.long().to(device)
    return t.float().to(device)


class HeavyBallScheduler(FewstepScheduler):
    """Heavy-ball momentum (``samplers.momentum.HeavyBall``) as a diffusers scheduler:
    ``HeavyBallScheduler.from_config(pipe.scheduler.config, base="dpmsolver++", beta=0.8)``."""

    default_sampler = "hb"


class GHVBScheduler(FewstepScheduler):
    """Generalized heavy ball (``samplers.momentum.GHVB``) as a diffusers scheduler:
    ``GHVBScheduler.from_config(pipe.scheduler.config, momentum=3.8)``."""

    default_sampler = "ghvb"
