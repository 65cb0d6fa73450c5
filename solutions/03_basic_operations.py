"""
Solutions for lesson 03: basic operations
=========================================

The reference answers to exercises/03_basic_operations.py. Check them with:

    make check LESSON=03 IMPL=solutions
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_rows(x: torch.Tensor) -> None:
    """x is a 2-D float matrix on the kernels' device whose rows are contiguous."""
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x's rows must be contiguous (x.stride(1) == 1), got strides {x.stride()}")


def _output(out, shape, dtype, device):
    """A new output, or the caller's `out` once it is checked to be the right one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    common.check_tensors(out=out)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must have shape {tuple(shape)} and dtype {dtype}, "
                         f"got {tuple(out.shape)} and {out.dtype}")
    return out


# --------------------------------------------------------------------------------------------
# Exercise 3.1: row mean
# out[m] = (x[m, 0] + ... + x[m, N-1]) / N for x (M, N) whose rows are contiguous but may be
# further apart than N (a view x = base[:, :N] has x.stride(0) = base.shape[1]).
# The wrapper is written for you; write the kernel.

ROW_BLOCK_N = 1024


@triton.jit
def row_mean_kernel(
    x_ptr,  # pointer to x[0, 0]
    out_ptr,  # pointer to the output (M,), same dtype as x
    n_cols,  # N
    stride_xm,  # elements between x[m, 0] and x[m + 1, 0]
    BLOCK_N: tl.constexpr,  # columns per loop step (N may be larger or smaller)
):
    """out[m] = mean of row m, added in fp32, stored in out's dtype. One program per row."""
    row_ptr = x_ptr + tl.program_id(axis=0) * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0)
        acc += x.to(tl.float32)
    mean = tl.sum(acc, axis=0) / n_cols
    tl.store(out_ptr + tl.program_id(axis=0), mean.to(out_ptr.dtype.element_ty))


def row_mean(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    _check_rows(x)
    if x.shape[1] == 0:
        raise ValueError("row_mean of rows with no columns is undefined (x.shape[1] == 0)")
    out = _output(out, (x.shape[0],), x.dtype, x.device)
    row_mean_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK_N=ROW_BLOCK_N)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 3.2: row argmax
# out[m] = the column n of the largest x[m, n] (the first such n on ties, like torch.argmax),
# as int64, for x (M, N) with contiguous rows and N <= 16384. The whole row fits one block.
# The wrapper is written for you; write the kernel.

ARGMAX_MAX_COLS = 16384


@triton.jit
def row_argmax_kernel(
    x_ptr,  # pointer to x[0, 0]
    out_ptr,  # pointer to the output (M,), int64
    n_cols,  # N
    stride_xm,  # elements between x[m, 0] and x[m + 1, 0]
    BLOCK_N: tl.constexpr,  # the next power of 2 >= N
):
    """out[m] = argmax over n of x[m, n], the smallest n on ties. One program per row."""
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + tl.program_id(axis=0) * stride_xm + cols, mask=cols < n_cols, other=float("-inf"))
    tl.store(out_ptr + tl.program_id(axis=0), tl.argmax(x, axis=0).to(tl.int64))


def row_argmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    _check_rows(x)
    if not 1 <= x.shape[1] <= ARGMAX_MAX_COLS:
        raise ValueError(f"row_argmax takes rows of 1 to {ARGMAX_MAX_COLS} columns, got {x.shape[1]}")
    out = _output(out, (x.shape[0],), torch.int64, x.device)
    row_argmax_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK_N=triton.next_power_of_2(x.shape[1]))
    return out


# --------------------------------------------------------------------------------------------
# Exercise 3.3: bias + GELU, fused
# out[m, n] = gelu(x[m, n] + bias[n]), gelu(v) = 0.5 * v * (1 + erf(v / sqrt(2))), for x (M, N)
# with contiguous rows (row stride x.stride(0) >= N), bias (N,) contiguous, same dtype as x.
# One pass over x: x + bias is never written to memory. Write the kernel AND the wrapper.

SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2); a global read in a kernel must be a tl.constexpr


@triton.jit
def bias_gelu_kernel(
    x_ptr,  # pointer to x[0, 0]
    bias_ptr,  # pointer to bias[0]
    out_ptr,  # pointer to out[0, 0] (M x N, contiguous)
    n_rows,  # M
    n_cols,  # N
    stride_xm,  # elements between x[m, 0] and x[m + 1, 0]
    stride_om,  # elements between out[m, 0] and out[m + 1, 0]
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    """Program (i, j) computes the tile rows [i*BLOCK_M, ...), columns [j*BLOCK_N, ...); math in fp32."""
    rows = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    bias = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0)
    v = x.to(tl.float32) + bias.to(tl.float32)[None, :]
    y = 0.5 * v * (1.0 + tl.erf(v * SQRT_HALF))
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(x + bias[None, :]); writes into `out` when it is given, and returns the output.

    Raise ValueError if bias is not 1-D with x.shape[1] elements.
    """
    _check_rows(x)
    common.check_tensors(x=x, bias=bias, same_shape=False, contiguous=False)
    if bias.dim() != 1 or bias.shape[0] != x.shape[1] or not bias.is_contiguous():
        raise ValueError(f"bias must be a contiguous 1-D tensor of x.shape[1] = {x.shape[1]} elements, "
                         f"got shape {tuple(bias.shape)}")
    m, n = x.shape
    out = _output(out, (m, n), x.dtype, x.device)
    block_n = min(1024, triton.next_power_of_2(n))
    block_m = max(1, 4096 // block_n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    bias_gelu_kernel[grid](x, bias, out, m, n, x.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 3.4: whole-tensor sum of squares, deterministic
# out = x[0]^2 + x[1]^2 + ... over every element of a contiguous x of any shape (fp32, fp16 or
# bf16), as a 0-d fp32 tensor: the squared L2 norm that gradient clipping needs. The same input
# must give the same bits every call, so no atomics: pass 1 writes one fp32 partial per
# program, pass 2 (sum_finish_kernel, given) adds the partials in a fixed order.
# Write pass 1's kernel AND the wrapper.

SUM_BLOCK_SIZE = 1024


@triton.jit
def sum_finish_kernel(partials_ptr, out_ptr, n_partials, BLOCK_SIZE: tl.constexpr):
    """Pass 2 (given): out = partials[0] + ... + partials[n_partials - 1], in one program."""
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        acc += tl.load(partials_ptr + offsets, mask=offsets < n_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def sum_squares_partials_kernel(
    x_ptr,  # pointer to x (n_elements, contiguous)
    partials_ptr,  # pointer to one fp32 partial per program
    n_elements,  # x.numel()
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    """Pass 1: partials[p] = sum of x[i]^2 over program p's block, squared and added in fp32."""
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0).to(tl.float32)
    tl.store(partials_ptr + tl.program_id(axis=0), tl.sum(x * x, axis=0))


def sum_of_squares(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum(x.float() ** 2) as a 0-d fp32 tensor, the same bits on every call."""
    common.check_tensors(x=x, dtypes=FLOAT_DTYPES)
    n = x.numel()
    if n == 0:
        raise ValueError("x has no elements")
    out = _output(out, (), torch.float32, x.device)
    n_partials = triton.cdiv(n, SUM_BLOCK_SIZE)
    partials = torch.empty(n_partials, dtype=torch.float32, device=x.device)
    sum_squares_partials_kernel[(n_partials,)](x, partials, n, BLOCK_SIZE=SUM_BLOCK_SIZE)
    sum_finish_kernel[(1,)](partials, out, n_partials, BLOCK_SIZE=1024)
    return out
