"""
Lesson 07, Hopper part: FlashAttention with TMA, a persistent grid and warp specialization
==========================================================================================

Lesson 07's v3 forward rebuilt for Hopper (sm_90) in three numbered steps, each a kernel of its
own beside the others: v4 loads Q, K, V and stores O through tensor descriptors (the TMA unit
copies whole tiles), v5 runs a persistent grid that loops over (batch, head, query block) tiles,
v6 asks the compiler to warp-specialize the key loop (producer warps load, consumer warps compute).

You will learn:
- what a tensor descriptor is, how `tl.make_tensor_descriptor` builds one inside the kernel, and
  why its bounds check replaces the masks of the loads (rows past N read as zeros)
- why a persistent grid helps: one program per SM, no tail wave, heavy causal tiles first
- what `tl.range(..., warp_specialize=True)` asks for, and what the compiler made of it
- how to read the TTGIR and PTX of each version compiled for sm_90 (TMA, wgmma, registers,
  spills, shared memory, occupancy), with or without a GPU

Run:  python lessons/advanced/07_attention_hopper.py [--quick]
"""

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

from common import Table, capability, fmt_bytes, section
from common.kernels import LN2, LOG2E
from common.lessons import lesson_module

L07 = lesson_module("07")  # v3 (the starting point), the reference, the checks' inputs, the benchmark setup

# %% [markdown]
# ## Motivation
# Lesson 07's v3 reaches the tensor cores through Triton's software pipeline: every thread
# computes addresses for its share of each K and V tile, cp.async copies them into shared memory
# a few steps ahead, and the same warps then run the two products and the softmax. On Hopper
# three pieces of hardware take work off those warps:
# - the TMA unit (Tensor Memory Accelerator) copies a whole tile between global and shared
#   memory from one instruction and a 128-byte descriptor (base, shape, strides, tile shape):
#   no address arithmetic per element, no registers for addresses, bounds checked in hardware;
# - wgmma, the warpgroup (4 warps) matrix multiply, reads its operands straight from shared
#   memory and runs asynchronously, so the softmax of one tile can overlap the product of the next;
# - with warp specialization, some warps only issue TMA loads and the others only compute.
# A persistent grid adds a scheduling step: one program per SM loops over the tiles, so no SM
# idles in a last partial wave, and causal tiles (whose work grows with the query block) are
# handed out heaviest first.
#
# Per tile of BLOCK_M queries and one BLOCK_N step of keys, the flops and bytes do not change
# from v3: 4 * BLOCK_M * BLOCK_N * D flops for 2 * BLOCK_N * D * 2 bytes of K and V (bf16), that is
# BLOCK_M flops per byte (128 with BLOCK_M = 128). What changes is who moves the bytes.

# %% [markdown]
# ## Reference (PyTorch)
# The same as lesson 07: `L07.attention_reference` (softmax(q k^T * scale) v with the N x N
# scores in memory), checked in float64, and SDPA on every backend as the benchmark's baselines.

# %%
attention_reference = L07.attention_reference
attention_flops = L07.attention_flops

# %% [markdown]
# ## Kernel
# What this Triton has. Device-side descriptors (`tl.make_tensor_descriptor`, in Triton 3.6 and
# 3.8; read in triton/language/core.py and semantic.py of 3.8) need a global scratch buffer for
# the 128-byte descriptors: `triton.set_allocator` gives Triton a function that allocates it
# with torch. The interpreter turns a descriptor into masked pointer loads and needs no
# allocator (triton/runtime/interpreter.py, TensorDescHandle). `tl.range(...,
# warp_specialize=True)` exists in both too (3.8's docstring still says "only supported on
# Blackwell ... simple matmul loops"; its nvidia backend runs a Hopper warp-specialization
# pass, add_hopper_warpspec, for sm_90): whether it does anything for this loop is read from
# the compiled TTGIR below, not assumed.


# %%
def hopper_unavailable() -> str:
    """Why the Hopper versions cannot run here ("" where they can): no device descriptors or no
    warp_specialize argument of tl.range in this Triton, or a GPU without TMA (before sm_90)."""
    return capability.tma_unavailable(range_options=("warp_specialize",))


@triton.jit
def _tma_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, kv, offs_m, qk_scale, seq_len, lo, hi,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """v3's online softmax over key blocks [lo, hi), K and V read through descriptors: rows past
    seq_len arrive as zeros (the descriptor's bounds), so only the scores need a mask."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([b, kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)  # one TMA copy into shared memory
        v = v_desc.load([b, kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            cols = start_n + offs_n
            keep = cols[None, :] < seq_len  # zero-padded keys would score 0, not -inf
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _tma_tile(q_desc, k_desc, v_desc, o_desc, lse_ptr, qk_scale, H, N_CTX, GROUP, bh, start_m,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """One (batch x head, query block) tile: out and lse of queries [start_m, start_m + BLOCK_M)."""
    b = bh // H
    h = bh % H
    kv = h // GROUP  # GQA: GROUP query heads read one K/V head
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)  # rows past N_CTX: zeros, never stored
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:  # as v3: keys left of the diagonal unmasked, the diagonal blocks masked, later keys skipped
        acc, l_i, m_i = _tma_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, kv, offs_m, qk_scale, N_CTX, 0, start_m,
                                    HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION, WARP_SPECIALIZE)
        acc, l_i, m_i = _tma_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, kv, offs_m, qk_scale, N_CTX, start_m,
                                    start_m + BLOCK_M, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION,
                                    WARP_SPECIALIZE)
    else:  # whole key blocks unmasked, the tail past the last whole block masked
        n_full = (N_CTX // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _tma_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, kv, offs_m, qk_scale, N_CTX, 0, n_full,
                                    HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION, WARP_SPECIALIZE)
        acc, l_i, m_i = _tma_blocks(acc, l_i, m_i, q, k_desc, v_desc, b, kv, offs_m, qk_scale, N_CTX, n_full,
                                    N_CTX, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION, WARP_SPECIALIZE)
    out = (acc / l_i[:, None]).to(o_desc.dtype)
    o_desc.store([b, h, start_m, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))  # rows past N_CTX: dropped
    row = bh.to(tl.int64) * N_CTX + offs_m
    tl.store(lse_ptr + row, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < N_CTX)


@triton.jit(do_not_specialize=["N_CTX"])
def attention_fwd_v4_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) inputs (K/V: HKV heads); 16-byte aligned strides, contiguous last dim
    out_ptr,  # (B, H, N, D) contiguous output
    lse_ptr,  # (B, H, N) fp32 logsumexp of each row
    sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N_CTX, GROUP,
    BH,  # B * H: the (batch, head) pairs
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """v4: v3's grid (cdiv(N, BLOCK_M), B * H), every tile moved by TMA."""
    # 4-D descriptors over (B, heads, N, D): a tile is [1, 1, BLOCK, D] at (b, h, row, 0), and the
    # hardware clips it at the head's last row N_CTX - 1, so any N works. The last stride must be
    # the literal 1 (semantic.make_tensor_descriptor, Triton 3.8).
    q_desc = tl.make_tensor_descriptor(q_ptr, shape=[BH // H, H, N_CTX, HEAD_DIM],
                                       strides=[stride_qb, stride_qh, stride_qn, 1],
                                       block_shape=[1, 1, BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[BH // H, H // GROUP, N_CTX, HEAD_DIM],
                                       strides=[stride_kb, stride_kh, stride_kn, 1],
                                       block_shape=[1, 1, BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[BH // H, H // GROUP, N_CTX, HEAD_DIM],
                                       strides=[stride_vb, stride_vh, stride_vn, 1],
                                       block_shape=[1, 1, BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[BH // H, H, N_CTX, HEAD_DIM],
                                       strides=[H * N_CTX * HEAD_DIM, N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                       block_shape=[1, 1, BLOCK_M, HEAD_DIM])
    _tma_tile(q_desc, k_desc, v_desc, o_desc, lse_ptr, sm_scale * LOG2E, H, N_CTX, GROUP,
              tl.program_id(1), tl.program_id(0) * BLOCK_M, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DOT_PRECISION,
              False)


@triton.jit(do_not_specialize=["N_CTX"])
def attention_fwd_v5_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N_CTX, GROUP, BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,  # v6: the key loop warp-specialized
):
    """v5: a persistent grid of min(tiles, SMs) programs; program p does tiles p, p + P, p + 2P, ..."""
    # v4's descriptors, built once per program, before the tile loop
    q_desc = tl.make_tensor_descriptor(q_ptr, shape=[BH // H, H, N_CTX, HEAD_DIM],
                                       strides=[stride_qb, stride_qh, stride_qn, 1],
                                       block_shape=[1, 1, BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[BH // H, H // GROUP, N_CTX, HEAD_DIM],
                                       strides=[stride_kb, stride_kh, stride_kn, 1],
                                       block_shape=[1, 1, BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[BH // H, H // GROUP, N_CTX, HEAD_DIM],
                                       strides=[stride_vb, stride_vh, stride_vn, 1],
                                       block_shape=[1, 1, BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[BH // H, H, N_CTX, HEAD_DIM],
                                       strides=[H * N_CTX * HEAD_DIM, N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                       block_shape=[1, 1, BLOCK_M, HEAD_DIM])
    n_m = tl.cdiv(N_CTX, BLOCK_M)
    for tile in tl.range(tl.program_id(0), n_m * BH, tl.num_programs(0)):
        if CAUSAL:  # heaviest first: the last query block (it sees every key) of every head, then the one before
            m_block = n_m - 1 - tile // BH
            bh = tile % BH
        else:  # consecutive tiles share a head: the programs running together read the same K/V from L2
            m_block = tile % n_m
            bh = tile // n_m
        _tma_tile(q_desc, k_desc, v_desc, o_desc, lse_ptr, sm_scale * LOG2E, H, N_CTX, GROUP,
                  bh, m_block * BLOCK_M, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DOT_PRECISION, WARP_SPECIALIZE)


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. The block sizes are v3's: its fixed config for the
# checks, its autotuned list on a GPU with fp16/bf16, pruned by shared memory with what the
# compiler adds for these kernels (measured by compiling them for sm_90: _tma_prune).


# %%
def _check_tma(q, k, v) -> None:
    """TMA's rules on top of v3's checks: the base 16-byte aligned, every stride but the last a
    multiple of 16 bytes (semantic.make_tensor_descriptor and the interpreter's validate, Triton 3.8)."""
    L07._check_qkv(q, k, v, grouped=True)
    for name, t in (("q", q), ("k", k), ("v", v)):
        bad = [s for s in t.stride()[:-1] if (s * t.element_size()) % 16]
        if t.data_ptr() % 16 or bad:
            raise ValueError(f"{name} must start at a 16-byte aligned address and have strides that are multiples of "
                             f"16 bytes for TMA, got address {t.data_ptr()} and strides {t.stride()} "
                             f"({t.element_size()}-byte elements); pass {name}.contiguous()")


def _tma_prune(persistent: bool):
    """v3's shared-memory prune (its estimate of Q, K and V tiles) with what the compiler adds, as
    compiled for sm_90 with Triton 3.8 over all of v3's configs: 1 KiB of mbarriers for the TMA
    copies, and for the persistent kernel one more BLOCK_M x D tile (at D = 128, 128 x 64, 3 stages:
    v3 128 KiB, v4 129 KiB, v5 161 KiB). 128 x 128 with 3 stages at D = 128 fits v4 (225 KiB of
    227), not v5 (257 KiB)."""
    def estimate(config, element_size, arch=None, HEAD_DIM=128, **_):
        tiles = capability.attention_shared_memory(config, element_size, arch=arch, HEAD_DIM=HEAD_DIM)
        return tiles + 1024 + (config.kwargs["BLOCK_M"] * HEAD_DIM * element_size if persistent else 0)

    def prune(configs, named_args, **launch_args):
        kept = capability.prune_configs_by_shared_memory(configs, named_args, estimate=estimate, empty_ok=True,
                                                         **launch_args)
        return kept or [L07._SMALL_CONFIGS["fwd"]]
    return {"early_config_prune": prune}


_KEY = ["N_CTX", "HEAD_DIM", "CAUSAL"]
attention_fwd_v4_tuned = triton.autotune(L07.fwd_configs(), key=_KEY, prune_configs_by=_tma_prune(False))(
    attention_fwd_v4_kernel)
attention_fwd_v5_tuned = triton.autotune(L07.fwd_configs(), key=_KEY, prune_configs_by=_tma_prune(True))(
    attention_fwd_v5_kernel)
attention_fwd_v6_tuned = triton.autotune(L07.fwd_configs(), key=_KEY, prune_configs_by=_tma_prune(True))(
    attention_fwd_v5_kernel)
_ALLOCATOR_SET = []


def _set_allocator() -> None:
    """Device-side descriptors live in a global scratch buffer that Triton asks for through the
    allocator (launch fails with "Kernel requires a runtime memory allocation" without one)."""
    if common.HAS_GPU and not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET.append(True)


def programs_for(tiles: int, head_dim: int) -> int:
    """The persistent grid: as many programs as the SMs hold at once, never more than the tiles.
    Compiled for sm_90 (fp16, 128 x 64, 8 warps; the table of compiled_versions) v5 needs 124
    registers a thread at D = 64, so two programs fit an SM's 64 K registers, and 154 at D = 128,
    so one does. The interpreter: 3 programs, so that each loops over several tiles."""
    if not common.HAS_GPU:
        return max(1, min(tiles, 3))
    sms = torch.cuda.get_device_properties(common.DEVICE).multi_processor_count
    return max(1, min(tiles, sms * (2 if head_dim <= 64 else 1)))


def hopper_attention(q, k, v, causal: bool = False, sm_scale: float | None = None, out=None, version: str = "v5",
                     autotune: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of v4 (TMA), v5 (TMA + persistent) or v6 (v5 + warp-specialized key loop), as
    L07.attention_v3 returns them: k and v may have HKV heads, HKV dividing H."""
    if version not in ("v4", "v5", "v6"):
        raise ValueError(f"version must be 'v4', 'v5' or 'v6', got {version!r}")
    why = hopper_unavailable()
    if why:
        raise RuntimeError(f"hopper_attention {version}: {why}")
    _check_tma(q, k, v)
    out = L07._check_out(q, out)
    B, H, N, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    _set_allocator()
    args = (q, k, v, out, lse, sm_scale, *L07._qkv_strides(q, k, v), H, N, H // k.shape[1])
    meta = dict(HEAD_DIM=D, CAUSAL=bool(causal), DOT_PRECISION=L07._dot_precision(q.dtype))
    tuned = autotune and common.HAS_GPU and q.dtype != torch.float32
    blocks, options = ({}, {}) if tuned else L07._fixed(L07.fwd_configs(), q.dtype, "fwd", D)
    if version == "v4":
        kernel = attention_fwd_v4_tuned if tuned else attention_fwd_v4_kernel
        kernel[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](*args, B * H, **meta, **blocks, **options)
    else:
        if version == "v6":
            meta["WARP_SPECIALIZE"] = True
        kernel = (attention_fwd_v6_tuned if version == "v6" else attention_fwd_v5_tuned) if tuned \
            else attention_fwd_v5_kernel
        grid = lambda m: (programs_for(triton.cdiv(N, m["BLOCK_M"]) * B * H, D),)  # noqa: E731
        kernel[grid](*args, B * H, **meta, **blocks, **options)
    return out, lse


VERSIONS = common.Versions("attention forward, Hopper")
VERSIONS.add("v3", L07.VERSIONS["v3"].what + " (lesson 07)", L07.VERSIONS["v3"].fn)
VERSIONS.add("v4", "v3 + TMA tensor descriptors", lambda q, k, v, causal: hopper_attention(q, k, v, causal, version="v4")[0])
VERSIONS.add("v5", "v4 + persistent grid", lambda q, k, v, causal: hopper_attention(q, k, v, causal, version="v5")[0])
V6_WHAT = "v5 + warp-specialized key loop"
# The kernels the checks run, v6 included (the interpreter ignores warp_specialize). Whether v6
# joins the benchmark is decided from what the compiler made of it (enable_v6).
KERNEL_VERSIONS = ("v4", "v5", "v6")


# %% [markdown]
# ## Check
# Every version against the float64 reference: awkward N (not a multiple of any block, and
# N = 1), causal and not, D = 64 and 128, grouped-query heads, outputs poisoned with NaN, the
# logsumexp too. In the interpreter: fp32 and fp16 at small sizes.


# %%
def check_cases(quick: bool) -> list[tuple]:
    """(B, H, HKV, N, D): B and H above 1, K/V heads shared by 2 query heads in one case."""
    if common.INTERPRETER:
        return [(1, 2, 2, 45, 64), (2, 2, 1, 33, 128), (1, 1, 1, 1, 64)]
    cases = [(2, 4, 4, 193, 128), (2, 4, 2, 1000, 64), (1, 1, 1, 1, 128)]
    return cases if quick else cases + [(1, 8, 8, 4097, 128)]


def check(quick: bool, versions=None) -> None:
    section("Check: the Hopper versions against PyTorch (float64 reference)")
    why = hopper_unavailable()
    if why:
        print(f"skipped: {why}")
        return
    versions = versions or KERNEL_VERSIONS
    dtypes = [torch.float32, torch.float16] if common.INTERPRETER else [torch.float16, torch.bfloat16]
    cases = check_cases(quick)
    for dtype in dtypes:
        for B, H, HKV, N, D in cases:
            q = common.randn(B, H, N, D, dtype=dtype)
            k, v = (common.randn(B, HKV, N, D, dtype=dtype) for _ in range(2))
            for causal in (False, True):
                expected = attention_reference(q.double(), k.double(), v.double(), causal)
                s = torch.matmul(q.double(), k.double().repeat_interleave(H // HKV, 1).transpose(-2, -1)) * D ** -0.5
                if causal:
                    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
                for version in versions:
                    name = f"{version} (B,H,HKV,N,D)=({B},{H},{HKV},{N},{D}) {common.dtype_name(dtype)} causal={causal}"
                    out = common.poisoned_empty(B, H, N, D, dtype=dtype)
                    _, lse = hopper_attention(q, k, v, causal, out=out, version=version, autotune=False)
                    common.assert_close(out, expected, name=name)
                    common.assert_close(lse, torch.logsumexp(s, -1), name=f"logsumexp {name}", atol=1e-4, rtol=1e-5)
    print(f"{', '.join(versions)} forward and logsumexp match (causal and not) for (B, H, HKV, N, D) in {cases}, "
          f"dtypes {', '.join(common.dtype_name(d) for d in dtypes)}: OK")


def check_at_benchmark_size(quick: bool) -> None:
    """The autotuned bf16 kernels at the benchmark's size, on their first two heads against float64."""
    B, H, N, D = (2, 16, 2048, 128) if quick else L07.BAR_CASE
    section(f"Check: autotuned Hopper versions at B={B} H={H} N={N} D={D} {common.dtype_name(L07.BENCH_DTYPE)}")
    q, k, v, _ = L07.attention_inputs(B, H, N, D, False)
    for causal in (False, True):
        expected = attention_reference(*(t[:1, :2].double() for t in (q, k, v)), causal)
        for version in KERNEL_VERSIONS:
            out, _ = hopper_attention(q, k, v, causal, version=version)
            common.assert_close(out[:1, :2], expected, name=f"{version} causal={causal}")
    print(f"{', '.join(KERNEL_VERSIONS)} at the benchmark size (causal and not): OK")


# %% [markdown]
# ## What the compiler made
# Each version compiled for sm_90 with v3's first autotuned config (128 x 64, 8 warps, 3
# stages), fp16, D = 64 and 128: Triton's own compiler and ptxas, nothing launched, so this runs
# without a GPU too (then for an H100). The table says whether the PTX holds TMA copies
# (cp.async.bulk.tensor), wgmma and cp.async (v3's per-thread copies), and whether the TTGIR
# holds a ttg.warp_specialize region: the producer and consumer partitions that v6 asks for.
# The request alone is the loop attribute tt.warp_specialize; only the region means the
# compiler split the loop.


# %%
COMPILED_VERSIONS = ("v3",) + KERNEL_VERSIONS


def compile_calls(d: int, causal: bool = False, versions=COMPILED_VERSIONS, config=None) -> list[tuple]:
    """(kernel, args, meta) of each version at head dimension d, for common.inspect_kernels."""
    config = config or L07.fwd_configs(for_gpu=True)[0]
    n = 4096
    q = torch.empty(1, 1, n, d, dtype=torch.float16, device=common.DEVICE)  # nothing is launched
    lse = torch.empty(1, 1, n, device=common.DEVICE)
    args = (q, q, q, q, lse, d ** -0.5, *(n * d, n * d, d) * 3, 1, n, 1)
    meta = dict(config.kwargs, HEAD_DIM=d, CAUSAL=causal, DOT_PRECISION="tf32",
                num_warps=config.num_warps, num_stages=config.num_stages)
    calls = {"v3": (L07.attention_fwd_v3_kernel, args, meta), "v4": (attention_fwd_v4_kernel, (*args, 1), meta),
             "v5": (attention_fwd_v5_kernel, (*args, 1), meta),
             "v6": (attention_fwd_v5_kernel, (*args, 1), dict(meta, WARP_SPECIALIZE=True))}
    return [calls[v] for v in versions]


def warp_specialized(report) -> bool:
    """Whether the compiler split a loop into partitions (the region op, not the loop's attribute)."""
    return "ttg.warp_specialize" in report.asm.get("ttgir", "")


def compile_reports() -> dict | None:
    """{(version, D): KernelReport} for sm_90, or None where nothing can be compiled here. All in one
    go (one child process under the interpreter); a version whose compile fails is left out with the
    error printed (Triton 3.8's Hopper warp-specialization pass stops with "PassManager::run failed"
    on this kernel at 4 warps, for instance): common.inspect_kernels_by_key."""
    keys = [(version, d) for d in (64, 128) for version in COMPILED_VERSIONS]
    return common.inspect_kernels_by_key(dict(zip(keys, compile_calls(64) + compile_calls(128))), arch=90)


def compiled_versions() -> dict | None:
    section("What the compiler made of each version (fp16, 128 x 64, 8 warps, 3 stages)")
    if hopper_unavailable() and common.HAS_GPU:
        print(f"skipped: {hopper_unavailable()}")
        return None
    reports = compile_reports()
    if reports is None:
        return None
    table = Table("compiled for sm_90" + ("" if common.HAS_GPU else f" on this machine, Triton {triton.__version__}"),
                  ["version", "D", "registers/thread", "spilled", "shared", "programs/SM", "bound by",
                   "TMA", "wgmma", "cp.async", "warp-specialized"])
    for (version, d), r in reports.items():
        programs, binding, _ = r.occupancy()
        table.add(version, d, r.registers, fmt_bytes(r.local_bytes or 0), fmt_bytes(r.shared), programs, binding,
                  *("yes" if r.features[f] else "no" for f in ("TMA", "wgmma", "cp.async")),
                  "yes" if warp_specialized(r) else "no")
    table.print()
    first = next(iter(reports.values()))
    if first.note:
        print(first.note)
    if ("v4", 128) in reports:
        print("v4 at D = 128, the TMA instructions of its PTX:")
        print(reports["v4", 128].excerpt("ptx", r"cp\.async\.bulk\.tensor", lines=4))
    return reports


def v6_status(reports: dict | None) -> str:
    """"" where v6 is a version of its own (the compiler split its key loop into partitions at
    both head dimensions), else why it is left out of the benchmark."""
    if hopper_unavailable():
        return hopper_unavailable()
    if reports is None:
        return "its compiled code could not be inspected here"
    missing = [d for d in (64, 128) if ("v6", d) not in reports]
    if missing:
        return f"it did not compile for sm_90 at D = {missing[0]}"
    if not all(warp_specialized(reports["v6", d]) for d in (64, 128)):
        return (f"Triton {triton.__version__} compiled its loop for sm_90 without warp-specialized partitions (the "
                "loop keeps the tt.warp_specialize attribute, the TTGIR has no ttg.warp_specialize region): "
                "v6 is v5's code, so it is not raced as a version of its own")
    return ""


# %% [markdown]
# ## Benchmark
# The versions side by side with v3 and every SDPA backend (the registry's "attention" op:
# cuDNN, FlashAttention-2, memory-efficient, SDPA's default choice, torch.compile and the naive
# reference; the naive one runs out of memory at N = 16384 and is listed as skipped), at B4 H32,
# D = 128 and 64, N = 1024, 4096 and 16384, causal and not, in bf16. TFLOP/s counts
# 4 * B * H * N^2 * D flops (half for causal) for every provider. The bar: the last Hopper
# version >= 1.0x the fastest baseline at N = 4096, D = 128 and D = 64, causal and not.


# %%
BENCH_NS = (1024, 4096, 16384)
FORWARD_WHY = ("v4-v6 compiled for sm_90 have TMA and wgmma but no warp-specialized partitions and no register "
               "reallocation (setmaxnreg) between producer and consumer warps, which FlashAttention-3 style kernels use")


def _forward(d: int, causal: bool) -> common.Benchmark:
    best = VERSIONS[VERSIONS.keys()[-1]].label
    return common.Benchmark(
        f"Hopper forward over N, B4 H32 D{d}, {'causal' if causal else 'non-causal'}", op="attention",
        cases=[(4, 32, n, d, causal) for n in BENCH_NS], quick_cases=[(2, 16, 2048, d, causal)],
        cpu_cases=[(1, 2, 40, d, causal)], setup=L07.attention_inputs,
        kernels=VERSIONS, reference=attention_reference, flops=L07._attention_flops, ceiling="matmul",
        dtype=L07.BENCH_DTYPE, label=L07._shape, unavailable=hopper_unavailable(),
        bars=[common.Bar(best, (4, 32, 4096, d, causal), "baseline", 1.0, why=FORWARD_WHY)],
        plot=f"07_attention_hopper_tflops_d{d}{'_causal' if causal else ''}",
        note="v3 is lesson 07's kernel, raced again here so that each version's gain is measured in the same "
             "run. Every Triton version is autotuned over the same configs on its first call at each N.")


def benchmarks() -> list:
    return [_forward(d, causal) for d in (128, 64) for causal in (False, True)]


BENCHMARKS = benchmarks()  # v3-v5; enable_v6 adds v6 (and moves the bars to it) where it is real


def enable_v6(reports: dict | None) -> bool:
    """Add v6 to VERSIONS and the benchmarks where the compiler warp-specialized it; else say why not."""
    why = v6_status(reports)
    if why:
        print(f"v6 (warp specialization): not benchmarked: {why}.")
        return False
    if "v6" not in VERSIONS:
        VERSIONS.add("v6", V6_WHAT, lambda q, k, v, causal: hopper_attention(q, k, v, causal, version="v6")[0])
        BENCHMARKS[:] = benchmarks()
    print("v6 (warp specialization): the compiler split the key loop into partitions; raced as v6")
    return True


# %% [markdown]
# ## Takeaways
# - A tensor descriptor moves a whole tile with one TMA instruction and checks its bounds in
#   hardware: the loads lose their masks and their per-thread address arithmetic; the scores of
#   a ragged last key block still need one (zeros are not -inf).
# - A persistent grid starts one program per SM and hands it tiles in a loop: no tail wave, and
#   causal tiles can be ordered heaviest first.
# - Warp specialization is a request to the compiler: read the TTGIR to see whether it split the
#   loop into producer and consumer partitions, and the benchmark to see whether it paid.
# - Registers, spills, shared memory and the instructions used can be read without a GPU by
#   compiling for sm_90; only the timings need the GPU.


# %%
if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    enable_v6(compiled_versions())
    if common.HAS_GPU and not hopper_unavailable():
        check_at_benchmark_size(args.quick)
    common.run_benchmarks(BENCHMARKS, args.quick)
