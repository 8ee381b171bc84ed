"""``fewstep``: the one command a user types. Subcommands import their module only when they run,
so ``fewstep --help`` is instant.

    fewstep samplers                   # the sampler registry: solver, options and defaults
    fewstep demo                       # samplers and students on the committed teacher: a report folder
    fewstep demo --quick --nfe 4 8 --samplers ddim dpmpp_2m --config configs/demo.yaml
    fewstep demo --testbed             # sampler comparison on the exact Gaussian-mixture testbed
    fewstep train-teacher --config configs/teacher_fmnist.yaml train.lr=1e-4 model.layers_per_block=2

Adding a subcommand is one ``COMMANDS`` entry: the module and function that run it, a help line, and
either a function declaring its flags or (a training job) a ``fewstep.config`` dataclass.

- Flag commands (``demo``, ``fid``, ``sweep``, ``grid``, ``tune``): the function is called with the options
  as keyword arguments (only those given on the command line or in ``--config``; it owns the defaults).
  A ``check`` hook turns bad input into a usage error (exit 2) before the job starts.
- Config commands (``train-teacher``, ``train-mr``, ``distill``, ``train-classifier``): ``--config FILE.yaml``
  and ``KEY=VALUE`` overrides go through ``fewstep.config.load``; the function gets the typed dataclass
  first, then any extra flags. ``--help`` lists every key with its default.

Either way it returns an exit code. Every error a user can cause is one line on stderr,
``fewstep NAME: error: ...``, never a traceback (``--debug`` shows it): a bad flag, option or config value
(exit 2, before the job starts); an exception that carries an ``exit_code`` -- the training core's refusals
(a checkpoint of another recipe or past ``steps``; a folder in use; a non-finite loss; exit 2, like a config
error), an unreadable teacher (2), an unwritable folder or a full disk (1), and an interrupted run (130 after
SIGINT, 143 after SIGTERM: saved, and rerunning the same command resumes); and the exceptions a command
lists as ``user_errors`` (a bad teacher, data set or file: 2).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable, NamedTuple, Sequence

from fewstep import config as cfg

__all__ = ["COMMANDS", "Command", "main", "build_parser", "list_samplers"]


class Command(NamedTuple):
    module: str  # imported when the command runs
    function: str  # ``function(**options) -> int``
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[dict], None] | None = None  # raises ValueError on bad options
    config: bool = False  # accepts ``--config FILE.yaml`` (keys: the options' dests)
    settings: type | None = None  # a fewstep.config dataclass: ``--config FILE.yaml`` + ``KEY=VALUE``
    #: exceptions that, out of this command, are the user's to fix (a config, a teacher, data): one line, exit 2
    user_errors: tuple[type, ...] = ()
    epilog: str | None = None  # ``--help``'s last words (a config command's: its keys)


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


def _value_range(text: str) -> str:
    """``--range``: ``-1,1`` or ``0,1`` (checked here, parsed by ``fewstep.io.parse_value_range``)."""
    key = str(text).replace(" ", "").strip("[]()")
    if key not in ("-1,1", "0,1"):
        raise argparse.ArgumentTypeError(f"range must be -1,1 or 0,1, got {text!r}")
    return key


_value_range.__name__ = "range"


def _check_samplers(names) -> None:
    """Registry names or aliases (``registry.resolve_name``), or a ``ValueError`` listing the known ones."""
    from fewstep.samplers.registry import ALIASES, SAMPLERS

    unknown = [n for n in names if n not in SAMPLERS and n not in ALIASES]
    if unknown:
        raise ValueError(f"unknown sampler(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SAMPLERS)} "
                         f"(aliases: {', '.join(ALIASES)})")


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small settings for a first look or CI: 100 images per cell at NFE 2 and 4 (flags win)")
    p.add_argument("--nfe", nargs="+", type=_int_at_least(1, "NFE"), metavar="N",
                   help="numbers of model calls, one table column each (default: 2 4 8 12; --testbed: 5 10 20)")
    p.add_argument("--samplers", nargs="+", metavar="NAME",
                   help="methods: registry names (`fewstep samplers`), time_shift (DDIM with Time-Shift) or "
                        "time_shift:NAME (default: ddim dpmpp_2m plms unipc hb ghvb time_shift)")
    p.add_argument("--n-samples", type=_int_at_least(2, "n-samples"),
                   help="samples per cell: images scored (default: 1000), --testbed: points (default: 2000)")
    p.add_argument("--seed", type=int, help="first seed of the initial noise (default: 0)")
    p.add_argument("--timesteps", metavar="NAME",
                   help="timestep grid: trailing, leading, linspace, time_uniform, time_quadratic, log_snr, "
                        "karras (default: each sampler's, trailing)")
    p.add_argument("--out", metavar="DIR", help="report folder; rerunning into it resumes (default: fewstep-demo)")
    p.add_argument("--pipeline", metavar="DIR",
                   help="a diffusers DDPMPipeline folder of your own (default: the committed teacher); no students")
    p.add_argument("--students", metavar="DIR",
                   help="folder whose subfolders with a fewstep_student.json are scored too (default: the "
                        "committed students of the committed teacher)")
    p.add_argument("--no-students", action="store_true", help="score no students")
    p.add_argument("--reference", metavar="PATH",
                   help="reference: image folder, .pt tensor or .npz statistics (default: the committed "
                        "Fashion-MNIST test statistics, FD-fmnist)")
    p.add_argument("--extractor", metavar="NAME",
                   help="feature extractor (default: fmnist-classifier for 1x28x28 images, else inception-v3-compat)")
    p.add_argument("--weights", metavar="FILE", help="local extractor weights (Inception: see `fewstep fid --help`)")
    p.add_argument("--batch-size", type=_int_at_least(1, "batch-size"), help="images per batch (default: 250)")
    p.add_argument("--cost", choices=("wall", "cpu"),
                   help="the frontier plot's x axis: wall-clock (default) or CPU seconds of sampling (on a busy "
                        "shared machine, CPU time at one thread is what an idle core would take)")
    p.add_argument("--testbed", action="store_true",
                   help="instead: the exact Gaussian-mixture testbed tables (RMSE to the exact ODE, sliced W2)")
    p.add_argument("--dim", type=_int_at_least(1, "dim"), help="--testbed: data dimension (default: 2)")
    p.add_argument("--components", type=_int_at_least(1, "components"),
                   help="--testbed: mixture components (default: 8)")


def _check_demo(opts: dict) -> None:
    """Validate demo options (also those from a config file) before the job starts."""
    from fewstep.samplers.timesteps import make_timesteps

    nfe = opts.get("nfe", [5])
    if (not isinstance(nfe, (list, tuple)) or not nfe
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in nfe)):
        raise ValueError(f"NFE must be integers >= 1, got {nfe!r}")
    names = opts.get("samplers") or []
    if opts.get("testbed"):
        _check_samplers(names)
    else:
        from fewstep.demo import parse_method

        for name in names:
            parse_method(name)
    if opts.get("timesteps") is not None:
        make_timesteps(opts["timesteps"])  # raises ValueError naming the known grids


def _add_fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen", required=True, metavar="PATH",
                   help="generated images: a folder (8- or 16-bit PNG/JPEG...), a .pt tensor [N, C, H, W] (uint8; "
                        "float needs --range), or a .npz of mu/sigma")
    p.add_argument("--ref", required=True, metavar="PATH",
                   help="reference: the same kinds, or a .npz (EDM's fid-refs, or saved by --save); "
                        "image references are cached by content")
    _add_extractor_arguments(p)
    p.add_argument("--save", metavar="FILE.npz", help="write the generated side's statistics (with their protocol)")
    p.add_argument("--json", dest="json_out", action="store_true", help="print the score and protocol as JSON")


def _add_extractor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", metavar="NAME",
                   help="feature extractor: inception-v3-compat (default), any torch-fidelity name, or fewstep-tiny")
    p.add_argument("--layer", metavar="NAME",
                   help="extractor feature (default: the one it uses for FID, 2048 for Inception)")
    p.add_argument("--weights", metavar="FILE",
                   help="local extractor weights (Inception: else $FEWSTEP_INCEPTION_WEIGHTS, else torch hub's cache "
                        "or download)")
    p.add_argument("--range", dest="value_range", type=_value_range, metavar="-1,1|0,1",
                   help="value range of float .pt image tensors: -1,1 (diffusion outputs) or 0,1 (torchvision "
                        "ToTensor); floats outside it are refused, floats without it too (uint8 needs none)")
    p.add_argument("--batch-size", type=_int_at_least(1, "batch-size"), help="images per batch (default: 64)")
    p.add_argument("--kid-subset-size", type=_int_at_least(2, "kid-subset-size"),
                   help="also compute KID with subsets of this size (needs that many images on both sides)")
    p.add_argument("--prc-k", type=_int_at_least(1, "prc-k"), help="also compute precision/recall with k-NN balls")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--cache-dir", metavar="DIR", help="reference statistics cache (default: $FEWSTEP_CACHE/fid-refs)")


def _add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samplers", nargs="+", metavar="NAME", help="registry names (default: ddim dpmpp_2m)")
    p.add_argument("--nfe", nargs="+", type=_int_at_least(1, "NFE"), metavar="N", help="NFE values (default: 2 4 8)")
    p.add_argument("--n", type=_int_at_least(2, "n"), help="generated images per cell (default: 256)")
    p.add_argument("--seed", type=int, help="first seed; repeat r uses seeds seed + r*n ... (default: 0)")
    p.add_argument("--repeats", type=_int_at_least(1, "repeats"), help="disjoint seed ranges per cell (default: 1)")
    p.add_argument("--model", help="'testbed' (exact Gaussian mixture over images); in --config also a mapping: "
                                   "{kind: testbed, image_size: 8, ...} or {kind: factory, target: "
                                   "'module:function', kwargs: {...}} (runs that code: see below)")
    p.add_argument("--reference", help="'model' (testbed data), an image folder, a .pt image tensor or a .npz")
    p.add_argument("--n-reference", type=_int_at_least(2, "n-reference"), help="reference images (default: 1024)")
    p.add_argument("--timesteps", metavar="NAME", help="timestep grid (default: the sampler's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/sweep)")
    p.add_argument("--allow-code", action="store_true",
                   help="let a config's model {kind: factory, target: 'module:function'} import and run a "
                        "function outside fewstep's own modules (fewstep.*); without it such a target is refused")
    _add_extractor_arguments(p)


#: ``fewstep sweep --help``'s epilog: a config can name code to run (``fewstep.eval.sweep.load_model``).
_SWEEP_EPILOG = ("A config's model: {kind: factory, target: 'module:function', kwargs: {...}} imports that module "
                 "and calls the function (it returns (denoiser, shape)): it runs code. Targets in fewstep's own "
                 "modules (fewstep.*, e.g. fewstep.demo:teacher_model) are allowed; any other needs --allow-code. "
                 "Run only configs you trust.")


def _check_sweep(opts: dict) -> None:
    """Validate sweep options (also those from a config file) before the job starts."""
    from fewstep.samplers.timesteps import make_timesteps

    _check_samplers(opts.get("samplers") or [])
    if opts.get("timesteps") is not None:
        make_timesteps(opts["timesteps"])  # a misspelt grid is a usage error, not a sweep of skipped cells
    nfe = opts.get("nfe", [1])
    if (not isinstance(nfe, (list, tuple)) or not nfe
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in nfe)):
        raise ValueError(f"NFE must be integers >= 1, got {nfe!r}")
    for key in ("n", "repeats", "n_reference", "batch_size"):
        value = opts.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if opts.get("kid_subset_size") is not None and opts["kid_subset_size"] > opts.get("n", 256):
        raise ValueError(f"kid_subset_size {opts['kid_subset_size']} exceeds n={opts.get('n', 256)} generated images")


def _add_max_steps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=_int_at_least(1, "--max-steps"), default=None,
                   help="stop after this many more steps; run again to resume")


def _add_train_teacher_arguments(p: argparse.ArgumentParser) -> None:
    _add_max_steps(p)
    p.add_argument("--output-dir", default=None, help="override train.output_dir")


def _check_grid(opts: dict) -> None:
    """Validate grid options before any model is loaded: the sampler, and an image file we can write."""
    from pathlib import Path

    _check_samplers([opts.get("sampler", "dpmpp_2m")])
    out = Path(opts.get("out", "samples.png")).expanduser()
    _check_image_suffix(out)
    folder = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write --out {out}: {folder} is not a writable folder")


def _check_image_suffix(out) -> None:
    from PIL import Image

    Image.init()
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: unknown image file extension {out.suffix!r}; use .png (or .jpg, .webp)")


def _add_grid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True, metavar="DIR", help="a diffusers DDPMPipeline (or DDIMPipeline) folder")
    p.add_argument("--sampler", metavar="NAME", help="registry name (default: dpmpp_2m)")
    p.add_argument("--steps", type=_int_at_least(1, "steps"), help="sampler steps (default: 20)")
    p.add_argument("--n", type=_int_at_least(1, "n"), help="images, 8 per row (default: 64)")
    p.add_argument("--seed", type=int, help="seed of x_T and the noise (default: 0)")
    p.add_argument("--out", metavar="FILE.png",
                   help="image file, its format from the extension; its folder is made (default: samples.png)")


def _add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", metavar="DIR", help="a diffusers DDPMPipeline folder (the teacher); required")
    p.add_argument("--sampler", metavar="NAME", help="deterministic registry sampler to fit (default: dpmpp_2m)")
    p.add_argument("--nfe", nargs="+", type=_int_at_least(1, "NFE"), metavar="N", help="NFE values (default: 4 6 8)")
    p.add_argument("--out", metavar="DIR", help="output folder; rerunning into it resumes (default: fewstep-tune)")
    p.add_argument("--seeds", type=_int_at_least(2, "seeds"), help="fitting seeds (default: 64)")
    p.add_argument("--val-seeds", type=_int_at_least(2, "val-seeds"), help="held-out seeds (default: 256)")
    p.add_argument("--ref-steps", type=_int_at_least(10, "ref-steps"),
                   help="steps of the teacher's DPM-Solver++(2M) reference (default: 100)")
    p.add_argument("--seed", type=int, help="fitting noise seed; held-out noise uses seed + 1 (default: 0)")
    p.add_argument("--batch-size", type=_int_at_least(1, "batch-size"), help="images per model call (default: 256)")
    p.add_argument("--distance", metavar="NAME",
                   help="per-sample distance to the teacher's endpoint: rms (pixels, default) or a feature "
                        "extractor (fmnist-classifier, ...: `fewstep fid --extractor`)")


def _check_tune(opts: dict) -> None:
    from fewstep.samplers.registry import make_solver

    if not opts.get("pipeline"):
        raise ValueError("the teacher is required: --pipeline DIR (or pipeline: in --config)")
    _check_samplers([opts.get("sampler", "dpmpp_2m")])
    if make_solver(opts.get("sampler", "dpmpp_2m")).stochastic:
        raise ValueError(f"sampler {opts['sampler']!r} is stochastic; tune fits deterministic (ODE) samplers")


#: Subcommand -> how to run it.
COMMANDS: dict[str, Command] = {
    "samplers": Command("fewstep.cli", "list_samplers",
                        "list the registered samplers: solver, options with defaults, summary"),
    "demo": Command("fewstep.demo", "main",
                    "the main job: samplers x NFE and the distilled students on the committed teacher, scored "
                    "by FD; writes a report (tables, FD-vs-NFE and quality-vs-cost plots, sample grids); "
                    "--testbed: exact Gaussian-mixture tables",
                    _add_demo_arguments, _check_demo, config=True),
    "fid": Command("fewstep.eval.sweep", "fid_main",
                   "FD (and KID, precision/recall) between generated images and a reference, with its protocol",
                   _add_fid_arguments),
    "sweep": Command("fewstep.eval.sweep", "sweep_main",
                     "FD of samplers x NFE x seed ranges against one reference: CSV/JSON/Markdown tables and a "
                     "FD-vs-NFE plot (configs/sweep_*.yaml)",
                     _add_sweep_arguments, _check_sweep, config=True, epilog=_SWEEP_EPILOG),
    "grid": Command("fewstep.distill.grid", "cli",
                    "sample an image grid from a diffusers DDPMPipeline with any fewstep sampler",
                    _add_grid_arguments, _check_grid, user_errors=(ValueError, FileNotFoundError)),
    "tune": Command("fewstep.tune", "main",
                    "fit a sampler's timestep grid at each NFE to a DDPM pipeline's own ODE trajectories (GITS "
                    "dynamic programming, then a search on the sampler's endpoint error); saves a scheduler folder "
                    "(configs/tune_fmnist.yaml)",
                    _add_tune_arguments, _check_tune, config=True, user_errors=(ValueError, FileNotFoundError)),
    # Training jobs: one entry and one fewstep.config dataclass each.
    "train-teacher": Command("fewstep.distill.teacher", "cli",
                             "train a diffusers UNet2DModel teacher with the training core (accelerate, EMA, "
                             "checkpoints, exact resume); exports a DDPMPipeline (configs/teacher_fmnist.yaml)",
                             _add_train_teacher_arguments, settings=cfg.TeacherConfig,
                             user_errors=(ValueError, FileNotFoundError)),
    "train-mr": Command("fewstep.distill.mr_train", "cli",
                        "train a mean-reverting (MR) restoration UNet on the training core (configs/mr_fmnist.yaml)",
                        _add_max_steps, settings=cfg.MRTrainConfig, user_errors=(ValueError, FileNotFoundError)),
    "distill": Command("fewstep.distill.run", "cli",
                       "distill a teacher pipeline (DDPM, class-conditional UNet, DiT, SD, SDXL, LDM) into a "
                       "few-step student (progressive, consistency, fdistill, sim) on the training core; exports "
                       "students as the teacher's own pipeline class (configs/distill/*.yaml)",
                       _add_max_steps, settings=cfg.DistillConfig, user_errors=(ValueError, FileNotFoundError)),
    "train-classifier": Command("fewstep.eval.classifier", "cli",
                                "train the Fashion-MNIST classifier whose features give FD-fmnist",
                                settings=cfg.ClassifierConfig, user_errors=(ValueError, FileNotFoundError)),
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
    from fewstep.samplers.registry import SAMPLERS

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


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``fewstep NAME: error: ...; see --help``), like every
    other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (`{self.prog} --help` lists the options)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(
        prog="fewstep",
        description="Few-step diffusion samplers, distillation and FID evaluation.",
        epilog="Run `fewstep COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"fewstep {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = {}
    for name, cmd in COMMANDS.items():
        extra = {}
        if cmd.settings is not None:  # the epilog lists every key; keep its lines as they are
            extra = dict(epilog=cfg.help_text(cmd.settings), formatter_class=argparse.RawDescriptionHelpFormatter)
        elif cmd.epilog is not None:
            extra = dict(epilog=cmd.epilog)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, argument_default=argparse.SUPPRESS, **extra)
        if cmd.add_arguments is not None:
            cmd.add_arguments(p)
        if cmd.config:
            p.add_argument("--config", metavar="FILE.yaml",
                           help="YAML mapping of these options (dest names, e.g. n_samples); flags override it")
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if cmd.settings is not None:
            p.add_argument("--config", metavar="FILE.yaml", help="YAML file of the keys below")
            example = "dotted in a section: train.lr=1e-4" if cfg.has_sections(cmd.settings) else "e.g. steps=100"
            p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                           help=f"set a key listed below ({example}); applied after --config")
        subparsers[name] = p
    return parser, subparsers


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A ``--config`` value typed as its flag would be: through the flag's ``type`` (so ``dim: 0`` and
    ``seed: abc`` fail as ``--dim 0`` and ``--seed abc`` do), one item made a list for ``nargs='+'``
    (``samplers: ddim``). Values of flags without a type (mappings such as ``model``) pass as they are."""
    many = action.nargs in ("+", "*")
    if many and not isinstance(value, (list, tuple)):
        value = [value]
    if not many and isinstance(value, (list, tuple)):
        raise ValueError(f"expected one value, got the list {value!r}")
    if action.type is None or value is None:
        return value

    def one(v):
        if isinstance(v, (dict, list, tuple)) or isinstance(v, bool):
            raise ValueError(f"expected a {getattr(action.type, '__name__', 'value')}, got {v!r}")
        try:
            return action.type(v if isinstance(v, str) else str(v))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ValueError(str(err) if isinstance(err, argparse.ArgumentTypeError)
                             else f"invalid {getattr(action.type, '__name__', 'value')} value: {v!r}") from None

    return [one(v) for v in value] if many else one(value)


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A flag command's ``--config``: a YAML mapping whose keys are the flags' dests, each value typed and
    checked exactly as the flag's (``_config_value``)."""
    data = cfg.read_yaml(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    try:
        cfg.reject_unknown(data, set(actions))
        for key in list(data):
            try:
                data[key] = _config_value(actions[key], data[key])
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
    except ValueError as err:
        raise ValueError(f"config {path}: {err}") from None
    return data


def _join_range(argv: Sequence[str]) -> list[str]:
    """``--range -1,1`` -> ``--range=-1,1`` (argparse takes ``-1,1`` for an option, not a value)."""
    out, args = [], list(argv)
    for i, a in enumerate(args):
        if i and args[i - 1] == "--range" and out and out[-1] == "--range":
            out[-1] = f"--range={a}"
        else:
            out.append(a)
    return out


def _options(cmd: Command, parser: argparse.ArgumentParser, args: dict) -> tuple[list, dict]:
    """``(positional, keyword)`` arguments of the command's function."""
    if cmd.settings is not None:
        settings = cfg.load(cmd.settings, args.pop("config", None), args.pop("overrides"))
        return [settings], args
    config = _load_config(args.pop("config"), parser) if "config" in args else {}
    opts = {**config, **args}
    if cmd.check is not None:
        cmd.check(opts)
    return [], opts


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = build_parser()
    namespace, extra = parser.parse_known_args(_join_range(sys.argv[1:] if argv is None else argv))
    args = vars(namespace)
    name = args.pop("command")
    if extra:  # said by the subcommand's parser: "fewstep NAME: error: ..."
        subparsers[name].error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.pop("debug", False)
    cmd, sub = COMMANDS[name], subparsers[name]
    try:
        positional, opts = _options(cmd, sub, args)
    except ValueError as err:  # a bad option or config value: one line, exit 2, before the job starts
        if debug:
            raise
        sub.exit(2, f"{sub.prog}: error: {_one_line(err)}\n")
    func = getattr(importlib.import_module(cmd.module), cmd.function)
    try:
        return int(func(*positional, **opts) or 0)
    except Exception as err:
        code = getattr(err, "exit_code", None)
        if not isinstance(code, int) and isinstance(err, cmd.user_errors):
            code = 2
        if debug or not isinstance(code, int):
            raise
        hint = " (--debug shows where)" if code == 2 and not hasattr(err, "exit_code") else ""
        print(f"fewstep {name}: {'' if code >= 128 else 'error: '}{_one_line(err)}{hint}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _one_line(err: BaseException) -> str:
    """An error's message on one line."""
    text = str(err)
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
