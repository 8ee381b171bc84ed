"""``PixArtSigmaPipeline``: a ``PixArtTransformer2DModel`` (PixArt-Sigma, Chen et al. 2024) over an ``AutoencoderKL``'s
latents, a DDPM-family teacher (epsilon with a learned variance; its scheduler is ``DPMSolverMultistepScheduler``)
conditioned on T5 with its attention mask.

Everything that turns a prompt into what the transformer sees is the pipeline's own ``encode_prompt``, called, not
copied: T5's last hidden states over ``max_sequence_length`` tokens (``encoder_hidden_states``, ``[B, L, D]``) and
the tokenizer's padding mask (``encoder_attention_mask``, ``[B, L]``), which the transformer turns into an attention
bias. What ``PixArtSigmaPipeline.__call__`` fixes and this adapter mirrors:

- the null condition is the pipeline's negative: the encoded ``negative_prompt`` (by default ``""``), with its mask;
- the transformer is called at the scheduler's integer timestep broadcast over the batch, with
  ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}``: PixArt-Sigma has no size micro-conditions, so a
  transformer that uses them (``use_additional_conditions``, PixArt-Alpha's) is refused, as the pipeline cannot run it;
- the transformer may predict a learned variance too (``out_channels == 2 * in_channels``); the pipeline keeps the
  first half, and so does ``forward`` (a student, a copy of the teacher, keeps ``2C`` channels and still runs in
  ``PixArtSigmaPipeline``, which splits the variance off itself);
- latents are decoded as ``vae.decode(latents / scaling_factor)`` (no shift factor, even where the VAE has one);
- ``__call__`` cleans captions by default (``clean_caption=True``), which needs ``bs4`` and ``ftfy``: without them it
  encodes the raw prompt. ``encode`` cleans exactly when the pipeline would, so a prompt means the same to both;
- the image size is the pipeline's default, ``transformer.config.sample_size`` latents. The parity inputs turn off
  its aspect-ratio binning, which maps the default size to itself and accepts only the four released sample sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import (GUIDANCE_KEY, Family, TeacherError, cond_repeat, latent_image_shape, prompt_list, register, vae_decode,
               vae_encode)
from .sd3 import token_map

__all__ = ["PixArtSigmaFamily", "PIXART_LORA_TARGETS", "NO_MICRO_CONDITIONS"]

#: The attention (self and cross) and feed-forward projections of every block: the first of the targets of
#: PixArt-Sigma's own LoRA script (``train_scripts/train_pixart_lora_hf.py``), whose others reach the timestep and
#: caption embedders and the output head, which stay the teacher's here.
PIXART_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

#: What ``PixArtSigmaPipeline.__call__`` passes as the transformer's ``added_cond_kwargs``.
NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


@register
class PixArtSigmaFamily(Family):
    pipelines = ("PixArtSigmaPipeline",)
    network = "transformer"
    condition_kind = "text"
    required = ("vae", "text_encoder", "tokenizer")
    lora_targets = PIXART_LORA_TARGETS
    fsdp_blocks = ("BasicTransformerBlock",)
    KEYS = frozenset({"encoder_hidden_states", "encoder_attention_mask"})
    #: the negative prompt guidance contrasts with; ``None`` is the pipeline's default (``""``)
    negative_prompt: str | None = None
    #: T5's token count (``__call__``'s ``max_sequence_length``; the pipeline's default)
    max_sequence_length: int = 300
    #: whether prompts are cleaned (``__call__``'s default), where the pipeline can (``bs4`` and ``ftfy``)
    clean_caption: bool = True

    def __init__(self, pipe, path):
        super().__init__(pipe, path)
        if getattr(pipe.transformer, "use_additional_conditions", False):
            raise TeacherError(f"teacher {path}: its transformer reads resolution and aspect-ratio micro-conditions "
                               "(use_additional_conditions), which PixArtSigmaPipeline never passes; it is a "
                               "PixArt-Alpha transformer")

    # -- space
    @property
    def latent(self) -> bool:
        return True

    def image_shape(self) -> tuple[int, int, int]:
        return latent_image_shape(self.pipe.vae, self.sample_shape())  # the pipeline's vae_scale_factor

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> scaled latents: the mode of the VAE's posterior (deterministic) times
        ``scaling_factor``, the inverse of the pipeline's decoding."""
        return vae_encode(self.pipe.vae, images)

    def decode_latents(self, x: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (unclamped), as ``PixArtSigmaPipeline.__call__`` decodes."""
        return vae_decode(self.pipe.vae, x)

    # -- conditions
    @property
    def cleans_captions(self) -> bool:
        """Whether the pipeline cleans prompts as ``encode`` is asked to: ``clean_caption`` needs ``bs4`` and
        ``ftfy`` (without them the pipeline warns and encodes the raw prompt)."""
        from diffusers.utils import is_bs4_available, is_ftfy_available

        return bool(self.clean_caption) and is_bs4_available() and is_ftfy_available()

    @torch.no_grad()
    def encode(self, raw) -> dict[str, Tensor]:
        """Prompts -> ``{"encoder_hidden_states": [B, L, D], "encoder_attention_mask": [B, L]}``, the pipeline's own
        ``encode_prompt``."""
        embeds, mask, _, _ = self.pipe.encode_prompt(prompt_list(self, raw), do_classifier_free_guidance=False,
                                                     device=self.pipe.device, clean_caption=self.cleans_captions,
                                                     max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    @torch.no_grad()
    def null_from(self, negative_prompt: str | None = None) -> dict[str, Tensor]:
        """The pipeline's negative condition for ``negative_prompt`` (``None``: its default ``""``), one row."""
        _, _, negative, mask = self.pipe.encode_prompt(
            "", do_classifier_free_guidance=True, negative_prompt="" if negative_prompt is None else negative_prompt,
            device=self.pipe.device, clean_caption=self.cleans_captions, max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": negative, "encoder_attention_mask": mask}

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        return cond_repeat(self.null_from(self.negative_prompt), rows)

    # -- the network call
    def forward(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if set(cond) != self.KEYS:
            hint = " (a w-conditioned student needs a guidance input PixArt has not)" if GUIDANCE_KEY in cond else ""
            raise TeacherError(f"{self.name} conditions are {sorted(self.KEYS)}, got {sorted(cond)}{hint}")
        # the pipeline feeds the scheduler's integer timestep; the embedding reads it as float32 either way
        out = net(x, encoder_hidden_states=cond["encoder_hidden_states"],
                  encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                  added_cond_kwargs=dict(NO_MICRO_CONDITIONS), return_dict=False)[0]
        return out[:, : x.shape[1]]  # drop the learned-variance half, as the pipeline does

    # -- the discriminator's features
    def feature_block(self, net: nn.Module) -> tuple[nn.Module, int]:
        """The middle transformer block; its tokens are ``num_attention_heads * attention_head_dim`` wide."""
        blocks = net.transformer_blocks
        return blocks[len(blocks) // 2], int(net.config.num_attention_heads * net.config.attention_head_dim)

    def feature_map(self, output, x: Tensor) -> Tensor:
        """A ``BasicTransformerBlock`` returns its image tokens, over the ``(H / p, W / p)`` patch grid of ``x``."""
        patch = int(self.pipe.transformer.config.patch_size)
        return token_map(output, x.shape[-2] // patch, x.shape[-1] // patch)

    # -- students
    def pipeline_inputs(self, raw, guidance_scale: float | None = None) -> dict[str, Any]:
        """``guidance_scale=None`` is the plain conditional model (``1.0``), not the pipeline's default 4.5."""
        inputs = {"prompt": prompt_list(self, raw), "max_sequence_length": self.max_sequence_length,
                  "clean_caption": self.cleans_captions, "use_resolution_binning": False,
                  "guidance_scale": 1.0 if guidance_scale is None else float(guidance_scale)}
        if self.negative_prompt is not None:
            inputs["negative_prompt"] = [self.negative_prompt] * len(inputs["prompt"])
        return inputs

    def describe(self) -> dict:
        out = {**super().describe(), "max_sequence_length": self.max_sequence_length,
               "clean_caption": self.cleans_captions}
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        return out
