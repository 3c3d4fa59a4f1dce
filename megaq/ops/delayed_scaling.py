"""Where the abs-max predictions of delayed scaling live: one `megaq.quant.DelayedAmax` per layer and
wgrad operand (`OperandSpec.scale == "delayed"`; the numerics in megaq.quant.delayed).

A prediction belongs to a layer's weight, as the cached weight operands of `megaq.ops.weight_cache` do:
it is kept on the weight tensor object (a tensor attribute), so every call of the layer — every micro
batch, the recomputed forward of activation checkpointing, a CUDA graph's eager warm-up — finds the same
buffers, whose addresses a graph capture then keeps. The forward looks up both of a layer's states and
hands the backward its own through the autograd context (the backward's saved weight may be another
tensor object under saved-tensor hooks).

Predictions are not checkpointed: they are statistics of recent activations and gradients, and a resumed
run rebuilds them with one exact (two-pass) quantization per operand.

`take_overflow_counts()` sums, over every live state, the rows whose abs-max passed their prediction
since the last call: how often values clipped (the trainer logs the fraction).
"""

from __future__ import annotations

import weakref

import torch

from ..quant import DelayedAmax

_ATTRIBUTE = "_megaq_delayed_amax"
_STATES: list[weakref.ref] = []   # every state made, for take_overflow_counts()


def state_for(weight: torch.Tensor, operand: str, rows: int, decay: float) -> DelayedAmax:
    """The prediction of operand `operand` (e.g. "wgrad.a") of the layer owning `weight`, with one entry
    per row of the quantized operand; made (on the weight's device) on first use."""
    states = getattr(weight, _ATTRIBUTE, None)
    if states is None:
        states = {}
        setattr(weight, _ATTRIBUTE, states)
    key = (operand, rows, float(decay))
    state = states.get(key)
    if state is None:
        state = DelayedAmax(rows, decay, weight.device)
        states[key] = state
        _STATES.append(weakref.ref(state))
    return state


def _live() -> list[DelayedAmax]:
    live = [s for s in (r() for r in _STATES) if s is not None]
    _STATES[:] = [weakref.ref(s) for s in live]
    return live


def take_overflow_counts() -> tuple[int, int]:
    """(rows whose abs-max passed the prediction, rows quantized) over every state since the last call;
    resets the counts. One host synchronization."""
    live = _live()
    if not live:
        return 0, 0
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for s in live:
        by_device.setdefault(s.counts.device, []).append(s.counts)
    over = total = 0
    for counts in by_device.values():
        summed = torch.stack(counts).sum(0).tolist()
        over, total = over + int(summed[0]), total + int(summed[1])
        torch._foreach_zero_(counts)
    return over, total


def reset_states_of(weights) -> int:
    """Forget the predictions kept on these weight tensors (e.g. the aliases a CUDA graph warm-up ran
    through); other layers' and other models' predictions stay. Returns how many were reset."""
    count = 0
    for weight in weights:
        for state in getattr(weight, _ATTRIBUTE, {}).values():
            state.reset()
            count += 1
    return count
