"""benchmarks/gpu_students.py: the GPU job list is well-formed and what it brings back fits the device tool."""

import importlib.util
import tarfile
from pathlib import Path

import pytest

from fewstep.config import DistillConfig, load

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_students", REPO / "benchmarks" / "gpu_students.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_job_is_a_valid_distill_config(gpu, tmp_path):
    for name in gpu.JOBS:
        command = gpu.job_command(name, tmp_path, scale=0.001)
        i = command.index("--config")
        config = load(DistillConfig, command[i + 1], command[i + 2:])  # an unknown key would raise here
        assert config.train.output_dir == str(tmp_path / name)
        assert config.train.steps >= 1


def test_scaled_steps(gpu):
    assert gpu.scaled(["train.steps=24000", "train.batch_size=256"], 0.001) == ["train.steps=24", "train.batch_size=256"]
    assert gpu.scaled(["consistency.anneal_updates=8000"], 1e-9) == ["consistency.anneal_updates=1"]


def test_pack_students_and_resume_tars(gpu, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    student = runs / "consistency-4" / "students" / "consistency-4"
    student.mkdir(parents=True)
    (student / "fewstep_student.json").write_text("{}")
    for name in ("progressive", "consistency-1"):
        (runs / name).mkdir(parents=True)
        (runs / name / "checkpoint-00000010.pt").write_bytes(b"old")
        (runs / name / "checkpoint-00000020.pt").write_bytes(b"new")
    notes = gpu.pack(runs, out, ["progressive", "consistency-1", "consistency-2"])
    assert notes == []
    with tarfile.open(out / "students.tar") as tar:
        assert tar.getnames()[-1] == "consistency-4/students/consistency-4/fewstep_student.json"
    with tarfile.open(out / "resume-progressive.tar") as tar:
        assert tar.getnames() == ["progressive/checkpoint-00000020.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["resume-consistency-1.tar", "resume-progressive.tar",
                                                     "students.tar"]
