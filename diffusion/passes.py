"""The reference's diffusion passes (MISSION.md §2.5, 2.8, 2.10): each pass's steps, strength,
guidance, scheduler and ControlNets with their weights. The orchestrator's request options start
from these, and the fused step graphs worth exporting are derived from them (:func:`reference_stages`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from easyphoto.engines.models.family import CONTROLNET_KINDS

from .schedulers import strength_steps


@dataclass(frozen=True)
class PassOptions:
    enabled: bool
    steps: int
    strength: float
    guidance_scale: float
    canny_weight: float = 0.0
    openpose_weight: float = 0.0
    color_weight: float = 0.0
    tile_weight: float = 0.0
    canny_low_threshold: int = 100
    canny_high_threshold: int = 200
    scheduler: str = "dpmpp_2m_sde_karras"

    def control_weights(self) -> dict[str, float]:
        """The ControlNets this pass runs (weight > 0), in the fixed order of ``CONTROLNET_KINDS``."""
        weights = {kind: float(getattr(self, f"{kind}_weight")) for kind in CONTROLNET_KINDS}
        return {kind: w for kind, w in weights.items() if w > 0}

    @property
    def denoising_steps(self) -> int:
        """Steps this pass runs each time it runs (0 when disabled)."""
        return strength_steps(self.steps, self.strength) if self.enabled else 0


FIRST_PASS = PassOptions(True, 50, 0.45, 7.0, canny_weight=0.5, openpose_weight=0.5, color_weight=0.85)
SECOND_PASS = PassOptions(True, 20, 0.35, 7.0, canny_weight=1.0, tile_weight=1.0)
SEAM_PASS = PassOptions(True, 30, 0.30, 7.0, canny_weight=1.0, color_weight=1.0)
BACKGROUND_PASS = PassOptions(False, 20, 0.35, 7.0, canny_weight=1.0, color_weight=1.0)
# In the order the orchestrator runs them, by their request field names.
REFERENCE_PASSES = {
    "first_pass": FIRST_PASS,
    "second_pass": SECOND_PASS,
    "seam_pass": SEAM_PASS,
    "background_restore": BACKGROUND_PASS,
}


# The reference's LCM settings (``lcm_accelerate``, easyphoto_ui.py's lcm_change and
# easyphoto_infer.py): the first pass at 12 steps and strength 0.5, the others at 8 steps, every
# pass at CFG 2, painted by the UNet with the LCM-LoRA fused in. The reference samples with
# Euler a; these use the LCM scheduler, which the LCM-LoRA was distilled for.
LCM_PASSES = {
    name: replace(
        settings,
        steps=12 if name == "first_pass" else 8,
        strength=0.5 if name == "first_pass" else settings.strength,
        guidance_scale=2.0,
        scheduler="lcm",
    )
    for name, settings in REFERENCE_PASSES.items()
}


def reference_stages() -> tuple[tuple[str, ...], ...]:
    """The ControlNet sets of the reference passes, each once, in the order they first run: the
    fused step graphs worth building (a pass with other weights set to 0 runs its nets separately)."""
    sets = (tuple(settings.control_weights()) for settings in REFERENCE_PASSES.values())
    return tuple(dict.fromkeys(kinds for kinds in sets if kinds))
