"""train.cuda_graphs (megaq.training.cuda_graphs): graphed blocks compute what eager blocks compute,
see weights updated in place, fall back to eager where a replay would be wrong, and run inside the
DeepSpeed trainer. GPU only (CUDA graphs), except the replay's gradient hand-over, which a fake graph
checks on the CPU; the config's refusals are tested in test_config.py."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config

gpu = pytest.mark.gpu


# int8 with nearest rounding everywhere: deterministic kernels, so graphed and eager must agree closely
INT8_NEAREST = {"preset": "int8", "check_finite": False, "dgrad": {"a": {"rounding": "nearest"}},
                "wgrad": {"a": {"rounding": "nearest"}}}


def test_a_data_flow_block_saves_no_bf16_input_and_trains_the_same_without_it():
    """What the capture relies on to hand a block's output back to the graph pool, on the CPU's
    reference kernels: _SavedStorages sees a BF16-flow block save its input and an INT8-data-flow block
    not, and the data-flow blocks' gradients are bit-identical when the storage of the output they
    pass on is released before the backward."""
    from megaq.models import GPT, GPTConfig
    from megaq.training.cuda_graphs import _SavedStorages, _storage_ptr

    def blocks(data_flow):
        cfg = GPTConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, n_embd=128, recipe=INT8_NEAREST,
                        data_flow=data_flow)
        return GPT(cfg, init_seed=0).blocks

    def grads(data_flow, release):
        b0, b1 = blocks(data_flow)
        x0 = torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out0 = b0(x0)
        in1 = out0.detach().requires_grad_(True)
        with _SavedStorages() as saved:
            out1 = b1(in1)
        if release:
            out0.untyped_storage().resize_(0)
        g1 = torch.autograd.grad(out1, [in1, *b1.parameters()], torch.ones_like(out1), allow_unused=True)
        g0 = torch.autograd.grad(out0, [x0, *b0.parameters()], g1[0], allow_unused=True)
        return _storage_ptr(in1) in saved.pointers, [g for g in g1 + g0 if g is not None]

    assert grads("bf16", False)[0]                       # LayerNorm saves its BF16 input
    saves, kept = grads("int8", False)
    assert not saves
    _, released = grads("int8", True)
    assert len(kept) == len(released) > 20 and all(torch.equal(a, b) for a, b in zip(kept, released))


class _FakeBlockGraph:
    """What _ReplayBlock reads of a captured block, replayed by Python on the CPU: forward y = x * w,
    backward writes dL/dw into `grad_memory`, which the static gradients alias without owning it (as
    after a capture, where that memory went back to the graph pool)."""

    def __init__(self, w):
        from megaq.training.cuda_graphs import _unowned_alias

        self.params, self.trainable, self.awaiting_backward = [w], [0], False
        self.static_input, self.static_output = torch.zeros(4), torch.zeros(4)
        self.input_view, self.output_view = self.static_input, self.static_output
        self.static_grad_output = torch.zeros(4)
        self.grad_memory = torch.zeros(4)
        self.static_grads = (torch.zeros(4), _unowned_alias(self.grad_memory))
        self.forward_graph = type("G", (), {"replay": lambda _: self.static_output.copy_(
            self.static_input * w.detach())})()
        self.backward_graph = type("G", (), {"replay": lambda _: (
            self.grad_memory.copy_(self.static_grad_output * self.static_input),
            self.static_grads[0].copy_(self.static_grad_output * w.detach()))})()


def test_replayed_gradients_are_copied_into_grad_not_taken_over():
    """The parameter gradients a replay hands out live in memory the next replays overwrite:
    AccumulateGrad must copy them into .grad (first micro batch) and add them there (the next ones),
    never keep the static tensor as .grad. Two micro batches accumulate exactly."""
    from megaq.training.cuda_graphs import _ReplayBlock

    w = torch.nn.Parameter(torch.full((4,), 3.0))
    graph = _FakeBlockGraph(w)
    xs = [torch.arange(4.0), torch.full((4,), 2.0)]
    for x in xs:
        _ReplayBlock.apply(graph, x.requires_grad_(True), w).sum().backward()
        assert w.grad.data_ptr() != graph.grad_memory.data_ptr()
        assert torch.equal(x.grad, torch.full((4,), 3.0))
    graph.grad_memory.fill_(-1.0)       # the next replay's values must not reach .grad
    assert torch.equal(w.grad, xs[0] + xs[1])


def _models(recipe, data_flow: str = "bf16", copies: int = 1):
    from megaq.models import GPT, GPTConfig
    from megaq.training.cuda_graphs import BlockGraphs

    if isinstance(recipe, str):
        recipe = {"preset": recipe, "check_finite": False}
    cfg = GPTConfig(vocab_size=512, seq_len=128, n_layer=3, n_head=6, n_embd=384, recipe=recipe,
                    data_flow=data_flow)
    eager = GPT(cfg, init_seed=0).cuda().bfloat16()
    graphed = copy.deepcopy(eager)
    graphs = BlockGraphs(graphed.blocks)
    return eager, graphed, graphs, [copy.deepcopy(eager) for _ in range(copies - 1)]


def _batch(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, 512, (4, 128), device="cuda", generator=g)
    return ids, torch.roll(ids, -1, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _loss_and_grads(model, ids, labels):
    for p in model.parameters():
        p.grad = None
    loss = model(ids, labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@gpu
@pytest.mark.parametrize("recipe,cached,data_flow", [("bf16", False, "bf16"), ("int8_nearest", False, "bf16"),
                                                     ("int8_nearest", True, "bf16"), ("int8_nearest", False, "int8")])
def test_graphed_blocks_train_like_eager_blocks(recipe, cached, data_flow):
    """Four optimizer steps with deterministic kernels: the graphed model's losses and gradients
    equal the eager model's (so the replays read the weights the optimizer updates in place, and,
    with the weight cache, the quantized weights refreshed after each step). Under the INT8 data flow
    the blocks save no BF16 input, and every block output but the last goes back to the graph pool."""
    from megaq.ops import weight_cache

    eager, graphed, graphs, _ = _models(INT8_NEAREST if recipe == "int8_nearest" else recipe, data_flow)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, graphed)]
    with weight_cache.caching(cached):
        for step in range(4):
            ids, labels = _batch(step)
            (loss_e, grads_e), (loss_g, grads_g) = (_loss_and_grads(m, ids, labels) for m in (eager, graphed))
            assert graphs.captured
            released = [g.output_view is not g.static_output for g in graphs.graphs]
            assert released == [data_flow == "int8"] * (len(released) - 1) + [False], released
            assert abs(loss_e - loss_g) < 1e-3 * loss_e, (step, loss_e, loss_g)
            for name, g in grads_g.items():
                assert torch.isfinite(g).all(), name
                assert _rel(g, grads_e[name]) < 1e-2, (step, name, _rel(g, grads_e[name]))
            if cached and step >= 2:   # the refresh after steps 2 and 3 replayed its captured graph
                assert graphs._refresh_graph is not None
                _assert_cached_weights_are_fresh()
            for opt in opts:
                opt.step()
            weight_cache.weights_updated()


# INT8_NEAREST with delayed scaling of the wgrad operands
INT8_DELAYED_NEAREST = {**INT8_NEAREST, "preset": "int8_delayed"}


@gpu
@pytest.mark.parametrize("data_flow", ["bf16", "int8"])
def test_graphed_delayed_scaling_follows_the_eager_predictions(data_flow):
    """Delayed scaling under CUDA graphs: the warm-up's predictions (from all-ones output gradients) are
    forgotten before the capture, so the first replay seeds them from the real batch as the first
    eager call does; four steps later the graphed and the eager model still agree, and the graphs'
    predictions are seeded, finite and counting clipped features."""
    from megaq.ops import delayed_scaling

    eager, graphed, graphs, _ = _models(INT8_DELAYED_NEAREST, data_flow)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, graphed)]
    delayed_scaling.take_overflow_counts()
    for step in range(4):
        ids, labels = _batch(step)
        (loss_e, grads_e), (loss_g, grads_g) = (_loss_and_grads(m, ids, labels) for m in (eager, graphed))
        assert graphs.captured
        assert abs(loss_e - loss_g) < 1e-3 * loss_e, (step, loss_e, loss_g)
        for name, g in grads_g.items():
            assert torch.isfinite(g).all(), name
            assert _rel(g, grads_e[name]) < 1e-2, (step, name, _rel(g, grads_e[name]))
        for opt in opts:
            opt.step()
    on_aliases = [state for g in graphs.graphs for alias in g.aliases
                  for state in getattr(alias, delayed_scaling._ATTRIBUTE, {}).values()]
    assert len(on_aliases) == 2 * 4 * 3       # two operands of four linears in three blocks
    for state in on_aliases:
        assert int(state.valid) == 1 and bool(torch.isfinite(state.pred).all()) and float(state.pred.min()) > 0
    clipped, quantized = delayed_scaling.take_overflow_counts()
    assert 0 < clipped < quantized


@gpu
def test_graphed_run_starts_from_restored_predictions_and_checkpoints_them():
    """Predictions loaded before the capture (a resumed run) are the ones the graphs start from: the
    capture's warm-up does not leave its own in their place, and after a replayed step the graphed and
    the eager model hold the same predictions, which `state_dict` reads through the parameters."""
    from megaq.ops import delayed_scaling

    source, _, _, _ = _models(INT8_DELAYED_NEAREST)
    for step in range(2):
        _loss_and_grads(source, *_batch(10 + step))
    saved = delayed_scaling.state_dict(source)
    assert len(saved) == 2 * 4 * 3
    for entry in saved.values():   # well above any abs-max to come: the decayed prediction must win
        entry["pred"] = entry["pred"] * 4
    eager, graphed, graphs, _ = _models(INT8_DELAYED_NEAREST)
    for model in (eager, graphed):
        assert delayed_scaling.load_state_dict(model, saved) == len(saved)
    ids, labels = _batch(0)
    (loss_e, _), (loss_g, _) = (_loss_and_grads(m, ids, labels) for m in (eager, graphed))
    assert graphs.captured and abs(loss_e - loss_g) < 1e-3 * loss_e
    after_e, after_g = delayed_scaling.state_dict(eager), delayed_scaling.state_dict(graphed)
    assert sorted(after_g) == sorted(saved)
    for key, entry in saved.items():
        expected = entry["pred"] * 0.95
        assert _rel(after_e[key]["pred"], expected) < 1e-6, key
        assert _rel(after_g[key]["pred"], expected) < 1e-6, key
        assert int(after_g[key]["valid"]) == 1
    on_aliases = {id(state) for g in graphs.graphs for alias in g.aliases
                  for state in getattr(alias, delayed_scaling._ATTRIBUTE, {}).values()}
    on_params = {id(state) for p in graphed.parameters()
                 for state in getattr(p, delayed_scaling._ATTRIBUTE, {}).values()}
    assert on_aliases == on_params and len(on_params) == len(saved)


def _assert_cached_weights_are_fresh():
    """Every cached weight operand is bit for bit a fresh quantization of the weight as it is now."""
    from megaq.ops import weight_cache
    from megaq.ops.linear import quantize_operand

    count = 0
    for ref in weight_cache._State.weights:
        weight = ref()
        for (spec, hadamard, transpose, _, _), entry in weight.__dict__.get(weight_cache._ATTRIBUTE, {}).items():
            fresh = quantize_operand(weight, spec, False, transpose, hadamard)
            assert torch.equal(entry.operand.data, fresh.data) and torch.equal(entry.operand.scale, fresh.scale)
            count += 1
    assert count > 0


@gpu
def test_consecutive_blocks_share_their_static_tensors_and_skip_the_copies(monkeypatch):
    """Block i+1 reads block i's static output as its input and block i reads block i+1's static input
    gradient as its output gradient: no separate buffers, and in a plain chain no copy between blocks
    (the only copies left: block 0's input and the last block's output gradient)."""
    eager, graphed, graphs, _ = _models(INT8_NEAREST)
    ids, labels = _batch(0)
    loss_e, grads_e = _loss_and_grads(eager, ids, labels)
    _loss_and_grads(graphed, ids, labels)               # captures
    gs = graphs.graphs
    for a, b in zip(gs, gs[1:]):
        assert b.static_input.data_ptr() == a.static_output.data_ptr()
        assert a.static_grad_output.data_ptr() == b.static_grads[0].data_ptr()
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: (copies.append(self.data_ptr()),
                                                                            real_copy(self, src, *a, **k))[1])
    loss_g, grads_g = _loss_and_grads(graphed, ids, labels)   # replays
    monkeypatch.undo()
    statics = {g.static_input.data_ptr() for g in gs} | {g.static_grad_output.data_ptr() for g in gs}
    assert sorted(p for p in copies if p in statics) == sorted(
        [gs[0].static_input.data_ptr(), gs[-1].static_grad_output.data_ptr()])
    assert abs(loss_e - loss_g) < 1e-3 * loss_e
    for name, g in grads_g.items():
        assert _rel(g, grads_e[name]) < 1e-2, (name, _rel(g, grads_e[name]))


@gpu
@pytest.mark.parametrize("recipe,data_flow", [("int8", "bf16"), ("int8", "int8"), ("int4", "bf16")])
def test_graphed_stochastic_recipes_are_as_close_to_eager_as_two_eager_runs(recipe, data_flow):
    """The int8 recipe rounds gradients stochastically (and the data flow's backward too), the int4
    recipe also samples rows by leverage score, so two eager runs already differ: the graphed
    gradients must sit within that noise of the eager ones."""
    eager, graphed, graphs, (eager_again,) = _models(recipe, data_flow, copies=2)
    ids, labels = _batch(0)
    loss_e, grads_e = _loss_and_grads(eager, ids, labels)
    _, grads_again = _loss_and_grads(eager_again, ids, labels)
    loss_g, grads_g = _loss_and_grads(graphed, ids, labels)
    loss_g, grads_g = _loss_and_grads(graphed, ids, labels)   # a replay, not the capture
    assert abs(loss_e - loss_g) < 1e-3 * loss_e
    for name, g in grads_g.items():
        noise = _rel(grads_again[name], grads_e[name])
        assert torch.isfinite(g).all(), name
        assert _rel(g, grads_e[name]) < 2 * noise + 1e-3, (name, _rel(g, grads_e[name]), noise)


@gpu
def test_graphed_steps_draw_the_random_numbers_of_eager_steps(monkeypatch):
    """The capture's warm-up leaves torch's CUDA generator where it found it, so a graphed step draws
    the stochastic-rounding numbers an eager step from the same state draws (what makes a resumed
    graphed run, which captures again, continue the uninterrupted run's stream). Measured against
    the gap between eager steps from different states: the same numbers leave only the kernels'
    summation-order differences, a small fraction of it."""
    from megaq.ops import linear

    monkeypatch.setattr(linear, "DUAL_QUANTIZE", False)   # eager then runs the kernels captured
    eager, graphed, graphs, (other,) = _models("int8", copies=2)
    ids, labels = _batch(0)
    for step in range(2):                                  # the capture step, then a replay
        torch.manual_seed(100 + step)
        _, grads_e = _loss_and_grads(eager, ids, labels)
        state_after_eager = torch.cuda.get_rng_state()
        torch.manual_seed(200 + step)
        _, grads_other = _loss_and_grads(other, ids, labels)
        torch.manual_seed(100 + step)
        _, grads_g = _loss_and_grads(graphed, ids, labels)
        assert graphs.captured
        assert torch.equal(torch.cuda.get_rng_state(), state_after_eager), "the generator ends elsewhere"
        noisy = 0
        for name, g in grads_g.items():
            noise = _rel(grads_other[name], grads_e[name])   # 0 for the biases: no rounding in ∇b
            noisy += noise > 0
            assert _rel(g, grads_e[name]) <= 0.2 * noise, (step, name, _rel(g, grads_e[name]), noise)
        assert noisy > len(grads_g) // 2


@gpu
def test_evaluation_and_repeated_forwards_run_eagerly_and_correctly():
    """No-grad / eval calls never replay; a second forward before the first one's backward runs the
    block eagerly instead of overwriting the saved activations; both backwards are then correct."""
    eager, graphed, graphs, _ = _models(INT8_NEAREST)
    ids, labels = _batch(0)
    graphed(ids, labels).backward()      # captures
    replays = {"n": 0}
    original = graphs.graphs[0].forward_graph.replay

    def counting_replay():
        replays["n"] += 1
        original()
    graphs.graphs[0].forward_graph.replay = counting_replay
    graphed.eval()
    eager.eval()
    with torch.no_grad():
        assert torch.allclose(graphed(ids, labels), eager(ids, labels), rtol=1e-3)
    graphed.train()
    eager.train()
    assert replays["n"] == 0
    for p in graphed.parameters():
        p.grad = None
    first = graphed(ids, labels)
    second = graphed(ids, labels)    # block 0's graph still awaits `first`'s backward: eager
    assert replays["n"] == 1
    (first + second).backward()
    eager_loss = eager(ids, labels) * 2
    eager_loss.backward()
    for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
        assert _rel(pg.grad, pe.grad) < 1e-2, name


@gpu
@pytest.mark.parametrize("data_flow", ["bf16", "int8"])
def test_an_eager_block_after_replayed_ones_copies_a_released_input(data_flow):
    """Blocks 0-1 replay, block 2 runs eagerly (a parameter's storage moved, so the graphs are given
    up): under the INT8 data flow block 2's input is block 1's output in graph-pool memory that later
    replays reuse, so the eager block works on a copy; loss and gradients match the eager model's."""
    eager, graphed, graphs, _ = _models(INT8_NEAREST, data_flow)
    ids, labels = _batch(0)
    _loss_and_grads(graphed, ids, labels)                      # captures
    assert graphs.graphs[2].released_input_is(graphs.graphs[1].output_view.detach()) == (data_flow == "int8")
    moved = next(graphed.blocks[2].parameters())
    moved.data = moved.data.clone()                            # block 2 must run eagerly now
    (loss_e, grads_e), (loss_g, grads_g) = (_loss_and_grads(m, ids, labels) for m in (eager, graphed))
    assert not graphs.captured                                 # given up, captured again next time
    assert abs(loss_e - loss_g) < 1e-3 * loss_e, (loss_e, loss_g)
    for name, g in grads_g.items():
        assert torch.isfinite(g).all() and _rel(g, grads_e[name]) < 1e-2, (name, _rel(g, grads_e[name]))


@gpu
def test_recipes_that_cannot_be_captured_are_refused():
    from megaq.models import GPT, GPTConfig
    from megaq.training.cuda_graphs import BlockGraphs

    model = GPT(GPTConfig(vocab_size=512, seq_len=64, n_layer=1, n_head=2, n_embd=64, recipe="int8"),
                init_seed=0).cuda()
    with pytest.raises(ValueError, match="check_finite=False"):
        BlockGraphs(model.blocks)


@gpu
def test_trainer_with_cuda_graphs_trains_like_eager(demo_cache):
    """The DeepSpeed trainer (ZeRO-1, bf16) with train.cuda_graphs: its loss curve follows the eager
    run's within the stochastic rounding noise."""
    pytest.importorskip("deepspeed")
    from megaq.training.config import config_from_dict
    from megaq.training.trainer import pretrain

    runs = {}
    for graphs in (False, True):
        raw = tiny_config(demo_cache, quant={"recipe": "int8"},
                          train={"train_steps": 12, "cuda_graphs": graphs, "eval_interval": 6, "eval_iters": 2})
        runs[graphs] = pretrain(config_from_dict(raw))
    eager, graphed = runs[False]["losses"], runs[True]["losses"]
    assert len(graphed) == 12 and all(map(torch.isfinite, torch.tensor(graphed)))
    assert max(abs(a - b) for a, b in zip(eager, graphed)) < 0.05 * max(eager), (eager, graphed)
    assert runs[True]["val_losses"], "evaluation (no grad, eager blocks) ran"


@gpu
def test_graphed_int8_delayed_run_resumes_where_it_stopped(demo_cache, tmp_path):
    """The trainer under CUDA graphs with delayed scaling: N steps straight and k steps, checkpoint,
    resume, N - k steps give the same losses, because the checkpoint carries the predictions the graphs
    updated (their aliases share the parameters' states) and the resumed capture starts from them."""
    pytest.importorskip("deepspeed")
    from megaq.training.config import config_from_dict
    from megaq.training.trainer import pretrain

    def cfg(directory, steps, save_at_end=True):
        return config_from_dict(tiny_config(
            demo_cache, quant={"recipe": "int8_delayed"},
            checkpoint={"dir": str(tmp_path / directory), "save_at_end": save_at_end},
            train={"train_steps": steps, "decay_steps": 6, "cuda_graphs": True}))

    straight = pretrain(cfg("a", 6, save_at_end=False))
    first = pretrain(cfg("b", 3))
    saved = sorted((tmp_path / "b" / "step_00000003").glob("megaq_delayed_rank*.pt"))
    assert len(saved) == 1
    entries = torch.load(saved[0], weights_only=True)
    assert entries and all(int(e["valid"]) == 1 and float(e["pred"].min()) > 0 for e in entries.values())
    resumed = pretrain(cfg("b", 6))
    assert resumed["start_step"] == 3
    # the messages tell the two failure modes apart (one failure in 26 GPU runs, session 16, message not
    # kept): two fresh runs that differ are a non-reproducible step; a resume that differs misses a state
    assert first["losses"] == straight["losses"][:3], ("fresh runs differ", straight["losses"], first["losses"])
    assert resumed["losses"] == straight["losses"][3:], ("resume differs", straight["losses"], first["losses"],
                                                         resumed["losses"])


@gpu
def test_capture_uses_the_single_quantizers_and_eager_the_dual_one(monkeypatch):
    """The dual quantizer saves host time but costs GPU time: eager calls use it, captured ones not."""
    from megaq import kernels
    from megaq.ops import quantized_linear

    calls = {"n": 0}
    dual = kernels.hadamard_quantize_dual

    def counting(*args, **kwargs):
        calls["n"] += 1
        return dual(*args, **kwargs)
    monkeypatch.setattr(kernels, "hadamard_quantize_dual", counting)
    recipe = {"preset": "int8", "check_finite": False}
    x = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    quantized_linear(x, w, None, recipe).sum().backward()          # compiles the kernels too
    assert calls["n"] == 2                                          # X in the forward, ∇Y in the backward
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        quantized_linear(x, w, None, recipe)                        # warm the single-call kernels
    torch.cuda.current_stream().wait_stream(side)
    before = calls["n"]
    x_static = x.detach().clone()
    with torch.cuda.graph(graph):
        y = quantized_linear(x_static, w.detach(), None, recipe)
    graph.replay()
    assert calls["n"] == before
    assert _rel(y, x.detach().float() @ w.detach().float().t()) < 0.02
