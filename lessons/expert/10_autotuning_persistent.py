"""
Lesson 10, part 2: a persistent TMA matmul for Hopper
=====================================================

Lesson 10's matmuls load their tiles through pointers, one program per tile (or one per SM
looping over tiles). This part builds the matmul Hopper is designed for, step by step: tiles
moved by the TMA unit through tensor descriptors, a persistent grid whose programs walk the tiles
in grouped order with the store of one tile overlapping the loads of the next, and the same loop
warp-specialized where this Triton does it for sm_90; raced against cuBLAS at 4096^3 and 8192^3.

You will learn:
- what a tensor descriptor is (`tl.make_tensor_descriptor`, built in the kernel) and what TMA
  takes off the warps: address arithmetic, masks, registers for pointers
- a persistent tile scheduler: `tl.range(start, tiles, NUM_SMS, flatten=True)`, grouped order,
  and why the flattened loop lets one tile's epilogue overlap the next tile's loads
- wave quantization: tiles, waves and the last partial wave per config at 4096^3 on 132 SMs
- `tl.range(..., warp_specialize=True)` on Hopper, and how to see in the compiled TTGIR and PTX
  (common.inspect_kernel, compiled for sm_90 even without a GPU) what the compiler really made

Run:  python lessons/expert/10_autotuning_persistent.py [--quick]
"""

import functools
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

from common import Table, capability, fmt_bytes, section
from common.kernels import grouped_tile_position
from common.lessons import lesson_module

L10 = lesson_module("10")  # the pointer kernels, configs, pruning, hardware queries and checks this part builds on

# %% [markdown]
# ## Motivation
# Lesson 10's kernel computes, in every thread, the address of each element it loads (offsets,
# strides, wrapped rows), and Triton's pipeline copies the tiles with cp.async a few K steps
# ahead. On Hopper (sm_90) the TMA unit copies a whole tile between global and shared memory
# from one instruction and a descriptor (base, shape, strides, tile shape): no addresses in
# registers, bounds checked in hardware (rows past M or columns past K arrive as zeros, stores
# past N are dropped), and wgmma reads the tiles straight from shared memory.
# A persistent grid launches one program per SM; each loops over tiles p, p + SMs, ... . With the
# tile loop and the K loop flattened into one loop, the compiler's software pipeline runs across
# tile boundaries: the TMA loads of tile i + 1 are in flight while tile i's accumulator is
# converted and stored (the epilogue), instead of every tile starting with an empty pipeline.

# %% [markdown]
# ## Reference (PyTorch)
# Lesson 10's: `a @ b`, checked in float64; cuBLAS (torch.matmul) is the benchmark's baseline.

# %%
matmul_reference = L10.matmul_reference  # reads M*K + K*N, writes M*N; 2*M*N*K FLOPs

# %% [markdown]
# ## Kernel
# What this Triton has, read in its source (Triton 3.8 here; the lent GPUs run 3.6, which has
# the same three pieces):
# - `tl.make_tensor_descriptor` (triton/language/core.py, Triton 3.4 and later): a descriptor
#   built inside the kernel from a pointer, shape, strides and block shape. The 128-byte
#   descriptors live in a global scratch buffer that Triton asks for through `triton.set_allocator`.
#   Rules (semantic.make_tensor_descriptor, and the interpreter's TensorDescHandle.validate): the
#   base 16-byte aligned, the last stride 1, every other stride a multiple of 16 bytes. The
#   interpreter turns a descriptor into masked pointer loads (runtime/interpreter.py).
#   (The host-side triton.tools.tensor_descriptor.TensorDescriptor would do as well; a device-side
#   one takes plain pointers, which is what common.inspect_kernel can hand the compiler.)
# - `tl.range(..., flatten=True, warp_specialize=...)` (language/core.py, class range): flatten
#   fuses the tile loop with the K loop inside it (the fuse-nested-loops pass that the nvidia
#   backend runs for sm_80-sm_90), so the pipeline spans tiles.
# - warp specialization on sm_90: Triton 3.8's nvidia backend runs add_hopper_warpspec for
#   capability 8x and 9x (backends/nvidia/compiler.py, make_ttgir), as 3.6's does; its docstring
#   still says "only supported on Blackwell". Whether the loop was split into producer and consumer
#   warps is read from the compiled TTGIR (a ttg.warp_specialize region), not assumed.

# %%
def tma_unavailable() -> str:
    """Why the TMA versions cannot run here ("" where they can): this Triton lacks device-side
    descriptors or tl.range's flatten / warp_specialize, or the GPU is older than sm_90."""
    return capability.tma_unavailable(range_options=("flatten", "warp_specialize"))


@triton.jit
def _descriptors(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_b, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_TRANSPOSED: tl.constexpr):
    """The three descriptors: A (M x K), B (K x N, or its transpose N x K when b = b_t.t() with b_t
    contiguous) and C (M x N). One tile of each is one TMA copy."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_TRANSPOSED:  # B's columns are contiguous: describe B^T (N x K) and transpose each tile in shared memory
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    return a_desc, b_desc, c_desc


@triton.jit
def _tma_k_loop(a_desc, b_desc, off_m, off_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, B_TRANSPOSED: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """The K loop of one tile: no masks, no pointers. The last K step reads past K: the descriptor
    fills those columns (of A) and rows (of B) with zeros, which add nothing to the dot.
    WARP_SPECIALIZE asks the compiler to give this loop's TMA loads to producer warps and its
    wgmma to consumer warps (v3)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([off_m, k * BLOCK_K])  # (BLOCK_M, BLOCK_K): one TMA copy
        if B_TRANSPOSED:
            b = tl.trans(b_desc.load([off_n, k * BLOCK_K]))
        else:
            b = b_desc.load([k * BLOCK_K, off_n])  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def matmul_tma_kernel(
    a_ptr,  # A, M x K, row-major (stride 1 along K), 16-byte aligned
    b_ptr,  # B, K x N: row-major, or column-major (B_TRANSPOSED)
    c_ptr,  # C, M x N, row-major, the dtype of A and B
    M, N, K,  # the matrix sizes
    stride_am,  # A's row stride, in elements (a multiple of 16 bytes)
    stride_b,  # B's stride that is not 1: stride_bk (row-major) or stride_bn (B_TRANSPOSED)
    stride_cm,  # C's row stride
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # the tile, as in lesson 10
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped order (L2 reuse)
    B_TRANSPOSED: tl.constexpr,  # B is column-major: its descriptor describes B^T
):
    """v1: one program per tile, as lesson 10's matmul_kernel, every tile moved by TMA."""
    a_desc, b_desc, c_desc = _descriptors(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_b, stride_cm,
                                          BLOCK_M, BLOCK_N, BLOCK_K, B_TRANSPOSED)
    pid_m, pid_n = grouped_tile_position(tl.program_id(axis=0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _tma_k_loop(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M, BLOCK_N, BLOCK_K, B_TRANSPOSED,
                      False)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))  # past M or N: dropped


@triton.jit
def matmul_tma_persistent_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_b, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # the grid's size: program p computes tiles p, p + NUM_PROGRAMS, ...
    WARP_SPECIALIZE: tl.constexpr,  # v3: the K loop warp-specialized, the tile loop not flattened
):
    """v2 (and v3 with WARP_SPECIALIZE): a persistent grid over the tiles, in grouped order.

    v3 asks for warp specialization on the K loop, not on the flattened tile loop: compiled for
    sm_90 with Triton 3.8, warp_specialize on the flattened loop (as Triton's tutorial writes it
    for Blackwell) leaves no partitions in the TTGIR, while on a plain K loop inside an unflattened
    tile loop the Hopper pass splits it (at 4 warps; the table of compiled versions shows which)."""
    a_desc, b_desc, c_desc = _descriptors(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_b, stride_cm,
                                          BLOCK_M, BLOCK_N, BLOCK_K, B_TRANSPOSED)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # The epilogue keeps its own tile counter, as Triton's persistent-matmul tutorial does: its note
    # says the pipeliner of a flattened loop cannot handle one value used both in the loads of a
    # tile (the loop's prologue, pipelined ahead) and in the store of the tile before (its epilogue).
    tile_id_c = tl.program_id(axis=0) - NUM_PROGRAMS
    for tile_id in tl.range(tl.program_id(axis=0), num_tiles, NUM_PROGRAMS, flatten=not WARP_SPECIALIZE):
        pid_m, pid_n = grouped_tile_position(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tma_k_loop(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                          B_TRANSPOSED, WARP_SPECIALIZE)
        tile_id_c += NUM_PROGRAMS
        pid_m_c, pid_n_c = grouped_tile_position(tile_id_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # A TMA store: the tile goes to shared memory, then one asynchronous copy to global memory,
        # which runs while the loop goes on with the next tile's loads.
        c_desc.store([pid_m_c * BLOCK_M, pid_n_c * BLOCK_N], acc.to(c_ptr.dtype.element_ty))


# %% [markdown]
# ### Configs and pruning
# The tutorial-sized Hopper tiles, 3 or 4 stages, 4 or 8 warps. Shared memory of a TMA config, as
# compiled for sm_90 with Triton 3.8 (the table of compiled versions below): lesson 10's
# num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes for the K loop and a few mbarriers; the
# persistent kernel adds the C tile that its TMA store stages (BLOCK_M x BLOCK_N x 2) beside the
# loop's buffers, so that the store can overlap the next tile's loads (v1 stages it in the loop's
# buffers, which are free by then). Lesson 10's prune_matmul_configs drops the tiles larger than
# the problem and the loops that do not fit; this prune then drops the persistent configs whose C
# tile pushes them past the limit (128 x 256 x 64 with 4 stages: 192 KiB + 64 KiB > 227 KiB).


# %%
def _config(bm, bn, bk, num_warps, num_stages, group_m=8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=num_warps, num_stages=num_stages)


GPU_CONFIGS = [
    _config(128, 128, 64, 4, 3), _config(128, 128, 64, 4, 4), _config(128, 128, 64, 8, 4),
    _config(128, 256, 64, 8, 3), _config(128, 256, 64, 8, 4),  # the 4-stage one is pruned on sm_90 (C tile)
    _config(256, 128, 64, 8, 3), _config(256, 128, 64, 8, 4),
    _config(64, 64, 64, 4, 3),  # small problems, and fp32 (tf32): 96 KiB of loop + 16 KiB of C tile
]
# The interpreter runs programs one after another on numpy: small tiles keep the checks fast.
CONFIGS = [_config(32, 32, 32, 4, 1, group_m=2), _config(16, 32, 16, 1, 1, group_m=2)] if common.INTERPRETER \
    else GPU_CONFIGS
CHECK_TRITON_CONFIG = CONFIGS[0] if common.INTERPRETER else GPU_CONFIGS[-1]  # fits fp32 on sm_90
CHECK_CONFIG = L10.config_dict(CHECK_TRITON_CONFIG)
MBARRIER_BYTES = 1024  # the TMA copies' barriers: 24 B measured; 1 KiB of room


def tma_smem_bytes(config: triton.Config, element_size: int, persistent: bool) -> int:
    """The K loop's buffers (lesson 10's config_smem_bytes), the barriers, and for the persistent
    kernel the C tile of its TMA store."""
    kw = config.kwargs
    c_tile = kw["BLOCK_M"] * kw["BLOCK_N"] * element_size if persistent else 0
    return L10.config_smem_bytes(config, element_size) + c_tile + MBARRIER_BYTES


def _tma_prune(persistent: bool):
    def prune(configs: list, named_args: dict, **kwargs) -> list:
        """early_config_prune: lesson 10's rules, then this kernel's shared memory (tma_smem_bytes)."""
        kept = L10.prune_matmul_configs(configs, named_args, **kwargs)
        element_size = named_args["a_ptr"].element_size()
        need = lambda c: tma_smem_bytes(c, element_size, persistent)  # noqa: E731
        return [c for c in kept if need(c) <= L10.shared_memory_limit()] or [min(kept, key=need)]
    return {"early_config_prune": prune}


prune_tma_configs = _tma_prune(False)["early_config_prune"]
prune_tma_persistent_configs = _tma_prune(True)["early_config_prune"]
_KEY = ["M", "N", "K", "B_TRANSPOSED"]
matmul_tma_tuned_kernel = triton.autotune(CONFIGS, _KEY, do_bench=L10.TUNER_BENCH,
                                          prune_configs_by=_tma_prune(False))(matmul_tma_kernel)
# v2 and v3 are one kernel with WARP_SPECIALIZE set: two tuners, so each keeps its own pick (v3's
# configs are cut to those that compile here, by screen_v3_configs, before it runs on a GPU).
matmul_tma_persistent_tuned_kernel = triton.autotune(CONFIGS, _KEY, do_bench=L10.TUNER_BENCH,
                                                     prune_configs_by=_tma_prune(True))(matmul_tma_persistent_kernel)
matmul_tma_ws_tuned_kernel = triton.autotune(list(CONFIGS), _KEY, do_bench=L10.TUNER_BENCH,
                                             prune_configs_by=_tma_prune(True))(matmul_tma_persistent_kernel)


# %% [markdown]
# ## Wrapper
# validate (lesson 10's checks, then TMA's alignment rules), allocate, grid, launch, return.
# `config=None` autotunes; a dict of lesson 10's CONFIG_KEYS runs that one config.

# %%
VERSIONS_WHAT = {
    "v1": "TMA descriptors, one program per tile",
    "v2": "v1 + persistent grid, flattened tile loop",  # the TMA store of a tile overlaps the next one's loads
    "v3": "v2 + warp-specialized K loop",  # tl.range(warp_specialize=True); the tile loop not flattened
}
_ALLOCATOR_SET = []


def _set_allocator() -> None:
    """Device-side descriptors live in a global scratch buffer that Triton asks for through the
    allocator (a launch fails with "Kernel requires a runtime memory allocation" without one)."""
    if common.HAS_GPU and not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET.append(True)


def _tma_layout(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int, bool]:
    """(stride_am, stride_b, stride_cm, B_TRANSPOSED), or a ValueError naming TMA's rule that fails."""
    def check(name, t, stride):
        if t.data_ptr() % 16 or (stride * t.element_size()) % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address and have a row stride that is a multiple "
                             f"of 16 bytes for TMA, got address {t.data_ptr()} and strides {t.stride()} "
                             f"({t.element_size()}-byte elements): pad the inner dimension to a multiple of "
                             f"{16 // t.element_size()}, or use lesson 10's matmul")
    for name, t in (("a", a), ("out", out)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be row-major (stride 1 along its columns) for TMA, got strides {t.stride()}; "
                             f"pass {name}.contiguous()")
        check(name, t, t.stride(0))
    if b.stride(1) == 1:
        transposed, stride_b = False, b.stride(0)
    elif b.stride(0) == 1:
        transposed, stride_b = True, b.stride(1)
    else:
        raise ValueError(f"b must be row-major or column-major for TMA, got strides {b.stride()}; pass b.contiguous()")
    check("b", b, stride_b)
    return a.stride(0), stride_b, out.stride(0), transposed


def programs_for(tiles: int) -> int:
    """The persistent grid: one program per SM, never more than the tiles (the interpreter: 3, so
    that every program loops over several tiles)."""
    return max(1, min(tiles, L10.sm_count() if common.HAS_GPU else 3))


def matmul_tma(a: torch.Tensor, b: torch.Tensor, version: str = "v2", config: dict | None = None,
               out: torch.Tensor | None = None, num_programs: int | None = None) -> torch.Tensor:
    """a @ b by v1 (TMA, one program per tile), v2 (TMA, persistent) or v3 (v2 warp-specialized);
    config=None autotunes. num_programs: the persistent grid's size (default programs_for)."""
    if version not in VERSIONS_WHAT:
        raise ValueError(f"version must be one of {', '.join(VERSIONS_WHAT)}, got {version!r}")
    why = tma_unavailable()
    if why:
        raise RuntimeError(f"matmul_tma {version}: {why}")
    M, N, K, out = L10._prepare(a, b, out)  # shapes, dtypes (one for a, b and out), devices
    if config is not None:
        L10._check_config(config)
    if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
        raise ValueError(f"num_programs must be a positive int, got {num_programs!r}")
    stride_am, stride_b, stride_cm, transposed = _tma_layout(a, b, out)
    _set_allocator()
    args = (a, b, out, M, N, K, stride_am, stride_b, stride_cm)
    meta = dict(B_TRANSPOSED=transposed, **(config or {}))
    tiles = lambda m: triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])  # noqa: E731
    if version == "v1":
        kernel = matmul_tma_tuned_kernel if config is None else matmul_tma_kernel
        kernel[lambda m: (tiles(m),)](*args, **meta)
        return out
    # NUM_PROGRAMS is a constexpr (the loop's step): it must be known before the config is, so it is
    # the SM count, and a grid smaller than that is only asked for with a fixed config.
    programs = num_programs or (programs_for(tiles(config)) if config else programs_for(1 << 30))
    if config is None:
        kernel = matmul_tma_ws_tuned_kernel if version == "v3" else matmul_tma_persistent_tuned_kernel
    else:
        kernel = matmul_tma_persistent_kernel
    kernel[lambda m: (min(programs, tiles(m)),)](*args, NUM_PROGRAMS=programs, WARP_SPECIALIZE=version == "v3",
                                                 **meta)
    return out


VERSIONS = common.Versions("matmul, Hopper TMA")
for _key, _what in VERSIONS_WHAT.items():
    VERSIONS.add(_key, _what, functools.partial(matmul_tma, version=_key))


# %% [markdown]
# ## Check
# Every version against float64 on awkward shapes: M anything, N and K multiples of 8 (TMA's
# 16-byte rows in fp16) but of no tile; B row-major and column-major; outputs poisoned with NaN;
# the persistent kernels with 3 programs, so each loops over several tiles; the tuned path once.
# The interpreter runs fp32 and fp16 (no bfloat16 there); a GPU runs fp16, bf16 and fp32 (tf32).


# %%
def awkward_tma_sizes(count: int, lo: int, hi: int) -> list[int]:
    """Sizes that are multiples of 8 and not of 16: legal TMA rows at 2 bytes, awkward for every tile."""
    return [8 * (2 * int(torch.randint(lo // 16, hi // 16, ())) + 1) for _ in range(count)]


def check_tma(fn, M: int, N: int, K: int, dtype: torch.dtype, name: str, transpose_b: bool = False) -> None:
    a, b = L10.random_problem(M, N, K, dtype, transpose_b)
    out = common.poisoned_empty(M, N, dtype=dtype)
    fn(a, b, out)
    common.assert_close(out, a.double() @ b.double(), name=f"{name} {M}x{N}x{K} {common.dtype_name(dtype)}"
                        + (" (b column-major)" if transpose_b else ""), **common.checks.dot_tolerance(dtype))


def v3_compile_error(config: triton.Config, dtype: torch.dtype) -> str:
    """On a GPU: "" if v3 compiles for it with this config and dtype, else the compiler's error
    (a Hopper warp-specialization pass may reject a loop: a finding to print, not a crash). The
    interpreter runs v3 as v2, with nothing to compile."""
    if not common.HAS_GPU:
        return ""
    try:
        common.inspect_kernels([compile_call("v3", config, dtype)])
    except Exception as err:  # noqa: BLE001
        return f"its compile failed here ({type(err).__name__}: {str(err).strip().splitlines()[-1][:200]})"
    return ""


def check(quick: bool) -> None:
    section("Check: every version against PyTorch (float64 reference), outputs poisoned")
    why = tma_unavailable()
    if why:
        print(f"skipped: {why}")
        return
    if common.INTERPRETER:
        shapes = [(common.awkward_sizes(1, lo=40, hi=100, include=())[0], *awkward_tma_sizes(2, 32, 100)), (1, 24, 40)]
        dtypes = [torch.float32, torch.float16]
    else:
        shapes = [(common.awkward_sizes(1, lo=300, hi=1000, include=())[0], *awkward_tma_sizes(2, 300, 1000))]
        dtypes = [torch.float16] + ([] if quick else [torch.bfloat16, torch.float32])
    for dtype in dtypes:
        v3_why = v3_compile_error(CHECK_TRITON_CONFIG, dtype)
        if v3_why:
            print(f"v3 {common.dtype_name(dtype)}: not checked, {v3_why}")
        for i, (M, N, K) in enumerate(shapes):
            for transpose_b in (False, True) if i == 0 else (False,):
                for version in [v for v in VERSIONS_WHAT if v != "v3" or not v3_why]:
                    check_tma(lambda a, b, o: matmul_tma(a, b, version, CHECK_CONFIG, out=o, num_programs=3),
                              M, N, K, dtype, f"matmul_tma {version} {L10.config_label(CHECK_CONFIG)}", transpose_b)
        check_tma(lambda a, b, o: matmul_tma(a, b, "v2", out=o), *shapes[0], dtype, "matmul_tma v2 autotuned")
    names = ", ".join(common.dtype_name(d) for d in dtypes)
    print(f"v1, v2, v3 (3 programs for the persistent ones) at {shapes} (the first with b row-major and "
          f"column-major), v2 autotuned at {shapes[0]}, dtypes {names}: OK")
    if common.INTERPRETER:
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU. The interpreter "
              "ignores flatten and warp_specialize: what they do is in the compiled code below.")


# %% [markdown]
# ## Tiles and waves
# A grid of one program per tile runs in waves of (about) one tile per SM. At 4096^3 with
# 128 x 128 tiles there are 1024 tiles: 7.76 waves on 132 SMs, and the last wave keeps 100 of 132
# SMs busy. The persistent kernel has the same tail (program p gets tiles p, p + 132, ...; some get
# one more than others); what it saves is the launch and prologue of each tile, and the overlap of
# each tile's store with the next one's loads. No GPU needed: this is arithmetic.

# %%
WAVE_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192)]


def waves(M: int, N: int, config: triton.Config, sms: int) -> tuple[int, float, int]:
    """(tiles, waves = tiles / SMs, SMs with a tile in the last wave) of one config."""
    tiles = triton.cdiv(M, config.kwargs["BLOCK_M"]) * triton.cdiv(N, config.kwargs["BLOCK_N"])
    return tiles, tiles / sms, tiles - (triton.cdiv(tiles, sms) - 1) * sms


def waves_table(sms: int | None = None) -> None:
    sms = sms or L10.sm_count()
    section("Tiles and waves per config")
    table = Table(f"{sms} SMs" + ("" if common.HAS_GPU else " (assumed: H100 / H200)") + "; shared memory as estimated",
                  ["M x N x K", "config", "tiles", "waves", "SMs busy in the last wave", "busy SM-time",
                   "smem v1", "smem v2/v3"])
    for M, N, K in WAVE_SHAPES:
        for c in GPU_CONFIGS:
            tiles, _, last = waves(M, N, c, sms)
            table.add(f"{M}x{N}x{K}", L10.config_label(c), tiles, f"{tiles / sms:.2f}", f"{last} of {sms}",
                      f"{tiles / (triton.cdiv(tiles, sms) * sms):.0%}", fmt_bytes(tma_smem_bytes(c, 2, False)),
                      fmt_bytes(tma_smem_bytes(c, 2, True)))
    table.print()
    print("busy SM-time: tiles / (whole waves x SMs), the share of the SMs' time with a tile to compute if every tile "
          "takes as long. Where it is the same for every config (powers of two on 132 SMs), the tail does not decide "
          "between the tiles: their speed per tile does, which only a measurement says.")


# %% [markdown]
# ## What the compiler made
# common.inspect_kernel compiles a kernel for sm_90 (an H100), also on a machine without a GPU,
# and reads the cubin: registers, spills, shared memory, and whether the PTX holds TMA copies
# (cp.async.bulk.tensor) and wgmma. The TTGIR says whether a loop was warp-specialized (a
# ttg.warp_specialize region; the tt.warp_specialize attribute alone is only the request).

# %%
COMPILE_CONFIGS = [_config(128, 128, 64, 4, 4), _config(128, 256, 64, 8, 3)]


def compile_call(version: str, config: triton.Config, dtype: torch.dtype = torch.float16, n: int = 4096,
                 transpose_b: bool = False) -> tuple:
    """(kernel, args, meta) of one version at n^3 for common.inspect_kernels: nothing is allocated."""
    a = torch.empty(n, n, dtype=dtype, device="meta")
    args = (a, a, a, n, n, n, n, n, n)
    meta = dict(L10.config_dict(config), B_TRANSPOSED=transpose_b)
    if version == "v1":
        return matmul_tma_kernel, args, meta
    return matmul_tma_persistent_kernel, args, dict(meta, NUM_PROGRAMS=132, WARP_SPECIALIZE=version == "v3")


def warp_specialized(report) -> bool:
    return "ttg.warp_specialize" in report.asm.get("ttgir", "")


def compile_reports(configs=COMPILE_CONFIGS) -> dict | None:
    """{(version, config label): KernelReport} for sm_90, or None where nothing compiles here; one
    at a time after a failure, so a version whose compile fails is printed and left out."""
    return common.inspect_kernels_by_key({(v, L10.config_label(c)): compile_call(v, c) for c in configs
                                          for v in VERSIONS_WHAT}, arch=90)


def compiled_versions() -> dict | None:
    section("What the compiler made of each version (fp16, 4096^3, compiled for sm_90)")
    reports = compile_reports()
    if not reports:
        return reports
    table = Table("compiled for sm_90" + ("" if common.HAS_GPU else f" on this machine, Triton {triton.__version__}"),
                  ["version", "config", "registers/thread", "spilled", "shared", "programs/SM", "TMA", "wgmma",
                   "cp.async", "warp-specialized"])
    for (version, label), r in reports.items():
        table.add(version, label, r.registers, fmt_bytes(r.local_bytes or 0), fmt_bytes(r.shared), r.occupancy()[0],
                  *("yes" if r.features[f] else "no" for f in ("TMA", "wgmma", "cp.async")),
                  "yes" if warp_specialized(r) else "no")
    table.print()
    first = next(iter(reports.values()))
    if first.note:
        print(first.note)
    key = ("v2", L10.config_label(COMPILE_CONFIGS[0]))
    if key in reports:
        print("v2's TMA instructions in its PTX (loads of A and B, the store of C):")
        print(reports[key].excerpt("ptx", r"cp\.async\.bulk\.tensor", lines=3))
    return reports


def screen_v3_configs() -> str:
    """On a GPU: keep in v3's tuner the configs that compile for this GPU and are warp-specialized
    there; "" if some are, else why v3 is not raced. (The interpreter runs v3 as v2.)"""
    why = tma_unavailable()
    if why or not common.HAS_GPU:
        return why or "no GPU: nothing to race"
    kept, failed = [], []
    for c in GPU_CONFIGS:
        try:
            report = common.inspect_kernels([compile_call("v3", c)])[0]
        except Exception as err:  # noqa: BLE001  (a config the compiler rejects is left out, with why)
            failed.append(f"{L10.config_label(c)} ({type(err).__name__})")
            continue
        if warp_specialized(report):
            kept.append(c)
    if failed:
        print(f"v3: the compile failed for {', '.join(failed)}: left out of its tuner")
    if not kept:
        return (f"Triton {triton.__version__} compiled v3's K loop without warp-specialized partitions for every config "
                "(no ttg.warp_specialize region in the TTGIR): v3 is v2's code with an unflattened loop, not raced")
    matmul_tma_ws_tuned_kernel.configs = kept
    print(f"v3 tunes over the {len(kept)} config(s) compiled with warp-specialized partitions here: "
          + ", ".join(L10.config_label(c) for c in kept))
    return ""


# %% [markdown]
# ## Benchmark
# Declared for common.run_benchmarks, which times every provider in alternating rounds and races
# cuBLAS (the registry's baseline for "matmul") in the same run: v1, v2 and v3 autotuned, beside
# lesson 10's autotuned pointer kernel and its persistent pointer kernel (with the tuner's config),
# at 4096^3 and 8192^3, in fp16 and bf16. Full runs only (`make bench`): each new shape and dtype is
# a round of tuning for every kernel. The bars: v2 and v3 at >= 1.0x the fastest baseline, each
# ratio the median of the paired rounds.

# %%
BENCH_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192)]
CPU_SHAPE = (20, 24, 40)  # the interpreter's run of the declarations: N and K multiples of 8 (TMA rows)
LESSON_10 = {"lesson 10 autotuned (pointers, one program per tile)": L10.matmul_tuned,
             "lesson 10 persistent (pointers, the tuner's config)": L10.matmul_persistent_picked}


def _flops(a: torch.Tensor, b: torch.Tensor) -> float:
    return 2.0 * a.shape[0] * b.shape[1] * a.shape[1]


def _benchmark(dtype: torch.dtype, v3_why: str) -> common.Benchmark:
    name = common.dtype_name(dtype)
    versions = [v for v in VERSIONS_WHAT if v != "v3" or not v3_why]
    kernels = {VERSIONS[v].label: VERSIONS[v].fn for v in versions} | LESSON_10
    bars = [common.Bar(VERSIONS[v].label, shape, "baseline", 1.0,
                       name=f"TMA matmul {v} {shape[0]}^3 {name}: the fastest baseline's time / its time")
            for v in versions if v != "v1" for shape in BENCH_SHAPES]
    return common.Benchmark(
        f"matmul {name}: TMA versions, lesson 10's pointer kernels, cuBLAS", op="matmul", cases=BENCH_SHAPES,
        quick_cases=[], cpu_cases=[CPU_SHAPE], setup=lambda M, N, K: L10.random_problem(M, N, K, dtype),
        reference=matmul_reference, kernels=kernels, flops=_flops, ceiling="matmul", dtype=dtype, bars=bars,
        unavailable=tma_unavailable(),
        note="Every Triton kernel here was tuned at each shape on its first call (not timed). v3 "
             + ("is left out: " + v3_why if v3_why else "tunes over the configs compiled warp-specialized here") + ".")


def benchmarks(v3_why: str = "") -> list:
    dtypes = [torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
    return [_benchmark(dtype, v3_why) for dtype in dtypes]


BENCHMARKS = benchmarks()


# %% [markdown]
# ## Takeaways
# - A tensor descriptor moves a whole tile with one TMA instruction and checks its bounds in
#   hardware: no pointer arithmetic, no masks, zeros past the edges for free. Its price: 16-byte
#   aligned rows (N and K multiples of 8 in fp16) and a contiguous last dimension.
# - A persistent grid with a flattened tile loop lets the compiler pipeline across tiles: the TMA
#   store of tile i runs while tile i + 1's loads are in flight. It keeps a C tile of shared memory
#   for that, which prunes the largest tile x stage configs.
# - Wave quantization is arithmetic: count tiles and waves per config before tuning.
# - warp_specialize is a request: read the TTGIR (ttg.warp_specialize) to see whether the compiler
#   honoured it for your loop, your card and your Triton.
# - Whether any of this beats cuBLAS at 4096^3 and 8192^3 is what the benchmark's bars measure.


# %%
if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    started = time.perf_counter()
    check(args.quick)
    waves_table()
    compiled_versions()
    v3_why = "" if args.quick else screen_v3_configs()
    if v3_why:
        print(f"v3: {v3_why}")
    if tma_unavailable():
        print(f"Benchmarks: skipped, {tma_unavailable()}")
    else:
        common.run_benchmarks(benchmarks(v3_why) if common.HAS_GPU else BENCHMARKS, args.quick)
    print(f"(done at {time.perf_counter() - started:.1f} s)")
