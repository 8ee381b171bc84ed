"""The ``fewstep`` command and ``fewstep demo --testbed`` (fewstep.testbed.demo); the report demo is
tests/test_demo.py."""

from __future__ import annotations

import importlib
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewstep import cli
from fewstep.testbed.demo import LEFT_OUT, format_tables, run_demo
from fewstep.samplers.registry import SAMPLERS

REPO = Path(__file__).resolve().parents[1]


def fewstep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed console script, or the module from the checkout when not installed."""
    exe = shutil.which("fewstep")
    cmd = [exe] if exe else [sys.executable, "-m", "fewstep.cli"]
    return subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The command line


def test_help_lists_every_subcommand():
    out = fewstep("--help")
    assert out.returncode == 0, out.stderr
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_every_subcommand_resolves_to_a_callable():
    for name, cmd in cli.COMMANDS.items():
        assert callable(getattr(importlib.import_module(cmd.module), cmd.function)), name


def test_samplers_lists_the_registry_with_options_and_defaults():
    out = fewstep("samplers")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in SAMPLERS:
        assert any(line.split()[:1] == [name] for line in lines), name
    ddim = next(line for line in lines if line.startswith("ddim "))
    assert "DDIM" in ddim and "eta=0.0" in ddim
    dpmpp = next(line for line in lines if line.startswith("dpmpp_2m "))
    assert "DPMSolverPP(order=2)" in dpmpp and "solver_type='midpoint'" in dpmpp


@pytest.mark.parametrize("args, message", [
    (["demo", "--nfe", "0"], "NFE must be >= 1"),
    (["demo", "--nfe", "five"], "NFE must be an integer"),
    (["demo", "--samplers", "ddim", "no_such_sampler"], "unknown method 'no_such_sampler'"),
    (["demo", "--testbed", "--samplers", "ddim", "no_such_sampler"], "unknown sampler(s) 'no_such_sampler'"),
    (["demo", "--timesteps", "no_such_grid"], "unknown timesteps"),
    (["demo", "--testbed", "--samplers", "time_shift"], "unknown sampler(s) 'time_shift'"),
    (["demo", "--samplers", "time_shift:nope"], "unknown method 'time_shift:nope'"),
    (["no_such_command"], "invalid choice"),
    ([], "required"),
])
def test_bad_input_is_a_usage_error_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_says_what_exists():
    out = fewstep("--help").stdout
    distill = " ".join(out.split("distill ", 1)[1].split())
    for method in ("progressive", "consistency", "fdistill", "sim"):
        assert method in distill.split("train-classifier")[0], distill
    assert "progressive or multistep consistency" not in out
    sweep = " ".join(fewstep("sweep", "--help").stdout.split())
    assert "--allow-code" in sweep and "kind: factory" in sweep and "runs code" in sweep
    grid = " ".join(fewstep("grid", "--help").stdout.split())
    assert "DDIMPipeline" in grid


def test_bad_input_exits_nonzero_from_the_shell():
    out = fewstep("demo", "--nfe", "0")
    assert out.returncode == 2
    assert "fewstep demo: error" in out.stderr and "NFE must be >= 1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr  # one line, also argparse's


def test_config_file_is_read_and_flags_override_it(capsys):
    code = cli.main(["demo", "--config", str(REPO / "configs" / "demo_testbed.yaml"), "--samplers", "ddim",
                             "--nfe", "2", "--n-samples", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| ddim" in out and "| NFE 2" in out and "NFE 5" not in out and "64 samples" in out


def test_config_with_an_unknown_key_is_rejected(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("testbed: true\nnfe: [5]\nn_sample: 10\n")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--config", str(path)])
    assert "unknown option(s) ['n_sample']" in capsys.readouterr().err


def test_demo_command_prints_both_tables():
    out = fewstep("demo", "--testbed", "--nfe", "3", "6", "--samplers", "ddim", "heun", "--n-samples", "100")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("| sampler") == 2
    heun = [line for line in out.stdout.splitlines() if line.startswith("| heun")]
    assert heun and heun[0].split("|")[3].strip() == "-"  # Heun to data has odd NFE: 6 is impossible


# ---------------------------------------------------------------------------------------------
# The demo's numbers


@pytest.fixture(scope="module")
def small_demo():
    return run_demo(nfes=(5, 10, 20), samplers=("ddim", "dpmpp_2m", "ddpm", "heun"), n_samples=300)


def test_dpmpp_2m_is_closer_to_the_exact_ode_solution_than_ddim(small_demo):
    for nfe in (10, 20):
        assert small_demo.cell("dpmpp_2m", nfe).ode_rmse < 0.5 * small_demo.cell("ddim", nfe).ode_rmse


def test_ode_error_shrinks_with_nfe(small_demo):
    for name in ("ddim", "dpmpp_2m"):
        errors = [small_demo.cell(name, n).ode_rmse for n in (5, 10, 20)]
        assert errors[0] > errors[1] > errors[2] > 0, (name, errors)


def test_stochastic_samplers_have_no_ode_error_but_a_distance(small_demo):
    row = small_demo.cell("ddpm", 20)
    assert row.stochastic and row.ode_rmse is None
    assert math.isfinite(row.sliced_w2) and row.sliced_w2 > 0


def test_unreachable_nfe_is_skipped_not_faked(small_demo):
    for nfe in (10, 20):  # Heun ending at data spends 2 steps - 1 calls: only odd NFE
        row = small_demo.cell("heun", nfe)
        assert row.steps is None and row.ode_rmse is None and row.sliced_w2 is None
    assert small_demo.cell("heun", 5).steps == 3


def test_tables_mark_skipped_and_stochastic_cells(small_demo):
    text = format_tables(small_demo)
    assert "| ddpm (sde)" in text and "n/a" in text
    assert " - |" in text
    assert "Left out" in text and "pndm" in text and "mrs_data" in text  # named, with the reason


def test_a_diverged_sampler_named_explicitly_is_flagged():
    text = format_tables(run_demo(nfes=(5,), samplers=("pndm", "ddim"), n_samples=200))
    assert "Diverged" in text and "pndm" in text.split("Diverged")[1]


@pytest.mark.slow
def test_default_demo_runs_well_under_a_minute():
    t0 = time.perf_counter()
    result = run_demo()
    assert time.perf_counter() - t0 < 60
    assert {row.sampler for row in result} == set(SAMPLERS) - set(LEFT_OUT)
    assert result.cell("dpmpp_3m", 20).ode_rmse < result.cell("ddim", 20).ode_rmse
