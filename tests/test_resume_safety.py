"""What a resumed or finished distillation must never do silently (issue "Faithful and safe"): resume with
settings that change what it trains, export a diverged student, train a student it cannot export, load a
checkpoint that can run code, or follow a planted lock link."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from fewstep.cli import main
from fewstep.distill import core
from fewstep.distill.core import Refused, UnsafeCheckpoint, checkpoint_paths
from fewstep.distill.run import NonFiniteStudent, distill

from test_distill import _config, tiny_teacher  # noqa: F401  (the fixture)

PD = {"progressive": {"start_steps": 4}}  # two rounds (2, 1 steps) of 3 optimizer steps at steps 6
MCM = {"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 16, "anneal_updates": 4}


def test_pd_refuses_a_changed_steps_mid_run_instead_of_exporting_a_cut_round(tiny_teacher, idx_folder, tmp_path):
    out = tmp_path / "pd"
    distill(_config(tiny_teacher, idx_folder, out, **PD), max_steps=2)  # inside round 0
    with pytest.raises(Refused, match=r"train.steps sets the length of each of progressive's 2 rounds.*"
                                      r"resume with train.steps=6"):
        distill(_config(tiny_teacher, idx_folder, out, **PD, train={"steps": 2}))
    assert not (out / "students").exists()  # nothing exported under a wrong name


def test_a_changed_start_network_is_refused_naming_it(tiny_teacher, idx_folder, tmp_path):
    (first,) = distill(_config(tiny_teacher, idx_folder, tmp_path / "s2", method="consistency", consistency=MCM))
    out = tmp_path / "s1"
    distill(_config(tiny_teacher, idx_folder, out, method="consistency",
                    consistency={**MCM, "student_init": str(first)}), max_steps=1)
    with pytest.raises(Refused, match=r"consistency.student_init: '.*s2/students/consistency-2' -> None"):
        distill(_config(tiny_teacher, idx_folder, out, method="consistency", consistency=MCM))


def test_a_changed_guidance_or_option_is_refused(tiny_teacher, idx_folder, tmp_path):
    out = tmp_path / "mcm"
    distill(_config(tiny_teacher, idx_folder, out, method="consistency", consistency=MCM), max_steps=1)
    with pytest.raises(Refused, match=r"consistency.huber_c"):
        distill(_config(tiny_teacher, idx_folder, out, method="consistency", consistency={**MCM, "huber_c": 1e-3}))
    # what may change: the step count of a one-round method, where students go
    distill(_config(tiny_teacher, idx_folder, out, method="consistency", consistency=MCM, train={"steps": 2},
                    students_dir=str(tmp_path / "elsewhere")))
    assert (tmp_path / "elsewhere" / "consistency-2").is_dir()


def test_a_diverged_student_is_never_exported(tiny_teacher, idx_folder, tmp_path, monkeypatch, capsys):
    real = core._ema_update

    def diverging(ema, model, decay):  # the last update leaves finite losses but NaN exported weights
        real(ema, model, decay)
        next(ema.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(core, "_ema_update", diverging)
    config = _config(tiny_teacher, idx_folder, tmp_path / "nan", method="consistency", consistency=MCM,
                     train={"ema_decay": 0.5, "steps": 2})
    with pytest.raises(NonFiniteStudent, match="2-step student has non-finite weights after optimizer step 2"):
        distill(config)
    assert not (tmp_path / "nan" / "students").exists()
    code = main(["distill", "method=consistency", f"teacher={tiny_teacher}", f"train.output_dir={tmp_path / 'nan2'}",
                 "train.steps=2", "train.batch_size=8", "train.ema_decay=0.5", "train.progress=false", "train.cpu=true",
                 "data.name=fashion_mnist", f"data.root={idx_folder}", "data.size=8", "consistency.student_steps=2",
                 "consistency.teacher_steps=4", "consistency.teacher_steps_end=16", "consistency.anneal_updates=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-finite weights" in err[0], err


def test_an_unexportable_student_is_refused_before_training(tiny_teacher, idx_folder, tmp_path):
    out = tmp_path / "three"
    with pytest.raises(ValueError, match=r"3-step student could not be exported.*64 training steps / 3"):
        distill(_config(tiny_teacher, idx_folder, out, method="consistency",
                        consistency={**MCM, "student_steps": 3}))
    assert not checkpoint_paths(out)


class _Payload:
    """Unpickling this runs ``os.system``-like code: here, it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_checkpoint_is_refused_and_never_run(tiny_teacher, idx_folder, tmp_path):
    out, marker = tmp_path / "planted", tmp_path / "pwned"
    out.mkdir()
    with open(out / "checkpoint-00000001.pt", "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    torch.save({"state": _Payload(marker)}, out / "checkpoint-00000002.pt")
    with pytest.raises(UnsafeCheckpoint, match="could run code"):
        distill(_config(tiny_teacher, idx_folder, out, method="consistency", consistency=MCM), max_steps=1)
    assert not marker.exists()


def test_a_lock_symlink_is_refused_and_its_target_untouched(tiny_teacher, idx_folder, tmp_path):
    out, target = tmp_path / "linked", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me")
    os.symlink(target, out / ".lock")
    with pytest.raises(Refused, match="is a symbolic link"):
        distill(_config(tiny_teacher, idx_folder, out, method="consistency", consistency=MCM), max_steps=1)
    assert target.read_text() == "keep me"


def test_another_teacher_is_refused_but_a_moved_one_resumes(tiny_teacher, idx_folder, tmp_path):
    import shutil

    from diffusers import DDPMPipeline

    out = tmp_path / "run"
    distill(_config(tiny_teacher, idx_folder, out, method="consistency", consistency=MCM), max_steps=1)
    moved = tmp_path / "moved_teacher"
    shutil.copytree(tiny_teacher, moved)
    distill(_config(moved, idx_folder, out, method="consistency", consistency=MCM, train={"steps": 2}), max_steps=1)
    other = tmp_path / "other_teacher"
    pipe = DDPMPipeline.from_pretrained(tiny_teacher)
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
    pipe.save_pretrained(other)
    with pytest.raises(Refused, match=r"different run \(settings.teacher: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        distill(_config(other, idx_folder, out, method="consistency", consistency=MCM, train={"steps": 3}))
