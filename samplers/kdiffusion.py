"""k-diffusion's sampler interface for every fewstep sampler: ``sample_<name>(model, x, sigmas, ...)``.

    from fewstep.samplers import kdiffusion as K
    x0 = K.sample_ghvb(model, x, sigmas, extra_args={"cond": c}, momentum=3.8)

``model(x, sigma, **extra_args) -> denoised`` is a k-diffusion denoiser over VE samples
``x = data + sigma * noise`` (k-diffusion's wrappers turn eps / v networks into one); ``sigmas`` is a
strictly decreasing grid such as ``k_diffusion.sampling.get_sigmas_karras(n, 0.002, 80)`` (its last
entry 0 ends at clean data, a positive one stops there). The grid becomes a ``Grid`` of an
``EDMSchedule`` (``alpha = 1``, ``sigma = t``, so time *is* sigma) and the sampler runs on it
unchanged; our VP samplers (DDIM, PNDM, the momentum methods) are written in ``x / alpha`` against
``sigma / alpha``, i.e. in exactly these variables.

Where the methods coincide the functions equal k-diffusion's on grids ending at 0: ``sample_euler``,
``sample_heun``, ``sample_dpmpp_2m``, ``sample_lms``, ``sample_euler_ancestral`` (DDIM with
``eta``; ``eta = 1`` is DDPM's posterior) and ``sample_dpmpp_2m_sde`` (``eta = 1``), noise drawn
from the same ``noise_sampler(sigma, sigma_next)`` (default ``torch.randn_like``, the global RNG, as
k-diffusion). k-diffusion's no-op options are accepted (``s_churn = 0``, ``s_tmin``, ``s_tmax``;
``s_noise`` scales every noise draw); churn itself is not implemented and is refused.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .denoisers import Denoiser, Prediction, broadcast_like
from .registry import ALIASES, SAMPLERS, make_solver, resolve_name
from .schedules import EDMSchedule
from .solvers import Solver
from .timeshift import TimeShift, TimeShiftDenoiser
from .timesteps import Grid

__all__ = ["KDiffusionDenoiser", "sigmas_grid", "step_starts", "sample", "sample_time_shift", "KDIFFUSION_SAMPLERS"]

#: k-diffusion's own keyword options that change nothing at these values (churn off).
_NO_CHURN = {"s_churn": 0.0}
_CHURN_RANGE = ("s_tmin", "s_tmax")


class KDiffusionDenoiser(Denoiser):
    """A k-diffusion denoiser ``model(x, sigma, **extra_args) -> denoised`` as a fewstep ``Denoiser``
    on a VE ``schedule`` (``EDMSchedule``: time is sigma). ``sigma`` reaches the model as a ``[B]``
    tensor in ``x``'s dtype, as k-diffusion's ``sigmas[i] * s_in``."""

    def __init__(self, model: Callable[..., Tensor], schedule: EDMSchedule, extra_args: dict | None = None):
        super().__init__()
        self.model, self.schedule, self.extra_args = model, schedule, dict(extra_args or {})

    def forward(self, x: Tensor, t) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64)
        sigma = t.expand(x.shape[0]) if t.ndim == 0 else t
        denoised = self.model(x, sigma.to(device=x.device, dtype=x.dtype), **self.extra_args)
        return Prediction(x0=denoised, x=x, alpha=1.0, sigma=broadcast_like(t, x))


def _check_sigmas(sigmas) -> Tensor:
    try:
        s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError):
        s = None
    if s is None or s.ndim != 1 or len(s) < 2:
        raise ValueError("sigmas must be a 1-D sequence of at least 2 noise levels (the last may be 0)")
    if not torch.isfinite(s).all():
        raise ValueError(f"sigmas must be finite, got {s.tolist()}")
    if not torch.all(s[1:] < s[:-1]) or s[-1] < 0:
        raise ValueError(f"sigmas must be strictly decreasing and >= 0 (k-diffusion's convention), got {s.tolist()}")
    return s


def sigmas_grid(sigmas) -> Grid:
    """k-diffusion's ``sigmas`` as a ``Grid`` of an ``EDMSchedule`` spanning them: evaluation at every
    sigma but the last; a last sigma of 0 is clean data (``final="zero"``), a positive one the endpoint."""
    s = _check_sigmas(sigmas)
    positive = s[s > 0]
    lo, hi = positive.min().item(), s[0].item()
    schedule = EDMSchedule(sigma_min=lo if lo < hi else hi / 2, sigma_max=hi)  # one sigma: any range below it
    if s[-1] == 0:
        return Grid.from_times(schedule, s[:-1], final="zero")
    return Grid.from_times(schedule, s[:-1], final="t_min", t_end=s[-1].item())


def step_starts(plan: list[float], grid: Grid) -> dict[int, int]:
    """Model call -> grid step it starts: the last call at ``t_i`` before the first call below it
    (Heun's corrector and PLMS's warm-up call the model at ``t_{i+1}`` before the step from there)."""
    starts = {}
    for i in range(grid.n_steps):
        t_i = float(grid.t[i])
        below = next((k for k, tk in enumerate(plan) if tk < t_i), len(plan))
        at = [k for k in range(below) if plan[k] == t_i]
        if at:
            starts[at[-1]] = i
    return starts


def _split_options(name: str, options: dict) -> tuple[dict, dict]:
    """Solver options, and k-diffusion's noise options (``s_noise``, ``noise_sampler``) apart; refuse churn."""
    options = dict(options)
    if options.pop("s_churn", 0.0) != 0:
        raise ValueError(f"s_churn (Karras et al.'s churn) is not implemented by fewstep's {name!r}; pass s_churn=0")
    for key in _CHURN_RANGE:
        options.pop(key, None)  # with churn off, k-diffusion ignores them too
    noise = {k: options.pop(k) for k in ("s_noise", "noise_sampler") if k in options}
    return options, noise


def _kdiffusion_solver(name: str, options: dict) -> Solver:
    """The solver of a k-diffusion spelling: ``euler_ancestral`` takes k-diffusion's ``eta`` (DDIM with
    that eta: the same sigma_up / sigma_down step), ``dpmpp_2m_sde`` / ``sde_dpmpp_2m`` only ``eta = 1``."""
    if name == "euler_ancestral":
        eta = options.pop("eta", 1.0)
        return make_solver("ddpm", **options) if eta == 1 else make_solver("ddim", eta=eta, **options)
    if resolve_name(name) in ("sde_dpmpp_2m", "sde_dpmsolver_2m") and "eta" in options:
        if options.pop("eta") != 1:
            raise ValueError(f"{name} runs with eta = 1 only (the SDE); use sample_dpmpp_2m for eta = 0")
    return make_solver(name, **options)


def _noise_fn(noise: dict, sigmas: Tensor, current: list[int]) -> Callable[[Tensor], Tensor]:
    """Our ``noise(like)`` from k-diffusion's ``noise_sampler(sigma, sigma_next)`` at the current step."""
    sampler, scale = noise.get("noise_sampler"), float(noise.get("s_noise", 1.0))

    def draw(like: Tensor) -> Tensor:
        i = current[0]
        if sigmas[i + 1] == 0:  # the step to clean data adds no noise; k-diffusion draws none there
            return torch.zeros_like(like)
        z = sampler(sigmas[i], sigmas[i + 1]) if sampler is not None else torch.randn_like(like)
        return z * scale if scale != 1.0 else z

    return draw


def _run(solver: Solver, denoiser: Denoiser, grid: Grid, x: Tensor, sigmas, callback, disable,
         noise: dict) -> Tensor:
    """The k-diffusion loop over our solver: one callback per grid step, at the call that starts it."""
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.ndim < 1:
        raise ValueError("x must be a batched floating-point tensor (noise scaled by sigmas[0])")
    plan = solver.plan(grid)
    starts = step_starts(plan, grid)
    current = [0]
    run = solver.steps(grid, _noise_fn(noise, torch.as_tensor(sigmas), current))
    dtype = x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    from tqdm.auto import tqdm

    with tqdm(total=grid.n_steps, disable=disable) as bar:
        _, t = next(run)
        k = 0
        while t is not None:
            pred = denoiser(x, t)
            if k in starts:
                current[0] = i = starts[k]
                if callback is not None:
                    s = torch.as_tensor(sigmas)[i]
                    callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": pred.x0})
                bar.update(1)
            x, t = run.send((x, pred))
            k += 1
    return x.to(dtype)


def sample(name: str, model: Callable[..., Tensor], x: Tensor, sigmas, extra_args: dict | None = None,
           callback: Callable[[dict], Any] | None = None, disable: bool | None = None, **options) -> Tensor:
    """Run sampler ``name`` (a registry name or alias) k-diffusion style; see the module docstring."""
    options, noise = _split_options(name, options)
    solver = _kdiffusion_solver(name, options)
    if "noise_sampler" in noise and not solver.stochastic:
        raise ValueError(f"noise_sampler given to the deterministic sampler {name!r}")
    grid = sigmas_grid(sigmas)
    return _run(solver, KDiffusionDenoiser(model, grid.schedule, extra_args), grid, x, sigmas, callback, disable, noise)


def sample_time_shift(model: Callable[..., Tensor], x: Tensor, sigmas, extra_args: dict | None = None,
                      callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
                      window: float, cutoff: float, solver: str = "ddim", mode: str = "target",
                      data_variance: float = 0.0, **solver_options) -> Tensor:
    """Time-Shift sampling (``samplers.timeshift``) around ``solver``; ``window`` and ``cutoff`` are in
    sigma units here (time is sigma). ``mode="target"``: ``TimeShift`` (deterministic solvers);
    ``"model"``: ``TimeShiftDenoiser`` (the network queried at the variance-matched sigma)."""
    solver_options, noise = _split_options("time_shift", solver_options)
    grid = sigmas_grid(sigmas)
    denoiser: Denoiser = KDiffusionDenoiser(model, grid.schedule, extra_args)
    if mode == "target":
        run_solver = TimeShift(solver, window=window, cutoff=cutoff, data_variance=data_variance, **solver_options)
    elif mode == "model":
        run_solver = make_solver(solver, **solver_options)
        denoiser = TimeShiftDenoiser(denoiser, window=window, cutoff=cutoff, data_variance=data_variance)
    else:
        raise ValueError(f"unknown time-shift mode {mode!r}; expected 'target' or 'model'")
    return _run(run_solver, denoiser, grid, x, sigmas, callback, disable, noise)


def _sample_fn(name: str) -> Callable[..., Tensor]:
    def sample_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return sample(name, model, x, sigmas, extra_args, callback, disable, **options)

    target = resolve_name(name)
    sample_fn.__name__ = sample_fn.__qualname__ = f"sample_{name}"
    sample_fn.__doc__ = (f"{SAMPLERS[target].summary}, k-diffusion style (``samplers.kdiffusion``)"
                         + (f"; k-diffusion's name for ``{target}``." if name != target else "."))
    return sample_fn


#: ``name -> sample_<name>`` for every registry name and alias, and ``time_shift``.
KDIFFUSION_SAMPLERS: dict[str, Callable[..., Tensor]] = {name: _sample_fn(name) for name in [*SAMPLERS, *ALIASES]}
KDIFFUSION_SAMPLERS["time_shift"] = sample_time_shift
globals().update({fn.__name__: fn for fn in KDIFFUSION_SAMPLERS.values()})
__all__ += [fn.__name__ for fn in KDIFFUSION_SAMPLERS.values() if fn is not sample_time_shift]
