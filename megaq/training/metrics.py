"""Throughput, model FLOPs utilization (MFU), time-to-go, and communication bytes per step.

MFU = (model FLOPs per token x tokens per second) / (number of GPUs x peak FLOP/s of one GPU).
The peak is the GPU's dense BF16 tensor-core figure whatever the recipe, so an INT8 run that beats
BF16 shows it as MFU above what BF16 could reach (INT8 tensor-core peaks are 2x these).

Communication: the wire bytes a rank sends per optimizer step (CommBytesPerStep), from the CommStats
of megaq.parallel.quantized_comm, which megaq's collectives fill and count_deepspeed_collectives
makes DeepSpeed's fill too (docs/COMMUNICATION.md, "Bytes accounting").
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

# Dense (no sparsity) BF16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets. Matched against
# torch.cuda.get_device_name() in order: the first pattern contained in the name wins, so the more
# specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),          # SXM5 (names like "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
]


def peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """Dense BF16 peak of a GPU by name, or None if unknown (or no GPU)."""
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in device_name:
            return tflops
    return None


def current_device_peak_tflops() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name())


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Throughput:
    """Tokens per second and MFU over the steps since the last report, and ETA from the mean time
    of the steps so far (the first step, which pays for start-up and warm-up, is left out)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, num_gpus: int,
                 peak_tflops_per_gpu: Optional[float], total_steps: int, start_step: int = 0,
                 clock=time.perf_counter) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.num_gpus = num_gpus
        self.peak = peak_tflops_per_gpu * 1e12 if peak_tflops_per_gpu else None
        self.total_steps = total_steps
        self.clock = clock
        self._window_start = clock()
        self._window_steps = 0
        self._steady_start: Optional[float] = None
        self._steady_steps = 0
        self._step = start_step

    def step_done(self, step: int) -> None:
        now = self.clock()
        self._window_steps += 1
        if self._steady_start is None:
            self._steady_start = now  # measure from the end of the first step
        else:
            self._steady_steps += 1
        self._step = step

    def report(self) -> dict:
        """{'tokens_per_s', 'mfu' (fraction or None), 'step_time_s', 'eta_s'}; starts a new window."""
        now = self.clock()
        elapsed = now - self._window_start
        steps = self._window_steps
        tokens_per_s = steps * self.tokens_per_step / elapsed if elapsed > 0 and steps else 0.0
        mfu = None
        if self.peak and tokens_per_s:
            mfu = self.flops_per_token * tokens_per_s / (self.num_gpus * self.peak)
        step_time = elapsed / steps if steps else None
        if self._steady_steps and self._steady_start is not None:
            mean = (now - self._steady_start) / self._steady_steps
        else:
            mean = step_time
        eta = mean * (self.total_steps - self._step) if mean is not None else None
        self._window_start, self._window_steps = now, 0
        return {"tokens_per_s": tokens_per_s, "mfu": mfu, "step_time_s": step_time, "eta_s": eta}

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (evaluation, checkpointing) out of the throughput and ETA windows."""
        self._window_start += seconds
        if self._steady_start is not None:
            self._steady_start += seconds


# ---- communication bytes per optimizer step -----------------------------------------------------

# deepspeed.comm's backend methods that move tensors (DeepSpeed 0.19): the collective each one is
# (for megaq.parallel.quantized_comm.exact_wire_bytes), its parameters in order (its decorators hide
# the signature), and the parameter holding the tensor(s) whose size the formula takes.
_DEEPSPEED_COLLECTIVES = {
    "all_reduce": ("all_reduce", ("tensor", "op", "group", "async_op"), "tensor"),
    "all_reduce_coalesced": ("all_reduce", ("tensors", "op", "group", "async_op"), "tensors"),
    "inference_all_reduce": ("all_reduce", ("tensor", "op", "group"), "tensor"),
    "reduce": ("reduce", ("tensor", "dst", "op", "group", "async_op"), "tensor"),
    "broadcast": ("broadcast", ("tensor", "src", "group", "async_op"), "tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", ("output_tensor", "input_tensor", "op", "group", "async_op"),
                              "input_tensor"),
    "reduce_scatter": ("reduce_scatter", ("output", "input_list", "op", "group", "async_op"), "input_list"),
    "all_gather_into_tensor": ("all_gather", ("output_tensor", "input_tensor", "group", "async_op"),
                               "input_tensor"),
    "all_gather_base": ("all_gather", ("output_tensor", "input_tensor", "group", "async_op"), "input_tensor"),
    "all_gather": ("all_gather", ("tensor_list", "tensor", "group", "async_op"), "tensor"),
    "all_gather_coalesced": ("all_gather", ("output_tensors", "input_tensors", "group", "async_op"),
                             "input_tensors"),
    "all_to_all_single": ("all_to_all", ("output", "input", "output_split_sizes", "input_split_sizes", "group",
                                         "async_op"), "input"),
    "all_to_all": ("all_to_all", ("output_tensor_list", "input_tensor_list", "group", "async_op"),
                   "input_tensor_list"),
}


def _tensor_bytes(value) -> tuple[int, Optional["torch.dtype"]]:
    """(total bytes, dtype of the first tensor) of a tensor or a list of tensors."""
    tensors = value if isinstance(value, (list, tuple)) else [value]
    tensors = [t for t in tensors if hasattr(t, "element_size")]
    return sum(t.numel() * t.element_size() for t in tensors), (tensors[0].dtype if tensors else None)


def count_deepspeed_collectives() -> None:
    """Count every collective DeepSpeed issues (its communication backend, ``deepspeed.comm.cdb``)
    in megaq.parallel.quantized_comm's CommStats as ``ds_<op>[dtype]``, from the tensors it is
    given and the exact-collective wire formulas. That is DeepSpeed's data-parallel traffic:
    gradient all-reduce / reduce-scatter (unless parallel.grad_compression replaced it; megaq's INT8
    all-reduce counts itself as ``grad_all_reduce[int8]``), ZeRO's parameter all-gathers, and its
    scalar overflow / gradient-norm reductions. Wraps the backend object's methods once (idempotent);
    call after deepspeed.initialize (which creates the backend when the process group existed)."""
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm  # the module whose global `cdb` its functions call

    from megaq.parallel.quantized_comm import record_exact_collective

    backend = ds_comm.cdb
    if backend is None or getattr(backend, "_megaq_counted", False):
        return

    def counted(method, op: str, params: tuple[str, ...], tensor_param: str):
        def wrapper(*args, **kwargs):
            bound = dict(zip(params, args), **kwargs)
            nbytes, dtype = _tensor_bytes(bound.get(tensor_param))
            if dtype is not None:
                record_exact_collective(op, nbytes, dtype, dist.get_world_size(bound.get("group")), prefix="ds_")
            return method(*args, **kwargs)
        return wrapper

    for name, (op, params, tensor_param) in _DEEPSPEED_COLLECTIVES.items():
        method = getattr(backend, name, None)
        if method is not None:
            setattr(backend, name, counted(method, op, params, tensor_param))
    backend._megaq_counted = True


class CommBytesPerStep:
    """Wire bytes this rank sent per optimizer step, averaged over the steps since the last report:
    differences of megaq.parallel.quantized_comm.COMM_STATS. Totals split by
    ``is_data_parallel_kind`` into tensor-parallel and data-parallel, plus each collective kind on
    its own. Traffic inside ``with meter.excluded():`` (evaluation, checkpoints) is left out."""

    def __init__(self) -> None:
        self._last = self._totals()
        self._steps = 0

    @staticmethod
    def _totals() -> dict[str, int]:
        from megaq.parallel.quantized_comm import COMM_STATS

        return {kind: record.wire_bytes for kind, record in list(COMM_STATS.records.items())}

    def step_done(self) -> None:
        self._steps += 1

    def report(self) -> dict[str, float]:
        """{'comm/tp_bytes', 'comm/dp_bytes', 'comm/bytes/<kind>' for every kind that moved bytes}:
        mean bytes per step since the last report; starts a new window."""
        from megaq.parallel.quantized_comm import is_data_parallel_kind

        now = self._totals()
        steps = max(self._steps, 1)
        per_kind = {kind: (total - self._last.get(kind, 0)) / steps for kind, total in sorted(now.items())}
        out = {"comm/tp_bytes": sum(v for k, v in per_kind.items() if not is_data_parallel_kind(k)),
               "comm/dp_bytes": sum(v for k, v in per_kind.items() if is_data_parallel_kind(k))}
        out.update({f"comm/bytes/{kind}": value for kind, value in per_kind.items() if value})
        self._last, self._steps = now, 0
        return out

    @contextlib.contextmanager
    def excluded(self):
        before = self._totals()
        try:
            yield
        finally:
            for kind, total in self._totals().items():
                self._last[kind] = self._last.get(kind, 0) + total - before.get(kind, 0)
