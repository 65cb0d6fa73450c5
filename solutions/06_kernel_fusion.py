"""
Solutions for lesson 06: kernel fusion
======================================

The reference answers to exercises/06_kernel_fusion.py. Check them with:

    make check LESSON=06 IMPL=solutions
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_FUSED_COLS = 16384  # a whole row in one block, as in the lesson's softmax v1


# --------------------------------------------------------------------------------------------
# Exercise 6.1: fused log-softmax
# out[i, j] = x[i, j] - m_i - log(sum_k exp(x[i, k] - m_i)), with m_i = max_k x[i, k]:
# torch.log_softmax(x, dim=1) in one kernel, one program per row, the whole row in one block.
# Write the kernel AND the wrapper.


@triton.jit
def log_softmax_kernel(
    x_ptr,  # input, M x N: row i starts at x_ptr + i * stride_xm, columns are contiguous
    out_ptr,  # output, M x N: row i starts at out_ptr + i * stride_om
    stride_xm,  # elements between x[i, 0] and x[i + 1, 0] (may be more than N)
    stride_om,  # elements between out[i, 0] and out[i + 1, 0]
    n_cols,  # N
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= N
):
    """Row `tl.program_id(0)` of out = log_softmax of that row of x, computed in fp32.

    Subtract the row max before exp (exp(89) already overflows fp32), and make sure the lanes
    past the row end change neither the max nor the sum.
    """
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=-float("inf")).to(tl.float32)
    z = x - tl.max(x, axis=0)
    log_sum = tl.log(tl.sum(tl.exp(z), axis=0))
    tl.store(out_ptr + row * stride_om + cols, (z - log_sum).to(out_ptr.dtype.element_ty), mask=mask)


def log_softmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax over the rows of a 2-D float tensor x (M x N, N <= MAX_FUSED_COLS).

    x may have strided rows (x.stride(1) must be 1, x.stride(0) may exceed N). The output has
    x's shape and dtype; write into `out` when it is given (contiguous), and return the output.
    Raise ValueError if x is not 2-D or if N > MAX_FUSED_COLS.
    """
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=FLOAT_DTYPES)
    if x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows (x.stride(1) == 1), got strides {x.stride()}")
    n_rows, n_cols = x.shape
    if n_cols > MAX_FUSED_COLS:
        raise ValueError(f"log_softmax holds a row in one block: at most {MAX_FUSED_COLS} columns, got {n_cols}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    block_size = triton.next_power_of_2(n_cols)
    log_softmax_kernel[(n_rows,)](x, out, x.stride(0), out.stride(0), n_cols, BLOCK_SIZE=block_size)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 6.2: fused bias + dropout + residual add
# out = residual + dropout(x + bias, p), one kernel instead of three (a transformer's
# `residual + dropout(linear_out + bias)`). x and residual are M x N contiguous, bias has N
# elements (added to every row). Element k = i * N + j (the flat index) is kept when
# tl.rand(seed, k) > p, with k as pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE): the same seed
# gives the same mask, so a backward pass can recompute it instead of storing it.
# Kept elements are scaled by 1 / (1 - p), so the expected value is unchanged:
#     out[k] = residual[k] + (x[k] + bias[k % N]) / (1 - p)   if kept
#     out[k] = residual[k]                                     if dropped
# The wrapper is written for you; write the kernel.


@triton.jit
def bias_dropout_add_kernel(
    x_ptr,  # x, M x N contiguous
    bias_ptr,  # bias, N elements
    res_ptr,  # residual, M x N contiguous
    out_ptr,  # output, M x N contiguous
    n_elements,  # M * N
    n_cols,  # N: the flat index k is in column k % N
    p,  # dropout probability, 0 <= p < 1
    seed,  # dropout seed (an int)
    BLOCK_SIZE: tl.constexpr,
):
    """out[k] = residual[k] + (x[k] + bias[k % N]) / (1 - p) where tl.rand(seed, k) > p, else residual[k].

    Compute in fp32; store in the output's dtype.
    """
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    b = tl.load(bias_ptr + offsets % n_cols, mask=mask).to(tl.float32)
    r = tl.load(res_ptr + offsets, mask=mask).to(tl.float32)
    keep = tl.rand(seed, offsets) > p
    out = tl.where(keep, (x + b) / (1.0 - p), 0.0) + r
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float, seed: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    common.check_tensors(x=x, residual=residual, ndim=2, dtypes=FLOAT_DTYPES)
    common.check_tensors(x=x, bias=bias, same_shape=False, ndim=None)
    if bias.dim() != 1 or bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias must have shape ({x.shape[1]},) (one value per column of x), "
                         f"got {tuple(bias.shape)}")
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    block_size = 1024
    bias_dropout_add_kernel[(triton.cdiv(n, block_size),)](x, bias, residual, out, n, x.shape[1], float(p),
                                                           int(seed), BLOCK_SIZE=block_size)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 6.3: online softmax for long rows, split over programs
# With few, long rows (4 x 2^20, say), one program per row leaves most SMs idle. Split each row
# into segments of SEGMENT columns and give each (row, segment) a program: grid (M, S) with
# S = cdiv(N, SEGMENT). Two kernels:
#   1. softmax_partial_kernel: program (i, s) walks its segment in chunks of BLOCK_SIZE with
#      the online update (running max m and running sum d of exp(x - m)), and writes its
#      partial (m, d) to m_parts[i, s] and d_parts[i, s].
#   2. softmax_normalize_kernel: program (i, s) merges row i's S partials,
#          m = max_s m_s,   d = sum_s d_s * exp(m_s - m),
#      then writes out[i, j] = exp(x[i, j] - m) / d for the columns of its segment.
# The wrapper is written for you (it allocates the partials and launches both grids); write the
# two kernels.

SPLIT_SEGMENT = 16384  # columns per program
SPLIT_BLOCK = 2048  # columns per loop step inside a segment


@triton.jit
def softmax_partial_kernel(
    x_ptr,  # input, M x N, rows stride_xm elements apart, columns contiguous
    m_parts_ptr,  # fp32, M x S contiguous: the max of each segment
    d_parts_ptr,  # fp32, M x S contiguous: the sum of exp(x - max) of each segment
    stride_xm,  # elements between x[i, 0] and x[i + 1, 0]
    n_cols,  # N
    n_segments,  # S
    SEGMENT: tl.constexpr,  # columns per segment (a multiple of BLOCK_SIZE)
    BLOCK_SIZE: tl.constexpr,  # columns per loop step
):
    """m_parts[i, s], d_parts[i, s] = max and sum of exp(x - max) over columns
    [s * SEGMENT, min((s + 1) * SEGMENT, N)) of row i, where i, s = tl.program_id(0), tl.program_id(1).
    """
    row = tl.program_id(axis=0).to(tl.int64)
    seg = tl.program_id(axis=1)
    cols = tl.arange(0, BLOCK_SIZE)
    m_lanes = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    d_lanes = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, SEGMENT, BLOCK_SIZE):
        offs = seg * SEGMENT + start + cols
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m_lanes, x)
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # lanes that saw only -inf keep d = 0
        d_lanes = d_lanes * tl.exp(m_lanes - m_ref) + tl.exp(x - m_ref)
        m_lanes = m_new
    m = tl.max(m_lanes, axis=0)
    d = tl.sum(d_lanes * tl.exp(m_lanes - m), axis=0)
    tl.store(m_parts_ptr + row * n_segments + seg, m)
    tl.store(d_parts_ptr + row * n_segments + seg, d)


@triton.jit
def softmax_normalize_kernel(
    x_ptr,  # input, M x N
    out_ptr,  # output, M x N, rows stride_om elements apart
    m_parts_ptr,  # fp32, M x S: the segments' maxima
    d_parts_ptr,  # fp32, M x S: the segments' sums
    stride_xm,  # elements between x[i, 0] and x[i + 1, 0]
    stride_om,  # elements between out[i, 0] and out[i + 1, 0]
    n_cols,  # N
    n_segments,  # S
    SEGMENT: tl.constexpr,  # columns per segment
    BLOCK_SIZE: tl.constexpr,  # columns per loop step
    S_BLOCK: tl.constexpr,  # a power of 2 >= S, to load all of a row's partials at once
):
    """out[i, j] = exp(x[i, j] - m) / d for the columns j of segment s, with (m, d) merged from
    all S partials of row i."""
    row = tl.program_id(axis=0).to(tl.int64)
    seg = tl.program_id(axis=1)
    s_idx = tl.arange(0, S_BLOCK)
    s_mask = s_idx < n_segments
    m_s = tl.load(m_parts_ptr + row * n_segments + s_idx, mask=s_mask, other=-float("inf"))
    d_s = tl.load(d_parts_ptr + row * n_segments + s_idx, mask=s_mask, other=0.0)
    m = tl.max(m_s, axis=0)
    inv_d = 1.0 / tl.sum(d_s * tl.exp(m_s - m), axis=0)
    cols = tl.arange(0, BLOCK_SIZE)
    for start in range(0, SEGMENT, BLOCK_SIZE):
        offs = seg * SEGMENT + start + cols
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=-float("inf")).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs, (tl.exp(x - m) * inv_d).to(out_ptr.dtype.element_ty), mask=mask)


def softmax_split(x: torch.Tensor, out: torch.Tensor | None = None, segment: int = SPLIT_SEGMENT,
                  block_size: int = SPLIT_BLOCK) -> torch.Tensor:
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=FLOAT_DTYPES)
    if x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows (x.stride(1) == 1), got strides {x.stride()}")
    for name, value in (("segment", segment), ("block_size", block_size)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of 2, got {value}")
    if segment % block_size:
        raise ValueError(f"segment ({segment}) must be a multiple of block_size ({block_size})")
    n_rows, n_cols = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    n_segments = triton.cdiv(n_cols, segment)
    m_parts = torch.empty((n_rows, n_segments), dtype=torch.float32, device=x.device)
    d_parts = torch.empty((n_rows, n_segments), dtype=torch.float32, device=x.device)
    grid = (n_rows, n_segments)
    softmax_partial_kernel[grid](x, m_parts, d_parts, x.stride(0), n_cols, n_segments,
                                 SEGMENT=segment, BLOCK_SIZE=block_size)
    softmax_normalize_kernel[grid](x, out, m_parts, d_parts, x.stride(0), out.stride(0), n_cols, n_segments,
                                   SEGMENT=segment, BLOCK_SIZE=block_size,
                                   S_BLOCK=max(16, triton.next_power_of_2(n_segments)))
    return out
