"""UNet variants: copies of a family's UNet with a LoRA fused in, served as roles of their own.

The LCM fast path (EasyPhoto's ``lcm_accelerate``) paints with an LCM-LoRA fused into the base
at 0.8, at a few steps and low guidance. Users' LoRAs still apply per row on top of the fused
copy, as on the base, so one deployment serves both paths and their requests batch apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from easyphoto.rpc.errors import InvalidArgument, ModelMissing

from ..lora import every_layer, fused_copy, load_lora
from .family import ModelFamily

log = logging.getLogger(__name__)

LCM = "lcm"
# The reference's LCM-LoRA weight for SD 1.5 (``lcm_lora_sd15:0.80``).
LCM_LORA_WEIGHT = 0.8
LCM_OPTION = "--lcm-lora"


def add_lcm_lora(family: ModelFamily, lcm_lora: Path, lcm_lora_weight: float = LCM_LORA_WEIGHT) -> None:
    """Fuses the LCM-LoRA file ``lcm_lora`` (peft/diffusers or kohya keys) at ``lcm_lora_weight``
    into a copy of the family's UNet, its ``lcm`` variant. ModelMissing (FAILED_PRECONDITION)
    naming the option and the file when it is not there, cannot be read, adapts anything but the
    UNet or does not fit the family's layers."""
    field = LCM_OPTION.lstrip("-")
    if not lcm_lora.is_file():
        raise ModelMissing(f"{LCM_OPTION}: {lcm_lora} does not exist", field=field)
    try:
        lora = load_lora(lcm_lora, every_layer(family.lora_roots()))  # checked to fit them
        if lora.targets - {"unet"}:
            raise InvalidArgument(
                f"it adapts {sorted(lora.targets - {'unet'})}; an LCM-LoRA adapts only the UNet"
            )
    except InvalidArgument as error:
        raise ModelMissing(
            f"{LCM_OPTION}: {lcm_lora} is not an LCM-LoRA for this family: {error.message}", field=field
        ) from error
    family.unet_variants[LCM] = fused_copy(family.unet, lora, "unet", lcm_lora_weight)
    log.info("LCM-LoRA %s fused at %.2f (%d layers)", lcm_lora, lcm_lora_weight, len(lora.layers))
