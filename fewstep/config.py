"""One config system for every fewstep job: dataclass sections, a YAML file, dotted command-line overrides.

    @dataclass
    class TrainConfig:
        lr: float = option(2e-4, "AdamW learning rate")

    cfg = load(TeacherConfig, "configs/teacher_fmnist.yaml", ["train.lr=1e-4", "model.layers_per_block=2"])

``load`` reads the YAML file, applies the overrides and builds the dataclasses; every value is converted
to its field's declared type (YAML reads ``5e-4`` as a string; here it becomes a float), and an unknown key
is an error that lists the known ones. ``help_text`` lists every key with its default and help, which is
what ``fewstep COMMAND --help`` prints. In a section of keyword arguments for someone else's constructor
(``model``: ``UNet2DModel``, ``scheduler``: ``DDPMScheduler``, ``data``: ``load_images``) ``None`` means
"not set: the callee's default applies"; ``given`` returns only the set ones.

The sections of every job live here, in one place, and this module imports no torch, so building the
command line (and its help) stays instant.
"""

from __future__ import annotations

import collections.abc
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

__all__ = ["option", "section", "load", "from_dict", "apply_override", "read_yaml", "reject_unknown", "given",
           "has_sections", "check_data_source", "MIXED_PRECISION", "DATA_SOURCES", "DATA_SPLITS", "DATA_CONDITIONS",
           "help_text", "TrainConfig", "UNetConfig", "DDPMSchedulerConfig", "DataConfig", "MRConfig",
           "TeacherConfig", "MRTrainConfig", "ClassifierConfig", "ProgressiveConfig", "ConsistencyConfig", "FDistillConfig", "SIMConfig",
           "GuidanceConfig", "LoRAConfig", "DistillConfig"]


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A field with its default and its help text (shown by ``fewstep COMMAND --help``)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def section(cls: type, help: str = "") -> Any:
    """A field holding a whole section (a nested dataclass), built from its own defaults."""
    return field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------------------------
# The loader


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file's top-level mapping (an empty file is ``{}``)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def reject_unknown(keys: Iterable[str], known: Iterable[str], what: str = "option", where: str = "") -> None:
    """Raise ``ValueError("[where: ]unknown <what>(s) [...]; known: [...]")`` for keys outside ``known``."""
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ValueError(f"{where + ': ' if where else ''}unknown {what}(s) {unknown}; known: {sorted(known)}")


def _what(cls: type) -> str:
    """What an unknown key of ``cls`` is called in errors: a section, or an option (of a named kind)."""
    if any(_is_section(f) for f in fields(cls)):
        return "config section"
    label = getattr(cls, "label", "")
    return f"{label} option" if label else "option"


def _is_section(f) -> bool:
    return f.default_factory is not MISSING and is_dataclass(f.default_factory)


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves the string annotations of ``from __future__``


def from_dict(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """``cls(**values)`` with every value converted to its field's type, sections built recursively, and
    unknown keys rejected. ``where`` is the dotted prefix used in error messages."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    reject_unknown(values, [f.name for f in fields(cls) if f.init], _what(cls), where.rstrip("."))
    hints = _types(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in values:
            kwargs[f.name] = _convert(values[f.name], hints[f.name], f"{where}{f.name}")
    return cls(**kwargs)


def _optional(tp: Any) -> Any | None:
    """``X`` for ``X | None`` (``Optional[X]``), else ``None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and len(args) == 1:
            return args[0]
    return None


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``, or a ``ValueError`` naming ``key`` and the type it wants."""
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else _convert(value, inner, key)
    if is_dataclass(tp):
        return from_dict(tp, value, f"{key}.")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif origin in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
            return items if origin is list or tp is list else tuple(items)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp in (int, float):
        number = _number(value, tp)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: the config system cannot convert to {tp!r}")
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _number(value: Any, tp: type) -> int | float | None:
    """``value`` as an int or float (from a number or a string such as YAML's ``5e-4``), else ``None``."""
    if isinstance(value, bool):
        return None  # True is an int to Python, never a number to a config
    if isinstance(value, str):
        try:
            value = float(value) if tp is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            return None
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp is int and isinstance(value, int):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e3 steps
    return None


def _field_type(cls: type, path: list[str], text: str) -> Any:
    """The declared type at a dotted ``path`` under ``cls`` (unknown keys rejected on the way)."""
    tp, done = cls, []
    for name in path:
        if not is_dataclass(tp):
            raise ValueError(f"{text}: {'.'.join(done)} has no keys")
        reject_unknown([name], [f.name for f in fields(tp) if f.init], _what(tp), ".".join(done) or text)
        tp = _types(tp)[name]
        done.append(name)
    return tp


def apply_override(cls: type, data: dict, text: str) -> None:
    """Apply ``KEY=VALUE`` (``train.lr=1e-4``) to the nested dict ``data``. The value is text for a string
    field and YAML otherwise (``[8, 16]``, ``true``, ``null``); it is typed later, with the file's values."""
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise ValueError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    path = key.split(".")
    tp = _field_type(cls, path, text)
    target = data
    for name in path[:-1]:
        if not isinstance(target.get(name), dict):
            target[name] = {}
        target = target[name]
    target[path[-1]] = _from_text(raw, tp)


def _from_text(raw: str, tp: Any) -> Any:
    inner = _optional(tp)
    if inner is str:
        return None if raw in ("null", "~", "None") else raw
    if tp is str:
        return raw  # `mixed_precision=no` is the string "no", not YAML's False
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"cannot parse {raw!r}: {err}") from None


def load(cls: type, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Any:
    """The one loader: YAML file (optional), then the dataclass defaults for what it leaves out, then
    dotted ``KEY=VALUE`` overrides; typed and checked."""
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        apply_override(cls, data, text)
    return from_dict(cls, data)


def has_sections(cls: type) -> bool:
    """Whether ``cls`` has sections (its keys are dotted: ``train.lr``)."""
    return any(_is_section(f) for f in fields(cls))


def given(obj: Any) -> dict[str, Any]:
    """The fields of a section that are set (not ``None``): the keyword arguments it passes on."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


# ---------------------------------------------------------------------------------------------
# Help


def _rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for f in fields(cls):
        if not f.init:
            continue
        if _is_section(f):
            rows += _rows(f.default_factory, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        rows.append((prefix + f.name, _show(default), f.metadata.get("help", "")))
    return rows


def _show(value: Any) -> str:
    """A default as YAML would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def help_text(cls: type) -> str:
    """Every key of ``cls`` with its default and help, for an argparse epilog."""
    rows = _rows(cls)
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    lines = ["keys (in the YAML file, or KEY=VALUE on the command line), with their defaults:"]
    lines += [f"  {f'{k} = {d}':<{width}}  {h}" for k, d, h in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The sections


#: ``train.mixed_precision``: what the training core runs (accelerate's names; fp8 needs extra packages).
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Settings shared by every trainer (a YAML file's ``train:`` section): the training core's loop
    (``CoreConfig``) and the optimizer of the trained network (``OptimizerConfig``); see
    ``fewstep.distill.core.from_train_config``."""

    label: ClassVar[str] = "training"  # errors say "unknown training option(s)"

    output_dir: str = option("outputs/run", "checkpoints (checkpoint-<step>.pt), history and exported model")
    steps: int = option(1000, "total optimizer steps (raise it and rerun to continue a run)")
    batch_size: int = option(128, "examples per optimizer step, over all processes and micro-batches")
    lr: float = option(2e-4, "AdamW learning rate (constant after warm-up)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "linear learning-rate warm-up")
    grad_clip: float | None = option(1.0, "gradient norm clip (null: none)")
    ema_decay: float = option(0.999, "EMA decay of the exported weights, in [0, 1)")
    ema_start: int = option(0, "steps before the EMA starts averaging (it copies until then)")
    checkpoint_every: int = option(250, "steps between checkpoints")
    keep_checkpoints: int = option(3, "newest checkpoints kept (older ones are deleted)")
    log_every: int = option(50, "steps between history entries")
    seed: int = option(0, "seed of the weights, batches and noise")
    mixed_precision: str | None = option(None, "no, fp16 or bf16; unset: accelerate's (accelerate launch "
                                               "--mixed_precision / accelerate config), else no. Both set and "
                                               "different is an error")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step (batch_size is split over them)")
    cpu: bool = option(False, "train on the CPU even when a GPU is there")
    frozen_dtype: str = option("float32", "weights of the frozen networks (a teacher): float32, bfloat16 or float16 "
                                          "(half the memory; inputs are cast to it, outputs back)")
    gradient_checkpointing: bool = option(False, "trainable diffusers networks recompute activations in the "
                                                 "backward pass (less memory, ~30 % more compute)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                     "gradient_accumulation_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of gradient_accumulation_steps "
                             f"{self.gradient_accumulation_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0 or null, got {self.grad_clip}")
        if self.warmup_steps < 0 or self.ema_start < 0:
            raise ValueError("warmup_steps and ema_start must be >= 0")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be {', '.join(MIXED_PRECISION)} (accelerate's spelling) "
                             f"or unset (accelerate's choice), got {self.mixed_precision!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        return from_dict(cls, values, "train.")


@dataclass
class UNetConfig:
    """``UNet2DModel`` keyword arguments (null: diffusers' default)."""

    label: ClassVar[str] = "model"

    sample_size: int | None = option(None, "image height = width")
    in_channels: int | None = option(None, "input channels (diffusers: 3)")
    out_channels: int | None = option(None, "output channels (diffusers: 3)")
    layers_per_block: int | None = option(None, "ResNet layers per block (diffusers: 2)")
    block_out_channels: tuple[int, ...] | None = option(None, "channels per resolution (diffusers: 224 448 672 896)")
    down_block_types: tuple[str, ...] | None = option(None, "e.g. DownBlock2D, AttnDownBlock2D")
    up_block_types: tuple[str, ...] | None = option(None, "e.g. UpBlock2D, AttnUpBlock2D")
    norm_num_groups: int | None = option(None, "GroupNorm groups (diffusers: 32)")
    dropout: float | None = option(None, "dropout (diffusers: 0.0)")
    act_fn: str | None = option(None, "activation (diffusers: silu)")
    add_attention: bool | None = option(None, "attention in the mid block (diffusers: true)")
    time_embedding_type: str | None = option(None, "positional or fourier (diffusers: positional)")
    flip_sin_to_cos: bool | None = option(None, "diffusers: true")
    freq_shift: int | None = option(None, "diffusers: 0")
    center_input_sample: bool | None = option(None, "diffusers: false")
    norm_eps: float | None = option(None, "diffusers: 1e-5")
    resnet_time_scale_shift: str | None = option(None, "default or scale_shift (diffusers: default)")
    num_class_embeds: int | None = option(None, "class ids, for a class-conditional teacher: classes + 1 (the last is "
                                                "the null class of classifier-free guidance)")
    class_embed_type: str | None = option(None, "null (an embedding table of num_class_embeds) or timestep")

    def __post_init__(self):
        # GroupNorm splits every block's channels into norm_num_groups groups: refuse what torch would, here
        # (a given norm_num_groups against the channels, given or diffusers' default; the reverse waits for
        # the UNet, so that a section of channels alone still loads)
        groups = self.norm_num_groups
        if groups is None:
            return
        channels = (224, 448, 672, 896) if self.block_out_channels is None else tuple(self.block_out_channels)
        if groups < 1:
            raise ValueError(f"model.norm_num_groups must be an integer >= 1, got {groups!r}")
        bad = [c for c in channels if c % groups]
        if bad:
            fits = [g for g in range(min(channels), 0, -1) if all(c % g == 0 for c in channels)][:3]
            raise ValueError(f"model.norm_num_groups {groups} must divide every block's channels "
                             f"(model.block_out_channels {list(channels)}; {bad[0]} is not a multiple of {groups}): "
                             f"set model.norm_num_groups to e.g. {' or '.join(map(str, fits))}, or change the channels")


@dataclass
class DDPMSchedulerConfig:
    """``DDPMScheduler`` keyword arguments (null: diffusers' default)."""

    label: ClassVar[str] = "scheduler"

    num_train_timesteps: int | None = option(None, "T (diffusers: 1000)")
    beta_schedule: str | None = option(None, "linear, scaled_linear, squaredcos_cap_v2 (diffusers: linear)")
    beta_start: float | None = option(None, "diffusers: 0.0001")
    beta_end: float | None = option(None, "diffusers: 0.02")
    prediction_type: str | None = option(None, "epsilon or v_prediction (diffusers: epsilon)")
    variance_type: str | None = option(None, "diffusers: fixed_small")
    clip_sample: bool | None = option(None, "diffusers: true")
    clip_sample_range: float | None = option(None, "diffusers: 1.0")
    timestep_spacing: str | None = option(None, "leading, trailing, linspace (diffusers: leading)")
    steps_offset: int | None = option(None, "diffusers: 0")
    rescale_betas_zero_snr: bool | None = option(None, "diffusers: false")


@dataclass
class FlowTeacherConfig:
    """A rectified-flow teacher (``objective: flow``): ``FlowMatchEulerDiscreteScheduler`` keys and how
    training times are drawn."""

    label: ClassVar[str] = "flow"

    num_train_timesteps: int = option(1000, "N: the network is called at timestep = N t (SD3 / Flux: 1000)")
    shift: float = option(1.0, "the scheduler's static shift (SD3: 3.0; 1: none), used by its sampling grids")
    time_sampling: str = option("uniform", "how training times t are drawn: uniform (rectified flow) or "
                                           "logit_normal (SD3: sigmoid of a normal)")
    logit_mean: float = option(0.0, "logit_normal: the normal's mean (SD3: 0)")
    logit_std: float = option(1.0, "logit_normal: the normal's standard deviation (SD3: 1)")

    def __post_init__(self):
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"flow.time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}")
        if not self.shift > 0 or not self.logit_std > 0 or self.num_train_timesteps < 1:
            raise ValueError("flow.shift and flow.logit_std must be > 0 and flow.num_train_timesteps >= 1")


#: ``fewstep.data``'s named sources (besides ``folder:PATH``), splits and condition kinds.
DATA_SOURCES = ("fashion_mnist", "mnist", "cifar10", "digits")
DATA_SPLITS = ("train", "test")
DATA_CONDITIONS = ("auto", "none", "labels", "captions")


def check_data_source(name: str, split: str | None = None) -> None:
    """A ``ValueError`` saying what is known, for a data set name or split no source has."""
    if not isinstance(name, str) or not (name in DATA_SOURCES or name.startswith("folder:") and len(name) > 7):
        raise ValueError(f"unknown data set {name!r}; expected {', '.join(DATA_SOURCES)} or folder:PATH")
    if split is not None and split not in DATA_SPLITS:
        raise ValueError(f"unknown data split {split!r}; expected {' or '.join(DATA_SPLITS)}")


@dataclass
class DataConfig:
    """``load_images`` / ``load_conditioned`` keyword arguments (null: its default); ``prompts`` is
    ``load_prompts``'s file."""

    label: ClassVar[str] = "data"

    name: str = option("fashion_mnist", "fashion_mnist, mnist, cifar10, digits or folder:PATH")
    split: str | None = option(None, "train or test (default: train)")
    size: int | None = option(None, "resize to size x size (default: as stored)")
    channels: int | None = option(None, "1 or 3 (default: as stored)")
    root: str | None = option(None, "data folder (default: Debian's Fashion-MNIST, or ./data)")
    download: bool | None = option(None, "download through torchvision (default: false)")
    limit: int | None = option(None, "use only the first N images")
    conditions: str = option("auto", "auto, none, labels or captions: what to read as each image's condition")
    prompts: str | None = option(None, "text file of prompts, one per line (the data-free methods' conditions)")

    def __post_init__(self):
        check_data_source(self.name, self.split)
        if self.conditions not in DATA_CONDITIONS:
            raise ValueError(f"data.conditions must be one of {', '.join(DATA_CONDITIONS)}, got {self.conditions!r}")


@dataclass
class MRConfig:
    """The mean-reverting SDE and the restoration task (``mr:`` section)."""

    label: ClassVar[str] = "mr"

    sigma_inf: float = option(50 / 255, "stationary noise level of the MR SDE")
    T: int = option(100, "discrete times 1..T")
    noise_std: float = option(0.3, "std of the Gaussian degradation in [-1, 1]")
    target: str = option("noise", "what the network predicts: noise (IR-SDE) or data (x0)")


# -- one dataclass per training command (cli.COMMANDS names them)


@dataclass
class TeacherConfig:
    """``fewstep train-teacher``: a UNet2DModel teacher on a DDPM schedule or a rectified flow."""

    train: TrainConfig = section(TrainConfig)
    objective: str = option("ddpm", "ddpm (DDPMScheduler: the scheduler section, eps or v loss) or flow "
                                    "(rectified flow: the flow section, velocity loss, FlowMatchEulerDiscreteScheduler)")
    model: UNetConfig = section(UNetConfig)
    scheduler: DDPMSchedulerConfig = section(DDPMSchedulerConfig)
    flow: FlowTeacherConfig = section(FlowTeacherConfig)
    data: DataConfig = section(DataConfig)
    label_dropout: float | None = option(None, "class-conditional teachers (model.num_class_embeds set): probability "
                                               "a label is replaced by the null class, for classifier-free guidance "
                                               "(null: 0.1)")
    eval: dict = option(factory=dict, help="free-form, not read by training")

    def __post_init__(self):
        conditional = self.model.num_class_embeds is not None
        if self.objective not in ("ddpm", "flow"):
            raise ValueError(f"objective must be 'ddpm' or 'flow', got {self.objective!r}")
        if self.objective == "flow" and given(self.scheduler):
            raise ValueError(f"objective flow takes the flow section, not scheduler ({', '.join(given(self.scheduler))})")
        if self.label_dropout is not None and not conditional:
            raise ValueError("label_dropout is for class-conditional teachers: set model.num_class_embeds too")
        if self.model.class_embed_type is not None and not conditional:
            raise ValueError("model.class_embed_type needs model.num_class_embeds (number of classes + 1)")
        if self.model.class_embed_type not in (None, "timestep"):  # "identity" wants vectors, not class ids
            raise ValueError(f"model.class_embed_type must be null or 'timestep', got {self.model.class_embed_type!r}")
        if self.label_dropout is not None and not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")


@dataclass
class MRTrainConfig:
    """``fewstep train-mr``: an MR restoration model."""

    train: TrainConfig = section(TrainConfig)
    mr: MRConfig = section(MRConfig)
    model: UNetConfig = section(UNetConfig)
    data: DataConfig = section(DataConfig)


@dataclass
class ClassifierConfig:
    """``fewstep train-classifier``: the FD-fmnist feature network."""

    out: str | None = option(None, "weights file (default: the committed teachers/fmnist/classifier.pt)")
    steps: int = option(1500, "optimizer steps")
    batch_size: int = option(128, "examples per step")
    lr: float = option(2e-3, "peak AdamW learning rate (one-cycle)")
    seed: int = option(0, "seed of the weights, batches and shifts")
    root: str | None = option(None, "Fashion-MNIST idx folder (default: Debian's)")


# -- distillation (``fewstep distill``)


@dataclass
class ProgressiveConfig:
    """Progressive distillation (Salimans & Ho 2022), ``progressive:`` section."""

    label: ClassVar[str] = "progressive"

    start_steps: int = option(64, "the first teacher's DDIM steps (a power of two); students halve it each round")
    end_steps: int = option(1, "the last student's steps (a power of two)")
    prediction_type: str = option("v_prediction", "student parameterisation: v_prediction, sample (x), epsilon, or "
                                                  "teacher (the teacher's own: round 0 starts with the student equal "
                                                  "to its teacher, as the reference; other types read the teacher's "
                                                  "weights as another function)")
    weighting: str = option("truncated_snr", "x-MSE weight: truncated_snr (max(SNR, 1), the reference's snr_trunc), "
                                             "snr_plus_one (v-MSE), snr (eps-MSE) or constant (x-MSE)")
    anneal: str = option("linear", "learning rate within each round: linear (to 0, as the paper) or constant")

    def __post_init__(self):
        if self.prediction_type == "both":
            raise ValueError("progressive.prediction_type both (the reference's x and eps heads) cannot be exported: "
                             "diffusers' DDIMScheduler runs epsilon, sample or v_prediction networks; train a both "
                             "student through the Python API (fewstep.distill.progressive)")
        kinds = ("v_prediction", "sample", "epsilon", "flow_prediction", "teacher")
        if self.prediction_type not in kinds:
            raise ValueError(f"progressive.prediction_type must be one of {', '.join(kinds)} (diffusers' names; "
                             "flow_prediction for flow-matching teachers), "
                             f"got {self.prediction_type!r}")


@dataclass
class ConsistencyConfig:
    """Multistep consistency distillation / training (Heek et al. 2024), ``consistency:`` section."""

    label: ClassVar[str] = "consistency"

    student_steps: int = option(4, "S: segments = the student's sampling steps (1: a consistency model)")
    teacher_steps: int = option(64, "teacher steps at the start of the anneal")
    teacher_steps_end: int = option(1280, "teacher steps at its end (capped at the schedule's training steps)")
    anneal_updates: int = option(100_000, "optimizer steps of the log-linear teacher-step anneal")
    variant: str = option("distillation", "distillation (teacher step) or training (data only)")
    prediction_type: str = option("v_prediction", "student parameterisation: v_prediction or sample (x)")
    huber_c: float = option(1e-4, "pseudo-Huber c")
    xvar_frac: float = option(0.75, "aDDIM's eta: x_var = eta |x_teacher - x|^2 / d")
    anneal: str = option("constant", "learning rate: constant or linear (to 0 at the end)")
    student_init: str | None = option(None, "start the student from this student folder, e.g. another S "
                                            "(null: the teacher's weights)")


@dataclass
class FDistillConfig:
    """One-step f-distill (Xu, Nie & Vahdat 2025) / DMD2 (f=rkl) / Diff-Instruct, ``fdistill:`` section."""

    label: ClassVar[str] = "fdistill"

    variant: str = option("f_distill", "f_distill (DMD-normalised; f=rkl is DMD2) or diff_instruct (rkl, unnormalised)")
    f: str = option("rkl", "f-divergence: rkl, kl (forward), js, sh (squared Hellinger), sf (softened rkl), jf (Jeffreys)")
    prediction_type: str = option("v_prediction", "generator parameterisation: v_prediction, sample (x), "
                                                  "flow_prediction (flow teachers) or teacher (the teacher's own; EDM "
                                                  "teachers' students keep it)")
    update_ratio: int = option(5, "critic (fake score, discriminator) updates per generator update (reference "
                                  "fastgen: FastGen's student_update_freq, update_ratio - 1 critic updates)")
    reference: str = option("dmd2", "dmd2 (every step updates the critics, every update_ratio-th the generator too; "
                                    "ratio EMA from the first batch; time bins over [min_t, max_t]) or fastgen "
                                    "(NVIDIA FastGen's f-distill: a step updates the generator or the critics; "
                                    "ratio EMA from ones; time bins over the whole training range)")
    discriminator: bool = option(False, "train a GAN head on frozen teacher features (the ratio r; needs data)")
    gan_weight: float = option(0.0, "weight of the generator's GAN term softplus(-D) (needs discriminator)")
    r1_weight: float = option(0.0, "finite-difference R1 on real inputs (FastGen's approximation)")
    ratio_lower: float = option(0.1, "lower clamp of the density ratio r")
    ratio_upper: float = option(20.0, "upper clamp of the density ratio r")
    ratio_bins: int = option(10, "time bins of the ratio normalisation (0: off)")
    ratio_ema: float = option(0.0, "EMA rate of the per-bin ratio means (0: this batch's)")
    min_t: float = option(0.02, "lowest timestep of the matching term, a fraction of the training range")
    max_t: float = option(0.98, "highest timestep of the matching term")
    time_sampling: str = option("uniform", "how the matching terms' times are drawn within [min_t, max_t]: uniform "
                                           "(the teacher scheduler's map of a uniform fraction: DMD2's integer "
                                           "timesteps, flow's shift), logit_normal (flow teachers: SD3's "
                                           "sigmoid(N(0, 1)), truncated, then shifted) or log_normal (EDM teachers: "
                                           "EDM's ln sigma ~ N(-1.2, 1.2^2), truncated)")
    critic_lr: float | None = option(None, "learning rate of the fake score and discriminator (null: train.lr)")
    generator_init: str | None = option(None, "start the generator from this student folder (null: the teacher)")
    anneal: str = option("constant", "learning rate: constant or linear (to 0 at the end)")


@dataclass
class SIMConfig:
    """One-step Score Implicit Matching (Luo et al. 2024) / SiD (Zhou et al. 2024), ``sim:`` section."""

    label: ClassVar[str] = "sim"

    variant: str = option("sim", "sim (distance below) or sid (SiD's loss with sid_alpha; 1 = sim with l2)")
    distance: str = option("pseudo_huber", "pseudo_huber or l2 (squared L2: the Fisher divergence)")
    huber_c: float = option(1.0, "pseudo-Huber c, in denoiser units (|x_hat_teacher - x_hat_fake| over C, H, W)")
    sid_alpha: float = option(1.2, "SiD's alpha")
    dmd_normaliser: bool | None = option(None, "weight each example by DMD's 1 / mean|x - x_hat_teacher| (null: "
                                               "each variant's reference: false for sim, SIM's own loss; true "
                                               "for sid, as SiD's code)")
    prediction_type: str = option("v_prediction", "generator parameterisation: v_prediction, sample (x), "
                                                  "flow_prediction (flow teachers) or teacher (the teacher's own; EDM "
                                                  "teachers' students keep it)")
    update_ratio: int = option(1, "fake-score updates per generator update")
    min_t: float = option(0.02, "lowest timestep of the generator's term, a fraction of the training range")
    max_t: float = option(0.98, "highest timestep of the generator's term")
    time_sampling: str = option("uniform", "how the matching terms' times are drawn within [min_t, max_t]: uniform "
                                           "(the teacher scheduler's map of a uniform fraction: DMD2's integer "
                                           "timesteps, flow's shift), logit_normal (flow teachers: SD3's "
                                           "sigmoid(N(0, 1)), truncated, then shifted) or log_normal (EDM teachers: "
                                           "EDM's ln sigma ~ N(-1.2, 1.2^2), truncated)")
    critic_lr: float | None = option(None, "learning rate of the fake score network (null: train.lr)")
    generator_init: str | None = option(None, "start the generator from this student folder (null: the teacher)")
    anneal: str = option("constant", "learning rate: constant or linear (to 0 at the end)")


@dataclass
class GuidanceConfig:
    """Classifier-free guidance in distillation (``guidance:`` section; fewstep.distill.conditioning)."""

    label: ClassVar[str] = "guidance"

    mode: str = option("none", "none (the conditional teacher as it is), baked (the student learns the teacher "
                               "guided at scale; sample it without guidance) or conditioned (w drawn per example "
                               "from scale_range and given to the student as an input)")
    scale: float = option(1.0, "baked: the teacher's guidance scale w (1: unguided)")
    scale_range: tuple[float, float] = option((1.0, 8.0), "conditioned: w ~ uniform on [lo, hi] per example")
    negative_prompt: str | None = option(None, "text teachers: the prompt guidance contrasts with (null: the "
                                               "empty prompt, as the pipeline's default)")
    fake_guided: bool = option(False, "fdistill / sim: the fake score is guided too (SiD-LSG); false: the "
                                      "teacher only (DMD2, FastGen)")
    fake_dropout: float = option(0.1, "fdistill / sim with fake_guided: probability the fake score trains on "
                                      "the null condition")


@dataclass
class LoRAConfig:
    """LoRA students through peft (Hu et al. 2021), ``lora:`` section (fewstep.distill.lora): the student's
    network is the teacher's, frozen, plus trainable low-rank updates ``(alpha / rank) B A`` of its layers."""

    label: ClassVar[str] = "lora"

    rank: int = option(0, "LoRA rank r (0: off, full students: every weight trains)")
    alpha: float | None = option(None, "LoRA alpha: updates are scaled by alpha / rank (null: = rank)")
    target_modules: tuple[str, ...] | None = option(None, "layers that get a LoRA, by the end of their module name, "
                                                          "e.g. to_q to_k (null: the teacher family's default)")
    dropout: float = option(0.0, "dropout on the LoRA branch's input")
    fake: bool | None = option(None, "fdistill / sim: the fake score is a LoRA too (null: true when rank > 0)")
    export: str = option("fused", "lora (the LoRA alone, for the teacher's pipeline: pipe.load_lora_weights; "
                                  "pipelines with diffusers' LoRA loader, e.g. Stable Diffusion, SDXL) or fused "
                                  "(merged into the weights: a full student, any pipeline)")

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"lora.rank must be an integer >= 0 (0: full students), got {self.rank!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be > 0 or null (= rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout!r}")
        if self.export not in ("lora", "fused"):
            raise ValueError(f"lora.export must be lora or fused, got {self.export!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora.target_modules must name at least one layer (null: the family's default)")


@dataclass
class DistillConfig:
    """``fewstep distill``: a few-step student from a diffusers pipeline teacher."""

    method: str = option("progressive", "progressive, consistency, fdistill or sim")
    teacher: str | None = option(None, "teacher: a diffusers pipeline folder (DDPM/DDIM, class-conditional UNet, DiT, "
                                       "Stable Diffusion 1.x/2.x, SDXL, LDM; default: the embedded teachers/fmnist)")
    students_dir: str | None = option(None, "where students are exported (default: train.output_dir/students)")
    prompt_template: str | None = option(None, "text teachers on labelled data: each label's prompt, e.g. "
                                               "'a photo of a {}' (filled with the class name)")
    cache: str | None = option(None, "file of the encoded data (latents, condition embeddings), computed once "
                                     "(default: train.output_dir/prepared_data.pt)")
    train: TrainConfig = section(TrainConfig)
    guidance: GuidanceConfig = section(GuidanceConfig)
    lora: LoRAConfig = section(LoRAConfig)
    progressive: ProgressiveConfig = section(ProgressiveConfig)
    consistency: ConsistencyConfig = section(ConsistencyConfig)
    fdistill: FDistillConfig = section(FDistillConfig)
    sim: SIMConfig = section(SIMConfig)
    data: DataConfig = section(DataConfig)
