"""fewstep.distill: trainers that distill a teacher into few-step students (progressive distillation,
f-distill, SIM, multistep consistency), exposed through the samplers' interface. Built by later issues."""

if __name__ != "fewstep.distill":  # the checkout's folder imported as a top-level package
    raise ImportError(f"this folder is the package fewstep.distill; `import fewstep.distill` instead of "
                      f"`import {__name__}` (install it once with `pip install -e .` from the repository root)")
