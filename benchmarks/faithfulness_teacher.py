"""The reference-code options on the embedded teacher: FD-fmnist of each variant, same seeds.

    python benchmarks/faithfulness_teacher.py [--n 1000] [--only timeshift midpoint dpmpp_3m] [--results FILE]

``timeshift``: plain DDIM / PNDM against Time-Shift at window 30, cutoff 300, 10 steps, in model-time
(``TimeShiftDenoiser``) and target-time (``TimeShift``, the official PNDM/DDIM loop) mode, on our default
grid ("trailing", 999 ... 99 -> clean data), diffusers' "leading" grid (900 ... 0 -> clean data) and the
official TS-DPM grid (``--sample_speed 10``: 801, 701, ..., 1 -> t = 0, i.e. nine steps).
``midpoint``: F-PNDM under target-time shifting on the official grid, window 30, cutoff 300, with the
Runge-Kutta midpoint read at its floor as the official ``transfer`` does (``prk_midpoint="floor"``) against
fewstep's interpolated schedule (the default): the max and mean |difference| of the images (before
clamping).
``dpmpp_3m``: DPM-Solver++(3M) with our third-order weight ("taylor") against the reference code's
("reference") at NFE 4-20 on the default grid, with DPM-Solver++(2M) beside them.
Every cell is one JSON line in ``--results`` (default /tmp/faithfulness_teacher.jsonl); a rerun skips
the cells already there, so the job can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.eval.classifier import DEFAULT_WEIGHTS
from fewstep.eval.features import FeatureExtractor
from fewstep.eval.harness import FeatureStats
from fewstep.eval.stats import RunningStats, frechet_distance
from fewstep.samplers import DiffusersSpacing, ExplicitTimesteps, ModelDenoiser, Sampler
from fewstep.samplers.timeshift import TimeShift, TimeShiftDenoiser
from fewstep.teachers import FMNIST

#: TS-DPM's PNMSolver grid for ``--sample_speed 10``: ``(range(0, 1000, 100) + 1)[:-1]``, reversed.
OFFICIAL_TS_TIMES = [801, 701, 601, 501, 401, 301, 201, 101, 1]
GRIDS = {
    "trailing": dict(steps=10, timesteps=DiffusersSpacing("trailing")),
    "leading": dict(steps=10, timesteps=DiffusersSpacing("leading")),
    "official": dict(steps=9, timesteps=ExplicitTimesteps(OFFICIAL_TS_TIMES), final="t_min"),
}


def timeshift_cells(window=30.0, cutoff=300.0):
    target = dict(window=window, cutoff=cutoff)
    for grid in GRIDS:
        yield f"ts/{grid}/ddim/plain", dict(grid=grid, solver="ddim")
        yield f"ts/{grid}/ddim/target", dict(grid=grid, solver=TimeShift("ddim", **target))
        yield f"ts/{grid}/ddim/model", dict(grid=grid, solver="ddim", model_time=(window, cutoff))
    for grid in ("official",):
        yield f"ts/{grid}/pndm/plain", dict(grid=grid, solver="pndm")
        yield f"ts/{grid}/pndm/target", dict(grid=grid, solver=TimeShift("pndm", **target))
        yield f"ts/{grid}/pndm/target-stretch", dict(grid=grid, solver=TimeShift("pndm", prk="stretch", **target))
        yield f"ts/{grid}/pndm/target-floor", dict(grid=grid, solver=TimeShift("pndm", prk_midpoint="floor", **target))
        yield f"ts/{grid}/pndm/model", dict(grid=grid, solver="pndm", model_time=(window, cutoff))


def midpoint_cells(window=30.0, cutoff=300.0):
    yield "midpoint/official/pndm", dict(pair=[TimeShift("pndm", window, cutoff, prk_midpoint=rule)
                                               for rule in ("floor", "interpolate")])


def dpmpp_3m_cells(nfes=(4, 5, 6, 8, 10, 12, 15, 20)):
    for nfe in nfes:
        yield f"3m/{nfe}/dpmpp_2m", dict(nfe=nfe, solver="dpmpp_2m", options={})
        for weight in ("taylor", "reference"):
            yield f"3m/{nfe}/dpmpp_3m-{weight}", dict(nfe=nfe, solver="dpmpp_3m", options={"third_order": weight})


def accuracy_cells(nfes=(5, 6, 8, 10, 12, 15, 20)):
    for nfe in nfes:
        for weight in ("taylor", "reference"):
            yield f"acc/{nfe}/dpmpp_3m-{weight}", dict(nfe=nfe, solver="dpmpp_3m", options={"third_order": weight})


def build(den, cell):
    if "nfe" in cell:
        return Sampler.for_nfe(den, cell["solver"], cell["nfe"], **cell["options"])
    if "model_time" in cell:
        den = TimeShiftDenoiser(den, *cell["model_time"])
    return Sampler(den, cell["solver"], **GRIDS[cell["grid"]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=["timeshift", "midpoint", "dpmpp_3m", "accuracy"],
                   choices=["timeshift", "midpoint", "dpmpp_3m", "accuracy"])
    p.add_argument("--accuracy-n", type=int, default=250)
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--results", default="/tmp/faithfulness_teacher.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(FMNIST))
    den = ModelDenoiser.from_diffusers(pipe.unet.eval(), pipe.scheduler.config)
    ref = FeatureStats.load(str(FMNIST / "fd_fmnist_test.npz"))
    fx = FeatureExtractor("fmnist-classifier", weights=DEFAULT_WEIGHTS, device="cpu")
    size = pipe.unet.config.sample_size
    x_T = torch.randn((args.n, 1, size, size), generator=torch.Generator().manual_seed(args.seed))
    results = Path(args.results)
    done = set()
    if results.exists():
        done = {json.loads(line)["cell"] for line in results.read_text().splitlines() if line.strip()}
    cells = []
    if "timeshift" in args.only:
        cells += list(timeshift_cells())
    if "midpoint" in args.only:
        cells += list(midpoint_cells())
    if "dpmpp_3m" in args.only:
        cells += list(dpmpp_3m_cells())
    if "accuracy" in args.only:
        cells += list(accuracy_cells())
    reference = None
    for name, cell in cells:
        if name in done:
            continue
        start = time.perf_counter()
        if name.startswith("acc/"):
            # ODE accuracy on the real network: RMSE to a 200-step DPM-Solver++(2M) solution, same noise
            x_acc = x_T[:args.accuracy_n]
            with torch.no_grad():
                if reference is None:
                    reference = Sampler(den, "dpmpp_2m", steps=args.reference_steps).sample(x_acc)
                out = build(den, cell).sample(x_acc)
            row = {"cell": name, "rmse_to_200_step_2m": float((out - reference).pow(2).mean().sqrt()),
                   "n": args.accuracy_n, "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            continue
        if name.startswith("midpoint/"):
            with torch.no_grad():
                floor, interpolated = (Sampler(den, solver, **GRIDS["official"]).sample(x_T) for solver in cell["pair"])
            diff = (floor - interpolated).abs()
            row = {"cell": name, "max_abs_difference": float(diff.max()), "mean_abs_difference": float(diff.mean()),
                   "n": args.n, "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            continue
        sampler = build(den, cell)
        with torch.no_grad():
            images = torch.cat([sampler.sample(x) for x in x_T.split(250)]).clamp(-1, 1)
            feats = torch.cat([fx(images[i:i + 250]) for i in range(0, len(images), 250)])
        stats = RunningStats().update(feats)
        value = frechet_distance(stats.mean.numpy(), stats.cov.numpy(), ref.mu, ref.sigma)
        row = {"cell": name, "fd_fmnist": round(float(value), 3), "nfe": sampler.nfe, "n": args.n,
               "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
