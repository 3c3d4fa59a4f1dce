"""megaq.nn.fused_cross_entropy: the chunked LM head + vocab-parallel cross entropy against the unfused
path (F.linear, -inf padding, vocab_parallel_cross_entropy), on one process, on 2 gloo processes
(tensor and sequence parallel), inside the GPT model, and what autograd keeps for backward.

Tolerances: FP32 loss rtol 1e-6 and gradients within 1e-5 of their largest entry (the only difference
is the order of the sums). BF16: the logits are the same BF16 GEMM; the weight gradient's chunk
partials are rounded to BF16 once each before their FP32 sum (the unfused wgrad rounds the whole sum
once), so gradients are within 1e-2 of their largest entry (a few BF16 ulps), the FP32 loss within 1e-5.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distributed_utils import require_contiguous_collectives, run_distributed
from tensor_utils import gpt2_head_inputs
from megaq.models.gpt import GPT, GPTConfig
from megaq.nn import column_parallel_input, fused_linear_cross_entropy, vocab_parallel_cross_entropy
from megaq.nn.fused_cross_entropy import default_chunk_tokens
from megaq.parallel import get_tensor_parallel_rank, initialize_model_parallel

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LOSS_RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def unfused_loss(hidden, weight, target, vocab_size=None, ignore_index=-100):
    """Today's head + loss: the whole logits, padded entries -inf, vocab_parallel_cross_entropy."""
    logits = F.linear(hidden, weight)
    per_rank = weight.size(0)
    if vocab_size is not None:
        real_here = vocab_size - get_tensor_parallel_rank() * per_rank
        if real_here < per_rank:
            logits = logits.masked_fill(torch.arange(per_rank, device=logits.device) >= real_here,
                                        float("-inf"))
    return vocab_parallel_cross_entropy(logits, target, ignore_index=ignore_index)


def make_inputs(lead_shape, hidden_size, vocab_rows, vocab_size, dtype, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead_shape, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab_rows, hidden_size, generator=g) / math.sqrt(hidden_size) * 3).to(dtype)
    weight[vocab_size:] = 0  # padded rows are zero in the model
    target = torch.randint(0, vocab_size, lead_shape, generator=g)
    target.view(-1)[::ignore_every] = -100
    return hidden, weight, target


def loss_and_grads(fn, hidden, weight, target, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fn(h, w, target, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def assert_grad_close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x max |expected| {scale:.3g}"


# ---- one process, against the unfused path ---------------------------------------------------

CASES = {
    # name: (leading shape, hidden size, weight rows, real vocabulary, chunk tokens)
    "rows_not_a_multiple_of_the_chunk": ((333,), 48, 256, 250, 100),
    "seq_first_3d_odd_vocab": ((37, 3), 40, 67, 67, 16),
    "gpt2_vocab_padded": ((70,), 32, 50304, 50257, 32),
    "one_chunk_default_size": ((50,), 24, 130, 129, None),
    "chunk_of_one_token": ((9,), 16, 21, 19, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_the_unfused_path(case, dtype):
    lead, c, rows, vocab, chunk = CASES[case]
    hidden, weight, target = make_inputs(lead, c, rows, vocab, dtype)
    loss, gh, gw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target,
                                  chunk_tokens=chunk, vocab_size=vocab)
    ref_loss, ref_gh, ref_gw = loss_and_grads(unfused_loss, hidden, weight, target, vocab_size=vocab)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert gh.shape == hidden.shape and gw.shape == weight.shape
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL[dtype], atol=0)
    assert_grad_close(gh, ref_gh, GRAD_TOL[dtype], "d hidden")
    assert_grad_close(gw, ref_gw, GRAD_TOL[dtype], "d weight")
    ignored = target == -100
    assert ignored.any() and (gh[ignored] == 0).all(), "ignored tokens must get no gradient"
    assert (gw[vocab:] == 0).all(), "padded vocabulary rows must get no gradient"


def test_all_targets_ignored_gives_nan_loss_and_zero_gradients_like_pytorch():
    hidden, weight, _ = make_inputs((10,), 8, 16, 16, torch.float32)
    target = torch.full((10,), -100)
    loss, gh, gw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, chunk_tokens=3)
    torch_loss, torch_gh, torch_gw = loss_and_grads(
        lambda h, w, t: F.cross_entropy(F.linear(h, w), t), hidden, weight, target)
    assert torch.isnan(loss) and torch.isnan(torch_loss)
    assert torch.equal(gh, torch_gh) and torch.equal(gw, torch_gw)
    assert (gh == 0).all() and (gw == 0).all()


def test_matches_pytorch_cross_entropy_with_another_ignore_index():
    hidden, weight, target = make_inputs((40,), 16, 33, 33, torch.float32)
    target[target == -100] = 7  # class 7 is ignored instead
    loss, gh, gw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target,
                                  ignore_index=7, chunk_tokens=6)
    ref_loss, ref_gh, ref_gw = loss_and_grads(
        lambda h, w, t: F.cross_entropy(F.linear(h, w), t, ignore_index=7), hidden, weight, target)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grad_close(gh, ref_gh, 1e-5, "d hidden")
    assert_grad_close(gw, ref_gw, 1e-5, "d weight")


def test_tied_weight_gets_the_embedding_and_the_head_gradient_summed():
    """GPT-2's tie: the weight is also the token embedding, so both uses' gradients must add."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (6, 4), generator=g)
    target = torch.randint(0, 50, (6, 4), generator=g)
    weight = torch.randn(64, 32, generator=g) * 0.5
    weight[50:] = 0
    mix = torch.randn(32, 32, generator=g) / 6

    def model(head):
        w = weight.clone().requires_grad_()
        hidden = F.layer_norm(F.embedding(ids, w) @ mix, (32,))
        loss = head(hidden, w, target, vocab_size=50)
        loss.backward()
        return loss.detach(), w.grad

    loss, grad = model(lambda h, w, t, vocab_size: fused_linear_cross_entropy(h, w, t, chunk_tokens=5,
                                                                               vocab_size=vocab_size))
    ref_loss, ref_grad = model(unfused_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grad_close(grad, ref_grad, 1e-5, "tied weight")
    # the embedding's rows of the ids got more than the head's share alone
    head_only = loss_and_grads(unfused_loss, F.layer_norm(F.embedding(ids, weight) @ mix, (32,)), weight,
                               target, vocab_size=50)[2]
    assert not torch.allclose(grad, head_only, rtol=1e-3, atol=1e-6)


def test_backward_scales_by_the_incoming_gradient_and_runs_once():
    hidden, weight, target = make_inputs((30,), 16, 40, 37, torch.float32)
    _, gh, gw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, chunk_tokens=7)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, target, chunk_tokens=7)
    (loss * 0.25).backward(retain_graph=True)  # loss scaling / 1 over gradient accumulation steps
    torch.testing.assert_close(h.grad, 0.25 * gh, rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, 0.25 * gw, rtol=1e-6, atol=0)
    (loss * 2.0).backward()  # retained: a second backward accumulates, as autograd does
    torch.testing.assert_close(h.grad, 2.25 * gh, rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, 2.25 * gw, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().split("::")[-1].split(".")[0] in ("mm", "addmm", "addmm_"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad_enabled, hidden_grad, weight_grad, gemms_per_chunk", [
    (True, True, True, 3), (True, True, False, 2), (True, False, True, 2),
    (True, False, False, 1), (False, True, True, 1)])
def test_only_the_gradients_that_are_needed_are_computed(grad_enabled, hidden_grad, weight_grad,
                                                         gemms_per_chunk):
    hidden, weight, target = make_inputs((25,), 16, 40, 37, torch.float32)
    ref_loss = unfused_loss(hidden, weight, target, vocab_size=37)
    h = hidden.clone().requires_grad_(hidden_grad)
    w = weight.clone().requires_grad_(weight_grad)
    counter = _CountGemms()
    with torch.set_grad_enabled(grad_enabled), counter:
        loss = fused_linear_cross_entropy(h, w, target, chunk_tokens=10, vocab_size=37)  # 3 chunks
    assert counter.count == 3 * gemms_per_chunk
    assert (loss.grad_fn is not None) == (grad_enabled and (hidden_grad or weight_grad))
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    if loss.grad_fn is not None:
        loss.backward()
        assert (h.grad is not None) == hidden_grad and (w.grad is not None) == weight_grad


def test_saved_for_backward_holds_no_tokens_by_vocab_tensor():
    hidden, weight, target = make_inputs((300,), 32, 512, 500, torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        fused_linear_cross_entropy(h, w, target, chunk_tokens=64, vocab_size=500)
    assert sorted(saved) == sorted([((300, 32), torch.bfloat16), ((512, 32), torch.bfloat16)])


def test_bad_input_is_named():
    hidden, weight, target = make_inputs((8,), 16, 20, 20, torch.float32)
    with pytest.raises(ValueError, match="target"):
        fused_linear_cross_entropy(hidden, weight, target[:5])
    with pytest.raises(ValueError, match="must be \\[..., 16\\]"):
        fused_linear_cross_entropy(hidden[:, :8], weight, target)
    with pytest.raises(ValueError, match="one dtype"):
        fused_linear_cross_entropy(hidden.bfloat16(), weight, target)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_cross_entropy(hidden, weight, target, chunk_tokens=0)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_cross_entropy(hidden, weight, target, vocab_size=0)
    with pytest.raises(ValueError, match="integer token ids"):
        fused_linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(hidden, weight[0], target)


def test_default_chunk_bounds_the_chunk_logits():
    assert default_chunk_tokens(50304) == 1280  # GPT-2's padded vocabulary: 246 MiB of FP32 logits
    assert default_chunk_tokens(25152) == 2560  # the same at TP=2
    assert default_chunk_tokens(50304, 2) == 2560  # BF16 logits (the kernels): 246 MiB
    for vocab in (17, 50304, 256_000, 2_000_000):
        for logit_bytes in (2, 4):
            chunk = default_chunk_tokens(vocab, logit_bytes)
            assert chunk >= 1 and (chunk * vocab * logit_bytes <= 256 * 2**20 or chunk == 1)


# ---- TP = 2 (gloo), with and without sequence parallelism, against TP = 1 ----------------------

TP_CASES = {
    # name: (sequence parallel, real vocabulary of the 96 padded rows, chunk tokens)
    "tensor_parallel": (False, 95, 10),
    "sequence_parallel": (True, 95, 10),
    "rank1_holds_only_padding": (False, 40, 7),
    "sequence_parallel_one_chunk": (True, 96, None),
}


def _tp_inputs(vocab):
    return make_inputs((18, 3), 24, 96, vocab, torch.float32, seed=vocab)


def _fused_tp_runs(rank, world):
    import megaq.parallel.mappings as mappings
    require_contiguous_collectives(mappings)
    initialize_model_parallel(world)
    results = {}
    for name, (sp, vocab, chunk) in TP_CASES.items():
        hidden, weight, target = _tp_inputs(vocab)
        rows = weight.size(0) // world
        h = (hidden.chunk(world, dim=0)[rank] if sp else hidden).clone().requires_grad_()
        w = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
        loss = fused_linear_cross_entropy(column_parallel_input(h, sequence_parallel=sp), w, target,
                                          chunk_tokens=chunk, vocab_size=vocab)
        loss.backward()
        results[name] = dict(loss=loss.detach(), hidden_grad=h.grad, weight_grad=w.grad)
    return results


@pytest.fixture(scope="module")
def fused_tp2_results():
    return run_distributed(_fused_tp_runs, 2)


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tp2_equals_tp1(fused_tp2_results, case):
    sp, vocab, _ = TP_CASES[case]
    hidden, weight, target = _tp_inputs(vocab)
    ref_loss, ref_gh, ref_gw = loss_and_grads(unfused_loss, hidden, weight, target, vocab_size=vocab)
    runs = [r[case] for r in fused_tp2_results]
    for run in runs:
        torch.testing.assert_close(run["loss"], ref_loss, rtol=1e-6, atol=0)
        if not sp:  # the copy mapping's backward all-reduced the partial hidden gradients
            assert_grad_close(run["hidden_grad"], ref_gh, 1e-5, "d hidden")
    if sp:  # the all-gather's backward reduce-scattered them: each rank its sequence chunk
        assert_grad_close(torch.cat([r["hidden_grad"] for r in runs]), ref_gh, 1e-5, "d hidden")
    assert_grad_close(torch.cat([r["weight_grad"] for r in runs]), ref_gw, 1e-5, "d weight")


# ---- the GPT model: switch on vs off --------------------------------------------------------

TINY = dict(vocab_size=95, seq_len=16, n_layer=2, n_head=4, n_embd=64)


def _gpt_loss_and_grads(dtype=torch.float32, **overrides):
    model = GPT(GPTConfig(**TINY, **overrides), init_seed=0).to(dtype)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 95, (3, 16), generator=g)
    labels = torch.randint(0, 95, (3, 16), generator=g)
    labels[1, 4:9] = -100
    loss = model(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt_fused_equals_unfused(tie, dtype):
    loss, grads = _gpt_loss_and_grads(dtype, tie_embeddings=tie, cross_entropy_chunk_tokens=7)
    ref_loss, ref_grads = _gpt_loss_and_grads(dtype, tie_embeddings=tie, fused_cross_entropy=False)
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL[dtype] * 10, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        # BF16: the head's gradient reaches every earlier layer through BF16 GEMMs
        assert_grad_close(grads[name], ref_grads[name], 3 * GRAD_TOL[dtype], name)


def _saved_shapes(model, ids, labels):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        model(ids, labels)
    return shapes


@pytest.mark.parametrize("lm_head_recipe, fused, keeps_logits", [
    ("bf16", True, False), ("bf16", False, True), ("int8", True, True)])
def test_gpt_saved_tensors_hold_no_logits_when_fused(lm_head_recipe, fused, keeps_logits):
    """With the switch on and an unquantized head nothing [tokens, vocab] is saved; the switch off,
    or a quantized head (which keeps today's path), saves the softmax."""
    model = GPT(GPTConfig(**TINY, fused_cross_entropy=fused,
                          lm_head_recipe={"preset": lm_head_recipe, "check_finite": False}), init_seed=0)
    assert model.fuses_cross_entropy == (fused and lm_head_recipe == "bf16")
    ids = torch.randint(0, 95, (2, 16), generator=torch.Generator().manual_seed(0))
    shapes = _saved_shapes(model, ids, ids)
    assert any(s[-1] == model.padded_vocab_size for s in shapes) == keeps_logits, shapes


def test_gpt_evaluation_without_grad_matches():
    model = GPT(GPTConfig(**TINY), init_seed=0)
    ids = torch.randint(0, 95, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids, ids)
    model.cfg.fused_cross_entropy = False
    with torch.no_grad():
        ref = model(ids, ids)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("model_keys, fused, chunk", [
    ({}, True, None), ({"fused_cross_entropy": False, "cross_entropy_chunk_tokens": 512}, False, 512)])
def test_run_config_keys_reach_the_model(model_keys, fused, chunk):
    from megaq.training.config import ConfigError, config_from_dict
    from megaq.training.engine import gpt_config
    raw = {"model": {"preset": "tiny", **model_keys}, "data": {"demo": True},
           "train": {"train_steps": 1, "micro_batch_size": 1, "global_batch_size": 1}}
    model_cfg = gpt_config(config_from_dict(raw), tokenizer_vocab_size=257)
    assert (model_cfg.fused_cross_entropy, model_cfg.cross_entropy_chunk_tokens) == (fused, chunk)
    with pytest.raises(ConfigError, match="model.cross_entropy_chunk_tokens"):
        config_from_dict({**raw, "model": {"preset": "tiny", "cross_entropy_chunk_tokens": 0}})


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_gpt_config_rejects_a_bad_chunk_size(value):
    with pytest.raises(ValueError, match="GPTConfig.cross_entropy_chunk_tokens"):
        GPTConfig(**TINY, cross_entropy_chunk_tokens=value)


# ---- GPU: GPT-2 124M's head shape in BF16 ----------------------------------------------------

def _gpu_step(fn, hidden, weight, target, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fn(h, w, target, **kwargs)
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), h.grad, w.grad, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
def test_gpu_bf16_gpt2_head_matches_unfused_and_does_not_keep_the_softmax():
    hidden, weight, target, vocab = gpt2_head_inputs()
    loss, gh, gw, peak = _gpu_step(fused_linear_cross_entropy, hidden, weight, target, vocab_size=vocab)
    ref_loss, ref_gh, ref_gw, ref_peak = _gpu_step(unfused_loss, hidden, weight, target, vocab_size=vocab)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    assert_grad_close(gh, ref_gh, 2e-2, "d hidden")
    assert_grad_close(gw, ref_gw, 2e-2, "d weight")
    softmax_bytes = hidden.size(0) * weight.size(0) * 4
    assert ref_peak - peak >= softmax_bytes, (
        f"fused peak {peak / 2**20:.0f} MiB vs unfused {ref_peak / 2**20:.0f} MiB: saves less than the "
        f"{softmax_bytes / 2**20:.0f} MiB softmax")


@pytest.mark.gpu
def test_gpu_fused_step_has_no_host_sync_and_replays_from_a_cuda_graph():
    # 2 chunks of 2560 with the kernels (3 of 1280 on the torch path), the last partial
    hidden, weight, target, vocab = gpt2_head_inputs(tokens=3000)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def step():
        h.grad = w.grad = None
        loss = fused_linear_cross_entropy(h, w, target, vocab_size=vocab)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph wants
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    h.grad = w.grad = None
    with torch.cuda.graph(graph):
        static_loss = fused_linear_cross_entropy(h, w, target, vocab_size=vocab)
        static_loss.backward()
    with torch.no_grad():  # new inputs in the captured buffers
        h.mul_(0.5)
        w.add_(0.01)
    graph.replay()
    torch.cuda.synchronize()
    graphed = (static_loss.clone(), h.grad.clone(), w.grad.clone())
    eager = step()
    # the same kernels on the same data (a cuBLAS algorithm may differ between the streams)
    torch.testing.assert_close(graphed[0], eager.detach(), rtol=1e-5, atol=0)
    assert_grad_close(graphed[1], h.grad, 1e-3, "graphed d hidden")
    assert_grad_close(graphed[2], w.grad, 1e-3, "graphed d weight")
