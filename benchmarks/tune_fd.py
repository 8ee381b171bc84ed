"""FD-fmnist of tuned grids (``fewstep tune`` outputs) against trailing on the committed teacher, held-out seeds.

    fewstep tune --pipeline teachers/fmnist --sampler dpmpp_2m --nfe 3 4 6 --seeds 64 --val-seeds 64 \
        --ref-steps 50 --out runs/tune-dpmpp_2m        # and the same with --sampler unipc
    python benchmarks/tune_fd.py runs/tune-dpmpp_2m runs/tune-unipc [--nfe 3 4 6] [--n 1000] \
        [--seed-sets 10000 11000] [--out runs/tune_fd.json]

Each cell: the sampler of that tune folder at that NFE, on its tuned grid and on trailing, ``--n`` images from
per-image seeds ``s .. s + n - 1`` for each start ``s`` in ``--seed-sets`` (far from the fitting seeds, which
come from generator seeds 0 and 1), scored as ``fewstep demo`` scores (``SamplerSource`` with per-seed noise,
clamped to [-1, 1], the fmnist-classifier's features against ``teachers/fmnist/fd_fmnist_test.npz``).
Results go to ``--out`` as each cell finishes; a rerun skips cells already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.eval import SamplerSource, compute_stats, score
from fewstep.eval.classifier import DEFAULT_WEIGHTS
from fewstep.eval.features import FeatureExtractor
from fewstep.eval.harness import FeatureStats
from fewstep.io import atomic_write_bytes
from fewstep.samplers import ExplicitTimesteps, ModelDenoiser, Sampler
from fewstep.teachers import FMNIST, FMNIST_FD_REFERENCE
from fewstep.tune import load_tuned


def _label(settings: dict) -> str:
    """The cell name of a tune folder's grid: ``tuned`` (RMS fit) or ``tuned-<extractor>``."""
    distance = settings.get("distance", "rms")
    return "tuned" if distance == "rms" else f"tuned-{distance}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="fewstep tune output folders")
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 6])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed-sets", type=int, nargs="+", default=[10000, 11000])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="tune_fd.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(FMNIST))
    den = ModelDenoiser.from_diffusers(pipe.unet.eval(), pipe.scheduler.config)
    fx = FeatureExtractor("fmnist-classifier", weights=DEFAULT_WEIGHTS)
    reference = FeatureStats.load(FMNIST_FD_REFERENCE)
    out = Path(a.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    shape = (1, 28, 28)
    for start in a.seed_sets:  # one whole seed set first: a partial run still has every cell once
        for folder in a.folders:
            settings = json.loads((Path(folder) / "tune.json").read_text())["settings"]
            sampler, tuned = settings["sampler"], _label(settings)
            for nfe in a.nfe:
                for grid in (tuned, "trailing"):
                    key = f"{sampler}|{nfe}|{grid}|{start}|{a.n}"
                    if key in done:
                        continue
                    timesteps = ExplicitTimesteps(load_tuned(folder, nfe)) if grid == tuned else "trailing"
                    s = Sampler(den, sampler, steps=nfe, timesteps=timesteps)
                    t0 = time.perf_counter()
                    source = SamplerSource(s, range(start, start + a.n), shape, a.batch_size, name=key,
                                           decode=lambda x: x.clamp(-1, 1))
                    fd = float(score(compute_stats(source, fx), reference).fd)
                    done[key] = {"sampler": sampler, "nfe": nfe, "grid": grid, "seeds": [start, start + a.n],
                                 "fd": fd, "timesteps": s.grid.t[:-1].tolist(), "seconds": time.perf_counter() - t0}
                    atomic_write_bytes(out, (json.dumps(done, indent=1) + "\n").encode())
                    print(f"{sampler:>9} NFE {nfe} {grid:>8} seeds {start}+{a.n}: FD-fmnist {fd:.2f}", flush=True)
    print("\n| sampler | fit distance | NFE | trailing | tuned | change |")
    print("|---|---|---|---|---|---|")
    for folder in a.folders:
        settings = json.loads((Path(folder) / "tune.json").read_text())["settings"]
        sampler, tuned = settings["sampler"], _label(settings)
        for nfe in a.nfe:
            cells = {g: [done[f"{sampler}|{nfe}|{g2}|{s}|{a.n}"]["fd"] for s in a.seed_sets
                         if f"{sampler}|{nfe}|{g2}|{s}|{a.n}" in done]
                     for g, g2 in (("trailing", "trailing"), ("tuned", tuned))}
            if not all(cells.values()):
                continue
            fmt = lambda v: " / ".join(f"{x:.1f}" for x in v)  # noqa: E731
            mean = {g: sum(v) / len(v) for g, v in cells.items()}
            print(f"| {sampler} | {settings.get('distance', 'rms')} | {nfe} | {fmt(cells['trailing'])} | {fmt(cells['tuned'])} | "
                  f"{100 * (mean['tuned'] / mean['trailing'] - 1):+.0f} % |")


if __name__ == "__main__":
    main()
