"""
Solutions for lesson 01: vector add
===================================

The reference answers to exercises/01_vector_add.py. Check them with:

    make check LESSON=01 IMPL=solutions
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024


# --------------------------------------------------------------------------------------------
# Exercise 1.1: axpy
# out[i] = a * x[i] + y[i], for 1-D tensors x, y of the same length n and a Python float a.
# The wrapper is written for you; write the kernel.


@triton.jit
def axpy_kernel(
    x_ptr,  # pointer to x (n elements)
    y_ptr,  # pointer to y (n elements)
    out_ptr,  # pointer to the output (n elements)
    a,  # the scalar a (a Python float becomes an fp32 kernel argument)
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,
):
    """out[i] = a * x[i] + y[i] for 0 <= i < n_elements. n need not be a multiple of BLOCK_SIZE."""
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, a * x + y, mask=mask)


def axpy(a: float, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    common.check_tensors(x=x, y=y)
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    axpy_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, y, out, a, n, BLOCK_SIZE=BLOCK_SIZE)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 1.2: clamp
# out[i] = min(max(x[i], lo), hi), for a 1-D tensor x and Python floats lo <= hi.
# Write the kernel AND the wrapper (validate, allocate, grid, launch, return).


@triton.jit
def clamp_kernel(
    x_ptr,  # pointer to x (n elements)
    out_ptr,  # pointer to the output (n elements)
    lo,  # lower bound
    hi,  # upper bound
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,
):
    """out[i] = min(max(x[i], lo), hi) for 0 <= i < n_elements."""
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, tl.minimum(tl.maximum(x, lo), hi), mask=mask)


def clamp(x: torch.Tensor, lo: float, hi: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Clamp x into [lo, hi]. Writes into `out` when it is given, and returns the output.

    Raise ValueError if lo > hi (the message should name both values).
    """
    common.check_tensors(x=x)
    if lo > hi:
        raise ValueError(f"clamp needs lo <= hi, got lo={lo} and hi={hi}")
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    clamp_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, out, lo, hi, n, BLOCK_SIZE=BLOCK_SIZE)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 1.3: add two strided vectors
# x and y are 1-D but need not be contiguous: x = base[::3] has stride 3, so its element i
# lives at x_ptr + i * stride_x. out is contiguous: out[i] = x[i] + y[i].
# The wrapper is written for you (see how it passes the strides); write the kernel.


@triton.jit
def add_strided_kernel(
    x_ptr,  # pointer to x[0]
    y_ptr,  # pointer to y[0]
    out_ptr,  # pointer to the (contiguous) output
    n_elements,  # n
    stride_x,  # distance in elements between x[i] and x[i + 1]
    stride_y,  # distance in elements between y[i] and y[i + 1]
    BLOCK_SIZE: tl.constexpr,
):
    """out[i] = x[i * stride_x] + y[i * stride_y] (pointer arithmetic in elements)."""
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets * stride_x, mask=mask)
    y = tl.load(y_ptr + offsets * stride_y, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def add_strided(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    common.check_tensors(x=x, y=y, contiguous=False, ndim=1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    n = x.numel()
    add_strided_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, y, out, n, x.stride(0), y.stride(0),
                                                      BLOCK_SIZE=BLOCK_SIZE)
    return out
