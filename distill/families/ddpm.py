"""``DDPMPipeline`` / ``DDIMPipeline``: a pixel-space ``UNet2DModel``, unconditional or class-conditional.

A class-conditional ``UNet2DModel`` (``num_class_embeds``) takes ``class_labels``. Which id is the null
class (for classifier-free guidance) is not part of diffusers' config, so it is read from the folder's
``fewstep_teacher.json`` (``{"null_class_label": K, "class_names": [...]}``, written by ``fewstep
train-teacher``); without it the teacher distils unguided only. diffusers' ``DDPMPipeline.__call__`` has no
class input: a class-conditional student loads with ``DDPMPipeline.from_pretrained`` and samples through
``fewstep.distill.load_student`` (or a scheduler loop that passes ``class_labels``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import UNET_LORA_TARGETS, Family, TeacherError, class_labels, register


@register
class DDPMFamily(Family):
    pipelines = ("DDPMPipeline", "DDIMPipeline")
    network = "unet"
    lora_targets = UNET_LORA_TARGETS

    def __init__(self, pipe, path):
        super().__init__(pipe, path)
        cfg = self.pipe.unet.config
        self.num_embeds = cfg.get("num_class_embeds")
        if cfg.get("class_embed_type") not in (None,) and self.num_embeds is None:
            raise TeacherError(f"teacher {path}: a UNet2DModel with class_embed_type "
                               f"{cfg.get('class_embed_type')!r} takes continuous class embeddings; fewstep "
                               "distils num_class_embeds (integer class) UNets")
        null = self.sidecar.get("null_class_label")
        if null is not None and (self.num_embeds is None or not 0 <= null < self.num_embeds):
            raise TeacherError(f"teacher {path}: fewstep_teacher.json's null_class_label {null} is not a class id "
                               f"of its UNet ({self.num_embeds} class embeddings)")
        self.null_label = null

    @property
    def condition_kind(self):
        return "class" if self.num_embeds is not None else None

    @property
    def num_classes(self) -> int | None:
        if self.num_embeds is None:
            return None
        return self.null_label if self.null_label == self.num_embeds - 1 else self.num_embeds

    def encode(self, raw) -> dict[str, Tensor]:
        if not self.conditional:
            return super().encode(raw)
        return class_labels(raw, self.num_classes, self.pipe.device)

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        if self.null_label is None:
            return super().null(rows)
        return {"class_labels": torch.full((rows,), self.null_label, dtype=torch.long, device=self.pipe.device)}

    def pipeline_inputs(self, raw, guidance_scale=None):
        if self.conditional:
            raise TeacherError("diffusers' DDPMPipeline has no class input; sample a class-conditional student "
                               "with fewstep.distill.load_student")
        return {}
