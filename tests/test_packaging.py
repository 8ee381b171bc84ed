"""The distribution installs one namespace, ``fewstep``, and everything library code loads goes with it."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    """Every folder with an ``__init__.py`` below a mapped root, as its ``fewstep.*`` name."""
    found = set()
    for name, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_subpackage_is_listed_for_the_wheel():
    # A subpackage missing from `packages` is silently left out of a wheel install.
    assert _packages_on_disk() == set(SETUPTOOLS["packages"])


def test_only_fewstep_is_installed_at_the_top_level():
    assert {name.split(".")[0] for name in SETUPTOOLS["packages"]} == {"fewstep"}
    assert "py-modules" not in SETUPTOOLS


def test_every_committed_model_file_ships_as_package_data():
    teachers = REPO / SETUPTOOLS["package-dir"]["fewstep.teachers"]
    patterns = SETUPTOOLS["package-data"]["fewstep.teachers"]
    tracked = subprocess.run(["git", "ls-files", "."], cwd=teachers, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    data = [f for f in tracked if not f.endswith(".py")]
    assert data, "no committed model files found"
    missing = [f for f in data if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert not missing, f"left out of the wheel: {missing}"


@pytest.mark.parametrize("folder", ["samplers", "eval", "distill"])
def test_a_bare_import_of_a_root_folder_names_the_right_import(folder):
    out = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert f"import fewstep.{folder}" in out.stderr


def test_committed_models_resolve_from_any_folder(tmp_path):
    code = "import fewstep.teachers as t; assert t.FMNIST_CLASSIFIER.is_file() and (t.MR_FMNIST / 'mr.json').is_file()"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
