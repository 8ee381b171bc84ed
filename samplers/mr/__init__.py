"""Mean-reverting (MR) diffusion and the MR Sampler (Li et al., "MRS: A Fast Sampler for Mean Reverting
Diffusion based on ODE and SDE Solvers", ICLR 2025), on the foundation's solvers.

The MR SDE of IR-SDE / DA-CLIP (Luo et al. 2023) drifts the data ``x_0`` towards a condition ``mu``
(e.g. the degraded image)::

    dx = theta_t (mu - x) dt + sigma_t dW,      sigma_t^2 = 2 sigma_inf^2 theta_t,

whose marginal is ``x_t = alpha_t x_0 + (1 - alpha_t) mu + sigma_t eps`` with ``alpha_t =
exp(-int_0^t theta)`` and ``sigma_t = sigma_inf sqrt(1 - alpha_t^2)`` (stationary std ``sigma_inf``).
In ``y = x - mu`` this is an ordinary Gaussian path ``y_t = alpha_t y_0 + sigma_t eps``, so

- ``MRSchedule`` is one more ``Schedule`` (it gives alpha, sigma of ``y``);
- ``MRDenoiser`` turns a network ``model(x, t, mu=...)`` into a ``Prediction`` for ``y``;
- every MRS update is the DPM-Solver / DPM-Solver++ / SDE-DPM-Solver++ update in ``y`` (research
  notes, sec. 3.2): data prediction runs ``solvers.DPMSolverPP`` / ``SDEDPMSolverPP`` with
  ``solver_type="heun"`` (MRS's "taylor" second-order term), noise prediction runs ``solvers.DPMSolver`` /
  ``SDEDPMSolver`` (Lu et al. 2022a), and ``x = y + mu`` at the end.

    sampler = MRSampler(MRDenoiser(net, MRSchedule(), "noise"), steps=20)   # ODE, data prediction, order 2
    restored = sampler.sample(mu=degraded, generator=g)

``MRSampler(reference=True)`` over ``MRSchedule(theta_offset=True)`` reproduces the MRS code's runs (its
schedule's theta_0 offset, its noisy endpoint t = 0, its order rule); docs/faithfulness.md lists each
departure of our default from them with its measured effect.

Data prediction is the default: noise prediction collapses at <= 10 NFE (paper sec. 5.2). On the exact
testbed (tests/test_mr.py, benchmarks/mr_table.py) the noise-prediction SDE solver collapses at 5 NFE and
the noise-prediction ODE solver is 1.3-2x further from the data than data prediction at <= 10 NFE.

Modules: ``schedule`` (``MRSchedule``, ``MRLinspace``), ``denoiser`` (``MRDenoiser``, ``mr_prediction``),
``updates`` (the Euler-Maruyama baseline step), ``solvers`` (``make_mr_solver``, ``MREulerMaruyama``),
``sampler`` (``MRSampler``, ``mr_sample``) and ``scheduler`` (``MRScheduler``, a diffusers
``SchedulerMixin``, loaded on first access so that importing this package does not import diffusers).
The registry names ``mrs_*`` are in ``samplers.registry``.
"""

from __future__ import annotations

from ..registry import MR_SAMPLER_SPECS
from ..solvers import DPMSolver, DPMSolverPP, SDEDPMSolver, SDEDPMSolverPP
from ..updates import (dpmsolver_first_order, dpmsolver_second_order, sde_dpmsolver_first_order,
                       sde_dpmsolver_second_order)
from .denoiser import MR_PREDICTION_TYPES, MRDenoiser, mr_prediction, mr_velocity_to_data
from .sampler import MRSampler, mr_sample
from .schedule import MRLinspace, MRSchedule, irsde_cosine_thetas
from .solvers import MR_METHODS, MREulerMaruyama, make_mr_solver
from .updates import mr_euler_maruyama_step

__all__ = [
    "MRSchedule",
    "MRLinspace",
    "irsde_cosine_thetas",
    "MRDenoiser",
    "MR_PREDICTION_TYPES",
    "mr_velocity_to_data",
    "mr_prediction",
    "dpmsolver_first_order",
    "dpmsolver_second_order",
    "sde_dpmsolver_first_order",
    "sde_dpmsolver_second_order",
    "mr_euler_maruyama_step",
    "DPMSolver",
    "DPMSolverPP",
    "SDEDPMSolver",
    "SDEDPMSolverPP",
    "MREulerMaruyama",
    "MRSampler",
    "mr_sample",
    "MR_METHODS",
    "MR_SAMPLER_SPECS",
    "make_mr_solver",
]  # and MRScheduler, loaded on first access (not in __all__: a star import stays free of diffusers)


def __getattr__(name: str):
    # MRScheduler subclasses diffusers' SchedulerMixin: import diffusers only when it is asked for.
    if name == "MRScheduler":
        from .scheduler import MRScheduler

        return MRScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
