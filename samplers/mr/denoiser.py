"""An MR network as a denoiser of ``y = x - mu``: ``MRDenoiser`` and the output conversion ``mr_prediction``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..denoisers import Denoiser, Prediction, broadcast_like
from .schedule import MRSchedule

__all__ = ["MR_PREDICTION_TYPES", "mr_velocity_to_data", "MRDenoiser", "mr_prediction", "check_mu_shape"]

_F64 = torch.float64

#: Network prediction types: noise ``eps``, data ``x0`` (of ``x``, not ``y``) and MR velocity (see
#: ``mr_velocity_to_data``).
MR_PREDICTION_TYPES = {
    "noise": "noise", "eps": "noise", "epsilon": "noise",
    "data": "data", "x0": "data", "sample": "data",
    "velocity": "velocity", "v": "velocity", "v_prediction": "velocity",
}


def mr_velocity_to_data(v: Tensor, y: Tensor, alpha, sigma, sigma_inf: float) -> Tensor:
    """``y0 = alpha y - (sigma / sigma_inf) v``: MRS's velocity fit (``convert_model_output``:
    ``x0 = alpha x - (sigma / sigma_inf) v + (1 - alpha) mu``), i.e. ``v = alpha sigma_inf eps - (sigma /
    sigma_inf) y0``, Salimans & Ho's ``v`` of the VP path ``y / sigma_inf``, times ``sigma_inf``."""
    return alpha * y - (sigma / sigma_inf) * v


class MRDenoiser(Denoiser):
    """A network ``model(x, t_model, mu=mu)`` (or ``model(x, t_model)`` with ``mu_keyword=None``) of an MR
    diffusion, seen by solvers as a denoiser of ``y = x - mu``: ``forward(y, t, mu) -> Prediction`` with
    ``x0 = x0_hat - mu`` (``y``'s data) and ``eps``, tied by ``y = alpha y0 + sigma eps``.

    ``prediction_type``: ``"noise"`` (DA-CLIP / IR-SDE's ``fit_target``), ``"data"`` (``x0`` of ``x``) or
    ``"velocity"`` (``mr_velocity_to_data``). ``mu``: the default condition, overridden per call.
    ``sample_shape``: if given, ``mu`` must be ``[B, *sample_shape]``. ``model_time`` maps schedule time to
    the network's (identity: MRS feeds float times). ``clip=(lo, hi)``: clamp the data prediction of ``x``
    (e.g. ``(0, 1)`` for images); ``eps`` is recomputed so the pair stays consistent.
    """

    def __init__(self, model: Callable[..., Any], schedule: MRSchedule, prediction_type: str = "noise",
                 mu: Tensor | None = None, mu_keyword: str | None = "mu",
                 model_time: Callable[[Tensor], Tensor] | None = None,
                 sample_shape: tuple[int, ...] | None = None, clip: tuple[float, float] | None = None):
        super().__init__()
        if not isinstance(schedule, MRSchedule):
            raise ValueError(f"an MRDenoiser needs an MRSchedule, not {type(schedule).__name__}")
        try:
            self.prediction_type = MR_PREDICTION_TYPES[prediction_type]
        except (KeyError, TypeError):
            raise ValueError(f"unsupported MR parameterisation {prediction_type!r}; expected one of "
                             f"{sorted(MR_PREDICTION_TYPES)}") from None
        self.model, self.schedule, self.mu, self.mu_keyword = model, schedule, mu, mu_keyword
        self.model_time, self.clip = model_time, clip
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)

    def check_mu(self, mu: Tensor | None, y: Tensor | None = None) -> Tensor:
        """``mu`` (or the default) validated against ``sample_shape`` and the sample ``y``."""
        mu = self.mu if mu is None else mu
        if mu is None:
            raise ValueError("no condition mu: pass mu= (the degraded input) or set MRDenoiser(mu=...)")
        check_mu_shape(mu, self.sample_shape, y)
        return mu

    def forward(self, y: Tensor, t, mu: Tensor | None = None) -> Prediction:
        mu = self.check_mu(mu, y).to(device=y.device, dtype=y.dtype)
        t = torch.as_tensor(t, dtype=_F64)
        alpha, sigma = self.coefficients(t, y)
        a, s = broadcast_like(alpha, y), broadcast_like(sigma, y)
        x = y + mu
        t_model = (self.model_time(t) if self.model_time is not None else t).to(device=y.device, dtype=torch.float32)
        if t_model.ndim == 0:
            t_model = t_model.expand(y.shape[0])
        cond = {} if self.mu_keyword is None else {self.mu_keyword: mu}
        out = self.model(x, t_model, **cond)
        out = (out.sample if hasattr(out, "sample") else out).to(y.dtype)
        return mr_prediction(out, y, mu, a, s, self.prediction_type, self.schedule.sigma_inf, self.clip)


def mr_prediction(output: Tensor, y: Tensor, mu: Tensor, alpha, sigma, prediction_type: str, sigma_inf: float,
                  clip: tuple[float, float] | None = None) -> Prediction:
    """A network output at ``x = y + mu`` as the ``Prediction`` of ``y``: ``"noise"`` is ``eps``; ``"data"`` is
    ``x0_hat`` (``y0 = x0_hat - mu``); ``"velocity"`` goes through ``mr_velocity_to_data``. ``clip=(lo, hi)``
    clamps ``x0_hat`` and recomputes ``eps``. ``alpha``, ``sigma``: floats or tensors broadcastable to ``y``."""
    kind = MR_PREDICTION_TYPES.get(prediction_type)
    if kind is None:
        raise ValueError(f"unsupported MR parameterisation {prediction_type!r}; expected one of "
                         f"{sorted(MR_PREDICTION_TYPES)}")
    if output.shape != y.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} does not match input {tuple(y.shape)}")
    if kind == "noise":
        pred = Prediction(eps=output, x=y, alpha=alpha, sigma=sigma)
    elif kind == "data":
        pred = Prediction(x0=output - mu, x=y, alpha=alpha, sigma=sigma)
    else:
        pred = Prediction(x0=mr_velocity_to_data(output, y, alpha, sigma, sigma_inf), x=y, alpha=alpha, sigma=sigma)
    if clip is not None:
        lo, hi = clip
        pred = Prediction(x0=(pred.x0 + mu).clamp(lo, hi) - mu, x=y, alpha=alpha, sigma=sigma)
    return pred


def check_mu_shape(mu, sample_shape, y: Tensor | None) -> None:
    if not torch.is_tensor(mu) or mu.ndim < 2:
        raise ValueError(f"mu must be a batched tensor [B, *sample_shape], got "
                         f"{tuple(mu.shape) if torch.is_tensor(mu) else type(mu).__name__}")
    if sample_shape is not None and tuple(mu.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"mu has sample shape {tuple(mu.shape[1:])}, expected {tuple(sample_shape)}")
    if y is not None and mu.shape != y.shape:
        raise ValueError(f"mu of shape {tuple(mu.shape)} does not match the sample's {tuple(y.shape)}")
