"""The training data of a distillation run, in the teacher's space: ``(x, cond)`` examples, encoded once.

Images (``fewstep.data.load_conditioned``) are mapped into what the teacher's network denoises (latent
families: the autoencoder's ``encode_images``) and their raw conditions (class labels, captions, or labels
turned into prompts by ``prompt_template``) into the family's condition tensors. Data-free methods
(f-distill without a discriminator, SIM) of a conditional teacher get conditions only: every class, or the
prompts of ``data.prompts`` (else the data's captions, or its labels through ``prompt_template``). Conditions are stored once per distinct value (``table``) with one index per
example, so a caption set of a few phrasings costs a few embeddings, not one per image. The result is
saved to ``cache`` with a key of the teacher's identity and the data settings, and reused when the key
matches: encoders and the autoencoder then need not run again when a run resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewstep.config import given
from fewstep.io import atomic_save

from .families import Family, TeacherError, cond_rows

__all__ = ["ConditionedDataset", "prepare_data", "raw_conditions"]

#: Rows of a condition-only data set (at least; whole multiples of the distinct conditions).
CONDITION_ROWS = 1024


class ConditionedDataset(Dataset):
    """Examples ``{"x": x[i], "cond": {k: table[k][index[i]]}}``; ``x`` is ``None`` for condition-only data
    (then an example is ``{"cond": ...}``), ``table`` empty for unconditional data."""

    def __init__(self, x: Tensor | None, table: dict[str, Tensor], index: Tensor | None):
        self.x, self.table, self.index = x, table, index
        self.n = len(x) if x is not None else len(index)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        item = {}
        if self.x is not None:
            item["x"] = self.x[i]
        if self.table:
            item["cond"] = cond_rows(self.table, self.index[i])
        return item


def _explicit(data) -> bool:
    """Whether the user asked for conditions (then an unconditional teacher must refuse them)."""
    return data.conditions in ("labels", "captions") or data.prompts is not None


def raw_conditions(family: Family, labels: Tensor | None, captions: list[str] | None,
                   class_names: list[str] | None, template: str | None, where: str) -> tuple[list, Tensor]:
    """``(distinct raw conditions, index per example)`` in the family's kind: class ids for class
    teachers, prompts for text teachers (captions, or labels through ``template``)."""
    kind = family.condition_kind
    if kind == "class":
        if labels is None:
            have = "captions" if captions is not None else "no conditions"
            raise TeacherError(f"the {family.name} teacher is class-conditional; {where} has {have}: give data with "
                               "class labels (Fashion-MNIST, a class-per-subfolder tree)")
        classes = family.num_classes
        bad = labels[(labels < 0) | (labels >= classes)]
        if len(bad):
            raise TeacherError(f"{where} has label {int(bad[0])}, outside the teacher's classes 0..{classes - 1}")
        return list(range(classes)), labels.long()
    if captions is None and labels is not None:
        if template is None or class_names is None:
            raise TeacherError(f"the {family.name} teacher takes prompts; {where} has class labels: set "
                               "prompt_template (e.g. 'a photo of a {}') to turn each class name into a prompt")
        captions = [template.format(class_names[int(i)]) for i in labels]
    if captions is None:
        raise TeacherError(f"the {family.name} teacher takes prompts; {where} has none: give captions "
                           "(metadata.jsonl) or, for a data-free method, data.prompts")
    distinct = sorted(set(captions))
    position = {c: i for i, c in enumerate(distinct)}
    return distinct, torch.tensor([position[c] for c in captions], dtype=torch.long)


@torch.no_grad()
def _batched(fn, items, batch: int = 64, desc: str = "") -> Tensor | dict[str, Tensor]:
    from tqdm.auto import tqdm

    outs = []
    for start in tqdm(range(0, len(items), batch), desc=desc, disable=len(items) <= batch, leave=False):
        outs.append(fn(items[start:start + batch]))
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k].cpu() for o in outs]) for k in outs[0]}
    return torch.cat([o.cpu() for o in outs])


def _key(family: Family, config, needs_images: bool) -> str:
    settings = {"teacher": family.describe()["id"], "data": given(config.data), "images": needs_images,
                "template": config.prompt_template, "negative": config.guidance.negative_prompt}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_data(family: Family, config, needs_images: bool, cache: Path | None) -> ConditionedDataset | None:
    """The run's data set (module docstring), from ``cache`` when it holds this teacher's and data's."""
    if not needs_images and not family.conditional:
        return None  # data-free and unconditional: nothing to read
    key = _key(family, config, needs_images)
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return ConditionedDataset(saved["x"], saved["table"], saved["index"])
    x, table, index = _build(family, config, needs_images)
    if cache is not None and (family.latent or family.condition_kind == "text"):  # else nothing was encoded
        atomic_save({"key": key, "x": x, "table": table, "index": index}, cache)
    return ConditionedDataset(x, table, index)


def _build(family: Family, config, needs_images: bool):
    from fewstep.data import load_conditioned, load_prompts

    data = config.data
    if not family.conditional and _explicit(data):
        raise TeacherError(f"the {family.name} teacher is unconditional; the data config asks for conditions "
                           f"(data.conditions={data.conditions}, data.prompts={data.prompts}): drop them")
    x = labels = captions = names = None
    where = f"data {data.name!r}"
    if data.prompts is not None and not needs_images:
        captions, where = load_prompts(data.prompts), f"prompts file {data.prompts}"
    elif needs_images or family.condition_kind == "text":  # data-free text teachers: the data's captions
        source = load_conditioned(**given(data))
        labels, captions, names = source.labels, source.captions, source.class_names
        if needs_images:
            x = _to_teacher_space(family, source.images)
    if family.condition_kind == "class" and not needs_images:
        labels = torch.arange(family.num_classes)  # data-free: every class, equally often
    if not family.conditional:
        return x, {}, None
    distinct, index = raw_conditions(family, labels, captions, names, config.prompt_template, where)
    table = _batched(family.encode, distinct, desc="encoding conditions")
    if x is None:  # condition-only: whole repeats of every distinct condition
        index = index.repeat(-(-CONDITION_ROWS // len(index)))
    return x, table, index


def _to_teacher_space(family: Family, images: Tensor) -> Tensor:
    pixel, latent = tuple(family.image_shape()), tuple(family.sample_shape())
    shape = tuple(images.shape[1:])
    if shape != pixel:
        fits = f"{pixel} images" + (f" (encoded to {latent} latents)" if family.latent else "")
        raise TeacherError(f"data of shape {shape} does not fit the {family.name} teacher at {family.path}, which "
                           f"makes {fits}: set data.size={pixel[1]} data.channels={pixel[0]}")
    if not family.latent:
        return images
    return _batched(family.encode_images, images.to(family.pipe.device), desc="encoding latents")
