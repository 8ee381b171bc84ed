"""The MRS solvers by method and parameterisation (``make_mr_solver``) and the IR-SDE baseline
``MREulerMaruyama``. Every MRS solver is a DPM-Solver-family solver of ``samplers.solvers`` run in ``y``."""

from __future__ import annotations

from typing import Callable

from ..solvers import DDPM, DPMSolver, DPMSolverPP, SDEDPMSolver, SDEDPMSolverPP, Solver, _scalars
from .schedule import MRSchedule
from .updates import mr_euler_maruyama_step

__all__ = ["MREulerMaruyama", "MR_METHODS", "make_mr_solver"]


class MREulerMaruyama(Solver):
    """Euler-Maruyama on the MR reverse SDE (the IR-SDE / DA-CLIP baseline sampler), one model call per
    step, noise on every step (IR-SDE's ``reverse_sde``). Needs the grid of an ``MRSchedule`` (for
    ``sigma_inf``) and runs in ``y = x - mu``."""

    name = "mr_euler_maruyama"
    stochastic = True

    def steps(self, grid, noise):
        sched = grid.schedule
        if not isinstance(sched, MRSchedule):
            raise ValueError(f"MR Euler-Maruyama needs a grid of an MRSchedule, not {type(sched).__name__}")
        t, alpha, sigma, _ = _scalars(grid)
        x_next = None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            x_next = mr_euler_maruyama_step(x, pred.eps, alpha[i], sigma[i], alpha[i + 1], sched.sigma_inf, noise(x))
        yield x_next, None


#: ``(method, parameterisation) -> solver factory(order, solver_type, lower_order_final)``.
MR_METHODS: dict[tuple[str, str], Callable[..., Solver]] = {
    ("ode", "data"): lambda order, solver_type, lof: DPMSolverPP(order, solver_type, lof),
    ("ode", "noise"): lambda order, solver_type, lof: DPMSolver(order, solver_type, lof),
    ("sde", "data"): lambda order, solver_type, lof: SDEDPMSolverPP(order, solver_type, lof),
    ("sde", "noise"): lambda order, solver_type, lof: SDEDPMSolver(order, solver_type, lof),
}


def make_mr_solver(method: str = "ode", parameterization: str = "data", order: int = 2,
                   solver_type: str = "heun", lower_order_final: bool = False) -> Solver:
    """The MRS solver by name: ``method`` ``"ode"`` / ``"sde"`` with ``parameterization`` ``"data"`` /
    ``"noise"``, or the baselines ``"euler_maruyama"`` (IR-SDE's reverse SDE) and ``"posterior"`` (IR-SDE's
    posterior sampling = DDPM's ancestral step on the MR Gaussian path)."""
    if method == "euler_maruyama":
        return MREulerMaruyama()
    if method == "posterior":
        return DDPM("small")
    if method not in ("ode", "sde"):
        raise ValueError(f"unknown MR method {method!r}; expected 'ode', 'sde', 'euler_maruyama' or 'posterior'")
    if parameterization not in ("data", "noise"):
        raise ValueError(f"unsupported MRS parameterization {parameterization!r}; expected 'data' or 'noise'")
    return MR_METHODS[method, parameterization](order, solver_type, lower_order_final)
