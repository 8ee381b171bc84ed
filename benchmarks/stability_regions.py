"""Plot the stability regions of PLMS_r, HB and GHVB on the linear test equation and print the real
stability intervals (why momentum helps: a larger region tolerates larger h * lambda).

    python benchmarks/stability_regions.py [--out docs/stability_regions.png]
"""

from __future__ import annotations

import argparse

import numpy as np

from fewstep.testbed.stability import real_stability_interval, spectral_radius

REGIONS = {
    "PLMS4 (AB4)": dict(method="hb", order=4, beta=1.0),
    "PLMS4 + HB 0.8": dict(method="hb", order=4, beta=0.8),
    "GHVB 3.8": dict(method="ghvb", order=4, beta=0.8),
    "GHVB 3.5": dict(method="ghvb", order=4, beta=0.5),
    "PLMS2 (AB2)": dict(method="hb", order=2, beta=1.0),
    "GHVB 1.5": dict(method="ghvb", order=2, beta=0.5),
    "Euler (DDIM)": dict(method="hb", order=1, beta=1.0),
}


def plot_stability_regions(methods: dict[str, dict], path: str, re_range=(-4.0, 0.5), im_range=(-2.5, 2.5),
                           resolution: int = 241) -> str:
    """Contour plot (PNG) of ``{label: dict(method=..., order=..., beta=...)}`` stability regions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    re = np.linspace(*re_range, resolution)
    im = np.linspace(*im_range, resolution)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for k, (label, spec) in enumerate(methods.items()):
        spec = dict(spec)
        method = spec.pop("method")
        rho = np.array([[spectral_radius(method, complex(r, i), **spec) for r in re] for i in im])
        ax.contour(re, im, rho, levels=[1.0], colors=[f"C{k}"])
        ax.plot([], [], color=f"C{k}", label=label)  # contour sets carry no legend entry
    ax.axhline(0, color="0.7", lw=0.5)
    ax.axvline(0, color="0.7", lw=0.5)
    ax.set_xlabel("Re(h lambda)")
    ax.set_ylabel("Im(h lambda)")
    ax.set_title("Stability regions on d x/d sigma = lambda x (inside the curves)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/stability_regions.png")
    p.add_argument("--resolution", type=int, default=241)
    args = p.parse_args(argv)
    print("| method | real stability interval |")
    print("|---|---|")
    for label, spec in REGIONS.items():
        spec = dict(spec)
        print(f"| {label} | [{real_stability_interval(spec.pop('method'), **spec):.4f}, 0] |")
    print(plot_stability_regions(REGIONS, args.out, re_range=(-3.2, 0.4), im_range=(-2.0, 2.0),
                                 resolution=args.resolution))


if __name__ == "__main__":
    main()
