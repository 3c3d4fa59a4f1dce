"""Stop a run whose gradients went NaN/Inf before any checkpoint of it is written.

DeepSpeed's FP16 mode, and its BF16 mode with `check_grad_overflow`, skip an optimizer step whose
gradients hold NaN/Inf; they find out with a scan of every parameter's gradient and a device sync per
step. megaq builds BF16 configs without that check, because it cost ~145 ms of GPU idle per 1.3B step
(megaq.training.config.build_deepspeed_config). What it does instead, here: after each optimizer step,
fold "the global gradient norm is not finite" into one device flag (no sync: DeepSpeed computed that
norm for clipping anyway, and any NaN/Inf gradient makes it NaN/Inf). The trainer reads the flag where
it synchronizes anyway, at each log step, and before every checkpoint. A set flag raises
`FloatingPointError`, so the weights of a non-finite step are never saved, and the last good checkpoint
stays the one to resume from.

Where DeepSpeed does skip such steps itself (`deepspeed_skips_nonfinite_steps`), this stays off: a
skipped step is not an error.
"""

from __future__ import annotations

import math

import torch


class NonfiniteGradients:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._flag: torch.Tensor | None = None   # on the device: a non-finite norm since the last check
        self._checked_through = 0                 # the steps up to this one were checked and finite
        self._bad_step: int | None = None        # known exactly where the norm came back as a number

    def step_done(self, engine, step: int) -> None:
        """After optimizer step `step`: record whether its gradient norm was finite (no sync)."""
        if not self.enabled or self._bad_step is not None:
            return
        norm = engine.get_global_grad_norm()
        if norm is None:
            return
        if isinstance(norm, torch.Tensor):
            bad = ~torch.isfinite(norm.detach()).all()
            if self._flag is None:
                self._flag = torch.zeros((), dtype=torch.bool, device=norm.device)
            self._flag.logical_or_(bad)
        elif not math.isfinite(float(norm)):
            self._bad_step = step

    def check(self, step: int, last_checkpoint: str | None) -> None:
        """Raise FloatingPointError if a step up to `step` had a non-finite gradient norm (syncs)."""
        if not self.enabled:
            return
        bad = self._bad_step is not None or (self._flag is not None and bool(self._flag))
        if bad:
            where = (f"at step {self._bad_step}" if self._bad_step is not None
                     else f"at a step in {self._checked_through + 1}..{step}")
            raise FloatingPointError(
                f"the gradient norm was NaN/Inf {where}, so the weights are no longer finite; nothing of it "
                f"was saved. The last good checkpoint is {last_checkpoint or 'none'}. Set quant.check_finite=true "
                f"to find the first quantizer input that holds NaN/Inf, or give a \"bf16\" section with "
                f"\"check_grad_overflow\": true to have DeepSpeed skip such steps instead")
        self._checked_through = step
