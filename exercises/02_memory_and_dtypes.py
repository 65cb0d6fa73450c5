"""
Exercises for lesson 02: memory and data types
==============================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=02

Each exercise uses one idea of lessons/beginner/02_memory_and_dtypes.py: a strided read, a
dtype-converting store, a copy driven by a tensor's strides. Hints, from gentle to explicit,
are in lessons/beginner/02_memory_and_dtypes.md under "Exercises".
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
    # TODO: this program's channel c, its item indices (offsets) and their mask (about 3 lines)
    # TODO: load x at offsets * channels + c; store into row c of out (about 2 lines)
    pass


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
    # TODO: offsets and mask (about 2 lines)
    # TODO: load x, clamp it to [-limit, limit] with tl.maximum and tl.minimum (about 2 lines)
    # TODO: convert to the output's element type (out_ptr.dtype.element_ty) and store (about 1 line)
    pass


def saturating_cast(x: torch.Tensor, dtype: torch.dtype = torch.float16,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x (float32, contiguous, any shape) converted to `dtype` without overflowing to inf.

    Values beyond torch.finfo(dtype).max become that value, with their sign; the rest round to
    nearest even, as x.to(dtype) does. Raise TypeError if x is not float32 or dtype is not
    float16 / bfloat16. Writes into `out` (x's shape, dtype `dtype`) when it is given; returns
    the output.
    """
    # TODO: validate x (common.check_tensors with dtypes=) and dtype (in SATURATING_DTYPES) (about 3 lines)
    # TODO: allocate out when it is None: which dtype must it have? (about 2 lines)
    # TODO: launch triton.cdiv(n, BLOCK_SIZE) programs with limit = torch.finfo(dtype).max, return out (about 3 lines)
    raise NotImplementedError("TODO: exercise 2.2")


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
    # TODO: this tile's row indices (axis 0) and column indices (axis 1) (about 2 lines)
    # TODO: a 2-D mask from rows[:, None] and cols[None, :] (about 1 line)
    # TODO: load x at rows * stride_xm + cols * stride_xn, store at rows * n_cols + cols (about 3 lines)
    pass


def copy_2d(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous copy of a 2-D tensor with any strides.

    Raise ValueError if x is not 2-D. Writes into `out` (contiguous, x's shape and dtype) when
    it is given; returns the output.
    """
    # TODO: validate x: a 2-D tensor, strides allowed (common.check_tensors) (about 1 line)
    # TODO: allocate a contiguous output when out is None (about 2 lines)
    # TODO: a 2-D grid of tiles, launch with x's two strides, return out (about 4 lines)
    raise NotImplementedError("TODO: exercise 2.3")
