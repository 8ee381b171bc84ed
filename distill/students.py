"""Students are samplers: a distilled network plus the DDIM grid it was trained for.

A student folder is its teacher's own pipeline class (``StableDiffusionPipeline``, ``DiTPipeline``,
``DDPMPipeline``, ``StableDiffusion3Pipeline``, ...: the student network, the teacher's other components, and
a scheduler that runs the student's grid: a ``DDIMScheduler`` with trailing timesteps and no clipping for a
DDPM teacher, a ``FewstepScheduler`` holding the grid's sigmas for a flow-matching or EDM teacher), so ``<Pipeline>.from_pretrained(path)`` loads it
offline and ``pipe(..., num_inference_steps=steps)`` reproduces its sampling, plus ``fewstep_student.json``
(method, steps, grid, prediction type, training cost, the teacher's identity, the guidance it learned).
A LoRA student (``fewstep.distill.lora``) is exported merged (``fused``: as above) or as the LoRA alone
(``lora``): diffusers' LoRA file and the student's ``scheduler/`` beside the record, which names the teacher's
folder, for ``<Pipeline>.from_pretrained(teacher).load_lora_weights(student)``.
``load_student(path)`` returns it as a ``Sampler`` with NFE = its steps that takes the teacher's conditions
(``prompt``, ``class_labels``, ``guidance_scale``), so the FID harness and sweeps treat it like any sampler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir
from ..samplers import Denoiser, ModelDenoiser, Sampler
from ..samplers.timesteps import ExplicitTimesteps, Grid
from .conditioning import Bound

__all__ = ["STUDENT_FILE", "export_student", "load_student", "read_student_record",
           "StudentSampler", "student_denoiser", "student_sampler", "lora_student_network"]

STUDENT_FILE = "fewstep_student.json"

def student_denoiser(model: nn.Module, schedule, prediction_type: str):
    """A network ``model(x, t)`` (a diffusers UNet, or any module) as a denoiser of ``schedule``; a
    ``Denoiser`` (e.g. an exact testbed teacher) is returned as it is."""
    if isinstance(model, Denoiser):
        return model
    return ModelDenoiser(model, schedule, prediction_type=prediction_type)


def student_sampler(denoiser, grid: Grid) -> Sampler:
    """DDIM over the student's ``N``-step grid (NFE = N), ending at clean data (PD's and MCM's sampler)."""
    if not grid.ends_at_data:
        raise ValueError("a student grid must end at clean data")
    return Sampler(denoiser, "ddim", steps=grid.n_steps, timesteps=ExplicitTimesteps(grid.t[:-1].tolist()))


def read_student_record(path: str | os.PathLike, what: str = "student") -> dict:
    """A student folder's ``fewstep_student.json``, or a one-line error saying it is not a student."""
    from .families import TeacherError

    record_path = Path(path) / STUDENT_FILE
    if not record_path.is_file():
        raise TeacherError(f"{what} {path} is not a fewstep student (no {STUDENT_FILE}); export one with "
                           "`fewstep distill`")
    return json.loads(record_path.read_text())


def export_student(model: nn.Module, noise, grid: Grid, prediction_type: str, path: str | os.PathLike,
                   info: dict | None = None, family=None, guidance=None, lora=None) -> Path:
    """Save a student as its teacher's pipeline class (``family``; a ``DDPMPipeline`` without one) with the
    scheduler that runs its grid (``noise.student_scheduler``: diffusers' ``DDIMScheduler`` on DDPM
    teachers, ``FewstepScheduler`` with the grid in its config on flow and EDM ones; ``noise``: the teacher's
    ``distill.noise.Noise``, or a DDPM scheduler config), plus ``fewstep_student.json`` (steps, grid,
    prediction type, the teacher's identity, the guidance it learned), atomically (``atomic_dir``: a killed
    export never leaves a half-written student). A LoRA student (``lora``: its ``LoRA``) is merged first
    (``lora.export`` fused) or written as the LoRA alone for the teacher's pipeline (``Family.export_lora``)."""
    from diffusers import DDPMPipeline

    from .lora import has_lora, lora_parameters, lora_state_dict, merged, peft_config
    from .noise import noise_from_config

    path = Path(path)
    if isinstance(noise, dict):
        noise = noise_from_config({"_class_name": "DDPMScheduler", **noise})
    times = [float(t) for t in grid.t[:-1].tolist()]
    scheduler = noise.student_scheduler(grid, prediction_type)  # raises, saying why, for a grid it cannot run
    record = {"steps": len(times), "timesteps": times, "prediction_type": prediction_type,
              "noise": noise.kind, **(info or {})}
    lora_file = None
    if lora is not None and has_lora(model):
        record["lora"] = {"rank": lora.rank, "alpha": lora.scale_alpha, "target_modules": list(lora.targets),
                          "dropout": lora.dropout, "export": lora.export, "parameters": lora_parameters(model)}
        if lora.export == "lora":
            if family is None or not family.lora_loadable:
                raise ValueError("lora.export=lora needs a pipeline with diffusers' LoRA loader: use lora.export=fused")
            lora_file = (lora_state_dict(model), peft_config(lora).to_dict())
        else:
            model = merged(model)
    if family is not None:
        record["teacher"] = family.describe()
        record["guidance"] = _guidance_record(guidance)
        if lora_file is not None:  # the teacher's folder is part of this student: where to find it
            record["teacher"]["path"] = str(Path(family.path).resolve())
        elif record["guidance"]["mode"] == "baked" and family.accepts_guidance_input:
            # A guidance embedding with zero weights: the student is unchanged, and its pipeline (which skips
            # classifier-free guidance for a UNet with time_cond_proj_dim) ignores guidance_scale instead of
            # guiding a student whose guidance is already in its weights.
            model = family.with_guidance_input(model)
            record["guidance"]["pipeline_ignores_guidance_scale"] = True
    with atomic_dir(path) as tmp:
        if family is None:
            DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp)
        elif lora_file is not None:
            family.export_lora(*lora_file, scheduler, tmp)
        else:
            family.export(model, scheduler, tmp)
        (tmp / STUDENT_FILE).write_text(json.dumps(record, indent=1))
    return path


def _guidance_record(guidance) -> dict:
    """What a student must know about the guidance it learned: ``none`` (sample it like its teacher, guided
    or not), ``baked`` at ``scale`` (sample it unguided), or ``conditioned`` on ``scale_range`` (its
    ``guidance_scale`` is an input)."""
    if guidance is None or guidance.mode == "none":
        return {"mode": "none"}
    if guidance.mode == "baked":
        return {"mode": "baked", "scale": guidance.scale, "negative_prompt": guidance.negative_prompt}
    return {"mode": "conditioned", "scale_range": list(guidance.scale_range), "negative_prompt": guidance.negative_prompt}


class StudentSampler(Sampler):
    """A student as a ``Sampler`` (NFE = its steps) that also takes its conditions under diffusers' names
    and returns images (latent students are decoded by the teacher's autoencoder).

    ``sample(x_T, prompt=..., negative_prompt=..., class_labels=..., guidance_scale=...)``: ``x_T`` in the
    network's space (``family.sample_shape()``). ``guidance_scale``: a w-conditioned student's input
    (default: the middle of its range); refused for a guidance-baked student (its guidance is in its
    weights), classifier-free guidance for an unguided one (as its pipeline would do).
    """

    def __init__(self, family, record: dict, denoiser, **kwargs):
        super().__init__(denoiser, "ddim", steps=record["steps"], timesteps=ExplicitTimesteps(record["timesteps"]),
                         **kwargs)
        self.family, self.student = family, record
        self._plain = denoiser

    def conditions(self, prompt=None, negative_prompt=None, class_labels=None, guidance_scale=None,
                   rows: int | None = None) -> tuple[dict, object]:
        """``(cond, denoiser)`` for these inputs: the encoded condition and the (guided) denoiser to run."""
        from .conditioning import GuidedDenoiser
        from .families import GUIDANCE_KEY, TeacherError

        family, mode = self.family, self.student.get("guidance", {}).get("mode", "none")
        raw = prompt if prompt is not None else class_labels
        if prompt is not None and class_labels is not None:
            raise TeacherError("give prompt or class_labels, not both")
        if family.conditional and raw is None:
            what = "prompt" if family.condition_kind == "text" else "class_labels"
            raise TeacherError(f"this student of a conditional {family.name} teacher needs {what}")
        if not family.conditional and (raw is not None or negative_prompt is not None):
            raise TeacherError(f"this student of an unconditional {family.name} teacher takes no conditions")
        if isinstance(raw, (str, int)):
            raw = [raw]
        cond = family.encode(raw) if family.conditional else {}
        if rows is not None and cond and len(next(iter(cond.values()))) == 1 and rows > 1:
            cond = {k: v.expand(rows, *v.shape[1:]) for k, v in cond.items()}
        denoiser = self._plain
        if mode == "baked" and guidance_scale not in (None, 1, 1.0):
            raise TeacherError(f"this student has guidance w={self.student['guidance']['scale']} baked in; sample it "
                               "without guidance_scale (or 1)")
        if mode == "baked" and self.student["guidance"].get("pipeline_ignores_guidance_scale"):
            n = len(next(iter(cond.values())))  # its zero-weight guidance input still wants a value
            cond = {**cond, GUIDANCE_KEY: torch.full((n,), float(self.student["guidance"]["scale"]),
                                                    device=next(iter(cond.values())).device)}
        if mode == "conditioned":
            lo, hi = self.student["guidance"]["scale_range"]
            w = (lo + hi) / 2 if guidance_scale is None else float(guidance_scale)
            if not lo <= w <= hi:
                raise TeacherError(f"guidance_scale {w} is outside the range this student learned, [{lo}, {hi}]")
            n = len(next(iter(cond.values())))
            cond = {**cond, GUIDANCE_KEY: torch.full((n,), w, device=next(iter(cond.values())).device)}
        elif mode == "none" and guidance_scale not in (None, 1, 1.0):
            null = family.encode([negative_prompt]) if negative_prompt is not None else family.null(1)
            denoiser = GuidedDenoiser(self._plain, {k: v[:1] for k, v in null.items()}, float(guidance_scale))
        return cond, denoiser

    @torch.no_grad()
    def sample(self, x_T, generator=None, noise=None, callback=None, progress=False, prompt=None,
               negative_prompt=None, class_labels=None, guidance_scale=None, output_type: str = "images"):
        """Images in ``[-1, 1]`` (``output_type="latent"``: what the network denoises) from standard-normal
        ``x_T``, scaled as the pipeline scales its ``latents`` (EDM: by ``init_noise_sigma``)."""
        cond, denoiser = self.conditions(prompt, negative_prompt, class_labels, guidance_scale, rows=x_T.shape[0])
        self.denoiser = Bound(denoiser, cond) if cond else denoiser
        x_T = self.family.noise.prior(x_T, self.grid)  # as its pipeline scales latents (EDM: init_noise_sigma)
        try:
            x = super().sample(x_T, generator=generator, noise=noise, callback=callback, progress=progress)
        finally:
            self.denoiser = self._plain
        if output_type == "latent":
            return x
        if output_type != "images":
            raise ValueError(f"output_type must be 'images' or 'latent', got {output_type!r}")
        return self.family.decode_latents(x) if self.family.latent else x


def load_student(path: str | os.PathLike, device: str | torch.device = "cpu",
                 teacher: str | os.PathLike | None = None) -> StudentSampler:
    """A committed or exported student as a ``StudentSampler`` (NFE = its steps), loaded through its
    pipeline family (the teacher's pipeline class). A LoRA-only student is its teacher's pipeline (from the
    folder its record names, or ``teacher``) with the LoRA loaded as a user would (``load_lora_weights``)."""
    from .families import family_of

    path = Path(path)
    record = read_student_record(path)
    if record.get("lora", {}).get("export") == "lora":
        family = _lora_student_family(path, record, teacher)
    else:
        family = family_of(path).load(path)
    family.pipe.to(device)
    net = family.denoiser_network.eval().requires_grad_(False)
    for module in family.pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
    denoiser = ModelDenoiser(family.call(net), family.schedule, prediction_type=record["prediction_type"])
    return StudentSampler(family, record, denoiser)


def _lora_student_family(path: Path, record: dict, teacher=None):
    """The teacher's pipeline (checked to be the one the LoRA was trained on) with the student's LoRA loaded
    by diffusers' ``load_lora_weights`` and the student's scheduler, as the README tells a user to do."""
    from diffusers import DDIMScheduler

    from ..samplers.schedulers import FewstepScheduler
    from .families import TeacherError, family_of, quiet_diffusers, teacher_identity

    recorded = record.get("teacher") or {}
    where = Path(teacher if teacher is not None else recorded.get("path", ""))
    if not (where / "model_index.json").is_file():
        raise TeacherError(f"LoRA student {path} needs its teacher pipeline, recorded at {where}, which is not a "
                           "pipeline folder; load it with load_student(path, teacher=FOLDER)")
    if teacher_identity(where) != recorded.get("id"):
        raise TeacherError(f"{where} is not the teacher LoRA student {path} was trained on (teacher id "
                           f"{recorded.get('id')}); give load_student(path, teacher=FOLDER) that teacher")
    family = family_of(where).load(where)
    with quiet_diffusers():
        family.pipe.load_lora_weights(path)
    kind = record.get("noise", "ddpm")
    family.pipe.scheduler = (DDIMScheduler if kind == "ddpm" else FewstepScheduler).from_pretrained(path / "scheduler")
    family.scheduler_config = dict(family.pipe.scheduler.config)
    return family


def lora_student_network(path: str | os.PathLike, family) -> nn.Module:
    """The network of a LoRA-only student at ``path`` of ``family``'s teacher: the teacher's network with the
    LoRA merged in (to start another student from it)."""
    import copy

    from safetensors.torch import load_file

    from .lora import LoRA, inject, load_lora_state, merged

    record = read_student_record(path)["lora"]
    lora = LoRA(rank=record["rank"], targets=tuple(record["target_modules"]), alpha=record["alpha"])
    net = inject(copy.deepcopy(family.denoiser_network), lora)
    prefix = f"{family.network}."
    state = load_file(Path(path) / "pytorch_lora_weights.safetensors")
    load_lora_state(net, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return merged(net)
