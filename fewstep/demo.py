"""``fewstep demo``: the main job. Samplers and distilled students on the committed teacher, scored alike.

    fewstep demo                      # the committed Fashion-MNIST teacher: report in ./fewstep-demo/
    fewstep demo --quick              # small settings (CI): N=100, NFE 2 4
    fewstep demo --config configs/demo_long.yaml     # longer, better settings
    fewstep demo --pipeline path/to/ddpm_pipeline --reference real_images/   # your own pipeline, no students
    fewstep demo --testbed            # the exact Gaussian-mixture tables (fewstep.testbed.demo)

Every method (a registry sampler, or ``time_shift`` / ``time_shift:NAME``: model-time Time-Shift around a
sampler, default DDIM) runs at every NFE through ``fewstep.eval.sweep`` (one sweep folder per model under
``out/cells/``, written as every cell finishes, so a killed demo resumes where it stopped); every student
(each subfolder of ``students`` with a ``fewstep_student.json``, found at run time) is scored on the same
seeds with the same harness. Scores: FD in the classifier's feature space (FD-fmnist) against the committed
test-set statistics, N images from seeds ``seed .. seed + N - 1``; the floor is the FD of N real training
images against the same statistics (the finite-N bias every number carries). The report folder holds
``report.md`` (setting, tables, protocol), ``fd_table.md`` (the FD numbers only: the same seed gives the
same file), ``fd_vs_nfe.png``, ``fd_vs_cost.png`` (FD against wall-clock seconds per 1000 images: the
quality-vs-cost frontier, students as points), ``grids/`` (the first 8 images of every cell, same seeds)
and ``results.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["DEFAULT_METHODS", "DEFAULT_NFE", "QUICK", "Cell", "DemoReport", "teacher_model", "discover_students",
           "parse_method", "run_report", "fd_table", "main"]

#: The methods compared by default: baselines, then ours (HB, GHVB, Time-Shift).
DEFAULT_METHODS: tuple[str, ...] = ("ddim", "dpmpp_2m", "plms", "unipc", "hb", "ghvb", "time_shift")
DEFAULT_NFE: tuple[int, ...] = (2, 4, 8, 12)
DEFAULT_N = 1000
#: ``--quick``: what CI runs (seconds on 2 cores). Flags given explicitly win.
QUICK = {"n_samples": 100, "nfe": (2, 4)}
#: Model-time Time-Shift's window and cutoff (Li et al. 2024's setting; training-index units).
TIME_SHIFT = {"window": 30.0, "cutoff": 300.0}
#: FD-fmnist of the first N real training images against the committed test statistics, per N: the floor
#: when Fashion-MNIST is not installed (``floor_from_data`` recomputes it where it is).
FLOORS_FILE = "fd_fmnist_floors.json"
GRID_IMAGES = 8


def teacher_model(pipeline: str | None = None, time_shift: dict | None = None):
    """``(denoiser, image shape)`` of a diffusers ``DDPMPipeline`` folder (default: the committed teacher),
    optionally under model-time Time-Shift: the sweep's model factory."""
    from diffusers import DDPMPipeline

    from fewstep.distill.families import load_pipeline
    from fewstep.samplers import ModelDenoiser
    from fewstep.teachers import FMNIST

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" on every sweep
    pipe = load_pipeline(Path(pipeline or FMNIST), DDPMPipeline, "pipeline")  # a bad folder: one line
    denoiser = ModelDenoiser.from_diffusers(pipe.unet.eval().requires_grad_(False), pipe.scheduler.config)
    if time_shift:
        from fewstep.samplers.timeshift import TimeShiftDenoiser

        denoiser = TimeShiftDenoiser(denoiser, **time_shift)  # its record: one entry per batch call, small
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return denoiser, (pipe.unet.config.in_channels, *size)


def parse_method(name: str) -> tuple[str, str, bool]:
    """``(label, registry name, time-shifted)``: ``time_shift`` is DDIM under model-time Time-Shift,
    ``time_shift:NAME`` any sampler under it; anything else a registry name or alias (``ValueError``
    listing the known ones otherwise)."""
    from fewstep.samplers.registry import ALIASES, SAMPLERS, resolve_name

    base, shifted = name, False
    if name == "time_shift" or name.startswith("time_shift:"):
        base, shifted = (name.split(":", 1)[1] if ":" in name else "ddim"), True
    if base not in SAMPLERS and base not in ALIASES:
        raise ValueError(f"unknown method {name!r}; expected a sampler ({', '.join(SAMPLERS)}), an alias "
                         f"({', '.join(ALIASES)}), time_shift or time_shift:NAME")
    base = resolve_name(base)
    return (f"time_shift:{base}" if shifted and base != "ddim" else "time_shift" if shifted else base), base, shifted


def discover_students(root: str | os.PathLike) -> list[Path]:
    """Every subfolder of ``root`` holding a ``fewstep_student.json``, ordered by method, then steps."""
    from fewstep.distill.students import STUDENT_FILE

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"students folder {root} does not exist")
    found = []
    for path in sorted(p for p in root.iterdir() if (p / STUDENT_FILE).is_file()):
        record = json.loads((path / STUDENT_FILE).read_text())
        found.append((str(record.get("method", "?")), int(record.get("steps", 0)), path.name, path))
    return [p for *_, p in sorted(found)]


@dataclass
class Cell:
    """One scored point: a method at an NFE, or a student (``student`` holds its json record)."""

    label: str
    nfe: int
    fd: float | None
    sample_seconds: float | None  # sampling wall time for the cell's N images
    n: int
    student: dict | None = None
    note: str = ""
    cpu_seconds: float | None = None  # process CPU time of the same

    @property
    def seconds_per_1000(self) -> float | None:
        return None if self.sample_seconds is None or not self.n else 1000.0 * self.sample_seconds / self.n

    @property
    def cpu_seconds_per_1000(self) -> float | None:
        return None if self.cpu_seconds is None or not self.n else 1000.0 * self.cpu_seconds / self.n

    def cost(self, kind: str) -> float | None:
        return self.cpu_seconds_per_1000 if kind == "cpu" else self.seconds_per_1000


@dataclass
class DemoReport:
    cells: list[Cell]
    methods: list[str]
    nfes: list[int]
    n: int
    seed: int
    protocol: dict
    floor: float | None
    floor_source: str
    setting: str
    out: Path
    grids: dict = field(default_factory=dict)
    seconds: float = 0.0
    load: float | None = None  # the machine's 1-minute load average when the demo started
    cost: str = "wall"


# ---------------------------------------------------------------------------------------------
# Floors and students


def floors_path() -> Path:
    from fewstep.teachers import FMNIST

    return FMNIST / FLOORS_FILE


def floor_from_data(n: int, fx, reference) -> float:
    """FD of the first ``n`` Fashion-MNIST training images against ``reference`` (needs the data set)."""
    from fewstep.data import load_images
    from fewstep.eval import TensorSource, compute_stats, score, to_uint8

    images = to_uint8(load_images("fashion_mnist", "train", size=28, limit=n))
    return float(score(compute_stats(TensorSource(images, 250, f"fashion_mnist train[:{n}]"), fx), reference).fd)


def fmnist_floor(n: int, fx, reference) -> tuple[float | None, str]:
    """The floor at ``n``: the committed table, else computed from the data set, else unknown."""
    path = floors_path()
    table = json.loads(path.read_text())["floors"] if path.is_file() else {}
    if str(n) in table:
        return float(table[str(n)]), f"FD-fmnist of the first {n} real training images (committed, {path.name})"
    try:
        return floor_from_data(n, fx, reference), f"FD-fmnist of the first {n} real training images"
    except FileNotFoundError:
        return None, (f"unknown at N={n} (not in {path.name}; `apt-get install dataset-fashion-mnist` computes it)")


def _student_key(path: Path, record: dict) -> str:
    text = json.dumps(record, sort_keys=True) + "".join(
        f"{p.name}:{p.stat().st_size}" for p in sorted((path / "unet").glob("*")))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def score_students(folders: Sequence[Path], shape, fx, reference, n: int, seed: int, batch_size: int,
                   cache: Path, log) -> tuple[list[Cell], dict]:
    """Each student on seeds ``seed .. seed + n - 1`` with the sweep's harness, cached in ``cache`` (a
    json keyed by the student's record and weights, under one protocol) so a rerun scores only new ones."""
    from fewstep.distill.students import load_student
    from fewstep.eval import SamplerSource, compute_stats, score
    from fewstep.io import atomic_write_bytes

    setting = {"n": n, "seed": seed, "protocol": fx.protocol.to_dict(), "reference": reference.source}
    done = {}
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("setting") != setting:
            raise ValueError(f"{cache} holds student scores under other settings ({doc.get('setting')} != "
                             f"{setting}); choose another --out or delete that folder")
        done = doc["students"]
    cells, grids = [], {}
    for path in folders:
        sampler = load_student(path)
        record = sampler.student
        key = _student_key(path, record)
        label = path.name
        grids[(label, sampler.nfe)] = next(iter(SamplerSource(sampler, range(seed, seed + GRID_IMAGES), shape,
                                                              GRID_IMAGES))).clamp(-1, 1)
        if key in done:
            entry = done[key]
            log(f"  {label:>16} NFE {sampler.nfe:>3}: FD {entry['fd']:.2f} (already computed)")
        else:
            source = SamplerSource(sampler, range(seed, seed + n), shape, batch_size, name=label,
                                   decode=lambda x: x.clamp(-1, 1))  # as the sweep's cells (clamp=True)
            fd = float(score(compute_stats(source, fx), reference).fd)
            entry = {"label": label, "nfe": sampler.nfe, "fd": fd, "sample_seconds": source.seconds,
                     "sample_cpu_seconds": source.cpu_seconds, "record": record}
            done[key] = entry
            atomic_write_bytes(cache, json.dumps({"setting": setting, "students": done}, indent=1).encode())
            log(f"  {label:>16} NFE {sampler.nfe:>3}: FD {fd:.2f} ({source.seconds:.1f} s sampling)")
        cells.append(Cell(label, entry["nfe"], entry["fd"], entry["sample_seconds"], n, record,
                          cpu_seconds=entry.get("sample_cpu_seconds")))
    return cells, grids


# ---------------------------------------------------------------------------------------------
# The run


def run_report(out: str | os.PathLike = "fewstep-demo", methods: Sequence[str] = DEFAULT_METHODS,
               nfe: Sequence[int] = DEFAULT_NFE, n_samples: int = DEFAULT_N, seed: int = 0,
               pipeline: str | None = None, students: str | None | bool = None, reference: str | None = None,
               extractor: str | None = None, weights: str | None = None, timesteps: str | None = None,
               batch_size: int = 250, cost: str = "wall", log=None) -> DemoReport:
    """Sweep ``methods`` x ``nfe`` on the pipeline, score the students, write the report into ``out``.

    ``students``: a folder to discover students in (default: the committed ones for the committed teacher,
    none for a user's ``pipeline``); ``False`` for none. ``cost``: the frontier's x axis, ``"wall"`` (wall-clock
    seconds of sampling) or ``"cpu"`` (process CPU seconds: the same on an idle machine at one thread, and
    not inflated on a shared, busy one)."""
    if cost not in ("wall", "cpu"):
        raise ValueError(f"cost must be 'wall' or 'cpu', got {cost!r}")
    from fewstep.eval.features import FeatureExtractor
    from fewstep.eval.sweep import SweepConfig, check_out, load_stats, run_sweep
    from fewstep.teachers import FMNIST_FD_REFERENCE, FMNIST_STUDENTS

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = check_out(out)
    parsed = [parse_method(m) for m in methods]
    labels = list(dict.fromkeys(label for label, _, _ in parsed))
    _, shape = teacher_model(pipeline)
    fmnist_shaped = tuple(shape) == (1, 28, 28)
    if reference is None:
        if pipeline is not None and not fmnist_shaped:
            raise ValueError(f"a pipeline of {shape} images needs --reference (real images: a folder, a .pt "
                             "tensor or a .npz of statistics) and usually --extractor (e.g. inception-v3-compat)")
        reference = str(FMNIST_FD_REFERENCE)
    extractor = extractor or ("fmnist-classifier" if fmnist_shaped else "inception-v3-compat")
    fx = FeatureExtractor(extractor, weights=weights)
    # what the user named is checked before any sampling: the reference (its statistics are cached by content,
    # so the sweeps below reuse them) and the students folder
    ref_stats = load_stats(reference, fx, SweepConfig(reference=reference, n_reference=0, batch_size=batch_size))
    if students is None:
        students = FMNIST_STUDENTS if pipeline is None else False
    folders = discover_students(students) if students else []
    model_spec = {"kind": "factory", "target": "fewstep.demo:teacher_model",
                  "kwargs": {"pipeline": None if pipeline is None else str(pipeline)}}
    base = dict(n=n_samples, seed=seed, repeats=1, batch_size=batch_size, reference=reference, n_reference=0,
                extractor=extractor, weights=weights, timesteps=timesteps, grid_images=GRID_IMAGES, clamp=True)
    cells, grids = [], {}
    for shifted in (False, True):
        names = list(dict.fromkeys(b for _, b, s in parsed if s == shifted))
        if not names:
            continue
        spec = json.loads(json.dumps(model_spec))
        if shifted:
            spec["kwargs"]["time_shift"] = dict(TIME_SHIFT)
        folder = out / "cells" / ("time_shift" if shifted else "samplers")
        cfg = SweepConfig(samplers=names, nfe=list(nfe), model=spec, out=str(folder), **base)
        log(f"{'Time-Shift ' if shifted else ''}samplers {', '.join(names)} at NFE {', '.join(map(str, nfe))}, "
            f"N={n_samples} -> {folder}")
        runs, sweep_grids = run_sweep(cfg, fx=fx, log=log, out=folder)
        label_of = {b: label for label, b, s in parsed if s == shifted}
        for run in runs:
            if run.sampler not in label_of or run.nfe not in nfe:
                continue  # a cell an earlier demo into this folder computed and this one does not ask for
            cells.append(Cell(label_of[run.sampler], run.nfe, run.score.fd if run.score else None,
                              run.sample_seconds, n_samples, note=run.note, cpu_seconds=run.sample_cpu_seconds))
        grids.update({(label_of[k[0]], k[1]): v for k, v in sweep_grids.items() if k[0] in label_of})
    student_cells, student_grids = [], {}
    if students:
        log(f"students: {', '.join(p.name for p in folders) or 'none'} in {students}")
        student_cells, student_grids = score_students(folders, shape, fx, ref_stats, n_samples, seed, batch_size,
                                                      out / "cells" / "students.json", log)
    if extractor == "fmnist-classifier" and Path(reference) == Path(FMNIST_FD_REFERENCE):
        floor, floor_source = fmnist_floor(n_samples, fx, ref_stats)
    else:
        floor, floor_source = None, "not computed (a floor needs real images from the reference's distribution)"
    protocol = fx.protocol.replace(n=n_samples, seeds=(seed, seed + n_samples),
                                   reference=ref_stats.source or str(reference)).to_dict()
    setting = (f"pipeline {pipeline or 'teachers/fmnist (the committed Fashion-MNIST DDPM teacher)'}, "
               f"image shape {tuple(shape)}, {timesteps or 'each sampler default (trailing)'} timesteps")
    report = DemoReport(cells + student_cells, labels, sorted(set(nfe)), n_samples, seed, protocol, floor,
                        floor_source, setting, out, {**grids, **student_grids})
    report.seconds, report.load, report.cost = time.perf_counter() - t_start, load, cost
    write_report(report)
    return report


# ---------------------------------------------------------------------------------------------
# Writing it


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "-" if x is None else str(x)
    return f"{x:.{digits}f}"


def cost_text(record: dict | None) -> str:
    """A student's distillation cost from its json (``training``: updates, wall seconds, anything else)."""
    training = (record or {}).get("training") or {}
    if not training:
        return "not recorded"
    parts = []
    if "updates" in training:
        parts.append(f"{training['updates']} updates")
    if "wall_seconds" in training:
        parts.append(f"{training['wall_seconds'] / 60:.0f} min")
    parts += [f"{k} {v}" for k, v in training.items() if k not in ("updates", "wall_seconds")]
    for key in ("generator_init", "student_init"):  # a student that started from another adds that one's cost
        if (record or {}).get(key):
            parts.append(f"from {Path(record[key]).name}")
    return ", ".join(parts)


def fd_table(report: DemoReport) -> str:
    """The FD numbers as Markdown: methods x NFE, then the students. Nothing timed, so the same seed
    gives the same text."""
    cell = {(c.label, c.nfe): c for c in report.cells if c.student is None}
    lines = ["| method | " + " | ".join(f"NFE {k}" for k in report.nfes) + " |",
             "|---|" + "---:|" * len(report.nfes)]
    for label in report.methods:
        lines.append(f"| {label} | " + " | ".join(_fmt(cell[(label, k)].fd) if (label, k) in cell else "-"
                                                  for k in report.nfes) + " |")
    students = [c for c in report.cells if c.student is not None]
    if students:
        lines += ["", "| student | method | NFE | FD | distillation cost |", "|---|---|---:|---:|---|"]
        lines += [f"| {c.label} | {c.student.get('method', '?')} | {c.nfe} | {_fmt(c.fd)} | {cost_text(c.student)} |"
                  for c in students]
    floor = f"{report.floor:.2f}" if report.floor is not None else "unknown"
    lines += ["", f"FD at N={report.n} (seeds {report.seed}..{report.seed + report.n - 1}); floor {floor}: "
              f"{report.floor_source}."]
    return "\n".join(lines) + "\n"


def cost_table(report: DemoReport) -> str:
    """Seconds of sampling per 1000 images, wall clock (CPU time in brackets)."""
    cell = {(c.label, c.nfe): c for c in report.cells if c.student is None}

    def both(c: Cell) -> str:
        if c.fd is None:
            return "-"
        return f"{_fmt(c.seconds_per_1000, 1)} ({_fmt(c.cpu_seconds_per_1000, 1)})"

    lines = ["| method | " + " | ".join(f"NFE {k}" for k in report.nfes) + " |",
             "|---|" + "---:|" * len(report.nfes)]
    for label in report.methods:
        lines.append(f"| {label} | " + " | ".join(both(cell[(label, k)]) if (label, k) in cell else "-"
                                                  for k in report.nfes) + " |")
    students = [c for c in report.cells if c.student is not None]
    if students:
        lines += ["", "| student | NFE | seconds per 1000 images (CPU) |", "|---|---:|---:|"]
        lines += [f"| {c.label} | {c.nfe} | {both(c)} |" for c in students]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads")


def write_report(report: DemoReport) -> Path:
    from fewstep.io import atomic_write_bytes

    out = report.out
    table = fd_table(report)
    atomic_write_bytes(out / "fd_table.md", table.encode())
    plot_fd_vs_nfe(report, out / "fd_vs_nfe.png")
    plot_fd_vs_cost(report, out / "fd_vs_cost.png")
    grid_files = write_grids(report, out / "grids")
    doc = {"setting": report.setting, "n": report.n, "seed": report.seed, "protocol": report.protocol,
           "floor": report.floor, "floor_source": report.floor_source, "seconds": report.seconds,
           "cells": [{"label": c.label, "nfe": c.nfe, "fd": c.fd, "sample_seconds": c.sample_seconds,
                      "sample_cpu_seconds": c.cpu_seconds,
                      "seconds_per_1000_images": c.seconds_per_1000, "student": c.student, "note": c.note}
                     for c in report.cells]}
    atomic_write_bytes(out / "results.json", json.dumps(doc, indent=1).encode())
    p = report.protocol
    text = [
        "# fewstep demo report", "",
        f"Setting: {report.setting}. {len(report.methods)} methods at NFE {', '.join(map(str, report.nfes))}"
        f" and {sum(c.student is not None for c in report.cells)} distilled students, every one on the same "
        f"{report.n} seeded initial noises.", "",
        "## FD (lower is better)", "",
        table,
        "`-`: the sampler cannot spend exactly that many model calls (e.g. PLMS's improved-Euler warm-up costs 2 "
        "calls in its first step). `time_shift` is DDIM with model-time Time-Shift (window "
        f"{TIME_SHIFT['window']:g}, cutoff {TIME_SHIFT['cutoff']:g}). A student's cost is its distillation run "
        "(the chain of rounds up to it for progressive distillation), from its `fewstep_student.json`.", "",
        "![FD vs NFE](fd_vs_nfe.png) ![FD vs cost](fd_vs_cost.png)", "",
        "## Cost: seconds of sampling per 1000 images, wall clock (process CPU time)", "",
        cost_table(report),
        f"Measured on this machine ({_machine()}{_load_text(report.load)}), sampling only (feature extraction "
        "excluded); a busy machine inflates the wall clock, not the CPU time nor the FD table. The frontier plot's x "
        f"axis: {'CPU time' if report.cost == 'cpu' else 'wall clock'} (`--cost cpu` / `--cost wall`).", "",
        "## Reading the numbers", "",
        *NOTES, "",
        "## Samples (the first 8 seeds of every cell)", "",
        *[f"![{name}](grids/{name})" for name in grid_files], "",
        "## Protocol", "",
        f"- features: `{p['extractor']}` layer {p['layer']}, weights `{p['weights']}`, resize `{p['resize']}`, "
        f"quantisation `{p['quantisation']}`",
        f"- generated: N = {report.n} per cell, seeds {report.seed}..{report.seed + report.n - 1} (one initial "
        "noise per seed, the same in every cell, and per-seed noise for stochastic steps)",
        f"- reference: {p['reference']}",
        f"- floor: {_fmt(report.floor)} ({report.floor_source})",
        f"- wall time of this demo: {report.seconds:.0f} s (cells already in the folder are not recomputed)", ""]
    atomic_write_bytes(out / "report.md", "\n".join(text).encode())
    return out / "report.md"


#: What a reader needs to interpret the table (fixed text: true of the committed teacher at these NFE).
NOTES = [
    "- At NFE 2 `ddim`, `dpmpp_2m` and `unipc` coincide: a multistep method's first step is a DDIM step and its "
    "last one is first order at few steps (`lower_order_final`), so both of its steps are DDIM's.",
    "- `plms`, `hb` (heavy ball on PLMS4) and `ghvb` (order 4, beta 0.8) extrapolate the noise prediction with "
    "Adams-Bashforth weights. On the trailing grid their last step jumps from t ~ 300 straight to clean data, "
    "where the prediction changes fastest, and at NFE <= 6 the extrapolation overshoots (samples leave "
    "[-1, 1] by up to ~15x: FD in the hundreds, noise in the grids); they recover by NFE 8-12. Lower orders "
    "(`ghvb` with `momentum=1.8`) or diffusers' default `leading` spacing (`--timesteps leading`) keep them "
    "bounded; the second-order data-prediction solvers (`dpmpp_2m`, `unipc`) do not have this problem.",
    "- `time_shift` (model-time Time-Shift on DDIM) does not beat DDIM on this teacher: its exposure bias is "
    "small (README: the same at NFE 10 / 20).",
    "- Students are single points: a student with k steps spends exactly k calls of its own network; its "
    "one-off cost to make is beside it (the chain of rounds up to it, for progressive distillation)."]


def _load_text(load: float | None) -> str:
    return "" if load is None else f", load average {load:.1f} at the start"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(c: Cell) -> str:
    method = (c.student or {}).get("method", "student")
    return {"progressive": "PD", "consistency": "MCM"}.get(method, method) + f"-{c.nfe}"


def _finish(fig, ax, report: DemoReport, path: Path, xlabel: str) -> None:
    from fewstep.eval.sweep import _save_figure

    if report.floor is not None:
        ax.axhline(report.floor, color="0.5", ls="--", lw=1, label=f"floor ({report.n} real images)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"FD ({report.protocol['extractor']}, N={report.n})")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save_figure(fig, path)


def plot_fd_vs_nfe(report: DemoReport, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for label in report.methods:
        pts = sorted((c.nfe, c.fd) for c in report.cells if c.label == label and c.student is None and c.fd)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, label=label)
    students = [c for c in report.cells if c.student is not None and c.fd]
    if students:
        ax.scatter([c.nfe for c in students], [c.fd for c in students], marker="*", s=120, c="k", zorder=5,
                   label="distilled students")
        for c in students:
            ax.annotate(_short(c), (c.nfe, c.fd), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ticks = sorted({*report.nfes, *(c.nfe for c in students)})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_title("FD against model calls", fontsize=9)
    _finish(fig, ax, report, path, "NFE (model calls per image)")


def plot_fd_vs_cost(report: DemoReport, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for label in report.methods:
        pts = sorted((c.cost(report.cost), c.fd) for c in report.cells
                     if c.label == label and c.student is None and c.fd and c.cost(report.cost))
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, label=label)
    students = [c for c in report.cells if c.student is not None and c.fd and c.cost(report.cost)]
    if students:
        ax.scatter([c.cost(report.cost) for c in students], [c.fd for c in students], marker="*", s=120, c="k",
                   zorder=5, label="students (distillation cost)")
        for c in students:
            training = (c.student or {}).get("training") or {}
            cost = f" ({training['wall_seconds'] / 60:.0f} min)" if "wall_seconds" in training else ""
            ax.annotate(_short(c) + cost, (c.cost(report.cost), c.fd), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title("Quality vs sampling cost (lower left is better)", fontsize=9)
    what = "CPU seconds (1 thread)" if report.cost == "cpu" else "wall-clock seconds"
    _finish(fig, ax, report, path, f"{what} of sampling per 1000 images")


def write_grids(report: DemoReport, folder: Path) -> list[str]:
    """One titled grid per method (a row per NFE) and one of the students, the same seeds in each."""
    from fewstep.eval.sweep import plot_samples

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    groups = [(label, {k: v for k, v in report.grids.items() if k[0] == label}) for label in report.methods]
    student_labels = {c.label for c in report.cells if c.student is not None}
    groups.append(("students", {k: v for k, v in report.grids.items() if k[0] in student_labels}))
    for name, grids in groups:
        if grids:
            safe = name.replace(":", "-")
            plot_samples(dict(sorted(grids.items(), key=lambda kv: kv[0][1])) if name != "students" else grids,
                         folder / f"{safe}.png")
            names.append(f"{safe}.png")
    return names


# ---------------------------------------------------------------------------------------------
# fewstep demo


_TESTBED_ONLY = ("dim", "components")
_REPORT_ONLY = ("quick", "pipeline", "students", "no_students", "reference", "extractor", "weights", "out",
                "batch_size", "cost")


def _flags(names) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in sorted(names))


def main(testbed: bool = False, **opts) -> int:
    """Entry point of ``fewstep demo`` (called with the options given, flags or ``--config`` keys): the
    report on a pipeline, or with ``testbed`` the exact Gaussian-mixture tables."""
    if testbed:
        wrong = set(opts) & set(_REPORT_ONLY)
        if wrong:
            raise DemoError(f"--testbed does not take {_flags(wrong)}")
        from fewstep.testbed import demo as testbed_demo

        return testbed_demo.main(**opts)
    wrong = set(opts) & set(_TESTBED_ONLY)
    if wrong:
        raise DemoError(f"{_flags(wrong)} only with --testbed")
    quick = opts.pop("quick", False)
    no_students = opts.pop("no_students", False)
    if quick:
        opts.setdefault("nfe", QUICK["nfe"])
        opts.setdefault("n_samples", QUICK["n_samples"])
    if no_students:
        opts["students"] = False
    if "samplers" in opts:
        opts["methods"] = opts.pop("samplers")
    try:
        report = run_report(**opts)
    except (ValueError, FileNotFoundError) as err:
        raise DemoError(str(err)) from None
    print(fd_table(report))
    print(f"report: {(report.out / 'report.md').resolve()} ({report.seconds:.0f} s)")
    return 0


class DemoError(ValueError):
    """Bad input found once the demo runs: one line and exit status 2 (``fewstep.cli``)."""

    exit_code = 2
