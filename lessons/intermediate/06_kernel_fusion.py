"""
Lesson 06: kernel fusion
========================

Fuse `(x + y) * s` and a whole row softmax into single Triton kernels, count the bytes and the
launches that fusion saves, and handle rows longer than one block with online softmax.

You will learn:
- why fusion wins for memory-bound ops: count the bytes every kernel reads and writes
- fused add-multiply vs two kernels, in PyTorch and in Triton, over sizes, scalar values and
  block sizes
- fused softmax vs softmax written out op by op: time, bytes, kernel launches, peak memory
- online softmax: a running max and a running sum, so a row longer than one block is read
  twice instead of three times
- what a launch costs on tiny tensors, and how torch.compile compares in every case

Run:  python lessons/intermediate/06_kernel_fusion.py [--quick]
"""

import functools
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

from common import Table, fmt_bytes, section

# %% [markdown]
# ## Motivation
# A memory-bound op costs what its bytes cost. We fuse `(x + y) * s` (add, then scale; the
# other order, `x * s + y`, moves the same bytes). Eager PyTorch runs it as two kernels:
# `t = x + y` reads 2n elements and writes n, then `t * s` reads n and writes n: 5n elements
# moved, and a temporary of n elements allocated. One fused kernel reads x and y and writes the
# result: 3n. When the bytes set the time, fusion can be up to 5/3 = 1.67x faster.
#
# Softmax written out op by op is five kernels that read 5 and write 3 row-sized arrays; fused,
# it reads each row once and writes it once: 4x fewer bytes. Rows longer than one block need a
# loop over chunks: online softmax keeps a running max and sum so the row is read only twice.
# And on tiny tensors the bytes do not matter at all: every launch costs microseconds, so
# fusion wins there by launching fewer kernels.

# %% [markdown]
# ## Reference (PyTorch)


# %%
def add_mul_reference(x: torch.Tensor, y: torch.Tensor, s: float) -> torch.Tensor:
    t = x + y  # kernel 1: reads x and y (2n), writes t (n)
    return t * s  # kernel 2: reads t (n), writes the output (n). 5n moved, 3n is the minimum


def softmax_naive(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the rows of an M x N tensor, op by op, as eager PyTorch runs it."""
    x_max = x.max(dim=1)[0]  # reads MN, writes M (and M int64 indices)
    z = x - x_max[:, None]  # reads MN + M, writes MN
    numerator = torch.exp(z)  # reads MN, writes MN
    denominator = numerator.sum(dim=1)  # reads MN, writes M
    return numerator / denominator[:, None]  # reads MN + M, writes MN
    # in all: 5 kernels, reads 5MN + 2M, writes 3MN + 3M; the minimum is read MN, write MN


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=1)  # PyTorch's own fused kernel: reads MN, writes MN


# %% [markdown]
# ## Kernel
# Add-multiply: v1 is two kernels, as eager PyTorch runs it; v2 is one fused kernel.


# %%
@triton.jit
def add_kernel(
    x_ptr,  # pointer to x (n elements)
    y_ptr,  # pointer to y (n elements)
    out_ptr,  # pointer to the output (n elements)
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,  # elements per program (a power of 2)
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


@triton.jit
def scale_kernel(
    x_ptr,  # pointer to the input (n elements)
    out_ptr,  # pointer to the output (n elements)
    s,  # the scalar (a Python float arrives as fp32)
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, (x * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_mul_kernel(
    x_ptr,  # pointer to x (n elements)
    y_ptr,  # pointer to y (n elements)
    out_ptr,  # pointer to the output (n elements)
    s,  # the scalar
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask).to(tl.float32)
    # x + y stays in registers: it is never written to memory and read back. In fp32 it is also
    # rounded once, at the store, where two kernels round the fp16/bf16 temporary in between.
    tl.store(out_ptr + offsets, ((x + y) * s).to(out_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# Softmax: one program per row. v1 holds the whole row in one block: one read, one write.
# v2 and v3 loop over the row in chunks of BLOCK_SIZE, for rows of any length: v2 reads the
# row three times (max, sum, write), v3 (online softmax) keeps a running max and a running sum
# in one pass and reads the row twice.


# %%
@triton.jit
def softmax_kernel(
    x_ptr,  # input, M x N: row i starts at x_ptr + i * stride_xm, columns are contiguous
    out_ptr,  # output, M x N: row i starts at out_ptr + i * stride_om
    stride_xm,  # elements between x[i, 0] and x[i + 1, 0]
    stride_om,  # elements between out[i, 0] and out[i + 1, 0]
    n_cols,  # N
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= N: the whole row is one block
):
    row = tl.program_id(axis=0).to(tl.int64)  # int64: row * stride passes 2^31 on large tensors
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    # -inf in the lanes past the row end: they never win the max, and exp(-inf) = 0 adds nothing
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=-float("inf")).to(tl.float32)
    x_max = tl.max(x, axis=0)
    numerator = tl.exp(x - x_max)  # x - max <= 0, so exp cannot overflow
    denominator = tl.sum(numerator, axis=0)
    y = numerator / denominator
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_three_pass_kernel(
    x_ptr, out_ptr, stride_xm, stride_om, n_cols,
    BLOCK_SIZE: tl.constexpr,  # columns per loop step (a chunk), not the whole row
):
    row = tl.program_id(axis=0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    cols = tl.arange(0, BLOCK_SIZE)
    # Pass 1 reads the row for its max. Each lane keeps the max of the columns it saw, so the
    # loop has no cross-thread reduction; one tl.max at the end combines the lanes.
    m_lanes = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf"))
        m_lanes = tl.maximum(m_lanes, x.to(tl.float32))
    m = tl.max(m_lanes, axis=0)
    # Pass 2 reads the row again for the sum of exp(x - m).
    d_lanes = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf"))
        d_lanes += tl.exp(x.to(tl.float32) - m)
    inv_d = 1.0 / tl.sum(d_lanes, axis=0)
    # Pass 3 reads it a third time and writes exp(x - m) / d.
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        tl.store(out_row + start + cols, (tl.exp(x - m) * inv_d).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_online_kernel(
    x_ptr, out_ptr, stride_xm, stride_om, n_cols,
    BLOCK_SIZE: tl.constexpr,  # columns per loop step
):
    row = tl.program_id(axis=0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    cols = tl.arange(0, BLOCK_SIZE)
    # One pass for the max AND the sum. Each lane keeps a running max m and a running sum
    # d = sum of exp(x - m) over the values it has seen. When a new value raises the max, the sum
    # so far was taken against the old max: multiply it by exp(m_old - m_new) before adding.
    m_lanes = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    d_lanes = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m_lanes, x)
        # A lane that has seen only -inf (past the row end) would compute exp(-inf - -inf) = NaN;
        # measuring from 0 instead gives exp(-inf) = 0, and its sum stays 0.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        d_lanes = d_lanes * tl.exp(m_lanes - m_ref) + tl.exp(x - m_ref)
        m_lanes = m_new
    # Merge the lanes' (max, sum) pairs with the same rescaling: d = sum_l d_l * exp(m_l - m).
    m = tl.max(m_lanes, axis=0)
    inv_d = 1.0 / tl.sum(d_lanes * tl.exp(m_lanes - m), axis=0)
    # Pass 2 (the only other read) writes exp(x - m) / d.
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        tl.store(out_row + start + cols, (tl.exp(x - m) * inv_d).to(out_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# v4 is the fast one, two kernels behind one entry point that dispatches on the row length.
# Rows that fit in registers (n <= 16384): v1's one block per row, with num_warps set by the
# row's bytes, and a loop over rows for a persistent grid (an option: measured slower). Longer rows:
# SPLIT programs share a row, each holding one segment of it in registers; they swap their
# (max, sum) pairs through a small buffer and wait for each other at a barrier, so that the row
# is still read from memory only once, and 1024 long rows keep every SM busy.


# %%
@triton.jit
def softmax_rows_kernel(
    x_ptr, out_ptr, stride_xm, stride_om,
    n_rows,  # M: the programs stride over the rows
    n_cols,  # N
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= N: the whole row is one block
    NUM_STAGES: tl.constexpr,  # rows in flight per program: loads issued ahead of the reduction
):
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    # With one program per row the loop runs once. With a persistent grid (a few programs per
    # SM) each program strides over the rows, and NUM_STAGES >= 2 software-pipelines the loop:
    # row r + step is already on its way from memory while row r is reduced and stored.
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=NUM_STAGES):
        row = tl.cast(row, tl.int64)  # int64: row * stride passes 2^31 on large tensors
        x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=-float("inf")).to(tl.float32)
        numerator = tl.exp(x - tl.max(x, axis=0))
        # one division per row, then a multiply per element (a division per element costs more)
        inv_d = 1.0 / tl.sum(numerator, axis=0)
        tl.store(out_ptr + row * stride_om + cols, (numerator * inv_d).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_split_row_kernel(
    x_ptr, out_ptr, stride_xm, stride_om, n_rows, n_cols,
    stats_ptr,  # fp32, M x SPLIT x 2: each segment's (max, sum of exp(x - max))
    count_ptr,  # int32, one barrier counter per group of SPLIT programs; only ever grows
    SPLIT: tl.constexpr,  # programs per row (a group); the grid is a whole number of groups
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= cdiv(N, SPLIT): one segment in registers
    SPLIT_BLOCK: tl.constexpr,  # a power of 2 >= SPLIT, for loading the row's SPLIT pairs
    PHASE: tl.constexpr,  # 0: all in one launch (GPU); 1 then 2: two launches (the interpreter)
):
    pid = tl.program_id(0)
    group = pid // SPLIT
    seg = pid % SPLIT
    n_groups = tl.num_programs(0) // SPLIT
    cols = seg * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    parts = tl.arange(0, SPLIT_BLOCK)
    x_row = x_ptr + tl.cast(group, tl.int64) * stride_xm
    x = tl.load(x_row + cols, mask=mask & (group < n_rows), other=-float("inf")).to(tl.float32)
    for row in range(group, n_rows, n_groups):  # every program of a group works on the same row
        row = tl.cast(row, tl.int64)  # int64: row * stride passes 2^31 on large tensors
        stats_row = stats_ptr + row * (2 * SPLIT)
        if PHASE != 2:
            m_seg = tl.max(x, axis=0)
            # a segment that is all padding (-inf) has max -inf: measure from 0, its sum is 0
            m_ref = tl.where(m_seg == -float("inf"), 0.0, m_seg)
            d_seg = tl.sum(tl.exp(x - m_ref), axis=0)
            tl.store(stats_row + 2 * seg, m_seg)
            tl.store(stats_row + 2 * seg + 1, d_seg)
        # Issue the load of this program's segment of its next row now, so that memory stays busy
        # while the group waits at the barrier (a hand-written two-stage pipeline).
        next_row = row + n_groups
        x_next = tl.load(x_ptr + next_row * stride_xm + cols, mask=mask & (next_row < n_rows),
                         other=-float("inf")).to(tl.float32)
        if PHASE == 0:
            # The barrier: all SPLIT programs of the group must have stored their pair before any
            # reads them. Each arrival adds 1; the group's k-th barrier is passed once the counter
            # reaches k * SPLIT, so the counter never needs resetting, across rows or calls (and
            # CUDA graph replays). The whole grid is resident at once (a cooperative launch
            # guarantees it or fails), so the waiting programs cannot starve the late ones.
            tl.debug_barrier()  # every thread of this program has stored before we signal
            arrived = tl.atomic_add(count_ptr + group, 1, sem="release")
            target = arrived - arrived % SPLIT + SPLIT
            while tl.atomic_add(count_ptr + group, 0, sem="acquire") < target:
                pass
            tl.debug_barrier()
        if PHASE != 1:
            # merge the SPLIT pairs: m = max m_s, d = sum d_s * exp(m_s - m); .cg reads from L2,
            # not from a stale L1 line
            m_parts = tl.load(stats_row + 2 * parts, mask=parts < SPLIT, other=-float("inf"), cache_modifier=".cg")
            d_parts = tl.load(stats_row + 2 * parts + 1, mask=parts < SPLIT, other=0.0, cache_modifier=".cg")
            m = tl.max(m_parts, axis=0)
            inv_d = 1.0 / tl.sum(d_parts * tl.exp(m_parts - m), axis=0)
            tl.store(out_ptr + row * stride_om + cols, (tl.exp(x - m) * inv_d).to(out_ptr.dtype.element_ty),
                     mask=mask)
        x = x_next


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. Elementwise kernels launch cdiv(n, BLOCK_SIZE)
# programs; the softmax kernels launch one program per row.

# %%
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 1024 elements per program: lesson 01's choice for add; the BLOCK_SIZE sweep below measures it
# again for the fused and the two-kernel versions.
DEFAULT_BLOCK_SIZE = 1024
# v1 keeps a whole row in registers: up to 16384 fp32 values (32 per thread at 16 warps).
MAX_FUSED_COLS = 16384
# v2 and v3 loop over chunks of this many columns (fewer when the row is shorter).
CHUNK_SIZE = 4096


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 (tl.arange needs one), got {block_size}")


def _elementwise_args(x, y, s, block_size, out):
    common.check_tensors(x=x, y=y, dtypes=FLOAT_DTYPES)
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(f"s must be a Python number, got {type(s).__name__}")
    _check_block_size(block_size)
    if out is None:
        return torch.empty_like(x)
    common.check_tensors(x=x, out=out)
    return out


def add_mul_two_step(x: torch.Tensor, y: torch.Tensor, s: float, block_size: int = DEFAULT_BLOCK_SIZE,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """v1, two kernels as eager PyTorch runs it: t = x + y, then out = t * s."""
    out = _elementwise_args(x, y, s, block_size, out)
    n = x.numel()
    t = torch.empty_like(x)  # the temporary that fusion removes: n elements written, then read
    grid = (triton.cdiv(n, block_size),)
    add_kernel[grid](x, y, t, n, BLOCK_SIZE=block_size)
    # float(s): Triton compiles one kernel for every float value; an int 1 would be specialised
    scale_kernel[grid](t, out, float(s), n, BLOCK_SIZE=block_size)
    return out


def add_mul(x: torch.Tensor, y: torch.Tensor, s: float, block_size: int = DEFAULT_BLOCK_SIZE,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """v2, fused: (x + y) * s in one kernel for contiguous x, y of one shape and float dtype."""
    out = _elementwise_args(x, y, s, block_size, out)
    n = x.numel()
    add_mul_kernel[(triton.cdiv(n, block_size),)](x, y, out, float(s), n, BLOCK_SIZE=block_size)
    return out


ADD_MUL_VERSIONS = common.Versions("add_mul")
ADD_MUL_VERSIONS.add("v1", "two kernels", add_mul_two_step)
ADD_MUL_VERSIONS.add("v2", "fused", add_mul)


def _softmax_args(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=FLOAT_DTYPES)
    if x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows (x.stride(1) == 1), got strides {x.stride()}; "
                         f"pass x.contiguous()")
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    common.check_tensors(x=x, out=out, contiguous=False)
    if out.stride(1) != 1:
        raise ValueError(f"out must have contiguous rows (out.stride(1) == 1), got strides {out.stride()}")
    return out


def _row_block(n_cols: int) -> int:
    # a power of 2 >= N; at least 16, so even a 1-column row gets an ordinary block shape
    return max(16, triton.next_power_of_2(n_cols))


def _softmax_num_warps(block_size: int) -> int:
    # More threads for longer blocks, so each thread holds at most 16 to 32 values in registers.
    return 16 if block_size >= 8192 else 8 if block_size >= 2048 else 4


def softmax(x: torch.Tensor, out: torch.Tensor | None = None, num_warps: int | None = None) -> torch.Tensor:
    """v1: softmax over the rows of a 2-D tensor; one program per row, the row in one block."""
    out = _softmax_args(x, out)
    n_rows, n_cols = x.shape
    if n_cols > MAX_FUSED_COLS:
        raise ValueError(f"softmax (v1) holds a whole row in one block, at most {MAX_FUSED_COLS} "
                         f"columns; got {n_cols}: use softmax_online for longer rows")
    block_size = _row_block(n_cols)
    softmax_kernel[(n_rows,)](x, out, x.stride(0), out.stride(0), n_cols, BLOCK_SIZE=block_size,
                              num_warps=num_warps or _softmax_num_warps(block_size))
    return out


def _softmax_chunked(kernel, x, out, block_size):
    out = _softmax_args(x, out)
    _check_block_size(block_size)
    n_rows, n_cols = x.shape
    block_size = min(block_size, _row_block(n_cols))  # no wasted lanes on short rows
    kernel[(n_rows,)](x, out, x.stride(0), out.stride(0), n_cols, BLOCK_SIZE=block_size,
                      num_warps=_softmax_num_warps(block_size))
    return out


def softmax_three_pass(x: torch.Tensor, out: torch.Tensor | None = None,
                       block_size: int = CHUNK_SIZE) -> torch.Tensor:
    """v2: softmax over rows of any length, in chunks: max, then sum, then write (3 reads)."""
    return _softmax_chunked(softmax_three_pass_kernel, x, out, block_size)


def softmax_online(x: torch.Tensor, out: torch.Tensor | None = None,
                   block_size: int = CHUNK_SIZE) -> torch.Tensor:
    """v3: online softmax over rows of any length: running max and sum, then write (2 reads)."""
    return _softmax_chunked(softmax_online_kernel, x, out, block_size)


# v4's dispatch: rows up to this many columns are one block in registers (16384 fp32 = 64 KiB a
# row: 32 values a thread at 16 warps); longer rows are split over several programs.
MAX_SINGLE_PASS_COLS = 16384
# Columns per program of a split row: 8192 (32 KiB of fp32) holds 32 values a thread at 8 warps,
# so 4 programs fit on an SM by registers, and the whole grid stays resident for the barrier.
SPLIT_SEGMENT = 8192


def _row_config(block_size: int, element_size: int) -> tuple[int, int]:
    """num_warps and num_stages for one row of BLOCK_SIZE columns in registers."""
    # About 64 bytes of the row a thread (16 fp32 or 32 bf16 values), 4 to 16 warps. Measured on
    # an H200 at 4096 columns: bf16 at 16 warps (8 values a thread) is 1.25x slower than at 4,
    # where the reductions' shuffles, not the loads, set the pace; fp32 barely moves from 4 to 16.
    num_warps = max(4, min(16, block_size * element_size // (64 * 32)))
    # With a persistent grid, two rows in flight per program hide the load latency; a pipelined
    # row stages through shared memory (BLOCK_SIZE * element_size bytes a stage), so long rows get
    # one stage. One program per row (the default) does not loop, and stages change nothing.
    num_stages = 2 if block_size * element_size <= 32 * 1024 else 1
    return num_warps, num_stages


def _split_warps(block_size: int, element_size: int = 4) -> int:
    # Measured on an H200 at 1024 x 131072, segment 8192: fp32 best at 16 warps (16 values a
    # thread), bf16 best at 4 (64 values a thread: fewer, wider loads per thread in flight).
    return max(4, min(16, block_size * element_size // (2048 if element_size >= 4 else 4096)))


@functools.cache
def _resident_programs(n_regs: int, shared: int, num_warps: int) -> int:
    """How many programs of one compiled kernel fit on the GPU at once (every SM full)."""
    p = torch.cuda.get_device_properties(common.DEVICE)
    regs_per_sm = getattr(p, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(p, "max_threads_per_multi_processor", 2048)
    smem_per_sm = getattr(p, "shared_memory_per_multiprocessor", 228 * 1024)
    threads = 32 * num_warps
    regs = -(-max(n_regs, 1) * 32 // 256) * 256 * num_warps  # registers go to warps in units of 256
    by_regs = regs_per_sm // regs
    by_smem = smem_per_sm // (shared + 1024) if shared else 32  # 1 KiB a block reserved by CUDA
    return max(1, min(by_regs, by_smem, threads_per_sm // threads, 32)) * p.multi_processor_count


_resident_cache: dict = {}


def _resident(kernel, args: tuple, meta: dict) -> int:
    """Programs of `kernel` at `meta` that fit on the GPU at once, from its compiled registers and
    shared memory; compiled and counted once per configuration and dtype, not on every call."""
    key = (kernel.fn.__name__, tuple(sorted(meta.items())), args[0].dtype, args[0].device)
    if key not in _resident_cache:
        compiled = kernel.warmup(*args, **meta, grid=(1,))
        compiled._init_handles()  # loads the binary: n_regs is known only then
        _resident_cache[key] = _resident_programs(compiled.n_regs, compiled.metadata.shared, meta["num_warps"])
    return _resident_cache[key]


_barrier_counters: dict = {}


def _counters(device, split: int, n: int) -> torch.Tensor:
    # One counter per group, zeroed once and kept: the barrier only ever adds, and the targets
    # are relative to the count seen on arrival, which is a multiple of SPLIT between barriers.
    # So one buffer per SPLIT (a count left at 16k is no multiple of 3), and per device and
    # stream, so that two streams never share a counter (int32: 2^31 arrivals, about a million
    # calls of 1024 rows).
    key = (device, split, torch.cuda.current_stream(device).cuda_stream if common.HAS_GPU else 0)
    buf = _barrier_counters.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _barrier_counters[key] = buf
    return buf


def softmax_fast(x: torch.Tensor, out: torch.Tensor | None = None,
                 max_single_pass_cols: int = MAX_SINGLE_PASS_COLS,
                 segment: int = SPLIT_SEGMENT, persistent: bool = False) -> torch.Tensor:
    """v4: softmax over the rows of a 2-D tensor, dispatched on the row length.

    n <= max_single_pass_cols: one block per row (softmax_rows_kernel), one program per row,
    or with persistent=True a few programs per SM that loop over the rows.
    Longer rows: cdiv(n, segment) programs per row with a barrier (softmax_split_row_kernel).
    Both read x once and write the output once. The two limits are arguments so that tests can
    take the split path at sizes the interpreter runs in seconds.
    """
    out = _softmax_args(x, out)
    for name, value in (("max_single_pass_cols", max_single_pass_cols), ("segment", segment)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return out
    if n_cols <= max_single_pass_cols:
        block_size = _row_block(n_cols)
        num_warps, num_stages = _row_config(block_size, x.element_size())
        args = (x, out, x.stride(0), out.stride(0), n_rows, n_cols)
        meta = dict(BLOCK_SIZE=block_size, NUM_STAGES=num_stages, num_warps=num_warps)
        grid = n_rows  # one program per row: the hardware scheduler refills each SM as rows finish
        if persistent:
            # a few programs per SM, each looping over rows (the Triton tutorial's layout);
            # measured slower than one program per row at 4096 and 8192 columns (the md says why)
            grid = min(n_rows, 4 if common.INTERPRETER else _resident(softmax_rows_kernel, args, meta))
        softmax_rows_kernel[(grid,)](*args, **meta)
        return out
    split = triton.cdiv(n_cols, segment)
    block_size = _row_block(triton.cdiv(n_cols, split))
    num_warps = _split_warps(block_size, x.element_size())
    stats = torch.empty((n_rows, split, 2), dtype=torch.float32, device=x.device)
    meta = dict(SPLIT=split, BLOCK_SIZE=block_size, SPLIT_BLOCK=max(16, triton.next_power_of_2(split)),
                num_warps=num_warps)
    if common.INTERPRETER:
        # The interpreter runs one program after another: a program waiting at the barrier for
        # the next would wait forever. Two launches do the same arithmetic in order: phase 1
        # stores every segment's (max, sum), phase 2 merges them, reads x again and writes.
        counters = _counters(x.device, split, 1)
        for phase in (1, 2):
            softmax_split_row_kernel[(n_rows * split,)](x, out, x.stride(0), out.stride(0), n_rows, n_cols,
                                                         stats, counters, PHASE=phase, **meta)
        return out
    meta.update(PHASE=0, launch_cooperative_grid=True)
    # launch_cooperative_grid: the driver starts all programs at once or refuses the launch;
    # without it, programs spinning at the barrier could wait for programs never scheduled.
    args = (x, out, x.stride(0), out.stride(0), n_rows, n_cols, stats, _counters(x.device, split, 1))
    resident = _resident(softmax_split_row_kernel, args, meta)
    if resident < split:
        raise ValueError(f"softmax_fast: {split} programs per row do not fit on the GPU at once; pass a larger "
                         f"segment (got {segment})")
    n_groups = min(n_rows, resident // split)
    args = (*args[:-1], _counters(x.device, split, n_groups))
    softmax_split_row_kernel[(n_groups * split,)](*args, **meta)
    return out


SOFTMAX_VERSIONS = common.Versions("softmax")
SOFTMAX_VERSIONS.add("v1", "one block", softmax)
SOFTMAX_VERSIONS.add("v2", "three passes", softmax_three_pass)
SOFTMAX_VERSIONS.add("v3", "online", softmax_online)
SOFTMAX_VERSIONS.add("v4", "by row length", softmax_fast)
# Bytes each version moves, in units of the M x N tensor: (reads, writes).
SOFTMAX_PASSES = {"v1": (1, 1), "v2": (3, 1), "v3": (2, 1), "v4": (1, 1)}


# %% [markdown]
# ## Check
# Awkward sizes, fresh random inputs, outputs filled with NaN first, references in float64;
# softmax rows must also sum to 1. The chunked versions run with small chunks here, so that
# every row takes several loop steps.

# %%
SCALARS = (1.0, 2.0, 10.0)


def _softmax_checked(chunk: int) -> list:
    """(label, fn, kwargs) for every softmax version; v4 twice, the second time forced onto the
    split-row path at small rows (several programs per row, the last segment partly masked)."""
    checked = [(v.label, v.fn, {} if v.key in ("v1", "v4") else {"block_size": chunk}) for v in SOFTMAX_VERSIONS]
    segment = 128 if common.INTERPRETER else 1024
    return checked + [(f"{SOFTMAX_VERSIONS['v4'].label} (split rows, segment {segment})", softmax_fast,
                       {"max_single_pass_cols": 16, "segment": segment})]


def _softmax_shapes(quick: bool) -> list[tuple[int, int]]:
    # Few distinct row lengths: on a GPU each one compiles its own kernels (BLOCK_SIZE differs).
    if common.INTERPRETER:
        cols = common.awkward_sizes(count=2, lo=300, hi=5000, include=(17,))
        return [(int(torch.randint(2, 6, ()).item()), n) for n in cols]
    cols = common.awkward_sizes(count=1 if quick else 2, lo=300, hi=MAX_FUSED_COLS, include=(17,))
    return [(1823, n) for n in cols] + ([] if quick else [(3, MAX_FUSED_COLS)])


def check(quick: bool) -> None:
    section("Check: every version against a float64 reference")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
    sizes = common.awkward_sizes(count=3 if quick else 6, lo=1000, hi=10_000_000, include=(1, 17))
    for dtype in dtypes:
        for n in sizes:
            x, y = common.randn(n, dtype=dtype), common.randn(n, dtype=dtype)
            for s in SCALARS:
                for v in ADD_MUL_VERSIONS:
                    out = common.poisoned_empty(n, dtype=dtype)
                    v.fn(x, y, s, out=out)
                    common.assert_close(out, (x.double() + y.double()) * s, name=f"add_mul {v.label} n={n} s={s}")
    for block_size in (256, 16384):  # the ends of the BLOCK_SIZE sweep below
        x, y = common.randn(sizes[0]), common.randn(sizes[0])
        for v in ADD_MUL_VERSIONS:
            common.assert_close(v.fn(x, y, 2.0, block_size), (x.double() + y.double()) * 2.0,
                                name=f"add_mul {v.label} BLOCK_SIZE={block_size}")
    print(f"add_mul (v1 two kernels, v2 fused) match for n in {sizes}, s in {SCALARS}: OK")

    shapes = _softmax_shapes(quick)
    chunk = 256  # several chunks per row even on the interpreter's small rows
    for dtype in dtypes:
        for m, n in shapes:
            base = common.randn(m, n + 7, dtype=dtype, scale=3.0)
            for x in (base[:, :n], base[:, :n].contiguous()):  # rows 7 elements apart, then packed
                expected = torch.softmax(x.double(), dim=1)
                for label, fn, kwargs in _softmax_checked(chunk):
                    out = common.poisoned_empty(m, n, dtype=dtype)
                    fn(x, out=out, **kwargs)
                    common.assert_close(out, expected, name=f"softmax {label} {m}x{n} {dtype}")
                    sums = out.double().sum(dim=1)
                    common.assert_close(sums, torch.ones_like(sums), atol=1e-3 if dtype == torch.float32 else 2e-2,
                                        rtol=0, name=f"softmax {label} {m}x{n}: row sums")
    x = common.randn(5, 1001) + 100.0  # exp(100) overflows fp32: only a max-subtracting softmax survives
    for label, fn, kwargs in _softmax_checked(chunk):
        common.assert_close(fn(x, **kwargs), torch.softmax(x.double(), dim=1), name=f"softmax {label}, rows shifted by +100")
    names = ", ".join(common.dtype_name(d) for d in dtypes)
    print(f"softmax v1..v4 (v4 on both of its paths) match for shapes {shapes} (strided and contiguous rows), dtypes {names}: OK")
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


# %% [markdown]
# ## Memory traffic
# What each version must move. PyTorch's ops are counted with a TorchDispatchMode (works on the
# CPU too); the Triton kernels' bytes are modelled from their loads and stores.


# %%
def traffic(n: int, m_rows: int, n_cols: int) -> None:
    section("Memory traffic: count the bytes")
    x, y = torch.randn(n, device=common.DEVICE), torch.randn(n, device=common.DEVICE)
    e = x.element_size()
    table = Table(f"(x + y) * s at n = {n:,} fp32", ["provider", "kernels", "read", "written", "total", "x minimum"])
    minimum = 3 * n * e  # read x and y, write the output
    counted = common.count_torch_traffic(add_mul_reference, x, y, 2.0)
    table.add("PyTorch (x + y) * s, counted", counted.kernels, fmt_bytes(counted.read), fmt_bytes(counted.written),
              fmt_bytes(counted.total), counted.total / minimum)
    for name, kernels, read, written in (("Triton v1 two kernels, modelled", 2, 3 * n * e, 2 * n * e),
                                         ("Triton v2 fused, modelled", 1, 2 * n * e, n * e)):
        table.add(name, kernels, fmt_bytes(read), fmt_bytes(written), fmt_bytes(read + written),
                  (read + written) / minimum)
    table.print()
    print("Fusing removes the temporary t: 5n elements moved become 3n, so a fused kernel can be "
          "up to 5/3 = 1.67x faster where the bytes set the time.")

    x2 = torch.randn(m_rows, n_cols, device=common.DEVICE)
    mn = x2.numel() * x2.element_size()
    table = Table(f"softmax of {m_rows:,} x {n_cols:,} fp32", ["provider", "kernels", "read", "written", "total",
                                                                "x minimum"])
    for name, fn in (("PyTorch naive (op by op), counted", softmax_naive),
                     ("torch.softmax, counted", softmax_reference)):
        counted = common.count_torch_traffic(fn, x2)
        table.add(name, counted.kernels, fmt_bytes(counted.read), fmt_bytes(counted.written),
                  fmt_bytes(counted.total), counted.total / (2 * mn))
    for key, (reads, writes) in SOFTMAX_PASSES.items():
        table.add(f"Triton {SOFTMAX_VERSIONS[key].label}, modelled", 1, fmt_bytes(reads * mn), fmt_bytes(writes * mn),
                  fmt_bytes((reads + writes) * mn), (reads + writes) / 2)
    table.print()
    print("The naive softmax writes z and exp(z) to memory and reads them back; the fused kernels "
          "keep them in registers.")


# %% [markdown]
# ## Benchmark
# Declared once, run by common.Benchmark: every provider is timed on every case in alternating
# rounds. GB/s counts the *minimum* bytes (inputs read once, output written once) for every
# provider, so one that moves more than the minimum shows a lower rate; % copy is against a
# device-to-device copy measured in the same run. The registry races the fastest baselines:
# for (x + y) * s eager PyTorch (two kernels) and torch.compile (which fuses it too), for
# softmax torch.softmax, the naive op-by-op version and torch.compile of it.

# %%
BAR_N = 2**28  # elements: 1 GiB per fp32 tensor, far beyond L2
SCALARS_TITLE = "(x + y) * s at n = 2^28 fp32: does the value of s matter?"


def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 1 and n & (n - 1) == 0 else f"{n:,}"


def _add_mul_inputs(n: int) -> tuple:  # fresh tensors: the graph timer binds several copies in turn
    return torch.randn(n, device=common.DEVICE), torch.randn(n, device=common.DEVICE), 2.0


@functools.cache
def _pair(n: int) -> tuple:  # one pair at 2^28, shared by the benchmarks that race on it
    return torch.randn(n, device=common.DEVICE), torch.randn(n, device=common.DEVICE)


@functools.cache
def _rows(m: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(m, n, device=common.DEVICE, dtype=dtype)


def _add_mul_bytes(x, y, *_) -> int:
    return 3 * x.numel() * x.element_size()  # read x and y, write the output


def _softmax_bytes(x, *_) -> int:
    return 2 * x.numel() * x.element_size()  # read x, write the output


_ADD_MUL = dict(op="elementwise", kernels=ADD_MUL_VERSIONS, reference=add_mul_reference, dtype=torch.float32)
_SOFTMAX = dict(op="softmax", reference=softmax_naive, nbytes=_softmax_bytes, ceiling="copy", dtype=torch.float32,
                cpu_cases=[(3, 300)], setup=lambda m, n: (_rows(m, n),))
_N = BAR_N if common.HAS_GPU else 1000  # the interpreter runs the sweeps on a small pair
# The shapes: rows that fit in registers, and 1024 long rows (fewer rows than 8 per SM).
FAST_SOFTMAX_CASES = [(4096, 4096), (8192, 8192), (1024, 131072)]

BENCHMARKS = [
    common.Benchmark(
        "(x + y) * s over sizes, fp32, s = 2.0: GPU time per call (in a CUDA graph)", **_ADD_MUL,
        cases=[2**e for e in range(12, 29, 4)], quick_cases=[2**16, 2**24], cpu_cases=[1000],
        setup=_add_mul_inputs, nbytes=_add_mul_bytes, ceiling="copy", timer="graph", label=_pow2,
        plot="06_kernel_fusion_add_mul_sizes", xlabel="elements", logx=True,
        note="GPU time only (no Python between calls). At large sizes compare v2 vs v1 and torch eager with the "
             "5/3 = 1.67x the byte count allows; small sizes fit in L2. The launch cost is the host table below."),
    common.Benchmark(
        "(x + y) * s at n = 2^28 fp32: the perf bars", **_ADD_MUL, cases=[BAR_N], cpu_cases=[1000],
        setup=lambda n: (*_pair(n), 2.0), nbytes=_add_mul_bytes, ceiling="copy", memory=True, label=_pow2,
        bars=[common.Bar("v2 fused", BAR_N, "baseline", 0.98),  # on par: within the 2% timings differ by
              common.Bar("v2 fused", BAR_N, "v1 two kernels", 1.4)],  # what fusion buys over 5n -> 3n
        note="Peak extra memory is the output plus, for the two-kernel versions, the temporary x + y."),
    common.Benchmark(
        "(x + y) * s on tiny tensors: host wall time per call (Python, checks, launch)", **_ADD_MUL,
        cases=[1, 2**10, 2**14], cpu_cases=[100], setup=_add_mul_inputs, timer="wall", label=_pow2,
        note="Host time per call of back-to-back calls: the launch cost (Python, argument checks, the driver), "
             "paid once per kernel, so v1's two launches cost about twice v2's one. Not GPU time: that is the "
             "graph-timed table above."),
    common.Benchmark(
        SCALARS_TITLE, **_ADD_MUL, cases=SCALARS, cpu_cases=[2.0], setup=lambda s: (*_pair(_N), s),
        nbytes=_add_mul_bytes, label=lambda s: f"s = {s}", plot="06_kernel_fusion_add_mul_scalars", xlabel="s",
        note="A memory-bound kernel does the same loads and stores whatever s is; Triton compiles one "
             "kernel for every float s (it specialises ints equal to 1, never floats)."),
    common.Benchmark(
        "(x + y) * s: BLOCK_SIZE sweep at n = 2^28 fp32 (num_warps = 4)", op=None, kernels=ADD_MUL_VERSIONS,
        cases=[2**k for k in range(8, 15)], quick_cases=[2**10], cpu_cases=[256],
        setup=lambda block: (*_pair(_N), 2.0, block), nbytes=_add_mul_bytes, ceiling="copy", dtype=torch.float32,
        label=lambda block: f"BLOCK_SIZE={block}", plot="06_kernel_fusion_add_mul_block_size",
        xlabel="BLOCK_SIZE", logx=True),
    common.Benchmark(
        "softmax 4096 x 4096 fp32: fused vs op by op", **_SOFTMAX, kernels=SOFTMAX_VERSIONS,
        cases=[(4096, 4096)], memory=True,
        bars=[common.Bar("v1 one block", (4096, 4096), "ceiling", 85),
              common.Bar("v1 one block", (4096, 4096), "baseline", 1.0)],
        note="Peak extra memory: the output, plus every intermediate the op-by-op version keeps alive."),
    *[common.Benchmark(
        # v4 alone with the baselines: each case compiles torch.compile once, and v1..v3 are
        # raced above. 1024 x 131072 takes v4's split path: 16 programs per row.
        f"softmax {name}: v4 at square and long rows",
        **{**_SOFTMAX, "dtype": dtype, "setup": lambda m, n, dtype=dtype: (_rows(m, n, dtype),)},
        kernels=SOFTMAX_VERSIONS.providers(only=["v4"]), cases=FAST_SOFTMAX_CASES,
        quick_cases=[(4096, 4096), (1024, 131072)],
        bars=[common.Bar(SOFTMAX_VERSIONS["v4"].label, case, vs, at_least)
              for case in FAST_SOFTMAX_CASES for vs, at_least in (("baseline", 1.0), ("ceiling", 90))],
        note="GB/s counts 2 x M x N x element size (read x, write y), for every provider. v4 reads x once on both "
             "paths: the split path keeps each row segment in registers across the barrier, so its bytes are "
             "the minimum too.")
      for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
      if dtype != torch.bfloat16 or common.supports_bf16()],
    common.Benchmark(
        "softmax v1 at 4096 x 4096 fp32: num_warps sweep", op=None, cases=[4, 8, 16], cpu_cases=[4],
        setup=lambda warps: (_rows(4096, 4096) if common.HAS_GPU else _rows(3, 300), warps),
        kernels={"v1 one block": lambda x, warps: softmax(x, num_warps=warps)}, nbytes=_softmax_bytes,
        ceiling="copy", dtype=torch.float32, label=lambda warps: f"num_warps={warps}",
        note=f"The wrapper picks num_warps = {_softmax_num_warps(4096)} for rows of 4096."),
    common.Benchmark(
        # v1 stops at 16384 columns (a row in one block): the chunked versions and v4 race over
        # every length (v4 splits the rows past 16384 over several programs).
        "softmax over row lengths, M x N = 2^24 fp32", **_SOFTMAX,
        kernels=SOFTMAX_VERSIONS.providers(only=["v2", "v3", "v4"]),
        cases=[(2**24 >> e, 2**e) for e in range(12, 19, 2)], plot="06_kernel_fusion_softmax_rows",
        xlabel="M x N",
        note="v2 and v3 differ by one read of the row (4 vs 3 tensor-sized transfers). With few, long rows "
             "there are fewer programs than SMs: exercise 6.3 splits each row over several programs."),
]


def launches() -> None:
    """GPU kernels per call, counted by torch.profiler: the launches that fusion saves (GPU only)."""
    section("Launches: GPU kernels per call (torch.profiler)")
    x, y, rows = torch.randn(2**20, device=common.DEVICE), torch.randn(2**20, device=common.DEVICE), _rows(4096, 4096)
    table = Table("GPU kernels per call (\"-\": the profiler could not count here)", ["op", "provider", "kernels"])
    for op, args, providers in (
            ("(x + y) * s", (x, y, 2.0), {"torch eager": add_mul_reference, **ADD_MUL_VERSIONS.providers(),
                                          "torch.compile": common.compiled(add_mul_reference, x, y, 2.0)}),
            ("softmax", (rows,), {"torch eager (naive)": softmax_naive, "torch.softmax": softmax_reference,
                                  **SOFTMAX_VERSIONS.providers(),
                                  "torch.compile (naive)": common.compiled(softmax_naive, rows)})):
        for name, fn in providers.items():
            if fn is not None:
                table.add(op, name, common.gpu_kernel_count(lambda: fn(*args)) or "-")  # noqa: B023 (called now)
    table.print()
    print("torch.compile fuses these chains itself: count its kernels as well as timing it.")


def scalar_spread(results) -> None:
    """Slowest / fastest time over the s values, per provider: compare it with one timing's ± spread."""
    for name in dict.fromkeys(n for r in results for n in r.times):
        ms = [r.times[name].ms for r in results if name in r.times]
        if len(ms) > 1:
            print(f"{name}: slowest / fastest over s = {max(ms) / min(ms):.3f}")


# %% [markdown]
# ## Takeaways
# - Count the bytes: every intermediate an unfused op writes and reads back costs bandwidth;
#   fused, it stays in registers. (x + y) * s moves 5n elements unfused, 3n fused.
# - Fused softmax reads each row once and writes it once; op by op it moves about 4x more and
#   keeps row-sized intermediates alive (peak memory).
# - Rows longer than one block: loop over chunks. Online softmax keeps a running max and sum,
#   rescaling the sum by exp(m_old - m_new) when the max grows, and reads the row twice, not 3x.
# - On tiny tensors launches, not bytes, set the time: fewer kernels is faster.
# - torch.compile fuses chains like these itself (the profiler column counts its kernels):
#   measure it as a peer, every time.


# %%
if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    if common.HAS_GPU:
        traffic(2**28, 4096, 4096)
    else:
        traffic(2**20, 256, 1000)
    if common.HAS_GPU:
        launches()
    results = common.run_benchmarks(BENCHMARKS, args.quick)
    scalar_spread(results[SCALARS_TITLE])
