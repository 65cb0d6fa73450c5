"""
Solutions for lesson 11: quantization and custom data types
===========================================================

Reference answers to exercises/11_quantization.py. Grade them with:

    make check LESSON=11 IMPL=solutions
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROW_BLOCK_SIZE = 1024  # 11.1: a row is read in chunks of this many elements
GEMV_BLOCK_N = 16  # 11.2: output channels per program
FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
MAX_FP8_ROW = 16384  # 11.3: a row is one block
INT4_GROUP = 128  # 11.4: K values per scale
W4A16_BLOCK_N = 16  # 11.4: output channels per program
MAX_W4A16_ROWS = 16  # 11.4: rows of x


@triton.jit
def round_half_to_even(y):
    """Given (as in the lesson): round fp32 y to the nearest integer, ties to even, like torch.round.

    x.to(tl.int8) would truncate toward zero; libdevice.rint does not run in the interpreter.
    """
    f = tl.floor(y)
    d = y - f
    r = tl.where(d > 0.5, f + 1.0, f)
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d == 0.5) & odd, f + 1.0, r)


# --------------------------------------------------------------------------------------------
# Exercise 11.1: per-row INT8 quantization of rows of any length, with a clipping ratio
# For each row m of x (M, N):
#   amax[m]  = max_j |x[m, j]|
#   scale[m] = clip_ratio * amax[m] / 127        (1.0 if amax[m] == 0)
#   q[m, j]  = clamp(round_half_to_even(x[m, j] / scale[m]), -127, 127)    as int8
# clip_ratio < 1 trades the few largest values (they saturate at +-127) for a finer step for all
# the others. Rows may be longer than one block: read each row in chunks, twice (the amax pass,
# then the quantize pass), like lesson 06's online softmax for long rows. The wrapper is
# written; write the kernel.


@triton.jit
def quantize_rows_int8_kernel(
    x_ptr,  # input, M x N, row m at x_ptr + m * stride_xm, columns contiguous (fp32 / fp16 / bf16)
    q_ptr,  # output int8, M x N contiguous
    scale_ptr,  # output fp32, M: one scale per row
    stride_xm,  # elements between x[m, 0] and x[m + 1, 0]
    n_cols,  # N, any length
    clip_ratio,  # in (0, 1]: the scale covers clip_ratio * amax
    BLOCK_SIZE: tl.constexpr,  # elements per chunk
):
    """One program per row: pass 1 finds amax over the row chunk by chunk; pass 2 writes q."""
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    x_row = x_ptr + row * stride_xm
    amax = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.where(amax > 0, clip_ratio * amax / 127.0, 1.0)
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(round_half_to_even(x / scale), -127.0), 127.0)
        tl.store(q_ptr + row * n_cols + start + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_int8(x: torch.Tensor, clip_ratio: float = 1.0, q_out: torch.Tensor | None = None,
                       scale_out: torch.Tensor | None = None):
    """(q int8 (M, N), scale fp32 (M,)) for a 2-D x whose rows are contiguous (any row stride)."""
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=FLOAT_DTYPES)
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x must have contiguous rows (x.stride(1) == 1), got strides {x.stride()}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    n_rows, n_cols = x.shape
    q = torch.empty(n_rows, n_cols, dtype=torch.int8, device=x.device) if q_out is None else q_out
    scale = torch.empty(n_rows, dtype=torch.float32, device=x.device) if scale_out is None else scale_out
    common.check_tensors(q_out=q, dtypes=(torch.int8,), ndim=2)
    common.check_tensors(scale_out=scale, dtypes=(torch.float32,), ndim=1)
    if q.shape != x.shape or scale.shape[0] != n_rows:
        raise ValueError(f"q_out must be {tuple(x.shape)} and scale_out ({n_rows},), got "
                         f"{tuple(q.shape)} and {tuple(scale.shape)}")
    if n_rows and n_cols:
        quantize_rows_int8_kernel[(n_rows,)](x, q, scale, x.stride(0), n_cols, float(clip_ratio),
                                             BLOCK_SIZE=ROW_BLOCK_SIZE)
    return q, scale


# --------------------------------------------------------------------------------------------
# Exercise 11.2: W8A16 GEMV with per-group scales
# x (K,) fp16 / fp32; w_q (N, K) int8, K contiguous, row stride stride_wn (rows may be padded);
# scales (N, K / G) with scales[n, g] covering w_q[n, g*G : (g+1)*G]. Then
#   out[n] = sum_g scales[n, g] * sum_{k in group g} x[k] * w_q[n, k]        (fp32 sums)
# Unlike the lesson's per-channel scale, a group's scale changes along K, so it is applied
# inside the loop, once per group: one K step = one group. The wrapper is written; write the kernel.


@triton.jit
def w8a16_gemv_grouped_kernel(
    x_ptr,  # activations, K
    w_ptr,  # int8 weight, N x K, row n at w_ptr + n * stride_wn
    scale_ptr,  # scales, N x (K / GROUP_SIZE), row n at scale_ptr + n * stride_sn
    out_ptr,  # output, N, in x's dtype
    N, K,  # output channels, reduction length (a multiple of GROUP_SIZE)
    stride_wn,  # elements between w[n, 0] and w[n + 1, 0]
    stride_sn,  # elements between scales[n, 0] and scales[n + 1, 0]
    GROUP_SIZE: tl.constexpr,  # G: K elements per scale, a power of 2
    BLOCK_N: tl.constexpr,  # output channels per program
):
    """out[offs_n] for this program's BLOCK_N channels: per group, the (BLOCK_N, G) tile's sums
    along K times that group's scales, accumulated in fp32."""
    offs_n = tl.program_id(axis=0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, GROUP_SIZE)
    mask_n = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(0, K // GROUP_SIZE):
        x = tl.load(x_ptr + g * GROUP_SIZE + offs_k).to(tl.float32)
        w = tl.load(w_ptrs + g * GROUP_SIZE, mask=mask_n[:, None], other=0).to(tl.float32)
        s = tl.load(scale_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1) * s
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def w8a16_gemv_grouped(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, group_size: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """x (K,) @ (w_q (N, K) dequantised with per-group scales (N, K / group_size)).T: (N,) in x's dtype."""
    common.check_tensors(x=x, ndim=1, dtypes=FLOAT_DTYPES)
    common.check_tensors(w_q=w_q, contiguous=False, ndim=2, dtypes=(torch.int8,))
    common.check_tensors(scales=scales, contiguous=False, ndim=2, dtypes=(torch.float32, torch.float16))
    k = x.shape[0]
    n = w_q.shape[0]
    if w_q.shape[1] != k or w_q.stride(1) != 1:
        raise ValueError(f"w_q must be (N, K = {k}) with K contiguous, got shape {tuple(w_q.shape)} strides {w_q.stride()}")
    if group_size < 16 or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"group_size must be a power of 2 of at least 16 that divides K = {k}, got {group_size}")
    if scales.shape != (n, k // group_size) or scales.stride(1) != 1:
        raise ValueError(f"scales must be ({n}, {k // group_size}) with contiguous rows, got shape "
                         f"{tuple(scales.shape)} strides {scales.stride()}")
    if out is None:
        out = torch.empty(n, dtype=x.dtype, device=x.device)
    else:
        common.check_tensors(out=out, ndim=1, dtypes=(x.dtype,))
        if out.shape[0] != n:
            raise ValueError(f"out must have shape ({n},), got {tuple(out.shape)}")
    w8a16_gemv_grouped_kernel[(triton.cdiv(n, GEMV_BLOCK_N),)](
        x, w_q, scales, out, n, k, w_q.stride(0), scales.stride(0), GROUP_SIZE=group_size, BLOCK_N=GEMV_BLOCK_N)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 11.3: FP8 quantization per row (per token) with amax scaling
# For each row m of x (M, N), with FP8_MAX = 448 (e4m3) or 57344 (e5m2):
#   scale[m] = amax[m] / FP8_MAX      (1.0 if amax[m] == 0),   amax[m] = max_j |x[m, j]|
#   q[m, j]  = clamp(x[m, j] / scale[m], -FP8_MAX, FP8_MAX), stored in q's dtype
# q's dtype is the fp8 format (the store's cast rounds to nearest even: needs a GPU with fp8),
# or fp32: then q holds the scaled, saturated values before the fp8 rounding (runs anywhere, and
# is what the grader checks in the interpreter). This is how activations are quantized on the
# fly before an FP8 matmul: one scale per token. Write the kernel and the wrapper.


@triton.jit
def fp8_quantize_rows_kernel(
    x_ptr,  # input, M x N, row m at x_ptr + m * stride_xm, columns contiguous
    q_ptr,  # output, M x N contiguous: float8_e4m3fn / float8_e5m2, or fp32
    scale_ptr,  # output fp32, M
    stride_xm,  # elements between x[m, 0] and x[m + 1, 0]
    n_cols,  # N
    FP8_MAX: tl.constexpr,  # the format's largest finite value
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= N: the whole row is one block
):
    """One program per row: amax, scale, then the scaled and saturated row in q's dtype."""
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    y = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * n_cols + cols, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def fp8_quantize_rows(x: torch.Tensor, fmt: str = "e4m3", out: torch.Tensor | None = None,
                      scale_out: torch.Tensor | None = None):
    """(q (M, N), scale fp32 (M,)) for a 2-D x with contiguous rows.

    fmt is "e4m3" or "e5m2". out: None allocates the fp8 tensor of that format; an fp32 out
    receives the scaled, saturated values instead. ValueError for an unknown fmt, rows longer
    than MAX_FP8_ROW, or an out / scale_out of the wrong shape; TypeError for a wrong dtype.
    """
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FP8_FORMATS)}, got {fmt!r}")
    dtype, fmax = FP8_FORMATS[fmt]
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=FLOAT_DTYPES)
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x must have contiguous rows (x.stride(1) == 1), got strides {x.stride()}")
    n_rows, n_cols = x.shape
    if n_cols > MAX_FP8_ROW:
        raise ValueError(f"rows of at most {MAX_FP8_ROW} elements fit one block, got {n_cols}")
    if out is None:
        out = torch.empty(n_rows, n_cols, dtype=dtype, device=x.device)
    common.check_tensors(out=out, ndim=2, dtypes=(dtype, torch.float32))
    if scale_out is None:
        scale_out = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    common.check_tensors(scale_out=scale_out, ndim=1, dtypes=(torch.float32,))
    if out.shape != x.shape or scale_out.shape[0] != n_rows:
        raise ValueError(f"out must be {tuple(x.shape)} and scale_out ({n_rows},), got {tuple(out.shape)} "
                         f"and {tuple(scale_out.shape)}")
    if n_rows and n_cols:
        fp8_quantize_rows_kernel[(n_rows,)](x, out, scale_out, x.stride(0), n_cols, FP8_MAX=fmax,
                                            BLOCK_SIZE=max(16, triton.next_power_of_2(n_cols)))
    return out, scale_out


# --------------------------------------------------------------------------------------------
# Exercise 11.4: W4A16 GEMV, int4 weights packed two per byte, fp16 scales per group of 128
# x (M, K) fp16 / fp32 with M small (1..16); w_packed (N, K / 2) uint8, row stride stride_wn (rows may
# be padded): byte j of row n holds u[n, 2j] in its low nibble and u[n, 2j + 1] in its high nibble,
# u = q + 8 in [1, 15] (symmetric int4 q in [-7, 7], zero point 8); scales (N, K / G), G = 128. Then
#   out[m, n] = sum_g scales[n, g] * sum_{k in group g} x[m, k] * (u[n, k] - 8)        (fp32 sums)
# One program per (BLOCK_N channels, row m of x); one K step = one group, as in 11.2. The wrapper is
# written; write the kernel. (The lesson's w4a16_gemv_kernel is the fast version of the same sum.)


@triton.jit
def w4a16_gemv_kernel(
    x_ptr,  # activations, M x K, row m at x_ptr + m * stride_xm, K contiguous
    w_ptr,  # packed int4 weight, N x K/2 uint8, row n at w_ptr + n * stride_wn
    scale_ptr,  # scales, N x (K / GROUP_SIZE), row n at scale_ptr + n * stride_sn
    out_ptr,  # output, M x N contiguous, in x's dtype
    N, K,  # output channels, reduction length (a multiple of GROUP_SIZE)
    stride_xm,  # elements between x[m, 0] and x[m + 1, 0]
    stride_wn,  # bytes between w[n, 0] and w[n + 1, 0]
    stride_sn,  # elements between scales[n, 0] and scales[n + 1, 0]
    GROUP_SIZE: tl.constexpr,  # G: K values per scale (128)
    BLOCK_N: tl.constexpr,  # output channels per program
):
    """out[m, offs_n] for this program's row m of x and BLOCK_N channels: per group, unpack the
    (BLOCK_N, GROUP_SIZE / 2) bytes into low and high nibbles, subtract 8, multiply by x's even and odd
    values of the group, sum along K, times the group's scales; accumulate in fp32."""
    offs_n = tl.program_id(axis=0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(axis=1).to(tl.int64)
    offs_b = tl.arange(0, GROUP_SIZE // 2)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(0, K // GROUP_SIZE):
        b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + g * (GROUP_SIZE // 2) + offs_b[None, :],
                    mask=mask_n[:, None], other=0)
        x_even = tl.load(x_ptr + row * stride_xm + g * GROUP_SIZE + 2 * offs_b).to(tl.float32)
        x_odd = tl.load(x_ptr + row * stride_xm + g * GROUP_SIZE + 2 * offs_b + 1).to(tl.float32)
        s = tl.load(scale_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        lo = (b & 15).to(tl.float32) - 8.0
        hi = (b >> 4).to(tl.float32) - 8.0
        acc += tl.sum(lo * x_even[None, :] + hi * x_odd[None, :], axis=1) * s
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def w4a16_gemv(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ (the int4 weight w_packed (N, K / 2) dequantised with per-group scales (N, K / 128)).T:
    (M, N) in x's dtype."""
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    common.check_tensors(w_packed=w_packed, contiguous=False, ndim=2, dtypes=(torch.uint8,))
    common.check_tensors(scales=scales, contiguous=False, ndim=2, dtypes=(torch.float32, torch.float16))
    m, k = x.shape
    n = w_packed.shape[0]
    if x.stride(1) != 1 or not 1 <= m <= MAX_W4A16_ROWS:
        raise ValueError(f"x must be (M, K) with 1 <= M <= {MAX_W4A16_ROWS} and K contiguous, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if k % INT4_GROUP or w_packed.shape[1] != k // 2 or w_packed.stride(1) != 1:
        raise ValueError(f"w_packed must be (N, K / 2 = {k // 2}) with contiguous rows, K a multiple of {INT4_GROUP}; "
                         f"got shape {tuple(w_packed.shape)} strides {w_packed.stride()}")
    if scales.shape != (n, k // INT4_GROUP) or scales.stride(1) != 1:
        raise ValueError(f"scales must be ({n}, {k // INT4_GROUP}) with contiguous rows, got shape "
                         f"{tuple(scales.shape)} strides {scales.stride()}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        common.check_tensors(out=out, ndim=2, dtypes=(x.dtype,))
        if out.shape != (m, n):
            raise ValueError(f"out must have shape ({m}, {n}), got {tuple(out.shape)}")
    w4a16_gemv_kernel[(triton.cdiv(n, W4A16_BLOCK_N), m)](
        x, w_packed, scales, out, n, k, x.stride(0), w_packed.stride(0), scales.stride(0),
        GROUP_SIZE=INT4_GROUP, BLOCK_N=W4A16_BLOCK_N)
    return out
