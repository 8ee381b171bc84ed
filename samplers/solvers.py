"""Solvers as explicit step-by-step state machines over the pure updates of ``samplers.updates``.

A solver is a generator over a ``Grid`` (see ``Solver.steps``): it yields the time at which it needs
the model next, receives ``(x, Prediction)`` evaluated there, and yields the next sample to evaluate
at, until it yields time ``None`` with the final sample. Its whole multistep state (history,
stage) is local variables of that generator, as in k-diffusion's sampling loops. The same generator
drives the native loop (``samplers.sampler.Sampler``) and the diffusers adapter's ``step``.

The DPM-Solver family (``DPMSolverPP``, ``SDEDPMSolverPP``, ``DPMSolver``, ``SDEDPMSolver`` and
heavy ball on DPM-Solver++) shares one loop, ``Multistep.steps``; each method is its ``update`` hook.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Generator, Optional

import torch
from torch import Tensor

from .denoisers import Prediction, broadcast_like
from .timesteps import Grid
from .updates import (AB_COEFFICIENTS, adams_bashforth, ddim_eps_weight, ddim_sigma_eta, ddpm_posterior, dpmpp_first_order,
                      dpmpp_second_order, dpmpp_third_order, dpmsolver_first_order, dpmsolver_second_order,
                      dpmsolver_third_order,
                      sde_dpmpp_first_order, sde_dpmpp_second_order, sde_dpmsolver_first_order,
                      sde_dpmsolver_second_order, sigma_bar_transfer)

__all__ = [
    "Solver",
    "Multistep",
    "DDIM",
    "DDPM",
    "DPMSolverPP",
    "SDEDPMSolverPP",
    "DPMSolver",
    "SDEDPMSolver",
    "PNDM",
    "Euler",
    "Heun",
    "NoiseFn",
]

#: ``noise(like) -> standard normal tensor shaped like ``like``; injectable so SDE runs reproduce.
NoiseFn = Callable[[Tensor], Tensor]
#: A solver run: yields ``(x_to_evaluate, t)`` and is sent ``(x, prediction at (x, t))``.
SolverRun = Generator[tuple[Optional[Tensor], Optional[float]], tuple[Tensor, Prediction], None]
#: ``(alpha, sigma, alpha_next, sigma_next)`` of one step, as the updates take them.
Ends = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------
# Solvers


def _zero_noise(like: Tensor) -> Tensor:
    return torch.zeros_like(like)


class Solver:
    """Base class. ``steps(grid, noise)`` is the state machine; ``plan(grid)`` its evaluation times.

    Attributes every solver sets: ``name`` (registry key), ``stochastic`` (uses ``noise``).
    """

    name = "solver"
    stochastic = False

    def steps(self, grid: Grid, noise: NoiseFn) -> SolverRun:  # pragma: no cover - interface
        raise NotImplementedError

    def plan(self, grid: Grid) -> list[float]:
        """The times at which the model will be called, in order (``len`` = NFE): the generator run
        on dummy tensors, so the plan can never disagree with the solver."""
        times: list[float] = []
        run = self.steps(grid, _zero_noise)
        dummy = torch.zeros(1, dtype=torch.float64)
        _, t = next(run)
        while t is not None:
            times.append(t)
            _, t = run.send((dummy, Prediction(dummy, dummy)))
        return times

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _scalars(grid: Grid):
    """Plain-float views of a grid (coefficients are computed in float64 Python floats)."""
    return grid.t.tolist(), grid.alpha.tolist(), grid.sigma.tolist(), grid.log_snr.tolist()


class DDIM(Solver):
    """DDIM (Song et al. 2021). ``eta = 0``: deterministic, first order; ``eta = 1``: DDPM's posterior."""

    name = "ddim"

    def __init__(self, eta: float = 0.0):
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def steps(self, grid, noise):
        t, alpha, sigma, lam = _scalars(grid)
        x_next = None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            s_eta = ddim_sigma_eta(self.eta, sigma[i + 1], lam[i + 1] - lam[i])
            # alpha' x0 + w eps in two kernels, whichever of the pair the network predicted
            x_next = pred.combine(alpha[i + 1], ddim_eps_weight(sigma[i + 1], s_eta))
            if s_eta > 0:
                x_next = x_next + s_eta * noise(x)
        yield x_next, None


class DDPM(Solver):
    """Ancestral sampling from DDPM's posterior (Ho et al. 2020, Algorithm 2) on any grid.

    ``variance="small"``: the posterior variance (equals DDIM with eta = 1); ``"large"``: the
    forward transition's variance (beta_t). No noise is added on the step to the endpoint.
    """

    name = "ddpm"
    stochastic = True

    def __init__(self, variance: str = "small"):
        if variance not in ("small", "large"):
            raise ValueError(f"unknown DDPM variance {variance!r}; expected 'small' or 'large'")
        self.variance = variance

    def steps(self, grid, noise):
        t, alpha, sigma, _ = _scalars(grid)
        x_next = None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            mean, var = ddpm_posterior(x, pred.x0, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
            if self.variance == "large":
                var = sigma[i] ** 2 - (alpha[i] / alpha[i + 1]) ** 2 * sigma[i + 1] ** 2
            last = i == grid.n_steps - 1
            x_next = mean if last or var <= 0 else mean + math.sqrt(var) * noise(x)
        yield x_next, None


#: How a multistep solver picks each step's order: diffusers' rule, or the MRS code's.
ORDER_RULES = ("diffusers", "mrs")


def _multistep_order(i: int, n: int, order: int, lower_order_final: bool, to_data: bool,
                     rule: str = "diffusers") -> int:
    """Order of step ``i`` of ``n`` as diffusers' DPMSolverMultistepScheduler chooses it: warm up
    from first order; the step to clean data is first order; with ``lower_order_final`` and fewer
    than 15 steps the last step is first order and the one before at most second.

    ``rule="mrs"`` (MRS's ``MRSampler.sampling``): warm up likewise; with fewer than 10 steps the steps
    after the warm-up but the last take ``min(order, n - 1 - i)``; the last step takes the full order
    (5 steps at order 2: 1, 2, 2, 1, 2), unless it goes to clean data (``h = inf``: first order).
    """
    if rule == "mrs":
        if i == n - 1:
            return 1 if to_data else min(order, i + 1)
        if i >= order - 1 and n < 10:
            return min(order, n - 1 - i)
        return min(order, i + 1)
    order = min(order, i + 1)
    if i == n - 1 and (to_data or (lower_order_final and n < 15)):
        return 1
    if i == n - 2 and lower_order_final and n < 15:
        return min(order, 2)
    return order


class Multistep(Solver):
    """The exponential-integrator multistep loop shared by the DPM-Solver family.

    Per step it keeps the last three predictions of kind ``prediction`` (``"x0"`` or ``"eps"``) and
    log-SNR steps ``hs`` (newest last), picks the order by ``_multistep_order``, passes zero-length
    steps through, and takes the step with the hook ``update(x, history, hs, ends, order, noise,
    state) -> (x_next, state)``; ``state`` (None at the start) is the method's own carried state,
    e.g. heavy ball's velocity. Subclasses set ``order``, ``lower_order_final`` and ``prediction``.
    """

    prediction = "x0"

    def steps(self, grid, noise):
        t, alpha, sigma, lam = _scalars(grid)
        n, x_next, history, hs, state = grid.n_steps, None, [], [], None
        for i in range(n):
            x, pred = yield x_next, t[i]
            hs = (hs + [lam[i + 1] - lam[i]])[-3:]
            history = (history + [getattr(pred, self.prediction)])[-3:]
            if hs[-1] == 0:  # zero-length final step (diffusers' leading grids can end on t_min)
                x_next = x
                continue
            order = _multistep_order(i, n, self.order, self.lower_order_final, grid.ends_at_data,
                                     getattr(self, "order_rule", "diffusers"))
            ends = (alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
            x_next, state = self.update(x, history, hs, ends, order, noise, state)
        yield x_next, None

    def update(self, x: Tensor, history: list[Tensor], hs: list[float], ends: Ends, order: int, noise: NoiseFn,
               state: Any) -> tuple[Tensor, Any]:  # pragma: no cover - interface
        raise NotImplementedError


def _dpm_options(solver: Multistep, label: str, orders: tuple, order, solver_type, lower_order_final,
                 order_rule: str = "diffusers") -> None:
    """Validate and set the options every DPM-Solver variant takes."""
    if order not in orders:
        allowed = ", ".join(map(str, orders[:-1])) + f" or {orders[-1]}"
        raise ValueError(f"{label} order must be {allowed}, got {order!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
    if order_rule not in ORDER_RULES:
        raise ValueError(f"unknown order_rule {order_rule!r}; expected one of {ORDER_RULES}")
    solver.order, solver.solver_type, solver.lower_order_final = int(order), solver_type, bool(lower_order_final)
    solver.order_rule = order_rule


def _third_order_option(third_order: str) -> str:
    if third_order not in ("taylor", "reference"):
        raise ValueError(f"unknown third_order {third_order!r}; expected 'taylor' or 'reference'")
    return third_order


class DPMSolverPP(Multistep):
    """DPM-Solver++ multistep (Lu et al. 2022b) with data prediction: ``order`` 1, 2 (2M) or 3 (3M).

    ``solver_type``: ``"midpoint"`` (the paper's 2M, diffusers' default) or ``"heun"`` (Taylor).
    ``lower_order_final``: diffusers' rule (see ``_multistep_order``); the step to clean data is
    always first order (the higher-order terms are undefined at ``h = inf``).
    ``third_order``: ``"reference"`` (the default: the reference code's half-weight second difference,
    second order asymptotically; DPM-Solver's, diffusers' ``solver_order=3`` and k-diffusion's 3M) or
    ``"taylor"`` (3M as the Taylor expansion requires, third order). At the 5-20 NFE of few-step
    sampling the reference weight is the more accurate on the exact testbed and on the embedded teacher
    (docs/faithfulness.md), so it is the default; ``"taylor"`` wins from about 50 NFE. See
    ``updates.dpmpp_third_order``.
    """

    name = "dpmpp"

    def __init__(self, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True,
                 third_order: str = "reference", order_rule: str = "diffusers"):
        _dpm_options(self, "DPM-Solver++", (1, 2, 3), order, solver_type, lower_order_final, order_rule)
        self.third_order = _third_order_option(third_order)

    def update(self, x, m, hs, ends, order, noise, state):
        if order == 1:
            return dpmpp_first_order(x, m[-1], *ends, hs[-1]), state
        if order == 2:
            return dpmpp_second_order(x, m[-1], m[-2], *ends, hs[-1], hs[-2], self.solver_type), state
        d2_weight = 2.0 if self.third_order == "taylor" else 1.0
        return dpmpp_third_order(x, m[-1], m[-2], m[-3], *ends, hs[-1], hs[-2], hs[-3], d2_weight), state


class SDEDPMSolverPP(Multistep):
    """SDE-DPM-Solver++ (Lu et al. 2022b, sec. 5; diffusers' ``sde-dpmsolver++``), order 1 or 2."""

    name = "sde_dpmpp"
    stochastic = True

    def __init__(self, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True,
                 order_rule: str = "diffusers"):
        _dpm_options(self, "SDE-DPM-Solver++", (1, 2), order, solver_type, lower_order_final, order_rule)

    def update(self, x, m, hs, ends, order, noise, state):
        if order == 1:
            return sde_dpmpp_first_order(x, m[-1], *ends, hs[-1], noise(x)), state
        return sde_dpmpp_second_order(x, m[-1], m[-2], *ends, hs[-1], hs[-2], noise(x), self.solver_type), state


class DPMSolver(Multistep):
    """DPM-Solver multistep with noise prediction (Lu et al. 2022a; MRS with ``parameterization="noise"``),
    order 1, 2 or 3 (``third_order`` as ``DPMSolverPP``'s, default ``"reference"``: MRS's ODE-3 noise update).
    Orders as ``DPMSolverPP`` (``_multistep_order``): the step to clean data is first order."""

    name = "dpmsolver"
    label = "DPM-Solver (noise prediction)"
    prediction = "eps"
    orders = (1, 2, 3)

    def __init__(self, order: int = 2, solver_type: str = "heun", lower_order_final: bool = False,
                 order_rule: str = "diffusers", third_order: str = "reference"):
        _dpm_options(self, self.label, self.orders, order, solver_type, lower_order_final, order_rule)
        self.third_order = _third_order_option(third_order)

    def update(self, x, e, hs, ends, order, noise, state):
        if order == 1:
            return dpmsolver_first_order(x, e[-1], *ends, hs[-1]), state
        if order == 2:
            return dpmsolver_second_order(x, e[-1], e[-2], *ends, hs[-1], hs[-2], self.solver_type), state
        d2_weight = 2.0 if self.third_order == "taylor" else 1.0
        return dpmsolver_third_order(x, e[-1], e[-2], e[-3], *ends, hs[-1], hs[-2], hs[-3], d2_weight), state


class SDEDPMSolver(DPMSolver):
    """SDE-DPM-Solver with noise prediction (Lu et al. 2022b, sec. 5), order 1 or 2. The step to clean
    data (where the noise term has no finite limit) is the deterministic first-order step ``x' = a' x0``."""

    name = "sde_dpmsolver"
    label = "SDE-DPM-Solver (noise prediction)"
    stochastic = True
    orders = (1, 2)

    def __init__(self, order: int = 2, solver_type: str = "heun", lower_order_final: bool = False,
                 order_rule: str = "diffusers"):
        _dpm_options(self, self.label, self.orders, order, solver_type, lower_order_final, order_rule)

    def update(self, x, e, hs, ends, order, noise, state):
        if ends[3] == 0:
            return dpmsolver_first_order(x, e[-1], *ends, hs[-1]), state
        if order == 1:
            return sde_dpmsolver_first_order(x, e[-1], *ends, hs[-1], noise(x)), state
        return sde_dpmsolver_second_order(x, e[-1], e[-2], *ends, hs[-1], hs[-2], noise(x), self.solver_type), state


class PNDM(Solver):
    """Pseudo linear multistep (Liu et al. 2022): fixed-step Adams-Bashforth on ``eps`` with PNDM's
    transfer (``sigma_bar_transfer``), after a warm-up of ``order - 1`` steps:

    - ``warmup="prk"``: pseudo Runge-Kutta, 4 model calls per step (PNDM / F-PNDM);
      NFE = steps + 3 (order - 1);
    - ``warmup="heun"``: the first step is taken twice (Euler, then improved Euler with the average
      of both slopes), then AB2, AB3, ... (diffusers' PNDM with ``skip_prk_steps``; the "PLMS" of
      latent diffusion); NFE = steps + 1;
    - ``warmup="lower_order"``: AB1, AB2, ... on the first steps, NFE = steps (the momentum paper's PLMS).

    The slopes are fixed-step AB coefficients even on non-uniform grids, as PNDM and the momentum
    paper use them; this is order ``order`` only on grids uniform in ``sigma_bar``.
    """

    name = "pndm"
    WARMUPS = ("prk", "heun", "lower_order")

    def __init__(self, order: int = 4, warmup: str = "prk"):
        if order not in AB_COEFFICIENTS:
            raise ValueError(f"PNDM/PLMS order must be in 1..5, got {order!r}")
        if warmup not in self.WARMUPS:
            raise ValueError(f"unknown warmup {warmup!r}; expected one of {self.WARMUPS}")
        self.order, self.warmup = int(order), warmup

    def steps(self, grid, noise, target: Callable[[int, Tensor], Optional[Tensor]] | None = None):
        """``target(i, x_i)``, where given, may move step ``i``'s end to per-sample times ``[B]`` (None:
        the grid's ``t[i+1]``); the next step then treats the result as being at ``t[i+1]``. This is
        the official Time-Shift loop (TS-DPM's ``PNMSolver``): a Runge-Kutta warm-up step places its
        stages between ``t[i]`` and the moved end, every other step transfers to the moved end."""
        t, alpha, sigma, _ = _scalars(grid)
        n, x_next, history = grid.n_steps, None, []
        for i in range(n):
            a, s, a1, s1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            x, pred = yield x_next, t[i]
            t1 = t[i + 1]
            moved = None if target is None else target(i, x)
            if moved is not None:
                t1, a1, s1 = moved, *_per_sample_ends(grid, moved, x)
            if self.warmup == "prk" and i < self.order - 1 and sigma[i + 1] > 0:
                x_next = yield from self._prk_step(x, pred, grid, t[i], t1, (a, s, a1, s1))
                history.append(pred.eps)
                continue
            history = (history + [pred.eps])[-self.order:]
            if self.warmup == "heun" and i == 0 and n > 1:
                # Euler to the next point, evaluate there, redo the step with the mean slope.
                x_euler = sigma_bar_transfer(x, pred.eps, a, s, a1, s1)
                _, pred_euler = yield x_euler, t1
                x_next = sigma_bar_transfer(x, 0.5 * (pred.eps + pred_euler.eps), a, s, a1, s1)
                continue
            x_next = sigma_bar_transfer(x, adams_bashforth(history), a, s, a1, s1)
        yield x_next, None

    def _prk_step(self, x, pred, grid: Grid, t0: float, t1, ends):
        """PNDM's pseudo 4th-order Runge-Kutta step (Liu et al. 2022, eq. 13) from ``t0`` to ``t1``
        (a float, or per-sample times), its stages at the midpoint in ``t``."""
        a, s, a1, s1 = ends
        tm = 0.5 * (t0 + t1)
        am, sm = self._schedule_at(grid, tm, x)
        e1 = pred.eps
        _, p2 = yield sigma_bar_transfer(x, e1, a, s, am, sm), tm
        _, p3 = yield sigma_bar_transfer(x, p2.eps, a, s, am, sm), tm
        _, p4 = yield sigma_bar_transfer(x, p3.eps, a, s, a1, s1), t1
        slope = (e1 + 2 * p2.eps + 2 * p3.eps + p4.eps) / 6
        return sigma_bar_transfer(x, slope, a, s, a1, s1)

    @staticmethod
    def _schedule_at(grid: Grid, t, x: Tensor):
        sched = getattr(grid, "schedule", None)
        if sched is None:
            raise ValueError("PNDM's Runge-Kutta warm-up needs a grid built from a schedule")
        if torch.is_tensor(t):
            return _per_sample_ends(grid, t, x)
        tt = torch.tensor(t, dtype=torch.float64)
        return sched.alpha(tt).item(), sched.sigma(tt).item()


def _per_sample_ends(grid: Grid, t: Tensor, x: Tensor):
    """``(alpha, sigma)`` at per-sample times ``t``, shaped to multiply ``x``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return broadcast_like(grid.schedule.alpha(t), x), broadcast_like(grid.schedule.sigma(t), x)


class Euler(Solver):
    """Euler on the PF ODE in ``sigma_bar`` (Karras et al. 2022, Algorithm 1 without the correction).

    Identical to DDIM (eta = 0) on the same grid; kept as its own name for EDM-style users.
    """

    name = "euler"
    corrector = False

    def steps(self, grid, noise):
        t, alpha, sigma, _ = _scalars(grid)
        x_next = None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            ends = (alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
            # the Euler step with slope eps lands on alpha' x0 + sigma' eps (x = alpha x0 + sigma eps)
            x_next = pred.combine(alpha[i + 1], sigma[i + 1])
            if self.corrector and ends[3] > 0:  # Heun: evaluate at the Euler point, redo with the mean slope
                _, pred2 = yield x_next, t[i + 1]
                x_next = sigma_bar_transfer(x, 0.5 * (pred.eps + pred2.eps), *ends)
        yield x_next, None


class Heun(Euler):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1): Euler predictor, trapezoidal
    corrector; the step to clean data is Euler. NFE = 2 steps - 1 to data, 2 steps otherwise."""

    name = "heun"
    corrector = True
