"""Convergence measurements on the exact testbed: a solver's error against the exact PF-ODE solution
and its empirical order (the slope of log error over log steps)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fewstep.samplers.sampler import Sampler

from .exact import ExactDenoiser
from .mixture import GaussianMixture
from .ode import mixture_pf_ode_solution

__all__ = ["endpoint_error", "measured_order"]


def endpoint_error(sampler: Sampler, mixture: GaussianMixture, x_T: Tensor, exact_start: int = 0) -> float:
    """Max abs error at ``sampler``'s grid end against the exact PF-ODE solution from the same ``x_T``.

    ``sampler.denoiser`` must be an ``ExactDenoiser`` of ``mixture``. ``exact_start = k`` replaces the
    solver's first ``k`` results by the exact solution: a multistep method's own order, without the
    error of its lower-order warm-up steps.
    """
    if not isinstance(sampler.denoiser, ExactDenoiser):
        raise ValueError("endpoint_error needs a Sampler over an ExactDenoiser")
    grid, den = sampler.grid, sampler.denoiser
    t0 = grid.t[0].item()

    def exact(k: int) -> Tensor:
        t_end = None if grid.ends_at_data and k == grid.n_steps else grid.t[k].item()
        return mixture_pf_ode_solution(mixture, sampler.schedule, x_T, t0, t_end).to(x_T.dtype)

    run = sampler.solver.steps(grid, lambda like: torch.zeros_like(like))
    _, t = next(run)
    x, k = x_T, 0
    while t is not None:
        x, t = run.send((x, den(x, t)))
        k += 1
        if k <= exact_start:
            x = exact(k)
    return (x - exact(grid.n_steps)).abs().max().item()


def measured_order(errors, steps) -> float:
    """Least-squares slope of ``-log(error)`` over ``log(steps)``."""
    return float(-np.polyfit(np.log(np.asarray(steps, float)), np.log(np.asarray(errors, float)), 1)[0])
