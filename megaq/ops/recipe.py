"""Recipes: how each of a linear layer's three GEMMs quantizes each operand (ALGORITHMS.md).

A recipe is data. For every GEMM `out = A · Bᵀ` (both operands stored `[rows, reduction]`) it names,
per operand, the format, block shape and rounding, plus an optional Hadamard rotation of the
reduction axis shared by both operands:

- forward: A = X `[tokens, in]`,   B = W `[out, in]`       (reduce over in)
- dgrad:   A = ∇Y `[tokens, out]`, B = Wᵀ `[in, out]`      (reduce over out)
- wgrad:   A = ∇Yᵀ `[out, tokens]`, B = Xᵀ `[in, tokens]`  (reduce over tokens)

The INT4 recipe's backward does not requantize per GEMM: it reuses the forward's INT4 operands (in
Hadamard space) and carries the output gradient as bit-split INT4 with leverage score sampling; its
`int4_backward` section says how.

Nothing outside `megaq.ops` branches on precision: modules pass a `Recipe` through.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..quant import HQ_SCALE_MODES, LSS_MODES, ROUNDING_MODES, SUPPORTED_HADAMARD_BLOCKS

FORMATS = ("bf16", "int8", "int4")
# "max": this call's abs-max; "lsq": a per-tensor LSQ step (INT4); "delayed": an abs-max predicted from
# earlier calls (the wgrad operands; megaq.quant.delayed)
SCALE_MODES = ("max",) + tuple(m for m in HQ_SCALE_MODES if m != "row") + ("delayed",)


class RecipeError(ValueError):
    """A recipe description names an unknown key or an unsupported value."""


def _check_choice(where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"{where} must be one of {list(allowed)}; got {value!r}")


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized. `block` is in the operand's `[rows, reduction]` layout,
    -1 meaning the whole extent ((1, -1) = one scale per row)."""
    fmt: str = "bf16"
    block: tuple[int, int] = (1, -1)
    rounding: str = "nearest"
    scale: str = "max"  # "max": amax/qmax per block; "lsq": per-tensor LSQ step (INT4 only);
                        # "delayed": the abs-max predicted from earlier calls (wgrad operands, INT8 per row)

    def validate(self, where: str) -> None:
        _check_choice(f"{where}.fmt", self.fmt, FORMATS)
        _check_choice(f"{where}.rounding", self.rounding, ROUNDING_MODES)
        _check_choice(f"{where}.scale", self.scale, SCALE_MODES)
        if len(self.block) != 2 or any(not isinstance(b, int) or (b <= 0 and b != -1) for b in self.block):
            raise RecipeError(f"{where}.block must be two positive ints or -1; got {self.block!r}")
        if self.scale == "lsq" and self.fmt != "int4":
            raise RecipeError(f"{where}.scale 'lsq' is only defined for fmt 'int4'")
        if self.scale == "delayed" and (self.fmt != "int8" or tuple(self.block) != (1, -1)):
            raise RecipeError(f"{where}.scale 'delayed' is defined for fmt 'int8' with one scale per row, "
                              f"block [1, -1]; got fmt {self.fmt!r}, block {list(self.block)}")

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}.get(self.fmt, 16)

    @property
    def is_quantized(self) -> bool:
        return self.fmt != "bf16"


@dataclass(frozen=True)
class GemmSpec:
    a: OperandSpec = field(default_factory=OperandSpec)
    b: OperandSpec = field(default_factory=OperandSpec)
    hadamard: int = 0  # block size of the reduction-axis rotation applied to both operands; 0 = none

    def validate(self, where: str) -> None:
        self.a.validate(f"{where}.a")
        self.b.validate(f"{where}.b")
        if self.hadamard and self.hadamard not in SUPPORTED_HADAMARD_BLOCKS:
            raise RecipeError(f"{where}.hadamard must be 0 or one of {list(SUPPORTED_HADAMARD_BLOCKS)}; "
                              f"got {self.hadamard!r}")
        if self.a.is_quantized != self.b.is_quantized:
            raise RecipeError(f"{where}: both operands must be quantized or neither "
                              f"(a.fmt={self.a.fmt!r}, b.fmt={self.b.fmt!r})")

    @property
    def is_quantized(self) -> bool:
        return self.a.is_quantized


@dataclass(frozen=True)
class Int4Backward:
    """The INT4 paper's backward: bit-split ∇Y, leverage score sampling over its 2N rows."""
    lss: str = "sample"          # "sample" | "drop_zero"
    keep_ratio: float = 0.5      # expected fraction of the 2N bit-split rows kept ("sample")

    def validate(self, where: str) -> None:
        _check_choice(f"{where}.lss", self.lss, LSS_MODES)
        if not 0.0 < self.keep_ratio <= 1.0:
            raise RecipeError(f"{where}.keep_ratio must be in (0, 1]; got {self.keep_ratio!r}")


@dataclass(frozen=True)
class Recipe:
    name: str
    forward: GemmSpec = field(default_factory=GemmSpec)
    dgrad: GemmSpec = field(default_factory=GemmSpec)
    wgrad: GemmSpec = field(default_factory=GemmSpec)
    int4_backward: Int4Backward | None = None
    check_finite: bool = True  # NaN/Inf check on quantizer inputs (one reduction per operand)
    # delayed scaling (operands with scale "delayed"): the prediction decays by this factor per call
    # unless the call's abs-max is larger (megaq.quant.delayed)
    delayed_decay: float = 0.95

    def __post_init__(self) -> None:
        self.forward.validate("forward")
        self.dgrad.validate("dgrad")
        self.wgrad.validate("wgrad")
        for where in ("forward.a", "forward.b", "dgrad.a", "dgrad.b"):
            gemm, side = where.split(".")
            if getattr(getattr(self, gemm), side).scale == "delayed":
                # their rows are tokens (new every call) or weight rows (quantized once per step anyway)
                raise RecipeError(f"{where}.scale 'delayed' is not supported: only the wgrad operands, "
                                  "whose rows are features seen again every call, can use a prediction")
        if (self.wgrad.a.scale == "delayed" or self.wgrad.b.scale == "delayed") and not self.wgrad.hadamard:
            raise RecipeError("wgrad operands with scale 'delayed' need a Hadamard rotation (wgrad.hadamard > 0): "
                              "the one-pass kernel is the rotated quantizer's")
        if not 0.0 <= self.delayed_decay <= 1.0:
            raise RecipeError(f"delayed_decay must be in [0, 1]; got {self.delayed_decay!r}")
        if self.int4_backward is not None:
            self.int4_backward.validate("int4_backward")
            if self.forward.a.fmt != "int4" or not self.forward.hadamard:
                raise RecipeError("int4_backward needs an INT4 forward with a Hadamard rotation "
                                  "(forward.a.fmt 'int4', forward.hadamard > 0)")

    @property
    def is_quantized(self) -> bool:
        return self.forward.is_quantized or self.dgrad.is_quantized or self.wgrad.is_quantized

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Presets
def _int8_blockwise(name: str, act_block: tuple[int, int], weight_block: tuple[int, int]) -> Recipe:
    """Per-block INT8: activations and gradients in 1×k tiles along the reduction axis, weights in
    square k×k blocks, so one weight copy serves forward (W) and dgrad (Wᵀ)."""
    k = act_block[1]
    fwd = GemmSpec(OperandSpec("int8", act_block), OperandSpec("int8", weight_block))
    dgrad = GemmSpec(OperandSpec("int8", act_block, "stochastic"), OperandSpec("int8", weight_block))
    wgrad = GemmSpec(OperandSpec("int8", (1, k), "stochastic"), OperandSpec("int8", (1, k)))
    return Recipe(name, fwd, dgrad, wgrad)


def _int8_square(name: str, block: int) -> Recipe:
    """Jetfire: square blocks for activations, weights and gradients alike."""
    sq = (block, block)
    return Recipe(name,
                  GemmSpec(OperandSpec("int8", sq), OperandSpec("int8", sq)),
                  GemmSpec(OperandSpec("int8", sq, "stochastic"), OperandSpec("int8", sq)),
                  GemmSpec(OperandSpec("int8", sq, "stochastic"), OperandSpec("int8", sq)))


def _int8_hadamard(name: str, block: int) -> Recipe:
    """Outlier protection moved out of the GEMM's inner loop: rotate the reduction axis with a block
    Hadamard, then one scale per row of each operand, applied once in the epilogue."""
    row = (1, -1)
    return Recipe(name,
                  GemmSpec(OperandSpec("int8", row), OperandSpec("int8", row), hadamard=block),
                  GemmSpec(OperandSpec("int8", row, "stochastic"), OperandSpec("int8", row), hadamard=block),
                  GemmSpec(OperandSpec("int8", row, "stochastic"), OperandSpec("int8", row), hadamard=block))


def _int8_delayed(name: str, block: int) -> Recipe:
    """`_int8_hadamard` with delayed scaling of the wgrad operands Xᵀ and ∇Yᵀ: their per-feature scales
    come from earlier calls' abs-maxes, so their quantizer reads the tensor once instead of twice."""
    base = _int8_hadamard(name, block)
    delayed = dataclasses.replace(base.wgrad, a=dataclasses.replace(base.wgrad.a, scale="delayed"),
                                  b=dataclasses.replace(base.wgrad.b, scale="delayed"))
    return dataclasses.replace(base, wgrad=delayed)


def _int4(name: str, scale: str, lss: str, hadamard: int = 32) -> Recipe:
    """HQ forward: Hadamard-rotated INT4 with a per-row ("max") or LSQ per-tensor ("lsq") scale."""
    row = (1, -1)
    fwd = GemmSpec(OperandSpec("int4", row, scale=scale), OperandSpec("int4", row, scale=scale),
                   hadamard=hadamard)
    return Recipe(name, forward=fwd, int4_backward=Int4Backward(lss=lss))


# `int8` is the Hadamard + per-row × per-column recipe: on the H100 it is both the fastest INT8 GEMM
# (scales applied once in the epilogue, ~1.45–1.7× cuBLAS BF16) and the most accurate INT8 variant on
# outlier-heavy inputs (docs/PERFORMANCE.md). Per-block scaling along K stays available.
RECIPE_PRESETS: dict[str, Recipe] = {
    "bf16": Recipe("bf16"),
    "int8": _int8_hadamard("int8", 128),
    "int8_delayed": _int8_delayed("int8_delayed", 128),
    "int8_block128": _int8_blockwise("int8_block128", (1, 128), (128, 128)),
    "int8_block32": _int8_blockwise("int8_block32", (1, 32), (32, 32)),
    "int8_jetfire": _int8_square("int8_jetfire", 32),
    "int4": _int4("int4", "max", "sample"),
    "int4_lsq": _int4("int4_lsq", "lsq", "sample"),
    "int4_drop_zero": _int4("int4_drop_zero", "max", "drop_zero"),
}


# ---------------------------------------------------------------------------------------------------
# Building recipes from config sections
def _build(cls, data: Mapping[str, Any], where: str, base):
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping; got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        current = getattr(base, f.name)
        if f.name not in data:
            values[f.name] = current
            continue
        value = data[f.name]
        sub = {"forward": GemmSpec, "dgrad": GemmSpec, "wgrad": GemmSpec, "a": OperandSpec,
               "b": OperandSpec, "int4_backward": Int4Backward}.get(f.name)
        if sub is not None and value is not None:
            value = _build(sub, value, f"{where}.{f.name}", current if current is not None else sub())
        elif f.name == "block":
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def get_recipe(spec: str | Mapping[str, Any] | Recipe) -> Recipe:
    """A preset name, a `Recipe`, or a mapping: `{"preset": "int8", "forward": {"a": {"block": [1, 32]}}}`
    starts from the preset and overrides the keys given (a mapping without `preset` starts from bf16)."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, str):
        if spec not in RECIPE_PRESETS:
            raise RecipeError(f"unknown recipe {spec!r}; presets: {sorted(RECIPE_PRESETS)}")
        return RECIPE_PRESETS[spec]
    if isinstance(spec, Mapping):
        spec = dict(spec)
        base = get_recipe(spec.pop("preset", "bf16"))
        # switching the finite check does not change the numerics: keep the preset's name
        changes_numerics = bool(set(spec) - {"check_finite", "name"})
        spec.setdefault("name", f"{base.name}+custom" if changes_numerics else base.name)
        return _build(Recipe, spec, "recipe", base)
    raise RecipeError(f"recipe must be a preset name or a mapping; got {type(spec).__name__}")
