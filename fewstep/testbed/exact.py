"""The Bayes-optimal denoiser of a ``GaussianMixture`` (and classifier-free guided combinations of its
posterior), and the exact output law of a solver run under the denoiser of one Gaussian."""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.samplers.denoisers import CFGDenoiser, Denoiser, Prediction
from fewstep.samplers.sampler import run_solver
from fewstep.samplers.schedules import Schedule

from .mixture import _F64, GaussianMixture, Posterior, _f64

__all__ = ["ExactDenoiser", "guided_posterior", "affine_output_law"]


class ExactDenoiser(Denoiser):
    """The Bayes-optimal denoiser of a ``GaussianMixture`` over a ``schedule`` (float64 inside).

    ``forward(x, t)``: ``x [B, *S]`` with ``prod(S) = D``; returns ``Prediction`` in ``x.dtype`` with
    ``x = alpha x0 + sigma eps``. ``class_label`` (int or ``[B]``) conditions on a class.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, class_label=None):
        super().__init__()
        self.mixture, self.schedule, self.class_label = mixture, schedule, class_label
        mixture._class_mask(class_label)  # validate now, not at the first call

    def forward(self, x: Tensor, t) -> Prediction:
        if x[0].numel() != self.mixture.dim:
            raise ValueError(f"sample shape {tuple(x.shape[1:])} does not flatten to the mixture's dim {self.mixture.dim}")
        alpha, sigma = self.coefficients(t, x)
        pred = self.mixture.posterior(x.to(_F64), alpha, sigma, self.class_label)
        return Prediction(pred.x0.to(x.dtype), pred.eps.to(x.dtype))


def guided_posterior(mixture: GaussianMixture, class_label=None, guidance_scale: float | None = None) -> Posterior:
    """The mixture's posterior, conditional on ``class_label`` or, with ``guidance_scale = w``,
    classifier-free guided (Ho & Salimans 2022): ``eps = eps_u + w (eps_c - eps_u)``, same for ``x0``."""
    if guidance_scale is None:
        return lambda x, a, s: mixture.posterior(x, a, s, class_label)
    if class_label is None:
        raise ValueError("guidance needs a class_label")
    return _cfg_posterior(lambda x, a, s: mixture.posterior(x, a, s, class_label),
                          lambda x, a, s: mixture.posterior(x, a, s), float(guidance_scale))


def _cfg_posterior(cond: Posterior, uncond: Posterior, w: float) -> Posterior:
    def posterior(x, a, s):
        c, u = cond(x, a, s), uncond(x, a, s)
        return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))

    return posterior


def _exact_posterior(denoiser: Denoiser) -> Posterior | None:
    """The closed-form posterior behind an ``ExactDenoiser`` or a CFG of them (valid at any noise
    level, also below the schedule's ``t_min``); None for any other denoiser."""
    if isinstance(denoiser, ExactDenoiser):
        mixture, label = denoiser.mixture, denoiser.class_label
        return lambda x, a, s: mixture.posterior(x, a, s, label)
    if isinstance(denoiser, CFGDenoiser):
        cond, uncond = _exact_posterior(denoiser.conditional), _exact_posterior(denoiser.unconditional)
        if cond is not None and uncond is not None:
            return _cfg_posterior(cond, uncond, denoiser.scale)
    return None


def affine_output_law(solver, grid, denoiser: Denoiser, mean, var) -> tuple[Tensor, Tensor]:
    """Exact law ``N(mean_out, diag var_out)`` of a solver's output from ``x_T ~ N(mean, diag var)``, for a
    denoiser that is affine and coordinate-wise in ``x`` (the ``ExactDenoiser`` of one diagonal Gaussian,
    e.g. ``ExactMRDenoiser``): the run is then ``x_out = A x_T + sum_k B_k z_k + c`` with diagonal ``A``, ``B_k``.

    One batched run finds every coefficient, so there is no Monte-Carlo error: row 0 starts at ``mean``
    with no noise (gives ``c + A mean``), row 1 at ``mean + 1`` (gives ``A``), row ``k + 2`` gets a unit
    noise draw at the ``k``-th noise call only (gives ``B_k``). ``var_out = A^2 var + sum_k B_k^2``.
    """
    if getattr(denoiser, "mixture", None) is None or denoiser.mixture.n_components != 1:
        raise ValueError("affine_output_law needs the ExactDenoiser of one Gaussian")
    mean, var = _f64(mean).reshape(-1), _f64(var).reshape(-1)
    n_calls = len(solver.plan(grid)) + 1 if solver.stochastic else 0  # noise calls <= model calls
    rows = 2 + n_calls
    x = mean.expand(rows, -1).clone()
    x[1] += 1
    calls = [0]

    def noise(like):
        z = torch.zeros_like(like)
        if calls[0] + 2 < rows:
            z[calls[0] + 2] = 1
        calls[0] += 1
        return z

    with torch.no_grad():
        out = run_solver(solver, grid, denoiser, x, noise)
    if calls[0] > n_calls:
        raise RuntimeError(f"the solver drew noise {calls[0]} times, more than its {n_calls} model calls + 1")
    a = out[1] - out[0]
    b = out[2:] - out[0]
    return out[0], a**2 * var + (b**2).sum(0)
