"""Our FID harness against torch-fidelity's ``calculate_metrics`` on the same images, in one process.

    python benchmarks/bench_fid.py                        # Inception, N = 32 per side, CPU
    python benchmarks/bench_fid.py --n 500 --device cuda --weights /path/weights-inception-2015-12-05-6726825d.pth
    python benchmarks/bench_fid.py --extractor fewstep-tiny --n 5000

Prints feature throughput (images/s: our ``FeatureExtractor`` vs torch-fidelity's extractor called
directly, same batches) and end-to-end FD time (ours: ``compute_stats`` x 2 + ``score``; theirs:
``calculate_metrics(fid=True, cache=False)``), each as a ratio theirs / ours (> 1: we are faster), and
both FD values. Without local or cached Inception weights it saves random weights (He-normal convs)
and says so: fine for timing, meaningless as a score. Nothing is downloaded unless ``--download``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewstep.eval.features import (FeatureExtractor, ImageTensorDataset, WeightsUnavailable,
                                   inception_weights, save_random_inception_weights)
from fewstep.eval.harness import TensorSource, compute_stats, score


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="inception-v3-compat")
    p.add_argument("--n", type=int, default=32, help="images per side (default: 32)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32, CIFAR-like)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", help="local Inception weights")
    p.add_argument("--download", action="store_true", help="allow torch-fidelity's download of the weights")
    args = p.parse_args(argv)
    import torch_fidelity
    from torch_fidelity.utils import create_feature_extractor

    weights, note = args.weights, ""
    tmp = tempfile.TemporaryDirectory()
    if args.extractor == "inception-v3-compat":
        try:
            weights = str(inception_weights(args.weights, download=args.download))
        except WeightsUnavailable:
            weights = str(save_random_inception_weights(Path(tmp.name) / "random-inception.pth"))
            note = " (random He-normal weights: timing only)"
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (args.n, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    b = ((0.2 + 0.6 * torch.rand(args.n, 3, args.size, args.size, generator=g)) * 255).to(torch.uint8)
    cuda = args.device.startswith("cuda")
    print(f"{args.extractor}{note}; N = {args.n} + {args.n} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}, torch-fidelity {torch_fidelity.__version__}")

    fx = FeatureExtractor(args.extractor, weights=weights, device=args.device)
    kwargs = {"feature_extractor_weights_path": weights} if weights else {}
    theirs_fx = create_feature_extractor(args.extractor, [fx.layer], cuda=cuda, verbose=False, **kwargs)
    fx(a[:2]), theirs_fx(a[:2].to(args.device))  # warm-up

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def ours_features():
        for batch in a.split(args.batch_size):
            fx(batch)
        sync()

    def theirs_features():
        with torch.no_grad():
            for batch in a.split(args.batch_size):
                theirs_fx(batch.to(args.device))
        sync()

    _, t_of = timed(ours_features)
    _, t_tf = timed(theirs_features)
    s, t_oe = timed(lambda: score(compute_stats(TensorSource(a, args.batch_size), fx),
                                  compute_stats(TensorSource(b, args.batch_size), fx)))
    r, t_te = timed(lambda: torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(a), input2=ImageTensorDataset(b), fid=True, feature_extractor=args.extractor,
        cuda=cuda, cache=False, save_cpu_ram=True, verbose=False, batch_size=args.batch_size, **kwargs))
    fd_tf = r["frechet_inception_distance"]
    rows = [("features (images/s)", args.n / t_of, args.n / t_tf, t_tf / t_of),
            ("end-to-end FD (s)", t_oe, t_te, t_te / t_oe)]
    print(f"\n| {'measure':<22} | {'fewstep':>10} | {'torch-fidelity':>14} | {'ratio tf/ours':>13} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 16}|{'-' * 15}|")
    for name, ours, theirs, ratio in rows:
        print(f"| {name:<22} | {ours:>10.3f} | {theirs:>14.3f} | {ratio:>13.2f} |")
    rel = abs(s.fd - fd_tf) / abs(fd_tf)
    print(f"\nFD: fewstep {s.fd:.8g}, torch-fidelity {fd_tf:.8g}, relative difference {rel:.2e}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
