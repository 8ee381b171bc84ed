"""PixArt-Sigma teachers: fewstep's conditions, latents, network calls and guidance are the pipeline's own, checked
against ``PixArtSigmaPipeline`` runs on a tiny random pipeline built here from configs (a T5 encoder with the
tokenizer ``test_family_sd3`` makes in code, a learned-sigma transformer: no downloads).

``tiny_pixart_pipeline`` is imported by ``test_distill_families`` (every method through ``fewstep distill``).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_family_sd3 import tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae  # noqa: E402

from fewstep.distill.families import GUIDANCE_KEY, TeacherError, load_teacher, pixart  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a blue car"]


# -- a tiny pipeline (importable by other test files) -----------------------------------------------------


def tiny_transformer(**overrides):
    """A three-block PixArt transformer on 8x8x4 latents in 2x2 patches, width 16, predicting a learned variance
    (8 output channels), reading T5 of width 32."""
    from diffusers import PixArtTransformer2DModel

    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, cross_attention_dim=16, caption_channels=32, use_additional_conditions=False)
    return PixArtTransformer2DModel(**{**config, **overrides})


def tiny_pixart_pipeline(tmp_path: Path) -> Path:
    """A tiny random ``PixArtSigmaPipeline`` folder: ``tiny_transformer``, T5 (width 32), 16x16 images (a VAE with a
    shift factor, which PixArt ignores), PixArt-Sigma's ``DPMSolverMultistepScheduler`` (linear betas, epsilon)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=tiny_t5_encoder(len(tokenizer), 32), vae=tiny_vae(4),
                               transformer=tiny_transformer(),
                               scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001,
                                                                     beta_end=0.02, prediction_type="epsilon"))
    path = tmp_path / "pixart"
    pipe.save_pretrained(path)
    return path


# -- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="module")
def family(folder):
    return load_teacher(folder)


def noise(rows: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def run_pipe(family, z, steps, guidance_scale=None, pipe=None, output_type="latent"):
    """The pipeline's output from ``z`` (its own scheduler)."""
    pipe = pipe or family.pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe(**family.pipeline_inputs(PROMPTS, guidance_scale), num_inference_steps=steps, latents=z.clone(),
                output_type=output_type).images


def run_fewstep(family, z, steps, guidance_scale=None, net=None):
    """fewstep's DDIM over ``family.call`` on the teacher's trailing grid, guided if asked."""
    from fewstep.distill.conditioning import Bound, GuidedDenoiser
    from fewstep.samplers import ModelDenoiser, Sampler

    denoiser = ModelDenoiser(family.call(net or family.pipe.transformer), family.schedule, family.prediction_type)
    if guidance_scale is not None:
        denoiser = GuidedDenoiser(denoiser, family.null(1), scale=guidance_scale)
    bound = Bound(denoiser, family.encode(PROMPTS))
    with torch.no_grad():
        return Sampler(bound, "ddim", steps=steps, timesteps=family.noise.grid_rule()).sample(z.clone())


def first_transformer_call(family, guidance_scale=None):
    """``(args, kwargs, output)`` of the pipeline's first transformer call for ``PROMPTS``."""
    seen = []
    hook = family.pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw, out)),
                                                         with_kwargs=True)
    try:
        run_pipe(family, noise(), 1, guidance_scale)
    finally:
        hook.remove()
    return seen[0]


# -- the claims ---------------------------------------------------------------------------------------------


def test_load_teacher_reads_a_pixart_sigma_folder_as_a_ddpm_teacher(family):
    assert type(family) is pixart.PixArtSigmaFamily and family.noise.kind == "ddpm"
    assert type(family.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert family.prediction_type == "epsilon" and family.noise.n_train == 1000
    assert family.condition_kind == "text" and family.latent and family.guidable and not family.lora_loadable
    assert family.sample_shape() == (4, 8, 8) and family.image_shape() == (3, 16, 16)
    assert family.pipe.transformer.config.out_channels == 8  # mean and learned variance
    assert family.describe()["pipeline"] == "PixArtSigmaPipeline" and family.describe()["max_sequence_length"] == 300


def test_conditions_and_null_are_what_the_pipeline_feeds_its_transformer(family):
    cond = family.encode(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 300, 32) and cond["encoder_attention_mask"].shape == (2, 300)
    # one token a word, then </s>; the padding is masked out
    assert cond["encoder_attention_mask"].sum(1).tolist() == [6, 4]
    args, seen, out = first_transformer_call(family, guidance_scale=3.0)  # CFG: the batch is [negative; prompt]
    null = family.null(2)
    for key in ("encoder_hidden_states", "encoder_attention_mask"):
        negative, positive = seen[key].chunk(2)
        assert torch.equal(positive, cond[key]), key
        assert torch.equal(negative, null[key]), key
    assert null["encoder_attention_mask"].sum(1).tolist() == [1, 1]  # "" is </s> alone
    assert seen["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    assert torch.equal(seen["timestep"], torch.full((4,), 999))  # the integer timestep, broadcast
    # and the transformer's output there is what family.call gives at t = 999 (the variance half dropped)
    x, t = args[0][2:], torch.full((2,), 999.0, dtype=torch.float64)
    with torch.no_grad():
        ours = family.call(family.pipe.transformer)(x, t, **cond)
    assert ours.shape == x.shape
    close(ours, out[0][2:, :4])


def test_the_attention_mask_hides_the_padding_from_the_transformer(family):
    cond, x, t = family.encode(PROMPTS), noise(), torch.tensor([500.0, 500.0], dtype=torch.float64)
    padded = ~cond["encoder_attention_mask"].bool()
    scrambled = {**cond, "encoder_hidden_states": torch.where(padded[..., None], 7.0, cond["encoder_hidden_states"])}
    unmasked = {**cond, "encoder_attention_mask": torch.ones_like(cond["encoder_attention_mask"])}
    model = family.call(family.pipe.transformer)
    with torch.no_grad():
        out = model(x, t, **cond)
        close(model(x, t, **scrambled), out)
        assert not torch.allclose(model(x, t, **unmasked), out)


def test_a_shorter_max_sequence_length_reaches_the_pipeline_too(family):
    short = copy.copy(family)
    short.max_sequence_length = 12
    cond = short.encode(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 12, 32)
    assert short.null(2)["encoder_attention_mask"].shape == (2, 12)
    _, seen, _ = first_transformer_call(short)  # pipeline_inputs passes max_sequence_length
    assert torch.equal(seen["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert torch.equal(seen["encoder_attention_mask"], cond["encoder_attention_mask"])


def test_null_contrasts_with_the_negative_prompt_when_one_is_set(family):
    blurry = copy.copy(family)
    blurry.negative_prompt = "blurry"
    _, seen, _ = first_transformer_call(blurry, guidance_scale=3.0)  # pipeline_inputs passes the negative prompt
    null = blurry.null(2)
    for key in ("encoder_hidden_states", "encoder_attention_mask"):
        assert torch.equal(seen[key][:2], null[key]), key
    assert not torch.allclose(null["encoder_hidden_states"], family.null(2)["encoder_hidden_states"])
    assert blurry.describe()["negative_prompt"] == "blurry"


def test_two_prompts_give_different_network_outputs(family):
    x = noise(1).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = family.call(family.pipe.transformer)(x, torch.tensor([500.0, 500.0], dtype=torch.float64),
                                                   **family.encode(PROMPTS))
    assert out.shape == x.shape and not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_one_ddim_step_from_noise_is_the_pipelines_step(family, guidance_scale):
    """One step of the teacher's DPM-Solver++ from t = 999 to clean data is DDIM's: ``x0`` from the (guided) eps."""
    z = noise()
    ours = run_fewstep(family, z, 1, guidance_scale)
    assert family.noise.grid(1).t[:-1].tolist() == [999.0]  # then clean data
    close(ours, run_pipe(family, z, 1, guidance_scale), 1e-4)
    if guidance_scale is not None:
        assert not torch.allclose(ours, run_fewstep(family, z, 1))


def test_latents_decode_as_the_pipeline_decodes_and_encode_inverts_the_scale(family):
    z = noise()
    latents = run_pipe(family, z, 1)
    images = run_pipe(family, z, 1, output_type="pt")
    with torch.no_grad():
        decoded = family.decode_latents(latents)
        assert decoded.shape == (2, 3, 16, 16)
        close((decoded / 2 + 0.5).clamp(0, 1), images)
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        encoded = family.encode_images(x)
        vae = family.pipe.vae
        mode = vae.encode(x).latent_dist.mode()
    assert vae.config.shift_factor and encoded.shape == (2, *family.sample_shape())
    close(encoded, mode * vae.config.scaling_factor)  # no shift: the pipeline decodes x / scaling_factor
    close(family.decode_latents(encoded), vae.decode(mode).sample)


def test_feature_map_is_the_middle_blocks_tokens_over_the_patch_grid(family):
    net = family.pipe.transformer
    block, channels = family.feature_block(net)
    assert block is net.transformer_blocks[1] and channels == 16
    seen = []
    hook = block.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            family.call(net)(noise(), torch.tensor([500.0, 500.0], dtype=torch.float64), **family.encode(PROMPTS))
    finally:
        hook.remove()
    assert seen[0].shape == (2, 16, 16)  # 4x4 patches of width 16
    features = family.feature_map(seen[0], noise())
    assert features.shape == (2, 16, 4, 4)
    assert torch.equal(features[:, :, 1, 2], seen[0][:, 1 * 4 + 2])  # row-major, as PatchEmbed flattens


def test_lora_targets_name_every_attention_and_feed_forward_projection(family):
    from fewstep.distill.lora import LoRA, inject

    net = copy.deepcopy(family.pipe.transformer)
    names = [name for name, _ in net.named_modules()]
    counts = {target: sum(name.endswith("." + target) for name in names) for target in family.lora_targets}
    # self- and cross-attention in each of the three blocks, one feed-forward each
    assert counts == {**dict.fromkeys(("to_q", "to_k", "to_v", "to_out.0"), 6), "ff.net.0.proj": 3, "ff.net.2": 3}
    inject(net, LoRA(rank=2, targets=family.lora_targets))
    cond, x, t = family.encode(PROMPTS), noise(), torch.tensor([900.0, 300.0], dtype=torch.float64)
    with torch.no_grad():  # B = 0: the LoRA student starts as the teacher
        close(family.call(net)(x, t, **cond), family.call(family.pipe.transformer)(x, t, **cond), 0)


def test_a_student_exports_as_a_pixart_sigma_pipeline_that_samples_its_grid(family, tmp_path):
    from diffusers import PixArtSigmaPipeline

    student = copy.deepcopy(family.pipe.transformer)
    family.export(student, family.noise.student_scheduler(family.noise.grid(2), "epsilon"), tmp_path / "s")
    loaded = PixArtSigmaPipeline.from_pretrained(tmp_path / "s")
    assert type(loaded) is PixArtSigmaPipeline and type(loaded.scheduler).__name__ == "DDIMScheduler"
    z = noise()
    close(run_pipe(family, z, 2, pipe=loaded), run_fewstep(family, z, 2), 1e-4)  # trailing 999, 499
    again = load_teacher(tmp_path / "s")
    assert type(again) is pixart.PixArtSigmaFamily and again.noise.kind == "ddpm"


def test_misuse_is_one_clear_error(family, folder):
    cond, x, t = family.encode(PROMPTS), noise(), torch.tensor([999.0, 999.0], dtype=torch.float64)
    with pytest.raises(TeacherError, match="encoder_attention_mask"):
        family.call(family.pipe.transformer)(x, t, encoder_hidden_states=cond["encoder_hidden_states"])
    with pytest.raises(TeacherError, match="guidance input"):
        family.call(family.pipe.transformer)(x, t, **cond, **{GUIDANCE_KEY: torch.ones(2)})
    with pytest.raises(TeacherError, match="list of prompt strings"):
        family.encode("a cat")
    micro = tiny_transformer(use_additional_conditions=True)  # PixArt-Alpha's resolution and aspect ratio
    alpha = type(family.pipe)(**{**family.pipe.components, "transformer": micro})
    with pytest.raises(TeacherError, match="micro-conditions"):
        pixart.PixArtSigmaFamily(alpha, folder)


# -- through fewstep distill (every method's plain run is in test_distill_families' matrix) ---------------


def test_f_distills_discriminator_trains_on_the_transformers_middle_tokens(folder, tmp_path):
    from test_distill_families import caption_folder, run

    data = {"name": f"folder:{caption_folder(tmp_path / 'caps', 16)}"}
    run(folder, data, tmp_path / "run", "fdistill", fdistill={"discriminator": True, "gan_weight": 0.1, "f": "js"})
    last = json.loads((tmp_path / "run" / "history.json").read_text())[-1]
    assert math.isfinite(last["disc"]) and math.isfinite(last["gan"]) and last["gan"] != 0


def test_a_guidance_baked_student_samples_as_its_pipeline_without_guidance(family, folder, tmp_path):
    from test_distill_families import _pipeline_images, caption_folder, run

    from fewstep.distill.students import load_student

    data = {"name": f"folder:{caption_folder(tmp_path / 'caps', 16)}"}
    (path,) = run(folder, data, tmp_path / "run", "consistency", guidance={"mode": "baked", "scale": 3.0})
    student = load_student(path)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = student.sample(x_T, prompt=PROMPTS)
    theirs = _pipeline_images(family, path, PROMPTS, x_T, student.nfe)  # guidance_scale 1: no CFG on top
    torch.testing.assert_close(ours.clamp(-1, 1), theirs.clamp(-1, 1), atol=2e-3, rtol=0)
