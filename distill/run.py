"""``fewstep distill``: train a few-step student from a diffusers pipeline teacher on the training core.

    fewstep distill --config configs/distill/progressive_fmnist.yaml [teacher=DIR train.steps=... KEY=VALUE ...]

The teacher is any pipeline folder of a supported family (``fewstep.distill.families``); its data and
conditions are prepared once in its own space (``prepare``) and guidance is set by ``guidance:``
(``conditioning``). Students are exported as they finish (PD: one per round) to
``students_dir/<method>-<steps>``, each the teacher's own pipeline class with the student network and a
scheduler that runs its grid, which ``fewstep.distill.load_student`` turns into a sampler. A killed run resumes
from its last checkpoint with the same command; ``train.output_dir`` also gets ``history.json`` and
``training_curves.png``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch

from fewstep.config import DistillConfig, TrainConfig
from fewstep.io import atomic_write_bytes

from .conditioning import Conditioning, Guidance
from .consistency import MultistepConsistency
from .core import CoreConfig, OptimizerConfig, fit, from_train_config
from .families import Family, TeacherError, load_teacher
from .fsdp import fill_wrap_policy
from .lora import resolve as resolve_lora
from .matching import DistributionMatching
from .prepare import prepare_data
from .progressive import ProgressiveDistillation
from .students import export_student

__all__ = ["METHODS", "distill", "core_settings", "plot_history", "cli"]

METHODS = ("progressive", "consistency", "fdistill", "sim")


def core_settings(train: TrainConfig, anneal: str) -> tuple[CoreConfig, OptimizerConfig]:
    """The shared ``train:`` section as the core's settings and the student's optimizer, with the
    method's learning-rate anneal; ``ema_decay: 0`` means no EMA (PD keeps none)."""
    core, optim = from_train_config(train)
    return core, dataclasses.replace(optim, anneal=anneal, ema_decay=train.ema_decay or None)


def _load_teacher(path: str | None) -> Family:
    from fewstep.teachers import FMNIST

    return load_teacher(Path(path) if path is not None else FMNIST)


def _conditioning(config: DistillConfig, family: Family) -> Conditioning:
    g = config.guidance
    guidance = Guidance(mode=g.mode, scale=g.scale, scale_range=tuple(g.scale_range), fake_guided=g.fake_guided,
                        fake_dropout=g.fake_dropout)
    if guidance.active and not family.conditional:
        raise TeacherError(f"guidance.mode {g.mode} needs a conditional teacher; the {family.name} at {family.path} "
                           "is unconditional")
    if guidance.mode == "conditioned" and not family.accepts_guidance_input:
        family.with_guidance_input(family.denoiser_network)  # raises, saying why
    if g.fake_guided and config.method not in ("fdistill", "sim"):
        raise ValueError("guidance.fake_guided is for fdistill and sim (they have a fake score)")
    null = None
    if g.negative_prompt is not None:
        if family.condition_kind != "text":
            raise TeacherError(f"guidance.negative_prompt is for text teachers; the {family.name} takes "
                               f"{family.condition_kind or 'no'} conditions")
        null = {k: v[:1] for k, v in family.encode([g.negative_prompt]).items()}
    section = getattr(config, config.method, None)
    init = getattr(section, "student_init", None) or getattr(section, "generator_init", None)
    lora = resolve_lora(config.lora, family, config.method, init, g.mode)
    return Conditioning(family, guidance, null, lora=lora)


def student_prediction(requested: str, family: Family, key: str) -> str:
    """The student's parameterisation for a config's ``prediction_type``: ``teacher`` is the teacher's own;
    a flow teacher's students may predict any of ``epsilon``, ``sample``, ``v_prediction`` or the velocity
    (``flow_prediction``); an EDM teacher's keep its preconditioned output (``sample``), the only one its
    network's preconditioning (``c_skip``, ``c_out``) gives."""
    from fewstep.samplers.denoisers import canonical_prediction_type

    noise = family.noise
    if requested == "teacher":
        return family.prediction_type
    if not noise.free_prediction and requested != noise.prediction_type:
        raise TeacherError(f"{key}={requested}: the {family.name} teacher at {family.path} is EDM-preconditioned, so "
                           f"its students predict what it predicts: set {key} teacher (or {noise.prediction_type})")
    if canonical_prediction_type(requested) == "flow" and noise.kind != "flow":
        raise TeacherError(f"{key}={requested} is a flow velocity; the {family.name} teacher at {family.path} is "
                           f"a {noise.kind} teacher: use epsilon, sample, v_prediction or teacher")
    return requested


def _method(config: DistillConfig, family: Family, cond: Conditioning, optim: OptimizerConfig, on_student):
    unet, prediction_type, schedule = family.denoiser_network, family.prediction_type, family.schedule
    noise = family.noise
    if config.method == "progressive":
        pd = config.progressive
        student = pd.prediction_type if pd.prediction_type == "teacher" else student_prediction(
            pd.prediction_type, family, "progressive.prediction_type")
        return ProgressiveDistillation(unet, prediction_type, schedule, pd.start_steps, pd.end_steps,
                                       student, pd.weighting, optim, on_student, conditioning=cond, noise=noise)
    if config.method == "consistency":
        cm = config.consistency
        student = student_prediction(cm.prediction_type, family, "consistency.prediction_type")
        init = None
        if cm.student_init is not None:
            init = _student_init(cm.student_init, student, "student_init", family, config.guidance)
        return MultistepConsistency(unet, prediction_type, schedule, cm.student_steps, cm.teacher_steps,
                                    cm.teacher_steps_end, cm.anneal_updates, cm.variant, student,
                                    cm.huber_c, cm.xvar_frac, optim, student=init, student_init=cm.student_init,
                                    conditioning=cond, noise=noise)
    if config.method in ("fdistill", "sim"):
        return _matching(config, family, cond, optim)
    raise ValueError(f"unknown distillation method {config.method!r}; expected one of {', '.join(METHODS)}")


def _matching(config: DistillConfig, family: Family, cond: Conditioning, optim: OptimizerConfig):
    """f-distill (``fdistill:``) or SIM (``sim:``): one-step generators; the critics share ``train:``'s
    optimizer settings except their learning rate (``critic_lr``) and keep no EMA."""
    unet, prediction_type, schedule = family.denoiser_network, family.prediction_type, family.schedule
    section = getattr(config, config.method)
    critic = dataclasses.replace(optim, lr=section.critic_lr or optim.lr, ema_decay=None)
    student = student_prediction(section.prediction_type, family, f"{config.method}.prediction_type")
    init = None
    if section.generator_init is not None:
        init = _student_init(section.generator_init, student, "generator_init", family, config.guidance)
    common = dict(prediction_type=student, update_ratio=section.update_ratio, min_t=section.min_t,
                  max_t=section.max_t, optim=optim, critic_optim=critic, generator_init=init, name=config.method,
                  conditioning=cond, noise=family.noise, time_sampling=section.time_sampling)
    if config.method == "fdistill":
        if section.variant not in ("f_distill", "diff_instruct"):
            raise ValueError(f"fdistill.variant must be 'f_distill' or 'diff_instruct', got {section.variant!r}")
        return DistributionMatching(unet, prediction_type, schedule, objective=section.variant, f=section.f,
                                    discriminator=section.discriminator, real_data=section.discriminator,
                                    gan_weight=section.gan_weight, r1_weight=section.r1_weight,
                                    ratio_clamp=(section.ratio_lower, section.ratio_upper),
                                    ratio_bins=section.ratio_bins, ratio_ema=section.ratio_ema,
                                    reference=section.reference, **common)
    if section.variant not in ("sim", "sid"):
        raise ValueError(f"sim.variant must be 'sim' or 'sid', got {section.variant!r}")
    return DistributionMatching(unet, prediction_type, schedule, objective=section.variant, distance=section.distance,
                                huber_c=section.huber_c, sid_alpha=section.sid_alpha,
                                dmd_normaliser=section.dmd_normaliser, **common)


def _student_init(path: str, prediction_type: str, key: str, family: Family, guidance):
    """The network of an exported student (the start of a new one: ``key``), checked to be a student of this
    teacher, of the same network class, predicting what the new student predicts, with the same guidance."""
    from .students import read_student_record

    record = read_student_record(path, key)
    teacher = record.get("teacher")
    teacher_id = family.describe()["id"]
    if not isinstance(teacher, dict) or teacher.get("id") != teacher_id:
        came = teacher.get("id") if isinstance(teacher, dict) else "an unrecorded teacher"
        raise TeacherError(f"{key} {path} was distilled from another teacher ({came}, not {family.path}'s "
                           f"{teacher_id}); start from a student of this teacher, or set {key} null")
    if record["prediction_type"] != prediction_type:
        raise TeacherError(f"{key} {path} predicts {record['prediction_type']!r}, the new student "
                           f"{prediction_type!r}")
    mode = record.get("guidance", {}).get("mode", "none")
    if mode != guidance.mode:
        raise TeacherError(f"{key} {path} was trained with guidance.mode {mode}, this run has {guidance.mode}")
    if record.get("lora", {}).get("export") == "lora":  # the teacher's network with the student's LoRA merged
        from .students import lora_student_network

        return lora_student_network(path, family)
    net_class = type(family.denoiser_network)
    if not (Path(path) / family.network / "config.json").is_file():  # else diffusers asks for the internet
        raise TeacherError(f"{key} {path} has no {family.network}/ folder with its {net_class.__name__} (config.json "
                           f"and weights): point {key} at a complete exported student folder, or set {key} null")
    try:
        return net_class.from_pretrained(Path(path) / family.network)
    except (OSError, ValueError, TypeError) as err:
        raise TeacherError(f"{key} {path} has no {net_class.__name__} {family.network!r} like the teacher's: "
                           f"{err}") from None


def distill(config: DistillConfig, max_steps: int | None = None) -> list[Path]:
    """Train (resuming when a checkpoint exists) and export the students; returns their folders."""
    if config.method not in METHODS:
        raise ValueError(f"unknown distillation method {config.method!r}; expected one of {', '.join(METHODS)}")
    family = _load_teacher(config.teacher)
    cond = _conditioning(config, family)
    fill_wrap_policy(family, lora=cond.lora is not None)  # under an FSDP launch: the family's blocks (distill.fsdp)
    anneal = getattr(config, config.method).anneal
    core, optim = core_settings(config.train, anneal)
    students_dir = Path(config.students_dir or Path(core.output_dir) / "students")
    exported: list[Path] = []
    section = getattr(config, config.method)

    def on_student(steps: int, module, grid, state) -> None:
        prediction_type = method.prediction_type  # resolved ("teacher": the teacher's own)
        _check_finite(module, steps, state.step)
        why = family.noise.exportable(grid, prediction_type)
        if why is not None:
            print(f"not exporting the {steps}-step student: {why}")
            return
        info = {"method": config.method, "training": _cost(state),
                **(method.student_info() if hasattr(method, "student_info") else {})}
        for key in ("generator_init", "student_init"):  # where the student started, when not the teacher
            if getattr(section, key, None):
                info[key] = getattr(section, key)
        exported.append(export_student(module, family.noise, grid, prediction_type,
                                       students_dir / f"{config.method}-{steps}", info, family=family,
                                       guidance=config.guidance, lora=cond.lora))

    torch.manual_seed(core.seed)
    method = _method(config, family, cond, optim, on_student)
    _check_exportable(method, family, method.prediction_type)
    cache = Path(config.cache) if config.cache else Path(core.output_dir) / "prepared_data.pt"
    # fit loads the data only once the output folder is known to be writable and free
    result = fit(method, core, lambda: prepare_data(family, config, method.needs_data, cache), max_steps=max_steps,
                 settings=resume_settings(config))
    out = Path(core.output_dir)
    atomic_write_bytes(out / "history.json", json.dumps(result.history, indent=1).encode())
    if result.history:
        plot_history(result.history, out / "training_curves.png", title=f"{config.method} distillation")
    if result.state.step == core.steps:
        on_student(*method.final_student(result.state))
    return exported


class NonFiniteStudent(FloatingPointError):
    """A finished student whose weights are NaN or infinite (its last update diverged): never exported."""

    exit_code = 2


def _check_finite(module: torch.nn.Module, steps: int, step: int) -> None:
    bad = [name for name, t in [*module.named_parameters(), *module.named_buffers()]
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteStudent(f"the {steps}-step student has non-finite weights after optimizer step {step} "
                               f"({bad[0]}{' and more' if len(bad) > 1 else ''}); not exported. The run diverged: "
                               "lower train.lr or train.grad_clip, and restart in a new "
                               "output_dir or from a checkpoint before the divergence")


def _check_exportable(method, family: Family, prediction_type: str) -> None:
    """Refuse, before any training, a run whose last student no scheduler could run (on a DDPM teacher: a grid
    diffusers' DDIM does not visit), instead of training to the end and then exporting nothing."""
    final_grid = getattr(method, "final_grid", None)
    if final_grid is None:
        return
    grid = final_grid()
    why = family.noise.exportable(grid, prediction_type)
    if why is not None:
        n_train = family.scheduler_config.get("num_train_timesteps", 1000)
        raise ValueError(f"the {grid.n_steps}-step student could not be exported: {why}; choose a step count "
                         f"that divides {n_train}")


def resume_settings(config: DistillConfig) -> dict:
    """What a resumed run must share with its checkpoint beyond the core's own recipe: the method's section
    (where each network starts, its options), guidance and the prompt template. Not the teacher's path (its
    identity is in the recipe: a moved teacher resumes) nor where students or caches go. LoRA settings when a
    LoRA is on (so a run of full students from before ``lora:`` existed still resumes)."""
    out = {config.method: dataclasses.asdict(getattr(config, config.method)),
           "guidance": dataclasses.asdict(config.guidance), "prompt_template": config.prompt_template}
    if config.lora.rank:
        out["lora"] = dataclasses.asdict(config.lora)
    return out


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
    buf = io.BytesIO()  # written whole or not at all (a full disk is one line, not a torn PNG)
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def cli(config: DistillConfig, max_steps: int | None = None) -> int:
    """``fewstep distill``: prints the exported students."""
    for path in distill(config, max_steps):
        print(path)
    return 0
