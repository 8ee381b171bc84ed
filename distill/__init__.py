"""fewstep.distill: the training core and the trainers on it -- teachers, MR restoration models and
few-step students (progressive distillation, multistep consistency, f-distill, score implicit matching), the
students exposed through the samplers' interface (``load_student``) and saved as diffusers pipelines."""

if __name__ != "fewstep.distill":  # the checkout's folder imported as a top-level package
    raise ImportError(f"this folder is the package fewstep.distill; `import fewstep.distill` instead of "
                      f"`import {__name__}` (install it once with `pip install -e .` from the repository root)")

from .students import export_student, load_student  # noqa: E402

__all__ = ["load_student", "export_student"]
