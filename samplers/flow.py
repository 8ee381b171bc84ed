"""Flow-matching inference grids exactly as diffusers' schedulers build them (SD3, Flux, Sana, Wan).

On a rectified-flow path ``x_t = (1 - t) x0 + t eps`` a scheduler's "sigma" *is* the time ``t``
(``FlowMatchingSchedule``: ``alpha = 1 - t``, ``sigma = t``) and the transformer is called at
``timestep = sigma * num_train_timesteps``. Two rules turn ``(num_inference_steps, sigmas, mu)`` into
the descending evaluation sigmas (the grid then ends at clean data, sigma = 0):

- ``"flow_match"``: ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, ...): default sigmas from the
  shifted training range, or the pipeline's own ``sigmas``; then the static ``shift``
  (``shift s / (1 + (shift - 1) s)``, Esser et al. 2024 eq. 23) or, with ``use_dynamic_shifting``,
  the resolution-dependent shift with ``mu`` (``time_shift_type`` exponential / linear), optional
  ``shift_terminal`` stretch and Karras / exponential respacing. Timesteps ``sigma * N`` in float32
  (or the pipeline's own ``timesteps``).
- ``"flow_dpm"``: ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` (Sana): ``n + 1`` uniform
  ``alpha``s, shifted by ``flow_shift`` (``exp(mu)`` when the pipeline passes ``mu``), the last
  dropped; timesteps ``sigma * N`` truncated to integers, as diffusers does.
- ``"flow_unipc"``: ``UniPCMultistepScheduler(use_flow_sigmas=True)`` (Wan): ``n`` of ``n + 1`` uniform
  sigmas from 1 (or the pipeline's ``sigmas``), the static or dynamic shift, ``shift_terminal``, a
  first sigma of 1 lowered by 1e-6 (diffusers' guard), integer timesteps.

The float32 / float64 steps follow diffusers' own, so the sigmas are bit-identical to its schedulers'.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["FLOW_SPACINGS", "flow_sigmas", "calculate_shift", "static_shift", "dynamic_shift"]

FLOW_SPACINGS = ("flow_match", "flow_dpm", "flow_unipc")


def static_shift(sigmas, shift: float):
    """SD3's timestep shift ``shift s / (1 + (shift - 1) s)`` (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift(sigmas, mu: float, kind: str = "exponential"):
    """The resolution-dependent shift: ``e^mu / (e^mu + 1/s - 1)`` (``"exponential"``, Flux) or
    ``mu / (mu + 1/s - 1)`` (``"linear"``)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"unknown time_shift_type {kind!r}; expected 'exponential' or 'linear'")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """Flux's ``mu``: linear in the number of image tokens between (base_seq_len, base_shift) and
    (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def _stretch_to_terminal(sigmas, terminal: float):
    # LTX-Video's rule: scale 1 - s so that the last sigma becomes ``terminal``.
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def _respace(sigmas, n: int, config: Mapping[str, Any]):
    """Karras (rho = 7) or exponential respacing between the shifted sigmas' ends."""
    lo, hi = float(sigmas[-1]), float(sigmas[0])
    if config.get("use_karras_sigmas"):
        ramp, rho = np.linspace(0, 1, n), 7.0
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if config.get("use_exponential_sigmas"):
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    return sigmas


def _flow_match(config: Mapping[str, Any], n: int | None, sigmas, mu, timesteps):
    N = int(config.get("num_train_timesteps", 1000))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    shift = float(config.get("shift", 1.0))
    if dynamic and mu is None:
        raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set (the pipeline computes it)")
    if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
        raise ValueError("`sigmas` and `timesteps` should have the same length")
    given = sigmas if sigmas is not None else timesteps
    if n is None:
        if given is None:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        n = len(given)
    elif given is not None and len(given) != n:
        raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps")
    model_t = None if timesteps is None else np.array(timesteps).astype(np.float32)
    if sigmas is None:
        if model_t is None:
            # the training range as FlowMatchEuler's __init__ stores it: float32, statically shifted
            train = (np.linspace(1, N, N, dtype=np.float32)[::-1] / np.float32(N)).astype(np.float32)
            if not dynamic:
                train = static_shift(train, shift).astype(np.float32)
            grid_t = np.linspace(float(train[0]) * N, float(train[-1]) * N, n)
        else:
            grid_t = model_t
        s = grid_t / N
    else:
        s = np.array(sigmas).astype(np.float32)
    s = dynamic_shift(s, mu, config.get("time_shift_type", "exponential")) if dynamic else static_shift(s, shift)
    if config.get("shift_terminal"):
        s = _stretch_to_terminal(s, float(config["shift_terminal"]))
    s = np.asarray(_respace(s, n, config)).astype(np.float32)
    if model_t is None:
        model_t = (s * np.float32(N)).astype(np.float32)
    return s, model_t


def _flow_dpm(config: Mapping[str, Any], n: int | None, sigmas, mu, timesteps):
    if sigmas is not None or timesteps is not None:
        raise ValueError("DPMSolverMultistepScheduler's flow sigmas take num_inference_steps only (no custom "
                         "sigmas or timesteps)")
    if n is None:
        raise ValueError("set_timesteps needs num_inference_steps")
    N = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))
    if mu is not None:
        if not config.get("use_dynamic_shifting") or config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("`mu` given, but the config has no exponential dynamic shifting (use_dynamic_shifting)")
        shift = float(np.exp(mu))
    s = 1.0 - np.linspace(1, 1 / N, n + 1)
    s = np.flip(static_shift(s, shift))[:-1].copy()
    model_t = (s * N).astype(np.int64).astype(np.float32)  # torch's int64 cast truncates, as here
    return s.astype(np.float32), model_t


def _flow_unipc(config: Mapping[str, Any], n: int | None, sigmas, mu, timesteps):
    if timesteps is not None:
        raise ValueError("UniPCMultistepScheduler's flow sigmas take num_inference_steps or sigmas, not timesteps")
    N = int(config.get("num_train_timesteps", 1000))
    if config.get("use_dynamic_shifting") and mu is None:
        raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set (the pipeline computes it)")
    if sigmas is None:
        if n is None:
            raise ValueError("set_timesteps needs num_inference_steps or sigmas")
        s = np.linspace(1, 1 / N, n + 1)[:-1]
    else:
        s = np.asarray(sigmas)
    if config.get("use_dynamic_shifting"):
        s = dynamic_shift(s, mu, config.get("time_shift_type", "exponential"))
    else:
        s = static_shift(s, float(config.get("shift", 1.0)))
    if config.get("shift_terminal"):
        s = _stretch_to_terminal(s, float(config["shift_terminal"]))
    s = np.array(s, dtype=np.float64)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    model_t = (s * N).astype(np.int64).astype(np.float32)
    return s.astype(np.float32), model_t


def flow_sigmas(config: Mapping[str, Any], rule: str, num_inference_steps: int | None = None, sigmas=None,
                mu: float | None = None, timesteps=None) -> tuple[np.ndarray, np.ndarray]:
    """``(sigmas, timesteps)``: the float32 evaluation sigmas (descending, without the final 0) and the
    model timesteps of ``rule`` (``FLOW_SPACINGS``) for a scheduler ``config``."""
    if rule == "flow_match":
        s, t = _flow_match(config, num_inference_steps, sigmas, mu, timesteps)
    elif rule == "flow_dpm":
        s, t = _flow_dpm(config, num_inference_steps, sigmas, mu, timesteps)
    elif rule == "flow_unipc":
        s, t = _flow_unipc(config, num_inference_steps, sigmas, mu, timesteps)
    else:
        raise ValueError(f"unknown flow timestep rule {rule!r}; expected one of {FLOW_SPACINGS}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0) and np.all(s <= 1) and np.all(np.diff(s) < 0)):
        raise ValueError(f"flow sigmas must descend within (0, 1]; got {s.tolist()}")
    return s, t
