"""``FluxPipeline``: a ``FluxTransformer2DModel`` (double- then single-stream blocks) over an ``AutoencoderKL``'s
latents, a rectified-flow teacher conditioned on CLIP's pooled embedding and T5's tokens.

What ``FluxPipeline.__call__`` fixes and this adapter mirrors, calling the pipeline's own code:

- the transformer sees tokens, not latents: ``forward`` takes ``[B, C, H, W]`` latents like every family, packs
  them into ``(H / 2)(W / 2)`` tokens of ``4 C`` features (``_pack_latents``), gives their positions
  (``_prepare_latent_image_ids``) and the text's (zeros, as ``encode_prompt`` makes ``txt_ids``) and unpacks the
  velocity (``_unpack_latents``); it is called at ``timestep = sigma`` (``noise.model_time`` / 1000, as the
  pipeline divides ``scheduler.timesteps``);
- the conditions are ``encode_prompt``'s: T5's ``encoder_hidden_states`` ``[B, L, D]`` and CLIP's pooled
  ``pooled_projections`` ``[B, P]``; a guidance-distilled transformer (``guidance_embeds``, Flux-dev) also takes
  the guidance it was distilled at as an input, ``guidance`` ``[B]``: every condition carries the family's
  ``embedded_guidance`` (the pipeline's default ``guidance_scale``, 3.5), and a student keeps that input;
- the image size is the pipeline's default (``default_sample_size`` latents, 128: 1024 pixels on Flux's VAE),
  and the scheduler's resolution-dependent shift ``mu`` is computed from its ``(H / 2)(W / 2)`` tokens there
  (``calculate_shift``), as the pipeline does;
- latents are the VAE's, shifted and scaled: ``(z - shift_factor) * scaling_factor``, decoded from
  ``x / scaling_factor + shift_factor``.

Guidance: Flux-dev is guidance-distilled and its pipeline runs no classifier-free guidance by default; it has
"true CFG" (``true_cfg_scale`` with a ``negative_prompt``), which contrasts the prompt with the encoded negative
at the same embedded guidance. That is what ``null`` gives (``negative_prompt``, by default ``""``), so a
``GuidedDenoiser`` at scale ``w`` is ``pipe(prompt, negative_prompt="", true_cfg_scale=w)``. A w-conditioned
student (``GUIDANCE_KEY``) is not offered: the embedded guidance is the teacher's own input, not ``w``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import Family, TeacherError, cond_repeat, latent_image_shape, prompt_list, register, vae_decode, vae_encode
from .sd3 import token_map

__all__ = ["FluxFamily", "FLUX_LORA_TARGETS", "EMBEDDED_GUIDANCE_KEY"]

#: LoRA targets of diffusers' Flux LoRA script (``examples/dreambooth/train_dreambooth_lora_flux.py``): the
#: attention projections (image, and text through the added-KV ones) and both streams' feed-forward layers.
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")

#: The condition key of a guidance-distilled transformer's guidance input (its keyword argument).
EMBEDDED_GUIDANCE_KEY = "guidance"


def _embeds_guidance(net: nn.Module) -> bool:
    return bool(net.config.get("guidance_embeds", False))


@register
class FluxFamily(Family):
    pipelines = ("FluxPipeline",)
    network = "transformer"
    condition_kind = "text"
    required = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    lora_targets = FLUX_LORA_TARGETS
    fsdp_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    TEXT_KEYS = frozenset({"encoder_hidden_states", "pooled_projections"})
    #: the guidance a guidance-distilled teacher is run at (``FluxPipeline``'s default ``guidance_scale``)
    embedded_guidance: float = 3.5
    #: the negative prompt of true CFG; ``None``: ``""``
    negative_prompt: str | None = None
    #: T5's token count (``__call__``'s ``max_sequence_length``; the pipeline's default)
    max_sequence_length: int = 512

    # -- space
    @property
    def latent(self) -> bool:
        return True

    def sample_shape(self) -> tuple[int, int, int]:
        """The latents of the pipeline's default image: ``height = default_sample_size * vae_scale_factor``,
        rounded to even latents (``prepare_latents``); ``in_channels / 4`` channels (packing is 2x2)."""
        pipe = self.pipe
        factor = pipe.vae_scale_factor
        side = 2 * (pipe.default_sample_size * factor // (factor * 2))
        return (int(pipe.transformer.config.in_channels) // 4, side, side)

    def image_shape(self) -> tuple[int, int, int]:
        return latent_image_shape(self.pipe.vae, self.sample_shape())

    def image_seq_len(self) -> int:
        _, height, width = self.sample_shape()
        return (height // 2) * (width // 2)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> shifted, scaled latents. Deterministic: the posterior's mode (its mean)."""
        return vae_encode(self.pipe.vae, images, shift=True)

    def decode_latents(self, x: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (unclamped), as ``FluxPipeline.__call__`` decodes."""
        return vae_decode(self.pipe.vae, x, shift=True)

    # -- conditions
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, device=self.pipe.device,
                                                    max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if _embeds_guidance(self.pipe.transformer):  # float32, as the pipeline makes it
            cond[EMBEDDED_GUIDANCE_KEY] = torch.full((len(prompts),), float(self.embedded_guidance),
                                                     dtype=torch.float32, device=embeds.device)
        return cond

    def encode(self, raw) -> dict[str, Tensor]:
        """Prompts -> ``{"encoder_hidden_states", "pooled_projections"}`` (and ``"guidance"``: module docstring)."""
        return self._encode(prompt_list(self, raw))

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        """True CFG's negative: the encoded ``negative_prompt`` (``""``) at the same embedded guidance."""
        return cond_repeat(self._encode([self.negative_prompt or ""]), rows)

    # -- the network call
    def forward(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        keys = self.TEXT_KEYS | {EMBEDDED_GUIDANCE_KEY} if _embeds_guidance(net) else self.TEXT_KEYS
        if set(cond) != keys:  # GUIDANCE_KEY too: a w-conditioned student is not offered (module docstring)
            raise TeacherError(f"{self.name} conditions of a {type(net).__name__} with guidance_embeds="
                               f"{_embeds_guidance(net)} are {sorted(keys)}, got {sorted(cond)}")
        batch, channels, height, width = x.shape
        if height % 2 or width % 2:
            raise TeacherError(f"Flux packs latents in 2x2 patches; {height}x{width} latents are not even")
        pipe = type(self.pipe)
        embeds = cond["encoder_hidden_states"]
        out = net(hidden_states=pipe._pack_latents(x, batch, channels, height, width),
                  timestep=t.to(x.dtype) / 1000,  # the pipeline's scheduler.timesteps / 1000
                  guidance=cond.get(EMBEDDED_GUIDANCE_KEY), pooled_projections=cond["pooled_projections"],
                  encoder_hidden_states=embeds,
                  txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype),
                  img_ids=pipe._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype),
                  return_dict=False)[0]
        return pipe._unpack_latents(out, height, width, 1)  # x is latent-sized: a scale factor of 1

    # -- the discriminator's features
    def feature_block(self, net: nn.Module) -> tuple[nn.Module, int]:
        """The middle block of the whole stack (double-stream blocks, then single-stream ones)."""
        blocks = [*net.transformer_blocks, *net.single_transformer_blocks]
        return blocks[len(blocks) // 2], int(net.config.num_attention_heads * net.config.attention_head_dim)

    def feature_map(self, output, x: Tensor) -> Tensor:
        """Both block kinds return ``(encoder_hidden_states, hidden_states)``: the image tokens, over the
        ``(H / 2, W / 2)`` grid of the packed latents."""
        return token_map(output[1], x.shape[-2] // 2, x.shape[-1] // 2)

    # -- students
    def pipeline_inputs(self, raw, guidance_scale: float | None = None) -> dict[str, Any]:
        """The prompts at the embedded guidance; ``guidance_scale`` (``None``: 1, none) is true CFG's scale."""
        prompts = prompt_list(self, raw)
        inputs: dict[str, Any] = {"prompt": prompts, "max_sequence_length": self.max_sequence_length}
        if _embeds_guidance(self.pipe.transformer):
            inputs["guidance_scale"] = float(self.embedded_guidance)
        if guidance_scale is not None and float(guidance_scale) != 1.0:
            inputs["negative_prompt"] = [self.negative_prompt or ""] * len(prompts)
            inputs["true_cfg_scale"] = float(guidance_scale)
        return inputs

    def describe(self) -> dict:
        out = {**super().describe(), "max_sequence_length": self.max_sequence_length}
        if _embeds_guidance(self.pipe.transformer):
            out["embedded_guidance"] = float(self.embedded_guidance)
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        return out
