"""diffusers interop: every fewstep sampler as a diffusers scheduler.

    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m")

The adapter is thin: ``set_timesteps`` builds our ``Grid`` and starts the solver's step generator;
``step`` turns the model output into ``(x0, eps)`` and sends it to the generator. On DDPM schedules
the pipeline holds VP samples (``init_noise_sigma = 1``, ``scale_model_input`` is the identity), so it
works in ``DDPMPipeline`` (which calls neither), in Stable-Diffusion-style pipelines and in Euler /
Karras-sigma ones alike (they ask the scheduler for both). On flow-matching schedules (SD3, Flux,
Sana) it follows ``FlowMatchEulerDiscreteScheduler``'s contract: ``set_timesteps(n, device, sigmas=...,
mu=...)``, timesteps ``sigma * 1000``, velocity output, ``scale_noise`` for img2img.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Literal

import numpy as np

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .denoisers import Prediction, broadcast_like, canonical_prediction_type, convert_prediction, dynamic_threshold
from .flow import FLOW_SPACINGS, flow_sigmas
from .registry import SAMPLERS, make_solver, resolve_name
from .schedules import DiscreteVPSchedule, EDMSchedule, FlowMatchingSchedule, betas_from_diffusers_config
from .solvers import PNDM, Heun, Solver
from .timeshift import TimeShift
from .timesteps import DiffusersSpacing, ExplicitTimesteps, Grid, Timesteps, check_steps, make_timesteps

__all__ = ["FewstepScheduler", "HeavyBallScheduler", "GHVBScheduler", "SAMPLER_KEYS"]

#: The config keys that belong to the sampler rather than to the noise schedule: ``from_config`` drops
#: them when it switches to another sampler.
SAMPLER_KEYS = ("sampler", "sampler_options", "momentum", "beta", "base")

#: ``noise_schedule`` values: DDPM's discrete VP schedule, the rectified-flow path of SD3 / Flux, or
#: EDM's VE schedule with its preconditioning (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``).
NOISE_SCHEDULES = ("ddpm", "flow", "edm")
#: A sampler name of the adapter beyond the registry: Time-Shift (``samplers.timeshift.TimeShift``)
#: around ``sampler_options["solver"]``.
TIME_SHIFT = "time_shift"
#: A grid point with ``alpha`` below this is pure noise to float precision: FlowMatchEuler's sigma = 1
#: (alpha = 0, where ``x / alpha`` is undefined) and UniPC's guard 1 - 1e-6 (where a step in ``sigma / alpha``
#: spans 1e6: fixed-step multistep methods such as PNDM diverge). The first step from there is DDIM.
PURE_NOISE_ALPHA = 1e-5
#: Source classes whose ``use_flow_sigmas`` grids are read, by rule (``samplers.flow``).
FLOW_SIGMA_SOURCES = {"DPMSolverMultistepScheduler": "flow_dpm", "UniPCMultistepScheduler": "flow_unipc"}
#: diffusers' two Karras-sigma rules on DDPM schedules (``use_karras_sigmas=True``): ``"euler"``
#: (Euler / Heun / LMS: between the spacing's first and last sigma, fractional timesteps) and ``"dpm"``
#: (DPM-Solver / UniPC: the whole training range, timesteps rounded to integers except for cosine betas).
KARRAS_STYLES = ("euler", "dpm")
#: Source classes whose Karras sigmas are read, by rule (each checked against the class in the tests).
KARRAS_SOURCES = {"EulerDiscreteScheduler": "euler",
                  "HeunDiscreteScheduler": "euler", "LMSDiscreteScheduler": "euler",
                  "DPMSolverMultistepScheduler": "dpm", "UniPCMultistepScheduler": "dpm"}


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
        (the second match if it occurs twice, as diffusers' ``index_for_timestep``; a loop that started at
        the first of the two is recognised on its next step, see ``FewstepScheduler._first_index``).

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
        self._twin = None


def tuned_table(tuned_timesteps: dict | None) -> dict[str, list[float]]:
    """``tuned_timesteps`` (steps -> descending evaluation times, as ``fewstep tune`` writes them), checked,
    with string keys (JSON's)."""
    table = {}
    for steps, times in (tuned_timesteps or {}).items():
        times = [float(t) for t in times]
        if int(steps) != len(times) or not all(a > b for a, b in zip(times, times[1:])):
            raise ValueError(f"tuned_timesteps[{steps!r}] must be {steps} descending times, got {times}")
        table[str(int(steps))] = times
    return table


class FewstepScheduler(BeginIndexMixin, SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any fewstep sampler on a DDPM (discrete VP) or flow-matching schedule.

    Args:
        sampler: a name from ``samplers.SAMPLERS`` (``"ddim"``, ``"dpmpp_2m"``, ``"pndm"``, ``"ghvb"``, ...);
            default: the class's ``default_sampler``.
        sampler_options: keyword options of that sampler (e.g. ``{"eta": 0.3}``).
        momentum, beta, base: shorthands for the momentum samplers' options (``momentum=3.8``), merged
            into ``sampler_options`` when given.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr: the training noise schedule, as every DDPM-family diffusers scheduler
            reads it (so ``from_config`` of any of them carries it over).
        prediction_type: ``"epsilon"``, ``"sample"``, ``"v_prediction"`` (default ``"epsilon"``); on flow
            schedules also ``"flow_prediction"`` (the velocity ``eps - x0``, their default).
        timestep_spacing: diffusers' ``"leading"`` / ``"trailing"`` / ``"linspace"`` (integer
            timesteps, ``steps_offset`` applies to ``"leading"``), or a continuous fewstep spacing
            (``"karras"``, ``"log_snr"``, ``"time_uniform"``, ``"time_quadratic"``: fractional timesteps);
            default ``"trailing"``. Flow schedules: ``"flow_match"`` (FlowMatchEuler's rule, default) or
            ``"flow_dpm"`` (DPM-Solver's ``use_flow_sigmas`` rule), see ``samplers.flow``.
        noise_schedule: ``"ddpm"`` (the betas above), ``"flow"`` (rectified flow, ``x = (1 - t) x0 + t eps``)
            or ``"edm"`` (EDM's VE schedule and preconditioning); ``from_config`` picks it from the source
            config (``_schedule_of_source``).
        sigma_min, sigma_max, sigma_data, sigma_schedule, rho: the EDM schedulers' keys (EDM schedules).
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len,
        time_shift_type, shift_terminal: ``FlowMatchEulerDiscreteScheduler``'s keys (flow schedules).
        use_karras_sigmas, karras_style: diffusers' Karras sigmas on a DDPM schedule, by the source's rule
            (``KARRAS_STYLES``); on flow schedules ``use_karras_sigmas`` / ``use_exponential_sigmas``
            respace FlowMatchEuler's sigmas as it does.
        final_sigmas_type: ``"zero"`` ends at clean data; ``"sigma_min"`` at ``alphas_cumprod[0]``
            (diffusers' ``set_alpha_to_one=False``).
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value:
            post-processing of the data prediction, with diffusers' meanings.
        tuned_timesteps: explicit grids, fitted to a teacher by ``fewstep tune`` or a distilled student's own
            (steps -> descending schedule times: DDPM timesteps, flow and EDM sigmas):
            ``set_timesteps(num_inference_steps=n)`` runs the grid of ``n`` steps when there is one (else the
            scheduler's rule, with a warning), so ``FewstepScheduler.from_pretrained(tuned)`` in any pipeline
            samples on it. On flow schedules the grid replaces the pipeline's default ``sigmas`` (Flux passes
            ``linspace(1, 1 / n, n)``) and its ``mu``: the grid is already shifted.

    ``sampler="time_shift"`` runs Time-Shift (``samplers.timeshift.TimeShift``) around
    ``sampler_options["solver"]`` (default ``"ddim"``) with its ``window`` and ``cutoff`` in the
    schedule's times (training indices on DDPM, sigma on flow schedules).

    ``order`` is the number of model calls per step as diffusers' pipelines count them: 2 for ``heun``
    (as diffusers' ``HeunDiscreteScheduler``), 1 otherwise (PNDM's warm-up calls are extra, as in
    diffusers' ``PNDMScheduler``). A run may start at any model call, by ``set_begin_index`` or by the
    timestep of the first ``step`` (see ``set_begin_index``).
    """

    # EDM-preconditioned schedulers need the EDM keys; from_config of one of ours could not carry them
    _compatibles = [e.name for e in KarrasDiffusionSchedulers if not e.name.startswith("EDM")]
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
        prediction_type: str | None = None,
        timestep_spacing: str | None = None,
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
        noise_schedule: str = "ddpm",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        karras_style: str = "euler",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        rho: float = 7.0,
        tuned_timesteps: dict[str, list[float]] | None = None,
    ):
        # Validate everything up front: a bad key fails here, not mid-pipeline.
        self._tuned = tuned_table(tuned_timesteps)
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"unknown noise_schedule {noise_schedule!r}; expected one of {NOISE_SCHEDULES}")
        flow, edm = noise_schedule == "flow", noise_schedule == "edm"
        options = dict(sampler_options or {})
        options.update({k: v for k, v in dict(momentum=momentum, beta=beta, base=base).items() if v is not None})
        name = _resolve(sampler or self.default_sampler)
        self.solver = _make_adapter_solver(name, options)
        prediction_type = prediction_type or ("flow_prediction" if flow else "epsilon")
        timestep_spacing = timestep_spacing or ("flow_match" if flow else "trailing")
        # The config names its sampler and class even when they are defaults, so that from_config can
        # tell which sampler a config (in memory or saved) runs; diffusers adds _class_name only on load.
        self.register_to_config(sampler=name, _class_name=type(self).__name__, prediction_type=prediction_type,
                                timestep_spacing=timestep_spacing)
        # ... and not as a default: diffusers' from_config drops the keys listed in _use_default_values, so a
        # compatible scheduler the config passes through would lose the sampler's name, and the way back
        # (ours -> DDIM -> ours, diffusers' test_compatibles) the options that go with it (base, momentum).
        defaulted = self.config.get("_use_default_values") or []
        if "sampler" in defaulted:
            self.register_to_config(_use_default_values=[k for k in defaulted if k != "sampler"])
        self._prediction_kind = canonical_prediction_type(prediction_type)
        self._coefs: list[tuple] = []
        if edm:
            self._edm_range = (0.002 if sigma_min is None else float(sigma_min), 80.0 if sigma_max is None else float(sigma_max))
            lo, hi = self._edm_range
            self.noise_schedule = EDMSchedule(lo / (1 + 1e-6), hi * (1 + 1e-6))  # room for float32 round-off
            if prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"EDM preconditioning reads prediction_type 'epsilon' or 'v_prediction', not {prediction_type!r}")
            if sigma_schedule not in ("karras", "exponential"):
                raise ValueError(f"unknown sigma_schedule {sigma_schedule!r}; expected 'karras' or 'exponential'")
        elif flow:
            self.noise_schedule = FlowMatchingSchedule(0.0, 1.0)
            if timestep_spacing not in FLOW_SPACINGS:
                raise ValueError(f"timestep_spacing {timestep_spacing!r} is not a flow-matching rule; expected one "
                                 f"of {FLOW_SPACINGS}")
            if final_sigmas_type != "zero":
                raise ValueError("flow-matching grids end at clean data: final_sigmas_type must be 'zero'")
            if use_karras_sigmas and use_exponential_sigmas:
                raise ValueError("use either use_karras_sigmas or use_exponential_sigmas, not both")
            if time_shift_type not in ("exponential", "linear"):
                raise ValueError(f"unknown time_shift_type {time_shift_type!r}; expected 'exponential' or 'linear'")
        else:
            self.noise_schedule = DiscreteVPSchedule.from_diffusers_config(self.config)
            if prediction_type not in ("epsilon", "sample", "v_prediction"):
                raise ValueError(f"prediction_type {prediction_type!r} is not a diffusers DDPM prediction type")
            if use_exponential_sigmas:
                raise ValueError("use_exponential_sigmas is read on flow schedules only")
            self._spacing = self._make_spacing(timestep_spacing, steps_offset)
            if use_karras_sigmas and (karras_style not in KARRAS_STYLES or not isinstance(self._spacing, DiffusersSpacing)):
                raise ValueError(f"use_karras_sigmas needs karras_style in {KARRAS_STYLES} and a diffusers "
                                 f"timestep_spacing {DiffusersSpacing.SPACINGS}; got {karras_style!r}, {timestep_spacing!r}")
            self.alphas_cumprod = self.noise_schedule.alphas_cumprod.float()
            self.betas = betas_from_diffusers_config(self.config)  # diffusers' attribute (its schedulers' tests read it)
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}; expected 'zero' or 'sigma_min'")
        for steps, times in self._tuned.items():  # a grid of another schedule's times fails here, not mid-pipeline
            try:
                self.noise_schedule.check_times(torch.tensor(times, dtype=torch.float64))
            except ValueError as err:
                unit = {"ddpm": "DDPM timesteps", "flow": "flow times (sigmas in [0, 1])", "edm": "EDM sigmas"}
                raise ValueError(f"tuned_timesteps[{steps!r}]: {err}; a {noise_schedule} scheduler's grids are "
                                 f"{unit[noise_schedule]}") from None
        self.order = 2 if isinstance(self.solver, Heun) else 1
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.grid: Grid | None = None
        self._run = None
        self._plan: list[float] = []
        self._call_timesteps: list[float] = []  # the model timestep of each planned call (what step is given)
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._bridge_end = 0  # model calls before this index are first-order bridge steps (a mid-run start)
        self._generator: torch.Generator | None = None
        self._variance_noise: Tensor | None = None
        self._twin: int | None = None  # a first step located at the second of two calls at one timestep

    @property
    def is_flow(self) -> bool:
        """True on a rectified-flow schedule (SD3 / Flux pipelines): timesteps are ``sigma * N``."""
        return self.config.noise_schedule == "flow"

    @property
    def is_edm(self) -> bool:
        """True on EDM's preconditioned VE schedule: timesteps are ``0.25 log sigma``, the model sees ``c_in x``."""
        return self.config.noise_schedule == "edm"

    @property
    def shift(self) -> float:
        """The static flow shift (``FlowMatchEulerDiscreteScheduler.shift``)."""
        return self.config.shift

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
        """This scheduler from any DDPM-family or flow-matching scheduler's config,
        ``X.from_config(pipe.scheduler.config, **kw)``.

        - The noise schedule is the source's (``_schedule_of_source``): FlowMatch / ``use_flow_sigmas``
          configs give a flow schedule with the source's grid rule, EDM configs EDM's preconditioned
          schedule, Karras-sigma configs diffusers' Karras grid of that scheduler (with its own ``timestep_spacing``, even a class default), other
          DDPM-family configs their betas; a config that cannot be read raises.

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
            config = _with_overrides(dict(config), _schedule_of_source(dict(config)))
            config, kwargs = cls._switch_sampler(config, dict(kwargs), check=not return_unused_kwargs)
        return super().from_config(config, return_unused_kwargs, **kwargs)

    @classmethod
    def _switch_sampler(cls, config: dict, kwargs: dict, check: bool) -> tuple[dict, dict]:
        defaults = set(config.get("_use_default_values", []))
        source_cls = _our_schedulers().get(config.get("_class_name", cls.__name__))
        source = None
        if config.get("sampler"):  # our __init__ records the sampler's name, default or not
            source = _resolve(config["sampler"])
        elif source_cls is not None:
            source = _resolve(source_cls.default_sampler)
        default = _resolve(cls.default_sampler)
        if "sampler" in kwargs:
            target = _resolve(kwargs["sampler"] or cls.default_sampler)
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

    def _restart(self, begin: int) -> tuple[int, Grid, Solver]:
        """The first call ``j >= begin`` where a fresh run on the rest of the grid makes the remaining model
        calls: ``(j, that rest of the grid, the solver that runs it)``."""
        if not 0 <= begin < len(self._plan):
            raise ValueError(f"begin index {begin} is outside this run's {len(self._plan)} model calls")
        grid_times = self.grid.t[:-1].tolist()
        for j in range(begin, len(self._plan)):
            if self._plan[j] not in grid_times:  # a Runge-Kutta stage between grid points
                continue
            i = grid_times.index(self._plan[j])
            if self.grid.alpha[i] < PURE_NOISE_ALPHA:  # pure noise: the solvers' x / alpha is undefined there (bridged)
                continue
            tail = Grid(self.grid.t[i:], self.grid.alpha[i:], self.grid.sigma[i:], schedule=self.grid.schedule)
            for solver in _restart_forms(self.solver):
                if solver.plan(tail) == self._plan[j:]:
                    return j, tail, solver
        last = self._plan[-1]
        if last in grid_times and self.grid.alpha[grid_times.index(last)] < PURE_NOISE_ALPHA:
            # every remaining call is bridged (a one-step grid from pure noise): no solver run is left
            return len(self._plan), _tail(self.grid, len(grid_times)), self.solver
        raise ValueError(f"{self.sampler_name} cannot start at model call {begin}: no fresh run on the rest of "
                         f"the grid makes the remaining model calls {self._plan[begin:]}")

    def _begin_at(self, begin: int):
        j, tail, solver = self._restart(begin)
        self._start(tail, solver)  # the plan (and so the step indices) stay those of the whole run
        self._bridge_end = j

    def _first_index(self, timestep) -> int:
        """diffusers' ``_init_step_index``: the model call of the first ``step``'s timestep, the second
        match if two calls share it (PNDM's Runge-Kutta stages, a step's last call and the next step's first).

        A loop over ``timesteps[b:]`` may as well have started at the first of the two (PNDM and PLMS count
        every call, so ``b = t_start * order`` can land there). Started there, the first call would be
        bridged and return its sample unchanged (the next call is at the same time), and the second would
        take the same sample and model output as this step does; so this step does the second's work, and
        if the next ``step`` repeats the timestep (``step`` checks ``_twin``) it passes its sample through.
        Either way the run is the one ``set_begin_index`` at the loop's start gives."""
        t = _first_value(timestep)
        matches = [k for k, p in enumerate(self._call_timesteps) if _same_time(t, p)]
        if not matches:
            raise ValueError(f"step got timestep {t:g}, which is not on this run's grid; {self.sampler_name} "
                             f"calls the model at timesteps {self._call_timesteps}")
        begin = matches[1] if len(matches) > 1 else matches[0]
        if begin > 0:
            self._begin_at(begin)
        first = matches[0]
        if (len(matches) == 2 and begin == first + 1 and self._plan[first] == self._plan[begin]
                and self._restart(first)[0] > first):  # a start at the first would bridge it
            self._twin = begin
        return begin

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- the scheduler contract ----------------------------------------------------------------

    @property
    def tuned_steps(self) -> list[int]:
        """The step counts that have a grid fitted by ``fewstep tune`` (config ``tuned_timesteps``)."""
        return sorted(int(k) for k in self._tuned)

    def tuned(self, steps: int) -> list[float] | None:
        """The fitted evaluation times of ``steps`` steps, or None."""
        return self._tuned.get(str(int(steps)))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None):
        """Build the grid and reset all per-run state. ``self.timesteps`` lists every model call, so its
        length is the NFE.

        DDPM schedules: ``num_inference_steps`` on ``timestep_spacing``, or explicit descending integer
        ``timesteps``. Flow schedules (``FlowMatchEulerDiscreteScheduler``'s contract): the pipeline's
        ``sigmas`` and ``mu`` (dynamic shifting) or ``timesteps``, read by ``samplers.flow.flow_sigmas``
        exactly as diffusers' scheduler of the config's ``timestep_spacing`` rule reads them;
        ``self.sigmas`` then holds the grid's sigmas and a final 0. A grid that starts at pure noise
        (``alpha < PURE_NOISE_ALPHA``: sigma = 1, where ``x / alpha`` is undefined, or UniPC's 1 - 1e-6) takes
        its first step by DDIM (every solver's first-order step, exact at sigma = 1), and the solver runs on
        the rest of the grid.
        """
        explicit = self._explicit_grid(num_inference_steps, sigmas, timesteps)
        if explicit is not None:
            grid, call_time = explicit
        elif self.is_flow:
            grid, call_time = self._flow_grid(num_inference_steps, sigmas, mu, timesteps)
        elif self.is_edm:
            if sigmas is not None or mu is not None or timesteps is not None or num_inference_steps is None:
                raise ValueError("on an EDM schedule set_timesteps takes num_inference_steps only")
            grid, call_time = self._edm_grid(check_steps(num_inference_steps))
        else:
            if sigmas is not None or mu is not None:
                raise ValueError("on a DDPM schedule FewstepScheduler takes custom `timesteps`, not `sigmas` / `mu`")
            if timesteps is None and num_inference_steps is not None and self._tuned:
                timesteps = self.tuned(num_inference_steps)  # a grid fitted by `fewstep tune`, when there is one
                if timesteps is None:
                    warnings.warn(f"no tuned grid for {num_inference_steps} steps (tuned: {self.tuned_steps}); "
                                  f"using timestep_spacing={self.config.timestep_spacing!r}", stacklevel=2)
            if timesteps is not None:
                spacing, n = ExplicitTimesteps(timesteps), len(timesteps)
            elif num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or timesteps")
            else:
                spacing, n = self._spacing, check_steps(num_inference_steps)
            final = "zero" if self.config.final_sigmas_type == "zero" else "t_min"
            if self.config.use_karras_sigmas and timesteps is None:
                grid, call_time = self._karras_grid(n, final)
            else:
                grid, call_time = spacing.grid(self.noise_schedule, n, final=final), None
        self.num_inference_steps = grid.n_steps
        self.grid = grid
        self.init_noise_sigma = self._init_noise_sigma(grid)
        if float(grid.alpha[0]) < PURE_NOISE_ALPHA:  # pure noise: one DDIM step to the next grid point, then the solver
            tail = _tail(grid, 1)
            self._plan = [float(grid.t[0])] + self.solver.plan(tail)
            self._start(tail)
            self._bridge_end = 1
        else:
            self._plan = self.solver.plan(grid)
            self._start(grid)
        self._call_timesteps = [call_time(t) for t in self._plan] if call_time else list(self._plan)
        self._coefs = [self._coefficients(t) for t in self._plan]
        self.timesteps = (torch.tensor(self._call_timesteps, dtype=torch.float32, device=device)
                          if self.is_flow or self.is_edm else _as_timestep_tensor(self._call_timesteps, device))
        self._begin_index = None
        self._twin = None

    def _explicit_grid(self, n, sigmas, timesteps):
        """The tuned grid of ``n`` steps on a flow or EDM schedule (``tuned_timesteps``) and its model timestep,
        when there is one and the pipeline asks for no grid of its own (on flow: no ``timesteps``, and
        ``sigmas`` absent or Flux's default ``linspace(1, 1 / n, n)``); ``None`` otherwise."""
        if not (self.is_flow or self.is_edm) or n is None or timesteps is not None or self.tuned(n) is None:
            return None
        if sigmas is not None and not np.allclose(np.asarray(sigmas, dtype=np.float64), np.linspace(1.0, 1 / n, n)):
            return None
        times = torch.tensor(self.tuned(n), dtype=torch.float64)
        grid = Grid.from_times(self.noise_schedule, times, final="zero")
        self.sigmas = torch.cat([times.to(torch.float32), torch.zeros(1)])
        if self.is_flow:
            N = self.config.num_train_timesteps
            return grid, lambda t: t * N
        return grid, lambda t: 0.25 * float(np.log(t))

    def _edm_grid(self, n: int):
        """EDM's Karras (``rho``) or exponential sigmas between ``sigma_max`` and ``sigma_min`` (float32, as
        diffusers' EDM schedulers), and the model timestep ``0.25 log sigma`` of a planned time."""
        lo, hi = self._edm_range
        ramp = np.linspace(0, 1, n)
        if self.config.sigma_schedule == "karras":
            inv = 1 / self.config.rho
            sig = (hi ** inv + ramp * (lo ** inv - hi ** inv)) ** self.config.rho
        else:
            sig = np.exp(np.linspace(np.log(lo), np.log(hi), n))[::-1]
        sig = torch.from_numpy(np.ascontiguousarray(sig)).to(torch.float32)
        final = "zero" if self.config.final_sigmas_type == "zero" else "t_min"
        grid = Grid.from_times(self.noise_schedule, sig.to(torch.float64), final=final,
                               t_end=float(torch.tensor(lo, dtype=torch.float32)))
        at_grid = {float(t): m for t, m in zip(sig.to(torch.float64).tolist(), (0.25 * torch.log(sig)).tolist())}
        return grid, lambda t: at_grid.get(t, 0.25 * float(np.log(t)))

    def _init_noise_sigma(self, grid: Grid) -> float:
        """1 (the VP prior), except after a swap from an Euler-style Karras config with ``linspace`` /
        ``trailing`` spacing: diffusers' Euler / Heun / LMS start there from ``sigma_max z`` in VE terms,
        i.e. ``sigma(t_0) z`` in our VP sample, and so do we (the same image from the same noise)."""
        if self.is_edm:  # diffusers' EDM schedulers start from sqrt(sigma_max^2 + 1) z
            return (self._edm_range[1] ** 2 + 1) ** 0.5
        euler_start = (not self.is_flow and self.config.use_karras_sigmas and self.config.karras_style == "euler"
                       and self.config.timestep_spacing in ("linspace", "trailing"))
        return float(grid.sigma[0]) if euler_start else 1.0

    def _karras_grid(self, n: int, final: str):
        """diffusers' Karras sigmas (rho = 7) on this DDPM schedule, by ``karras_style``, and the model timestep
        of a planned time (rounded for ``"dpm"``, as diffusers; the solver keeps the exact sigma)."""
        schedule = self.noise_schedule
        train = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # float32, as diffusers computes it
        if self.config.karras_style == "euler":
            ends = self._spacing.times(schedule, n)
            hi, lo = float(train[int(ends[0])]), float(train[int(ends[-1])])
        else:
            hi, lo = float(train[-1]), float(train[0])
        ramp, rho = np.linspace(0, 1, n), 7.0
        karras = ((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho).astype(np.float32)
        # float32 round-off may put the ends a hair outside the schedule: clamp to its sigma range first
        bounds = schedule.sigma_bar(torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64))
        sig = torch.from_numpy(karras).to(torch.float64).clamp(bounds[0].item(), bounds[1].item())
        t = schedule.t_from_sigma_bar(sig).clamp(schedule.t_min, schedule.t_max)
        grid = Grid.from_times(schedule, t, final=final)
        if self.config.karras_style == "euler" or self.config.beta_schedule == "squaredcos_cap_v2":
            return grid, None
        return grid, lambda u: float(np.round(u))

    def _flow_grid(self, n, sigmas, mu, timesteps):
        """The flow grid of ``flow_sigmas`` and the model timestep of a planned time: diffusers' own at grid
        points, ``t * N`` between them (Runge-Kutta stages)."""
        if n is not None:
            n = check_steps(n)
        sig, model_t = flow_sigmas(self.config, self.config.timestep_spacing, n, sigmas, mu, timesteps)
        grid = Grid.from_times(self.noise_schedule, torch.from_numpy(sig).to(torch.float64), final="zero")
        self.sigmas = torch.cat([torch.from_numpy(sig), torch.zeros(1)])
        at_grid = {float(t): float(m) for t, m in zip(grid.t[:-1].tolist(), model_t.tolist())}
        N = self.config.num_train_timesteps
        return grid, lambda t: at_grid.get(t, t * N)

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
        """The identity on DDPM and flow schedules (the model sees our samples); on EDM schedules EDM's
        ``c_in x = x / sqrt(sigma^2 + sigma_data^2)`` at the current call (Karras et al. 2022, Table 1)."""
        if not self.is_edm:
            return sample
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._first_index(timestep)
        sigma = self._coefs[self._step_index][1]
        return sample / (sigma ** 2 + self.config.sigma_data ** 2) ** 0.5

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
        if self._twin is not None and k != self._twin:  # the step after a first step at a shared timestep
            twin, self._twin = self._twin, None
            t = _first_value(timestep)
            repeat = _same_time(t, self._call_timesteps[twin])
            if k == twin + 1 and repeat and (k == len(self._plan) or not _same_time(t, self._call_timesteps[k])):
                # the loop started at the first of the two calls: this is the second, whose work the first
                # step did (see _first_index); the sample passes through
                return SchedulerOutput(prev_sample=sample) if return_dict else (sample,)
        if k >= len(self._plan):
            raise RuntimeError(f"step called {k + 1} times for a run of {len(self._plan)} model calls; "
                               "call set_timesteps to start a new run")
        t = self._plan[k]
        if not _same_time(_first_value(timestep), self._call_timesteps[k]):
            raise ValueError(f"step got timestep {timestep} but model call {k} of this run is at "
                             f"{self._call_timesteps[k]}")
        dtype = sample.dtype
        x = sample.float() if dtype in (torch.float16, torch.bfloat16) else sample
        pred = self._prediction(model_output if model_output.dtype == x.dtype else model_output.to(x.dtype), x, k)
        if k < self._bridge_end:
            x_next = self._bridge(x, pred, k)
        else:
            self._generator, self._variance_noise = generator, variance_noise
            try:
                x_next, _ = self._run.send((x, pred))
            finally:
                self._generator = self._variance_noise = None
        self._step_index = k + 1
        prev_sample = x_next if x_next.dtype == dtype else x_next.to(dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _bridge(self, x: Tensor, pred: Prediction, k: int) -> Tensor:
        """A start inside a multi-call step (or from pure noise): DDIM (eta = 0) from call ``k``'s time to
        the next call's (the grid's end when there is none: a one-step grid from pure noise), or the sample
        itself when the next call is at the same time."""
        if k + 1 == len(self._plan):
            return pred.combine(float(self.grid.alpha[-1]), float(self.grid.sigma[-1]))
        if self._plan[k + 1] == self._plan[k]:
            return x
        alpha_next, sigma_next = self._coefs[k + 1][:2]
        return pred.combine(alpha_next, sigma_next)

    def _coefficients(self, t: float) -> tuple:
        """``(alpha, sigma[, alpha_dot, sigma_dot])`` at ``t`` as Python floats (flow schedules add the
        derivatives a velocity needs)."""
        tt = torch.tensor(t, dtype=torch.float64)
        out = (self.noise_schedule.alpha(tt).item(), self.noise_schedule.sigma(tt).item())
        if self.is_flow:
            out += (self.noise_schedule.alpha_dot(tt).item(), self.noise_schedule.sigma_dot(tt).item())
        return out

    def _prediction(self, model_output: Tensor, x: Tensor, k: int) -> Prediction:
        """``(x0, eps)`` of model call ``k`` (its coefficients computed once, in ``set_timesteps``)."""
        c = self._coefs[k]
        if self.is_edm:  # EDM's preconditioned output: D = c_skip x + c_out F (Karras et al. 2022, eq. 7)
            s, sd = c[1], self.config.sigma_data
            c_out = s * sd / (s ** 2 + sd ** 2) ** 0.5 * (1 if self._prediction_kind == "eps" else -1)
            pred = Prediction(x0=(sd ** 2 / (s ** 2 + sd ** 2)) * x + c_out * model_output, x=x, alpha=1.0, sigma=s)
        else:
            derivs = {"alpha_dot": c[2], "sigma_dot": c[3]} if len(c) == 4 else {}
            pred = convert_prediction(model_output, x, c[0], c[1], self._prediction_kind, **derivs)
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

    def _schedule_times(self, timesteps) -> Tensor:
        """Schedule times of model ``timesteps``: themselves on DDPM schedules; on flow schedules the grid
        time of a planned call's timestep (diffusers' DPM truncates them), else ``timestep / N``."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        if not (self.is_flow or self.is_edm):
            return t
        out = []
        for v in t.tolist():
            k = next((k for k, c in enumerate(self._call_timesteps) if _same_time(v, c)), None)
            unmapped = float(np.exp(4 * v)) if self.is_edm else v / self.config.num_train_timesteps
            out.append(self._plan[k] if k is not None else unmapped)
        return torch.tensor(out, dtype=torch.float64)

    def scale_noise(self, sample: Tensor, timestep, noise: Tensor) -> Tensor:
        """``FlowMatchEulerDiscreteScheduler.scale_noise``: ``(1 - sigma) x0 + sigma eps`` (img2img in SD3 / Flux)."""
        return self.add_noise(sample, noise, timestep)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process ``alpha_t x0 + sigma_t eps`` at (per-sample) ``timesteps``."""
        t = self._schedule_times(timesteps)
        alpha = self.noise_schedule.alpha(t).to(original_samples.device)
        sigma = self.noise_schedule.sigma(t).to(original_samples.device)
        x = original_samples
        return (broadcast_like(alpha, x) * x + broadcast_like(sigma, x) * noise).to(x.dtype)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target ``alpha_t eps - sigma_t x0`` (for training with ``prediction_type='v_prediction'``)."""
        t = self._schedule_times(timesteps)
        alpha = self.noise_schedule.alpha(t).to(sample.device)
        sigma = self.noise_schedule.sigma(t).to(sample.device)
        return (broadcast_like(alpha, sample) * noise - broadcast_like(sigma, sample) * sample).to(sample.dtype)

    @property
    def nfe(self) -> int:
        """Model calls of the current run (``len(self.timesteps)``)."""
        return len(self._plan)


def schedule_kind(config) -> str:
    """Which noise schedule a diffusers scheduler config (``scheduler.config``, with or without ``_class_name``)
    puts its network on: ``"flow"`` (``FlowMatch*``, ``use_flow_sigmas``), ``"edm"`` (``EDM*``, ``sigma_data``) or
    ``"ddpm"``; a config of ours says it (``noise_schedule``)."""
    config = dict(config)
    if config.get("noise_schedule") in NOISE_SCHEDULES:
        return config["noise_schedule"]
    name = config.get("_class_name") or ""
    flow_keys = {"use_dynamic_shifting", "base_image_seq_len", "max_image_seq_len", "shift_terminal"}
    if (name.startswith("FlowMatch") or (not name and "beta_start" not in config and flow_keys & set(config))
            or config.get("use_flow_sigmas")):
        return "flow"
    if name.startswith("EDM") or "sigma_data" in config:
        return "edm"
    return "ddpm"


def _schedule_of_source(config: dict) -> dict:
    """The noise-schedule keys of a diffusers scheduler's config as this adapter reads them, or an error for
    one it cannot read (never a DDPM schedule made up from defaults).

    - ``FlowMatch*`` schedulers (SD3, Flux): ``noise_schedule="flow"``, their shift keys as they are,
      ``timestep_spacing="flow_match"``, velocity prediction;
    - ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` (Sana): the same with ``flow_shift`` as
      ``shift`` and ``timestep_spacing="flow_dpm"``;
    - EDM schedulers (``EDM*``, ``sigma_data``): ``noise_schedule="edm"`` with their sigma range, schedule
      and preconditioning;
    - DDPM-family schedulers: ``noise_schedule="ddpm"``; beta / Lu sigmas and VE (sigma range without
      betas) configs raise.
    A config of ours (``_class_name`` one of our schedulers) is read as it is.
    """
    name = config.get("_class_name") or ""
    if name in _our_schedulers():
        return {}
    if config.get("sampler") and ("noise_schedule" in config or "beta_start" in config):
        return {}  # our keys, kept by a diffusers scheduler we were switched to: switching back
    if config.get("invert_sigmas"):
        raise ValueError(f"{name or 'this'} config has invert_sigmas=True (sampling from data to noise); "
                         "fewstep's schedulers only sample from noise to data")
    for key in ("use_beta_sigmas", "use_lu_lambdas"):
        if config.get(key):
            raise ValueError(f"{name or 'this'} config sets {key}=True, a sigma spacing fewstep does not read")
    kind = schedule_kind(config)
    if kind == "flow" and not config.get("use_flow_sigmas"):
        return {"noise_schedule": "flow", "timestep_spacing": "flow_match", "prediction_type": "flow_prediction"}
    if config.get("use_flow_sigmas"):
        if not name:  # built in code: UniPC has predict_x0, DPM-Solver algorithm_type
            name = "UniPCMultistepScheduler" if "predict_x0" in config else "DPMSolverMultistepScheduler"
        if name not in FLOW_SIGMA_SOURCES:
            raise ValueError(f"the flow sigmas of {name} are not read; from_config a FlowMatchEulerDiscreteScheduler "
                             f"config or one of {sorted(FLOW_SIGMA_SOURCES)} with use_flow_sigmas=True")
        if config.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise ValueError("use_flow_sigmas with a non-flow prediction type is not read")
        return {"noise_schedule": "flow", "timestep_spacing": FLOW_SIGMA_SOURCES[name], "prediction_type": "flow_prediction",
                "shift": float(config.get("flow_shift", 1.0)), "use_karras_sigmas": False,
                "use_exponential_sigmas": False}
    if config.get("prediction_type") == "flow_prediction":
        raise ValueError(f"{name or 'this'} config predicts flow velocity without flow sigmas; not read")
    defaulted = set(config.get("_use_default_values", []))
    own_ve = {"sigma_min", "sigma_max", "sigma_data"} & set(config) - defaulted  # an EDM config's own values
    if kind == "edm":
        if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
            raise ValueError(f"{name or 'this'} EDM config predicts {config['prediction_type']!r}; not read")
        keys = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras", "rho": 7.0,
                "prediction_type": "epsilon", "final_sigmas_type": "zero"}
        return {"noise_schedule": "edm", **{k: config.get(k, v) for k, v in keys.items()}}
    if "beta_start" not in config and "trained_betas" not in config and own_ve:
        raise ValueError(f"{name or 'this'} is a VE (sigma range) scheduler config without betas; not read")
    if config.get("use_exponential_sigmas"):
        raise ValueError(f"{name or 'this'} config sets use_exponential_sigmas=True on a DDPM schedule; not read")
    if config.get("use_karras_sigmas"):
        if not name:  # a scheduler built in code has no _class_name: multistep solvers have solver_order
            style = "dpm" if "solver_order" in config else "euler"
        elif name in KARRAS_SOURCES:
            style = KARRAS_SOURCES[name]
        else:
            raise ValueError(f"the Karras sigmas of {name} are not read; known: {sorted(KARRAS_SOURCES)}")
        for key, default in (("sigma_min", None), ("sigma_max", None), ("interpolation_type", "linear"),
                             ("timestep_type", "discrete")):
            if config.get(key, default) != default:
                raise ValueError(f"{name} config sets {key}={config[key]!r} with Karras sigmas; not read")
        # the range of Euler-style Karras sigmas follows the source's spacing, even its class default
        return {"noise_schedule": "ddpm", "karras_style": style,
                "timestep_spacing": config.get("timestep_spacing", "linspace"), "steps_offset": config.get("steps_offset", 0)}
    return {"noise_schedule": "ddpm", "use_karras_sigmas": False}


def _with_overrides(config: dict, overrides: dict) -> dict:
    """``config`` with ``overrides`` set, and no longer listed as defaults (diffusers' ``from_config``
    does not pass a key of ``_use_default_values`` on)."""
    if not overrides:
        return config
    out = {**config, **overrides}
    if "_use_default_values" in config:
        out["_use_default_values"] = [k for k in config["_use_default_values"] if k not in overrides]
    return out


def _tail(grid: Grid, i: int) -> Grid:
    return Grid(grid.t[i:], grid.alpha[i:], grid.sigma[i:], schedule=grid.schedule)


def _resolve(name: str) -> str:
    """The registry name of ``name``, or ``TIME_SHIFT``."""
    return TIME_SHIFT if name == TIME_SHIFT else resolve_name(name)


def _make_adapter_solver(name: str, options: dict) -> Solver:
    """``make_solver``, and Time-Shift: ``sampler_options = {"solver": "ddim", "window": .., "cutoff": ..}``
    (window and cutoff in the schedule's times: training indices on DDPM, sigma on flow schedules)."""
    if name != TIME_SHIFT:
        return make_solver(name, **options)
    try:
        return TimeShift(**{"solver": "ddim", **options})
    except TypeError as err:
        raise ValueError(f"bad option for sampler {TIME_SHIFT!r}: {err}") from None


def _first_value(timestep) -> float:
    """The (first) timestep as a float: a pipeline passes a 0-d tensor, an int, or one per sample."""
    if isinstance(timestep, (int, float)):
        return float(timestep)
    if torch.is_tensor(timestep) and timestep.ndim == 0:
        return timestep.item()
    return float(torch.as_tensor(timestep).reshape(-1)[0])


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
    if name == TIME_SHIFT:
        params = inspect.signature(TimeShift.__init__).parameters.values()
        return {p.name for p in params if p.kind is not p.VAR_KEYWORD} - {"self"}
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
