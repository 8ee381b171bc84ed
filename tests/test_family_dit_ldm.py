"""DiT and LDM teachers: ``load_teacher`` picks their adapters, fewstep's samplers over the adapters reproduce
``DiTPipeline`` / ``LDMPipeline`` from the same noise (guided and unguided), a DiT student exports with its
class names, and a DiT that ``DiTPipeline`` cannot guide is refused guidance in one clear line.

``tiny_dit_pipeline`` and ``tiny_ldm_pipeline`` build tiny random teacher folders (no downloads); other test
files import them from here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fewstep.distill.families import TeacherError, load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish", 7: "cock"}


def tiny_dit_pipeline(tmp_path, num_classes: int = 1000, seed: int = 0) -> Path:
    """A saved ``DiTPipeline``: a one-block DiT with learned variance (8 output channels over 4 latent
    channels, 4x4 latents), a two-level AutoencoderKL (8x8 images), a DDIMScheduler and ``ID2LABEL``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2,
                                            num_embeds_ada_norm=num_classes, norm_num_groups=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8)
    pipe = DiTPipeline(transformer, vae, DDIMScheduler(clip_sample=False), id2label=ID2LABEL)
    pipe.register_to_config(id2label={str(k): v for k, v in ID2LABEL.items()})  # as the hub's DiT folders have it
    path = Path(tmp_path) / f"dit{num_classes}"
    pipe.save_pretrained(path)
    return path


def tiny_ldm_pipeline(tmp_path, seed: int = 0) -> Path:
    """A saved ``LDMPipeline``: a tiny UNet2DModel on 3x4x4 latents, a two-level VQModel (8x8 images, 16 codes)
    and LDM's DDIMScheduler (scaled-linear betas 0.0015..0.0195)."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DModel(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           norm_num_groups=8)
        vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, num_vq_embeddings=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    path = Path(tmp_path) / "ldm"
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return load_teacher(tiny_dit_pipeline(tmp_path_factory.mktemp("dit")))


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    return load_teacher(tiny_ldm_pipeline(tmp_path_factory.mktemp("ldm")))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ddim_trailing(family):
    """The DDIM that fewstep's ``"ddim"`` on ``"trailing"`` timesteps is, on the teacher's betas."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(family.pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, steps_offset=0)


def native_images(family, x_T, cond=None, scale=1.0, steps=2):
    """fewstep's DDIM over the adapter (guided at ``scale`` when > 1), decoded, as the pipelines post-process."""
    from fewstep.distill.conditioning import Bound, GuidedDenoiser
    from fewstep.samplers import ModelDenoiser, Sampler

    den = ModelDenoiser(family.call(family.denoiser_network), family.schedule, family.prediction_type)
    if scale > 1:
        den = GuidedDenoiser(den, family.null(1), scale=scale)
    x0 = Sampler(Bound(den, cond or {}), "ddim", steps=steps, timesteps="trailing").sample(x_T)
    with torch.no_grad():
        return (family.decode_latents(x0) / 2 + 0.5).clamp(0, 1)


def assert_same_images(ours, ref):
    inside = ((ref > 0) & (ref < 1)).float().mean()
    assert inside > 0.5, "the images must not be clamped flat, or the comparison is vacuous"
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


# -- DiT ----------------------------------------------------------------------------------------------


def test_load_teacher_reads_a_dit_folder_as_a_class_conditional_latent_teacher(dit):
    assert type(dit).__name__ == "DiTFamily" and dit.latent and dit.condition_kind == "class"
    assert dit.num_classes == 1000 and dit.guidable
    assert dit.sample_shape() == (4, 4, 4) and dit.image_shape() == (3, 8, 8)
    assert dit.class_names[:3] == ["tench, Tinca tinca", "goldfish", "2"] and dit.class_names[7] == "cock"
    assert dit.null(3)["class_labels"].tolist() == [1000] * 3
    assert dit.pipeline_inputs([0], None) == {"class_labels": [0], "guidance_scale": 1.0}  # not DiTPipeline's 4


def test_a_legacy_transformer2dmodel_dit_folder_loads_as_dit(tmp_path):
    # the hub's facebook/DiT-* folders name their transformer Transformer2DModel; diffusers remaps it
    import json

    path = tiny_dit_pipeline(tmp_path)
    config = json.loads((path / "transformer" / "config.json").read_text())
    (path / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "Transformer2DModel"]}))
    family = load_teacher(path)
    assert type(family).__name__ == "DiTFamily" and family.guidable and family.num_classes == 1000


def test_dit_forward_depends_on_the_class_and_returns_the_latent_channels_only(dit):
    net = dit.denoiser_network
    x, t = torch.randn(2, 4, 4, 4, generator=gen(0)), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        out = dit.forward(net, x, t, dit.encode([0, 7]))
        same = dit.forward(net, x, t, dit.encode([0, 0]))
        raw = net(x, timestep=t, class_labels=torch.tensor([0, 7])).sample
    assert raw.shape[1] == 8 and out.shape == x.shape
    torch.testing.assert_close(out, raw[:, :4])
    assert (out[1] - same[1]).abs().max() > 1e-3, "two classes must give different outputs"


def test_a_dit_student_in_train_mode_still_sees_the_labels_it_is_given(dit):
    # LabelEmbedding drops 10% of labels to the null class in train mode; 64 rows would almost surely hit one
    student = copy.deepcopy(dit.denoiser_network).train()
    x, t = torch.randn(64, 4, 4, 4, generator=gen(1)), torch.full((64,), 300.0)
    cond = dit.encode([3] * 64)
    with torch.no_grad():
        trained = dit.forward(student, x, t, cond)
        frozen = dit.forward(dit.denoiser_network, x, t, cond)
    torch.testing.assert_close(trained, frozen)
    assert all(m.training for m in student.modules()), "the student's mode is left as it was"


def test_dit_encode_refuses_a_label_outside_its_classes(dit):
    assert dit.encode([0, 999])["class_labels"].dtype == torch.long
    with pytest.raises(TeacherError, match="class label 1000 is outside the teacher's classes 0..999"):
        dit.encode([1, 1000])


def test_dit_latents_round_trip_shapes(dit):
    images = torch.rand(2, 3, 8, 8, generator=gen(2)) * 2 - 1
    with torch.no_grad():
        latents = dit.encode_images(images)
        again = dit.encode_images(images)
        decoded = dit.decode_latents(latents)
    assert latents.shape == (2, *dit.sample_shape()) and decoded.shape == (2, *dit.image_shape())
    torch.testing.assert_close(latents, again, rtol=0, atol=0)  # the posterior's mode, not a sample


def test_fewstep_ddim_over_the_dit_adapter_is_dit_pipeline_unguided(dit):
    from diffusers.utils.torch_utils import randn_tensor

    pipe = dit.student_pipeline(dit.denoiser_network, ddim_trailing(dit))
    kwargs = dit.pipeline_inputs([0, 7], 1.0)
    ref = pipe(**kwargs, generator=gen(5), num_inference_steps=2, output_type="pt").images
    x_T = randn_tensor((2, *dit.sample_shape()), generator=gen(5))  # DiTPipeline's own draw
    assert_same_images(native_images(dit, x_T, dit.encode([0, 7])), ref)


def test_fewstep_guided_ddim_over_the_dit_adapter_is_dit_pipeline_at_scale_3(dit):
    from diffusers.utils.torch_utils import randn_tensor

    pipe = dit.student_pipeline(dit.denoiser_network, ddim_trailing(dit))
    ref = pipe(**dit.pipeline_inputs([0, 7], 3.0), generator=gen(6), num_inference_steps=2, output_type="pt").images
    x_T = randn_tensor((2, *dit.sample_shape()), generator=gen(6))
    ours = native_images(dit, x_T, dit.encode([0, 7]), scale=3.0)
    assert_same_images(ours, ref)
    unguided = native_images(dit, x_T, dit.encode([0, 7]))
    assert (unguided - ref).abs().max() > 1e-3, "guidance must matter, or the claim is vacuous"


def test_a_dit_student_exports_as_a_dit_pipeline_with_the_teachers_labels(dit, tmp_path):
    from diffusers import DiTPipeline

    student = copy.deepcopy(dit.denoiser_network)
    dit.export(student, ddim_trailing(dit), tmp_path / "student")
    loaded = DiTPipeline.from_pretrained(tmp_path / "student")
    assert loaded.labels == dit.pipe.labels and loaded.labels["Tinca tinca"] == 0 and loaded.labels["cock"] == 7
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    again = load_teacher(tmp_path / "student")
    assert again.class_names == dit.class_names and again.guidable


def test_a_dit_without_class_1000_is_refused_guidance_in_one_line(tmp_path):
    family = load_teacher(tiny_dit_pipeline(tmp_path, num_classes=10))
    assert family.num_classes == 10 and not family.guidable
    with pytest.raises(TeacherError, match="guides with null class 1000, but this transformer has 10 classes") as err:
        family.null(1)
    assert "\n" not in str(err.value) and "use guidance.mode none" in str(err.value)
    with pytest.raises(TeacherError, match="null class 1000"):
        family.pipeline_inputs([1], 3.0)
    assert family.pipeline_inputs([1], 1.0) == {"class_labels": [1], "guidance_scale": 1.0}
    with pytest.raises(TeacherError, match="class label 10 is outside"):
        family.encode([10])


def test_a_dit_without_the_cfg_row_is_refused_guidance(dit):
    # DiTTransformer2DModel always builds the row; a checkpoint trained without class dropout has none
    from fewstep.distill.families.dit import DiTFamily, label_embeddings

    net = copy.deepcopy(dit.denoiser_network)
    for m in label_embeddings(net):
        m.embedding_table = torch.nn.Embedding(1000, m.embedding_table.embedding_dim)
    family = DiTFamily(dit.student_pipeline(net, dit.pipe.scheduler), dit.path)
    with pytest.raises(TeacherError, match=r"no row for the null class 1000"):
        family.null(1)


# -- LDM ----------------------------------------------------------------------------------------------


def test_load_teacher_reads_an_ldm_folder_as_an_unconditional_latent_teacher(ldm):
    assert type(ldm).__name__ == "LDMFamily" and ldm.latent and not ldm.conditional and not ldm.guidable
    assert ldm.sample_shape() == (3, 4, 4) and ldm.image_shape() == (3, 8, 8)
    assert ldm.encode([]) == {} and ldm.pipeline_inputs(None) == {}
    with pytest.raises(TeacherError, match="is unconditional"):
        ldm.encode([1])
    with pytest.raises(TeacherError, match="cannot be guided"):
        ldm.null(1)


def test_ldm_latents_round_trip_shapes(ldm):
    images = torch.rand(2, 3, 8, 8, generator=gen(2)) * 2 - 1
    with torch.no_grad():
        latents = ldm.encode_images(images)
        decoded = ldm.decode_latents(latents)
        raw = ldm.pipe.vqvae.encode(images).latents
    assert latents.shape == (2, *ldm.sample_shape()) and decoded.shape == (2, *ldm.image_shape())
    torch.testing.assert_close(latents, raw * ldm.pipe.vqvae.config.scaling_factor)


def test_fewstep_ddim_over_the_ldm_adapter_is_ldm_pipeline(ldm):
    from diffusers.utils.torch_utils import randn_tensor

    pipe = ldm.student_pipeline(ldm.denoiser_network, ddim_trailing(ldm))
    assert pipe.scheduler.init_noise_sigma == 1.0  # LDMPipeline scales its noise by it: the VP prior as drawn
    ref = pipe(batch_size=2, generator=gen(7), num_inference_steps=2, output_type="np").images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2)
    x_T = randn_tensor((2, *ldm.sample_shape()), generator=gen(7))  # LDMPipeline's own draw
    assert_same_images(native_images(ldm, x_T), ref)
