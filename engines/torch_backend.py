"""The embedded backend: every role runs in process with PyTorch (CPU fp32, or CUDA fp16)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from .errors import EngineInputError
from .family import ModelFamily
from .interface import Tensors
from .roles import TORCH_DTYPES, RoleDescription, describe_roles


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        family: ModelFamily,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._device = torch.device(device) if device is not None else default_device()
        self._dtype = dtype or (torch.float16 if self._device.type == "cuda" else torch.float32)
        self.family = family.to(self._device, self._dtype).eval()
        self._roles = describe_roles(family)
        self._modules: dict[str, nn.Module] = {}
        self._lock = threading.Lock()

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

    def module(self, role: str) -> nn.Module:
        with self._lock:
            if role not in self._modules:
                if role not in self._roles:
                    raise EngineInputError(
                        role, "role", f"unknown; this backend serves {sorted(self._roles)}"
                    )
                self._modules[role] = self._roles[role].build_module(self.family).eval()
            return self._modules[role]

    def infer(self, role: str, inputs: Tensors) -> Tensors:
        description = self._roles.get(role)
        if description is None:
            raise EngineInputError(role, "role", f"unknown; this backend serves {sorted(self._roles)}")
        description.bind({name: tuple(t.shape) for name, t in inputs.items()})
        args = [self._cast(inputs[spec.name], spec.dtype) for spec in description.inputs]
        with torch.inference_mode():
            outputs = self.module(role)(*args)
        return {spec.name: out for spec, out in zip(description.outputs, outputs, strict=True)}

    def _cast(self, tensor: torch.Tensor, declared: str) -> torch.Tensor:
        dtype = self._dtype if declared in ("float32", "float16") else TORCH_DTYPES[declared]
        return tensor.to(device=self._device, dtype=dtype)
