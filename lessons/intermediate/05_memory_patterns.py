"""
Lesson 05: memory patterns
==========================

Build a matrix transpose that runs near copy speed, and a 2-D stencil with halos, and measure
how the order of programs, cache hints and TMA tensor descriptors change their speed.

You will learn:
- why a naive transpose is slow (one side of it is strided) and how a tiled one fixes it
- what Triton puts in shared memory for you: `tl.trans` on a loaded tile, and the layout
  conversion the compiler inserts so that both the load and the store are coalesced
- block pointers (`tl.make_block_ptr`) and tensor descriptors (`tl.make_tensor_descriptor`,
  TMA on Hopper) as other ways to say "this tile of that matrix", with a fallback
- grouped (swizzled) program order and cache-friendly traversal, measured
- cache hints (`eviction_policy`, `cache_modifier`): what they ask for, and whether they help
- a stencil: neighbours outside the tile (the halo) read with shifted, masked loads

Run:  python lessons/intermediate/05_memory_patterns.py [--quick]
"""

import functools
import re
import sys
import warnings
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from common import Table, section
from common.kernels import grouped_tile_position

# Triton 3.8 warns that block pointers are deprecated in favour of tensor descriptors (v4
# below), and 3.9 removed them (BLOCK_PTR_MISSING below); on 3.6-3.8 v3 keeps them because
# they run everywhere and most published Triton code is written with them.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")

# %% [markdown]
# ## Motivation
# out = x.T moves each element once: it reads M*N elements and writes M*N, like a copy, and
# does no arithmetic. So its speed limit is the copy bandwidth. The catch is the *order*:
# reading x row by row makes neighbouring threads read neighbouring addresses (coalesced), but
# then they write to out column by column, M elements apart. A warp's 32 stores land in 32
# different rows, 32 memory sectors for 32 elements. Reading column by column just moves the
# problem to the loads. The fix is a tile: read a square tile of x with coalesced loads, turn
# it around on chip, write it with coalesced stores. In CUDA you turn it in shared memory by
# hand; in Triton you write `tl.trans(tile)` and the compiler does the shared-memory part.
#
# The same lesson holds for any kernel whose programs touch overlapping or scattered data: a
# stencil reads each input element 5 times (itself and as a neighbour of 4 others), and the
# caches, not the kernel, decide how many of those reads reach memory.

# %% [markdown]
# ## Reference (PyTorch)

# %%
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def transpose_reference(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous()  # reads M*N, writes M*N: one copy kernel with strided reads


def laplacian_reference(x: torch.Tensor) -> torch.Tensor:
    """5-point Laplacian with zero boundary: out = up + down + left + right - 4 * centre."""
    p = F.pad(x, (1, 1, 1, 1))  # reads H*W, writes (H+2)*(W+2)
    return (p[:-2, 1:-1] + p[2:, 1:-1]  # each +: reads 2 H*W, writes H*W
            + p[1:-1, :-2] + p[1:-1, 2:]
            - 4 * x)  # the * and the -: 2 more kernels, 5 H*W more traffic


# %% [markdown]
# ## Kernel
# Four transposes, one idea each:
#   v1 naive:  one program per row slice; loads coalesced, stores M elements apart
#   v2 tiled:  a BLOCK_M x BLOCK_N tile, stored as tl.trans(tile); the compiler moves it
#              through shared memory so that the stores are coalesced too
#   v3 block pointers: v2 written with tl.make_block_ptr (bounds handled by boundary_check)
#   v4 tensor descriptors: v2 written with tl.make_tensor_descriptor; on Hopper the loads and
#              stores become TMA copies (the copy engine moves whole tiles, no per-thread
#              addresses). Falls back to v3 where descriptors are missing or the tensor is not
#              16-byte aligned.
# The tiled versions share one program order, `grouped_tile_position` from common/kernels.py
# (lesson 04 wrote it out): GROUP_M = 1 is row-major (the column index moves fastest); a larger
# GROUP_M walks down GROUP_M tile rows before moving one tile right (what tl.swizzle2d does too),
# so the programs running at the same time touch a squarer patch of memory; GROUP_M >= the number
# of tile rows is column-major.


# %%
@triton.jit
def transpose_v1_kernel(
    x_ptr,  # pointer to x[0, 0]; x has shape (M, N)
    out_ptr,  # pointer to out[0, 0]; out has shape (N, M)
    M, N,  # the shape of x
    stride_xm, stride_xn,  # element distance between x[i, j] and x[i + 1, j], x[i, j + 1]
    stride_on, stride_om,  # the same for out (shape (N, M))
    BLOCK_SIZE: tl.constexpr,  # elements of one row of x per program
):
    m = tl.program_id(0)  # one row of x ...
    offs_n = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # ... a block of it
    mask = offs_n < N
    row = tl.load(x_ptr + m * stride_xm + offs_n * stride_xn, mask=mask)  # coalesced
    # Element n of the row goes to out[n, m]: neighbouring lanes write stride_on (= M)
    # elements apart, one memory sector per element.
    tl.store(out_ptr + offs_n * stride_on + m * stride_om, row, mask=mask)


@triton.jit
def transpose_v2_kernel(
    x_ptr, out_ptr, M, N, stride_xm, stride_xn, stride_on, stride_om,
    BLOCK_M: tl.constexpr,  # tile rows (of x)
    BLOCK_N: tl.constexpr,  # tile columns (of x)
    GROUP_M: tl.constexpr,  # program order, see grouped_tile_position
    EVICT: tl.constexpr,  # eviction_policy of the load: "", "evict_first" or "evict_last"
):
    pid_m, pid_n = grouped_tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The tile, read row by row: lanes next to each other read x[m, n], x[m, n + 1], ...
    tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                   mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), eviction_policy=EVICT)
    # out[n, m] = x[m, n]: a BLOCK_N x BLOCK_M tile whose rows are contiguous in out. tl.trans
    # swaps the axes; the store wants lanes along m, the loaded tile has them along n, so the
    # compiler converts the layout through shared memory here (see inspect_compiled below).
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om, tl.trans(tile),
             mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


@triton.jit
def transpose_v3_kernel(x_ptr, out_ptr, M, N, stride_xm, stride_xn, stride_on, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # A block pointer carries the parent's shape and strides, so bounds are checked per axis
    # (boundary_check) instead of with a hand-built mask.
    x_block = tl.make_block_ptr(x_ptr, shape=(M, N), strides=(stride_xm, stride_xn),
                                offsets=(pid_m * BLOCK_M, pid_n * BLOCK_N),
                                block_shape=(BLOCK_M, BLOCK_N), order=(1, 0))
    out_block = tl.make_block_ptr(out_ptr, shape=(N, M), strides=(stride_on, stride_om),
                                  offsets=(pid_n * BLOCK_N, pid_m * BLOCK_M),
                                  block_shape=(BLOCK_N, BLOCK_M), order=(1, 0))
    tile = tl.load(x_block, boundary_check=(0, 1))
    tl.store(out_block, tl.trans(tile), boundary_check=(0, 1))


@triton.jit
def transpose_v4_kernel(x_ptr, out_ptr, M, N, stride_xm, stride_on,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # A descriptor needs a contiguous last dimension and 16-byte aligned rows (TMA's rules);
    # the wrapper checks both. Out-of-bounds parts of a tile read as zero and are not written.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[N, M], strides=[stride_on, 1],
                                         block_shape=[BLOCK_N, BLOCK_M])
    tile = x_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N])
    out_desc.store([pid_n * BLOCK_N, pid_m * BLOCK_M], tl.trans(tile))


@triton.jit
def laplacian_kernel(
    x_ptr,  # pointer to x[0, 0]; x has shape (H, W), rows contiguous
    out_ptr,  # pointer to out[0, 0]; same shape, contiguous
    H, W,  # image height and width
    stride_xh,  # elements between x[i, j] and x[i + 1, j]
    stride_oh,  # elements between out[i, j] and out[i + 1, j]
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,  # output tile
    GROUP_M: tl.constexpr,  # program order over tiles, see grouped_tile_position
    EVICT: tl.constexpr,  # eviction_policy of the loads
    CACHE: tl.constexpr,  # cache_modifier of the loads: "" or ".ca" (cache in L1), ".cg" (L2 only)
):
    pid_h, pid_w = grouped_tile_position(tl.program_id(0), H, W, BLOCK_H, BLOCK_W, GROUP_M)
    offs_h = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    offs_w = (pid_w * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    inside = (offs_h < H) & (offs_w < W)
    centre = x_ptr + offs_h * stride_xh + offs_w
    # Triton cannot index a register tile at "one row up", so each neighbour is a second load
    # of the tile shifted by one: 5 loads per output tile. The halo (the row above, the row
    # below, the columns left and right of the tile) comes with the shifted loads; the zero
    # boundary comes from the masks (other=0.0). Four of the five loads touch lines that another
    # load (of this program or a neighbour) has just brought into L1/L2; the stencil benchmark
    # measures how much of the 5x the caches absorb.
    acc = -4.0 * tl.load(centre, mask=inside, other=0.0, eviction_policy=EVICT,
                         cache_modifier=CACHE).to(tl.float32)
    acc += tl.load(centre - stride_xh, mask=inside & (offs_h >= 1), other=0.0,
                   eviction_policy=EVICT, cache_modifier=CACHE).to(tl.float32)
    acc += tl.load(centre + stride_xh, mask=inside & (offs_h + 1 < H), other=0.0,
                   eviction_policy=EVICT, cache_modifier=CACHE).to(tl.float32)
    acc += tl.load(centre - 1, mask=inside & (offs_w >= 1), other=0.0,
                   eviction_policy=EVICT, cache_modifier=CACHE).to(tl.float32)
    acc += tl.load(centre + 1, mask=inside & (offs_w + 1 < W), other=0.0,
                   eviction_policy=EVICT, cache_modifier=CACHE).to(tl.float32)
    tl.store(out_ptr + offs_h * stride_oh + offs_w, acc.to(out_ptr.dtype.element_ty), mask=inside)


# %% [markdown]
# ### Convolution with many channels: direct, then as a GEMM
# A 2-D convolution of x (N, C, H, W) with weights (K, C, R, S) at a stride and a zero padding
# gives out (N, K, P, Q): out[n, k, p, q] = sum over c, r, s of
# w[k, c, r, s] * x[n, c, p * stride - pad + r, q * stride - pad + s]. The stencil above is the
# case C = K = 1 with fixed weights. The direct kernel walks c, r and s, each step an outer
# product of a column of weights and a row of input pixels on the CUDA cores. The implicit GEMM
# sees the same sum as a matrix product: rows m = (n, p, q) the output pixels, columns the K
# output channels, and the reduction over the C * R * S taps; A[m, (c, r, s)] is gathered from
# x on the fly (never written out, unlike im2col), B is the weights viewed as (K, C * R * S),
# and tl.dot puts the tensor cores to work.


# %%
@triton.jit
def conv2d_direct_kernel(
    x_ptr, w_ptr, out_ptr,  # x (N, C, H, W), w (K, C, R, S), out (N, K, P, Q): all contiguous
    C, H, W, K, P, Q,
    stride, pad,
    R: tl.constexpr, S: tl.constexpr,  # the filter's height and width
    BLOCK_K: tl.constexpr,  # output channels per program
    BLOCK_PQ: tl.constexpr,  # output pixels per program
):
    n = tl.program_id(2).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    pq = tl.program_id(0) * BLOCK_PQ + tl.arange(0, BLOCK_PQ)
    p, q = pq // Q, pq % Q
    acc = tl.zeros((BLOCK_K, BLOCK_PQ), dtype=tl.float32)
    for c in range(0, C):
        for r in tl.static_range(R):
            for s in tl.static_range(S):
                h = p * stride - pad + r
                w = q * stride - pad + s
                inside = (pq < P * Q) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
                x = tl.load(x_ptr + ((n * C + c) * H + h) * W + w, mask=inside, other=0.0).to(tl.float32)
                wk = tl.load(w_ptr + ((offs_k * C + c) * R + r) * S + s, mask=offs_k < K, other=0.0).to(tl.float32)
                acc += wk[:, None] * x[None, :]
    out_ptrs = out_ptr + (n * K + offs_k[:, None]) * (P * Q) + pq[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (pq[None, :] < P * Q))


@triton.jit
def conv2d_igemm_kernel(
    x_ptr, w_ptr, out_ptr,  # x (N, C, H, W), w (K, C, R, S), out (N, K, P, Q): all contiguous
    N, C, H, W, K, P, Q,
    stride, pad,
    R: tl.constexpr, S: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels (n, p, q) per program: the GEMM's rows
    BLOCK_N: tl.constexpr,  # output channels per program: the GEMM's columns
    BLOCK_K: tl.constexpr,  # taps (c, r, s) per step: the GEMM's reduction
    INPUT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = (offs_m // (P * Q)).to(tl.int64)
    pq = offs_m % (P * Q)
    h0 = (pq // Q) * stride - pad  # the input row and column of tap (r, s) = (0, 0)
    w0 = (pq % Q) * stride - pad
    taps = C * R * S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, taps, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        c, r, s = kk // (R * S), (kk // S) % R, kk % S  # tap kk of the reduction
        h = h0[:, None] + r[None, :]
        w = w0[:, None] + s[None, :]
        a_mask = ((offs_m[:, None] < N * P * Q) & (kk[None, :] < taps)
                  & (h >= 0) & (h < H) & (w >= 0) & (w < W))  # padding: zeros outside the image
        a = tl.load(x_ptr + ((n[:, None] * C + c[None, :]) * H + h) * W + w, mask=a_mask, other=0.0)
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * taps + kk[:, None],
                    mask=(kk[:, None] < taps) & (offs_n[None, :] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + (n[:, None] * K + offs_n[None, :]) * (P * Q) + pq[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < N * P * Q) & (offs_n[None, :] < K))


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. The tiled versions launch one program per tile on
# a 1-D grid, so that grouped_tile_position (not the hardware's grid order) decides the program order.
# The launchers (_launch_*) return what the launch returns: on a GPU, the compiled kernel,
# which inspect_compiled reads its shared memory and assembly from.

# %%
# Tile and warps of the tiled versions: re-tune with the tile sweep in the benchmark.
BLOCK_M, BLOCK_N, NUM_WARPS = 64, 64, 4
GROUP_M = 1  # row-major program order; the order benchmark measures the others
V1_BLOCK_SIZE = 1024
EVICTION_POLICIES = ("", "evict_first", "evict_last")
LOAD_CACHE_MODIFIERS = ("", ".ca", ".cg", ".cv")


def _check_pow2(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of 2 (tl.arange needs one), got {value!r}")


def _prepare_transpose(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Validate x (2-D, any strides) and out (N x M, contiguous); return out."""
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=DTYPES)
    if x.numel() >= 2**31:
        raise ValueError(f"x has {x.numel():,} elements; these kernels use 32-bit offsets "
                         f"(fewer than 2**31 elements)")
    M, N = x.shape
    if out is None:
        return torch.empty((N, M), dtype=x.dtype, device=x.device)
    common.check_tensors(x=x, out=out, same_shape=False, contiguous=False)
    if tuple(out.shape) != (N, M) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({N}, {M}) tensor for x of shape {tuple(x.shape)}, "
                         f"got shape {tuple(out.shape)} with strides {out.stride()}")
    return out


def _tiled_grid(M: int, N: int, block_m: int, block_n: int) -> tuple[int]:
    return (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)


def _launch_v1(x, out, block_size):
    M, N = x.shape
    return transpose_v1_kernel[(M, triton.cdiv(N, block_size))](
        x, out, M, N, x.stride(0), x.stride(1), out.stride(0), out.stride(1), BLOCK_SIZE=block_size)


def _launch_v2(x, out, block_m, block_n, group_m, evict, num_warps):
    M, N = x.shape
    return transpose_v2_kernel[_tiled_grid(M, N, block_m, block_n)](
        x, out, M, N, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, EVICT=evict, num_warps=num_warps)


def _launch_v3(x, out, block_m, block_n, group_m, num_warps):
    M, N = x.shape
    return transpose_v3_kernel[_tiled_grid(M, N, block_m, block_n)](
        x, out, M, N, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, num_warps=num_warps)


def _launch_v4(x, out, block_m, block_n, group_m, num_warps):
    M, N = x.shape
    return transpose_v4_kernel[_tiled_grid(M, N, block_m, block_n)](
        x, out, M, N, x.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, num_warps=num_warps)


def transpose_v1(x: torch.Tensor, block_size: int = V1_BLOCK_SIZE, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.T (contiguous) with one program per row slice: the naive version."""
    out = _prepare_transpose(x, out)
    _check_pow2(block_size=block_size)
    _launch_v1(x, out, block_size)
    return out


def transpose_v2(x: torch.Tensor, block_m: int = BLOCK_M, block_n: int = BLOCK_N, group_m: int = GROUP_M,
                 evict: str = "", num_warps: int = NUM_WARPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.T (contiguous), tiled: each program transposes one block_m x block_n tile."""
    out = _prepare_transpose(x, out)
    _check_pow2(block_m=block_m, block_n=block_n)
    if group_m < 1:
        raise ValueError(f"group_m must be >= 1, got {group_m}")
    if evict not in EVICTION_POLICIES:
        raise ValueError(f"evict must be one of {EVICTION_POLICIES}, got {evict!r}")
    _launch_v2(x, out, block_m, block_n, group_m, evict, num_warps)
    return out


# Triton 3.9 removed tl.make_block_ptr (deprecated in 3.8 for tensor descriptors): there v3 is
# left out of the versions with this reason, and v4 falls back to v2 instead of v3.
# (3.9 keeps the name, and it raises NotImplementedError when a kernel calls it: hence the version.)
_TRITON_MINOR = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
BLOCK_PTR_MISSING = (None if hasattr(tl, "make_block_ptr") and _TRITON_MINOR < (3, 9) else
                     f"triton {triton.__version__} has no tl.make_block_ptr (removed in 3.9; v4's tensor "
                     f"descriptors replace it)")


def transpose_v3(x: torch.Tensor, block_m: int = BLOCK_M, block_n: int = BLOCK_N, group_m: int = GROUP_M,
                 num_warps: int = NUM_WARPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.T (contiguous), tiled, with block pointers."""
    if BLOCK_PTR_MISSING:
        raise RuntimeError(f"transpose_v3 needs block pointers: {BLOCK_PTR_MISSING}")
    out = _prepare_transpose(x, out)
    _check_pow2(block_m=block_m, block_n=block_n)
    _launch_v3(x, out, block_m, block_n, group_m, num_warps)
    return out


def _descriptor_scratch(size: int, alignment: int, stream):
    # Descriptors made inside a kernel are written to global scratch memory first; Triton asks
    # for it through the allocator set with triton.set_allocator.
    return torch.empty(size, dtype=torch.int8, device=common.DEVICE)


@functools.cache
def tma_status(dtype: torch.dtype = torch.float32) -> str | None:
    """None if v4 (tensor descriptors) runs here for `dtype`, else the reason it falls back to v3."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    if common.HAS_GPU:
        if torch.cuda.get_device_capability() < (9, 0):
            return "TMA needs sm_90 or newer (Hopper); this GPU uses block pointers instead"
        if not hasattr(triton, "set_allocator"):
            return f"triton {triton.__version__} has no triton.set_allocator for descriptor scratch memory"
        triton.set_allocator(_descriptor_scratch)
    # A tiny trial run with the default tile: a Triton that has the API but cannot compile (or
    # interpret) it here gives a reason to print instead of a crash in the middle of a benchmark.
    try:
        x = torch.arange(48 * 80, device=common.DEVICE).view(48, 80).to(dtype)
        out = torch.full((80, 48), float("nan"), dtype=dtype, device=common.DEVICE)
        _launch_v4(x, out, BLOCK_M, BLOCK_N, GROUP_M, NUM_WARPS)
        if not torch.equal(out, x.t()):
            return "a trial transpose with tensor descriptors gave wrong values"
    except Exception as err:  # a compiler or interpreter without descriptor support
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        return f"tensor descriptors failed here ({type(err).__name__}: {first_line})"
    return None


def tma_problem(x: torch.Tensor, out: torch.Tensor) -> str | None:
    """None if v4 can transpose x into out, else why it falls back to v3."""
    status = tma_status(x.dtype)
    if status:
        return status
    es = x.element_size()
    if x.stride(1) != 1:
        return "x's last dimension is not contiguous"
    if (x.stride(0) * es) % 16 or (out.stride(0) * es) % 16:
        return "rows are not a multiple of 16 bytes apart (TMA needs 16-byte aligned rows)"
    if x.data_ptr() % 16 or out.data_ptr() % 16:
        return "the data does not start on a 16-byte boundary"
    return None


def transpose_v4(x: torch.Tensor, block_m: int = BLOCK_M, block_n: int = BLOCK_N, group_m: int = GROUP_M,
                 num_warps: int = NUM_WARPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.T (contiguous), tiled, with tensor descriptors (TMA on Hopper); v3 where they cannot run
    (v2 on a Triton without block pointers)."""
    out = _prepare_transpose(x, out)
    _check_pow2(block_m=block_m, block_n=block_n)
    if max(block_m, block_n) > 256:
        raise ValueError(f"a TMA box is at most 256 elements per side, got {block_m} x {block_n}")
    if tma_problem(x, out) and BLOCK_PTR_MISSING:
        _launch_v2(x, out, block_m, block_n, group_m, "", num_warps)
    elif tma_problem(x, out):
        _launch_v3(x, out, block_m, block_n, group_m, num_warps)
    else:
        _launch_v4(x, out, block_m, block_n, group_m, num_warps)
    return out


VERSIONS = common.Versions("transpose")
VERSIONS.add("v1", "naive (row -> column)", transpose_v1)
VERSIONS.add("v2", "tiled (tl.trans)", transpose_v2)
if not BLOCK_PTR_MISSING:
    VERSIONS.add("v3", "block pointers", transpose_v3)
VERSIONS.add("v4", "tensor descriptors (TMA)", transpose_v4)


def transpose(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.T as a new contiguous tensor: the lesson's default version (v2 with the tuned tile)."""
    return transpose_v2(x, out=out)


def laplacian(x: torch.Tensor, block_h: int = 32, block_w: int = 64, group_m: int = GROUP_M,
              evict: str = "", cache: str = "", num_warps: int = NUM_WARPS,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """5-point Laplacian of a 2-D tensor (zero outside), accumulated in fp32."""
    common.check_tensors(x=x, ndim=2, dtypes=DTYPES)
    _check_pow2(block_h=block_h, block_w=block_w)
    if evict not in EVICTION_POLICIES:
        raise ValueError(f"evict must be one of {EVICTION_POLICIES}, got {evict!r}")
    if cache not in LOAD_CACHE_MODIFIERS:
        raise ValueError(f"cache must be one of {LOAD_CACHE_MODIFIERS}, got {cache!r}")
    if out is None:
        out = torch.empty_like(x)
    else:
        common.check_tensors(x=x, out=out)
    H, W = x.shape
    grid = _tiled_grid(H, W, block_h, block_w)
    laplacian_kernel[grid](x, out, H, W, x.stride(0), out.stride(0), BLOCK_H=block_h, BLOCK_W=block_w,
                           GROUP_M=group_m, EVICT=evict, CACHE=cache, num_warps=num_warps)
    return out


# Tiles of the convolutions: tiny in the interpreter. On a GPU the implicit GEMM takes lesson 04's
# tensor-core tile with 3 stages; fp32 (IEEE products on the CUDA cores) a smaller one. Not tuned yet.
if common.INTERPRETER:
    CONV_DIRECT_BLOCKS, CONV_IGEMM_CONFIG, CONV_IGEMM_FP32_CONFIG = (16, 32), dict(
        BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1), None
else:
    CONV_DIRECT_BLOCKS = (32, 128)
    CONV_IGEMM_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    CONV_IGEMM_FP32_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
CONV_VERSIONS = ("direct", "igemm")


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0, version: str = "igemm",
           out: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, stride=stride, padding=padding) for contiguous NCHW x and (K, C, R, S)
    weights, no bias, no dilation or groups; accumulated in fp32."""
    common.check_tensors(x=x, ndim=4, dtypes=DTYPES)
    common.check_tensors(weight=weight, ndim=4, dtypes=DTYPES)
    common.check_tensors(x=x, weight=weight, same_shape=False)
    if version not in CONV_VERSIONS:
        raise ValueError(f"version must be one of {CONV_VERSIONS}, got {version!r}")
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    (N, C, H, W), (K, C_w, R, S) = x.shape, weight.shape
    if C_w != C:
        raise ValueError(f"x has {C} channels but weight expects {C_w} (weight is (K, C, R, S) = {tuple(weight.shape)})")
    P, Q = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - S) // stride + 1
    if P < 1 or Q < 1:
        raise ValueError(f"a {R}x{S} filter at stride {stride}, padding {padding} does not fit a {H}x{W} image")
    if out is None:
        out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device)
    else:
        common.check_tensors(x=x, out=out, same_shape=False)
        if out.shape != (N, K, P, Q):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(N, K, P, Q)}")
    if out.numel() == 0:
        return out
    if version == "direct":
        block_k, block_pq = CONV_DIRECT_BLOCKS
        grid = (triton.cdiv(P * Q, block_pq), triton.cdiv(K, block_k), N)
        conv2d_direct_kernel[grid](x, weight, out, C, H, W, K, P, Q, stride, padding, R=R, S=S,
                                   BLOCK_K=block_k, BLOCK_PQ=block_pq)
        return out
    config = CONV_IGEMM_FP32_CONFIG if x.dtype == torch.float32 and CONV_IGEMM_FP32_CONFIG else CONV_IGEMM_CONFIG
    grid = (triton.cdiv(N * P * Q, config["BLOCK_M"]), triton.cdiv(K, config["BLOCK_N"]))
    conv2d_igemm_kernel[grid](x, weight, out, N, C, H, W, K, P, Q, stride, padding, R=R, S=S,
                              INPUT_PRECISION="ieee", **config)
    return out


# %% [markdown]
# ## Check
# Awkward shapes (not multiples of any tile), inputs that are contiguous, column slices and
# transposed views (every version takes strides), outputs poisoned with NaN and guarded
# against stores past the end, references in float64.


# %%
def awkward_shapes(count: int) -> list[tuple[int, int]]:
    """(M, N) pairs, neither a multiple of 16; small in the interpreter."""
    hi = 200 if common.INTERPRETER else 3000  # the interpreter takes milliseconds per program
    sizes = common.awkward_sizes(count=2 * count, lo=65, hi=hi, include=())
    return [(sizes[2 * i], sizes[2 * i + 1]) for i in range(count)] + [(1, 37), (53, 1)]


def input_views(M: int, N: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """x of shape (M, N) three ways: contiguous, a column slice, a transposed view."""
    return {
        "contiguous": common.randn(M, N, dtype=dtype),
        "column slice": common.randn(M, N + 3, dtype=dtype)[:, 1:N + 1],
        "transposed view": common.randn(N, M, dtype=dtype).t(),
    }


def check(quick: bool) -> None:
    section("Check: every transpose version and the stencil against PyTorch (float64 reference)")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
    shapes = awkward_shapes(2 if quick else 3)
    # On a GPU each new combination of dtype, stride pattern and constexprs is a new compile,
    # so the views and the one-row / one-column shapes are checked in fp32 only: strides and
    # edges do not depend on the dtype. tests/test_05_memory_patterns.py checks more.
    for dtype in dtypes:
        for M, N in shapes:
            edge = min(M, N) == 1
            if dtype != torch.float32 and edge:
                continue
            keep = (("contiguous",) if dtype != torch.float32 or edge else
                    ("contiguous", "transposed view") if quick else
                    ("contiguous", "column slice", "transposed view"))
            views = {k: v for k, v in input_views(M, N, dtype).items() if k in keep}
            for view, x in views.items():
                for version in VERSIONS:
                    out = common.poisoned_empty(N, M, dtype=dtype)
                    version.fn(x, out=out)
                    common.assert_close(out, x.double().t(), name=f"{version.label} {M}x{N} {view} {dtype}")
            x = common.randn(M, N, dtype=dtype, scale=3.0)
            out = common.poisoned_empty(M, N, dtype=dtype)
            laplacian(x, out=out)
            common.assert_close(out, laplacian_reference(x.double()), name=f"laplacian {M}x{N} {dtype}")
    # Program orders and cache hints change the speed, never the result: check the ones the
    # benchmark times.
    M, N = shapes[0]
    x = common.randn(M, N)
    expected_t, expected_l = x.double().t(), laplacian_reference(x.double())
    for group_m in (1, *bench_groups(quick), COLUMN_MAJOR):
        common.assert_close(transpose_v2(x, group_m=group_m), expected_t, name=f"v2 group_m={group_m}")
        common.assert_close(laplacian(x, group_m=group_m), expected_l, name=f"laplacian group_m={group_m}")
    for evict in bench_evicts(quick):
        common.assert_close(transpose_v2(x, evict=evict), expected_t, name=f"v2 evict={evict!r}")
        if not quick:
            common.assert_close(laplacian(x, evict=evict), expected_l, name=f"laplacian evict={evict!r}")
    common.assert_close(laplacian(x, cache=".cg"), expected_l, name="laplacian cache='.cg'")
    names = ", ".join(common.dtype_name(d) for d in dtypes)
    print(f"transpose v1..v4 and laplacian match PyTorch for shapes {shapes}, dtypes {names}, "
          f"{'contiguous and transposed' if quick else 'contiguous, column-sliced and transposed'} "
          f"fp32 inputs, every program order and cache hint the benchmark times: OK")
    check_tma(dtypes, quick)
    check_conv2d(dtypes, quick)
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


# (N, C, H, W, K, R = S, stride, padding): odd sizes, 3x3 and 1x1, stride 2, a filter wider than
# the padding can cover, and an image the filter barely fits
CONV_CHECK_CASES = [(2, 3, 9, 11, 5, 3, 1, 1), (1, 4, 10, 7, 6, 3, 2, 1), (2, 5, 8, 8, 3, 1, 1, 0),
                    (1, 2, 5, 6, 4, 3, 2, 0), (1, 3, 4, 4, 2, 5, 1, 2)]


def conv2d_reference(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    return F.conv2d(x, weight, stride=stride, padding=padding)


def check_conv2d(dtypes, quick: bool) -> None:
    cases = CONV_CHECK_CASES[:3] if quick else CONV_CHECK_CASES
    if common.HAS_GPU:  # and two ResNet-50 layers (halved batch), where the tiles are full
        cases = cases + [(4, 64, 56, 56, 64, 3, 1, 1), (4, 256, 56, 56, 64, 1, 1, 0)]
    for N, C, H, W, K, R, stride, pad in cases:
        for dtype in dtypes:
            x, weight = common.randn(N, C, H, W, dtype=dtype), common.randn(K, C, R, R, dtype=dtype, scale=0.2)
            expected = conv2d_reference(x.double(), weight.double(), stride, pad)
            for version in CONV_VERSIONS:
                out = common.poisoned_empty(*expected.shape, dtype=dtype)
                conv2d(x, weight, stride, pad, version=version, out=out)
                common.assert_close(out, expected, name=f"conv2d {version} {(N, C, H, W)} * {(K, C, R, R)} "
                                                        f"stride {stride} pad {pad} {common.dtype_name(dtype)}")
    print(f"conv2d direct and implicit GEMM match F.conv2d (float64) for (N, C, H, W, K, R, stride, padding) "
          f"in {cases}: OK")


def check_tma(dtypes, quick: bool) -> None:
    """v4 on shapes TMA accepts (rows 16-byte aligned) that the tile does not divide."""
    checked = []
    for dtype in dtypes:
        status = tma_status(dtype)
        if status:
            print(f"v4 tensor descriptors, {str(dtype).removeprefix('torch.')}: skipped, falls back to "
                  f"block pointers: {status}")
            continue
        align = 16 // torch.tensor([], dtype=dtype).element_size()
        for M, N in awkward_shapes(1 if quick else 2)[:-2]:  # no one-row shapes: rows must be aligned
            M, N = M - M % align + align, N - N % align + align  # rows a multiple of 16 bytes apart
            x = common.randn(M, N, dtype=dtype)
            out = common.poisoned_empty(N, M, dtype=dtype)
            assert tma_problem(x, out) is None, tma_problem(x, out)
            transpose_v4(x, out=out)
            common.assert_close(out, x.double().t(), name=f"v4 (TMA) {M}x{N} {dtype}")
        checked.append(common.dtype_name(dtype))
    if checked:
        where = "TMA copies" if common.HAS_GPU else "the interpreter"
        print(f"v4 tensor descriptors ({where}) match PyTorch on 16-byte aligned shapes, "
              f"{', '.join(checked)}: OK")


# %% [markdown]
# ## Memory traffic
# A transpose must read M*N elements and write M*N: a copy's traffic. PyTorch's
# x.t().contiguous() is one copy kernel with that traffic. The stencil must read H*W and write
# H*W too, but eager PyTorch builds it from 6 kernels and their temporaries.


# %%
def traffic(n: int) -> None:
    section(f"Memory traffic: transpose and stencil of a {n} x {n} fp32 matrix")
    x = torch.randn(n, n, device=common.DEVICE)
    counted = common.count_torch_traffic(transpose_reference, x)
    print(f"transpose, modelled minimum (read x, write x.T): {common.fmt_bytes(2 * common.min_bytes(x))}")
    print(f"PyTorch x.t().contiguous(), counted:             {counted.summary()}")
    # The model behind v1's slowness: a warp stores 32 elements to 32 different rows of out.
    # Memory is written in 32-byte sectors, so each 4-byte element costs a sector unless L2
    # merges neighbouring columns (written by other programs) before it writes the line back.
    for dtype in (torch.float32, torch.float16):
        es = torch.tensor([], dtype=dtype).element_size()
        print(f"v1 naive, {str(dtype).removeprefix('torch.')}: each stored element is alone in its 32-byte "
              f"sector: up to {32 // es}x the written bytes, unless L2 merges them")
    counted = common.count_torch_traffic(laplacian_reference, x)
    print(f"stencil, modelled minimum (read x, write out):   {common.fmt_bytes(2 * common.min_bytes(x))}")
    print(f"PyTorch eager stencil, counted:                  {counted.summary()}")
    print(f"Triton laplacian: 1 kernel; it issues 5 tile loads and 1 store per output tile "
          f"({common.fmt_bytes(6 * common.min_bytes(x))} requested), and the benchmark shows how "
          f"much of that reaches memory")


# %% [markdown]
# ## Benchmark
# Declared below, run by common.run_benchmarks: every provider in alternating rounds (CUDA
# events, L2 flushed), in GB/s of the modelled minimum bytes (read once + written once), and
# as a % of a device-to-device copy measured in the same run. The sweeps (tiles, program order,
# cache hints) race the lesson's own variants; read a difference against the ± spread of the
# two timings: one inside twice the spread is noise.

# %%
SWEEP_N = 8192 if common.HAS_GPU else 128  # the sweeps' square matrix
COLUMN_MAJOR = SWEEP_N  # a GROUP_M at least the number of tile rows: grouped_tile_position walks down whole columns


def bench_groups(quick: bool) -> tuple[int, ...]:
    """GROUP_M values the order benchmark times (besides row-major and column-major)."""
    return (8,) if quick else (4, 8, 16)


def bench_evicts(quick: bool) -> tuple[str, ...]:
    """eviction_policy values the cache-hint benchmark times (besides none)."""
    return ("evict_first",) if quick else ("evict_first", "evict_last")


def _square(n: int) -> tuple[torch.Tensor]:
    return (torch.randn(n, n, device=common.DEVICE),)


def _copy_bytes(x: torch.Tensor, *config) -> int:
    return 2 * x.numel() * x.element_size()  # read x once, write the result once


def _in_order(group_m: int):
    """The order benchmark's kernel for one program order: the transpose or the stencil (the case)."""
    def run(x, kind):
        return transpose_v2(x, group_m=group_m) if kind == "transpose v2" else laplacian(x, group_m=group_m)
    return run


def _image(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2d's inputs: x (1, 1, n, n) and the Laplacian's 3x3 weights."""
    weight = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=common.DEVICE)
    return torch.randn(1, 1, n, n, device=common.DEVICE), weight[None, None]


def laplacian_as_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The stencil on conv2d's inputs. The weights are the Laplacian's, which both the eager
    reference and the Triton kernel have built in: they are not read."""
    return laplacian_reference(x[0, 0])


ORDERS = {"row-major (GROUP_M=1)": 1, **{f"grouped, GROUP_M={g}": g for g in bench_groups(False)},
          "column-major": COLUMN_MAJOR}
HINTS = {f'eviction_policy="{e}"': dict(evict=e) for e in bench_evicts(False)}
STENCIL = common.Benchmark(
    "5-point stencil vs conv2d (cuDNN), fp32", op="conv2d", cases=[8192], quick_cases=[4096], cpu_cases=[100],
    setup=_image, kernels={"triton laplacian": lambda x, weight: laplacian(x[0, 0])},
    reference=laplacian_as_conv, nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32,
    label=lambda n: f"{n} x {n}", note="torch eager is the pad + slices reference (6 kernels); F.conv2d runs "
                                       "the same 3x3 weights through cuDNN.")

# ResNet-50's layers at batch 32, fp16: conv2_x's 3x3 (64 -> 64 channels, 56 x 56) and the 1x1
# that reduces 256 channels to 64 before it. op "conv2d" races F.conv2d (cuDNN) and torch.compile
# (both at padding R // 2: these layers keep their size).
RESNET_LAYERS = {"3x3, 64 -> 64, 56 x 56": (32, 64, 56, 56, 64, 3), "1x1, 256 -> 64, 56 x 56": (32, 256, 56, 56, 64, 1)}


def _conv_inputs(layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, H, W, K, R = RESNET_LAYERS[layer] if common.HAS_GPU else (1, 4, 9, 9, 4, RESNET_LAYERS[layer][-1])
    dtype = torch.float16 if common.HAS_GPU else torch.float32
    return (common.randn(N, C, H, W, dtype=dtype), common.randn(K, C, R, R, dtype=dtype, scale=0.1))


def _conv_flops(x, weight) -> float:
    (N, _, H, W), (K, C, R, S) = x.shape, weight.shape
    return 2.0 * N * K * H * W * C * R * S  # stride 1, same padding: P x Q = H x W


def _same(version: str):
    return lambda x, weight: conv2d(x, weight, padding=weight.shape[-1] // 2, version=version)


CONV = common.Benchmark(
    "conv2d at ResNet-50 layers (batch 32, fp16): direct and implicit GEMM vs cuDNN", op="conv2d",
    cases=list(RESNET_LAYERS), cpu_cases=list(RESNET_LAYERS), setup=_conv_inputs,
    kernels={"triton direct (CUDA cores)": _same("direct"), "triton implicit GEMM (tl.dot)": _same("igemm")},
    reference=lambda x, weight: F.conv2d(x, weight, padding=weight.shape[-1] // 2), flops=_conv_flops,
    ceiling="matmul", dtype=torch.float16, label=str,
    note="TFLOP/s of 2 N K P Q C R S; % matmul: of cuBLAS's fp16 rate measured now. Not yet measured on a GPU: "
         "no perf bar until it is.")

BENCHMARKS = [
    common.Benchmark(
        "transpose v1..v4 vs PyTorch, fp32", op="transpose", cases=[4096, 16384], quick_cases=[4096],
        cpu_cases=[100], setup=_square, kernels=VERSIONS, reference=transpose_reference, nbytes=_copy_bytes,
        ceiling="copy", dtype=torch.float32, label=lambda n: f"{n} x {n}",
        plot="05_memory_patterns_transpose_versions", xlabel="n (x is n x n)",
        # v2 is the lesson's default transpose(): it must move the bytes of a copy, as fast as PyTorch.
        bars=[common.Bar(VERSIONS["v2"].label, 16384, "ceiling", 80),
              common.Bar(VERSIONS["v2"].label, 16384, "baseline", 1.0)],
        note="v4 runs v3's block pointers where TMA is missing (the check above says so)."),
    common.Benchmark(
        f"v2 tile shape and warps, {SWEEP_N} x {SWEEP_N} fp32", op=None,
        cases=[(32, 32, 4), (32, 128, 4), (128, 32, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (128, 128, 8)],
        quick_cases=[(BLOCK_M, BLOCK_N, NUM_WARPS)], cpu_cases=[(32, 32, 4)],
        setup=lambda bm, bn, warps: (*_square(SWEEP_N), bm, bn, warps),
        kernels={"v2 tiled": lambda x, bm, bn, warps: transpose_v2(x, block_m=bm, block_n=bn, num_warps=warps)},
        nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32, label=lambda c: f"{c[0]}x{c[1]} w{c[2]}",
        plot="05_memory_patterns_transpose_tiles",
        note=f"The default is {BLOCK_M}x{BLOCK_N} w{NUM_WARPS}. Small tiles give short coalesced runs per row; "
             f"large ones need more shared memory for the conversion."),
    common.Benchmark(
        f"program order (cache-friendly traversal), {SWEEP_N} x {SWEEP_N} fp32", op=None,
        cases=["transpose v2", "laplacian"], cpu_cases=["transpose v2", "laplacian"],
        setup=lambda kind: (*_square(SWEEP_N), kind), kernels={name: _in_order(g) for name, g in ORDERS.items()},
        nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32,
        note="The transpose reads every element once, and the stencil's halo is 2 rows per tile of 32: if no "
             "order moves either beyond the spread, L2 holds what they reuse in any order."),
    common.Benchmark(
        "cache hints on transpose v2, fp32", op=None, cases=[8192], cpu_cases=[100], setup=_square,
        kernels={"no hint": transpose_v2,
                 **{name: functools.partial(transpose_v2, **hint) for name, hint in HINTS.items()}},
        nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32, label=lambda n: f"{n} x {n}"),
    common.Benchmark(
        "cache hints on the stencil, fp32", op=None, cases=[8192], cpu_cases=[100], setup=_square,
        kernels={"no hint": laplacian, **{name: functools.partial(laplacian, **hint) for name, hint in HINTS.items()},
                 'cache_modifier=".cg" (skip L1)': functools.partial(laplacian, cache=".cg")},
        nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32, label=lambda n: f"{n} x {n}",
        note="evict_first marks lines to go first, evict_last to stay; .cg skips L1, so the stencil's 5 "
             "overlapping loads must be served by L2. Both kernels read each byte from memory once: hints pay "
             "off when one tensor is reused while another streams past it."),
    STENCIL,
    CONV,
]


def stencil_reuse(results) -> None:
    """The stencil's loads as issued (5 reads + 1 write per element) against the copy bandwidth."""
    for res in results:
        requested = 3 * res.rate["triton laplacian"]  # rate counts 1 read + 1 write per element
        ratio = requested / common.copy_bandwidth()
        print(f"{res.label}: the Triton kernel issues 5 reads + 1 write per element; counted that way it moves "
              f"{requested:,.0f} GB/s, {ratio:.1f}x the copy bandwidth"
              + (": more than memory can deliver, so the caches served the overlapping reads." if ratio > 1 else
                 ": not above the copy bandwidth, so this run cannot show how many reads the caches served."))


def inspect_compiled() -> None:
    section("What Triton put in shared memory (compiled kernels, common.inspect_kernel)")
    M = N = 256
    x = torch.empty(M, N, device=common.DEVICE)  # nothing is launched: dtypes and alignment only
    out = torch.empty(M, N, device=common.DEVICE)
    strides = (x.stride(0), x.stride(1), out.stride(0), out.stride(1))
    calls = {"v1 naive": (transpose_v1_kernel, (x, out, M, N, *strides), dict(BLOCK_SIZE=V1_BLOCK_SIZE)),
             "v2 tiled": (transpose_v2_kernel, (x, out, M, N, *strides),
                          dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M, EVICT="", num_warps=NUM_WARPS))}
    if BLOCK_PTR_MISSING:
        print(f"v3 block pointers: skipped, {BLOCK_PTR_MISSING}")
    else:
        calls["v3 block pointers"] = (transpose_v3_kernel, (x, out, M, N, *strides),
                                      dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M, num_warps=NUM_WARPS))
    problem = tma_problem(x, out) if common.HAS_GPU else None  # without a GPU: compiled for an H100
    if problem is None:
        calls["v4 tensor descriptors"] = (transpose_v4_kernel, (x, out, M, N, x.stride(0), out.stride(0)),
                                          dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M, num_warps=NUM_WARPS))
    else:
        print(f"v4 tensor descriptors: skipped, {problem}")
    calls["laplacian"] = (laplacian_kernel, (x, out, M, N, x.stride(0), out.stride(0)),
                          dict(BLOCK_H=32, BLOCK_W=64, GROUP_M=1, EVICT="", CACHE=""))
    compiled = common.inspect_kernels(list(calls.values()), skip_with_reason=True)
    if compiled is None:
        return
    reports = dict(zip(calls, compiled))
    table = Table(f"compiled for sm_{next(iter(reports.values())).arch}: shared memory and memory instructions",
                  ["kernel", "shared bytes", "convert_layout", "local_alloc", "TMA", "widest load/store",
                   "registers", "shared tile layout (TTGIR)"])
    for name, r in reports.items():
        ttgir = r.asm["ttgir"]
        swizzle = re.search(r"#shared\w* = #ttg\.\w+<\{[^}]*swizzlingByteWidth = (\d+)", ttgir)
        table.add(name, r.shared, ttgir.count("convert_layout"), ttgir.count("local_alloc"),
                  "yes" if r.features["TMA"] else "-", f"{r.widest_load_bits()}/{r.widest_store_bits()}", r.registers,
                  f"{swizzle.group(1)}-byte swizzle" if swizzle else "-")
    table.print()
    note = next(iter(reports.values())).note
    if note:
        print(note)
    print("'shared bytes' > 0 with a convert_layout: the compiler staged a tile through shared memory to change "
          "which thread holds which element; nobody wrote that in the kernel. How that scratch is laid out "
          "(padded or swizzled, so that 32 threads hit 32 different banks) is chosen when it is lowered to "
          "LLVM, after the TTGIR; TMA's tiles are declared in the TTGIR with their 128-byte swizzle.")


# %% [markdown]
# ## Shared-memory bank conflicts, counted
# Shared memory is 32 banks of 4 bytes: a warp's access that puts two threads on different words
# of one bank is split into several wavefronts (a conflict). Where Nsight Compute (ncu) is
# installed, the lesson re-runs itself under it and reads, for each transpose, the shared-memory
# wavefronts and how many of them were conflicts (the counters
# l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld/st). The CUDA programmer pads the tile by
# one column to avoid them; here the question is what Triton's layout conversion costs.


# %%
BANK_COUNTERS = {
    "shared load wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "load conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "shared store wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "store conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
}
NCU_SIZE = 4096  # the child transposes one 4096 x 4096 fp32 matrix with each version


def bank_conflicts() -> None:
    section(f"Shared-memory bank conflicts of the transposes (Nsight Compute, {NCU_SIZE}^2 fp32)")
    script = Path(globals().get("__file__", "05_memory_patterns.py")).resolve()
    kernels = [f"transpose_{v.key}_kernel" for v in VERSIONS]
    counters, problem, _ = common.ncu_counters(list(BANK_COUNTERS.values()), "|".join(kernels),
                                               [sys.executable, script, "--ncu-target"])
    if problem:
        print(problem)
        return
    table = Table("shared memory per transpose: wavefronts and the conflicts among them",
                  ["version", *BANK_COUNTERS, "conflicts / wavefronts"])
    for v in VERSIONS:
        got = counters.get(f"transpose_{v.key}_kernel")
        if got is None:
            continue
        values = [got.get(metric, float("nan")) for metric in BANK_COUNTERS.values()]
        wavefronts = values[0] + values[2]
        table.add(v.label, *(f"{x:,.0f}" for x in values),
                  f"{(values[1] + values[3]) / wavefronts:.1%}" if wavefronts else "-")
    table.print()
    print("A version with no shared wavefronts keeps the tile in registers or copies it with TMA, which "
          "writes shared memory in its own swizzled layout without the load/store pipeline counted here.")


def _ncu_target() -> None:
    """The child ncu profiles: each transpose version once."""
    x = torch.randn(NCU_SIZE, NCU_SIZE, device=common.DEVICE)
    for v in VERSIONS:
        v.fn(x)
    torch.cuda.synchronize()


# %% [markdown]
# ## Takeaways
# - A transpose is a copy with one strided side; tiles make both sides coalesced. In Triton,
#   `tl.trans(tile)` plus a store along the other axis is all it takes: the compiler stages the
#   tile through shared memory (check `metadata.shared` and `convert_layout` in the TTGIR).
# - Block pointers and tensor descriptors describe the same tile with its parent's shape and
#   strides; on Hopper descriptors become TMA copies. Guard them and keep a fallback.
# - Program order and cache hints are knobs to measure, not to assume: print the verdict
#   against the timing noise and keep only what moves the number.
# - Stencils read each element several times; shifted masked loads leave the reuse to the
#   caches (measure how much they absorb), and the masks give the zero boundary for free.


# %%
if __name__ == "__main__":
    if "--ncu-target" in sys.argv:  # the child bank_conflicts runs under ncu: no banner, no lesson
        _ncu_target()
        sys.exit(0)
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    traffic(512 if common.INTERPRETER else 8192)
    inspect_compiled()
    if args.quick:
        print("\nBank conflicts (Nsight Compute): counted in full GPU runs (make bench), where ncu is installed")
    else:
        bank_conflicts()
    stencil_reuse(common.run_benchmarks(BENCHMARKS, args.quick)[STENCIL.title])
