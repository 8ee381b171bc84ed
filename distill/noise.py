"""What a teacher's noise schedule means to the trainers: one small object per schedule family.

The four methods are written in ``alpha`` and ``sigma`` (``targets``, ``fdiv``), so they run on any fewstep
``Schedule``. What differs between a DDPM teacher, a rectified-flow teacher (SD3, Flux, Sana) and an EDM
teacher is a handful of choices, each made here and nowhere else:

- the student's **grid** of ``n`` steps (``grid``), nested under halving so progressive distillation's rounds
  share points: DDPM ``trailing`` integer timesteps (Lin et al. 2024); flow: ``n`` uniform steps in the
  scheduler's unshifted time, shifted as the scheduler shifts (SD3's ``shift``, Flux's resolution-dependent
  ``mu``), ``t_i = shift(1 - i / n)``; EDM: Karras' rho-ramp between ``sigma_max`` and ``sigma_min`` at the
  same fractions, ``1 - i / n`` (``UniformFraction``), then sigma = 0;
- how a **training time** is drawn for a fraction ``u`` in ``[lo, hi]`` of the range (``time_at``): uniform
  ``u`` mapped through the same rule (DMD2 draws integer DDPM timesteps, and on EDM an index of its Karras
  training grid; SD3's scheduler shifts a uniform time), so ``min_t`` / ``max_t`` mean the same everywhere;
- how the network is **called** (``model_time``: DDPM its integer timestep, flow ``N t`` as diffusers' flow
  schedulers call it; EDM ``0.25 log sigma`` with EDM's input and output preconditioning, ``precondition``);
- the **prior** a one-step generator starts from (``prior``: ``z``, or on EDM ``sqrt(sigma_max^2 + 1) z``, where
  diffusers' EDM pipelines start);
- the **scheduler** a student is exported with (``student_scheduler``): diffusers' ``DDIMScheduler`` with
  ``trailing`` spacing on DDPM (when it visits the grid: ``T / n`` an integer); fewstep's
  ``FewstepScheduler`` with the grid in its config on flow and EDM, where DDIM (= Euler on a flow path)
  runs the student's own times, so ``pipe(..., num_inference_steps=n)`` samples the student as trained.

``noise_from_config`` reads a diffusers scheduler config (the family adapter passes its own); ``noise_for``
wraps a bare ``Schedule`` (the exact testbed; ``ScheduleNoise`` for any other schedule, e.g. continuous VP).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from ..samplers.schedules import DiscreteVPSchedule, EDMSchedule, FlowMatchingSchedule, Schedule
from ..samplers.timesteps import DiffusersSpacing, Grid, Timesteps

__all__ = ["Noise", "DiscreteNoise", "FlowNoise", "EDMNoise", "noise_for", "noise_from_config", "FLOW_SOURCES",
           "EDM_SOURCES", "DDPM_SOURCES", "UniformFraction", "UnsupportedSchedule", "ScheduleNoise", "noise_recipe"]

#: diffusers scheduler classes whose config is a DDPM-family (discrete VP) noise schedule.
DDPM_SOURCES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler",
                "DEISMultistepScheduler", "LMSDiscreteScheduler", "LCMScheduler", "TCDScheduler",
                "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DPMSolverSinglestepScheduler",
                "KDPM2AncestralDiscreteScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler")
#: rectified-flow schedulers (``x = (1 - t) x0 + t eps``, the network called at ``N t``).
FLOW_SOURCES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: EDM's preconditioned VE schedulers.
EDM_SOURCES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")


class UnsupportedSchedule(ValueError):
    """A scheduler config the trainers cannot read with certainty (one line for the user)."""

    exit_code = 2


class UniformFraction(Timesteps):
    """``n`` evaluation times at fractions ``1 - i / n`` (``i < n``) of a training range, through ``time_at``
    (a ``Noise``'s map from fractions to schedule times), then clean data: nested under halving, because the
    map moves points, not intervals."""

    def __init__(self, time_at):
        self.time_at = time_at
        self.t_start = self.t_end = None

    def times(self, schedule, n_steps, final="zero"):
        return self.time_at(1 - torch.arange(n_steps, dtype=torch.float64) / n_steps)


class Noise:
    """The base: a ``schedule`` and the choices of the module docstring. ``kind``: ``ddpm``, ``flow`` or
    ``edm``; ``prediction_type``: what a network of this teacher predicts once called through ``call``."""

    kind: str = ""
    schedule: Schedule
    #: the network output's parameterisation as a ``ModelDenoiser`` reads it (after ``precondition``)
    prediction_type: str = "epsilon"
    #: whether a student may predict another parameterisation than the teacher (EDM's preconditioning is
    #: the teacher's network's own, so its students keep it)
    free_prediction: bool = True

    def grid_rule(self) -> Timesteps:
        return UniformFraction(self.time_at)

    def grid(self, n_steps: int) -> Grid:
        """The ``n``-step student grid (noise -> clean data)."""
        return self.grid_rule().grid(self.schedule, n_steps, final="zero")

    def time_at(self, u: Tensor) -> Tensor:
        """The schedule times at fractions ``u`` of the training range (0: least noise, 1: most)."""
        raise NotImplementedError

    #: the non-uniform training-time laws this family offers (``draw``'s ``sampling``)
    samplings: tuple[str, ...] = ("uniform",)

    def draw(self, ctx, rows: int, lo: float, hi: float, sampling: str = "uniform") -> Tensor:
        """Training times for ``rows`` examples: ``u`` uniform in ``[lo, hi]`` through ``time_at`` (float64);
        ``sampling`` another law of the family's (``samplings``), truncated to the same range."""
        self.check_sampling(sampling)
        r = ctx.rand(rows).double().cpu()
        if sampling == "uniform":
            return self.time_at(lo + (hi - lo) * r)
        return self._draw(r, lo, hi, sampling)

    def _draw(self, r: Tensor, lo: float, hi: float, sampling: str) -> Tensor:
        raise NotImplementedError

    def check_sampling(self, sampling: str) -> None:
        if sampling not in self.samplings:
            raise ValueError(f"time_sampling {sampling!r} is not one of this {self.kind} teacher's: "
                             f"{', '.join(self.samplings)}")

    def time_range(self, lo: float, hi: float) -> tuple[float, float]:
        """The first and last time ``draw(.., lo, hi)`` can give (the ratio's time bins cut this range)."""
        ends = self.time_at(torch.tensor([lo, hi], dtype=torch.float64))
        return float(ends[0]), float(ends[1])

    def model_time(self, t: Tensor) -> Tensor:
        """Schedule time -> the timestep the network is called with."""
        return t

    def precondition(self, x: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        """``(network input, state for output)``: the identity except on EDM."""
        return x, None

    def output(self, out: Tensor, x: Tensor, t: Tensor, state: Any) -> Tensor:
        return out

    #: what a pipeline multiplies its standard-normal latents by before the first step (the scheduler's
    #: ``init_noise_sigma``)
    init_noise_sigma: float = 1.0

    def prior(self, z: Tensor, grid: Grid) -> Tensor:
        """The sample at the grid's first time from standard normal ``z``, as a pipeline starts:
        ``init_noise_sigma z`` (1 on VP and flow schedules; on EDM diffusers' ``sqrt(sigma_max^2 + 1)``)."""
        return z * self.init_noise_sigma if self.init_noise_sigma != 1.0 else z

    def student_scheduler(self, grid: Grid, prediction_type: str):
        """A diffusers-loadable scheduler whose ``set_timesteps(n)`` runs DDIM on exactly ``grid``, or a
        ``ValueError`` saying why none exists."""
        raise NotImplementedError

    def exportable(self, grid: Grid, prediction_type: str) -> str | None:
        """``None`` when ``student_scheduler`` can run the grid, else why not (one line)."""
        try:
            self.student_scheduler(grid, prediction_type)
        except ValueError as err:
            return str(err)
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "schedule": repr(self.schedule)}


# -- DDPM -------------------------------------------------------------------------------------------------


class DiscreteNoise(Noise):
    """A DDPM (discrete VP) teacher: trailing integer grids, integer training timesteps, diffusers' DDIM export.
    ``config``: the teacher's scheduler config (its schedule keys go into the student's ``DDIMScheduler``)."""

    kind = "ddpm"
    _SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "rescale_betas_zero_snr")

    def __init__(self, schedule: DiscreteVPSchedule, config: Mapping[str, Any] | None = None,
                 prediction_type: str = "epsilon", timesteps: Timesteps | None = None):
        self.schedule, self.config, self.prediction_type = schedule, dict(config or {}), prediction_type
        self.n_train = int(getattr(schedule, "num_train_timesteps", 1000))
        self._rule = timesteps or DiffusersSpacing("trailing")

    def grid_rule(self) -> Timesteps:
        return self._rule

    def _range(self, lo: float, hi: float) -> tuple[int, int]:
        return int(lo * self.n_train), min(int(hi * self.n_train), self.n_train - 1)

    def draw(self, ctx, rows: int, lo: float, hi: float, sampling: str = "uniform") -> Tensor:
        """Integer timesteps uniform in ``[lo T, hi T]`` clipped to the training range (DMD2's rule)."""
        self.check_sampling(sampling)
        first, last = self._range(lo, hi)
        return (first + ctx.randint(last - first + 1, rows)).double()

    def time_range(self, lo: float, hi: float) -> tuple[float, float]:
        first, last = self._range(lo, hi)
        return float(first), float(last)

    def time_at(self, u: Tensor) -> Tensor:
        return (torch.as_tensor(u, dtype=torch.float64) * (self.n_train - 1)).round()

    def _ddim_config(self, prediction_type: str) -> dict:
        config = {k: self.config[k] for k in self._SCHEDULE_KEYS if k in self.config}
        # steps_offset does not move trailing timesteps; 1 is what StableDiffusionPipeline insists on
        return {**config, "prediction_type": prediction_type, "timestep_spacing": "trailing", "steps_offset": 1,
                "set_alpha_to_one": True, "clip_sample": False, "thresholding": False}

    def student_scheduler(self, grid: Grid, prediction_type: str):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(**self._ddim_config(prediction_type))
        times = [float(t) for t in grid.t[:-1].tolist()]
        n = len(times)
        scheduler.set_timesteps(n)
        visited = scheduler.timesteps.tolist()
        stride = scheduler.config.num_train_timesteps // n
        nexts = [t - stride for t in visited]
        # diffusers' DDIM steps t -> t - T // n, the next trailing timestep only when T / n is an integer
        if not (visited == [int(t) for t in times] and nexts[:-1] == visited[1:] and nexts[-1] < 0):
            raise ValueError(f"diffusers' DDIM cannot visit the {n}-step grid {times} ({self.n_train} training "
                             f"steps / {n} is not an integer)")
        return scheduler


# -- flow matching ----------------------------------------------------------------------------------------


class FlowNoise(Noise):
    """A rectified-flow teacher (``x = (1 - t) x0 + t eps``, velocity ``eps - x0``): shifted uniform grids and
    training times, the network called at ``N t``, a ``FewstepScheduler`` export (DDIM on this path is
    Euler, which is what the teacher's own ``FlowMatchEulerDiscreteScheduler`` does)."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None,
                 shift_type: str = "exponential", prediction_type: str = "flow_prediction",
                 config: Mapping[str, Any] | None = None):
        self.schedule = FlowMatchingSchedule(t_min=0.0, t_max=1.0)
        self.n_train, self.shift, self.mu, self.shift_type = int(num_train_timesteps), float(shift), mu, shift_type
        self.prediction_type, self.config = prediction_type, dict(config or {})

    def time_at(self, u: Tensor) -> Tensor:
        """The scheduler's shift of ``u``: ``static_shift`` at ``shift`` or, with ``mu``, ``dynamic_shift``."""
        from ..samplers.flow import dynamic_shift, static_shift

        u = torch.as_tensor(u, dtype=torch.float64)
        if self.mu is None:
            return static_shift(u, self.shift)
        safe = u.clamp_min(1e-300)  # dynamic_shift divides by u; u = 0 is clean data, t = 0
        return torch.where(u > 0, torch.as_tensor(dynamic_shift(safe, self.mu, self.shift_type)), torch.zeros_like(u))

    samplings = ("uniform", "logit_normal")

    def _draw(self, r: Tensor, lo: float, hi: float, sampling: str) -> Tensor:
        """SD3's logit-normal (Esser et al. 2024, sec. 3.1: ``u = sigmoid(n)``, ``n ~ N(0, 1)``) truncated to
        ``u in [lo, hi]`` by inverting the normal's CDF, then shifted as the scheduler's timesteps are."""
        return self.time_at(torch.sigmoid(_truncated_normal(r, 0.0, 1.0, _logit(lo), _logit(hi))))

    def model_time(self, t: Tensor) -> Tensor:
        return t * self.n_train

    def student_scheduler(self, grid: Grid, prediction_type: str):
        from ..samplers.schedulers import FewstepScheduler

        keys = {k: self.config[k] for k in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift",
                                           "time_shift_type") if k in self.config}
        return FewstepScheduler(sampler="ddim", noise_schedule="flow", num_train_timesteps=self.n_train,
                                shift=self.shift, use_dynamic_shifting=self.mu is not None, prediction_type=prediction_type,
                                tuned_timesteps={str(grid.n_steps): [float(t) for t in grid.t[:-1].tolist()]}, **keys)

    def describe(self) -> dict:
        return {**super().describe(), "shift": self.shift, "mu": self.mu}


# -- EDM --------------------------------------------------------------------------------------------------


class EDMNoise(Noise):
    """An EDM teacher (Karras et al. 2022): ``x = x0 + sigma eps``, the network called as diffusers' EDM
    schedulers call it, ``F(c_in x, 0.25 log sigma)`` with ``D = c_skip x + c_out F`` (``precondition``,
    ``output``: a denoiser sees ``D``, an x0 prediction), Karras grids run to zero, training sigmas on
    Karras' ramp (DMD2's EDM rule). ``edm_prediction``: the config's ``prediction_type`` (its ``c_out``)."""

    kind = "edm"
    prediction_type = "sample"
    free_prediction = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0,
                 edm_prediction: str = "epsilon", config: Mapping[str, Any] | None = None, preconditioned: bool = True):
        if edm_prediction not in ("epsilon", "v_prediction"):
            raise UnsupportedSchedule(f"EDM preconditioning reads prediction_type 'epsilon' or 'v_prediction', not "
                                      f"{edm_prediction!r}")
        self.schedule = EDMSchedule(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        self.edm_prediction, self.config, self.preconditioned = edm_prediction, dict(config or {}), preconditioned
        if not preconditioned:  # a bare VE denoiser (the exact testbed): no network wrapping
            self.prediction_type = "eps"

    def time_at(self, u: Tensor) -> Tensor:
        inv = 1 / self.rho  # Karras' ramp between sigma_min (u = 0) and sigma_max (u = 1)
        u = torch.as_tensor(u, dtype=torch.float64)
        return (self.sigma_min ** inv + u * (self.sigma_max ** inv - self.sigma_min ** inv)) ** self.rho

    samplings = ("uniform", "log_normal")

    def _draw(self, r: Tensor, lo: float, hi: float, sampling: str) -> Tensor:
        """EDM's training law (Karras et al. 2022, Table 1): ``ln sigma ~ N(-1.2, 1.2^2)``, truncated to the
        sigmas of fractions ``[lo, hi]``."""
        s_lo, s_hi = self.time_range(lo, hi)
        return torch.exp(_truncated_normal(r, -1.2, 1.2, math.log(s_lo), math.log(s_hi)))

    def model_time(self, t: Tensor) -> Tensor:
        return 0.25 * torch.log(t) if self.preconditioned else t

    def _c(self, t: Tensor, x: Tensor):
        s = t.to(x.device, torch.float64).reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t.double()
        sd2 = self.sigma_data ** 2
        c_in = 1 / torch.sqrt(s ** 2 + sd2)
        c_skip = sd2 / (s ** 2 + sd2)
        if self.edm_prediction == "epsilon":
            c_out = s * self.sigma_data / torch.sqrt(s ** 2 + sd2)
        else:
            c_out = -s * self.sigma_data / torch.sqrt(s ** 2 + sd2)
        return c_in, c_skip, c_out

    def precondition(self, x: Tensor, t: Tensor):
        if not self.preconditioned:
            return x, None
        c_in, c_skip, c_out = self._c(t, x)
        return (c_in * x).to(x.dtype), (c_skip, c_out)

    def output(self, out: Tensor, x: Tensor, t: Tensor, state) -> Tensor:
        if state is None:
            return out
        c_skip, c_out = state
        return (c_skip * x + c_out * out).to(out.dtype)

    @property
    def init_noise_sigma(self) -> float:
        return (self.sigma_max ** 2 + 1) ** 0.5  # diffusers' EDM schedulers (and FewstepScheduler's EDM)

    def student_scheduler(self, grid: Grid, prediction_type: str):
        from ..samplers.schedulers import FewstepScheduler

        if not self.preconditioned:
            raise ValueError("a bare EDM denoiser has no diffusers scheduler")
        return FewstepScheduler(sampler="ddim", noise_schedule="edm", sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                sigma_data=self.sigma_data, rho=self.rho, prediction_type=self.edm_prediction,
                                steps_offset=1,  # what StableDiffusionPipeline insists on (unused by these grids)
                                tuned_timesteps={str(grid.n_steps): [float(t) for t in grid.t[:-1].tolist()]})

    def describe(self) -> dict:
        return {**super().describe(), "sigma_data": self.sigma_data, "rho": self.rho,
                "edm_prediction": self.edm_prediction}


# -- any other schedule (the exact testbed's continuous VP) ----------------------------------------------


class ScheduleNoise(Noise):
    """A bare ``Schedule`` called at its own time (a testbed ``Denoiser``, or a network on a continuous
    schedule): grids from ``timesteps`` (default time-uniform), training times uniform in time, no export."""

    kind = "schedule"
    prediction_type = "eps"

    def __init__(self, schedule: Schedule, timesteps: Timesteps | None = None):
        from ..samplers.timesteps import TimeUniform

        self.schedule, self._rule = schedule, timesteps or TimeUniform()

    def grid_rule(self) -> Timesteps:
        return self._rule

    def time_at(self, u: Tensor) -> Tensor:
        lo, hi = self.schedule.t_min, self.schedule.t_max
        return lo + torch.as_tensor(u, dtype=torch.float64) * (hi - lo)

    def prior(self, z: Tensor, grid: Grid) -> Tensor:
        return z if self.schedule.variance_preserving else z * float(grid.sigma[0])

    def student_scheduler(self, grid: Grid, prediction_type: str):
        raise ValueError(f"a student of a bare {type(self.schedule).__name__} has no diffusers scheduler")


def _logit(u: float) -> float:
    return math.log(u) - math.log1p(-u) if 0 < u < 1 else (-math.inf if u <= 0 else math.inf)


def _truncated_normal(r: Tensor, mean: float, std: float, lo: float, hi: float) -> Tensor:
    """``N(mean, std^2)`` truncated to ``[lo, hi]`` from uniforms ``r`` (inverse CDF; exact, one draw each)."""
    a = torch.special.ndtr(torch.tensor((lo - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((hi - mean) / std, dtype=torch.float64))
    return (mean + std * torch.special.ndtri(a + r * (b - a))).clamp(lo, hi)


def noise_recipe(noise: Noise) -> dict:
    """The schedule family in a resumed run's recipe, except DDPM's (whose recipes predate it, and resume)."""
    return {} if noise.kind == "ddpm" else {"noise": noise.describe()}


# -- readers ----------------------------------------------------------------------------------------------


def noise_for(schedule: Schedule, timesteps: Timesteps | None = None) -> Noise:
    """A bare schedule's ``Noise`` (the exact testbed, or a network called at schedule time): DDPM trailing,
    flow unshifted, EDM with no preconditioning. ``timesteps`` replaces a DDPM grid rule (toy experiments)."""
    if isinstance(schedule, DiscreteVPSchedule):
        return DiscreteNoise(schedule, timesteps=timesteps)
    if timesteps is None and isinstance(schedule, FlowMatchingSchedule) and (schedule.t_min, schedule.t_max) == (0, 1):
        noise = FlowNoise(num_train_timesteps=1)  # called at schedule time
        noise.schedule = schedule
        return noise
    if timesteps is None and isinstance(schedule, EDMSchedule):
        return EDMNoise(schedule.t_min, schedule.t_max, preconditioned=False)
    return ScheduleNoise(schedule, timesteps)


def noise_from_config(config: Mapping[str, Any], image_seq_len: int | None = None, where: str = "teacher") -> Noise:
    """The ``Noise`` of a diffusers scheduler config (a teacher's, or a fewstep student's ``FewstepScheduler``).

    DDPM-family classes (Karras or not: their sigmas are a sampling choice, not the network's), flow-matching
    ones (``FlowMatchEuler*``, and ``use_flow_sigmas`` configs: Sana's DPM-Solver), EDM ones. ``image_seq_len``:
    the number of image tokens, for a flow config's dynamic shifting (Flux's ``mu``, as its pipeline computes it)."""
    from ..samplers.flow import calculate_shift
    from ..samplers.schedules import DiscreteVPSchedule

    config = dict(config)
    name = config.get("_class_name", "")
    fewstep = name in ("FewstepScheduler", "TunedScheduler")
    kind = config.get("noise_schedule") if fewstep else None
    if name in FLOW_SOURCES or config.get("use_flow_sigmas") or kind == "flow":
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                    "invert_sigmas", "stochastic_sampling"):
            if config.get(key):
                raise UnsupportedSchedule(f"{where}'s {name} sets {key}; the trainers read flow schedulers without "
                                          "it (the student's grid is shift(1 - i / n))")
        # FlowMatch schedulers have no prediction_type (a velocity); a student's FewstepScheduler names its own
        pred = config.get("prediction_type") or "flow_prediction"
        if pred not in ("flow_prediction", "epsilon", "sample", "v_prediction"):
            raise UnsupportedSchedule(f"{where}'s {name} predicts {pred!r}; fewstep reads flow_prediction, epsilon, "
                                      "sample or v_prediction")
        shift = float(config.get("flow_shift", config.get("shift", 1.0)) if config.get("use_flow_sigmas")
                      else config.get("shift", 1.0))
        mu = None
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise UnsupportedSchedule(f"{where}'s {name} shifts by resolution (use_dynamic_shifting), and its "
                                          "family does not say how many image tokens it makes")
            mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
        return FlowNoise(int(config.get("num_train_timesteps", 1000)), shift, mu,
                         config.get("time_shift_type", "exponential"), pred, config)
    if name in EDM_SOURCES or kind == "edm":
        return EDMNoise(float(config.get("sigma_min", 0.002)), float(config.get("sigma_max", 80.0)),
                        float(config.get("sigma_data", 0.5)), float(config.get("rho", 7.0)),
                        config.get("prediction_type", "epsilon"), config)
    if name in DDPM_SOURCES or kind == "ddpm":
        try:
            schedule = DiscreteVPSchedule.from_diffusers_config(config)
        except ValueError as err:
            raise UnsupportedSchedule(f"{where}'s {name}: {err}") from None
        return DiscreteNoise(schedule, config, config.get("prediction_type", "epsilon"))
    known = ", ".join(sorted({*DDPM_SOURCES[:5], *FLOW_SOURCES, *EDM_SOURCES}))
    raise UnsupportedSchedule(f"{where} has a {name or 'unnamed'} scheduler; the trainers read DDPM-family (e.g. "
                              f"{known}, ...) flow-matching and EDM schedulers")
