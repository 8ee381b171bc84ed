"""Plot the stability regions of PLMS_r, HB and GHVB on the linear test equation and print the real
stability intervals (why momentum helps: a larger region tolerates larger h * lambda).

    python benchmarks/stability_regions.py [--out docs/stability_regions.png]
"""

from __future__ import annotations

import argparse

from fewstep.samplers.momentum import plot_stability_regions, real_stability_interval

REGIONS = {
    "PLMS4 (AB4)": dict(method="hb", order=4, beta=1.0),
    "PLMS4 + HB 0.8": dict(method="hb", order=4, beta=0.8),
    "GHVB 3.8": dict(method="ghvb", order=4, beta=0.8),
    "GHVB 3.5": dict(method="ghvb", order=4, beta=0.5),
    "PLMS2 (AB2)": dict(method="hb", order=2, beta=1.0),
    "GHVB 1.5": dict(method="ghvb", order=2, beta=0.5),
    "Euler (DDIM)": dict(method="hb", order=1, beta=1.0),
}


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
