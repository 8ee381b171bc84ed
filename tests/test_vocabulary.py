"""Schedules, timestep grids and denoiser wrappers: the shared vocabulary, checked against closed forms
and against diffusers."""


import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from fewstep.samplers import (CFGDenoiser, ContinuousVPSchedule, DiffusersSpacing, DiscreteVPSchedule, EDMSchedule,
                      ExplicitTimesteps, FlowMatchingSchedule, Grid, Karras, LogSNRUniform, ModelDenoiser,
                      TimeQuadratic, TimeUniform, convert_prediction, make_timesteps)
from fewstep.samplers.denoisers import dynamic_threshold

F64 = torch.float64
SCHEDULES = {
    "discrete_linear": DiscreteVPSchedule.from_diffusers_config({}),
    "discrete_scaled": DiscreteVPSchedule.from_diffusers_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    "discrete_cosine": DiscreteVPSchedule.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2"}),
    "vp_linear": ContinuousVPSchedule("linear"),
    "vp_cosine": ContinuousVPSchedule("cosine"),
    "edm": EDMSchedule(),
    "flow": FlowMatchingSchedule(),
}


def interior_times(s, n=101):
    return torch.linspace(s.t_min, s.t_max, n, dtype=F64)


# -- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_log_snr_inverse_round_trips(name):
    s = SCHEDULES[name]
    t = interior_times(s)
    assert torch.allclose(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-9, atol=1e-9 * s.t_max)
    assert torch.allclose(s.t_from_sigma_bar(s.sigma_bar(t)), t, rtol=1e-9, atol=1e-9 * s.t_max)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_alpha_sigma_are_consistent_with_log_snr(name):
    s = SCHEDULES[name]
    t = interior_times(s)
    assert torch.allclose(torch.log(s.alpha(t) / s.sigma(t)), s.log_snr(t), atol=1e-9)
    assert torch.all(s.log_snr(t)[1:] < s.log_snr(t)[:-1])  # noise grows with t
    if s.variance_preserving:
        assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)


@pytest.mark.parametrize("config", [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
    {"trained_betas": np.linspace(1e-4, 0.02, 500).tolist()},
])
def test_discrete_schedule_equals_diffusers_alphas_cumprod(config):
    ours = DiscreteVPSchedule.from_diffusers_config(config)
    ref = DDIMScheduler(**config).alphas_cumprod.double()
    t = torch.arange(len(ref), dtype=F64)
    ac = ours.alpha(t) ** 2
    if config.get("rescale_betas_zero_snr"):  # zero terminal SNR is clamped to a tiny positive value
        assert 0 < ac[-1] < ac[-2]
        ac, ref = ac[:-1], ref[:-1]
    assert torch.allclose(ac, ref, rtol=1e-12, atol=0)


def test_discrete_schedule_interpolates_log_snr_linearly_between_timesteps():
    s = SCHEDULES["discrete_linear"]
    lam = s.log_snr(torch.tensor([10.0, 11.0, 10.25], dtype=F64))
    assert lam[2].item() == pytest.approx(0.75 * lam[0].item() + 0.25 * lam[1].item(), rel=1e-12)


def test_continuous_vp_linear_matches_song_et_al():
    s = SCHEDULES["vp_linear"]
    t = torch.tensor([0.3, 0.9], dtype=F64)
    log_alpha = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1
    assert torch.allclose(s.alpha(t), torch.exp(log_alpha), rtol=1e-14)


@pytest.mark.parametrize("ctor,match", [
    (lambda: DiscreteVPSchedule.from_diffusers_config({"beta_schedule": "bogus"}), "beta_schedule"),
    (lambda: DiscreteVPSchedule([0.5, 0.9]), "strictly decreasing"),
    (lambda: ContinuousVPSchedule("quadratic"), "unknown continuous"),
    (lambda: EDMSchedule(sigma_min=5, sigma_max=1), "sigma_min"),
    (lambda: SCHEDULES["edm"].alpha(100.0), "outside"),
    (lambda: SCHEDULES["discrete_linear"].sigma(-1.0), "outside"),
])
def test_bad_schedules_raise(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


# -- timestep grids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 50])
def test_diffusers_spacings_equal_ddim_timesteps(spacing, n):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(n)
    ours = DiffusersSpacing(spacing, steps_offset=1 if spacing == "leading" else 0)
    assert ours.times(SCHEDULES["discrete_linear"], n).long().tolist() == ref.timesteps.tolist()


def test_trailing_equals_dpm_solver_timesteps():
    ref = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ref.set_timesteps(12)
    assert DiffusersSpacing("trailing").times(SCHEDULES["discrete_linear"], 12).long().tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", [TimeUniform(), TimeQuadratic(), LogSNRUniform(), Karras(7.0)])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_continuous_grids_descend_and_hit_their_ends(spacing, name):
    s = SCHEDULES[name]
    for final in ["zero", "t_min"]:
        g = spacing.grid(s, 8, final=final)
        assert g.n_steps == 8
        assert g.t[0].item() == pytest.approx(s.t_max)
        assert torch.all(g.log_snr[1:] > g.log_snr[:-1])
        if final == "zero":
            assert g.ends_at_data and g.t[-2].item() == pytest.approx(s.t_min, rel=1e-9, abs=1e-12)
        else:
            assert g.t[-1].item() == pytest.approx(s.t_min, rel=1e-9, abs=1e-12)


def test_grid_spacings_are_what_they_say():
    s = SCHEDULES["vp_linear"]
    lam = LogSNRUniform().grid(s, 6, final="t_min").log_snr
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(6), rtol=1e-9)
    sb = Karras(rho=7.0).grid(s, 6, final="t_min").sigma_bar
    assert torch.allclose((sb ** (1 / 7)).diff(), (sb ** (1 / 7)).diff()[0].expand(6), rtol=1e-9)
    tq = TimeQuadratic().grid(s, 6, final="t_min").t
    u = torch.sqrt((tq - s.t_min) / (s.t_max - s.t_min))
    assert torch.allclose(u.diff(), u.diff()[0].expand(6), rtol=1e-9)


def test_karras_on_edm_matches_the_paper_formula():
    g = Karras(7.0).grid(EDMSchedule(0.002, 80.0), 5, final="zero")
    i = torch.arange(5, dtype=F64)
    ref = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(g.sigma[:-1], ref, rtol=1e-12) and g.sigma[-1] == 0


@pytest.mark.parametrize("bad,match", [
    (lambda: TimeUniform().grid(SCHEDULES["vp_linear"], 0), ">= 1"),
    (lambda: TimeUniform().grid(SCHEDULES["vp_linear"], -3), ">= 1"),
    (lambda: make_timesteps("fibonacci"), "unknown timesteps"),
    (lambda: DiffusersSpacing("sideways"), "unknown timestep spacing"),
    (lambda: DiffusersSpacing("leading").grid(SCHEDULES["edm"], 5), "DiscreteVPSchedule"),
    (lambda: DiffusersSpacing("leading").grid(SCHEDULES["discrete_linear"], 5000), "exceed"),
    (lambda: TimeUniform(t_start=0.1, t_end=0.5).grid(SCHEDULES["vp_linear"], 4), "above"),
    (lambda: TimeUniform(t_start=3.0).grid(SCHEDULES["vp_linear"], 4), "outside"),
    (lambda: ExplicitTimesteps([500, 900, 100]).grid(SCHEDULES["discrete_linear"], 3), "decreasing"),
    (lambda: ExplicitTimesteps([900, 500]).grid(SCHEDULES["discrete_linear"], 3), "explicit"),
    (lambda: Karras(rho=0), "rho"),
])
def test_bad_grids_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# -- denoisers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eps", "epsilon", "x0", "sample", "v", "v_prediction", "flow"])
def test_prediction_types_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    s = FlowMatchingSchedule() if kind == "flow" else SCHEDULES["vp_cosine"]
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    a, sg = s.alpha(t), s.sigma(t)
    x = a[:, None] * x0 + sg[:, None] * eps
    output = {"eps": eps, "x0": x0, "v": a[:, None] * eps - sg[:, None] * x0, "flow": eps - x0}
    canon = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}.get(kind, kind)
    extra = dict(alpha_dot=s.alpha_dot(t), sigma_dot=s.sigma_dot(t)) if kind == "flow" else {}
    pred = convert_prediction(output[canon], x, a, sg, kind, **extra)
    assert torch.allclose(pred.x0, x0, atol=1e-12) and torch.allclose(pred.eps, eps, atol=1e-12)


def test_model_denoiser_reads_diffusers_style_outputs_and_learned_variance():
    class Net(torch.nn.Module):
        def forward(self, x, t):
            from types import SimpleNamespace
            return SimpleNamespace(sample=torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1))

    den = ModelDenoiser(Net(), SCHEDULES["discrete_linear"], "epsilon")
    x = torch.randn(2, 3, 4, 4)
    pred = den(x, 500.0)
    assert torch.equal(pred.eps, torch.zeros_like(x))


@pytest.mark.parametrize("bad,match", [
    (lambda: ModelDenoiser(lambda x, t: x, SCHEDULES["vp_linear"], "score"), "unknown prediction type"),
    (lambda: ModelDenoiser(lambda x, t: x, SCHEDULES["vp_linear"], "flow"), "flow"),
    (lambda: ModelDenoiser(lambda x, t: x[:, :1], SCHEDULES["vp_linear"])(torch.zeros(2, 3, 4, 4), 0.5),
     "does not match"),
    (lambda: ModelDenoiser(lambda x, t: x, SCHEDULES["vp_linear"])(torch.zeros(2, 3), torch.tensor([0.5, 0.5, 0.5])),
     "per-sample"),
    (lambda: ModelDenoiser(lambda x, t: x, SCHEDULES["vp_linear"], clip=1.0, dynamic_threshold=(0.9, 1.0)),
     "either"),
])
def test_bad_denoisers_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_model_time_and_per_sample_times_reach_the_network():
    seen = {}

    def net(x, t):
        seen["t"] = t
        return torch.zeros_like(x)

    den = ModelDenoiser(net, SCHEDULES["vp_linear"], model_time=lambda t: 1000 * t)
    den(torch.zeros(3, 2), torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    assert torch.allclose(seen["t"], torch.tensor([100.0, 200.0, 300.0]))
    den(torch.zeros(3, 2), 0.5)
    assert seen["t"].shape == (3,)


def test_clipping_and_dynamic_thresholding_keep_the_pair_consistent():
    s = SCHEDULES["vp_linear"]
    net = lambda x, t: torch.full_like(x, 3.0)  # noqa: E731  x0 prediction far outside [-1, 1]
    x = torch.randn(4, 8, dtype=F64)
    for den in [ModelDenoiser(net, s, "x0", clip=1.0), ModelDenoiser(net, s, "x0", dynamic_threshold=(0.9, 2.0))]:
        pred = den(x, 0.5)
        a, sg = s.alpha(0.5).item(), s.sigma(0.5).item()
        assert pred.x0.abs().max() <= 1.0 + 1e-12
        assert torch.allclose(a * pred.x0 + sg * pred.eps, x, atol=1e-12)
    y = dynamic_threshold(torch.tensor([[0.5, -0.2]]), 0.995, 1.0)
    assert torch.equal(y, torch.tensor([[0.5, -0.2]]))  # inside [-1, 1]: untouched


def test_cfg_interpolates_and_extrapolates():
    s = SCHEDULES["vp_linear"]
    cond = ModelDenoiser(lambda x, t: torch.ones_like(x), s)
    uncond = ModelDenoiser(lambda x, t: torch.zeros_like(x), s)
    x = torch.randn(2, 3, dtype=F64)
    for w in [0.0, 1.0, 7.5]:
        pred = CFGDenoiser(cond, uncond, w)(x, 0.4)
        assert torch.allclose(pred.eps, torch.full_like(x, w))
        a, sg = s.alpha(0.4).item(), s.sigma(0.4).item()
        assert torch.allclose(a * pred.x0 + sg * pred.eps, x, atol=1e-12)
    with pytest.raises(ValueError, match="share one schedule"):
        CFGDenoiser(cond, ModelDenoiser(lambda x, t: x, ContinuousVPSchedule("cosine")), 2.0)


def test_grid_dataclass_from_times_with_zero_length_final_step():
    # diffusers' PNDM on "leading" with set_alpha_to_one=False ends on t = 0 = t_min: a no-op step.
    s = SCHEDULES["discrete_linear"]
    g = Grid.from_times(s, torch.tensor([500.0, 0.0], dtype=F64), final="t_min")
    assert g.log_snr[-1] == g.log_snr[-2]


def test_trailing_spacing_has_exactly_n_distinct_timesteps_for_every_n():
    # np.arange(T, 0, -T / n) yields n + 1 points for some n (61, 103, ...) when float rounding leaves its
    # end just above 0, which became timestep -1.
    from fewstep.samplers.schedules import DiscreteVPSchedule
    from fewstep.samplers.timesteps import DiffusersSpacing

    schedule = DiscreteVPSchedule.from_diffusers_config({})
    for n in range(1, 1001):
        t = DiffusersSpacing("trailing").times(schedule, n)
        assert len(t) == n and len(set(t.tolist())) == n and t.min() >= 0 and t.max() == 999, n
