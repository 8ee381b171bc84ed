"""The training core every fewstep method runs on: state + method + loop (DESIGN.md, "Students are samplers").

- **state** (``TrainState``): named networks -- trainable ones with their optimizer, learning-rate
  schedule, gradient clipping and optional EMA; frozen ones (a teacher), on the device but not wrapped
  for training -- and the counters ``step`` (optimizer steps), ``round`` and ``step_in_round``. One
  checkpoint holds all of it plus the run's recipe; it is written atomically and rotated.
- **a method** (``Method``): declares its networks and rounds; ``train_step(ctx, batch)`` returns named
  losses and updates networks through ``ctx.update(name, loss)``, as many as it likes per step (a critic
  several times, a generator once); ``begin_round`` swaps networks between rounds (PD's teacher <-
  student). The core gives every trainable network a fresh optimizer and schedule at each round.
- **the loop** (``fit``): accelerate (one CPU to many GPUs, mixed precision), gradient accumulation done
  here (``accumulation`` micro-batches per optimizer step, synchronised only on the last), data through
  an accelerate-prepared ``DataLoader`` whose batch of step ``k`` is a function of ``(seed, k)``, and the
  global RNG re-seeded from ``(seed, step, micro-batch, process)`` before every micro-batch, so dropout
  and noise replay exactly. Counters and EMAs advance on optimizer steps only, and checkpoints and
  interruptions (SIGINT / SIGTERM: save, say where it resumes, exit) happen between optimizer steps, so
  a killed run resumed from its last checkpoint ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from fewstep.io import atomic_save

__all__ = ["OptimizerConfig", "Network", "Method", "LossMethod", "StepContext", "TrainState", "CoreConfig",
           "from_train_config", "fit", "StepBatchSampler", "RunLock", "checkpoint_paths", "data_fingerprint",
           "check_writable", "Interrupted", "Refused", "FolderInUse", "NotWritable", "NonFiniteLoss",
           "UnsafeCheckpoint"]


# ---------------------------------------------------------------------------------------------
# What a method declares


@dataclass
class OptimizerConfig:
    """AdamW with a warm-up, then constant or linearly annealed (to 0 at the end of each round)."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    anneal: str = "constant"  # "constant" | "linear"
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # None: no EMA of this network
    ema_start: int = 0  # optimizer steps (in the round) before the EMA starts averaging

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.anneal not in ("constant", "linear"):
            raise ValueError(f"anneal must be 'constant' or 'linear', got {self.anneal!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")

    def lr_at(self, step_in_round: int, round_steps: int) -> float:
        """The learning rate of optimizer step ``step_in_round`` (0-based) of a round."""
        if self.warmup_steps and step_in_round < self.warmup_steps:
            return self.lr * (step_in_round + 1) / self.warmup_steps
        if self.anneal == "linear":
            return self.lr * max(0.0, 1.0 - step_in_round / round_steps)
        return self.lr


@dataclass
class Network:
    """A network of a method: trainable (with ``optim``) or frozen (``optim=None``). ``persistent=False``: a
    frozen network the method rebuilds identically on resume (the teacher: its identity is in the recipe), so
    checkpoints leave it out."""

    module: nn.Module
    optim: OptimizerConfig | None = None
    persistent: bool = True

    def __post_init__(self):
        if self.optim is not None and not self.persistent:
            raise ValueError("a trainable network changes as it trains: it must be persistent")

    @property
    def trainable(self) -> bool:
        return self.optim is not None


class Method:
    """A training method. Subclasses set ``name`` and implement ``networks`` and ``train_step``."""

    name = "method"
    #: Whether ``train_step`` reads a data batch (data-free methods set False and get ``batch=None``).
    needs_data = True

    def networks(self) -> dict[str, Network]:  # pragma: no cover - interface
        raise NotImplementedError

    def round_steps(self, steps: int) -> list[int]:
        """Optimizer steps per round; default one round of ``steps``."""
        return [steps]

    def begin_round(self, round_index: int, nets: "TrainState") -> None:
        """Called when round ``round_index`` starts fresh (not on resume): e.g. copy student -> teacher."""

    def train_step(self, ctx: "StepContext", batch: Tensor | None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def recipe(self) -> dict:
        """The method's settings a resumed run must share (compared on resume; the trainable networks'
        optimizer settings are compared too)."""
        return {}


class LossMethod(Method):
    """One trainable network, ``"model"``, with its optimizer, schedule and EMA, trained on
    ``loss(model, batch, generator) -> scalar`` (a teacher, a restoration model). ``settings`` is the
    recipe a resumed run must share (e.g. the model and data config sections)."""

    name = "loss"

    def __init__(self, module: nn.Module, loss: Callable[[nn.Module, Tensor, torch.Generator], Tensor],
                 optim: OptimizerConfig, settings: dict | None = None):
        self.module, self.loss, self.optim, self.settings = module, loss, optim, dict(settings or {})

    def networks(self) -> dict[str, Network]:
        return {"model": Network(self.module, self.optim)}

    def train_step(self, ctx: "StepContext", batch: Tensor) -> dict[str, Tensor]:
        return {"loss": ctx.update("model", self.loss(ctx.net("model"), batch, ctx.generator))}

    def recipe(self) -> dict:
        return self.settings


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class CoreConfig:
    """The loop's own settings (a training config's ``train:`` section)."""

    output_dir: str = "outputs/run"
    steps: int = 1000  # optimizer steps, all rounds together
    batch_size: int = 64  # examples per optimizer step, over all processes and micro-batches
    accumulation: int = 1  # micro-batches per optimizer step
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 50
    mixed_precision: str | None = None  # None: accelerate's (``accelerate launch`` / ``accelerate config``), else no
    cpu: bool = False
    progress: bool = True
    frozen_dtype: str = "float32"  # frozen networks' weights (a teacher): float32, bfloat16 or float16
    gradient_checkpointing: bool = False  # trainable diffusers networks recompute activations in the backward

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulation", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.batch_size % self.accumulation:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of accumulation {self.accumulation}")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {self.frozen_dtype!r}")
        if self.mixed_precision not in (None, *PRECISIONS):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16' (or unset: accelerate's), got "
                             f"{self.mixed_precision!r}")


PRECISIONS = ("no", "fp16", "bf16")
FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Where ``accelerate launch --mixed_precision`` and ``accelerate config`` leave their choice for the process.
LAUNCH_PRECISION = "ACCELERATE_MIXED_PRECISION"


def resolve_precision(configured: str | None, launched: str | None) -> str:
    """The one rule: the training config's ``mixed_precision`` when set, else the launcher's
    (``accelerate launch`` / ``accelerate config``), else ``no``. Both set and different is an error: a
    silent choice would train a model in a precision the user did not ask for."""
    launched = launched or None
    if configured is not None and launched is not None and configured != launched:
        raise ValueError(f"train.mixed_precision={configured} but accelerate launch/config set {launched}; set only "
                         f"one (or make them equal)")
    return configured or launched or "no"


#: Settings that may change between a checkpoint and the run resuming it.
RESUMABLE = ("output_dir", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "progress", "cpu",
             "gradient_checkpointing")


def from_train_config(train) -> tuple[CoreConfig, OptimizerConfig]:
    """A config file's ``train:`` section (``fewstep.config.TrainConfig``) as the loop's settings and the
    optimizer of a method's one trainable network (``LossMethod``)."""
    core = CoreConfig(output_dir=train.output_dir, steps=train.steps, batch_size=train.batch_size,
                      accumulation=train.gradient_accumulation_steps, seed=train.seed,
                      checkpoint_every=train.checkpoint_every, keep_checkpoints=train.keep_checkpoints,
                      log_every=train.log_every, mixed_precision=train.mixed_precision, cpu=train.cpu,
                      progress=train.progress, frozen_dtype=train.frozen_dtype,
                      gradient_checkpointing=train.gradient_checkpointing)
    optim = OptimizerConfig(lr=train.lr, weight_decay=train.weight_decay, warmup_steps=train.warmup_steps,
                            grad_clip=train.grad_clip, ema_decay=train.ema_decay, ema_start=train.ema_start)
    return core, optim


class TrainState:
    """Networks, optimizers, EMAs and counters of a run; ``state_dict`` is the checkpoint."""

    def __init__(self, nets: dict[str, Network], accelerator, frozen_dtype: torch.dtype = torch.float32,
                 gradient_checkpointing: bool = False):
        self.accelerator = accelerator
        self.specs = nets
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.emas: dict[str, nn.Module] = {}
        self.step = self.round = self.step_in_round = 0
        self.history: list[dict] = []  # the loop's log (kept with the checkpoint)
        for name, net in nets.items():
            if net.trainable:
                self.modules[name] = net.module.train()
                if gradient_checkpointing and hasattr(net.module, "enable_gradient_checkpointing"):
                    net.module.enable_gradient_checkpointing()
                if net.optim.ema_decay is not None:
                    self.emas[name] = _ema_copy(net.module).to(accelerator.device)
            else:
                # weights in frozen_dtype; a parameter-free module (statistics buffers) keeps its own
                param = next(net.module.parameters(), None)
                dtype = frozen_dtype if param is not None and param.dtype != frozen_dtype else None
                self.modules[name] = net.module.to(accelerator.device, dtype).eval().requires_grad_(False)
        self.reset_optimizers()

    def reset_optimizers(self) -> None:
        """Fresh optimizers for every trainable network (each round starts with its own), over the parameters
        that require gradients (a LoRA student's factors, not its frozen base weights)."""
        for name, net in self.specs.items():
            if not net.trainable:
                continue
            module = self.accelerator.unwrap_model(self.modules[name])
            o = net.optim
            params = [p for p in module.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
            self.modules[name], self.optimizers[name] = self.accelerator.prepare(module, opt)

    def net(self, name: str) -> nn.Module:
        """The network as the method trains it (wrapped for training when trainable)."""
        return self.modules[name]

    def unwrapped(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.modules[name])

    def ema(self, name: str) -> nn.Module:
        """The EMA of a trainable network, or the network itself when it has none."""
        return self.emas[name] if name in self.emas else self.unwrapped(name)

    def load_weights(self, name: str, source: nn.Module) -> None:
        """Copy ``source``'s weights into network ``name`` (and reset its EMA to them)."""
        self.unwrapped(name).load_state_dict(source.state_dict())
        if name in self.emas:
            self.emas[name].load_state_dict(source.state_dict())

    def state_dict(self) -> dict:
        """The checkpoint: persistent networks, each without the weights that never train (a LoRA student's
        frozen base: rebuilt from the teacher on resume), optimizers, EMAs (the same), counters."""
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "counters": {"step": self.step, "round": self.round, "step_in_round": self.step_in_round},
            "networks": {name: _changing_state(self.unwrapped(name), self.specs[name].trainable)
                         for name in self.modules if self.specs[name].persistent},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "emas": {name: _changing_state(ema, True, like=self.unwrapped(name)) for name, ema in self.emas.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, weights in state["networks"].items():
            if self.specs[name].persistent:  # a checkpoint from before frozen teachers were left out holds them
                _load_changing(self.unwrapped(name), weights, self.specs[name].trainable, name)
        for name, weights in state["emas"].items():
            _load_changing(self.emas[name], weights, True, f"the EMA of {name}", like=self.unwrapped(name))
        for name, opt_state in state["optimizers"].items():
            self.optimizers[name].load_state_dict(opt_state)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        c = state["counters"]
        self.step, self.round, self.step_in_round = c["step"], c["round"], c["step_in_round"]


def _frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)


def _ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of a trainable network for its EMA that shares the weights which never train (a LoRA
    student's base): only the trained ones are copied, so a LoRA student's EMA costs its factors."""
    fixed = {id(p): p for p in module.parameters() if not p.requires_grad}
    return copy.deepcopy(module, memo=fixed).eval().requires_grad_(False)


def _trained_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _changing_state(module: nn.Module, trainable: bool, like: nn.Module | None = None) -> dict:
    """``module``'s state dict without the parameters that never train (of ``like``, the trained network an EMA
    follows): all of it for a frozen network that changes (PD's previous student, statistics buffers)."""
    state = module.state_dict()
    if not trainable:
        return state
    source = like if like is not None else module
    fixed = {name for name, p in source.named_parameters() if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in fixed}


def _load_changing(module: nn.Module, state: dict, trainable: bool, what: str, like: nn.Module | None = None) -> None:
    """Load a ``_changing_state`` back: every key it must hold has to be there (a checkpoint of another
    network is refused, never half-loaded); older checkpoints with the fixed weights too load as well."""
    if not trainable:
        module.load_state_dict(state)
        return
    source = like if like is not None else module
    fixed = {name for name, p in source.named_parameters() if not p.requires_grad}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in fixed]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ---------------------------------------------------------------------------------------------
# One step


class StepContext:
    """What ``Method.train_step`` sees: the networks, this micro-batch's generator, and ``update``."""

    def __init__(self, state: TrainState, config: CoreConfig, round_steps: list[int], generator: torch.Generator,
                 micro: int):
        self.state, self.config, self.generator, self.micro = state, config, generator, micro
        self._round_steps = round_steps
        self.updated: set[str] = set()

    # counters, read-only for the method
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def round(self) -> int:
        return self.state.round

    @property
    def step_in_round(self) -> int:
        return self.state.step_in_round

    @property
    def round_length(self) -> int:
        return self._round_steps[self.state.round]

    @property
    def device(self) -> torch.device:
        return self.state.accelerator.device

    def _global_rows(self, local_rows: int) -> tuple[int, slice]:
        acc = self.state.accelerator
        start = acc.process_index * local_rows
        return local_rows * acc.num_processes, slice(start, start + local_rows)

    def randn(self, *shape: int) -> Tensor:
        """Standard normal noise for this process's rows of the micro-batch (``shape[0]`` = local rows).
        Drawn for the whole micro-batch from a generator every process shares, then sliced, so N processes
        use the noise one process would (the global RNG, e.g. dropout, stays per process)."""
        rows, mine = self._global_rows(shape[0])
        return torch.randn((rows, *shape[1:]), generator=self.generator)[mine].to(self.device)

    def rand(self, rows: int) -> Tensor:
        """``rows`` uniform numbers in ``[0, 1)`` for this process's rows, drawn like ``randn``."""
        total, mine = self._global_rows(rows)
        return torch.rand((total,), generator=self.generator, dtype=torch.float64)[mine].to(self.device)

    def randint(self, high: int, rows: int) -> Tensor:
        """``rows`` integers in ``[0, high)`` for this process's rows, drawn like ``randn``."""
        total, mine = self._global_rows(rows)
        return torch.randint(0, high, (total,), generator=self.generator)[mine]

    def net(self, name: str) -> nn.Module:
        return self.state.net(name)

    def update(self, name: str, loss: Tensor) -> Tensor:
        """Back-propagate ``loss`` into network ``name``; on the last micro-batch of the step, clip,
        step its optimizer at this step's learning rate and advance its EMA. Returns ``loss`` detached."""
        state, acc = self.state, self.state.accelerator
        spec = state.specs[name]
        if not spec.trainable:
            raise ValueError(f"network {name!r} is frozen; only trainable networks can be updated")
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLoss(f"non-finite loss {float(loss.detach())} for {name!r} at step {state.step}; "
                                     "lower the learning rate or check the data")
        module, opt = state.modules[name], state.optimizers[name]
        last = self.micro == self.config.accumulation - 1
        sync = contextlib.nullcontext() if last else acc.no_sync(module)
        with sync:
            acc.backward(loss / self.config.accumulation)
        if last:
            if spec.optim.grad_clip:
                acc.clip_grad_norm_(module.parameters(), spec.optim.grad_clip)
            for group in opt.param_groups:
                group["lr"] = spec.optim.lr_at(state.step_in_round, self.round_length)
            try:
                opt.step()
            except RuntimeError as err:  # AdamW at an absurd lr: its float32 step overflows inside torch
                if "overflow" not in str(err):
                    raise
                raise NonFiniteLoss(f"the update of {name!r} at step {state.step} overflows float32 (lr "
                                    f"{opt.param_groups[0]['lr']:g}); lower the learning rate") from None
            opt.zero_grad(set_to_none=True)
            if name in state.emas:
                started = state.step_in_round >= spec.optim.ema_start
                _ema_update(state.emas[name], state.unwrapped(name), spec.optim.ema_decay if started else 0.0)
            self.updated.add(name)
        return loss.detach()


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:  # the others are shared with the model (``_ema_copy``) and never change
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _seed(seed: int, step: int, micro: int, process: int) -> int:
    """A distinct 63-bit seed per (run seed, optimizer step, micro-batch, process)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}/{process}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------
# Data


class StepBatchSampler(Sampler):
    """Batches whose content is a function of the optimizer step: micro-batch ``m`` of step ``k`` is a
    slice of a seeded permutation of epoch ``(k * B) // N`` -- every example once per epoch, and a run
    resumed at step ``k`` draws what the uninterrupted run drew. Yields ``steps * accumulation``
    micro-batches of ``batch_size / accumulation`` indices from step ``start``.
    """

    def __init__(self, n_examples: int, batch_size: int, accumulation: int, seed: int, start: int, stop: int):
        if n_examples < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_examples} training examples")
        self.n, self.batch, self.accumulation = n_examples, batch_size, accumulation
        self.seed, self.start, self.stop = seed, start, stop
        self.batch_size = batch_size // accumulation  # what one yield holds (accelerate reads it to split)

    def _epoch(self, e: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(_seed(self.seed, e, -1, -1)))

    def step_indices(self, step: int) -> Tensor:
        first = step * self.batch
        epoch, offset = divmod(first, self.n)
        idx = self._epoch(epoch)[offset:offset + self.batch]
        if len(idx) < self.batch:  # the step straddles two epochs
            idx = torch.cat([idx, self._epoch(epoch + 1)[: self.batch - len(idx)]])
        return idx

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.batch_size
        for step in range(self.start, self.stop):
            idx = self.step_indices(step)
            for m in range(self.accumulation):
                yield idx[m * micro:(m + 1) * micro].tolist()

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulation


def data_fingerprint(dataset: Dataset, samples: int = 8) -> dict:
    """Size and a hash of a few evenly spaced examples: a resumed run refuses data that changed."""
    n = len(dataset)
    h = hashlib.sha256()
    for i in sorted({round(k * (n - 1) / max(samples - 1, 1)) for k in range(samples)}) if n else []:
        for tensor in _tensors(dataset[i]):
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"examples": n, "sha256": h.hexdigest()[:16]}


def _tensors(item) -> list[Tensor]:
    """An example's tensors in a fixed order: a tensor, a tuple's first element, or a (nested) dict's values
    by sorted key (conditional data: the image or latent and its condition)."""
    if isinstance(item, dict):
        return [t for key in sorted(item) for t in _tensors(item[key])]
    if isinstance(item, (tuple, list)):
        return _tensors(item[0])
    return [torch.as_tensor(item)]


# ---------------------------------------------------------------------------------------------
# Checkpoints, lock, signals


def checkpoint_paths(output_dir: str | os.PathLike) -> list[Path]:
    """This run's checkpoints, oldest first (``checkpoint-<step>.pt``)."""
    return sorted(Path(output_dir).glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


class Refused(ValueError):
    """A run the core will not start: its folder's checkpoint is of another recipe, or past ``steps``."""

    exit_code = 2  # the ``fewstep`` command prints it as one line, like a config error


class NonFiniteLoss(FloatingPointError):
    """A loss went NaN or infinite: the run stops before the update (its last checkpoint is intact)."""

    exit_code = 2


class UnsafeCheckpoint(Refused):
    """A checkpoint file that holds more than tensors and plain data: loading it could run code."""


class FolderInUse(RuntimeError):
    """Another run holds the output folder's lock."""

    exit_code = 2


class NotWritable(OSError):
    """The output folder cannot be written."""

    exit_code = 1


class RunLock:
    """An exclusive lock on an output folder (``.lock``, flock): two runs on one folder is an error."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.handle = None

    def __enter__(self):
        import fcntl

        try:  # never through a link, never truncating: a planted .lock symlink must not clobber its target
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise Refused(f"{self.path} is a symbolic link; fewstep does not follow it. Delete it (and check "
                              "who made it) or choose another output_dir") from None
            raise
        self.handle = os.fdopen(fd, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise FolderInUse(f"{self.path.parent} is in use by another run (lock {self.path}); "
                               "wait for it or choose another output_dir") from None
        self.handle.truncate(0)
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        self.handle.close()
        self.path.unlink(missing_ok=True)


class Interrupted(Exception):
    """Raised out of ``fit`` after SIGINT / SIGTERM, once the checkpoint is written. ``exit_code`` is the
    shell's for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, step: int, path: Path, signum: int = signal.SIGINT):
        super().__init__(f"interrupted: saved step {step} to {path}; run the same command again to resume")
        self.step, self.path, self.signum = step, path, int(signum)
        self.exit_code = 128 + self.signum


@contextlib.contextmanager
def _deferred_signals() -> Iterator[dict]:
    """SIGINT / SIGTERM set a flag instead of killing the loop, which checkpoints and stops."""
    caught: dict = {"signal": None}
    previous = {}

    def handler(signum, frame):
        caught["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    state: TrainState
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    examples: int | None = None  # size of the dataset it trained on


def _recipe(config: CoreConfig, method: Method, data: dict | None, nets: dict[str, Network], rounds: list[int],
            settings: dict | None, accelerator) -> dict:
    train = {k: v for k, v in asdict(config).items() if k not in RESUMABLE}
    train["mixed_precision"] = accelerator.mixed_precision  # what ran, however it was chosen
    optimizers = {name: asdict(net.optim) for name, net in nets.items() if net.trainable}
    recipe = {"method": method.name, "train": train, "optimizers": optimizers, "settings": method.recipe(),
              "data": data}
    if len(rounds) > 1:  # steps set every round's length: a changed steps would cut a round short or stretch it
        recipe["rounds"] = rounds
    if settings is not None:
        recipe["run"] = settings
    return json.loads(json.dumps(recipe, sort_keys=True, default=str))


def _changes(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _changes(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, unpickled with ``weights_only=True`` (tensors and plain data only), so a planted file
    cannot run code. A file that needs more is refused (``UnsafeCheckpoint``), not skipped: a run must not
    quietly start over beside it."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "global" in str(err).lower():
            raise UnsafeCheckpoint(f"{path} holds Python objects other than tensors and plain data, and loading "
                                   "it could run code; fewstep checkpoints never do. Delete it if you did not "
                                   "write it, or use a new output_dir") from None
        raise


def _load_latest(folder: Path) -> tuple[dict | None, Path | None]:
    """The newest checkpoint that loads; a torn or corrupt newer one is reported and skipped."""
    for path in reversed(checkpoint_paths(folder)):
        try:
            return load_checkpoint(path), path
        except UnsafeCheckpoint:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            print(f"warning: skipping unreadable checkpoint {path} ({type(err).__name__}: {err})")
    return None, None


def fit(method: Method, config: CoreConfig, dataset: Dataset | Callable[[], Dataset] | None = None,
        accelerator=None, max_steps: int | None = None, log=print, settings: dict | None = None) -> FitResult:
    """Train ``method`` to ``config.steps`` optimizer steps (or ``max_steps`` more), resuming from the
    newest checkpoint in ``config.output_dir`` when one exists.

    ``dataset`` may be a function returning the dataset: it is called only once the output folder has
    proved writable and its lock is held, so a run that cannot start says so before loading any data.
    ``settings`` (plain data: the job's own configuration, e.g. where each network starts) join the recipe,
    so a resumed run that changes any of them is refused, naming it.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if method.needs_data and dataset is None:
        raise ValueError(f"method {method.name!r} trains on data; give it a dataset")
    if accelerator is None:
        precision = resolve_precision(config.mixed_precision, os.environ.get(LAUNCH_PRECISION))
        accelerator = Accelerator(cpu=config.cpu, mixed_precision=precision,
                                  dataloader_config=DataLoaderConfiguration(split_batches=True))
    if config.batch_size // config.accumulation % accelerator.num_processes:
        raise ValueError(f"a micro-batch of {config.batch_size // config.accumulation} does not split over "
                         f"{accelerator.num_processes} processes")
    out = Path(config.output_dir)
    check_writable(out)
    rounds = method.round_steps(config.steps)
    if sum(rounds) != config.steps:
        raise ValueError(f"{method.name}: rounds {rounds} do not add up to steps {config.steps}")

    with contextlib.ExitStack() as held:
        if accelerator.is_main_process:
            held.enter_context(RunLock(out))
        if callable(dataset) and not isinstance(dataset, Dataset):
            dataset = dataset()  # only now: the folder is writable and this run's
        fingerprint = data_fingerprint(dataset) if dataset is not None else None
        caught = held.enter_context(_deferred_signals())
        torch.manual_seed(config.seed)  # network initialisation inside the method happens before this
        nets = method.networks()
        recipe = _recipe(config, method, fingerprint, nets, rounds, settings, accelerator)
        state = TrainState(nets, accelerator, FROZEN_DTYPES[config.frozen_dtype], config.gradient_checkpointing)
        result = FitResult(state, state.history, examples=len(dataset) if dataset is not None else None)
        saved, path = _load_latest(out)
        if saved is not None:
            if saved["state"]["counters"]["step"] > config.steps:
                raise Refused(f"{path} is at step {saved['state']['counters']['step']}, past the configured "
                              f"steps {config.steps}; raise steps to continue it or use a new output_dir")
            changed = _changes(saved.get("recipe"), recipe)
            if any(c.startswith("rounds:") for c in changed):
                was = sum(saved["recipe"]["rounds"]) if isinstance(saved["recipe"].get("rounds"), list) else "?"
                raise Refused(f"{path}: train.steps sets the length of each of {method.name}'s {len(rounds)} rounds, "
                              f"so it cannot change mid-run ({was} -> {config.steps}); resume with train.steps={was} "
                              "or use a new output_dir")
            if changed:
                changed = [c.removeprefix("run.") for c in changed]  # the job's own keys, as the user spells them
                raise Refused(f"{path} was written by a different run ({'; '.join(changed)}); use a new "
                              "output_dir, or delete its checkpoints to start over")
            state.load_state_dict(saved["state"])
            state.history[:] = saved.get("history", [])
            result.resumed_from = state.step
            log(f"resuming {out} at step {state.step} (round {state.round}, step {state.step_in_round} in round)")
        stop = config.steps if max_steps is None else min(config.steps, state.step + max_steps)
        if state.step >= stop:
            log(f"{out}: already at step {state.step} of {config.steps}; nothing to train")
            return result

        def save():
            accelerator.wait_for_everyone()
            path = out / f"checkpoint-{state.step:08d}.pt"
            if accelerator.is_main_process:
                atomic_save({"state": state.state_dict(), "recipe": recipe, "history": result.history}, path)
                for old in checkpoint_paths(out)[:-config.keep_checkpoints]:
                    old.unlink(missing_ok=True)
            accelerator.wait_for_everyone()
            return path

        loader = None
        if dataset is not None:  # data, or (a data-free method of a conditional teacher) conditions only
            sampler = StepBatchSampler(len(dataset), config.batch_size, config.accumulation, config.seed,
                                       state.step, stop)
            loader = iter(accelerator.prepare(DataLoader(dataset, batch_sampler=sampler, num_workers=0)))
        bar = _progress(config, accelerator, state.step)
        running: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        while state.step < stop:
            if state.step_in_round == 0:  # a round begins (a checkpoint at a boundary is taken before this)
                method.begin_round(state.round, state)
                if state.round > 0:
                    state.reset_optimizers()
            losses: dict[str, float] = {}
            for micro in range(config.accumulation):
                # The batch first: a DataLoader iterator draws its own seed from the global RNG when created.
                batch = _first(next(loader)) if loader is not None else None
                # The global RNG (dropout) differs per process; ``generator`` (the method's noise) is shared.
                torch.manual_seed(_seed(config.seed, state.step, micro, accelerator.process_index))
                generator = torch.Generator(device="cpu").manual_seed(_seed(config.seed, state.step, micro, 0))
                ctx = StepContext(state, config, rounds, generator, micro)
                with accelerator.autocast():
                    step_losses = method.train_step(ctx, batch)
                for k, v in step_losses.items():
                    losses[k] = losses.get(k, 0.0) + float(v) / config.accumulation
            if accelerator.num_processes > 1:  # log the whole batch's losses, not this process's share
                losses = _mean_over_processes(losses, accelerator)
            _advance(state, rounds)
            window_steps += 1
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
            if state.step % config.log_every == 0 or state.step == stop:
                seconds = time.perf_counter() - window_start
                elapsed = (result.history[-1]["seconds"] if result.history else 0.0) + seconds  # over resumes
                entry = {"step": state.step, "round": state.round, **{k: v / window_steps for k, v in running.items()},
                         "steps_per_s": window_steps / max(seconds, 1e-9), "seconds": elapsed}
                result.history.append(entry)
                if bar is None and accelerator.is_main_process:  # no bar: one line per log entry
                    losses_text = ", ".join(f"{k} {v / window_steps:.4g}" for k, v in running.items())
                    log(f"step {state.step}/{config.steps} (round {state.round}): {losses_text}, "
                        f"{entry['steps_per_s']:.2f} steps/s")
                running, window_start, window_steps = {}, time.perf_counter(), 0
            interrupted = caught["signal"] is not None
            if state.step % config.checkpoint_every == 0 or state.step == stop or interrupted:
                path = save()
                if interrupted:
                    if bar is not None:
                        bar.close()
                    raise Interrupted(state.step, path, caught["signal"])
        if bar is not None:
            bar.close()
    return result


def _mean_over_processes(losses: dict[str, float], accelerator) -> dict[str, float]:
    """Each loss averaged over the processes (their shares of the batch are equal, so this is the loss of
    the whole batch, as one process would log it)."""
    names = sorted(losses)
    values = torch.tensor([losses[n] for n in names], dtype=torch.float64, device=accelerator.device)
    return dict(zip(names, accelerator.reduce(values, reduction="mean").tolist()))


def _advance(state: TrainState, rounds: list[int]) -> None:
    state.step += 1
    state.step_in_round += 1
    if state.step_in_round == rounds[state.round] and state.round + 1 < len(rounds):
        state.round += 1
        state.step_in_round = 0


def _first(batch):
    """A tensor batch, or a dict batch (``{"x": ..., "cond": {...}}``: conditional data) as it is."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _progress(config: CoreConfig, accelerator, start: int):
    if not (config.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def check_writable(folder: str | os.PathLike) -> None:
    """Fail before any work when the output folder cannot be written (``fit`` calls it first)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise NotWritable(err.errno, f"cannot write to the output folder {folder}: {err.strerror or err}") from None
