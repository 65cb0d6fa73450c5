"""Lesson 05 (memory patterns): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/05_memory_patterns.py; IMPL=solutions grades the answers.
Sizes stay small: the interpreter takes milliseconds per program, and every known-wrong answer
below writes at most one tile past its output, inside the guard zone of common.poisoned_empty.
"""

import random

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.grading import Exercise, expect_rejected, grade_function, lesson_tests, load_impl
from common.lessons import lesson_module

# v3's block pointers are deprecated in Triton 3.8 (the lesson explains why it keeps them).
pytestmark = pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")

STEM = "05_memory_patterns"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
# The interpreter's cost is per operation per program (about a millisecond each), so its sizes
# span a few tiles at most. On a GPU, HI keeps one tile of overrun inside the guard zone.
HI = 150 if common.INTERPRETER else 1000
BM = BN = 32  # the exercises' tiles (the known-wrong kernels use the same)
BH, BW = 32, 64
BD = 64
# 5.4's tile, as in the exercise (tl.dot needs 16 or more along each side)
CBM, CBN, CBK = (32, 16, 16) if common.INTERPRETER else (64, 32, 32)


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


def _nan_like(t):
    return torch.full_like(t, float("nan"))


# --------------------------------------------------------------------------- the checks

def check_batched_transpose(batched_transpose):
    for dtype in DTYPES:
        for B in (3, 1):
            M, N = awkward_sizes(2, lo=33, hi=HI, include=())
            base = randn(B, M, N + 3, dtype=dtype)
            views = {"contiguous": randn(B, M, N, dtype=dtype), "column slice": base[:, :, 1:N + 1]}
            for view, x in views.items():
                out = poisoned_empty(B, N, M, dtype=dtype)
                _same_output(batched_transpose(x, out=out), out, "batched_transpose")
                xd = x.double()
                batch0_only = _nan_like(xd.transpose(1, 2))
                batch0_only[0] = xd[0].t()
                mistakes = {
                    "the tile was copied, not transposed: store tl.trans(tile) at out[b, n, m], "
                    "with offs_n along the rows of out and offs_m along its columns":
                        xd.contiguous().reshape(B, N, M),
                    "only batch 0 was written: add b * stride_xb to the x pointers and b * stride_ob "
                    "to the out pointers, with b = tl.program_id(1)": batch0_only,
                }
                if view == "column slice":
                    flat = base.double().flatten()[1:1 + B * M * N]
                    mistakes["the strides of x were ignored: x is a non-contiguous view, so x[b, m, n] "
                             "is at x_ptr + b * stride_xb + m * stride_xm + n * stride_xn"] = \
                        flat.view(B, M, N).transpose(1, 2)
                assert_close(out, xd.transpose(1, 2), name=f"batched_transpose {B}x{M}x{N} {view} {dtype}",
                             mistakes=mistakes)
    x = randn(2, 40, 70)
    assert_close(batched_transpose(x), x.double().transpose(1, 2), name="batched_transpose (out=None)")


def _conv_reference(x, weight):
    return F.conv2d(x.double()[None], weight.double()[:, None], padding=1, groups=x.shape[0])[0]


def _conv_wrapping_rows(x, weight):
    """What a kernel computes when it masks only the flat index, so columns wrap to the next row."""
    C, H, W = x.shape
    flat = F.pad(x.double().reshape(C, H * W), (W + 1, W + 1))
    out = torch.zeros(C, H * W, dtype=torch.float64, device=x.device)
    for di in range(3):
        for dj in range(3):
            start = W + 1 + (di - 1) * W + (dj - 1)
            out += weight.double()[:, di, dj, None] * flat[:, start:start + H * W]
    return out.reshape(C, H, W)


def check_conv3x3(conv3x3):
    for dtype in DTYPES:
        for C in (2,):
            H = awkward_sizes(1, lo=20, hi=50 if common.INTERPRETER else 400, include=())[0]
            W = awkward_sizes(1, lo=40, hi=100 if common.INTERPRETER else 400, include=())[0]
            x, weight = randn(C, H, W, dtype=dtype), randn(C, 3, 3, dtype=dtype)
            out = poisoned_empty(C, H, W, dtype=dtype)
            _same_output(conv3x3(x, weight, out=out), out, "conv3x3")
            assert_close(out, _conv_reference(x, weight), name=f"conv3x3 {C}x{H}x{W} {dtype}", mistakes={
                "the 3x3 weights are flipped: F.conv2d is a cross-correlation, out[c, i, j] sums "
                "weight[c, di, dj] * x[c, i + di - 1, j + dj - 1] (no flip)":
                    _conv_reference(x, weight.flip(-1, -2)),
                "neighbours left of column 0 and right of column W - 1 were read from the next or "
                "previous row: mask the column index (0 <= j + dj - 1 < W) as well as the row":
                    _conv_wrapping_rows(x, weight),
            })
    x, weight = randn(1, 30, 45), randn(1, 3, 3)
    assert_close(conv3x3(x, weight), _conv_reference(x, weight), name="conv3x3 (out=None)")


def _expect_error(fn, error, what):
    try:
        fn()
    except error:
        return
    except Exception as err:  # noqa: BLE001 (a learner's wrapper may fail in any way)
        raise CheckError(f"{what}: expected {error.__name__}, got {type(err).__name__}: {err}") from err
    raise CheckError(f"{what} returned instead of raising {error.__name__}")


def _table(V, D, dtype):
    """A (V, D) table that is a slice of a larger buffer: rows D + 5 apart, and one spare row on
    each side, so a wrapper that forgets to check the ids still reads inside memory."""
    big = randn(V + 2, D + 5, dtype=dtype)
    return big, big[1:V + 1, :D]


def _embedding_mistakes(big, table, ids):
    V, D = table.shape
    flat = big.double().flatten()[D + 5:D + 5 + V * D].view(V, D)
    return {"the table's row stride was ignored: row r starts at table_ptr + r * stride_table "
            "(the table may be a slice), not r * D": flat[ids]}


def check_embedding(embedding):
    big, table = _table(50, 70, torch.float32)
    ids = torch.randint(0, 50, (21,), device=common.DEVICE)
    for bad in (50, -1):
        bad_ids = ids.clone()
        bad_ids[7] = bad
        _expect_error(lambda: embedding(bad_ids, table), ValueError,
                      f"embedding with an id of {bad} for a table of 50 rows (ids must be in [0, V))")
    _expect_error(lambda: embedding(ids.float(), table), TypeError, "embedding with float ids")
    for dtype in DTYPES:
        for id_dtype, id_shape in ((torch.int64, lambda t: (t,)), (torch.int32, lambda t: (2, t // 2))):
            V = awkward_sizes(1, lo=33, hi=HI, include=())[0]
            D = awkward_sizes(1, lo=65, hi=200 if common.INTERPRETER else 1000, include=())[0]
            T = awkward_sizes(1, lo=20, hi=60 if common.INTERPRETER else 5000, include=())[0]
            big, table = _table(V, D, dtype)
            ids = torch.randint(0, V, id_shape(T), dtype=id_dtype, device=common.DEVICE)
            out = poisoned_empty(*ids.shape, D, dtype=dtype)
            _same_output(embedding(ids, table, out=out), out, "embedding")
            assert_close(out, table.double()[ids], name=f"embedding V={V} D={D} ids {tuple(ids.shape)} "
                         f"{str(id_dtype).removeprefix('torch.')} {dtype}",
                         mistakes=_embedding_mistakes(big, table, ids))
    # Last: a plain output has no guard zones, so a store past its end must be caught above first.
    big, table = _table(50, 70, torch.float32)
    ids = torch.randint(0, 50, (21,), device=common.DEVICE)
    assert_close(embedding(ids, table), table.double()[ids], name="embedding (out=None)",
                 mistakes=_embedding_mistakes(big, table, ids))


# 5.4: (R, S, stride, padding, N); C, K, H and W are drawn fresh for each. The "same" 3x3 comes
# first: it shows most mistakes (wrapped columns, r and s swapped, a tail, a store) at stride 1,
# so that a mistake of the stride or the padding is named at the second case. The sizes keep a
# store without a mask (rows of image N, channels past K) inside the guard zone of 65536 elements.
CONV_GEMM_CASES = (
    (3, 3, 1, 1, 2),  # padded on all four sides, two images
    (5, 3, 2, 2, 1),  # a filter taller than wide, every other pixel, padded by 2
    (1, 1, 2, 0, 2),  # 1x1: a GEMM over the channels alone (C > 16: more than one step of taps)
)


def _conv_at(x, weight, stride, top, P, Q):
    """out[n, k, p, q] = sum over c, a, b of weight[k, c, a, b] * x[n, c, p * stride - top + a,
    q * stride - top + b] with x 0 outside the image, for P x Q output pixels, in float64: the
    convolution, or a mistaken one (a filter read transposed, a stride or padding left out)."""
    (H, W), (A, B) = x.shape[-2:], weight.shape[-2:]
    bottom = max(0, (P - 1) * stride + A - top - H)
    right = max(0, (Q - 1) * stride + B - top - W)
    padded = F.pad(x.double(), (top, right, top, bottom))
    return F.conv2d(padded, weight.double(), stride=stride)[..., :P, :Q]


def _conv_wrapping_columns(x, weight, stride, padding, P, Q):
    """What a kernel computes when it masks the flat index h * W + w (inside the H * W pixels of
    a channel) instead of h and w: a column left of 0 or right of W - 1 is read from the
    neighbouring row."""
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    flat_x = x.double().reshape(N, C, H * W)
    p = torch.arange(P, device=x.device)[:, None]
    q = torch.arange(Q, device=x.device)[None, :]
    out = torch.zeros(N, K, P, Q, dtype=torch.float64, device=x.device)
    for r in range(R):
        for s in range(S):
            flat = (p * stride - padding + r) * W + q * stride - padding + s
            inside = (flat >= 0) & (flat < H * W)
            pixels = flat_x[:, :, flat.clamp(0, H * W - 1)] * inside
            out += torch.einsum("kc,ncpq->nkpq", weight.double()[:, :, r, s], pixels)
    return out


def _tf32(t):
    """t rounded as the tensor cores read fp32 for tf32: the low 13 of 23 mantissa bits cut."""
    return (t.contiguous().view(torch.int32) & -(1 << 13)).view(torch.float32)


def _conv_gemm_mistakes(x, weight, stride, padding, expected):
    (N, C, H, W), (K, _, R, S) = x.shape, weight.shape
    P, Q = expected.shape[-2:]
    taps = C * R * S
    mistakes = {
        "input columns left of 0 or right of W - 1 were read from the neighbouring row: mask h and w "
        "separately (0 <= h < H and 0 <= w < W), not the flat index h * W + w":
            _conv_wrapping_columns(x, weight, stride, padding, P, Q),
        "the stride was ignored: output pixel (p, q) reads from input row p * stride - padding + r "
        "and column q * stride - padding + s": _conv_at(x, weight, 1, padding, P, Q),
        "the padding was not subtracted: output pixel (p, q) reads from input row p * stride - padding + r "
        "(negative rows and columns are the zero padding, masked)": _conv_at(x, weight, stride, 0, P, Q),
        "r and s are swapped: tap t = (c * R + r) * S + s, so s = t % S (the fastest), "
        "r = (t // S) % R and c = t // (R * S)": _conv_at(x, weight.transpose(2, 3), stride, padding, P, Q),
        "the weights were read as a (C * R * S, K) matrix: B[t, k] = weight[k, t] is at "
        "w_ptr + k * (C * R * S) + t": F.conv2d(x.double(), weight.double().reshape(taps, K).t().reshape(
            K, C, R, S), stride=stride, padding=padding),
        "out was written as (N, P, Q, K), pixel-major: out[n, k, p, q] is at "
        "out_ptr + (n * K + k) * P * Q + p * Q + q": expected.permute(0, 2, 3, 1).reshape(N, K, P, Q),
    }
    # Only a hint, not yet seen on a GPU: where the tensor cores round to tf32 rather than cut, this
    # one may not match, and the generic "precision loss" hint shows instead.
    if x.dtype == torch.float32 and not common.INTERPRETER:
        mistakes["tl.dot ran the fp32 products as tf32 (10 mantissa bits), its default on a GPU: pass "
                 "input_precision=INPUT_PRECISION (the wrapper's \"ieee\")"] = F.conv2d(
            _tf32(x).double(), _tf32(weight).double(), stride=stride, padding=padding)
    return mistakes


def check_conv2d_gemm(conv2d_gemm):
    for dtype in DTYPES:
        for R, S, stride, padding, N in CONV_GEMM_CASES:
            C = awkward_sizes(1, lo=17, hi=40, include=())[0] if R * S == 1 else int(torch.randint(2, 8, ()))
            K = awkward_sizes(1, lo=17, hi=40, include=())[0]
            H, W = awkward_sizes(2, lo=10, hi=30, include=())
            # weights of 1 / sqrt(C * R * S): outputs of about 1, where fp16's tolerance is meant for
            x, weight = randn(N, C, H, W, dtype=dtype), randn(K, C, R, S, dtype=dtype, scale=(C * R * S) ** -0.5)
            expected = F.conv2d(x.double(), weight.double(), stride=stride, padding=padding)
            out = poisoned_empty(*expected.shape, dtype=dtype)
            _same_output(conv2d_gemm(x, weight, stride=stride, padding=padding, out=out), out, "conv2d_gemm")
            assert_close(out, expected, name=f"conv2d_gemm x {(N, C, H, W)} * weight {(K, C, R, S)}, stride "
                         f"{stride}, padding {padding}, {dtype}",
                         mistakes=_conv_gemm_mistakes(x, weight, stride, padding, expected))
    # Last: a plain output has no guard zones, so a store past its end must be caught above first.
    x, weight = randn(2, 3, 11, 13), randn(20, 3, 3, 3, scale=0.2)
    expected = F.conv2d(x.double(), weight.double(), padding=1)
    assert_close(conv2d_gemm(x, weight, padding=1), expected, name="conv2d_gemm (out=None)",
                 mistakes=_conv_gemm_mistakes(x, weight, 1, 1, expected))


EXERCISES = [
    Exercise("5.1", "batched_transpose", check_batched_transpose, kernels=("batched_transpose_kernel",)),
    Exercise("5.2", "conv3x3", check_conv3x3, kernels=("conv3x3_kernel",)),
    Exercise("5.3", "embedding", check_embedding, kernels=("embedding_kernel",)),
    Exercise("5.4", "conv2d_gemm", check_conv2d_gemm, kernels=("conv2d_gemm_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

# 5.1: each wrong kernel has the solution's signature and differs in one place.

@triton.jit
def _bt_copied_kernel(x_ptr, out_ptr, M, N, sxb, sxm, sxn, sob, son, som,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(1)
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tile = tl.load(x_ptr + b * sxb + offs_m[:, None] * sxm + offs_n[None, :] * sxn, mask=mask)
    tl.store(out_ptr + b * sob + offs_m[:, None] * N + offs_n[None, :], tile, mask=mask)  # wrong: a copy


@triton.jit
def _bt_contiguous_kernel(x_ptr, out_ptr, M, N, sxb, sxm, sxn, sob, son, som,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(1)
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrong: assumes x is contiguous (strides M * N, N, 1)
    tile = tl.load(x_ptr + b * M * N + offs_m[:, None] * N + offs_n[None, :],
                   mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    tl.store(out_ptr + b * sob + offs_n[:, None] * son + offs_m[None, :] * som, tl.trans(tile),
             mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


@triton.jit
def _bt_unmasked_store_kernel(x_ptr, out_ptr, M, N, sxb, sxm, sxn, sob, son, som,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(1)
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.load(x_ptr + b * sxb + offs_m[:, None] * sxm + offs_n[None, :] * sxn,
                   mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    tl.store(out_ptr + b * sob + offs_n[:, None] * son + offs_m[None, :] * som, tl.trans(tile))  # wrong: no mask


@triton.jit
def _bt_batch0_kernel(x_ptr, out_ptr, M, N, sxb, sxm, sxn, sob, son, som,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)  # wrong: program_id(1), the batch, is never used
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.load(x_ptr + offs_m[:, None] * sxm + offs_n[None, :] * sxn,
                   mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    tl.store(out_ptr + offs_n[:, None] * son + offs_m[None, :] * som, tl.trans(tile),
             mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


def _batched_transpose_with(kernel):
    def batched_transpose(x, out=None):
        B, M, N = x.shape
        out = torch.empty((B, N, M), dtype=x.dtype, device=x.device) if out is None else out
        kernel[(triton.cdiv(M, BM) * triton.cdiv(N, BN), B)](x, out, M, N, *x.stride(), *out.stride(),
                                                             BLOCK_M=BM, BLOCK_N=BN)
        return out
    return batched_transpose


# 5.2

@triton.jit
def _conv_flipped_kernel(x_ptr, w_ptr, out_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    c = tl.program_id(1)
    n_tiles_w = tl.cdiv(W, BLOCK_W)
    offs_h = ((tl.program_id(0) // n_tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    offs_w = ((tl.program_id(0) % n_tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for di in tl.static_range(3):
        for dj in tl.static_range(3):
            h = offs_h + (di - 1)
            w = offs_w + (dj - 1)
            tap = tl.load(w_ptr + c * 9 + (2 - di) * 3 + (2 - dj)).to(tl.float32)  # wrong: flipped
            acc += tap * tl.load(x_ptr + c * H * W + h * W + w, mask=(h >= 0) & (h < H) & (w >= 0) & (w < W),
                                 other=0.0).to(tl.float32)
    tl.store(out_ptr + c * H * W + offs_h * W + offs_w, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_h < H) & (offs_w < W))


@triton.jit
def _conv_wrapping_kernel(x_ptr, w_ptr, out_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    c = tl.program_id(1)
    n_tiles_w = tl.cdiv(W, BLOCK_W)
    offs_h = ((tl.program_id(0) // n_tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    offs_w = ((tl.program_id(0) % n_tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    inside = (offs_h < H) & (offs_w < W)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for di in tl.static_range(3):
        for dj in tl.static_range(3):
            flat = (offs_h + (di - 1)) * W + offs_w + (dj - 1)
            tap = tl.load(w_ptr + c * 9 + di * 3 + dj).to(tl.float32)
            # wrong: only the flat index is kept inside the channel, so columns wrap across rows
            acc += tap * tl.load(x_ptr + c * H * W + flat, mask=inside & (flat >= 0) & (flat < H * W),
                                 other=0.0).to(tl.float32)
    tl.store(out_ptr + c * H * W + offs_h * W + offs_w, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _conv_unmasked_store_kernel(x_ptr, w_ptr, out_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    c = tl.program_id(1)
    n_tiles_w = tl.cdiv(W, BLOCK_W)
    offs_h = ((tl.program_id(0) // n_tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    offs_w = ((tl.program_id(0) % n_tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for di in tl.static_range(3):
        for dj in tl.static_range(3):
            h = offs_h + (di - 1)
            w = offs_w + (dj - 1)
            tap = tl.load(w_ptr + c * 9 + di * 3 + dj).to(tl.float32)
            acc += tap * tl.load(x_ptr + c * H * W + h * W + w, mask=(h >= 0) & (h < H) & (w >= 0) & (w < W),
                                 other=0.0).to(tl.float32)
    tl.store(out_ptr + c * H * W + offs_h * W + offs_w, acc.to(out_ptr.dtype.element_ty))  # wrong: no mask


def _conv3x3_with(kernel):
    def conv3x3(x, weight, out=None):
        C, H, W = x.shape
        out = torch.empty_like(x) if out is None else out
        kernel[(triton.cdiv(H, BH) * triton.cdiv(W, BW), C)](x, weight, out, H, W, BLOCK_H=BH, BLOCK_W=BW)
        return out
    return conv3x3


# 5.3

@triton.jit
def _emb_row_stride_ignored_kernel(ids_ptr, table_ptr, out_ptr, D, stride_table, BLOCK_D: tl.constexpr):
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.load(ids_ptr + tl.program_id(0)).to(tl.int64)
    values = tl.load(table_ptr + row * D + offs_d, mask=offs_d < D)  # wrong: rows are stride_table apart
    tl.store(out_ptr + tl.program_id(0) * D + offs_d, values, mask=offs_d < D)


@triton.jit
def _emb_unmasked_store_kernel(ids_ptr, table_ptr, out_ptr, D, stride_table, BLOCK_D: tl.constexpr):
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.load(ids_ptr + tl.program_id(0)).to(tl.int64)
    values = tl.load(table_ptr + row * stride_table + offs_d, mask=offs_d < D, other=0.0)
    tl.store(out_ptr + tl.program_id(0) * D + offs_d, values)  # wrong: no mask on the last block


def _embedding_with(kernel, grid_d=lambda D: triton.cdiv(D, BD), validate=True):
    def embedding(ids, table, out=None):
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("ids must be int32 or int64")
        V, D = table.shape
        flat = ids.reshape(-1).contiguous()
        if validate and (int(flat.min()) < 0 or int(flat.max()) >= V):
            raise ValueError("id out of range")
        out = torch.empty((*ids.shape, D), dtype=table.dtype, device=table.device) if out is None else out
        kernel[(flat.numel(), grid_d(D))](flat, table, out, D, table.stride(0), BLOCK_D=BD)
        return out
    return embedding


# 5.4: one kernel, the mistake picked by a constexpr (MISTAKE="none" is a correct answer, tested
# below, so each rejection is the mistake's doing).

@triton.jit
def _conv_gemm_wrong_kernel(x_ptr, w_ptr, out_ptr, N, C, H, W, K, P, Q, stride, padding,
                            R: tl.constexpr, S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, MISTAKE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = (offs_m // (P * Q)).to(tl.int64)
    p, q = (offs_m % (P * Q)) // Q, offs_m % Q
    if MISTAKE == "stride":
        h0, w0 = p - padding, q - padding  # wrong: as if the stride were 1
    elif MISTAKE == "padding":
        h0, w0 = p * stride, q * stride  # wrong: the padding is not subtracted
    else:
        h0, w0 = p * stride - padding, q * stride - padding
    taps = C * R * S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, taps, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        if MISTAKE == "swap":
            r, s = kk % S, (kk // S) % R  # wrong: r and s swapped
        else:
            r, s = (kk // S) % R, kk % S
        c = kk // (R * S)
        h = h0[:, None] + r[None, :]
        w = w0[:, None] + s[None, :]
        if MISTAKE == "tail":
            in_taps = kk >= 0  # wrong: the last step's taps past C * R * S are loaded too
        else:
            in_taps = kk < taps
        if MISTAKE == "wrap":  # wrong: only the flat index is kept inside the image, so columns wrap
            inside = (h * W + w >= 0) & (h * W + w < H * W)
        else:
            inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        a = tl.load(x_ptr + ((n[:, None] * C + c[None, :]) * H + h) * W + w,
                    mask=(offs_m[:, None] < N * P * Q) & in_taps[None, :] & inside, other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * taps + kk[:, None], mask=in_taps[:, None] & (offs_n[None, :] < K),
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    out_ptrs = out_ptr + (n[:, None] * K + offs_n[None, :]) * (P * Q) + (offs_m % (P * Q))[:, None]
    if MISTAKE == "store":
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))  # wrong: rows past N * P * Q, channels past K
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < N * P * Q) & (offs_n[None, :] < K))


def _conv2d_gemm_with(mistake):
    def conv2d_gemm(x, weight, stride=1, padding=0, out=None):
        (N, C, H, W), (K, _, R, S) = x.shape, weight.shape
        P, Q = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - S) // stride + 1
        out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device) if out is None else out
        _conv_gemm_wrong_kernel[(triton.cdiv(N * P * Q, CBM), triton.cdiv(K, CBN))](
            x, weight, out, N, C, H, W, K, P, Q, stride, padding, R=R, S=S, BLOCK_M=CBM, BLOCK_N=CBN, BLOCK_K=CBK,
            MISTAKE=mistake)
        return out
    return conv2d_gemm


def _solution(name):
    return getattr(load_impl(STEM, "solutions"), name)


KNOWN_WRONG = [
    ("batched_transpose", "tile copied, not transposed", lambda: _batched_transpose_with(_bt_copied_kernel),
     "copied, not transposed"),
    ("batched_transpose", "strides of x ignored", lambda: _batched_transpose_with(_bt_contiguous_kernel),
     "strides of x were ignored"),
    ("batched_transpose", "store not masked", lambda: _batched_transpose_with(_bt_unmasked_store_kernel),
     "past the end"),
    ("batched_transpose", "batch index unused", lambda: _batched_transpose_with(_bt_batch0_kernel),
     "only batch 0"),
    ("conv3x3", "weights flipped", lambda: _conv3x3_with(_conv_flipped_kernel), "flipped"),
    ("conv3x3", "columns wrap across rows", lambda: _conv3x3_with(_conv_wrapping_kernel),
     "mask the column index"),
    ("conv3x3", "store not masked", lambda: _conv3x3_with(_conv_unmasked_store_kernel), "past the end"),
    ("embedding", "row stride ignored", lambda: _embedding_with(_emb_row_stride_ignored_kernel),
     "row stride was ignored"),
    ("embedding", "store not masked", lambda: _embedding_with(_emb_unmasked_store_kernel), "past the end"),
    ("embedding", "one block per token", lambda: _embedding_with(_solution("embedding_kernel"), grid_d=lambda D: 1),
     "never written"),
    ("embedding", "ids not validated", lambda: _embedding_with(_solution("embedding_kernel"), validate=False),
     "instead of raising ValueError"),
    ("conv2d_gemm", "columns wrap across rows", lambda: _conv2d_gemm_with("wrap"), "mask h and w separately"),
    ("conv2d_gemm", "stride ignored", lambda: _conv2d_gemm_with("stride"), "stride was ignored"),
    ("conv2d_gemm", "padding not subtracted", lambda: _conv2d_gemm_with("padding"), "padding was not subtracted"),
    ("conv2d_gemm", "r and s swapped", lambda: _conv2d_gemm_with("swap"), "r and s are swapped"),
    ("conv2d_gemm", "store not masked", lambda: _conv2d_gemm_with("store"), "past the end"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


@pytest.mark.skipif(not common.INTERPRETER, reason="only the interpreter checks the address of each load: on a "
                    "GPU the taps past the end read what lies beyond x and weight, or fault")
def test_grader_rejects_conv2d_gemm_with_an_unmasked_reduction_tail():
    """The last step's taps past C * R * S read the next image and the next channel's weights,
    and past the end of x and weight for the last of each."""
    expect_rejected(BY_NAME["conv2d_gemm"], _conv2d_gemm_with("tail"), "read outside every tensor")


def test_conv2d_gemm_wrong_kernel_is_right_without_its_mistake():
    result = grade_function(BY_NAME["conv2d_gemm"], _conv2d_gemm_with("none"))
    assert result.status == "passed", result.detail


def test_conv2d_gemm_bad_inputs_name_the_problem():
    """The wrapper is given in the exercise: the solution's copy of it is tested here."""
    conv2d_gemm = _solution("conv2d_gemm")
    x = randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="3 channels but weight expects 2"):
        conv2d_gemm(x, randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="does not fit a 8x8 image"):
        conv2d_gemm(x, randn(4, 3, 9, 9))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        conv2d_gemm(x, randn(4, 3, 3, 3), stride=0)
    with pytest.raises(ValueError, match="padding an int >= 0"):
        conv2d_gemm(x, randn(4, 3, 3, 3), padding=-1)
    with pytest.raises(ValueError, match="4 dimension"):
        conv2d_gemm(x[0], randn(4, 3, 3, 3))
    with pytest.raises(TypeError, match="dtype"):
        conv2d_gemm(x, randn(4, 3, 3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="out has shape"):
        conv2d_gemm(x, randn(4, 3, 3, 3), padding=1, out=torch.empty(1, 4, 6, 6, device=x.device))


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("05")


def _small_shapes():
    return [tuple(awkward_sizes(2, lo=33, hi=100 if common.INTERPRETER else HI, include=())), (1, 37), (45, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_transpose_versions(lesson, dtype):
    for M, N in _small_shapes():
        views = lesson.input_views(M, N, dtype)
        if dtype != torch.float32:  # strides do not depend on the dtype
            views = {"contiguous": views["contiguous"]}
        for view, x in views.items():
            for version in lesson.VERSIONS:
                out = poisoned_empty(N, M, dtype=dtype)
                assert version.fn(x, out=out) is out
                assert_close(out, x.double().t(), name=f"{version.label} {M}x{N} {view}")
    x = randn(70, 90, dtype=dtype)
    assert_close(lesson.transpose(x), x.double().t(), name="transpose (out=None)")


def test_lesson_transpose_v4_tensor_descriptors(lesson):
    status = lesson.tma_status()
    if status:
        pytest.skip(f"v4 falls back to block pointers here: {status}")
    for dtype in DTYPES:
        if lesson.tma_status(dtype):
            continue  # printed by the lesson; fp32 is the one the benchmark needs
        align = 16 // torch.tensor([], dtype=dtype).element_size()
        M, N = (s - s % align + align for s in awkward_sizes(2, lo=33, hi=HI, include=()))
        x = randn(M, N, dtype=dtype)
        out = poisoned_empty(N, M, dtype=dtype)
        assert lesson.tma_problem(x, out) is None
        lesson.transpose_v4(x, out=out)
        assert_close(out, x.double().t(), name=f"v4 {M}x{N} {dtype}")
    x = randn(40, 37)  # rows 148 bytes apart: not 16-byte aligned, so v4 falls back to v3
    out = poisoned_empty(37, 40)
    assert "16 bytes" in lesson.tma_problem(x, out)
    assert_close(lesson.transpose_v4(x, out=out), x.double().t(), name="v4 fallback")


def test_lesson_transpose_tiles_orders_and_hints(lesson):
    M, N = awkward_sizes(2, lo=33, hi=HI, include=())
    x = randn(M, N)
    expected = x.double().t()
    for bm, bn in ((16, 128), (128, 16), (32, 32)):
        assert_close(lesson.transpose_v2(x, block_m=bm, block_n=bn), expected, name=f"v2 {bm}x{bn}")
        if not lesson.BLOCK_PTR_MISSING:  # triton >= 3.9: no block pointers, v3 is not a version there
            assert_close(lesson.transpose_v3(x, block_m=bm, block_n=bn), expected, name=f"v3 {bm}x{bn}")
    for group_m in (2, 3, triton.cdiv(M, lesson.BLOCK_M)):
        assert_close(lesson.transpose_v2(x, group_m=group_m), expected, name=f"v2 group_m={group_m}")
    for evict in lesson.EVICTION_POLICIES:
        assert_close(lesson.transpose_v2(x, evict=evict), expected, name=f"v2 evict={evict!r}")
    assert_close(lesson.transpose_v1(x, block_size=64), expected, name="v1 BLOCK_SIZE=64")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_laplacian(lesson, dtype):
    for H, W in _small_shapes():
        x = randn(H, W, dtype=dtype, scale=3.0)
        out = poisoned_empty(H, W, dtype=dtype)
        assert lesson.laplacian(x, out=out) is out
        assert_close(out, lesson.laplacian_reference(x.double()), name=f"laplacian {H}x{W}")


def test_lesson_laplacian_orders_and_hints(lesson):
    H, W = awkward_sizes(2, lo=33, hi=HI, include=())
    x = randn(H, W)
    expected = lesson.laplacian_reference(x.double())
    for group_m in (3, triton.cdiv(H, 32)):
        assert_close(lesson.laplacian(x, group_m=group_m), expected, name=f"group_m={group_m}")
    for evict in lesson.EVICTION_POLICIES[1:]:
        assert_close(lesson.laplacian(x, evict=evict), expected, name=f"evict={evict!r}")
    for cache in lesson.LOAD_CACHE_MODIFIERS[1:]:
        assert_close(lesson.laplacian(x, cache=cache), expected, name=f"cache={cache!r}")
    assert_close(lesson.laplacian(x, block_h=8, block_w=128), expected, name="8x128 tile")


def test_lesson_laplacian_matches_conv2d(lesson):
    # The eager reference and cuDNN's conv2d (used in the benchmark) compute the same stencil.
    x = randn(37, 53).double()
    weight = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64,
                          device=x.device)[None, None]
    assert_close(lesson.laplacian_reference(x), F.conv2d(x[None, None], weight, padding=1)[0, 0])


def test_lesson_bad_input(lesson):
    x = randn(10, 20)
    with pytest.raises(ValueError, match="dimension"):
        lesson.transpose(randn(2, 3, 4))
    with pytest.raises(TypeError, match="dtype"):
        lesson.transpose(torch.ones(10, 20, dtype=torch.int32, device=common.DEVICE))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        lesson.transpose(x, out=randn(10, 20))
    with pytest.raises(ValueError, match="power of 2"):
        lesson.transpose_v2(x, block_m=48)
    with pytest.raises(ValueError, match="evict"):
        lesson.transpose_v2(x, evict="evict_sometimes")
    with pytest.raises(ValueError, match="256"):
        lesson.transpose_v4(x, block_m=512)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lesson.transpose([[1.0, 2.0]])
    with pytest.raises(ValueError, match="contiguous"):
        lesson.laplacian(randn(20, 10).t())
    with pytest.raises(ValueError, match="cache"):
        lesson.laplacian(x, cache=".cs")


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.transpose(torch.randn(10, 20))
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.laplacian(torch.randn(10, 20))


def test_without_block_pointers_v3_is_named_not_a_crash(lesson, monkeypatch):
    """Triton 3.9 removed tl.make_block_ptr: transpose_v3 says so, v4 falls back to v2, not v3."""
    monkeypatch.setattr(lesson, "BLOCK_PTR_MISSING", "triton 9.9 has no tl.make_block_ptr")
    with pytest.raises(RuntimeError, match="needs block pointers: triton 9.9 has no tl.make_block_ptr"):
        lesson.transpose_v3(randn(8, 8))
    monkeypatch.setattr(lesson, "_launch_v3", lambda *a: pytest.fail("v4 fell back to v3's block pointers"))
    x = randn(40, 37)  # rows 148 bytes apart: no TMA, the fallback runs
    assert_close(lesson.transpose_v4(x, out=poisoned_empty(37, 40)), x.double().t(), name="v4 fallback to v2")


@pytest.mark.parametrize("version", ["direct", "igemm"])
def test_lesson_conv2d_matches_f_conv2d(lesson, version):
    """Random odd shapes, 3x3 / 1x1 / 5x5, strides 1-2, paddings 0-2, outputs poisoned."""
    rng = random.Random(5)
    for _ in range(3 if common.INTERPRETER else 12):
        R = rng.choice((1, 3, 5))
        N, C, K = rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 7)
        H, W = rng.randint(R, R + 9), rng.randint(R, R + 9)
        stride, pad = rng.randint(1, 2), rng.randint(0, R // 2)
        for dtype in (torch.float32, torch.float16):
            x, w = randn(N, C, H, W, dtype=dtype), randn(K, C, R, R, dtype=dtype, scale=0.3)
            expected = F.conv2d(x.double(), w.double(), stride=stride, padding=pad)
            out = poisoned_empty(*expected.shape, dtype=dtype)
            lesson.conv2d(x, w, stride, pad, version=version, out=out)
            assert_close(out, expected, name=f"{version} {(N, C, H, W)} * {(K, C, R, R)} s{stride} p{pad} {dtype}")


def test_lesson_conv2d_bad_inputs_name_the_problem(lesson):
    x, w = randn(1, 3, 8, 8), randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="3 channels but weight expects 2"):
        lesson.conv2d(x, randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="does not fit a 8x8 image"):
        lesson.conv2d(x, randn(4, 3, 9, 9))
    with pytest.raises(ValueError, match="version must be one of"):
        lesson.conv2d(x, w, version="winograd")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        lesson.conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="4 dimension"):
        lesson.conv2d(x[0], w)
    with pytest.raises(ValueError, match="out has shape"):
        lesson.conv2d(x, w, padding=1, out=torch.empty(1, 4, 6, 6, device=x.device))


def test_lesson_conv2d_implicit_gemm_uses_the_tensor_cores(lesson):
    """What the compiler made, for an H100: the implicit GEMM multiplies with wgmma, the direct
    kernel on the CUDA cores (common.inspect_kernel, no launch)."""
    x, w = torch.empty(32, 64, 56, 56, dtype=torch.float16), torch.empty(64, 64, 3, 3, dtype=torch.float16)
    out = torch.empty(32, 64, 56, 56, dtype=torch.float16)
    shapes = (32, 64, 56, 56, 64, 56, 56, 1, 1)
    igemm = common.inspect_kernel(lesson.conv2d_igemm_kernel, x, w, out, *shapes, arch=90, R=3, S=3, BLOCK_M=128,
                                  BLOCK_N=64, BLOCK_K=32, INPUT_PRECISION="ieee", num_warps=4, num_stages=3)
    direct = common.inspect_kernel(lesson.conv2d_direct_kernel, x, w, out, *shapes[1:], arch=90, R=3, S=3,
                                   BLOCK_K=32, BLOCK_PQ=128)
    assert igemm.features["wgmma"] and not direct.features["wgmma"] and not direct.features["mma"]
