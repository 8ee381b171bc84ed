"""Multistep consistency models (Heek, Hoogeboom & Salimans 2024, arXiv 2403.06807): a student that
samples in ``S`` DDIM steps, trained so that each of its steps lands where the teacher's path (one
teacher step, then the student itself for the rest of the segment) lands.

Grids follow the samplers' convention (noise -> data). The fine grid has ``T = S * n`` steps; the
student's grid is every ``n``-th point of it (segment ``k`` runs from fine point ``k n`` to
``(k + 1) n``). A training example picks a fine point ``j`` inside a segment (``t``), takes one teacher
step to ``j + 1`` (``s``) and bootstraps to the segment end with the student's own stop-gradient
estimate (Algorithm 1). ``S = 1`` is a consistency model; one fine step per segment is diffusion
(x-regression) training.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..samplers import Denoiser
from ..samplers.timesteps import Grid, Timesteps
from .conditioning import Conditioning, split_batch
from .core import Method, Network, OptimizerConfig
from .noise import Noise, noise_for, noise_recipe
from .targets import addim_transfer, consistency_target, inverse_ddim, pseudo_huber, snr_plus_one_weight

__all__ = ["annealed_teacher_steps", "segment_grid", "consistency_loss", "MultistepConsistency"]


def annealed_teacher_steps(update: int, start: int = 64, end: int = 1280, anneal_updates: int = 100_000) -> float:
    """``N_teacher(i) = exp(log start + clip(i / anneal, 0, 1) (log end - log start))`` (Algorithm 1)."""
    frac = min(max(update / anneal_updates, 0.0), 1.0) if anneal_updates > 0 else 1.0
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))


def segment_grid(grid: Grid, student_steps: int) -> Grid:
    """Every ``n``-th point of a fine grid: the student's ``S``-step grid (Algorithm 2 samples on it)."""
    n, rem = divmod(grid.n_steps, student_steps)
    if rem or n < 1:
        raise ValueError(f"a {grid.n_steps}-step grid does not split into {student_steps} segments")
    return Grid(grid.t[::n], grid.alpha[::n], grid.sigma[::n], grid.schedule)


def consistency_loss(student: Denoiser, teacher: Denoiser | None, x: Tensor, grid: Grid, student_steps: int,
                     point: Tensor, noise: Tensor, huber_c: float = 1e-4, xvar_frac: float = 0.75) -> Tensor:
    """Per-example MCM loss ``(SNR(t) + 1) * pseudo_huber(f(z_t, t) - x_target)``.

    ``grid``: the fine grid; ``point [B]``: each example's fine index ``j`` in ``[0, T)`` (its segment
    is ``j // n``); ``noise``: the ``eps`` of ``z_t``. ``teacher=None`` is consistency *training*
    (the data ``x`` stands in for the teacher's estimate). The teacher step is aDDIM with
    ``x_var = xvar_frac |x_teacher - x|^2 / d`` (Algorithm 3); the student's own estimate at ``s`` is
    taken without gradient from the same weights (no EMA target in Algorithm 1).
    """
    n = grid.n_steps // student_steps
    if n * student_steps != grid.n_steps or not grid.ends_at_data:
        raise ValueError(f"the fine grid must split into {student_steps} segments and end at clean data")
    j = point.to(torch.long).cpu()
    if j.min() < 0 or j.max() >= grid.n_steps:
        raise ValueError(f"fine-grid points must lie in [0, {grid.n_steps})")
    end = (j // n + 1) * n

    def coef(k: Tensor) -> tuple[Tensor, Tensor]:
        return grid.alpha[k].to(x.device, x.dtype), grid.sigma[k].to(x.device, x.dtype)

    c_t, c_s, c_end = coef(j), coef(j + 1), coef(end)
    shape = (-1, *([1] * (x.ndim - 1)))
    z_t = c_t[0].reshape(shape) * x + c_t[1].reshape(shape) * noise
    with torch.no_grad():
        x_teacher = x if teacher is None else teacher(z_t, grid.t[j]).x0
        x_var = xvar_frac * (x_teacher - x).flatten(1).square().mean(1)
        z_s = addim_transfer(x_teacher, z_t, *c_t, *c_s, x_var)
        bootstrap = (j + 1) < end
        x_ref = _student_at(student, z_s, grid.t[j + 1], bootstrap)
        # Where s is the segment end the target is invDDIM_{t->s}(z_s) itself (and s may be clean data,
        # where the bootstrap's sigma_s / sigma_s would be 0 / 0).
        target = torch.where(bootstrap.to(x.device).reshape(shape),
                             consistency_target(x_ref, z_s, z_t, c_t, c_s, c_end), inverse_ddim(z_s, z_t, *c_t, *c_s))
    diff = student(z_t, grid.t[j]).x0 - target
    return snr_plus_one_weight(*c_t) * pseudo_huber(diff, huber_c)


def _student_at(student: Denoiser, z_s: Tensor, s: Tensor, bootstrap: Tensor) -> Tensor:
    """The student's estimate at ``s`` where the segment continues past ``s``; elsewhere (``s`` is the
    segment end) it is not used by the target, so it is not computed (and ``s`` may be clean data)."""
    x_ref = torch.zeros_like(z_s)
    if bootstrap.any():
        rows = bootstrap.to(z_s.device)
        subset = student.rows(rows) if hasattr(student, "rows") else student  # conditions of those rows
        x_ref[rows] = subset(z_s[rows], s[bootstrap]).x0
    return x_ref


class MultistepConsistency(Method):
    """MCM on the training core (Algorithm 1): an ``S``-step student initialised from the teacher's
    weights, parameterised by ``prediction_type``; teacher steps annealed log-linearly from
    ``teacher_steps`` to ``teacher_steps_end`` over ``anneal_updates`` (capped at the schedule's training
    timesteps), on ``noise``'s grids (``distill.noise``; default ``noise_for(schedule, timesteps)``); ``variant="distillation"`` takes the teacher step with the teacher, ``"training"`` with the
    data (consistency training: no teacher network at all)."""

    name = "consistency"

    def __init__(self, teacher: nn.Module, teacher_prediction_type: str, schedule, student_steps: int = 4,
                 teacher_steps: int = 64, teacher_steps_end: int = 1280, anneal_updates: int = 100_000,
                 variant: str = "distillation", prediction_type: str = "v_prediction", huber_c: float = 1e-4,
                 xvar_frac: float = 0.75, optim: OptimizerConfig | None = None, student: nn.Module | None = None,
                 timesteps: Timesteps | None = None, student_init: str | None = None,
                 conditioning: Conditioning | None = None, noise: Noise | None = None):
        if not isinstance(student_steps, int) or student_steps < 1:
            raise ValueError(f"student_steps must be an integer >= 1, got {student_steps!r}")
        if variant not in ("distillation", "training"):
            raise ValueError(f"variant must be 'distillation' or 'training', got {variant!r}")
        if prediction_type in ("eps", "epsilon") and student_steps <= 2:
            raise ValueError(f"an eps-parameterised student cannot sample in {student_steps} step(s); "
                             "use prediction_type 'v_prediction' or 'sample'")
        if not 1 <= teacher_steps <= teacher_steps_end:
            raise ValueError(f"need 1 <= teacher_steps ({teacher_steps}) <= teacher_steps_end ({teacher_steps_end})")
        self.schedule, self.student_steps, self.variant = schedule, student_steps, variant
        self.teacher_steps, self.teacher_steps_end, self.anneal_updates = teacher_steps, teacher_steps_end, anneal_updates
        self.teacher_prediction_type, self.prediction_type = teacher_prediction_type, prediction_type
        self.huber_c, self.xvar_frac = huber_c, xvar_frac
        self.student_init = student_init  # where ``student`` came from, for the recipe
        self.noise = noise if noise is not None else noise_for(schedule, timesteps)
        self.max_steps = getattr(schedule, "num_train_timesteps", None)
        self.cond = conditioning or Conditioning()
        if variant == "training" and self.cond.guidance.active:
            raise ValueError("consistency training (variant training) has no teacher to guide; use guidance.mode none")
        # the teacher itself, not a copy (as PD and the matching methods hold it): one UNet less in memory
        self.teacher = teacher.eval().requires_grad_(False) if variant == "distillation" else None
        self.student = self.cond.student_network(teacher if student is None else student)
        self.optim = optim or OptimizerConfig(lr=1e-4)
        self._grids: dict[int, Grid] = {}

    def networks(self):
        nets = {"student": Network(self.student, self.optim)}
        if self.teacher is not None:
            nets["teacher"] = Network(self.teacher, persistent=False)
        return nets

    def grid_at(self, update: int) -> Grid:
        """The fine grid of optimizer step ``update`` (cached by its size)."""
        n_teacher = annealed_teacher_steps(update, self.teacher_steps, self.teacher_steps_end, self.anneal_updates)
        per_segment = max(1, round(n_teacher / self.student_steps))
        if self.max_steps is not None:
            per_segment = max(1, min(per_segment, self.max_steps // self.student_steps))
        if per_segment not in self._grids:
            self._grids[per_segment] = self.noise.grid(self.student_steps * per_segment)
        return self._grids[per_segment]

    def student_grid(self) -> Grid:
        return segment_grid(self.grid_at(0), self.student_steps)

    def train_step(self, ctx, batch):
        x, cond = split_batch(batch)
        grid = self.grid_at(ctx.step)
        point = ctx.randint(grid.n_steps, x.shape[0])
        noise = ctx.randn(*x.shape)
        cond = self.cond.draw(ctx, cond, x.shape[0])
        teacher = (self.cond.teacher(ctx.net("teacher"), self.schedule, self.teacher_prediction_type, cond)
                   if self.teacher is not None else None)
        student = self.cond.student(ctx.net("student"), self.schedule, self.prediction_type, cond)
        loss = consistency_loss(student, teacher, x, grid, self.student_steps, point, noise, self.huber_c,
                                self.xvar_frac).mean()
        return {"loss": ctx.update("student", loss)}

    def final_grid(self) -> Grid:
        """The grid the last student samples on (known before training: ``distill`` checks it can export)."""
        return self.student_grid()

    def final_student(self, state):
        return self.student_steps, state.ema("student"), self.final_grid(), state

    def recipe(self) -> dict:
        return {"student_steps": self.student_steps, "teacher_steps": [self.teacher_steps, self.teacher_steps_end],
                "anneal_updates": self.anneal_updates, "variant": self.variant, "prediction_type": self.prediction_type,
                "teacher_prediction_type": self.teacher_prediction_type, "huber_c": self.huber_c,
                "xvar_frac": self.xvar_frac, "optim": dataclasses.asdict(self.optim), "schedule": repr(self.schedule),
                **({"student_init": self.student_init} if self.student_init else {}), **noise_recipe(self.noise),
                **self.cond.recipe()}
