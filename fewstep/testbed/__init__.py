"""fewstep.testbed: ground truth without a GPU, to verify samplers with numbers.

For data ``x0 ~ sum_k w_k N(m_k, diag v_k)`` and ``x_t = alpha x0 + sigma eps`` every quantity a
sampler approximates is known in closed form under every schedule:

- ``mixture``: the data, its marginal ``sum_k w_k N(alpha m_k, diag(alpha^2 v_k + sigma^2))``
  (``GaussianMixture.noised``) and posterior ``E[x0 | x_t]``, ``E[eps | x_t]``;
- ``exact``: the Bayes-optimal denoiser (``ExactDenoiser``) and the exact output law of a solver run
  over the denoiser of one Gaussian (``affine_output_law``);
- ``ode``: probability-flow ODE solutions, closed-form for one Gaussian, DOP853 to ``rtol = 1e-10``
  for mixtures and any denoiser;
- ``distances``: ``w2_gaussian``, ``w2_to_gaussian``, ``sliced_wasserstein``, ``mmd_rbf``;
- ``mr``: the same in ``y = x - mu`` for mean-reverting diffusion (``ExactMRDenoiser``);
- ``convergence``: a solver's endpoint error against the exact ODE and its measured order;
- ``stability``: heavy-ball momentum's stability regions on the linear test equation.

Everything is float64. This package imports ``fewstep.samplers``, never the other way round.
"""

from .convergence import endpoint_error, measured_order
from .distances import mmd_rbf, sample_moments, sliced_wasserstein, w2_gaussian, w2_to_gaussian
from .exact import ExactDenoiser, affine_output_law, guided_posterior
from .mixture import GaussianMixture
from .mr import ExactMRDenoiser, mr_marginal, mr_mixture_in_y
from .ode import gaussian_pf_ode_solution, mixture_pf_ode_solution, reference_pf_ode_solution
from .stability import real_stability_interval, spectral_radius, step_matrix

__all__ = [
    "GaussianMixture", "ExactDenoiser", "guided_posterior", "affine_output_law",
    "gaussian_pf_ode_solution", "mixture_pf_ode_solution", "reference_pf_ode_solution",
    "sample_moments", "w2_gaussian", "w2_to_gaussian", "sliced_wasserstein", "mmd_rbf",
    "mr_mixture_in_y", "mr_marginal", "ExactMRDenoiser",
    "endpoint_error", "measured_order",
    "step_matrix", "spectral_radius", "real_stability_interval",
]
