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


#: ``(method, parameterisation) -> solver factory(order, solver_type, lower_order_final, **options)``.
MR_METHODS: dict[tuple[str, str], Callable[..., Solver]] = {
    ("ode", "data"): lambda order, solver_type, lof, **kw: DPMSolverPP(order, solver_type, lof, **kw),
    ("ode", "noise"): lambda order, solver_type, lof, **kw: DPMSolver(order, solver_type, lof, **kw),
    ("sde", "data"): lambda order, solver_type, lof, **kw: SDEDPMSolverPP(order, solver_type, lof, **kw),
    ("sde", "noise"): lambda order, solver_type, lof, **kw: SDEDPMSolver(order, solver_type, lof, **kw),
}


def make_mr_solver(method: str = "ode", parameterization: str = "data", order: int = 2,
                   solver_type: str = "heun", lower_order_final: bool = False, order_rule: str = "diffusers",
                   third_order: str = "reference") -> Solver:
    """The MRS solver by name: ``method`` ``"ode"`` / ``"sde"`` with ``parameterization`` ``"data"`` /
    ``"noise"``, or the baselines ``"euler_maruyama"`` (IR-SDE's reverse SDE) and ``"posterior"`` (IR-SDE's
    posterior sampling = DDPM's ancestral step on the MR Gaussian path).

    ``order_rule="mrs"``: MRS's order per step (full order on the last step; ``_multistep_order``);
    ``third_order`` (ODE, order 3): ``"reference"`` (MRS's ODE-3 update, whose half-weight second
    difference makes it second order; the default, as for ``dpmpp_3m``) or ``"taylor"`` (third order)."""
    if method == "euler_maruyama":
        return MREulerMaruyama()
    if method == "posterior":
        return DDPM("small")
    if method not in ("ode", "sde"):
        raise ValueError(f"unknown MR method {method!r}; expected 'ode', 'sde', 'euler_maruyama' or 'posterior'")
    if parameterization not in ("data", "noise"):
        raise ValueError(f"unsupported MRS parameterization {parameterization!r}; expected 'data' or 'noise'")
    options = {"order_rule": order_rule}
    if method == "ode":
        options["third_order"] = third_order
    elif third_order != "reference":
        raise ValueError("third_order applies to the ODE solvers (the SDE solvers are of order 1 or 2)")
    return MR_METHODS[method, parameterization](order, solver_type, lower_order_final, **options)
