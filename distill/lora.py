"""LoRA students: a frozen copy of the teacher plus a trainable low-rank update, through ``peft``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) replaces a layer's
``W x`` by ``W x + (alpha / r) B A x`` with ``W`` frozen, ``A`` (``r x d_in``, random) and ``B``
(``d_out x r``, zero) trained; ``B = 0`` at the start, so a LoRA student starts as its teacher exactly.
Only ``A`` and ``B`` get gradients, optimizer state and (in the core) updates: the frozen base weights stay
the teacher's bit for bit, which is what lets a student be exported as the LoRA alone, on the teacher's own
pipeline (``load_lora_weights``), or merged into the base (``merged``: ``W + (alpha / r) B A``) as a full
network of the teacher's class.

``inject(net, lora)`` is the one place a LoRA is added (``Conditioning.student_network`` calls it for every
student, generator and fake score); the rest are small functions of a network that has one. A layer is
targeted when its module name ends with one of ``lora.targets`` (peft's rule), so ``"to_q"`` means every
attention query projection; each ``Family`` declares the targets of its network (``Family.lora_targets``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from torch import Tensor, nn

__all__ = ["LORA_EXPORTS", "LoRA", "resolve", "inject", "has_lora", "merged", "lora_state_dict", "peft_config",
           "trainable_parameters", "lora_parameters", "load_lora_state"]

#: ``lora``: the LoRA alone, for the teacher's pipeline (``load_lora_weights``); ``fused``: merged, a full network.
LORA_EXPORTS = ("lora", "fused")


@dataclass(frozen=True)
class LoRA:
    """A resolved ``lora:`` section: rank ``r``, scale ``alpha / r``, the targeted module names, dropout on
    the LoRA branch, whether the fake score (f-distill, SIM) is a LoRA too, and how students are exported."""

    rank: int
    targets: tuple[str, ...]
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    fake: bool = True
    export: str = "fused"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"a LoRA needs a rank >= 1, got {self.rank!r}")
        if not self.targets:
            raise ValueError("a LoRA needs target modules (lora.target_modules)")
        if self.export not in LORA_EXPORTS:
            raise ValueError(f"lora.export must be one of {', '.join(LORA_EXPORTS)}, got {self.export!r}")

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def recipe(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def resolve(section, family, method: str, init: str | None = None, guidance_mode: str = "none") -> LoRA | None:
    """The ``lora:`` config section (``fewstep.config.LoRAConfig``) for this teacher and run, or ``None``
    (rank 0: full students). Refuses, before any training, what could not be exported: ``export: lora`` for a
    pipeline without diffusers' LoRA loader, for a w-conditioned student (its guidance embedding is a new
    layer the teacher's network lacks) and for a student that starts from another student (its base would
    not be the teacher's weights)."""
    from .families import TeacherError

    if not section.rank:
        return None
    targets = tuple(section.target_modules or getattr(family, "lora_targets", ()) or ())
    if not targets:
        raise TeacherError(f"the {family.name} family has no default LoRA target modules; set lora.target_modules")
    if section.export == "lora":
        if not family.lora_loadable:
            raise TeacherError(f"lora.export=lora needs a pipeline with diffusers' LoRA loader (load_lora_weights); "
                               f"{family.name} has none: use lora.export=fused")
        if guidance_mode == "conditioned":
            raise TeacherError("lora.export=lora cannot carry a w-conditioned student's new guidance embedding "
                               "(the teacher's network has none): use lora.export=fused")
        if init is not None:
            raise TeacherError(f"lora.export=lora needs the LoRA's base to be the teacher, but the student starts "
                               f"from {init}: use lora.export=fused")
    fake = True if section.fake is None else bool(section.fake)
    return LoRA(rank=section.rank, targets=targets, alpha=section.alpha, dropout=section.dropout,
                fake=fake and method in ("fdistill", "sim"), export=section.export)


def peft_config(lora: LoRA):
    """``lora`` as peft's ``LoraConfig`` (its default init: ``A`` Kaiming-uniform, ``B`` zero)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, target_modules=list(lora.targets),
                      lora_dropout=lora.dropout)


def inject(net: nn.Module, lora: LoRA) -> nn.Module:
    """Add ``lora``'s layers to ``net`` in place (peft's ``inject_adapter_in_model``): every weight of ``net``
    frozen, only the LoRA factors trainable. ``A`` is drawn from the global RNG (seeded by the caller)."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(peft_config(lora), net)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "Target modules" not in str(err):
            raise
        raise ValueError(f"lora.target_modules {list(lora.targets)} name no layer of the {type(net).__name__} "
                         "(a target is the end of a module name, e.g. to_q)") from None
    for name, param in net.named_parameters():
        param.requires_grad_(".lora_" in name)
    return net


def has_lora(net: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


def trainable_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def lora_parameters(net: nn.Module) -> int:
    """How many numbers the LoRA factors of ``net`` hold (also for a frozen copy, e.g. an EMA)."""
    return sum(p.numel() for name, p in net.named_parameters() if ".lora_" in name)


def lora_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The LoRA factors in peft's key format (``<module>.lora_A.weight``), as diffusers' LCM-LoRA script saves
    them; ``load_lora_weights`` reads them back exactly. (``convert_state_dict_to_diffusers`` would rename only
    the attention projections' keys, and a file of mixed formats does not load back as trained.)"""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(net).items()}


def load_lora_state(net: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Load LoRA factors in peft's key format (``lora_state_dict``) into ``net`` (which has the same LoRA);
    every factor must be there."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(net, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"the LoRA file does not fit this network: unexpected {result.unexpected_keys[:3]}, "
                         f"missing {missing[:3]}")
    return net


def merged(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with each LoRA merged into its base weight, ``W + (alpha / r) B A``, and the LoRA
    layers replaced by their base layers: a network of the teacher's class and state-dict keys."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    if hasattr(net, "peft_config"):
        del net.peft_config
    return net
