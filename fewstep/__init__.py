"""fewstep: few-step diffusion samplers, distillation and FID evaluation in one suite.

The three parts live in their own subpackages (``fewstep.samplers``, ``fewstep.distill``,
``fewstep.eval``); the committed networks and statistics are in ``fewstep.teachers``. What more
than one part uses lives here: ``fewstep.data`` (data sources) and ``fewstep.io`` (``to_uint8``,
``save_grid``, atomic writes).
``fewstep`` on the command line is ``fewstep.cli``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fewstep")
except PackageNotFoundError:  # imported from a checkout without installing
    __version__ = "unknown (not installed)"
