"""
Exercises for lesson 06: kernel fusion
======================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=06

Each exercise fuses several PyTorch ops into one pass over memory, like `softmax_kernel` and
`softmax_online_kernel` in lessons/intermediate/06_kernel_fusion.py. Hints, from gentle to
explicit, are in lessons/intermediate/06_kernel_fusion.md under "Exercises".
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
    # TODO: the row (as int64), the column offsets and their mask (about 3 lines)
    # TODO: load the row as fp32, with a value for masked lanes that exp turns into 0 (about 1 line)
    # TODO: the max, then log(sum(exp(x - max))), then store x - max - that log (about 4 lines)
    pass


def log_softmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax over the rows of a 2-D float tensor x (M x N, N <= MAX_FUSED_COLS).

    x may have strided rows (x.stride(1) must be 1, x.stride(0) may exceed N). The output has
    x's shape and dtype; write into `out` when it is given (contiguous), and return the output.
    Raise ValueError if x is not 2-D or if N > MAX_FUSED_COLS.
    """
    # TODO: validate x (common.check_tensors with contiguous=False, ndim=2, dtypes=FLOAT_DTYPES),
    #       x.stride(1) == 1 and N <= MAX_FUSED_COLS (about 5 lines)
    # TODO: allocate out when it is None, pick BLOCK_SIZE (triton.next_power_of_2), launch one
    #       program per row with both row strides, return out (about 5 lines)
    raise NotImplementedError("TODO: exercise 6.1")


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
    # TODO: the flat offsets k and their mask, as in lesson 01 (about 3 lines)
    # TODO: load x, the bias of each element's column and the residual, as fp32 (about 3 lines)
    # TODO: the keep mask from tl.rand; kept: scale x + bias by 1 / (1 - p), dropped: 0;
    #       add the residual and store (about 3 lines)
    pass


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
    # TODO: row (int64) and segment from the two program ids; the running state, e.g. per lane:
    #       m = tl.full([BLOCK_SIZE], -inf, tl.float32), d = tl.zeros(...) (about 4 lines)
    # TODO: loop over the segment in chunks: load with a mask (the last segment ends at N),
    #       raise the max, rescale d by exp(m_old - m_new), add exp(x - m_new) (about 7 lines)
    # TODO: combine the lanes into one (m, d) if you kept them per lane, store both (about 4 lines)
    pass


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
    # TODO: row and segment; load row i's S partials with a mask (which `other` values leave
    #       the merge unchanged?) (about 5 lines)
    # TODO: merge: m = max of the maxima, d = sum of d_s * exp(m_s - m) (about 2 lines)
    # TODO: loop over the segment in chunks, store exp(x - m) / d with a mask (about 6 lines)
    pass


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
