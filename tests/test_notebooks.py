"""The notebooks in notebooks/ run top to bottom (small settings: ``FEWSTEP_NOTEBOOK_SMALL=1``), offline.

Executing them takes ~1 min of CPU together (a kernel each), so that test is ``slow``: .ci/run runs it as
its own step (``python3 -m pytest -q -m slow tests/test_notebooks.py``).

The committed copies carry the outputs of a full-settings run; to refresh them:

    python tests/test_notebooks.py            # executes every notebook in place with its full settings
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NEEDS_DATA = {"02_distill_one_step.ipynb"}  # trains on Fashion-MNIST


def execute(path: Path, cwd: Path, small: bool, timeout: int = 900):
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    env = {"FEWSTEP_NOTEBOOK_SMALL": "1" if small else "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if v})  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(book, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(cwd)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return book


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_diffusers_swap.ipynb", "02_distill_one_step.ipynb",
                                           "03_mr_restoration.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_on_small_settings(path, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    if path.name in NEEDS_DATA:
        from fewstep.data import DEBIAN_FASHION_MNIST

        if not Path(DEBIAN_FASHION_MNIST).is_dir():
            pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    book = execute(path, tmp_path, small=True)
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_committed_notebooks_carry_their_outputs():
    import json

    for path in NOTEBOOKS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(c.get("outputs") for c in cells[1:]), f"{path.name}: run `python tests/test_notebooks.py`"


if __name__ == "__main__":
    import nbformat

    names = sys.argv[1:]
    for path in NOTEBOOKS:
        if names and path.stem not in names:
            continue
        import tempfile

        root = path.parent.parent / "outputs" / "notebooks"
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=path.stem + "-", dir=root))  # fresh: no checkpoint to resume
        nbformat.write(execute(path, work, small=False, timeout=3600), path)
        print(f"executed {path}")
