"""fewstep.teachers: the committed networks and statistics, shipped as package data.

``FMNIST`` is the embedded Fashion-MNIST DDPM teacher (a diffusers ``DDPMPipeline`` folder), with the
FD-fmnist classifier and reference statistics beside it; ``MR_FMNIST`` the MR restoration model;
``FMNIST_STUDENTS`` the students distilled from the teacher (``fewstep.distill.load_student``);
``FMNIST_CLASSCOND`` a class-conditional teacher (ten classes, null class 10, for classifier-free guidance). Found
through ``importlib.resources``, so they load from an editable checkout and a wheel install alike.
"""

from importlib import resources
from pathlib import Path

__all__ = ["FMNIST", "FMNIST_CLASSIFIER", "FMNIST_FD_REFERENCE", "MR_FMNIST", "FMNIST_STUDENTS", "FMNIST_CLASSCOND",
           "FMNIST_CLASSCOND_STUDENTS"]

_ROOT = Path(str(resources.files(__name__)))  # installed as plain files (setuptools package data)
FMNIST = _ROOT / "fmnist"
FMNIST_CLASSIFIER = FMNIST / "classifier.pt"
FMNIST_FD_REFERENCE = FMNIST / "fd_fmnist_test.npz"
MR_FMNIST = _ROOT / "mr_fmnist"
#: Students distilled from FMNIST (``fewstep distill``), one folder each: ``progressive-4``, ...
FMNIST_STUDENTS = _ROOT / "fmnist_students"
#: A class-conditional teacher (``fewstep train-teacher --config configs/teacher_fmnist_classcond.yaml``) and
#: its guidance-baked students.
FMNIST_CLASSCOND = _ROOT / "fmnist_classcond"
FMNIST_CLASSCOND_STUDENTS = _ROOT / "fmnist_classcond_students"
