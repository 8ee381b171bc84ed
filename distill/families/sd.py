"""``StableDiffusionPipeline`` (SD 1.x, 2.x) and ``StableDiffusionXLPipeline``: a ``UNet2DConditionModel`` over
an ``AutoencoderKL``'s latents, conditioned on CLIP text embeddings.

Everything that turns a prompt into what the UNet sees is the pipeline's own code, called, not copied:
``encode_prompt`` (tokenisation, text encoders, SDXL's penultimate layers and pooled embedding),
``_get_add_time_ids`` (SDXL's size conditioning) and ``get_guidance_scale_embedding`` (the ``w`` input of a
UNet with ``time_cond_proj_dim``, LCM's guidance embedding, fed ``w - 1`` as the pipelines do). So fewstep's
conditional, unconditional and guided predictions are the ones ``pipe(prompt, guidance_scale=w)`` makes:

- the null condition is the pipeline's negative: the embeddings of ``""`` (or of ``negative_prompt``), and for
  SDXL with ``force_zeros_for_empty_prompt`` (its default) zeros, text and pooled, when no negative prompt is set;
- SDXL's time ids are those of the default size, ``original_size = target_size = image_shape``, crop ``(0, 0)``;
- a UNet with ``time_cond_proj_dim`` is sampled by the pipelines without CFG, its ``w`` an input: such a network
  needs ``GUIDANCE_KEY`` in every condition (``with_guidance_input`` makes one from the teacher's UNet).

Noise schedule and prediction type (epsilon, v_prediction, zero terminal SNR) come from the scheduler config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import (GUIDANCE_KEY, UNET_LORA_TARGETS, Family, TeacherError, cond_repeat, latent_image_shape, prompt_list,
               register, vae_decode, vae_encode)

__all__ = ["StableDiffusionFamily", "StableDiffusionXLFamily", "GUIDANCE_EMBED_DIM"]

#: ``time_cond_proj_dim`` of a w-conditioned student UNet (LCM's choice for SD 1.5 and SDXL).
GUIDANCE_EMBED_DIM = 256


def _proj_dim(net: nn.Module) -> int | None:
    """The width of ``net``'s guidance-scale embedding input (``time_cond_proj_dim``), if it has one."""
    config = getattr(net, "config", None)
    return config.get("time_cond_proj_dim") if config is not None else None


@register
class StableDiffusionFamily(Family):
    pipelines = ("StableDiffusionPipeline",)
    required = ("vae", "text_encoder", "tokenizer")
    network = "unet"
    condition_kind = "text"
    lora_targets = UNET_LORA_TARGETS  # diffusers' LCM-LoRA script's, for SD 1.5 and SDXL alike
    #: the negative prompt guidance contrasts with; ``None`` is the pipeline's default (``""``)
    negative_prompt: str | None = None
    #: pipeline config entries that are ``__init__`` flags, not components
    config_flags: tuple[str, ...] = ("requires_safety_checker",)

    # -- space
    @property
    def latent(self) -> bool:
        return True

    def _latent_size(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def sample_shape(self) -> tuple[int, int, int]:
        return (int(self.pipe.unet.config.in_channels), *self._latent_size())

    def image_shape(self) -> tuple[int, int, int]:
        return latent_image_shape(self.pipe.vae, self.sample_shape())  # the pipeline's vae_scale_factor

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> scaled latents. Deterministic: the posterior's mode (its mean), not a sample.
        ``StableDiffusionPipeline`` decodes ``z / scaling_factor`` and ignores any ``shift_factor`` (an SD3 / Flux
        VAE field), so this ignores it too: the latents are the ones the pipeline decodes."""
        return vae_encode(self.pipe.vae, images)

    def decode_latents(self, x: Tensor) -> Tensor:
        """Scaled latents -> images in ``[-1, 1]`` (unclamped), as ``StableDiffusionPipeline.__call__`` decodes."""
        return vae_decode(self.pipe.vae, x)

    # -- conditions
    @torch.no_grad()
    def encode(self, raw) -> dict[str, Tensor]:
        """Prompts -> ``{"encoder_hidden_states": [B, L, D]}``, the pipeline's own ``encode_prompt``."""
        embeds, _ = self.pipe.encode_prompt(prompt_list(self, raw), self.pipe.device, 1, False)
        return {"encoder_hidden_states": embeds}

    @torch.no_grad()
    def null_from(self, negative_prompt: str | None = None) -> dict[str, Tensor]:
        """The pipeline's negative condition for ``negative_prompt`` (``None``: its default), one row."""
        _, negative = self.pipe.encode_prompt("", self.pipe.device, 1, True, negative_prompt=negative_prompt)
        return {"encoder_hidden_states": negative}

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        return cond_repeat(self.null_from(self.negative_prompt), rows)

    # -- the network call
    def _unet_inputs(self, cond: dict[str, Tensor]) -> dict[str, Any]:
        if set(cond) != {"encoder_hidden_states"}:
            raise TeacherError(f"{self.name} conditions are {{'encoder_hidden_states'}}, got {sorted(cond)}")
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    def guidance_embedding(self, net: nn.Module, w, x: Tensor) -> Tensor:
        """``timestep_cond`` for guidance scale ``w`` (scalar or ``[B]``), built as the pipelines build it:
        ``get_guidance_scale_embedding(w - 1, time_cond_proj_dim)``, ``w - 1`` in float64 then float32 (the
        pipeline subtracts in Python floats), on the CPU like the pipeline's."""
        w = torch.as_tensor(w, dtype=torch.float64).detach().cpu().reshape(-1).expand(x.shape[0])
        emb = self.pipe.get_guidance_scale_embedding((w - 1).float(), embedding_dim=_proj_dim(net))
        return emb.to(device=x.device, dtype=x.dtype)

    def forward(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = dict(cond)
        w = cond.pop(GUIDANCE_KEY, None)
        kwargs = self._unet_inputs(cond)
        dim = _proj_dim(net)
        if w is not None and dim is None:
            raise TeacherError(f"a {GUIDANCE_KEY} condition needs a network with a guidance-scale embedding "
                               f"(time_cond_proj_dim); {type(net).__name__} has none: see with_guidance_input")
        if dim is not None:
            if w is None:  # the pipeline always feeds it; without it the network is one no pipeline runs
                raise TeacherError(f"{type(net).__name__} takes a guidance scale (time_cond_proj_dim {dim}); "
                                   f"its condition needs {GUIDANCE_KEY!r}")
            kwargs["timestep_cond"] = self.guidance_embedding(net, w, x)
        out = net(x, t, **kwargs)
        return out.sample if hasattr(out, "sample") else out[0]

    # -- guidance as a student input
    @property
    def accepts_guidance_input(self) -> bool:
        return True

    def with_guidance_input(self, net: nn.Module, dim: int = GUIDANCE_EMBED_DIM) -> nn.Module:
        """A copy of the ``UNet2DConditionModel`` ``net`` with a ``dim``-wide guidance-scale embedding
        (``time_cond_proj_dim``), ``net``'s weights, and the new ``time_embedding.cond_proj`` zero: it starts as
        ``net`` exactly, at every ``w``. A network that already has one is returned as it is."""
        from diffusers import UNet2DConditionModel

        if not isinstance(net, UNet2DConditionModel):
            return super().with_guidance_input(net)
        if _proj_dim(net) is not None:
            return net
        new = type(net).from_config({**net.config, "time_cond_proj_dim": dim})
        missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
        if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
            raise TeacherError(f"adding a guidance embedding to {type(net).__name__} changed more than "
                               f"time_embedding.cond_proj: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            new.time_embedding.cond_proj.weight.zero_()
        return new.to(device=net.device, dtype=net.dtype).train(net.training)

    # -- students
    def _pipeline_flags(self) -> dict[str, Any]:
        # configured __init__ flags that `components` leaves out: a student keeps the teacher's
        return {k: self.pipe.config[k] for k in self.config_flags if k in self.pipe.config}

    def student_pipeline(self, net: nn.Module, scheduler):
        components = dict(self.pipe.components)
        components[self.network] = net
        components["scheduler"] = scheduler
        return type(self.pipe)(**components, **self._pipeline_flags())

    def pipeline_inputs(self, raw, guidance_scale: float | None = None) -> dict[str, Any]:
        """``guidance_scale=None`` is the plain conditional model (``1.0``), not the pipeline's default 7.5."""
        inputs = {"prompt": prompt_list(self, raw), "guidance_scale": 1.0 if guidance_scale is None else
                  float(guidance_scale)}
        if self.negative_prompt is not None:
            inputs["negative_prompt"] = [self.negative_prompt] * len(inputs["prompt"])
        return inputs

    def describe(self) -> dict:
        out = super().describe()
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        return out


@register
class StableDiffusionXLFamily(StableDiffusionFamily):
    """Two text encoders: ``{"encoder_hidden_states": [B, 77, D1 + D2], "text_embeds": [B, P] (the second
    encoder's pooled projection), "time_ids": [B, 6]}``; the last two reach the UNet as ``added_cond_kwargs``."""

    pipelines = ("StableDiffusionXLPipeline",)
    required = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    #: force_zeros_for_empty_prompt decides the pipeline's own negative (module docstring)
    config_flags = ("force_zeros_for_empty_prompt",)
    KEYS = frozenset({"encoder_hidden_states", "text_embeds", "time_ids"})

    # -- space: SDXL's pipeline normalises latents by the VAE's latents_mean / latents_std when it has them
    def _latent_stats(self, like: Tensor):
        cfg = self.pipe.vae.config
        if cfg.get("latents_mean") is None or cfg.get("latents_std") is None:
            return None
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype)
                     for v in (cfg.latents_mean, cfg.latents_std))
        return mean, std

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> scaled latents, the inverse of the pipeline's decoding. Deterministic: the
        posterior's mode (its mean), not a sample."""
        vae = self.pipe.vae
        z = vae.encode(images.to(vae.dtype)).latent_dist.mode()
        stats = self._latent_stats(z)
        if stats is not None:
            return (z - stats[0]) * vae.config.scaling_factor / stats[1]
        return z * vae.config.scaling_factor

    def decode_latents(self, x: Tensor) -> Tensor:
        """Scaled latents -> images in ``[-1, 1]`` (unclamped), as ``StableDiffusionXLPipeline.__call__``
        decodes: de-normalised by latents_mean / latents_std when set; a float16 VAE with ``force_upcast``
        decodes in float32 (it overflows in float16) and is cast back."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        stats = self._latent_stats(x)
        z = x * stats[1] / vae.config.scaling_factor + stats[0] if stats is not None else x / vae.config.scaling_factor
        if upcast:
            vae.to(torch.float32)
        try:
            return vae.decode(z.to(vae.dtype)).sample
        finally:
            if upcast:
                vae.to(torch.float16)

    # -- conditions
    def _time_ids(self, embeds: Tensor, pooled: Tensor) -> Tensor:
        """The pipeline's ``add_time_ids`` at its default size: original = target = image size, crop (0, 0)."""
        size = tuple(self.image_shape()[1:])
        pipe = self.pipe
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=int(proj))
        return ids.to(embeds.device).repeat(len(embeds), 1)

    @torch.no_grad()
    def encode(self, raw) -> dict[str, Tensor]:
        prompts = prompt_list(self, raw)
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.pipe.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self._time_ids(embeds, pooled)}

    @torch.no_grad()
    def null_from(self, negative_prompt: str | None = None) -> dict[str, Tensor]:
        """The pipeline's negative condition: with ``negative_prompt=None`` and ``force_zeros_for_empty_prompt``,
        zero text and pooled embeddings; else the embeddings of ``negative_prompt or ""``. The time ids are the
        conditional ones (the pipeline's ``negative_add_time_ids`` by default)."""
        _, negative, _, pooled = self.pipe.encode_prompt("", device=self.pipe.device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True,
                                                         negative_prompt=negative_prompt)
        return {"encoder_hidden_states": negative, "text_embeds": pooled, "time_ids": self._time_ids(negative, pooled)}

    # -- the network call
    def _unet_inputs(self, cond: dict[str, Tensor]) -> dict[str, Any]:
        if set(cond) != self.KEYS:
            raise TeacherError(f"{self.name} conditions are {sorted(self.KEYS)}, got {sorted(cond)}")
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}

    # -- students
    def _pipeline_flags(self) -> dict[str, Any]:
        # the watermark is not in the config; a student in memory keeps the teacher's
        return {**super()._pipeline_flags(), "add_watermarker": getattr(self.pipe, "watermark", None) is not None}
