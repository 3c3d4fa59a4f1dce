"""Attention that keeps INT8 copies of q, k, v and its output for backward (`quant.attention_saves:
int8`, megaq.ops.attention) against the BF16-saving path (PyTorch SDPA).

Error bounds (relative Frobenius norm of dq, dk, dv against the "bf16" path's, random N(0, 1) q, k, v
and output gradient, T=200, B=2, h=3, seeds 0-3), measured on the CPU: head_dim 64 and 80, FP32 and
BF16 activations: 0.013-0.0148 for dq and dk, 0.008-0.0105 for dv (the "bf16" path's own BF16 error
against FP64 is 0.004-0.005). Bound: 0.03 (about 2× the worst), and above 0.003, so that a silent
fall-back to the "bf16" path (error 0) fails too. The forward is the same flash kernel: identical.

The error grows with the attention logits (INT8 q and k carry an absolute logit error proportional
to |q| |k|): with q and k scaled by 2 (logit std 4; head_dim 64, T=256, FP32, seed 0) dq, dk, dv
measured 0.040, 0.039, 0.036 (bound 0.08), by 4 (logit std 16) 0.14-0.15 (not tested; the "bf16"
path's own BF16 error against FP64 there: 0.026).

The block (width 128, 2 heads, recipe int8, weights N(0, 0.05)), with either data flow: same output;
∇x 0.0011 and ∇(qkv weight) 0.0095 from the bf16-saving block's (bound 0.02).

GPU (H100, torch 2.11, BF16, T=2048, B=2, h=4, 2026-11-22): dq, dk, dv 0.0138, 0.0137, 0.0094 at head_dim
64 and 0.0147, 0.0147, 0.0100 at 128, the same with dropout 0.1; the outputs are bitwise those of
SDPA pinned to its flash backend under the same RNG state, dropout included (the mask is replayed
from the saved Philox state). Same bounds.

Tiny GPT (2 layers, width 128, head_dim 64, FP32, AdamW lr 3e-3) trained 30 steps on the CPU, int8
against bf16 saves: the largest relative loss difference over the steps measured 5.6e-4 (seed 0;
1.1e-3-1.2e-3 for seeds 1-3); bound 3e-3.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from megaq.models.gpt import GPT, GPTConfig
from megaq.models.transformer import TransformerBlock
from megaq.ops import attention as attention_ops
from megaq.ops import causal_attention
from megaq.quant import NonFiniteError

gpu = pytest.mark.gpu
GRAD_BOUND = 0.03
GRAD_FLOOR = 0.003
LOGIT_SCALE_BOUNDS = {2.0: 0.08}   # q, k scaled by 2 (logit std 4): measured 0.036-0.041
BLOCK_BOUND = 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _qkv_views(qkv: torch.Tensor, h: int, d: int):
    """attend()'s layout: q, k, v [B, h, T, d] as views of a sequence-first qkv [T, B, 3*h*d]."""
    T, B, _ = qkv.shape
    return qkv.view(T, B, 3, h, d).permute(2, 1, 3, 0, 4).unbind(0)


def _attention_grads(base, grad_out, h, d, saves, dtype, dropout_p=0.0, seed=None):
    """Output and the gradient of the fused qkv [T, B, 3, h*d] (q, k, v along dim 2)."""
    qkv = base.to(dtype).clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = causal_attention(*_qkv_views(qkv, h, d), dropout_p, saves)
    y.backward(grad_out.to(dtype))
    T, B, _ = base.shape
    return y.detach(), qkv.grad.view(T, B, 3, h * d)


def _check_grads(got, ref, label):
    errs = [_rel(got[:, :, i], ref[:, :, i]) for i in range(3)]
    print(f"{label}: relative error dq, dk, dv against the bf16 path: "
          + ", ".join(f"{e:.4f}" for e in errs))
    for name, err in zip("qkv", errs):
        assert GRAD_FLOOR < err <= GRAD_BOUND, (label, f"d{name}", err)


# --------------------------------------------------------------------------------------------------
# the operator, CPU
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_saves_same_output_and_close_gradients(d, dtype):
    T, B, h = 200, 2, 3                         # T not a multiple of 128, B*h > 1
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(T, B, 3 * h * d, generator=gen)
    grad_out = torch.randn(B, h, T, d, generator=gen)
    y_ref, g_ref = _attention_grads(base, grad_out, h, d, "bf16", dtype)
    y, g = _attention_grads(base, grad_out, h, d, "int8", dtype)
    assert torch.equal(y, y_ref)
    _check_grads(g, g_ref, f"CPU d={d} {dtype}")


@pytest.mark.parametrize("scale", sorted(LOGIT_SCALE_BOUNDS))
def test_int8_saves_gradients_with_larger_logits(scale):
    T, B, h, d = 256, 2, 3, 64
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(T, B, 3, h * d, generator=gen)
    base[:, :, :2] *= scale                     # q and k
    base = base.reshape(T, B, -1)
    grad_out = torch.randn(B, h, T, d, generator=gen)
    _, g_ref = _attention_grads(base, grad_out, h, d, "bf16", torch.float32)
    _, g = _attention_grads(base, grad_out, h, d, "int8", torch.float32)
    for i, name in enumerate("qkv"):
        err = _rel(g[:, :, i], g_ref[:, :, i])
        assert GRAD_FLOOR < err <= LOGIT_SCALE_BOUNDS[scale], (f"d{name}", err)


def test_int8_saves_with_separate_q_k_v():
    """q, k, v that are not views of one qkv buffer are quantized one by one: same bounds."""
    B, h, T, d = 2, 3, 130, 64
    gen = torch.Generator().manual_seed(1)
    ins = [torch.randn(B, h, T, d, generator=gen) for _ in range(3)]
    grad_out = torch.randn(B, h, T, d, generator=gen)
    outs, grads = {}, {}
    for saves in ("bf16", "int8"):
        leaves = [t.clone().requires_grad_(True) for t in ins]
        outs[saves] = causal_attention(*leaves, saves=saves)
        outs[saves].backward(grad_out)
        grads[saves] = torch.stack([t.grad for t in leaves], 2)     # [B, h, 3, T, d]
    assert torch.equal(outs["int8"], outs["bf16"])
    for i, name in enumerate("qkv"):
        err = _rel(grads["int8"][:, :, i], grads["bf16"][:, :, i])
        assert GRAD_FLOOR < err <= GRAD_BOUND, (f"d{name}", err)


def _saved_storages(fn):
    """(dtype, shape, bytes) of the distinct storages autograd saves while `fn` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.dtype, tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


def test_int8_saves_keep_no_dense_floating_point_copy():
    T, B, h, d = 96, 2, 3, 64
    qkv = torch.randn(T, B, 3 * h * d, dtype=torch.bfloat16, requires_grad=True)
    dense = B * h * T * d
    saved = {s: _saved_storages(lambda: causal_attention(*_qkv_views(qkv, h, d), saves=s))
             for s in ("bf16", "int8")}
    big_float = [(dt, shape) for dt, shape, _ in saved["int8"]
                 if dt.is_floating_point and math.prod(shape) >= dense]
    assert not big_float, big_float
    int8_bytes = sum(n for dt, _, n in saved["int8"] if dt == torch.int8)
    assert int8_bytes == 4 * dense                                   # q, k, v, output: 1 byte each
    total = {s: sum(n for _, _, n in saved[s]) for s in saved}
    assert total["int8"] < 0.6 * total["bf16"], total


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_an_input_reaches_the_output_and_the_gradients(where):
    T, B, h, d = 64, 1, 2, 64
    qkv = torch.randn(T, B, 3, h * d)
    qkv[10, 0, "qkv".index(where), 3] = float("nan")
    qkv = qkv.reshape(T, B, -1).requires_grad_(True)
    y = causal_attention(*_qkv_views(qkv, h, d), saves="int8")
    assert torch.isnan(y).any()
    y.backward(torch.ones_like(y))
    # the INT8 copies cannot hold the NaN; the saved logsumexp carries it into the backward
    assert torch.isnan(qkv.grad).any()
    with pytest.raises(NonFiniteError, match=f"causal_attention {where}"):
        causal_attention(*_qkv_views(qkv.detach().requires_grad_(True), h, d), saves="int8", check=True)


def test_fall_back_to_bf16_with_one_warning(monkeypatch):
    """The CPU flash op has no dropout: SDPA runs instead, with one warning naming the reason."""
    monkeypatch.setattr(attention_ops, "_warned", set())
    T, B, h, d = 32, 1, 2, 64
    qkv = torch.randn(T, B, 3 * h * d, requires_grad=True)
    with pytest.warns(UserWarning, match="no dropout"):
        torch.manual_seed(0)
        y = causal_attention(*_qkv_views(qkv, h, d), 0.1, saves="int8")
    torch.manual_seed(0)
    ref = F.scaled_dot_product_attention(*_qkv_views(qkv, h, d), dropout_p=0.1, is_causal=True)
    assert torch.equal(y, ref)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        causal_attention(*_qkv_views(qkv, h, d), 0.1, saves="int8")


def test_unknown_saves_value_is_refused():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="saves must be one of"):
        causal_attention(q, q, q, saves="fp8")


# --------------------------------------------------------------------------------------------------
# the model
@pytest.mark.parametrize("data_flow", ["bf16", "int8"])
def test_block_with_int8_attention_saves(data_flow):
    """Both data-flow paths of the block run their attention through attend(): same output, close
    gradients (the block's other operators are the same in both runs)."""
    C, H, T, B = 128, 2, 64, 3
    results = {}
    for saves in ("bf16", "int8"):
        cfg = GPTConfig(vocab_size=64, seq_len=T, n_layer=1, n_head=H, n_embd=C, recipe="int8",
                        data_flow=data_flow, attention_saves=saves)
        blk = _init_block(TransformerBlock(cfg), 0.05)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(T, B, C, generator=gen).requires_grad_(True)
        torch.manual_seed(2)                    # the stochastic rounding of the backward
        y = blk(x)
        y.backward(torch.randn(T, B, C, generator=gen))
        results[saves] = (y.detach(), x.grad, blk.attn.qkv.weight.grad)
    assert torch.equal(results["int8"][0], results["bf16"][0])
    for name, i in (("dx", 1), ("d qkv.weight", 2)):
        err = _rel(results["int8"][i], results["bf16"][i])
        assert 0 < err <= BLOCK_BOUND, (name, err)


def _init_block(blk: TransformerBlock, std: float) -> TransformerBlock:
    """GPT-2-like random weights, LayerNorm scales 1 ± 0.1 (as tests/test_block_dataflow.py)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_ln_scale = name.startswith("ln_") and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_ln_scale else std * noise)
    return blk


def _train_losses(saves: str, steps: int = 30) -> list[float]:
    cfg = GPTConfig(vocab_size=64, seq_len=48, n_layer=2, n_head=2, n_embd=128, recipe="bf16",
                    attention_saves=saves)
    model = GPT(cfg, init_seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    phrases = torch.randint(0, 64, (16, 12), generator=gen)   # periodic sequences: learnable
    losses = []
    for _ in range(steps):
        ids = phrases[torch.randint(0, 16, (8,), generator=gen)].repeat(1, 4)
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        loss = model(ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_gpt_trains_the_same_with_int8_attention_saves():
    ref, got = _train_losses("bf16"), _train_losses("int8")
    diffs = [abs(a - b) / b for a, b in zip(got, ref)]
    assert sum(ref[-3:]) < sum(ref[:3]) - 3.0, ref         # it learns
    assert 0 < max(diffs) <= 3e-3, diffs


def test_config_validates_attention_saves(demo_cache):
    from megaq.training.config import ConfigError, config_from_dict
    from megaq.training.engine import gpt_config
    with pytest.raises(ValueError, match="GPTConfig.attention_saves"):
        GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_embd=64, attention_saves="fp8")
    with pytest.raises(ConfigError, match="quant.attention_saves"):
        config_from_dict(tiny_config(demo_cache, quant={"attention_saves": "fp8"}))
    cfg = config_from_dict(tiny_config(demo_cache, quant={"attention_saves": "int8"}))
    assert gpt_config(cfg, 257).attention_saves == "int8"
    assert config_from_dict(tiny_config(demo_cache)).quant.attention_saves == "bf16"


# --------------------------------------------------------------------------------------------------
# GPU: the CUDA flash op, Triton quantizers, BF16
def _flash_reference():
    """The "bf16" path pinned to SDPA's flash backend: the kernel the "int8" path calls, so outputs
    (and, with dropout, the masks drawn from the same RNG state) are the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_int8_saves_against_bf16(d, dropout_p):
    T, B, h = 2048, 2, 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(T, B, 3 * h * d, device="cuda", generator=gen)
    grad_out = torch.randn(B, h, T, d, device="cuda", generator=gen)
    with _flash_reference():
        y_ref, g_ref = _attention_grads(base, grad_out, h, d, "bf16", torch.bfloat16, dropout_p, seed=7)
    y, g = _attention_grads(base, grad_out, h, d, "int8", torch.bfloat16, dropout_p, seed=7)
    # identical outputs: the same kernel and, with dropout, the same mask (replayed from the RNG state)
    assert torch.equal(y, y_ref)
    _check_grads(g, g_ref, f"GPU d={d} dropout={dropout_p}")


@gpu
def test_gpu_block_with_int8_attention_saves_at_gpt2_xl_width():
    """The INT8 data-flow block at width 1600 (25 heads of 64) with int8 attention saves: gradients
    against an FP32 BF16-recipe block no more than 1.5× (+0.005) the data flow's own error."""
    _block_against_fp32_reference(1600, 25, 512, 2, "cuda")


def _block_against_fp32_reference(C, H, T, B, device):
    gen = torch.Generator().manual_seed(1)
    x0, g0 = torch.randn(T, B, C, generator=gen), torch.randn(T, B, C, generator=gen)

    def run(recipe, data_flow, saves, dtype):
        cfg = GPTConfig(vocab_size=64, seq_len=T, n_layer=1, n_head=H, n_embd=C,
                        recipe={"preset": recipe, "check_finite": False}, data_flow=data_flow,
                        attention_saves=saves)
        blk = _init_block(TransformerBlock(cfg), 0.05).to(device=device, dtype=dtype)
        x = x0.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
        torch.manual_seed(2)
        blk(x).backward(g0.to(device=device, dtype=dtype))
        return {"dx": x.grad, **{n: p.grad for n, p in blk.named_parameters()}}

    ref = run("bf16", "bf16", "bf16", torch.float32)
    off = run("int8", "int8", "bf16", torch.bfloat16)
    on = run("int8", "int8", "int8", torch.bfloat16)
    for key in ref:
        e_on, e_off = _rel(on[key], ref[key]), _rel(off[key], ref[key])
        print(f"block {key}: relative error, int8 saves {e_on:.4f}, bf16 saves {e_off:.4f}")
        assert e_on <= 1.5 * e_off + 0.005, (key, e_on, e_off)


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)])
def test_split_heads_gives_autograds_views_and_gradient(used):
    """split_heads: the same q, k, v views as view-permute-unbind, and the same ∇qkv in one stacked
    pass, also when some of q, k, v get no gradient (zeros for them)."""
    from megaq.ops import split_heads

    T, B, h, d = 7, 3, 5, 8
    base = torch.randn(T, B, 3 * h * d, dtype=torch.float64)
    grads = [torch.randn(B, h, T, d, dtype=torch.float64) for _ in range(3)]
    results = []
    for split in (split_heads, lambda t, n: _qkv_views(t, n, d)):
        qkv = base.clone().requires_grad_(True)
        views = split(qkv, h)
        assert all(v.shape == (B, h, T, d) and v.data_ptr() >= qkv.data_ptr() for v in views)
        sum((views[i] * grads[i]).sum() for i in used).backward()
        results.append(([v.detach() for v in views], qkv.grad))
    (ours, our_grad), (ref, ref_grad) = results
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(ours, ref))
    assert torch.equal(our_grad, ref_grad) and our_grad.is_contiguous()
    with pytest.raises(ValueError, match="not 3 x 4 heads"):
        split_heads(torch.zeros(2, 2, 30), 4)
