"""The role catalogue: which roles a deployment of the method serves. Export, the benchmarks and the
orchestrator all take their roles from here (the groups are :class:`RoleCatalogue`'s)."""

from __future__ import annotations

from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.sdxl import SdxlFamily
from easyphoto.engines.roles.catalogue import RoleCatalogue
from easyphoto.engines.roles.diffusion import describe_roles, describe_stage
from easyphoto.engines.roles.sdxl import describe_sdxl_roles

from .passes import reference_stages


def role_catalogue(
    family: ModelFamily,
    face_models: FaceModels | None = None,
    fused: bool = True,
    sdxl: SdxlFamily | None = None,
) -> RoleCatalogue:
    """Every role of ``family`` (and of ``face_models``), with the reference passes' fused steps when
    ``fused``: with the base UNet, and with each of its variants (an LCM-LoRA fused in); and the
    SDXL roles that paint templates from text when given ``sdxl``."""
    stages = [
        describe_stage(family, kinds, variant)
        for variant in ("", *family.unet_variants)
        for kinds in (reference_stages() if fused else ())
        if set(kinds) <= set(family.controlnets)
    ]
    return RoleCatalogue(
        family=describe_roles(family),
        stages={stage.name: stage for stage in stages},
        faces=dict(face_models.roles) if face_models is not None else {},
        templates=describe_sdxl_roles(sdxl) if sdxl is not None else {},
    )
