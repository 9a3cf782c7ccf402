"""A role's description: the single declaration of its tensors (names, dtypes, symbolic shapes),
its profile (the range of each symbol) and how to build its module. Every consumer reads it: the
backends check calls against it (:meth:`RoleDescription.bind`), the exporter traces and names the
ONNX graph from it, the TensorRT plan and the Triton config are derived from it, and the engine
manifest is its JSON form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from easyphoto.rpc.errors import EngineInputError

from ..shapes import DTYPES, AxisRange, Dim, DimLike, ProfilePoint, TensorSpec, sym

BATCH = sym("batch")


@dataclass(frozen=True)
class RoleDescription:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, AxisRange]
    # Builds the callable (an nn.Module for roles that export to ONNX) that takes the inputs
    # positionally, in declared order, and returns a tuple of the outputs in declared order.
    build_module: Callable[[], Callable[..., tuple[torch.Tensor, ...]]]
    # Whether the role runs in fp16 on GPU (fp32 I/O for floats that must stay exact otherwise).
    fp16: bool = True
    # Value ranges for sample inputs that are not standard normal (e.g. token ids, timesteps).
    sample_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Output-only symbols computed from the input symbols (e.g. a conv net's output size).
    derived: dict[str, Callable[[dict[str, int]], int]] = field(default_factory=dict)
    # The LoRA target whose layers this role computes ("unet", "text_encoder"): a call may carry
    # a user's adapter per sample. None: the role takes no adapter (ControlNets carry no LoRA).
    lora_target: str | None = None
    # The UNet variant a denoising role computes with: "" the base UNet, "lcm" the copy with an
    # LCM-LoRA fused in (:mod:`engines.models.variants`).
    variant: str = ""

    @property
    def batched(self) -> bool:
        """Every tensor's first axis is the batch symbol itself: servers may batch requests along it
        (Triton's implicit batch dimension; per-sample scalars travel as ``[batch, 1]``)."""
        tensors = (*self.inputs, *self.outputs)
        return all(spec.shape and spec.shape[0] == BATCH for spec in tensors)

    def per_sample_scalar(self, spec: TensorSpec) -> bool:
        """A ``[batch]`` tensor of a batched role (a timestep): Triton's implicit batch axis leaves it
        no dims of its own, so it travels as ``[batch, 1]`` and the model config reshapes it back."""
        return self.batched and len(spec.shape) == 1

    def triton_dims(self, spec: TensorSpec) -> tuple[DimLike, ...]:
        """The dims a Triton model declares for ``spec``: without the implicit batch axis of a
        batched role, and a per-sample scalar as ``[1]``."""
        if self.per_sample_scalar(spec):
            return (1,)
        return spec.shape[1:] if self.batched else spec.shape

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(spec for spec in self.outputs if spec.name == name)

    def bind(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Checks concrete input shapes against the declaration and profile; returns the symbols' values.

        Raises :class:`EngineInputError` naming the input and what is wrong.
        """
        values: dict[str, int] = {}
        for spec in self.inputs:
            if spec.name not in shapes:
                raise EngineInputError(self.name, spec.name, "missing")
            shape = shapes[spec.name]
            if len(shape) != len(spec.shape):
                raise EngineInputError(self.name, spec.name, f"rank {len(shape)}, expected {len(spec.shape)}")
            for axis, (dim, size) in enumerate(zip(spec.shape, shape, strict=True)):
                if isinstance(dim, int):
                    if size != dim:
                        raise EngineInputError(self.name, spec.name, f"axis {axis} is {size}, expected {dim}")
                    continue
                whole = Fraction(size) / dim.scale
                if whole.denominator != 1:
                    raise EngineInputError(
                        self.name, spec.name, f"axis {axis} is {size}, not a whole {dim.name}"
                    )
                if values.setdefault(dim.symbol, int(whole)) != int(whole):
                    raise EngineInputError(
                        self.name,
                        spec.name,
                        f"axis {axis} gives {dim.symbol}={int(whole)}, other inputs {values[dim.symbol]}",
                    )
        extra = set(shapes) - {spec.name for spec in self.inputs}
        if extra:
            raise EngineInputError(self.name, sorted(extra)[0], "not an input of this role")
        for symbol, value in values.items():
            axis_range = self.axes[symbol]
            if not axis_range.admits(value):
                raise EngineInputError(
                    self.name,
                    symbol,
                    f"{symbol}={value} outside the profile [{axis_range.min}, {axis_range.max}]"
                    f" (multiple of {axis_range.multiple})",
                )
        return values

    def manifest(self) -> dict[str, Any]:
        """The JSON form of this description (the engine manifest entry); :meth:`from_manifest`
        reads it back, all but the module and the derived output symbols."""

        def tensor(spec: TensorSpec) -> dict[str, object]:
            dims = [d if isinstance(d, int) else d.name for d in spec.shape]
            return {"name": spec.name, "dtype": spec.dtype, "shape": dims}

        return {
            "name": self.name,
            "inputs": [tensor(s) for s in self.inputs],
            "outputs": [tensor(s) for s in self.outputs],
            "axes": {
                k: {"min": a.min, "opt": a.opt, "max": a.max, "multiple": a.multiple}
                for k, a in self.axes.items()
            },
            "fp16": self.fp16,
            "sample_ranges": {name: list(bounds) for name, bounds in self.sample_ranges.items()},
            "lora_target": self.lora_target,
            "variant": self.variant,
        }

    @classmethod
    def from_manifest(
        cls, entry: dict[str, Any], build_module: Callable[[], Callable[..., tuple[torch.Tensor, ...]]]
    ) -> RoleDescription:
        """A description read from its manifest entry; ``build_module`` stands in for the weights."""

        def tensor(values: dict[str, Any]) -> TensorSpec:
            dims = tuple(d if isinstance(d, int) else Dim.parse(d) for d in values["shape"])
            return TensorSpec(values["name"], values["dtype"], dims)

        return cls(
            name=entry["name"],
            inputs=tuple(tensor(t) for t in entry["inputs"]),
            outputs=tuple(tensor(t) for t in entry["outputs"]),
            axes={name: AxisRange(**axis) for name, axis in entry["axes"].items()},
            build_module=build_module,
            fp16=bool(entry["fp16"]),
            sample_ranges={name: (low, high) for name, (low, high) in entry.get("sample_ranges", {}).items()},
            lora_target=entry.get("lora_target"),
            variant=entry.get("variant", ""),
        )

    def axis_values(self, point: ProfilePoint = "opt") -> dict[str, int]:
        return {symbol: axis.at(point) for symbol, axis in self.axes.items()}

    def shapes(self, point: ProfilePoint = "opt", values: dict[str, int] | None = None) -> dict[str, tuple]:
        resolved = {**self.axis_values(point), **(values or {})}
        resolved.update({symbol: rule(resolved) for symbol, rule in self.derived.items()})
        return {spec.name: spec.resolve(resolved) for spec in (*self.inputs, *self.outputs)}

    def sample_inputs(
        self,
        point: ProfilePoint = "opt",
        seed: int = 0,
        device: torch.device | str = "cpu",
        float_dtype: torch.dtype = torch.float32,
    ) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        shapes = self.shapes(point)
        samples: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            shape = shapes[spec.name]
            low, high = self.sample_ranges.get(spec.name, (0.0, 0.0))
            if spec.dtype in ("int32", "int64"):
                value = torch.randint(int(low), int(high), shape, generator=generator)
                samples[spec.name] = value.to(DTYPES[spec.dtype].torch)
            elif spec.name in self.sample_ranges:
                value = torch.rand(shape, generator=generator) * (high - low) + low
                samples[spec.name] = value.to(float_dtype)
            else:
                samples[spec.name] = torch.randn(shape, generator=generator).to(float_dtype)
        return {name: tensor.to(device) for name, tensor in samples.items()}
