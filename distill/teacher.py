"""Train a teacher: a diffusers ``UNet2DModel`` on a standard DDPM noise schedule, with the training core.

    fewstep train-teacher --config configs/teacher_fmnist.yaml [train.lr=1e-4 ...]

The config (``fewstep.config.TeacherConfig``) has sections ``train`` (``TrainConfig``), ``model``
(``UNet2DModel`` keyword arguments), ``scheduler`` (``DDPMScheduler`` keyword arguments) and ``data``
(``load_images`` arguments); ``fewstep train-teacher --help`` lists every key. ``TeacherMethod`` is one
network with EMA on ``eps_loss``, run by ``fewstep.distill.core.fit`` (checkpoints
``train.output_dir/checkpoint-<step>.pt``; rerunning the command resumes). The result is saved, atomically,
as a diffusers ``DDPMPipeline`` (safetensors) in ``train.output_dir/pipeline``, so
``DDPMPipeline.from_pretrained(path)`` loads it offline and any fewstep sampler swaps in.

``objective: flow`` trains a rectified flow instead (``flow_loss``: velocity ``eps - x0`` on
``x_t = (1 - t) x0 + t eps``, the network called at ``N t``); its export is a ``DDPMPipeline`` with a
``FlowMatchEulerDiscreteScheduler`` (the ``flow`` section's ``N`` and shift), whose ``__call__`` runs it as is.

A class-conditional teacher (``model.num_class_embeds`` = classes + 1, the last id the null class) trains on
the data's labels for classifier-free guidance (Ho & Salimans 2022): ``eps_loss`` gives the UNet
``class_labels``, each replaced by the null id with probability ``label_dropout``. Its examples are the
training core's conditional form, ``{"x": image, "cond": {"class_labels": id}}`` (``LabelledImages``). The
export adds ``fewstep_teacher.json`` (``class_names``,
``null_class_label``); sample it with ``ModelDenoiser(..., class_labels=...)`` and ``CFGDenoiser``
(diffusers' ``DDPMPipeline.__call__`` has no class input).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from fewstep.config import TeacherConfig, from_dict, given
from fewstep.data import load_conditioned, load_images
from fewstep.io import atomic_dir, atomic_write_bytes

from .core import LossMethod, OptimizerConfig, fit, from_train_config

__all__ = ["eps_loss", "flow_loss", "draw_flow_times", "drop_labels", "LabelledImages", "class_info", "SIDECAR",
           "DEFAULT_LABEL_DROPOUT", "TeacherMethod", "build_teacher", "train_teacher", "cli"]

#: The export's conditioning facts that diffusers' config has no key for (read by ``distill.families``).
SIDECAR = "fewstep_teacher.json"
DEFAULT_LABEL_DROPOUT = 0.1  # Ho & Salimans 2022 find 0.1-0.2 best


def drop_labels(labels: Tensor, null_label: int, p: float, g: torch.Generator) -> Tensor:
    """Each label replaced by ``null_label`` with probability ``p`` (classifier-free guidance's joint
    training, Ho & Salimans 2022, Algorithm 1); drawn from ``g`` so a resumed run drops the same ones."""
    drop = (torch.rand(labels.shape[0], generator=g) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def eps_loss(alphas_cumprod: Tensor, prediction_type: str = "epsilon", null_label: int | None = None,
             label_dropout: float = 0.0):
    """DDPM's simple loss (Ho et al. 2020, eq. 14): ``|eps - eps_theta(sqrt(a) x0 + sqrt(1 - a) eps, t)|^2``
    at ``t ~ U{0..T-1}``; ``v_prediction`` regresses ``v = sqrt(a) eps - sqrt(1 - a) x0`` instead.

    With ``null_label`` the model is class-conditional: batches are ``LabelledImages``' dicts and the network
    gets their ``class_labels``, dropped to ``null_label`` with probability ``label_dropout`` (``drop_labels``)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"teacher prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    ac = alphas_cumprod.float()

    def loss(model: nn.Module, batch: Tensor | dict, g: torch.Generator) -> Tensor:
        x0, labels = (batch, None) if null_label is None else (batch["x"], batch["cond"]["class_labels"])
        t = torch.randint(0, len(ac), (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        a = ac[t].sqrt().view(-1, 1, 1, 1).to(x0.device)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1).to(x0.device)
        target = eps if prediction_type == "epsilon" else a * eps - s * x0
        # drawn after t and eps, so an unconditional teacher's noise is what it always was
        cond = {} if labels is None else {"class_labels": drop_labels(labels, null_label, label_dropout, g)}
        out = model(a * x0 + s * eps, t.to(x0.device), **cond).sample
        return (out.float() - target).pow(2).mean()

    return loss


def draw_flow_times(rows: int, g: torch.Generator, sampling: str = "uniform", mean: float = 0.0,
                    std: float = 1.0) -> Tensor:
    """Training times ``t`` in ``(0, 1)`` of a rectified flow: uniform (Liu et al. 2023) or logit-normal,
    ``t = sigmoid(mean + std n)`` (Esser et al. 2024, SD3, sec. 3.1), float64."""
    if sampling == "uniform":
        return torch.rand(rows, generator=g, dtype=torch.float64)
    if sampling == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(rows, generator=g, dtype=torch.float64))
    raise ValueError(f"unknown flow time sampling {sampling!r}; expected 'uniform' or 'logit_normal'")


def flow_loss(num_train_timesteps: int = 1000, sampling: str = "uniform", mean: float = 0.0, std: float = 1.0,
              null_label: int | None = None, label_dropout: float = 0.0):
    """Rectified flow's (conditional flow matching's) loss: ``|u_theta(x_t, N t) - (eps - x0)|^2`` with
    ``x_t = (1 - t) x0 + t eps`` (Liu et al. 2023; Lipman et al. 2023; SD3's velocity loss), the network called
    at ``timestep = N t`` as diffusers' flow-matching schedulers call it. Labels as ``eps_loss``."""

    def loss(model: nn.Module, batch: Tensor | dict, g: torch.Generator) -> Tensor:
        x0, labels = (batch, None) if null_label is None else (batch["x"], batch["cond"]["class_labels"])
        t = draw_flow_times(x0.shape[0], g, sampling, mean, std)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        tt = t.view(-1, 1, 1, 1).to(x0.device, x0.dtype)
        cond = {} if labels is None else {"class_labels": drop_labels(labels, null_label, label_dropout, g)}
        out = model((1 - tt) * x0 + tt * eps, (num_train_timesteps * t).to(x0.device, torch.float32), **cond).sample
        return (out.float() - (eps - x0)).pow(2).mean()

    return loss


class LabelledImages(Dataset):
    """Images with their class ids, an example as the training core passes conditional data through (and
    fingerprints it, labels included): ``{"x": image, "cond": {"class_labels": id}}``."""

    def __init__(self, images: Tensor, labels: Tensor, class_names: list[str]):
        self.images, self.labels, self.class_names = images, labels, list(class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.images[i], "cond": {"class_labels": self.labels[i]}}


def class_info(pipeline: str | Path) -> dict:
    """A conditional teacher's sidecar, ``{"class_names": [...], "null_class_label": K}``; ``{}`` when
    the teacher is unconditional."""
    path = Path(pipeline) / SIDECAR
    return json.loads(path.read_text()) if path.exists() else {}


class TeacherMethod(LossMethod):
    """A teacher: one trainable UNet (with EMA) on DDPM's ``eps_loss`` under ``scheduler``'s schedule, or,
    with ``flow`` (a ``FlowTeacherConfig``), on rectified flow's ``flow_loss``."""

    name = "teacher"

    def __init__(self, unet: nn.Module, scheduler, optim: OptimizerConfig, settings: dict | None = None,
                 null_label: int | None = None, label_dropout: float = 0.0, flow=None):
        from fewstep.samplers.schedules import DiscreteVPSchedule

        if flow is not None:
            loss = flow_loss(flow.num_train_timesteps, flow.time_sampling, flow.logit_mean, flow.logit_std,
                             null_label, label_dropout)
        else:
            schedule = DiscreteVPSchedule.from_diffusers_config(scheduler.config)
            loss = eps_loss(schedule.alphas_cumprod, scheduler.config.prediction_type, null_label, label_dropout)
        super().__init__(unet, loss, optim, settings)


def _typed(config: TeacherConfig | dict) -> TeacherConfig:
    return config if isinstance(config, TeacherConfig) else from_dict(TeacherConfig, config)


def build_teacher(config: TeacherConfig | dict):
    """``(unet, scheduler)`` from a config's ``model`` and ``scheduler`` sections (``objective: flow``: a
    ``FlowMatchEulerDiscreteScheduler`` from the ``flow`` section)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    config = _typed(config)
    try:
        unet = UNet2DModel(**given(config.model))
    except ValueError as err:  # diffusers' checks, and torch's GroupNorm "num_channels ... divisible by num_groups"
        fix = ("set model.norm_num_groups to a divisor of every model.block_out_channels entry (diffusers' "
               "defaults: 32 groups, channels 224 448 672 896)" if "num_groups" in str(err) else
               "fix the model section (`fewstep train-teacher --help` lists its keys)")
        raise ValueError(f"model: {' '.join(str(err).split()).rstrip('.')}; {fix}") from err
    if config.objective == "flow":
        return unet, FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.flow.num_train_timesteps,
                                                     shift=config.flow.shift)
    return unet, DDPMScheduler(**given(config.scheduler))


def _check_fits(images: Tensor, unet) -> None:
    if images.shape[1:] != (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size):
        raise ValueError(f"data of shape {tuple(images.shape[1:])} does not fit the model's "
                         f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size} input: set "
                         f"data.size={unet.config.sample_size} data.channels={unet.config.in_channels}, or "
                         "model.sample_size / model.in_channels / model.out_channels to the data's")


def _images(config, unet) -> TensorDataset:
    data = load_images(**given(config.data))
    _check_fits(data, unet)
    return TensorDataset(data)


def _labelled(config, unet) -> LabelledImages:
    """The data with its labels, checked against the UNet's class ids (classes + 1, the last the null)."""
    data = load_conditioned(**given(config.data))
    _check_fits(data.images, unet)
    if data.labels is None:
        raise ValueError(f"a class-conditional teacher (model.num_class_embeds) needs class labels; data "
                         f"{config.data.name!r} has {data.kind}")
    names = data.class_names or [str(i) for i in range(int(data.labels.max()) + 1)]
    bad = data.labels[(data.labels < 0) | (data.labels >= len(names))]
    if len(bad):
        raise ValueError(f"data labels must lie in [0, {len(names)}) ({len(names)} classes), found {int(bad[0])}")
    if unet.config.num_class_embeds != len(names) + 1:
        raise ValueError(f"model.num_class_embeds must be the number of classes + 1 = {len(names) + 1} (the last "
                         f"id is the null class), got {unet.config.num_class_embeds}")
    return LabelledImages(data.images, data.labels, names)


def _write_json(path: Path, value) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1).encode())


def train_teacher(config: TeacherConfig | dict, max_steps: int | None = None, output_dir: str | None = None) -> Path:
    """Train (resuming from the newest checkpoint) and export the EMA teacher; returns the pipeline folder."""
    from diffusers import DDPMPipeline

    config = _typed(config)
    tc = config.train if output_dir is None else replace(config.train, output_dir=output_dir)
    core, optim = from_train_config(tc)
    torch.manual_seed(tc.seed)  # the initial weights are part of the run
    unet, scheduler = build_teacher(config)
    # The recipe holds the keys that are set (not diffusers' defaults), as before the config system.
    settings = {k: given(getattr(config, k)) for k in ("model", "scheduler", "data")}
    flow = config.flow if config.objective == "flow" else None
    if flow is not None:  # only then in the recipe: DDPM checkpoints keep resuming
        settings.update(objective="flow", flow=dataclasses.asdict(flow))
    conditional = config.model.num_class_embeds is not None
    null, dropout = None, 0.0
    if conditional:  # only then in the recipe: unconditional checkpoints keep resuming
        null = config.model.num_class_embeds - 1
        dropout = DEFAULT_LABEL_DROPOUT if config.label_dropout is None else config.label_dropout
        settings["label_dropout"] = dropout
    method = TeacherMethod(unet, scheduler, optim, settings, null, dropout, flow)
    start = time.perf_counter()
    data = {}

    def dataset():  # fit loads the data only once the output folder is known to be writable and free
        data["set"] = _labelled(config, unet) if conditional else _images(config, unet)
        return data["set"]

    result = fit(method, core, dataset, max_steps=max_steps)
    out, path = Path(tc.output_dir), Path(tc.output_dir) / "pipeline"
    if result.state.accelerator.is_main_process:
        ema = result.state.ema("model")
        with atomic_dir(path) as tmp:
            DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(tmp)
            if conditional:
                _write_json(tmp / SIDECAR, {"class_names": data["set"].class_names, "null_class_label": null})
        _write_json(out / "history.json", result.history)
        _write_json(out / "train_info.json", {
            "steps": result.state.step, "seconds_this_run": time.perf_counter() - start, "seed": tc.seed,
            "parameters": sum(p.numel() for p in ema.parameters()), "examples": result.examples})
    return path


def cli(config: TeacherConfig, max_steps: int | None = None, output_dir: str | None = None) -> int:
    """``fewstep train-teacher``: the config comes from ``fewstep.config.load``."""
    print(train_teacher(config, max_steps, output_dir))
    return 0
