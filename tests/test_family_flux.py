"""Flux teachers: fewstep's packing, conditions (with Flux-dev's embedded guidance), resolution shift, true CFG and
latents are the pipeline's own, checked against ``FluxPipeline`` runs on a tiny random pipeline built here from
configs (CLIP and T5 with tokenizers made in code: no downloads), at the pipeline's default size (128x128 latents,
4096 tokens) where the shift ``mu`` matters."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_family_sd import tiny_clip_tokenizer  # noqa: E402
from test_family_sd3 import clip_config, tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae  # noqa: E402

from fewstep.distill.families import TeacherError, flux, load_teacher  # noqa: E402,F401  (registers the adapter)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a blue car"]
SIDE = 128  # FluxPipeline's default latents: default_sample_size


def tiny_flux_transformer(guidance_embeds: bool = True):
    """One double- and two single-stream blocks over 4-channel latents packed to 16 features."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)


def tiny_flux_pipeline(tmp_path: Path) -> Path:
    """A tiny random ``FluxPipeline`` folder as Flux-dev: guidance-distilled transformer, CLIP (hidden 32), T5
    (width 32), a two-level VAE, and Flux-dev's scheduler (dynamic shifting between 256 and 4096 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, t5_tokenizer = tiny_clip_tokenizer(tmp_path / "vocab"), tiny_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=tiny_flux_transformer(), scheduler=scheduler, vae=tiny_vae(4),
                        text_encoder=CLIPTextModel(clip_config(len(tokenizer))), tokenizer=tokenizer,
                        text_encoder_2=tiny_t5_encoder(len(t5_tokenizer), 32), tokenizer_2=t5_tokenizer)
    path = tmp_path / "flux"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def family(folder):
    return load_teacher(folder)


@pytest.fixture(scope="module")
def schnell(family, folder):
    """The same pipeline with a transformer without a guidance embedding (as Flux-schnell)."""
    torch.manual_seed(1)
    pipe = type(family.pipe)(**{**family.pipe.components, "transformer": tiny_flux_transformer(False).eval()})
    return flux.FluxFamily(pipe, folder)


def noise(side: int = SIDE, seed: int = 0, width: int | None = None) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, side, width or side, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def run_pipe(family, z, steps, guidance_scale=None, pipe=None, **call):
    """The pipeline's final latents from ``[B, C, H, W]`` latents ``z`` (packed in, unpacked out)."""
    pipe = pipe or family.pipe
    pipe.set_progress_bar_config(disable=True)
    b, c, h, w = z.shape
    factor = pipe.vae_scale_factor
    out = pipe(**family.pipeline_inputs(PROMPTS, guidance_scale), num_inference_steps=steps,
               latents=pipe._pack_latents(z.clone(), b, c, h, w), height=h * factor, width=w * factor,
               output_type="latent", **call).images
    return pipe._unpack_latents(out, h * factor, w * factor, factor)


def run_fewstep(family, z, steps, guidance_scale=None):
    """fewstep's DDIM (Euler on the flow path) over ``family.call`` on the teacher's grid, guided if asked."""
    from fewstep.distill.conditioning import Bound, GuidedDenoiser
    from fewstep.samplers import ModelDenoiser, Sampler

    denoiser = ModelDenoiser(family.call(family.pipe.transformer), family.schedule, family.prediction_type)
    if guidance_scale is not None:
        denoiser = GuidedDenoiser(denoiser, family.null(1), scale=guidance_scale)
    with torch.no_grad():
        return Sampler(Bound(denoiser, family.encode(PROMPTS)), "ddim", steps=steps,
                       timesteps=family.noise.grid_rule()).sample(z.clone())


def transformer_inputs(family, guidance_scale=None):
    """The keyword arguments of the pipeline's transformer calls for ``PROMPTS`` (one step, 8x8 latents)."""
    seen = []
    hook = family.pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        run_pipe(family, noise(8), 1, guidance_scale)
    finally:
        hook.remove()
    return seen


# -- the claims ---------------------------------------------------------------------------------------------


def test_load_teacher_reads_a_flux_folder_as_a_flow_teacher_at_the_pipelines_default_size(family):
    assert type(family) is flux.FluxFamily and family.noise.kind == "flow"
    assert family.prediction_type == "flow_prediction" and family.latent and family.lora_loadable
    assert family.sample_shape() == (4, SIDE, SIDE) and family.image_shape() == (3, 2 * SIDE, 2 * SIDE)
    assert family.image_seq_len() == 64 * 64
    assert family.describe()["embedded_guidance"] == 3.5


def test_the_shift_mu_is_the_one_the_pipeline_computes_for_its_default_size(family):
    class Seen(Exception):
        pass

    def set_timesteps(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        raise Seen(mu)

    pipe = family.pipe
    original, pipe.scheduler.set_timesteps = pipe.scheduler.set_timesteps, set_timesteps
    try:
        with pytest.raises(Seen) as seen:  # the default height and width; stopped before any denoising
            pipe(**family.pipeline_inputs(PROMPTS), num_inference_steps=2, output_type="latent")
    finally:
        pipe.scheduler.set_timesteps = original
    mu = seen.value.args[0]
    assert mu == pytest.approx(1.15) and family.noise.mu == pytest.approx(mu, abs=1e-12)  # 4096 tokens: max_shift
    assert family.noise.grid(2).t[1] == pytest.approx(1 / (1 + torch.exp(torch.tensor(-mu)).item()))  # e^mu/(e^mu+1)


def test_conditions_are_what_the_pipeline_feeds_its_transformer(family, schnell):
    cond = family.encode(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "guidance"}
    embeds, pooled, _ = family.pipe.encode_prompt(PROMPTS)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and embeds.shape == (2, 512, 32)
    assert torch.equal(cond["pooled_projections"], pooled) and pooled.shape == (2, 32)
    seen = transformer_inputs(family)[0]
    for key in cond:
        assert torch.equal(seen[key], cond[key]), key
    assert seen["guidance"].dtype == torch.float32 and seen["guidance"].tolist() == [3.5, 3.5]
    close(seen["timestep"], torch.ones(2))  # sigma: the pipeline divides N sigma by 1000
    assert not seen["txt_ids"].any() and seen["img_ids"].shape == (16, 3)  # 8x8 latents: 4x4 tokens
    # the guidance input exists iff the transformer embeds it
    assert set(schnell.encode(PROMPTS)) == {"encoder_hidden_states", "pooled_projections"}
    assert transformer_inputs(schnell)[0]["guidance"] is None
    assert "guidance_scale" not in schnell.pipeline_inputs(PROMPTS)
    assert "embedded_guidance" not in schnell.describe()


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_null_is_the_negative_of_the_pipelines_true_cfg(family, negative_prompt):
    guided = copy.copy(family)
    guided.negative_prompt = negative_prompt
    seen = transformer_inputs(guided, guidance_scale=3.0)  # true CFG: a second call with the negative
    assert len(seen) == 2 and family.guidable
    null = guided.null(2)
    assert set(null) == set(family.encode(PROMPTS)) and null["guidance"].tolist() == [3.5, 3.5]
    for key in null:
        close(seen[1][key], null[key], 1e-6)
    embeds, pooled, _ = family.pipe.encode_prompt([negative_prompt or ""] * 2)
    assert torch.equal(null["encoder_hidden_states"], embeds) and torch.equal(null["pooled_projections"], pooled)


def test_two_prompts_give_different_network_outputs(family):
    x = noise(8)[:1].expand(2, -1, -1, -1)
    with torch.no_grad():
        out = family.call(family.pipe.transformer)(x, torch.tensor([0.5, 0.5], dtype=torch.float64),
                                                   **family.encode(PROMPTS))
    assert out.shape == x.shape and not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_one_step_from_noise_is_the_pipelines_step_at_any_even_size(family, schnell, name):
    """One step from sigma = 1 ends at ``x - u`` whatever ``mu`` is: packing is checked at a small, not square
    size here."""
    family = {"dev": family, "schnell": schnell}[name]
    z = noise(8, width=12)
    close(run_fewstep(family, z, 1), run_pipe(family, z, 1))


@pytest.mark.parametrize("guidance_scale", [None, 3.0], ids=["plain", "true-cfg"])
def test_two_steps_at_the_default_size_are_the_pipelines(family, guidance_scale):
    """The pipeline's sigmas ``[1, 1/2]`` shifted by its ``mu``: fewstep's 2-step grid; true CFG is the guided one."""
    z = noise()
    ours = run_fewstep(family, z, 2, guidance_scale)
    close(ours, run_pipe(family, z, 2, guidance_scale))
    if guidance_scale is not None:
        assert not torch.allclose(ours, run_fewstep(family, z, 2))


def test_latents_decode_as_the_pipeline_decodes_and_encode_inverts_the_shift_and_scale(family):
    z = noise(8)
    latents = run_pipe(family, z, 1)
    pipe = family.pipe
    images = pipe(**family.pipeline_inputs(PROMPTS), num_inference_steps=1, height=16, width=16,
                  latents=pipe._pack_latents(z.clone(), 2, 4, 8, 8), output_type="pt").images
    with torch.no_grad():
        decoded = family.decode_latents(latents)
        assert decoded.shape == (2, 3, 16, 16)
        close((decoded / 2 + 0.5).clamp(0, 1), images)
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        encoded = family.encode_images(x)
        mode = pipe.vae.encode(x).latent_dist.mode()
    assert encoded.shape == (2, 4, 8, 8) and torch.equal(encoded, family.encode_images(x))
    close(encoded, (mode - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)


def test_feature_map_is_the_middle_blocks_image_tokens_over_the_packed_grid(family):
    net = family.pipe.transformer
    block, channels = family.feature_block(net)
    assert block is net.single_transformer_blocks[0] and channels == 32  # the middle of [double, single, single]
    seen = []
    hook = block.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            family.call(net)(noise(8), torch.tensor([0.5, 0.5], dtype=torch.float64), **family.encode(PROMPTS))
    finally:
        hook.remove()
    assert isinstance(seen[0], tuple) and seen[0][1].shape == (2, 16, 32)  # the text tokens are seen[0][0]
    assert family.feature_map(seen[0], noise(8)).shape == (2, 32, 4, 4)
    # token (i, j) of the packed latents is the 2x2 patch at rows 2i, 2i + 1 and columns 2j, 2j + 1
    x = torch.randn(1, 4, 6, 8)
    grid = family.feature_map((None, type(family.pipe)._pack_latents(x, 1, 4, 6, 8)), x)
    assert grid.shape == (1, 16, 3, 4) and torch.equal(grid[0, :, 2, 1], x[0, :, 4:6, 2:4].reshape(16))


def test_lora_targets_name_the_attention_and_feed_forward_layers(family):
    from fewstep.distill.lora import LoRA, inject

    net = copy.deepcopy(family.pipe.transformer)
    names = [name for name, _ in net.named_modules()]
    counts = {target: sum(name.endswith("." + target) for name in names) for target in family.lora_targets}
    # to_q / to_k / to_v in all three blocks, the rest in the double-stream block only
    assert counts == {**dict.fromkeys(family.lora_targets, 1), "attn.to_q": 3, "attn.to_k": 3, "attn.to_v": 3}
    inject(net, LoRA(rank=2, targets=family.lora_targets))
    cond, x, t = family.encode(PROMPTS), noise(8), torch.tensor([0.9, 0.3], dtype=torch.float64)
    with torch.no_grad():  # B = 0: the LoRA student starts as the teacher
        close(family.call(net)(x, t, **cond), family.call(family.pipe.transformer)(x, t, **cond), 0)


def test_a_student_exports_as_a_flux_pipeline_that_samples_its_grid(family, tmp_path):
    from diffusers import FluxPipeline

    student = copy.deepcopy(family.pipe.transformer)
    family.export(student, family.noise.student_scheduler(family.noise.grid(2), "flow_prediction"), tmp_path / "s")
    loaded = FluxPipeline.from_pretrained(tmp_path / "s")
    assert type(loaded) is FluxPipeline and loaded.transformer.config.guidance_embeds  # it keeps the input
    z = noise()
    close(run_pipe(family, z, 2, pipe=loaded), run_fewstep(family, z, 2))
    again = load_teacher(tmp_path / "s")
    assert type(again) is flux.FluxFamily and again.noise.mu == pytest.approx(family.noise.mu)


def test_misuse_is_one_clear_error(family, schnell):
    cond, x, t = family.encode(PROMPTS), noise(8), torch.tensor([1.0, 1.0], dtype=torch.float64)
    text = {k: v for k, v in cond.items() if k != "guidance"}
    with pytest.raises(TeacherError, match="guidance_embeds=True"):
        family.call(family.pipe.transformer)(x, t, **text)
    with pytest.raises(TeacherError, match="guidance_embeds=False"):
        schnell.call(schnell.pipe.transformer)(x, t, **cond)
    with pytest.raises(TeacherError, match="not even"):
        family.call(family.pipe.transformer)(noise(8)[..., :7], t, **cond)
    with pytest.raises(TeacherError, match="list of prompt strings"):
        family.encode("a cat")
