"""
Solutions for lesson 02: memory and data types
==============================================

The reference answers to exercises/02_memory_and_dtypes.py. Check them with:

    make check LESSON=02 IMPL=solutions
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024
BLOCK_M = 32
BLOCK_N = 64


# --------------------------------------------------------------------------------------------
# Exercise 2.1: deinterleave (a strided gather)
# x holds n items of `channels` values each, interleaved: x = [r0, g0, b0, r1, g1, b1, ...] for
# channels = 3. Gather each channel into its own row: out[c, i] = x[i * channels + c], and out
# has shape (channels, n). The wrapper is written for you (note its 2-D grid); write the kernel.


@triton.jit
def deinterleave_kernel(
    x_ptr,  # pointer to x (n_items * channels elements, interleaved)
    out_ptr,  # pointer to the output (channels rows of n_items, contiguous)
    n_items,  # n: items per channel
    channels,  # values per item: the stride of the gather
    BLOCK_SIZE: tl.constexpr,
):
    """out[c, i] = x[i * channels + c] for 0 <= i < n_items, where c = tl.program_id(1)."""
    c = tl.program_id(axis=1)
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_items
    values = tl.load(x_ptr + offsets * channels + c, mask=mask)
    tl.store(out_ptr + c * n_items + offsets, values, mask=mask)


def deinterleave(x: torch.Tensor, channels: int, out: torch.Tensor | None = None) -> torch.Tensor:
    common.check_tensors(x=x, ndim=1)
    if channels < 1 or x.numel() % channels:
        raise ValueError(f"x has {x.numel()} elements: not a whole number of items of {channels} channels")
    n_items = x.numel() // channels
    out = torch.empty((channels, n_items), dtype=x.dtype, device=x.device) if out is None else out
    grid = (triton.cdiv(n_items, BLOCK_SIZE), channels)  # axis 0: blocks of items; axis 1: the channel
    deinterleave_kernel[grid](x, out, n_items, channels, BLOCK_SIZE=BLOCK_SIZE)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 2.2: a saturating cast
# A plain fp32 -> float16 cast turns every |x| >= 65520 into inf (from 65504 up to 65520 it rounds
# to 65504; 65520 is halfway to the next step, 65536, and that tie rounds up, past the range).
# Write a cast that saturates instead: values beyond the largest finite value of the output type
# become that value (with their sign); everything else rounds to nearest even, exactly as
# x.to(dtype) does.
# Write the kernel AND the wrapper (validate, allocate, grid, launch, return).

SATURATING_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def saturating_cast_kernel(
    x_ptr,  # pointer to x (float32)
    out_ptr,  # pointer to the output (float16 or bfloat16)
    limit,  # the largest finite value of the output dtype (65504.0 for float16)
    n_elements,  # how many elements to convert
    BLOCK_SIZE: tl.constexpr,
):
    """out[i] = x[i] clamped to [-limit, limit], then rounded to nearest even in out's dtype."""
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    x = tl.minimum(tl.maximum(x, -limit), limit)  # clamp in fp32, before the cast can overflow
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=mask)


def saturating_cast(x: torch.Tensor, dtype: torch.dtype = torch.float16,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x (float32, contiguous, any shape) converted to `dtype` without overflowing to inf.

    Values beyond torch.finfo(dtype).max become that value, with their sign; the rest round to
    nearest even, as x.to(dtype) does. Raise TypeError if x is not float32 or dtype is not
    float16 / bfloat16. Writes into `out` (x's shape, dtype `dtype`) when it is given; returns
    the output.
    """
    common.check_tensors(x=x, dtypes=(torch.float32,))
    if dtype not in SATURATING_DTYPES:
        raise TypeError(f"saturating_cast converts to float16 or bfloat16, got {str(dtype).removeprefix('torch.')}")
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != dtype:
        raise ValueError(f"out must have shape {tuple(x.shape)} and dtype {dtype}, got {tuple(out.shape)} "
                         f"and {out.dtype}")
    n = x.numel()
    saturating_cast_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, out, torch.finfo(dtype).max, n, BLOCK_SIZE=BLOCK_SIZE)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 2.3: 2-D copy of a strided tensor
# x is 2-D with any strides: a column slice x = base[:, 5:105] (rows further apart than their
# length), every other row x = base[::2], or a transpose x = base.t(). Copy it into a
# contiguous tensor of the same shape, one BLOCK_M x BLOCK_N tile per program.
# Write the kernel AND the wrapper: the 2-D grid is part of the exercise.


@triton.jit
def copy_2d_kernel(
    x_ptr,  # pointer to x[0, 0]
    out_ptr,  # pointer to the contiguous output (n_rows x n_cols)
    n_rows,  # M
    n_cols,  # N
    stride_xm,  # distance in elements between x[m, n] and x[m + 1, n]
    stride_xn,  # distance in elements between x[m, n] and x[m, n + 1]
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    """out[m, n] = x[m, n]; program (i, j) copies rows i*BLOCK_M.. and columns j*BLOCK_N.."""
    rows = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], tile, mask=mask)


def copy_2d(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous copy of a 2-D tensor with any strides.

    Raise ValueError if x is not 2-D. Writes into `out` (contiguous, x's shape and dtype) when
    it is given; returns the output.
    """
    common.check_tensors(x=x, contiguous=False, ndim=2)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous with shape {tuple(x.shape)} and dtype {x.dtype}")
    n_rows, n_cols = x.shape
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_N))
    copy_2d_kernel[grid](x, out, n_rows, n_cols, x.stride(0), x.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out
