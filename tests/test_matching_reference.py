"""Each matching trainer has one setting that is its reference code, checked here by computing the
reference's formula beside fewstep's on the same inputs (issue 24).

SIM (Luo et al. 2024): the default ``sim`` objective is SIM's own loss, whose mean gradient is the
gradient of SIM's divergence on the exact Gaussian toy of research note 9.3; ``dmd_normaliser`` adds
DMD's per-example weight (SiD's code has it, so it is SiD's default) and then the mean is another
vector.

f-distill (Xu, Nie & Vahdat 2025) against NVIDIA FastGen (``fastgen/methods/distribution_matching/
f_distill.py`` and ``dmd2.py``): ``reference="fastgen"`` gives FastGen's update count per generator
update, its ratio EMA's start and its time bins; the default ``"dmd2"`` keeps DMD2's count.
"""

from __future__ import annotations

import pytest
import torch

from fewstep.distill.fdiv import dmd_normaliser, sim_distance_grad, sim_generator_loss

from test_fdiv import F64, fd_grad, noise_grid, sim_objective, xhat_p, xhat_q

# ---------------------------------------------------------------------------------------------
# SIM


def _estimator_mean(loss_fn, mu0=0.5, s0=1.2, a=0.8, sg=0.6):
    """The mean over the student's noise of d loss / d(mu, s), the online score psi being the exact student
    score at theta0 (fixed parameters, differentiable input), as tests/test_fdiv.py does."""
    z, e, w = noise_grid()
    theta = torch.tensor([mu0, s0], dtype=F64, requires_grad=True)
    x = (theta[0] + theta[1] * z)[:, None]
    xt = a * x[:, 0] + sg * e
    loss = loss_fn(x, xhat_p(xt, a, sg)[:, None], xhat_q(xt, mu0, s0, a, sg)[:, None])
    (w * loss).sum().backward()
    return theta.grad


def _cosine(u, v):
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("distance,c", [("pseudo_huber", 0.5), ("l2", 0.0)])
def test_sims_default_loss_is_the_gradient_of_sims_divergence(distance, c):
    """No weight (SIM's own loss): the estimator's mean equals the finite-difference gradient of
    D(theta) = E_{x_t ~ q_sg(theta), t} d(x_hat_teacher - x_hat_q_theta)."""
    mu0, s0, a, sg = 0.5, 1.2, 0.8, 0.6
    got = _estimator_mean(lambda x, tp, tq: sim_generator_loss(x, tp, tq, "sim", distance, c))
    expected = fd_grad(lambda m, s: sim_objective(distance, c, m, s, mu0, s0, a, sg), mu0, s0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_sim_with_dmd_normaliser_is_the_normalised_formula_and_not_the_divergences_gradient():
    """``dmd_normaliser``: each example's SIM gradient times sg(1 / (mean|x - x_hat_teacher| + 1e-6)),
    written out here as the formula; its mean is not the divergence's gradient."""
    mu0, s0, a, sg, c = 0.5, 1.2, 0.8, 0.6, 0.5
    got = _estimator_mean(lambda x, tp, tq: sim_generator_loss(x, tp, tq, "sim", "pseudo_huber", c, normalise=True))

    def formula(x, tp, tq):  # DMD / SiD: loss / sg(mean_{C,H,W} |x - x_hat_teacher|)
        u = sim_distance_grad(tp - tq, "pseudo_huber", c)
        return (u * (tq - x)).sum(1) / ((x - tp).abs().mean(1) + 1e-6).detach()

    torch.testing.assert_close(got, _estimator_mean(formula), rtol=1e-10, atol=1e-12)
    expected = fd_grad(lambda m, s: sim_objective("pseudo_huber", c, m, s, mu0, s0, a, sg), mu0, s0)
    assert _cosine(got, expected) < 0.99, _cosine(got, expected)


def test_sid_keeps_sids_normaliser_by_default():
    """SiD's code (training/sid_loss.py): loss = (f_phi - f_psi)((f_phi - x) - alpha (f_phi - f_psi)),
    divided by sg(mean|x - f_phi|) (clip 1e-5; fewstep adds 1e-6 as DMD does)."""
    g = torch.Generator().manual_seed(0)
    x, f_phi, f_psi = (torch.randn(3, 1, 4, 4, generator=g, dtype=F64) for _ in range(3))
    alpha = 1.2
    theirs = ((f_phi - f_psi) * ((f_phi - x) - alpha * (f_phi - f_psi))).sum([1, 2, 3])
    theirs = theirs / (x - f_phi).abs().mean([1, 2, 3]).clip(min=1e-5)
    ours = sim_generator_loss(x, f_phi, f_psi, "sid", sid_alpha=alpha, normalise=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert torch.allclose(ours, sim_generator_loss(x, f_phi, f_psi, "sid", sid_alpha=alpha) * dmd_normaliser(x, f_phi))


# ---------------------------------------------------------------------------------------------
# f-distill against NVIDIA FastGen


def fastgen_iterations(n_iterations: int, student_update_freq: int) -> list[str]:
    """FastGen's loop (trainer.py: ``for iter_cur in range(iter_start + 1, max_iter)``) and
    DMD2Model.single_train_step: ``iteration % student_update_freq == 0`` -> student, else critics."""
    return ["student" if it % student_update_freq == 0 else "critics" for it in range(1, n_iterations + 1)]


def fastgen_h(fake_logits, t, bins, min_t, max_t, ema_rate, lower=0.1, upper=20.0):
    """FdistillModel._get_f_div_weighting_h, transcribed (f = js: 1 - 1 / (1 + r); one process).
    ``bins`` is the persistent buffer (``torch.ones(bin_num)`` at build time); returns ``(h, bins)``."""
    bin_num = len(bins)
    ratio = torch.exp(torch.clamp(fake_logits.float().mean(dim=1), min=-10.0, max=10.0))
    ratio = torch.clamp(ratio, lower, upper)
    bin_width = (max_t - min_t) / bin_num
    idx = ((t.double() - min_t) / bin_width).floor().long().clamp(0, bin_num - 1)
    cnt = torch.bincount(idx, minlength=bin_num).float()
    ratio_sum = torch.bincount(idx, weights=ratio, minlength=bin_num).float()
    valid = cnt > 0
    new_vals = ratio_sum / (cnt + 1e-6)
    bins = bins.float().clone()
    bins[valid] = bins[valid] * ema_rate + (1 - ema_rate) * new_vals[valid]
    ratio = ratio / (bins[idx] + 1e-6)
    h = 1 - 1 / (1 + ratio)
    h = h / (h.sum() / len(h) + 1e-6)
    return h, bins


def _tiny_method(**kw):
    """A DistributionMatching on a tiny UNet with diffusers' default 1000-step DDPM schedule (FastGen's
    AlphasNoiseSchedule: t = index / 1000 in [0, 0.999])."""
    from diffusers import DDPMScheduler, UNet2DModel

    from fewstep.samplers.schedules import DiscreteVPSchedule

    from test_matching import TINY_UNET

    from fewstep.distill.matching import DistributionMatching

    torch.manual_seed(0)
    schedule = DiscreteVPSchedule.from_diffusers_config(DDPMScheduler().config)
    return DistributionMatching(UNet2DModel(**TINY_UNET), "epsilon", schedule, **kw)


class _Ctx:
    """What ``_ratio_weight`` reads of the core's StepContext: one process, micro-batch ``micro``."""

    def __init__(self, method, micro=0, accumulation=1):
        from types import SimpleNamespace

        self.micro, self.config = micro, SimpleNamespace(accumulation=accumulation)
        self.state = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1), unwrapped=lambda name: method.stats)


def _batch(seed, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 1.5, torch.randint(0, 1000, (n,), generator=g)


def test_fastgens_student_update_freq_5_is_4_critic_updates_per_generator_update_and_dmd2s_is_5():
    from fewstep.distill.matching import updates_at

    theirs = fastgen_iterations(100, 5)
    ours = [updates_at(step, 5, "fastgen") for step in range(100)]
    assert [("student" if g else "critics") for c, g in ours] == theirs
    assert all(c != g for c, g in ours)  # one or the other, never both
    assert theirs.count("critics") / theirs.count("student") == 4
    dmd2 = [updates_at(step, 5, "dmd2") for step in range(100)]
    assert sum(c for c, _ in dmd2) / sum(g for _, g in dmd2) == 5


def test_with_reference_fastgen_the_ratio_weight_is_fastgens_over_two_generator_steps():
    """Same logits and timesteps: h and the stored bin means equal FastGen's, whose EMA starts at ones
    and whose bins cut the whole range [0, 0.999] (t = index / 1000); the default differs in both."""
    method = _tiny_method(reference="fastgen", f="js", discriminator=True, real_data=True, ratio_ema=0.5)
    bins = torch.ones(10)
    for seed in (0, 1):
        logit, t = _batch(seed)
        h_theirs, bins = fastgen_h(logit[:, None], t.double() / 1000, bins, 0.0, 0.999, 0.5)
        h_ours = method._ratio_weight(_Ctx(method), logit, t.double())
        torch.testing.assert_close(h_ours.float(), h_theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.stats.means, bins, rtol=1e-5, atol=1e-6)
    default = _tiny_method(f="js", discriminator=True, real_data=True, ratio_ema=0.5)
    logit, t = _batch(0)
    h_default = default._ratio_weight(_Ctx(default), logit, t.double())
    h_fastgen, _ = fastgen_h(logit[:, None], t.double() / 1000, torch.ones(10), 0.0, 0.999, 0.5)
    assert (h_default.float() - h_fastgen).abs().max() > 0.05


def test_the_ema_starts_at_the_first_batch_by_default_and_at_ones_with_fastgen():
    from fewstep.distill.fdiv import bin_totals, normalise_by_bins, time_bins

    logit, t = _batch(0)
    r = torch.exp(logit.clamp(-10, 10)).clamp(0.1, 20.0)
    bins = time_bins(t.double(), 0, 999, 10)
    sums, counts = bin_totals(r, bins, 10)
    _, first = normalise_by_bins(r, bins, sums, counts, None, 0.5)  # fewstep's default: the batch means
    _, ones = normalise_by_bins(r, bins, sums, counts, torch.ones(10), 0.5)  # FastGen's buffer
    _, theirs = fastgen_h(logit[:, None], t.double() / 1000, torch.ones(10), 0.0, 0.999, 0.5)
    torch.testing.assert_close(ones, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first, sums / counts)
    torch.testing.assert_close(ones, 0.5 + 0.5 * sums / counts)
    # with FastGen's default rate 0 the two starts agree
    _, a = normalise_by_bins(r, bins, sums, counts, None, 0.0)
    _, b = normalise_by_bins(r, bins, sums, counts, torch.ones(10), 0.0)
    torch.testing.assert_close(a, b)


def test_fastgens_bins_cut_the_whole_range_and_the_defaults_the_sampled_one():
    """Bin edges per integer timestep of a 1000-step schedule: FastGen's floor((t - min_t) / width) on
    [0, 0.999] with t = index / 1000, against fewstep's time_bins on [0, 999] (fastgen) and on the
    sampled [20, 980] (dmd2, min_t 0.02, max_t 0.98: DMD2's U{20, .., 980})."""
    from fewstep.distill.fdiv import time_bins

    t = torch.arange(1000)
    theirs = ((t.double() / 1000 - 0.0) / ((0.999 - 0.0) / 10)).floor().long().clamp(0, 9)
    fastgen, dmd2 = _tiny_method(reference="fastgen"), _tiny_method()
    assert fastgen._bin_range() == (0, 999) and dmd2._bin_range() == (20, 980)
    assert torch.equal(time_bins(t.double(), *fastgen._bin_range(), 10), theirs)
    sampled = t[20:981]

    def first_of_each_bin(times, b):
        return [int(times[b == k].min()) for k in range(10)]

    assert first_of_each_bin(t, theirs) == [100 * k for k in range(10)]
    ours = time_bins(sampled.double(), *dmd2._bin_range(), 10)
    assert first_of_each_bin(sampled, ours) == [20 + 96 * k for k in range(10)]


def test_with_gradient_accumulation_the_bin_statistics_cover_every_micro_batch():
    """Micro-batch k normalises by the bin totals of micro-batches 0..k, and the stored means are the
    whole optimizer step's (before issue 24: the last micro-batch's only)."""
    from fewstep.distill.fdiv import bin_totals, density_ratio, time_bins

    method = _tiny_method(f="js", discriminator=True, real_data=True, ratio_ema=0.0)
    (l0, t0), (l1, t1) = _batch(0, 16), _batch(1, 16)
    method._ratio_weight(_Ctx(method, 0, 2), l0, t0.double())
    assert torch.equal(method.stats.means, torch.ones(10)) and not bool(method.stats.started)  # not stored yet
    h1 = method._ratio_weight(_Ctx(method, 1, 2), l1, t1.double())
    r = density_ratio(torch.cat([l0, l1]))
    bins = time_bins(torch.cat([t0, t1]).double(), *method._bin_range(), 10)
    sums, counts = bin_totals(r, bins, 10)
    whole = torch.where(counts > 0, sums / counts.clamp_min(1), torch.ones(10))
    torch.testing.assert_close(method.stats.means, whole)
    last_only = bin_totals(r[16:], bins[16:], 10)
    assert not torch.allclose(method.stats.means, last_only[0] / last_only[1].clamp_min(1))
    rn = r[16:] / whole[bins[16:]]  # micro-batch 1 by the whole step's means, then h / mean h
    torch.testing.assert_close(h1, (rn / (rn + 1)) / ((rn / (rn + 1)).mean() + 1e-6), rtol=1e-5, atol=1e-6)


def test_update_counts_in_training_and_resume_refuses_a_changed_reference(tmp_path):
    """Ten core steps at update_ratio 5: the optimizers' step counts are FastGen's (2 generator, 8 fake
    score) with reference fastgen and DMD2's (2, 10) by default; a run cannot resume under the other one."""
    from fewstep.distill.core import CoreConfig, Refused, fit

    def run(reference, out):
        method = _tiny_method(reference=reference, update_ratio=5)
        config = CoreConfig(output_dir=str(out), steps=10, batch_size=2, checkpoint_every=10, progress=False,
                            cpu=True)
        state = fit(method, config, None, log=lambda *_: None).state
        return {name: int(next(iter(opt.state.values()))["step"]) for name, opt in state.optimizers.items()}

    theirs = fastgen_iterations(10, 5)
    expected = {"generator": theirs.count("student"), "fake": theirs.count("critics")}
    assert run("fastgen", tmp_path / "fastgen") == expected
    assert run("dmd2", tmp_path / "dmd2") == {"generator": 2, "fake": 10}
    with pytest.raises(Refused, match="reference"):
        run("dmd2", tmp_path / "fastgen")
