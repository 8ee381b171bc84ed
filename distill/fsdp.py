"""FSDP under ``accelerate launch``: the family's wrap policy, filled in where the launch config leaves it to us.

    accelerate launch --config_file configs/accelerate/fsdp.yaml -m fewstep.cli distill --config ...

accelerate's launcher turns a config's ``fsdp_config`` into ``FSDP_*`` environment variables, which its
``FullyShardedDataParallelPlugin`` reads when the training core makes its ``Accelerator``. A transformer-based
wrap policy needs the names of the block classes to wrap, which differ per pipeline family (a UNet's
``ResnetBlock2D`` / ``BasicTransformerBlock``, SD3's ``JointTransformerBlock``, Flux's two block kinds). The
committed configs say ``fsdp_transformer_layer_cls_to_wrap: auto``; ``fill_wrap_policy`` replaces ``auto`` (or
an unset value) with the family's blocks that the teacher's network has (``Family.fsdp_wrap_classes``), and
refuses in one line what FSDP could not run: a LoRA student (frozen base weights and trainable factors in one
flat parameter) without ``fsdp_use_orig_params: true``, or named blocks the network does not have.

The trainable networks (student, generator, fake score) are sharded by ``Accelerator.prepare``; the frozen
teacher is held whole on each device (replicated), as the core holds every frozen network.
"""

from __future__ import annotations

import os

from .families import Family, TeacherError

__all__ = ["fsdp_launched", "fill_wrap_policy", "AUTO"]

AUTO = "auto"
_PREFIX = "FSDP_"


def _true(value: str | None) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def fsdp_launched(env=None) -> bool:
    """Whether ``accelerate launch`` asked for FSDP (its ``ACCELERATE_USE_FSDP``)."""
    env = os.environ if env is None else env
    return _true(env.get("ACCELERATE_USE_FSDP"))


def fill_wrap_policy(family: Family, lora: bool, env=None) -> list[str] | None:
    """Under an FSDP launch, set ``FSDP_TRANSFORMER_CLS_TO_WRAP`` from the family where it is ``auto`` or unset
    (transformer-based wrap policy) and check the launch can train this run; returns the classes wrapped, or
    ``None`` when FSDP is off or wraps by size."""
    env = os.environ if env is None else env
    if not fsdp_launched(env):
        return None
    if lora and not _true(env.get(_PREFIX + "USE_ORIG_PARAMS")):
        raise TeacherError("a LoRA student under FSDP needs fsdp_use_orig_params: true in the accelerate config "
                           "(its frozen base and trainable factors share FSDP's flat parameters otherwise)")
    policy = env.get(_PREFIX + "AUTO_WRAP_POLICY", "").upper()
    if policy != "TRANSFORMER_BASED_WRAP":
        return None
    given = env.get(_PREFIX + "TRANSFORMER_CLS_TO_WRAP", "").strip()
    present = family.fsdp_wrap_classes()
    if given.lower() in ("", AUTO):
        if not present:
            raise TeacherError(f"FSDP's transformer-based wrap policy: the {family.name} teacher's network has none of "
                               f"{', '.join(family.fsdp_blocks)}; set fsdp_transformer_layer_cls_to_wrap, or "
                               "fsdp_auto_wrap_policy: SIZE_BASED_WRAP")
        env[_PREFIX + "TRANSFORMER_CLS_TO_WRAP"] = ",".join(present)
        return present
    names = [n.strip() for n in given.split(",") if n.strip()]
    have = {type(m).__name__ for m in family.denoiser_network.modules()}
    missing = [n for n in names if n not in have]
    if missing:
        raise TeacherError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which the {family.name} "
                           f"teacher's network does not have; use auto (here: {', '.join(present) or 'none'})")
    return names
