"""``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` (MMDiT, Esser et al. 2024) over an ``AutoencoderKL``'s
latents, a rectified-flow teacher conditioned on two CLIP encoders and T5.

Everything that turns a prompt into what the transformer sees is the pipeline's own ``encode_prompt``, called, not
copied: the penultimate hidden states of both CLIP encoders, concatenated, zero-padded to T5's width and put before
T5's tokens (``encoder_hidden_states``, ``[B, 77 + L, D]``), and their two pooled projections concatenated
(``pooled_projections``, ``[B, P]``). A pipeline without T5 (``text_encoder_3=None``, as SD3 may be run) gets the
pipeline's zeros in its place. So fewstep's conditional, unconditional and guided predictions are the ones
``pipe(prompt, guidance_scale=w)`` makes:

- the null condition is the pipeline's negative: the encoded ``negative_prompt``, by default ``""``;
- the transformer is called at ``timestep = 1000 sigma`` (``noise.model_time``: ``scheduler.timesteps``, float32 as
  the scheduler holds them) and predicts the velocity (``flow_prediction``);
- latents are the VAE's, shifted and scaled: ``(z - shift_factor) * scaling_factor``; decoded from
  ``x / scaling_factor + shift_factor``;
- the image size is the pipeline's default, ``transformer.config.sample_size`` latents; a scheduler with
  ``use_dynamic_shifting`` reads its ``mu`` from the ``(H / p) (W / p)`` patches there, as the pipeline does.

The shift (SD3's ``shift = 3``) and the schedule come from the scheduler config (``distill.noise.FlowNoise``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import (GUIDANCE_KEY, Family, TeacherError, cond_repeat, latent_image_shape, prompt_list, register, vae_decode,
               vae_encode)

__all__ = ["StableDiffusion3Family", "SD3_LORA_TARGETS", "token_map"]

#: LoRA targets of diffusers' SD3 LoRA script (``examples/dreambooth/train_dreambooth_lora_sd3.py``): the joint
#: attention's image and text (added-KV) projections of every block.
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")


def token_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """Image tokens ``[B, height * width, D]`` in row-major order over their grid -> a ``[B, D, height, width]``
    map (the layout of SD3's ``PatchEmbed`` and of Flux's packed latents)."""
    batch, count, dim = tokens.shape
    if count != height * width:
        raise ValueError(f"{count} image tokens do not fill a {height}x{width} grid")
    return tokens.transpose(1, 2).reshape(batch, dim, height, width)


@register
class StableDiffusion3Family(Family):
    pipelines = ("StableDiffusion3Pipeline",)
    network = "transformer"
    condition_kind = "text"
    # T5 is optional: the pipeline puts zeros in its place when text_encoder_3 is None
    required = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    lora_targets = SD3_LORA_TARGETS
    fsdp_blocks = ("JointTransformerBlock",)
    KEYS = frozenset({"encoder_hidden_states", "pooled_projections"})
    #: the negative prompt guidance contrasts with; ``None`` is the pipeline's default (``""``)
    negative_prompt: str | None = None
    #: T5's token count (``__call__``'s ``max_sequence_length``; the pipeline's default)
    max_sequence_length: int = 256

    # -- space
    @property
    def latent(self) -> bool:
        return True

    def image_shape(self) -> tuple[int, int, int]:
        return latent_image_shape(self.pipe.vae, self.sample_shape())  # the pipeline's vae_scale_factor

    def image_seq_len(self) -> int:
        """The patches of the default latent size, as the pipeline counts them for ``mu``."""
        _, height, width = self.sample_shape()
        patch = int(self.pipe.transformer.config.patch_size)
        return (height // patch) * (width // patch)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> shifted, scaled latents. Deterministic: the posterior's mode (its mean)."""
        return vae_encode(self.pipe.vae, images, shift=True)

    def decode_latents(self, x: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (unclamped), as ``StableDiffusion3Pipeline.__call__`` decodes."""
        return vae_decode(self.pipe.vae, x, shift=True)

    # -- conditions
    @torch.no_grad()
    def encode(self, raw) -> dict[str, Tensor]:
        """Prompts -> ``{"encoder_hidden_states": [B, L, D], "pooled_projections": [B, P]}``, the pipeline's own
        ``encode_prompt``."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt_list(self, raw), None, None, device=self.pipe.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @torch.no_grad()
    def null_from(self, negative_prompt: str | None = None) -> dict[str, Tensor]:
        """The pipeline's negative condition for ``negative_prompt`` (``None``: its default ``""``), one row."""
        _, negative, _, pooled = self.pipe.encode_prompt("", None, None, device=self.pipe.device,
                                                         do_classifier_free_guidance=True,
                                                         negative_prompt=negative_prompt,
                                                         max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": negative, "pooled_projections": pooled}

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        return cond_repeat(self.null_from(self.negative_prompt), rows)

    # -- the network call
    def forward(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if set(cond) != self.KEYS:
            hint = " (a w-conditioned student needs a guidance input SD3 has not)" if GUIDANCE_KEY in cond else ""
            raise TeacherError(f"{self.name} conditions are {sorted(self.KEYS)}, got {sorted(cond)}{hint}")
        # the pipeline feeds scheduler.timesteps (float32, 1000 sigma) as they are
        return net(hidden_states=x, timestep=t.to(torch.float32), encoder_hidden_states=cond["encoder_hidden_states"],
                   pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    # -- the discriminator's features
    def feature_block(self, net: nn.Module) -> tuple[nn.Module, int]:
        """The middle joint block; its image stream is ``num_attention_heads * attention_head_dim`` wide."""
        blocks = net.transformer_blocks
        return blocks[len(blocks) // 2], int(net.config.num_attention_heads * net.config.attention_head_dim)

    def feature_map(self, output, x: Tensor) -> Tensor:
        """A ``JointTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``: the image tokens, over
        the ``(H / p, W / p)`` patch grid of ``x``."""
        patch = int(self.pipe.transformer.config.patch_size)
        return token_map(output[1], x.shape[-2] // patch, x.shape[-1] // patch)

    # -- students
    def pipeline_inputs(self, raw, guidance_scale: float | None = None) -> dict[str, Any]:
        """``guidance_scale=None`` is the plain conditional model (``1.0``), not the pipeline's default 7."""
        inputs = {"prompt": prompt_list(self, raw), "max_sequence_length": self.max_sequence_length,
                  "guidance_scale": 1.0 if guidance_scale is None else float(guidance_scale)}
        if self.negative_prompt is not None:
            inputs["negative_prompt"] = [self.negative_prompt] * len(inputs["prompt"])
        return inputs

    def describe(self) -> dict:
        out = {**super().describe(), "max_sequence_length": self.max_sequence_length}
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        return out
