"""Delayed scaling of the wgrad operands: megaq.quant.delayed (the reference) and
megaq.kernels.hadamard_quantize_delayed (the one-pass Triton quantizer) against it.

Run as in test_kernels_int8.py: the reference tests in the CPU process; the `interp`-named tests in a
TRITON_INTERPRET=1 subprocess on small awkward shapes (CI); the `gpu` tests on real shapes.

Bounds (NaN never passes: every comparison fails on NaN):
  * reference: a state's first call is bit for bit the exact per-row quantizer (`quantize_blockwise`
    of the rotated rows); later calls use scales pred / 127 exactly, clip at ±127, and leave
    pred = max(amax, decay · pred) and the count of rows whose abs-max passed the prediction.
  * kernel, nearest rounding: scales and payload within the fused-rotation bounds of test_kernels_int8
    (scales relative 1e-6; payload ±1 on <= 0.1% of elements, near-ties of differently ordered FP32
    sums), predictions relative 1e-6 per row, and the same overflow counts (the test inputs change
    each row's abs-max by a factor far from 1, so no count hinges on a rounding).
  * kernel, stochastic: every value one of the two integers around v = rotated / scale, clipped to ±127
    with v's sign, even 1000 times past the prediction (a wrapped int32 would flip it).
  * the NaN/Inf check raises NonFiniteError; without it a non-finite call leaves the rows' predictions.
  * column sums (the bias gradient): within (d + R - 1)·2^-24·Σ|x| of torch's FP32 sum per column,
    d = h + ceil(R / h) (the bound of test_kernels_int8).
"""

import os

import pytest
import torch

from interpreter_utils import run_interpreter_child
from tensor_utils import random_input

from megaq import kernels
from megaq.ops import RecipeError, get_recipe, quantized_linear
from megaq.ops.delayed_scaling import take_overflow_counts
from megaq.quant import (DelayedAmax, NonFiniteError, block_hadamard, pad_to_multiple, quantize_blockwise,
                         quantize_rows_delayed)

HAS_CUDA = torch.cuda.is_available()
IN_CHILD = os.environ.get("MEGAQ_DELAYED_INTERP_CHILD") == "1"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")
parent_only = pytest.mark.skipif(IN_CHILD, reason="parent-process test")


def _rotated(x: torch.Tensor, had: int, transpose: bool = True) -> torch.Tensor:
    v = x.t() if transpose else x
    return block_hadamard(pad_to_multiple(v.float().cpu(), had), had)


def _growing_sequence(shape, device, dtype, seed=0):
    """Inputs whose per-column abs-max changes by factors far from 1 between calls: all columns, then
    the even ones ×1.7 and the odd ones ×0.5, then everything ×0.4."""
    x = random_input(shape, "cpu", torch.float32, seed)
    factor = torch.where(torch.arange(shape[1]) % 2 == 0, 1.7, 0.5)
    return [t.to(device=device, dtype=dtype) for t in (x, x * factor, x * 0.4)]


# --------------------------------------------------------------------------------------------------
# the reference
@parent_only
def test_reference_first_call_is_the_exact_quantizer_and_seeds_the_prediction():
    x = random_input((300, 40), "cpu", seed=1)
    state = DelayedAmax(40, decay=0.9, device="cpu")
    v = _rotated(x, 32)
    q = quantize_rows_delayed(v, state)
    exact = quantize_blockwise(v, (1, -1))
    assert torch.equal(q.data, exact.data) and torch.equal(q.scale, exact.scale)
    assert torch.equal(state.pred, v.abs().amax(1)) and int(state.valid) == 1
    assert state.take_counts() == (0, 0)


@parent_only
def test_reference_later_calls_use_the_prediction_clip_and_update_it():
    xs = _growing_sequence((300, 40), "cpu", torch.float32)
    state = DelayedAmax(40, decay=0.9, device="cpu")
    quantize_rows_delayed(_rotated(xs[0], 32), state)
    pred = state.pred.clone()
    v = _rotated(xs[1], 32)
    q = quantize_rows_delayed(v, state)
    assert torch.equal(q.scale[:, 0], pred / 127)
    expect = torch.round(v / (pred / 127)[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q.data, expect)
    grew = v.abs().amax(1) > pred
    assert int(grew.sum()) == 20 and bool((q.data[grew].abs() == 127).any())   # the even rows clip
    assert torch.equal(state.pred, torch.maximum(v.abs().amax(1), 0.9 * pred))
    assert state.take_counts() == (20, 40) and state.take_counts() == (0, 0)
    quantize_rows_delayed(v, state)
    state.reset()
    assert int(state.valid) == 0 and int(state.pred.count_nonzero()) == 0
    assert state.take_counts() == (0, 0)


@parent_only
def test_reference_refuses_what_it_does_not_define():
    with pytest.raises(ValueError, match="decay"):
        DelayedAmax(4, decay=1.5, device="cpu")
    state = DelayedAmax(40, decay=0.9, device="cpu")
    with pytest.raises(ValueError, match="predicts 40 rows but the operand has 32"):
        quantize_rows_delayed(torch.ones(32, 64), state)
    with pytest.raises(ValueError, match="INT8"):
        quantize_rows_delayed(torch.ones(40, 64), state, bits=4)
    with pytest.raises(ValueError, match="predicts 40 rows"):
        kernels.hadamard_quantize_delayed(torch.ones(64, 32), 32, state, transpose=True)


@parent_only
def test_cpu_dispatch_is_the_reference(monkeypatch):
    monkeypatch.setenv("MEGAQ_KERNELS", "auto")
    xs = _growing_sequence((130, 24), "cpu", torch.float32, seed=2)
    state, ref = DelayedAmax(24, 0.95, "cpu"), DelayedAmax(24, 0.95, "cpu")
    for x in xs:
        q = kernels.hadamard_quantize_delayed(x, 16, state, transpose=True)
        r = quantize_rows_delayed(_rotated(x, 16), ref)
        assert torch.equal(q.data, r.data) and torch.equal(q.scale, r.scale)
    assert torch.equal(state.pred, ref.pred)


# --------------------------------------------------------------------------------------------------
# the quantized linear under the int8_delayed recipe (reference kernels on the CPU)
def _linear_grads(recipe, x, w, b, gy):
    x, b = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    w.grad = None
    y = quantized_linear(x, w, b, recipe)
    y.backward(gy)
    return y.detach(), x.grad, w.grad.clone(), b.grad


@parent_only
def test_linear_first_call_is_int8_and_later_calls_stay_within_its_bounds():
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 384, 1600
    tokens = 2048   # a micro batch's worth: per-feature abs-maxes over few tokens vary much more per call
    x = torch.randn(tokens, d_in, generator=gen)
    x[:, ::97] *= 10
    w = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).requires_grad_(True)
    b = torch.randn(d_out, generator=gen) * 0.1
    gy = torch.randn(tokens, d_out, generator=gen)
    take_overflow_counts()
    torch.manual_seed(1)
    plain = _linear_grads("int8", x, w, b, gy)
    torch.manual_seed(1)
    delayed = _linear_grads("int8_delayed", x, w, b, gy)
    for p, d in zip(plain, delayed):
        assert torch.equal(p, d)
    # later calls: new tokens, magnitudes drifting by a few percent per call, then a sudden ×1.5 (all
    # of ∇Y clips: larger error, bounded), after which the prediction has caught up. Measured (relative
    # error of ∇W against FP64): int8 0.0142-0.0145 per call; int8_delayed 0.0162-0.0172 while drifting,
    # 0.05-0.1 at the jump. At 300 tokens per call int8_delayed measured 0.023-0.026 (int8 0.012).
    errors = []
    for fx, fg in [(1.05, 0.95), (0.97, 1.04), (1.0, 1.0), (1.03, 0.97), (1.0, 1.5), (1.0, 1.5)]:
        xs = torch.randn(tokens, d_in, generator=gen) * fx
        xs[:, ::97] *= 10
        gys = torch.randn(tokens, d_out, generator=gen) * fg
        _, gx, gw, gb = _linear_grads("int8_delayed", xs, w, b, gys)
        errors.append(_rel(gw, gys.double().t() @ xs.double()))
        assert _rel(gx, gys.double() @ w.detach().double()) < 0.02     # dgrad: no delayed operand
        assert torch.allclose(gb.double(), gys.double().sum(0), rtol=1e-5, atol=1e-4)
    assert max(errors[:4]) < 0.02 and errors[5] < 0.02, errors    # test_ops_linear's int8 bound
    assert 0.02 < errors[4] < 0.2, errors
    states = getattr(w, "_megaq_delayed_amax")
    assert sorted(k[:2] for k in states) == [("wgrad.a", d_out), ("wgrad.b", d_in)]
    over, total = take_overflow_counts()
    assert total == 6 * (d_in + d_out) and d_out <= over < total
    with torch.no_grad():   # evaluation quantizes no wgrad operand: the predictions stay as they are
        before = [s.pred.clone() for s in states.values()]
        quantized_linear(x * 100, w, b, "int8_delayed")
        assert all(torch.equal(p, s.pred) for p, s in zip(before, states.values()))


@parent_only
def test_states_live_on_their_weight_and_an_alias_can_share_them():
    from megaq.ops.delayed_scaling import share_states, state_for

    w1, w2 = torch.zeros(8, 4), torch.zeros(8, 4)
    a1 = state_for(w1, "wgrad.a", 8, 0.95)
    assert state_for(w1, "wgrad.a", 8, 0.95) is a1 and state_for(w2, "wgrad.a", 8, 0.95) is not a1
    alias = w1.detach()   # as a CUDA graph's parameter alias: same storage, another tensor object
    share_states(w1, alias)
    assert state_for(alias, "wgrad.a", 8, 0.95) is a1
    b1 = state_for(alias, "wgrad.b", 4, 0.95)   # made through the alias: the parameter sees it too
    assert state_for(w1, "wgrad.b", 4, 0.95) is b1


@parent_only
def test_a_snapshot_puts_predictions_back_in_place_and_forgets_later_ones():
    """What a CUDA graph capture does around its warm-up: predictions that existed before come back
    (same buffers, so captured kernels keep their addresses), ones seeded during it are reset."""
    from megaq.ops.delayed_scaling import snapshot_states_of, state_for

    w = torch.zeros(8, 4)
    old = state_for(w, "wgrad.a", 8, 0.95)
    quantize_rows_delayed(torch.arange(1.0, 129.0).reshape(8, 16), old)
    before = old.pred.clone()
    buffer = old.pred
    restore = snapshot_states_of([w])
    quantize_rows_delayed(torch.full((8, 16), 1000.0), old)          # the warm-up's made-up values
    new = state_for(w, "wgrad.b", 8, 0.95)
    quantize_rows_delayed(torch.ones(8, 16), new)
    assert not torch.equal(old.pred, before) and int(new.valid) == 1
    assert restore() == 2
    assert old.pred is buffer and torch.equal(old.pred, before) and int(old.valid) == 1
    assert int(new.valid) == 0 and float(new.pred.abs().max()) == 0.0 and int(new.counts.sum()) == 0


@parent_only
def test_predictions_round_trip_through_a_state_dict_by_parameter_name():
    from megaq.ops.delayed_scaling import load_state_dict, state_dict

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32))

    def train_step(m, seed):
        for p in m.parameters():
            p.grad = None
        x = torch.randn(160, 64, generator=torch.Generator().manual_seed(seed))
        h = quantized_linear(x, m[0].weight, m[0].bias, "int8_delayed")
        quantized_linear(h, m[1].weight, m[1].bias, "int8_delayed").square().sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    a, b = model(), model()
    for seed in range(3):
        train_step(a, seed)
    saved = state_dict(a)
    assert sorted(saved) == ["0.weight:wgrad.a", "0.weight:wgrad.b", "1.weight:wgrad.a", "1.weight:wgrad.b"]
    assert load_state_dict(b, saved) == 4
    torch.manual_seed(5)
    grads_a = train_step(a, 9)
    torch.manual_seed(5)
    grads_b = train_step(b, 9)   # with a's predictions: the same scales, the same gradients
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b))
    with pytest.raises(ValueError, match="no parameter 'extra.weight'"):
        load_state_dict(b, {"extra.weight:wgrad.a": saved["0.weight:wgrad.a"]})


@parent_only
def test_recipe_validation_names_the_problem():
    with pytest.raises(RecipeError, match="forward.a.scale 'delayed' is not supported"):
        get_recipe({"preset": "int8", "forward": {"a": {"scale": "delayed"}}})
    with pytest.raises(RecipeError, match="block"):
        get_recipe({"preset": "int8", "wgrad": {"a": {"scale": "delayed", "block": [1, 128]}}})
    with pytest.raises(RecipeError, match="Hadamard"):
        get_recipe({"preset": "int8", "wgrad": {"hadamard": 0, "a": {"scale": "delayed"}}})
    with pytest.raises(RecipeError, match="delayed_decay"):
        get_recipe({"preset": "int8_delayed", "delayed_decay": 2.0})
    r = get_recipe("int8_delayed")
    assert r.wgrad.a.scale == r.wgrad.b.scale == "delayed" and r.forward == get_recipe("int8").forward


# --------------------------------------------------------------------------------------------------
# checks shared by the interpreter and the GPU tests
def _rel(a, ref):
    return float((a.double() - ref).norm() / ref.norm())


def _near_ties(q, r):
    assert q.block == r.block and q.shape == r.shape and q.data.dtype == torch.int8
    assert float(((q.scale.cpu() - r.scale).abs() / r.scale).max()) <= 1e-6
    diff = (q.data.cpu().int() - r.data.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3, int((diff > 0).sum())


def check_nearest_against_reference(shape, had, device, dtype=torch.float32, transpose=True):
    xs = _growing_sequence(shape, device, dtype, seed=shape[0])
    rows = shape[1] if transpose else shape[0]
    state, ref = DelayedAmax(rows, 0.9, device), DelayedAmax(rows, 0.9, "cpu")
    for x in xs:
        q = kernels.hadamard_quantize_delayed(x, had, state, transpose=transpose)
        r = quantize_rows_delayed(_rotated(x, had, transpose), ref)
        _near_ties(q, r)
        assert float(((state.pred.cpu() - ref.pred).abs() / ref.pred).max()) <= 1e-6
        assert int(state.track.count_nonzero()) == 0
    assert state.take_counts() == ref.take_counts()


def check_stochastic_clips_without_wrapping(shape, had, device, dtype=torch.float32):
    x = random_input(shape, "cpu", torch.float32, seed=3)
    state = DelayedAmax(shape[1], 0.9, device)
    kernels.hadamard_quantize_delayed(x.to(device, dtype), had, state, rounding="stochastic", transpose=True)
    for factor in (1.3, 1000.0):
        big = (x * factor).to(device, dtype)
        q = kernels.hadamard_quantize_delayed(big, had, state, rounding="stochastic", transpose=True)
        v = _rotated(big, had) / q.scale.cpu()
        data = q.data.cpu().float()
        inside = v.abs() <= 127
        lo = torch.floor(v[inside])
        assert bool(((data[inside] == lo) | (data[inside] == lo + 1)).all())
        assert torch.equal(data[~inside], 127 * torch.sign(v[~inside]))
        assert int((~inside).sum()) > 0


def check_nonfinite(shape, had, device):
    x = random_input(shape, "cpu", seed=4)
    state = DelayedAmax(shape[1], 0.9, device)
    kernels.hadamard_quantize_delayed(x.to(device), had, state, transpose=True, check=False)
    before = state.pred.clone()
    bad = x.clone()
    bad[5, 3] = float("nan")
    bad[7, 9] = float("inf")
    with pytest.raises(NonFiniteError):
        kernels.hadamard_quantize_delayed(bad.to(device), had, state, transpose=True)
    kernels.hadamard_quantize_delayed(bad.to(device), had, state, transpose=True, check=False)
    assert bool(torch.isfinite(state.pred).all())
    assert float(state.pred[9]) == float(before[9])   # the Inf column (the NaN one: max ignores NaN on GPUs)


def check_column_sums(shape, had, device, dtype=torch.bfloat16):
    x = random_input(shape, "cpu", torch.float32, seed=5).to(device, dtype)
    state = DelayedAmax(shape[1], 0.9, device)
    R = shape[0]
    d = had + -(-R // had)
    exact = x.double().cpu().sum(0)
    bound = (d + R - 1) * 2.0 ** -24 * x.double().abs().cpu().sum(0)
    for _ in range(2):   # the two-pass first call, then the one-pass kernel
        sums = torch.full((shape[1],), float("nan"), device=device)
        plain = DelayedAmax(shape[1], 0.9, device)
        plain.pred.copy_(state.pred)
        plain.valid.copy_(state.valid)
        q = kernels.hadamard_quantize_delayed(x, had, state, transpose=True, column_sums_out=sums)
        assert bool(((sums.double().cpu() - exact).abs() <= bound).all())
        r = kernels.hadamard_quantize_delayed(x, had, plain, transpose=True)
        assert torch.equal(q.data, r.data) and torch.equal(q.scale, r.scale)


def check_first_call_uses_one_scale_per_row(shape, had, device, dtype=torch.float32, per_strip=4):
    """A state's first call: pass 2 quantizes with the abs-maxes pass 1 left in `track`, and every program
    of a strip must use the one its scale is stored from. Pass 2 rotates xᵀ·H where pass 1 rotated H·x,
    so its own maxima may round larger; had it folded them into `track` during the call, a program of
    the same strip starting later would read them (scheduling-dependent scales on the GPU). Pass 1 is
    simulated as having found half of each abs-max, so that any raised value read shows as a factor 2."""
    from megaq.kernels import quantizers
    from megaq.kernels.dispatch import config_override

    x = random_input(shape, "cpu", torch.float32, seed=8).to(dtype)
    rotated = _rotated(x, had)
    half = (rotated.abs().amax(1) / 2).to(device)
    state = DelayedAmax(shape[1], 0.9, device)
    state.track.copy_(half)
    with config_override(QUANT_PER_STRIP=per_strip):
        launch = quantizers._TwoPassLaunch.plan(x.to(device), 0, "nearest", None, False, had)
        assert launch.grid[1] == per_strip <= launch.n_blocks   # several programs share each strip
        quantizers._delayed_quantize_pass(launch, 0, state, 8, "nearest", False, had, None)
    assert torch.equal(state.track, half)     # the first call's maxima are pass 1's, left as they were
    scale = launch.scale.cpu().reshape(-1, 1)
    assert float(((scale.reshape(-1) - half.cpu() / 127).abs() / (half.cpu() / 127)).max()) <= 1e-6
    diff = (launch.data.cpu().float() - (rotated / scale).clamp(-127, 127).round()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-2, int((diff > 0).sum())


# --------------------------------------------------------------------------------------------------
# CPU: the interpreter subprocess
@parent_only
def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    run_interpreter_child(__file__, "MEGAQ_DELAYED_INTERP_CHILD", timeout=900)


@interp_only
@pytest.mark.parametrize("shape,had", [((200, 72), 32), ((64, 40), 16)])
def test_interp_delayed_nearest(shape, had):
    check_nearest_against_reference(shape, had, "cpu")


@interp_only
def test_interp_delayed_rows_and_bf16():
    check_nearest_against_reference((40, 100), 32, "cpu", transpose=False)
    check_nearest_against_reference((96, 48), 32, "cpu", dtype=torch.bfloat16)


@interp_only
def test_interp_abs_max_pass_skips_itself_once_the_prediction_is_valid():
    """Pass 1 with SKIP reads the device flag: it fills the abs-maxes while the prediction is unseeded
    and touches nothing after (the one read of x that delayed scaling saves)."""
    from megaq.kernels import quantizers
    from megaq.kernels.dispatch import _interpreting, _kernel

    x = random_input((200, 72), "cpu", seed=6)
    launch = quantizers._TwoPassLaunch.plan(x, 0, "nearest", None, False, 32)
    for valid, filled in ((0, True), (1, False)):
        amax = torch.zeros(72, dtype=torch.int32)
        flag = torch.tensor([valid], dtype=torch.int32)
        _kernel("triton_quant", "_amax_partial_kernel")[launch.grid](
            x, launch.xs, 200, 72, x.stride(0), x.stride(1), amax, launch.h, launch.inv, launch.dummy, launch.dummy,
            launch.n_strips, launch.n_blocks, flag, BR=launch.BR, BC=launch.BC, AXIS=0, HAD=32,
            UPCAST=_interpreting(), CHECK=False, COLSUM=False, STAGES=launch.stages, SKIP=True,
            num_warps=launch.num_warps)
        expect = _rotated(x, 32).abs().amax(1)
        if filled:
            got = amax.view(torch.float32)
            assert float(((got - expect).abs() / expect).max()) <= 1e-6
        else:
            assert int(amax.count_nonzero()) == 0


@interp_only
def test_interp_first_call_quantizes_a_row_with_the_scale_it_stores():
    check_first_call_uses_one_scale_per_row((256, 72), 32, "cpu")


@interp_only
def test_interp_delayed_stochastic_clips():
    check_stochastic_clips_without_wrapping((160, 48), 32, "cpu")


@interp_only
def test_interp_delayed_nonfinite():
    check_nonfinite((70, 24), 16, "cpu")


@interp_only
def test_interp_delayed_column_sums(monkeypatch):
    from megaq.kernels import quantizers
    monkeypatch.setattr(quantizers, "_COLUMN_SUMS_MIN_COLS", {"single": 0, "dual": 0})
    check_column_sums((150, 40), 32, "cpu")


# --------------------------------------------------------------------------------------------------
# GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(16384, 384), (16384, 1600), (4100, 6400), (1000, 4096)])
def test_gpu_delayed_nearest(shape):
    check_nearest_against_reference(shape, 128, "cuda", dtype=torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_first_call_quantizes_a_row_with_the_scale_it_stores():
    check_first_call_uses_one_scale_per_row((16384, 1600), 128, "cuda", dtype=torch.bfloat16, per_strip=8)


@gpu
@needs_cuda
def test_gpu_delayed_stochastic_nonfinite_and_sums():
    check_stochastic_clips_without_wrapping((8192, 1600), 128, "cuda", dtype=torch.bfloat16)
    check_nonfinite((1000, 384), 128, "cuda")
    check_column_sums((8192, 4096), 128, "cuda")
