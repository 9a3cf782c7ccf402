"""The engine manifest: the contract between ``export`` and whatever serves its output.

``export`` writes ``manifest.json`` beside the ONNX graphs, and the tokenizer into ``tokenizer/``.
Together they hold what a process needs to call the exported roles without their weights: every
role's description by catalogue group (with its graph files), the family's facts (name, source,
whether its weights are random, image sizes, VAE scaling factor, scheduler config) and each
LoRA-targeted layer with its weight shape (so kohya names resolve and a LoRA that does not fit is
refused). ``serve --backend triton`` reads it and builds no UNet, ControlNet, VAE or text encoder;
``easyphoto models`` prints the same JSON for a family in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTokenizer

from easyphoto.rpc.errors import EngineUnavailable

from ..lora import LoraTargets, lora_targets
from ..models.family import ModelFamily
from ..models.sdxl import SdxlFacts
from .catalogue import GROUPS, RoleCatalogue
from .description import RoleDescription

MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SDXL_TOKENIZER_DIRS = ("sdxl_tokenizer", "sdxl_tokenizer_2")
# "onnx", "onnx_fp16", "onnx_lora" (the graph with LoRA inputs): paths relative to the manifest's folder
GraphFiles = dict[str, str | None]


@dataclass(frozen=True)
class FamilyFacts:
    """What serving needs to know of a family besides its roles."""

    name: str
    source: str
    is_random: bool
    image_sizes: tuple[int, int, int]
    vae_scaling_factor: float
    scheduler_config: dict[str, Any]

    @classmethod
    def of(cls, family: ModelFamily) -> FamilyFacts:
        return cls(
            name=family.name,
            source=family.source,
            is_random=family.is_random,
            image_sizes=family.image_sizes,
            vae_scaling_factor=float(family.vae.config.scaling_factor),
            scheduler_config=dict(family.scheduler_config),
        )

    @property
    def label(self) -> str:
        """How responses name the models: ``name[ (random weights)]:source``."""
        return f"{self.name}{' (random weights)' if self.is_random else ''}:{self.source}"


@dataclass
class EngineManifest:
    family: FamilyFacts
    catalogue: RoleCatalogue
    lora_targets: LoraTargets
    exporter: str = ""
    files: dict[str, GraphFiles] = field(default_factory=dict)
    directory: Path | None = None  # the folder it was read from or written to
    # The SDXL family's facts when the export has its roles (templates from text); its tokenizers
    # are written beside the manifest.
    sdxl: SdxlFacts | None = None

    @classmethod
    def of_family(
        cls, family: ModelFamily, catalogue: RoleCatalogue, exporter: str = "", sdxl: SdxlFacts | None = None
    ) -> EngineManifest:
        targets = lora_targets(family.lora_roots())
        return cls(FamilyFacts.of(family), catalogue, targets, exporter, sdxl=sdxl)

    def to_json(self) -> dict[str, Any]:
        facts = self.family
        roles = {}
        for name, role in self.catalogue.roles.items():
            files = self.files.get(name, {})
            group = self.catalogue.group_of(name)
            graphs = {"onnx": None, "onnx_fp16": None, "onnx_lora": None, **files}
            roles[name] = {**role.manifest(), "group": group, **graphs}
        return {
            "exporter": self.exporter,
            "family": facts.name,
            "source": facts.source,
            "is_random": facts.is_random,
            "image_sizes": list(facts.image_sizes),
            "vae_scaling_factor": facts.vae_scaling_factor,
            "scheduler_config": facts.scheduler_config,
            "tokenizer": TOKENIZER_DIR,
            "lora_targets": {
                t: {m: list(s) for m, s in layers.items()} for t, layers in self.lora_targets.items()
            },
            "roles": roles,
            "sdxl": _sdxl_json(self.sdxl),
        }

    def write(self, directory: Path, tokenizer: CLIPTokenizer) -> Path:
        """``manifest.json`` and ``tokenizer/`` into ``directory``; the manifest's path."""
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        if self.sdxl is not None:
            for name, sdxl_tokenizer in zip(
                SDXL_TOKENIZER_DIRS, (self.sdxl.tokenizer, self.sdxl.tokenizer_2), strict=True
            ):
                sdxl_tokenizer.save_pretrained(str(directory / name))
        path = directory / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2))
        self.directory = directory
        return path

    @classmethod
    def read(cls, directory: Path) -> EngineManifest:
        """The manifest ``export`` wrote into ``directory``; its roles have no weights here."""
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise EngineUnavailable(
                f"no engine manifest at {path}: export the models there first"
                " (`easyphoto export --out DIR`, or `make export`)"
            )
        data = json.loads(path.read_text())
        groups: dict[str, dict[str, RoleDescription]] = {group: {} for group in GROUPS}
        files: dict[str, GraphFiles] = {}
        for name, entry in data["roles"].items():
            groups[entry["group"]][name] = RoleDescription.from_manifest(entry, _served_elsewhere(name, path))
            files[name] = {key: entry.get(key) for key in ("onnx", "onnx_fp16", "onnx_lora")}
        low, opt, high = data["image_sizes"]
        facts = FamilyFacts(
            name=data["family"],
            source=data["source"],
            is_random=bool(data["is_random"]),
            image_sizes=(low, opt, high),
            vae_scaling_factor=float(data["vae_scaling_factor"]),
            scheduler_config=dict(data["scheduler_config"]),
        )
        targets = {t: {m: tuple(s) for m, s in layers.items()} for t, layers in data["lora_targets"].items()}
        sdxl = _sdxl_facts(data["sdxl"], directory) if data.get("sdxl") else None
        return cls(facts, RoleCatalogue(**groups), targets, data.get("exporter", ""), files, directory, sdxl)

    def tokenizer(self) -> CLIPTokenizer:
        if self.directory is None:
            raise ValueError("this manifest was neither read nor written: it has no tokenizer folder")
        return CLIPTokenizer.from_pretrained(str(self.directory / TOKENIZER_DIR))


def _served_elsewhere(role: str, manifest: Path) -> Callable[[], Callable[..., tuple[torch.Tensor, ...]]]:
    """The module builder of a role read from a manifest: there are no weights in this process."""

    def build() -> Callable[..., tuple[torch.Tensor, ...]]:
        raise EngineUnavailable(
            f"{role} has no weights in this process (described by {manifest}); a backend serving it runs it"
        )

    return build


def _sdxl_json(sdxl: SdxlFacts | None) -> dict[str, Any] | None:
    if sdxl is None:
        return None
    return {
        "source": sdxl.source,
        "is_random": sdxl.is_random,
        "scheduler_config": sdxl.scheduler_config,
        "vae_scaling_factor": sdxl.vae_scaling_factor,
        "tokenizers": list(SDXL_TOKENIZER_DIRS),
    }


def _sdxl_facts(entry: dict[str, Any], directory: Path) -> SdxlFacts:
    first, second = (CLIPTokenizer.from_pretrained(str(directory / name)) for name in entry["tokenizers"])
    return SdxlFacts(
        first,
        second,
        dict(entry["scheduler_config"]),
        float(entry["vae_scaling_factor"]),
        bool(entry["is_random"]),
        str(entry["source"]),
    )
