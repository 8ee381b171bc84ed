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
exact denoiser (no network); ``{kind: factory, target: "module:function", kwargs: {...}}`` imports that
module and calls the function, which returns ``(denoiser, shape)`` -- a teacher, or a student exposed as a
denoiser. That runs code named by the config: targets in fewstep's own modules (``fewstep.*``, e.g.
``fewstep.demo:teacher_model``) are allowed, any other only with ``allow_code`` (``--allow-code``). References
(``reference``): ``"model"`` (data drawn from the testbed), an image folder (8- or 16-bit files), a ``.pt``
tensor ``[N, C, H, W]`` (uint8, or float with ``value_range`` ``"-1,1"`` / ``"0,1"`` declared), or a ``.npz``
of ``mu`` / ``sigma`` (EDM's, or ours with a stored protocol).

Outputs are written (atomically) as every cell finishes; running the same sweep into the same ``out``
again skips the cells already there, and a folder computed under other settings is refused.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fewstep.io import atomic_write_bytes, to_uint8

from .features import FeatureExtractor
from .harness import (FeatureStats, FolderSource, SamplerSource, Score, TensorSource, compute_stats,
                      reference_stats, score)
from .protocol import Protocol
from .stats import format_fd

__all__ = ["SweepConfig", "SweepRun", "run_sweep", "write_outputs", "load_model", "factory_function", "FACTORY_MODULES",
           "SweepInputError", "sweep_main", "fid_main"]


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
    value_range: str | None = None
    timesteps: str | None = None
    kid_subset_size: int | None = None
    prc_k: int | None = None
    out: str = "runs/sweep"
    cache_dir: str | None = None
    device: str = "cpu"
    grid_images: int = 8
    #: clamp samples to [-1, 1] before scoring, as diffusers' pipelines do before they return images
    #: (a network's raw output at very few steps can lie far outside; the harness refuses such floats)
    clamp: bool = False

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
    #: wall time inside the sampler alone (``SamplerSource.seconds``; None in results written before it)
    sample_seconds: float | None = None
    sample_cpu_seconds: float | None = None  # process CPU time inside the sampler (``SamplerSource.cpu_seconds``)


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


#: Modules a ``{kind: factory}`` model may name without ``allow_code`` (``--allow-code``): fewstep's own.
FACTORY_MODULES = ("fewstep",)


class SweepInputError(ValueError):
    """Bad input to ``fewstep sweep`` / ``fewstep fid``: one line on stderr and exit status 2 (``--debug``
    shows the error it came from)."""

    exit_code = 2


def factory_function(target: Any, allow_code: bool = False):
    """The function a ``{kind: factory, target: "module:function"}`` model names, imported. Importing and
    calling it runs code, so a module outside ``FACTORY_MODULES`` is refused unless ``allow_code``."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ValueError(f"model kind 'factory' needs target: 'module:function', got {target!r}")
    module, name = target.split(":")
    if not allow_code and not any(module == m or module.startswith(m + ".") for m in FACTORY_MODULES):
        raise ValueError(f"model factory {target} is outside fewstep's own modules ({', '.join(FACTORY_MODULES)}.*)"
                         " and would run its code: pass --allow-code (allow_code=True) if you trust it")
    try:
        function = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ValueError(f"cannot import the model factory's module {module!r} ({err}); check target "
                         f"{target!r} and that the module is on the Python path") from err
    except AttributeError:
        raise ValueError(f"module {module!r} has no model factory {name!r}; check target {target!r}") from None
    if not callable(function):
        raise ValueError(f"model factory {target} is not a function")
    return function


def load_model(spec, allow_code: bool = False) -> tuple[Any, tuple[int, ...], Any]:
    """``(denoiser, image shape, testbed mixture or None)`` from a config's ``model`` entry. A factory
    (``factory_function``) is called with ``kwargs`` and must return ``(denoiser, shape)``; whatever it
    raises is reported as a ``ValueError`` naming it (the original is its cause)."""
    if not isinstance(spec, (str, dict)):
        raise ValueError(f"model must be 'testbed' or a mapping with kind: testbed | factory, got {spec!r}")
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("kind", "testbed")
    if kind == "testbed":
        try:
            return _testbed(**spec)
        except TypeError as err:
            raise ValueError(f"model kind 'testbed': {err}; its keys are image_size, channels, components, seed, "
                             "spread, std") from None
    if kind == "factory":
        target, kwargs = spec.pop("target", None), spec.pop("kwargs", None) or {}
        if spec:
            raise ValueError(f"model kind 'factory' takes target and kwargs, not {sorted(spec)}")
        function = factory_function(target, allow_code)
        try:
            made = function(**kwargs)
        except Exception as err:
            raise ValueError(f"model factory {target} failed: {type(err).__name__}: {err}") from err
        try:
            denoiser, shape = made
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"model factory {target} must return (denoiser, shape), got "
                             f"{type(made).__name__}") from None
        return denoiser, shape, None
    raise ValueError(f"unknown model kind {kind!r}; expected 'testbed' or 'factory'")


def _load_images_pt(path: Path) -> torch.Tensor:
    try:
        images = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a torn or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"cannot read {path} as a torch tensor file: {type(err).__name__}: {err}") from None
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
        from fewstep.io import parse_value_range

        value_range = parse_value_range(cfg.value_range) if cfg.value_range is not None else None
        return reference_stats(TensorSource(_load_images_pt(path), cfg.batch_size, path.name, value_range), fx,
                               cfg.cache_dir, keep_features)
    if not path.exists() and path.suffix in (".npz", ".pt", ""):
        raise FileNotFoundError(f"reference {spec!r}: no such file or folder")
    raise ValueError(f"reference {spec!r}: expected 'model', an image folder, a .pt image tensor or a .npz")


# ---------------------------------------------------------------------------------------------
# The sweep

#: Settings a sweep's numbers depend on: a folder computed under other values is refused, not resumed.
RESUME_KEYS = ("model", "reference", "n", "seed", "n_reference", "extractor", "layer", "weights", "timesteps",
               "value_range", "kid_subset_size", "prc_k", "clamp")


def check_out(out: str | Path) -> Path:
    """Make ``out`` and prove it writable (a probe file), before any cell is computed."""
    import tempfile

    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe."):
            pass
    except OSError as err:
        raise ValueError(f"output folder {out} is not writable ({err.strerror or err}); choose another --out") from None
    return out


def _config_doc(cfg: SweepConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}


def _run_from_doc(r: dict) -> SweepRun:
    score_ = None
    if r.get("fd") is not None:
        extra = {"note": r["score_note"]} if r.get("score_note") else {}
        score_ = Score(r["fd"], Protocol.from_dict(r["protocol"]), r["n_reference"], r.get("kid_mean"),
                       r.get("kid_std"), r.get("precision"), r.get("recall"), extra=extra)
    return SweepRun(r["sampler"], r["nfe"], r["repeat"], r.get("steps"), score_, r.get("seconds", 0.0),
                    r.get("note", ""), r.get("sample_seconds"), r.get("sample_cpu_seconds"))


def previous_runs(out: Path, cfg: SweepConfig, protocol: Protocol) -> list[SweepRun]:
    """The scored runs already in ``out/results.json``, if it was computed under the same settings
    (``RESUME_KEYS``) and protocol (features, N, reference); ``ValueError`` naming what differs otherwise."""
    path = out / "results.json"
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        old_cfg, runs = doc["config"], [_run_from_doc(r) for r in doc["runs"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable sweep result ({err}); delete it or choose another --out") from None
    new_cfg = _config_doc(cfg)
    old_cfg = {k: old_cfg.get(k, getattr(SweepConfig, k, None)) for k in RESUME_KEYS}  # keys added later: defaults
    diff = [f"{k}: {old_cfg[k]!r} != {new_cfg.get(k)!r}" for k in RESUME_KEYS if old_cfg[k] != new_cfg.get(k)]
    scored = [r for r in runs if r.score is not None]
    if scored:
        diff += scored[0].score.protocol.replace(seeds=None).differences(
            protocol.replace(seeds=None), ("extractor", "layer", "weights", "resize", "quantisation", "n", "reference"))
    if diff:
        raise ValueError(f"{out} holds a sweep computed under another protocol ({'; '.join(diff)}); resuming would "
                         "mix numbers that cannot be compared: choose another --out or delete that folder")
    return scored


def run_sweep(cfg: SweepConfig, fx: FeatureExtractor | None = None, log=print,
              out: str | Path | None = None, allow_code: bool = False) -> tuple[list[SweepRun], dict]:
    """Run every (repeat, sampler, NFE) cell; returns the runs and ``{(sampler, nfe): first images}``.

    With ``out``: the folder is checked writable before anything is computed, cells already in it (same
    settings and protocol, ``previous_runs``) are kept and not recomputed, and the outputs are rewritten
    (atomically) after every cell, so an interrupted sweep loses at most the cell it was in. A sweep in
    which no cell could be computed raises ``ValueError`` (and writes nothing). ``allow_code``: see ``load_model``."""
    from fewstep.samplers.registry import resolve_name
    from fewstep.samplers.sampler import NFEUnreachable, Sampler

    out = check_out(out) if out is not None else None
    names = [resolve_name(n) for n in cfg.samplers]  # aliases name the same cell
    denoiser, shape, mixture = load_model(cfg.model, allow_code)  # first: a refused factory runs nothing else
    fx = fx or FeatureExtractor(cfg.extractor, cfg.layer, cfg.weights, cfg.device)
    need_features = cfg.kid_subset_size is not None or cfg.prc_k is not None
    ref = load_stats(cfg.reference, fx, cfg, mixture, shape, keep_features=need_features)
    log(f"reference: {ref.source}, N={ref.n or 'unknown'}; features: {fx.protocol.describe()}")
    expected = fx.protocol.replace(n=cfg.n, reference=ref.source or "unnamed")
    done = {(r.sampler, r.nfe, r.repeat): r for r in previous_runs(out, cfg, expected)} if out is not None else {}
    if done:
        log(f"resuming: {len(done)} cell(s) already in {out}")
    runs, grids = [], {}
    kwargs = {"timesteps": cfg.timesteps} if cfg.timesteps else {}
    cells = [(r, name, nfe) for r in range(cfg.repeats) for name in names for nfe in cfg.nfe]
    for r, name, nfe in cells:
        seeds = range(cfg.seed + r * cfg.n, cfg.seed + (r + 1) * cfg.n)
        t0 = time.perf_counter()
        try:
            sampler = Sampler.for_nfe(denoiser, name, nfe, **kwargs)  # other errors end the sweep, named
        except NFEUnreachable as err:
            runs.append(SweepRun(name, nfe, r, None, None, 0.0, str(err)))
            log(f"  {name:>12} NFE {nfe:>3}: skipped ({err})")
            continue
        if r == 0 and cfg.grid_images:  # the first images, from the same seeds in every cell
            first = SamplerSource(sampler, range(cfg.seed, cfg.seed + cfg.grid_images), shape, cfg.grid_images)
            grids[(name, nfe)] = next(iter(first)).clamp(-1, 1)
        if (name, nfe, r) in done:
            runs.append(done.pop((name, nfe, r)))
            log(f"  {name:>12} NFE {nfe:>3} repeat {r}: FD {format_fd(runs[-1].score.fd, 4)} (already computed)")
            continue
        source = SamplerSource(sampler, seeds, shape, cfg.batch_size, device=cfg.device, name=f"{name}-nfe{nfe}",
                               decode=_clamp if cfg.clamp else None)
        gen = compute_stats(source, fx, keep_features=need_features)
        s = score(gen, ref, cfg.kid_subset_size, prc_k=cfg.prc_k)
        runs.append(SweepRun(name, nfe, r, sampler.steps, s, time.perf_counter() - t0,
                             sample_seconds=source.seconds, sample_cpu_seconds=source.cpu_seconds))
        log(f"  {name:>12} NFE {nfe:>3} repeat {r}: FD {format_fd(s.fd, 4)}"
            + (f", KID {s.kid_mean:.5f}" if s.kid_mean is not None else "")
            + f" ({runs[-1].seconds:.1f} s)")
        if out is not None:
            write_outputs(cfg, runs + list(done.values()), grids, out)
    runs += list(done.values())  # cells of an earlier sweep into this folder that this one does not list
    if not any(r.score is not None for r in runs):
        notes = "; ".join(dict.fromkeys(r.note for r in runs if r.note)) or "no cells"
        raise ValueError(f"no cell of the sweep could be computed ({notes})")
    if out is not None:
        write_outputs(cfg, runs, grids, out)
    return runs, grids


def _clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1, 1)


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


CSV_FIELDS = ["sampler", "nfe", "repeat", "steps", "fd", "kid_mean", "kid_std", "precision", "recall", "n",
              "seed_start", "seed_stop", "n_reference", "extractor", "layer", "weights", "reference", "seconds",
              "note"]


def _csv_text(runs: Sequence[SweepRun]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in runs:
        s = r.score
        p = s.protocol if s else None
        w.writerow({"sampler": r.sampler, "nfe": r.nfe, "repeat": r.repeat, "steps": r.steps,
                    "fd": s and s.fd, "kid_mean": s and s.kid_mean, "kid_std": s and s.kid_std,
                    "precision": s and s.precision, "recall": s and s.recall, "n": p and p.n,
                    "seed_start": p and p.seeds[0], "seed_stop": p and p.seeds[1],
                    "n_reference": s and (s.n_reference or None), "extractor": p and p.extractor,
                    "layer": p and p.layer, "weights": p and p.weights, "reference": p and p.reference,
                    "seconds": round(r.seconds, 3), "note": r.note})
    return buf.getvalue()


def write_outputs(cfg: SweepConfig, runs: Sequence[SweepRun], grids: dict, out: str | Path | None = None) -> Path:
    """``results.json``, ``results.csv``, ``results.md``, ``fd_vs_nfe.png``, ``samples.png`` in ``out``, each
    written atomically (a reader, or a killed sweep, never sees a torn file)."""
    out = Path(out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    scored = [r for r in runs if r.score is not None]
    protocol = scored[0].score.protocol if scored else None
    for r in scored[1:]:
        r.score.protocol.check_comparable(protocol)  # one table, one protocol
    agg = aggregate(runs)
    doc = {"config": _config_doc(cfg), "protocol": protocol.to_dict() if protocol else None,
           "runs": [{"sampler": r.sampler, "nfe": r.nfe, "repeat": r.repeat, "steps": r.steps, "seconds": r.seconds,
                     "sample_seconds": r.sample_seconds,
                     "sample_cpu_seconds": r.sample_cpu_seconds, "note": r.note, **_score_doc(r.score)} for r in runs],
           "aggregate": agg}
    atomic_write_bytes(out / "results.json", json.dumps(doc, indent=2).encode())
    atomic_write_bytes(out / "results.csv", _csv_text(runs).encode())
    atomic_write_bytes(out / "results.md", markdown_table(cfg, agg, protocol).encode())
    plot_fd_vs_nfe(agg, out / "fd_vs_nfe.png", protocol)
    if grids:
        plot_samples(grids, out / "samples.png")
    return out


def _score_doc(s: Score | None) -> dict:
    if s is None:
        return {}
    d = s.to_dict()
    if "note" in d:  # the score's own note (small N) must not overwrite the run's
        d["score_note"] = d.pop("note")
    return d


def markdown_table(cfg: SweepConfig, agg: Sequence[dict], protocol) -> str:
    nfes = sorted({row["nfe"] for row in agg})
    names = list(dict.fromkeys(row["sampler"] for row in agg))
    cell = {(row["sampler"], row["nfe"]): row for row in agg}

    def fmt(row):
        if row is None or "fd_min" not in row:
            return "-"
        if row["repeats"] > 1:
            return f"{format_fd(row['fd_min'], 3)} ({format_fd(row['fd_mean'], 3)} ± {row['fd_std']:.3f})"
        return format_fd(row["fd_min"], 3)

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
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


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
    _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# CLI entry points (fewstep.cli.COMMANDS)




def _input_errors() -> tuple[type, ...]:
    """What bad input raises on its way through the harness: reported as one line, never a traceback."""
    from .features import WeightsUnavailable

    return (WeightsUnavailable, ValueError, OSError)  # ProtocolMismatch, ImageReadError are ValueErrors


def _print_notes(caught) -> None:
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)


def sweep_main(allow_code: bool = False, **opts) -> int:
    """``fewstep sweep``: run a sweep, writing its outputs as every cell finishes (and resuming from them).
    A ``{kind: factory}`` model outside fewstep's modules runs only with ``allow_code`` (``--allow-code``).
    Bad input raises ``SweepInputError`` (one line and exit status 2 from ``fewstep``)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = SweepConfig.from_options(**opts)
            runs, grids = run_sweep(cfg, log=lambda m: print(m, file=sys.stderr), out=cfg.out,
                                    allow_code=allow_code)
        except _input_errors() as err:
            _print_notes(caught)
            if isinstance(getattr(err, "exit_code", None), int):  # e.g. a full disk: its own code
                raise
            raise SweepInputError(str(err)) from err
    _print_notes(caught)
    out = Path(cfg.out).expanduser()
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.{{json,csv,md}}, fd_vs_nfe.png" + (", samples.png" if grids else ""))
    return 0


def _stats_of(path: str, fx: FeatureExtractor, batch_size: int, keep: bool, cache_dir, cache: bool,
              value_range=None) -> FeatureStats:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.suffix == ".npz":
        if keep:
            raise ValueError(f"KID / precision-recall need features; {p} holds only mu and sigma")
        return FeatureStats.load(p, fx.protocol)
    if p.is_dir():
        source = FolderSource(p, batch_size)
    elif p.suffix == ".pt":
        source = TensorSource(_load_images_pt(p), batch_size, p.name, value_range)
    else:
        raise ValueError(f"{path}: expected an image folder, a .pt image tensor or a .npz of mu/sigma")
    if cache:
        return reference_stats(source, fx, cache_dir, keep)
    return compute_stats(source, fx, keep_features=keep)


def fid_main(gen: str, ref: str, extractor: str = "inception-v3-compat", layer: str | None = None,
             weights: str | None = None, batch_size: int = 64, kid_subset_size: int | None = None,
             prc_k: int | None = None, device: str = "cpu", cache_dir: str | None = None, save: str | None = None,
             json_out: bool = False, value_range: str | None = None) -> int:
    """``fewstep fid``: FD (KID, P/R) between two image sets or statistics files; ``--save`` writes the
    generated side's statistics (``.npz`` with its protocol). Float ``.pt`` tensors need ``--range``.
    Bad input (a missing path, an unreadable image or file, a float tensor of unknown range, a device
    that is not there) raises ``SweepInputError``: one line on stderr and exit status 2 from ``fewstep``;
    cache trouble is a note, never fatal."""
    import warnings

    from fewstep.io import parse_value_range

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            vr = parse_value_range(value_range) if value_range is not None else None
            fx = FeatureExtractor(extractor, layer, weights, device)
            keep = kid_subset_size is not None or prc_k is not None
            g = _stats_of(gen, fx, batch_size, keep, cache_dir, cache=False, value_range=vr)
            r = _stats_of(ref, fx, batch_size, keep, cache_dir, cache=True, value_range=vr)
            if save:
                g.save(save)
            s = score(g, r, kid_subset_size, prc_k=prc_k)
        except _input_errors() as err:
            _print_notes(caught)
            if isinstance(getattr(err, "exit_code", None), int):  # e.g. a full disk: its own code
                raise
            raise SweepInputError(str(err)) from err
    _print_notes(caught)
    if json_out:
        print(json.dumps(s.to_dict(), indent=2))
    else:
        print(f"FD {format_fd(s.fd)}" + (f"  KID {s.kid_mean:.6f} ± {s.kid_std:.6f}" if s.kid_mean is not None else "")
              + (f"  precision {s.precision:.4f} recall {s.recall:.4f}" if s.precision is not None else ""))
        n_ref = f"N={s.n_reference}" if s.n_reference else "N unknown (statistics without a count)"
        print(f"protocol: {s.protocol.describe()} (reference {n_ref})")
        if "note" in s.extra:
            print(f"note: {s.extra['note']}")
    return 0
