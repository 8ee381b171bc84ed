"""The training core every fewstep trainer runs on: accelerate (one CPU to many GPUs, mixed precision,
gradient accumulation), EMA, atomic periodic checkpoints and exact resume.

Exact resume needs no saved random state: the batch indices and the noise of step ``k`` on process
``p`` come from generators seeded by ``(seed, k, p)``, so a run resumed from a checkpoint at step
``k`` replays the remaining steps bit for bit (tested in tests/test_trainer.py).

A method plugs in a ``loss(model, batch, generator) -> scalar`` function; ``Trainer.fit`` does the rest.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fewstep.config import TrainConfig, read_yaml  # TrainConfig lives with the other sections
from fewstep.io import atomic_save

__all__ = ["TrainConfig", "Trainer", "EMA", "load_config", "run_recipe", "recipe_changes"]


def load_config(path: str | os.PathLike) -> dict:
    """A YAML config as a dict (sections: ``train``, ``model``, ``data``, ...); ``fewstep.config.load``
    types and checks it."""
    return read_yaml(path)


class EMA:
    """Exponential moving average of a model's parameters (and a copy of its buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None):
        d = self.decay if decay is None else decay
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def _step_generator(seed: int, step: int, process: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process)


#: Training options that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = ("output_dir", "steps", "checkpoint_every", "log_every", "progress", "cpu")


def run_recipe(config: TrainConfig, recipe: dict | None = None) -> dict:
    """What a checkpoint must agree on to be resumed: the weight-changing training options and the method's
    ``recipe``, as plain JSON values (tuples and lists compare equal)."""
    train = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"train": train, **(recipe or {})}, sort_keys=True, default=str))


def recipe_changes(saved: dict | None, current: dict, prefix: str = "") -> list[str]:
    """``"key: saved -> current"`` for every leaf that differs (none for checkpoints older than recipes)."""
    if saved is None:
        return []
    changes = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += recipe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


class Trainer:
    """Optimise ``model`` on ``loss_fn(model, batch, generator)`` over the tensor ``data``.

    Each step draws ``batch_size`` examples (split over processes) by a seeded per-step permutation
    of the data. ``fit()`` resumes from ``output_dir/checkpoint.pt`` when it exists, but only a run of the
    same recipe: ``recipe`` (the method's settings, e.g. the model and data config) and the training
    options that change the weights are stored in the checkpoint and compared on resume, so pointing a
    changed config at an old ``output_dir`` fails instead of silently continuing the old run. ``steps``
    and the logging / checkpoint cadence may change (the learning rate does not depend on ``steps``).
    """

    def __init__(self, config: TrainConfig, model: nn.Module, loss_fn: Callable[[nn.Module, Tensor, torch.Generator], Tensor],
                 data: Tensor, accelerator=None, extra_state: dict | None = None, recipe: dict | None = None):
        from accelerate import Accelerator

        self.config = config
        if accelerator is None:
            accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision,
                                      gradient_accumulation_steps=config.gradient_accumulation_steps)
        self.accelerator = accelerator
        torch.manual_seed(config.seed)
        self.ema = EMA(model, config.ema_decay)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.loss_fn, self.data = loss_fn, data
        self.step = 0
        self.history: list[dict] = []
        self.extra_state = extra_state or {}
        self.output_dir = Path(config.output_dir)
        self.recipe = run_recipe(config, recipe)
        if len(data) < config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data)} training examples")

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoint.pt"

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.accelerator.unwrap_model(self.model).state_dict(),
                "ema": self.ema.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": self.history, "config": asdict(self.config), "extra": self.extra_state,
                "recipe": self.recipe}

    def save_checkpoint(self):
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_save(self.state_dict(), self.checkpoint_path)
        self.accelerator.wait_for_everyone()

    def try_resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        changed = recipe_changes(state.get("recipe"), self.recipe)
        if changed:
            raise ValueError(f"{self.checkpoint_path} was written by a different run ({'; '.join(changed)}); "
                             "use a new output_dir, or delete the checkpoint to start over")
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        self.extra_state.update(state.get("extra", {}))
        return True

    # -- the loop ----------------------------------------------------------------------------

    def batch_indices(self, step: int) -> Tensor:
        """This process's share of step ``step``'s examples (a seeded permutation; exact on resume)."""
        g = _step_generator(self.config.seed, step, -1)
        idx = torch.randperm(len(self.data), generator=g)[: self.config.batch_size]
        n, p = self.accelerator.num_processes, self.accelerator.process_index
        return idx[p::n]

    def lr_at(self, step: int) -> float:
        if self.config.warmup_steps and step < self.config.warmup_steps:
            return self.config.lr * (step + 1) / self.config.warmup_steps
        return self.config.lr

    def fit(self, max_steps: int | None = None) -> nn.Module:
        """Train to ``config.steps`` (or stop after ``max_steps`` more steps); return the EMA model."""
        self.try_resume()
        stop = self.config.steps if max_steps is None else min(self.config.steps, self.step + max_steps)
        bar = None
        if self.config.progress and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.config.steps, initial=self.step, desc="train")
        device = self.accelerator.device
        start, running = time.perf_counter(), 0.0
        self.model.train()
        while self.step < stop:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            batch = self.data[self.batch_indices(self.step)].to(device)
            g = _step_generator(self.config.seed, self.step, self.accelerator.process_index)
            with self.accelerator.accumulate(self.model):
                loss = self.loss_fn(self.model, batch, g)
                self.accelerator.backward(loss)
                if self.config.grad_clip and self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            decay = 0.0 if self.step < self.config.ema_start else self.config.ema_decay
            self.ema.update(self.accelerator.unwrap_model(self.model), decay)
            self.step += 1
            running += float(loss.detach())
            if self.step % self.config.log_every == 0 or self.step == stop:
                n = self.config.log_every if self.step % self.config.log_every == 0 else self.step % self.config.log_every
                self.history.append({"step": self.step, "loss": running / max(n, 1),
                                     "seconds": time.perf_counter() - start})
                running = 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if self.step % self.config.checkpoint_every == 0 or self.step == stop:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.model.eval()
        return self.ema.model

    def write_history(self):
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "history.json").write_text(json.dumps(self.history, indent=1))
