"""Score the embedded teacher in the offline feature spaces (FD-fmnist and FD-effnet, never "FID").

    python benchmarks/teacher_fd.py [--pipeline teachers/fmnist] [--n 1000] [--nfe 10 20 50 100]
        [--samplers ddim dpmpp_2m] [--extractors fmnist-classifier efficientnet-lite0]
        [--samples-dir outputs/teacher_samples]

Reference: the first ``--ref-n`` held-out test images (all 10,000 by default; the FD-fmnist statistics
of all of them are saved to teachers/fmnist/fd_fmnist_test.npz with --save-reference). Floors: the FD
between the two halves of that reference, and of ``--n`` real training images against it (the
finite-N bias our generated sets also carry). With ``--samples-dir`` each sampler x NFE set of samples
is saved and reused, so a second run (another extractor, another process) does not sample again.
``--time-shift WINDOW CUTOFF`` samples through model-time Time-Shift (``TimeShiftDenoiser``) instead;
``--data-variance auto`` gives it the training images' mean per-image variance (default 0, as the
official code). ``--students DIR ...`` also scores distilled students (``fewstep distill`` exports) on the
same seeds, in a table of their own with their training cost.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep.data import load_images
from fewstep.distill.students import load_student
from fewstep.eval.classifier import DEFAULT_WEIGHTS
from fewstep.eval.features import FeatureExtractor
from fewstep.eval.stats import RunningStats, frechet_distance
from fewstep.io import atomic_save
from fewstep.samplers import ModelDenoiser, Sampler
from fewstep.teachers import FMNIST

LABELS = {"fmnist-classifier": "FD-fmnist", "efficientnet-lite0": "FD-effnet"}


def features_of(fx: FeatureExtractor, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fx(images[i:i + batch]) for i in range(0, len(images), batch)])


def stats_of(features: torch.Tensor) -> RunningStats:
    return RunningStats().update(features)


def fd(a: RunningStats, b: RunningStats) -> float:
    return frechet_distance(a.mean.numpy(), a.cov.numpy(), b.mean.numpy(), b.cov.numpy())


def teacher_samples(den, name: str, nfe: int, shape, seed: int, cache: Path | None, tag: str = "") -> torch.Tensor:
    """``shape[0]`` samples of sampler ``name`` at ``nfe`` steps from seeded noise (cached on disk)."""
    path = None if cache is None else cache / f"{name}{tag}_{nfe}_n{shape[0]}_seed{seed}.pt"
    if path is not None and path.exists():
        return torch.load(path)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = torch.cat([Sampler(den, name, steps=nfe).sample(x) for x in x_T.split(250)]).clamp(-1, 1)
    if path is not None:
        atomic_save(out, path)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=str(FMNIST))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ref-n", type=int, default=10000)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m"])
    p.add_argument("--extractors", nargs="+", default=["fmnist-classifier"], choices=sorted(LABELS))
    p.add_argument("--samples-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-shift", type=float, nargs=2, metavar=("WINDOW", "CUTOFF"), default=None)
    p.add_argument("--data-variance", default="0", help="a number, or 'auto' (training images)")
    p.add_argument("--save-reference", default=None, help="write the FD-fmnist test statistics here")
    p.add_argument("--students", nargs="*", default=[], metavar="DIR", help="student folders to score as well")
    args = p.parse_args(argv)
    from diffusers import DDPMPipeline

    test = load_images("fashion_mnist", "test", size=28, limit=args.ref_n)
    train_part = load_images("fashion_mnist", "train", size=28, limit=args.n)
    pipe = DDPMPipeline.from_pretrained(args.pipeline)
    den = ModelDenoiser.from_diffusers(pipe.unet.eval(), pipe.scheduler.config)
    shape = (args.n, 1, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    tag = ""
    if args.time_shift:
        from fewstep.samplers.timeshift import TimeShiftDenoiser

        window, cutoff = args.time_shift
        v = float(train_part.flatten(1).var(1).mean()) if args.data_variance == "auto" else float(args.data_variance)
        den = TimeShiftDenoiser(den, window=window, cutoff=cutoff, data_variance=v)
        tag = f"_ts{window:g}-{cutoff:g}-v{v:.3f}"
        print(f"model-time Time-Shift: window {window:g}, cutoff {cutoff:g}, data variance {v:.3f}")
    cache = Path(args.samples_dir) if args.samples_dir else None
    for extractor in args.extractors:
        weights = DEFAULT_WEIGHTS if extractor == "fmnist-classifier" else None
        fx = FeatureExtractor(extractor, weights=weights, device="cpu")
        label, half = LABELS[extractor], len(test) // 2
        test_features = features_of(fx, test)
        ref = stats_of(test_features)
        print(f"\n{label}: {len(test)} test images; floor: FD(test halves, {half} vs {len(test) - half}) = "
              f"{fd(stats_of(test_features[:half]), stats_of(test_features[half:])):.3f}; "
              f"FD({args.n} train images, test) = {fd(stats_of(features_of(fx, train_part)), ref):.3f}", flush=True)
        if args.save_reference and extractor == "fmnist-classifier":
            from fewstep.eval.harness import FeatureStats

            FeatureStats(ref.mean.numpy(), ref.cov.numpy(), fx.protocol,
                         source=f"fashion_mnist test {len(test)}").save(args.save_reference)
        print(f"\n| {label} | " + " | ".join(f"NFE {k}" for k in args.nfe) + " |")
        print("|---|" + "---|" * len(args.nfe))
        for name in args.samplers:
            cells = []
            for nfe in args.nfe:
                start = time.perf_counter()
                images = teacher_samples(den, name, nfe, shape, args.seed, cache, tag)
                if args.time_shift:
                    den.reset()  # the record would keep every call's times
                cells.append(f"{fd(stats_of(features_of(fx, images)), ref):.2f}")
            print(f"| {name} | " + " | ".join(cells) + f" |  ({time.perf_counter() - start:.0f} s last cell)",
                  flush=True)
        if args.students:
            print(f"\n| student | NFE | {label} | training updates | training wall time |")
            print("|---|---|---|---|---|")
        for folder in args.students:
            student = load_student(folder)
            x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
            with torch.no_grad():
                images = torch.cat([student.sample(x) for x in x_T.split(250)]).clamp(-1, 1)
            cost = student.student.get("training", {})
            print(f"| {Path(folder).name} | {student.nfe} | {fd(stats_of(features_of(fx, images)), ref):.2f} | "
                  f"{cost.get('updates', '?')} | {cost.get('wall_seconds', 0) / 60:.0f} min |", flush=True)


if __name__ == "__main__":
    main()
