"""The fused cross entropy's Triton passes (megaq.kernels.cross_entropy / megaq.kernels.triton_ce)
against a torch reference of the same math, and the fused op with them against its torch path.

Reference: the chunk's logits upcast to FP32, padding columns (>= real_cols) set to -inf, then torch's
amax, exp-sum, gather (row_stats) and exp(x - M) / S - onehot, times the row's scale (softmax_grad).

Bounds (random logits of spread ~N(0, 3), vocabularies 257 / 1000 / 50,304 with padding columns, rows
not a multiple of the tile, targets ignored / on another rank / at the first and last real column):
  * max and target logit: exact (the max of the same values; a load and an upcast);
  * sum of exponentials: relative 1e-5 (FP32 sums in another order, and the GPU's fast exp);
  * G: |G - ref| <= r |ref| + 1e-6 g, r = 1e-5 for FP32, one unit in the last place for BF16 (2^-7:
    the interpreter truncates FP32 -> BF16, the GPU rounds) and FP16 (2^-10, plus the FP16 subnormal
    step 2^-24 absolute: 1/n_valid-scaled probabilities underflow there on every path);
  * NaN or +Inf in a row: its sum is NaN (so its loss is NaN) and its gradient row NaN; the other
    rows exact as above;
  * the fused op with the kernels vs its torch path (FUSED_KERNELS = False), same chunking: loss
    relative 1e-5, gradients within 1e-5 (FP32) / 1e-2 (BF16) of their largest entry, as
    tests/test_fused_cross_entropy.py bounds the fused op against the unfused one.

Runs: the `test_interp_*` tests in an interpreter child (TRITON_INTERPRET=1, MEGAQ_KERNELS=triton),
including TP = 2 over gloo through the kernels; the `gpu` tests at GPT-2's head (T = 4096, C = 768,
V = 50,304) on CUDA, and the TP merge of the statistics with the vocabulary split in two on one GPU.
"""

import os

import pytest
import torch

from interpreter_utils import run_interpreter_child
from tensor_utils import gpt2_head_inputs
from test_fused_cross_entropy import (CASES, GRAD_TOL, LOSS_RTOL, TP_CASES, _fused_tp_runs, _tp_inputs,
                                      assert_grad_close, loss_and_grads, make_inputs, unfused_loss)

import megaq.nn.fused_cross_entropy as fce
from megaq.kernels import cross_entropy as ce_kernels
from megaq.kernels import dispatch
from megaq.nn import fused_linear_cross_entropy

IN_CHILD = os.environ.get("MEGAQ_CE_INTERP_CHILD") == "1"
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")
gpu = pytest.mark.gpu

G_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7 + 1e-5, torch.float16: 2.0 ** -10 + 1e-5}
G_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -24}
SUM_RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread, as tests/test_fused_cross_entropy.py: the unfused reference's FP32 GEMMs over
    a 50k vocabulary differ by ~1e-5 of their largest entry between thread counts."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# the reference and the checks shared by the interpreter and the GPU tests
def reference_stats(logits, target, real_cols):
    x = logits.float().clone()
    x[:, max(real_cols, 0):] = float("-inf")
    m = x.amax(dim=1)
    shift = torch.where(m == float("-inf"), 0.0, m)
    s = torch.exp(x - shift[:, None]).sum(dim=1)
    ours = target >= 0
    t = x.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
    return m, s, torch.where(ours, t, 0.0)


def reference_grad(logits, target, real_cols, row_max, sum_exp, scale):
    x = logits.float().clone()
    x[:, max(real_cols, 0):] = float("-inf")
    g = torch.exp(x - row_max[:, None]) / sum_exp[:, None]
    ours = target >= 0
    g[ours, target[ours]] -= 1.0
    return g * scale[:, None]


def chunk_inputs(rows, cols, real_cols, dtype, device, seed=0, ignore_every=4):
    """Logits ~N(0, 3) (a few rows shifted by +40 / -40), local targets over the real columns with
    every ignore_every-th -1, the first and last real column among them (and one padding column: an
    infinite loss, as on the torch path), and per-row scales 1/n or 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=g) * 3
    logits[1::7] += 40.0
    logits[2::7] -= 40.0
    target = torch.randint(0, max(real_cols, 1), (rows,), generator=g)
    if real_cols > 0:
        target[0], target[-1] = 0, real_cols - 1
    else:
        target[:] = -1
    target[1::ignore_every] = -1
    if 0 < real_cols < cols and rows > 3:
        target[3] = cols - 1
    scale = torch.where(target >= 0, 1.0 / max(int((target >= 0).sum()), 1), 0.0)
    return (logits.to(device=device, dtype=dtype), target.to(device),
            scale.to(device=device, dtype=torch.float32))


def assert_g_close(actual, expected, scale, dtype, what="G"):
    bound = G_RTOL[dtype] * expected.abs() + 1e-6 * scale[:, None] + G_ATOL[dtype]
    err = (actual.float() - expected).abs()
    bad = ~(err <= bound)  # NaN fails
    assert not bad.any(), (f"{what}: {int(bad.sum())} entries out of bound, worst "
                           f"{(err - bound)[bad].max().item():.3g} over it")


def check_row_stats(logits, target, real_cols):
    m, s, t = ce_kernels.row_stats(logits, target, real_cols)
    rm, rs, rt = reference_stats(logits, target, real_cols)
    assert torch.equal(m, rm), "row max"
    assert torch.equal(t, rt), "target logit"
    torch.testing.assert_close(s, rs, rtol=SUM_RTOL, atol=0)
    return rm, rs


def check_softmax_grad(logits, target, real_cols, scale):
    rm, rs, _ = reference_stats(logits, target, real_cols)
    expected = reference_grad(logits, target, real_cols, rm, rs, scale)
    out = ce_kernels.softmax_grad_(logits, target, real_cols, rm, rs, scale)
    assert out.data_ptr() == logits.data_ptr() and out.dtype == logits.dtype, "not in place"
    assert_g_close(out, expected, scale, logits.dtype)
    assert (out[scale == 0] == 0).all(), "rows of scale 0 (ignored targets) must get 0"
    if real_cols < logits.size(1):
        pad = slice(max(real_cols, 0), None)  # 0 there, but for -g at a (padding) target
        assert ((out[:, pad] == 0) | (expected[:, pad] != 0)).all(), "padding columns must get 0"


def check_nonfinite(device, dtype):
    """NaN / +Inf rows give a NaN loss and gradient; -inf logits are plain zero probabilities, even a
    whole first tile of them (the online max is still -inf there)."""
    logits, target, scale = chunk_inputs(9, 300, 290, dtype, device)
    logits[2, 17] = float("nan")
    logits[5, 100] = float("inf")
    logits[7, :150] = float("-inf")
    target[7] = 200
    m, s, t = ce_kernels.row_stats(logits, target, 290)
    loss = s.log() + m - t
    assert torch.isnan(s[[2, 5]]).all() and torch.isnan(loss[[2, 5]]).all(), (s, loss)
    assert torch.isfinite(loss[7]), loss
    finite = [r for r in range(9) if r not in (2, 5)]
    rm, rs, _ = reference_stats(logits[finite], target[finite], 290)
    assert torch.equal(m[finite], rm)
    torch.testing.assert_close(s[finite], rs, rtol=SUM_RTOL, atol=0)
    scale = torch.ones_like(scale)  # no 0 * NaN question: every row counted
    ce_kernels.softmax_grad_(logits, target, 290, m, s, scale)
    assert torch.isnan(logits[[2, 5]].float()).all(), "a NaN/Inf row's gradient must be NaN"
    assert torch.isfinite(logits[finite].float()).all()


def fused_kernel_vs_torch_path(monkeypatch, hidden, weight, target, **kwargs):
    """(loss, d hidden, d weight) through the kernels, and through the torch path."""
    assert fce._uses_kernels(weight), "the kernels do not run here"
    with_kernels = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, **kwargs)
    monkeypatch.setattr(fce, "FUSED_KERNELS", False)
    torch_path = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, **kwargs)
    monkeypatch.setattr(fce, "FUSED_KERNELS", True)
    return with_kernels, torch_path


def assert_same_results(got, ref, dtype):
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = got, ref
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL[torch.bfloat16], atol=0)
    assert_grad_close(gh, ref_gh, GRAD_TOL[dtype], "d hidden")
    assert_grad_close(gw, ref_gw, GRAD_TOL[dtype], "d weight")


# --------------------------------------------------------------------------------------------------
# CPU: the interpreter subprocess, the path choice, argument checks
def test_kernels_under_interpreter():
    if IN_CHILD:
        pytest.skip("already the interpreter child")
    run_interpreter_child(__file__, "MEGAQ_CE_INTERP_CHILD", timeout=600)


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_cpu_takes_the_torch_path(monkeypatch):
    weight = torch.zeros(8, 4)
    monkeypatch.setenv("MEGAQ_KERNELS", "auto")
    assert not ce_kernels.kernels_supported(weight) and not fce._uses_kernels(weight)
    monkeypatch.setattr(dispatch, "_use_triton", lambda *t: True)
    assert fce._uses_kernels(weight) and fce._uses_kernels(weight.bfloat16())
    assert not fce._uses_kernels(weight.double())
    monkeypatch.setattr(fce, "FUSED_KERNELS", False)
    assert not fce._uses_kernels(weight)


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_bad_input_is_named():
    logits = torch.zeros(4, 10)
    target = torch.zeros(4, dtype=torch.int64)
    stats = torch.zeros(4)
    with pytest.raises(ValueError, match="contiguous 2-D float"):
        ce_kernels.row_stats(logits.t(), target, 10)
    with pytest.raises(ValueError, match="contiguous 2-D float"):
        ce_kernels.row_stats(logits.double(), target, 10)
    with pytest.raises(ValueError, match="target must be a contiguous 1-D tensor of 4"):
        ce_kernels.row_stats(logits, target[:3], 10)
    with pytest.raises(ValueError, match="int32/int64"):
        ce_kernels.row_stats(logits, target.float(), 10)
    with pytest.raises(ValueError, match="real_cols"):
        ce_kernels.row_stats(logits, target, 10.0)
    with pytest.raises(ValueError, match="grad_scale must be FP32"):
        ce_kernels.softmax_grad_(logits, target, 10, stats, stats, stats.double())
    with pytest.raises(ValueError, match="sum_exp must be a contiguous 1-D tensor of 4"):
        ce_kernels.softmax_grad_(logits, target, 10, stats, torch.zeros(2, 4)[:, 0], stats)


# --------------------------------------------------------------------------------------------------
# interpreter (run by the subprocess above)
INTERP_SHAPES = {
    # name: (rows, cols, real columns, config_override)
    "v257_4_rows_per_program": (37, 257, 257, dict(CE_BLOCK=64, CE_TILE=256)),
    "v1000_padded_1_row_per_program": (19, 1000, 990, dict(CE_BLOCK=128, CE_TILE=128)),
    "v50304_padded_default_tiles": (3, 50304, 50257, {}),
    "all_padding_rank": (6, 96, 0, dict(CE_BLOCK=32, CE_TILE=64)),
}


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", list(INTERP_SHAPES))
def test_interp_row_stats_and_softmax_grad(shape, dtype):
    rows, cols, real, cfg = INTERP_SHAPES[shape]
    logits, target, scale = chunk_inputs(rows, cols, real, dtype, "cpu")
    with dispatch.config_override(**cfg):
        check_row_stats(logits, target, real)
        if real > 0:
            check_softmax_grad(logits, target, real, scale)


@interp_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf - inf
def test_interp_nan_and_inf_propagate():
    with dispatch.config_override(CE_BLOCK=64, CE_TILE=128):
        check_nonfinite("cpu", torch.float32)
        check_nonfinite("cpu", torch.bfloat16)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["rows_not_a_multiple_of_the_chunk", "seq_first_3d_odd_vocab",
                                  "gpt2_vocab_padded"])
def test_interp_fused_op_matches_its_torch_path(monkeypatch, case, dtype):
    lead, c, rows, vocab, chunk = CASES[case]
    hidden, weight, target = make_inputs(lead, c, rows, vocab, dtype)
    with dispatch.config_override(CE_BLOCK=16384, CE_TILE=16384):
        got, ref = fused_kernel_vs_torch_path(monkeypatch, hidden, weight, target, chunk_tokens=chunk,
                                              vocab_size=vocab)
    assert_same_results(got, ref, dtype)
    unfused = loss_and_grads(unfused_loss, hidden, weight, target, vocab_size=vocab)
    assert_same_results(got, unfused, dtype)


def _tp2_kernel_runs(rank, world):
    import megaq.nn.fused_cross_entropy as fused_ce
    assert fused_ce._uses_kernels(torch.zeros(2, 2)), "the kernels do not run in the TP children"
    return _fused_tp_runs(rank, world)


@interp_only
def test_interp_tp2_through_the_kernels_equals_tp1():
    from distributed_utils import run_distributed
    results = run_distributed(_tp2_kernel_runs, 2, timeout=300)
    for case, (sp, vocab, _) in TP_CASES.items():
        hidden, weight, target = _tp_inputs(vocab)
        ref_loss, ref_gh, ref_gw = loss_and_grads(unfused_loss, hidden, weight, target, vocab_size=vocab)
        runs = [r[case] for r in results]
        for run in runs:
            torch.testing.assert_close(run["loss"], ref_loss, rtol=1e-6, atol=0)
        gh = torch.cat([r["hidden_grad"] for r in runs]) if sp else runs[0]["hidden_grad"]
        assert_grad_close(gh, ref_gh, 1e-5, f"{case}: d hidden")
        assert_grad_close(torch.cat([r["weight_grad"] for r in runs]), ref_gw, 1e-5, f"{case}: d weight")


# --------------------------------------------------------------------------------------------------
# GPU
GPU_SHAPES = {
    "gpt2_chunk_2560": (2560, 50304, 50257),
    "rows_1000_v257": (1000, 257, 257),
    "rows_777_v1000_padded": (777, 1000, 990),
    "rows_300_v131077": (300, 131077, 131077),
}


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_row_stats_and_softmax_grad(shape, dtype):
    rows, cols, real = GPU_SHAPES[shape]
    logits, target, scale = chunk_inputs(rows, cols, real, dtype, "cuda")
    check_row_stats(logits, target, real)
    check_softmax_grad(logits, target, real, scale)


@gpu
def test_gpu_nan_and_inf_propagate():
    check_nonfinite("cuda", torch.float32)
    check_nonfinite("cuda", torch.bfloat16)


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


@gpu
def test_gpu_fused_op_kernels_match_the_torch_path_at_gpt2_head(monkeypatch):
    hidden, weight, target, vocab = gpt2_head_inputs(weight_std=0.05)
    got, ref = fused_kernel_vs_torch_path(monkeypatch, hidden, weight, target, vocab_size=vocab,
                                          chunk_tokens=1280)  # the same chunks: the same logits GEMMs
    assert_same_results(got, ref, torch.bfloat16)
    # and with the default chunk (2560 BF16 tokens with the kernels) against the unfused head
    default = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, vocab_size=vocab)
    unfused = loss_and_grads(unfused_loss, hidden, weight, target, vocab_size=vocab)
    torch.testing.assert_close(default[0], unfused[0], rtol=1e-4, atol=0)
    assert_grad_close(default[1], unfused[1], 2e-2, "d hidden")
    assert_grad_close(default[2], unfused[2], 2e-2, "d weight")


@gpu
def test_gpu_kernels_hold_no_fp32_copy_of_the_chunk(monkeypatch):
    hidden, weight, target, vocab = gpt2_head_inputs(weight_std=0.05)
    chunk = 1280

    def step():
        loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, chunk_tokens=chunk,
                       vocab_size=vocab)
    _, kernel_peak = _peak(step)
    monkeypatch.setattr(fce, "FUSED_KERNELS", False)
    _, torch_peak = _peak(step)
    # the torch path holds the chunk's FP32 logits beside a BF16 copy (the GEMM's output, then the
    # gradient): 6 bytes per logit at its peak, the kernels 2 (the dW temporary, when torch cannot
    # accumulate into FP32 in the GEMM, is on both paths and smaller)
    fp32_chunk = chunk * weight.size(0) * 4
    assert torch_peak - kernel_peak >= fp32_chunk / 2, (
        f"kernel path peak {kernel_peak / 2**20:.0f} MiB vs torch path {torch_peak / 2**20:.0f} MiB: "
        f"saves less than half the {fp32_chunk / 2**20:.0f} MiB FP32 chunk")


@gpu
def test_gpu_tp_stats_merge_over_two_vocab_shards_equals_one_shard():
    """What the TP all-reduces do, with the vocabulary split in two on one GPU: per shard row_stats,
    merge (max; sums rescaled to the global max and added; target logits added), the loss and
    softmax_grad_ per shard from the merged statistics; against one shard of the whole vocabulary."""
    hidden, weight, target, vocab = gpt2_head_inputs(tokens=1000, weight_std=0.05)
    valid = target != -100
    scale = torch.where(valid, 1.0 / valid.sum(), 0.0)

    def local(lo, hi):
        t = target - lo
        return torch.where(valid & (t >= 0) & (t < hi - lo), t, -1)

    full = hidden.mm(weight.t())
    shards = [(0, 25152), (25152, 50304)]
    logits = [full[:, lo:hi].contiguous() for lo, hi in shards]  # the same BF16 logits, split
    ref_m, ref_s, ref_t = reference_stats(full, local(0, 50304), vocab)
    ref_loss = torch.where(valid, ref_s.log() + ref_m - ref_t, 0.0)

    m, s, t = ce_kernels.row_stats(full, local(0, 50304), vocab)
    loss = torch.where(valid, s.log() + m - t, 0.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    g_full = ce_kernels.softmax_grad_(full, local(0, 50304), vocab, m, s, scale)

    stats = [ce_kernels.row_stats(x, local(lo, hi), min(vocab, hi) - lo) for x, (lo, hi) in zip(logits, shards)]
    global_max = torch.maximum(stats[0][0], stats[1][0])
    sum_exp = sum(st[1] * torch.exp(st[0] - global_max) for st in stats)
    target_logit = stats[0][2] + stats[1][2]
    assert torch.equal(global_max, m)
    assert torch.equal(target_logit, t)
    torch.testing.assert_close(sum_exp, s, rtol=SUM_RTOL, atol=0)
    torch.testing.assert_close(torch.where(valid, sum_exp.log() + global_max - target_logit, 0.0), loss,
                               rtol=1e-5, atol=0)
    g_shards = torch.cat([ce_kernels.softmax_grad_(x, local(lo, hi), min(vocab, hi) - lo, global_max, sum_exp,
                                                   scale) for x, (lo, hi) in zip(logits, shards)], dim=1)
    # the same G up to the rounding of the shards' S: within one BF16 unit
    assert_g_close(g_shards, g_full.float(), scale, torch.bfloat16, "G of the two shards")


@gpu
def test_gpu_weight_gradient_accumulates_in_fp32_when_torch_can():
    """The dW accumulation path (addmm into the FP32 buffer, or the BF16 GEMM + add fallback) gives
    the FP32 product of the BF16 operands within FP32 summation order."""
    g = torch.Generator(device="cuda").manual_seed(1)
    acc = torch.randn(300, 96, device="cuda", generator=g)
    a = torch.randn(500, 300, device="cuda", generator=g).bfloat16()
    b = torch.randn(500, 96, device="cuda", generator=g).bfloat16()
    expected = acc + a.float().t() @ b.float()
    fce._accumulate_weight_grad(acc, a, b)
    into_fp32 = fce.WGRAD_INTO_FP32 and fce._addmm_into_fp32_supported(acc.device, torch.bfloat16)
    tol = 1e-5 if into_fp32 else 1e-2  # the fallback rounds the chunk's product to BF16
    assert_grad_close(acc, expected, tol, f"dW accumulation (into FP32: {into_fp32})")
