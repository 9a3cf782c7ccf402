"""Templates from text: a Generate's ``template_from_text`` painted by the deployment's SDXL roles
(``diffusion/text_to_image.py``), then painted with the users' faces like a template photo.

Its sizes come from the SDXL UNet's description (its latent profile times the VAE's factor), so
the same code serves the torch backend and a Triton one. The pass runs in the request's thread,
its deadline and cancellation checked between steps, each step reported as progress.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from easyphoto.diffusion.inpaint import StepEvent
from easyphoto.diffusion.text_to_image import TextToImage, run_text_to_image
from easyphoto.engines.interface import Backend
from easyphoto.engines.models.sdxl import SdxlFacts
from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.roles.diffusion import pixels_per_latent
from easyphoto.engines.roles.sdxl import SDXL_ROLES, UNET, VAE_DECODER
from easyphoto.imaging.codec import from_model
from easyphoto.rpc.errors import EngineUnavailable, InvalidArgument

from .options import TemplateOptions

STAGE = "template_from_text"


class TemplatePainter:
    def __init__(
        self, backend: Backend, facts: SdxlFacts, roles: dict[str, RoleDescription] | None = None
    ) -> None:
        """``roles``: the SDXL roles as the deployment describes them (default: the backend's),
        which a Triton backend serves only while its server has their models."""
        self.backend = backend
        self.facts = facts
        self.roles = roles if roles is not None else {name: backend.roles[name] for name in SDXL_ROLES}
        self.factor = pixels_per_latent(self.roles[VAE_DECODER])
        self.axis = self.roles[UNET].axes["latent_height"]

    @property
    def sizes(self) -> tuple[int, int, int]:
        """The smallest, usual and largest image side (pixels)."""
        return (self.axis.min * self.factor, self.axis.opt * self.factor, self.axis.max * self.factor)

    @property
    def multiple(self) -> int:
        return self.axis.multiple * self.factor

    def paint(
        self,
        options: TemplateOptions,
        seed: int,
        on_step: Callable[[StepEvent], None] | None = None,
        raise_if_stopped: Callable[[], None] = lambda: None,
    ) -> np.ndarray:
        """The template (RGB uint8) ``options`` describe, drawn from ``seed``."""
        width, height = (self._side(options, name) for name in ("width", "height"))
        missing = sorted(set(self.roles) - set(self.backend.roles))
        if missing:
            raise EngineUnavailable(f"the SDXL roles {missing} are not served now; no template from text")
        request = TextToImage(
            options.prompt, options.negative_prompt, width=width, height=height, steps=options.steps,
            guidance_scale=options.guidance_scale, scheduler=options.scheduler,
            generator=torch.Generator().manual_seed(seed), on_step=on_step, raise_if_stopped=raise_if_stopped,
        )  # fmt: skip
        return from_model(run_text_to_image(self.backend, self.facts, request).float().cpu())

    def _side(self, options: TemplateOptions, name: str) -> int:
        value = getattr(options, name)
        low, usual, high = self.sizes
        if value is None:
            return usual
        if value % self.multiple or not low <= value <= high:
            raise InvalidArgument(
                f"template_from_text.{name} is {value}; a multiple of {self.multiple} in [{low}, {high}]"
                " for this deployment's SDXL model",
                field=f"template_from_text.{name}",
            )
        return int(value)
