"""The MR Sampler on real images: denoise Fashion-MNIST test images with a small MR model trained by
`fewstep train-mr --config configs/mr_fmnist.yaml`.

    python benchmarks/mr_restoration.py [--model teachers/mr_fmnist] [--n 256] [--grid docs/mr_restoration.png]

PSNR (dB, images in [0, 1]) against the clean images, for MRS (ODE / SDE, data / noise prediction)
and the IR-SDE reverse-SDE Euler-Maruyama baseline at several NFE, on the same degraded inputs, and the
network's one-shot data prediction at t = T (close to the posterior mean E[x0 | mu], which PSNR favours
over any sample of the posterior).
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep.data import load_images
from fewstep.distill.mr_train import degrade, load_mr_model
from fewstep.io import save_grid
from fewstep.samplers.mr import MRSampler
from fewstep.teachers import MR_FMNIST

METHODS = [
    ("MRS ODE-2, data", dict(method="ode", parameterization="data"), [5, 10, 20]),
    ("MRS ODE-2, noise", dict(method="ode", parameterization="noise"), [5, 10, 20]),
    ("MRS SDE-2, data", dict(method="sde", parameterization="data"), [5, 10, 20]),
    ("Euler-Maruyama (IR-SDE)", dict(method="euler_maruyama"), [20, 100]),
]


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (((x.clamp(-1, 1) - ref) / 2) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MR_FMNIST))
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write clean / degraded / MRS SDE-5 / MRS ODE-10 / EM-100 rows to this PNG")
    args = p.parse_args(argv)
    denoiser, info = load_mr_model(args.model)
    clean = load_images("fashion_mnist", "test", size=28, limit=args.n)
    mu = degrade(clean, info["noise_std"], torch.Generator().manual_seed(args.seed))
    print(f"{args.n} test images, Gaussian noise std {info['noise_std']} in [-1, 1]; "
          f"degraded PSNR {psnr(mu, clean):.2f} dB\n")
    print("| method | NFE | PSNR (dB) | seconds |")
    print("|---|---|---|---|")
    keep = {}
    with torch.no_grad():  # one NFE: the data prediction from x_T = mu + sigma_T eps
        t_max = denoiser.schedule.t_max
        y_T = float(denoiser.schedule.sigma(torch.tensor(t_max))) * torch.randn(
            mu.shape, generator=torch.Generator().manual_seed(args.seed))
        one_shot = denoiser(y_T, t_max, mu).x0 + mu
    print(f"| one-shot data prediction at t = T | 1 | {psnr(one_shot, clean):.2f} | - |", flush=True)
    for label, options, nfes in METHODS:
        for nfe in nfes:
            sampler = MRSampler(denoiser, steps=nfe, **options)
            start = time.perf_counter()
            out = sampler.sample(mu, generator=torch.Generator().manual_seed(args.seed))
            keep[(label, nfe)] = out
            print(f"| {label} | {sampler.nfe} | {psnr(out, clean):.2f} | {time.perf_counter() - start:.1f} |", flush=True)
    if args.grid:
        shown = [("MRS SDE-2, data", 5), ("MRS ODE-2, data", 10), ("Euler-Maruyama (IR-SDE)", 100)]
        rows = [clean[:8], mu[:8]] + [keep[key][:8] for key in shown]
        save_grid(torch.cat(rows), args.grid, nrow=8)
        print(f"\n{args.grid}: rows clean, degraded, " + ", ".join(f"{label} ({nfe} NFE)" for label, nfe in shown))


if __name__ == "__main__":
    main()
