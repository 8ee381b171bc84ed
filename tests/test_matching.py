"""One-step distribution matching on the core (f-distill / DMD2 / Diff-Instruct, SIM / SiD) on a tiny random
teacher: every objective trains and exports a one-step student that loads as a sampler; the generator's
loss never leaks gradients into the critics; a run killed with SIGKILL resumes bitwise (three trainable
networks, alternating updates); bad settings fail clearly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fewstep.config import DistillConfig, from_dict
from fewstep.distill.core import CoreConfig, OptimizerConfig, checkpoint_paths, fit
from fewstep.distill.matching import DistributionMatching
from fewstep.distill.run import distill
from fewstep.distill.students import load_student

from conftest import TINY_UNET



def _tiny_pipeline(path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler(num_train_timesteps=64)).save_pretrained(path)
    return path


@pytest.fixture
def tiny_teacher(tmp_path):
    return _tiny_pipeline(tmp_path / "teacher")


def _config(teacher, idx_folder, out, method, **section):
    return from_dict(DistillConfig, {
        "method": method, "teacher": str(teacher),
        "train": {"output_dir": str(out), "steps": 4, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2,
                  "log_every": 1, "progress": False, "cpu": True, "ema_decay": 0.0},
        "data": {"name": "fashion_mnist", "root": str(idx_folder), "size": 8}, method: section})


@pytest.mark.parametrize("method,section", [
    ("fdistill", {"update_ratio": 2}),  # reverse-KL = DMD2, data-free
    ("fdistill", {"update_ratio": 2, "f": "js", "discriminator": True, "gan_weight": 0.01, "r1_weight": 0.1}),
    ("fdistill", {"update_ratio": 1, "variant": "diff_instruct"}),
    ("sim", {"distance": "pseudo_huber"}),
    ("sim", {"distance": "l2", "prediction_type": "sample"}),
    ("sim", {"variant": "sid"}),
])
def test_each_objective_trains_and_exports_a_one_step_student(tiny_teacher, idx_folder, tmp_path, method, section):
    (path,) = distill(_config(tiny_teacher, idx_folder, tmp_path / "run", method, **section))
    assert path.name == f"{method}-1"
    sampler = load_student(path)
    assert sampler.nfe == 1 and sampler.student["method"] == method
    assert sampler.student["objective"] == section.get("variant", "f_distill" if method == "fdistill" else "sim")
    assert sampler.student["training"]["updates"] == 4
    if method == "sim":  # each variant's reference weight (tests/test_matching_reference.py)
        assert sampler.student["dmd_normaliser"] is (section.get("variant") == "sid")
    else:
        assert sampler.student["reference"] == "dmd2"
    out = sampler.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    from diffusers import DDPMPipeline  # the same student as a diffusers pipeline, same noise

    pipe = DDPMPipeline.from_pretrained(path)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=1, output_type="np").images
    assert abs(((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy() - theirs).max() < 1e-5
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "fake" in history[-1] and "generator" in history[-1]  # step 4 updates the generator
    assert (tmp_path / "run" / "training_curves.png").is_file()


def _method(teacher_path, **kw):
    from diffusers import DDPMPipeline

    from fewstep.samplers.schedules import DiscreteVPSchedule

    pipe = DDPMPipeline.from_pretrained(teacher_path)
    schedule = DiscreteVPSchedule.from_diffusers_config(pipe.scheduler.config)
    optim = OptimizerConfig(lr=1e-3, grad_clip=10.0)
    return DistributionMatching(pipe.unet, "epsilon", schedule, optim=optim, **kw)


def _data():
    return TensorDataset(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)


@pytest.mark.parametrize("kw", [dict(objective="sim"), dict(f="kl", discriminator=True, real_data=True, gan_weight=0.1)])
def test_the_generator_step_leaves_the_critics_and_teacher_untouched(tiny_teacher, tmp_path, kw):
    method = _method(tiny_teacher, update_ratio=2, **kw)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    config = CoreConfig(output_dir=str(tmp_path / "run"), steps=2, batch_size=4, checkpoint_every=2, progress=False,
                        cpu=True)
    state = fit(method, config, _data() if method.needs_data else None, log=lambda *_: None).state
    for name in [n for n in ("fake", "disc") if n in state.modules]:  # step 2 ends with the generator's update
        assert all(p.grad is None for p in state.unwrapped(name).parameters()), name
        assert all(p.requires_grad for p in state.unwrapped(name).parameters()), name
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_matching import _method, _data
    from fewstep.distill.core import CoreConfig, fit

    method = _method({teacher!r}, update_ratio=2, f="js", discriminator=True, real_data=True, gan_weight=0.1,
                     ratio_ema=0.5)
    slow = method.train_step
    method.train_step = lambda ctx, batch: (time.sleep({sleep}), slow(ctx, batch))[1]
    config = CoreConfig(output_dir={out!r}, steps=8, batch_size=4, accumulation=2, checkpoint_every=1,
                        log_every=1, progress=False, cpu=True)
    fit(method, config, _data(), log=lambda *_: None)
""")


def _script(tmp_path, teacher, out, sleep):
    path = tmp_path / f"run_{sleep}.py"
    path.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), teacher=str(teacher), out=str(out),
                                        sleep=sleep))
    return path


def test_an_interrupted_run_resumes_bitwise_with_three_networks_and_alternating_updates(tiny_teacher, tmp_path):
    kw = dict(update_ratio=2, f="js", discriminator=True, real_data=True, gan_weight=0.1, ratio_ema=0.5)

    def run(out, max_steps=None):
        config = CoreConfig(output_dir=str(out), steps=6, batch_size=4, accumulation=2, checkpoint_every=1,
                            progress=False, cpu=True)
        state = fit(_method(tiny_teacher, **kw), config, _data(), max_steps=max_steps, log=lambda *_: None).state
        return {n: {k: v.clone() for k, v in state.unwrapped(n).state_dict().items()} for n in state.modules}

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", max_steps=3)  # stops after a critic-only step, mid-group
    resumed = run(tmp_path / "split")
    for name, weights in whole.items():
        for key, value in weights.items():
            assert torch.equal(resumed[name][key], value), (name, key)


@pytest.mark.slow  # ~60 s on a shared 2-core machine (three subprocesses import diffusers)
def test_a_run_killed_with_sigkill_resumes_bitwise_with_three_networks(tiny_teacher, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(_script(tmp_path, tiny_teacher, out, 0.2))])
    deadline = time.time() + 120
    while time.time() < deadline and len(checkpoint_paths(out)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoint_paths(out)[-1].stem.split("-")[1])
    assert 1 <= killed_at < 8
    subprocess.run([sys.executable, str(_script(tmp_path, tiny_teacher, out, 0.0))], check=True)
    subprocess.run([sys.executable, str(_script(tmp_path, tiny_teacher, tmp_path / "whole", 0.0))], check=True)
    a = torch.load(checkpoint_paths(out)[-1], weights_only=False)["state"]
    b = torch.load(checkpoint_paths(tmp_path / "whole")[-1], weights_only=False)["state"]
    assert set(b["optimizers"]) == {"generator", "fake", "disc"}
    for name, weights in b["networks"].items():
        for k, v in weights.items():
            assert torch.equal(a["networks"][name][k], v), (name, k)
    for name in b["optimizers"]:
        assert a["optimizers"][name]["state"].keys() == b["optimizers"][name]["state"].keys()
    assert a["counters"] == b["counters"] == {"step": 8, "round": 0, "step_in_round": 8}
    assert not torch.equal(b["networks"]["ratio_stats"]["means"], torch.ones(10))  # the EMA moved and was resumed


@pytest.mark.parametrize("method,section,match", [
    ("fdistill", {"f": "tv"}, "unknown f-divergence"),
    ("fdistill", {"f": "js", "discriminator": True, "ratio_lower": 20.0, "ratio_upper": 0.1}, "lower < upper"),
    ("fdistill", {"update_ratio": 0}, "update_ratio"),
    ("sim", {"update_ratio": 0}, "update_ratio"),
    ("fdistill", {"gan_weight": 0.1}, "needs the discriminator"),
    ("fdistill", {"f": "kl"}, "density ratio"),
    ("fdistill", {"prediction_type": "epsilon"}, "eps-parameterised"),
    ("fdistill", {"variant": "dmd"}, "variant"),
    ("sim", {"distance": "l1"}, "unknown SIM distance"),
    ("fdistill", {"reference": "dmd"}, "unknown reference"),
    ("fdistill", {"reference": "fastgen", "update_ratio": 1}, "student_update_freq"),
])
def test_bad_matching_configs_fail_clearly(tiny_teacher, idx_folder, tmp_path, method, section, match):
    with pytest.raises(ValueError, match=match):
        distill(_config(tiny_teacher, idx_folder, tmp_path / "bad", method, **section))


def test_a_gan_term_without_data_is_refused(tiny_teacher):
    with pytest.raises(ValueError, match="trains on real data"):
        _method(tiny_teacher, discriminator=True, real_data=False, gan_weight=0.1)


def test_the_shipped_configs_load():
    from fewstep.config import load

    repo = Path(__file__).resolve().parents[1]
    for method in ("fdistill", "sim"):
        config = load(DistillConfig, repo / "configs" / "distill" / f"{method}_fmnist.yaml")
        assert config.method == method


_TWO_PROCESS_SCRIPT = """
import sys
from fewstep.config import DistillConfig, from_dict
from fewstep.distill.run import distill
teacher, data, out, method = sys.argv[1:5]
section = ({"update_ratio": 2, "f": "js", "discriminator": True, "gan_weight": 0.1} if method == "fdistill"
           else {"update_ratio": 1})
distill(from_dict(DistillConfig, {
    "method": method, "teacher": teacher, method: section,
    "train": {"output_dir": out, "steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 4, "log_every": 4,
              "progress": False, "cpu": True, "ema_decay": 0.0},
    "data": {"name": "fashion_mnist", "root": data, "size": 8}}))
"""


@pytest.mark.slow  # ~2 min: two launches of two processes
@pytest.mark.parametrize("method", ["fdistill", "sim"])
def test_two_cpu_processes_train_the_same_generator_as_one(tiny_teacher, idx_folder, tmp_path, method):
    """The batch statistics (h's mean, the ratio's time bins) are all-reduced, so two processes with half
    the batch each train what one process does, to float rounding."""
    from diffusers import UNet2DModel

    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    args = [str(tiny_teacher), str(idx_folder)]
    subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one"), method], check=True, capture_output=True)
    from conftest import free_port

    # this interpreter's launcher (the one on PATH may belong to another environment)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--main_process_port", free_port(), "--mixed_precision", "no",
                          "--dynamo_backend", "no", str(script),
                          *args, str(tmp_path / "two"), method], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    start = UNet2DModel.from_pretrained(tiny_teacher / "unet").state_dict()
    a = UNet2DModel.from_pretrained(tmp_path / "one" / "students" / f"{method}-1" / "unet").state_dict()
    b = UNet2DModel.from_pretrained(tmp_path / "two" / "students" / f"{method}-1" / "unet").state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    changed = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert changed > 1e-3
    assert diff < 1e-4 and diff < 0.01 * changed, (diff, changed)
