"""Progressive distillation (Salimans & Ho, ICLR 2022): a student learns to take one DDIM step where its
teacher takes two, and then becomes the teacher; N -> N/2 -> ... -> 1 steps.

The grids are nested: the teacher of a round runs DDIM over a ``Grid`` of ``2N`` steps (``2N + 1``
points, noise -> clean data), and the student's ``N``-step grid is every other point of it
(``halve``). The student's step ``i`` goes from point ``2i`` to ``2i + 2`` of the teacher's grid, whose
midpoint ``2i + 1`` is where the teacher's second call happens (research note distill.md 1.1).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from ..samplers import Denoiser
from ..samplers.timesteps import DiffusersSpacing, Grid, Timesteps
from .conditioning import Conditioning, split_batch
from .core import Method, Network, OptimizerConfig
from .targets import ddim_transfer, progressive_target, snr_plus_one_weight, truncated_snr_weight

__all__ = ["WEIGHTINGS", "halve", "progressive_loss", "round_steps", "check_student_steps", "ProgressiveDistillation"]

#: x-MSE weights by name (the reference code's ``mean_loss_weight_type``).
WEIGHTINGS = {"truncated_snr": truncated_snr_weight, "snr_plus_one": snr_plus_one_weight}


def halve(grid: Grid) -> Grid:
    """Every other point of an even-step grid: the student's grid of a round."""
    if grid.n_steps % 2:
        raise ValueError(f"a grid of {grid.n_steps} steps cannot be halved")
    return Grid(grid.t[::2], grid.alpha[::2], grid.sigma[::2], grid.schedule)


def round_steps(start_steps: int, end_steps: int = 1) -> list[int]:
    """The students' step counts, one per round: ``start/2, start/4, ..., end`` (powers of two)."""
    for name, n in (("start_steps", start_steps), ("end_steps", end_steps)):
        if not isinstance(n, int) or n < 1 or n & (n - 1):
            raise ValueError(f"progressive distillation needs {name} a power of two >= 1, got {n!r}")
    if end_steps >= start_steps:
        raise ValueError(f"end_steps ({end_steps}) must be below start_steps ({start_steps})")
    steps, n = [], start_steps
    while n > end_steps:
        n //= 2
        steps.append(n)
    return steps


def check_student_steps(prediction_type: str, n_steps: int) -> None:
    """An eps-predicting student cannot take one or two steps: its ``x0 = (z - sigma eps) / alpha``
    divides by ``alpha ~ 0`` at the first step (the reason PD parameterises by x or v)."""
    if prediction_type in ("eps", "epsilon") and n_steps <= 2:
        raise ValueError(f"an eps-parameterised student cannot be distilled to {n_steps} step(s); "
                         "use prediction_type 'v_prediction' or 'sample'")


def progressive_loss(student: Denoiser, teacher: Denoiser, x: Tensor, grid: Grid, index: Tensor, noise: Tensor,
                     weighting: str = "truncated_snr") -> Tensor:
    """Per-example PD loss ``w(t) |x_student(z_t) - x_target|^2`` (mean over pixels).

    ``grid``: the teacher's ``2N``-step grid; ``index [B]``: the student step of each example, in
    ``[0, N)``; ``noise``: the ``eps`` of ``z_t = alpha_t x + sigma_t eps``. The teacher is called twice,
    without gradients; the student once, with.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {sorted(WEIGHTINGS)}")
    n = grid.n_steps // 2
    if grid.n_steps != 2 * n or not grid.ends_at_data:
        raise ValueError("progressive distillation needs an even-step teacher grid that ends at clean data")
    index = index.to(torch.long).cpu()
    if index.min() < 0 or index.max() >= n:
        raise ValueError(f"student step indices must lie in [0, {n})")

    def point(k: Tensor):
        return grid.t[k], (grid.alpha[k], grid.sigma[k])

    (t, coef_t), (t_mid, coef_mid), (_, coef_s) = point(2 * index), point(2 * index + 1), point(2 * index + 2)
    coef_t, coef_mid, coef_s = [tuple(c.to(x.device, x.dtype) for c in pair) for pair in (coef_t, coef_mid, coef_s)]
    a_t, s_t = (c.reshape(-1, *([1] * (x.ndim - 1))) for c in coef_t)
    z_t = a_t * x + s_t * noise
    with torch.no_grad():
        x_hat_t = teacher(z_t, t).x0
        z_mid = ddim_transfer(x_hat_t, z_t, *coef_t, *coef_mid)
        x_hat_mid = teacher(z_mid, t_mid).x0
        target, _ = progressive_target(x_hat_t, x_hat_mid, z_t, coef_t, coef_mid, coef_s, last_step=index == n - 1)
    x_student = student(z_t, t).x0
    weight = WEIGHTINGS[weighting](*coef_t).to(x.dtype)
    return weight * (x_student - target).flatten(1).square().mean(1)


class ProgressiveDistillation(Method):
    """PD on the training core: rounds ``start -> start/2 -> ... -> end`` student steps over nested
    trailing grids of a discrete teacher; each round the student (initialised from the teacher's weights,
    parameterised by ``prediction_type``) learns one DDIM step per two of its teacher's, then becomes the
    teacher (``begin_round``), with a fresh optimizer and a learning rate annealed linearly to 0.

    ``on_student(steps, module, grid, state)`` is called with each finished student (to export it).
    ``teacher`` may be any network ``model(x, t)`` of ``teacher_prediction_type`` or a ``Denoiser`` (the
    exact testbed teacher); ``student`` (default: a copy of the teacher) and ``timesteps`` (default:
    trailing, for discrete schedules) make toy experiments possible.
    """

    name = "progressive"

    def __init__(self, teacher: nn.Module, teacher_prediction_type: str, schedule, start_steps: int = 64,
                 end_steps: int = 1, prediction_type: str = "v_prediction", weighting: str = "truncated_snr",
                 optim: OptimizerConfig | None = None, on_student=None, student: nn.Module | None = None,
                 timesteps: Timesteps | None = None, conditioning: Conditioning | None = None):
        self.students_steps = round_steps(start_steps, end_steps)
        check_student_steps(prediction_type, min(self.students_steps))
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {sorted(WEIGHTINGS)}")
        self.schedule, self.weighting = schedule, weighting
        self.teacher_prediction_type, self.prediction_type = teacher_prediction_type, prediction_type
        self.start_steps, self.end_steps = start_steps, end_steps
        self.timesteps = timesteps if timesteps is not None else DiffusersSpacing("trailing")
        self.base_grid = self.timesteps.grid(schedule, start_steps, final="zero")
        self.cond = conditioning or Conditioning()
        self.teacher = teacher.eval().requires_grad_(False)
        # The student starts as the teacher (or as the network given); from round 1 on, the teacher is the
        # previous round's student, a frozen copy of its architecture.
        self.student = (self.cond.student_network(teacher) if student is None
                        else copy.deepcopy(student).train().requires_grad_(True))
        self.previous = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.optim = optim or OptimizerConfig(lr=5e-5, anneal="linear")
        self.on_student = on_student

    def networks(self):
        return {"student": Network(self.student, self.optim), "teacher": Network(self.teacher),
                "previous": Network(self.previous)}

    def teacher_grid(self, round_index: int) -> Grid:
        grid = self.base_grid
        for _ in range(round_index):
            grid = halve(grid)
        return grid

    def round_steps(self, steps: int) -> list[int]:
        n = len(self.students_steps)
        if steps < n:
            raise ValueError(f"{steps} steps cannot cover {n} PD rounds ({self.students_steps} student steps)")
        return [steps // n + (1 if k < steps % n else 0) for k in range(n)]

    def begin_round(self, round_index: int, state) -> None:
        if round_index == 0:
            return
        finished = state.ema("student")  # the network itself unless an EMA is configured
        if self.on_student is not None:
            self.on_student(self.students_steps[round_index - 1], finished, halve(self.teacher_grid(round_index - 1)),
                            state)
        state.load_weights("previous", finished)  # teacher <- student

    def train_step(self, ctx, batch):
        x, cond = split_batch(batch)
        grid = self.teacher_grid(ctx.round)
        n = grid.n_steps // 2
        index = ctx.randint(n, x.shape[0])
        noise = ctx.randn(*x.shape)
        cond = self.cond.draw(ctx, cond, x.shape[0])
        if ctx.round == 0:  # the teacher, guided as configured; later rounds: the previous student
            teacher = self.cond.teacher(ctx.net("teacher"), self.schedule, self.teacher_prediction_type, cond)
        else:
            teacher = self.cond.student(ctx.net("previous"), self.schedule, self.prediction_type, cond)
        student = self.cond.student(ctx.net("student"), self.schedule, self.prediction_type, cond)
        loss = progressive_loss(student, teacher, x, grid, index, noise, self.weighting).mean()
        return {"loss": ctx.update("student", loss)}

    def final_student(self, state):
        """``(steps, module, grid)`` of the last round's student."""
        return self.students_steps[-1], state.ema("student"), halve(self.teacher_grid(len(self.students_steps) - 1)), state

    def recipe(self) -> dict:
        return {"start_steps": self.start_steps, "end_steps": self.end_steps, "prediction_type": self.prediction_type,
                "teacher_prediction_type": self.teacher_prediction_type, "weighting": self.weighting,
                "optim": dataclasses.asdict(self.optim), "schedule": repr(self.schedule), **self.cond.recipe()}
