"""Teachers are pipelines: one small adapter per diffusers pipeline family (DESIGN.md, "Teachers are pipelines").

A teacher is any diffusers pipeline folder. ``load_teacher(path)`` reads its ``model_index.json``, picks the
adapter registered for its pipeline class and returns it, loaded. An adapter (a ``Family`` subclass) knows
its components and nothing else:

- which network denoises (``network``) and how it is called with its conditions (``forward``);
- how conditions are made (``encode``: class ids or prompts -> a dict of per-example tensors; ``null``: the
  unconditional condition that classifier-free guidance contrasts with);
- the autoencoder, if any (``encode_images`` with its scaling and shift, ``decode_latents``);
- the schedule and prediction type (from the scheduler config);
- how a student is written back as the same pipeline class (``export``).

Trainers never import a pipeline class: they see ``Family.forward`` through a denoiser, batches of
``(x, cond)`` with ``x`` in the teacher's (latent) space, and ``Family.export``. A condition is a dict of
tensors whose first dimension is the batch (``{"class_labels": [B]}``, ``{"encoder_hidden_states": [B, L,
D]}``, SDXL's pooled embeddings and time ids as their own keys), so selecting, repeating and concatenating
rows is the same code for every family (``cond_rows``, ``cond_cat``, ``cond_repeat``). ``GUIDANCE_KEY``
(``"guidance_scale"``) in a condition is the per-example guidance scale ``w`` of a w-conditioned student.

Adding a family = one module here with one ``Family`` subclass decorated ``@register``, and its tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["Family", "register", "FAMILIES", "family_of", "load_teacher", "teacher_identity", "GUIDANCE_KEY",
           "cond_rows", "cond_cat", "cond_repeat", "cond_without", "TeacherError", "supported_pipelines",
           "latent_image_shape", "class_labels", "check_component_folders", "load_pipeline", "prompt_list", "vae_encode",
           "vae_decode",
           "UNET_LORA_TARGETS"]

#: The per-example guidance scale ``w`` of a w-conditioned student, as a condition key (diffusers' name).
GUIDANCE_KEY = "guidance_scale"

#: LoRA targets of a diffusers UNet: those of diffusers' LCM-LoRA distillation scripts
#: (``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``): the attention and feed-forward
#: projections, and the ResNet blocks' convolutions and time projections, so a LoRA reaches every stage (a
#: ``UNet2DModel`` with attention in its mid block only still learns through its convolutions).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")

#: pipeline class name -> adapter class (filled by ``register``).
FAMILIES: dict[str, type["Family"]] = {}


class TeacherError(ValueError):
    """A teacher folder, or a use of it, that fewstep cannot read with certainty: one line for the user."""

    exit_code = 2


def register(cls: type["Family"]) -> type["Family"]:
    for name in cls.pipelines:
        FAMILIES[name] = cls
    return cls


def supported_pipelines() -> list[str]:
    _import_all()
    return sorted(FAMILIES)


def _import_all() -> None:
    # the adapters register themselves on import; each is small and imports diffusers lazily
    from . import ddpm, dit, flux, ldm, pixart, sd, sd3  # noqa: F401


# -- conditions: dicts of per-example tensors ---------------------------------------------------------


def cond_rows(cond: dict[str, Tensor], rows) -> dict[str, Tensor]:
    """The conditions of the selected rows (a bool mask or an index tensor)."""
    return {k: v[rows] for k, v in cond.items()}


def cond_cat(*conds: dict[str, Tensor]) -> dict[str, Tensor]:
    """Row-wise concatenation of conditions with the same keys."""
    keys = set(conds[0])
    if any(set(c) != keys for c in conds):
        raise ValueError(f"cannot concatenate conditions with different keys: {[sorted(c) for c in conds]}")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_repeat(cond: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """A one-row condition (e.g. the null one) repeated to ``rows`` rows."""
    return {k: v.expand(rows, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def cond_without(cond: dict[str, Tensor], *keys: str) -> dict[str, Tensor]:
    return {k: v for k, v in cond.items() if k not in keys}


# -- identity ------------------------------------------------------------------------------------------


def teacher_identity(path: str | os.PathLike) -> str:
    """A hash of a pipeline's configs and weights: ``model_index.json`` and every file of the component
    folders it names (by relative path and content; other files, e.g. evaluation statistics kept beside a
    teacher, are not the teacher), so a student says which teacher it came from and an init can be checked."""
    path = Path(path)
    index = path / "model_index.json"
    components = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is not None]
    files = [index] + sorted(p for c in components if (path / c).is_dir() for p in (path / c).rglob("*") if p.is_file())
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# -- the adapter ---------------------------------------------------------------------------------------


class Family:
    """One pipeline family, loaded from a folder. Subclasses set ``pipelines`` (class names in
    ``model_index.json``), ``network`` (the denoising component's name) and override what differs."""

    pipelines: tuple[str, ...] = ()
    network: str = "unet"
    #: ``None`` (unconditional), ``"class"`` (class ids) or ``"text"`` (prompts).
    condition_kind: str | None = None

    #: components a teacher of this family cannot be read without (a latent teacher's autoencoder, ...)
    required: tuple[str, ...] = ()
    #: the layers a LoRA student adapts by default (``lora.target_modules``; peft matches the end of a module
    #: name); empty: this family has no default, the config must name them
    lora_targets: tuple[str, ...] = ()
    #: the block classes FSDP wraps one by one (accelerate's transformer-based wrap policy; ``distill.fsdp``)
    fsdp_blocks: tuple[str, ...] = ("BasicTransformerBlock", "ResnetBlock2D")

    def __init__(self, pipe, path: Path):
        self.pipe, self.path = pipe, Path(path)
        for name in (self.network, "scheduler", *self.required):
            if getattr(pipe, name, None) is None:
                raise TeacherError(f"{type(pipe).__name__} teacher {path} has no {name!r} component; a teacher "
                                   f"of this family needs {', '.join((self.network, 'scheduler', *self.required))}")
        self.sidecar = _read_json(self.path / "fewstep_teacher.json")
        self.scheduler_config = dict(pipe.scheduler.config)
        self.noise = self._noise()
        self.schedule = self.noise.schedule
        #: what the network predicts as ``call`` returns it (EDM: its preconditioned ``D``, an x0 prediction)
        self.prediction_type = self.noise.prediction_type

    # -- construction
    @classmethod
    def load(cls, path: Path, **kwargs) -> "Family":
        from diffusers import DiffusionPipeline

        index = json.loads((Path(path) / "model_index.json").read_text())
        for name in (cls.network, "scheduler", *cls.required):  # said before diffusers' own, longer refusal
            entry = index.get(name)
            if not (isinstance(entry, list) and entry and entry[0] is not None):
                raise TeacherError(f"{index.get('_class_name')} teacher {path} has no {name!r} component; a teacher "
                                   f"of this family needs {', '.join((cls.network, 'scheduler', *cls.required))}")
        return cls(load_pipeline(path, DiffusionPipeline, "teacher", **kwargs), path)

    def _noise(self):
        """The teacher's ``Noise`` (``distill.noise``) from its scheduler config: DDPM-family (Karras sigmas or
        not: they are a sampling choice), flow matching or EDM."""
        from ..noise import UnsupportedSchedule, noise_from_config

        config = {"_class_name": type(self.pipe.scheduler).__name__, **self.scheduler_config}
        try:
            return noise_from_config(config, self.image_seq_len(), where=f"teacher {self.path}")
        except UnsupportedSchedule as err:
            raise TeacherError(str(err)) from None

    def image_seq_len(self) -> int | None:
        """The number of image tokens the network sees (transformer families): what a flow scheduler's dynamic
        shifting reads (``mu``). ``None``: not a token model."""
        return None

    @property
    def name(self) -> str:
        return type(self.pipe).__name__

    @property
    def denoiser_network(self) -> nn.Module:
        return getattr(self.pipe, self.network)

    # -- space
    @property
    def latent(self) -> bool:
        """Whether the network works on an autoencoder's latents (``encode_images`` / ``decode_latents``)."""
        return False

    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the network denoises."""
        cfg = self.denoiser_network.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (int(cfg.in_channels), int(size), int(size))

    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the pipeline makes (= ``sample_shape`` in pixel space)."""
        return self.sample_shape()

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> what the network denoises (pixel families: the images)."""
        return images

    def decode_latents(self, x: Tensor) -> Tensor:
        """What the network denoises -> images in ``[-1, 1]`` (pixel families: ``x``)."""
        return x

    # -- conditions
    @property
    def conditional(self) -> bool:
        return self.condition_kind is not None

    @property
    def class_names(self) -> list[str] | None:
        return self.sidecar.get("class_names")

    @property
    def num_classes(self) -> int | None:
        return None

    def encode(self, raw: list) -> dict[str, Tensor]:
        """Raw conditions (class ids, or prompts) -> a dict of ``[B, ...]`` tensors; ``{}`` when unconditional."""
        if not self.conditional:
            if raw is not None and len(raw):
                raise TeacherError(f"{self.name} teacher {self.path} is unconditional; it takes no conditions")
            return {}
        raise NotImplementedError

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        """The unconditional condition (empty prompt, null class), ``rows`` rows; what guidance contrasts with."""
        raise TeacherError(f"{self.name} teacher {self.path} has no unconditional (null) condition, so it cannot "
                           "be guided; use guidance.mode none")

    @property
    def guidable(self) -> bool:
        """Whether ``null`` exists (classifier-free guidance is possible)."""
        try:
            self.null(1)
        except TeacherError:
            return False
        return True

    # -- the network call
    def forward(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The network's raw output at ``(x, t)`` under ``cond`` (``t``: the network's own timesteps, ``[B]``)."""
        out = net(x, t, **cond)
        return out.sample if hasattr(out, "sample") else out[0]

    def call(self, net: nn.Module) -> Callable[..., Tensor]:
        """``net`` as ``model(x, t, **cond)`` for ``ModelDenoiser``, ``t`` in schedule time: the network gets
        its own timestep (``noise.model_time``: flow ``N t``, EDM ``0.25 log sigma``) and, on EDM, its
        preconditioned input, and its output is read back as ``prediction_type``."""
        noise = self.noise

        def model(x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
            x_in, state = noise.precondition(x, t)
            t_in = noise.model_time(t)
            dtype = _weight_dtype(net)
            if dtype is None or dtype == x.dtype:
                out = self.forward(net, x_in, t_in, cond)
            else:
                # a frozen network held in lower precision (train.frozen_dtype): its inputs in its dtype, its
                # output back in the caller's
                cond = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in cond.items()}
                out = self.forward(net, x_in.to(dtype), t_in, cond).to(x.dtype)
            return noise.output(out, x, t, state)

        return model

    def fsdp_wrap_classes(self, net: nn.Module | None = None) -> list[str]:
        """``fsdp_blocks`` that ``net`` (default: the denoising network) has: what FSDP wraps in it."""
        present = {type(m).__name__ for m in (net or self.denoiser_network).modules()}
        return [name for name in self.fsdp_blocks if name in present]

    # -- the discriminator's features (f-distill's GAN head)
    def feature_block(self, net: nn.Module) -> tuple[nn.Module, int]:
        """``(module, channels)``: the block of ``net`` whose output the discriminator head reads (a UNet's
        mid block), and the channels ``feature_map`` gives."""
        block = getattr(net, "mid_block", None)
        if block is None:
            raise TeacherError(f"the discriminator reads the {self.name} network's middle features; its "
                               f"{type(net).__name__} has no mid_block, and the family names no other block")
        return block, int(net.config.block_out_channels[-1])

    def feature_map(self, output, x: Tensor) -> Tensor:
        """The captured output of ``feature_block`` as ``[B, C, h, w]`` (a UNet block's: itself)."""
        return output[0] if isinstance(output, tuple) else output

    # -- guidance as a student input (Meng et al. 2023; LCM's time_cond_proj_dim)
    @property
    def accepts_guidance_input(self) -> bool:
        return False

    def with_guidance_input(self, net: nn.Module) -> nn.Module:
        raise TeacherError(f"a guidance-conditioned student needs a network with a guidance-scale embedding "
                           f"(UNet2DConditionModel's time_cond_proj_dim); {self.name}'s {type(net).__name__} has "
                           "none: use guidance.mode baked")

    # -- students
    def student_pipeline(self, net: nn.Module, scheduler):
        """The teacher's pipeline class with ``net`` as its denoiser and ``scheduler``; the other components
        (autoencoder, encoders, tokenizers) are the teacher's."""
        components = dict(self.pipe.components)
        components[self.network] = net
        components["scheduler"] = scheduler
        return type(self.pipe)(**components)

    def export(self, net: nn.Module, scheduler, folder: Path) -> None:
        """Write the student pipeline into ``folder`` (an empty temporary folder of ``atomic_dir``), with the
        teacher's ``fewstep_teacher.json`` (class names, null class) when it has one."""
        self.student_pipeline(net, scheduler).save_pretrained(folder)
        if self.sidecar:
            (Path(folder) / "fewstep_teacher.json").write_text(json.dumps(self.sidecar, indent=1))

    @property
    def lora_loadable(self) -> bool:
        """Whether the pipeline class has diffusers' LoRA loader (``load_lora_weights``), so a LoRA student can
        be exported as the LoRA alone (``export_lora``)."""
        return hasattr(type(self.pipe), "load_lora_weights") and hasattr(type(self.pipe), "save_lora_weights")

    def export_lora(self, state: dict[str, Tensor], metadata: dict, scheduler, folder: Path) -> None:
        """Write a LoRA student into ``folder``: the LoRA of the denoising network in diffusers' LoRA file
        (``<Pipeline>.save_lora_weights``; ``metadata`` is its peft ``LoraConfig``, so alpha / rank loads back)
        and the student's ``scheduler`` in ``scheduler/``; the rest of the pipeline is the teacher's."""
        type(self.pipe).save_lora_weights(folder, **{f"{self.network}_lora_layers": state,
                                                     f"{self.network}_lora_adapter_metadata": metadata})
        scheduler.save_pretrained(Path(folder) / "scheduler")

    def pipeline_inputs(self, raw: list | None, guidance_scale: float | None = None) -> dict[str, Any]:
        """The keyword arguments of the pipeline's ``__call__`` for these raw conditions (the parity tests)."""
        return {}

    def describe(self) -> dict:
        """What a student records about its teacher."""
        return {"pipeline": self.name, "path": str(self.path), "id": teacher_identity(self.path),
                "prediction_type": self.prediction_type, "latent": self.latent, "conditions": self.condition_kind}


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers without its loading progress bar and warnings (a user error stays one line)."""
    from diffusers.utils import logging as dlog

    bars, level = dlog.is_progress_bar_enabled(), dlog.get_verbosity()
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        if bars:
            dlog.enable_progress_bar()


def _weight_dtype(net: nn.Module) -> torch.dtype | None:
    param = next(net.parameters(), None)
    return param.dtype if param is not None else None


def latent_image_shape(autoencoder: nn.Module, sample_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The decoded image's ``(C, H, W)`` of a latent ``sample_shape``: each autoencoder level after the first
    halves the resolution."""
    cfg = autoencoder.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    return (int(cfg.out_channels), sample_shape[1] * factor, sample_shape[2] * factor)


def prompt_list(family: "Family", prompts) -> list[str]:
    """``prompts`` as a list of strings, or a one-line ``TeacherError`` (a bare string is refused: a list of
    prompts is one per example)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TeacherError(f"{family.name} teacher {family.path} takes a list of prompt strings, got {prompts!r:.80}")
    return list(prompts)


def vae_encode(vae: nn.Module, images: Tensor, shift: bool = False) -> Tensor:
    """Images in ``[-1, 1]`` -> latents as a pipeline decodes them: the posterior's mode (deterministic, so a
    data set encodes to the same latents every epoch), minus ``shift_factor`` when the pipeline adds it back
    (``shift``: SD3, Flux), times ``scaling_factor``."""
    z = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    if shift:
        z = z - vae.config.shift_factor
    return z * vae.config.scaling_factor


def vae_decode(vae: nn.Module, x: Tensor, shift: bool = False) -> Tensor:
    """Latents -> images in ``[-1, 1]`` (unclamped): ``x / scaling_factor`` (``+ shift_factor`` with ``shift``)
    through the decoder, as the pipelines' ``__call__`` decode."""
    z = x.to(vae.dtype) / vae.config.scaling_factor
    if shift:
        z = z + vae.config.shift_factor
    return vae.decode(z).sample


def class_labels(raw, classes: int, device) -> dict[str, Tensor]:
    """Class ids as a condition, each checked to be one of the teacher's ``classes``."""
    labels = torch.as_tensor(raw, dtype=torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise TeacherError(f"class label {int(bad[0])} is outside the teacher's classes 0..{classes - 1}")
    return {"class_labels": labels.to(device)}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_component_folders(path: str | os.PathLike, index: dict, what: str = "teacher") -> None:
    """A ``TeacherError`` for a component ``model_index.json`` lists whose folder is missing (diffusers would
    take the folder for a Hub id and ask to check the internet connection)."""
    for name, entry in index.items():
        if isinstance(entry, list) and entry and entry[0] is not None and not (Path(path) / name).is_dir():
            raise TeacherError(f"{what} {path} lists the component {name!r} in model_index.json but has no {name}/ "
                               "folder: copy the whole pipeline folder (save_pretrained writes one per component)")


def load_pipeline(path: str | os.PathLike, pipeline_class=None, what: str = "teacher", **kwargs):
    """``pipeline_class.from_pretrained(path)`` (default ``DiffusionPipeline``) of a local folder, quietly, or
    a one-line ``TeacherError`` saying what is wrong with the folder (no ``model_index.json``, a component
    folder missing, a torn config or missing weights), ``what`` naming it in the message."""
    if pipeline_class is None:
        from diffusers import DiffusionPipeline as pipeline_class
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise TeacherError(f"{what} {path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        entries = json.loads(index.read_text())
    except ValueError:
        entries = None
    if not isinstance(entries, dict):
        raise TeacherError(f"{index} is not a diffusers model index (not a JSON mapping)")
    check_component_folders(path, entries, what)
    with quiet_diffusers():
        try:
            return pipeline_class.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:  # a torn config, missing weights: diffusers' words, on one line
            raise TeacherError(f"{what} {path} cannot be loaded: {' '.join(str(err).split())}") from err


def family_of(path: str | os.PathLike) -> type[Family]:
    """The adapter class of a pipeline folder, from its ``model_index.json`` (no weights loaded)."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise TeacherError(f"teacher {path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError):
        raise TeacherError(f"{index} is not a diffusers model index (no _class_name)") from None
    _import_all()
    if name not in FAMILIES:
        raise TeacherError(f"teacher {path} is a {name}; fewstep distils {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu") -> Family:
    """The adapter of a pipeline folder, loaded, its networks frozen in eval mode on ``device``."""
    path = Path(path)
    family = family_of(path).load(path)
    family.pipe.to(device)
    for module in family.pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
    return family
