"""``fewstep demo``: the report on the committed teacher (fewstep.demo), at tiny settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fewstep import cli
from fewstep.demo import cost_text, discover_students, fd_table, parse_method, run_report
from fewstep.distill.students import STUDENT_FILE
from fewstep.teachers import FMNIST, FMNIST_STUDENTS

TINY = dict(methods=("ddim", "time_shift"), nfe=(2,), n_samples=24, batch_size=24)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Two committed students plus a student of another method and a folder that is no student: found
    generically, by their json, whatever their names."""
    root = tmp_path_factory.mktemp("students")
    for name in ("progressive-1", "progressive-2"):
        shutil.copytree(FMNIST_STUDENTS / name, root / name)
    other = root / "zz-another-method"
    shutil.copytree(FMNIST_STUDENTS / "progressive-1", other)
    record = json.loads((other / STUDENT_FILE).read_text())
    record.update(method="consistency", training={"updates": 10, "wall_seconds": 120, "teacher_calls": 640})
    (other / STUDENT_FILE).write_text(json.dumps(record))
    (root / "not-a-student").mkdir()
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory, students):
    return run_report(out=tmp_path_factory.mktemp("a") / "report", students=str(students), log=quiet, **TINY)


def test_report_folder_has_table_plots_grids_and_protocol(report):
    out = report.out
    for name in ("report.md", "fd_table.md", "fd_vs_nfe.png", "fd_vs_cost.png", "results.json"):
        assert (out / name).stat().st_size > 200, name
    for name in ("ddim", "time_shift", "students"):
        assert (out / "grids" / f"{name}.png").stat().st_size > 500, name
    text = (out / "report.md").read_text()
    assert "fmnist-classifier" in text and "N = 24" in text and "floor" in text
    assert "| ddim |" in text and "| progressive-1 | progressive | 1 |" in text
    assert "wall clock (process CPU time)" in text and "Reading the numbers" in text
    doc = json.loads((out / "results.json").read_text())
    assert {c["label"] for c in doc["cells"]} >= {"ddim", "time_shift", "progressive-2"}
    assert all(c["sample_cpu_seconds"] > 0 and c["sample_seconds"] > 0 for c in doc["cells"])


def test_students_are_discovered_by_their_json_with_their_cost(report, students):
    assert [p.name for p in discover_students(students)] == ["zz-another-method", "progressive-1", "progressive-2"]
    rows = {c.label: c for c in report.cells if c.student is not None}
    assert set(rows) == {"progressive-1", "progressive-2", "zz-another-method"}
    assert rows["progressive-2"].nfe == 2
    assert cost_text(rows["zz-another-method"].student) == "10 updates, 2 min, teacher_calls 640"
    assert cost_text({}) == "not recorded"
    assert cost_text({"training": {"updates": 800}, "generator_init": "students/progressive-1"}) == \
        "800 updates, from progressive-1"
    # the same network: the same FD, whatever the folder is called
    assert rows["zz-another-method"].fd == rows["progressive-1"].fd


def test_numbers_are_finite_and_ordered_sensibly(report):
    fd = {(c.label, c.nfe): c.fd for c in report.cells}
    assert all(v is not None and 0 < v < 1e4 for v in fd.values())
    assert fd[("progressive-2", 2)] < fd[("ddim", 2)]  # a 2-step student beats 2 teacher DDIM steps
    assert report.floor is None or report.floor > 0  # N=24 is not tabulated: from the data set, if installed


def test_the_floor_at_a_tabulated_n_is_the_committed_one():
    from fewstep.demo import fmnist_floor

    floor, source = fmnist_floor(1000, None, None)  # tabulated: neither features nor data needed
    assert floor == pytest.approx(4.4118) and "committed" in source


def test_same_seed_gives_the_same_table_and_resume_keeps_the_cells(report, students, tmp_path):
    again = run_report(out=tmp_path / "b", students=str(students), log=quiet, **TINY)
    assert (again.out / "fd_table.md").read_text() == (report.out / "fd_table.md").read_text()
    lines = []
    more = run_report(out=tmp_path / "b", students=str(students), log=lines.append,
                      **{**TINY, "nfe": (2, 3)})  # one more column: the old cells are reused, not recomputed
    assert sum("already computed" in line for line in lines) == 2 + 3  # ddim, time_shift at 2; 3 students
    old = {(c.label, c.nfe): c.fd for c in again.cells}
    assert all(old[(c.label, c.nfe)] == c.fd for c in more.cells if (c.label, c.nfe) in old)
    assert "NFE 3" in fd_table(more)
    with pytest.raises(ValueError, match="another protocol"):  # another N into the same folder is refused
        run_report(out=tmp_path / "b", students=False, log=quiet, **{**TINY, "n_samples": 30})


def test_another_seed_changes_the_numbers(report, tmp_path):
    other = run_report(out=tmp_path / "c", students=False, log=quiet, seed=1, **TINY)
    assert other.cells[0].fd != report.cells[0].fd


def test_a_users_pipeline_gets_no_students_and_needs_a_reference_for_other_images(tmp_path):
    result = run_report(out=tmp_path / "p", pipeline=str(FMNIST), log=quiet, **{**TINY, "methods": ("ddim",)})
    assert all(c.student is None for c in result.cells)
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "rgb")
    with pytest.raises(ValueError, match="needs --reference"):
        run_report(out=tmp_path / "q", pipeline=str(tmp_path / "rgb"), log=quiet, **TINY)


def test_methods_parse_with_time_shift_and_aliases():
    assert parse_method("time_shift") == ("time_shift", "ddim", True)
    assert parse_method("time_shift:dpmpp_2m") == ("time_shift:dpmpp_2m", "dpmpp_2m", True)
    assert parse_method("dpmpp_2m_sde") == ("sde_dpmpp_2m", "sde_dpmpp_2m", False)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_method("nope")


@pytest.mark.parametrize("args, message", [
    (["demo", "--dim", "3"], "--dim only with --testbed"),
    (["demo", "--testbed", "--pipeline", "x"], "--testbed does not take --pipeline"),
    (["demo", "--pipeline", "/no/such/folder", "--out", "{tmp}/o"], "error"),
])
def test_bad_demo_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_cli_prints_the_table_and_where_the_report_is(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--samplers", "ddim", "--nfe", "2", "--n-samples", "16", "--no-students",
                     "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| ddim |" in out and f"report: {(tmp_path / 'r' / 'report.md').resolve()}" in out


@pytest.mark.parametrize("name", ["demo.yaml", "demo_long.yaml", "demo_testbed.yaml"])
def test_the_committed_demo_configs_parse_and_check(name):
    parser, subparsers = cli.build_parser()
    opts = cli._load_config(str(Path(__file__).resolve().parents[1] / "configs" / name), subparsers["demo"])
    cli._check_demo(opts)
    assert opts["nfe"] and opts["samplers"]
