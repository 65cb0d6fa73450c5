"""
Lesson 03: basic operations
===========================

Build the everyday kernels (GELU and sigmoid, a broadcast bias add, row sums and maxima, and
a whole-tensor sum done two ways) and learn to debug a kernel that does not compile or gives
wrong answers.

You will learn:
- elementwise math in fp32 whatever the storage dtype (`tl.exp`, `tl.erf`), cast once at the store
- broadcasting a row over a 2-D tile: `rows[:, None]`, `cols[None, :]`, `bias[None, :]`
- reductions with `tl.sum` / `tl.max`, and why a masked load needs the right `other=`
  (0 for a sum, -inf for a max), shown by getting it wrong
- a row reduction improved step by step (v1 one block per row, v2 a loop, v3 several rows per
  program), measured against torch.sum(dim=1) and the copy bandwidth
- a whole-tensor sum with atomics (fast, but the result changes from run to run) and in two
  passes (the same bits every time)
- debugging: TRITON_INTERPRET=1, `print` / `tl.device_print` / `tl.static_print`,
  `tl.static_assert`, `tl.device_assert`, and the error messages beginners meet most

Run:  python lessons/beginner/03_basic_operations.py [--quick]
      TRITON_INTERPRET=1 python lessons/beginner/03_basic_operations.py   (the interpreter, on any machine)
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

from common import Table, section

# %% [markdown]
# ## Motivation
# Most of a neural network that is not a matmul is one of three shapes of work:
# - elementwise: every output element depends on one input element (GELU, sigmoid, scaling);
# - broadcast: one operand is smaller and is reused along an axis (adding a bias row);
# - reduction: many input elements become one (a row sum, a row max, the mean, a loss).
# All three are memory bound: a row sum reads M*N elements and does M*N additions, far too
# little arithmetic to keep the GPU busy, so its speed is the speed of reading x. Reductions
# add two new problems: the padding of the last block must not change the answer, and when
# many programs add into one number the order of the additions (and so the rounding) can change.

# %% [markdown]
# ## Reference (PyTorch)
# Each line is one eager kernel; the comments give what it moves (n = x.numel(), x is M x N).

# %%
SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
# A kernel may read a global only if it is a tl.constexpr: a plain Python float works in the
# interpreter but does not compile for a GPU (the debugging section shows the error).
KERNEL_SQRT_HALF = tl.constexpr(SQRT_HALF)


def sigmoid_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)  # reads n, writes n: 1 kernel


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)  # the exact (erf) GELU: reads n, writes n: 1 kernel


def gelu_by_hand(x: torch.Tensor) -> torch.Tensor:
    """The same GELU written op by op, as a first attempt often is: 5 kernels instead of 1."""
    t = x * SQRT_HALF  # reads n, writes n
    t = torch.erf(t)  # reads n, writes n
    t = t + 1.0  # reads n, writes n
    t = x * t  # reads 2n, writes n
    return 0.5 * t  # reads n, writes n: 6n read + 5n written, where 2n is the minimum


def bias_add_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x + bias  # bias (N,) broadcasts over the M rows without a copy: reads M*N + N, writes M*N


def row_sum_reference(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=1)  # reads M*N, writes M


def row_max_reference(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=1)  # reads M*N, writes M


def row_mean_reference(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=1)  # reads M*N, writes M (exercise 3.1)


def total_sum_reference(x: torch.Tensor) -> torch.Tensor:
    return x.sum()  # reads n, writes 1


# %% [markdown]
# ## Kernel
# ### 1. Elementwise math
# The same shape of kernel as lesson 01's add: one program per BLOCK_SIZE elements, a mask for
# the tail. The math runs in fp32 whatever the input dtype: `tl.erf` has no fp16 version, and
# `exp` of an fp16 loses digits. The result is cast once, to the output's dtype, at the store.


# %%
@triton.jit
def sigmoid_kernel(
    x_ptr,  # pointer to the input (n_elements)
    out_ptr,  # pointer to the output (n_elements, same dtype)
    n_elements,  # how many elements
    BLOCK_SIZE: tl.constexpr,  # elements per program (a power of 2)
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    y = 1.0 / (1.0 + tl.exp(-x))  # exp(-x) = inf for x < -88 gives 1 / inf = 0: the right limit
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gelu_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.erf(x * KERNEL_SQRT_HALF))  # gelu_by_hand's 5 eager kernels, fused into 1
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# ### 2. Broadcasting: add a bias row
# A program handles a BLOCK_M x BLOCK_N tile. `rows[:, None]` is a column (BLOCK_M, 1) and
# `cols[None, :]` a row (1, BLOCK_N); adding them broadcasts to the whole tile of offsets, the
# same rule as in NumPy and PyTorch. The bias is loaded once per tile, as one row of BLOCK_N
# values, and `bias[None, :]` reuses it for every row of the tile: N values read, not M * N.


# %%
@triton.jit
def bias_add_kernel(
    x_ptr,  # pointer to x (M x N; rows contiguous, row stride stride_xm)
    bias_ptr,  # pointer to the bias (N,)
    out_ptr,  # pointer to the output (M x N)
    n_rows,  # M
    n_cols,  # N
    stride_xm,  # elements between x[m, 0] and x[m + 1, 0] (N for a contiguous x)
    stride_om,  # the same for the output
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    rows = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)  # (BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask)
    bias = tl.load(bias_ptr + cols, mask=cols < n_cols)  # (BLOCK_N,): one row, read once per tile
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], x + bias[None, :], mask=mask)


# %% [markdown]
# ### 3. Row reductions, step by step
# One output per row. The masked-off lanes of a load are filled with `other=`, and they take
# part in the reduction: `other=0.0` leaves a sum unchanged, `other=-inf` leaves a max
# unchanged. Each version adds in fp32 and casts once at the store.
#
# | version | program handles | loop over columns | limit |
# |---|---|---|---|
# | v1 naive | one row, whole row in one block | no | N <= V1_MAX_COLS (registers) |
# | v2 loop | one row, BLOCK_N columns at a time | yes | none |
# | v3 tiled | BLOCK_M rows, BLOCK_N columns at a time | yes | none; short rows fill the block |


# %%
@triton.jit
def row_sum_v1_kernel(
    x_ptr,  # pointer to x (M x N, rows contiguous)
    out_ptr,  # pointer to the output (M,)
    n_cols,  # N
    stride_xm,  # elements between the starts of two rows
    BLOCK_N: tl.constexpr,  # next power of 2 >= N: the whole row in one block
):
    row = tl.program_id(axis=0)
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < n_cols, other=0.0)  # 0 adds nothing
    tl.store(out_ptr + row, tl.sum(x.to(tl.float32), axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def row_sum_v2_kernel(x_ptr, out_ptr, n_cols, stride_xm, BLOCK_N: tl.constexpr):
    row_ptr = x_ptr + tl.program_id(axis=0) * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # BLOCK_N running sums, reduced once at the end
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0)
        acc += x.to(tl.float32)
    tl.store(out_ptr + tl.program_id(axis=0), tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def row_sum_v3_kernel(
    x_ptr, out_ptr, n_rows, n_cols, stride_xm,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per loop step
):
    rows = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        acc += x.to(tl.float32)
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def row_max_kernel(x_ptr, out_ptr, n_cols, stride_xm, BLOCK_N: tl.constexpr):
    # v2's loop with max instead of +: the padding must be -inf, the value that never wins.
    row_ptr = x_ptr + tl.program_id(axis=0) * stride_xm
    acc = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf"))
        acc = tl.maximum(acc, x.to(tl.float32))
    tl.store(out_ptr + tl.program_id(axis=0), tl.max(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def row_reduce_padded_kernel(
    x_ptr, out_ptr, n_cols, stride_xm,
    pad,  # the value masked-off lanes are loaded as (other=); right or wrong on purpose
    IS_MAX: tl.constexpr,  # True: row max, False: row sum
    BLOCK_N: tl.constexpr,  # >= N: one block per row
):
    """For the demo of `other=`: a row sum or max whose padding value is chosen by the caller."""
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + tl.program_id(axis=0) * stride_xm + cols, mask=cols < n_cols, other=pad)
    if IS_MAX:
        result = tl.max(x, axis=0)
    else:
        result = tl.sum(x, axis=0)
    tl.store(out_ptr + tl.program_id(axis=0), result)


# %% [markdown]
# ### 4. A whole-tensor sum: atomics vs two passes
# Many programs, one result. Two ways to combine the programs' partial sums:
# - atomics: each program adds its partial into the output with `tl.atomic_add`. One pass,
#   but the programs finish in a different order every run, float addition is not
#   associative, so the last bits of the result change from run to run.
# - two passes: pass 1 writes one partial per program; pass 2 (one program) adds the partials
#   in a fixed order. The same input gives the same bits every time.


# %%
@triton.jit
def sum_atomic_kernel(
    x_ptr,  # pointer to x (n_elements, any shape, contiguous)
    out_ptr,  # pointer to the fp32 result; must hold 0 before the launch
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr, tl.sum(x, axis=0))  # read-add-write in one step; order not fixed


@triton.jit
def sum_partials_kernel(
    x_ptr,
    partials_ptr,  # pointer to one fp32 partial sum per program
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0).to(tl.float32)
    tl.store(partials_ptr + tl.program_id(axis=0), tl.sum(x, axis=0))


@triton.jit
def sum_finish_kernel(
    partials_ptr,  # pointer to the n_partials fp32 partial sums of pass 1
    out_ptr,  # pointer to the fp32 result
    n_partials,
    BLOCK_SIZE: tl.constexpr,
):
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_SIZE):  # one program: a fixed order of additions
        offsets = start + tl.arange(0, BLOCK_SIZE)
        acc += tl.load(partials_ptr + offsets, mask=offsets < n_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. The row kernels take the row stride, so a view of
# whole rows (x[:, :n], x[::2]) works without a copy; what they need is contiguous rows.

# %%
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZE = 1024  # elementwise: lesson 01's choice
V1_MAX_COLS = 8192  # v1 keeps a whole row in registers: 64 fp32 per thread at 8192 with 4 warps
V2_BLOCK_N = 1024
SUM_BLOCK_SIZE = 4096  # whole-tensor sum: elements per program of the atomic kernel and pass 1



def _check_rows(x: torch.Tensor) -> None:
    """x is a 2-D float matrix on the kernels' device whose rows are contiguous."""
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x's rows must be contiguous (x.stride(1) == 1), got strides {x.stride()} "
                         f"for shape {tuple(x.shape)}; pass x.contiguous()")


def _output(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A new output, or the caller's `out` once it is checked to be the right one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    common.check_tensors(out=out)  # a tensor, on the kernels' device, contiguous
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {common.dtype_name(out.dtype)}, expected {common.dtype_name(dtype)}")
    return out


def _elementwise(kernel, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    common.check_tensors(x=x, dtypes=FLOAT_DTYPES)
    out = _output(out, tuple(x.shape), x.dtype, x.device)
    n = x.numel()
    kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, out, n, BLOCK_SIZE=BLOCK_SIZE)
    return out


def sigmoid(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """1 / (1 + exp(-x)) elementwise, for a contiguous float tensor of any shape."""
    return _elementwise(sigmoid_kernel, x, out)


def gelu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 x (1 + erf(x / sqrt 2)) elementwise (torch.nn.functional.gelu's default)."""
    return _elementwise(gelu_kernel, x, out)


def bias_add_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): tiles of ~4096 elements, up to 1024 contiguous columns wide."""
    block_n = min(1024, triton.next_power_of_2(n_cols))
    return max(1, 4096 // block_n), block_n


def bias_add(x: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x + bias[None, :] for x (M, N) with contiguous rows and a contiguous bias (N,)."""
    _check_rows(x)
    common.check_tensors(x=x, bias=bias, same_shape=False, contiguous=False)  # same device and dtype
    if bias.dim() != 1 or bias.shape[0] != x.shape[1] or not bias.is_contiguous():
        raise ValueError(f"bias must be a contiguous 1-D tensor of x.shape[1] = {x.shape[1]} "
                         f"elements, got shape {tuple(bias.shape)}")
    m, n = x.shape
    out = _output(out, (m, n), x.dtype, x.device)
    block_m, block_n = bias_add_config(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))  # rows on axis 0: it allows 2^31 - 1
    bias_add_kernel[grid](x, bias, out, m, n, x.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def row_sum_v3_config(n_cols: int) -> dict:
    """BLOCK_M, BLOCK_N and num_warps for v3: tiles of ~4096 elements, 8 warps (see the sweep)."""
    block_n = min(2048, triton.next_power_of_2(n_cols))
    return dict(BLOCK_M=max(1, 4096 // block_n), BLOCK_N=block_n, num_warps=8)


def _row_output(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    _check_rows(x)
    return _output(out, (x.shape[0],), x.dtype, x.device)


def row_sum_v1(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _row_output(x, out)
    block_n = triton.next_power_of_2(x.shape[1])
    if block_n > V1_MAX_COLS:
        raise ValueError(f"row_sum version 1 keeps a whole row in one block, so rows may have at "
                         f"most {V1_MAX_COLS} columns, got {x.shape[1]}; use version 2 or 3")
    row_sum_v1_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK_N=block_n)
    return out


def row_sum_v2(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _row_output(x, out)
    row_sum_v2_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK_N=V2_BLOCK_N)
    return out


def row_sum_v3(x: torch.Tensor, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    out = _row_output(x, out)
    config = config or row_sum_v3_config(x.shape[1])
    grid = (triton.cdiv(x.shape[0], config["BLOCK_M"]),)
    row_sum_v3_kernel[grid](x, out, x.shape[0], x.shape[1], x.stride(0), **config)
    return out


ROW_SUM_VERSIONS = common.Versions("row_sum")
ROW_SUM_VERSIONS.add("v1", "one block per row", row_sum_v1)
ROW_SUM_VERSIONS.add("v2", "loop over columns", row_sum_v2)
ROW_SUM_VERSIONS.add("v3", "rows x columns tiles", row_sum_v3)


def row_sum(x: torch.Tensor, version=3, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.sum(dim=1) for x (M, N) with contiguous rows; added in fp32, returned in x's dtype.
    version: 1, 2, 3 or "v1", "v2", "v3" (ROW_SUM_VERSIONS)."""
    return ROW_SUM_VERSIONS.get(version).fn(x, out=out)


def row_max(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.amax(dim=1) for x (M, N) with contiguous rows, N >= 1."""
    _check_rows(x)
    if x.shape[1] == 0:
        raise ValueError("row_max of rows with no columns is undefined (x.shape[1] == 0)")
    out = _output(out, (x.shape[0],), x.dtype, x.device)
    row_max_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK_N=V2_BLOCK_N)
    return out


def row_reduce_padded(x: torch.Tensor, pad: float, is_max: bool) -> torch.Tensor:
    """Row sum (is_max=False) or row max of an fp32 x with at most 16384 columns, padded with `pad`."""
    _check_rows(x)
    if x.dtype != torch.float32 or x.shape[1] > 16384:
        raise ValueError("the padding demo takes fp32 rows of at most 16384 columns")
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    row_reduce_padded_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), pad, IS_MAX=is_max,
                                            BLOCK_N=triton.next_power_of_2(x.shape[1]))
    return out


def _check_total(x: torch.Tensor) -> int:
    common.check_tensors(x=x, dtypes=FLOAT_DTYPES)
    if x.numel() == 0:
        raise ValueError("x has no elements")
    return x.numel()


def total_sum_atomic(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.sum() as a 0-d fp32 tensor, with one atomic add per program (not bitwise reproducible)."""
    n = _check_total(x)
    out = _output(out, (), torch.float32, x.device)
    out.zero_()  # the atomics add into it: it must start at 0, whatever the caller passed
    sum_atomic_kernel[(triton.cdiv(n, SUM_BLOCK_SIZE),)](x, out, n, BLOCK_SIZE=SUM_BLOCK_SIZE)
    return out


def total_sum_two_pass(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.sum() as a 0-d fp32 tensor, in two passes: the same bits on every run."""
    n = _check_total(x)
    out = _output(out, (), torch.float32, x.device)
    n_partials = triton.cdiv(n, SUM_BLOCK_SIZE)
    partials = torch.empty(n_partials, dtype=torch.float32, device=x.device)  # 1 float per 4096
    sum_partials_kernel[(n_partials,)](x, partials, n, BLOCK_SIZE=SUM_BLOCK_SIZE)
    sum_finish_kernel[(1,)](partials, out, n_partials, BLOCK_SIZE=1024)
    return out


# %% [markdown]
# ## Check
# Awkward sizes, every dtype, row-strided views, outputs poisoned with NaN, references in
# float64. A sum in fp32 rounds at every addition and its error grows with sum(|x|), not with
# the result (which can cancel to almost 0), so sums are compared with an absolute tolerance
# of 2^-20 * sum(|x|), 8 fp32 rounding steps of the largest possible partial sum.


# %%
def sum_atol(x: torch.Tensor, dim: int | None = None) -> float:
    """Absolute tolerance of an fp32 sum of x (over `dim`, or all of x)."""
    magnitude = x.double().abs().sum() if dim is None else x.double().abs().sum(dim).max()
    return max(1e-5, 2**-20 * float(magnitude))


def _dtypes() -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


def _matrices(dtype: torch.dtype, quick: bool):
    """(name, x) pairs: awkward shapes, 17 columns, a row-strided view (and one row, one column)."""
    # Few shapes: on a GPU every new BLOCK_N (and dtype) is one more compile of each kernel.
    cols = common.awkward_sizes(count=1 if quick else 3, lo=100, hi=6000, include=())
    rows = common.awkward_sizes(count=len(cols), lo=3, hi=70, include=())
    edges = [(rows[0], 17)] if quick else [(1, cols[0]), (rows[0], 1), (rows[0], 17)]  # tests cover all
    for m, n in list(zip(rows, cols)) + edges:
        yield f"{m}x{n}", common.randn(m, n, dtype=dtype)
    wide = common.randn(rows[0], cols[0] + 13, dtype=dtype)
    yield f"{rows[0]}x{cols[0]} row-strided", wide[:, :cols[0]]


def check(quick: bool) -> None:
    section("Check: Triton against PyTorch (float64 references)")
    for dtype in _dtypes():
        for n in common.awkward_sizes(count=1 if quick else 4, lo=1000, hi=1_000_000,
                                      include=(17,) if quick else (1, 17)):
            x = common.randn(n, dtype=dtype, scale=3.0)  # scale 3: the tails of sigmoid and GELU too
            for op, ref in ((sigmoid, sigmoid_reference), (gelu, gelu_reference)):
                out = common.poisoned_empty(n, dtype=dtype)
                op(x, out=out)
                common.assert_close(out, ref(x.double()), name=f"{op.__name__} n={n} {common.dtype_name(dtype)}")
        for name, x in _matrices(dtype, quick):
            bias = common.randn(x.shape[1], dtype=dtype)
            out = common.poisoned_empty(*x.shape, dtype=dtype)
            bias_add(x, bias, out=out)
            common.assert_close(out, bias_add_reference(x.double(), bias.double()), name=f"bias_add {name}")
            atol = sum_atol(x, dim=1) if dtype == torch.float32 else None
            for version in ROW_SUM_VERSIONS:
                out = common.poisoned_empty(x.shape[0], dtype=dtype)
                version.fn(x, out=out)
                common.assert_close(out, row_sum_reference(x.double()), atol=atol,
                                    name=f"row_sum {version.key} {name} {common.dtype_name(dtype)}")
            out = common.poisoned_empty(x.shape[0], dtype=dtype)
            row_max(x, out=out)
            common.assert_close(out, row_max_reference(x.double()), name=f"row_max {name} {common.dtype_name(dtype)}")
            for total in (total_sum_atomic, total_sum_two_pass):
                out = common.poisoned_empty(dtype=torch.float32)
                total(x.contiguous(), out=out)
                common.assert_close(out, total_sum_reference(x.double()), atol=sum_atol(x),
                                    name=f"{total.__name__} {name} {common.dtype_name(dtype)}")
    names = ", ".join(common.dtype_name(d) for d in _dtypes())
    print(f"sigmoid, gelu, bias_add, row_sum v1-v3, row_max, total_sum_atomic and total_sum_two_pass "
          f"match PyTorch on awkward sizes, dtypes {names}: OK")
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


# %% [markdown]
# ## What `other=` does
# A masked-off lane is not skipped: it holds the `other=` value and the reduction sees it.
# Rows of 1000 negative numbers in blocks of 1024 have 24 padding lanes per row.


# %%
def padding_demo() -> None:
    section("masked loads: the `other=` value takes part in the reduction")
    x = -common.randn(64, 1000).abs() - 0.5  # every value negative, so the true max is < 0
    table = Table("row reductions of 64 rows x 1000 negative values, BLOCK_N = 1024",
                  ["reduction", "other=", "row 0 got", "row 0 expected", "rows wrong", "verdict"])
    cases = (("sum", 0.0, False), ("sum", float("-inf"), False), ("max", float("-inf"), True), ("max", 0.0, True))
    for name, pad, is_max in cases:
        got = row_reduce_padded(x, pad, is_max).double().cpu()
        expected = (row_max_reference if is_max else row_sum_reference)(x.double()).cpu()
        wrong = int((~torch.isclose(got, expected, rtol=1e-5, atol=sum_atol(x, 1))).sum())
        verdict = "right" if wrong == 0 else ("padding won: 0 > every value" if is_max else "-inf swallowed the sum")
        table.add(name, str(pad), f"{got[0].item():.4f}", f"{expected[0].item():.4f}", f"{wrong} of 64", verdict)
    table.print()
    print("other=0.0 for a sum, other=float('-inf') for a max (and argmax). With no other= at all the\n"
          "masked-off lanes are undefined by the language: never leave it out of a reduction.")


# %% [markdown]
# ## Atomics vs two passes
# Does the same input give the same bits? Sum one tensor many times with each method.


# %%
def _bits(t: torch.Tensor) -> int:
    return t.detach().reshape(1).cpu().view(torch.int32).item()


def determinism(quick: bool) -> None:
    n = 2**24 if common.HAS_GPU else 2**14
    runs = 20 if common.HAS_GPU else 3
    section(f"Whole-tensor sum of {n:,} fp32 values in [0, 1), {runs} runs of each kernel")
    x = torch.rand(n, device=common.DEVICE)
    expected = total_sum_reference(x.double()).item()
    table = Table("distinct results over repeated runs of the same input",
                  ["method", "distinct results", "spread (ulps)", "max |error| vs fp64", "bit patterns (first 3)"])
    for name, fn in (("atomic_add", total_sum_atomic), ("two passes", total_sum_two_pass),
                     ("torch.sum", lambda t: t.sum())):
        bits = sorted({_bits(fn(x)) for _ in range(runs)})
        values = [torch.tensor([b], dtype=torch.int32).view(torch.float32).item() for b in bits]
        error = max(abs(v - expected) for v in values)
        # All results are positive, so neighbouring floats differ by 1 in their bit patterns.
        table.add(name, len(bits), bits[-1] - bits[0], f"{error:.3g}", ", ".join(f"0x{b:08x}" for b in bits[:3]))
    table.print()
    if common.INTERPRETER:
        print("In the interpreter programs run one after another, always in the same order, so the\n"
              "atomics add in the same order and give one result: run this on a GPU to see them vary.")
    else:
        print("The atomics add the program sums in the order the programs finish, which changes from\n"
              "run to run; every distinct value is equally right. Two passes fix the order.")


# %% [markdown]
# ## Memory traffic
# The modelled minimum (each input read once, each output written once), what eager PyTorch
# moves (counted per aten op with a TorchDispatchMode, on the CPU too), and what our kernels move.


# %%
def traffic(m: int, n: int) -> None:
    section(f"Memory traffic: x is {m:,} x {n:,} fp32")
    x = torch.randn(m, n, device=common.DEVICE)
    bias = torch.randn(n, device=common.DEVICE)
    fmt = common.fmt_bytes
    e, mn, n_partials = 4, m * n, triton.cdiv(m * n, SUM_BLOCK_SIZE)
    table = Table("bytes moved", ["op", "minimum", "torch eager", "triton (this lesson)"])

    def add(name, minimum, fn, *args, triton_bytes, triton_kernels=1):
        counted = common.count_torch_traffic(fn, *args)
        table.add(name, fmt(minimum), f"{counted.kernels} kernel(s), {fmt(counted.total)}",
                  f"{triton_kernels} kernel(s), {fmt(triton_bytes)}")

    add("sigmoid", 2 * mn * e, sigmoid_reference, x, triton_bytes=2 * mn * e)
    add("gelu (F.gelu)", 2 * mn * e, gelu_reference, x, triton_bytes=2 * mn * e)
    add("gelu by hand", 2 * mn * e, gelu_by_hand, x, triton_bytes=2 * mn * e)
    add("x + bias", (2 * mn + n) * e, bias_add_reference, x, bias, triton_bytes=(2 * mn + n) * e)
    add("gelu(x + bias)", (2 * mn + n) * e, lambda a, b: gelu_reference(a + b), x, bias,
        triton_bytes=(2 * mn + n) * e)  # exercise 3.3 fuses the two
    add("row sum", (mn + m) * e, row_sum_reference, x, triton_bytes=(mn + m) * e)
    add("row max", (mn + m) * e, row_max_reference, x, triton_bytes=(mn + m) * e)
    add("whole sum", (mn + 1) * e, total_sum_reference, x, triton_kernels=2,
        triton_bytes=(mn + 2 * n_partials + 1) * e)  # two passes: + partials written and read
    table.print()
    print("The reductions read x once and write almost nothing, so their time is the time to read x.\n"
          "gelu(x + bias) in eager PyTorch writes x + bias to memory and reads it back: exercise 3.3\n"
          "fuses it into one pass. The two-pass sum adds 8 bytes per 4096 elements: negligible.")


# %% [markdown]
# ## Debugging
# Run the whole lesson in the interpreter with `TRITON_INTERPRET=1 python lessons/...`: kernels
# run as Python on numpy arrays, so `print()` and `breakpoint()` inside a kernel work, and
# an out-of-bounds index raises instead of corrupting memory. On the GPU, `print()` inside a
# kernel becomes `tl.device_print`. The demos below run in both modes; errors are caught and
# their message printed, as you would read it.


# %%
@triton.jit
def print_demo_kernel(x_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0)
    tl.static_print("tl.static_print, while compiling: x is", x)  # the type and shape (or values in the interpreter)
    tl.device_print("device_print x", x)  # while running: on a GPU one line per element


@triton.jit
def static_assert_demo_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    tl.static_assert(BLOCK_SIZE >= 128, "BLOCK_SIZE must be at least 128 (one element per thread of 4 warps)")
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit(debug=True)  # device_assert is compiled in only with debug on (or TRITON_DEBUG=1)
def device_assert_demo_kernel(x_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0)
    tl.device_assert(x >= 0, "x must be non-negative")


@triton.jit
def broken_arange_kernel(x_ptr, out_ptr, n_elements):
    offsets = tl.arange(0, 1000)  # wrong: the length of an arange must be a power of 2
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def broken_constexpr_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE):  # wrong: no ": tl.constexpr"
    offsets = tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def broken_shape_kernel(x_ptr, out_ptr, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offsets = rows * n_cols + cols  # wrong: (BLOCK_M,) + (BLOCK_N,); needs rows[:, None], cols[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def broken_pointer_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(offsets, mask=mask)  # wrong: loads from the integers themselves, not x_ptr + offsets
    tl.store(out_ptr + offsets, x, mask=mask)


@triton.jit
def global_constant_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x * SQRT_HALF, mask=mask)  # wrong on a GPU: SQRT_HALF is a plain float


@triton.jit
def unmasked_double_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    tl.store(out_ptr + offsets, 2.0 * tl.load(x_ptr + offsets))  # wrong: no mask; compiles and runs


def show_error(err: BaseException) -> None:
    """Print an exception as a learner should read it: its type, then its last lines.

    On a GPU a compile error is a CompilationError whose text shows the kernel line and a caret
    under the culprit; the interpreter raises InterpreterError around the same message. Both
    are caught as Exception here, so this works whatever class a Triton version raises.
    """
    inner = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    cause = f" (caused by {type(inner).__name__})" if inner is not err else ""
    print(f"  -> raised {type(err).__name__}{cause}:")
    lines = [line for line in str(err).splitlines() if line.strip()] or [repr(err)]
    for line in lines[-6:]:
        print(f"     | {line}")


def _try(what: str, launch) -> bool:
    """Run `launch`; print the error it raises. True if it ran without an error."""
    print(f"\n{what}", flush=True)  # flushed: a GPU's device_print output comes from C, not Python
    try:
        launch()
        if common.HAS_GPU:
            torch.cuda.synchronize()  # device_print output and device errors arrive here
    except Exception as err:  # noqa: BLE001 (the point is to show any error)
        show_error(err)
        return False
    print("  -> ran without an error")
    return True


# (what, a word the error message contains, what it means, how to launch it on a and b)
COMMON_ERRORS = [
    ("1. tl.arange(0, 1000)", "power of 2",
     "A block's length must be a power of 2. Round up with triton.next_power_of_2(n) and mask the\n"
     "     extra lanes (offsets < n).",
     lambda a, b: broken_arange_kernel[(1,)](a, b, 1000)),
    ("2. BLOCK_SIZE without `: tl.constexpr`", "constexpr",
     "Shapes are fixed when the kernel compiles, so a size used in tl.arange, tl.zeros or a\n"
     "     reshape must be a compile-time constant: annotate it `BLOCK_SIZE: tl.constexpr`.",
     lambda a, b: broken_constexpr_kernel[(1,)](a, b, 1000, 1024)),
    ("3. rows * n_cols + cols with rows (16,) and cols (64,)", "incompatible",
     "Two blocks of different lengths cannot be combined. For a 2-D tile write\n"
     "     rows[:, None] * n_cols + cols[None, :], which broadcasts to (16, 64).",
     lambda a, b: broken_shape_kernel[(1,)](a, b, 16, 64, BLOCK_M=16, BLOCK_N=64)),
    ("4. tl.load(offsets) instead of tl.load(x_ptr + offsets)", "ptr",
     "tl.load and tl.store take pointers: x_ptr + offsets (a pointer plus integers) is a block\n"
     "     of pointers, offsets alone are just integers.",
     lambda a, b: broken_pointer_kernel[(1,)](a, b, 1000, BLOCK_SIZE=1024)),
]

# What the child process runs: this file (a notebook made from it has no __file__: the lesson's file in the repo).
LESSON_SCRIPT = Path(globals().get("__file__")
                     or Path(common.__file__).parents[1] / "lessons" / "beginner" / "03_basic_operations.py").resolve()


def _device_assert_child() -> None:
    """Runs in a child process on the GPU: a failing device_assert ends the CUDA context."""
    x = torch.tensor([1.0, 2.0, -3.0, 4.0], device=common.DEVICE)
    try:
        device_assert_demo_kernel[(1,)](x, 4, BLOCK_SIZE=4)
        torch.cuda.synchronize()
        print("device_assert: no error raised")
    except Exception as err:  # noqa: BLE001
        print(f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}")


def debugging(quick: bool) -> None:
    section("Debugging: printing, assertions, and the error messages beginners meet most")
    if common.INTERPRETER:
        print("This run uses the interpreter: kernels run as Python, print() and breakpoint() work inside them.")
    else:
        print("This run compiles for the GPU. To debug in Python instead, run with TRITON_INTERPRET=1.")

    x = torch.arange(32, dtype=torch.float32, device=common.DEVICE)
    # 1 warp of 32 threads for 32 elements: each element printed once on a GPU (with more
    # threads than elements, device_print prints the copies each thread holds).
    printed = _try("print_demo_kernel: tl.static_print and tl.device_print",
                   lambda: print_demo_kernel[(1,)](x, 32, BLOCK_SIZE=32, num_warps=1))
    if not printed and common.INTERPRETER:
        print("  This Triton's interpreter has no tl.device_print: use print() inside the kernel instead.")
    print("  tl.static_print runs while the kernel compiles: on a GPU it prints nothing when the compiled\n"
          "  kernel comes from Triton's cache (~/.triton/cache); TRITON_ALWAYS_COMPILE=1 makes it print again.")

    out = torch.empty_like(x)
    _try("static_assert_demo_kernel with BLOCK_SIZE=64 (it asserts BLOCK_SIZE >= 128)",
         lambda: static_assert_demo_kernel[(1,)](x, out, 32, BLOCK_SIZE=64))
    _try("static_assert_demo_kernel with BLOCK_SIZE=128", lambda: static_assert_demo_kernel[(1,)](x, out, 32, BLOCK_SIZE=128))

    _try("device_assert_demo_kernel on non-negative x (the assert holds)",
         lambda: device_assert_demo_kernel[(1,)](x, 32, BLOCK_SIZE=32))
    if common.INTERPRETER:
        ok = _try("device_assert_demo_kernel on x with a negative value",
                  lambda: device_assert_demo_kernel[(1,)](-x - 1, 32, BLOCK_SIZE=32))
        if ok:
            print("  This Triton's interpreter skips tl.device_assert (its debug option is off): there, print()\n"
                  "  the values inside the kernel. On a GPU, with debug=True (or TRITON_DEBUG=1), the failing\n"
                  "  assert stops the kernel and prints its message.")
    elif quick:
        print("\ndevice_assert_demo_kernel on x with a negative value: skipped in --quick (it runs in a\n"
              "  child process, because a failing device assert leaves the CUDA context unusable)")
    else:
        print("\ndevice_assert_demo_kernel on x with a negative value, in a child process (a failing\n"
              "device assert leaves the CUDA context unusable, so it must not run in this one):")
        try:
            child = subprocess.run([sys.executable, str(LESSON_SCRIPT)], capture_output=True, text=True, timeout=60,
                                   env={**os.environ, "COURSE_03_DEVICE_ASSERT_CHILD": "1"})
            lines = (child.stdout + child.stderr).strip().splitlines()
            shown = [line for line in lines if "ssert" in line or "Error" in line][:4] or lines[-4:]
            for line in shown:
                print(f"     | {line[:160]}")
        except Exception as err:  # noqa: BLE001 (a demo must never end the lesson)
            show_error(err)

    section("The error messages beginners meet most (each reproduced, caught, and explained)")
    a = torch.randn(2048, device=common.DEVICE)
    b = torch.empty_like(a)
    for title, _, meaning, launch in COMMON_ERRORS:
        _try(title, lambda: launch(a, b))
        print(f"  meaning: {meaning}")

    _try("5. a plain Python global (SQRT_HALF = 0.707...) read inside a kernel",
         lambda: global_constant_kernel[(1,)](a, b, 1000, BLOCK_SIZE=1024))
    print("  meaning: a kernel may read a global only if it is a tl.constexpr\n"
          "     (KERNEL_SQRT_HALF = tl.constexpr(0.707...)); otherwise pass the value as an argument.\n"
          "     The interpreter runs kernels as Python and lets it through: only the GPU compiler says no.")

    print("\n6. A missing mask: no error at all, just memory written past the end of the output")
    n = 1000
    src = common.poisoned_empty(n)  # inputs and outputs with 64 Ki-element guard zones around them,
    src.copy_(torch.randn(n, device=common.DEVICE))  # so the stray loads and stores stay inside memory we own
    dst = common.poisoned_empty(n)
    unmasked_double_kernel[(1,)](src, dst, n, BLOCK_SIZE=1024)
    try:
        common.assert_close(dst, 2.0 * src.double(), name="unmasked_double_kernel's output")
        print("  -> no write past the end was detected")
    except common.CheckError as err:
        show_error(err)
    print("  meaning: the last block ran 24 lanes past n. On a GPU that silently overwrites whatever\n"
          "     lies there, or faults with 'an illegal memory access was encountered', which ends the\n"
          "     CUDA context. Mask every load and store of a block that can run past the end.")

    if common.HAS_GPU:
        _try("7. a CPU tensor passed to a GPU kernel", lambda: gelu_kernel[(1,)](torch.randn(8), b, 8, BLOCK_SIZE=8))
        print("  meaning: kernels read GPU memory; move the tensor with .cuda() (the course's wrappers\n"
              "     check this first and say which argument is wrong).")
    else:
        print("\n7. a CPU tensor passed to a GPU kernel: GPU only (the interpreter takes CPU tensors)")


# %% [markdown]
# ## Benchmark
# Declared once, run by common.Benchmark: every provider is timed in alternating rounds (CUDA
# events, L2 flushed before each run), in GB/s of the modelled minimum bytes (each input read
# once, each output written once), and against the fastest baseline the registry names: the
# lesson's reference ("torch eager") and torch.compile of it. Elementwise kernels read and write:
# % of the copy bandwidth. Reductions only read: % of a read-only stream (torch.sum over 1 GiB),
# which runs faster than a copy, measured in the same run.


# %%
def _elementwise_bytes(x) -> int:
    return 2 * x.numel() * x.element_size()  # read x, write out


def _reduction_bytes(x, *_) -> int:  # read x, write one value per row (a row sum) or one in all
    return (x.numel() + (x.shape[0] if x.dim() == 2 else 1)) * x.element_size()


def _vector(n: int) -> tuple:
    return (torch.randn(n, device=common.DEVICE),)


def _matrix(m: int, n: int) -> tuple:
    return (torch.randn(m, n, device=common.DEVICE),)


def _rows_of_length(n: int) -> tuple:  # 2^26 elements (2^12 in the interpreter) cut into rows of n
    return _matrix((2**26 if common.HAS_GPU else 2**12) // n, n)


@functools.cache
def _sweep_rows() -> tuple:  # one input for every config of the v3 sweep
    m, n = (32768, 4096) if common.HAS_GPU else (37, 300)
    return torch.randn(m, n, device=common.DEVICE), torch.empty(m, device=common.DEVICE)


def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:,}"


V3 = ROW_SUM_VERSIONS["v3"].label
ELEMENTWISE = dict(op="elementwise", cases=[2**26], quick_cases=[2**24], cpu_cases=[1000], setup=_vector,
                   nbytes=_elementwise_bytes, ceiling="copy", dtype=torch.float32, label=_pow2)
REDUCTION = dict(op="reduction", nbytes=_reduction_bytes, ceiling="read", dtype=torch.float32)

BENCHMARKS = [
    common.Benchmark("GELU, fp32", kernels={"triton gelu": gelu}, reference=gelu_reference, **ELEMENTWISE),
    common.Benchmark(
        "GELU written op by op (torch eager: 5 kernels) and fused", kernels={"triton gelu": gelu},
        reference=gelu_by_hand, **ELEMENTWISE,
        note="torch eager here is gelu_by_hand, credited with the minimum bytes only: its GB/s is what it "
             "achieves, not what it moves (6n read + 5n written). torch.compile fuses its 5 kernels into one."),
    common.Benchmark("sigmoid, fp32", kernels={"triton sigmoid": sigmoid}, reference=sigmoid_reference,
                     **ELEMENTWISE),
    common.Benchmark(
        "broadcast bias add x + bias[None, :], fp32: GB/s of (2 M N + N) * 4 bytes", op="elementwise",
        cases=[(8192, 8192)], quick_cases=[(4096, 4096)], cpu_cases=[(37, 300)],
        setup=lambda m, n: (*_matrix(m, n), torch.randn(n, device=common.DEVICE)),
        kernels={"triton bias_add": bias_add}, reference=bias_add_reference,
        nbytes=lambda x, bias: (2 * x.numel() + bias.numel()) * x.element_size(), ceiling="copy",
        dtype=torch.float32),
    common.Benchmark(
        "row sum, fp32: v1, v2, v3 (the perf bars)", cases=[(32768, 4096), (8192, 8192)],
        quick_cases=[(8192, 4096)], cpu_cases=[(37, 300)], setup=_matrix, kernels=ROW_SUM_VERSIONS,
        reference=row_sum_reference, **REDUCTION,
        bars=[bar for shape in ((32768, 4096), (8192, 8192))
              for bar in (common.Bar(V3, shape, "ceiling", 80),
                          # "On par": within the 2% that repeated timings of one kernel differ by.
                          common.Bar(V3, shape, "baseline", 0.98))]),
    common.Benchmark(
        "row max, fp32", cases=[(32768, 4096)], quick_cases=[(8192, 4096)], cpu_cases=[(37, 300)],
        setup=_matrix, kernels={"triton row_max (v2's loop)": row_max}, reference=row_max_reference, **REDUCTION),
    common.Benchmark(
        "row sum over row lengths, M x N = 2^26 fp32", cases=[256, 1024, 8192, 65536], cpu_cases=[256],
        setup=_rows_of_length, kernels=ROW_SUM_VERSIONS.providers(only=["v2", "v3"]),
        reference=row_sum_reference, **REDUCTION, label=lambda n: f"N = {n:,}", plot="03_row_sum_lengths",
        xlabel="N (row length)", logx=True,
        note="v1 keeps a whole row in one block and stops at 8192 columns: it is raced in the row sum table "
             "above. v2 runs one row per program, which leaves most lanes idle on short rows; v3 packs several "
             "short rows into one program. Long rows mean few rows, so few programs."),
    common.Benchmark(
        "row sum v3 tile sweep at 32768 x 4096 fp32", op=None,
        cases=[(1, 1024, 4), (1, 2048, 8), (2, 2048, 8), (4, 1024, 8), (8, 512, 8)], cpu_cases=[(2, 256, 4)],
        setup=lambda block_m, block_n, warps: (*_sweep_rows(), dict(BLOCK_M=block_m, BLOCK_N=block_n,
                                                                     num_warps=warps)),
        kernels={"triton row_sum_v3": row_sum_v3}, nbytes=_reduction_bytes, ceiling="read", dtype=torch.float32,
        label=lambda c: "BLOCK_M={}, BLOCK_N={}, num_warps={}".format(*c),
        note=f"row_sum_v3_config(4096) picks {row_sum_v3_config(4096)}."),
    common.Benchmark(
        "whole-tensor sum, fp32", cases=[2**26], quick_cases=[2**24], cpu_cases=[1000],
        setup=_vector, kernels={"triton atomic_add": total_sum_atomic, "triton two passes": total_sum_two_pass},
        reference=total_sum_reference, label=_pow2, **REDUCTION),
]


# %% [markdown]
# ## Takeaways
# - Do the math in fp32 (`.to(tl.float32)` after the load) and cast once at the store.
# - `rows[:, None]` and `cols[None, :]` make a 2-D tile of offsets; `bias[None, :]` reuses one row.
# - A masked load's `other=` is part of the reduction: 0 for a sum, -inf for a max or argmax.
# - Row reductions read x once: measure them in GB/s against the copy bandwidth.
# - `tl.atomic_add` of floats is fast but not reproducible; two passes give the same bits every run.
# - Debug in the interpreter (TRITON_INTERPRET=1); read a compile error from its last line up.


# %%
if __name__ == "__main__":
    if os.environ.get("COURSE_03_DEVICE_ASSERT_CHILD"):
        _device_assert_child()
        sys.exit(0)
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    padding_demo()
    determinism(args.quick)
    traffic(*((8192, 8192) if common.HAS_GPU else (256, 1000)))
    debugging(args.quick)
    common.run_benchmarks(BENCHMARKS, args.quick)
