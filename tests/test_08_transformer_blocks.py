"""Lesson 08 (transformer blocks): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/08_transformer_blocks.py; IMPL=solutions grades the answers.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.checks import PoisonedAllocations, grads_float64, sum_tolerance, tolerance
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl, solution_with, with_flags
from common.lessons import lesson_module

STEM = "08_transformer_blocks"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


def _rows(hi_gpu: int = 300) -> int:
    return int(torch.randint(2, 12 if common.INTERPRETER else hi_gpu, ()).item())


# --------------------------------------------------------------------------- autograd under poisoned allocations

def _run_with_grads(fn, inputs, dy=None, scale=None):
    """fn(*inputs) and d/d(inputs) through autograd, all allocations poisoned and guarded; the
    reference is common.grads_float64 (a scale multiplies the output before the backward)."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    with PoisonedAllocations() as allocations:
        y = fn(*xs)
        if not isinstance(y, torch.Tensor) or y.grad_fn is None:
            raise CheckError("the function returned a tensor autograd cannot differentiate: return the "
                             "output of the autograd.Function's apply")
        grads = torch.autograd.grad(y if scale is None else y * scale, xs, dy)
    allocations.check_guards()
    return y.detach(), grads


# --------------------------------------------------------------------------- 8.1 RMSNorm

EPS = 1e-6


def _rmsnorm64(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def check_rmsnorm(rmsnorm):
    for dtype in DTYPES:
        for i, n_cols in enumerate(awkward_sizes(2, lo=300, hi=3000, include=(17,))):
            rows = _rows()
            shape = (rows, n_cols) if i % 2 == 0 else (2, rows, n_cols)  # (tokens, N) or (batch, seq, N)
            x = randn(*shape, dtype=dtype, scale=2.0) + 0.3
            w, dy = randn(n_cols, dtype=dtype), randn(*shape, dtype=dtype)
            name = f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"
            y_ref, (dx_ref, dw_ref) = grads_float64(_rmsnorm64, (x, w), dy)
            y, (dx, dw) = _run_with_grads(lambda x_, w_: rmsnorm(x_, w_, EPS), (x, w), dy)
            x64, w64, dy64 = x.double(), w.double(), dy.double()
            block = triton.next_power_of_2(n_cols)
            rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
            assert_close(y, y_ref, name=f"rmsnorm forward y {name}", mistakes={
                "the mean of x^2 was taken over all BLOCK_SIZE lanes: divide the sum by n_cols (the "
                "masked lanes hold zeros but are not columns)":
                    x64 * torch.rsqrt(x64.pow(2).sum(-1, keepdim=True) / block + EPS) * w64})
            assert_close(dx, dx_ref, name=f"rmsnorm backward dx {name}", mistakes={
                "dx = rstd * dy * w misses the term - xhat * mean(g * xhat): rstd depends on every x "
                "of the row, so every dx[j] gets a share of the whole row's gradient": rstd * dy64 * w64})
            assert_close(dw, dw_ref, name=f"rmsnorm backward dw {name}", **sum_tolerance(dtype, dy.numel() // n_cols),
                         mistakes={
                "dw is NaN, the poison of the dw_partial buffer: its rows were never written (each "
                "program stores its sum as row pid of dw_partial)": torch.full_like(dw_ref, math.nan)})


# --------------------------------------------------------------------------- 8.2 SwiGLU

def _swiglu64(a, b):
    return F.silu(a) * b


def check_swiglu(swiglu):
    for dtype in DTYPES:
        for i, n in enumerate(awkward_sizes(2, lo=1000, hi=100_000, include=(1,))):
            shape = (n,) if i % 2 == 0 else (3, n)
            a, b, dh = randn(*shape, dtype=dtype, scale=2.0), randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
            name = f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"
            h_ref, (da_ref, db_ref) = grads_float64(_swiglu64, (a, b), dh)
            h, (da, db) = _run_with_grads(swiglu, (a, b), dh)
            a64, b64, dh64 = a.double(), b.double(), dh.double()
            s = torch.sigmoid(a64)
            assert_close(h, h_ref, name=f"swiglu forward h {name}", mistakes={
                "h = sigmoid(a) * b: silu is a * sigmoid(a)": s * b64})
            assert_close(da, da_ref, name=f"swiglu backward da {name}", mistakes={
                "da = dh * b * sigmoid(a) misses the derivative of sigmoid: silu'(a) = s + a * s * (1 - s), "
                "s = sigmoid(a)": dh64 * b64 * s,
                "da and db are swapped": dh64 * a64 * s})
            assert_close(db, db_ref, name=f"swiglu backward db {name}", mistakes={
                "db = dh * sigmoid(a): the gate is silu(a) = a * sigmoid(a)": dh64 * s})


# --------------------------------------------------------------------------- 8.3 RoPE

def _rope_tables(seq_len: int, head_dim: int, base: float = 10000.0):
    """cos and sin, (S, D/2) fp32, for positions 0..S-1 and Llama's frequencies base^(-2j/D)."""
    inv_freq = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float64) * 2 / head_dim)
    theta = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return (theta.cos().float().to(common.DEVICE), theta.sin().float().to(common.DEVICE))


def _rope64(x, cos, sin):
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _rope64_interleaved(x, cos, sin):
    """GPT-J's layout: pairs (2j, 2j + 1). Not this exercise's layout."""
    xd = x.double()
    x1, x2 = xd[..., 0::2], xd[..., 1::2]
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)


def _rope_shapes():
    heads = int(torch.randint(1, 7, ()).item())
    half = int(torch.randint(3, 40, ()).item())
    return [(2, int(torch.randint(3, 12 if common.INTERPRETER else 200, ()).item()), heads, 2 * half),
            (1, 5, 8, 128), (3, 1, 1, 2)]


def check_rope(rope):
    for dtype in DTYPES:
        for shape in _rope_shapes():
            batch, seq_len, n_heads, head_dim = shape
            x = randn(*shape, dtype=dtype)
            cos, sin = _rope_tables(seq_len, head_dim)
            out = poisoned_empty(*shape, dtype=dtype)
            _same_output(rope(x, cos, sin, out=out), out, "rope")
            assert_close(out, _rope64(x, cos, sin), name=f"rope {shape} {str(dtype).removeprefix('torch.')}",
                         mistakes={
                             "every pair was rotated by -theta: out[j] = x[j] * cos - x[j + D/2] * sin and "
                             "out[j + D/2] = x[j + D/2] * cos + x[j] * sin": _rope64(x, cos, -sin),
                             "the pairs are (j, j + D/2) in this layout (rotate half, as GPT-NeoX and Llama), "
                             "not neighbours (2j, 2j + 1)": _rope64_interleaved(x, cos, sin)})
    x = randn(2, 7, 3, 20)
    cos, sin = _rope_tables(7, 20)
    y = rope(x, cos, sin)
    assert_close(y, _rope64(x, cos, sin), name="rope (out=None)")
    assert_close(rope(y, cos, -sin), x.double(), name="rope(rope(x, cos, sin), cos, -sin): the inverse "
                 "rotation, RoPE's backward pass, must give x back", atol=1e-5, rtol=1e-4)
    for bad, what in (((randn(1, 2, 3, 7),) + _rope_tables(2, 7), "an odd head dimension D = 7"),
                      ((randn(1, 2, 3, 8),) + _rope_tables(3, 8), "cos and sin for 3 positions, x with S = 2")):
        try:
            rope(*bad)
        except ValueError:
            continue
        raise CheckError(f"rope returned for {what} instead of raising ValueError: the wrapper must "
                         f"check that D is even and that cos / sin have shape (S, D/2)")


# --------------------------------------------------------------------------- 8.4 MSE loss

def _mse64(pred, target):
    return F.mse_loss(pred, target)


def check_mse_loss(mse_loss):
    for dtype in DTYPES:
        # fp16 gradients 2 d / n fall below fp16's normal range (6e-5) for n past ~1e5: keep n smaller
        for i, n in enumerate(awkward_sizes(2, lo=1000, hi=20_000, include=(1,))):
            shape = (n,) if i % 2 == 0 else (5, n)
            n_total = math.prod(shape)
            pred, target = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
            name = f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"
            loss_ref, (gp_ref, gt_ref) = grads_float64(_mse64, (pred, target))
            loss, (gp, gt) = _run_with_grads(mse_loss, (pred, target))
            d = pred.double() - target.double()
            assert_close(loss, loss_ref, name=f"mse loss {name}", dtype=torch.float32, mistakes={
                "the loss is the sum of the squares: the mean divides it by n_elements":
                    (d * d).sum(),
                "the loss is the mean of (pred - target), not of its square": d.mean(),
                "the loss is NaN, the poison of the partial-sum buffer: it was never written (each "
                "program stores its sum at partial_ptr + pid)": torch.tensor(math.nan)})
            # The gradient is 2 d / n: tiny for large n. Compare n times it, of the order of d.
            assert_close(gp * n_total, gp_ref * n_total, name=f"mse d loss / d pred (x n) {name}", mistakes={
                "the gradient misses the factor 2: d/dp (p - t)^2 = 2 (p - t)": d,
                "the gradient is not divided by n_elements: the loss is a mean": 2 * d * n_total})
            assert_close(gt * n_total, gt_ref * n_total, name=f"mse d loss / d target (x n) {name}")
    pred, target = randn(333), randn(333)
    _, (gp_ref, _) = grads_float64(lambda p, t: _mse64(p, t) * 3.0, (pred, target))
    _, (gp, _) = _run_with_grads(mse_loss, (pred, target), scale=3.0)
    assert_close(gp * 333, gp_ref * 333, name="mse gradient of 3 * loss (backward must scale by grad_output)")


# --------------------------------------------------------------------------- 8.5 fused linear cross-entropy

def _lce_inputs(dtype):
    """hidden (T, H), weight (V, H) with logits of std ~3, and targets: 25% ignored, one the last class."""
    n_tokens = int(torch.randint(20, 40 if common.INTERPRETER else 600, ()).item())
    hidden_size = int(torch.randint(8, 40 if common.INTERPRETER else 200, ()).item())
    vocab = awkward_sizes(1, lo=50, hi=1500 if common.INTERPRETER else 20_000)[0]
    hidden = randn(n_tokens, hidden_size, dtype=dtype)
    weight = randn(vocab, hidden_size, dtype=dtype, scale=3.0 / hidden_size ** 0.5)
    target = torch.randint(0, vocab, (n_tokens,), device=common.DEVICE)
    target[torch.rand(n_tokens, device=common.DEVICE) < 0.25] = -100
    target[0], target[1] = vocab - 1, -100
    return hidden, weight, target


def _lce64(target, scale=1.0, rows=slice(None)):
    """float64 reference: mean cross-entropy of h @ w.T over the valid targets (of `rows` only,
    still divided by every valid target: the gradient a loop that keeps one chunk would give)."""
    n_valid = max(int((target != -100).sum()), 1)
    return lambda h, w: F.cross_entropy(h[rows] @ w.t(), target[rows], reduction="sum") / n_valid * scale


def _lce_dw_tolerance(dtype, n_tokens, n_chunks, largest):
    # A sum over the tokens; in fp16 / bf16 dW also carries one rounding of its running sum per
    # chunk, and a running sum is as large as the largest |dW| even where the final value cancels.
    tol = sum_tolerance(dtype, n_tokens)
    if dtype in (torch.float16, torch.bfloat16):
        tol["atol"] += torch.finfo(dtype).eps * n_chunks ** 0.5 * largest
        tol["rtol"] *= n_chunks ** 0.5
    return tol


def check_linear_cross_entropy(linear_cross_entropy):
    for dtype in DTYPES:
        hidden, weight, target = _lce_inputs(dtype)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        n_valid = int((target != -100).sum())
        name = f"{n_tokens}x{hidden.shape[1]}x{vocab} {str(dtype).removeprefix('torch.')}"
        for chunk in (7, n_tokens + 3):  # ragged chunks (the last one shorter), one chunk
            n_chunks = triton.cdiv(n_tokens, chunk)
            last = slice((n_chunks - 1) * chunk, n_tokens)
            loss_ref, (dh_ref, dw_ref) = grads_float64(_lce64(target, 2.5), (hidden, weight))
            _, (_, dw_last) = grads_float64(_lce64(target, 2.5, last), (hidden, weight))
            loss, (dh, dw) = _run_with_grads(lambda h, w: linear_cross_entropy(h, w, target, chunk_size=chunk),
                                             (hidden, weight), scale=2.5)
            where = f"{name}, chunk_size={chunk}"
            assert_close(loss, loss_ref / 2.5, name=f"linear_cross_entropy loss {where}", **tolerance(dtype), dtype=torch.float32,
                         mistakes={"the loss is divided by all T tokens: the mean is over the n_valid targets "
                                   "that are not ignore_index": loss_ref / 2.5 * n_valid / n_tokens})
            # Gradients of a mean are of order 1 / n_valid: compared n_valid times larger.
            largest = float((dw_ref * n_valid).abs().max())
            assert_close(dh * n_valid, dh_ref * n_valid, name=f"linear_cross_entropy d hidden (x n_valid) {where}",
                         **sum_tolerance(dtype, vocab))
            assert_close(dw * n_valid, dw_ref * n_valid, name=f"linear_cross_entropy d weight (x n_valid) {where}",
                         **_lce_dw_tolerance(dtype, n_tokens, n_chunks, largest), mistakes={
                "dW holds the last chunk's z.T @ hidden alone: the first chunk writes dweight, every later "
                "chunk adds to it (dweight.addmm_(z.t(), h))": dw_last * n_valid,
                "dW is NaN, the poison of torch.empty: it was added to before anything was written (the first "
                "chunk must write it with torch.matmul(..., out=dweight), or zero it first)":
                    torch.full_like(dw_ref, math.nan)})


EXERCISES = [
    Exercise("8.1", "rmsnorm", check_rmsnorm, kernels=("rmsnorm_fwd_kernel", "rmsnorm_bwd_kernel")),
    Exercise("8.2", "swiglu", check_swiglu, kernels=("swiglu_fwd_kernel", "swiglu_bwd_kernel")),
    Exercise("8.3", "rope", check_rope, kernels=("rope_kernel",)),
    Exercise("8.4", "mse_loss", check_mse_loss, kernels=("mse_kernel",)),
    Exercise("8.5", "linear_cross_entropy", check_linear_cross_entropy),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

@triton.jit
def _rmsnorm_fwd_block_mean_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / BLOCK_SIZE + eps)  # wrong: the mean is over n_cols
    tl.store(y_ptr + row * n_cols + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_wrong_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                              rows_per_program, BLOCK_SIZE: tl.constexpr, PROJECTION: tl.constexpr = True,
                              STORE_DW: tl.constexpr = True):
    pid = tl.program_id(axis=0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        g = dy * w
        if PROJECTION:
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        else:
            dx = rstd * g  # wrong: rstd depends on the whole row
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    if STORE_DW:  # wrong when False: dw_partial is never written
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


@triton.jit
def _swiglu_fwd_wrong_kernel(a_ptr, b_ptr, h_ptr, n_elements, BLOCK_SIZE: tl.constexpr,
                             SILU: tl.constexpr = True, MASK_STORE: tl.constexpr = True):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        gate = a * tl.sigmoid(a)
    else:
        gate = tl.sigmoid(a)  # wrong: silu is a * sigmoid(a)
    if MASK_STORE:
        tl.store(h_ptr + offsets, (gate * b).to(h_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(h_ptr + offsets, (gate * b).to(h_ptr.dtype.element_ty))  # wrong: writes past the end


@triton.jit
def _swiglu_bwd_no_sigmoid_derivative_kernel(dh_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n_elements,
                                             BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(da_ptr + offsets, (dh * b * s).to(da_ptr.dtype.element_ty), mask=mask)  # wrong: silu' is not s
    tl.store(db_ptr + offsets, (dh * a * s).to(db_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_wrong_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, n_heads, half_dim, BLOCK_H: tl.constexpr,
                       BLOCK_D: tl.constexpr, SIGN: tl.constexpr = 1.0, INTERLEAVED: tl.constexpr = False):
    token = tl.program_id(axis=0).to(tl.int64)
    pos = token % seq_len
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half_dim)
    cos = tl.load(cos_ptr + pos * half_dim + dims, mask=dims < half_dim, other=0.0)
    sin = SIGN * tl.load(sin_ptr + pos * half_dim + dims, mask=dims < half_dim, other=0.0)  # wrong if SIGN < 0
    row = token * n_heads * 2 * half_dim + heads * 2 * half_dim
    if INTERLEAVED:  # wrong: GPT-J's pairs (2j, 2j + 1)
        first, second = row + 2 * dims, row + 2 * dims + 1
    else:
        first, second = row + dims, row + dims + half_dim
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + second, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + second, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _solutions():
    return load_impl(STEM, "solutions")


def _rope_without_validation(x, cos, sin, out=None):
    batch, seq_len, n_heads, head_dim = x.shape
    out = torch.empty_like(x) if out is None else out
    _solutions().rope_kernel[(batch * seq_len,)](
        x, cos, sin, out, seq_len, n_heads, head_dim // 2, BLOCK_H=triton.next_power_of_2(n_heads),
        BLOCK_D=triton.next_power_of_2(max(head_dim // 2, 1)))
    return out


@triton.jit
def _mse_wrong_kernel(pred_ptr, target_ptr, grad_ptr, partial_ptr, n_elements, BLOCK_SIZE: tl.constexpr,
                      FACTOR: tl.constexpr = 2.0, MEAN: tl.constexpr = True, STORE_PARTIAL: tl.constexpr = True):
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    d = (tl.load(pred_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
         - tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
    grad = FACTOR * d  # wrong when FACTOR is 1.0
    if MEAN:  # wrong when False: the loss is a mean, so is its gradient
        grad = grad / n_elements
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if STORE_PARTIAL:  # wrong when False: the partial sums are never written
        tl.store(partial_ptr + pid, tl.sum(d * d, axis=0))


def _lce_chunks_wrong(hidden, weight, target, ignore_index, chunk_size, *, ACCUMULATE=True, MEAN_OVER_VALID=True,
                      WRITE_FIRST=True):
    """The solution's chunk loop with one mistake switched on."""
    sol = _solutions()
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    n_valid = (target != ignore_index).sum(dtype=torch.float32)
    z_buffer = torch.empty(min(chunk_size, n_tokens), vocab, dtype=hidden.dtype, device=hidden.device)
    dhidden, dweight = torch.empty_like(hidden), torch.empty_like(weight)
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h, t, z = hidden[start:end], target[start:end], z_buffer[:end - start]
        torch.matmul(h, weight.t(), out=z)
        sol._ce_loss_rows(z, t, loss_rows[start:end], lse[start:end], ignore_index)
        sol._ce_grad_in_place(z, t, lse[start:end], ignore_index)
        torch.matmul(z, weight, out=dhidden[start:end])
        if (start == 0 and WRITE_FIRST) or not ACCUMULATE:  # wrong when not ACCUMULATE: every chunk overwrites
            torch.matmul(z.t(), h, out=dweight)
        else:
            dweight.addmm_(z.t(), h)  # wrong when not WRITE_FIRST: adds to torch.empty's garbage
    # wrong when not MEAN_OVER_VALID: ignored tokens counted in the mean
    return loss_rows.sum() / (n_valid if MEAN_OVER_VALID else n_tokens), dhidden, dweight, n_valid


def _lce_wrong(**flags):
    return solution_with(STEM, linear_cross_entropy_chunks=functools.partial(_lce_chunks_wrong, **flags))


KNOWN_WRONG = [
    ("rmsnorm", "mean over BLOCK_SIZE", lambda: solution_with(STEM, rmsnorm_fwd_kernel=_rmsnorm_fwd_block_mean_kernel).rmsnorm,
     "divide the sum by n_cols"),
    ("rmsnorm", "dx without the projection term",
     lambda: solution_with(STEM, rmsnorm_bwd_kernel=with_flags(_rmsnorm_bwd_wrong_kernel, PROJECTION=False)).rmsnorm, "xhat * mean(g * xhat)"),
    ("rmsnorm", "dw partial sums never stored",
     lambda: solution_with(STEM, rmsnorm_bwd_kernel=with_flags(_rmsnorm_bwd_wrong_kernel, STORE_DW=False)).rmsnorm, "never written"),
    ("swiglu", "sigmoid instead of silu",
     lambda: solution_with(STEM, swiglu_fwd_kernel=with_flags(_swiglu_fwd_wrong_kernel, SILU=False)).swiglu,
     "silu is a * sigmoid(a)"),
    ("swiglu", "tail store not masked",
     lambda: solution_with(STEM, swiglu_fwd_kernel=with_flags(_swiglu_fwd_wrong_kernel, MASK_STORE=False)).swiglu,
     "past the end"),
    ("swiglu", "da misses the sigmoid derivative",
     lambda: solution_with(STEM, swiglu_bwd_kernel=_swiglu_bwd_no_sigmoid_derivative_kernel).swiglu,
     "derivative of sigmoid"),
    ("rope", "rotation by -theta", lambda: solution_with(STEM, rope_kernel=with_flags(_rope_wrong_kernel, SIGN=-1.0)).rope,
     "rotated by -theta"),
    ("rope", "interleaved pairs", lambda: solution_with(STEM, rope_kernel=with_flags(_rope_wrong_kernel, INTERLEAVED=True)).rope,
     "not neighbours"),
    ("rope", "odd D accepted", lambda: _rope_without_validation, "D is even"),
    ("mse_loss", "gradient without the 2", lambda: solution_with(STEM, mse_kernel=with_flags(_mse_wrong_kernel, FACTOR=1.0)).mse_loss,
     "factor 2"),
    ("mse_loss", "gradient of the sum", lambda: solution_with(STEM, mse_kernel=with_flags(_mse_wrong_kernel, MEAN=False)).mse_loss,
     "not divided by n_elements"),
    ("mse_loss", "partial sums never stored",
     lambda: solution_with(STEM, mse_kernel=with_flags(_mse_wrong_kernel, STORE_PARTIAL=False)).mse_loss, "never written"),
    ("linear_cross_entropy", "dW of the last chunk only", lambda: _lce_wrong(ACCUMULATE=False).linear_cross_entropy,
     "last chunk"),
    ("linear_cross_entropy", "mean over all tokens", lambda: _lce_wrong(MEAN_OVER_VALID=False).linear_cross_entropy,
     "n_valid targets"),
    ("linear_cross_entropy", "dW added to torch.empty", lambda: _lce_wrong(WRITE_FIRST=False).linear_cross_entropy,
     "poison of torch.empty"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("08")


def _widths():
    return awkward_sizes(1, lo=300, hi=3000, include=(17,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_layernorm(lesson, dtype):
    for n_cols in _widths():
        rows = _rows()
        base = randn(rows, n_cols + 5, dtype=dtype, scale=2.0)
        x = base[:, :n_cols] + 1.0  # padded rows and a nonzero mean
        w, b, dy = randn(n_cols, dtype=dtype), randn(n_cols, dtype=dtype), randn(rows, n_cols, dtype=dtype)
        out = poisoned_empty(rows, n_cols, dtype=dtype)
        _same_output(lesson.layernorm_forward(x, w, b, out=out)[0], out, "layernorm_forward")
        ln = lambda x_, w_, b_: F.layer_norm(x_, (n_cols,), w_, b_, 1e-5)  # noqa: E731
        assert_close(out, ln(x.double(), w.double(), b.double()), name=f"layernorm forward {rows}x{n_cols}")
        y_ref, grads_ref = grads_float64(ln, (x, w, b), dy)
        y, grads = _run_with_grads(lesson.layernorm, (x, w, b), dy)
        assert_close(y, y_ref, name="layernorm (autograd) forward")
        for label, got, want in zip(("dx", "dw", "db"), grads, grads_ref):  # dw, db: sums over the rows
            tol = tolerance(dtype) if label == "dx" else sum_tolerance(dtype, rows)
            assert_close(got, want, name=f"layernorm backward {label} {rows}x{n_cols}", **tol)


def test_lesson_layernorm_3d_and_expanded_gradient(lesson):
    x, w, b = randn(2, 3, 33), randn(33), randn(33)
    ln = lambda x_, w_, b_: F.layer_norm(x_, (33,), w_, b_)  # noqa: E731
    _, grads_ref = grads_float64(lambda *t: ln(*t).sum(), (x, w, b))
    _, grads = _run_with_grads(lambda *t: lesson.layernorm(*t).sum(), (x, w, b))  # dy is expanded, stride 0
    for label, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        assert_close(got, want, name=f"layernorm(x 3-D).sum() backward {label}")


def test_lesson_layernorm_backward_groups_are_deterministic(lesson):
    rows, n_cols = 37, 129
    x, w, b, dy = randn(rows, n_cols), randn(n_cols), randn(n_cols), randn(rows, n_cols)
    _, mean, rstd = lesson.layernorm_forward(x, w, b)
    _, (dx_ref, dw_ref, db_ref) = grads_float64(lambda *t: F.layer_norm(t[0], (n_cols,), t[1], t[2]), (x, w, b), dy)
    for programs in (1, 5, rows):  # one program for every row, groups of 8 rows, one row each
        dx, dw, db = lesson.layernorm_backward(dy, x, w, mean, rstd, programs=programs)
        assert_close(dx, dx_ref, name=f"dx, {programs} programs")
        assert_close(dw, dw_ref, name=f"dw, {programs} programs")
        assert_close(db, db_ref, name=f"db, {programs} programs")
        again = lesson.layernorm_backward(dy, x, w, mean, rstd, programs=programs)
        assert torch.equal(dw, again[1]) and torch.equal(db, again[2]), "the partial-sum reduction must be deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_rmsnorm_forward(lesson, dtype):
    for n_cols in _widths():
        rows = _rows()
        x, w = randn(rows, n_cols, dtype=dtype, scale=2.0), randn(n_cols, dtype=dtype)
        out = poisoned_empty(rows, n_cols, dtype=dtype)
        _same_output(lesson.rmsnorm(x, w, out=out), out, "rmsnorm")
        assert_close(out, _rmsnorm64(x.double(), w.double()), name=f"rmsnorm {rows}x{n_cols}")
        assert_close(lesson.rmsnorm_reference(x.double(), w.double()), _rmsnorm64(x.double(), w.double()),
                     name="rmsnorm_reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_geglu(lesson, dtype):
    n = awkward_sizes(1, lo=1000, hi=50_000)[0]
    a, b, dh = randn(n, dtype=dtype, scale=2.0), randn(n, dtype=dtype), randn(n, dtype=dtype)
    out = poisoned_empty(n, dtype=dtype)
    _same_output(lesson.geglu_forward(a, b, out=out), out, "geglu_forward")
    geglu64 = lambda a_, b_: F.gelu(a_, approximate="tanh") * b_  # noqa: E731
    assert_close(out, geglu64(a.double(), b.double()), name=f"geglu n={n}")
    h_ref, grads_ref = grads_float64(geglu64, (a, b), dh)
    h, grads = _run_with_grads(lesson.geglu, (a, b), dh)
    assert_close(h, h_ref, name="geglu (autograd) forward")
    for label, got, want in zip(("da", "db"), grads, grads_ref):
        assert_close(got, want, name=f"geglu backward {label} n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["grad buffer", "in place"])
def test_lesson_cross_entropy(lesson, dtype, inplace):
    for n_cols in awkward_sizes(1, lo=300, hi=5000, include=(17,)):
        rows = _rows()
        logits = randn(rows, n_cols, dtype=dtype, scale=3.0)
        target = torch.randint(0, n_cols, (rows,), device=common.DEVICE)
        target[1] = -100  # ignored
        target[0] = n_cols - 1
        lesson.check_cross_entropy_once(logits, target, inplace, f"{rows}x{n_cols} {dtype}")


def test_lesson_cross_entropy_chunks_and_grad_output(lesson):
    logits = randn(6, 1000, scale=3.0)
    target = torch.randint(0, 1000, (6,), device=common.DEVICE)
    ce = lambda l_: F.cross_entropy(l_, target)  # noqa: E731
    loss_ref = ce(logits.double())
    _, (grad_ref,) = grads_float64(lambda z: ce(z) * 2.5, (logits,))  # the gradient of 2.5 * loss
    for block_size in (16, 128, 4096):  # 63 chunks per row, 8, one
        loss, lse, n_valid = lesson.cross_entropy_forward(logits, target, block_size=block_size)
        grad = lesson.cross_entropy_backward(logits, target, lse, n_valid, block_size=block_size)
        assert_close(loss, loss_ref, name=f"loss, BLOCK_SIZE={block_size}")
        assert_close(grad * 6, grad_ref / 2.5 * 6, name=f"grad, BLOCK_SIZE={block_size}")
    loss, (grad,) = _run_with_grads(lambda l_: lesson.cross_entropy(l_, target), (logits,), scale=2.5)
    assert_close(grad * 6, grad_ref * 6, name="grad of 2.5 * loss: the backward pass scales by grad_output",
                 atol=1e-5)


def test_lesson_cross_entropy_all_ignored_is_nan_like_pytorch(lesson):
    logits = randn(3, 50)
    target = torch.full((3,), -100, device=common.DEVICE)
    loss, lse, n_valid = lesson.cross_entropy_forward(logits, target)
    grad = lesson.cross_entropy_backward(logits, target, lse, n_valid)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, target))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("loss_scale", [2.0**10, 2.0**16], ids=["loss x 2^10", "loss x 2^16 (GradScaler's first)"])
def test_lesson_cross_entropy_fp16_gradient_survives_loss_scaling(lesson, loss_scale):
    # fp16 training scales the loss so that small gradients stay above fp16's smallest number.
    # grad_loss * (p - onehot) / n_valid must be rounded to fp16 once: rounding (p - onehot) /
    # n_valid first flushes most of a large vocabulary's gradient to 0 before grad_loss can help.
    rows, vocab = 4, 16384  # logits of std 4: most p / n_valid are below 2^-25, which fp16 rounds to 0
    logits = randn(rows, vocab, dtype=torch.float16, scale=4.0)
    target = torch.randint(0, vocab, (rows,), device=common.DEVICE)
    _, (grad_ref,) = grads_float64(lambda z: F.cross_entropy(z, target) * loss_scale, (logits,))
    work = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(lesson.cross_entropy(work, target) * loss_scale, work)
    zeros, zeros_ref = (grad == 0).double().mean().item(), (grad_ref.half() == 0).double().mean().item()
    assert zeros <= zeros_ref + 1e-3, (f"{zeros:.1%} of the fp16 gradient is 0, where float64 rounded to fp16 "
                                       f"has {zeros_ref:.1%}: scale by grad_loss / n_valid in fp32, cast once")
    # Within 2 of fp16's smallest steps (2^-24) or its half ulp: one rounding of the fp32 value.
    assert_close(grad, grad_ref, name=f"fp16 gradient of loss x {loss_scale:g}", atol=2 * 2**-24, rtol=2e-3)


def test_lesson_cross_entropy_backward_does_not_sync(lesson, monkeypatch):
    logits = randn(5, 300).requires_grad_()
    target = torch.randint(0, 300, (5,), device=common.DEVICE)
    loss = lesson.cross_entropy(logits, target) * 3.0  # grad_loss 3: the backward must scale by it

    def item(self):
        raise AssertionError("Tensor.item() in the cross-entropy backward: a host sync every training step")
    monkeypatch.setattr(torch.Tensor, "item", item)
    (grad,) = torch.autograd.grad(loss, logits)
    monkeypatch.undo()
    _, (grad_ref,) = grads_float64(lambda z: F.cross_entropy(z, target) * 3.0, (logits.detach(),))
    assert_close(grad, grad_ref, name="gradient of 3 x loss")


def test_lesson_cross_entropy_in_place_is_seen_by_autograd(lesson):
    z = randn(4, 200, scale=2.0).requires_grad_()
    target = torch.randint(0, 200, (4,), device=common.DEVICE)
    # tanh saves its output for its backward: overwriting it with the gradient behind autograd's
    # back would make dz silently wrong. Autograd must see the write and refuse.
    loss = lesson.cross_entropy(torch.tanh(z), target, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, z)
    # Where nothing else needs them, the logits are intact after the forward pass and hold the
    # gradient after the backward pass, as the docstring says.
    logits = z.detach().clone().requires_grad_()
    loss = lesson.cross_entropy(logits, target, inplace=True)
    assert torch.equal(logits.detach(), z.detach()), "the forward pass must leave the logits as they are"
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.data_ptr() == logits.data_ptr() and torch.equal(grad, logits.detach())
    _, (grad_ref,) = grads_float64(lambda l_: F.cross_entropy(l_, target), (z.detach(),))
    assert_close(grad, grad_ref, name="in-place gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_linear_cross_entropy(lesson, dtype):
    hidden, weight, target = _lce_inputs(dtype)
    n_tokens, hidden_size = hidden.shape
    name = f"{n_tokens}x{hidden_size}x{weight.shape[0]} {dtype}"
    for chunk in (None, 7, n_tokens + 5):  # the default (H / 4 here: several chunks), ragged chunks, one chunk
        lesson.check_linear_cross_entropy_once(hidden, weight, target, chunk, f"{name} chunk={chunk}",
                                               grad_scale=2.5 if chunk == 7 else 1.0)


def test_lesson_linear_cross_entropy_rejects_known_wrong(lesson, monkeypatch):
    # The check itself can fail: a dW that keeps only the last chunk, and a mean over all T tokens.
    hidden, weight, target = _lce_inputs(torch.float32)
    real = lesson.linear_cross_entropy_forward

    def last_chunk_only(hidden, weight, target, ignore_index=-100, chunk_size=None, **kw):
        loss, dh, dw, n_valid = real(hidden, weight, target, ignore_index, chunk_size, **kw)
        last = slice((triton.cdiv(hidden.shape[0], chunk_size) - 1) * chunk_size, None)
        _, _, dw_last, _ = real(hidden[last], weight, target[last], ignore_index, chunk_size, **kw)
        return loss, dh, dw_last, n_valid

    def mean_over_all(hidden, weight, target, ignore_index=-100, chunk_size=None, **kw):
        loss, dh, dw, n_valid = real(hidden, weight, target, ignore_index, chunk_size, **kw)
        return loss * n_valid / hidden.shape[0], dh, dw, n_valid
    for wrong, what in ((last_chunk_only, "d weight"), (mean_over_all, "loss")):
        monkeypatch.setattr(lesson, "linear_cross_entropy_forward", wrong)
        with pytest.raises(CheckError, match=what):
            lesson.check_linear_cross_entropy_once(hidden, weight, target, 7, "known wrong")
    monkeypatch.undo()


def test_lesson_linear_cross_entropy_3d_frozen_weight_and_no_grad(lesson):
    hidden, weight = randn(2, 9, 16), randn(50, 16, scale=0.5)
    target = torch.randint(0, 50, (2, 9), device=common.DEVICE)
    target[0, :3] = -100
    ref = lambda h: F.cross_entropy((h @ weight.double().t()).reshape(-1, 50), target.reshape(-1))  # noqa: E731
    loss_ref, (dh_ref,) = grads_float64(ref, (hidden,))
    # weight frozen (an adapter's training, say): only hidden gets a gradient, and none is computed for weight
    loss, (dh,) = _run_with_grads(lambda h: lesson.linear_cross_entropy(h, weight, target, chunk_size=4), (hidden,))
    assert_close(loss, loss_ref, name="linear_cross_entropy loss, 3-D hidden")
    assert_close(dh * 15, dh_ref * 15, name="linear_cross_entropy d hidden (x n_valid), 3-D hidden")
    with torch.no_grad():
        assert_close(lesson.linear_cross_entropy(hidden, weight, target, chunk_size=5), loss_ref,
                     name="linear_cross_entropy under no_grad (the loss alone)")
    _, dh, dw, _ = lesson.linear_cross_entropy_forward(hidden.reshape(-1, 16), weight, target.reshape(-1),
                                                        grad_hidden=False, grad_weight=False)
    assert dh is None and dw is None


def test_lesson_linear_cross_entropy_no_sync_and_one_backward(lesson, monkeypatch):
    hidden, weight = randn(11, 8).requires_grad_(), randn(30, 8).requires_grad_()
    target = torch.randint(0, 30, (11,), device=common.DEVICE)

    def item(self):
        raise AssertionError("Tensor.item() in linear_cross_entropy: a host sync every training step")
    monkeypatch.setattr(torch.Tensor, "item", item)
    loss = lesson.linear_cross_entropy(hidden, weight, target, chunk_size=4) * 3.0
    dh, dw = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    monkeypatch.undo()
    _, (dh_ref, dw_ref) = grads_float64(lambda h, w: F.cross_entropy(h @ w.t(), target) * 3.0, (hidden, weight))
    assert_close(dh, dh_ref, name="d hidden of 3 x loss")
    assert_close(dw, dw_ref, name="d weight of 3 x loss")
    # The backward pass scaled its saved gradients in place: a second one must raise, not scale them again.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, (hidden, weight))


def test_lesson_linear_cross_entropy_all_ignored_is_nan_like_pytorch(lesson):
    hidden, weight = randn(5, 8).requires_grad_(), randn(20, 8).requires_grad_()
    target = torch.full((5,), -100, device=common.DEVICE)
    loss = lesson.linear_cross_entropy(hidden, weight, target, chunk_size=2)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.t(), target))
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_lesson_linear_cross_entropy_chunk_size_default(lesson):
    assert lesson._lce_chunk_size(8192, 4096) == 1024  # H / 4 at Llama-3-8B's shape
    assert lesson._lce_chunk_size(37, 4096) == 37  # never more rows than tokens
    assert lesson._lce_chunk_size(100, 24) == 8  # a power of 2


def test_lesson_traffic_counts(lesson):
    x, w = torch.randn(64, 256, dtype=torch.bfloat16), torch.randn(256, dtype=torch.bfloat16)
    minimum = 2 * x.numel() * 2
    counted = common.count_torch_traffic(lesson.rmsnorm_reference, x, w)
    assert counted.kernels > 3 and counted.total > 4 * minimum, counted.summary()
    fused = common.count_torch_traffic(lambda: F.layer_norm(x, (256,), w, w))
    assert fused.kernels == 1, fused.summary()


def test_lesson_bad_input(lesson):
    x, w, b = randn(4, 32), randn(32), randn(32)
    with pytest.raises(ValueError, match="shape"):
        lesson.layernorm(x, randn(31), b)
    with pytest.raises(TypeError, match="dtype"):
        lesson.layernorm(x.to(torch.int32), w, b)
    with pytest.raises(ValueError, match="last dimension"):
        lesson.rmsnorm(randn(32, 4).t(), w)
    with pytest.raises(ValueError, match="at most"):
        lesson.rmsnorm(randn(2, lesson.MAX_FUSED_COLS + 1), randn(lesson.MAX_FUSED_COLS + 1))
    with pytest.raises(ValueError, match="at least one row"):
        lesson.rmsnorm(randn(0, 32), w)
    with pytest.raises(ValueError, match="shape"):
        lesson.geglu(randn(10), randn(11))
    logits = randn(4, 100)
    with pytest.raises(TypeError, match="dtype"):
        lesson.cross_entropy(logits, torch.zeros(4, dtype=torch.int32, device=common.DEVICE))
    with pytest.raises(ValueError, match="one class index per row"):
        lesson.cross_entropy(logits, torch.zeros(5, dtype=torch.int64, device=common.DEVICE))
    with pytest.raises(ValueError, match="2 dimension"):
        lesson.cross_entropy(randn(100), torch.zeros(1, dtype=torch.int64, device=common.DEVICE))
    with pytest.raises(ValueError, match="power of 2"):
        lesson.cross_entropy_forward(logits, torch.zeros(4, dtype=torch.int64, device=common.DEVICE), block_size=100)
    hidden, weight, target = randn(6, 8), randn(20, 8), torch.zeros(6, dtype=torch.int64, device=common.DEVICE)
    with pytest.raises(ValueError, match=r"shape \(V, 8\)"):
        lesson.linear_cross_entropy(hidden, randn(20, 9), target)
    with pytest.raises(ValueError, match="one class index per row"):
        lesson.linear_cross_entropy(hidden, weight, target[:5])
    with pytest.raises(TypeError, match="dtype"):
        lesson.linear_cross_entropy(hidden, weight.half(), target)
    with pytest.raises(ValueError, match="chunk_size"):
        lesson.linear_cross_entropy(hidden, weight, target, chunk_size=0)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.layernorm(torch.randn(4, 32), torch.randn(32, device="cuda"), torch.randn(32, device="cuda"))
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.cross_entropy(torch.randn(4, 32, device="cuda"), torch.zeros(4, dtype=torch.int64))
