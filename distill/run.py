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
from .matching import DistributionMatching
from .progressive import ProgressiveDistillation
from .students import diffusers_reproducible, export_student

__all__ = ["METHODS", "distill", "core_settings", "plot_history", "cli"]

METHODS = ("progressive", "consistency", "fdistill", "sim")

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
        init = None if cm.student_init is None else _student_init(cm.student_init, cm.prediction_type, "student_init")
        return MultistepConsistency(unet, prediction_type, schedule, cm.student_steps, cm.teacher_steps,
                                    cm.teacher_steps_end, cm.anneal_updates, cm.variant, cm.prediction_type,
                                    cm.huber_c, cm.xvar_frac, optim, student=init, student_init=cm.student_init)
    if config.method in ("fdistill", "sim"):
        return _matching(config, unet, prediction_type, schedule, optim)
    raise ValueError(f"unknown distillation method {config.method!r}; expected one of {', '.join(METHODS)}")


def _matching(config: DistillConfig, unet, prediction_type: str, schedule, optim: OptimizerConfig):
    """f-distill (``fdistill:``) or SIM (``sim:``): one-step generators; the critics share ``train:``'s
    optimizer settings except their learning rate (``critic_lr``) and keep no EMA."""
    section = getattr(config, config.method)
    critic = dataclasses.replace(optim, lr=section.critic_lr or optim.lr, ema_decay=None)
    init = None
    if section.generator_init is not None:
        init = _student_init(section.generator_init, section.prediction_type, "generator_init")
    common = dict(prediction_type=section.prediction_type, update_ratio=section.update_ratio, min_t=section.min_t,
                  max_t=section.max_t, optim=optim, critic_optim=critic, generator_init=init, name=config.method)
    if config.method == "fdistill":
        if section.variant not in ("f_distill", "diff_instruct"):
            raise ValueError(f"fdistill.variant must be 'f_distill' or 'diff_instruct', got {section.variant!r}")
        return DistributionMatching(unet, prediction_type, schedule, objective=section.variant, f=section.f,
                                    discriminator=section.discriminator, real_data=section.discriminator,
                                    gan_weight=section.gan_weight, r1_weight=section.r1_weight,
                                    ratio_clamp=(section.ratio_lower, section.ratio_upper),
                                    ratio_bins=section.ratio_bins, ratio_ema=section.ratio_ema, **common)
    if section.variant not in ("sim", "sid"):
        raise ValueError(f"sim.variant must be 'sim' or 'sid', got {section.variant!r}")
    return DistributionMatching(unet, prediction_type, schedule, objective=section.variant, distance=section.distance,
                                huber_c=section.huber_c, sid_alpha=section.sid_alpha, **common)


def _student_init(path: str, prediction_type: str, key: str):
    """The UNet of an exported student (the start of a new one: ``key``), checked to predict what the new
    student predicts."""
    from diffusers import UNet2DModel

    from .students import STUDENT_FILE

    record_path = Path(path) / STUDENT_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{key} {path} is not a fewstep student (no {STUDENT_FILE})")
    record = json.loads(record_path.read_text())
    if record["prediction_type"] != prediction_type:
        raise ValueError(f"{key} {path} predicts {record['prediction_type']!r}, the new student "
                         f"{prediction_type!r}")
    return UNet2DModel.from_pretrained(Path(path) / "unet")


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
        info = {"method": config.method, "teacher": str(teacher_path), "training": _cost(state),
                **(method.student_info() if hasattr(method, "student_info") else {})}
        section = getattr(config, config.method)
        for key in ("generator_init", "student_init"):  # where the student started, when not the teacher
            if getattr(section, key, None):
                info[key] = getattr(section, key)
        exported.append(export_student(module, scheduler_config, grid, prediction_type,
                                       students_dir / f"{config.method}-{steps}", info))

    torch.manual_seed(core.seed)
    method = _method(config, unet, teacher_type, schedule, optim, on_student)
    dataset = None
    if method.needs_data:  # f-distill without its discriminator and SIM are data-free
        data = load_images(**given(config.data))
        expected = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        if tuple(data.shape[1:]) != expected:
            raise ValueError(f"data of shape {tuple(data.shape[1:])} does not fit the teacher's {expected} input")
        dataset = TensorDataset(data)
    result = fit(method, core, dataset, max_steps=max_steps)
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
    values = [h.get(name) for h in history for name in names if h.get(name) is not None]
    ax.set_yscale("log" if all(v > 0 for v in values) else "symlog")  # SIM / SiD losses can be negative
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
