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
Under CUDA graphs the kernels are captured through aliases of the parameters
(megaq.training.cuda_graphs); `share_states` makes each alias hold its parameter's states (the same
buffers), so `state_dict` sees what the replays update, and predictions restored from a checkpoint
before the capture are the ones the graphs start from. The capture's eager warm-up runs on made-up
output gradients: `snapshot_states_of` puts the predictions back as they were before it.

`take_overflow_counts()` sums, over every live state, the rows whose abs-max passed their prediction
since the last call: how often values clipped (the trainer logs the fraction).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from ..quant import DelayedAmax

_ATTRIBUTE = "_megaq_delayed_amax"
_STATES: list[weakref.ref] = []   # every state made, for take_overflow_counts()


def state_for(weight: torch.Tensor, operand: str, rows: int, decay: float) -> DelayedAmax:
    """The prediction of operand `operand` (e.g. "wgrad.a") of the layer owning `weight`, with one entry
    per row of the quantized operand; made (on the weight's device) on first use."""
    states = _states_dict(weight)
    key = (operand, rows, float(decay))
    state = states.get(key)
    if state is None:
        state = DelayedAmax(rows, decay, weight.device)
        states[key] = state
        _STATES.append(weakref.ref(state))
    return state


def _states_dict(weight: torch.Tensor) -> dict:
    states = getattr(weight, _ATTRIBUTE, None)
    if states is None:
        states = {}
        setattr(weight, _ATTRIBUTE, states)
    return states


def share_states(weight: torch.Tensor, alias: torch.Tensor) -> None:
    """Make `alias` (a tensor standing in for the parameter `weight`, e.g. one a CUDA graph is captured
    through) hold the same predictions as `weight`: one set of buffers, states made later through
    either included."""
    setattr(alias, _ATTRIBUTE, _states_dict(weight))


def snapshot_states_of(weights) -> Callable[[], int]:
    """Remember the predictions kept on these weight tensors now. The returned function puts them back
    in place (same buffers, so captured kernels keep their addresses) and resets the states made since;
    it returns how many states it restored or reset."""
    weights = list(weights)
    saved = {id(state): (state.pred.clone(), state.track.clone(), state.counts.clone(), state.valid.clone())
             for weight in weights for state in getattr(weight, _ATTRIBUTE, {}).values()}

    def restore() -> int:
        done = set()
        for weight in weights:
            for state in getattr(weight, _ATTRIBUTE, {}).values():
                if id(state) in done:
                    continue
                done.add(id(state))
                before = saved.get(id(state))
                if before is None:
                    state.reset()
                else:
                    for buffer, value in zip((state.pred, state.track, state.counts, state.valid), before):
                        buffer.copy_(value)
        return len(done)

    return restore


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
