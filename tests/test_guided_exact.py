"""Guided distillation checked exactly: a class-conditional Gaussian mixture whose guided teacher
``x0_u + w (x0_c - x0_u)`` is known in closed form at every ``w`` (``testbed.conditional``).

Each trainer's guided target (PD, MCM, f-distill / SIM) is recomputed here from this file's own closed form
with the pure functions of ``distill.targets`` / ``distill.fdiv`` and compared with what the trainer's
``train_step`` produces; a PD student trained through ``fit`` on the guided exact teacher reproduces two
guided DDIM steps. Everything but the toy training is float64 and exact to round-off.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.distill.conditioning import Conditioning, Guidance, GuidedDenoiser
from fewstep.distill.consistency import MultistepConsistency, consistency_loss
from fewstep.distill.core import CoreConfig, OptimizerConfig, fit
from fewstep.distill.fdiv import dmd_normaliser, matching_gradient, sim_loss, vsd_loss
from fewstep.distill.matching import DistributionMatching
from fewstep.distill.progressive import ProgressiveDistillation, progressive_loss
from fewstep.distill.targets import (addim_transfer, consistency_target, ddim_transfer, inverse_ddim,
                                     progressive_target, pseudo_huber, snr_plus_one_weight)
from fewstep.samplers import DiscreteVPSchedule, ModelDenoiser
from fewstep.samplers.denoisers import Denoiser, Prediction
from fewstep.samplers.timesteps import DiffusersSpacing
from fewstep.testbed import GaussianMixture
from fewstep.testbed.conditional import ConditionalExactDenoiser

F64 = torch.float64
K = 3  # classes 0..2, null class 3
MIXTURE = GaussianMixture(torch.tensor([[-2.0, 0.5], [0.5, -1.5], [2.5, 1.0]]),
                          torch.tensor([[0.20, 0.30], [0.30, 0.10], [0.10, 0.25]]), torch.tensor([0.5, 0.3, 0.2]))
FAKE_MIXTURE = GaussianMixture(MIXTURE.means + torch.tensor([0.4, -0.3], dtype=F64), 0.5 * MIXTURE.variances,
                               torch.tensor([0.2, 0.3, 0.5]))  # a fake score that is not the teacher
SCHEDULE = DiscreteVPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000))  # DDPM's linear schedule
NULL = {"class_labels": torch.tensor([K])}


# ---------------------------------------------------------------------------------------------
# The closed form, written out here (not through GuidedDenoiser nor GaussianMixture.posterior)


def closed_form(mixture: GaussianMixture, x, t, labels, w) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` of CFG at scale ``w`` (scalar or ``[B]``) of the component-conditional mixture at
    ``x_t = x [B, D]``: per component (Bishop 2.116) ``x0_k = m_k + a v_k (x - a m_k) / s_k^2``,
    ``eps_k = s (x - a m_k) / s_k^2``, ``s_k^2 = a^2 v_k + s^2``; conditional = component ``c``,
    unconditional = their mix by ``r_k ∝ w_k N(x; a m_k, s_k^2)``; guided = ``u + w (c - u)``."""
    x = x.to(F64)
    t = torch.as_tensor(t, dtype=F64).expand(len(x))
    a, s = SCHEDULE.alpha(t)[:, None, None], SCHEDULE.sigma(t)[:, None, None]
    m, v = mixture.means, mixture.variances
    s2 = a**2 * v + s**2  # [B, K, D]
    d = x[:, None] - a * m
    x0_k, eps_k = m + a * v * d / s2, s * d / s2
    r = torch.softmax(torch.log(mixture.weights) - 0.5 * (d**2 / s2 + torch.log(s2)).sum(-1), -1)[..., None]
    x0_u, eps_u = (r * x0_k).sum(1), (r * eps_k).sum(1)
    rows = torch.arange(len(x))
    x0_c, eps_c = x0_k[rows, labels], eps_k[rows, labels]
    w = torch.as_tensor(w, dtype=F64).reshape(-1, 1)
    return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)


def guided_x0(x, t, labels, w, mixture=MIXTURE):
    return closed_form(mixture, x, t, labels, w)[0]


def _points(rows: int, seed: int = 0):
    """``x_t`` in [-4, 4]^2, times over the whole schedule (including near data and pure noise), labels."""
    g = torch.Generator().manual_seed(seed)
    x = 8 * torch.rand(rows, 2, generator=g, dtype=F64) - 4
    ends = torch.tensor([0.0, 1.0, 998.0, 999.0], dtype=F64)
    t = torch.cat([ends, 999 * torch.rand(rows - 4, generator=g, dtype=F64)])
    return x, t, torch.randint(0, K, (rows,), generator=g)


def _pd_coef(grid, k):
    return grid.alpha[k], grid.sigma[k]


class FakeContext:
    """What ``train_step`` reads of a ``StepContext``: networks, seeded float64 draws, and an ``update``
    that only records the loss."""

    def __init__(self, nets: dict, seed: int = 0, step: int = 0):
        self.nets, self.step, self.round, self.micro = nets, step, 0, 0
        self.generator = torch.Generator().manual_seed(seed)
        self.losses = {}
        self.state = SimpleNamespace(unwrapped=lambda name: nets[name])

    def randn(self, *shape):
        return torch.randn(shape, generator=self.generator, dtype=F64)

    def rand(self, rows):
        return torch.rand(rows, generator=self.generator, dtype=F64)

    def randint(self, high, rows):
        return torch.randint(0, high, (rows,), generator=self.generator)

    def net(self, name):
        return self.nets[name]

    def update(self, name, loss):
        self.losses[name] = loss.detach()
        return loss.detach()


class WStudent(ConditionalExactDenoiser):
    """A student of the w-conditioned kind: takes ``guidance_scale`` (and records it), then ignores it."""

    def __init__(self, mixture=MIXTURE):
        super().__init__(mixture, SCHEDULE)
        self.seen_w = []

    def forward(self, x, t, class_labels=None, guidance_scale=None):
        self.seen_w.append(guidance_scale)
        return super().forward(x, t, class_labels)


class Recorder(Denoiser):
    """A denoiser that records every call's ``(x, t, cond)`` and prediction."""

    def __init__(self, inner: Denoiser):
        super().__init__()
        self.inner, self.schedule, self.calls = inner, inner.schedule, []

    def forward(self, x, t, **cond):
        pred = self.inner(x, t, **cond)
        self.calls.append(SimpleNamespace(x=x, t=t, cond=cond, x0=pred.x0))
        return pred


# ---------------------------------------------------------------------------------------------
# The conditional exact denoiser and GuidedDenoiser over it


def test_the_conditional_exact_denoiser_is_one_component_per_class_and_the_mixture_for_the_null_class():
    x, t, labels = _points(256)
    den = ConditionalExactDenoiser(MIXTURE, SCHEDULE)
    pred = den(x, t, class_labels=labels)
    x0_c, eps_c = closed_form(MIXTURE, x, t, labels, 1.0)
    x0_u, eps_u = closed_form(MIXTURE, x, t, labels, 0.0)
    null = den(x, t, class_labels=torch.full((256,), K))
    assert (pred.x0 - x0_c).abs().max() < 1e-12 and (pred.eps - eps_c).abs().max() < 1e-12
    assert (null.x0 - x0_u).abs().max() < 1e-12 and (null.eps - eps_u).abs().max() < 1e-12
    a, s = SCHEDULE.alpha(t)[:, None], SCHEDULE.sigma(t)[:, None]
    assert (a * pred.x0 + s * pred.eps - x).abs().max() < 1e-12  # x = alpha x0 + sigma eps
    assert (x0_c - x0_u).abs().max() > 1.0  # conditioning matters here, so the checks below can fail
    with pytest.raises(ValueError, match="class labels"):
        den(x, t, class_labels=torch.full((256,), K + 1))
    with pytest.raises(TypeError):  # a teacher never takes w
        den(x, t, class_labels=labels, guidance_scale=torch.ones(256))


@pytest.mark.parametrize("w", [1.0, 2.0, 5.0])
def test_guided_denoiser_over_the_exact_teacher_is_the_closed_form_cfg(w):
    x, t, labels = _points(256)
    guided = GuidedDenoiser(ConditionalExactDenoiser(MIXTURE, SCHEDULE), NULL, scale=w)(x, t, class_labels=labels)
    x0, eps = closed_form(MIXTURE, x, t, labels, w)
    assert (guided.x0 - x0).abs().max() < 1e-10
    assert (guided.eps - eps).abs().max() < 1e-10


def test_guided_denoiser_guides_each_example_at_its_own_guidance_scale():
    x, t, labels = _points(256)
    w = torch.tensor([1.0, 2.0, 5.0, 3.5], dtype=F64).repeat(64)
    guided = GuidedDenoiser(ConditionalExactDenoiser(MIXTURE, SCHEDULE), NULL, scale=1.0)
    pred = guided(x, t, class_labels=labels, guidance_scale=w)
    x0, eps = closed_form(MIXTURE, x, t, labels, w)
    assert (pred.x0 - x0).abs().max() < 1e-10 and (pred.eps - eps).abs().max() < 1e-10
    at_mean_w = closed_form(MIXTURE, x, t, labels, float(w.mean()))[0]
    assert (pred.x0 - at_mean_w).abs().max() > 1.0  # per-row w, not one w for the batch


# ---------------------------------------------------------------------------------------------
# Each method's guided target


class PDOracle(Denoiser):
    """A PD student that predicts, at each student point ``t = grid.t[2i]``, the closed-form target of two
    guided DDIM steps ``2i -> 2i+1 -> 2i+2`` (``progressive_target``): its PD loss is zero iff the
    trainer's teacher is the closed-form guided teacher. Guided at ``guidance_scale`` when given, else ``w``."""

    def __init__(self, grid, w: float):
        super().__init__()
        self.grid, self.w, self.schedule = grid, w, SCHEDULE

    def forward(self, x, t, class_labels, guidance_scale=None):
        w = self.w if guidance_scale is None else guidance_scale
        n = self.grid.n_steps // 2
        t = torch.as_tensor(t, dtype=F64).expand(len(x))
        i = (self.grid.t[0:2 * n:2][None] - t[:, None]).abs().argmin(1)
        coef_t, coef_mid, coef_s = ((self.grid.alpha[k], self.grid.sigma[k]) for k in (2 * i, 2 * i + 1, 2 * i + 2))
        x_hat_t = guided_x0(x, t, class_labels, w)
        z_mid = ddim_transfer(x_hat_t, x, *coef_t, *coef_mid)
        x_hat_mid = guided_x0(z_mid, self.grid.t[2 * i + 1], class_labels, w)
        target, _ = progressive_target(x_hat_t, x_hat_mid, x, coef_t, coef_mid, coef_s, last_step=i == n - 1)
        return Prediction(x0=target, x=x, alpha=coef_t[0][:, None], sigma=coef_t[1][:, None])


def _pd(conditioning, student, start_steps=8):
    return ProgressiveDistillation(ConditionalExactDenoiser(MIXTURE, SCHEDULE), "x0", SCHEDULE, start_steps=start_steps,
                                   end_steps=start_steps // 2, prediction_type="sample", student=student,
                                   conditioning=conditioning)


def _class_batch(rows: int, seed: int = 1) -> dict:
    """Conditional data: row ``i`` of class ``i % K``, drawn from its component."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % K
    x = MIXTURE.means[labels] + MIXTURE.variances[labels].sqrt() * torch.randn(rows, 2, generator=g, dtype=F64)
    return {"x": x, "cond": {"class_labels": labels}}


@pytest.mark.parametrize("w", [2.0, 5.0])
def test_pd_target_of_the_baked_teacher_is_two_closed_form_guided_ddim_steps_at_every_index(w):
    cond = Conditioning(guidance=Guidance("baked", scale=w), null=NULL)
    grid = DiffusersSpacing("trailing").grid(SCHEDULE, 8, final="zero")
    batch = _class_batch(240)
    x, labels = batch["x"], batch["cond"]["class_labels"]
    teacher = cond.teacher(ConditionalExactDenoiser(MIXTURE, SCHEDULE), SCHEDULE, "x0", batch["cond"])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    worst, best_wrong = 0.0, float("inf")
    for i in range(4):  # every student step, the last one (to clean data) included
        index = torch.full((240,), i)
        for oracle_w in (w, w + 1):
            student = cond.student(PDOracle(grid, oracle_w), SCHEDULE, "sample", batch["cond"])
            loss = progressive_loss(student, teacher, x, grid, index, noise)
            if oracle_w == w:
                worst = max(worst, float(loss.max()))
            else:
                best_wrong = min(best_wrong, float(loss.mean()))
    print(f"PD guided target, w={w}: max loss of the closed form {worst:.2e}; mean loss at w+1 >= {best_wrong:.2e}")
    assert worst < 1e-20
    assert best_wrong > 1e-4
    # the trainer's own step: draw, bind, loss; the oracle student makes it zero, a wrong-w one does not
    for oracle_w, zero in ((w, True), (w + 1, False)):
        method = _pd(cond, PDOracle(grid, oracle_w))
        ctx = FakeContext({"teacher": method.teacher, "student": method.student, "previous": method.previous})
        loss = float(method.train_step(ctx, batch)["loss"])
        assert (loss < 1e-20) if zero else (loss > 1e-3), (oracle_w, loss)


def _mcm_expected(x, noise, point, labels, w, grid, student_steps, huber_c=1e-4, xvar_frac=0.75):
    """MCM's per-example loss (Algorithm 1 with the aDDIM teacher step) from the closed form: the teacher is
    the guided closed form, the student the conditional (w = 1) closed form."""
    n = grid.n_steps // student_steps
    end = (point // n + 1) * n

    def coef(k):
        return grid.alpha[k], grid.sigma[k]

    c_t, c_s, c_end = coef(point), coef(point + 1), coef(end)
    z_t = c_t[0][:, None] * x + c_t[1][:, None] * noise
    x_teacher = guided_x0(z_t, grid.t[point], labels, w)
    x_var = xvar_frac * (x_teacher - x).square().mean(1)
    z_s = addim_transfer(x_teacher, z_t, *c_t, *c_s, x_var)
    bootstrap = (point + 1 < end)[:, None]
    t_s = torch.where(bootstrap[:, 0], grid.t[point + 1], grid.t[0])  # s = clean data (t nan) is never bootstrapped
    x_ref = guided_x0(z_s, t_s, labels, 1.0)
    target = torch.where(bootstrap, consistency_target(x_ref, z_s, z_t, c_t, c_s, c_end),
                         inverse_ddim(z_s, z_t, *c_t, *c_s))
    diff = guided_x0(z_t, grid.t[point], labels, 1.0) - target
    return snr_plus_one_weight(*c_t) * pseudo_huber(diff, huber_c)


@pytest.mark.parametrize("mode", ["baked", "conditioned"])
def test_mcm_target_of_the_guided_teacher_is_the_closed_form_one(mode):
    w_fixed = 3.0
    cond = Conditioning(guidance=Guidance(mode, scale=w_fixed, scale_range=(1.5, 6.0)), null=NULL)
    method = MultistepConsistency(ConditionalExactDenoiser(MIXTURE, SCHEDULE), "x0", SCHEDULE, student_steps=2,
                                  teacher_steps=8, teacher_steps_end=8, anneal_updates=1, prediction_type="sample",
                                  student=WStudent(), conditioning=cond)
    grid = method.grid_at(0)
    assert grid.n_steps == 8  # two segments of four teacher steps: bootstrapped points and segment ends
    batch = _class_batch(240)
    x, labels = batch["x"], batch["cond"]["class_labels"]
    # the loss function, per example, with the trainer's bound teacher and student
    ctx = FakeContext({})
    drawn = cond.draw(ctx, batch["cond"], 240)
    w = drawn.get("guidance_scale", w_fixed)
    point = torch.arange(240) % 8
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    teacher = cond.teacher(method.teacher, SCHEDULE, "x0", drawn)
    student = cond.student(method.student, SCHEDULE, "sample", drawn)
    loss = consistency_loss(student, teacher, x, grid, 2, point, noise)
    expected = _mcm_expected(x, noise, point, labels, w, grid, 2)
    wrong = _mcm_expected(x, noise, point, labels, (w + 1.0) if mode == "baked" else 3.75, grid, 2)
    print(f"MCM guided target ({mode}): max rel error {float(((loss - expected) / expected).abs().max()):.1e}, "
          f"wrong-w mean rel change {float(((wrong - expected) / expected).abs().mean()):.2f}")
    assert torch.allclose(loss, expected, rtol=1e-9, atol=0)
    assert ((wrong - expected) / expected).abs().mean() > 0.05
    # the trainer's step draws (point, noise[, w]) and binds the same way
    step_student = method.student
    step_student.seen_w.clear()
    ctx = FakeContext({"teacher": method.teacher, "student": step_student}, seed=3)
    step_loss = float(method.train_step(ctx, batch)["loss"])
    ctx2 = FakeContext({}, seed=3)
    point2, noise2 = ctx2.randint(8, 240), ctx2.randn(240, 2)
    w2 = cond.draw(ctx2, batch["cond"], 240).get("guidance_scale", w_fixed)
    assert step_loss == pytest.approx(float(_mcm_expected(x, noise2, point2, labels, w2, grid, 2).mean()), rel=1e-9)
    got_w = [s is not None for s in step_student.seen_w]
    assert all(got_w) if mode == "conditioned" else not any(got_w)


class Shift(Denoiser):
    """A fixed one-step 'generator': ``x0 = m_c + 0.5 z`` (float64); takes (and records) ``w`` like a student."""

    def __init__(self):
        super().__init__()
        self.schedule, self.seen_w, self.outputs = SCHEDULE, [], []

    def forward(self, x, t, class_labels, guidance_scale=None):
        self.seen_w.append(guidance_scale)
        x0 = MIXTURE.means[class_labels] + 0.5 * x.to(F64)
        self.outputs.append(x0)
        return Prediction(x0, x.to(F64))


@pytest.mark.parametrize("objective", ["f_distill", "sim"])
@pytest.mark.parametrize("fake_guided", [False, True])
@pytest.mark.parametrize("mode", ["baked", "conditioned"])
def test_matching_generator_loss_uses_the_closed_form_guided_teacher_and_fake(objective, fake_guided, mode):
    w_fixed = 4.0
    cond = Conditioning(guidance=Guidance(mode, scale=w_fixed, scale_range=(1.5, 6.0), fake_guided=fake_guided),
                        null=NULL)
    method = DistributionMatching(ConditionalExactDenoiser(MIXTURE, SCHEDULE), "x0", SCHEDULE, objective=objective,
                                  prediction_type="sample", update_ratio=1, generator_init=Shift(), conditioning=cond)
    teacher, generator = Recorder(method.teacher), method.generator
    fake = WStudent(FAKE_MIXTURE)  # the fake score: not the teacher, so its own null prediction is visible
    ctx = FakeContext({"teacher": teacher, "generator": generator, "fake": fake, "ratio_stats": method.stats}, seed=4)
    batch = _class_batch(240)
    labels = batch["cond"]["class_labels"]
    loss = float(method.train_step(ctx, batch)["generator"])
    # the generator step's sample x (the generator's last call), its x_t and t (the teacher's last call,
    # over the doubled batch [cond; null]) and each row's w, as the method drew them
    x = generator.outputs[-1]
    call = teacher.calls[-1]
    x_t, t = call.x[:240], call.t[:240]
    assert torch.equal(call.cond["class_labels"], torch.cat([labels, torch.full((240,), K)]))  # [cond; null]
    assert set(call.cond) == {"class_labels"}  # the teacher never gets w
    assert (generator.seen_w[-1] is not None) == (mode == "conditioned")  # w only to a w-conditioned generator
    w = generator.seen_w[-1] if mode == "conditioned" else w_fixed

    def expected(fake_w):
        x_teacher = guided_x0(x_t, t, labels, w)
        x_fake = guided_x0(x_t, t, labels, fake_w, FAKE_MIXTURE)
        if objective == "sim":
            per = sim_loss(x, x_teacher, x_fake, "pseudo_huber", 1.0)  # SIM's own loss (no DMD weight: its default)
        else:
            per = vsd_loss(x, matching_gradient(x_fake, x_teacher, 1.0, dmd_normaliser(x, x_teacher)))
        return float(per.mean()) / x[0].numel()  # the per-element mean, as the trainer divides

    right, other = expected(w if fake_guided else 1.0), expected(1.0 if fake_guided else w)
    print(f"{objective} ({mode}, fake_guided={fake_guided}): loss {loss:.6g}, closed form {right:.6g}, "
          f"other fake guidance {other:.6g}")
    assert loss == pytest.approx(right, rel=1e-5)  # float32 inside SIM's loss; f-distill's is float64
    assert abs(other - right) > 0.05 * abs(right)
    # per example: the fake score as the generator's loss sees it, guided with its own null prediction
    fake_cond = {"class_labels": labels, **({"guidance_scale": w} if mode == "conditioned" else {})}
    x_fake = cond.fake(fake, SCHEDULE, "x0", fake_cond)(x_t, t).x0
    assert (x_fake - guided_x0(x_t, t, labels, w if fake_guided else 1.0, FAKE_MIXTURE)).abs().max() < 1e-10
    if fake_guided:  # guiding by the teacher's null prediction instead would be far off
        x0_u_teacher = guided_x0(x_t, t, labels, 0.0)
        x0_c_fake = guided_x0(x_t, t, labels, 1.0, FAKE_MIXTURE)
        w_col = torch.as_tensor(w, dtype=F64).reshape(-1, 1)
        assert (x_fake - (x0_u_teacher + w_col * (x0_c_fake - x0_u_teacher))).abs().max() > 0.1


class PDOracleIgnoringW(PDOracle):
    """The PD oracle at one fixed ``w`` whatever the example's ``guidance_scale``."""

    def forward(self, x, t, class_labels, guidance_scale=None):
        return super().forward(x, t, class_labels)


# ---------------------------------------------------------------------------------------------
# The w-conditioned mode and the fake score's condition dropout


@pytest.mark.parametrize("lo,hi", [(1.0, 2.0), (1.5, 6.0)])
def test_w_conditioned_teacher_is_guided_at_each_examples_drawn_w_and_only_the_student_sees_w(lo, hi):
    cond = Conditioning(guidance=Guidance("conditioned", scale_range=(lo, hi)), null=NULL)
    x, t, labels = _points(512)
    drawn = cond.draw(FakeContext({}), {"class_labels": labels}, 512)
    w = drawn["guidance_scale"]
    assert w.shape == (512,) and lo <= float(w.min()) and float(w.max()) <= hi
    assert float(w.max() - w.min()) > 0.95 * (hi - lo)  # spread over the range, one per example
    assert torch.equal(drawn["class_labels"], labels)
    teacher_net = Recorder(ConditionalExactDenoiser(MIXTURE, SCHEDULE))
    pred = cond.teacher(teacher_net, SCHEDULE, "x0", drawn)(x, t)
    x0, eps = closed_form(MIXTURE, x, t, labels, w)
    assert (pred.x0 - x0).abs().max() < 1e-10 and (pred.eps - eps).abs().max() < 1e-10
    assert (pred.x0 - closed_form(MIXTURE, x, t, labels, float(w.mean()))[0]).abs().max() > 0.1 * (hi - lo)
    assert teacher_net.calls and all(set(c.cond) == {"class_labels"} for c in teacher_net.calls)
    student = WStudent()
    cond.student(student, SCHEDULE, "sample", drawn)(x, t)
    assert torch.equal(student.seen_w[-1], w)  # a w-conditioned student gets each example's w
    baked = Conditioning(guidance=Guidance("baked", scale=3.0), null=NULL)
    assert "guidance_scale" not in baked.draw(FakeContext({}), {"class_labels": labels}, 512)
    baked.student(student, SCHEDULE, "sample", drawn)(x, t)  # handed a w anyway, a baked student does not see it
    assert student.seen_w[-1] is None


def test_pd_target_of_the_w_conditioned_teacher_is_right_at_each_examples_w():
    cond = Conditioning(guidance=Guidance("conditioned", scale_range=(1.0, 7.0)), null=NULL)
    grid = DiffusersSpacing("trailing").grid(SCHEDULE, 8, final="zero")
    batch = _class_batch(240)
    losses = {}
    for name, oracle in (("per-example w", PDOracle(grid, 4.0)), ("mid-range w", PDOracleIgnoringW(grid, 4.0))):
        method = _pd(cond, oracle)
        ctx = FakeContext({"teacher": method.teacher, "student": method.student, "previous": method.previous})
        losses[name] = float(method.train_step(ctx, batch)["loss"])
    print(f"PD, w-conditioned: loss {losses}")
    assert losses["per-example w"] < 1e-20
    assert losses["mid-range w"] > 1e-2


@pytest.mark.parametrize("dropout", [0.1, 0.5])
def test_fake_dropout_nulls_about_its_share_of_rows_and_leaves_w_untouched(dropout):
    rows = 20000
    labels = torch.arange(rows) % K
    w = 1 + 7 * torch.rand(rows, generator=torch.Generator().manual_seed(5), dtype=F64)
    batch = {"class_labels": labels, "guidance_scale": w}
    cond = Conditioning(guidance=Guidance("conditioned", scale_range=(1.0, 8.0), fake_guided=True,
                                          fake_dropout=dropout), null=NULL)
    out = cond.drop(FakeContext({}, seed=6), batch, rows)
    dropped = out["class_labels"] == K
    tol = 4 * (dropout * (1 - dropout) / rows) ** 0.5  # 4 standard deviations of the binomial share
    print(f"fake dropout {dropout}: nulled share {float(dropped.double().mean()):.4f} (tolerance {tol:.4f})")
    assert abs(float(dropped.double().mean()) - dropout) < tol
    for c in range(K):  # the same rate in every class
        assert abs(float(dropped[labels == c].double().mean()) - dropout) < tol * K**0.5
    assert torch.equal(out["class_labels"][~dropped], labels[~dropped])
    assert torch.equal(out["guidance_scale"], w)
    unguided_fake = Conditioning(guidance=Guidance("conditioned", fake_dropout=dropout), null=NULL)
    assert unguided_fake.drop(FakeContext({}, seed=6), batch, rows) is batch  # only a guided fake learns the null


# ---------------------------------------------------------------------------------------------
# A PD student of the guided exact teacher, trained through fit

W_TOY = 3.0


class CondMLP(nn.Module):
    """A small MLP on ``(x, one-hot class)`` predicting ``v``; a 2 -> 1 PD round trains only ``t = T``,
    so it takes no time input."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + K + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, t, class_labels):
        return self.net(torch.cat([x, nn.functional.one_hot(class_labels, K + 1).to(x.dtype)], 1))


class ClassData(torch.utils.data.Dataset):
    def __init__(self, n: int = 4096):
        batch = _class_batch(n, seed=7)
        self.x, self.labels = batch["x"].float(), batch["cond"]["class_labels"]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "cond": {"class_labels": self.labels[i]}}


def _ddim_endpoint(z, labels, w, grid):
    """DDIM over ``grid`` (to clean data) with the closed-form guided denoiser."""
    for k in range(grid.n_steps):
        x0 = guided_x0(z, grid.t[k], labels, w)
        z = ddim_transfer(x0, z, grid.alpha[k], grid.sigma[k], grid.alpha[k + 1], grid.sigma[k + 1])
    return z


def test_pd_student_of_the_guided_exact_teacher_takes_two_guided_ddim_steps_in_one(tmp_path):
    torch.manual_seed(0)
    method = ProgressiveDistillation(ConditionalExactDenoiser(MIXTURE, SCHEDULE), "x0", SCHEDULE, start_steps=2,
                                     end_steps=1, student=CondMLP(), optim=OptimizerConfig(lr=3e-3, anneal="linear"),
                                     conditioning=Conditioning(guidance=Guidance("baked", scale=W_TOY), null=NULL))
    config = CoreConfig(output_dir=str(tmp_path), steps=300, batch_size=256, seed=0, checkpoint_every=300,
                        log_every=300, progress=False, cpu=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP: a second intra-op thread only spins on shared cores
    try:
        result = fit(method, config, ClassData(), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    _, module, grid, _ = method.final_student(result.state)
    teacher_grid = method.teacher_grid(0)
    assert grid.n_steps == 1 and teacher_grid.n_steps == 2
    g = torch.Generator().manual_seed(8)
    for c in range(K):
        labels = torch.full((2000,), c)
        x = MIXTURE.means[c] + MIXTURE.variances[c].sqrt() * torch.randn(2000, 2, generator=g, dtype=F64)
        z = teacher_grid.alpha[0] * x + teacher_grid.sigma[0] * torch.randn(2000, 2, generator=g, dtype=F64)
        with torch.no_grad():  # one student step from T to clean data is its x0
            student = ModelDenoiser(module, SCHEDULE, "v_prediction")(z.float(), grid.t[0], class_labels=labels).x0
        guided = _ddim_endpoint(z, labels, W_TOY, teacher_grid)
        unguided = _ddim_endpoint(z, labels, 1.0, teacher_grid)
        one_step = _ddim_endpoint(z, labels, W_TOY, grid)
        err = float((student.double() - guided).norm(dim=1).mean())
        gap = float((unguided - guided).norm(dim=1).mean())
        gap_one = float((one_step - guided).norm(dim=1).mean())
        print(f"PD guided toy, class {c}: student vs 2 guided DDIM steps {err:.3f}; unguided teacher {gap:.3f}; "
              f"1 guided DDIM step {gap_one:.3f}")
        assert err < 0.3  # ~0.19 after 300 steps
        assert err < 0.2 * gap  # it learned the guided teacher, not the conditional one (gap 1.6-2.4)
        assert err < 0.5 * gap_one  # and two of its steps, not one (gap 1.7-3.9)
