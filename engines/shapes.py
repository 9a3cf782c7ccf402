"""Symbolic tensor shapes shared by every consumer of a model description.

A dimension is either a fixed int or a :class:`Dim`: a named symbol times a rational scale
(``Dim("latent_height", Fraction(1, 2))`` is half the latent height). Profiles give each symbol
a min/opt/max value; concrete shapes, ONNX ``dim_param`` names and TensorRT optimisation
profiles are all derived from the same declaration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import torch

DType = Literal["float32", "float16", "int32", "int64", "uint8", "bool"]


@dataclass(frozen=True)
class DTypeNames:
    """One declared dtype as each runtime spells it."""

    torch: torch.dtype
    numpy: type[np.generic]
    triton: str  # KServe v2 datatype (the client's name; config.pbtxt adds a TYPE_ prefix)
    onnx: str  # onnxruntime's type string


DTYPES: dict[DType, DTypeNames] = {
    "float32": DTypeNames(torch.float32, np.float32, "FP32", "tensor(float)"),
    "float16": DTypeNames(torch.float16, np.float16, "FP16", "tensor(float16)"),
    "int32": DTypeNames(torch.int32, np.int32, "INT32", "tensor(int32)"),
    "int64": DTypeNames(torch.int64, np.int64, "INT64", "tensor(int64)"),
    "uint8": DTypeNames(torch.uint8, np.uint8, "UINT8", "tensor(uint8)"),
    "bool": DTypeNames(torch.bool, np.bool_, "BOOL", "tensor(bool)"),
}
ProfilePoint = Literal["min", "opt", "max"]
PROFILE_POINTS: tuple[ProfilePoint, ...] = ("min", "opt", "max")


DIM_NAME = re.compile(r"(?:(\d+)\*)?([A-Za-z_]\w*)(?:/(\d+))?")


@dataclass(frozen=True)
class Dim:
    symbol: str
    scale: Fraction = Fraction(1)

    def resolve(self, values: dict[str, int]) -> int:
        value = self.scale * values[self.symbol]
        if value.denominator != 1:
            raise ValueError(f"{self.name} is not whole for {self.symbol}={values[self.symbol]}")
        return int(value)

    @property
    def name(self) -> str:
        """The ONNX dim_param name: ``latent_height``, ``8*latent_height``, ``latent_height/2``."""
        if self.scale == 1:
            return self.symbol
        if self.scale.denominator == 1:
            return f"{self.scale.numerator}*{self.symbol}"
        if self.scale.numerator == 1:
            return f"{self.symbol}/{self.scale.denominator}"
        return f"{self.scale.numerator}*{self.symbol}/{self.scale.denominator}"

    @classmethod
    def parse(cls, name: str) -> Dim:
        """The dim whose :attr:`name` is ``name`` (the inverse, for descriptions read from JSON)."""
        match = DIM_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} is not a dim name like 'h', '8*h', 'h/2' or '3*h/4'")
        numerator, symbol, denominator = match.groups()
        return cls(symbol, Fraction(int(numerator or 1), int(denominator or 1)))

    def __mul__(self, factor: int | Fraction) -> Dim:
        return Dim(self.symbol, self.scale * factor)

    def __truediv__(self, divisor: int) -> Dim:
        return Dim(self.symbol, self.scale / divisor)


DimLike = int | Dim


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    shape: tuple[DimLike, ...]

    def resolve(self, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d.resolve(values) for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        """``{axis: dim_param}`` for the axes that vary (the form torch.onnx.export takes)."""
        return {i: d.name for i, d in enumerate(self.shape) if isinstance(d, Dim)}

    @property
    def symbols(self) -> set[str]:
        return {d.symbol for d in self.shape if isinstance(d, Dim)}


@dataclass(frozen=True)
class AxisRange:
    """Allowed values of one symbol: the optimisation profile of an engine along that axis."""

    min: int
    opt: int
    max: int
    # Values must be multiples of this (e.g. latent sizes divisible by the UNet's down factor).
    multiple: int = 1

    def __post_init__(self) -> None:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"profile needs min <= opt <= max, got {self}")
        if any(v % self.multiple for v in (self.min, self.opt, self.max)):
            raise ValueError(f"profile values must be multiples of {self.multiple}: {self}")

    def at(self, point: ProfilePoint) -> int:
        return {"min": self.min, "opt": self.opt, "max": self.max}[point]

    def admits(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple == 0


def sym(symbol: str) -> Dim:
    return Dim(symbol)
