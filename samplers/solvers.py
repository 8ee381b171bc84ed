"""Solver math: small pure update functions, and solvers as explicit step-by-step state machines.

Update functions take the current sample ``x``, predictions and float64 noise-level scalars
(``alpha``, ``sigma``, log-SNR ``lam``; primes are the next grid point) and return the next sample.

A solver is a generator over a ``Grid`` (see ``Solver.steps``): it yields the time at which it needs
the model next, receives ``(x, Prediction)`` evaluated there, and yields the next sample to evaluate
at, until it yields time ``None`` with the final sample. Its whole multistep state (history,
stage) is local variables of that generator, as in k-diffusion's sampling loops. The same generator
drives the native loop (``samplers.sampler.Sampler``) and the diffusers adapter's ``step``.
"""

from __future__ import annotations

import math
from typing import Callable, Generator, Optional

import torch
from torch import Tensor

from .denoisers import Prediction
from .timesteps import Grid

__all__ = [
    "Solver",
    "DDIM",
    "DDPM",
    "DPMSolverPP",
    "SDEDPMSolverPP",
    "PNDM",
    "Euler",
    "Heun",
    "NoiseFn",
    "ddim_step",
    "ddpm_posterior",
    "sigma_bar_transfer",
    "dpmpp_first_order",
    "dpmpp_second_order",
    "dpmpp_third_order",
    "sde_dpmpp_first_order",
    "sde_dpmpp_second_order",
    "adams_bashforth",
    "AB_COEFFICIENTS",
]

#: ``noise(like) -> standard normal tensor shaped like ``like``; injectable so SDE runs reproduce.
NoiseFn = Callable[[Tensor], Tensor]
#: A solver run: yields ``(x_to_evaluate, t)`` and is sent ``(x, prediction at (x, t))``.
SolverRun = Generator[tuple[Optional[Tensor], Optional[float]], tuple[Tensor, Prediction], None]


# ---------------------------------------------------------------------------------------------
# Update functions (pure)


def ddim_step(x0: Tensor, eps: Tensor, alpha_next: float, sigma_next: float, sigma_eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): ``x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z``."""
    x = alpha_next * x0 + math.sqrt(max(sigma_next**2 - sigma_eta**2, 0.0)) * eps
    return x if sigma_eta == 0.0 else x + sigma_eta * noise


def ddim_sigma_eta(eta: float, sigma_next: float, h: float) -> float:
    """DDIM's stochasticity ``sigma_eta`` (eq. 16) in log-SNR form: ``eta sigma' sqrt(1 - e^{-2h})``.

    Equals ``eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')`` for VP schedules with ``a = alpha^2``.
    """
    return eta * sigma_next * math.sqrt(-math.expm1(-2.0 * h)) if eta else 0.0


def ddpm_posterior(x: Tensor, x0: Tensor, alpha: float, sigma: float, alpha_next: float,
                   sigma_next: float) -> tuple[Tensor, float]:
    """Mean and variance of ``q(x_s | x_t, x0)`` for a Gaussian path (Ho et al. 2020, eq. 7;
    Kingma et al. 2021, eq. 29), with ``t`` the current and ``s`` the next, less noisy point."""
    a_ts = alpha / alpha_next
    var_ts = sigma**2 - a_ts**2 * sigma_next**2
    mean = (a_ts * sigma_next**2 / sigma**2) * x + (alpha_next * var_ts / sigma**2) * x0
    return mean, var_ts * sigma_next**2 / sigma**2


def sigma_bar_transfer(x: Tensor, direction: Tensor, alpha: float, sigma: float, alpha_next: float,
                       sigma_next: float) -> Tensor:
    """One Euler step of the PF ODE ``d(x/alpha) / d sigma_bar = eps`` with slope ``direction``.

    ``x' = alpha' (x / alpha + (sigma_bar' - sigma_bar) direction)``; with ``direction = eps`` this
    is DDIM (eta = 0), and it is PNDM's transfer function (Liu et al. 2022, eq. 11).
    """
    return alpha_next * (x / alpha + (sigma_next / alpha_next - sigma / alpha) * direction)


def dpmpp_first_order(x: Tensor, x0: Tensor, sigma: float, alpha_next: float, sigma_next: float,
                      h: float) -> Tensor:
    """DPM-Solver++ 1 (Lu et al. 2022b, eq. 9 with k = 1): ``x' = (s'/s) x - a' (e^{-h} - 1) x0``."""
    return (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * x0


def dpmpp_second_order(x: Tensor, m0: Tensor, m1: Tensor, sigma: float, alpha_next: float,
                       sigma_next: float, h: float, h_prev: float, solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), ``m0``/``m1`` the newest / previous ``x0``.

    ``midpoint``: ``D = m0 + (m0 - m1) / (2 r)``; ``heun``: the Taylor variant of diffusers.
    """
    r = h_prev / h
    d1 = (m0 - m1) / r
    phi = math.expm1(-h)
    x_next = (sigma_next / sigma) * x - alpha_next * phi * m0
    if solver_type == "midpoint":
        return x_next - 0.5 * alpha_next * phi * d1
    return x_next + alpha_next * (phi / h + 1.0) * d1


def dpmpp_third_order(x: Tensor, m0: Tensor, m1: Tensor, m2: Tensor, sigma: float, alpha_next: float,
                      sigma_next: float, h: float, h_prev: float, h_prev2: float,
                      d2_weight: float = 2.0) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b, eq. 8 truncated after the second derivative).

    With ``r0 = h_prev / h``, ``r1 = h_prev2 / h``, the divided differences give ``D1 ~ h x0'`` and
    ``D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2``. The exact integral's second-order term is
    ``alpha' (h^2/2 - h + 1 - e^{-h}) x0''``, i.e. ``2 alpha' (1/2 - (h - 1 + e^{-h}) / h^2) D2``:
    ``d2_weight = 2``. The reference code (DPM-Solver, diffusers, k-diffusion) uses weight 1, which
    leaves an O(h^3) local error: second order, measured in tests/test_solvers.py.
    """
    r0, r1 = h_prev / h, h_prev2 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi = math.expm1(-h)
    return ((sigma_next / sigma) * x - alpha_next * phi * m0 + alpha_next * (phi / h + 1.0) * d1
            - d2_weight * alpha_next * ((phi + h) / h**2 - 0.5) * d2)


def sde_dpmpp_first_order(x: Tensor, x0: Tensor, sigma: float, alpha_next: float, sigma_next: float,
                          h: float, noise: Tensor) -> Tensor:
    """SDE-DPM-Solver++ 1 (Lu et al. 2022b, sec. 5): exact for the linear part of the reverse SDE."""
    decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    return (sigma_next / sigma * math.exp(-h)) * x + alpha_next * decay * x0 + sigma_next * math.sqrt(decay) * noise


def sde_dpmpp_second_order(x: Tensor, m0: Tensor, m1: Tensor, sigma: float, alpha_next: float,
                           sigma_next: float, h: float, h_prev: float, noise: Tensor,
                           solver_type: str = "midpoint") -> Tensor:
    """SDE-DPM-Solver++(2M) with diffusers' ``midpoint`` / ``heun`` second-order term."""
    decay = -math.expm1(-2.0 * h)
    d1 = (m0 - m1) / (h_prev / h)
    x_next = (sigma_next / sigma * math.exp(-h)) * x + alpha_next * decay * m0 + sigma_next * math.sqrt(decay) * noise
    if solver_type == "midpoint":
        return x_next + 0.5 * alpha_next * decay * d1
    return x_next + alpha_next * (decay / (-2.0 * h) + 1.0) * d1


#: Fixed-step Adams-Bashforth coefficients, newest first (PNDM eq. 12; Hairer et al. III.1).
AB_COEFFICIENTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
    5: (1901 / 720, -2774 / 720, 2616 / 720, -1274 / 720, 251 / 720),
}


def adams_bashforth(history: list[Tensor]) -> Tensor:
    """Fixed-step AB combination of ``history`` (oldest first) at order ``len(history)``."""
    coeffs = AB_COEFFICIENTS[len(history)]
    out = coeffs[0] * history[-1]
    for c, e in zip(coeffs[1:], reversed(history[:-1])):
        out = out + c * e
    return out


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
            z = noise(x) if s_eta > 0 else None
            x_next = ddim_step(pred.x0, pred.eps, alpha[i + 1], sigma[i + 1], s_eta, z)
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


def _multistep_order(i: int, n: int, order: int, lower_order_final: bool, to_data: bool) -> int:
    """Order of step ``i`` of ``n`` as diffusers' DPMSolverMultistepScheduler chooses it: warm up
    from first order; the step to clean data is first order; with ``lower_order_final`` and fewer
    than 15 steps the last step is first order and the one before at most second."""
    order = min(order, i + 1)
    if i == n - 1 and (to_data or (lower_order_final and n < 15)):
        return 1
    if i == n - 2 and lower_order_final and n < 15:
        return min(order, 2)
    return order


class DPMSolverPP(Solver):
    """DPM-Solver++ multistep (Lu et al. 2022b) with data prediction: ``order`` 1, 2 (2M) or 3 (3M).

    ``solver_type``: ``"midpoint"`` (the paper's 2M, diffusers' default) or ``"heun"`` (Taylor).
    ``lower_order_final``: diffusers' rule (see ``_multistep_order``); the step to clean data is
    always first order (the higher-order terms are undefined at ``h = inf``).
    ``third_order``: ``"taylor"`` (3M as the Taylor expansion requires, third order) or
    ``"reference"`` (the reference code's half-weight second difference, second order; matches
    diffusers' ``solver_order=3``). See ``dpmpp_third_order``.
    """

    name = "dpmpp"

    def __init__(self, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True,
                 third_order: str = "taylor"):
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
        if third_order not in ("taylor", "reference"):
            raise ValueError(f"unknown third_order {third_order!r}; expected 'taylor' or 'reference'")
        self.order, self.solver_type, self.lower_order_final = int(order), solver_type, bool(lower_order_final)
        self.third_order = third_order

    def steps(self, grid, noise):
        t, alpha, sigma, lam = _scalars(grid)
        n, x_next, m, hs, to_data = grid.n_steps, None, [], [], grid.ends_at_data
        for i in range(n):
            x, pred = yield x_next, t[i]
            h = lam[i + 1] - lam[i]
            m, hs = (m + [pred.x0])[-3:], (hs + [h])[-3:]
            if h == 0:  # zero-length final step (diffusers' leading grids can end on t_min)
                x_next = x
                continue
            order = _multistep_order(i, n, self.order, self.lower_order_final, to_data)
            if order == 1:
                x_next = dpmpp_first_order(x, m[-1], sigma[i], alpha[i + 1], sigma[i + 1], h)
            elif order == 2:
                x_next = dpmpp_second_order(x, m[-1], m[-2], sigma[i], alpha[i + 1], sigma[i + 1], h, hs[-2],
                                            self.solver_type)
            else:
                x_next = dpmpp_third_order(x, m[-1], m[-2], m[-3], sigma[i], alpha[i + 1], sigma[i + 1], h,
                                           hs[-2], hs[-3], 2.0 if self.third_order == "taylor" else 1.0)
        yield x_next, None


class SDEDPMSolverPP(Solver):
    """SDE-DPM-Solver++ (Lu et al. 2022b, sec. 5; diffusers' ``sde-dpmsolver++``), order 1 or 2."""

    name = "sde_dpmpp"
    stochastic = True

    def __init__(self, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True):
        if order not in (1, 2):
            raise ValueError(f"SDE-DPM-Solver++ order must be 1 or 2, got {order!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
        self.order, self.solver_type, self.lower_order_final = int(order), solver_type, bool(lower_order_final)

    def steps(self, grid, noise):
        t, alpha, sigma, lam = _scalars(grid)
        n, x_next, m, h_prev, to_data = grid.n_steps, None, [], None, grid.ends_at_data
        for i in range(n):
            x, pred = yield x_next, t[i]
            h = lam[i + 1] - lam[i]
            m = (m + [pred.x0])[-2:]
            order = _multistep_order(i, n, self.order, self.lower_order_final, to_data)
            if h == 0:
                x_next = x
            elif order == 1:
                x_next = sde_dpmpp_first_order(x, m[-1], sigma[i], alpha[i + 1], sigma[i + 1], h, noise(x))
            else:
                x_next = sde_dpmpp_second_order(x, m[-1], m[-2], sigma[i], alpha[i + 1], sigma[i + 1], h, h_prev,
                                                noise(x), self.solver_type)
            h_prev = h
        yield x_next, None


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

    def steps(self, grid, noise):
        t, alpha, sigma, _ = _scalars(grid)
        n, x_next, history = grid.n_steps, None, []
        for i in range(n):
            a, s, a1, s1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            x, pred = yield x_next, t[i]
            if self.warmup == "prk" and i < self.order - 1 and s1 > 0:
                x_next = yield from self._prk_step(x, pred, grid, i)
                history.append(pred.eps)
                continue
            history = (history + [pred.eps])[-self.order:]
            if self.warmup == "heun" and i == 0 and n > 1:
                # Euler to the next point, evaluate there, redo the step with the mean slope.
                x_euler = sigma_bar_transfer(x, pred.eps, a, s, a1, s1)
                _, pred_euler = yield x_euler, t[1]
                x_next = sigma_bar_transfer(x, 0.5 * (pred.eps + pred_euler.eps), a, s, a1, s1)
                continue
            x_next = sigma_bar_transfer(x, adams_bashforth(history), a, s, a1, s1)
        yield x_next, None

    def _prk_step(self, x, pred, grid: Grid, i: int):
        """PNDM's pseudo 4th-order Runge-Kutta step (Liu et al. 2022, eq. 13), midpoint in ``t``."""
        t0, t1 = grid.t[i].item(), grid.t[i + 1].item()
        a, s, a1, s1 = (grid.alpha[i].item(), grid.sigma[i].item(), grid.alpha[i + 1].item(),
                        grid.sigma[i + 1].item())
        tm = 0.5 * (t0 + t1)
        am, sm = self._schedule_at(grid, tm)
        e1 = pred.eps
        _, p2 = yield sigma_bar_transfer(x, e1, a, s, am, sm), tm
        _, p3 = yield sigma_bar_transfer(x, p2.eps, a, s, am, sm), tm
        _, p4 = yield sigma_bar_transfer(x, p3.eps, a, s, a1, s1), t1
        slope = (e1 + 2 * p2.eps + 2 * p3.eps + p4.eps) / 6
        return sigma_bar_transfer(x, slope, a, s, a1, s1)

    @staticmethod
    def _schedule_at(grid: Grid, t: float):
        sched = getattr(grid, "schedule", None)
        if sched is None:
            raise ValueError("PNDM's Runge-Kutta warm-up needs a grid built from a schedule")
        tt = torch.tensor(t, dtype=torch.float64)
        return sched.alpha(tt).item(), sched.sigma(tt).item()


class Euler(Solver):
    """Euler on the PF ODE in ``sigma_bar`` (Karras et al. 2022, Algorithm 1 without the correction).

    Identical to DDIM (eta = 0) on the same grid; kept as its own name for EDM-style users.
    """

    name = "euler"

    def steps(self, grid, noise):
        t, alpha, sigma, _ = _scalars(grid)
        x_next = None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            x_next = sigma_bar_transfer(x, pred.eps, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
        yield x_next, None


class Heun(Solver):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1): Euler predictor, trapezoidal
    corrector; the step to clean data is Euler. NFE = 2 steps - 1 to data, 2 steps otherwise."""

    name = "heun"

    def steps(self, grid, noise):
        t, alpha, sigma, _ = _scalars(grid)
        x_next = None
        for i in range(grid.n_steps):
            x, pred = yield x_next, t[i]
            a, s, a1, s1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            x_next = sigma_bar_transfer(x, pred.eps, a, s, a1, s1)
            if s1 > 0:
                _, pred2 = yield x_next, t[i + 1]
                x_next = sigma_bar_transfer(x, 0.5 * (pred.eps + pred2.eps), a, s, a1, s1)
        yield x_next, None
