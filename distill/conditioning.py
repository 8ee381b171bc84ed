"""Conditions and classifier-free guidance inside the trainers: one mechanism for all four methods.

Every trainer calls its networks through ``Conditioning``: ``teacher(net, ...)`` is the (guided) teacher,
``student(net, ...)`` a student or fake score, both returned as denoisers with the batch's conditions bound
(``Bound``), so the pure loss functions of ``targets``, ``progressive`` and ``consistency`` keep calling
``denoiser(z, t)``. Classifier-free guidance (Ho & Salimans 2022) comes in two modes:

- ``baked`` (DMD2, LCM's distilled CFG, FastGen): the teacher's target is its guided prediction at scale ``w``,
  ``x0_u + w (x0_c - x0_u)``; the student sees the plain condition and is sampled without guidance.
- ``conditioned`` (Meng et al. 2023, "On Distillation of Guided Diffusion Models"; LCM's ``w`` embedding):
  ``w`` is drawn per example, uniform in ``scale_range``; the teacher is guided at each example's ``w`` and
  the student receives ``w`` as an input (the family's guidance embedding), so one student serves the range.

For f-distill and SIM, ``fake_guided`` says whether the fake score is guided too (SiD-LSG) or only the teacher
(DMD2, FastGen: the default); a guided fake score needs the null condition in its training, so its
denoising loss drops conditions with probability ``fake_dropout``.

With a ``LoRA`` (``lora``), every student, generator and (when ``lora.fake``) fake score that
``student_network`` makes is the copied network with frozen weights plus trainable LoRA factors (``lora.inject``);
a guidance embedding the student gains (w-conditioned) is new, so it trains in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..samplers import Denoiser, ModelDenoiser
from ..samplers.denoisers import Prediction, broadcast_like
from .families import GUIDANCE_KEY, Family, cond_cat, cond_repeat, cond_rows, cond_without
from .lora import LoRA, inject

__all__ = ["GUIDANCE_MODES", "Guidance", "Bound", "GuidedDenoiser", "Conditioning", "split_batch"]

GUIDANCE_MODES = ("none", "baked", "conditioned")


@dataclass(frozen=True)
class Guidance:
    """How a student inherits classifier-free guidance (module docstring)."""

    mode: str = "none"
    scale: float = 1.0  # baked: the teacher's w
    scale_range: tuple[float, float] = (1.0, 8.0)  # conditioned: w ~ U[lo, hi] per example
    fake_guided: bool = False
    fake_dropout: float = 0.1

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance.mode must be one of {', '.join(GUIDANCE_MODES)}, got {self.mode!r}")
        lo, hi = self.scale_range
        if self.mode == "baked" and not self.scale >= 1:
            raise ValueError(f"guidance.scale must be >= 1 (1: the conditional teacher unguided), got {self.scale}")
        if self.mode == "conditioned" and not 0 <= lo <= hi:
            raise ValueError(f"guidance.scale_range must satisfy 0 <= lo <= hi, got {self.scale_range}")
        if not 0 <= self.fake_dropout < 1:
            raise ValueError(f"guidance.fake_dropout must lie in [0, 1), got {self.fake_dropout}")
        if self.fake_guided and self.mode == "none":
            raise ValueError("guidance.fake_guided needs a guided teacher (guidance.mode baked or conditioned)")

    @property
    def active(self) -> bool:
        return self.mode != "none"


def split_batch(batch) -> tuple[Tensor | None, dict[str, Tensor]]:
    """``(x, cond)`` from what a data loader yields: a tensor (unconditional data), a dict ``{"x": ...,
    "cond": {...}}`` (conditional data; ``x`` absent for condition-only data) or ``None`` (data-free)."""
    if batch is None:
        return None, {}
    if torch.is_tensor(batch):
        return batch, {}
    if isinstance(batch, dict):
        return batch.get("x"), dict(batch.get("cond", {}))
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], {}
    raise TypeError(f"a batch must be a tensor or a dict with 'x' and 'cond', got {type(batch).__name__}")


class Bound:
    """A denoiser with per-example conditions bound: ``bound(x, t)`` is ``denoiser(x, t, **cond)``;
    ``rows(mask)`` keeps the conditions of those rows (for losses that evaluate a subset of the batch)."""

    def __init__(self, denoiser: Denoiser, cond: dict[str, Tensor]):
        self.denoiser, self.cond = denoiser, cond
        self.schedule = denoiser.schedule

    def __call__(self, x: Tensor, t) -> Prediction:
        return self.denoiser(x, t, **self.cond) if self.cond else self.denoiser(x, t)

    def rows(self, rows) -> "Bound":
        return Bound(self.denoiser, cond_rows(self.cond, rows))


def guided_prediction(denoiser: Denoiser, x: Tensor, t, cond: dict[str, Tensor], null: dict[str, Tensor],
                      w) -> Prediction:
    """``x0_u + w (x0_c - x0_u)`` (and the same for ``eps``) from one call over the doubled batch
    ``[cond; null]``; ``w`` a scalar or per example."""
    rows = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float64)
    both = denoiser(torch.cat([x, x]), torch.cat([t, t]) if t.ndim else t, **cond_cat(cond, null))
    w = broadcast_like(w, x)
    x0_c, x0_u = both.x0[:rows], both.x0[rows:]
    eps_c, eps_u = both.eps[:rows], both.eps[rows:]
    return Prediction(x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u))


class GuidedDenoiser(Denoiser):
    """Classifier-free guidance of a conditional denoiser, ``x0 = x0_u + w (x0_c - x0_u)`` (and the same for
    ``eps``: both are affine in the output at fixed ``x``), with ``w`` per example from the condition's
    ``GUIDANCE_KEY`` or the fixed ``scale``. One network call over the doubled batch ``[cond; null]``."""

    def __init__(self, denoiser: Denoiser, null: dict[str, Tensor], scale: float = 1.0):
        super().__init__()
        self.denoiser, self.null, self.scale = denoiser, null, float(scale)
        self.schedule = denoiser.schedule

    def forward(self, x: Tensor, t, **cond: Tensor) -> Prediction:
        w = cond.pop(GUIDANCE_KEY, self.scale)
        if not torch.is_tensor(w) and w == 1.0:
            return self.denoiser(x, t, **cond)
        return guided_prediction(self.denoiser, x, t, cond, cond_repeat(self.null, x.shape[0]), w)


class Conditioning:
    """The trainers' view of a teacher family and its guidance: builds every denoiser a method calls.

    ``family=None`` is a bare network ``model(x, t)`` or a ``Denoiser`` (the exact testbed), unconditional
    unless the denoiser itself takes conditions; ``null`` then gives the testbed's null condition.
    """

    def __init__(self, family: Family | None = None, guidance: Guidance | None = None,
                 null: dict[str, Tensor] | None = None, lora: LoRA | None = None):
        self.family, self.guidance, self.lora = family, guidance or Guidance(), lora
        if self.guidance.active:
            if null is None:
                if family is None or not family.conditional:
                    raise ValueError("classifier-free guidance needs a conditional teacher")
                null = family.null(1)
        self._null = null

    @property
    def student_takes_guidance(self) -> bool:
        return self.guidance.mode == "conditioned"

    def student_network(self, module: nn.Module, fake: bool = False) -> nn.Module:
        """A trainable copy of ``module`` for a student (``fake``: the fake score): with the family's
        guidance-scale input when the student is w-conditioned; with a LoRA (all of ``module``'s weights frozen)
        when one is configured (for the fake score: when ``lora.fake``)."""
        import copy

        net = copy.deepcopy(module)
        if self.student_takes_guidance and not isinstance(net, Denoiser):
            net = self.family.with_guidance_input(net)
        net = net.train().requires_grad_(True)
        if self.lora is None or (fake and not self.lora.fake) or isinstance(net, Denoiser):
            return net
        new = {name for name, _ in net.named_parameters()} - {name for name, _ in module.named_parameters()}
        inject(net, self.lora)
        for name, param in net.named_parameters():
            if name in new:  # a layer the copy gained (the guidance embedding): not the teacher's, so trained
                param.requires_grad_(True)
        return net

    def recipe(self) -> dict:
        """What a resumed run must share: the guidance and the teacher's identity."""
        from dataclasses import asdict

        out = {"guidance": asdict(self.guidance)}
        if self.lora is not None:
            out["lora"] = self.lora.recipe()
        if self.family is not None:
            out["teacher"] = self.family.describe()["id"]
        return out

    def null(self, rows: int, device=None) -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in cond_repeat(self._null, rows).items()}

    def denoiser(self, net, schedule, prediction_type: str) -> Denoiser:
        """``net`` (a diffusers network, any ``model(x, t, **cond)``, or a ``Denoiser``) as a denoiser."""
        if isinstance(net, Denoiser):
            return net
        model = self.family.call(net) if self.family is not None else net
        return ModelDenoiser(model, schedule, prediction_type=prediction_type)

    def teacher(self, net, schedule, prediction_type: str, cond: dict[str, Tensor]) -> Bound:
        """The teacher as the target sees it: guided at the baked scale or at each example's ``w``."""
        den = self.denoiser(net, schedule, prediction_type)
        if self.guidance.active:
            den = GuidedDenoiser(den, self._null, self.guidance.scale)
            return Bound(den, cond)
        return Bound(den, cond_without(cond, GUIDANCE_KEY))

    def plain(self, net, schedule, prediction_type: str, cond: dict[str, Tensor]) -> Bound:
        """The network under the plain condition: no guidance, no ``w`` (e.g. the teacher's features)."""
        return Bound(self.denoiser(net, schedule, prediction_type), cond_without(cond, GUIDANCE_KEY))

    def student(self, net, schedule, prediction_type: str, cond: dict[str, Tensor]) -> Bound:
        """A student (or a network of the student's kind): gets ``w`` only when it is w-conditioned."""
        den = self.denoiser(net, schedule, prediction_type)
        return Bound(den, cond if self.student_takes_guidance else cond_without(cond, GUIDANCE_KEY))

    def fake(self, net, schedule, prediction_type: str, cond: dict[str, Tensor]) -> Bound:
        """The fake score in the generator's loss: guided like the teacher when ``fake_guided``."""
        if not self.guidance.fake_guided:
            return self.student(net, schedule, prediction_type, cond)
        den = self.denoiser(net, schedule, prediction_type)
        student_cond = cond if self.student_takes_guidance else cond_without(cond, GUIDANCE_KEY)
        return Bound(_FakeGuided(den, self._null, self.guidance.scale, self.student_takes_guidance), student_cond)

    def draw(self, ctx, cond: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
        """The batch's conditions plus, for a w-conditioned student, each example's ``w`` (from the step's
        shared generator, so N processes draw what one would)."""
        if not self.student_takes_guidance:
            return cond
        lo, hi = self.guidance.scale_range
        w = lo + (hi - lo) * ctx.rand(rows)
        return {**cond, GUIDANCE_KEY: w}

    def drop(self, ctx, cond: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
        """``cond`` with each example replaced by the null condition with probability ``fake_dropout`` (the
        fake score's training, when it is guided); unchanged otherwise."""
        if not (self.guidance.fake_guided and cond):
            return cond
        keep = ctx.rand(rows) >= self.guidance.fake_dropout
        null = self.null(rows)
        out = {}
        for k, v in cond.items():
            if k == GUIDANCE_KEY:
                out[k] = v
                continue
            mask = keep.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
            out[k] = torch.where(mask, v, null[k].to(v.device, v.dtype))
        return out


class _FakeGuided(Denoiser):
    """The fake score guided like the teacher (SiD-LSG): ``x0_u + w (x0_c - x0_u)`` with the fake network's
    own null-condition prediction, at the baked ``scale`` or, for a w-conditioned fake network, at each
    example's ``w`` from its condition (which it also gets as its input, in both halves)."""

    def __init__(self, denoiser: Denoiser, null: dict[str, Tensor], scale: float, keep_w: bool):
        super().__init__()
        self.denoiser, self.null_cond, self.scale, self.keep_w = denoiser, null, float(scale), keep_w
        self.schedule = denoiser.schedule

    def forward(self, x: Tensor, t, **cond: Tensor) -> Prediction:
        null = cond_repeat(self.null_cond, x.shape[0])
        if self.keep_w:
            null = {**null, GUIDANCE_KEY: cond[GUIDANCE_KEY]}
        return guided_prediction(self.denoiser, x, t, cond, null, cond[GUIDANCE_KEY] if self.keep_w else self.scale)
