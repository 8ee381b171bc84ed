"""The math of one-step distribution matching, as small pure functions of tensors.

A one-step generator ``x = G_theta(z)`` defines ``q_theta``; noised, ``x_t = alpha_t x + sigma_t eps``
has marginal ``q_t``; the teacher's is ``p_t``. Scores come from denoisers,
``s(x_t) = (alpha_t x_hat(x_t) - x_t) / sigma_t^2``, so a score *difference* is a denoiser difference:
``s_q - s_p = alpha_t (x_hat_fake - x_hat_teacher) / sigma_t^2`` (research note distill.md, notation).

**f-distill** (Xu, Nie & Vahdat 2025, note 2.1): for ``D_f(p_t || q_t) = E_q[f(p_t / q_t)]`` and
``r = p_t / q_t``,

    grad_theta D_f = E_{z, eps}[ h(r(x_t)) (s_q - s_p)(x_t)^T dx_t/dtheta ],   h(r) = f''(r) r^2,

so per sample the generator's ``x`` gets the gradient ``alpha^2/sigma^2 h(r) (x_hat_fake - x_hat_teacher)``
(``dx_t/dx = alpha``). ``h = 1`` is reverse-KL = DMD / DMD2's update; f-distill replaces the weight
``alpha^2/sigma^2`` by ``1 / mean|x - x_hat_teacher|`` (DMD's normalisation) and normalises ``h`` by its
batch mean. ``r`` comes from a discriminator's logit (``exp(logit) = r`` at the optimum of the logistic
loss), clamped and normalised per time bin as FastGen does (note 2.2).

**SIM** (Luo et al. 2024, note 3.2): ``D(theta) = E_{x_t ~ q_{sg(theta), t}} d(y)``, ``y`` a scaled score
difference ``s_p - s_{q_theta}``. Its gradient, with ``psi`` an online score of ``q`` (fixed parameters),
is the gradient of

    L = d'(y(x_t))^T (s_psi(x_t) + eps / sigma_t)          (eps / sigma = -grad log q_t(x_t | x))

with the gradient flowing through ``x_t`` *everywhere*: into ``d'(y)``, into ``s_psi`` and into the
teacher's score inside ``y``. Scaling ``y`` by ``sigma_t^2 / alpha_t`` puts it in denoiser units,
``y = x_hat_teacher - x_hat_fake``, and then ``L = d'(y)^T (x_hat_fake - x)`` (``sim_loss``). The
tests (tests/test_fdiv.py) check this against finite differences of ``D`` on the exact Gaussian
toy of note 9.3 and show that stopping the gradient of ``d'(y)`` gives a different, wrong number.
With the squared L2 distance this is SiD's loss (Zhou et al. 2024) at its ``alpha = 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["F_DIVERGENCES", "f_function", "f_weight", "density_ratio", "time_bins", "bin_totals",
           "normalise_by_bins", "normalise_weight", "dmd_normaliser", "matching_gradient", "vsd_loss",
           "pseudo_huber_grad", "sim_distance", "sim_distance_grad", "sim_loss", "sid_loss",
           "sim_generator_loss"]


def _jeffreys(r):
    return (r - 1) * torch.log(r)


#: ``name -> (f(r), h(r) = f''(r) r^2)`` of the six divergences of f-distill's Table 1.
F_DIVERGENCES = {
    "rkl": (lambda r: -torch.log(r), lambda r: torch.ones_like(r)),  # reverse-KL: DMD
    "kl": (lambda r: r * torch.log(r), lambda r: r),  # forward-KL
    "js": (lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2), lambda r: r / (r + 1)),
    "sh": (lambda r: (torch.sqrt(r) - 1) ** 2, lambda r: 0.5 * torch.sqrt(r)),  # squared Hellinger
    "sf": (lambda r: (r + 1) * torch.log((r + 1) / (2 * r)), lambda r: 1 / (r + 1)),  # softened reverse-KL
    "jf": (_jeffreys, lambda r: r + 1),  # Jeffreys
}


def _wide(t: Tensor) -> Tensor:
    """At least fp32 (half-precision inputs are upcast; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.float()


def _check_f(name: str) -> None:
    if name not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {name!r}; expected one of {', '.join(F_DIVERGENCES)} "
                         "(rkl reverse-KL, kl forward-KL, js Jensen-Shannon, sh squared Hellinger, "
                         "sf softened reverse-KL, jf Jeffreys)")


def f_function(name: str, r: Tensor) -> Tensor:
    """``f(r)`` of divergence ``name`` (``D_f(p || q) = E_q f(p / q)``)."""
    _check_f(name)
    return F_DIVERGENCES[name][0](r)


def f_weight(name: str, r: Tensor) -> Tensor:
    """``h(r) = f''(r) r^2``: the weight of the score difference in the gradient of ``D_f``."""
    _check_f(name)
    return F_DIVERGENCES[name][1](r)


def density_ratio(logit: Tensor, lower: float = 0.1, upper: float = 20.0, logit_clamp: float = 10.0) -> Tensor:
    """``r = clamp(exp(clamp(logit, +-logit_clamp)), lower, upper)`` in fp32 (FastGen's clamps). ``logit``
    ``[B]`` or ``[B, heads]`` (heads are averaged first, as FastGen does)."""
    if not 0 < lower < upper:
        raise ValueError(f"density-ratio clamps must satisfy 0 < lower < upper, got lower={lower}, upper={upper}")
    logit = torch.nan_to_num(_wide(logit.detach()))
    if logit.ndim > 1:
        logit = logit.flatten(1).mean(1)
    return torch.exp(logit.clamp(-logit_clamp, logit_clamp)).clamp(lower, upper)


def time_bins(t: Tensor, lo: float, hi: float, n_bins: int) -> Tensor:
    """The time bin of each example: ``[lo, hi]`` cut into ``n_bins`` equal bins, FastGen's formula
    ``floor((t - lo) / ((hi - lo) / n_bins))`` in float64, clamped to ``[0, n_bins - 1]``. fewstep's
    default bins the sampled range (``lo, hi`` = the first and last timestep ``min_t``..``max_t`` can
    draw); FastGen bins the schedule's whole range (``0 .. T - 1`` for a discrete schedule)."""
    if not hi > lo:
        raise ValueError(f"time bins need hi > lo, got lo={lo}, hi={hi}")
    width = (float(hi) - float(lo)) / n_bins
    return ((t.detach().double() - float(lo)) / width).floor().long().clamp(0, n_bins - 1)


def bin_totals(r: Tensor, bins: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Per-bin sums of ``r`` and counts, ``([n_bins], [n_bins])``, for the caller to all-reduce."""
    sums = torch.zeros(n_bins, dtype=torch.float32, device=r.device).index_add_(0, bins.to(r.device), r.float())
    counts = torch.zeros(n_bins, dtype=torch.float32, device=r.device).index_add_(
        0, bins.to(r.device), torch.ones_like(r, dtype=torch.float32))
    return sums, counts


def normalise_by_bins(r: Tensor, bins: Tensor, sums: Tensor, counts: Tensor, ema: Tensor | None = None,
                      ema_rate: float = 0.0) -> tuple[Tensor, Tensor]:
    """``r / mean_bin(r)`` with the bin means (from the all-reduced ``sums / counts``) smoothed by an EMA:
    ``m <- rate m + (1 - rate) batch_mean`` where the batch has examples in the bin. ``ema`` ``None``
    starts it at the batch means (fewstep's default); FastGen starts it at ones (pass ``ones``; the same
    when ``rate = 0``). Returns ``(r normalised, new bin means)``; in fp32, ``nan_to_num``."""
    batch = sums / counts.clamp_min(1)
    seen = counts > 0
    if ema is None:
        means = torch.where(seen, batch, torch.ones_like(batch))
    else:
        ema = ema.to(batch)
        means = torch.where(seen, ema_rate * ema + (1 - ema_rate) * batch, ema)
    out = _wide(r) / means[bins.to(r.device)].clamp_min(1e-6)
    return torch.nan_to_num(out), means


def normalise_weight(h: Tensor, total: Tensor, count: int | Tensor) -> Tensor:
    """``h / (mean h + 1e-6)``, the mean over the whole (all-reduced) batch: ``total`` = sum of ``h``
    over every process, ``count`` = examples over every process."""
    return torch.nan_to_num(_wide(h) / (_wide(total) / count + 1e-6))


def dmd_normaliser(x: Tensor, x_hat_teacher: Tensor) -> Tensor:
    """DMD's per-example weight ``1 / (mean |x - x_hat_teacher| + 1e-6)`` over C, H, W, in fp32, no
    gradient (DMD2, f-distill, SiD)."""
    diff = (_wide(x.detach()) - _wide(x_hat_teacher.detach())).abs().flatten(1).mean(1)
    return torch.nan_to_num(1.0 / (diff + 1e-6))


def _per_example(c, like: Tensor) -> Tensor:
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    return c.reshape(-1, *([1] * (like.ndim - 1))) if c.ndim else c


def matching_gradient(x_hat_fake: Tensor, x_hat_teacher: Tensor, h: Tensor | float = 1.0,
                      weight: Tensor | float = 1.0) -> Tensor:
    """The gradient the generator's sample ``x`` receives: ``weight * h * (x_hat_fake - x_hat_teacher)``,
    in fp32, ``nan_to_num``, no gradient. ``weight = alpha^2 / sigma^2`` makes it exactly
    ``h(r) (s_q - s_p) dx_t/dx`` (the per-sample gradient of ``D_f(p_t || q_t)``);
    ``dmd_normaliser`` is DMD's choice; ``1`` is Diff-Instruct's (the integral KL, unnormalised)."""
    diff = _wide(x_hat_fake.detach()) - _wide(x_hat_teacher.detach())
    g = _per_example(weight, diff) * _per_example(h, diff) * diff
    return torch.nan_to_num(g)


def vsd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """Per-example ``0.5 |x - sg(x - grad)|^2`` (summed over C, H, W): its gradient in ``x`` is ``grad``
    (DMD's trick to push a given gradient into the generator)."""
    target = (x - grad.to(x.dtype)).detach()
    return 0.5 * (x - target).flatten(1).square().sum(1)


# ---------------------------------------------------------------------------------------------
# SIM / SiD


def pseudo_huber_grad(y: Tensor, c: float) -> Tensor:
    """``d'(y) = y / sqrt(|y|^2 + c^2)`` of the pseudo-Huber distance ``sqrt(|y|^2 + c^2) - c`` (norms
    over all but the batch dim)."""
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    norm = torch.sqrt(y.flatten(1).square().sum(1) + c * c)
    return y / _per_example(norm, y)


def sim_distance(y: Tensor, distance: str = "pseudo_huber", c: float = 1.0) -> Tensor:
    """``d(y)`` per example: ``pseudo_huber`` ``sqrt(|y|^2 + c^2) - c`` or ``l2`` ``|y|^2``."""
    sq = y.flatten(1).square().sum(1)
    if distance == "pseudo_huber":
        return torch.sqrt(sq + c * c) - c
    if distance == "l2":
        return sq
    raise ValueError(f"unknown SIM distance {distance!r}; expected 'pseudo_huber' or 'l2'")


def sim_distance_grad(y: Tensor, distance: str = "pseudo_huber", c: float = 1.0) -> Tensor:
    """``d'(y)``: ``pseudo_huber_grad`` or ``2 y`` (squared L2)."""
    if distance == "pseudo_huber":
        return pseudo_huber_grad(y, c)
    if distance == "l2":
        return 2 * y
    raise ValueError(f"unknown SIM distance {distance!r}; expected 'pseudo_huber' or 'l2'")


def sim_loss(x: Tensor, x_hat_teacher: Tensor, x_hat_fake: Tensor, distance: str = "pseudo_huber",
             c: float = 1.0) -> Tensor:
    """Per-example SIM generator loss ``d'(y)^T (x_hat_fake - x)``, ``y = x_hat_teacher - x_hat_fake``.

    Every argument must carry its gradient to the generator: ``x`` directly and ``x_hat_*`` through
    ``x_t`` (the networks' *inputs*; the fake network's parameters are held fixed by the caller). This
    is ``d'(y)^T (s_psi + eps / sigma)`` in denoiser units (module docstring): its expected gradient is
    the gradient of ``E_{q_sg} d(x_hat_teacher - x_hat_q)``.
    """
    u = sim_distance_grad(x_hat_teacher - x_hat_fake, distance, c)
    return (u * (x_hat_fake - x)).flatten(1).sum(1)


def sid_loss(x: Tensor, x_hat_teacher: Tensor, x_hat_fake: Tensor, alpha: float = 1.2) -> Tensor:
    """Per-example SiD generator loss (Zhou et al. 2024): ``(f_phi - f_psi)^T ((f_phi - x) - alpha
    (f_phi - f_psi))``; at ``alpha = 1`` it is ``sim_loss(..., "l2") / 2``."""
    diff = x_hat_teacher - x_hat_fake
    return (diff * ((x_hat_teacher - x) - alpha * diff)).flatten(1).sum(1)


def sim_generator_loss(x: Tensor, x_hat_teacher: Tensor, x_hat_fake: Tensor, objective: str = "sim",
                       distance: str = "pseudo_huber", c: float = 1.0, sid_alpha: float = 1.2,
                       normalise: bool = False) -> Tensor:
    """Per-example generator loss of ``objective`` ``sim`` (``sim_loss``) or ``sid`` (``sid_loss``), in
    fp32, ``nan_to_num``; ``normalise`` multiplies it by DMD's ``dmd_normaliser(x, x_hat_teacher)``.

    SIM's own loss has no such weight (its expected gradient is then exactly the gradient of SIM's
    divergence, tests/test_matching_reference.py); SiD's code divides by ``sg(mean|x - f_phi|)``, so
    SiD's reference setting is ``normalise=True``."""
    if objective == "sim":
        per = sim_loss(x, x_hat_teacher, x_hat_fake, distance, c)
    elif objective == "sid":
        per = sid_loss(x, x_hat_teacher, x_hat_fake, sid_alpha)
    else:
        raise ValueError(f"unknown score-matching objective {objective!r}; expected 'sim' or 'sid'")
    per = torch.nan_to_num(_wide(per))
    return per * dmd_normaliser(x, x_hat_teacher) if normalise else per
