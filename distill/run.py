"""``fewstep distill``: train a few-step student from a diffusers DDPM teacher on the training core.

    fewstep distill --config configs/distill/progressive_fmnist.yaml [train.steps=... KEY=VALUE ...]

Students are exported as they finish (PD: one per round) to ``students_dir/<method>-<steps>``, each a
``DDPMPipeline`` folder that ``fewstep.distill.load_student`` turns into a sampler. A killed run resumes
from its last checkpoint with the same command; ``train.output_dir`` also gets ``history.json`` and
``training_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fewstep.config import DistillConfig, TrainConfig, given
from fewstep.data import load_images
from fewstep.io import atomic_write_bytes

from .consistency import MultistepConsistency
from .core import CoreConfig, OptimizerConfig, fit, from_train_config
from .progressive import ProgressiveDistillation
from .students import diffusers_reproducible, export_student

__all__ = ["METHODS", "distill", "core_settings", "plot_history", "cli"]

METHODS = ("progressive", "consistency")

#: diffusers scheduler classes whose config is a DDPM-family (discrete VP) noise schedule.
_DDPM_FAMILY = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                "EulerDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler")


def core_settings(train: TrainConfig, anneal: str) -> tuple[CoreConfig, OptimizerConfig]:
    """The shared ``train:`` section as the core's settings and the student's optimizer, with the
    method's learning-rate anneal; ``ema_decay: 0`` means no EMA (PD keeps none)."""
    core, optim = from_train_config(train)
    return core, dataclasses.replace(optim, anneal=anneal, ema_decay=train.ema_decay or None)


def _load_teacher(path: str | None):
    from diffusers import DDPMPipeline

    from fewstep.samplers.schedules import DiscreteVPSchedule
    from fewstep.teachers import FMNIST

    path = Path(path) if path is not None else FMNIST
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"teacher {path} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DDPMPipeline.from_pretrained(path)
    config = dict(pipe.scheduler.config)
    name = config.get("_class_name", type(pipe.scheduler).__name__)
    if name not in _DDPM_FAMILY or config.get("use_flow_sigmas") or config.get("use_karras_sigmas"):
        raise ValueError(f"teacher {path} has a {name} schedule; distillation here needs a DDPM-family (discrete "
                         "VP) schedule such as DDPMScheduler's")
    schedule = DiscreteVPSchedule.from_diffusers_config(config)
    return pipe.unet.eval(), config, schedule, config.get("prediction_type", "epsilon"), path


def _method(config: DistillConfig, unet, prediction_type: str, schedule, optim: OptimizerConfig, on_student):
    if config.method == "progressive":
        pd = config.progressive
        return ProgressiveDistillation(unet, prediction_type, schedule, pd.start_steps, pd.end_steps,
                                       pd.prediction_type, pd.weighting, optim, on_student)
    if config.method == "consistency":
        cm = config.consistency
        return MultistepConsistency(unet, prediction_type, schedule, cm.student_steps, cm.teacher_steps,
                                    cm.teacher_steps_end, cm.anneal_updates, cm.variant, cm.prediction_type,
                                    cm.huber_c, cm.xvar_frac, optim)
    raise ValueError(f"unknown distillation method {config.method!r}; expected one of {', '.join(METHODS)}")


def distill(config: DistillConfig, max_steps: int | None = None) -> list[Path]:
    """Train (resuming when a checkpoint exists) and export the students; returns their folders."""
    if config.method not in METHODS:
        raise ValueError(f"unknown distillation method {config.method!r}; expected one of {', '.join(METHODS)}")
    unet, scheduler_config, schedule, teacher_type, teacher_path = _load_teacher(config.teacher)
    anneal = getattr(config, config.method).anneal
    core, optim = core_settings(config.train, anneal)
    students_dir = Path(config.students_dir or Path(core.output_dir) / "students")
    exported: list[Path] = []

    def on_student(steps: int, module, grid, state) -> None:
        prediction_type = getattr(config, config.method).prediction_type
        if not diffusers_reproducible(scheduler_config, grid, prediction_type):
            print(f"not exporting the {steps}-step student: diffusers' DDIM cannot visit its grid "
                  f"({scheduler_config.get('num_train_timesteps', 1000)}"
                  f" training steps / {steps} is not an integer)")
            return
        info = {"method": config.method, "teacher": str(teacher_path), "training": _cost(state)}
        exported.append(export_student(module, scheduler_config, grid, prediction_type,
                                       students_dir / f"{config.method}-{steps}", info))

    torch.manual_seed(core.seed)
    method = _method(config, unet, teacher_type, schedule, optim, on_student)
    data = load_images(**given(config.data))
    expected = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if tuple(data.shape[1:]) != expected:
        raise ValueError(f"data of shape {tuple(data.shape[1:])} does not fit the teacher's {expected} input")
    result = fit(method, core, TensorDataset(data), max_steps=max_steps)
    out = Path(core.output_dir)
    atomic_write_bytes(out / "history.json", json.dumps(result.history, indent=1).encode())
    if result.history:
        plot_history(result.history, out / "training_curves.png", title=f"{config.method} distillation")
    if result.state.step == core.steps:
        on_student(*method.final_student(result.state))
    return exported


def _cost(state) -> dict:
    """Optimizer steps and wall time so far (over every resumed run), for the student's record."""
    last = state.history[-1] if state.history else {}
    return {"updates": state.step, "wall_seconds": round(last.get("seconds", 0.0), 1)}


def plot_history(history: list[dict], path: Path, title: str = "") -> Path:
    """Each named loss against the optimizer step (log scale), rounds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reserved = {"step", "round", "steps_per_s", "seconds"}
    names = [k for k in history[0] if k not in reserved]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for name in names:
        ax.plot(steps, [h.get(name, float("nan")) for h in history], label=name)
    for prev, cur in zip(history, history[1:]):
        if cur["round"] != prev["round"]:
            ax.axvline(prev["step"], color="0.8", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli(config: DistillConfig, max_steps: int | None = None) -> int:
    """``fewstep distill``: prints the exported students."""
    for path in distill(config, max_steps):
        print(path)
    return 0
