"""``k_diffusion.sampling`` loaded without the package's ``__init__`` (which imports training-only
dependencies such as scikit-image): only ``utils.py`` and ``sampling.py`` are executed, under a bare
``k_diffusion`` package, and ``sys.modules`` is restored afterwards."""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys
import types

import pytest


@contextlib.contextmanager
def k_diffusion_sampling():
    for dep in ("scipy", "torchsde", "torchdiffeq"):
        pytest.importorskip(dep)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "k_diffusion" or k.startswith("k_diffusion.")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(root)]
    sys.modules["k_diffusion"] = pkg
    try:
        for name in ("utils", "sampling"):
            s = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(s)
            sys.modules[s.name] = module
            s.loader.exec_module(module)
            setattr(pkg, name, module)
        yield pkg.sampling
    finally:
        for k in [k for k in sys.modules if k == "k_diffusion" or k.startswith("k_diffusion.")]:
            del sys.modules[k]
        sys.modules.update(saved)
