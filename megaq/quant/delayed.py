"""Delayed per-row scaling: quantize with an abs-max predicted from earlier calls (ALGORITHMS.md §1,
docs/NUMERICS.md "Delayed scaling").

The wgrad operands Xᵀ and ∇Yᵀ are quantized per row of the transpose, i.e. per feature over all tokens
of the micro batch. Finding that abs-max exactly needs a whole pass over the tensor before the
quantizing pass can start (the two-pass kernels); the quantized payload cannot be written before the
last token is seen. Delayed scaling (as FP8 training's "delayed scaling" in Transformer Engine) uses a
prediction instead: the abs-max of the same operand of the same layer in earlier calls.

Per call, with `pred` the prediction (one FP32 per row) and `amax` this call's true abs-max:
- the payload is `clamp(round(v / (pred / qmax)), -qmax, qmax)`: values past a stale prediction clip;
- the prediction becomes `max(amax, decay · pred)`: it follows growth at once (after one call) and
  forgets a past peak geometrically;
- rows where `amax > pred` are counted (`DelayedAmax.counts`), so the clipping is observable.
The first call of a state has no prediction: it uses the exact abs-max (what the undelayed quantizer
does) and seeds the prediction with it.

`DelayedAmax` is plain data; the GPU kernels (`megaq.kernels.hadamard_quantize_delayed`) update the
same tensors in place, which keeps their addresses fixed for CUDA graph replays.
"""

from __future__ import annotations

import torch

from .blockwise import qmax_for_bits, scales_from_absmax
from .rounding import apply_rounding
from .tensor import QuantizedTensor


class DelayedAmax:
    """The abs-max prediction of one quantized operand (one FP32 per row of the quantized tensor).

    pred:     FP32 `[rows]`, the abs-max the next call's scales come from.
    track:    FP32 `[rows]`, zero between calls; the GPU kernels fold a call's true abs-max into it
              (as int32 bits, with atomics) before the update turns it into the new prediction.
    counts:   int64 `[2]`, rows whose true abs-max exceeded the prediction, and rows quantized, since
              the last `take_counts()` (both stay on the device: reading them synchronizes).
    valid:    int32 `[1]`, 0 until a call has seeded `pred`. A device flag, not a host one, so that one
              captured CUDA graph serves both cases: the kernels read it and skip the abs-max pass once
              it is set (`megaq.kernels.hadamard_quantize_delayed`).
    """

    def __init__(self, rows: int, decay: float, device: torch.device | str):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"delayed scaling decay must be in [0, 1]; got {decay!r}")
        if rows <= 0:
            raise ValueError(f"delayed scaling needs at least one row; got {rows}")
        self.decay = float(decay)
        self.pred = torch.zeros(rows, dtype=torch.float32, device=device)
        self.track = torch.zeros(rows, dtype=torch.float32, device=device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)
        self.valid = torch.zeros(1, dtype=torch.int32, device=device)

    @property
    def rows(self) -> int:
        return self.pred.shape[0]

    def check_rows(self, rows: int, what: str) -> None:
        if rows != self.rows:
            raise ValueError(f"{what}: the delayed-scaling state predicts {self.rows} rows but the operand "
                             f"has {rows}; one state serves one operand of one layer")

    def reset(self) -> None:
        """Forget the prediction and what was counted against it: the next call uses the exact abs-max
        again (e.g. after a CUDA graph's warm-up, whose inputs were not the real ones)."""
        self.pred.zero_()
        self.track.zero_()
        self.valid.zero_()
        self.counts.zero_()

    def take_counts(self) -> tuple[int, int]:
        """(overflowed rows, quantized rows) since the last call, and reset them. Synchronizes."""
        over, total = (int(v) for v in self.counts.tolist())
        self.counts.zero_()
        return over, total


def update_prediction(state: DelayedAmax, amax: torch.Tensor, count: bool = True) -> None:
    """`pred ← max(amax, decay · pred)`, counting the rows where `amax > pred` when `count`. A row whose
    abs-max is NaN/Inf keeps its prediction: one bad call must not poison every later scale (the
    NaN/Inf check, where it is on, reports the call itself)."""
    amax = amax.float()
    amax = torch.where(torch.isfinite(amax), amax, state.pred)
    if count:
        state.counts[0] += (amax > state.pred).sum()
        state.counts[1] += amax.numel()
    torch.maximum(amax, state.pred * state.decay, out=state.pred)
    state.valid.fill_(1)


def quantize_rows_delayed(v: torch.Tensor, state: DelayedAmax, bits: int = 8, rounding: str = "nearest",
                          generator: torch.Generator | None = None) -> QuantizedTensor:
    """Per-row quantization of `v` `[rows, cols]` with scales from `state`'s prediction (the exact
    abs-max on the state's first call), then the prediction's update (module docstring)."""
    state.check_rows(v.shape[0], "quantize_rows_delayed")
    if bits != 8:
        raise ValueError(f"delayed scaling is defined for INT8 operands; got bits={bits}")
    qmax = qmax_for_bits(bits)
    v = v.float()
    amax = v.abs().amax(dim=1)
    first = not bool(state.valid.item())
    scale = scales_from_absmax(amax if first else state.pred.clone(), qmax)
    q = apply_rounding(v / scale[:, None], rounding, generator).clamp_(-qmax, qmax).to(torch.int8)
    update_prediction(state, amax, count=not first)
    return QuantizedTensor(q, scale[:, None].contiguous(), (1, v.shape[1]), bits, tuple(v.shape))
