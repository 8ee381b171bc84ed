"""Progressive distillation (Salimans & Ho, ICLR 2022): a student learns to take one DDIM step where its
teacher takes two, and then becomes the teacher; N -> N/2 -> ... -> 1 steps.

The grids are nested: the teacher of a round runs DDIM over a ``Grid`` of ``2N`` steps (``2N + 1``
points, noise -> clean data), and the student's ``N``-step grid is every other point of it
(``halve``). The student's step ``i`` goes from point ``2i`` to ``2i + 2`` of the teacher's grid, whose
midpoint ``2i + 1`` is where the teacher's second call happens (research note distill.md 1.1).

Parameterisations are the reference's ``mean_type`` (google-research ``diffusion_distillation/dpm.py``,
``Model._run_model``): ``epsilon``, ``sample`` (x), ``v_prediction`` and ``both`` (two heads, ``x`` and
``eps``, reconciled by the SNR weighting, ``both_x0``). In the reference one ``mean_type`` runs teacher
and student and the student starts as a copy of the teacher, so round 0 starts with the student equal to
its teacher; here that is ``prediction_type="teacher"``. Any other choice reads the teacher's weights in
another parameterisation: the student starts as a different function and round 0 first learns the switch.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from ..samplers import Denoiser, ModelDenoiser
from ..samplers.denoisers import Prediction, broadcast_like, canonical_prediction_type
from ..samplers.timesteps import Grid, Timesteps
from .conditioning import Conditioning, split_batch
from .core import Method, Network, OptimizerConfig
from .noise import Noise, noise_for, noise_recipe
from .targets import ddim_transfer, progressive_target, snr_plus_one_weight, truncated_snr_weight

__all__ = ["WEIGHTINGS", "PREDICTION_TYPES", "halve", "progressive_loss", "round_steps", "check_student_steps",
           "both_x0", "BothDenoiser", "ProgressiveDistillation"]


def constant_weight(alpha, sigma) -> Tensor:
    """``1``: plain x-MSE (the reference's ``constant``)."""
    return torch.ones_like(torch.as_tensor(alpha))


def snr_weight(alpha, sigma) -> Tensor:
    """``SNR``: x-MSE weighted to eps-MSE (the reference's ``snr``)."""
    alpha, sigma = torch.as_tensor(alpha), torch.as_tensor(sigma)
    return alpha**2 / sigma**2


#: x-MSE weights by name; the reference code's ``mean_loss_weight_type`` in brackets: ``truncated_snr``
#: (``snr_trunc``, its distillation configs), ``snr_plus_one`` (``v_mse``), ``snr`` (``snr``: eps-MSE),
#: ``constant`` (``constant``: x-MSE).
WEIGHTINGS = {"truncated_snr": truncated_snr_weight, "snr_plus_one": snr_plus_one_weight, "snr": snr_weight,
              "constant": constant_weight}

#: A student's (or teacher's) output: the diffusers names, ``both`` (the reference's two-headed output,
#: not a diffusers parameterisation) and, for a student, ``teacher`` (whatever the teacher predicts).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "both")


def both_x0(x_out: Tensor, eps_out: Tensor, z: Tensor, alpha, sigma) -> Tensor:
    """The reference's ``mean_type='both'`` (``dpm.py``, ``_run_model``): the network predicts ``x`` and
    ``eps``; ``x0 = w x_out + (1 - w) (z - sigma eps_out) / alpha`` with ``w = sigmoid(-logSNR) =
    sigma^2 / (alpha^2 + sigma^2)``, written as ``w x_out + alpha (z - sigma eps_out) / (alpha^2 + sigma^2)``
    so that ``alpha = 0`` (pure noise, where only the ``x`` head counts) is finite."""
    a, s = broadcast_like(alpha, z), broadcast_like(sigma, z)
    norm = a * a + s * s
    return (s * s / norm) * x_out + a * (z - s * eps_out) / norm


class BothDenoiser(Denoiser):
    """A network with ``2C`` output channels (``x`` first, then ``eps``, the reference's split order) as a
    denoiser: ``x0 = both_x0(...)``, ``eps`` from ``x0`` (as the reference recomputes ``model_eps``).
    diffusers' schedulers have no such parameterisation, so a ``both`` student is not exported."""

    def __init__(self, model, schedule):
        super().__init__()
        self.net, self.schedule = ModelDenoiser(model, schedule, "eps"), schedule

    def forward(self, x: Tensor, t, **cond) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha, sigma = self.coefficients(t, x)
        out = self.net.call_model(x, t, **cond)
        if out.shape[1] != 2 * x.shape[1] or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"a 'both' network returns x and eps ({2 * x.shape[1]} channels for an input of "
                             f"{x.shape[1]}), got output {tuple(out.shape)}")
        x_out, eps_out = out.chunk(2, dim=1)
        a, s = broadcast_like(alpha, x), broadcast_like(sigma, x)
        return Prediction(x0=both_x0(x_out, eps_out, x, a, s), x=x, alpha=a, sigma=s)


def _check_prediction_type(prediction_type: str, what: str, schedule=None) -> None:
    """A known parameterisation; a flow velocity only on a schedule with derivatives (a flow teacher's)."""
    if prediction_type == "both":
        return
    if canonical_prediction_type(prediction_type) == "flow" and not hasattr(schedule, "alpha_dot"):  # raises if unknown
        raise ValueError(f"{what} {prediction_type!r} is a flow velocity, which needs a flow-matching schedule; expected "
                         f"one of {PREDICTION_TYPES}")


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
    divides by ``alpha ~ 0`` at the first step (the reason PD parameterises by x, v or both)."""
    if prediction_type in ("eps", "epsilon") and n_steps <= 2:
        raise ValueError(f"an eps-parameterised student cannot be distilled to {n_steps} step(s) (x0 = (z - sigma "
                         "eps) / alpha divides by alpha ~ 0); use prediction_type 'v_prediction' or 'sample', or "
                         "end_steps >= 4")


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
    grids of the teacher's schedule; each round the student learns one DDIM step per two of its
    teacher's, then becomes the teacher (``begin_round``), with a fresh optimizer and a learning rate
    annealed linearly to 0.

    ``prediction_type``: the student's parameterisation (``PREDICTION_TYPES``), or ``"teacher"``: the
    teacher's own, the reference's semantics, where round 0's student starts equal to its teacher. The
    student starts from the teacher's weights (or ``student``); read in another parameterisation than the
    teacher's they are another function (``starts_as_teacher`` is False; so too under guidance, where the
    teacher is the guided combination of the network the student copies). A ``both`` student needs a
    ``student`` network with twice the teacher's output channels (``x`` then ``eps``).

    With an EMA of the student (``optim.ema_decay``), a round begins as in the reference: teacher <- the
    EMA of the previous student, student <- the same weights, EMA restarted from them.

    ``on_student(steps, module, grid, state)`` is called with each finished student (to export it).
    ``teacher`` may be any network ``model(x, t)`` of ``teacher_prediction_type`` or a ``Denoiser`` (the
    exact testbed teacher); the grids are ``noise``'s (``distill.noise``: DDPM trailing, flow shifted-uniform,
    EDM Karras; default ``noise_for(schedule, timesteps)``); ``student`` (default: a copy of the teacher) and
    ``timesteps`` make toy experiments possible.
    """

    name = "progressive"

    def __init__(self, teacher: nn.Module, teacher_prediction_type: str, schedule, start_steps: int = 64,
                 end_steps: int = 1, prediction_type: str = "v_prediction", weighting: str = "truncated_snr",
                 optim: OptimizerConfig | None = None, on_student=None, student: nn.Module | None = None,
                 timesteps: Timesteps | None = None, conditioning: Conditioning | None = None, noise: Noise | None = None):
        self.students_steps = round_steps(start_steps, end_steps)
        _check_prediction_type(teacher_prediction_type, "teacher_prediction_type", schedule)
        if prediction_type == "teacher":
            prediction_type = teacher_prediction_type
        _check_prediction_type(prediction_type, "prediction_type", schedule)
        check_student_steps(prediction_type, min(self.students_steps))
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {sorted(WEIGHTINGS)}")
        if prediction_type == "both" and student is None and teacher_prediction_type != "both":
            raise ValueError("a 'both' student predicts x and eps (twice the teacher's output channels): give a "
                             "`student` network with two heads, or use prediction_type 'teacher'")
        self.schedule, self.weighting = schedule, weighting
        self.teacher_prediction_type, self.prediction_type = teacher_prediction_type, prediction_type
        self.start_steps, self.end_steps = start_steps, end_steps
        self.noise = noise if noise is not None else noise_for(schedule, timesteps)
        self.base_grid = self.noise.grid(start_steps)
        self.cond = conditioning or Conditioning()
        self.teacher = teacher.eval().requires_grad_(False)
        # The student starts as the teacher (or as the network given); from round 1 on, the teacher is the
        # previous round's student, a frozen copy of its architecture.
        self.student = self.cond.student_network(teacher if student is None else student)
        # Whether round 0's student is the function its teacher is (not so for weights read in another
        # parameterisation, nor under guidance, where the teacher is the guided combination).
        self.starts_as_teacher = (student is None and _same_type(prediction_type, teacher_prediction_type)
                                  and not self.cond.guidance.active)
        self.previous = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.optim = optim or OptimizerConfig(lr=5e-5, anneal="linear")
        self.on_student = on_student

    def networks(self):
        return {"student": Network(self.student, self.optim), "teacher": Network(self.teacher, persistent=False),
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
        if "student" in state.emas:  # the reference: the new student is its teacher; the EMA restarts there
            state.load_weights("student", finished)

    def _denoiser(self, net, prediction_type: str) -> Denoiser | nn.Module:
        """``net`` as ``Conditioning`` takes it: a ``both`` network wrapped here (diffusers has no such type)."""
        if prediction_type != "both" or isinstance(net, Denoiser):
            return net
        return BothDenoiser(self.cond.family.call(net) if self.cond.family is not None else net, self.schedule)

    def loss(self, x: Tensor, index: Tensor, noise: Tensor, round_index: int = 0, cond: dict | None = None,
             student: nn.Module | None = None, teacher: nn.Module | None = None) -> Tensor:
        """Per-example loss of round ``round_index`` (student steps ``index [B]`` in ``[0, N)``): the
        networks given, or this method's own (round 0: the teacher; later: the previous student)."""
        cond = cond or {}
        if round_index == 0:  # the teacher, guided as configured; later rounds: the previous student
            teacher = self.teacher if teacher is None else teacher
            teacher = self.cond.teacher(self._denoiser(teacher, self.teacher_prediction_type), self.schedule,
                                        _diffusers_type(self.teacher_prediction_type), cond)
        else:
            teacher = self.previous if teacher is None else teacher
            teacher = self.cond.student(self._denoiser(teacher, self.prediction_type), self.schedule,
                                        _diffusers_type(self.prediction_type), cond)
        student = self.student if student is None else student
        student = self.cond.student(self._denoiser(student, self.prediction_type), self.schedule,
                                    _diffusers_type(self.prediction_type), cond)
        return progressive_loss(student, teacher, x, self.teacher_grid(round_index), index, noise, self.weighting)

    def train_step(self, ctx, batch):
        x, cond = split_batch(batch)
        n = self.teacher_grid(ctx.round).n_steps // 2
        index = ctx.randint(n, x.shape[0])
        noise = ctx.randn(*x.shape)
        cond = self.cond.draw(ctx, cond, x.shape[0])
        teacher = ctx.net("teacher") if ctx.round == 0 else ctx.net("previous")
        loss = self.loss(x, index, noise, ctx.round, cond, student=ctx.net("student"), teacher=teacher).mean()
        return {"loss": ctx.update("student", loss)}

    def final_student(self, state):
        """``(steps, module, grid)`` of the last round's student."""
        return self.students_steps[-1], state.ema("student"), self.final_grid(), state

    def final_grid(self) -> Grid:
        """The last round's student grid (what its export must be able to run)."""
        return halve(self.teacher_grid(len(self.students_steps) - 1))

    def _round_start(self) -> str:
        return "teacher_and_student_from_ema" if self.optim.ema_decay is not None else "teacher_from_student"

    def recipe(self) -> dict:
        return {"start_steps": self.start_steps, "end_steps": self.end_steps, "prediction_type": self.prediction_type,
                "teacher_prediction_type": self.teacher_prediction_type, "weighting": self.weighting,
                "starts_as_teacher": self.starts_as_teacher, "round_start": self._round_start(),
                "optim": dataclasses.asdict(self.optim), "schedule": repr(self.schedule), **noise_recipe(self.noise),
                **self.cond.recipe()}

    def student_info(self) -> dict:
        """What an exported student's ``fewstep_student.json`` records about its training."""
        return {"weighting": self.weighting, "teacher_prediction_type": self.teacher_prediction_type,
                "starts_as_teacher": self.starts_as_teacher, "round_start": self._round_start()}


def _diffusers_type(prediction_type: str) -> str:
    """What ``Conditioning`` passes to ``ModelDenoiser`` (unused for a ``both`` network, wrapped already)."""
    return "epsilon" if prediction_type == "both" else prediction_type


def _same_type(a: str, b: str) -> bool:
    return a == b or ("both" not in (a, b) and canonical_prediction_type(a) == canonical_prediction_type(b))
