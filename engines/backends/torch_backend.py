"""The embedded backend: every role runs in process with PyTorch (CPU fp32, or CUDA fp16)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from easyphoto.rpc.errors import EngineInputError

from ..adapters import (
    DEFAULT_CACHE_BYTES,
    Adapter,
    AdapterCache,
    AdapterHooks,
    AdapterRows,
    active_rows,
    adapter_from_lora,
)
from ..faces.models import FaceModels
from ..interface import Tensors
from ..lora import LoraTargets, LoraWeights, lora_targets
from ..models.family import ModelFamily
from ..models.sdxl import SdxlFamily
from ..roles.description import RoleDescription
from ..roles.diffusion import describe_roles
from ..roles.sdxl import describe_sdxl_roles
from ..shapes import DTYPES, DType

Runner = Callable[..., tuple[torch.Tensor, ...]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The diffusion roles' dtype on ``device``: fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


class TorchBackend:
    """Serves the roles of a model family, the face models and/or an SDXL family's.

    Diffusion roles run in ``dtype`` (fp16 on CUDA by default); roles whose description says
    ``fp16=False`` (the small face nets) always run in fp32.
    """

    name = "torch"

    def __init__(
        self,
        family: ModelFamily | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        faces: FaceModels | None = None,
        adapter_cache_bytes: int = DEFAULT_CACHE_BYTES,
        sdxl: SdxlFamily | None = None,
    ) -> None:
        self._device = torch.device(device) if device is not None else default_device()
        self._dtype = dtype or default_dtype(self._device)
        self.family = family
        self._roles: dict[str, RoleDescription] = {}
        if family is not None:
            family.to(self._device, self._dtype).eval()
            self._roles.update(describe_roles(family))
        if sdxl is not None:  # the text-to-template roles
            sdxl.to(self._device, self._dtype).eval()
            self._roles.update(describe_sdxl_roles(sdxl))
        if faces is not None:
            for module in faces.torch_modules:
                module.to(self._device)
            self._roles.update(faces.roles)
        self._runners: dict[str, Runner] = {}
        self._lock = threading.Lock()
        modules = family.lora_roots() if family is not None else {}
        self._lora_targets = lora_targets(modules)
        # Users' adapters apply on the base UNet and text encoder, and on each UNet variant (its
        # layers have the base's names and shapes); a role's calls enter its own variant's hooks.
        self._hooks = {"": AdapterHooks.on(modules, self._lora_targets)}
        for variant, unet in family.unet_variants.items() if family is not None else ():
            self._hooks[variant] = AdapterHooks.on({"unet": unet}, self._lora_targets)
        self.adapters = AdapterCache(adapter_cache_bytes)

    @property
    def roles(self) -> dict[str, RoleDescription]:
        return self._roles

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        """In process: nothing to release."""

    def lora_targets(self) -> LoraTargets:
        return self._lora_targets

    def retire_adapters(self, which: Callable[[str], bool]) -> None:
        self.adapters.discard(which)

    def warm_adapter(self, adapter: Adapter) -> None:
        """In process: an adapter from :meth:`adapter` is already on the device, in the hot cache."""

    def adapter(self, name: str, load: Callable[[], LoraWeights]) -> Adapter:
        """The adapter ``name`` from the hot cache; on a miss ``load()``'s LoRA, checked against the
        targeted layers and put on the device."""
        return self.adapters.get(
            name, lambda: adapter_from_lora(name, load(), self._lora_targets, self._device, self._dtype)
        )

    def add_role(self, description: RoleDescription) -> None:
        """Serves one more role of this family (a fused stage, say); its module is built on first use."""
        self._roles[description.name] = description

    def describe(self, role: str) -> RoleDescription:
        description = self._roles.get(role)
        if description is None:
            raise EngineInputError(role, "role", f"unknown; this backend serves {sorted(self._roles)}")
        return description

    def runner(self, role: str) -> Runner:
        with self._lock:
            if role not in self._runners:
                module = self.describe(role).build_module()
                if isinstance(module, torch.nn.Module):
                    module.eval()
                self._runners[role] = module
            return self._runners[role]

    def infer_many(self, calls: list[tuple[str, Tensors]]) -> list[Tensors]:
        return [self.infer(role, inputs) for role, inputs in calls]

    def infer(self, role: str, inputs: Tensors, adapters: AdapterRows | None = None) -> Tensors:
        description = self.describe(role)
        values = description.bind({name: tuple(t.shape) for name, t in inputs.items()})
        if active_rows(adapters) is not None and description.lora_target is None:
            raise EngineInputError(role, "adapters", "given to a role that takes no LoRA")
        float_dtype = self._dtype if description.fp16 else torch.float32
        args = [self._cast(inputs[spec.name], spec.dtype, float_dtype) for spec in description.inputs]
        hooks = self._hooks[description.variant]
        with torch.inference_mode(), hooks.rows(adapters, values.get("batch", 0)):
            outputs = self.runner(role)(*args)
        return {spec.name: out for spec, out in zip(description.outputs, outputs, strict=True)}

    def _cast(self, tensor: torch.Tensor, declared: DType, float_dtype: torch.dtype) -> torch.Tensor:
        dtype = float_dtype if declared in ("float32", "float16") else DTYPES[declared].torch
        return tensor.to(device=self._device, dtype=dtype)
