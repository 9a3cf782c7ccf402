"""Generate options: every MISSION.md §2 default in one place, and the request resolved into them.

Unset proto fields (``optional``) take the reference default; set ones are range-checked, and a
violation is an :class:`InvalidArgument` naming the field (``first_pass.strength``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from easyphoto.diffusion.passes import (
    BACKGROUND_PASS,
    FIRST_PASS,
    LCM_PASSES,
    REFERENCE_PASSES,
    SEAM_PASS,
    SECOND_PASS,
    PassOptions,
)
from easyphoto.diffusion.schedulers import SCHEDULERS
from easyphoto.engines.models.family import CONTROLNET_KINDS
from easyphoto.engines.models.variants import LCM
from easyphoto.rpc.errors import InvalidArgument, check_length, check_range
from easyphoto.rpc.server import present_fields
from easyphoto.v1 import generator_pb2

FACE_PROMPT = "easyphoto_face, easyphoto, 1person"
STYLE_PROMPT = (
    "best quality, realistic, photo-realistic, detailed skin, natural lighting, sharp focus, raw photo"
)
NEGATIVE_PROMPT = (
    "lowres, blurry, bad anatomy, deformed face, distorted eyes, extra fingers, watermark, text,"
    " jpeg artifacts, overexposed, cartoon, painting"
)
MAX_IMAGES_PER_TEMPLATE = 8
# Characters of each prompt field. CLIP reads 77 tokens (a few hundred characters) and drops the
# rest; a megabyte of prompt is a mistake or an attack, refused before it is tokenised.
MAX_PROMPT_CHARS = 4000
# Sides of a template painted from text, before the deployment's model narrows them.
MIN_TEMPLATE_SIDE, MAX_TEMPLATE_SIDE = 64, 8192
PROMPT_FIELDS = ("positive_prompt", "negative_prompt", "extra_prompt", "extra_negative_prompt")


@dataclass(frozen=True)
class GenerateOptions:
    first_pass: PassOptions = FIRST_PASS
    second_pass: PassOptions = SECOND_PASS
    seam_pass: PassOptions = SEAM_PASS
    background_restore: PassOptions = BACKGROUND_PASS
    fusion_before: bool = True
    fusion_before_ratio: float = 0.5
    fusion_after: bool = True
    fusion_after_ratio: float = 0.5
    lora_weight: float = 0.9
    color_shift: bool = True
    crop_face: bool = True
    crop_scale: float = 3.0
    crop_short_side: int = 512
    super_resolution_ratio: float = 0.5
    skin_retouching: bool = False
    lcm_accelerate: bool = False
    positive_prompt: str = STYLE_PROMPT
    negative_prompt: str = NEGATIVE_PROMPT
    extra_prompt: str = ""
    extra_negative_prompt: str = ""
    seed: int | None = None
    images_per_template: int = 1
    return_intermediates: bool = False

    @property
    def prompt(self) -> str:
        return ", ".join(p for p in (FACE_PROMPT, self.positive_prompt, self.extra_prompt) if p)

    @property
    def negative(self) -> str:
        return ", ".join(p for p in (self.negative_prompt, self.extra_negative_prompt) if p)

    @property
    def unet_variant(self) -> str:
        """The UNet every pass paints with: the LCM-LoRA's copy on the fast path, else the base."""
        return LCM if self.lcm_accelerate else ""


# Request fields that map one to one onto GenerateOptions; the passes and fusion are nested messages.
_REQUEST_FIELDS = (
    "lora_weight",
    "color_shift",
    "crop_face",
    "crop_scale",
    "crop_short_side",
    "super_resolution_ratio",
    "skin_retouching",
    "lcm_accelerate",
    "positive_prompt",
    "negative_prompt",
    "seed",
    "images_per_template",
)
_FUSION_FIELDS = {
    "before_enabled": "fusion_before",
    "before_ratio": "fusion_before_ratio",
    "after_enabled": "fusion_after",
    "after_ratio": "fusion_after_ratio",
}


def _pass(message: Any, defaults: PassOptions, name: str) -> PassOptions:
    values = present_fields(message, (f.name for f in fields(PassOptions)))
    options = replace(defaults, **values)
    check_range(f"{name}.steps", options.steps, 1, 200)
    check_range(f"{name}.strength", options.strength, 0.0, 1.0, low_open=True)
    check_range(f"{name}.guidance_scale", options.guidance_scale, 1.0, 30.0)
    for kind in CONTROLNET_KINDS:
        check_range(f"{name}.{kind}_weight", getattr(options, f"{kind}_weight"), 0.0, 2.0)
    for bound in ("canny_low_threshold", "canny_high_threshold"):
        check_range(f"{name}.{bound}", getattr(options, bound), 0, 255)
    if options.canny_low_threshold > options.canny_high_threshold:
        raise InvalidArgument(
            f"{name}.canny_low_threshold exceeds canny_high_threshold", field=f"{name}.canny_low_threshold"
        )
    if options.scheduler not in SCHEDULERS:
        raise InvalidArgument(
            f"{name}.scheduler {options.scheduler!r} is unknown; known: {sorted(SCHEDULERS)}",
            field=f"{name}.scheduler",
        )
    return options


def resolve_options(request: generator_pb2.GenerateRequest) -> GenerateOptions:
    defaults = GenerateOptions()
    # The fast path changes the passes' defaults; what the request sets applies on top.
    passes = LCM_PASSES if request.HasField("lcm_accelerate") and request.lcm_accelerate else REFERENCE_PASSES
    values: dict[str, Any] = {
        **{name: _pass(getattr(request, name), defaults, name) for name, defaults in passes.items()},
        "extra_prompt": request.extra_prompt,
        "extra_negative_prompt": request.extra_negative_prompt,
        "return_intermediates": request.return_intermediates,
    }
    fusion = present_fields(request.fusion, _FUSION_FIELDS)
    values.update({_FUSION_FIELDS[name]: value for name, value in fusion.items()})
    values.update(present_fields(request, _REQUEST_FIELDS))
    options = replace(defaults, **values)
    check_range("fusion.before_ratio", options.fusion_before_ratio, 0.0, 1.0)
    check_range("fusion.after_ratio", options.fusion_after_ratio, 0.0, 1.0)
    check_range("lora_weight", options.lora_weight, 0.0, 2.0)
    check_range("crop_scale", options.crop_scale, 1.5, 6.0)
    check_range("super_resolution_ratio", options.super_resolution_ratio, 0.0, 1.0)
    check_range("images_per_template", options.images_per_template, 1, MAX_IMAGES_PER_TEMPLATE)
    for name in PROMPT_FIELDS:
        check_length(name, getattr(options, name), MAX_PROMPT_CHARS)
    if options.crop_short_side % 64 or not 256 <= options.crop_short_side <= 1024:
        raise InvalidArgument(
            f"crop_short_side is {options.crop_short_side}; a multiple of 64 in [256, 1024]",
            field="crop_short_side",
        )
    return options


@dataclass(frozen=True)
class TemplateOptions:
    """``template_from_text``: the text and the SDXL pass's settings (the size's default is the
    deployment's model's, so None here)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float = 7.0
    scheduler: str = "dpmpp_2m_sde_karras"


def resolve_template_options(request: generator_pb2.GenerateRequest) -> TemplateOptions | None:
    """The request's ``template_from_text`` range-checked, or None when it paints template photos."""
    if not request.HasField("template_from_text"):
        return None
    message = request.template_from_text
    name = "template_from_text"
    values = present_fields(message, ("width", "height", "steps", "guidance_scale", "scheduler"))
    options = TemplateOptions(message.prompt, message.negative_prompt, **values)
    for side in ("width", "height"):  # the deployment's model narrows these (TemplatePainter)
        if getattr(options, side) is not None:
            check_range(f"{name}.{side}", getattr(options, side), MIN_TEMPLATE_SIDE, MAX_TEMPLATE_SIDE)
    check_range(f"{name}.steps", options.steps, 1, 200)
    check_range(f"{name}.guidance_scale", options.guidance_scale, 1.0, 30.0)
    if options.scheduler not in SCHEDULERS:
        raise InvalidArgument(
            f"{name}.scheduler {options.scheduler!r} is unknown; known: {sorted(SCHEDULERS)}",
            field=f"{name}.scheduler",
        )
    for field_name in ("prompt", "negative_prompt"):
        check_length(f"{name}.{field_name}", getattr(options, field_name), MAX_PROMPT_CHARS)
    if not options.prompt.strip():
        raise InvalidArgument(f"{name}.prompt is empty", field=f"{name}.prompt")
    if request.templates:
        raise InvalidArgument(f"give templates or {name}, not both", field=name)
    return options
