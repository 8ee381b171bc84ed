"""``DiTPipeline``: a class-conditional latent transformer (Peebles & Xie 2023) over an ``AutoencoderKL``.

What ``DiTPipeline.__call__`` fixes and this adapter mirrors:

- the null class of classifier-free guidance is the literal ``1000`` (ImageNet's classes 0..999, then the
  label embedding's extra "dropped" row), so guidance exists only for a transformer with
  ``num_embeds_ada_norm == 1000`` whose label embeddings have that 1001st row;
- the transformer may predict a learned variance too (``out_channels == 2 * in_channels``); the pipeline keeps
  the first half, and so does ``forward``: trainers compare ``C``-channel outputs, and a student (a copy of the
  teacher, so also ``2C`` channels) still runs in ``DiTPipeline``, which splits the variance off itself;
- latents are decoded as ``vae.decode(latents / scaling_factor)`` (no shift factor);
- class names come from ``model_index.json``'s ``id2label``, an ``__init__`` argument that is not a
  component: ``save_pretrained`` drops it unless it is registered in the pipeline's config, so ``export``
  registers it and the student keeps the teacher's names.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import Family, TeacherError, class_labels, latent_image_shape, register, vae_decode, vae_encode

#: The class id ``DiTPipeline.__call__`` guides against (hard-coded there).
DIT_NULL_CLASS = 1000


def label_embeddings(net: nn.Module) -> list[nn.Module]:
    """The class-label embeddings (diffusers' ``LabelEmbedding``) inside ``net``: one per adaLN-Zero block."""
    from diffusers.models.embeddings import LabelEmbedding

    return [m for m in net.modules() if isinstance(m, LabelEmbedding)]


@contextmanager
def labels_as_given(net: nn.Module):
    """``LabelEmbedding`` replaces labels by the null class at random in train mode (DiT's CFG training). A
    student in train mode must see the labels it is given: trainers drop conditions themselves, explicitly."""
    dropping = [m for m in label_embeddings(net) if m.training]
    for m in dropping:
        m.training = False
    try:
        yield
    finally:
        for m in dropping:
            m.training = True


def null_class_problem(net: nn.Module) -> str | None:
    """Why ``DiTPipeline``'s null class 1000 is not this transformer's unconditional row; ``None`` when it is."""
    classes = net.config.num_embeds_ada_norm
    if classes != DIT_NULL_CLASS:
        return (f"DiTPipeline guides with null class {DIT_NULL_CLASS}, but this transformer has {classes} classes "
                "(num_embeds_ada_norm)")
    rows = sorted({m.embedding_table.num_embeddings for m in label_embeddings(net)})
    if rows != [DIT_NULL_CLASS + 1]:
        return (f"its label embeddings have {rows} rows, not {DIT_NULL_CLASS + 1} (no row for the null class "
                f"{DIT_NULL_CLASS}: trained without class dropout)")
    return None



@register
class DiTFamily(Family):
    pipelines = ("DiTPipeline",)
    required = ("vae",)
    network = "transformer"
    condition_kind = "class"
    #: the attention and feed-forward projections of every block (adaLN and patch layers stay the teacher's)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    fsdp_blocks = ("BasicTransformerBlock",)

    def __init__(self, pipe, path):
        super().__init__(pipe, path)
        net = pipe.transformer
        if net.config.get("num_embeds_ada_norm") is None or not label_embeddings(net):
            raise TeacherError(f"teacher {path}: its {type(net).__name__} has no class-label embedding "
                               "(num_embeds_ada_norm with norm_type ada_norm_zero); DiTPipeline needs one")
        self.null_problem = null_class_problem(net)
        index = self.path / "model_index.json"
        raw = json.loads(index.read_text()).get("id2label") if index.is_file() else None
        # the folder's own mapping: pipe.labels has split the comma-separated synonyms apart
        self.id2label = {int(k): v for k, v in (raw or {}).items()}

    # -- space
    @property
    def latent(self) -> bool:
        return True

    def image_shape(self) -> tuple[int, int, int]:
        return latent_image_shape(self.pipe.vae, self.sample_shape())

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> scaled latents: the mode of the VAE's posterior (deterministic, so a data
        set encodes to the same latents every epoch), times ``scaling_factor``."""
        return vae_encode(self.pipe.vae, images)

    def decode_latents(self, x: Tensor) -> Tensor:
        return vae_decode(self.pipe.vae, x)

    # -- conditions
    @property
    def num_classes(self) -> int:
        return int(self.pipe.transformer.config.num_embeds_ada_norm)

    @property
    def class_names(self) -> list[str] | None:
        names = super().class_names
        if names is not None or not self.id2label:
            return names
        return [self.id2label.get(i, str(i)) for i in range(self.num_classes)]

    def encode(self, raw) -> dict[str, Tensor]:
        return class_labels(raw, self.num_classes, self.pipe.device)

    def null(self, rows: int = 1) -> dict[str, Tensor]:
        if self.null_problem is not None:
            raise TeacherError(f"{self.name} teacher {self.path} has no unconditional (null) condition, so it "
                               f"cannot be guided ({self.null_problem}); use guidance.mode none")
        return {"class_labels": torch.full((rows,), DIT_NULL_CLASS, dtype=torch.long, device=self.pipe.device)}

    # -- the network call
    def forward(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        with labels_as_given(net):
            out = net(x, timestep=t, **cond).sample
        return out[:, : x.shape[1]]  # drop the learned-variance half, as DiTPipeline does

    # -- students
    def student_pipeline(self, net: nn.Module, scheduler):
        components = dict(self.pipe.components)
        components[self.network] = net
        components["scheduler"] = scheduler
        if not self.id2label:
            return type(self.pipe)(**components)
        pipe = type(self.pipe)(**components, id2label=self.id2label)
        pipe.register_to_config(id2label={str(k): v for k, v in self.id2label.items()})  # so save_pretrained keeps it
        return pipe

    def pipeline_inputs(self, raw, guidance_scale=None):
        """``DiTPipeline.__call__``'s inputs; guidance only for ``w > 1`` there (its default is 4, so ``None``
        asks for 1: the conditional model, as a student is sampled)."""
        w = 1.0 if guidance_scale is None else float(guidance_scale)
        labels = self.encode(raw)["class_labels"].tolist()
        if w > 1:
            self.null(1)  # refuses a teacher that DiTPipeline would guide against a wrong or missing row
        return {"class_labels": labels, "guidance_scale": w}
