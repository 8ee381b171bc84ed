"""Score the embedded teacher in the offline Fashion-MNIST feature space (FD-fmnist, not FID).

    python benchmarks/teacher_fd.py [--pipeline teachers/fmnist] [--n 1000] [--nfe 10 20 50 100]

Reference: the 10,000 held-out test images (statistics saved to teachers/fmnist/fd_fmnist_test.npz
when --save-reference is given). Floor: FD between the two halves of the test split.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.data import load_images
from eval.classifier import DEFAULT_WEIGHTS
from eval.features import FeatureExtractor
from eval.stats import RunningStats, frechet_distance
from samplers import ModelDenoiser, Sampler


def stats_of(fx: FeatureExtractor, images: torch.Tensor, batch: int = 500) -> RunningStats:
    s = RunningStats(128)
    with torch.no_grad():
        for i in range(0, len(images), batch):
            s.update(fx(images[i:i + batch]))
    return s


def fd(a: RunningStats, b: RunningStats) -> float:
    return frechet_distance(a.mean.numpy(), a.cov.numpy(), b.mean.numpy(), b.cov.numpy())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="teachers/fmnist")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-reference", default=None)
    args = p.parse_args(argv)
    from diffusers import DDPMPipeline

    fx = FeatureExtractor("fmnist-classifier", weights=args.weights, device="cpu")
    test = load_images("fashion_mnist", "test", size=28)
    ref = stats_of(fx, test)
    half_a, half_b = stats_of(fx, test[:5000]), stats_of(fx, test[5000:])
    train_part = stats_of(fx, load_images("fashion_mnist", "train", size=28, limit=args.n))
    print(f"floor: FD(test halves, 5000 vs 5000) = {fd(half_a, half_b):.3f}; "
          f"FD({args.n} train images, test) = {fd(train_part, ref):.3f}")
    if args.save_reference:
        from eval.harness import FeatureStats

        FeatureStats(ref.mean.numpy(), ref.cov.numpy(), fx.protocol, source="fashion_mnist test 10000").save(
            args.save_reference)
    pipe = DDPMPipeline.from_pretrained(args.pipeline)
    den = ModelDenoiser.from_diffusers(pipe.unet.eval(), pipe.scheduler.config)
    shape = (args.n, 1, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    print(f"\n| sampler | " + " | ".join(f"NFE {k}" for k in args.nfe) + " |")
    print("|---|" + "---|" * len(args.nfe))
    for name in args.samplers:
        cells = []
        for nfe in args.nfe:
            start = time.perf_counter()
            x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
            with torch.no_grad():
                out = torch.cat([Sampler(den, name, steps=nfe).sample(x) for x in x_T.split(250)])
            cells.append(f"{fd(stats_of(fx, out.clamp(-1, 1)), ref):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
