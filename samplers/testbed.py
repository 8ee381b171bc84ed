"""Ground truth without a GPU: Gaussian-mixture data, its exact denoiser and exact PF-ODE solutions.

For data ``x0 ~ sum_k w_k N(m_k, diag v_k)`` and ``x_t = alpha x0 + sigma eps`` every quantity a
sampler approximates is known in closed form under every schedule:

- the marginal ``p_t = sum_k w_k N(alpha m_k, diag(alpha^2 v_k + sigma^2))`` (``GaussianMixture.noised``);
- the denoiser ``E[x0 | x_t]`` and ``E[eps | x_t]`` (``GaussianMixture.posterior``, ``ExactDenoiser``);
- the probability-flow ODE solution: in closed form for one Gaussian (``gaussian_pf_ode_solution``),
  and to ``rtol = 1e-10`` by DOP853 for mixtures and for any denoiser (``mixture_pf_ode_solution``,
  ``reference_pf_ode_solution``).

The ODE is integrated in VP "angle" coordinates, which make it schedule-independent and bounded:
``phi = atan2(sigma, alpha)`` (so ``tan phi = sigma_bar``) and ``y = x / sqrt(alpha^2 + sigma^2)
= cos(phi) x0 + sin(phi) eps``. Along the PF ODE (Song et al. 2021, eq. 13; Karras et al. 2022,
eq. 4: ``d(x/alpha) / d sigma_bar = eps_hat``),

    dy / dphi = -sin(phi) x0_hat + cos(phi) eps_hat,

a smooth right-hand side on ``phi in [0, pi/2)`` that reaches clean data (``phi = 0``) exactly.

Distances between sample sets and Gaussians (``w2_gaussian``, ``w2_to_gaussian``,
``sliced_wasserstein``, ``mmd_rbf``) score samplers on this data. Everything is float64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .denoisers import CFGDenoiser, Denoiser, Prediction
from .schedules import Schedule

__all__ = [
    "GaussianMixture",
    "ExactDenoiser",
    "gaussian_pf_ode_solution",
    "mixture_pf_ode_solution",
    "reference_pf_ode_solution",
    "sample_moments",
    "w2_gaussian",
    "w2_to_gaussian",
    "sliced_wasserstein",
    "mmd_rbf",
]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)

# A posterior: (x, alpha, sigma) -> Prediction(E[x0 | x], E[eps | x]) on flattened float64 [B, D].
Posterior = Callable[[Tensor, Tensor, Tensor], Prediction]


def _f64(x, device=None) -> Tensor:
    return torch.as_tensor(x, dtype=_F64, device=device)


def _flat(x: Tensor) -> Tensor:
    """``[N, *S] -> [N, prod(S)]`` in float64."""
    x = _f64(x)
    return x.reshape(x.shape[0], -1) if x.ndim != 2 else x


def _per_sample(c: Tensor, ndim: int) -> Tensor:
    """A scalar or ``[B]`` coefficient shaped ``[B or 1, 1, ...]`` to broadcast over ``ndim`` dims."""
    return c.reshape(-1, *([1] * (ndim - 1))) if c.ndim else c


# ---------------------------------------------------------------------------------------------
# Data


class GaussianMixture:
    """``sum_k w_k N(m_k, diag v_k)`` in float64, optionally with a class label per component.

    ``means [K, D]``; ``variances [K, D]``, ``[K]`` or a scalar (all > 0); ``weights [K]`` (> 0,
    normalised; uniform by default); ``classes [K]`` integer labels or None.
    """

    def __init__(self, means, variances=1.0, weights=None, classes=None):
        means = _f64(means)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(means.shape)}")
        k, d = means.shape
        variances = _f64(variances)
        if variances.ndim == 1:
            variances = variances[:, None]
        try:
            variances = torch.broadcast_to(variances, (k, d)).clone()
        except RuntimeError:
            raise ValueError(f"variances of shape {tuple(variances.shape)} do not fit means [{k}, {d}]") from None
        if not torch.all(variances > 0):
            raise ValueError("variances must be > 0")
        weights = torch.ones(k, dtype=_F64) if weights is None else _f64(weights)
        if weights.shape != (k,) or not torch.all(weights > 0):
            raise ValueError(f"weights must be {k} positive numbers")
        if classes is not None:
            classes = torch.as_tensor(classes, dtype=torch.long)
            if classes.shape != (k,):
                raise ValueError(f"classes must be {k} integer labels")
        self.means, self.variances, self.classes = means, variances, classes
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @classmethod
    def gaussian(cls, dim: int, mean=0.0, std=1.0) -> "GaussianMixture":
        """One component ``N(mean, diag std^2)``; ``mean`` and ``std`` scalars or ``[dim]``."""
        mean = torch.broadcast_to(_f64(mean), (dim,))
        std = torch.broadcast_to(_f64(std), (dim,))
        return cls(mean[None], std[None] ** 2)

    @classmethod
    def random(cls, dim: int, n_components: int, n_classes: int | None = None, spread: float = 3.0,
               std: float = 0.5, seed: int = 0) -> "GaussianMixture":
        """Seeded mixture: means ``~ N(0, spread^2)``, per-coordinate stds ``std * U(0.5, 1.5)``,
        weights ``∝ U(0.5, 1.5)``; with ``n_classes``, component ``k`` has class ``k % n_classes``."""
        if n_classes is not None and not 1 <= n_classes <= n_components:
            raise ValueError("need 1 <= n_classes <= n_components")
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(n_components, dim, generator=g, dtype=_F64)
        stds = std * (0.5 + torch.rand(n_components, dim, generator=g, dtype=_F64))
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=_F64)
        classes = None if n_classes is None else torch.arange(n_components) % n_classes
        return cls(means, stds**2, weights, classes)

    def __repr__(self) -> str:
        n_classes = None if self.classes is None else len(torch.unique(self.classes))
        return f"GaussianMixture(dim={self.dim}, n_components={self.n_components}, n_classes={n_classes})"

    # -- class restriction ----------------------------------------------------------------------

    def _class_mask(self, class_label) -> Tensor | None:
        """``[K]`` or ``[B, K]`` boolean mask of the components of ``class_label`` (None: all)."""
        if class_label is None:
            return None
        if self.classes is None:
            raise ValueError("this mixture has no classes; pass class_label=None")
        label = torch.as_tensor(class_label, dtype=torch.long)
        mask = self.classes == label[..., None]
        if not torch.all(mask.any(-1)):
            raise ValueError(f"class label(s) {label.tolist()} match no component of classes {self.classes.tolist()}")
        return mask

    def log_weights(self, class_label=None) -> Tensor:
        """``log w_k``, with ``-inf`` outside ``class_label`` (``[K]``, or ``[B, K]`` for per-sample labels)."""
        log_w = torch.log(self.weights)
        mask = self._class_mask(class_label)
        return log_w if mask is None else torch.where(mask, log_w, -math.inf)

    def conditional(self, class_label: int) -> "GaussianMixture":
        """The mixture of ``class_label``'s components, weights renormalised (``p(x0 | c)``)."""
        keep = self._class_mask(int(class_label))
        return GaussianMixture(self.means[keep], self.variances[keep], self.weights[keep], self.classes[keep])

    # -- distribution ---------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None, class_label=None) -> Tensor:
        """``n`` draws ``[n, D]``: component ``k ~ w`` (within ``class_label`` if given), then ``N(m_k, v_k)``."""
        probs = torch.exp(self.log_weights(None if class_label is None else int(class_label)))
        k = torch.multinomial(probs, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        return self.means[k] + self.variances[k].sqrt() * z

    def noised(self, alpha, sigma) -> "GaussianMixture":
        """Exact marginal of ``alpha x0 + sigma eps``: ``sum_k w_k N(alpha m_k, alpha^2 v_k + sigma^2)``."""
        alpha, sigma = float(alpha), float(sigma)
        return GaussianMixture(alpha * self.means, alpha**2 * self.variances + sigma**2, self.weights, self.classes)

    def component_log_probs(self, x: Tensor) -> Tensor:
        """``log N(x; m_k, diag v_k)`` for every component: ``[N, K]``."""
        x = _flat(x)
        diff = x[:, None, :] - self.means.to(x.device)
        v = self.variances.to(x.device)
        return -0.5 * (diff**2 / v + torch.log(v) + _LOG_2PI).sum(-1)

    def log_prob(self, x: Tensor, class_label=None) -> Tensor:
        """``log p(x) = logsumexp_k (log w_k + log N(x; m_k, v_k))`` for ``x [N, *S]``: ``[N]``."""
        log_w = self.log_weights(class_label).to(x.device)
        return torch.logsumexp(log_w + self.component_log_probs(x), dim=-1)

    def responsibilities(self, x: Tensor, class_label=None) -> Tensor:
        """``p(k | x0 = x)``: ``[N, K]``."""
        log_w = self.log_weights(class_label).to(x.device)
        return torch.softmax(log_w + self.component_log_probs(x), dim=-1)

    def mean(self) -> Tensor:
        """``sum_k w_k m_k``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Full ``[D, D]`` covariance: ``sum_k w_k (diag v_k + m_k m_k^T) - mu mu^T``."""
        mu = self.mean()
        second = torch.diag(self.weights @ self.variances) + (self.weights[:, None] * self.means).T @ self.means
        cov = second - torch.outer(mu, mu)
        return 0.5 * (cov + cov.T)

    # -- posterior ------------------------------------------------------------------------------

    def posterior(self, x: Tensor, alpha, sigma, class_label=None) -> Prediction:
        """``(E[x0 | x_t = x], E[eps | x_t = x])`` for ``x_t = alpha x0 + sigma eps``, ``x [B, *S]``.

        With ``s_k^2 = alpha^2 v_k + sigma^2`` and ``d_k = x - alpha m_k`` (Bishop 2006, eq. 2.116):
        ``E[x0 | x, k] = m_k + alpha v_k d_k / s_k^2``, ``E[eps | x, k] = sigma d_k / s_k^2``, mixed by
        ``r_k ∝ w_k N(x; alpha m_k, s_k^2)`` (softmax in log space). No division by ``alpha`` or
        ``sigma``, so ``sigma = 0`` gives ``x / alpha`` and ``alpha = 0`` the prior mean. ``alpha``,
        ``sigma``: scalars or ``[B]``; ``class_label``: an int or ``[B]`` ints (``p(x0 | x, c)``).
        """
        shape = x.shape
        x = _flat(x)
        dev = x.device
        a = _per_sample(_f64(alpha, dev), 3)
        s = _per_sample(_f64(sigma, dev), 3)
        m, v = self.means.to(dev), self.variances.to(dev)
        s2 = a**2 * v + s**2  # [B or 1, K, D]
        diff = x[:, None, :] - a * m  # [B, K, D]
        log_n = -0.5 * (diff**2 / s2 + torch.log(s2) + _LOG_2PI).sum(-1)  # [B, K]
        r = torch.softmax(self.log_weights(class_label).to(dev) + log_n, dim=-1)[..., None]
        x0 = (r * (m + a * v * diff / s2)).sum(1)
        eps = (r * (s * diff / s2)).sum(1)
        return Prediction(x0.reshape(shape), eps.reshape(shape))

    def posterior_mean(self, x: Tensor, alpha, sigma, class_label=None) -> Tensor:
        """``E[x0 | alpha x0 + sigma eps = x]``; see ``posterior``."""
        return self.posterior(x, alpha, sigma, class_label).x0


# ---------------------------------------------------------------------------------------------
# Denoiser


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


# ---------------------------------------------------------------------------------------------
# Probability-flow ODE


def _angle(schedule: Schedule, t) -> tuple[float, float]:
    """``(phi, r)`` with ``phi = atan2(sigma, alpha)``, ``r = sqrt(alpha^2 + sigma^2)``; None: clean data."""
    if t is None:
        return 0.0, 1.0
    alpha, sigma = float(schedule.alpha(float(t))), float(schedule.sigma(float(t)))
    return math.atan2(sigma, alpha), math.hypot(alpha, sigma)


def gaussian_pf_ode_solution(mixture: GaussianMixture, schedule: Schedule, x_start: Tensor, t_start,
                             t_end=None) -> Tensor:
    """Closed-form PF-ODE map of one Gaussian ``N(m, diag v)``, ``t_start -> t_end`` (None: clean data).

    ``(x_t - alpha_t m) / sqrt(alpha_t^2 v + sigma_t^2)`` is constant along the ODE, coordinate-wise
    (the ODE is linear and maps the marginal ``N(alpha m, alpha^2 v + sigma^2)`` at one time to the next).
    """
    if mixture.n_components != 1:
        raise ValueError(f"closed form needs one Gaussian, got {mixture.n_components} components")
    m, v = mixture.means[0], mixture.variances[0]

    def coeffs(t):
        if t is None:
            return 1.0, 0.0
        return float(schedule.alpha(float(t))), float(schedule.sigma(float(t)))

    (a0, s0), (a1, s1) = coeffs(t_start), coeffs(t_end)
    x = _flat(x_start)
    z = (x - a0 * m) / torch.sqrt(a0**2 * v + s0**2)
    return (a1 * m + torch.sqrt(a1**2 * v + s1**2) * z).reshape(x_start.shape)


def _integrate_angle(velocity: Callable[[Tensor, float], Tensor], y0: Tensor, phi0: float, phi1: float,
                     rtol: float, atol: float) -> Tensor:
    """Solve ``dy/dphi = velocity(y, phi)`` from ``phi0`` to ``phi1`` with DOP853 on the whole batch."""
    if phi0 == phi1:
        return y0.clone()
    shape = y0.shape

    def rhs(phi, y):
        return velocity(torch.from_numpy(y).reshape(shape), float(phi)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (phi0, phi1), y0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference PF-ODE integration failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


def _posterior_velocity(posterior: Posterior) -> Callable[[Tensor, float], Tensor]:
    """``dy/dphi = -sin(phi) x0_hat + cos(phi) eps_hat`` with the posterior at ``(cos phi, sin phi)``."""

    def velocity(y, phi):
        c, s = math.cos(phi), math.sin(phi)
        pred = posterior(y, c, s)
        return -s * pred.x0 + c * pred.eps

    return velocity


def _solve_pf_ode(velocity, schedule: Schedule, x_start: Tensor, t_start, t_end, rtol, atol) -> Tensor:
    (phi0, r0), (phi1, r1) = _angle(schedule, t_start), _angle(schedule, t_end)
    y0 = _flat(x_start).cpu() / r0
    y1 = _integrate_angle(velocity, y0, phi0, phi1, rtol, atol)
    return (r1 * y1).reshape(x_start.shape).to(x_start.device)


def mixture_pf_ode_solution(mixture: GaussianMixture, schedule: Schedule, x_start: Tensor, t_start, t_end=None,
                            class_label=None, guidance_scale: float | None = None, rtol: float = 1e-10,
                            atol: float = 1e-10) -> Tensor:
    """Exact (to ``rtol``) PF-ODE map of a mixture, ``t_start -> t_end``; None means clean data.

    Uses the closed-form posterior at every noise level, so it reaches ``sigma = 0`` exactly.
    ``class_label`` (int or ``[B]``): conditional ODE; with ``guidance_scale`` the CFG-guided ODE.
    Returns float64 on ``x_start``'s device (the integration runs on the CPU).
    """
    velocity = _posterior_velocity(guided_posterior(mixture, class_label, guidance_scale))
    return _solve_pf_ode(velocity, schedule, x_start, t_start, t_end, rtol, atol)


def reference_pf_ode_solution(denoiser: Denoiser, x_start: Tensor, t_start, t_end=None, rtol: float = 1e-10,
                              atol: float = 1e-10) -> Tensor:
    """PF-ODE map of any ``denoiser`` (e.g. a ``CFGDenoiser`` over ``ExactDenoiser``s), ``t_start -> t_end``.

    The denoiser is called in float64 at schedule times ``t = t_from_sigma_bar(tan phi)`` inside
    ``[t_min, t_max]`` only. An endpoint ``None`` (clean data) needs the closed-form posterior below
    ``t_min`` and so works only for ``ExactDenoiser`` and CFG combinations of them. The denoiser must
    accept float64 input. Returns float64 on ``x_start``'s device (the integration runs on the CPU).
    """
    schedule = denoiser.schedule
    exact = _exact_posterior(denoiser)
    if (t_start is None or t_end is None) and exact is None:
        raise ValueError(f"an endpoint at clean data (None) needs an ExactDenoiser or a CFG of them, not "
                         f"{type(denoiser).__name__}; pass a schedule time such as schedule.t_min")
    for t in (t_start, t_end):
        if t is not None:
            schedule.check_times(t)
    phi_min, _ = _angle(schedule, schedule.t_min)
    lam_lo, lam_hi = schedule.log_snr(schedule.t_max), schedule.log_snr(schedule.t_min)
    below = _posterior_velocity(exact) if exact is not None else None
    shape = (-1,) + tuple(x_start.shape[1:])

    def velocity(y, phi):
        if below is not None and phi < phi_min:  # below t_min: the same ODE, from the closed-form posterior
            return below(y, phi)
        lam = torch.clamp(-torch.log(_f64(math.tan(phi))), lam_lo, lam_hi)
        t = torch.clamp(schedule.t_from_log_snr(lam), schedule.t_min, schedule.t_max)
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        with torch.no_grad():
            pred = denoiser((math.hypot(alpha, sigma) * y).reshape(shape).to(x_start.device), t)
        x0, eps = _flat(pred.x0).cpu(), _flat(pred.eps).cpu()
        return -math.sin(phi) * x0 + math.cos(phi) * eps

    return _solve_pf_ode(velocity, schedule, x_start, t_start, t_end, rtol, atol)


# ---------------------------------------------------------------------------------------------
# Distances


def sample_moments(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean ``[D]`` and unbiased covariance ``[D, D]`` of ``[N, *S]`` samples (float64)."""
    x = _flat(samples)
    return x.mean(0), torch.atleast_2d(torch.cov(x.T))


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric PSD square root ``U diag(sqrt(max(l, 0))) U^T`` by ``eigh``."""
    lam, u = torch.linalg.eigh(0.5 * (a + a.T))
    return (u * lam.clamp(min=0).sqrt()) @ u.T


def w2_gaussian(mean1, cov1, mean2, cov2) -> Tensor:
    """Exact 2-Wasserstein distance between ``N(mean1, cov1)`` and ``N(mean2, cov2)`` (Dowson & Landau 1982):

    ``W2^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2)``. Returns ``W2`` (not squared);
    roundoff leaves ``~1e-8 sqrt(tr C)`` for identical Gaussians.
    """
    m1, m2 = _f64(mean1).reshape(-1), _f64(mean2).reshape(-1)
    c1, c2 = torch.atleast_2d(_f64(cov1)), torch.atleast_2d(_f64(cov2))
    if c1.shape != (len(m1), len(m1)) or c2.shape != (len(m2), len(m2)) or len(m1) != len(m2):
        raise ValueError("w2_gaussian needs means [D] and covariances [D, D] of one D")
    root2 = _sqrtm_psd(c2)
    cross = torch.linalg.eigvalsh(0.5 * ((root2 @ c1 @ root2) + (root2 @ c1 @ root2).T)).clamp(min=0).sqrt().sum()
    w2_sq = ((m1 - m2) ** 2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross
    return w2_sq.clamp(min=0).sqrt()


def w2_to_gaussian(samples: Tensor, mean, cov) -> Tensor:
    """``w2_gaussian`` between the Gaussian fitted to ``samples [N, *S]`` (mean, unbiased cov) and ``N(mean, cov)``."""
    mu, c = sample_moments(samples)
    return w2_gaussian(mu, c, mean, cov)


def _quantiles(sorted_x: Tensor, q: Tensor) -> Tensor:
    """Linear-interpolation quantiles at levels ``q`` of sorted rows ``[P, N]`` (level ``q`` at position ``q N - 1/2``)."""
    n = sorted_x.shape[1]
    pos = (q * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.to(_F64)
    return sorted_x[:, lo] * (1 - frac) + sorted_x[:, hi] * frac


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> Tensor:
    """Sliced 2-Wasserstein distance ``sqrt(mean_theta W2^2(theta.x, theta.y))`` (Bonneel et al. 2015)
    over ``n_projections`` seeded uniform directions. 1-D ``W2`` between empirical measures: sorted
    samples when ``N = M``, else quantile functions at ``max(N, M)`` midpoint levels."""
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample dims differ: {x.shape[1]} vs {y.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_projections, x.shape[1], generator=g, dtype=_F64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    # projections as [P, N] rows: sorting along the contiguous dim is several times faster
    px, py = torch.sort(theta @ x.T, dim=1).values, torch.sort(theta @ y.T, dim=1).values
    if px.shape[1] != py.shape[1]:
        n = max(px.shape[1], py.shape[1])
        q = (torch.arange(n, dtype=_F64) + 0.5) / n
        px, py = _quantiles(px, q), _quantiles(py, q)
    return ((px - py) ** 2).mean().sqrt()


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> Tensor:
    """Unbiased ``MMD^2`` (Gretton et al. 2012, eq. 3) with ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``.

    ``h = bandwidth``, or by default the median pairwise distance of the pooled samples (median
    heuristic). Can be slightly negative for samples of one distribution.
    """
    x, y = _flat(x), _flat(y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 samples on each side")
    d2 = torch.cdist(torch.cat([x, y]), torch.cat([x, y])) ** 2
    if bandwidth is None:
        iu = torch.triu_indices(n + m, n + m, offset=1)
        bandwidth = d2[iu[0], iu[1]].median().sqrt()
    k = torch.exp(-d2 / (2 * _f64(bandwidth) ** 2))
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


# ---------------------------------------------------------------------------------------------
# Mean-reverting (MR) diffusion: data x0 ~ mixture, condition mu, x_t = alpha x0 + (1 - alpha) mu + sigma eps.
# In y = x - mu the path is y_t = alpha y0 + sigma eps with y0 = x0 - mu, so everything above applies in y.


def mr_mixture_in_y(mixture: GaussianMixture, mu) -> GaussianMixture:
    """The distribution of ``y0 = x0 - mu`` for one shared condition ``mu [D]``: the means shifted by ``-mu``."""
    mu = _f64(mu).reshape(-1)
    if mu.shape != (mixture.dim,):
        raise ValueError(f"mu must flatten to the mixture's dim {mixture.dim}, got {mu.numel()} values")
    return GaussianMixture(mixture.means - mu, mixture.variances, mixture.weights, mixture.classes)


def mr_marginal(mixture: GaussianMixture, mu, alpha, sigma) -> GaussianMixture:
    """Exact MR marginal of ``x_t``: ``sum_k w_k N(alpha m_k + (1 - alpha) mu, alpha^2 v_k + sigma^2)``."""
    mu = _f64(mu).reshape(-1)
    alpha = float(alpha)
    noised = mixture.noised(alpha, sigma)
    return GaussianMixture(noised.means + (1 - alpha) * mu, noised.variances, noised.weights, noised.classes)


class ExactMRDenoiser(ExactDenoiser):
    """The Bayes-optimal MR denoiser of ``x0 ~ mixture`` given the condition ``mu``, in ``y = x - mu``.

    Built with a shared ``mu [D]`` it is the ``ExactDenoiser`` of ``mr_mixture_in_y(mixture, mu)`` (so the
    exact PF-ODE solutions and ``convergence.endpoint_error`` apply in ``y``). ``forward(y, t, mu=...)``
    also takes a per-sample condition ``mu [B, *S]``: ``E[x0 | y]`` is the mixture's posterior at
    ``y + alpha mu = alpha x0 + sigma eps``; it returns ``Prediction(x0_hat - mu, eps_hat)``.
    ``schedule``: an ``MRSchedule`` (any ``Schedule`` works in ``y``).
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, mu):
        super().__init__(mr_mixture_in_y(mixture, mu), schedule)
        self.data, self.mu = mixture, _f64(mu).reshape(-1)
        self.sample_shape = None

    def forward(self, y: Tensor, t, mu: Tensor | None = None) -> Prediction:
        if mu is None:
            return super().forward(y, t)
        if mu.shape != y.shape and tuple(mu.shape) != tuple(y.shape[1:]):
            raise ValueError(f"mu of shape {tuple(mu.shape)} does not match the sample's {tuple(y.shape)}")
        if y[0].numel() != self.data.dim:
            raise ValueError(f"sample shape {tuple(y.shape[1:])} does not flatten to the mixture's dim {self.data.dim}")
        alpha, sigma = self.coefficients(t, y)
        a = _per_sample(alpha, y.ndim)
        mu64 = torch.broadcast_to(mu.to(_F64), y.shape)
        pred = self.data.posterior(y.to(_F64) + a * mu64, alpha, sigma)
        return Prediction((pred.x0 - mu64).to(y.dtype), pred.eps.to(y.dtype))


__all__ += ["mr_mixture_in_y", "mr_marginal", "ExactMRDenoiser"]


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

    from .sampler import run_solver

    with torch.no_grad():
        out = run_solver(solver, grid, denoiser, x, noise)
    if calls[0] > n_calls:
        raise RuntimeError(f"the solver drew noise {calls[0]} times, more than its {n_calls} model calls + 1")
    a = out[1] - out[0]
    b = out[2:] - out[0]
    return out[0], a**2 * var + (b**2).sum(0)


__all__ += ["affine_output_law"]
