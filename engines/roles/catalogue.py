"""A deployment's roles, by what a backend must do with them (built by
:func:`easyphoto.diffusion.catalogue.role_catalogue`, written into the engine manifest):

* ``family``: the text encoder, the VAE, the UNet and every loaded ControlNet; a deployment needs
  each one.
* ``stages``: the fused step of each reference pass whose ControlNets are all loaded (one call per
  step where a backend serves it, else the step calls its nets and the UNet).
* ``faces``: the face models' roles (in Triton where its repository has them, else in process).
* ``templates``: the SDXL roles that paint templates from text, when the deployment has SDXL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from .description import RoleDescription

GROUPS = ("family", "stages", "faces", "templates")


@dataclass(frozen=True)
class RoleCatalogue:
    family: dict[str, RoleDescription]
    stages: dict[str, RoleDescription] = field(default_factory=dict)
    faces: dict[str, RoleDescription] = field(default_factory=dict)
    templates: dict[str, RoleDescription] = field(default_factory=dict)

    @property
    def roles(self) -> dict[str, RoleDescription]:
        return {**self.family, **self.stages, **self.faces, **self.templates}

    @property
    def optional(self) -> dict[str, RoleDescription]:
        """The roles a backend may lack: the stages, the face roles and the SDXL roles."""
        return {**self.stages, **self.faces, **self.templates}

    def group_of(self, role: str) -> str:
        return next(group.name for group in fields(self) if role in getattr(self, group.name))

    def only(self, names: Iterable[str]) -> RoleCatalogue:
        """The catalogue of just these roles (KeyError naming one it does not have)."""
        wanted = set(names)
        unknown = wanted - set(self.roles)
        if unknown:
            raise KeyError(f"no roles {sorted(unknown)}; the catalogue has {sorted(self.roles)}")
        return RoleCatalogue(
            *({k: v for k, v in getattr(self, group).items() if k in wanted} for group in GROUPS)
        )
