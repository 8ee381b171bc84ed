"""``LDMPipeline``: unconditional latent diffusion (Rombach et al. 2022), a ``UNet2DModel`` over a ``VQModel``.

What ``LDMPipeline.__call__`` fixes and this adapter mirrors: latents are decoded as
``vqvae.decode(latents / scaling_factor)``, and ``VQModel.decode`` quantizes to the nearest codebook entries
first (its default; gradients pass straight through), so ``decode_latents`` does the same. Its initial noise is
``randn * scheduler.init_noise_sigma`` (1 for its ``DDIMScheduler``: the VP prior our samplers start from),
drawn on the CPU; ``eta`` goes to the scheduler's ``step``.
"""

from __future__ import annotations

from torch import Tensor

from . import UNET_LORA_TARGETS, Family, TeacherError, latent_image_shape, register



@register
class LDMFamily(Family):
    pipelines = ("LDMPipeline",)
    required = ("vqvae",)
    network = "unet"
    condition_kind = None
    lora_targets = UNET_LORA_TARGETS

    def __init__(self, pipe, path):
        super().__init__(pipe, path)
        cfg = pipe.unet.config
        if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
            raise TeacherError(f"teacher {path}: its UNet takes class labels, but LDMPipeline is unconditional "
                               "(it calls the UNet without them)")

    @property
    def latent(self) -> bool:
        return True

    def image_shape(self) -> tuple[int, int, int]:
        return latent_image_shape(self.pipe.vqvae, self.sample_shape())

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> the VQ encoder's unquantized latents times ``scaling_factor``
        (deterministic; ``decode_latents`` quantizes)."""
        vq = self.pipe.vqvae
        return vq.encode(images.to(device=vq.device, dtype=vq.dtype)).latents * vq.config.scaling_factor

    def decode_latents(self, x: Tensor) -> Tensor:
        vq = self.pipe.vqvae
        return vq.decode(x.to(vq.dtype) / vq.config.scaling_factor).sample
