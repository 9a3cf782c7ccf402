"""The role catalogue: which roles a deployment of the method serves. Export, the benchmarks and the
orchestrator all take their roles from here.

* ``family``: the text encoder, the VAE, the UNet and every loaded ControlNet; a deployment needs
  each one.
* ``stages``: the fused step of each reference pass whose ControlNets are all loaded (one call per
  step where a backend serves it, else the step calls its nets and the UNet).
* ``faces``: the face models' roles (in Triton where its repository has them, else in process).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from easyphoto.engines.faces.models import FaceModels
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.description import RoleDescription
from easyphoto.engines.roles.diffusion import describe_roles, describe_stage

from .passes import reference_stages


@dataclass(frozen=True)
class RoleCatalogue:
    family: dict[str, RoleDescription]
    stages: dict[str, RoleDescription] = field(default_factory=dict)
    faces: dict[str, RoleDescription] = field(default_factory=dict)

    @property
    def roles(self) -> dict[str, RoleDescription]:
        return {**self.family, **self.stages, **self.faces}

    @property
    def optional(self) -> dict[str, RoleDescription]:
        """The roles a backend may lack: the stages and the face roles."""
        return {**self.stages, **self.faces}


def role_catalogue(
    family: ModelFamily, face_models: FaceModels | None = None, fused: bool = True
) -> RoleCatalogue:
    """Every role of ``family`` (and of ``face_models``), with the reference passes' fused steps when
    ``fused``."""
    stages = [
        describe_stage(family, kinds)
        for kinds in (reference_stages() if fused else ())
        if set(kinds) <= set(family.controlnets)
    ]
    return RoleCatalogue(
        family=describe_roles(family),
        stages={stage.name: stage for stage in stages},
        faces=dict(face_models.roles) if face_models is not None else {},
    )
