"""Claims: every fewstep sampler is callable as ``sample_<name>(model, x, sigmas, ...)`` over a k-diffusion
denoiser; where the methods coincide it equals k-diffusion's own function on the same model, sigmas
(Karras grid) and noise (float64 to 1e-12, float32 to 1e-5); it sends k-diffusion's callback payload once
per step; momentum and Time-Shift run there and converge on the exact testbed; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from fewstep.samplers import SAMPLERS, EDMSchedule, kdiffusion as K

try:
    from fewstep.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution
except ImportError:  # pragma: no cover - before the testbed moved
    from fewstep.samplers.testbed import ExactDenoiser, GaussianMixture, mixture_pf_ode_solution

from _k_diffusion import k_diffusion_sampling

pytestmark = pytest.mark.usefixtures("one_thread")

MIX = GaussianMixture(means=[[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 1.0]],
                      variances=[[0.3, 0.2, 0.5, 0.4], [0.2, 0.5, 0.3, 0.6]])
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
EXACT = ExactDenoiser(MIX, EDMSchedule(1e-4, 200.0))  # time is sigma: covers every grid below


@pytest.fixture(scope="module")
def k_sampling():
    with k_diffusion_sampling() as sampling:
        yield sampling


class Model:
    """A k-diffusion denoiser ``D(x, sigma[B]) -> x0``: the mixture's exact one; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        return EXACT(x, sigma.double()).x0 * extra.get("gain", 1.0)


def karras(k_sampling, n, dtype=torch.float64):
    return k_sampling.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0).to(dtype)


def x_T(sigmas, n=16, dtype=torch.float64):
    return (torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            * float(sigmas[0])).to(dtype)


class SeededNoise:
    """A ``noise_sampler(sigma, sigma_next)`` that replays the same draws for both sides."""

    def __init__(self, like):
        self.g, self.like = torch.Generator().manual_seed(1), like

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.like.shape, generator=self.g, dtype=torch.float64).to(self.like.dtype)


PAIRS = [  # (ours, k-diffusion's, options for both)
    ("euler", "sample_euler", {}),
    ("heun", "sample_heun", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("lms", "sample_lms", {}),
    ("euler_ancestral", "sample_euler_ancestral", {}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.5}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}),
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("ours, theirs, options", PAIRS,
                         ids=[f"{a}-{b}{'-' + str(o) if o else ''}" for a, b, o in PAIRS])
def test_parity_with_k_diffusion(k_sampling, ours, theirs, options, dtype):
    sigmas = karras(k_sampling, 10, dtype)
    x = x_T(sigmas, dtype=dtype)
    extra = {}
    if ours in ("euler_ancestral", "dpmpp_2m_sde"):
        extra = {"noise_sampler": SeededNoise(x)}
    ref_model, our_model = Model(), Model()
    ref = getattr(k_sampling, theirs)(ref_model, x, sigmas, disable=True, **options, **extra)
    if extra:
        extra = {"noise_sampler": SeededNoise(x)}
    got = getattr(K, f"sample_{ours}")(our_model, x, sigmas, disable=True, **options, **extra)
    diff = (got - ref).abs().max().item()
    print(f"{ours} vs {theirs} {dtype}: max|diff| {diff:.2e}")
    assert got.dtype == dtype and our_model.calls == ref_model.calls
    assert diff < TOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("ours, theirs", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                          ("dpmpp_2m", "sample_dpmpp_2m")])
def test_callback_payload_is_k_diffusions(k_sampling, ours, theirs):
    sigmas = karras(k_sampling, 6)
    x = x_T(sigmas)
    ref, got = [], []
    getattr(k_sampling, theirs)(Model(), x, sigmas, disable=True, callback=ref.append)
    getattr(K, f"sample_{ours}")(Model(), x, sigmas, disable=True, callback=got.append)
    assert len(got) == len(ref) == len(sigmas) - 1
    for a, b in zip(got, ref):
        assert set(a) == {"x", "i", "sigma", "sigma_hat", "denoised"} == set(b)
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"]) == float(a["sigma_hat"])
        assert torch.allclose(a["x"], b["x"], rtol=0, atol=1e-12)
        assert torch.allclose(a["denoised"], b["denoised"], rtol=0, atol=1e-12)


def test_extra_args_reach_the_model(k_sampling):
    sigmas = karras(k_sampling, 5)
    x = x_T(sigmas)
    ref = k_sampling.sample_dpmpp_2m(Model(), x, sigmas, extra_args={"gain": 0.5}, disable=True)
    got = K.sample_dpmpp_2m(Model(), x, sigmas, extra_args={"gain": 0.5}, disable=True)
    assert (got - ref).abs().max().item() < 1e-12


def test_every_sampler_has_a_function():
    for name in SAMPLERS:
        fn = getattr(K, f"sample_{name}")
        assert fn.__name__ == f"sample_{name}" and fn in K.KDIFFUSION_SAMPLERS.values()
    assert callable(K.sample_time_shift) and callable(K.sample_euler_ancestral)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_converges_on_the_testbed(k_sampling, name):
    """At 40 Karras steps every sampler (stochastic ones: its mean path is not the ODE, so only finite and
    near the data scale) lands near the exact PF-ODE solution from the same start."""
    sigmas = karras(k_sampling, 40)
    x = x_T(sigmas, n=8)
    torch.manual_seed(0)
    out = getattr(K, f"sample_{name}")(Model(), x, sigmas, disable=True)
    assert torch.isfinite(out).all()
    if SAMPLERS[name].make().stochastic:
        assert out.abs().max() < 10
        return
    exact = mixture_pf_ode_solution(MIX, EDMSchedule(1e-4, 200.0), x, SIGMA_MAX)
    err = (out - exact).abs().max().item()
    print(f"{name}: max error at 40 steps {err:.2e}")
    assert err < (0.15 if name in ("ddim", "euler") else 5e-2)  # first order from sigma = 80: 0.107


@pytest.mark.parametrize("name, options", [("hb", {"beta": 0.8}), ("ghvb", {"momentum": 3.8}),
                                           ("hb", {"base": "dpmsolver++", "beta": 0.9})])
def test_momentum_converges_with_steps(k_sampling, name, options):
    errors = []
    for n in (10, 20, 40):
        sigmas = karras(k_sampling, n)
        x = x_T(sigmas, n=8)
        exact = mixture_pf_ode_solution(MIX, EDMSchedule(1e-4, 200.0), x, SIGMA_MAX)
        errors.append((getattr(K, f"sample_{name}")(Model(), x, sigmas, disable=True, **options) - exact).abs().max().item())
    print(name, options, errors)
    assert errors[2] < errors[1] < errors[0]


def test_time_shift_runs_and_window_zero_is_the_plain_solver(k_sampling):
    sigmas = karras(k_sampling, 10)
    x = x_T(sigmas)
    plain = K.sample_ddim(Model(), x, sigmas, disable=True)
    assert torch.equal(K.sample_time_shift(Model(), x, sigmas, disable=True, window=0.0, cutoff=0.01), plain)
    exact = mixture_pf_ode_solution(MIX, EDMSchedule(1e-4, 200.0), x, SIGMA_MAX)
    base = (plain - exact).abs().max().item()
    for mode in ("target", "model"):
        shifted = K.sample_time_shift(Model(), x, sigmas, disable=True, window=0.5, cutoff=0.5, mode=mode,
                                      data_variance=0.4)
        err = (shifted - exact).abs().max().item()
        print(f"time shift ({mode}): max error {err:.3f}, plain DDIM {base:.3f}")
        assert torch.isfinite(shifted).all() and not torch.equal(shifted, plain)
        assert err < 2 * base


def test_positive_final_sigma_stops_there(k_sampling):
    sigmas = karras(k_sampling, 8)[:-1]  # ends at sigma_min, not 0
    x = x_T(sigmas)
    got = K.sample_euler(Model(), x, sigmas, disable=True)
    ref = k_sampling.sample_euler(Model(), x, sigmas, disable=True)
    assert (got - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("sigmas", [[1.0, 2.0, 0.0], [3.0, 3.0, 0.0], [1.0], [2.0, -1.0], [float("nan"), 0.0],
                                    [[2.0, 0.0]]])
def test_bad_sigmas_are_refused(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        K.sample_euler(Model(), torch.zeros(2, 4, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64))


@pytest.mark.parametrize("call, match", [
    (lambda m, x, s: K.sample_dpmpp_2m(m, x, s, ordr=2), "bad option"),
    (lambda m, x, s: K.sample_euler(m, x, s, s_churn=1.0), "s_churn"),
    (lambda m, x, s: K.sample_euler(m, x, s, noise_sampler=lambda a, b: a), "deterministic"),
    (lambda m, x, s: K.sample_dpmpp_2m_sde(m, x, s, eta=0.5), "eta = 1"),
    (lambda m, x, s: K.sample_time_shift(m, x, s, window=1.0, cutoff=0.1, mode="both"), "mode"),
    (lambda m, x, s: K.sample_euler(m, x.long(), s), "floating-point"),
])
def test_bad_options_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(Model(), torch.zeros(2, 4, dtype=torch.float64), torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64))


def test_k_diffusion_no_op_options_are_accepted(k_sampling):
    sigmas = karras(k_sampling, 5)
    x = x_T(sigmas)
    plain = K.sample_heun(Model(), x, sigmas, disable=True)
    same = K.sample_heun(Model(), x, sigmas, disable=True, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)
    assert torch.equal(plain, same)
