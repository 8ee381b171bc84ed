"""``fewstep``: the one command a user types. Subcommands import their module only when they run,
so ``fewstep --help`` is instant.

    fewstep samplers                   # the sampler registry: solver, options and defaults
    fewstep demo                       # sampler comparison on the exact Gaussian-mixture testbed
    fewstep demo --nfe 4 8 --samplers ddim dpmpp_2m --config configs/demo.yaml

Adding a subcommand (``train-teacher``, ``fid``, ``sweep``, ...) is one ``COMMANDS`` entry: the module
and function that run it, a help line, and a function declaring its options. The function is
called with the options as keyword arguments (only those given on the command line or in
``--config``; it owns the defaults) and returns an exit code. A ``check`` hook turns bad input into
an argparse error (exit 2) before the job starts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable, NamedTuple, Sequence

__all__ = ["COMMANDS", "Command", "main", "build_parser", "list_samplers"]


class Command(NamedTuple):
    module: str  # imported when the command runs
    function: str  # ``function(**options) -> int``
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[dict], None] | None = None  # raises ValueError on bad options
    config: bool = False  # accepts ``--config FILE.yaml`` (keys: the options' dests)


# ---------------------------------------------------------------------------------------------
# Argument helpers (cheap: no torch here)


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nfe", nargs="+", type=_int_at_least(1, "NFE"), metavar="N",
                   help="numbers of model calls, one table column each (default: 5 10 20)")
    p.add_argument("--samplers", nargs="+", metavar="NAME",
                   help="registry names (see `fewstep samplers`; default: all of them)")
    p.add_argument("--seed", type=int, help="seed of the mixture, x_T, data and noise (default: 0)")
    p.add_argument("--dim", type=_int_at_least(1, "dim"), help="data dimension (default: 2)")
    p.add_argument("--components", type=_int_at_least(1, "components"),
                   help="mixture components (default: 8)")
    p.add_argument("--n-samples", type=_int_at_least(2, "n-samples"), help="samples per run (default: 2000)")
    p.add_argument("--timesteps", metavar="NAME",
                   help="timestep grid: trailing, leading, linspace, time_uniform, time_quadratic, log_snr, "
                        "karras (default: trailing)")


def _check_demo(opts: dict) -> None:
    """Validate demo options (also those from a config file) before the job starts."""
    from samplers.sampler import SAMPLERS
    from samplers.timesteps import make_timesteps

    nfe = opts.get("nfe", [5])
    if (not isinstance(nfe, (list, tuple)) or not nfe
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in nfe)):
        raise ValueError(f"NFE must be integers >= 1, got {nfe!r}")
    names = opts.get("samplers") or []
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SAMPLERS)}")
    if opts.get("timesteps") is not None:
        make_timesteps(opts["timesteps"])  # raises ValueError naming the known grids


#: Subcommand -> how to run it. Planned: ``train-teacher`` (distill), ``fid`` and ``sweep`` (eval).
COMMANDS: dict[str, Command] = {
    "samplers": Command("fewstep_cli", "list_samplers",
                        "list the registered samplers: solver, options with defaults, summary"),
    "demo": Command("samplers.demo", "main",
                    "compare samplers x NFE on the exact Gaussian-mixture testbed (CPU, seconds): "
                    "error to the exact PF-ODE solution and sliced W2 to data",
                    _add_demo_arguments, _check_demo, config=True),
}


# ---------------------------------------------------------------------------------------------
# fewstep samplers


def _solver_options(spec) -> tuple[str, str]:
    """``("DPMSolverPP(order=2)", "solver_type='midpoint', ...")``: the options a registry entry fixes, and
    the free ones with their defaults (the solver's ``__init__`` signature, overridden by the entry's)."""
    import inspect

    factory = spec.factory
    name = getattr(factory, "__name__", repr(factory))
    fixed = ", ".join(f"{k}={v!r}" for k, v in spec.fixed.items())
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        params = []
    defaults = {p.name: p.default for p in params
                if p.name not in spec.fixed and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    defaults.update(getattr(spec, "defaults", None) or {})  # the registry entry's own defaults win
    options = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in defaults.items())
    return (f"{name}({fixed})" if fixed else name), (options or "-")


def list_samplers() -> int:
    """Print the ``SAMPLERS`` registry as a table."""
    from samplers.sampler import SAMPLERS

    header = ("name", "solver", "kind", "options (defaults)", "summary")
    rows = []
    for name, spec in SAMPLERS.items():
        solver, options = _solver_options(spec)
        kind = "sde" if spec.make().stochastic else "ode"
        rows.append((name, solver, kind, options, spec.summary))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print("\nOptions go to the solver: Sampler(denoiser, name, steps=10, **options); "
          "kind 'sde' draws noise at every step.")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser and dispatch


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fewstep")
    except Exception:  # not installed (run from a checkout)
        return "unknown (not installed)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="fewstep",
        description="Few-step diffusion samplers, distillation and FID evaluation.",
        epilog="Run `fewstep COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"fewstep {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = {}
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, argument_default=argparse.SUPPRESS)
        if cmd.add_arguments is not None:
            cmd.add_arguments(p)
        if cmd.config:
            p.add_argument("--config", metavar="FILE.yaml",
                           help="YAML mapping of these options (dest names, e.g. n_samples); flags override it")
        subparsers[name] = p
    return parser, subparsers


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config {path}: unknown option(s) {unknown}; expected some of {sorted(known)}")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = build_parser()
    args = vars(parser.parse_args(argv))
    name = args.pop("command")
    cmd, sub = COMMANDS[name], subparsers[name]
    try:
        config = _load_config(args.pop("config"), sub) if "config" in args else {}
        opts = {**config, **args}
        if cmd.check is not None:
            cmd.check(opts)
    except ValueError as err:
        sub.error(str(err))  # exits 2 with "fewstep NAME: error: ..."
    func = getattr(importlib.import_module(cmd.module), cmd.function)
    try:
        return int(func(**opts) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
