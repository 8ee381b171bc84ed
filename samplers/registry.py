"""Every sampler by name, in one table: ``SAMPLERS`` (name -> ``SamplerSpec``), ``ALIASES`` (k-diffusion's
spellings of the same methods) and ``make_solver``. No other module edits these tables.

    make_solver("dpmpp_2m")                  # DPMSolverPP(order=2, solver_type='midpoint', ...)
    make_solver("dpmpp_2m_sde", solver_type="heun")   # k-diffusion's name for sde_dpmpp_2m
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .lms import LMS
from .momentum import GHVB, HeavyBall
from .solvers import DDIM, DDPM, PNDM, DPMSolver, DPMSolverPP, Euler, Heun, SDEDPMSolver, SDEDPMSolverPP, Solver
from .unipc import UniPC

__all__ = ["SamplerSpec", "SAMPLERS", "MR_SAMPLER_SPECS", "ALIASES", "resolve_name", "make_solver"]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its solver factory, options fixed by the name, a one-line description,
    overridable defaults, and the other names it goes by (``ALIASES``)."""

    factory: Callable[..., Solver]
    fixed: dict
    summary: str
    defaults: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def make(self, **options) -> Solver:
        clash = set(options) & set(self.fixed)
        if clash:
            raise ValueError(f"options {sorted(clash)} are fixed by this sampler's name")
        return self.factory(**{**self.defaults, **options}, **self.fixed)


def _spec(factory, fixed: dict, summary: str, defaults: dict | None = None, aliases: tuple[str, ...] = ()):
    # The aliases close the summary, so every listing of the table (``fewstep samplers``) shows them.
    text = f"{summary}; aliases: {', '.join(aliases)}" if aliases else summary
    return SamplerSpec(factory, fixed, text, defaults or {}, aliases)


# Aliases are k-diffusion's sampler names (``k_diffusion.sampling.sample_<name>``, defaults s_churn = 0,
# eta = 1, s_noise = 1) where its method is ours exactly: same update, same orders on grids that end at
# clean data. ``euler``, ``heun`` and ``dpmpp_2m`` are spelled alike in both. ``euler_ancestral``'s
# sigma_up / sigma_down step is the DDPM posterior sample (``ddpm``, variance "small"); ``lms`` is ours
# and k-diffusion's name alike. Not aliased: ``dpm_2`` / ``dpmpp_2s_ancestral`` / ``dpmpp_sde``
# (single-step), ``dpmpp_3m_sde`` (we have no SDE 3M).

_CORE = {
    "ddim": _spec(DDIM, {}, "DDIM (Song et al. 2021); eta=0 deterministic, eta>0 stochastic"),
    "ddpm": _spec(DDPM, {}, "DDPM ancestral sampling (Ho et al. 2020); variance='small'|'large'",
                  aliases=("euler_ancestral",)),
    "dpmpp_2m": _spec(DPMSolverPP, {"order": 2}, "DPM-Solver++(2M) (Lu et al. 2022b), second order"),
    "dpmpp_3m": _spec(DPMSolverPP, {"order": 3}, "DPM-Solver++(3M); third_order='reference' (diffusers', default) or 'taylor' (third order)"),
    "sde_dpmpp_2m": _spec(SDEDPMSolverPP, {"order": 2}, "SDE-DPM-Solver++(2M), stochastic",
                          aliases=("dpmpp_2m_sde",)),
    "dpmsolver_2m": _spec(DPMSolver, {"order": 2}, "DPM-Solver-2M, noise prediction (Lu et al. 2022a)",
                          {"solver_type": "midpoint", "lower_order_final": True}),
    "dpmsolver_3m": _spec(DPMSolver, {"order": 3}, "DPM-Solver-3M, noise prediction; third_order='reference' (default) or 'taylor'",
                          {"solver_type": "midpoint", "lower_order_final": True}),
    "sde_dpmsolver_2m": _spec(SDEDPMSolver, {"order": 2}, "SDE-DPM-Solver-2M, noise prediction, stochastic",
                              {"solver_type": "midpoint", "lower_order_final": True}),
    "pndm": _spec(PNDM, {}, "PNDM / F-PNDM (Liu et al. 2022): RK warm-up, then AB4", {"warmup": "prk"}),
    "plms": _spec(PNDM, {}, "PLMS: improved-Euler warm-up, then AB2..AB4 (diffusers skip_prk_steps)",
                  {"warmup": "heun"}),
    "euler": _spec(Euler, {}, "Euler on the PF ODE in sigma_bar (Karras et al. 2022)"),
    "heun": _spec(Heun, {}, "Heun's 2nd-order method (Karras et al. 2022, Algorithm 1)"),
    "unipc": _spec(UniPC, {"variant": "bh2"}, "UniPC multistep (Zhao et al. 2023), B(h) = e^h - 1, UniC on; order 1-3"),
    "unipc_bh1": _spec(UniPC, {"variant": "bh1"}, "UniPC multistep with B(h) = h (bh1), UniC on; order 1-3"),
    "lms": _spec(LMS, {}, "k-diffusion's linear multistep (sample_lms): variable-step AB in sigma_bar, order 4"),
}

_MOMENTUM = {
    "hb": _spec(HeavyBall, {}, "Heavy-ball momentum on PLMS_r or DPM-Solver++(2M) (Wizadwongsa et al. 2024)"),
    "ghvb": _spec(GHVB, {}, "Generalized heavy ball GHVB_r(beta), order r (Wizadwongsa et al. 2024)"),
}

#: The MRS solvers (Li et al. 2025). They are the DPM-Solver family and run on any Gaussian path; the MR
#: part is the y = x - mu shift, which lives in the denoiser (``mr.MRDenoiser``) and in ``mr.MRSampler``.
#: ``mr.MREulerMaruyama`` is not listed: it needs an ``MRSchedule`` grid (use ``MRSampler``).
MR_SAMPLER_SPECS = {
    "mrs_data": _spec(DPMSolverPP, {}, "MR Sampler ODE, data prediction (DPM-Solver++, taylor 2nd order)",
                      {"order": 2, "solver_type": "heun", "lower_order_final": False}),
    "mrs_noise": _spec(DPMSolver, {}, "MR Sampler ODE, noise prediction (DPM-Solver, Lu et al. 2022a)",
                       {"order": 2, "solver_type": "heun"}),
    "mrs_sde_data": _spec(SDEDPMSolverPP, {}, "MR Sampler SDE, data prediction (SDE-DPM-Solver++)",
                          {"order": 2, "solver_type": "heun", "lower_order_final": False}),
    "mrs_sde_noise": _spec(SDEDPMSolver, {}, "MR Sampler SDE, noise prediction (SDE-DPM-Solver)",
                           {"order": 2, "solver_type": "heun"}),
}

#: Name -> spec. ``fewstep samplers`` lists this table.
SAMPLERS: dict[str, SamplerSpec] = {**_CORE, **_MOMENTUM, **MR_SAMPLER_SPECS}

#: Alias -> registry name.
ALIASES: dict[str, str] = {alias: name for name, spec in SAMPLERS.items() for alias in spec.aliases}


def resolve_name(name: str) -> str:
    """The registry name of ``name`` (itself, or the target of an alias); raises for unknown names."""
    if name in SAMPLERS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)} (aliases: {sorted(ALIASES)})")


def make_solver(name: str | Solver, **options) -> Solver:
    """A solver by registry name or alias with its options; a ``Solver`` passes through."""
    if isinstance(name, Solver):
        if options:
            raise ValueError("options are only accepted with a sampler name, not a Solver instance")
        return name
    name = resolve_name(name)
    try:
        return SAMPLERS[name].make(**options)
    except TypeError as err:  # an option the solver does not take
        raise ValueError(f"bad option for sampler {name!r}: {err}") from None
