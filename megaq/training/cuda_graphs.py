"""train.cuda_graphs: the transformer blocks' forward and backward replayed from CUDA graphs.

Why: a quantized linear launches ~25 small kernels per training step (quantizers, GEMMs, seeds), and
on an H100 their host-side cost (~2.4 ms per linear, docs/PERFORMANCE.md) exceeds the GPU work of
every GPT-2-to-1.3B layer. Replaying a captured graph costs one launch per block and direction.

How, and why not `torch.cuda.make_graphed_callables`: that function captures the backward with the
module's own parameters as the leaves it differentiates. Under DeepSpeed those leaves' AccumulateGrad
nodes already exist (the engine holds them to hook its gradient reduction), created on the legacy
default stream, and capture then fails with cudaErrorStreamCaptureImplicit. Here each block is
captured through *aliases* of its parameters (``p.detach()``: same storage, fresh leaves), so the graph
reads the live weights; the replay runs inside an autograd Function whose inputs are the real
parameters, so the gradients it returns reach DeepSpeed's hooks eagerly, as with an eager block.

Capture happens on the first training forward of block 0 with that input's shape: all blocks are
warmed up and captured together, forwards in order and backwards in reverse, into one memory pool
(the order in which they run, so the pool can reuse memory exactly as an eager step would).
A block runs eagerly instead when: grad is disabled or the model is in eval mode (evaluation), the
input's shape/dtype differs from the captured one, the previous replay of that block still awaits
its backward (its saved activations live in the graph's memory), graphs are suspended (the
quantization-error probe's forward hooks must see real module calls), or a parameter's storage moved.

Random numbers: a replay draws from torch's CUDA generator like an eager step (the graph advances its
offset by what the captured kernels drew, in the order an eager step draws). The warm-up and the
capture draw too; the generator's state is saved before them and restored after, so the first
replay draws what an eager step would have drawn, and a resumed run (which captures again) continues
the uninterrupted run's stream: resume is exact with graphs too.

Requirements (checked by the config, see MegaqConfig): a CUDA device, tensor parallel size 1 (the
TP collectives count their bytes from Python), ZeRO stage ≤ 2 (stage 3 gathers parameters into new
storage every step), no dropout (the TP-aware RNG fork is not capture safe), no quantizer NaN check
(a host sync), no torch.compile, no torchao peer. The INT4 backward is captured: its leverage score
sampling keeps a data-dependent number of rows, but it compacts them into fixed-capacity buffers with
a device-side count (megaq.kernels.int4), with no host synchronization.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Sequence

import torch
from torch import nn

from megaq.ops import delayed_scaling, weight_cache
from megaq.ops.linear import graph_warmup, refresh_cached_weights, requantize_all_cached_weights

logger = logging.getLogger(__name__)

WARMUP_ITERS = 3  # eager iterations on a side stream before capture: Triton compiles, cuBLAS picks


class _BlockGraph:
    """One block's captured forward and backward, with the static tensors they read and write."""

    def __init__(self, index: int, params: list[nn.Parameter]):
        self.index = index
        self.params = params                       # the real parameters, in the aliases' order
        self.param_ptrs = [p.data_ptr() for p in params]
        self.trainable = [i for i, p in enumerate(params) if p.requires_grad]
        self.forward_graph = torch.cuda.CUDAGraph()
        self.backward_graph = torch.cuda.CUDAGraph()
        self.static_input: torch.Tensor | None = None
        self.static_output: torch.Tensor | None = None
        self.static_grad_output: torch.Tensor | None = None
        self.static_grads: tuple | None = None     # (grad input, grads of the trainable params), each or None
        self.awaiting_backward = False
        self.saves_input = True       # whether the block's backward reads its input (found in the warm-up)
        self.aliases: list[torch.Tensor] = []     # the parameter aliases captured through (see _capture)
        # Where the replays read the input: static_input, or an unowned alias of its memory once that
        # memory went back to the pool (see _release_unsaved_output); None before the capture.
        self.input_view: torch.Tensor | None = None
        self.output_view: torch.Tensor | None = None   # the same for the output

    def storage_unchanged(self) -> bool:
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.param_ptrs))

    def released_input_is(self, x: torch.Tensor) -> bool:
        """Whether x is this block's input in memory handed back to the graph pool."""
        return self.input_view is not None and self.input_view is not self.static_input and \
            _same_tensor(x, self.input_view)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class _ReplayBlock(torch.autograd.Function):
    """Forward: copy the input into the graph's static input, replay. Backward: copy the incoming
    gradient, replay, hand out the static gradients (autograd's AccumulateGrad clones them, as this
    object keeps a reference). Consecutive blocks share their static tensors (block i's output is
    block i+1's input, block i+1's input gradient is block i's output gradient), so in a plain chain
    of blocks both copies are skipped: they would copy a buffer onto itself."""

    @staticmethod
    def forward(ctx, graph: _BlockGraph, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        if not _same_tensor(x, graph.input_view):
            graph.input_view.copy_(x)
        graph.forward_graph.replay()
        graph.awaiting_backward = True
        ctx.graph = graph
        return graph.output_view.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        graph: _BlockGraph = ctx.graph
        if not _same_tensor(grad_output, graph.static_grad_output):
            graph.static_grad_output.copy_(grad_output)
        graph.backward_graph.replay()
        graph.awaiting_backward = False
        grad_input, *grad_trainable = graph.static_grads
        grads: list[torch.Tensor | None] = [None] * len(graph.params)
        for i, g in zip(graph.trainable, grad_trainable):
            grads[i] = g
        return (None, grad_input, *grads)


class BlockGraphs:
    """Install on `blocks` (an ordered sequence of modules `x -> block(x)` of one shape): their
    forwards become graph replays once captured. `suspended()` runs them eagerly for a while."""

    def __init__(self, blocks: Sequence[nn.Module], warmup_iters: int = WARMUP_ITERS):
        if not torch.cuda.is_available():
            raise RuntimeError("train.cuda_graphs=true needs a CUDA GPU")
        self.blocks = list(blocks)
        _check_capturable(self.blocks)
        self.warmup_iters = warmup_iters
        self.graphs: list[_BlockGraph] | None = None
        self.input_key: tuple | None = None
        self._eager_forwards = [block.forward for block in self.blocks]
        self._eager_depth = 0      # > 0: every block call runs its eager forward
        self._warned: set[str] = set()
        # the cached weights' requantization after an optimizer step, captured (see _refresh_weights)
        self._refresh_graph: torch.cuda.CUDAGraph | None = None
        self._refresh_signature: tuple | None = None
        for index, block in enumerate(self.blocks):
            block.forward = self._make_forward(index)

    # -- public --

    @contextlib.contextmanager
    def suspended(self):
        """Blocks run their eager forwards inside (e.g. while forward hooks must fire)."""
        self._eager_depth += 1
        try:
            yield
        finally:
            self._eager_depth -= 1

    @property
    def captured(self) -> bool:
        return self.graphs is not None

    # -- dispatch --

    def _make_forward(self, index: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self._forward(index, x)
        return forward

    def _forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        released = self.graphs is not None and self.graphs[index].released_input_is(x)

        def eager(x: torch.Tensor) -> torch.Tensor:
            # x may be the previous block's replayed output in graph-pool memory that later replays
            # reuse (_release_unsaved_output): an eager block, whose autograd graph may save its input,
            # gets its own copy
            return self._eager_forwards[index](x.clone() if released else x)

        if self._eager_depth or not (torch.is_grad_enabled() and block.training and x.is_cuda):
            return eager(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if self.graphs is None:
            if index != 0:
                return eager(x)
            self._capture(x)
        if key != self.input_key:
            self._once("shape", f"CUDA graphs: input {key[:2]} differs from the captured {self.input_key[:2]}; "
                                "those calls run eagerly")
            return eager(x)
        graph = self.graphs[index]
        if graph.awaiting_backward:
            self._once("pending", "CUDA graphs: a block was called again before the backward of its previous "
                                  "call; such calls run eagerly (the graph's saved activations are in use)")
            return eager(x)
        if not graph.storage_unchanged():
            # DeepSpeed re-pointed a parameter (e.g. a re-initialised optimizer): the captured
            # kernels would read stale memory. Capture again at the next pass from block 0.
            logger.warning("CUDA graphs: a block parameter's storage moved; recapturing at the next step")
            self.graphs = None
            return eager(x)
        if index == 0:
            # the replays read the cached quantized weights (megaq.ops.weight_cache) without running
            # Python: requantize those an optimizer step made stale, in place, before the first block
            self._refresh_weights()
        return _ReplayBlock.apply(graph, x, *graph.params)

    def _refresh_weights(self) -> None:
        """Requantize the cached weights after an optimizer step: from a CUDA graph of the whole pass
        once one is captured. Eagerly it is ~200 small launches (two orientations of 4 linears per
        layer at 1.3B) that leave the GPU waiting for the host: 40-50 ms of a 1.3B step on an H100
        (docs/PERFORMANCE.md). The first refresh runs eagerly and captures the same work for the next
        ones; a new or moved weight or buffer (another signature) makes it run eagerly and capture again."""
        if not weight_cache.stale():
            return
        signature = weight_cache.signature()
        if self._refresh_graph is not None and signature == self._refresh_signature:
            self._refresh_graph.replay()
            weight_cache.mark_fresh()
            return
        refresh_cached_weights()
        self._refresh_graph = self._refresh_signature = None
        if signature:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):    # its own memory pool: one weight's temporaries at a time
                requantize_all_cached_weights()
            self._refresh_graph, self._refresh_signature = graph, signature

    def _once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # -- capture --

    def _capture(self, sample: torch.Tensor) -> None:
        """Warm up and capture every block, starting from `sample` (block 0's first real input)."""
        rng_device = sample.device
        rng_state = torch.cuda.get_rng_state(rng_device)    # restored below: see "Random numbers"
        names = [[name for name, _ in block.named_parameters()] for block in self.blocks]
        params = [[p for _, p in block.named_parameters()] for block in self.blocks]
        aliases = [[p.detach().requires_grad_(p.requires_grad) for p in ps] for ps in params]
        graphs = [_BlockGraph(i, ps) for i, ps in enumerate(params)]
        for g, ps, alias in zip(graphs, params, aliases):
            # what the captured kernels read that lives on the aliases (cached weight operands, delayed-
            # scaling predictions: megaq.ops.weight_cache, megaq.ops.delayed_scaling) lives as long as the graphs
            g.aliases = alias
            # the predictions are the parameter's own (checkpointed through it, restored before the capture)
            for p, a in zip(ps, alias):
                delayed_scaling.share_states(p, a)
        # the warm-up's backward runs on all-ones output gradients, nothing like the real ones: its
        # predictions are undone after it (restored ones come back, ones it seeded are forgotten, so that
        # the first replay seeds them from real data)
        restore_predictions = delayed_scaling.snapshot_states_of(p for ps in params for p in ps)

        def run(i: int, x: torch.Tensor) -> torch.Tensor:
            with self.suspended():
                return torch.func.functional_call(self.blocks[i], dict(zip(names[i], aliases[i])), (x,))

        def differentiate(i: int, out: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> tuple:
            inputs = [x] + [aliases[i][j] for j in graphs[i].trainable]
            return torch.autograd.grad(out, inputs, grad_outputs=grad_out, allow_unused=True)

        # warm-up inputs: block 0's sample, then each block's warm-up output (realistic values)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), graph_warmup():
            x = sample.detach()
            for g in graphs:
                g.static_input = x.clone().requires_grad_(True)
                x = run(g.index, g.static_input).detach()
            for it in range(self.warmup_iters):
                for g in graphs:
                    if it == 0:
                        with _SavedStorages() as saved:
                            out = run(g.index, g.static_input)
                        g.saves_input = _storage_ptr(g.static_input) in saved.pointers
                    else:
                        out = run(g.index, g.static_input)
                    differentiate(g.index, out, g.static_input, torch.ones_like(out))
            del out, x
        gc.collect()   # the first warm-up's autograd graphs (the saved-tensor hooks made them cycles)
        torch.cuda.current_stream().wait_stream(side)
        restore_predictions()
        torch.cuda.synchronize()
        # The warm-up ran eagerly outside the graphs' pool: hand its cached segments back before the
        # capture, so that the pool takes that memory over instead of adding to it (the process's
        # reserved peak would otherwise be the warm-up's high-water mark plus the whole pool).
        torch.cuda.empty_cache()

        # Block i+1 reads its input straight from block i's static output, and block i its output
        # gradient from block i+1's static input gradient: two activation-sized buffers per block
        # fewer (held for the whole run), and no copy between blocks. Safe because a block's static
        # output is rewritten only by its next forward replay, which comes after the next block's
        # backward has read it (a block called again before its backward runs eagerly, see _forward).
        pool = torch.cuda.graph_pool_handle()
        for g in graphs:
            if g.index > 0:
                g.static_input = graphs[g.index - 1].static_output.detach().requires_grad_(True)
            with torch.cuda.graph(g.forward_graph, pool=pool):
                g.static_output = run(g.index, g.static_input)
            g.input_view, g.output_view = g.static_input, g.static_output
            if g.index > 0 and not g.saves_input:
                _release_unsaved_output(graphs[g.index - 1], g)
        for g in reversed(graphs):
            following = graphs[g.index + 1].static_grads[0] if g.index + 1 < len(graphs) else None
            if (following is not None and following.shape == g.static_output.shape
                    and following.dtype == g.static_output.dtype):
                g.static_grad_output = following
            else:
                g.static_grad_output = torch.empty_like(g.static_output)
            with torch.cuda.graph(g.backward_graph, pool=pool):
                grads = differentiate(g.index, g.static_output, g.static_input, g.static_grad_output)
            # None where a parameter takes no part (its gradient stays None). The parameter gradients
            # are handed to the next captures' allocations, see _unowned_alias: one block's worth of
            # gradient memory serves every block.
            g.static_grads = (grads[0], *(None if t is None else _unowned_alias(t) for t in grads[1:]))
            del grads
        torch.cuda.set_rng_state(rng_state, rng_device)
        torch.cuda.empty_cache()   # the warm-up's input copies of blocks 1.. (replaced by shared tensors)
        self.graphs = graphs
        self.input_key = (tuple(sample.shape), sample.dtype, sample.device)
        logger.info(f"CUDA graphs: captured {len(graphs)} blocks' forward and backward for input "
                    f"{tuple(sample.shape)} {sample.dtype}")


class _SavedStorages(torch.autograd.graph.saved_tensors_hooks):
    """Inside: the storage of every tensor autograd saves for backward is recorded in `pointers`.

    It sees what autograd saves: the built-in operators' saved tensors and `ctx.save_for_backward`. A
    custom Function that kept its input as a plain `ctx` attribute would escape it; megaq's keep only
    metadata and quantized copies there."""

    def __init__(self):
        self.pointers: set[int] = set()
        super().__init__(self._pack, lambda t: t)

    def __enter__(self) -> "_SavedStorages":
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.pointers.add(_storage_ptr(t))
        return t


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _release_unsaved_output(producer: _BlockGraph, consumer: _BlockGraph) -> None:
    """Hand the producer block's static output back to the graph pool once the consumer block (the
    next one, whose backward does not read its input: `saves_input`, found in the warm-up) is captured.

    That output is read by the consumer's forward replay only, which comes right after the producer's
    in the stream, so the captures that follow (later blocks' forwards: their activations; and the
    backwards) may reuse its memory. Under the INT8 data flow a block saves INT8 copies of what it
    needs, not its BF16 input: one activation-sized buffer per block fewer at the pool's high-water
    mark, the end of the forward captures. The replays keep using the memory through unowned aliases
    (`output_view`, `input_view`: the consumer's input is the producer's output); the tensors autograd
    differentiates in the backward captures keep their shapes, without storage, as autograd needs no
    more of them. Eager fallbacks copy such an input first (BlockGraphs._forward)."""
    producer.output_view = _unowned_alias(producer.static_output)
    consumer.input_view = producer.output_view
    producer.static_output.untyped_storage().resize_(0)   # consumer.static_input shares this storage


def _unowned_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over `t`'s memory that does not keep that memory allocated.

    A block's backward replay writes its parameter gradients into the graph pool, and autograd's
    AccumulateGrad copies them into `.grad` (or adds them there) before anything else runs on the
    stream: its nodes run as soon as they are ready, ahead of the next block's backward (the engine
    orders AccumulateGrad first), and this module keeps a reference to the tensor it returns, so
    AccumulateGrad copies instead of taking the tensor over (tests/test_cuda_graphs.py checks the copy
    on the CPU; its GPU tests that graphed blocks train like eager ones check the result). So once a
    block's backward is captured, the memory of its parameter gradients may serve the captures that
    follow (the earlier blocks' backwards, their gradients included): in stream order every replay
    that reuses it comes after the copy. The pool's live bytes fall by (blocks - 1) x a block's
    parameters in 16-bit gradients (2.25 GiB at 1.3B parameters, H100); its reserved size falls only
    where the backward captures set its high-water mark (not at micro batch 16, where the forward's
    activations do). torch.compile's CUDA graph trees rebuild their outputs in a graph pool the same way."""
    storage = t.untyped_storage()
    unowned = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(unowned, t.storage_offset(), t.shape, t.stride())


def _check_capturable(blocks: Sequence[nn.Module]) -> None:
    """Refuse layers whose recipe synchronises with the host (what
    MegaqConfig refuses for train.cuda_graphs, for models built without a MegaqConfig)."""
    for b, block in enumerate(blocks):
        for name, module in block.named_modules():
            recipe = getattr(module, "recipe", None)
            if recipe is None or not getattr(recipe, "is_quantized", False):
                continue
            where = f"block {b} {name or 'itself'} (recipe {recipe.name!r})"
            if recipe.check_finite:
                raise ValueError(f"CUDA graphs: {where} checks its quantizer inputs for NaN/Inf, a host "
                                 f"synchronization that cannot be captured; build it with check_finite=False")


def install_block_graphs(model: nn.Module) -> BlockGraphs:
    """Graph `model.blocks` (a GPT's transformer blocks); call after `deepspeed.initialize`."""
    return BlockGraphs(model.blocks)
