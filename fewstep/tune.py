"""``fewstep tune``: fit a sampler's timestep grid at each NFE to a pipeline's own trajectories (a UNet over a
DDPM-family or a rectified-flow scheduler, e.g. ``fewstep train-teacher``'s flow teacher).

    fewstep tune --pipeline teachers/fmnist --sampler dpmpp_2m --nfe 3 4 6 --out tuned-dpmpp_2m

Writes into ``--out``:

- ``scheduler/scheduler_config.json``: a ``TunedScheduler`` (``fewstep.samplers.tune``) of the pipeline's
  noise schedule running the sampler on every fitted grid: ``DDPMPipeline.from_pretrained(pipeline,
  scheduler=TunedScheduler.from_pretrained(out, subfolder="scheduler"))`` then ``pipe(num_inference_steps=4)``;
- ``nfe_<k>.json`` per NFE, as each finishes (a rerun skips those done): the grid, the DP (GITS) grid it
  refined, and the RMS endpoint error to the teacher's reference on the fitting and on held-out seeds,
  for it and for every fixed grid, with the cost (teacher evaluations, seconds);
- ``tune.json``: the settings and all NFEs; ``cache/``: the reference trajectories (reused on resume).

Fitting seeds: ``x_T`` from ``torch.Generator().manual_seed(seed)``; held-out seeds from ``seed + 1``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .io import atomic_save, atomic_write_bytes

__all__ = ["tune", "main", "load_tuned"]

DEFAULTS = dict(sampler="dpmpp_2m", nfe=(4, 6, 8), out="fewstep-tune", seeds=64, val_seeds=256, ref_steps=100,
                seed=0, batch_size=256, distance="rms")


def _write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def _load_pipeline(path: str):
    from fewstep.distill.families import load_pipeline

    pipe = load_pipeline(path, None, "--pipeline")  # a bad folder: one line (TeacherError, exit 2)
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "scheduler", None) is None:
        raise ValueError(f"{path}: tune needs a pipeline with a unet and a DDPM-family or flow-matching scheduler, got "
                         f"{type(pipe).__name__}")
    if getattr(unet.config, "class_embed_type", None) or getattr(unet.config, "num_class_embeds", None):
        raise ValueError(f"{path}: a class-conditional UNet; tune fits unconditional DDPM pipelines so far")
    return pipe


def _reference(denoiser, x_T, steps, batch, path: Path, keep_states: bool, what: str):
    from tqdm.auto import tqdm

    from .samplers.tune import Reference, reference_trajectory

    if path.is_file():
        ref = Reference(**torch.load(path))
        if ref.x_T.shape == x_T.shape and torch.equal(ref.x_T, x_T):
            return ref, True
    n_batches = (len(x_T) + batch - 1) // batch
    with tqdm(total=n_batches * len(_times(denoiser, steps)), desc=f"reference ({what})", unit="call") as bar:
        ref = reference_trajectory(denoiser, x_T, steps=steps, batch=batch, keep_states=keep_states, progress=bar)
    atomic_save(asdict(ref), path)
    return ref, False


def _times(denoiser, steps):
    from .samplers.tune import candidate_times

    return candidate_times(denoiser.schedule, steps)


def feature_distance(extractor: str, weights: str | None = None):
    """Per-sample L2 distance between the ``extractor``'s features (``fewstep.eval.features``) of two image
    batches in [-1, 1] (clamped, as samples are scored); the target's features are computed once per tensor."""
    from .eval.features import FeatureExtractor

    if weights is None and extractor == "fmnist-classifier":
        from .eval.classifier import DEFAULT_WEIGHTS

        weights = str(DEFAULT_WEIGHTS)
    fx = FeatureExtractor(extractor, weights=weights)
    memo: dict = {}

    def features(x):
        with torch.no_grad():
            return torch.cat([fx(c.float().clamp(-1, 1)) for c in x.split(256)]).to(torch.float64)

    def distance(out, target):
        key = (target.data_ptr(), tuple(target.shape))
        if key not in memo:
            memo.clear()
            memo[key] = features(target)
        return (features(out) - memo[key]).pow(2).sum(1).sqrt()

    return distance


def tune(pipeline: str, sampler: str = "dpmpp_2m", nfe=(4, 6, 8), out: str = "fewstep-tune", seeds: int = 64,
         val_seeds: int = 256, ref_steps: int = 100, seed: int = 0, batch_size: int = 256,
         distance: str = "rms") -> dict:
    """Fit, validate and save; returns ``tune.json``'s content. ``distance``: ``"rms"`` (pixels) or a feature
    extractor's name (``fewstep fid --extractor``), the per-sample distance to the teacher's endpoint."""
    from tqdm.auto import tqdm

    from .samplers import ModelDenoiser
    from .samplers.registry import make_solver, resolve_name
    from .samplers.tune import ddim_cost_matrix, endpoint_errors, fit_timesteps, fixed_grid_times, fixed_grids, rms

    sampler = resolve_name(sampler)
    if make_solver(sampler).stochastic:
        raise ValueError(f"sampler {sampler!r} is stochastic; tune fits deterministic (ODE) samplers")
    nfe = sorted(set(int(n) for n in nfe))
    settings = dict(pipeline=str(Path(pipeline).resolve()), sampler=sampler, seeds=seeds, val_seeds=val_seeds,
                    ref_steps=ref_steps, seed=seed)
    if distance != "rms":  # (absent for the default, so folders of earlier runs resume)
        settings["distance"] = distance
    folder = Path(out)
    summary_path = folder / "tune.json"
    if summary_path.is_file():
        old = json.loads(summary_path.read_text()).get("settings", {})
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"{out} holds a tune with other settings ({', '.join(changed)}); use another --out")
    measure = rms if distance == "rms" else feature_distance(distance)  # an unknown extractor fails here
    pipe = _load_pipeline(pipeline)
    (folder / "cache").mkdir(parents=True, exist_ok=True)
    denoiser = ModelDenoiser.from_diffusers(pipe.unet.eval(), pipe.scheduler.config)
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (pipe.unet.config.in_channels, *size)
    x_fit = torch.randn((seeds, *shape), generator=torch.Generator().manual_seed(seed))
    x_val = torch.randn((val_seeds, *shape), generator=torch.Generator().manual_seed(seed + 1))

    ref, cached = _reference(denoiser, x_fit, ref_steps, batch_size, folder / "cache" / "reference_fit.pt", True,
                             "fitting seeds")
    val, val_cached = _reference(denoiser, x_val, ref_steps, batch_size, folder / "cache" / "reference_val.pt", False,
                                 "held-out seeds")
    for r, was, what in ((ref, cached, "fitting"), (val, val_cached, "held-out")):
        print(f"reference on {len(r.x_T)} {what} seeds: DPM-Solver++(2M) at {len(r.times)} steps, "
              f"{r.images} teacher evaluations, {r.seconds:.0f} s" + (" (cached)" if was else ""), flush=True)
    cost = ddim_cost_matrix(ref, denoiser.schedule)
    results = {}
    for k in nfe:
        path = folder / f"nfe_{k}.json"
        if path.is_file():
            results[k] = json.loads(path.read_text())
            print(f"NFE {k}: done before, skipped ({path})", flush=True)
            continue
        with tqdm(desc=f"{sampler} NFE {k}", unit="run") as bar:
            fit = fit_timesteps(denoiser, sampler, k, ref, batch=batch_size, cost=cost, progress=bar,
                                distance=measure)
        start = time.perf_counter()
        held = {"tuned": fit.timesteps, "gits": fit.gits_timesteps}
        fixed = fixed_grids(denoiser.schedule)
        held.update({name: fixed_grid_times(denoiser.schedule, name, fit.steps) for name in fixed})
        val_errors = {name: float(endpoint_errors(denoiser, sampler, times, val.x_T, val.end, batch_size,
                                                   measure).mean())
                      for name, times in tqdm(held.items(), desc=f"held-out NFE {k}", unit="grid")}
        record = {**asdict(fit), "val_errors": val_errors, "val_seconds": time.perf_counter() - start}
        _write_json(path, record)
        results[k] = record
        best_fixed = min(val_errors[n] for n in fixed)
        print(f"NFE {k}: {[round(t, 3) for t in fit.timesteps]}; held-out {distance} {val_errors['tuned']:.4f} "
              f"({fixed[0]} {val_errors[fixed[0]]:.4f}, best fixed {best_fixed:.4f}); {fit.evaluations} runs, "
              f"{fit.images} teacher evaluations, {fit.seconds:.0f} s", flush=True)
        _save(folder, pipe.scheduler.config, sampler, results, settings, ref, val)
    return _save(folder, pipe.scheduler.config, sampler, results, settings, ref, val)


def _save(folder: Path, scheduler_config, sampler: str, results: dict, settings: dict, ref, val) -> dict:
    from .samplers.tune import tuned_scheduler

    grids = {r["steps"]: r["timesteps"] for r in results.values()}
    if grids:
        tuned_scheduler(scheduler_config, grids, sampler=sampler).save_pretrained(str(folder / "scheduler"))
    summary = {"settings": settings,
               "cost": {"reference_teacher_evaluations": ref.images + val.images,
                        "reference_seconds": ref.seconds + val.seconds,
                        "search_teacher_evaluations": sum(r["images"] for r in results.values()),
                        "search_seconds": sum(r["seconds"] for r in results.values())},
               "nfe": {str(k): results[k] for k in sorted(results)}}
    _write_json(folder / "tune.json", summary)
    return summary


def load_tuned(folder: str, steps: int) -> list[float]:
    """The fitted timesteps of ``steps`` steps in a ``fewstep tune`` output (or its ``scheduler`` folder),
    e.g. for diffusers' ``DPMSolverMultistepScheduler.set_timesteps(timesteps=...)`` or a pipeline's
    ``timesteps=`` argument (integers on DDPM schedules)."""
    path = Path(folder)
    config = path / "scheduler_config.json"
    if not config.is_file():
        config = path / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no tuned scheduler in {folder}")
    table = json.loads(config.read_text()).get("tuned_timesteps") or {}
    if str(steps) not in table:
        raise ValueError(f"{folder} has no tuned grid of {steps} steps; it has {sorted(map(int, table))}")
    return table[str(steps)]


def _print_table(summary: dict) -> None:
    first = next(iter(summary["nfe"].values()), {"val_errors": {}})
    names = ["tuned", "gits", *[n for n in first["val_errors"] if n not in ("tuned", "gits")]]
    what = summary["settings"].get("distance", "rms")
    print(f"\nheld-out {what} distance to the teacher's reference endpoint (lower is better)")
    print("| NFE | " + " | ".join(names) + " | runs | teacher evaluations | seconds |")
    print("|---|" + "---|" * (len(names) + 3))
    for k, r in summary["nfe"].items():
        print(f"| {k} | " + " | ".join(f"{r['val_errors'][n]:.4f}" for n in names)
              + f" | {r['evaluations']} | {r['images']} | {r['seconds']:.0f} |")
    c = summary["cost"]
    print(f"cost: reference {c['reference_teacher_evaluations']} teacher evaluations, {c['reference_seconds']:.0f} s; "
          f"search {c['search_teacher_evaluations']}, {c['search_seconds']:.0f} s")


def main(pipeline: str, **options) -> int:
    """``fewstep tune``'s entry point (``fewstep.cli``)."""
    opts = {**DEFAULTS, **options}
    summary = tune(pipeline, **opts)
    _print_table(summary)
    print(f"\nsaved: {Path(opts['out']) / 'scheduler'} (TunedScheduler.from_pretrained(..., subfolder='scheduler'))")
    return 0
