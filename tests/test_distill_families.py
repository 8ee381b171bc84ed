"""Distil the user's own teacher: every pipeline family x every method through ``fewstep distill``.

Each tiny random-weight teacher (built from configs, no downloads) is distilled for 2 optimizer steps by
each method; the student is exported as the teacher's own pipeline class, loads with that class, gives
different samples for two conditions from the same noise, and ``load_student(...).sample`` equals the
pipeline's own sampling on the same noise (for the families whose ``__call__`` takes the condition).
Guidance in both modes, data formats, and the refusals are here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.config import DistillConfig, from_dict
from fewstep.distill.families import TeacherError, load_teacher
from fewstep.distill.run import distill
from fewstep.distill.students import load_student

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from test_family_dit_ldm import tiny_dit_pipeline, tiny_ldm_pipeline  # noqa: E402
from test_family_sd import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402
from test_family_pixart import tiny_pixart_pipeline  # noqa: E402

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


def tiny_classcond_unet_pipeline(tmp_path: Path, classes: int = 3) -> Path:
    """A class-conditional 8x8 UNet2DModel in a DDPMPipeline, with fewstep's sidecar naming the null class."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=classes + 1)
    path = tmp_path / "classcond"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=64)).save_pretrained(path)
    names = [f"class{i}" for i in range(classes)]
    (path / "fewstep_teacher.json").write_text(json.dumps({"class_names": names, "null_class_label": classes}))
    return path


def class_tree(root: Path, size: int, classes: int = 3, per_class: int = 4) -> Path:
    """A class-per-subfolder image tree (torchvision ImageFolder's convention)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def caption_folder(root: Path, size: int, n: int = 8) -> Path:
    """An image folder with captions in metadata.jsonl (the ``datasets`` ImageFolder convention)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i % 2]}) + "\n")
    return root


def tiny_edm_sd_pipeline(tmp_path: Path) -> Path:
    """The tiny Stable Diffusion pipeline with diffusers' ``EDMEulerScheduler``: an EDM-preconditioned teacher
    (``c_in``, ``0.25 log sigma``, ``c_skip`` / ``c_out``, as playground-v2.5-style pipelines run)."""
    from diffusers import EDMEulerScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline(tmp_path))
    pipe.scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    path = tmp_path / "sd-edm"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """family -> (teacher folder, data section, the two conditions)."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    out["classcond"] = (tiny_classcond_unet_pipeline(root), {"name": f"folder:{class_tree(root / 'tree8', 8)}",
                                                            "channels": 1}, [0, 2])
    out["dit"] = (tiny_dit_pipeline(root), None, [0, 2])
    out["sd"] = (tiny_sd_pipeline(root), {"name": f"folder:{caption_folder(root / 'caps16', 16)}"}, PROMPTS)
    out["sd_v"] = (tiny_sd_pipeline(root, prediction_type="v_prediction"), None, PROMPTS)
    out["sdxl"] = (tiny_sdxl_pipeline(root), None, PROMPTS)
    out["sd_edm"] = (tiny_edm_sd_pipeline(root), None, PROMPTS)
    out["ldm"] = (tiny_ldm_pipeline(root), None, None)
    out["pixart"] = (tiny_pixart_pipeline(root), None, PROMPTS)
    for name, (path, data, raw) in list(out.items()):
        if data is None:  # data at the teacher's pixel size
            family = load_teacher(path)
            size = family.image_shape()[-1]
            if family.condition_kind == "class":
                data = {"name": f"folder:{class_tree(root / f'tree{size}', size)}"}
            elif family.condition_kind == "text":
                data = {"name": f"folder:{caption_folder(root / f'caps{size}', size)}"}
            else:
                data = {"name": f"folder:{class_tree(root / f'tree{size}', size)}", "conditions": "none"}
        out[name] = (path, data, raw)
    return out


def run(teacher, data, out: Path, method: str, **sections) -> list[Path]:
    values = {"teacher": str(teacher), "method": method,
              "train": {"output_dir": str(out), "steps": 2, "batch_size": 4, "lr": 1e-4, "checkpoint_every": 1,
                        "log_every": 1, "progress": False, "cpu": True, "ema_decay": 0.0},
              "data": data,
              "progressive": {"start_steps": 4, "end_steps": 2},
              "consistency": {"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 4},
              "fdistill": {"update_ratio": 1}, "sim": {"update_ratio": 1}}
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return distill(from_dict(DistillConfig, values))


def _pipeline_images(family, path: Path, raw, x_T: torch.Tensor, steps: int, guidance_scale=None) -> torch.Tensor:
    """The student folder's own pipeline class, run from ``x_T``: images in [-1, 1]."""
    cls = type(family.pipe)
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = family.pipeline_inputs(raw, guidance_scale)
    if cls.__name__ in ("DiTPipeline", "LDMPipeline"):  # no latents= argument: same generator, same draw
        gen = torch.Generator().manual_seed(0)
        n = len(raw) if raw is not None else x_T.shape[0]
        images = pipe(**kwargs, **({} if raw is not None else {"batch_size": n}), generator=gen,
                      num_inference_steps=steps, output_type="pt" if cls.__name__ == "DiTPipeline" else "np").images
        images = torch.as_tensor(images)
        images = images.permute(0, 3, 1, 2) if images.shape[-1] in (1, 3) else images
    else:
        images = pipe(**kwargs, latents=x_T, num_inference_steps=steps, output_type="pt").images
    return images * 2 - 1


def _pipeline_noise(family, rows: int) -> torch.Tensor:
    """``x_T`` as the pipelines without ``latents=`` draw it (``randn_tensor`` from a CPU generator)."""
    return torch.randn((rows, *family.sample_shape()), generator=torch.Generator().manual_seed(0))


METHODS = ["progressive", "consistency", "fdistill", "sim"]
FAMILIES = ["classcond", "dit", "sd", "sd_v", "sdxl", "ldm", "sd_edm", "pixart"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_and_method_exports_the_teachers_own_pipeline(teachers, tmp_path, name, method):
    teacher, data, raw = teachers[name]
    # an EDM teacher's students keep its preconditioned output
    sections = {method: {"prediction_type": "teacher"}} if name == "sd_edm" else {}
    paths = run(teacher, data, tmp_path / "run", method, **sections)
    assert paths, "no student exported"
    path = paths[-1]
    family = load_teacher(teacher)
    student = load_student(path)
    assert type(student.family.pipe) is type(family.pipe)
    record = json.loads((path / "fewstep_student.json").read_text())
    assert record["teacher"]["id"] == family.describe()["id"] and record["teacher"]["pipeline"] == family.name
    rows = 2
    x_T = _pipeline_noise(family, rows)
    if family.conditional:
        key = "prompt" if family.condition_kind == "text" else "class_labels"
        ours = student.sample(x_T, **{key: raw})
        assert ours.shape == (rows, *family.image_shape())
        # one noise, two conditions: the samples differ by the condition alone
        same_noise = x_T[:1].expand(2, *x_T.shape[1:])
        two = student.sample(same_noise, **{key: raw})
        assert (two[0] - two[1]).abs().max() > 1e-4, "two conditions gave the same sample"
        one = student.sample(same_noise, **{key: [raw[0]] * 2})
        assert (one[0] - one[1]).abs().max() < 1e-6
    else:
        ours = student.sample(x_T)
    if name == "classcond":
        return  # diffusers' DDPMPipeline has no class input (the family's docstring)
    theirs = _pipeline_images(family, path, raw, x_T, student.nfe)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours.clamp(-1, 1), theirs.clamp(-1, 1), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", ["sd", "classcond"])
def test_a_baked_guidance_student_refuses_guidance_and_a_conditioned_one_reads_it(teachers, tmp_path, name):
    teacher, data, raw = teachers[name]
    key = "prompt" if name == "sd" else "class_labels"
    (baked,) = run(teacher, data, tmp_path / "baked", "consistency", guidance={"mode": "baked", "scale": 3.0})
    student = load_student(baked)
    assert {k: student.student["guidance"][k] for k in ("mode", "scale")} == {"mode": "baked", "scale": 3.0}
    x_T = _pipeline_noise(student.family, 2)
    ours = student.sample(x_T, **{key: raw})
    with pytest.raises(TeacherError, match="baked in"):
        student.sample(x_T, **{key: raw}, guidance_scale=5.0)
    if name == "sd":  # its pipeline ignores guidance_scale (a zero-weight guidance input): no CFG on top
        assert student.student["guidance"]["pipeline_ignores_guidance_scale"]
        for w in (1.0, 7.5):
            theirs = _pipeline_images(student.family, baked, raw, x_T, student.nfe, guidance_scale=w)
            torch.testing.assert_close(ours.clamp(-1, 1), theirs.clamp(-1, 1), atol=2e-3, rtol=0)
    if name != "sd":
        with pytest.raises(TeacherError, match="needs a network with a guidance-scale embedding"):
            run(teacher, data, tmp_path / "cond", "consistency", guidance={"mode": "conditioned"})
        return
    (cond,) = run(teacher, data, tmp_path / "cond", "consistency",
                  guidance={"mode": "conditioned", "scale_range": [2.0, 6.0]})
    student = load_student(cond)
    assert student.family.denoiser_network.config.time_cond_proj_dim is not None
    a = student.sample(x_T, prompt=raw, guidance_scale=2.0)
    b = student.sample(x_T, prompt=raw, guidance_scale=6.0)
    with pytest.raises(TeacherError, match="outside the range"):
        student.sample(x_T, prompt=raw, guidance_scale=9.0)
    # the pipeline reads guidance_scale as the student's w (its UNet has time_cond_proj_dim: no CFG doubling)
    theirs = _pipeline_images(student.family, cond, raw, x_T, student.nfe, guidance_scale=6.0)
    torch.testing.assert_close(b.clamp(-1, 1), theirs.clamp(-1, 1), atol=2e-3, rtol=0)
    assert a.shape == b.shape


@pytest.mark.parametrize("fake_guided", [False, True])
def test_matching_methods_guide_the_teacher_only_or_the_fake_score_too(teachers, tmp_path, fake_guided):
    teacher, data, raw = teachers["sd"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    (path,) = run(teacher, {"name": "fashion_mnist", "prompts": str(prompts)}, tmp_path / "sim", "sim",
                  guidance={"mode": "baked", "scale": 2.0, "fake_guided": fake_guided})
    assert load_student(path).student["guidance"]["mode"] == "baked"


def test_refusals_are_one_clear_error_each(teachers, tmp_path):
    classcond, tree, _ = teachers["classcond"]
    sd, captions, _ = teachers["sd"]
    ldm, ldm_data, _ = teachers["ldm"]
    with pytest.raises(TeacherError, match="class-conditional; .* has no conditions"):
        run(classcond, {**tree, "conditions": "none"}, tmp_path / "a", "progressive")
    labelled = {"name": f"folder:{class_tree(tmp_path / 'tree16', 16)}"}
    with pytest.raises(TeacherError, match="takes prompts; .* has class labels: set prompt_template"):
        run(sd, labelled, tmp_path / "b", "progressive")
    with pytest.raises(TeacherError, match="is unconditional; the data config asks for conditions"):
        run(ldm, {**ldm_data, "conditions": "labels"}, tmp_path / "c", "progressive")
    with pytest.raises(TeacherError, match="does not fit"):
        run(sd, {**captions, "size": 8}, tmp_path / "d", "progressive")
    with pytest.raises(TeacherError, match="needs a conditional teacher"):
        run(ldm, ldm_data, tmp_path / "e", "progressive", guidance={"mode": "baked", "scale": 2.0})
    # a generator_init of another teacher (the committed Fashion-MNIST student): refused, not exported as yours
    from fewstep.teachers import FMNIST

    committed = FMNIST.parent / "fmnist_students" / "progressive-1"
    with pytest.raises(TeacherError, match="distilled from another teacher"):
        run(sd, captions, tmp_path / "f", "fdistill", fdistill={"generator_init": str(committed)})


def test_a_text_teacher_on_labelled_data_uses_the_prompt_template(teachers, tmp_path):
    sd, captions, _ = teachers["sd"]
    tree = {"name": f"folder:{class_tree(tmp_path / 'tree16', 16)}"}
    (path,) = run(sd, tree, tmp_path / "t", "consistency", prompt_template="a photo of a {}")
    assert load_student(path).nfe == 2
    cache = torch.load(tmp_path / "t" / "prepared_data.pt", weights_only=True)
    assert cache["table"]["encoder_hidden_states"].shape[0] == 3  # one embedding per class prompt, not per image


@pytest.mark.parametrize("override,match", [
    ("teacher={root}/nowhere", "is not a diffusers pipeline folder"),
    ("guidance.mode=baked", "needs a conditional teacher"),
    ("data.conditions=sideways", "conditions"),
])
def test_a_user_error_from_fewstep_distill_is_one_line_and_exit_2(teachers, tmp_path, capsys, override, match):
    from fewstep.cli import main

    ldm, data, _ = teachers["ldm"]
    args = ["distill", f"teacher={ldm}", f"data.name={data['name']}", f"train.output_dir={tmp_path / 'o'}",
            "train.steps=1", "train.batch_size=2", "train.progress=false", "progressive.start_steps=2",
            override.format(root=tmp_path)]
    try:
        code = main(args)
    except SystemExit as exit_:  # a config value refused as the config is read: argparse's usage exit
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    with pytest.raises(Exception, match=match):  # --debug: the exception itself, traceback and all
        main(args + ["--debug"])


def test_a_latent_teacher_without_its_autoencoder_is_refused(teachers, tmp_path):
    import shutil

    sd, captions, _ = teachers["sd"]
    broken = tmp_path / "no-vae"
    shutil.copytree(sd, broken)
    shutil.rmtree(broken / "vae")
    index = json.loads((broken / "model_index.json").read_text())
    index["vae"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match="has no 'vae' component"):
        run(broken, captions, tmp_path / "o", "progressive")
