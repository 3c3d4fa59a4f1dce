"""Learning-rate schedule: linear warm-up, then cosine (or linear) decay to a floor.

A picklable callable for ``torch.optim.lr_scheduler.LambdaLR``: LambdaLR multiplies each parameter
group's base lr (train.lr) by ``schedule(step)``, and DeepSpeed steps it once per optimizer step, so
its state (the step count) travels in DeepSpeed's checkpoint.
"""

from __future__ import annotations

import math


class WarmupDecaySchedule:
    """lr(step) / peak_lr for step = 0, 1, 2, ... (optimizer steps already taken).

    - warm-up: step < warmup_steps -> (step + 1) / warmup_steps (never 0, so step 0 learns);
    - decay: from warmup_steps to decay_steps, from 1 down to min_lr / lr (cosine or linear);
    - after decay_steps: min_lr / lr.
    """

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 decay: str = "cosine") -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = max(int(decay_steps), self.warmup_steps)
        self.decay = decay

    def lr_at(self, step: int) -> float:
        return self.lr * self(step)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        floor = self.min_lr / self.lr
        if step >= self.decay_steps:
            return floor
        # Here warmup_steps <= step < decay_steps, so the span is positive.
        progress = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return floor + (1.0 - floor) * shape
