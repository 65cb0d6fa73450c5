"""
Lesson 04: matrix multiplication
================================

Build `matmul(a, b)` four times, from a naive kernel to a tiled, grouped, autotuned `tl.dot`
kernel, and measure every version against cuBLAS (torch.matmul) on the GPU it runs on.

You will learn:
- why a large matmul is compute bound and a GEMV memory bound: arithmetic intensity, the roofline
- how one program computes one output tile with a K loop of `tl.dot` into an fp32 accumulator
- why the order in which programs run matters: grouped ordering for L2 reuse
- what BLOCK_M/N/K, num_warps and num_stages change, measured, and how `triton.autotune` picks them
- what fp16, bf16 and tf32 inputs do to precision, measured against float64

Run:  python lessons/intermediate/04_matmul.py [--quick]
"""

import functools
import inspect
import sys
import time
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

from common import Table, capability, section

# %% [markdown]
# ## Motivation
# C = A @ B with A of shape (M, K) and B of shape (K, N) does 2*M*N*K flops (a multiply and an
# add per (m, n, k)) but must move only M*K + K*N + M*N elements. At 4096^3 in fp16 that is
# 137 GFLOP against 96 MiB: about 1,365 flops per byte. A GPU's *balance* (its peak flop rate
# divided by its memory bandwidth) is far lower than that, so a large matmul is *compute
# bound*: the question is how close we get to the tensor cores' peak, which we measure as
# cuBLAS's rate in the same run. Shrink one dimension to 1 (a GEMV) and the same formula gives
# about 1 flop per byte: memory bound, judged in GB/s like lesson 01. The traffic section below
# prints these numbers for several shapes; the roofline benchmark measures them.

# %% [markdown]
# ## Reference (PyTorch)


# %%
def matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b  # reads M*K + K*N elements, writes M*N; 2*M*N*K flops; one aten.mm (cuBLAS)


def matmul_flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K


def matmul_min_bytes(M: int, N: int, K: int, element_size: int) -> int:
    return (M * K + K * N + M * N) * element_size  # each input read once, the output written once


def tile_load_bytes(M: int, N: int, K: int, block_m: int, block_n: int, element_size: int) -> int:
    """Bytes the programs of a tiled kernel load (from L2 or HBM) and store.

    Each of the cdiv(M, BM) * cdiv(N, BN) programs reads a BM x K strip of A and a K x BN strip of
    B: A is read cdiv(N, BN) times over, B cdiv(M, BM) times. Bigger tiles, fewer re-reads.
    """
    programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    return (programs * (block_m + block_n) * K + M * N) * element_size


# %% [markdown]
# ## Kernel
# Four versions, each changing one thing (select them from VERSIONS below):
#   v1  one program per BLOCK_M x BLOCK_N output tile; K loop of rank-1 updates on CUDA cores
#   v2  the K loop takes BLOCK_K at a time with `tl.dot` (tensor cores), fp32 accumulator
#   v3  v2 with a 1-D grid in *grouped* order, so programs running together share A and B tiles
#   v4  v3 with its tiles, num_warps and num_stages picked by `triton.autotune` (pipelined loads)


# %%
@triton.jit
def matmul_v1_kernel(
    a_ptr,  # pointer to A[0, 0]; A is M x K
    b_ptr,  # pointer to B[0, 0]; B is K x N
    c_ptr,  # pointer to C[0, 0]; C is M x N, same dtype as A and B
    M, N, K,  # the matrix sizes
    stride_am, stride_ak,  # A[m, k] is at a_ptr + m * stride_am + k * stride_ak (in elements)
    stride_bk, stride_bn,  # B[k, n] is at b_ptr + k * stride_bk + n * stride_bn
    stride_cm, stride_cn,  # C[m, n] is at c_ptr + m * stride_cm + n * stride_cn
    BLOCK_M: tl.constexpr,  # rows of C per program
    BLOCK_N: tl.constexpr,  # columns of C per program
):
    pid_m = tl.program_id(axis=0)  # which tile row of C
    pid_n = tl.program_id(axis=1)  # which tile column of C
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m * stride_am  # column k = 0 of this tile's rows of A
    b_ptrs = b_ptr + offs_n * stride_bn  # row k = 0 of this tile's columns of B
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K):
        # Column k of the A tile times row k of the B tile (an outer product) is this k's share
        # of every C[m, n] in the tile. One k per step, on CUDA cores: no tensor cores.
        a = tl.load(a_ptrs, mask=mask_m, other=0.0)
        b = tl.load(b_ptrs, mask=mask_n, other=0.0)
        acc += a[:, None].to(tl.float32) * b[None, :].to(tl.float32)
        a_ptrs += stride_ak
        b_ptrs += stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def matmul_v2_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # how much of K one tl.dot consumes
    INPUT_PRECISION: tl.constexpr,  # fp32 inputs only: "ieee" (exact fp32), "tf32", "tf32x3"
):
    pid_m = tl.program_id(axis=0)
    pid_n = tl.program_id(axis=1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # a BLOCK_M x BLOCK_K tile
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # a BLOCK_K x BLOCK_N tile
    # fp32 accumulator whatever the input dtype: a sum kept in fp16 would round at every step.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K  # the last step may hold fewer than BLOCK_K: mask, load zeros
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # acc += a @ b on tensor cores
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def matmul_v3_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # tile rows per group: programs walk GROUP_M rows, column by column
    INPUT_PRECISION: tl.constexpr,
):
    # A 1-D grid: program ids are handed out (roughly) in order, so the mapping from pid to
    # tile decides which tiles run at the same time. Row by row, the programs running together
    # need one strip of A but *every* strip of B. In groups of GROUP_M tile rows, walked column
    # by column, they share GROUP_M strips of A and a few strips of B, which stay in L2.
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)  # the last group may be shorter
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    # From here on, the same as v2.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def v4_configs() -> list:
    """The configs v4's autotuner times on the first call for each (M, N, K) and dtype."""
    if common.INTERPRETER:
        # The interpreter runs programs one after another on numpy: timing configs there says
        # nothing about a GPU, so give the autotuner one small config (it then times nothing).
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    # Hand-picked for fp16/bf16 on H100/H200 (sm_90). num_stages = how many K steps of A and B
    # tiles are in flight in shared memory at once: loads for later steps overlap the tl.dot of
    # this one. Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes: 48 KiB for
    # 128x256x64, so 4 stages use 192 KiB of the 227 KiB an H100/H200 SM gives one program.
    # Measured on H200 at 4096^3 fp16 (2026-11-22): 128x256x64 with 8 warps ran at 86% of cuBLAS
    # with 3 stages and 95% with 4; GROUP_M 16 gave 97% against 94% for GROUP_M 8 (+-6%).
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 16}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


# v4 is v3's kernel with a config chosen by timing: the first call for each new (M, N, K) (and
# dtypes, which the autotuner adds to the key) runs every config and keeps the fastest.
# Configs whose A and B tiles do not fit this GPU's shared memory are pruned before timing
# (common/capability.py: 128 x 256 x 64 with 4 stages needs 192 KiB on an H100, 144 KiB on an
# RTX 3090 or 4090, which have 99 KiB).
matmul_v4_kernel = triton.autotune(
    configs=v4_configs(), key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": capability.prune_configs_by_shared_memory})(matmul_v3_kernel)


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. The kernels take strides, so a transposed view
# (b.t(), as nn.Linear stores its weight) works without a copy.

# %%
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if common.supports_bf16() else ())
PRECISIONS = ("ieee", "tf32", "tf32x3")

# In the interpreter every program runs one after another on numpy: small tiles, fast checks.
V1_GPU_BLOCK = 64
V1_BLOCK = 32 if common.INTERPRETER else V1_GPU_BLOCK
# v2 and v3: one middle-sized tile and no software pipelining (num_stages=1: each K step waits
# for its own loads), so that what v3 and v4 add can be seen on its own.
V23_GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=1)
V23_CONFIG = (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1) if common.INTERPRETER
              else V23_GPU_CONFIG)
V3_GROUP_M = 4 if common.INTERPRETER else 8


def _prepare(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, input_precision: str):
    """Validate a (M, K) and b (K, N); return M, N, K and the output (allocated if None)."""
    common.check_tensors(a=a, b=b, same_shape=False, contiguous=False, ndim=2, dtypes=DTYPES)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a has shape {tuple(a.shape)} and b has shape {tuple(b.shape)}: "
                         f"a.shape[1] must equal b.shape[0] (the K both share)")
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(PRECISIONS)}, got '{input_precision}'")
    (M, K), N = a.shape, b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    else:
        common.check_tensors(a=a, out=out, same_shape=False, contiguous=False, ndim=2)
        if out.shape != (M, N):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected ({M}, {N})")
    return M, N, K, out


def _strides(a, b, c):
    return (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))


def matmul_v1(a, b, out=None, input_precision="ieee", block=V1_BLOCK):
    M, N, K, out = _prepare(a, b, out, input_precision)  # v1 never uses tensor cores: always exact fp32
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(M, block), triton.cdiv(N, block))
    matmul_v1_kernel[grid](a, b, out, M, N, K, *_strides(a, b, out), BLOCK_M=block, BLOCK_N=block)
    return out


def matmul_v2(a, b, out=None, input_precision="ieee", config=None):
    M, N, K, out = _prepare(a, b, out, input_precision)
    if out.numel() == 0:
        return out
    cfg = config or V23_CONFIG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    matmul_v2_kernel[grid](a, b, out, M, N, K, *_strides(a, b, out), INPUT_PRECISION=input_precision, **cfg)
    return out


def matmul_v3(a, b, out=None, input_precision="ieee", config=None):
    """v3 with V23_CONFIG and GROUP_M = V3_GROUP_M, or with `config` (the tile sweep's)."""
    M, N, K, out = _prepare(a, b, out, input_precision)
    if out.numel() == 0:
        return out
    cfg = config or dict(V23_CONFIG, GROUP_M=V3_GROUP_M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    matmul_v3_kernel[grid](a, b, out, M, N, K, *_strides(a, b, out), INPUT_PRECISION=input_precision, **cfg)
    return out


def matmul_v4(a, b, out=None, input_precision="ieee"):
    M, N, K, out = _prepare(a, b, out, input_precision)
    if a.dtype == torch.float32:
        raise TypeError("matmul_v4 is tuned for float16 / bfloat16 tensor cores (its configs do not "
                        "all fit fp32 tiles in shared memory); use version=3 for float32")
    if out.numel() == 0:
        return out
    # The grid depends on the config the autotuner picks, so it is a function of the meta-parameters.
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    matmul_v4_kernel[grid](a, b, out, M, N, K, *_strides(a, b, out), INPUT_PRECISION=input_precision)
    return out


VERSIONS = common.Versions("matmul")
VERSIONS.add("v1", "naive: rank-1 updates, no tl.dot", matmul_v1)
VERSIONS.add("v2", "tiled tl.dot, fp32 accumulator", matmul_v2)
VERSIONS.add("v3", "+ grouped program order", matmul_v3)
VERSIONS.add("v4", "+ autotuned tiles/warps/stages", matmul_v4)


def matmul(a: torch.Tensor, b: torch.Tensor, version: int | str | None = None, out: torch.Tensor | None = None,
           input_precision: str = "ieee") -> torch.Tensor:
    """a @ b for 2-D a (M, K) and b (K, N) of one dtype (float32, float16, bfloat16 on a GPU).

    version: 1 to 4 or "v1" to "v4" (see VERSIONS); None picks v4 for fp16/bf16 and v3 for fp32
    (v4's configs are chosen for 16-bit inputs). input_precision (fp32 only): "ieee" is exact fp32
    like torch.matmul's default, "tf32" rounds the inputs to 10 mantissa bits to use the tensor
    cores, "tf32x3" uses three tf32 products to get close to fp32 again.
    """
    if version is None:
        version = 3 if getattr(a, "dtype", None) == torch.float32 else 4
    return VERSIONS.get(version).fn(a, b, out=out, input_precision=input_precision)


# %% [markdown]
# ## Check
# Awkward shapes (M, N, K not multiples of any tile; M = 1; K smaller than BLOCK_K), a
# transposed (non-contiguous) B, outputs poisoned with NaN, a float64 reference. Inputs are
# scaled by 1/sqrt(K) so every output is about N(0, 1) whatever K is: the dtype's tolerance
# then means the same thing for every shape.


# %%
def random_problem(M, N, K, dtype, transpose_b=False, device=common.DEVICE):
    a = common.randn(M, K, dtype=dtype, device=device, scale=K ** -0.5)
    b = (common.randn(N, K, dtype=dtype, device=device).t() if transpose_b
         else common.randn(K, N, dtype=dtype, device=device))
    return a, b


def check(quick: bool) -> None:
    section("Check: every version against PyTorch (float64 reference)")
    if common.INTERPRETER:
        shapes = [tuple(common.awkward_sizes(3, lo=17, hi=100, include=())), (1, 37, 5), (67, 45, 83)]
        dtypes = DTYPES
    else:
        # On a GPU each new dtype or shape class is a compile (and, for v4, a round of tuning):
        # here a few generic shapes; the tests add M = 1, K < BLOCK_K and transposed inputs.
        shapes = [tuple(common.awkward_sizes(3, lo=17, hi=1000, include=())) for _ in range(1 if quick else 2)]
        dtypes = (torch.float16,) if quick else DTYPES
    for version in VERSIONS:
        for dtype in dtypes:
            if version.key == "v4" and dtype == torch.float32:
                continue  # v4 is the fp16/bf16 kernel
            if common.HAS_GPU and dtype == torch.float32 and version.key != "v3":
                continue  # fp32 on a GPU: v3 is the one benchmarked; the tests check v1 and v2 too
            for i, (M, N, K) in enumerate(shapes):
                a, b = random_problem(M, N, K, dtype, transpose_b=common.INTERPRETER and i == 0)
                out = common.poisoned_empty(M, N, dtype=dtype)
                version.fn(a, b, out=out)
                common.assert_close(out, a.double() @ b.double(), name=f"{version.key} {M}x{N}x{K} {common.dtype_name(dtype)}")
    names = ", ".join(common.dtype_name(d) for d in dtypes)
    transposed = " (the first with a transposed b)" if common.INTERPRETER else ""
    fp32 = ("; fp32: v3 only" if common.HAS_GPU else "; fp32: v1 to v3") if torch.float32 in dtypes else ""
    print(f"v1..v4 match PyTorch for (M, N, K) in {shapes}{transposed}, dtypes {names}{fp32}: OK")
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


# %% [markdown]
# ## Memory traffic and arithmetic intensity
# Arithmetic intensity = flops / bytes moved. Below the GPU's balance point (peak flop/s divided
# by bandwidth, the *ridge* of the roofline) a kernel is memory bound, above it compute bound.
# A tiled kernel moves more than the minimum: every program re-reads its strips of A and B.

# %%
SHAPES = [  # (name, M, N, K) for the intensity table and the roofline benchmark
    ("square 4096", 4096, 4096, 4096),
    ("square 1024", 1024, 1024, 1024),
    ("tall (M >> N)", 16384, 128, 4096),
    ("wide (N >> M)", 128, 16384, 4096),
    ("GEMV-like (M = 1)", 1, 8192, 8192),
]


def traffic() -> None:
    section("Memory traffic and arithmetic intensity (fp16, modelled: no GPU needed)")
    table = Table("flops, minimum bytes and intensity by shape (fp16)",
                  ["shape", "M x N x K", "GFLOP", "min bytes", "flop / byte"])
    for name, M, N, K in SHAPES:
        flops, nbytes = matmul_flops(M, N, K), matmul_min_bytes(M, N, K, 2)
        table.add(name, f"{M}x{N}x{K}", flops / 1e9, common.fmt_bytes(nbytes), flops / nbytes)
    table.print()
    print("Compare flop / byte with the ridge point the roofline benchmark measures on a GPU "
          "(cuBLAS TFLOP/s / copy GB/s): below it a shape is memory bound.")

    M = N = K = 4096
    table = Table("what the tiles of one 4096^3 fp16 matmul load (from L2 or HBM), modelled",
                  ["tile BM x BN", "programs", "bytes loaded", "x minimum", "flop / byte loaded"])
    for bm, bn in ((32, 32), (64, 64), (128, 128), (128, 256)):
        loaded = tile_load_bytes(M, N, K, bm, bn, 2)
        table.add(f"{bm} x {bn}", triton.cdiv(M, bm) * triton.cdiv(N, bn), common.fmt_bytes(loaded),
                  loaded / matmul_min_bytes(M, N, K, 2), matmul_flops(M, N, K) / loaded)
    table.print()
    print("A tile of BM x BN does 2*BM*BN flops per (BM + BN) elements it loads per k: bigger "
          "tiles re-read less. What they re-read must come from L2, not HBM, which is what "
          "grouped ordering (v3) is for.")

    # Counted on meta tensors (shapes without data): no memory, no compute, the same aten ops.
    a = torch.empty(M, K, dtype=torch.float16, device="meta")
    b = torch.empty(K, N, dtype=torch.float16, device="meta")
    bias = torch.empty(N, dtype=torch.float16, device="meta")
    print(f"\nmodelled minimum for a @ b:           {common.fmt_bytes(matmul_min_bytes(M, N, K, 2))}")
    print(f"PyTorch a @ b, counted:               {common.count_torch_traffic(matmul_reference, a, b).summary()}")
    fused = common.count_torch_traffic(lambda x, y: torch.relu(x @ y + bias), a, b)
    print(f"PyTorch relu(a @ b + bias), counted:  {fused.summary()}")
    print("The bias and the relu each re-read and re-write the whole output: exercise 4.1 does "
          "them in the matmul's epilogue, on the tile while it is still in registers.")


# %% [markdown]
# ## Precision: fp32, tf32, bf16, fp16
# tf32 keeps fp32's 8 exponent bits but only 10 mantissa bits (fp16 has 10, bf16 7, fp32 23).
# With input_precision="tf32", tl.dot feeds fp32 inputs to the tensor cores as tf32: products
# lose precision, the sum stays fp32. "tf32x3" splits each input into a tf32 part and a tf32
# remainder and sums three tensor-core products instead of one, to recover most of fp32's precision.


# %%
def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Emulate tf32: keep the top 10 of fp32's 23 mantissa bits (truncation, as tl.dot may do)."""
    return (x.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius): one number for the error of a whole matrix."""
    return float((out.double() - ref).norm() / ref.norm())


# One config for the three fp32 modes, so that only input_precision differs between them. fp32
# tiles take twice the bytes of fp16 ones: 32 KiB per stage here, 96 KiB for 3 stages.
FP32_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def precision(M: int, N: int, K: int) -> None:
    section(f"Precision: error against float64 of the same fp32 inputs ({M}x{N}x{K})")
    a, b = random_problem(M, N, K, torch.float32)
    ref = a.double() @ b.double()
    table = Table("relative error = ||C - C64|| / ||C64|| (Frobenius)",
                  ["inputs", "mantissa bits multiplied", "how", "relative error"])
    for name, bits, how, x, y in (("tf32", 10, "truncated", to_tf32(a), to_tf32(b)),
                                  ("fp16", 10, "rounded", a.half(), b.half()),
                                  ("bf16", 7, "rounded", a.bfloat16(), b.bfloat16())):
        # Inputs converted, products and sums in float64: the error the inputs alone bring.
        table.add(name, bits, f"emulated: inputs {how}, float64 sums", relative_error(x.double() @ y.double(), ref))
    if common.INTERPRETER:  # fp32 inputs are exact: what is left is the rounding of the fp32 sums
        table.add("fp32", 23, "torch.matmul in fp32 on the CPU", relative_error(a @ b, ref))
    if common.HAS_GPU:
        for prec, bits in (("ieee", "23"), ("tf32x3", "10 (x3)"), ("tf32", "10")):
            c = matmul_v3(a, b, input_precision=prec, config=FP32_CONFIG)
            table.add("fp32", bits, f"Triton v3, input_precision='{prec}'", relative_error(c, ref))
        before = torch.backends.cuda.matmul.allow_tf32
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            table.add("fp32", 10 if allow else 23, f"torch.matmul, allow_tf32={allow}", relative_error(a @ b, ref))
        torch.backends.cuda.matmul.allow_tf32 = before
        for dtype in (torch.float16,) + ((torch.bfloat16,) if common.supports_bf16() else ()):
            table.add("fp16" if dtype == torch.float16 else "bf16", 10 if dtype == torch.float16 else 7,
                      "Triton v4 (output rounded too)", relative_error(matmul(a.to(dtype), b.to(dtype)), ref))
    table.print()
    print("tf32 has fp16's 10 mantissa bits with fp32's range; truncating (not rounding) to them "
          "adds to the error. Digits traded for tensor-core speed (the fp32 benchmark times the "
          "trade): that is why torch.matmul keeps fp32 inputs in full precision by default "
          "(torch.backends.cuda.matmul.allow_tf32 = False).")
    if not common.HAS_GPU:
        print(common.require_gpu("Measured rows (Triton ieee / tf32x3 / tf32, torch, fp16 and bf16 on tensor cores)")
              + "; the interpreter computes tl.dot in full fp32 whatever input_precision says")


# %% [markdown]
# ## Benchmark
# Declared below, run by common.run_benchmarks: every provider in alternating rounds (CUDA
# events, L2 flushed), TFLOP/s = 2*M*N*K / time, against torch.matmul (cuBLAS) on the same
# inputs in the same run. torch.compile is not raced here: for a lone matmul it calls the same
# cuBLAS kernel (its own Triton matmul templates run only under mode="max-autotune").


# %%
def _flops(a, b, *config) -> int:
    return matmul_flops(a.shape[0], b.shape[1], a.shape[1])


def tuning(n: int, dtypes) -> None:
    """v4's first call at a new shape times every config (compiling those not in Triton's cache);
    here, outside the benchmark, so that its cost is seen, and its output checked at the bar's shape."""
    section(f"v4's first call at {n}^3: the autotuner at work")
    for dtype in dtypes:
        a, b = random_problem(n, n, n, dtype)
        start = time.perf_counter()
        out = matmul(a, b, version=4)
        torch.cuda.synchronize()
        tuning_s = time.perf_counter() - start
        common.assert_close(out, a.double() @ b.double(), name=f"v4 {n}^3 {common.dtype_name(dtype)}")
        print(f"{common.dtype_name(dtype)}: timed {len(v4_configs())} configs in {tuning_s:.1f} s, picked "
              f"{getattr(matmul_v4_kernel, 'best_config', '?')}; output checked against float64: OK")


# %% [markdown]
# ## The same matmul in CUDA C++
# Two CUDA versions, built with torch's load_inline where nvcc exists. The textbook one stages
# 32 x 32 tiles of A and B in shared memory and gives each thread one output (fp32 FMAs on the
# CUDA cores). The second uses the tensor cores through WMMA (16 x 16 x 16 fragments, which
# compile to mma.sync): a 128 x 128 tile a block of 8 warps, each warp 32 x 64 of it, K in steps
# of 32 staged in padded shared memory, 16-byte loads where a row allows them. What it still
# lacks, and v4 gets from Triton's compiler: asynchronous copies with several stages in flight
# (cp.async or TMA), Hopper's wgmma, swizzled shared memory, grouped program order, and a tuned
# tile per shape. The lines of each are counted below.


# %%
CUDA_MATMUL_KERNELS = r"""
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
using namespace nvcuda;

constexpr int T = 32;  // the textbook tile: 32 x 32 outputs, 32 x 32 threads

__global__ void matmul_tiled_kernel(const half* __restrict__ A, const half* __restrict__ B, half* __restrict__ C,
                                    int M, int N, int K) {
    __shared__ float As[T][T], Bs[T][T];
    int row = blockIdx.y * T + threadIdx.y, col = blockIdx.x * T + threadIdx.x;
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += T) {
        int ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;  // zero past the edges: the sum is unchanged
        As[threadIdx.y][threadIdx.x] = row < M && ka < K ? __half2float(A[(int64_t)row * K + ka]) : 0.f;
        Bs[threadIdx.y][threadIdx.x] = kb < K && col < N ? __half2float(B[(int64_t)kb * N + col]) : 0.f;
        __syncthreads();
        for (int k = 0; k < T; ++k) acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];  // As: one address a warp
        __syncthreads();
    }
    if (row < M && col < N) C[(int64_t)row * N + col] = __float2half(acc);
}

constexpr int BM = 128, BN = 128, BK = 32;
constexpr int PAD = 8;  // 16 bytes more a row: the rows of a fragment start in different banks

// Copy the ROWS x COLS tile at (r0, c0) of a rows x cols matrix (row stride ld) into shared memory,
// zero outside the matrix; 8 halves (16 bytes) at a time where they are inside and 16-byte aligned.
template <int ROWS, int COLS>
__device__ void load_tile(half (*dst)[COLS + PAD], const half* src, int r0, int c0, int rows, int cols, int ld) {
    for (int chunk = threadIdx.x; chunk < ROWS * COLS / 8; chunk += blockDim.x) {
        int r = chunk / (COLS / 8), c = chunk % (COLS / 8) * 8;
        int gr = r0 + r, gc = c0 + c;
        const half* p = src + (int64_t)gr * ld + gc;
        if (gr < rows && gc + 7 < cols && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
            *reinterpret_cast<uint4*>(&dst[r][c]) = *reinterpret_cast<const uint4*>(p);
        } else {
            for (int i = 0; i < 8; ++i) dst[r][c + i] = gr < rows && gc + i < cols ? p[i] : __float2half(0.f);
        }
    }
}

__global__ void __launch_bounds__(256) matmul_wmma_kernel(const half* __restrict__ A, const half* __restrict__ B,
                                                          half* __restrict__ C, int M, int N, int K) {
    __shared__ __align__(32) half As[BM][BK + PAD];
    __shared__ __align__(32) half Bs[BK][BN + PAD];
    __shared__ __align__(32) float Cs[8][16][16];  // one 16 x 16 fp32 fragment a warp, on its way out
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int wm = warp / 2 * 32, wn = warp % 2 * 64;  // 4 x 2 warps; each owns 32 x 64 outputs = 2 x 4 fragments
    int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int k0 = 0; k0 < K; k0 += BK) {
        load_tile<BM, BK>(As, A, m0, k0, M, K, K);
        load_tile<BK, BN>(Bs, B, k0, n0, K, N, N);
        __syncthreads();
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> b[4];
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wm + 16 * i][kk], BK + PAD);
            for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(b[j], &Bs[kk][wn + 16 * j], BN + PAD);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 4; ++j) {  // through shared memory: a fragment's element-to-lane map is opaque
            wmma::store_matrix_sync(&Cs[warp][0][0], acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                int r = m0 + wm + 16 * i + e / 16, c = n0 + wn + 16 * j + e % 16;
                if (r < M && c < N) C[(int64_t)r * N + c] = __float2half(Cs[warp][e / 16][e % 16]);
            }
            __syncwarp();
        }
    }
}

cudaError_t launch_matmul(const half* A, const half* B, half* C, int M, int N, int K, bool tensor_cores,
                          cudaStream_t stream) {
    if (tensor_cores) {
        matmul_wmma_kernel<<<dim3((N + BN - 1) / BN, (M + BM - 1) / BM), 256, 0, stream>>>(A, B, C, M, N, K);
    } else {
        matmul_tiled_kernel<<<dim3((N + T - 1) / T, (M + T - 1) / T), dim3(T, T), 0, stream>>>(A, B, C, M, N, K);
    }
    return cudaGetLastError();
}
"""

CUDA_MATMUL_HOST = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>

cudaError_t launch_matmul(const half* A, const half* B, half* C, int M, int N, int K, bool tensor_cores,
                          cudaStream_t stream);

void matmul(torch::Tensor a, torch::Tensor b, torch::Tensor c, bool tensor_cores) {
    for (const torch::Tensor& t : {a, b, c}) {
        TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kHalf && t.dim() == 2 && t.is_contiguous(),
                    "a, b and out must be contiguous 2-D float16 CUDA tensors");
    }
    TORCH_CHECK(a.size(1) == b.size(0), "a.shape[1] must equal b.shape[0] (the K both share)");
    TORCH_CHECK(c.size(0) == a.size(0) && c.size(1) == b.size(1), "out must have shape (M, N)");
    TORCH_CHECK(a.size(0) <= INT32_MAX && b.size(1) <= INT32_MAX && a.size(1) <= INT32_MAX,  // the kernels index with int
                "each of M, N, K must fit an int");
    const c10::cuda::CUDAGuard guard(a.device());
    auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<half*>(t.data_ptr<at::Half>()); };
    cudaError_t err = launch_matmul(ptr(a), ptr(b), ptr(c), a.size(0), b.size(1), a.size(1), tensor_cores,
                                    c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "matmul kernel launch failed: ", cudaGetErrorString(err));
}
"""


def cuda_matmul(a: torch.Tensor, b: torch.Tensor, tensor_cores: bool = True,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b by the CUDA C++ kernels above (contiguous float16; GPU with nvcc, else common.cuda_unavailable)."""
    module = common.load_cuda("course_matmul", CUDA_MATMUL_KERNELS, CUDA_MATMUL_HOST, ("matmul",))
    if module is None:
        raise RuntimeError(f"the CUDA C++ matmul is not built here: {common.cuda_unavailable()}")
    M, N, K, out = _prepare(a, b, out, "ieee")
    if M and N:
        module.matmul(a, b, out, tensor_cores)
    return out


CUDA_TILED = "cuda tiled, CUDA cores"
CUDA_WMMA = "cuda wmma, tensor cores"
SIDE_BY_SIDE_DECISIONS = {
    VERSIONS["v4"].label: "BLOCK_M/N/K, GROUP_M, num_warps, num_stages as configs to time; masks. The compiler "
                          "picked the tensor-core instructions, the shared-memory layout and the pipelining",
    CUDA_TILED: "tile size, threads a block, staging in shared memory, two __syncthreads a step, bounds and "
                "zero-fill, grid, stream, launch check, tensor checks",
    CUDA_WMMA: "all of the above, plus the warp layout (4 x 2 warps of 2 x 4 fragments), WMMA fragment types, "
               "padding against bank conflicts, 16-byte loads with a scalar edge path, the fp32 -> fp16 store "
               "through shared memory",
}


def _source_lines() -> dict[str, int]:
    triton_lines = sum(common.code_lines(inspect.getsource(f)) for f in
                       (matmul_v3_kernel.fn, v4_configs, _prepare, matmul_v4))
    cu, host = CUDA_MATMUL_KERNELS, common.code_lines(CUDA_MATMUL_HOST)
    tiled = cu[:cu.index("constexpr int BM")] + cu[cu.index("cudaError_t launch_matmul"):]
    return {VERSIONS["v4"].label: triton_lines, CUDA_TILED: common.code_lines(tiled) + host,
            CUDA_WMMA: common.code_lines(cu) + host}


def side_by_side() -> None:
    section("Triton vs CUDA C++: what each made the programmer decide")
    if common.print_side_by_side("fp16 matmul, three ways (timed in the benchmark 'Triton vs CUDA C++' below)",
                                 _source_lines(), SIDE_BY_SIDE_DECISIONS):
        return  # no CUDA here: the reason is printed
    for M, N, K in [(1, 37, 5), (67, 45, 83), (130, 257, 100), (512, 384, 1000)]:
        a, b = random_problem(M, N, K, torch.float16)
        for tensor_cores in (False, True):
            out = common.poisoned_empty(M, N, dtype=torch.float16)
            cuda_matmul(a, b, tensor_cores, out=out)
            common.assert_close(out, matmul_reference(a.double(), b.double()),
                                name=f"cuda matmul {M}x{N}x{K} tensor_cores={tensor_cores}")
    print("CUDA C++ matmul (both kernels) matches PyTorch on shapes with edges (1 x 37 x 5 to 512 x 384 x 1000): OK")


def _versus_cublas(dtype: torch.dtype) -> common.Benchmark:
    name = common.dtype_name(dtype)
    return common.Benchmark(
        f"matmul v1..v4 vs torch.matmul (cuBLAS), {name}", op="matmul", cases=[4096], quick_cases=[2048],
        cpu_cases=[64], setup=lambda n: random_problem(n, n, n, dtype), kernels=VERSIONS,
        reference=matmul_reference, flops=_flops, ceiling="matmul", dtype=dtype, label=lambda n: f"{n}^3",
        plot=f"04_matmul_versions_{name}",
        # The layer adds rounds while the v4 / cuBLAS ratio spreads (single timings of the two
        # spread by up to +-6% on an H200, 2026-11-22): the bar is the median of the rounds' pairs.
        bars=[common.Bar(VERSIONS["v4"].label, 4096, "baseline", 0.9)],
        note="Read it top to bottom: each version adds one idea. % matmul is of cuBLAS at 8192^3, "
             "measured before the table.")


TILE_SWEEP = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), all with num_stages=3 and GROUP_M=8
    (32, 32, 64, 4), (64, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 4),
    (128, 128, 64, 8), (128, 256, 64, 8), (256, 128, 64, 8),
]
STAGE_SWEEP = (1, 2, 3, 4)  # at 128 x 256 x 64, 8 warps
SWEEP_N = 4096 if common.HAS_GPU else 64


def _fits(bm: int, bn: int, bk: int, stages: int, arch: int | None = None) -> bool:
    """Whether `stages` A and B tiles (fp16) fit the shared memory one program may use on this GPU
    (or on sm_<arch>): a config that does not fit fails to launch (OutOfResources), so the sweeps
    leave it out."""
    return capability.fits_shared_memory(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages), 2, arch=arch)


def tile_sweep_cases(arch: int | None = None) -> list:
    return [c for c in TILE_SWEEP if _fits(*c[:3], 3, arch)]


def stage_sweep_cases(arch: int | None = None) -> list:
    """The stage counts of STAGE_SWEEP this GPU holds. None on a T4 (sm_75): tl.dot runs on its
    CUDA cores with fp32 copies of the tiles, 96 KiB for one stage of 128 x 256 x 64, of its 64,
    and Triton does not pipeline there anyway (common/capability.py, pipeline_buffers)."""
    return [s for s in STAGE_SWEEP if _fits(128, 256, 64, s, arch)]


def _stage_sweep_unavailable(arch: int | None = None) -> str:
    """Why this GPU runs no case of the stage sweep ("" where it runs some)."""
    if stage_sweep_cases(arch):
        return ""
    need = capability.matmul_shared_memory(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_stages=1), 2,
                                           arch=arch or capability.current_arch())
    limit = capability.shared_memory_limit(arch)
    return (f"128 x 256 x 64 tiles need {common.fmt_bytes(need)} of shared memory even with one stage, more "
            f"than the {common.fmt_bytes(limit)} one program may use here")


def _first_fitting(preferred, cases: list) -> list:
    return [preferred] if preferred in cases else cases[:1]


def _v3_with(a, b, config):
    return matmul_v3(a, b, config=config)


def _tile_label(case) -> str:
    bm, bn, bk, warps = case
    loaded = tile_load_bytes(SWEEP_N, SWEEP_N, SWEEP_N, bm, bn, 2)
    return f"{bm}x{bn}x{bk} w{warps} ({matmul_flops(SWEEP_N, SWEEP_N, SWEEP_N) / loaded:,.0f} flop/B loaded)"


# Grouped order pays where the B strips one row of tiles needs overflow L2: at 4096^3 fp16 A and B
# are 32 MiB each and stay in an H100's 50 MB L2 whatever the order.
ORDER_SHAPES = [(4096, 4096, 4096), (16384, 16384, 4096)] if common.HAS_GPU else [(64, 96, 32)]
ORDER_GROUPS = (1, 8, 32)


def _order_config(group_m: int) -> dict:
    stages = next((s for s in (4, 3, 2, 1) if _fits(128, 128, 64, s)), 1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=group_m, num_warps=4, num_stages=stages)


def _order_label(shape) -> str:
    M, N, K = shape
    b_bytes = K * N * 2  # every strip of B, which one row of tiles reads in row-by-row order
    return f"{M}x{N}x{K} (B is {common.fmt_bytes(b_bytes)})"


ORDER = common.Benchmark(
    "v3 program order: GROUP_M at two shapes, fp16, 128x128x64 tiles", op=None, cases=ORDER_SHAPES,
    quick_cases=ORDER_SHAPES[:1], cpu_cases=[(64, 96, 32)],
    setup=lambda M, N, K: random_problem(M, N, K, torch.float16),
    kernels={("GROUP_M=1 (row by row)" if g == 1 else f"GROUP_M={g}"):
             functools.partial(_v3_with, config=_order_config(g)) for g in ORDER_GROUPS},
    flops=_flops, ceiling="matmul", dtype=torch.float16, label=_order_label,
    note="Row by row, the programs running at once (one or two rows of tiles) read every strip of B: "
         "when B is larger than L2 they read it from HBM again for every row of tiles.")

ROOFLINE = common.Benchmark(
    "roofline shapes, fp16: v4 vs torch.matmul (cuBLAS)", op="matmul", cases=[s[1:] for s in SHAPES],
    quick_cases=[(1024, 1024, 1024)], cpu_cases=[(33, 20, 47), (1, 64, 64)],
    setup=lambda M, N, K: random_problem(M, N, K, torch.float16), kernels={VERSIONS["v4"].label: matmul_v4},
    reference=matmul_reference, flops=_flops, ceiling="matmul", dtype=torch.float16,
    # 1024^3 takes a few microseconds: per call inside a CUDA graph, not the host's launch cost.
    timer="graph", label=lambda shape: next((s[0] for s in SHAPES if s[1:] == shape), "x".join(map(str, shape))))

VERSUS_DTYPES = (torch.float16,) + ((torch.bfloat16,) if common.supports_bf16() else ())  # no bf16 in numpy
BENCHMARKS = [
    *(_versus_cublas(dtype) for dtype in VERSUS_DTYPES),
    common.Benchmark(
        f"v3 tile sweep at {SWEEP_N}^3 fp16 (num_stages=3, GROUP_M=8)", op=None,
        cases=tile_sweep_cases(), quick_cases=_first_fitting((128, 128, 64, 4), tile_sweep_cases()), cpu_cases=[(32, 32, 64, 4)],
        setup=lambda bm, bn, bk, warps: (*random_problem(SWEEP_N, SWEEP_N, SWEEP_N, torch.float16), dict(
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=3)),
        kernels={"v3": _v3_with}, flops=_flops, ceiling="matmul", dtype=torch.float16, label=_tile_label,
        plot="04_matmul_tiles", note="Small tiles re-read A and B too often (flop/B loaded); the largest need 8 "
                                     "warps to hold their accumulator. Configs this GPU's shared memory cannot "
                                     "hold are left out."),
    common.Benchmark(
        f"v3 num_stages at 128 x 256 x 64, 8 warps, {SWEEP_N}^3 fp16", op=None,
        cases=stage_sweep_cases(), quick_cases=_first_fitting(3, stage_sweep_cases()), cpu_cases=[1],
        setup=lambda stages: (*random_problem(SWEEP_N, SWEEP_N, SWEEP_N, torch.float16), dict(
            BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages)),
        kernels={"v3": _v3_with}, flops=_flops, ceiling="matmul", dtype=torch.float16,
        label=lambda s: f"{s} stage(s): {common.fmt_bytes(s * (128 + 256) * 64 * 2)} of shared memory",
        note="One stage: every K step waits for its own loads. More stages keep more loads in flight "
             "(in more shared memory); once the loads are hidden, more stages add nothing.",
        unavailable=_stage_sweep_unavailable()),
    common.Benchmark(
        "Triton vs CUDA C++: matmul fp16", op="matmul", cases=[4096], setup=lambda n: random_problem(n, n, n, torch.float16),
        kernels={VERSIONS["v4"].label: matmul_v4, CUDA_TILED: functools.partial(cuda_matmul, tensor_cores=False),
                 CUDA_WMMA: cuda_matmul},
        reference=matmul_reference, flops=_flops, ceiling="matmul", dtype=torch.float16, label=lambda n: f"{n}^3",
        unavailable=common.cuda_unavailable() if common.HAS_GPU else "",
        note="Lines of code and what each version made its programmer decide: the table 'fp16 matmul, three "
             "ways' above."),
    ROOFLINE,
    ORDER,
    common.Benchmark(
        "fp32 matmul: v3's input_precision vs torch.matmul (fp32 inputs, allow_tf32=False)", op="matmul",
        cases=[4096], quick_cases=[2048], cpu_cases=[32], setup=lambda n: random_problem(n, n, n, torch.float32),
        kernels={f"v3 input_precision='{p}'": functools.partial(matmul_v3, input_precision=p, config=FP32_CONFIG)
                 for p in PRECISIONS},
        reference=matmul_reference, flops=_flops, dtype=torch.float32, label=lambda n: f"{n}^3",
        note="The speed side of the precision table: 'tf32' and 'tf32x3' run on tensor cores and may beat "
             "cuBLAS's exact fp32, at the error the precision table shows."),
]


def roofline(results) -> None:
    """The roofline of the shapes ROOFLINE measured: attainable TFLOP/s = min(peak, flop/byte x bandwidth)."""
    if not results:
        return
    section("Roofline: the shapes above against both ceilings (fp16)")
    peak = common.matmul_rate(torch.float16)  # TFLOP/s: cuBLAS at 8192^3, measured in this run
    bandwidth = common.copy_bandwidth()  # GB/s, measured in this run
    ridge = peak * 1e12 / (bandwidth * 1e9)
    print(f"ceilings: cuBLAS fp16 {peak:,.0f} TFLOP/s, copy {bandwidth:,.0f} GB/s: ridge at {ridge:,.0f} flop / byte")
    table = Table("roofline: attainable TFLOP/s = min(peak, flop/byte x bandwidth)",
                  ["shape", "flop / byte", "bound", "roofline", "v4 TFLOP/s", "v4 % of roofline"])
    v4, points = VERSIONS["v4"].label, []
    for res in results:
        M, N, K = res.case
        intensity = matmul_flops(M, N, K) / matmul_min_bytes(M, N, K, 2)
        roof = min(peak, intensity * bandwidth / 1e3)  # flop/byte x GB/s = GFLOP/s; / 1e3 = TFLOP/s
        table.add(res.label, intensity, "compute" if intensity > ridge else "memory", roof, res.rate[v4],
                  100 * res.rate[v4] / roof)
        points.append((res.label, intensity, res.rate[res.best_baseline], res.rate[v4]))
    table.print()
    print("Memory-bound shapes are judged by bandwidth: their roofline is flop/byte x copy GB/s, "
          "far below the peak. A tile of 128 rows for M = 1 wastes 127 of them: exercise 4.3 "
          "writes a GEMV instead.")
    fig, ax = common.new_figure("Roofline (fp16), ceilings measured in this run",
                                "flop / byte (minimum traffic)", "TFLOP/s", logx=True)
    ax.set_yscale("log", base=2)
    xs = [2.0**e for e in range(-1, 13)]
    ax.plot(xs, [min(peak, x * bandwidth / 1e3) for x in xs], color="gray", label="roofline: cuBLAS peak, copy GB/s")
    ax.scatter([p[1] for p in points], [p[2] for p in points], marker="o", label="torch.matmul")
    ax.scatter([p[1] for p in points], [p[3] for p in points], marker="x", label="triton v4")
    for name, x, y, _ in points:
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.legend(fontsize=8)
    common.save_plot(fig, "04_matmul_roofline")


# %% [markdown]
# ## Takeaways
# - A program computes one BLOCK_M x BLOCK_N tile of C: a K loop of `tl.dot` on BLOCK_K slices,
#   summed in an fp32 accumulator and cast once, at the store; masks handle every edge.
# - Arithmetic intensity decides the bound: a large matmul is compute bound, a GEMV memory bound.
# - Bigger tiles re-read A and B less; grouped program order keeps the re-reads in L2;
#   num_stages overlaps loads with math; autotuning picks tiles, warps and stages per shape.
# - tf32 trades fp32's mantissa for tensor-core speed, fp16 and bf16 inputs trade more: measure
#   the error against float64, not only the speed.


# %%
# %% [markdown]
# ## What the compiler made
# num_warps is how many warps of 32 threads run one program: 4 warps are 128 threads sharing one
# C tile, each holding its share of the fp32 accumulator in registers (128 x 128 over 128 threads:
# 128 values a thread). common.inspect_kernel compiles each version as the benchmarks launch it
# (fp16, for this GPU; for an H100 without one) and reads its registers, spills, shared memory,
# how many programs an SM holds, and which instructions do the work: v1's loop multiplies on the
# CUDA cores (no mma), v2 and up use the tensor cores (wgmma on sm_90, mma.sync before), and
# num_stages > 1 adds asynchronous copies into shared memory (cp.async), one buffer per stage.


# %%
def compiled_versions() -> None:
    section("What the compiler made: registers, spills, shared memory and occupancy, fp16")
    n = 4096
    a = torch.empty(n, n, dtype=torch.float16, device=common.DEVICE)  # nothing is launched
    args = (a, a, a, n, n, n, n, 1, n, 1, n, 1)
    rows = [("v1", f"{V1_GPU_BLOCK} x {V1_GPU_BLOCK}, CUDA cores", matmul_v1_kernel, args,
             dict(BLOCK_M=V1_GPU_BLOCK, BLOCK_N=V1_GPU_BLOCK)),
            ("v2", "V23_CONFIG", matmul_v2_kernel, args, dict(V23_GPU_CONFIG, INPUT_PRECISION="ieee"))]
    rows += [("v3", f"{bm}x{bn}x{bk}, {s} stage(s)", matmul_v3_kernel, args,
              dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s, INPUT_PRECISION="ieee"))
             for bm, bn, bk, w, s in [(*t, 3) for t in TILE_SWEEP[1:]] + [(128, 256, 64, 8, s) for s in (1, 2, 4)]]
    reports = common.inspect_kernels([(kernel, a_, meta) for _, _, kernel, a_, meta in rows], skip_with_reason=True)
    if reports is None:
        return
    table = Table(f"matmul kernels compiled for sm_{reports[0].arch}",
                  ["version", "tile, stages", "warps", "registers/thread", "spilled", "shared", "programs/SM",
                   "bound by", "multiplies with", "async copies"])
    for (version, what, *_), r in zip(rows, reports):
        programs, binding, _ = r.occupancy()
        multiply = "wgmma" if r.features["wgmma"] else "mma.sync" if r.features["mma"] else "CUDA cores (FMA)"
        copies = ", ".join(k for k in ("TMA", "cp.async") if r.features[k]) or "-"
        table.add(version, what, r.num_warps, r.registers, common.fmt_bytes(r.local_bytes or 0),
                  common.fmt_bytes(r.shared), programs, binding, multiply, copies)
    table.print()
    if reports[0].note:
        print(reports[0].note)
    print("A program needs its shared memory and registers for its whole life: big tiles with many stages "
          "leave room for one or two programs per SM, which is why they need enough tiles to fill 132 SMs.")


if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    traffic()
    compiled_versions()
    side_by_side()
    if common.HAS_GPU:
        if not args.quick:
            precision(4096, 4096, 4096)
        tuning(2048 if args.quick else 4096, VERSUS_DTYPES)
    else:
        precision(256, 256, 4096)  # the emulated rows: rounding the inputs, on the CPU
    roofline(common.run_benchmarks(BENCHMARKS, args.quick)[ROOFLINE.title])
