"""Stable Diffusion 3 teachers: fewstep's conditions, latents, network calls and guidance are the pipeline's own,
checked against ``StableDiffusion3Pipeline`` runs on a tiny random pipeline built here from configs (two CLIP
encoders with projections and a T5 encoder, with tokenizers made in code: no downloads).

``tiny_t5_tokenizer`` and ``tiny_t5_encoder`` are imported by ``test_family_flux``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_family_sd import WORDS, tiny_clip_tokenizer  # noqa: E402

from fewstep.distill.families import TeacherError, load_teacher, sd3  # noqa: E402,F401  (registers the adapter)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a blue car"]


# -- tiny pipelines (importable by other test files) ----------------------------------------------------


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer over letters and ``WORDS``, built in code: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def clip_config(vocab_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)


def tiny_vae(latent_channels: int):
    """Two levels (images twice the latents' size), with SD3 / Flux's shift and scaling factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.0609,
                         scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_pipeline(tmp_path: Path) -> Path:
    """A tiny random ``StableDiffusion3Pipeline`` folder: a three-block MMDiT on 8x8x4 latents in 2x2 patches,
    two CLIP encoders (hidden 32, projection 32), T5 (width 64), 16x16 images, SD3's ``shift = 3``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, t5_tokenizer = tiny_clip_tokenizer(tmp_path / "vocab"), tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=64, pooled_projection_dim=64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_config(len(tokenizer), 32)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(len(tokenizer), 32)), tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5_encoder(len(t5_tokenizer), 64), tokenizer_3=t5_tokenizer)
    path = tmp_path / "sd3"
    pipe.save_pretrained(path)
    return path


# -- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def family(folder):
    return load_teacher(folder)


def noise(rows: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def run_pipe(family, z, steps, guidance_scale=None, pipe=None, **call):
    """The pipeline's final latents from ``z`` (its own scheduler; ``sigmas`` before its shift)."""
    pipe = pipe or family.pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe(**family.pipeline_inputs(PROMPTS, guidance_scale), num_inference_steps=steps, latents=z.clone(),
                output_type="latent", **call).images


def run_fewstep(family, z, steps, guidance_scale=None, net=None):
    """fewstep's DDIM (Euler on the flow path) over ``family.call`` on the teacher's grid, guided if asked."""
    from fewstep.distill.conditioning import Bound, GuidedDenoiser
    from fewstep.samplers import ModelDenoiser, Sampler

    denoiser = ModelDenoiser(family.call(net or family.pipe.transformer), family.schedule, family.prediction_type)
    if guidance_scale is not None:
        denoiser = GuidedDenoiser(denoiser, family.null(1), scale=guidance_scale)
    bound = Bound(denoiser, family.encode(PROMPTS))
    with torch.no_grad():
        return Sampler(bound, "ddim", steps=steps, timesteps=family.noise.grid_rule()).sample(z.clone())


def transformer_inputs(family, guidance_scale=None):
    """The keyword arguments of the pipeline's first transformer call for ``PROMPTS``."""
    seen = []
    hook = family.pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        run_pipe(family, noise(), 1, guidance_scale)
    finally:
        hook.remove()
    return seen[0]


# -- the claims ---------------------------------------------------------------------------------------------


def test_load_teacher_reads_an_sd3_folder_as_a_flow_teacher(family):
    assert type(family) is sd3.StableDiffusion3Family and family.noise.kind == "flow"
    assert family.prediction_type == "flow_prediction" and family.noise.shift == 3.0 and family.noise.mu is None
    assert family.condition_kind == "text" and family.latent and family.guidable and family.lora_loadable
    assert family.sample_shape() == (4, 8, 8) and family.image_shape() == (3, 16, 16)
    assert family.image_seq_len() == 16  # 2x2 patches of 8x8 latents
    assert family.describe()["pipeline"] == "StableDiffusion3Pipeline"


def test_conditions_and_null_are_what_the_pipeline_feeds_its_transformer(family):
    cond = family.encode(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 16 + 256, 64)  # CLIP's 16 tokens, then T5's 256
    assert cond["pooled_projections"].shape == (2, 64)
    embeds, _, pooled, _ = family.pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["pooled_projections"], pooled)
    seen = transformer_inputs(family, guidance_scale=3.0)  # CFG: the batch is [negative; prompt]
    null = family.null(2)
    for key in ("encoder_hidden_states", "pooled_projections"):
        negative, positive = seen[key].chunk(2)
        assert torch.equal(positive, cond[key]), key
        close(negative, null[key], 1e-6)
    assert not torch.allclose(null["pooled_projections"], cond["pooled_projections"])
    close(seen["timestep"], torch.full((4,), 1000.0))  # N sigma: what family.call gives at t = 1


def test_null_contrasts_with_the_negative_prompt_when_one_is_set(family):
    blurry = copy.copy(family)
    blurry.negative_prompt = "blurry"
    seen = transformer_inputs(blurry, guidance_scale=3.0)  # pipeline_inputs passes the negative prompt
    null = blurry.null(2)
    for key in ("encoder_hidden_states", "pooled_projections"):
        close(seen[key][:2], null[key], 1e-6)
        assert not torch.allclose(null[key], family.null(2)[key]), key
    assert blurry.describe()["negative_prompt"] == "blurry"


def test_two_prompts_give_different_network_outputs(family):
    x = noise(1).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = family.call(family.pipe.transformer)(x, torch.tensor([0.5, 0.5], dtype=torch.float64),
                                                   **family.encode(PROMPTS))
    assert out.shape == x.shape and not torch.allclose(out[0], out[1])


def test_one_step_from_noise_is_the_pipelines_step(family):
    z = noise()
    ours = run_fewstep(family, z, 1)  # t = 1 -> 0: x0 = x - u
    close(ours, run_pipe(family, z, 1))
    with torch.no_grad():
        u = family.pipe.transformer(hidden_states=z, timestep=torch.full((2,), 1000.0),
                                    **family.encode(PROMPTS), return_dict=False)[0]
    close(ours, z - u)


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_two_steps_on_the_shifted_grid_are_the_pipelines(family, guidance_scale):
    """fewstep's 2-step grid is ``shift(1), shift(1/2)``: the pipeline's sigmas ``[1, 1/2]`` after SD3's shift."""
    z = noise()
    ours = run_fewstep(family, z, 2, guidance_scale)
    assert family.noise.grid(2).t[:2].tolist() == [1.0, 0.75]  # 3 s / (1 + 2 s) at s = 1/2
    close(ours, run_pipe(family, z, 2, guidance_scale, sigmas=[1.0, 0.5]))
    if guidance_scale is not None:
        assert not torch.allclose(ours, run_fewstep(family, z, 2))


def test_dynamic_shifting_reads_mu_from_the_patch_count_as_the_pipeline_does(family, folder):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
    pipe = type(family.pipe)(**{**family.pipe.components, "scheduler": scheduler})
    dynamic = sd3.StableDiffusion3Family(pipe, folder)
    seen = []
    original = scheduler.set_timesteps
    scheduler.set_timesteps = lambda *a, **kw: (seen.append(kw.get("mu")), original(*a, **kw))
    run_pipe(dynamic, noise(), 1, pipe=pipe)
    assert seen[0] is not None and dynamic.noise.mu == pytest.approx(seen[0], abs=1e-12)
    assert dynamic.noise.mu != pytest.approx(0.5)  # 16 patches, not the base 4: the count matters


def test_latents_decode_as_the_pipeline_decodes_and_encode_inverts_the_shift_and_scale(family):
    z = noise()
    latents = run_pipe(family, z, 1)
    family.pipe.set_progress_bar_config(disable=True)
    images = family.pipe(**family.pipeline_inputs(PROMPTS), num_inference_steps=1, latents=z.clone(),
                         output_type="pt").images
    with torch.no_grad():
        decoded = family.decode_latents(latents)
        assert decoded.shape == (2, 3, 16, 16)
        close((decoded / 2 + 0.5).clamp(0, 1), images)
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        encoded = family.encode_images(x)
        vae = family.pipe.vae
        mode = vae.encode(x).latent_dist.mode()
    assert encoded.shape == (2, *family.sample_shape()) and torch.equal(encoded, family.encode_images(x))
    close(encoded, (mode - vae.config.shift_factor) * vae.config.scaling_factor)
    close(family.decode_latents(encoded), vae.decode(mode).sample)


def test_feature_map_is_the_middle_blocks_image_tokens_over_the_patch_grid(family):
    net = family.pipe.transformer
    block, channels = family.feature_block(net)
    assert block is net.transformer_blocks[1] and channels == 16
    seen = []
    hook = block.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            family.call(net)(noise(), torch.tensor([0.5, 0.5], dtype=torch.float64), **family.encode(PROMPTS))
    finally:
        hook.remove()
    assert isinstance(seen[0], tuple) and seen[0][1].shape == (2, 16, 16)  # 4x4 patches of width 16
    features = family.feature_map(seen[0], noise())
    assert features.shape == (2, 16, 4, 4)
    assert torch.equal(features[:, :, 1, 2], seen[0][1][:, 1 * 4 + 2])  # row-major, as PatchEmbed flattens
    grid = torch.randn(2, 5, 3, 4)
    assert torch.equal(sd3.token_map(grid.flatten(2).transpose(1, 2), 3, 4), grid)


def test_lora_targets_name_every_joint_attention_projection(family):
    from fewstep.distill.lora import LoRA, inject

    net = copy.deepcopy(family.pipe.transformer)
    names = [name for name, _ in net.named_modules()]
    counts = {target: sum(name.endswith("." + target) for name in names) for target in family.lora_targets}
    # one per block; the last block's text stream stops before its output projection (context_pre_only)
    assert counts == {**dict.fromkeys(family.lora_targets, 3), "attn.to_add_out": 2}
    inject(net, LoRA(rank=2, targets=family.lora_targets))
    cond, x, t = family.encode(PROMPTS), noise(), torch.tensor([0.9, 0.3], dtype=torch.float64)
    with torch.no_grad():  # B = 0: the LoRA student starts as the teacher
        close(family.call(net)(x, t, **cond), family.call(family.pipe.transformer)(x, t, **cond), 0)


def test_a_student_exports_as_an_sd3_pipeline_that_samples_its_grid(family, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    student = copy.deepcopy(family.pipe.transformer)
    family.export(student, family.noise.student_scheduler(family.noise.grid(2), "flow_prediction"), tmp_path / "s")
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "s")
    assert type(loaded) is StableDiffusion3Pipeline and loaded.text_encoder_3 is not None
    z = noise()
    close(run_pipe(family, z, 2, pipe=loaded), run_fewstep(family, z, 2))
    again = load_teacher(tmp_path / "s")
    assert type(again) is sd3.StableDiffusion3Family and again.noise.kind == "flow"


def test_misuse_is_one_clear_error(family):
    from fewstep.distill.families import GUIDANCE_KEY

    cond, x, t = family.encode(PROMPTS), noise(), torch.tensor([1.0, 1.0], dtype=torch.float64)
    with pytest.raises(TeacherError, match="pooled_projections"):
        family.call(family.pipe.transformer)(x, t, encoder_hidden_states=cond["encoder_hidden_states"])
    with pytest.raises(TeacherError, match="guidance input"):
        family.call(family.pipe.transformer)(x, t, **cond, **{GUIDANCE_KEY: torch.ones(2)})
    with pytest.raises(TeacherError, match="list of prompt strings"):
        family.encode("a cat")
