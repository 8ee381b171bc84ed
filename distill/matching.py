"""One-step distribution matching on the training core: f-distill (Xu, Nie & Vahdat 2025; reverse-KL is
DMD2, Yin et al. 2024; Diff-Instruct, Luo et al. 2023, is reverse-KL unnormalised) and Score Implicit
Matching (Luo et al. 2024; SiD, Zhou et al. 2024, is a setting of it). The math is in ``fdiv``.

Networks (research note distill.md 2.2, 3.3, 5):

- ``generator``: a copy of the teacher (or of a given student), one step from pure noise: ``x = x0_hat``
  of its ``prediction_type`` output at the last trailing timestep (an x- or v-parameterisation: an eps
  one cannot take one step);
- ``fake``: a copy of the teacher trained by denoising score matching on the generator's samples (the
  teacher's own loss, in its own parameterisation), so it tracks the score of ``q_t``;
- ``disc`` (optional): a small head on the frozen teacher's mid-block features, trained with the
  logistic GAN loss on noised real vs generated images (+ FastGen's finite-difference R1); its logit is
  the density ratio f-distill needs (``exp(logit) = p_t / q_t`` at the optimum);
- ``teacher`` (frozen) and ``ratio_stats`` (frozen buffers: the per-time-bin EMA of ``r``, so resume
  is exact).

Each core step updates the critics (fake, then disc) once; every ``update_ratio``-th step (the last of
each group) the generator too (DMD2's order: the critics lead, 5 : 1 by default; SiD and SIM 1 : 1).
``reference="fastgen"`` is NVIDIA FastGen's f-distill instead (``updates_at``): a step updates the
generator *or* the critics, so ``update_ratio`` 5 (FastGen's ``student_update_freq``) is 4 critic
updates per generator update; its ratio EMA starts at ones and its time bins cut the schedule's whole
range. Times are drawn for fractions ``[min_t, max_t]`` of the schedule's training range (DMD2: 2%..98%)
by the teacher's ``Noise`` (``distill.noise``: integer DDPM timesteps, flow's shifted uniform time, EDM's
Karras ramp); the fake network's DSM uses the whole range, in the teacher's parameterisation (a flow
teacher's velocity loss included).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioning import Conditioning, split_batch
from .core import Method, Network, OptimizerConfig
from .fdiv import (F_DIVERGENCES, bin_totals, density_ratio, dmd_normaliser, f_weight, matching_gradient,
                   normalise_by_bins, normalise_weight, sim_generator_loss, sim_loss, time_bins, vsd_loss)
from .noise import Noise, noise_for, noise_recipe
from .progressive import check_student_steps

__all__ = ["OBJECTIVES", "REFERENCES", "updates_at", "FeatureHead", "RatioStats", "DistributionMatching", "dsm_loss"]

#: objective -> what it is.
OBJECTIVES = {"f_distill": "f-distill: h(r)-weighted score difference, DMD-normalised (f=rkl: DMD2)",
              "diff_instruct": "Diff-Instruct: reverse-KL, no normalisation",
              "sim": "Score Implicit Matching, pseudo-Huber or squared-L2 distance, unnormalised (SIM's own loss; "
                     "dmd_normaliser adds DMD's 1 / mean|x - x_hat_teacher|)",
              "sid": "SiD: (f_phi - f_psi)^T((f_phi - x) - alpha (f_phi - f_psi)), DMD-normalised (SiD's code)"}

#: f-distill / Diff-Instruct's ``reference`` -> what it sets (docs/distribution_matching.md).
REFERENCES = {"dmd2": "DMD2's count (every step updates the critics, every update_ratio-th the generator too), "
                      "ratio EMA from the first batch's bin means, time bins over the sampled [min_t, max_t]",
              "fastgen": "NVIDIA FastGen's f-distill: a step updates the generator or the critics (update_ratio "
                         "= student_update_freq: update_ratio - 1 critic updates per generator update), ratio "
                         "EMA from ones, time bins over the schedule's whole range"}


def updates_at(step: int, update_ratio: int, reference: str = "dmd2") -> tuple[bool, bool]:
    """``(critics, generator)``: which networks core step ``step`` (0-based) updates.

    ``dmd2`` (DMD2's ``train_edm.py``): the critics every step, the generator on every ``update_ratio``-th
    too (the last of each group), so ``update_ratio`` critic updates per generator update. ``fastgen``
    (``DMD2Model.single_train_step``, iterations counted from 1): iteration ``step + 1`` updates the
    generator if ``iteration % update_ratio == 0``, else the critics: ``update_ratio - 1`` per generator
    update."""
    generator = (step + 1) % update_ratio == 0
    if reference == "fastgen":
        return not generator, generator
    if reference == "dmd2":
        return True, generator
    raise ValueError(f"unknown reference {reference!r}; expected one of {', '.join(REFERENCES)}")


class FeatureHead(nn.Module):
    """The discriminator head on teacher features ``[B, C, h, w]``: conv, SiLU, 1x1 conv to one logit
    map, averaged over space -> ``[B]``."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, 1, 1))

    def forward(self, feats: Tensor) -> Tensor:
        return self.net(feats).flatten(1).mean(1)


class RatioStats(nn.Module):
    """Per-time-bin means of the density ratio (an EMA), as buffers so checkpoints carry them."""

    def __init__(self, n_bins: int):
        super().__init__()
        self.register_buffer("means", torch.ones(n_bins))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))


def dsm_loss(pred, x: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str,
             alpha_dot=None, sigma_dot=None) -> Tensor:
    """Denoising score matching in the network's own parameterisation (the teacher's training loss):
    ``|eps_hat - eps|^2``, ``|v_hat - v|^2`` (``v = alpha eps - sigma x``), ``|x_hat - x|^2``, or a flow
    velocity's ``|u_hat - u|^2`` (``u = alpha' x + sigma' eps``: ``eps - x`` on a rectified flow, the loss
    flow teachers are trained with); mean over all elements."""
    if prediction_type in ("eps", "epsilon"):
        diff = pred.eps - noise
    elif prediction_type in ("v", "v_prediction"):
        diff = (alpha * pred.eps - sigma * pred.x0) - (alpha * noise - sigma * x)
    elif prediction_type in ("x0", "sample"):
        diff = pred.x0 - x
    elif prediction_type in ("flow", "flow_prediction", "velocity"):
        if alpha_dot is None or sigma_dot is None:
            raise ValueError("a flow-velocity denoising loss needs the schedule's alpha_dot and sigma_dot")
        diff = alpha_dot * (pred.x0 - x) + sigma_dot * (pred.eps - noise)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return diff.float().square().mean()


class _frozen_params:
    """Within the block, ``module``'s parameters take no gradient (inputs still do): the generator's loss
    back-propagates through the fake network and the discriminator head without touching their weights."""

    def __init__(self, *modules: nn.Module | None):
        self.params = [p for m in modules if m is not None for p in m.parameters()]

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


class _Features:
    """Captures the raw output of a teacher block (the family's ``feature_block``) on every teacher call."""

    def __init__(self, module: nn.Module):
        self.value = None
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.value = output


def _feature_block(teacher: nn.Module, family) -> tuple[nn.Module, int]:
    """The family's discriminator block (a UNet's mid block, a transformer's middle block); a bare network
    (no family): its ``mid_block``."""
    if family is not None:
        return family.feature_block(teacher)
    block = getattr(teacher, "mid_block", None)
    if block is None:
        raise ValueError("the discriminator reads the teacher's mid-block features; this teacher has no "
                         "`mid_block` (a diffusers UNet2DModel has one)")
    return block, int(teacher.config.block_out_channels[-1])


class DistributionMatching(Method):
    """f-distill / DMD2 / Diff-Instruct / SIM / SiD on the core (module docstring).

    ``objective``: one of ``OBJECTIVES``; ``f``: the f-divergence of ``f_distill`` (``fdiv.F_DIVERGENCES``);
    ``discriminator``: train the GAN head (needs ``real_data``); ``gan_weight``: the generator's GAN
    term ``softplus(-D)``; ``r1_weight``: FastGen's finite-difference R1 on real inputs;
    ``ratio_clamp``: ``(lower, upper)`` of ``r``; ``ratio_bins`` / ``ratio_ema``: per-time-bin
    normalisation of ``r`` (0 bins: off); ``distance`` / ``huber_c``: SIM's ``d``; ``sid_alpha``: SiD's
    alpha (1: SIM with squared L2); ``reference``: f-distill's and Diff-Instruct's update count, ratio EMA
    start and time bins, ``"dmd2"`` or ``"fastgen"`` (``REFERENCES``); ``dmd_normaliser``: SIM / SiD
    weight each example's loss by DMD's ``1 / mean|x - x_hat_teacher|`` (``None``: each one's reference,
    off for SIM, on for SiD, whose code divides by it). ``generator_init``: a module to start the
    generator from instead of the teacher (e.g. another method's one-step student; it must predict
    ``prediction_type``).
    """

    name = "matching"

    def __init__(self, teacher: nn.Module, teacher_prediction_type: str, schedule, objective: str = "f_distill",
                 f: str = "rkl", prediction_type: str = "v_prediction", update_ratio: int = 5,
                 discriminator: bool = False, real_data: bool = False, gan_weight: float = 0.0,
                 r1_weight: float = 0.0, r1_sigma: float = 0.1, ratio_clamp: tuple[float, float] = (0.1, 20.0),
                 ratio_bins: int = 10, ratio_ema: float = 0.0, min_t: float = 0.02, max_t: float = 0.98,
                 distance: str = "pseudo_huber", huber_c: float = 1.0, sid_alpha: float = 1.2,
                 dmd_normaliser: bool | None = None, reference: str = "dmd2", optim: OptimizerConfig | None = None,
                 critic_optim: OptimizerConfig | None = None,
                 generator_init: nn.Module | None = None, name: str | None = None,
                 conditioning: Conditioning | None = None, noise: Noise | None = None,
                 time_sampling: str = "uniform"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if f not in F_DIVERGENCES:
            raise ValueError(f"unknown f-divergence {f!r}; expected one of {', '.join(F_DIVERGENCES)}")
        if objective == "diff_instruct" and f != "rkl":
            raise ValueError("diff_instruct is reverse-KL: leave f at 'rkl'")
        check_student_steps(prediction_type, 1)
        if not isinstance(update_ratio, int) or isinstance(update_ratio, bool) or update_ratio < 1:
            raise ValueError(f"update_ratio (critic updates per generator update) must be an integer >= 1, "
                             f"got {update_ratio!r}")
        if reference not in REFERENCES:
            raise ValueError(f"unknown reference {reference!r}; expected one of {', '.join(REFERENCES)}")
        if reference == "fastgen" and objective in ("sim", "sid"):
            raise ValueError("reference 'fastgen' is f-distill's (FastGen has no SIM / SiD); leave it at 'dmd2'")
        if reference == "fastgen" and update_ratio < 2:
            raise ValueError("with reference 'fastgen' a step updates the generator or the critics, so "
                             f"update_ratio (FastGen's student_update_freq) must be >= 2, got {update_ratio}")
        lower, upper = ratio_clamp
        if not 0 < lower < upper:
            raise ValueError(f"ratio clamps must satisfy 0 < lower < upper, got {lower} and {upper}")
        if not 0 <= min_t < max_t <= 1:
            raise ValueError(f"need 0 <= min_t < max_t <= 1, got {min_t} and {max_t}")
        if not 0 <= ratio_ema < 1 or ratio_bins < 0:
            raise ValueError("ratio_ema must lie in [0, 1) and ratio_bins be >= 0")
        if (gan_weight > 0 or r1_weight > 0) and not discriminator:
            raise ValueError("a GAN term (gan_weight, r1_weight) needs the discriminator: set discriminator true")
        if discriminator and not real_data:
            raise ValueError("the discriminator (GAN term / density ratio) trains on real data; this run has "
                             "none (real_data false): turn the discriminator off or give it data")
        if objective == "f_distill" and f != "rkl" and not discriminator:
            raise ValueError(f"f-divergence {f!r} weights by the density ratio, which comes from the "
                             "discriminator: set discriminator true (with real data), or use f 'rkl'")
        if objective in ("sim", "sid", "diff_instruct") and discriminator:
            raise ValueError(f"objective {objective!r} has no GAN term here; the discriminator is f_distill's")
        if dmd_normaliser is not None and objective not in ("sim", "sid"):
            raise ValueError(f"dmd_normaliser is SIM's and SiD's option; {objective!r} fixes its own weight "
                             "(f_distill: DMD's, diff_instruct: none)")
        self.name = name or ("sim" if objective in ("sim", "sid") else "fdistill")
        self.schedule, self.objective, self.f = schedule, objective, f
        self.teacher_prediction_type, self.prediction_type = teacher_prediction_type, prediction_type
        self.update_ratio, self.reference = update_ratio, reference
        self.discriminator, self.needs_data = discriminator, discriminator
        self.gan_weight, self.r1_weight, self.r1_sigma = gan_weight, r1_weight, r1_sigma
        self.ratio_clamp, self.ratio_bins, self.ratio_ema = (float(lower), float(upper)), ratio_bins, ratio_ema
        self.min_t, self.max_t = min_t, max_t
        self.distance, self.huber_c, self.sid_alpha = distance, huber_c, sid_alpha
        self.dmd_normaliser = (objective == "sid") if dmd_normaliser is None else bool(dmd_normaliser)
        if objective == "sim":
            sim_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), distance, huber_c)  # validates
        self.optim = optim or OptimizerConfig(lr=1e-5, weight_decay=0.01, grad_clip=10.0)
        self.critic_optim = critic_optim or dataclasses.replace(self.optim, ema_decay=None)
        self.cond = conditioning or Conditioning()
        self.teacher = teacher.eval().requires_grad_(False)
        # generator and fake score: the student's kind of network (with the guidance input when w-conditioned)
        self.generator = self.cond.student_network(teacher if generator_init is None else generator_init)
        self.fake = self.cond.student_network(teacher, fake=True)
        self.features = None
        if discriminator:
            block, self._disc_channels = _feature_block(self.teacher, self.cond.family)
            self.features = _Features(block)
        self.disc = None
        self.stats = RatioStats(max(ratio_bins, 1))
        self.noise = noise if noise is not None else noise_for(schedule)
        self.noise.check_sampling(time_sampling)
        self.time_sampling = time_sampling
        self.grid = self.noise.grid(1)
        self._step_bins: tuple[Tensor, Tensor] | None = None  # this optimizer step's bin totals so far

    # -- declarations ---------------------------------------------------------------------------

    def networks(self):
        nets = {"generator": Network(self.generator, self.optim), "fake": Network(self.fake, self.critic_optim),
                "teacher": Network(self.teacher, persistent=False), "ratio_stats": Network(self.stats)}
        if self.discriminator:
            if self.disc is None:  # here, after fit seeds the global RNG: its initial weights follow train.seed
                self.disc = FeatureHead(self._disc_channels)
            nets["disc"] = Network(self.disc, self.critic_optim)
        return nets

    def recipe(self) -> dict:
        keys = ("objective", "f", "prediction_type", "teacher_prediction_type", "update_ratio", "reference",
                "discriminator", "gan_weight", "r1_weight", "r1_sigma", "ratio_clamp", "ratio_bins", "ratio_ema",
                "min_t", "max_t", "distance", "huber_c", "sid_alpha", "dmd_normaliser")
        extra = {} if self.time_sampling == "uniform" else {"time_sampling": self.time_sampling}
        return {**{k: getattr(self, k) for k in keys}, "schedule": repr(self.schedule), **noise_recipe(self.noise),
                **extra, **self.cond.recipe()}

    def student_info(self) -> dict:
        """What the exported student's ``fewstep_student.json`` records about its training."""
        info = {"objective": self.objective, "update_ratio": self.update_ratio}
        if self.objective in ("f_distill", "diff_instruct"):
            info.update(reference=self.reference)
        if self.objective == "f_distill":
            info.update(f=self.f, gan_weight=self.gan_weight if self.discriminator else None)
        if self.objective == "sim":
            info.update(distance=self.distance, huber_c=self.huber_c)
        if self.objective == "sid":
            info.update(sid_alpha=self.sid_alpha)
        if self.objective in ("sim", "sid"):
            info.update(dmd_normaliser=self.dmd_normaliser)
        return info

    def final_student(self, state):
        return 1, state.ema("generator"), self.grid, state

    # -- pieces ---------------------------------------------------------------------------------

    def _coef(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1, *([1] * (like.ndim - 1)))
        a = self.schedule.alpha(t.double()).to(like.device, like.dtype).reshape(shape)
        s = self.schedule.sigma(t.double()).to(like.device, like.dtype).reshape(shape)
        return a, s

    def _times(self, ctx, rows: int, lo: float, hi: float) -> Tensor:
        """Training times for fractions ``[lo, hi]`` of the range (``Noise.draw``: DDPM integer timesteps
        uniform in ``[lo T, hi T]``; flow the scheduler's shift of a uniform time; EDM Karras' ramp)."""
        return self.noise.draw(ctx, rows, lo, hi, self.time_sampling)

    def _bin_range(self) -> tuple[float, float]:
        """What the ratio's time bins cut: the sampled range (dmd2) or the whole one (FastGen)."""
        return self.noise.time_range(0.0, 1.0) if self.reference == "fastgen" else self.noise.time_range(self.min_t,
                                                                                                         self.max_t)

    def _derivatives(self, t: Tensor, like: Tensor) -> dict:
        """A flow-velocity fake score's ``alpha_dot`` / ``sigma_dot`` at ``t`` (its denoising loss needs them)."""
        if self.teacher_prediction_type not in ("flow", "flow_prediction", "velocity"):
            return {}
        shape = (-1, *([1] * (like.ndim - 1)))
        return {k: getattr(self.schedule, k)(t.double()).to(like.device, like.dtype).reshape(shape)
                for k in ("alpha_dot", "sigma_dot")}

    def _generate(self, ctx, module: nn.Module, rows: int, like_shape, cond) -> Tensor:
        z = self.noise.prior(ctx.randn(rows, *like_shape), self.grid)
        gen = self.cond.student(module, self.schedule, self.prediction_type, cond)
        return gen(z, self.grid.t[0].expand(rows)).x0

    def _shape(self):
        if self.cond.family is not None:
            return self.cond.family.sample_shape()
        cfg = getattr(self.teacher, "config", None)
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def _rows(self, ctx, x, cond) -> int:
        if x is not None:
            return x.shape[0]
        if cond:
            return next(iter(cond.values())).shape[0]
        acc = ctx.state.accelerator
        return ctx.config.batch_size // ctx.config.accumulation // acc.num_processes

    def _all_sum(self, ctx, value: Tensor) -> Tensor:
        acc = ctx.state.accelerator
        return acc.reduce(value.clone(), reduction="sum") if acc.num_processes > 1 else value

    def _teacher(self, ctx, x_t: Tensor, t: Tensor, cond):
        return self.cond.teacher(ctx.net("teacher"), self.schedule, self.teacher_prediction_type, cond)(x_t, t).x0

    # -- the step -------------------------------------------------------------------------------

    def train_step(self, ctx, batch):
        data, cond = split_batch(batch)
        rows = self._rows(ctx, data, cond)
        shape = tuple(data.shape[1:]) if data is not None else self._shape()
        cond = self.cond.draw(ctx, cond, rows)
        critics, generator = updates_at(ctx.step, self.update_ratio, self.reference)
        losses = self._critic_step(ctx, data, cond, rows, shape) if critics else {}
        if generator:
            losses.update(self._generator_step(ctx, cond, rows, shape))
        return losses

    def _critic_step(self, ctx, batch, cond, rows, shape) -> dict[str, Tensor]:
        with torch.no_grad():
            x = self._generate(ctx, ctx.state.unwrapped("generator"), rows, shape, cond)
        t = self._times(ctx, rows, 0.0, 1.0)
        noise = ctx.randn(rows, *shape)
        a, s = self._coef(t, x)
        x_t = a * x + s * noise
        fake_cond = self.cond.drop(ctx, cond, rows)  # a guided fake score also learns the null condition
        pred = self.cond.student(ctx.net("fake"), self.schedule, self.teacher_prediction_type, fake_cond)(x_t, t)
        loss = dsm_loss(pred, x, noise, a, s, self.teacher_prediction_type, **self._derivatives(t, x))
        out = {"fake": ctx.update("fake", loss)}
        if self.discriminator:
            out.update(self._disc_step(ctx, batch, cond, x, rows, shape))
        return out

    def _feats(self, ctx, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """The frozen teacher's mid-block features at ``(x_t, t)`` under the plain (unguided) condition."""
        self.cond.plain(ctx.net("teacher"), self.schedule, self.teacher_prediction_type, cond)(x_t, t)
        value = self.features.value
        if self.cond.family is not None:
            return self.cond.family.feature_map(value, x_t)
        return value[0] if isinstance(value, tuple) else value

    def _disc_step(self, ctx, batch, cond, x, rows, shape) -> dict[str, Tensor]:
        t_fake = self._times(ctx, rows, self.min_t, self.max_t)
        t_real = self._times(ctx, rows, self.min_t, self.max_t)
        a_f, s_f = self._coef(t_fake, x)
        a_r, s_r = self._coef(t_real, x)
        real_t = a_r * batch + s_r * ctx.randn(rows, *shape)
        with torch.no_grad():
            f_fake = self._feats(ctx, a_f * x + s_f * ctx.randn(rows, *shape), t_fake, cond)
            f_real = self._feats(ctx, real_t, t_real, cond)
        disc = ctx.net("disc")
        logit_real = disc(f_real)
        loss = F.softplus(disc(f_fake)).mean() + F.softplus(-logit_real).mean()
        out = {}
        if self.r1_weight > 0:  # finite-difference R1 (FastGen's approximation) on the real inputs
            with torch.no_grad():
                f_near = self._feats(ctx, real_t + self.r1_sigma * ctx.randn(rows, *shape), t_real, cond)
            r1 = (disc(f_near) - logit_real).float().square().mean()
            loss = loss + self.r1_weight * r1
            out["r1"] = r1.detach()
        out["disc"] = ctx.update("disc", loss)
        return out

    def _ratio_weight(self, ctx, logit: Tensor, t: Tensor) -> Tensor:
        """``h(r)``: the ratio from the logit, clamped, normalised per time bin, then ``h`` by its global
        batch mean (all-reduced over processes). With gradient accumulation the bin statistics add up over
        the optimizer step's micro-batches: micro-batch ``k`` normalises by those of ``0..k``, and the
        stored EMA takes one update, from all of them."""
        r = density_ratio(logit, *self.ratio_clamp)
        if self.ratio_bins:
            bins = time_bins(t, *self._bin_range(), self.ratio_bins)
            sums, counts = bin_totals(r, bins, self.ratio_bins)
            sums, counts = self._all_sum(ctx, sums), self._all_sum(ctx, counts)
            if ctx.micro > 0 and self._step_bins is not None:
                sums, counts = sums + self._step_bins[0], counts + self._step_bins[1]
            self._step_bins = (sums, counts)
            stats = ctx.state.unwrapped("ratio_stats")
            start = stats.means if bool(stats.started) or self.reference == "fastgen" else None  # FastGen: ones
            r, means = normalise_by_bins(r, bins, sums, counts, start, self.ratio_ema)
            if ctx.micro == ctx.config.accumulation - 1:
                stats.means.copy_(means)
                stats.started.fill_(True)
                self._step_bins = None
        h = f_weight(self.f, r)
        count = self._all_sum(ctx, torch.tensor(float(h.numel()), device=h.device))
        return normalise_weight(h, self._all_sum(ctx, h.sum()), count)

    def _generator_step(self, ctx, cond, rows, shape) -> dict[str, Tensor]:
        x = self._generate(ctx, ctx.net("generator"), rows, shape, cond)
        t = self._times(ctx, rows, self.min_t, self.max_t)
        a, s = self._coef(t, x)
        x_t = a * x + s * ctx.randn(rows, *shape)
        numel = x[0].numel()
        out = {}
        fake = ctx.state.unwrapped("fake")
        disc = ctx.state.unwrapped("disc") if self.discriminator else None
        with _frozen_params(fake, disc):
            if self.objective in ("sim", "sid"):
                # through x_t everywhere: the teacher's and the fake network's inputs, not their weights
                x_teacher = self._teacher(ctx, x_t, t, cond)
                x_fake = self.cond.fake(fake, self.schedule, self.teacher_prediction_type, cond)(x_t, t).x0
                per = sim_generator_loss(x, x_teacher, x_fake, self.objective, self.distance, self.huber_c,
                                         self.sid_alpha, normalise=self.dmd_normaliser)
                loss = per.mean() / numel
            else:
                logit = None
                if self.discriminator:
                    with torch.set_grad_enabled(self.gan_weight > 0):  # the GAN term back-propagates through the teacher
                        logit = disc(self._feats(ctx, x_t if self.gan_weight > 0 else x_t.detach(), t, cond))
                with torch.no_grad():
                    x_teacher = self._teacher(ctx, x_t.detach(), t, cond)
                    x_fake = self.cond.fake(fake, self.schedule, self.teacher_prediction_type, cond)(x_t.detach(), t).x0
                h = self._ratio_weight(ctx, logit, t) if self.discriminator else 1.0
                weight = dmd_normaliser(x, x_teacher) if self.objective == "f_distill" else 1.0
                loss = vsd_loss(x, matching_gradient(x_fake, x_teacher, h, weight)).mean() / numel
                if self.gan_weight > 0:
                    gan = F.softplus(-logit).float().mean()
                    out["gan"] = gan.detach()
                    loss = loss + self.gan_weight * gan
            # the backward inside the block too: a checkpointed fake network recomputes its layers there, and
            # must do so as in the forward (weights without gradient)
            out["generator"] = ctx.update("generator", loss)
        return out
