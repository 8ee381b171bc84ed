"""diffusers interop: every fewstep sampler as a diffusers scheduler.

    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m")

The adapter is thin: ``set_timesteps`` builds our ``Grid`` and starts the solver's step generator;
``step`` turns the model output into ``(x0, eps)`` and sends it to the generator. The pipeline holds
VP samples (``init_noise_sigma = 1``, ``scale_model_input`` is the identity), so it works in
``DDPMPipeline`` (which calls neither) and in Stable-Diffusion-style pipelines alike.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .denoisers import Prediction, broadcast_like, canonical_prediction_type, convert_prediction, dynamic_threshold
from .registry import SAMPLERS, make_solver, resolve_name
from .schedules import DiscreteVPSchedule
from .solvers import PNDM, Heun, Solver
from .timesteps import DiffusersSpacing, ExplicitTimesteps, Grid, Timesteps, check_steps, make_timesteps
from .updates import ddim_step

__all__ = ["FewstepScheduler", "HeavyBallScheduler", "GHVBScheduler", "SAMPLER_KEYS"]

#: The config keys that belong to the sampler rather than to the noise schedule: ``from_config`` drops
#: them when it switches to another sampler.
SAMPLER_KEYS = ("sampler", "sampler_options", "momentum", "beta", "base")


class BeginIndexMixin:
    """diffusers' position bookkeeping for our adapters: ``step_index``, ``begin_index`` and
    ``set_begin_index``; each adapter supplies ``_begin_at(index)`` (restart its solver there)."""

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at model call ``begin_index``, i.e. at ``timesteps[begin_index]`` (img2img calls it with
        ``t_start * order``). Without it, the first ``step`` locates its timestep in ``timesteps``
        (the second match if it occurs twice, as diffusers' ``index_for_timestep``).

        The solver restarts on the rest of the grid from the first call ``j >= begin_index`` where a
        fresh run reproduces the remaining calls (multistep methods warm up again from first order;
        PNDM / PLMS restart with their one-call-per-step AB warm-up, ``warmup="lower_order"``, since
        the calls of their Runge-Kutta / improved-Euler warm-up are gone). The calls before ``j``
        (inside a multi-call step) are bridged by first-order DDIM steps to the next call's timestep;
        a call at the same timestep as the next one returns its sample unchanged.
        """
        if self.grid is None:
            raise RuntimeError("call set_timesteps before set_begin_index")
        self._begin_at(begin_index)
        self._begin_index = begin_index


class FewstepScheduler(BeginIndexMixin, SchedulerMixin, ConfigMixin):
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

    ``order`` is the number of model calls per step as diffusers' pipelines count them: 2 for ``heun``
    (as diffusers' ``HeunDiscreteScheduler``), 1 otherwise (PNDM's warm-up calls are extra, as in
    diffusers' ``PNDMScheduler``). A run may start at any model call, by ``set_begin_index`` or by the
    timestep of the first ``step`` (see ``set_begin_index``).
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
        # The config names its sampler and class even when they are defaults, so that from_config can
        # tell which sampler a config (in memory or saved) runs; diffusers adds _class_name only on load.
        self.register_to_config(sampler=resolve_name(sampler or self.default_sampler), _class_name=type(self).__name__)
        self.noise_schedule = DiscreteVPSchedule.from_diffusers_config(self.config)
        canonical_prediction_type(prediction_type)
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not a diffusers DDPM prediction type")
        self.order = 2 if isinstance(self.solver, Heun) else 1
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
        self._bridge_end = 0  # model calls before this index are first-order bridge steps (a mid-run start)
        self._generator: torch.Generator | None = None
        self._variance_noise: Tensor | None = None

    @staticmethod
    def _make_spacing(spacing: str, steps_offset: int) -> Timesteps:
        if spacing in DiffusersSpacing.SPACINGS:
            return DiffusersSpacing(spacing, steps_offset)
        return make_timesteps(spacing)

    @property
    def sampler_name(self) -> str:
        """The registry name of the sampler this scheduler runs."""
        return self.config.sampler

    # -- from_config: switching samplers ------------------------------------------------------

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """This scheduler from any DDPM-family scheduler's config, ``X.from_config(pipe.scheduler.config, **kw)``.

        - The noise schedule, prediction type, clipping and timestep spacing come from ``config``, as
          every diffusers scheduler takes them. In particular the **pipeline's ``timestep_spacing`` wins**
          over this adapter's default (``"trailing"``): a saved ``scheduler_config.json`` records it
          (``"leading"`` for DDPM / DDIM / PNDM pipelines, so 10 steps start at ``t = 900``), and the swap
          keeps the timesteps the pipeline's model is sampled at, as ``DPMSolverMultistepScheduler
          .from_config`` would. Pass ``timestep_spacing="trailing"`` to get the native ``Sampler``'s grid.
        - The sampler's own keys (``SAMPLER_KEYS``: ``sampler``, ``sampler_options``, ``momentum``,
          ``beta``, ``base``) of a config of ours carry over only when the new scheduler runs the same
          sampler: the sampler is ``kwargs["sampler"]``, else the config's own when it is this class's
          config (or a diffusers scheduler's that kept our keys, as ``from_config`` does, and this class
          runs that sampler), else this class's ``default_sampler``. Switching to another sampler drops
          the old one's options.
        - Every keyword given here is checked: a key of ``__init__`` is used as is; an option of the
          chosen sampler (``eta=0.5`` for ``ddim``, ``order=3`` for ``ghvb``) goes into
          ``sampler_options``; anything else raises, listing the known keys. Keys of other diffusers
          schedulers inside ``config`` (``skip_prk_steps``, ``solver_order``, ...) stay ignored quietly.
        """
        if isinstance(config, dict) and "pretrained_model_name_or_path" not in kwargs:
            config, kwargs = cls._switch_sampler(dict(config), dict(kwargs), check=not return_unused_kwargs)
        return super().from_config(config, return_unused_kwargs, **kwargs)

    @classmethod
    def _switch_sampler(cls, config: dict, kwargs: dict, check: bool) -> tuple[dict, dict]:
        defaults = set(config.get("_use_default_values", []))
        source_cls = _our_schedulers().get(config.get("_class_name", cls.__name__))
        source = None
        if config.get("sampler"):  # our __init__ records the sampler's name, default or not
            source = resolve_name(config["sampler"])
        elif source_cls is not None:
            source = resolve_name(source_cls.default_sampler)
        default = resolve_name(cls.default_sampler)
        if "sampler" in kwargs:
            target = resolve_name(kwargs["sampler"] or cls.default_sampler)
        elif source is not None and source_cls is cls:
            target = source
        elif source is not None and source_cls is None and (cls is FewstepScheduler or source == default):
            target = source  # our keys kept by a diffusers scheduler we were switched to: switching back
        else:
            target = default
        keep = source == target
        if not keep:  # another sampler: the old one's options are not options of this one
            config = {k: v for k, v in config.items() if k not in SAMPLER_KEYS}

        init_keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
        option_keys = _sampler_option_keys(target)
        routed = {k: kwargs.pop(k) for k in list(kwargs) if k not in init_keys and k in option_keys}
        unknown = sorted(k for k in kwargs if k not in init_keys)
        if check and unknown:
            raise ValueError(f"{cls.__name__}.from_config got unknown keyword(s) {unknown}; known: "
                             f"{sorted(init_keys)} and the options of sampler {target!r}: {sorted(option_keys)}")
        if routed:
            if "sampler_options" in kwargs:
                base = kwargs["sampler_options"]
            else:
                base = config.get("sampler_options") if keep and "sampler_options" not in defaults else None
            clash = sorted(set(routed) & set(kwargs.get("sampler_options") or {}))
            if clash:
                raise ValueError(f"sampler option(s) {clash} given both at the top level and in sampler_options")
            kwargs["sampler_options"] = {**(base or {}), **routed}
        return config, kwargs

    # -- diffusers' bookkeeping --------------------------------------------------------------

    def _begin_at(self, begin: int):
        if not 0 <= begin < len(self._plan):
            raise ValueError(f"begin index {begin} is outside this run's {len(self._plan)} model calls")
        grid_times = self.grid.t[:-1].tolist()
        for j in range(begin, len(self._plan)):
            if self._plan[j] not in grid_times:  # a Runge-Kutta stage between grid points
                continue
            i = grid_times.index(self._plan[j])
            tail = Grid(self.grid.t[i:], self.grid.alpha[i:], self.grid.sigma[i:], schedule=self.grid.schedule)
            for solver in _restart_forms(self.solver):
                if solver.plan(tail) == self._plan[j:]:
                    self._start(tail, solver)  # the plan (and so the step indices) stay those of the whole run
                    self._bridge_end = j
                    return
        raise ValueError(f"{self.sampler_name} cannot start at model call {begin}: no fresh run on the rest of "
                         f"the grid makes the remaining model calls {self._plan[begin:]}")

    def _first_index(self, timestep) -> int:
        """diffusers' ``_init_step_index``: the model call of the first ``step``'s timestep."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        matches = [k for k, p in enumerate(self._plan) if _same_time(t, p)]
        if not matches:
            raise ValueError(f"step got timestep {t:g}, which is not on this run's grid; {self.sampler_name} "
                             f"calls the model at timesteps {self._plan}")
        begin = matches[1] if len(matches) > 1 else matches[0]
        if begin > 0:
            self._begin_at(begin)
        return begin

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

    def _start(self, grid: Grid, solver: Solver | None = None):
        """A fresh solver run over ``grid`` (the whole grid, or its tail for img2img)."""
        self._run = (solver or self.solver).steps(grid, self._noise)
        next(self._run)
        self._step_index = None
        self._bridge_end = 0

    def _noise(self, like: Tensor) -> Tensor:
        if self._variance_noise is not None:
            if self._variance_noise.shape != like.shape:
                raise ValueError(f"variance_noise has shape {tuple(self._variance_noise.shape)}, the sample "
                                 f"{tuple(like.shape)}")
            return self._variance_noise.to(device=like.device, dtype=like.dtype)
        return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True,
             variance_noise: Tensor | None = None) -> SchedulerOutput | tuple:
        """Consume the model output at the current planned call and return the next sample.

        Stochastic samplers (``ddpm``, ``ddim`` with ``eta > 0``, the SDE solvers) draw their noise from
        ``generator``, or use ``variance_noise`` (shaped like ``sample``) as this step's noise, as
        diffusers' DDIM and DPM-Solver do; deterministic samplers ignore both.
        """
        if self._run is None:
            raise RuntimeError("call set_timesteps before step")
        if generator is not None and variance_noise is not None:
            raise ValueError("pass either generator or variance_noise to step, not both")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._first_index(timestep)
        k = self._step_index
        if k >= len(self._plan):
            raise RuntimeError(f"step called {k + 1} times for a run of {len(self._plan)} model calls; "
                               "call set_timesteps to start a new run")
        t = self._plan[k]
        if not _same_time(float(torch.as_tensor(timestep).reshape(-1)[0]), t):
            raise ValueError(f"step got timestep {timestep} but model call {k} of this run is at {t}")
        dtype = sample.dtype
        x = sample.float() if dtype in (torch.float16, torch.bfloat16) else sample
        pred = self._prediction(model_output.to(x.dtype), x, t)
        if k < self._bridge_end:
            x_next = self._bridge(x, pred, t, self._plan[k + 1])
        else:
            self._generator, self._variance_noise = generator, variance_noise
            try:
                x_next, _ = self._run.send((x, pred))
            finally:
                self._generator = self._variance_noise = None
        self._step_index = k + 1
        prev_sample = x_next.to(dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _bridge(self, x: Tensor, pred: Prediction, t: float, t_next: float) -> Tensor:
        """A start inside a multi-call step: DDIM (eta = 0) from this call's time to the next call's,
        or the sample itself when the next call is at the same time."""
        if t_next == t:
            return x
        tt = torch.tensor(t_next, dtype=torch.float64)
        return ddim_step(pred.x0, pred.eps, self.noise_schedule.alpha(tt).item(), self.noise_schedule.sigma(tt).item())

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


def _same_time(t: float, planned: float) -> bool:
    return abs(t - planned) <= 1e-3 * max(1.0, abs(planned))


def _restart_forms(solver: Solver) -> list[Solver]:
    """The solvers that may continue a run from a grid point: the solver itself, and for PNDM / PLMS
    its one-call-per-step form (AB warm-up of lower orders)."""
    if isinstance(solver, PNDM) and solver.warmup != "lower_order":
        return [solver, PNDM(solver.order, warmup="lower_order")]
    return [solver]


def _sampler_option_keys(name: str) -> set[str]:
    """The keyword options of a registered sampler (its factory's parameters less those fixed by the name)."""
    spec = SAMPLERS[name]
    return set(inspect.signature(spec.factory).parameters) - set(spec.fixed) - {"self"}


def _our_schedulers() -> dict[str, type]:
    """``_class_name`` -> class, for ``FewstepScheduler`` and every subclass of it."""
    found, todo = {}, [FewstepScheduler]
    while todo:
        c = todo.pop()
        found[c.__name__] = c
        todo.extend(c.__subclasses__())
    return found


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
