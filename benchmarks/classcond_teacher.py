"""Score the class-conditional teacher under classifier-free guidance: FD-fmnist and class accuracy.

    python benchmarks/classcond_teacher.py [--pipeline teachers/fmnist_classcond] [--scales 1 2 3]
        [--per-class 100] [--sampler dpmpp_2m] [--steps 25] [--seed 0]

``--per-class`` samples of every class (1000 in all by default) from the noise of seed ``--seed`` -- the same
noise at every scale -- guided by ``CFGDenoiser`` (Ho & Salimans 2022; scale 1 is the conditional model alone,
0 the null class alone). FD-fmnist is against the committed test statistics (teachers/fmnist/fd_fmnist_test.npz);
accuracy is the committed classifier's (teachers/fmnist/classifier.pt) agreement with the intended labels. The
row "real" is the first N training images: the finite-N floor of the FD and the classifier's accuracy on data.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fewstep.distill.teacher import class_info
from fewstep.eval.classifier import DEFAULT_WEIGHTS, FMNISTNet, accuracy
from fewstep.samplers import CFGDenoiser, ModelDenoiser, Sampler
from fewstep.samplers.denoisers import diffusers_unet_fn
from fewstep.samplers.schedules import DiscreteVPSchedule
from fewstep.teachers import FMNIST_CLASSCOND, FMNIST_FD_REFERENCE


def guided(unet, schedule, prediction_type: str, labels: torch.Tensor, null: int, scale: float):
    """The teacher at class ``labels``, guided at ``scale`` against the null class."""
    model = diffusers_unet_fn(unet)
    cond = ModelDenoiser(model, schedule, prediction_type, class_labels=labels)
    if scale == 1:  # the conditional model alone: skip the null-class call
        return cond
    uncond = ModelDenoiser(model, schedule, prediction_type, class_labels=torch.full_like(labels, null))
    return CFGDenoiser(cond, uncond, scale)


@torch.no_grad()
def class_samples(unet, scheduler_config, info: dict, per_class: int, scale: float, sampler: str, steps: int,
                  seed: int):
    """``(images in [-1, 1], labels, network calls per sample)``: ``per_class`` samples of each class of
    ``info`` (the teacher's ``fewstep_teacher.json``), one class per batch."""
    classes, null = len(info["class_names"]), info["null_class_label"]
    schedule = DiscreteVPSchedule.from_diffusers_config(scheduler_config)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    size = unet.config.sample_size
    noise = torch.randn(classes * per_class, unet.config.in_channels, size, size,
                        generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(classes).repeat_interleave(per_class)
    samplers = [Sampler(guided(unet, schedule, prediction_type, y, null, scale), sampler, steps=steps)
                for y in labels.split(per_class)]
    images = torch.cat([s.sample(x) for s, x in zip(samplers, noise.split(per_class))]).clamp(-1, 1)
    return images, labels, samplers[0].nfe * (1 if scale == 1 else 2)


def fd_fmnist(images: torch.Tensor, fx, reference) -> float:
    from fewstep.eval import TensorSource, compute_stats, score

    return float(score(compute_stats(TensorSource(images, 250, "samples", value_range=(-1, 1)), fx), reference).fd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=str(FMNIST_CLASSCOND))
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from diffusers import DDPMPipeline

    from fewstep.data import load_fashion_mnist, preprocess
    from fewstep.demo import fmnist_floor
    from fewstep.eval import FeatureExtractor
    from fewstep.eval.harness import FeatureStats

    info = class_info(args.pipeline)
    if not info:
        raise SystemExit(f"{args.pipeline} has no fewstep_teacher.json: not a class-conditional teacher")
    pipe = DDPMPipeline.from_pretrained(args.pipeline)
    unet = pipe.unet.eval()
    fx, reference = FeatureExtractor("fmnist-classifier"), FeatureStats.load(FMNIST_FD_REFERENCE)
    net = FMNISTNet()
    net.load_state_dict(torch.load(DEFAULT_WEIGHTS, map_location="cpu"))
    n = len(info["class_names"]) * args.per_class
    floor, _ = fmnist_floor(n, fx, reference)
    real_x, real_y = load_fashion_mnist("train", labels=True)
    print(f"{args.pipeline}: {n} class-balanced samples ({args.per_class} per class), {args.sampler}, "
          f"{args.steps} steps, seed {args.seed}; FD-fmnist against {FMNIST_FD_REFERENCE.name}\n")
    print("| guidance scale | FD-fmnist | classifier accuracy | network calls per sample | seconds |")
    print("|---|---|---|---|---|")
    print(f"| real (first {n} train images) | {floor:.2f} | {accuracy(net, preprocess(real_x[:n]), real_y[:n]):.3f} "
          "| - | - |", flush=True)
    rows = []
    for scale in args.scales:
        start = time.perf_counter()
        images, labels, calls = class_samples(unet, pipe.scheduler.config, info, args.per_class, scale, args.sampler,
                                       args.steps, args.seed)
        row = {"scale": scale, "fd_fmnist": fd_fmnist(images, fx, reference), "accuracy": accuracy(net, images, labels)}
        print(f"| {scale:g} | {row['fd_fmnist']:.2f} | {row['accuracy']:.3f} | {calls} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
        rows.append(row)
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
