"""Where the abs-max predictions of delayed scaling live: one `megaq.quant.DelayedAmax` per layer and
wgrad operand (`OperandSpec.scale == "delayed"`; the numerics in megaq.quant.delayed).

A prediction belongs to a layer's weight, as the cached weight operands of `megaq.ops.weight_cache` do:
it is kept on the weight tensor object (a tensor attribute), so every call of the layer — every micro
batch, the recomputed forward of activation checkpointing, a CUDA graph's eager warm-up — finds the same
buffers, whose addresses a graph capture then keeps. The forward looks up both of a layer's states and
hands the backward its own through the autograd context (the backward's saved weight may be another
tensor object under saved-tensor hooks).

Checkpoints keep them (`state_dict` / `load_state_dict`, one file per rank: each data-parallel rank
predicts from its own data), so that a resumed run quantizes exactly as the uninterrupted one would.
Under CUDA graphs the states live on the parameter aliases the graphs were captured through
(megaq.training.cuda_graphs), which `state_dict` does not see: such a run is checkpointed without them,
and a resumed one seeds them again with one exact (two-pass) quantization per operand.

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


def state_dict(model: torch.nn.Module) -> dict[str, dict]:
    """The predictions kept on `model`'s parameters, on the CPU, by "parameter name:operand"."""
    saved = {}
    for name, weight in model.named_parameters():
        for (operand, rows, decay), state in getattr(weight, _ATTRIBUTE, {}).items():
            saved[f"{name}:{operand}"] = {"rows": rows, "decay": decay, "pred": state.pred.cpu(),
                                          "valid": state.valid.cpu()}
    return saved


def load_state_dict(model: torch.nn.Module, saved: dict[str, dict]) -> int:
    """Restore predictions saved by `state_dict` onto `model`'s parameters of the same names. Returns
    how many were restored; an entry whose parameter is missing or has another shape raises ValueError
    (a checkpoint of another model)."""
    params = dict(model.named_parameters())
    for key, entry in saved.items():
        name, _, operand = key.rpartition(":")
        weight = params.get(name)
        if weight is None:
            raise ValueError(f"delayed-scaling state {key!r}: the model has no parameter {name!r}")
        state = state_for(weight, operand, int(entry["rows"]), float(entry["decay"]))
        if tuple(entry["pred"].shape) != (state.rows,):
            raise ValueError(f"delayed-scaling state {key!r}: {tuple(entry['pred'].shape)} predictions for "
                             f"{state.rows} rows")
        state.pred.copy_(entry["pred"])
        state.valid.copy_(entry["valid"])
        state.track.zero_()
    return len(saved)


def reset_states_of(weights) -> int:
    """Forget the predictions kept on these weight tensors (e.g. the aliases a CUDA graph warm-up ran
    through); other layers' and other models' predictions stay. Returns how many were reset."""
    count = 0
    for weight in weights:
        for state in getattr(weight, _ATTRIBUTE, {}).values():
            state.reset()
            count += 1
    return count
