"""Distil an SD3 and a Flux teacher: every method through ``fewstep distill`` on a tiny random pipeline (built from
configs, no downloads), a few optimizer steps each. Each student is exported as the teacher's own pipeline class with
a ``FewstepScheduler``, loads with that class, and ``pipe(prompt, num_inference_steps=k, latents=x_T)`` is
``load_student(path).sample(x_T, prompt=...)``; two prompts give two samples from one noise.

Conditions come from the data's class labels through ``prompt_template`` (PD, MCM, f-distill's discriminator: they
read images, here fake Fashion-MNIST at the pipeline's pixel size), or from ``data.prompts`` (the data-free methods).
Flux runs at its pipeline's default size (128x128 latents, 4096 tokens), so its runs take ~10-30 s each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_family_flux import tiny_flux_pipeline  # noqa: E402
from test_family_sd3 import tiny_sd3_pipeline  # noqa: E402

from fewstep.config import DistillConfig, from_dict  # noqa: E402
from fewstep.distill import load_student  # noqa: E402
from fewstep.distill.families import load_teacher  # noqa: E402
from fewstep.distill.run import distill  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a blue car"]
TEMPLATE = "a photo of a {}"
#: fake Fashion-MNIST images read (labels 0..7: eight class prompts)
LIMIT = 8

#: method -> (its section, whether it reads images, the student's steps)
METHODS = {
    "progressive": ({"start_steps": 4, "end_steps": 2, "prediction_type": "teacher"}, True, 2),
    "consistency": ({"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 4, "prediction_type": "teacher"},
                    True, 2),
    "fdistill": ({"prediction_type": "teacher", "update_ratio": 1}, False, 1),
    "fdistill-gan": ({"prediction_type": "teacher", "update_ratio": 1, "discriminator": True, "gan_weight": 0.1},
                     True, 1),
    "sim": ({"prediction_type": "teacher", "update_ratio": 1}, False, 1),
}


#: Flux runs at its pipeline's default size (4096 tokens): its cases take 15-35 s each, so they are marked slow
#: (the code paths SD3's cover; Flux's adapter parity is tests/test_family_flux.py, FluxPipeline's
#: set_begin_index(0) on a one-step grid tests/test_distill_noise.py)
CASES = [pytest.param(name, case, marks=pytest.mark.slow if name == "flux" else ())
         for name in ("sd3", "flux") for case in METHODS]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """name -> (pipeline folder, its pipeline class name, its images' side)."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, build in [("sd3", tiny_sd3_pipeline), ("flux", tiny_flux_pipeline)]:
        folder = build(root / name)
        family = load_teacher(folder)
        out[name] = (folder, family.name, family.image_shape()[-1])
    return out


def run(teacher: Path, size: int, case: str, idx_folder: Path, out: Path) -> Path:
    """``fewstep distill`` for a few optimizer steps on images of ``size`` pixels; the last student's folder."""
    section, reads_images, _ = METHODS[case]
    method = case.split("-")[0]
    if reads_images:  # labels -> prompts through the template
        data = {"name": "fashion_mnist", "root": str(idx_folder), "size": size, "channels": 3, "limit": LIMIT}
    else:
        prompts = out.parent / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        data = {"name": "fashion_mnist", "prompts": str(prompts)}
    config = from_dict(DistillConfig, {
        "teacher": str(teacher), "method": method, method: section, "prompt_template": TEMPLATE, "data": data,
        "train": {"output_dir": str(out), "steps": 2, "batch_size": 2, "lr": 1e-4, "checkpoint_every": 2,
                  "log_every": 2, "progress": False, "cpu": True, "ema_decay": 0.0}})
    return distill(config)[-1]


def pipeline_latents(path: Path, family, prompts: list[str], x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The student folder's own pipeline from ``x_T`` (``[B, C, H, W]``; packed in and unpacked out for Flux):
    its final latents."""
    pipe = type(family.pipe).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FewstepScheduler" and pipe.scheduler.config.noise_schedule == "flow"
    inputs = family.pipeline_inputs(prompts)  # Flux-dev: its embedded guidance; SD3: no CFG
    if family.name != "FluxPipeline":
        return pipe(**inputs, num_inference_steps=steps, latents=x_T.clone(), output_type="latent").images
    b, c, h, w = x_T.shape
    factor = pipe.vae_scale_factor
    out = pipe(**inputs, num_inference_steps=steps, latents=pipe._pack_latents(x_T.clone(), b, c, h, w),
               height=h * factor, width=w * factor, output_type="latent").images
    return pipe._unpack_latents(out, h * factor, w * factor, factor)


# -- the claims ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,case", CASES)
def test_every_method_distils_the_teacher_into_its_own_pipeline(teachers, idx_folder, tmp_path, name, case):
    teacher, pipeline, size = teachers[name]
    path = run(teacher, size, case, idx_folder, tmp_path / "run")
    steps = METHODS[case][2]
    student = load_student(path)
    family = student.family
    assert path.name == f"{case.split('-')[0]}-{steps}" and family.name == pipeline
    assert student.student["noise"] == "flow" and student.nfe == steps
    assert student.student["timesteps"] == pytest.approx(family.noise.grid(steps).t[:-1].tolist(), rel=1e-12)
    if METHODS[case][1]:  # one prompt per class the data holds, from its labels
        cache = torch.load(tmp_path / "run" / "prepared_data.pt", weights_only=True)
        assert cache["table"]["pooled_projections"].shape[0] == LIMIT
    if case == "fdistill-gan":  # the GAN head trained on the transformer's features, and the generator's term
        last = json.loads((tmp_path / "run" / "history.json").read_text())[-1]
        assert math.isfinite(last["disc"]) and math.isfinite(last["gan"])

    # one noise, two prompts: the pipeline's samples, and they differ by the prompt alone
    x_T = torch.randn(1, *family.sample_shape(), generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    ours = student.sample(x_T, prompt=PROMPTS, output_type="latent")
    torch.testing.assert_close(ours, pipeline_latents(path, family, PROMPTS, x_T, steps), rtol=1e-4, atol=1e-4)
    assert (ours[0] - ours[1]).abs().max() > 1e-3, "two prompts gave the same sample"
