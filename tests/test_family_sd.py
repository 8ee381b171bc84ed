"""Stable Diffusion (1.x / 2.x) and SDXL teachers: fewstep's conditions, latents, network calls and guidance are
the pipeline's own, checked against ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` runs on tiny
random pipelines built here from configs (no downloads).

``tiny_sd_pipeline`` and ``tiny_sdxl_pipeline`` write such a pipeline folder; other test files import them.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

#: Words the tiny tokenizer knows whole; any other lowercase text is spelled letter by letter.
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "blurry")
MAX_LENGTH = 16
PROMPTS = ["a photo of a cat", "a blue car"]


# -- tiny pipelines (importable by other test files) ----------------------------------------------------


def tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over ~80 tokens (letters, ``WORDS`` and their merges), written offline as
    ``vocab.json`` / ``merges.txt``: ids 0 and 1 are ``<|startoftext|>`` and ``<|endoftext|>`` (also the pad)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "c a", "ca t</w>"
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=MAX_LENGTH)


def _text_config(vocab_size: int, **kwargs):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1, **kwargs)


def _vae():
    from diffusers import AutoencoderKL

    # two levels: images are twice the latents' size, so image_shape's vae scale factor is tested
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def _scheduler(prediction_type: str = "epsilon", **kwargs):
    from diffusers import DDIMScheduler

    return DDIMScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kwargs)


def tiny_sd_pipeline(tmp_path: Path, prediction_type: str = "epsilon", **scheduler_kwargs) -> Path:
    """A tiny random ``StableDiffusionPipeline`` folder (8x8x4 latents, 16x16 images, no safety checker);
    ``scheduler_kwargs`` go to its ``DDIMScheduler`` (e.g. ``rescale_betas_zero_snr=True``)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer(tmp_path / "vocab")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
                                   tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(prediction_type, **scheduler_kwargs), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    # one folder per variant, so one tmp_path holds several
    path = tmp_path / "-".join(["sd", prediction_type, *(f"{k}={v}" for k, v in sorted(scheduler_kwargs.items()))])
    pipe.save_pretrained(path)
    return path


def tiny_sdxl_pipeline(tmp_path: Path) -> Path:
    """A tiny random ``StableDiffusionXLPipeline`` folder: two CLIP text encoders (hidden 32 each, the second
    with a 32-dim projection), a ``text_time`` UNet over 8x8x4 latents, 16x16 images."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer(tmp_path / "vocab")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer), projection_dim=32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(), add_watermarker=False)
    path = tmp_path / "sdxl"
    pipe.save_pretrained(path)
    return path


# -- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {"sd": tiny_sd_pipeline(root), "sd-v": tiny_sd_pipeline(root, "v_prediction"),
            "sd-v-zero-snr": tiny_sd_pipeline(root, "v_prediction", rescale_betas_zero_snr=True,
                                              timestep_spacing="trailing"),
            "sdxl": tiny_sdxl_pipeline(root)}


@pytest.fixture(scope="module")
def teachers(folders):
    from fewstep.distill.families import load_teacher

    return {name: load_teacher(path) for name, path in folders.items()}


def noise(rows: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def trailing_ddim(family):
    """The teacher's schedule with DDIM on trailing timesteps to t = 0 (what fewstep's ``ddim`` + ``trailing`` is).
    Trailing timesteps ignore ``steps_offset``; ``StableDiffusionPipeline`` rewrites any but 1 (with a warning)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(family.pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, steps_offset=1)


def run_pipe(family, net, z, steps, guidance_scale=1.0, prompts=PROMPTS, **call):
    """The pipeline with ``net`` and trailing DDIM, from latents ``z``: its final latents."""
    pipe = family.student_pipeline(net, trailing_ddim(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe(**family.pipeline_inputs(prompts, guidance_scale), num_inference_steps=steps, latents=z.clone(),
                output_type="latent", **call).images


def run_fewstep(family, net, z, steps, cond, guidance_scale=None):
    """fewstep's DDIM on trailing timesteps over ``family.forward``, guided (``GuidedDenoiser``) when asked."""
    from fewstep.distill.conditioning import Bound, GuidedDenoiser
    from fewstep.samplers import ModelDenoiser, Sampler

    if guidance_scale is None:
        denoiser = ModelDenoiser(family.call(net), family.schedule, family.prediction_type, **cond)
    else:
        guided = GuidedDenoiser(ModelDenoiser(family.call(net), family.schedule, family.prediction_type),
                                family.null(1), scale=guidance_scale)
        denoiser = Bound(guided, cond)
    return Sampler(denoiser, "ddim", steps=steps, timesteps="trailing").sample(z.clone())


def unet_inputs(family, **call):
    """The keyword arguments of the pipeline's first UNet call for ``PROMPTS`` (one step, latents out)."""
    seen = []
    hook = family.pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        family.pipe.set_progress_bar_config(disable=True)
        family.pipe(**family.pipeline_inputs(PROMPTS, call.pop("guidance_scale", 1.0)), num_inference_steps=1,
                    latents=noise(), output_type="latent", **call)
    finally:
        hook.remove()
    return seen[0]


def fresh(folders, name):
    """A teacher of its own, for tests that change its pipeline's config."""
    from fewstep.distill.families import load_teacher

    return load_teacher(folders[name])


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- the claims ---------------------------------------------------------------------------------------------


def test_load_teacher_picks_the_sd_and_sdxl_adapters(teachers):
    from fewstep.distill.families.sd import StableDiffusionFamily, StableDiffusionXLFamily

    for name, family in teachers.items():
        assert type(family) is (StableDiffusionXLFamily if name == "sdxl" else StableDiffusionFamily)
        assert family.condition_kind == "text" and family.latent and family.guidable
        assert family.accepts_guidance_input
        assert family.sample_shape() == (4, 8, 8) and family.image_shape() == (3, 16, 16)
    assert teachers["sd"].prediction_type == "epsilon" and teachers["sd-v"].prediction_type == "v_prediction"
    # zero terminal SNR, from the config (fewstep's schedule clamps alpha_T^2 = 0 up to 2**-24)
    assert teachers["sd-v-zero-snr"].schedule.alpha(torch.tensor(999.0)) < 1e-3 < teachers["sd"].schedule.alpha(
        torch.tensor(999.0))
    assert teachers["sdxl"].describe()["pipeline"] == "StableDiffusionXLPipeline"


def test_sd_conditions_are_what_the_pipeline_feeds_its_unet(teachers):
    family = teachers["sd"]
    cond = family.encode(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, MAX_LENGTH, 32)
    ids = family.pipe.tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="pt").input_ids
    assert torch.equal(cond["encoder_hidden_states"], family.pipe.text_encoder(ids)[0])
    negative, positive = unet_inputs(family, guidance_scale=3.0)["encoder_hidden_states"].chunk(2)  # CFG
    assert torch.equal(positive, cond["encoder_hidden_states"])
    close(negative, family.null(2)["encoder_hidden_states"], 1e-6)  # "" once here, per prompt there
    assert not torch.equal(family.null(1)["encoder_hidden_states"], cond["encoder_hidden_states"][:1])


def test_sd_null_contrasts_with_the_negative_prompt_when_one_is_set(folders):
    family = fresh(folders, "sd")
    family.negative_prompt = "blurry"
    seen = unet_inputs(family, guidance_scale=3.0)  # pipeline_inputs passes the negative prompt
    close(seen["encoder_hidden_states"][:2], family.null(2)["encoder_hidden_states"], 1e-6)
    assert not torch.equal(family.null(1)["encoder_hidden_states"], family.null_from("")["encoder_hidden_states"])
    assert family.describe()["negative_prompt"] == "blurry"


def test_sdxl_conditions_and_its_zero_negative_are_what_the_pipeline_feeds_its_unet(folders, teachers):
    family = teachers["sdxl"]
    cond = family.encode(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, MAX_LENGTH, 64)
    assert cond["text_embeds"].shape == (2, 32)
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    null = family.null(2)
    assert family.pipe.config.force_zeros_for_empty_prompt  # SDXL's default: a zero negative
    assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()

    def check(family, cond, null):  # the pipeline's UNet batch is [negative; prompt]
        seen = unet_inputs(family, guidance_scale=3.0)
        seen = {"encoder_hidden_states": seen["encoder_hidden_states"], **seen["added_cond_kwargs"]}
        for key, value in seen.items():
            negative, positive = value.chunk(2)
            assert torch.equal(positive, cond[key]), key
            close(negative, null[key], 1e-6)  # "" once here, per prompt there

    check(family, cond, null)
    other = fresh(folders, "sdxl")
    other.pipe.register_to_config(force_zeros_for_empty_prompt=False)  # then "" is encoded, as SD does
    assert other.null(1)["text_embeds"].any()
    check(other, cond, other.null(2))
    other.negative_prompt = "blurry"
    check(other, cond, other.null(2))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_two_prompts_give_different_network_outputs(teachers, name):
    family = teachers[name]
    x = noise(1).expand(2, -1, -1, -1)
    out = family.forward(family.pipe.unet, x, torch.tensor([500.0, 500.0]), family.encode(PROMPTS))
    assert out.shape == x.shape and not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_latents_decode_as_the_pipeline_decodes_and_encode_inverts_the_scaling(folders, name):
    family = fresh(folders, name)
    vae = family.pipe.vae
    if name == "sdxl":  # the pipeline's latents_mean / latents_std de-normalisation
        vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 1.0, 2.0, 1.5])
    else:  # StableDiffusionPipeline ignores a shift_factor: so does the adapter
        vae.register_to_config(shift_factor=0.5)
    z = noise()
    latents = run_pipe(family, family.pipe.unet, z, 1)
    images = family.student_pipeline(family.pipe.unet, trailing_ddim(family))(
        **family.pipeline_inputs(PROMPTS), num_inference_steps=1, latents=z.clone(), output_type="pt").images
    decoded = family.decode_latents(latents)
    assert decoded.shape == (2, 3, 16, 16)
    close((decoded / 2 + 0.5).clamp(0, 1), images)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    encoded = family.encode_images(x)
    assert encoded.shape == (2, 4, 8, 8) and torch.equal(encoded, family.encode_images(x))  # the mode: deterministic
    close(family.decode_latents(encoded), vae.decode(vae.encode(x).latent_dist.mode()).sample)


@pytest.mark.parametrize("name", ["sd", "sd-v", "sd-v-zero-snr", "sdxl"])
def test_fewstep_ddim_on_trailing_timesteps_is_the_pipelines_ddim(teachers, name):
    family = teachers[name]
    z = noise()
    ours = run_fewstep(family, family.pipe.unet, z, 2, family.encode(PROMPTS))
    assert torch.isfinite(ours).all()
    # diffusers' DDIM keeps alpha_T = 0; fewstep clamps it to 2**-12 (the schedule's docstring): 1e-3 apart
    close(ours, run_pipe(family, family.pipe.unet, z, 2), 2e-3 if "zero-snr" in name else 1e-5)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_guided_denoiser_is_the_pipelines_classifier_free_guidance(teachers, name):
    family = teachers[name]
    z = noise()
    ours = run_fewstep(family, family.pipe.unet, z, 2, family.encode(PROMPTS), guidance_scale=3.0)
    close(ours, run_pipe(family, family.pipe.unet, z, 2, guidance_scale=3.0))
    assert not torch.allclose(ours, run_fewstep(family, family.pipe.unet, z, 2, family.encode(PROMPTS)))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_a_guidance_input_starts_as_the_teacher_and_then_is_the_pipelines_w(teachers, name):
    from fewstep.distill.families import GUIDANCE_KEY

    family = teachers[name]
    teacher = family.pipe.unet
    student = family.with_guidance_input(teacher)
    assert student.config.time_cond_proj_dim == 256 and teacher.config.time_cond_proj_dim is None
    assert not student.training and family.with_guidance_input(student) is student
    cond, x, t = family.encode(PROMPTS), noise(), torch.tensor([999.0, 250.0])
    expected = family.forward(teacher, x, t, cond)
    for w in (1.0, 7.5):
        assert torch.equal(family.forward(student, x, t, {**cond, GUIDANCE_KEY: torch.full((2,), w)}), expected)

    with torch.no_grad():  # now w matters: the w-conditioned network in the pipeline is fewstep's forward
        student.time_embedding.cond_proj.weight.normal_(generator=torch.Generator().manual_seed(2))
    z = noise()
    ours = {w: run_fewstep(family, student, z, 2, {**cond, GUIDANCE_KEY: torch.full((2,), w)}) for w in (2.5, 6.0)}
    close(ours[2.5], run_pipe(family, student, z, 2, guidance_scale=2.5))
    assert not torch.allclose(ours[2.5], ours[6.0])


def test_export_writes_a_loadable_pipeline_that_keeps_the_teachers_flags(folders, tmp_path):
    from diffusers import DiffusionPipeline

    from fewstep.distill.families import TeacherError, load_teacher

    for name in ("sd", "sdxl"):
        family = fresh(folders, name)
        if name == "sdxl":
            family.pipe.register_to_config(force_zeros_for_empty_prompt=False)
        student = family.with_guidance_input(family.pipe.unet)
        family.export(student, trailing_ddim(family), tmp_path / name)
        loaded = DiffusionPipeline.from_pretrained(tmp_path / name)
        assert type(loaded) is type(family.pipe) and loaded.unet.config.time_cond_proj_dim == 256
        assert loaded.scheduler.config.timestep_spacing == "trailing"
        if name == "sd":
            assert loaded.safety_checker is None and loaded.config.requires_safety_checker is False
        else:
            assert loaded.config.force_zeros_for_empty_prompt is False
        exported = load_teacher(tmp_path / name)
        with pytest.raises(TeacherError, match="guidance_scale"):  # a w-conditioned network needs its w
            exported.forward(exported.pipe.unet, noise(), torch.tensor([1.0, 1.0]), exported.encode(PROMPTS))


def test_misuse_is_one_clear_error(teachers):
    from fewstep.distill.families import GUIDANCE_KEY, TeacherError

    family = teachers["sd"]
    cond, x, t = family.encode(PROMPTS), noise(), torch.tensor([1.0, 1.0])
    with pytest.raises(TeacherError, match="time_cond_proj_dim"):
        family.forward(family.pipe.unet, x, t, {**cond, GUIDANCE_KEY: torch.ones(2)})
    with pytest.raises(TeacherError, match="encoder_hidden_states"):
        family.forward(family.pipe.unet, x, t, {**cond, "class_labels": torch.ones(2)})
    with pytest.raises(TeacherError, match="list of prompt strings"):
        family.encode("a cat")
    with pytest.raises(TeacherError, match="time_cond_proj_dim"):
        family.with_guidance_input(torch.nn.Linear(2, 2))
