"""
Lesson 10: autotuning and performance models
============================================

Let the GPU pick a kernel's tiles by timing them, and predict from bytes and FLOPs how fast a
kernel can possibly run, so that you know what a tuning result is worth and when to stop.

You will learn:
- `triton.autotune`: configs, the `key` that decides when to tune again, pruning configs before
  they are compiled (`early_config_prune`) and ranking them with a model (`perf_model`, `top_k`)
- `triton.heuristics`: meta-parameters computed from the arguments, with no timing (EVEN_K)
- what tuning costs (the first call against later ones), where its result is kept (in the
  process, per key; on disk only with `cache_results`), and why a kernel that accumulates or
  writes in place needs `reset_to_zero` or `restore_value`
- hardware queries: SMs, shared memory, registers, memory clock and bus width
- a roofline model: predicted time = launch + max(bytes / bandwidth, FLOPs / peak), next to the
  measured time of kernels from lessons 01, 06, 08 and this one
- a persistent kernel: one program per SM looping over tiles, against one program per tile
- split-K: more programs for problems with too few tiles to fill the GPU (programs and waves
  counted per config, atomics or a workspace to add the partials)

Run:  python lessons/expert/10_autotuning.py [--quick]
"""

import functools
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

from common import Table, fmt_bytes, section
from common.kernels import grouped_tile_position
from common.lessons import lesson_module

# %% [markdown]
# ## Motivation
# Lesson 04's matmul has six knobs: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.
# The best values depend on the shape, the dtype and the GPU, and the difference between a good
# and a poor choice is measured in tens of percent. Nobody can compute the best config from
# first principles, but the GPU can time a handful: that is autotuning. It has costs (every
# config is compiled and timed on the first call for each new shape) and pitfalls (a kernel
# that adds into its output is run many times while it is tuned).
#
# A performance model answers the other question: how fast *could* this kernel be? The roofline
# says a kernel cannot move bytes faster than the memory bandwidth nor compute faster than the
# peak, so its time is at least max(bytes / bandwidth, FLOPs / peak). A kernel at 95% of that
# bound is done; one at 30% has something left to find. The same model, cruder, can rank
# configs before any is compiled.

# %% [markdown]
# ## Reference (PyTorch)
# The kernels of this lesson and what they must move. `Cost` holds the FLOPs and the minimum
# bytes (each input read once, each output written once) that the roofline turns into a time.


# %%
def matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b  # reads M*K + K*N elements, writes M*N; 2*M*N*K FLOPs


def sum_reference(x: torch.Tensor) -> torch.Tensor:
    return x.float().sum().reshape(1)  # reads n, writes 1


def scale_reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * scale  # reads n, writes n (the kernel writes in place, over x)


@dataclass(frozen=True)
class Cost:
    """What a kernel must do at the least: FLOPs, and bytes moved to and from memory."""

    flops: float
    nbytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.nbytes  # FLOPs per byte: where the kernel sits on the roofline


def matmul_cost(M: int, N: int, K: int, element_size: int) -> Cost:
    return Cost(2 * M * N * K, (M * K + K * N + M * N) * element_size)


def add_cost(n: int, element_size: int) -> Cost:
    return Cost(n, 3 * n * element_size)  # one add per element; read x and y, write out


def softmax_cost(rows: int, cols: int, element_size: int) -> Cost:
    # max, subtract, exp, sum, divide: 5 operations per element (an exp counted as one)
    return Cost(5 * rows * cols, 2 * rows * cols * element_size)


def rmsnorm_cost(rows: int, cols: int, element_size: int) -> Cost:
    # square, sum, times rstd, times w: 4 per element; read x, write y (and w once, negligible)
    return Cost(4 * rows * cols, (2 * rows * cols + cols) * element_size)


def roofline_time(cost: Cost, peak_tflops: float, bandwidth_gbps: float, launch_us: float = 0.0):
    """(seconds, bound): the least time a kernel doing `cost` can take, and which ceiling sets it.

    Loads and math overlap on a GPU, so the slower of the two sets the time: max, not a sum.
    """
    t_memory = cost.nbytes / (bandwidth_gbps * 1e9)  # GB/s = 1e9 bytes per second
    t_math = cost.flops / (peak_tflops * 1e12)  # TFLOP/s = 1e12 FLOPs per second
    return launch_us * 1e-6 + max(t_memory, t_math), ("memory" if t_memory >= t_math else "compute")


# %% [markdown]
# ## Hardware queries
# Triton's driver reports what its compiler plans with (shared memory per program, SMs,
# registers); torch reports the rest. Without a GPU there is nothing to ask: the interpreter
# run uses H100 SXM's numbers (datasheet) so that the pruning and the model print something,
# and says so.

# %%
ASSUMED_GPU = {  # used only when there is no GPU to query; a GPU run replaces every value
    "name": "H100 SXM (datasheet values, assumed: no GPU to query)",
    "multiprocessor_count": 132,
    "max_shared_mem": 232448,  # 227 KiB per program (the opt-in maximum of sm_90)
    "bandwidth_gbps": 3350.0,  # HBM3
    "peak_tflops": 989.0,  # dense fp16 tensor cores
}


@functools.cache
def device_properties() -> dict:
    """SMs, shared memory, registers, clocks of this GPU: Triton's driver and torch's, merged."""
    if not common.HAS_GPU:
        return dict(ASSUMED_GPU)
    index = torch.cuda.current_device()
    props = dict(triton.runtime.driver.active.utils.get_device_properties(index))
    p = torch.cuda.get_device_properties(index)
    props.update(name=p.name, total_memory=p.total_memory, capability=f"sm_{p.major}{p.minor}",
                 l2_cache_size=getattr(p, "L2_cache_size", None),
                 max_threads_per_sm=getattr(p, "max_threads_per_multi_processor", None),
                 regs_per_sm=getattr(p, "regs_per_multiprocessor", None))
    return props


def sm_count() -> int:
    return int(device_properties()["multiprocessor_count"])


def shared_memory_limit() -> int:
    """Bytes of shared memory one program may use: what decides which tiles x stages compile."""
    return int(device_properties()["max_shared_mem"])


def theoretical_bandwidth_gbps(props: dict) -> float | None:
    """What the memory clock and bus promise: 2 transfers per clock (DDR) x bus width in bytes."""
    clock_khz, bus_bits = props.get("mem_clock_rate"), props.get("mem_bus_width")
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


@functools.cache
def ceilings() -> tuple[float, float]:
    """(peak TFLOP/s, bandwidth GB/s): measured now on a GPU (cuBLAS fp16, a copy), else assumed."""
    if common.HAS_GPU:
        return common.matmul_rate(torch.float16), common.copy_bandwidth()
    return ASSUMED_GPU["peak_tflops"], ASSUMED_GPU["bandwidth_gbps"]


# %% [markdown]
# ## Kernel
# One tile of C = A @ B, as in lesson 04's v3, split into two helpers so that the one-program-
# per-tile kernel and the persistent kernel share them:
#   grouped_tile_position  which (pid_m, pid_n) tile a tile id is, in grouped order (L2 reuse);
#                          lesson 04 writes it out, common/kernels.py holds it for later lessons
#   _matmul_tile           the K loop of tl.dot into an fp32 accumulator, and the store
# EVEN_K says K is a multiple of BLOCK_K: then no load needs a K mask. Rows past M and columns
# past N are wrapped (% M, % N) instead of masked: they load valid memory, compute values that
# are never stored, and leave the loads of the K loop without any mask.


# %%
@triton.jit
def _matmul_tile(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    # (pid_m, pid_n): the tile's row and column among the tiles; the rest as in matmul_kernel below
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M  # wrapped: always a valid row of A, so the loads need no M mask
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # the last step holds fewer than BLOCK_K: zeros past K add nothing to the dot
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def matmul_kernel(
    a_ptr,  # A, M x K: A[m, k] at a_ptr + m * stride_am + k * stride_ak
    b_ptr,  # B, K x N: B[k, n] at b_ptr + k * stride_bk + n * stride_bn
    c_ptr,  # C, M x N, the dtype of A and B
    M, N, K,  # the matrix sizes
    stride_am, stride_ak,  # strides of A, in elements
    stride_bk, stride_bn,  # strides of B
    stride_cm, stride_cn,  # strides of C
    BLOCK_M: tl.constexpr,  # rows of C per program
    BLOCK_N: tl.constexpr,  # columns of C per program
    BLOCK_K: tl.constexpr,  # K consumed by one tl.dot
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped program order
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks (set by the heuristic below)
):
    # One program per output tile: the grid is cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs.
    pid_m, pid_n = grouped_tile_position(tl.program_id(axis=0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _matmul_tile(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)


@triton.jit
def matmul_persistent_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    num_programs,  # the grid's size: program p computes tiles p, p + num_programs, p + 2 * num_programs, ...
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # A persistent kernel launches one program per SM (num_programs = the SM count), and each
    # program loops over tiles: the hardware schedules num_programs programs, not one per tile.
    # Each iteration still computes its tile's position and pointers, as the per-tile kernel does.
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(axis=0), num_tiles, num_programs):
        pid_m, pid_n = grouped_tile_position(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _matmul_tile(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                     stride_cn, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)


# %% [markdown]
# ### Split-K: more programs for a problem with few tiles
# 1024^3 in 128 x 128 tiles is 64 programs: on 132 SMs, more than half the GPU has nothing to do,
# and no tile order or persistent loop changes that. Split-K cuts the K loop too: the grid is
# (tiles, slices), program (t, s) sums its tile over slice s of K, and the slices' fp32 partials
# are added up after. Two ways to add them:
#   ATOMIC=True   every program adds its partial into one zeroed fp32 M x N buffer (tl.atomic_add):
#                 one launch, no workspace, but the order of the adds is whichever finishes first,
#                 so the low bits of the result can change from run to run
#   ATOMIC=False  program (t, s) stores its partial in slice s of a (slices, M, N) fp32 workspace,
#                 and split_k_reduce_kernel adds the slices in order 0, 1, ... and casts: the same
#                 bits every run, for 2 x slices x M x N x 4 bytes more traffic and a second launch
# Every slice holds a whole number of BLOCK_K steps (the wrapper rounds K_PER_SPLIT up), so the
# only partial step is K's own tail, in the last slice: the K mask is the same `k < K` as before.


# %%
@triton.jit
def matmul_split_k_kernel(
    a_ptr, b_ptr,  # A (M x K) and B (K x N), as in matmul_kernel
    c_ptr,  # fp32: the zeroed M x N sum (ATOMIC) or the (slices, M, N) workspace
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_cs,  # elements between slice s's partial and slice s + 1's in the workspace (0 with ATOMIC)
    K_PER_SPLIT,  # K per slice, a multiple of BLOCK_K: slice s sums k in [s K_PER_SPLIT, (s + 1) K_PER_SPLIT) and k < K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks (then every step of every slice is whole)
    ATOMIC: tl.constexpr,  # True: add the partial into c with atomics; False: store it in slice s of c
):
    # Axis 0 is the tile, in grouped order as in matmul_kernel; axis 1 is the slice of K.
    pid_m, pid_n = grouped_tile_position(tl.program_id(axis=0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(axis=1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # the last slice may be shorter
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M  # wrapped, as in _matmul_tile: the loads need no M or N mask
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + (k_start + offs_k)[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # slices end on BLOCK_K boundaries: only the step holding K's tail is partial
            k_left = K - k
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ATOMIC:  # relaxed: the adds need no order among themselves, only to be whole (atomic)
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(c_ptrs + pid_k.to(tl.int64) * stride_cs, acc, mask=mask)


@triton.jit
def split_k_reduce_kernel(
    ws_ptr,  # (SPLIT_K, M, N) fp32 partials, contiguous
    c_ptr,  # M x N output, the inputs' dtype
    M, N, stride_cm, stride_cn,
    SPLIT_K: tl.constexpr,  # slices to add (a constexpr: the loop is unrolled)
    BLOCK_SIZE: tl.constexpr,  # elements of C per program
):
    offs = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < M * N
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    ptrs = ws_ptr + offs
    for _ in range(SPLIT_K):  # slice 0, then 1, ...: the same order, so the same bits, on every run
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += M * N
    m, n = offs // N, offs % N
    tl.store(c_ptr + m * stride_cm + n * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# ### Programs and waves: how many slices
# A wave is one program per SM. `split_k_waves` counts, for a problem, a config and a slice count,
# the programs, the waves, how full the last wave is, and the K loop each program runs. Its
# `busiest_sm_k` is the K the busiest SM walks through: whole waves times K per slice. If one
# program runs on an SM at a time and a K step costs the same everywhere, the time follows it, so
# `choose_split_k` takes the fewest slices that bring it within SPLIT_K_SLACK of its least (every
# slice adds M x N fp32 partials), keeping at least MIN_K_STEPS steps per slice, so that the
# pipelined loop has loads to overlap. No GPU is needed: only the SM count.


# %%
MIN_K_STEPS = 4  # BLOCK_K steps per slice at the least: fewer leave a pipelined K loop mostly prologue
MAX_SPLIT_K = 16
# A split must save more than this share of the busiest SM's K to be taken: each slice adds M x N fp32
# partials to write and add, which a gain of a few percent (a problem of many waves already) does not repay.
SPLIT_K_SLACK = 0.1
# Split only problems whose tiles fill at most this share of the SMs. Measured on an H100
# (2026-12-07, fp16): with 64 tiles on 132 SMs (1024^3 in 128 x 128 tiles, M = 16..128 against
# N = K = 8192) every split was slower than one program per tile (1024^3: 0.0104 ms plain, 0.0196
# with 2 slices; M = 64: 0.0608 plain, 0.0653 with 2), since the zeroed fp32 buffer, the atomics and
# the cast cost more than the idle half-wave; with 16 tiles (512 x 512 x 16384) 8 slices were 1.8x
# faster than one program per tile (0.0335 against 0.0602 ms).
SPLIT_K_MAX_WAVE = 0.25


@dataclass(frozen=True)
class SplitKWaves:
    tiles: int  # output tiles: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    slices: int  # K slices actually launched (split_k_slices may drop empty ones)
    k_per_split: int  # K per slice, a multiple of BLOCK_K
    programs: int  # tiles * slices
    sms: int

    @property
    def waves(self) -> float:
        return self.programs / self.sms

    @property
    def last_wave_full(self) -> float:
        """The fraction of the SMs that have a program in the last wave (1.0: no SM idles)."""
        return (self.programs - (triton.cdiv(self.programs, self.sms) - 1) * self.sms) / self.sms

    @property
    def busiest_sm_k(self) -> int:
        """K steps x BLOCK_K the busiest SM runs: whole waves x K per slice."""
        return triton.cdiv(self.programs, self.sms) * self.k_per_split


def split_k_slices(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K per slice, slices): cdiv(K, split_k) rounded up to whole BLOCK_K steps, and the slices that
    takes. Rounding can leave the last asked-for slices empty; they are not launched (K = 100,
    BLOCK_K = 64, split_k = 4: 64 per slice, 2 slices)."""
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(K, k_per_split)


def split_k_waves(M: int, N: int, K: int, config: dict, split_k: int, sms: int) -> SplitKWaves:
    tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
    k_per_split, slices = split_k_slices(K, config["BLOCK_K"], split_k)
    return SplitKWaves(tiles, slices, k_per_split, tiles * slices, sms)


def choose_split_k(M: int, N: int, K: int, config: dict, sms: int, max_split: int = MAX_SPLIT_K) -> int:
    """The fewest slices (1..max_split, each of at least MIN_K_STEPS steps of BLOCK_K) whose busiest
    SM runs at most SPLIT_K_SLACK more K than the best slice count's; 1 when the tiles alone fill
    more than SPLIT_K_MAX_WAVE of the SMs."""
    if split_k_waves(M, N, K, config, 1, sms).tiles > SPLIT_K_MAX_WAVE * sms:
        return 1
    splits = [s for s in range(1, max_split + 1) if s == 1 or K >= s * MIN_K_STEPS * config["BLOCK_K"]]
    busiest = {s: split_k_waves(M, N, K, config, s, sms).busiest_sm_k for s in splits}
    best = min(busiest.values())
    return min(s for s in splits if busiest[s] <= (1 + SPLIT_K_SLACK) * best)


# %% [markdown]
# ### triton.heuristics: a meta-parameter computed, not timed
# EVEN_K has one right value for each call, computable from the arguments: no need to time
# both. `triton.heuristics` computes it on every launch. Under an autotuner the heuristic runs
# after the config is chosen, so it can read the config's BLOCK_K.

# %%
matmul_heuristic_kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(matmul_kernel)


# %% [markdown]
# ### triton.autotune: configs, key, pruning, a performance model
# On the first call for each new key (here M, N, K; Triton adds the dtype of every tensor
# argument), the autotuner prunes the configs, times each survivor with do_bench (compiling it
# first if needed), and keeps the fastest in `kernel.cache[key]`. Later calls with that key go
# straight to the kept config.


# %%
def _config(bm, bn, bk, group_m, num_warps, num_stages) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=num_warps, num_stages=num_stages)


# What a careful person picks for fp16 on an H100/H200 (sm_90), by lesson 04's sweeps.
# Shared memory of a config = num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes.
GPU_HAND_PICKED = [
    _config(128, 128, 64, 8, 4, 4),  # 128 KiB
    _config(128, 256, 64, 8, 8, 3),  # 144 KiB
    _config(256, 128, 64, 8, 8, 3),  # 144 KiB
    _config(64, 128, 64, 8, 4, 4),  # 96 KiB
    _config(128, 64, 64, 8, 4, 4),  # 96 KiB
]
GPU_EXTRA_CONFIGS = [
    _config(128, 256, 64, 16, 8, 4),  # 192 KiB: lesson 04's fastest on H200
    _config(128, 256, 64, 8, 8, 5),  # 240 KiB: more than 227 KiB, pruned on H100/H200
    _config(64, 64, 64, 8, 4, 4),  # 64 KiB: small problems
    _config(16, 128, 128, 8, 4, 4),  # 144 KiB: M <= 16 (a few rows times a big matrix)
]
if common.INTERPRETER:
    # The interpreter runs programs one after another on numpy: small tiles keep the checks fast,
    # and the tuner's mechanics (key, cache, pruning, hooks) are the same as on a GPU.
    HAND_PICKED = [_config(16, 16, 16, 2, 1, 1), _config(32, 32, 32, 4, 4, 1)]
    EXTRA_CONFIGS = [_config(32, 16, 32, 4, 2, 1), _config(64, 32, 32, 4, 4, 1)]
else:
    HAND_PICKED, EXTRA_CONFIGS = GPU_HAND_PICKED, GPU_EXTRA_CONFIGS
MATMUL_CONFIGS = HAND_PICKED + EXTRA_CONFIGS
# The config of the checks: small enough that fp32 tiles fit in shared memory on any sm_80+ GPU
# (64 x 64 x 64, 4 stages, fp32: 128 KiB on sm_90, which keeps 4 buffers; 96 KiB on sm_80-89,
# which keep 3, inside the 99 KiB of an RTX 3090 or 4090: compiled, tests/test_capabilities.py),
# and fast in the interpreter.
CHECK_CONFIG = HAND_PICKED[-1] if common.INTERPRETER else GPU_EXTRA_CONFIGS[2]


def config_smem_bytes(config: triton.Config, element_size: int) -> int:
    """Shared memory the pipelined K loop needs: num_stages buffers of an A tile and a B tile."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size


def prune_matmul_configs(configs: list, named_args: dict, **kwargs) -> list:
    """early_config_prune: drop configs that cannot compile here or cannot be fastest.

    Called once per new key, before anything is compiled. A config whose buffers exceed the
    shared memory of an SM fails to compile (OutOfResources): the tuner would skip it, after
    paying for the attempt. A tile taller than M (or wider than N) computes rows that are
    masked away: a smaller tile does the same work, so it never wins.
    """
    M, N = named_args["M"], named_args["N"]
    element_size = named_args["a_ptr"].element_size()
    fits = [c for c in configs if config_smem_bytes(c, element_size) <= shared_memory_limit()]
    needed = [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(M))
              and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(N))]
    if needed:
        return needed
    # the tuner needs at least one config: the smallest tile that fits
    return [min(fits or configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def matmul_perf_model(M, N, K, a_ptr, BLOCK_M, BLOCK_N, BLOCK_K, **kwargs) -> float:
    """perf_model: an estimate in ms of one config, from the roofline of one tile and the waves.

    The tiles run in waves of one tile per SM. One tile takes the slower of its math (2 BM BN K
    FLOPs at the SM's share of the peak) and its loads ((BM + BN) K elements at the SM's share of
    the bandwidth, as if nothing came from L2). A model this simple ranks; it does not time.
    """
    peak_tflops, bandwidth_gbps = ceilings()
    sms = sm_count()
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    waves = triton.cdiv(tiles, sms)
    tile_math_s = 2 * BLOCK_M * BLOCK_N * K / (peak_tflops * 1e12 / sms)
    tile_load_s = (BLOCK_M + BLOCK_N) * K * a_ptr.element_size() / (bandwidth_gbps * 1e9 / sms)
    return 1e3 * waves * max(tile_math_s, tile_load_s)


def _interpreter_bench(kernel_call: Callable, quantiles=None) -> list[float]:
    """The tuner's timer under the interpreter: one call, wall clock. Says nothing about a GPU."""
    start = time.perf_counter()
    kernel_call()
    ms = 1e3 * (time.perf_counter() - start)
    return [ms, ms, ms]


# On a GPU the tuner times with Triton's own do_bench (the function common.bench wraps: median of
# CUDA-event timings with the L2 flushed); the interpreter has no GPU timer, so it gets a clock.
TUNER_BENCH = _interpreter_bench if common.INTERPRETER else None
MODEL_TOP_K = 3  # configs the perf-model tuner times, of those that survive pruning

matmul_tuned_kernel = triton.autotune(
    configs=MATMUL_CONFIGS, key=["M", "N", "K"], do_bench=TUNER_BENCH,
    prune_configs_by={"early_config_prune": prune_matmul_configs})(matmul_heuristic_kernel)

matmul_modelled_kernel = triton.autotune(
    configs=MATMUL_CONFIGS, key=["M", "N", "K"], do_bench=TUNER_BENCH,
    prune_configs_by={"early_config_prune": prune_matmul_configs, "perf_model": matmul_perf_model,
                      "top_k": MODEL_TOP_K})(matmul_heuristic_kernel)


# %% [markdown]
# ### Kernels the tuner runs more than once per call
# While it tunes, the autotuner runs the kernel many times on the *real* arguments. A kernel
# that adds into its output (atomics) or updates a tensor in place sees every one of those runs.
# `reset_to_zero=[...]` zeroes the named arguments before each timed run (and once more before
# the real one); `restore_value=[...]` copies them first and puts them back after each run.


# %%
@triton.jit
def sum_atomic_kernel(
    x_ptr,  # input, n elements
    out_ptr,  # one fp32: the sum; every program adds its block's sum with an atomic
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr, tl.sum(x, axis=0))


@triton.jit
def scale_inplace_kernel(
    x_ptr,  # n elements, read and overwritten
    n_elements,  # n
    scale,  # the factor
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(x_ptr + offsets, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


ELEMENTWISE_CONFIGS = [triton.Config({"BLOCK_SIZE": b}) for b in ((64, 256, 1024) if common.INTERPRETER
                                                                   else (256, 1024, 4096))]


def _tuned(kernel, **hooks):
    return triton.autotune(configs=ELEMENTWISE_CONFIGS, key=["n_elements"], do_bench=TUNER_BENCH, **hooks)(kernel)


SUM_KERNELS = {"no hook (wrong)": _tuned(sum_atomic_kernel),
               "reset_to_zero=['out_ptr']": _tuned(sum_atomic_kernel, reset_to_zero=["out_ptr"])}
SCALE_KERNELS = {"no hook (wrong)": _tuned(scale_inplace_kernel),
                 "restore_value=['x_ptr']": _tuned(scale_inplace_kernel, restore_value=["x_ptr"])}


@triton.jit
def empty_kernel(x_ptr):  # does nothing: its time is the cost of a launch
    pass


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. `matmul` runs one given config (the hand-picked
# contestants of the benchmark); `matmul_tuned` lets the autotuner choose; the grid is then a
# function of the chosen meta-parameters.

# %%
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if common.supports_bf16() else ())
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def config_dict(config: triton.Config) -> dict:
    """A triton.Config as the keyword arguments of a launch."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_label(config) -> str:
    c = config_dict(config) if isinstance(config, triton.Config) else config
    return (f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} g{c['GROUP_M']} "
            f"w{c['num_warps']} s{c['num_stages']}")


def _check_config(config: dict) -> None:
    if not isinstance(config, dict) or set(config) != set(CONFIG_KEYS):
        raise ValueError(f"config must be a dict with exactly the keys {', '.join(CONFIG_KEYS)}, got "
                         f"{config!r}")
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        value = config[name]
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"config['{name}'] must be a power of 2 of at least 16 (tl.dot's smallest "
                             f"tile), got {value!r}")


def _prepare(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None):
    """Validate a (M, K) and b (K, N); return M, N, K and the output (allocated if None)."""
    common.check_tensors(a=a, b=b, same_shape=False, contiguous=False, ndim=2, dtypes=DTYPES)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a has shape {tuple(a.shape)} and b has shape {tuple(b.shape)}: a.shape[1] must "
                         f"equal b.shape[0] (the K both share)")
    if 0 in a.shape or 0 in b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must not be empty")
    (M, K), N = a.shape, b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    else:
        common.check_tensors(a=a, out=out, same_shape=False, contiguous=False, ndim=2)
        if out.shape != (M, N):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected ({M}, {N})")
    return M, N, K, out


def _strides(a, b, c) -> tuple:
    return a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)


def matmul(a: torch.Tensor, b: torch.Tensor, config: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with one given config (a dict of CONFIG_KEYS); EVEN_K comes from the heuristic."""
    M, N, K, out = _prepare(a, b, out)
    _check_config(config)
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    matmul_heuristic_kernel[grid](a, b, out, M, N, K, *_strides(a, b, out), **config)
    return out


def matmul_tuned(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                 modelled: bool = False) -> torch.Tensor:
    """a @ b with the config the autotuner picks (modelled=True: only the perf model's top_k are timed)."""
    M, N, K, out = _prepare(a, b, out)
    kernel = matmul_modelled_kernel if modelled else matmul_tuned_kernel
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel[grid](a, b, out, M, N, K, *_strides(a, b, out))
    return out


def matmul_persistent(a: torch.Tensor, b: torch.Tensor, config: dict, out: torch.Tensor | None = None,
                      num_programs: int | None = None) -> torch.Tensor:
    """a @ b by min(num_programs, tiles) programs that loop over the tiles (default: one per SM)."""
    M, N, K, out = _prepare(a, b, out)
    _check_config(config)
    if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
        raise ValueError(f"num_programs must be a positive int, got {num_programs!r}")
    tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
    programs = min(tiles, num_programs or sm_count())
    matmul_persistent_kernel[(programs,)](a, b, out, M, N, K, *_strides(a, b, out), programs,
                                          EVEN_K=K % config["BLOCK_K"] == 0, **config)
    return out


REDUCTIONS = ("atomic", "workspace")
REDUCE_BLOCK = 1024  # elements of C per program of split_k_reduce_kernel


def matmul_split_k(a: torch.Tensor, b: torch.Tensor, config: dict, split_k: int, out: torch.Tensor | None = None,
                   reduction: str = "atomic") -> torch.Tensor:
    """a @ b by (tiles, slices) programs, each summing its tile over one slice of K (split_k_slices);
    the fp32 partials are added with atomics (reduction="atomic") or through a workspace that a
    second kernel sums in a fixed order ("workspace": the same bits on every run)."""
    M, N, K, out = _prepare(a, b, out)
    _check_config(config)
    if not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1:
        raise ValueError(f"split_k must be an int >= 1 (the number of K slices), got {split_k!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    k_per_split, slices = split_k_slices(K, config["BLOCK_K"], split_k)
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]), slices)
    ab = (a, b)
    ab_strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    flags = dict(EVEN_K=K % config["BLOCK_K"] == 0, **config)
    if reduction == "atomic":
        # The atomics add into fp32 that starts at zero: an fp32 out directly, else a buffer cast at the end.
        acc = out.zero_() if out.dtype == torch.float32 else torch.zeros((M, N), dtype=torch.float32, device=a.device)
        matmul_split_k_kernel[grid](*ab, acc, M, N, K, *ab_strides, acc.stride(0), acc.stride(1), 0, k_per_split,
                                    ATOMIC=True, **flags)
        if acc is not out:
            out.copy_(acc)  # reads M*N*4 bytes, writes M*N*2
        return out
    workspace = torch.empty((slices, M, N), dtype=torch.float32, device=a.device)  # every element is stored
    matmul_split_k_kernel[grid](*ab, workspace, M, N, K, *ab_strides, workspace.stride(1), workspace.stride(2),
                                workspace.stride(0), k_per_split, ATOMIC=False, **flags)
    split_k_reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](workspace, out, M, N, out.stride(0), out.stride(1),
                                                               SPLIT_K=slices, BLOCK_SIZE=REDUCE_BLOCK)
    return out


def split_k_config(M: int, element_size: int) -> dict:
    """The tile of the split-K benchmark: as tall as M needs (16, 64 or 128 rows), 128 columns, and
    within this GPU's shared memory; the interpreter's small check config there."""
    if common.INTERPRETER:
        return config_dict(CHECK_CONFIG)
    by_height = [GPU_EXTRA_CONFIGS[3], GPU_HAND_PICKED[3], GPU_HAND_PICKED[0]]  # 16x128x128, 64x128x64, 128x128x64
    fits = [c for c in by_height if config_smem_bytes(c, element_size) <= shared_memory_limit()]
    tall_enough = [c for c in fits if c.kwargs["BLOCK_M"] >= min(M, 128)]
    return config_dict(tall_enough[0] if tall_enough else fits[-1] if fits else CHECK_CONFIG)


def matmul_split_k_auto(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                        reduction: str = "atomic") -> torch.Tensor:
    """a @ b with split_k_config's tile and choose_split_k's slices: the autotuned kernel when that is 1."""
    M, N, K, out = _prepare(a, b, out)
    config, split_k = split_k_plan(M, N, K, a.element_size())
    if split_k == 1:
        return matmul_tuned(a, b, out=out)
    return matmul_split_k(a, b, config, split_k, out=out, reduction=reduction)


@functools.lru_cache(maxsize=1024)
def split_k_plan(M: int, N: int, K: int, element_size: int) -> tuple[dict, int]:
    """(tile, slices) for a problem, worked out once: choose_split_k's Python took 0.2 ms a call on
    this course's CPU, which an H100 run showed as 0.1 ms added to a 0.03 ms matmul (2026-12-07).
    The dict is shared between calls: do not change it."""
    config = split_k_config(M, element_size)
    return config, choose_split_k(M, N, K, config, sm_count())


def tensor_sum(x: torch.Tensor, kernel=None) -> torch.Tensor:
    """sum(x) as a 1-element fp32 tensor, by an autotuned atomic kernel (default: the one that resets)."""
    common.check_tensors(x=x, dtypes=(torch.float32, torch.float16))
    kernel = kernel or SUM_KERNELS["reset_to_zero=['out_ptr']"]
    out = torch.zeros(1, dtype=torch.float32, device=x.device)  # atomics add into it: it must start at 0
    n = x.numel()
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_SIZE"]),)](x, out, n)
    return out


def scale_inplace(x: torch.Tensor, scale: float, kernel=None) -> torch.Tensor:
    """x *= scale in place by an autotuned kernel (default: the one that restores x while tuning)."""
    common.check_tensors(x=x, dtypes=(torch.float32, torch.float16))
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    kernel = kernel or SCALE_KERNELS["restore_value=['x_ptr']"]
    n = x.numel()
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_SIZE"]),)](x, n, float(scale))
    return x


# %% [markdown]
# ## Check
# Before anything is timed: every matmul path on awkward shapes (not multiples of any tile; K
# not a multiple of BLOCK_K, so EVEN_K is False), a transposed B, outputs poisoned with NaN,
# against float64; the persistent kernel with too few programs for the tiles (each loops); split-K
# with both reductions and a slice count larger than K has steps; the hooked atomic and in-place
# kernels.


# %%
def random_problem(M: int, N: int, K: int, dtype: torch.dtype, transpose_b: bool = False):
    """Inputs scaled by 1/sqrt(K): every output is about N(0, 1), whatever K is."""
    a = common.randn(M, K, dtype=dtype, scale=K ** -0.5)
    b = common.randn(N, K, dtype=dtype).t() if transpose_b else common.randn(K, N, dtype=dtype)
    return a, b


def _check_matmul(fn, M, N, K, dtype, name, transpose_b=False) -> None:
    a, b = random_problem(M, N, K, dtype, transpose_b)
    out = common.poisoned_empty(M, N, dtype=dtype)
    fn(a, b, out)
    common.assert_close(out, a.double() @ b.double(), name=f"{name} {M}x{N}x{K} {common.dtype_name(dtype)}",
                        **common.checks.dot_tolerance(dtype))


def check(quick: bool) -> None:
    section("Check: every kernel against PyTorch (float64 reference), outputs poisoned")
    if common.INTERPRETER:
        shapes = [tuple(common.awkward_sizes(3, lo=17, hi=100, include=())), (1, 37, 5)]
        dtypes = [torch.float32, torch.float16]
        small = (30, 37, 29)  # the tuned kernel: pruning (BLOCK_M <= 32) leaves 3 configs, each is run once
        # split-K: K of 5 to 12 steps of BLOCK_K (32), so that every slice count leaves a partial last slice
        split_shapes = [(*common.awkward_sizes(2, lo=17, hi=70, include=()), *common.awkward_sizes(1, lo=150, hi=400,
                                                                                                  include=())),
                        (1, 37, 200)]
    else:
        # On a GPU every new shape class and dtype is a compile (and a round of tuning): a few.
        shapes = [tuple(common.awkward_sizes(3, lo=100, hi=1000, include=()))]
        dtypes = [torch.float16] + ([torch.bfloat16] if common.supports_bf16() and not quick else [])
        small = (50, 60, 40)  # tiles up to 64: pruning leaves one config, so nothing is timed
        split_shapes = shapes + [(1, 300, 3000)]  # one row against a long K: the skinny case
    hand = config_dict(CHECK_CONFIG)
    for dtype in dtypes:
        for i, (M, N, K) in enumerate(shapes):
            _check_matmul(lambda a, b, o: matmul(a, b, hand, out=o), M, N, K, dtype,
                          f"matmul {config_label(hand)}", transpose_b=i == 0)
            _check_matmul(lambda a, b, o: matmul_persistent(a, b, hand, out=o, num_programs=3), M, N, K, dtype,
                          "matmul_persistent, 3 programs")
        _check_matmul(lambda a, b, o: matmul_tuned(a, b, out=o), *small, dtype, "matmul_tuned")
        for i, (M, N, K) in enumerate(split_shapes):
            for split_k, reduction in ((3, "atomic"), (4, "workspace"), (MAX_SPLIT_K, "atomic")):
                _check_matmul(lambda a, b, o: matmul_split_k(a, b, hand, split_k, out=o, reduction=reduction),
                              M, N, K, dtype, f"matmul_split_k split_k={split_k} {reduction}", transpose_b=i == 0)
        _check_matmul(lambda a, b, o: matmul_split_k_auto(a, b, out=o), *split_shapes[0], dtype,
                      "matmul_split_k_auto")
    names = ", ".join(common.dtype_name(d) for d in dtypes)
    print(f"matmul (one config), matmul_persistent (3 programs) for (M, N, K) in {shapes} (the first with a "
          f"transposed b), and matmul_tuned at {small}, dtypes {names}: OK")
    print(f"matmul_split_k for (M, N, K) in {split_shapes} (K not a multiple of the slices' BLOCK_K steps), 3 "
          f"slices (atomics), 4 (workspace) and {MAX_SPLIT_K} (more than K has steps: the empty slices are "
          f"dropped), and matmul_split_k_auto: OK")
    for n in common.awkward_sizes(2, lo=1000, hi=100_000):
        x = common.randn(n)
        common.assert_close(tensor_sum(x), sum_reference(x.double()), name=f"tensor_sum n={n}",
                            atol=1e-4 * math.sqrt(n), rtol=1e-5)
        y = x.clone()
        common.assert_close(scale_inplace(y, 2.0), scale_reference(x.double(), 2.0), name=f"scale_inplace n={n}")
    print("tensor_sum (atomics, reset_to_zero) and scale_inplace (restore_value), each tuned at its first "
          "size: OK")
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


# %% [markdown]
# ## Hardware queries, and the ceilings measured now


# %%
def hardware() -> None:
    section("Hardware: what the driver reports, and the ceilings measured in this run")
    if not common.HAS_GPU:
        print(common.require_gpu("Hardware queries (driver properties, measured copy bandwidth and cuBLAS rate)"))
        print(f"The pruning and the model below use {ASSUMED_GPU['name']}: {ASSUMED_GPU['multiprocessor_count']} "
              f"SMs, {ASSUMED_GPU['max_shared_mem'] // 1024} KiB of shared memory per program, "
              f"{ASSUMED_GPU['bandwidth_gbps']:,.0f} GB/s, {ASSUMED_GPU['peak_tflops']:,.0f} TFLOP/s fp16.")
        return
    props = device_properties()
    table = Table(f"{props['name']} ({props['capability']}): device properties",
                  ["property", "value", "source", "what it limits"])
    rows = [
        ("multiprocessor_count", props["multiprocessor_count"], "triton driver",
         "programs running at once (x programs per SM): one wave of tiles"),
        ("max_shared_mem", fmt_bytes(props["max_shared_mem"]), "triton driver",
         "tiles x num_stages of a config: above it, no compile"),
        ("max_num_regs", props.get("max_num_regs", "?"), "triton driver",
         "registers per SM: accumulator tiles x programs per SM"),
        ("warpSize", props.get("warpSize", "?"), "triton driver", "threads per warp (num_warps x 32 per program)"),
        ("sm_clock_rate", f"{props.get('sm_clock_rate', 0) / 1e3:,.0f} MHz", "triton driver", "the compute peak"),
        ("mem_clock_rate", f"{props.get('mem_clock_rate', 0) / 1e3:,.0f} MHz", "triton driver", "the bandwidth"),
        ("mem_bus_width", f"{props.get('mem_bus_width', '?')} bits", "triton driver", "the bandwidth"),
        ("L2_cache_size", fmt_bytes(props["l2_cache_size"]) if props["l2_cache_size"] else "?", "torch",
         "what grouped program order can reuse; benchmarks use data far larger"),
        ("total_memory", fmt_bytes(props["total_memory"]), "torch", "the largest problem"),
    ]
    for row in rows:
        table.add(*row)
    table.print()
    target = triton.runtime.driver.active.get_current_target()
    print(f"compile target: {target.backend} {target.arch} (Triton compiles every kernel for this)")
    peak, bandwidth = ceilings()
    promised = theoretical_bandwidth_gbps(props)
    promise = (f"; the memory clock x bus width promise {promised:,.0f} GB/s, so a copy reaches "
               f"{100 * bandwidth / promised:.0f}% of it") if promised else ""
    print(f"measured now: copy {bandwidth:,.0f} GB/s (read + write){promise}; cuBLAS fp16 at 8192^3 "
          f"{peak:,.0f} TFLOP/s. These, not datasheet numbers, are the roofline's ceilings.")


# %% [markdown]
# ## Autotuning: pruning, the key, the cost and the cache


# %%
def pruning_table() -> None:
    section("Pruning: which configs survive early_config_prune for each problem (fp16)")
    shapes = [(4096, 4096, 4096), (1024, 1024, 1024), (64, 16384, 8192), (16, 8192, 8192), (50, 60, 40)]
    limit = shared_memory_limit()
    table = Table(f"kept (.) or why dropped; shared memory limit {fmt_bytes(limit)} per program"
                  + ("" if common.HAS_GPU else " (assumed: H100)"),
                  ["config", "smem (fp16)", *[f"{M}x{N}x{K}" for M, N, K in shapes]])
    element = torch.empty(0, dtype=torch.float16)
    gpu_configs = GPU_HAND_PICKED + GPU_EXTRA_CONFIGS
    kept_by_shape = []
    for M, N, K in shapes:
        kept_by_shape.append(prune_matmul_configs(gpu_configs, {"M": M, "N": N, "K": K, "a_ptr": element}))
    for c in gpu_configs:
        smem = config_smem_bytes(c, 2)
        cells = []
        for (M, N, K), kept in zip(shapes, kept_by_shape):
            if any(c is k for k in kept):
                cells.append("." if len(kept) > 1 else ". (only)")
            elif smem > limit:
                cells.append("smem")
            elif c.kwargs["BLOCK_M"] > max(16, triton.next_power_of_2(M)):
                cells.append("BM > M")
            else:
                cells.append("BN > N")
        table.add(config_label(c), fmt_bytes(smem), *cells)
    table.print()
    print("Pruning runs before compiling: a config dropped here costs nothing. When one config is left the "
          "tuner times nothing at all.")
    if common.INTERPRETER:
        print("(The table shows the GPU's config space; the interpreter itself tunes among small tiles.)")


def _synchronize() -> None:
    if common.HAS_GPU:
        torch.cuda.synchronize()


def _timed_call(fn) -> float:
    _synchronize()
    start = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - start


def tuned_config(kernel, M: int, N: int, K: int, dtype: torch.dtype) -> triton.Config:
    """The config an autotuner keeps for (M, N, K) and dtype. Triton's key is the key arguments'
    values followed by the dtype of every tensor argument: (M, N, K, 'torch.float16', ...)."""
    for key, config in kernel.cache.items():
        if tuple(key[:3]) == (M, N, K) and str(dtype) in key[3:]:
            return config
    raise KeyError(f"{M}x{N}x{K} {dtype} has not been tuned yet")


def autotune_mechanics(quick: bool, n: int | None = None) -> None:
    section("Autotuning: what each call costs, and what the tuner keeps")
    if common.HAS_GPU:
        n = n or (2048 if quick else 4096)
        calls = [(n, n, n), (n, n, n), (n, n, n // 2)]
    else:
        calls = [(96, 80, 64), (96, 80, 64), (96, 80, 48)]
    dtype = torch.float16
    table = Table("matmul_tuned_kernel: three calls", ["call", "M x N x K", "key already tuned?",
                                                        "configs timed", "wall time", "config used", "EVEN_K"])
    for i, (M, N, K) in enumerate(calls):
        a, b = random_problem(M, N, K, dtype)
        out = torch.empty(M, N, dtype=dtype, device=common.DEVICE)
        before = any(tuple(key[:3]) == (M, N, K) and str(dtype) in key[3:] for key in matmul_tuned_kernel.cache)
        survivors = prune_matmul_configs(MATMUL_CONFIGS, {"M": M, "N": N, "K": K, "a_ptr": a})
        seconds = _timed_call(lambda: matmul_tuned(a, b, out=out))
        chosen = tuned_config(matmul_tuned_kernel, M, N, K, dtype)
        timed = 0 if before or len(survivors) == 1 else len(survivors)
        wall = (f"{seconds:.2f} s" if seconds >= 1 else f"{1e3 * seconds:.1f} ms" if seconds >= 1e-3
                else f"{1e6 * seconds:.0f} us")
        table.add(i + 1, f"{M}x{N}x{K}", "yes" if before else "no", timed, wall, config_label(chosen),
                  K % chosen.kwargs["BLOCK_K"] == 0)
        if i == 0:
            timings = dict(getattr(matmul_tuned_kernel, "configs_timings", {}))
            first = (a, b, out, M, N, K)
    table.print()
    if common.HAS_GPU:
        print("Call 1 compiled every surviving config (or loaded it from Triton's disk cache, if an earlier run "
              "compiled it) and timed each one; call 2 found its key in kernel.cache; call 3 has a new key "
              "(K changed), so every config is timed again, but the binaries compiled for call 1 are reused.")
    else:
        print("Interpreter: each config ran once, timed by the wall clock (the interpreter has no GPU timer; "
              "the times and the pick say nothing about a GPU). The mechanics are the GPU's: tune on a new "
              "key, reuse on a known one.")
    print("\nkernel.cache, the tuner's memory (in this process only):")
    for key, config in matmul_tuned_kernel.cache.items():
        print(f"  {key} -> {config_label(config)}")

    a, b, out, M, N, K = first
    table = Table(f"configs_timings of call 1 ({M}x{N}x{K} fp16), next to the perf model's estimate",
                  ["config", "measured ms (median)", "model ms", "model rank", "measured rank"])
    measured = {c: t[0] if isinstance(t, (list, tuple)) else t for c, t in timings.items()}
    model = {c: matmul_perf_model(M, N, K, a, **config_dict(c)) for c in measured}
    by_model = sorted(measured, key=model.get)
    by_time = sorted(measured, key=measured.get)
    for c in by_time:
        table.add(config_label(c), measured[c], model[c], by_model.index(c) + 1, by_time.index(c) + 1)
    table.print()
    model_pick_s = _timed_call(lambda: matmul_tuned(a, b, out=out, modelled=True))
    picked = tuned_config(matmul_modelled_kernel, M, N, K, dtype)
    print(f"matmul_modelled_kernel (perf_model + top_k={MODEL_TOP_K}) tuned the same shape in {model_pick_s:.2f} s, "
          f"timing {min(MODEL_TOP_K, len(measured))} of {len(measured)} configs, and picked {config_label(picked)} "
          f"(the full search picked {config_label(by_time[0])}).")
    if common.INTERPRETER:
        print("The model's numbers use the assumed H100 ceilings; the measured column is the interpreter's wall "
              "clock. On a GPU the two columns can be compared.")
    cache_note()


def cache_note() -> None:
    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    cache_dir = getattr(getattr(triton, "knobs", None), "cache", None)
    cache_dir = getattr(cache_dir, "dir", None) or os.environ.get("TRITON_CACHE_DIR") or "~/.triton/cache"
    print(f"\nWhere results are kept: the tuner's choice lives in kernel.cache, in this process. Compiled binaries "
          f"go to {cache_dir} (TRITON_CACHE_DIR), so a new process skips compiling but times every config "
          f"again. triton {triton.__version__} "
          + ("can keep the timings on disk too: triton.autotune(..., cache_results=True), or "
             "TRITON_CACHE_AUTOTUNING=1 for every tuner (see the cache benchmark)." if supported else
             "has no cache_results: every process tunes again."))


def hooks_demo() -> None:
    section("Hooks: a kernel that accumulates or writes in place, tuned with and without them")
    n = 3000 if common.INTERPRETER else 2**20
    table = Table(f"n = {n}: result / the right result, after the first (tuning) call",
                  ["kernel", "tuner", "result / expected", "what happened"])
    x = common.randn(n)
    expected = sum_reference(x.double())
    for label, kernel in SUM_KERNELS.items():
        ratio = float(tensor_sum(x, kernel=kernel).double().cpu() / expected.cpu())
        table.add("sum_atomic_kernel", label, ratio,
                  "every timing run added into out" if abs(ratio - 1) > 1e-3 else "zeroed before every run")
    for label, kernel in SCALE_KERNELS.items():
        y = x.clone()
        scale_inplace(y, 2.0, kernel=kernel)
        ratio = float((y.double() / x.double()).median())
        times = f"x was doubled {round(math.log2(ratio))} times" if math.isfinite(ratio) else "x overflowed to inf"
        table.add("scale_inplace_kernel x 2", label, ratio,
                  times if abs(ratio - 2) > 1e-3 else "restored after every run")
    table.print()
    print("Both wrong rows are right again from the second call on (the config is cached, the kernel runs "
          "once): a bug that shows only on the first call of each new size. reset_to_zero and restore_value "
          "name the arguments the tuner must protect.")


# %% [markdown]
# ## Roofline: predicted against measured
# For kernels from earlier lessons, called through their own wrappers: the time the roofline
# predicts from the cost formulas above and the ceilings measured in this run, next to the
# measured time. `launch` is the measured time of a kernel that does nothing: it dominates small
# problems. The compute ceiling is the tensor cores' (cuBLAS fp16); for the elementwise and
# row kernels, whose arithmetic runs on the CUDA cores, the memory term is larger by far anyway.


# %%
def _course(number: str):
    return lesson_module(number)


@dataclass
class RooflineCase:
    kernel: str
    size: str
    cost: Cost
    setup: Callable[[], Callable[[], object]]  # makes the inputs, returns the call to time


def roofline_cases(quick: bool, small: bool = False) -> list[RooflineCase]:
    """The kernels and sizes of the roofline benchmark (small=True: interpreter-sized, for the tests)."""
    dev = common.DEVICE
    l01, l06, l08 = _course("01"), _course("06"), _course("08")
    if small:
        add_sizes, softmax_shapes, rms_shapes, mm_shapes = [1000], [(7, 33)], [(5, 40)], [(45, 37, 29)]
    elif quick:
        add_sizes, softmax_shapes = [2**16, 2**24], [(4096, 4096)]
        rms_shapes, mm_shapes = [(4096, 4096)], [(2048, 2048, 2048), (64, 16384, 8192)]
    else:
        add_sizes, softmax_shapes = [2**12, 2**16, 2**20, 2**24, 2**28], [(1024, 1024), (4096, 4096), (16384, 4096)]
        rms_shapes = [(1024, 4096), (16384, 8192)]
        mm_shapes = [(1024, 1024, 1024), (4096, 4096, 4096), (64, 16384, 8192)]
    half = torch.float32 if small and common.INTERPRETER else torch.float16  # the interpreter's rmsnorm: fp32

    def add_case(n):
        def setup():
            x, y = torch.randn(n, device=dev), torch.randn(n, device=dev)
            out = torch.empty_like(x)
            return lambda: l01.add(x, y, out=out)
        return RooflineCase("vector add (01)", f"2^{round(math.log2(n))} fp32" if n & (n - 1) == 0 else f"{n} fp32",
                            add_cost(n, 4), setup)

    def softmax_case(m, n):
        def setup():
            x = torch.randn(m, n, device=dev)
            out = torch.empty_like(x)
            return lambda: l06.softmax(x, out=out)
        return RooflineCase("softmax (06)", f"{m}x{n} fp32", softmax_cost(m, n, 4), setup)

    def rmsnorm_case(m, n):
        def setup():
            x = torch.randn(m, n, device=dev, dtype=half)
            w = torch.randn(n, device=dev, dtype=half)
            out = torch.empty_like(x)
            return lambda: l08.rmsnorm(x, w, out=out)
        return RooflineCase("rmsnorm (08)", f"{m}x{n} {'fp32' if half == torch.float32 else 'fp16'}",
                            rmsnorm_cost(m, n, half.itemsize), setup)

    def matmul_case(M, N, K):
        def setup():
            a, b = random_problem(M, N, K, torch.float16)
            out = torch.empty(M, N, device=dev, dtype=torch.float16)
            matmul_tuned(a, b, out=out)  # tune outside the timed runs
            return lambda: matmul_tuned(a, b, out=out)
        return RooflineCase("matmul (10, tuned)", f"{M}x{N}x{K} fp16", matmul_cost(M, N, K, 2), setup)

    return ([add_case(n) for n in add_sizes] + [softmax_case(*s) for s in softmax_shapes]
            + [rmsnorm_case(*s) for s in rms_shapes] + [matmul_case(*s) for s in mm_shapes])


def launch_latency_us() -> float:
    x = torch.empty(1, device=common.DEVICE)
    return 1e3 * common.bench(lambda: empty_kernel[(1,)](x)).ms


def roofline(quick: bool, cases: list | None = None) -> None:
    section("Roofline: the time bytes and FLOPs allow, against the time measured")
    peak, bandwidth = ceilings()
    if common.HAS_GPU:
        launch = launch_latency_us()
        print(f"ceilings measured now: {peak:,.0f} TFLOP/s (cuBLAS fp16), {bandwidth:,.0f} GB/s (copy); "
              f"an empty kernel takes {launch:.1f} us; ridge at {peak * 1e3 / bandwidth:,.0f} FLOP/byte")
        cases = cases or roofline_cases(quick)
    else:
        launch = 0.0
        print(f"No GPU: predictions only, from the cost formulas and {ASSUMED_GPU['name']}: {peak:,.0f} TFLOP/s, "
              f"{bandwidth:,.0f} GB/s, launch cost not included (it is measured on a GPU).")
        cases = _roofline_cases_formulas()
    table = Table("predicted = launch + max(bytes / bandwidth, FLOPs / peak); measured = median of do_bench",
                  ["kernel", "size", "bytes", "FLOP/byte", "bound", "predicted us", "measured us",
                   "measured / predicted", "achieved TFLOP/s", "achieved GB/s"])
    points = []
    for case in cases:
        predicted, bound = roofline_time(case.cost, peak, bandwidth, launch)
        if common.HAS_GPU:
            fn = case.setup()
            t = common.bench(fn)
            measured_s = t.ms * 1e-3
            del fn
        else:
            measured_s = float("nan")
        table.add(case.kernel, case.size, fmt_bytes(case.cost.nbytes), case.cost.intensity, bound,
                  1e6 * predicted, 1e6 * measured_s, measured_s / predicted,
                  case.cost.flops / measured_s / 1e12, case.cost.nbytes / measured_s / 1e9)
        points.append((case, predicted, measured_s))
    table.print()
    if common.HAS_GPU:
        print("measured / predicted is at least 1 (the roofline is a bound) unless a kernel beats the ceiling "
              "it is judged by: add reads two bytes per byte written, a mix DRAM serves a little faster than a "
              "copy. Small sizes sit far above 1: a launch and a ramp-up that bytes alone do not explain.")
    else:
        print(common.require_gpu("Measured times (the table's empty columns)"))
    _roofline_plot(points, peak, bandwidth)


def _roofline_cases_formulas() -> list[RooflineCase]:
    """The GPU run's cases as formulas only (no inputs, no wrappers), for the interpreter's predictions."""
    no_setup = lambda: None  # noqa: E731  (never called: nothing is timed without a GPU)
    cases = [RooflineCase("vector add (01)", f"2^{e} fp32", add_cost(2**e, 4), no_setup) for e in (12, 16, 20, 24, 28)]
    cases += [RooflineCase("softmax (06)", f"{m}x{n} fp32", softmax_cost(m, n, 4), no_setup)
              for m, n in ((1024, 1024), (4096, 4096), (16384, 4096))]
    cases += [RooflineCase("rmsnorm (08)", f"{m}x{n} fp16", rmsnorm_cost(m, n, 2), no_setup)
              for m, n in ((1024, 4096), (16384, 8192))]
    cases += [RooflineCase("matmul (10, tuned)", f"{M}x{N}x{K} fp16", matmul_cost(M, N, K, 2), no_setup)
              for M, N, K in ((1024, 1024, 1024), (4096, 4096, 4096), (64, 16384, 8192))]
    return cases


def _roofline_plot(points, peak: float, bandwidth: float) -> None:
    where = "ceilings measured in this run" if common.HAS_GPU else "assumed H100 ceilings, predictions only"
    fig, ax = common.new_figure(f"Roofline: course kernels ({where})", "FLOP / byte (minimum traffic)",
                                "TFLOP/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    xs = [2.0 ** (e / 8) for e in range(-40, 112)]  # dense enough to draw the ridge's corner
    ax.plot(xs, [min(peak, x * bandwidth / 1e3) for x in xs], color="gray",
            label="roof: min(peak, FLOP/byte x bandwidth)")
    markers = {"vector add (01)": "o", "softmax (06)": "s", "rmsnorm (08)": "^", "matmul (10, tuned)": "D"}
    for kernel, marker in markers.items():
        mine = [(c, p, m) for c, p, m in points if c.kernel == kernel]
        if not mine:
            continue
        ax.scatter([c.cost.intensity for c, _, _ in mine], [c.cost.flops / p / 1e12 for c, p, _ in mine],
                   marker=marker, facecolors="none", edgecolors="tab:blue", label=f"{kernel}: predicted")
        if common.HAS_GPU:
            ax.scatter([c.cost.intensity for c, _, _ in mine], [c.cost.flops / m / 1e12 for c, _, m in mine],
                       marker=marker, color="tab:orange", label=f"{kernel}: measured")
    ax.legend(fontsize=6, loc="lower right")
    common.save_plot(fig, "10_autotuning_roofline")
    if not common.HAS_GPU:
        print(common.require_gpu("The plot's measured points") + "; it shows the roof and the predictions")


# %% [markdown]
# ## Benchmark
# Declared for common.run_benchmarks, which times every provider in alternating rounds and races
# cuBLAS (the registry's baseline for "matmul") in the same run:
#   - the autotuned kernel (full search, and the perf model's top_k) against every hand-picked
#     config it was given and cuBLAS: the perf bars;
#   - a persistent kernel against one program per tile, both with the config the tuner picked;
#   - the tuned config with K masks on every load (EVEN_K=False) and without (EVEN_K=True);
#   - at small and skinny shapes, one program per tile against split-K (fixed slice counts and
#     choose_split_k's), atomics and workspace: a bar of 0.9x cuBLAS per shape.
# The on-disk tuning cache is not a race: it is a small experiment after them.

# %%
BAR_SHAPE = (4096, 4096, 4096)  # the perf bars' problem, fp16
QUICK_SHAPE = (2048, 2048, 2048)  # --quick: the shape autotune_mechanics tuned
# The checks' shape (and the benchmarks' in the interpreter): K a multiple of every config's
# BLOCK_K (32 in the interpreter, 128 on a GPU), so EVEN_K=True is valid whichever one is picked.
CPU_SHAPE = (20, 24, math.lcm(*(config.kwargs["BLOCK_K"] for config in MATMUL_CONFIGS)))
PERSISTENT_SHAPES = [BAR_SHAPE, (8192, 8192, 1024), (2048, 2048, 8192)]
# Issue 15's small and skinny problems: too few tiles of 128 x 128 (or of 16 x 128 at M = 16) to fill
# the SMs of an H100 / H200, so a per-tile grid leaves most of them idle
SPLIT_K_SHAPES = [(1024, 1024, 1024), (512, 512, 16384), (16, 8192, 8192), (64, 8192, 8192), (128, 8192, 8192)]
SPLIT_K_TABLE_CONFIGS = [GPU_HAND_PICKED[0], GPU_HAND_PICKED[3], GPU_EXTRA_CONFIGS[2], GPU_EXTRA_CONFIGS[3]]
SPLIT_K_FIXED = (2, 4, 8, 16)  # the benchmark's fixed slice counts, beside the rule's


def _inputs(M: int, N: int, K: int) -> tuple:
    return random_problem(M, N, K, torch.float16)


def _mnk(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    return a.shape[0], b.shape[1], a.shape[1]


def _flops(a: torch.Tensor, b: torch.Tensor) -> float:
    return matmul_cost(*_mnk(a, b), a.element_size()).flops


@functools.cache
def picked_config(M: int, N: int, K: int, dtype: torch.dtype = torch.float16) -> dict:
    """The config matmul_tuned_kernel keeps for this problem (tuned here first if it was not)."""
    if not any(tuple(key[:3]) == (M, N, K) and str(dtype) in key[3:] for key in matmul_tuned_kernel.cache):
        matmul_tuned(*random_problem(M, N, K, dtype))
    return config_dict(tuned_config(matmul_tuned_kernel, M, N, K, dtype))


def matmul_picked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One program per tile, with the tuner's config but without the tuner's dispatch."""
    return matmul(a, b, picked_config(*_mnk(a, b), a.dtype))


def matmul_persistent_picked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The persistent kernel (one program per SM) with the same config as matmul_picked."""
    return matmul_persistent(a, b, picked_config(*_mnk(a, b), a.dtype))


def matmul_split_k_fixed(a: torch.Tensor, b: torch.Tensor, split_k: int) -> torch.Tensor:
    """split_k_config's tile with a given slice count (atomics)."""
    return matmul_split_k(a, b, split_k_config(a.shape[0], a.element_size()), split_k)


def matmul_even_k(a: torch.Tensor, b: torch.Tensor, even_k: bool) -> torch.Tensor:
    """The tuner's config with EVEN_K forced: False masks every K load, True masks none."""
    M, N, K, out = _prepare(a, b, None)
    config = picked_config(M, N, K, a.dtype)
    if even_k and K % config["BLOCK_K"]:
        raise ValueError(f"EVEN_K=True needs K a multiple of BLOCK_K={config['BLOCK_K']}, got K={K}")
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    matmul_kernel[grid](a, b, out, M, N, K, *_strides(a, b, out), EVEN_K=even_k, **config)
    return out


# %% [markdown]
# ## triton.testing.perf_report: Triton's own benchmark harness
# Triton's tutorials benchmark with `triton.testing.perf_report`: a decorator that takes a
# `triton.testing.Benchmark` (the x values, one line per provider, the y label) and calls the
# function once per (x, provider); the function times its call with `triton.testing.do_bench`
# and returns the value to plot. The course's `common.Benchmark` is the same idea with more
# rules: providers are timed in alternating rounds (drift hits all alike), the baselines come
# from a registry (cuBLAS, torch.compile), each number has its spread, and perf bars are stated
# and recorded. perf_report tables need pandas (not a course requirement).


# %%
PERF_REPORT_SIZES = (1024, 2048, 4096)


def perf_report_demo(quick: bool) -> None:
    section("triton.testing.perf_report: the autotuned matmul against torch.matmul")
    if not common.HAS_GPU:
        print(common.require_gpu("perf_report (it times with do_bench)"))
        return
    try:
        import pandas  # noqa: F401 (perf_report builds its table with it)
    except ImportError:
        print("perf_report: skipped, it needs pandas (pip install pandas)")
        return

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["n"], x_vals=list(PERF_REPORT_SIZES[:2] if quick else PERF_REPORT_SIZES),
        line_arg="provider", line_vals=["triton", "torch"], line_names=["autotuned Triton", "torch.matmul"],
        xlabel="n (an n x n x n fp16 matmul)", ylabel="TFLOP/s", plot_name="10_perf_report_matmul", args={}))
    def matmul_tflops(n: int, provider: str):
        a, b = _inputs(n, n, n)
        fn = (lambda: matmul_tuned(a, b)) if provider == "triton" else (lambda: torch.matmul(a, b))
        ms, slow, fast = triton.testing.do_bench(fn, quantiles=[0.5, 0.8, 0.2])  # median, 80th, 20th percentile
        rate = lambda t: 2 * n**3 / (t * 1e-3) / 1e12  # noqa: E731
        return rate(ms), rate(slow), rate(fast)

    matmul_tflops.run(print_data=True, show_plots=False, save_path=str(common.report.plots_dir()))
    print("One do_bench per (n, provider), one after another: no rounds, no spread column, no bar. The "
          "benchmarks below time the same kernels the course's way.")


TUNED = "autotuned (full search)"
SPLIT_K_RULE = "split-K, the rule's slices (atomics)"
HAND = {f"hand-picked {config_label(c)}": functools.partial(matmul, config=config_dict(c)) for c in HAND_PICKED}
MATMUL = dict(setup=_inputs, cpu_cases=[CPU_SHAPE], flops=_flops, ceiling="matmul", dtype=torch.float16)

BENCHMARKS = [
    common.Benchmark(
        "matmul fp16: the autotuned kernel, every hand-picked config, cuBLAS", op="matmul", cases=[BAR_SHAPE],
        quick_cases=[QUICK_SHAPE], reference=matmul_reference, **MATMUL,
        kernels={TUNED: matmul_tuned, f"autotuned (perf model, top_k={MODEL_TOP_K})":
                 functools.partial(matmul_tuned, modelled=True), **HAND},
        # Against each hand-picked config in turn: together, the bar against the fastest of them.
        bars=[common.Bar(TUNED, BAR_SHAPE, "baseline", 0.9,
                         name="autotuned matmul 4096^3 fp16: the fastest baseline's time / its time"),
              *[common.Bar(TUNED, BAR_SHAPE, name, 0.95, name=f"autotuned matmul 4096^3 fp16: {name}'s time / its time")
                for name in HAND]],
        note="The hand-picked configs are among the full search's, so it loses to one only by timing noise "
             "(one do_bench measurement of each config decided its pick) or by its dispatch on the host. The "
             "tuners' picks are printed in the autotuning section above."),
    common.Benchmark(
        "matmul fp16: persistent (one program per SM) against one program per tile, same config", op="matmul",
        cases=PERSISTENT_SHAPES, quick_cases=[QUICK_SHAPE], reference=matmul_reference, **MATMUL,
        kernels={"one program per tile": matmul_picked, "persistent": matmul_persistent_picked},
        note="Both run the config the tuner picked at each shape (the tiles and waves table above)."),
    common.Benchmark(
        "matmul fp16: what EVEN_K saves (the tuned config, K masks on every load or none)", op=None,
        cases=[BAR_SHAPE], quick_cases=[QUICK_SHAPE], **MATMUL,
        kernels={"EVEN_K=False (masked K loads)": functools.partial(matmul_even_k, even_k=False),
                 "EVEN_K=True (no masks)": functools.partial(matmul_even_k, even_k=True)}),
    common.Benchmark(
        "matmul fp16 at small and skinny shapes: one program per tile against split-K, cuBLAS", op="matmul",
        cases=SPLIT_K_SHAPES, quick_cases=[SPLIT_K_SHAPES[0]], reference=matmul_reference, **MATMUL,
        kernels={"one program per tile (the tuner's config)": matmul_picked,
                 **{f"split-K x{s} (atomics)": functools.partial(matmul_split_k_fixed, split_k=s)
                    for s in SPLIT_K_FIXED},
                 SPLIT_K_RULE: matmul_split_k_auto,
                 "split-K, the rule's slices (workspace)": functools.partial(matmul_split_k_auto,
                                                                             reduction="workspace")},
        bars=[common.Bar(SPLIT_K_RULE, shape, "baseline", 0.9, name=f"split-K matmul {'x'.join(map(str, shape))} "
                                                                        "fp16: the fastest baseline's time / its time")
              for shape in SPLIT_K_SHAPES],
        note="The split-K rows use split_k_config's tile (16, 64 or 128 rows by M, 128 columns); the rule's slice "
             "counts are in the split-K table above. A split of 1 runs the autotuned kernel (the tuner's config)."),
]


def waves_table(shapes: list) -> None:
    """Tiles and waves of the persistent benchmark's shapes, with the config both kernels run."""
    section("Persistent benchmark: tiles and waves of each shape")
    sms = sm_count()
    table = Table(f"the config the tuner picked at each shape; {sms} SMs" + ("" if common.HAS_GPU else " (assumed)"),
                  ["M x N x K", "config", "tiles", "waves (tiles / SMs)", "tiles in the last wave"])
    for M, N, K in shapes:
        config = picked_config(M, N, K)
        tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
        table.add(f"{M}x{N}x{K}", config_label(config), tiles, tiles / sms, tiles - (triton.cdiv(tiles, sms) - 1) * sms)
    table.print()
    print("Waves count one program per SM. In the last wave of a fractional count some SMs have no tile left; "
          "the persistent kernel has the same tail: program p computes tiles p, p + SMs, ..., so some programs "
          "loop once more than the others.")


def split_k_table() -> None:
    """Programs and waves of the split-K shapes, one program per tile against choose_split_k's slices."""
    section("Split-K: programs and waves at small and skinny shapes")
    sms = sm_count()
    where = f"{sms} SMs, this GPU's" if common.HAS_GPU else f"{sms} SMs, assumed (H100 / H200): no GPU to ask"
    table = Table(f"fp16 configs of the GPU; {where}",
                  ["M x N x K", "config", "tiles", "waves", "last wave full", "split_k (rule)", "K per slice",
                   "programs", "waves (split)", "last wave full (split)", "fp32 partials"])
    for M, N, K in SPLIT_K_SHAPES:
        for c in SPLIT_K_TABLE_CONFIGS:
            config = config_dict(c)
            if config["BLOCK_M"] > max(16, triton.next_power_of_2(M)):
                continue  # the pruning rule: a taller tile than M computes rows nobody stores
            plain = split_k_waves(M, N, K, config, 1, sms)
            split_k = choose_split_k(M, N, K, config, sms)
            split = split_k_waves(M, N, K, config, split_k, sms)
            partials = fmt_bytes(split.slices * M * N * 4) if split.slices > 1 else "-"
            table.add(f"{M}x{N}x{K}", config_label(config), plain.tiles, plain.waves, f"{plain.last_wave_full:.0%}",
                      split_k, split.k_per_split, split.programs, split.waves, f"{split.last_wave_full:.0%}", partials)
    table.print()
    print("A wave is one program per SM: below 1 wave, SMs idle for the whole kernel. The rule takes the fewest "
          f"slices whose busiest SM runs within {SPLIT_K_SLACK:.0%} of the least K (whole waves x K per slice), "
          f"each slice at least {MIN_K_STEPS} BLOCK_K steps. fp32 partials: what the slices add up, M x N x 4 "
          "bytes each; the workspace writes and reads them again, atomics add them in L2.")


def disk_cache(n: int = 4096) -> None:
    section("Tuning results on disk (cache_results)")
    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        print(f"triton {triton.__version__} has no cache_results: skipped (every process tunes again)")
        return
    a, b = random_problem(n, n, n, torch.float16)
    out = torch.empty(n, n, device=common.DEVICE, dtype=torch.float16)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    table = Table("two new tuners with cache_results=True, same configs and shape (binaries already compiled)",
                  ["tuner", "first call", "timed the configs?"])
    reads = []
    for which in ("first", "second"):
        kernel = triton.autotune(configs=HAND_PICKED, key=["M", "N", "K"], cache_results=True,
                                 prune_configs_by={"early_config_prune": prune_matmul_configs})(matmul_heuristic_kernel)
        seconds = _timed_call(lambda: kernel[grid](a, b, out, n, n, n, *_strides(a, b, out)))
        timed = hasattr(kernel, "bench_time")  # set only when the tuner ran its benchmark
        table.add(which, f"{seconds:.2f} s", "yes" if timed else "no: read the timings from disk")
        reads.append(not timed)
    table.print()
    if reads[1]:
        print("The second tuner read the first one's timings from the cache directory, as a new process would. "
              "The file is keyed by the Triton version, the GPU, the kernel's source, the configs and the key: "
              "change any and it tunes again. (On a later run of this script both read from disk.)")
    else:
        print("The second tuner timed the configs again: it did not read the first one's timings from disk; "
              "check that the cache directory (TRITON_CACHE_DIR) is writable.")


# %% [markdown]
# ## Takeaways
# - `triton.autotune` times every config on the first call for each key and keeps the fastest in
#   `kernel.cache`; pick the key so that it changes when the best config would (the shape), not
#   on every call (a pointer, a scalar that varies).
# - Prune before compiling: configs that exceed shared memory, tiles larger than the problem.
#   A performance model with `top_k` times only the most promising few.
# - `triton.heuristics` for what can be computed (EVEN_K); autotuning for what must be measured.
# - Tuning runs the kernel many times on your arguments: `reset_to_zero` for outputs that are
#   accumulated into, `restore_value` for tensors updated in place.
# - The roofline bound, max(bytes / bandwidth, FLOPs / peak) with ceilings measured on the same
#   GPU, says how much is left to win; small problems are bound by launches, not by either roof.
# - A persistent kernel launches one program per SM and loops over tiles: fewer programs to
#   schedule, the same tail. Whether that is faster here is what its benchmark measures.
# - Count the waves before tuning tiles: fewer tiles than SMs leave SMs idle whatever the config.
#   Split-K turns K into programs, for fp32 partials to add: atomics (cheaper, the order of the
#   adds varies) or a workspace (the same bits every run, more bytes and a second launch).


# %%
if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    started = time.perf_counter()
    check(args.quick)
    hardware()
    pruning_table()
    autotune_mechanics(args.quick)
    hooks_demo()
    print(f"\n(checks and tuning mechanics: {time.perf_counter() - started:.1f} s)")
    roofline(args.quick)
    waves_table([QUICK_SHAPE] if args.quick and common.HAS_GPU else PERSISTENT_SHAPES if common.HAS_GPU
                else [CPU_SHAPE])
    split_k_table()
    perf_report_demo(args.quick)
    common.run_benchmarks(BENCHMARKS, args.quick)
    if common.HAS_GPU and not args.quick:
        disk_cache()
    print(f"(done at {time.perf_counter() - started:.1f} s)")
