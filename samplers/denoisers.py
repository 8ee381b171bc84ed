"""Denoisers: any network plus its prediction type, seen by solvers only as ``(x0_hat, eps_hat)``.

A solver calls ``denoiser(x, t)`` and gets a ``Prediction`` with the data prediction ``x0`` and the
noise prediction ``eps`` tied by ``x = alpha x0 + sigma eps``. Parameterisation (eps / x0 / v /
flow velocity), classifier-free guidance and thresholding live here, never in a solver.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .schedules import Schedule

__all__ = [
    "Prediction",
    "Denoiser",
    "ModelDenoiser",
    "CFGDenoiser",
    "PREDICTION_TYPES",
    "convert_prediction",
    "dynamic_threshold",
    "broadcast_like",
    "diffusers_unet_fn",
]

#: Accepted prediction types; diffusers spells x0 prediction "sample" and velocity "v_prediction".
PREDICTION_TYPES = {
    "eps": "eps", "epsilon": "eps",
    "x0": "x0", "sample": "x0",
    "v": "v", "v_prediction": "v",
    "flow": "flow", "velocity": "flow", "flow_prediction": "flow",
}


class Prediction:
    """The pair ``(x0, eps)`` tied by ``x = alpha x0 + sigma eps``.

    Give both, or one of them with ``x``, ``alpha``, ``sigma``: the other is then derived on first
    use only, so a solver that reads only ``eps`` (Euler, PLMS) or only ``x0`` (DPM-Solver++) pays
    for no conversion. Unpacks as ``x0, eps = prediction``.
    """

    __slots__ = ("_x0", "_eps", "_x", "_alpha", "_sigma")

    def __init__(self, x0: Tensor | None = None, eps: Tensor | None = None, *, x: Tensor | None = None,
                 alpha=None, sigma=None):
        if x0 is None and eps is None:
            raise ValueError("a Prediction needs x0 or eps")
        if (x0 is None or eps is None) and (x is None or alpha is None or sigma is None):
            raise ValueError("deriving x0 from eps (or eps from x0) needs x, alpha and sigma")
        self._x0, self._eps, self._x, self._alpha, self._sigma = x0, eps, x, alpha, sigma

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            self._x0 = (self._x - self._sigma * self._eps) / self._alpha
        return self._x0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            self._eps = (self._x - self._alpha * self._x0) / self._sigma
        return self._eps

    def __iter__(self):
        return iter((self.x0, self.eps))

    def combine(self, c_x0: float, c_eps: float) -> Tensor:
        """``c_x0 x0 + c_eps eps`` in two kernels: where only one of the pair is known it goes through
        ``x`` (``x = alpha x0 + sigma eps``) and the other is never built. DDIM and Euler steps are this."""
        if self._x0 is not None and self._eps is not None:
            return torch.add(self._x0 * c_x0, self._eps, alpha=c_eps)
        a, s = self._alpha, self._sigma
        if not (isinstance(a, float) and isinstance(s, float)):  # per-sample coefficients
            return self.x0 * c_x0 + self.eps * c_eps
        if self._x0 is None:
            return torch.add(self._x * (c_x0 / a), self._eps, alpha=c_eps - c_x0 * s / a)
        return torch.add(self._x * (c_eps / s), self._x0, alpha=c_x0 - c_eps * a / s)

    def __repr__(self) -> str:
        return f"Prediction(x0={tuple(self.x0.shape)}, eps={tuple(self.eps.shape)})"


def broadcast_like(c, x: Tensor):
    """A coefficient ready to multiply ``x``: scalars become Python floats (the cheapest operand),
    per-sample tensors are cast to ``x.dtype`` and shaped ``[B, 1, ..., 1]``."""
    if isinstance(c, (int, float)):
        return float(c)
    c = torch.as_tensor(c)
    if c.ndim == 0:
        return c.item()
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def canonical_prediction_type(prediction_type: str) -> str:
    try:
        return PREDICTION_TYPES[prediction_type]
    except KeyError:
        raise ValueError(
            f"unknown prediction type {prediction_type!r}; expected one of {sorted(PREDICTION_TYPES)}"
        ) from None


def convert_prediction(output: Tensor, x: Tensor, alpha, sigma, prediction_type: str,
                       alpha_dot=None, sigma_dot=None) -> Prediction:
    """Turn a network output into ``(x0, eps)`` at noise level ``(alpha, sigma)``.

    ``alpha``/``sigma`` are scalars or per-sample tensors. ``v = alpha eps - sigma x0`` (Salimans &
    Ho 2022), read for any schedule through ``x = alpha x0 + sigma eps``; a flow velocity
    ``u = dx/dt = alpha' x0 + sigma' eps`` needs the schedule's derivatives.
    """
    kind = canonical_prediction_type(prediction_type)
    if output.shape != x.shape:
        # learned-variance networks (e.g. improved DDPM) return mean and variance channels
        if output.ndim == x.ndim and output.shape[1] == 2 * x.shape[1] and output.shape[2:] == x.shape[2:]:
            output = output[:, : x.shape[1]]
        else:
            raise ValueError(f"model output shape {tuple(output.shape)} does not match input {tuple(x.shape)}")
    a, s = broadcast_like(alpha, x), broadcast_like(sigma, x)
    if kind == "eps":
        return Prediction(eps=output, x=x, alpha=a, sigma=s)
    if kind == "x0":
        return Prediction(x0=output, x=x, alpha=a, sigma=s)
    if kind == "v":
        norm = a * a + s * s
        return Prediction((a * x - s * output) / norm, (s * x + a * output) / norm)
    if alpha_dot is None or sigma_dot is None:
        raise ValueError("a flow-velocity prediction needs a schedule with alpha_dot / sigma_dot (FlowMatchingSchedule)")
    ad, sd = broadcast_like(alpha_dot, x), broadcast_like(sigma_dot, x)
    det = a * sd - s * ad
    if all(isinstance(c, float) for c in (a, s, ad, sd)):  # scalar coefficients: two kernels each, on demand
        return _VelocityPrediction(output, x, a, s, ad, sd, det)
    return Prediction((sd * x - s * output) / det, (a * output - ad * x) / det)


class _VelocityPrediction(Prediction):
    """``(x0, eps)`` from a flow velocity ``u`` with scalar coefficients, each computed on first use
    (``x0 = (sd x - s u) / det``, ``eps = (a u - ad x) / det``): Euler reads only ``eps``, DPM-Solver++ only ``x0``."""

    __slots__ = ("_u", "_c")

    def __init__(self, u: Tensor, x: Tensor, a: float, s: float, ad: float, sd: float, det: float):
        self._x0 = self._eps = None
        self._x, self._alpha, self._sigma = x, a, s
        self._u, self._c = u, (sd / det, -s / det, a / det, -ad / det)

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            self._x0 = torch.add(self._x * self._c[0], self._u, alpha=self._c[1])
        return self._x0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            self._eps = torch.add(self._u * self._c[2], self._x, alpha=self._c[3])
        return self._eps

    def combine(self, c_x0: float, c_eps: float) -> Tensor:
        # c_x0 (c0 x + c1 u) + c_eps (c2 u + c3 x), as one multiply-add over x and u
        c0, c1, c2, c3 = self._c
        return torch.add(self._x * (c_x0 * c0 + c_eps * c3), self._u, alpha=c_x0 * c1 + c_eps * c2)


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): clip each sample to its
    ``ratio`` quantile of ``|x0|`` (at least 1, at most ``max_value``) and rescale into [-1, 1]."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)
    s = broadcast_like(s, x0)
    return torch.clamp(x0, -s, s) / s


class Denoiser(nn.Module):
    """Interface: ``forward(x, t) -> Prediction`` over a ``schedule``; ``t`` scalar or per-sample."""

    schedule: Schedule

    def forward(self, x: Tensor, t) -> Prediction:  # pragma: no cover - interface
        raise NotImplementedError

    def coefficients(self, t, x: Tensor):
        """``(alpha, sigma)`` at ``t`` as float64 tensors (scalar or per-sample)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 1 and len(t) != x.shape[0]:
            raise ValueError(f"{len(t)} per-sample times for a batch of {x.shape[0]}")
        return self.schedule.alpha(t), self.schedule.sigma(t)


class ModelDenoiser(Denoiser):
    """A network ``model(x, t_model, **cond) -> output`` and its ``prediction_type``.

    ``model_time`` maps schedule time to what the network was trained on (identity for diffusers
    UNets over a ``DiscreteVPSchedule``). Optional post-processing of ``x0``: ``clip`` to
    ``[-clip, clip]`` or ``dynamic_threshold=(ratio, max_value)``; ``eps`` is then recomputed so the
    pair stays consistent.
    """

    def __init__(self, model: Callable[..., Any], schedule: Schedule, prediction_type: str = "eps",
                 model_time: Callable[[Tensor], Tensor] | None = None, clip: float | None = None,
                 dynamic_threshold: tuple[float, float] | None = None, **cond: Any):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        if self.prediction_type == "flow" and not hasattr(schedule, "alpha_dot"):
            raise ValueError(f"flow prediction needs a schedule with derivatives, not {type(schedule).__name__}")
        self.model_time = model_time
        if clip is not None and dynamic_threshold is not None:
            raise ValueError("use either clip or dynamic_threshold, not both")
        self.clip, self.dynamic_threshold = clip, dynamic_threshold
        self.cond = cond

    @classmethod
    def from_diffusers(cls, unet: nn.Module, scheduler_config, encoder_hidden_states: Tensor | None = None,
                       **kwargs) -> "ModelDenoiser":
        """A diffusers UNet (or transformer) with the noise schedule and prediction type of its scheduler
        (``pipe.scheduler`` or its ``config``), e.g. ``ModelDenoiser.from_diffusers(pipe.unet, pipe.scheduler)``:
        a DDPM-family schedule, or a rectified flow (``FlowMatch*`` schedulers: ``FlowMatchingSchedule(0, 1)``,
        the velocity, the network called at ``N t`` as diffusers calls it; sample it on ``FlowUniform(shift)``).
        A config built in code (no ``_class_name``) is told apart by its keys (``schedulers.schedule_kind``); an EDM
        one is refused (its network takes preconditioned inputs)."""
        from .schedulers import schedule_kind
        from .schedules import DiscreteVPSchedule, FlowMatchingSchedule

        name = type(scheduler_config).__name__ if hasattr(scheduler_config, "config") else None
        config = dict(scheduler_config.config if name else scheduler_config)
        config.setdefault("_class_name", name)
        kind = schedule_kind(config)
        if kind == "edm":
            raise ValueError("an EDM scheduler's network takes preconditioned inputs (c_in x, 0.25 log sigma); swap "
                             "FewstepScheduler.from_config(pipe.scheduler.config) into its pipeline instead")
        if kind == "flow":
            n_train = float(config.get("num_train_timesteps", 1000))
            return cls(diffusers_unet_fn(unet, encoder_hidden_states), FlowMatchingSchedule(0.0, 1.0), "flow",
                       model_time=lambda t: t * n_train, **kwargs)
        schedule = DiscreteVPSchedule.from_diffusers_config(config)
        prediction_type = config.get("prediction_type", "epsilon")
        return cls(diffusers_unet_fn(unet, encoder_hidden_states), schedule, prediction_type, **kwargs)

    def call_model(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        t_model = self.model_time(t) if self.model_time is not None else t
        t_model = t_model.to(device=x.device, dtype=torch.float32)
        if t_model.ndim == 0:
            t_model = t_model.expand(x.shape[0])
        x_in = x
        if isinstance(self.model, nn.Module):  # run the network in its own precision
            param = next(self.model.parameters(), None)
            if param is not None and param.is_floating_point():
                x_in = x.to(param.dtype)
        out = self.model(x_in, t_model, **{**self.cond, **cond})
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
        return out.to(x.dtype)

    def forward(self, x: Tensor, t, **cond) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha, sigma = self.coefficients(t, x)
        out = self.call_model(x, t, **cond)
        derivs = {}
        if self.prediction_type == "flow":
            derivs = dict(alpha_dot=self.schedule.alpha_dot(t), sigma_dot=self.schedule.sigma_dot(t))
        pred = convert_prediction(out, x, alpha, sigma, self.prediction_type, **derivs)
        return self.postprocess(pred, x, alpha, sigma)

    def postprocess(self, pred: Prediction, x: Tensor, alpha, sigma) -> Prediction:
        if self.clip is None and self.dynamic_threshold is None:
            return pred
        x0 = pred.x0.clamp(-self.clip, self.clip) if self.clip is not None else dynamic_threshold(
            pred.x0, *self.dynamic_threshold)
        return Prediction(x0=x0, x=x, alpha=broadcast_like(alpha, x), sigma=broadcast_like(sigma, x))


class CFGDenoiser(Denoiser):
    """Classifier-free guidance (Ho & Salimans 2022): ``eps = eps_u + scale (eps_c - eps_u)``.

    The same weights apply to ``x0`` (both are affine in the network output with the same ``x``),
    so the guided pair stays consistent. ``scale = 1`` is the conditional model alone.
    """

    def __init__(self, conditional: Denoiser, unconditional: Denoiser, scale: float):
        super().__init__()
        if conditional.schedule is not unconditional.schedule:
            raise ValueError("conditional and unconditional denoisers must share one schedule")
        self.conditional, self.unconditional, self.scale = conditional, unconditional, float(scale)
        self.schedule = conditional.schedule

    def forward(self, x: Tensor, t) -> Prediction:
        cond, uncond = self.conditional(x, t), self.unconditional(x, t)
        alpha, sigma = self.coefficients(t, x)
        eps = uncond.eps + self.scale * (cond.eps - uncond.eps)
        return Prediction(eps=eps, x=x, alpha=broadcast_like(alpha, x), sigma=broadcast_like(sigma, x))


def diffusers_unet_fn(unet: nn.Module, encoder_hidden_states: Tensor | None = None, **kwargs) -> Callable:
    """A ``model(x, t)`` callable over a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` / transformer.

    ``encoder_hidden_states`` (one per sample, or one broadcast to the batch) goes to conditional models.
    """

    def call(x: Tensor, t: Tensor, **extra) -> Tensor:
        args = dict(kwargs, **extra)
        if encoder_hidden_states is not None:
            ehs = encoder_hidden_states
            if ehs.shape[0] != x.shape[0]:
                ehs = ehs.expand(x.shape[0], *ehs.shape[1:])
            args["encoder_hidden_states"] = ehs
        return unet(x, t, **args).sample

    return call
