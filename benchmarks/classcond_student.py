"""Score class-conditional students beside their guided teacher: FD-fmnist and class accuracy at the same NFE.

    python benchmarks/classcond_student.py STUDENT_DIR [STUDENT_DIR ...] [--per-class 100] [--seed 0]
        [--teacher teachers/fmnist_classcond] [--scale 2] [--teacher-steps 25]

Each student samples ``--per-class`` images of every class (``load_student(dir).sample(x_T, class_labels=...)``,
no guidance: a baked student's guidance is in its weights) from the noise of seed ``--seed``; the teacher is
run on the same noise with DDIM at the student's NFE and with DPM-Solver++ at ``--teacher-steps``, guided at
``--scale`` (two network calls per step). FD-fmnist is against the committed test statistics; accuracy is
the committed classifier's agreement with the intended labels.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fewstep.distill.conditioning import Bound, GuidedDenoiser
from fewstep.distill.families import load_teacher
from fewstep.distill.students import load_student
from fewstep.eval.classifier import DEFAULT_WEIGHTS, FMNISTNet, accuracy
from fewstep.samplers import ModelDenoiser, Sampler
from fewstep.teachers import FMNIST_CLASSCOND, FMNIST_FD_REFERENCE


def fd_fmnist(images: torch.Tensor, fx, reference) -> float:
    from fewstep.eval import TensorSource, compute_stats, score

    return float(score(compute_stats(TensorSource(images, 250, "samples", value_range=(-1, 1)), fx), reference).fd)


@torch.no_grad()
def teacher_samples(family, noise, labels, scale: float, solver: str, steps: int) -> torch.Tensor:
    den = ModelDenoiser(family.call(family.denoiser_network), family.schedule, family.prediction_type)
    guided = GuidedDenoiser(den, family.null(1), scale)
    out = []
    for x, y in zip(noise.split(250), labels.split(250)):
        out.append(Sampler(Bound(guided, family.encode(y.tolist())), solver, steps=steps).sample(x))
    return torch.cat(out).clamp(-1, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+")
    p.add_argument("--teacher", default=str(FMNIST_CLASSCOND))
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from fewstep.eval import FeatureExtractor
    from fewstep.eval.harness import FeatureStats

    fx, reference = FeatureExtractor("fmnist-classifier"), FeatureStats.load(FMNIST_FD_REFERENCE)
    net = FMNISTNet()
    net.load_state_dict(torch.load(DEFAULT_WEIGHTS, map_location="cpu"))
    family = load_teacher(args.teacher)
    classes = family.num_classes
    labels = torch.arange(classes).repeat_interleave(args.per_class)
    noise = torch.randn(len(labels), *family.sample_shape(), generator=torch.Generator().manual_seed(args.seed))
    print(f"{len(labels)} class-balanced samples, seed {args.seed}; FD-fmnist against {FMNIST_FD_REFERENCE.name}\n")
    print("| sampler | NFE (network calls) | FD-fmnist | classifier accuracy | seconds |")
    print("|---|---|---|---|---|")
    rows = []

    def report(name, nfe, images, seconds):
        row = {"sampler": name, "nfe": nfe, "fd_fmnist": fd_fmnist(images, fx, reference),
               "accuracy": accuracy(net, images, labels)}
        rows.append(row)
        print(f"| {name} | {nfe} | {row['fd_fmnist']:.2f} | {row['accuracy']:.3f} | {seconds:.0f} |", flush=True)

    nfes = set()
    for path in args.students:
        student = load_student(path)
        start = time.perf_counter()
        with torch.no_grad():
            images = torch.cat([student.sample(x, class_labels=y.tolist()) for x, y in
                                zip(noise.split(250), labels.split(250))]).clamp(-1, 1)
        report(f"{student.student['method']}-{student.nfe} (guidance {student.student['guidance']})",
               student.nfe, images, time.perf_counter() - start)
        nfes.add(student.nfe)
    for steps, solver in [(n, "ddim") for n in sorted(nfes)] + [(args.teacher_steps, "dpmpp_2m")]:
        start = time.perf_counter()
        images = teacher_samples(family, noise, labels, args.scale, solver, steps)
        report(f"teacher {solver}, guidance {args.scale:g}", f"{steps} ({2 * steps})", images,
               time.perf_counter() - start)
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
