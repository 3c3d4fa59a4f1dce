"""Triton kernels of the BF16 residual add + LayerNorm (`megaq.ops.add_layernorm`): the add fused into the
normalization's read, and the residual stream's gradient into its backward's write. The launchers and
what the kernels must reproduce are in `megaq.kernels.layernorm`.

Rows are tokens, N the width (one row per tile, masked to N; N <= 16384). All math in FP32:
- `_add_layernorm_fwd_kernel`: s = x (+ r, rounded to s's dtype as the eager add rounds, and written
  out), mean and 1/std of s, y = (s - mean) / std * w (+ b) in y's dtype; mean and 1/std kept (FP32) for
  backward.
- `_add_layernorm_bwd_kernel`: per row ∇s = (w∇y - (ŝ c1 + c2)) / std (+ the residual stream's
  incoming ∇s), with ŝ = (s - mean) / std, c1 = mean(ŝ w∇y), c2 = mean(w∇y); each program walks a
  contiguous run of rows and sums ∇y ŝ and ∇y into its own FP32 row of the ∇w and ∇b partial
  buffers (the launcher adds the programs' rows up: no atomics, the result does not depend on timing).
"""

import triton
import triton.language as tl


@triton.jit
def _add_layernorm_fwd_kernel(x_ptr, r_ptr, s_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, N, eps,
                              HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * N + cols, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_layernorm_bwd_kernel(dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, ds_in_ptr, ds_ptr, dw_part_ptr,
                              db_part_ptr, M, N, rows_per_program,
                              HAS_DS_IN: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        live = mask & ((row + 0 * cols) < M)    # the last program's run may end early
        offset = row * N
        s = tl.load(s_ptr + offset + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offset + cols, mask=live, other=0.0).to(tl.float32)
        stat = tl.minimum(row, M - 1)   # a row past the end reads the last row's stats, masked out above
        mean = tl.load(mean_ptr + stat)
        rstd = tl.load(rstd_ptr + stat)
        s_hat = tl.where(live, (s - mean) * rstd, 0.0)
        w_dy = w * dy
        c1 = tl.sum(s_hat * w_dy, axis=0) / N
        c2 = tl.sum(w_dy, axis=0) / N
        ds = (w_dy - (s_hat * c1 + c2)) * rstd
        if HAS_DS_IN:
            ds += tl.load(ds_in_ptr + offset + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(ds_ptr + offset + cols, ds.to(ds_ptr.dtype.element_ty), mask=live)
        dw += dy * s_hat
        if HAS_BIAS:
            db += dy
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * N + cols, db, mask=mask)
