"""Sweeps: samplers x NFE x seed ranges against one reference, written as tables and a plot.

    fewstep sweep --config configs/sweep_testbed.yaml       # offline demo (exact testbed, fewstep-tiny)
    fewstep fid --gen samples/ --ref stats.npz               # one FD between two image sets / statistics

Every (sampler, NFE) cell of repeat ``r`` uses the seeds ``seed + r n .. seed + (r + 1) n - 1``, so all
cells share their initial noise (common random numbers: differences between cells are the
sampler's, not the draw's) and repeats use disjoint seed ranges (EDM reports the min of three).
Outputs in ``out``: ``results.json`` (protocol, every run, aggregates), ``results.csv`` (one row per
run), ``results.md`` (FD per sampler x NFE, min / mean +- std over repeats), ``fd_vs_nfe.png`` and
``samples.png`` (the first images of each cell).

Models (``model``): ``"testbed"`` / ``{kind: testbed, ...}`` is a Gaussian mixture over images with its
exact denoiser (no network); ``{kind: factory, target: "module:function", kwargs: {...}}`` calls a
function returning ``(denoiser, shape)`` -- a teacher, or a student exposed as a denoiser. References
(``reference``): ``"model"`` (data drawn from the testbed), an image folder, a ``.pt`` uint8 tensor
``[N, C, H, W]``, or a ``.npz`` of ``mu`` / ``sigma`` (EDM's, or ours with a stored protocol).
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fewstep.io import to_uint8

from .features import FeatureExtractor
from .harness import (FeatureStats, FolderSource, SamplerSource, Score, TensorSource, compute_stats,
                      reference_stats, score)

__all__ = ["SweepConfig", "SweepRun", "run_sweep", "write_outputs", "load_model", "sweep_main", "fid_main"]


@dataclass
class SweepConfig:
    """A sweep's settings (the keys of ``configs/sweep_*.yaml`` and the flags of ``fewstep sweep``)."""

    samplers: Sequence[str] = ("ddim", "dpmpp_2m")
    nfe: Sequence[int] = (2, 4, 8)
    n: int = 256
    seed: int = 0
    repeats: int = 1
    batch_size: int = 64
    model: Any = "testbed"
    reference: Any = "model"
    n_reference: int = 1024
    extractor: str = "inception-v3-compat"
    layer: str | None = None
    weights: str | None = None
    timesteps: str | None = None
    kid_subset_size: int | None = None
    prc_k: int | None = None
    out: str = "runs/sweep"
    cache_dir: str | None = None
    device: str = "cpu"
    grid_images: int = 8

    @classmethod
    def from_options(cls, **opts) -> "SweepConfig":
        from fewstep.config import reject_unknown

        reject_unknown(opts, cls.__dataclass_fields__, "sweep option")  # the one config system's message
        return cls(**opts)


@dataclass(frozen=True)
class SweepRun:
    sampler: str
    nfe: int
    repeat: int
    steps: int | None
    score: Score | None
    seconds: float
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Models and references


def _testbed(image_size: int = 8, channels: int = 3, components: int = 4, seed: int = 0, spread: float = 0.6,
             std: float = 0.2):
    """A Gaussian mixture over ``channels x image_size^2`` images, means ``spread * tanh(N(0, 1))`` so
    images live in about ``[-1, 1]``, with its exact denoiser on diffusers' default DDPM schedule."""
    from fewstep.samplers.schedules import DiscreteVPSchedule
    from fewstep.testbed import ExactDenoiser, GaussianMixture

    shape = (channels, image_size, image_size)
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.tanh(torch.randn(components, math.prod(shape), generator=g, dtype=torch.float64))
    mixture = GaussianMixture(means, std ** 2)
    denoiser = ExactDenoiser(mixture, DiscreteVPSchedule.from_diffusers_config({}))
    return denoiser, shape, mixture


def load_model(spec) -> tuple[Any, tuple[int, ...], Any]:
    """``(denoiser, image shape, testbed mixture or None)`` from a config's ``model`` entry."""
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("kind", "testbed")
    if kind == "testbed":
        return _testbed(**spec)
    if kind == "factory":
        target = spec.pop("target", None)
        if not target or ":" not in target:
            raise ValueError("model kind 'factory' needs target: 'module:function'")
        module, name = target.split(":", 1)
        denoiser, shape = getattr(importlib.import_module(module), name)(**spec.pop("kwargs", {}))
        return denoiser, tuple(shape), None
    raise ValueError(f"unknown model kind {kind!r}; expected 'testbed' or 'factory'")


def _load_images_pt(path: Path) -> torch.Tensor:
    images = torch.load(path, weights_only=True)
    if not torch.is_tensor(images):
        raise ValueError(f"{path} must hold one image tensor [N, C, H, W]")
    return images


def load_stats(spec, fx: FeatureExtractor, cfg: SweepConfig, mixture=None, shape=None,
               keep_features=False) -> FeatureStats:
    """Reference statistics for ``spec`` (see the module docstring), cached by content."""
    if spec == "model":
        if mixture is None:
            raise ValueError("reference 'model' (data from the testbed) needs model kind 'testbed'")
        data = mixture.sample(cfg.n_reference, torch.Generator().manual_seed(10 ** 6)).float()
        images = to_uint8(data.reshape(-1, *shape))
        return reference_stats(TensorSource(images, cfg.batch_size, "testbed-data"), fx, cfg.cache_dir, keep_features)
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        return reference_stats(FolderSource(path, cfg.batch_size, limit=cfg.n_reference or None), fx, cfg.cache_dir,
                               keep_features)
    if path.suffix == ".npz":
        if keep_features:
            raise ValueError(f"KID / precision-recall need reference features; {path} holds only mu and sigma")
        return FeatureStats.load(path, fx.protocol)
    if path.suffix == ".pt":
        return reference_stats(TensorSource(_load_images_pt(path), cfg.batch_size, path.name), fx, cfg.cache_dir,
                               keep_features)
    raise ValueError(f"reference {spec!r}: expected 'model', an image folder, a .pt image tensor or a .npz")


# ---------------------------------------------------------------------------------------------
# The sweep


def run_sweep(cfg: SweepConfig, fx: FeatureExtractor | None = None, log=print) -> tuple[list[SweepRun], dict]:
    """Run every (repeat, sampler, NFE) cell; returns the runs and ``{(sampler, nfe): first images}``."""
    from fewstep.samplers.sampler import Sampler

    fx = fx or FeatureExtractor(cfg.extractor, cfg.layer, cfg.weights, cfg.device)
    denoiser, shape, mixture = load_model(cfg.model)
    need_features = cfg.kid_subset_size is not None or cfg.prc_k is not None
    ref = load_stats(cfg.reference, fx, cfg, mixture, shape, keep_features=need_features)
    log(f"reference: {ref.source} (N={ref.n}); {fx.protocol.describe()}")
    runs, grids = [], {}
    kwargs = {"timesteps": cfg.timesteps} if cfg.timesteps else {}
    for r in range(cfg.repeats):
        seeds = range(cfg.seed + r * cfg.n, cfg.seed + (r + 1) * cfg.n)
        for name in cfg.samplers:
            for nfe in cfg.nfe:
                t0 = time.perf_counter()
                try:
                    sampler = Sampler.for_nfe(denoiser, name, nfe, **kwargs)
                except ValueError as err:
                    runs.append(SweepRun(name, nfe, r, None, None, 0.0, str(err)))
                    log(f"  {name:>12} NFE {nfe:>3}: skipped ({err})")
                    continue
                source = SamplerSource(sampler, seeds, shape, cfg.batch_size, device=cfg.device,
                                       name=f"{name}-nfe{nfe}")
                if r == 0 and cfg.grid_images:  # the first images, from the same seeds in every cell
                    first = SamplerSource(sampler, range(cfg.seed, cfg.seed + cfg.grid_images), shape, cfg.grid_images)
                    grids[(name, nfe)] = next(iter(first)).clamp(-1, 1)
                gen = compute_stats(source, fx, keep_features=need_features)
                s = score(gen, ref, cfg.kid_subset_size, prc_k=cfg.prc_k)
                runs.append(SweepRun(name, nfe, r, sampler.steps, s, time.perf_counter() - t0))
                log(f"  {name:>12} NFE {nfe:>3} repeat {r}: FD {s.fd:.4f}"
                    + (f", KID {s.kid_mean:.5f}" if s.kid_mean is not None else "")
                    + f" ({runs[-1].seconds:.1f} s)")
    return runs, grids


def aggregate(runs: Sequence[SweepRun]) -> list[dict]:
    """Per (sampler, NFE): FD min / mean / std (population) over repeats, and mean KID / P / R."""
    cells: dict[tuple[str, int], list[SweepRun]] = {}
    for run in runs:
        cells.setdefault((run.sampler, run.nfe), []).append(run)
    out = []
    for (name, nfe), rs in cells.items():
        scored = [r.score for r in rs if r.score is not None]
        row = {"sampler": name, "nfe": nfe, "repeats": len(scored)}
        if scored:
            min(scored)  # raises ProtocolMismatch if repeats differ in protocol (e.g. N)
            fds = np.array([s.fd for s in scored])
            row.update(fd_min=float(fds.min()), fd_mean=float(fds.mean()), fd_std=float(fds.std()))
            for key in ("kid_mean", "precision", "recall"):
                vals = [getattr(s, key) for s in scored if getattr(s, key) is not None]
                row[key] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out


def write_outputs(cfg: SweepConfig, runs: Sequence[SweepRun], grids: dict, out: str | Path | None = None) -> Path:
    """``results.json``, ``results.csv``, ``results.md``, ``fd_vs_nfe.png``, ``samples.png`` in ``out``."""
    out = Path(out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    scored = [r for r in runs if r.score is not None]
    protocol = scored[0].score.protocol if scored else None
    for r in scored[1:]:
        r.score.protocol.check_comparable(protocol)  # one table, one protocol
    agg = aggregate(runs)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    doc = {"config": config, "protocol": protocol.to_dict() if protocol else None,
           "runs": [{"sampler": r.sampler, "nfe": r.nfe, "repeat": r.repeat, "steps": r.steps, "seconds": r.seconds,
                     "note": r.note, **(r.score.to_dict() if r.score else {})} for r in runs],
           "aggregate": agg}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    fields = ["sampler", "nfe", "repeat", "steps", "fd", "kid_mean", "kid_std", "precision", "recall", "n",
              "seed_start", "seed_stop", "n_reference", "seconds", "note"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in runs:
            s = r.score
            w.writerow({"sampler": r.sampler, "nfe": r.nfe, "repeat": r.repeat, "steps": r.steps,
                        "fd": s and s.fd, "kid_mean": s and s.kid_mean, "kid_std": s and s.kid_std,
                        "precision": s and s.precision, "recall": s and s.recall, "n": s and s.protocol.n,
                        "seed_start": s and s.protocol.seeds[0], "seed_stop": s and s.protocol.seeds[1],
                        "n_reference": s and s.n_reference, "seconds": round(r.seconds, 3), "note": r.note})
    (out / "results.md").write_text(markdown_table(cfg, agg, protocol))
    plot_fd_vs_nfe(agg, out / "fd_vs_nfe.png", protocol)
    if grids:
        plot_samples(grids, out / "samples.png")
    return out


def markdown_table(cfg: SweepConfig, agg: Sequence[dict], protocol) -> str:
    nfes = sorted({row["nfe"] for row in agg})
    names = list(dict.fromkeys(row["sampler"] for row in agg))
    cell = {(row["sampler"], row["nfe"]): row for row in agg}

    def fmt(row):
        if row is None or "fd_min" not in row:
            return "-"
        if row["repeats"] > 1:
            return f"{row['fd_min']:.3f} ({row['fd_mean']:.3f} ± {row['fd_std']:.3f})"
        return f"{row['fd_min']:.3f}"

    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt(cell.get((name, n))) for n in nfes) + " |")
    what = "FD, min (mean ± std) over repeats" if cfg.repeats > 1 else "FD"
    described = protocol.replace(seeds=None).describe() if protocol else "-"
    footer = (f"\n{what}. Protocol: {described}; {cfg.repeats} repeat(s) over disjoint seed ranges "
              f"from {cfg.seed}, the same seeds in every cell.\n")
    return "\n".join(lines) + "\n" + footer


def plot_fd_vs_nfe(agg: Sequence[dict], path: Path, protocol=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(row["sampler"] for row in agg):
        rows = sorted((r for r in agg if r["sampler"] == name and "fd_min" in r), key=lambda r: r["nfe"])
        if rows:
            x = [r["nfe"] for r in rows]
            y = [r["fd_mean"] for r in rows]
            err = [r["fd_std"] for r in rows]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD")
    if protocol is not None:
        ax.set_title(f"{protocol.extractor}[{protocol.layer}], N={protocol.n}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(grids: dict, path: Path) -> None:
    """A figure of one titled row per (sampler, NFE): its first images, side by side (a pixel grid without
    titles is ``fewstep.io.save_grid``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(grids)
    rows = []
    for key in keys:
        x = to_uint8(grids[key].float())
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        rows.append(torch.cat(list(x), dim=2).permute(1, 2, 0).numpy())
    width = max(r.shape[1] for r in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(2.0, width / 16), 0.6 * len(rows) + 0.4), squeeze=False)
    for ax, key, img in zip(axes[:, 0], keys, rows):
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{key[0]} NFE {key[1]}", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI entry points (fewstep.cli.COMMANDS)


def _fail(command: str, err: Exception) -> int:
    print(f"fewstep {command}: error: {err}", file=sys.stderr)
    return 1


def sweep_main(**opts) -> int:
    """``fewstep sweep``: run a sweep and write its outputs."""
    from .features import WeightsUnavailable

    try:
        cfg = SweepConfig.from_options(**opts)
        runs, grids = run_sweep(cfg, log=lambda m: print(m, file=sys.stderr))
    except (WeightsUnavailable, ValueError) as err:  # ProtocolMismatch is a ValueError
        return _fail("sweep", err)
    out = write_outputs(cfg, runs, grids)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.{{json,csv,md}}, fd_vs_nfe.png" + (", samples.png" if grids else ""))
    return 0


def _stats_of(path: str, fx: FeatureExtractor, batch_size: int, keep: bool, cache_dir, cache: bool) -> FeatureStats:
    p = Path(path).expanduser()
    if p.suffix == ".npz":
        if keep:
            raise ValueError(f"KID / precision-recall need features; {p} holds only mu and sigma")
        return FeatureStats.load(p, fx.protocol)
    if p.is_dir():
        source = FolderSource(p, batch_size)
    elif p.suffix == ".pt":
        source = TensorSource(_load_images_pt(p), batch_size, p.name)
    else:
        raise ValueError(f"{path}: expected an image folder, a .pt image tensor or a .npz of mu/sigma")
    if cache:
        return reference_stats(source, fx, cache_dir, keep)
    return compute_stats(source, fx, keep_features=keep)


def fid_main(gen: str, ref: str, extractor: str = "inception-v3-compat", layer: str | None = None,
             weights: str | None = None, batch_size: int = 64, kid_subset_size: int | None = None,
             prc_k: int | None = None, device: str = "cpu", cache_dir: str | None = None, save: str | None = None,
             json_out: bool = False) -> int:
    """``fewstep fid``: FD (KID, P/R) between two image sets or statistics files; ``--save`` writes the
    generated side's statistics (``.npz`` with its protocol)."""
    from .features import WeightsUnavailable

    try:
        fx = FeatureExtractor(extractor, layer, weights, device)
        keep = kid_subset_size is not None or prc_k is not None
        g = _stats_of(gen, fx, batch_size, keep, cache_dir, cache=False)
        r = _stats_of(ref, fx, batch_size, keep, cache_dir, cache=True)
        if save:
            g.save(save)
        s = score(g, r, kid_subset_size, prc_k=prc_k)
    except (WeightsUnavailable, ValueError) as err:  # ProtocolMismatch is a ValueError
        return _fail("fid", err)
    if json_out:
        print(json.dumps(s.to_dict(), indent=2))
    else:
        print(f"FD {s.fd:.6f}" + (f"  KID {s.kid_mean:.6f} ± {s.kid_std:.6f}" if s.kid_mean is not None else "")
              + (f"  precision {s.precision:.4f} recall {s.recall:.4f}" if s.precision is not None else ""))
        print(f"protocol: {s.protocol.describe()} (reference N={s.n_reference})")
        if "note" in s.extra:
            print(f"note: {s.extra['note']}")
    return 0
