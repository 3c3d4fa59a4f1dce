"""Data-parallel gradient compression: INT8 (or INT4) block-scaled all-reduce with error feedback,
and the rules for which ZeRO stage goes with which compression (docs/COMMUNICATION.md).

The compressed all-reduce (``compressed_all_reduce_``) is two quantized steps over the
data-parallel group, as in ZeRO++'s qgZ / 1-bit Adam's compressed all-reduce:

    1. worker:  c = Q(g + e)            e <- g + e - c           (residual, size of the gradient)
                all-to-all of the INT8 chunks, FP32 sum of the chunk this rank owns, / world
    2. server:  d = Q(s + E)            E <- s + E - d           (residual, 1/world of the size)
                all-gather of the INT8 shards -> the averaged gradient on every rank

Q is ``megaq.quant.quantize_blockwise`` (through megaq.kernels' dispatch) with blocks of ``block``
(128) consecutive elements of the flattened gradient, round-to-nearest by default. With error
feedback the quantization errors are not lost but carried into the next step, so the sum over
steps of the compressed averages stays within a bounded residual of the sum of the exact averages
(a constant gradient converges to the exact mean, tests/test_quantized_comm.py); without it,
round-to-nearest has a fixed bias.

Where it runs: on GPUs (megaq.kernels' dispatch rule; blocks a power of two in 32..1024) each bucket
is four fused passes, ``megaq.kernels.grad_comm``, around the two exchanges: worker quantize (+ e)
straight into the packed all-to-all buffer, server sum / world + E and requantize into the packed
all-gather segment, dequantize into the output, and a device-side drop of the residuals after an
overflow — no host synchronization. Elsewhere (CPU, other blocks) the same steps run as torch ops
(``_reduce_piece_torch``). Both give the same bits for round-to-nearest and the same wire bytes.

Bytes on the wire per rank: (w-1)/w x N x (1 + 4/block) twice (about 0.52x BF16's ring all-reduce,
0.26x FP32's); with ``bits=4`` (parallel.grad_compression='int4_ef') (w-1)/w x N x (1/2 + 4/block)
twice (about 0.27x BF16's). Memory: one FP32 residual of the gradient's size per rank (+1/w for the
server part).

Three ways in:
  - ``compressed_all_reduce_(tensors, group, state)``: in place on a list of gradients (flattened
    into one buffer internally), for code that reduces gradients itself.
  - ``register_ddp_comm_hook(ddp_model, state)`` / ``int8_ef_hook``: a torch DDP comm hook.
  - ``attach_to_deepspeed(engine, state)``: DeepSpeed ZeRO stage 0, 1 or 2 (DeepSpeed 0.19.8 has no
    INT8 gradient communication below stage 3, and no longer ships 1-bit Adam / 0-1 Adam): replaces
    the engine's (stage 0) or the ZeRO optimizer's (stage 1/2) bucket all-reduce on that instance.
    Stage 3 uses DeepSpeed's own ZeRO++ instead (``zero_quantized_weights``,
    ``zero_quantized_gradients``, ``zero_hpz_partition_size``).

``validate_comm_config(zero_stage, comm_options)`` refuses unsupported combinations with a
ValueError naming the keys; the trainer calls it while validating the config.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from megaq.kernels import grad_comm
from megaq.quant.rounding import ROUNDING_MODES
from megaq.parallel.quantized_comm import (_all_gather_packed, _all_to_all_packed, _dequantize,
                                           _exchange_all_gather, _exchange_reduce_scatter,
                                           _flat_blocks, _padded_numel, _world,
                                           quantize_propagating)

GRAD_COMPRESSION_MODES = ("none", "int8_ef", "int4_ef", "zeropp")
# False: every bucket through the torch path even where the fused kernels run (tools/bench_comm.py
# times and compares both)
FUSED_KERNELS = True
ERROR_FEEDBACK_BITS = {"int8_ef": 8, "int4_ef": 4}   # megaq's own compressed all-reduce, by mode
ZEROPP_KEYS = ("zero_quantized_weights", "zero_quantized_gradients", "zero_hpz_partition_size")


def grad_kind(bits: int) -> str:
    """The CommStats kind of the compressed gradient all-reduce at ``bits`` (e.g. grad_all_reduce[int8])."""
    return f"grad_all_reduce[int{bits}]"


class CommConfigWarning(UserWarning):
    """A communication setting that is valid but has no effect as configured."""


# ---- state -----------------------------------------------------------------------------------

@dataclass
class GradCompressionState:
    """Settings and error-feedback residuals of the compressed gradient all-reduce.

    group:           data-parallel group (None: the default group) for compressed_all_reduce_ and
                     the DDP hook; attach_to_deepspeed uses the group DeepSpeed passes instead.
    block:           elements per FP32 scale.
    bits:            8 (INT8 payload) or 4 (INT4, two values per byte, as ZeRO++'s qgZ sends
                     gradients): half the bytes again, a step 18× coarser, which error feedback
                     carries into the following steps instead of losing.
    error_feedback:  carry quantization errors into the next reduction (worker and server side).
    rounding:        "nearest" (default; with error feedback) or "stochastic" (unbiased without it).
    bucket_numel:    elements reduced per collective pair (bounds the temporary buffers).
    residuals:       key -> (worker residual [n_pad], server residual [n_pad / world]), FP32.
    """

    group: Any = None
    block: int = 128
    bits: int = 8
    error_feedback: bool = True
    rounding: str = "nearest"
    bucket_numel: int = 1 << 25
    residuals: dict = field(default_factory=dict)
    resets: int = 0            # residuals dropped because the tensor behind a key changed size
    _call_index: int = 0       # position of the next DeepSpeed bucket within this reduction round

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"GradCompressionState.block must be a positive int, got {self.block!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"GradCompressionState.bits must be 8 or 4, got {self.bits!r}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"GradCompressionState.rounding must be one of {ROUNDING_MODES}, "
                             f"got {self.rounding!r}")
        if self.bucket_numel < 1:
            raise ValueError("GradCompressionState.bucket_numel must be positive")

    def reset(self) -> None:
        self.residuals.clear()
        self._call_index = 0

    def residual_norm(self) -> float:
        """L2 norm of all residuals (worker and server) on this rank."""
        total = 0.0
        for worker, server in self.residuals.values():
            total += float(worker.double().pow(2).sum()) + float(server.double().pow(2).sum())
        return total ** 0.5

    def state_dict(self) -> dict:
        return {"residuals": {k: (w.cpu(), s.cpu()) for k, (w, s) in self.residuals.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.residuals = dict(sd["residuals"])

    def _residual(self, key, padded: int, world: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.residuals.get(key)
        if entry is not None and entry[0].numel() == padded and entry[0].device == device:
            return entry
        if entry is not None:
            self.resets += 1
        entry = (torch.zeros(padded, dtype=torch.float32, device=device),
                 torch.zeros(padded // world, dtype=torch.float32, device=device))
        self.residuals[key] = entry
        return entry


# ---- the compressed all-reduce ---------------------------------------------------------------

def _quantize_with_feedback(v: torch.Tensor, residual: torch.Tensor | None, state: GradCompressionState):
    """Q(v) of the FP32 blocks ``v`` [rows, block] (NaN/Inf travel as NaN scales); residual <- v - Q(v),
    or 0 when v held NaN/Inf (the step will be skipped). The torch path's quantizer step."""
    qt, bad = quantize_propagating(v, (1, state.block), state.rounding, bits=state.bits)
    if residual is not None:
        if bad:
            residual.zero_()
        else:
            residual.copy_((v - _dequantize(qt, torch.float32)).reshape(-1))
    return qt


def _reduce_piece_torch(piece: torch.Tensor, out: torch.Tensor, group, world: int,
                        state: GradCompressionState, residuals, average: bool) -> None:
    """One bucket through torch ops and megaq.kernels' quantizer (CPU; blocks or dtypes the fused
    kernels do not take): out <- the compressed average (sum) of ``piece`` over ``group``."""
    worker, server = residuals if residuals is not None else (None, None)
    blocks, n = _flat_blocks(piece, world, state.block)  # FP32 [rows, block], rows % world == 0
    v = blocks + worker.view_as(blocks) if worker is not None else blocks
    qt = _quantize_with_feedback(v, worker, state)
    shard = _exchange_reduce_scatter(qt, group, True, grad_kind(state.bits))  # FP32 [rows / world, block]
    if average:
        shard = shard / world
    if server is not None:
        shard = shard + server.view_as(shard)
    qs = _quantize_with_feedback(shard, server, state)
    full = _exchange_all_gather(qs, group, True, grad_kind(state.bits))
    if residuals is not None and bool(torch.isnan(full.scale).any()):
        # an overflow on some rank (NaN scales reach every rank): the step will be skipped,
        # so no rank keeps a residual of it (one check over the scales, 1/block of the data)
        worker.zero_()
        server.zero_()
    out.copy_(_dequantize(full, torch.float32).reshape(-1)[:n])


def _reduce_piece_fused(piece: torch.Tensor, out: torch.Tensor, group, world: int,
                        state: GradCompressionState, residuals, average: bool) -> None:
    """``_reduce_piece_torch`` with megaq.kernels.grad_comm's fused passes, bit for bit the same
    for round-to-nearest, no host synchronization: the kernels read and write the packed exchange
    buffers in place, and an overflow zeroes the residuals on the device."""
    block, bits, kind = state.block, state.bits, grad_kind(state.bits)
    rc = _padded_numel(piece.numel(), world, block) // block // world
    worker, server = residuals if residuals is not None else (None, None)
    send = grad_comm.exchange_buffer(world, rc, block, bits, piece.device)
    grad_comm.worker_quantize(piece, worker, send, rc, block, bits, state.rounding,
                              rank=dist.get_rank(group))
    payload = rc * grad_comm.row_bytes(block, bits)
    recv = _all_to_all_packed(send, group, kind, world * payload)
    seg = grad_comm.exchange_buffer(1, rc, block, bits, piece.device)
    grad_comm.server_quantize(recv, server, seg, rc, block, bits, state.rounding, average)
    gathered = _all_gather_packed(seg, group, kind, payload)
    overflow = grad_comm.dequantize_gathered(gathered, out, rc, block, bits)
    if residuals is not None:
        grad_comm.zero_residuals_if_flag(overflow, worker, server)


def _compressed_all_reduce_flat(flat: torch.Tensor, group, state: GradCompressionState, key,
                                average: bool) -> torch.Tensor:
    """FP32 average (or sum) over ``group`` of the 1-D ``flat``, compressed; a new FP32 tensor.

    Buckets of ``state.bucket_numel`` (whole ``world x block`` units) run one after the other, each
    through the fused kernels where ``megaq.kernels.grad_comm.fused_supported`` (CUDA; the Triton
    interpreter under MEGAQ_KERNELS=triton), else through torch ops; same results, same bytes."""
    world = _world(group)
    if world == 1:
        return flat.float().clone()
    block = state.block
    out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    step = max(world * block, state.bucket_numel // (world * block) * (world * block))
    for part, start in enumerate(range(0, flat.numel(), step)):
        piece = flat[start:start + step]
        residuals = None
        if state.error_feedback:
            residuals = state._residual((key, part), _padded_numel(piece.numel(), world, block), world,
                                        piece.device)
        fused = FUSED_KERNELS and grad_comm.fused_supported(piece, block, state.bits)
        reduce_piece = _reduce_piece_fused if fused else _reduce_piece_torch
        reduce_piece(piece, out[start:start + piece.numel()], group, world, state, residuals, average)
    return out


@torch.no_grad()
def compressed_all_reduce_(tensors: Iterable[torch.Tensor], group=None,
                           state: GradCompressionState | None = None, *, average: bool = True,
                           key: Any = "grads") -> list[torch.Tensor]:
    """Average (``average=False``: sum) ``tensors`` over ``group`` in place, INT8 + error feedback.

    The tensors (any dtypes and shapes, e.g. the gradients of a model in parameter order) are
    flattened into one FP32 buffer; ``state`` keeps the residual of that buffer under ``key`` (so
    call it with the same list each step, or pass different keys for different lists). Every rank
    of the group must call it with tensors of the same sizes. Returns the list.
    """
    tensors = list(tensors)
    state = state if state is not None else GradCompressionState(group=group)
    group = group if group is not None else state.group
    if not tensors or _world(group) == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    reduced = _compressed_all_reduce_flat(flat, group, state, (key, flat.numel()), average)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(reduced[offset:offset + n].view_as(t))
        offset += n
    return tensors


# ---- torch DDP -------------------------------------------------------------------------------

def int8_ef_hook(state: GradCompressionState, bucket: "dist.GradBucket") -> torch.futures.Future:
    """DDP comm hook: average the bucket with the compressed all-reduce (residual per bucket
    index; a bucket whose size changes, as after DDP's first-iteration bucket rebuild, starts a
    fresh residual). The collectives run synchronously; the returned future is already done."""
    buffer = bucket.buffer()
    reduced = _compressed_all_reduce_flat(buffer, state.group, state, ("ddp", bucket.index()), True)
    buffer.copy_(reduced)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buffer)
    return fut


# DDP checks the hook's annotations against the real types (this module's are strings).
int8_ef_hook.__annotations__ = {"state": GradCompressionState, "bucket": dist.GradBucket,
                                "return": torch.futures.Future[torch.Tensor]}


def register_ddp_comm_hook(ddp_model: torch.nn.parallel.DistributedDataParallel,
                           state: GradCompressionState | None = None) -> GradCompressionState:
    """``ddp_model.register_comm_hook(state, int8_ef_hook)``; the state's group defaults to the
    DDP model's process group."""
    if state is None:
        state = GradCompressionState(group=getattr(ddp_model, "process_group", None))
    ddp_model.register_comm_hook(state, int8_ef_hook)
    return state


# ---- DeepSpeed -------------------------------------------------------------------------------

def _next_key(state: GradCompressionState, site: str, numel: int):
    key = (site, state._call_index, numel)
    state._call_index += 1
    return key


def attach_to_deepspeed(engine, state: GradCompressionState | None = None) -> GradCompressionState:
    """Make a DeepSpeed engine (ZeRO stage 0, 1 or 2) reduce gradients with the INT8 error-feedback
    all-reduce, by replacing on this engine instance:

      stage 0:    ``engine.allreduce_bucket(bucket, dp_group, dp_world_size)``, through which the
                  engine's (and the BF16 optimizer's) bucketed gradient all-reduce goes;
      stage 1/2:  ``optimizer.allreduce_bucket(...)`` and ``optimizer.gradient_reduction_w_predivide``
                  of DeepSpeedZeroOptimizer (every gradient reduction of ZeRO-1/2 in DeepSpeed 0.19.8
                  goes through one of them; a reduce to one rank becomes an all-reduce).

    Residuals are keyed by the bucket's position within one backward's reductions (the engine's
    ``allreduce_gradients``, run at the end of every backward, closes a round) and its size;
    bucket order is deterministic for a static graph. Stage 3 is refused: use ZeRO++.
    """
    stage = int(engine.zero_optimization_stage())
    if stage >= 3:
        raise ValueError("parallel.grad_compression='int8_ef' / 'int4_ef' support zero_optimization.stage "
                         "0, 1 and 2; for stage 3 use parallel.grad_compression='zeropp' (DeepSpeed ZeRO++)")
    if state is None:
        state = GradCompressionState()
    if getattr(engine, "_megaq_grad_compression", None) is not None:
        raise RuntimeError("gradient compression is already attached to this engine")

    if stage == 0:
        def allreduce_bucket(bucket, dp_group, dp_world_size=None):
            tensor = engine.flatten(bucket)
            reduced = _compressed_all_reduce_flat(tensor, dp_group, state,
                                                  _next_key(state, "ds0", tensor.numel()), False)
            if engine.gradient_average:
                world = dp_world_size if dp_world_size is not None else dist.get_world_size(group=dp_group)
                reduced.div_(world)
            tensor.copy_(reduced)
            return tensor

        engine.allreduce_bucket = allreduce_bucket
    else:
        opt = engine.optimizer
        if not hasattr(opt, "allreduce_bucket") or not hasattr(opt, "gradient_reduction_w_predivide"):
            raise ValueError(f"attach_to_deepspeed: the ZeRO-{stage} optimizer {type(opt).__name__} "
                             f"has no allreduce_bucket / gradient_reduction_w_predivide to replace "
                             f"(DeepSpeed version not supported)")

        def divisor(group) -> float:
            return dist.get_world_size(group=group) / float(getattr(opt, "sequence_parallel_size", 1))

        def zero_allreduce_bucket(bucket, communication_data_type=None, rank=None, log=None, divide=True,
                                  process_group=None):
            group = opt.dp_process_group if process_group is None else process_group
            tensor = opt.flatten(bucket)
            reduced = _compressed_all_reduce_flat(tensor, group, state,
                                                  _next_key(state, "zero", tensor.numel()), False)
            if divide and opt.gradient_average:
                reduced.div_(divisor(group))
            out_dtype = communication_data_type or tensor.dtype
            return reduced.to(out_dtype) if reduced.dtype != out_dtype else reduced

        def gradient_reduction_w_predivide(tensor, communication_data_type=None):
            if tensor.numel() == 0:
                return tensor
            group = opt.dp_process_group
            reduced = _compressed_all_reduce_flat(tensor.reshape(-1), group, state,
                                                  _next_key(state, "zero_full", tensor.numel()), False)
            if opt.gradient_average:
                reduced.div_(divisor(group))
            tensor.copy_(reduced.view_as(tensor))
            return tensor

        opt.allreduce_bucket = zero_allreduce_bucket
        opt.gradient_reduction_w_predivide = gradient_reduction_w_predivide

    original_allreduce_gradients = engine.allreduce_gradients

    def allreduce_gradients(*args, **kwargs):
        try:
            return original_allreduce_gradients(*args, **kwargs)
        finally:
            state._call_index = 0  # the end of this backward's reductions

    engine.allreduce_gradients = allreduce_gradients
    engine._megaq_grad_compression = state
    return state


# ---- which combinations are supported --------------------------------------------------------

def zeropp_keys(world_size: int, gpus_per_node: int) -> dict:
    """The ``zero_optimization`` keys that ``parallel.grad_compression='zeropp'`` turns on:
    INT8 weights in the all-gather (qwZ), INT4 gradients in a hierarchical all-to-all (qgZ), and a
    secondary weight partition inside each node (hpZ) when there is more than one node."""
    return {"zero_quantized_weights": True, "zero_quantized_gradients": True,
            "zero_hpz_partition_size": gpus_per_node if world_size > gpus_per_node else 1}


def validate_comm_config(zero_stage: int, comm_options: Mapping[str, Any]) -> None:
    """Raise ValueError (naming the keys) for a communication set-up megaq does not support.

    ``comm_options`` (all keys optional):
      grad_compression:   parallel.grad_compression, "none" | "int8_ef" | "int4_ef" | "zeropp"
      comm_dtype:         parallel.comm_dtype, "bf16" | "int8" (tensor-parallel collectives)
      comm_block:         parallel.comm_block, elements per scale (positive int)
      comm_backward:      parallel.comm_backward, "int8" | "exact"
      zero_optimization:  DeepSpeed's zero_optimization section (a dict)
      communication_data_type: DeepSpeed's top-level key
      tensor_parallel:    parallel.tensor_parallel
      world_size, gpus_per_node: for the ZeRO++ checks
      device_type:        "cuda" | "cpu"

    Supported: stage 0/1/2 x {none, int8_ef, int4_ef}; stage 3 x {none, zeropp}; comm_dtype int8 with any
    of them. Combinations that are valid but inert (ZeRO++'s gradient quantization on one node)
    give a CommConfigWarning.
    """
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    mode = comm_options.get("grad_compression", "none") or "none"
    if mode not in GRAD_COMPRESSION_MODES:
        raise ValueError(f"parallel.grad_compression must be one of {GRAD_COMPRESSION_MODES}, got {mode!r}")
    comm_dtype = comm_options.get("comm_dtype", "bf16") or "bf16"
    if comm_dtype not in ("bf16", "int8"):
        raise ValueError(f"parallel.comm_dtype must be one of ('bf16', 'int8'), got {comm_dtype!r}")
    backward = comm_options.get("comm_backward", "int8") or "int8"
    if backward not in ("int8", "exact"):
        raise ValueError(f"parallel.comm_backward must be one of ('int8', 'exact'), got {backward!r}")
    block = comm_options.get("comm_block", 128)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"parallel.comm_block must be a positive integer, got {block!r}")
    zero = dict(comm_options.get("zero_optimization") or {})
    tp = int(comm_options.get("tensor_parallel", 1) or 1)
    if comm_dtype == "int8" and "tensor_parallel" in comm_options and tp == 1:
        warnings.warn("parallel.comm_dtype='int8' has no effect with parallel.tensor_parallel=1 "
                      "(there are no tensor-parallel collectives)", CommConfigWarning, stacklevel=2)
    zeropp_set = {k: zero[k] for k in ZEROPP_KEYS if k in zero and (
        (int(zero[k] or 1) > 1) if k == "zero_hpz_partition_size" else bool(zero[k]))}

    if mode == "zeropp":
        if zero_stage != 3:
            raise ValueError(f"parallel.grad_compression='zeropp' (DeepSpeed ZeRO++) needs "
                             f"zero_optimization.stage=3, got stage {zero_stage}; for stages 0-2 use "
                             f"parallel.grad_compression='int8_ef'")
        if comm_options.get("device_type") == "cpu":
            raise ValueError("parallel.grad_compression='zeropp' needs GPUs: DeepSpeed's ZeRO++ "
                             "quantizer is a CUDA op (QuantizerBuilder)")
    elif zeropp_set:
        if zero_stage != 3:
            raise ValueError(f"zero_optimization.{'/'.join(zeropp_set)} (ZeRO++) only act at "
                             f"zero_optimization.stage=3 (got {zero_stage}); DeepSpeed would ignore "
                             f"them. Remove them, or use stage 3 with parallel.grad_compression='zeropp'")
        raise ValueError(f"zero_optimization.{'/'.join(zeropp_set)} are set but "
                         f"parallel.grad_compression is {mode!r}: set parallel.grad_compression="
                         f"'zeropp' (which sets them) or remove them")

    effective = dict(zero)
    if mode == "zeropp":  # the keys the trainer fills in (zeropp_keys), unless given explicitly
        world = comm_options.get("world_size")
        per_node = comm_options.get("gpus_per_node")
        defaults = zeropp_keys(int(world), int(per_node)) if world and per_node else \
            {"zero_quantized_weights": True, "zero_quantized_gradients": True}
        for k, v in defaults.items():
            effective.setdefault(k, v)
    if zero_stage == 3 and tp > 1:
        if effective.get("zero_quantized_gradients"):
            raise ValueError("zero_optimization.zero_quantized_gradients (ZeRO++ qgZ) with "
                             f"parallel.tensor_parallel={tp} is not supported: DeepSpeed 0.19.8 builds "
                             "the qgZ all-to-all groups over the whole world, not the data-parallel "
                             "group, so tensor-parallel shards would be summed together. Use "
                             "tensor_parallel=1, or set zero_quantized_gradients=false")
        if int(effective.get("zero_hpz_partition_size", 1) or 1) > 1:
            raise ValueError("zero_optimization.zero_hpz_partition_size > 1 (ZeRO++ hpZ) with "
                             f"parallel.tensor_parallel={tp} is not supported: DeepSpeed 0.19.8 builds "
                             "the hpZ groups from consecutive global ranks, which are tensor-parallel "
                             "peers in megaq's layout. Use tensor_parallel=1 or hpz size 1")
    if mode == "zeropp" or zeropp_set:
        world = comm_options.get("world_size")
        per_node = comm_options.get("gpus_per_node")
        if effective.get("zero_quantized_gradients") and world and per_node and int(world) <= int(per_node):
            warnings.warn("zero_optimization.zero_quantized_gradients has no effect on a single node "
                          "in DeepSpeed 0.19.8 (qgZ only runs when world size > GPUs per node; it "
                          "falls back to a full-precision reduce-scatter)", CommConfigWarning,
                          stacklevel=2)
        hpz = int(effective.get("zero_hpz_partition_size", 1) or 1)
        if hpz > 1 and world and (int(world) % hpz != 0):
            raise ValueError(f"zero_optimization.zero_hpz_partition_size={hpz} must divide the world "
                             f"size {world}")

    if mode in ERROR_FEEDBACK_BITS:
        if zero_stage == 3:
            raise ValueError(f"parallel.grad_compression={mode!r} supports zero_optimization.stage 0, "
                             "1 and 2; at stage 3 DeepSpeed reduce-scatters gradients inside ZeRO-3: use "
                             "parallel.grad_compression='zeropp'")
        if comm_options.get("communication_data_type") is not None:
            raise ValueError(f"communication_data_type is set but parallel.grad_compression={mode!r} "
                             "replaces DeepSpeed's gradient all-reduce (which is what "
                             "communication_data_type controls); remove one of them")
        offload = zero.get("offload_optimizer")
        device = offload.get("device") if isinstance(offload, Mapping) else None
        if device not in (None, "none"):
            raise ValueError(f"parallel.grad_compression={mode!r} is not supported with "
                             "zero_optimization.offload_optimizer (its reduction path is untested); "
                             "remove one of them")
