"""A real conditional run: the committed class-conditional Fashion-MNIST teacher and its guidance-baked PD
student (configs/distill/progressive_fmnist_classcond.yaml), checked by the committed classifier."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.distill import load_student
from fewstep.distill.families import TeacherError, load_teacher
from fewstep.eval.classifier import DEFAULT_WEIGHTS, FMNISTNet, accuracy
from fewstep.teachers import FMNIST_CLASSCOND, FMNIST_CLASSCOND_STUDENTS

pytestmark = pytest.mark.usefixtures("one_thread")

STUDENT = FMNIST_CLASSCOND_STUDENTS / "progressive-4"


@pytest.fixture(scope="module")
def classifier():
    net = FMNISTNet()
    net.load_state_dict(torch.load(DEFAULT_WEIGHTS, map_location="cpu"))
    return net.eval()


def test_the_class_conditional_teacher_loads_as_a_guidable_ten_class_teacher():
    family = load_teacher(FMNIST_CLASSCOND)
    assert (family.condition_kind, family.num_classes, family.guidable) == ("class", 10, True)
    assert family.class_names[7] == "Sneaker"
    assert int(family.null(1)["class_labels"]) == 10


def test_the_guided_student_draws_the_class_it_is_given(classifier):
    student = load_student(STUDENT)
    assert student.nfe == 4 and student.student["guidance"]["mode"] == "baked"
    record = json.loads((STUDENT / "fewstep_student.json").read_text())
    assert record["teacher"]["id"] == load_teacher(FMNIST_CLASSCOND).describe()["id"]
    labels = torch.arange(10).repeat_interleave(10)
    noise = torch.randn(len(labels), 1, 28, 28, generator=torch.Generator().manual_seed(0))
    images = student.sample(noise, class_labels=labels.tolist()).clamp(-1, 1)
    # 0.75 measured on 1000 samples (benchmarks/classcond_student.py); chance is 0.1
    assert accuracy(classifier, images, labels) >= 0.6
    shifted = (labels + 5) % 10  # the same noise, other classes: the class, not the noise, decides
    assert accuracy(classifier, student.sample(noise, class_labels=shifted.tolist()).clamp(-1, 1), labels) < 0.25
    with pytest.raises(TeacherError, match="baked in"):
        student.sample(noise[:2], class_labels=[0, 1], guidance_scale=3.0)
    with pytest.raises(TeacherError, match="needs class_labels"):
        student.sample(noise[:2])
