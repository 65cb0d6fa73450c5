"""
Lesson 07: attention
====================

Build FlashAttention in Triton: a forward pass that never stores the N x N score matrix, its
backward pass wrapped in an autograd.Function, and split-K decoding over a KV cache.

You will learn:
- why naive attention needs O(N^2) memory (measured), and how online softmax makes it O(N)
- the FlashAttention forward: one program per (query block, batch x head), a loop over key blocks
- causal masking that skips the blocks above the diagonal and masks only the diagonal ones
- a packed batch of sequences of different lengths (cu_seqlens): the same kernel, no padding
- the backward pass from the saved logsumexp: delta = rowsum(dO * O), a dK/dV kernel, a dQ kernel
- how many matmuls the backward runs, and dQ two ways: a separate pass (7 matmuls per block pair)
  or fp32 atomics from the dK/dV kernel (5, FlashAttention-2's choice)
- flash-decoding: one query token against a long KV cache, split over the context, then reduced
- how to report attention in TFLOP/s next to PyTorch's SDPA, and decoding in GB/s of KV bytes

Run:  python lessons/advanced/07_attention.py [--quick]
"""

import functools
import itertools
import sys
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

from common import Table, capability, fmt_bytes, section
from common.kernels import LN2, LOG2E

# %% [markdown]
# ## Motivation
# Attention is out = softmax(Q K^T * scale) V for every (batch, head): Q, K, V are N x D (N
# positions, head dimension D). Written out, it stores the N x N scores S = Q K^T and the N x N
# probabilities P = softmax(S): for B=4 batches, H=32 heads and N=4096 in bf16 that is
# 4 * 32 * 4096^2 * 2 bytes = 4 GiB per N x N tensor, while Q, K, V and the output are 128 MiB
# each. Memory grows as N^2, and so do the bytes written and read back.
#
# FlashAttention computes the same result one block of queries at a time, looping over blocks
# of keys with the online softmax of lesson 06 (a running max m, a running sum l, and the output
# accumulator rescaled whenever m grows). S and P live only in registers, one BLOCK_M x BLOCK_N
# tile at a time: memory is O(N), and the kernel does 4 * N^2 * D flops per (batch, head) for
# about 4 * N * D elements moved, so it is limited by the tensor cores, not by HBM. We measure
# it in TFLOP/s. Decoding (one new query token against a KV cache of ctx positions) is the
# opposite: 4 * ctx * D flops for 2 * ctx * D cache elements read, memory bound, measured in GB/s.

# Inside the kernels two constants appear: LOG2E = log2(e) = 1.4426950408889634, so that
# exp(x) = exp2(x * log2(e)), and LN2 = ln(2) = 0.6931471805599453, so that log(x) = log2(x) * ln(2).
# A Python float global is not a compile-time constant for Triton; a tl.constexpr one is, so
# common/kernels.py declares them `LOG2E = tl.constexpr(1.4426950408889634)` for every lesson.

# %% [markdown]
# ## Reference (PyTorch)
# q, k, v: (B, H, N, D). The naive reference is the formula written out. The benchmarks race it
# (as "torch eager"), torch.compile of it, and PyTorch's fused attention on every backend
# (F.scaled_dot_product_attention: cuDNN, FlashAttention-2, memory-efficient), from the registry
# in common/baselines.py.


# %%
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * sm_scale) @ v, materialising the N x N scores (per batch and head); k, v with
    fewer heads than q are repeated for their groups of query heads (grouped-query attention)."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    s = torch.matmul(q, k.transpose(-2, -1)) * sm_scale  # reads 2BHND, writes BHN^2; the scale
    #                                                      reads and writes BHN^2 again
    if causal:
        n = q.shape[-2]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)  # key n > query m
        s = s.masked_fill(future, float("-inf"))  # reads BHN^2, writes BHN^2
    p = torch.softmax(s, dim=-1)  # reads BHN^2, writes BHN^2
    return torch.matmul(p, v)  # reads BHN^2 + BHND, writes BHND
    # in all: about 4 N^2-sized writes and reads per (b, h); the minimum is q, k, v, out once


def attention_flops(B: int, H: int, N: int, D: int, causal: bool) -> float:
    """Q K^T and P V are 2 * N * N * D flops each; causal attention needs half the blocks."""
    return 4 * B * H * N * N * D / (2 if causal else 1)


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, causal: bool = False,
                     sm_scale: float | None = None) -> torch.Tensor:
    """A packed batch, each sequence on its own through attention_reference: q (total, HQ, D), k, v
    (total, HKV, D), sequence b = tokens [cu_seqlens[b], cu_seqlens[b + 1]). max_seqlen is not
    needed here; it is in the signature because every provider of the benchmark gets the same inputs."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end > start:  # a sequence of length 0 has no rows
            seq = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, heads, n, D) views
            out[start:end] = attention_reference(*seq, causal, sm_scale)[0].transpose(0, 1)
    return out


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool = False, sm_scale: float | None = None) -> torch.Tensor:
    """The padded way to run a packed batch: every sequence padded with zeros to max_seqlen, one
    (B, HQ, max_seqlen, D) SDPA call with a boolean mask of the real keys (and of the past, causal),
    and the real rows taken back out. The padded batch holds B * max_seqlen^2 scores per head, real or not."""
    B = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    real = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # (B, max_seqlen)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        # K/V repeated per query head, not enable_gqa=True: SDPA with an attention mask and
        # enable_gqa runs the math backend (N x N scores in memory, pytorch/pytorch#139586 and
        # huggingface/transformers#39412), with the heads repeated the memory-efficient one
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    def pad(t):  # (total, H, D) -> (B, H, max_seqlen, D): real's True entries, in order, are the tokens
        padded = t.new_zeros(B, max_seqlen, *t.shape[1:])
        padded[real] = t
        return padded.transpose(1, 2)
    mask = real[:, None, None, :]  # (B, 1, 1, keys): keys past a sequence's end get no weight
    if causal:
        mask = mask & torch.ones(max_seqlen, max_seqlen, dtype=torch.bool, device=q.device).tril()
    # rows of a sequence of length 0 see no key (NaN): they are padding, dropped below
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=sm_scale)
    return out.transpose(1, 2)[real]  # (total, HQ, D)


def varlen_flops(lengths: list[int], HQ: int, D: int, causal: bool) -> float:
    """The real work of a packed batch: attention_flops of each sequence on its own (no padding)."""
    return sum(attention_flops(1, HQ, n, D, causal) for n in lengths)


def decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     sm_scale: float | None = None) -> torch.Tensor:
    """One query token per (batch, head): q (B, HQ, D) against caches (B, HKV, ctx, D), each KV head
    shared by HQ / HKV consecutive query heads (grouped-query attention when HKV < HQ)."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    group = q.shape[1] // k_cache.shape[1]
    if group > 1:  # repeat each KV head for its query heads (copies the cache: fine for a reference)
        k_cache, v_cache = k_cache.repeat_interleave(group, dim=1), v_cache.repeat_interleave(group, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", q, k_cache) * sm_scale  # reads the K cache, writes BH*ctx
    p = torch.softmax(s, dim=-1)  # reads and writes BH*ctx
    return torch.einsum("bhn,bhnd->bhd", p, v_cache)  # reads the V cache, writes BHD


# %% [markdown]
# ## Kernel
# v1 is the naive reference above (PyTorch, N x N in memory). v2 is FlashAttention written
# plainly: one program per (block of BLOCK_M queries, batch x head), a loop over all key blocks,
# every score masked, exp() with the scale applied each step, non-causal only. v3 is tuned:
# - exp2 with log2(e) folded into the scale (exp2 is the hardware instruction; exp costs a
#   multiply more on every score);
# - blocks that need no mask are processed by a loop without one: for causal attention the
#   blocks left of the diagonal, for non-causal all full blocks; only the diagonal blocks (or
#   the tail past the last full block) pay for the mask;
# - causal attention never touches the blocks above the diagonal: half the work;
# - the logsumexp of each row is saved for the backward pass;
# - on a GPU the block sizes, warps and pipeline stages are autotuned;
# - with VARLEN=True the same kernel runs a packed batch of sequences of different lengths
#   (cu_seqlens): each program reads its sequence's start and length, masks keys by that
#   length, and returns at once when its query block starts past the sequence's end.
#
# The grid is (cdiv(N, BLOCK_M), B * H): axis 1 picks the (batch, head), axis 0 the query block.


# %%
@triton.jit(do_not_specialize=["N_CTX"])
def attention_fwd_v2_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) inputs, any strides with a contiguous last dimension
    out_ptr,  # (B, H, N, D) contiguous output
    sm_scale,  # the softmax scale, 1 / sqrt(D) by default
    stride_qb, stride_qh, stride_qn,  # q's strides (elements) over batch, head, position
    stride_kb, stride_kh, stride_kn,  # k's strides
    stride_vb, stride_vh, stride_vn,  # v's strides
    H,  # number of heads
    N_CTX,  # sequence length N (not specialised: one compiled kernel serves every N)
    HEAD_DIM: tl.constexpr,  # D, a power of 2
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    DOT_PRECISION: tl.constexpr,  # "ieee" for exact fp32 dots, "tf32" (ignored for fp16/bf16)
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: b * stride_qb passes 2^31 on large tensors
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=offs_m[:, None] < N_CTX, other=0.0)  # (BLOCK_M, D), read once
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of each row
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of exp(s - m_i) * v
    for start_n in range(0, N_CTX, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=cols[:, None] < N_CTX, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(cols[None, :] < N_CTX, s, float("-inf"))  # keys past the end get no weight
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < N_CTX, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + (bh.to(tl.int64) * N_CTX + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < N_CTX)


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, qk_scale,
                N_CTX, lo, hi, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi); m_i is kept in log2 units (scores * qk_scale)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=cols[:, None] < N_CTX, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < N_CTX, other=0.0)
        else:  # every key of these blocks exists: no mask, no compare per element
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            keep = cols[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])  # a query sees itself and the past
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])  # one FMA and one exp2 per score
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # accumulate in place
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["N_CTX"])
def attention_fwd_v3_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) inputs, any strides with a contiguous last dimension
    out_ptr,  # (B, H, N, D) contiguous output
    lse_ptr,  # (B, H, N) fp32: logsumexp of each row of scores, saved for the backward pass
    sm_scale,  # the softmax scale
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N_CTX,
    GROUP,  # query heads per K/V head (grouped-query attention); 1: multi-head attention
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,  # mask keys after the query (BLOCK_M must be a multiple of BLOCK_N)
    DOT_PRECISION: tl.constexpr,
    cu_seqlens_ptr=None,  # VARLEN: (B + 1,) int32, sequence b is tokens [cu_seqlens[b], cu_seqlens[b + 1])
    VARLEN: tl.constexpr = False,  # a packed batch: q, k, v (total tokens, heads, D), out (total, H, D),
    #                                lse (total, H), stride_?b = 0, stride_?n over tokens, N_CTX the longest
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if VARLEN:  # this program's sequence: where it starts in the packed tokens, and its own length
        seq_start = tl.load(cu_seqlens_ptr + b)
        seq_len = tl.load(cu_seqlens_ptr + b + 1) - seq_start
        if start_m >= seq_len:  # the grid covers the longest sequence: this block is past this one's end
            return
        first = seq_start.to(tl.int64)  # int64: first * stride_qn passes 2^31 on large batches
    else:
        seq_len = N_CTX
        first = 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + b * stride_qb + h * stride_qh + first * stride_qn
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < seq_len, other=0.0)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh + first * stride_kn  # GQA: GROUP query heads
    v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh + first * stride_vn  # read one K/V head
    qk_scale = sm_scale * LOG2E  # log2(e) folded in: exp(s * scale) = exp2(s * qk_scale)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # keys [0, start_m): left of the diagonal, visible to every query of this block
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                    qk_scale, seq_len, 0, start_m, BLOCK_N, False, CAUSAL, DOT_PRECISION)
        # keys [start_m, start_m + BLOCK_M): the diagonal blocks, masked; later keys are skipped
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                    qk_scale, seq_len, start_m, start_m + BLOCK_M, BLOCK_N, True, CAUSAL,
                                    DOT_PRECISION)
    else:
        n_full = (seq_len // BLOCK_N) * BLOCK_N  # keys in whole blocks: no mask needed
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                    qk_scale, seq_len, 0, n_full, BLOCK_N, False, CAUSAL, DOT_PRECISION)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                    qk_scale, seq_len, n_full, seq_len, BLOCK_N, True, CAUSAL, DOT_PRECISION)
    out = acc / l_i[:, None]
    if VARLEN:
        row = (first + offs_m) * H + h  # token first + m, head h of the (total, H) rows
    else:
        row = bh.to(tl.int64) * N_CTX + offs_m
    tl.store(out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < seq_len)
    # natural-log logsumexp of the scaled scores: P = exp(S * scale - lse), all the backward needs
    tl.store(lse_ptr + row, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < seq_len)


# %% [markdown]
# The backward pass. With P = softmax(S), S = scale * Q K^T and O = P V, for each (batch, head):
#   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) with delta_i = sum_j dO_ij O_ij,
#   dQ = scale * dS K,  dK = scale * dS^T Q.
# P is never stored: both kernels recompute it from Q, K and the saved logsumexp,
# P = exp2(S * scale * log2(e) - lse * log2(e)). Three kernels, no atomics (dq_mode="separate"):
#   1. preprocess: delta = rowsum(dO * O), one fp32 per query;
#   2. dK, dV: one program per block of keys, looping over the query blocks that see them;
#   3. dQ: one program per block of queries, looping over the key blocks they see.
# That is 7 matmuls per (query block, key block) pair: S, dV, dP, dK in the dK/dV kernel, and S,
# dP (recomputed) and dQ in the dQ kernel; the gradients need only 5 (dq_mode="atomic", below).
# Rows past the end load q = 0, dO = 0 and lse = +inf, so their P is exp2(-inf) = 0 with no mask.


# %%
@triton.jit(do_not_specialize=["N_CTX"])
def attention_bwd_preprocess_kernel(
    o_ptr, do_ptr,  # (B*H, N, D) contiguous: the forward output and the gradient of the loss wrt it
    delta_ptr,  # (B*H, N) fp32 output: rowsum(dO * O)
    N_CTX, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.program_id(1).to(tl.int64) * N_CTX + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < N_CTX
    o = tl.load(o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + row, tl.sum(o * do, 1), mask=offs_m < N_CTX)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, qk_scale,
                 N_CTX, lo, hi, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi), computed transposed."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < N_CTX
        q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_m[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_m[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=in_m, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) = S^T / scale
        p_t = tl.exp2(qk_t * qk_scale - lse2[None, :])  # P^T, recomputed
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T (without the scale)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # dK += dS^T Q
    return dk, dv


@triton.jit(do_not_specialize=["N_CTX"])
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B*H, N, D) contiguous
    lse_ptr, delta_ptr,  # (B*H, N) fp32: from the forward and from the preprocess kernel
    dk_ptr, dv_ptr,  # (B*H, N, D) contiguous outputs
    sm_scale, N_CTX,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per loop step
    BLOCK_N: tl.constexpr,  # keys per program (a multiple of BLOCK_M)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N_CTX * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    in_n = offs_n[:, None] < N_CTX
    k = tl.load(k_ptr + ptrs, mask=in_n, other=0.0)  # this program's keys and values stay in registers
    v = tl.load(v_ptr + ptrs, mask=in_n, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    q_base, do_base = q_ptr + base, do_ptr + base
    lse_base, delta_base = lse_ptr + bh * N_CTX, delta_ptr + bh * N_CTX
    if CAUSAL:
        # queries [start_n, start_n + BLOCK_N) straddle the diagonal: masked. Earlier queries see
        # none of these keys (skipped); later ones see all of them (no mask).
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, qk_scale,
                              N_CTX, start_n, start_n + BLOCK_N, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
        lo = start_n + BLOCK_N
    else:
        lo = 0
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, qk_scale,
                          N_CTX, lo, N_CTX, HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    tl.store(dk_ptr + ptrs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=in_n)
    tl.store(dv_ptr + ptrs, dv.to(dv_ptr.dtype.element_ty), mask=in_n)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, qk_scale, N_CTX, lo, hi,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        if MASKED:
            k = tl.load(k_base + ptrs, mask=offs_n[:, None] < N_CTX, other=0.0)
            v = tl.load(v_base + ptrs, mask=offs_n[:, None] < N_CTX, other=0.0)
        else:
            k = tl.load(k_base + ptrs)
            v = tl.load(v_base + ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:  # a key past the end loaded as 0 would still get weight exp2(-lse2): mask it
            keep = offs_n[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # dQ += dS K
    return dq


@triton.jit(do_not_specialize=["N_CTX"])
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B*H, N, D) contiguous
    lse_ptr, delta_ptr,  # (B*H, N) fp32
    dq_ptr,  # (B*H, N, D) contiguous output
    sm_scale, N_CTX,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program (a multiple of BLOCK_N)
    BLOCK_N: tl.constexpr,  # keys per loop step
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N_CTX * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_m = offs_m < N_CTX
    ptrs = base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptr + ptrs, mask=in_m[:, None], other=0.0)
    do = tl.load(do_ptr + ptrs, mask=in_m[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + bh * N_CTX + offs_m, mask=in_m, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + bh * N_CTX + offs_m, mask=in_m, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    k_base, v_base = k_ptr + base, v_ptr + base
    if CAUSAL:
        dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, qk_scale, N_CTX, 0, start_m,
                        HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION)
        dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, qk_scale, N_CTX, start_m,
                        start_m + BLOCK_M, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION)
    else:
        n_full = (N_CTX // BLOCK_N) * BLOCK_N
        dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, qk_scale, N_CTX, 0, n_full,
                        HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION)
        dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, qk_scale, N_CTX, n_full,
                        N_CTX, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION)
    tl.store(dq_ptr + ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=in_m[:, None])


# %% [markdown]
# The same backward with dQ summed by atomics (FlashAttention-2's choice). dQ of a query block
# is a sum over the key blocks it sees, and the dK/dV kernel already computes dS for every
# (query block, key block) pair: one more matmul there, dQ_part = dS K, gives that key block's
# share of dQ, which its program adds into an fp32 dQ buffer with tl.atomic_add. No second pass
# recomputes S and dP: 5 matmuls per pair instead of 7. The price: every dQ element receives
# cdiv(N, BLOCK_N) fp32 atomic adds (fewer for causal), the buffer must start at zero (the
# wrapper allocates it with torch.zeros), and the order of the adds depends on which program
# gets there first, so dQ can differ in its last bits from run to run (not bitwise deterministic).


# %%
@triton.jit
def _add_dq(dq_ptrs, dq, mask):
    """Add one key block's share of dQ to what the other key blocks' programs add. Relaxed: nothing
    reads dQ before the kernel ends, so the adds need no ordering, only atomicity."""
    tl.atomic_add(dq_ptrs, dq, mask=mask, sem="relaxed")


@triton.jit
def _dkdv_dq_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, offs_n, offs_d, sm_scale,
                    qk_scale, N_CTX, lo, hi, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """_dkdv_blocks, plus each query block's dQ from these keys, dS K, added into dq_base (fp32)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < N_CTX
        q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_m[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_m[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=in_m, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # 1: S^T / scale
        p_t = tl.exp2(qk_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # 2: dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # 3: dP^T = V dO^T
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)  # 4: dK += dS^T Q
        # 5: this key block's share of dQ. Keys past the end loaded k = 0, so they add nothing.
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
        _add_dq(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq * sm_scale, in_m[:, None])
    return dk, dv


@triton.jit(do_not_specialize=["N_CTX"])
def attention_bwd_dkdvdq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B*H, N, D) contiguous
    lse_ptr, delta_ptr,  # (B*H, N) fp32
    dk_ptr, dv_ptr,  # (B*H, N, D) contiguous outputs
    dq_ptr,  # (B*H, N, D) fp32, zeroed by the wrapper: every key block's program adds into it
    sm_scale, N_CTX,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per loop step
    BLOCK_N: tl.constexpr,  # keys per program (a multiple of BLOCK_M)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N_CTX * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    in_n = offs_n[:, None] < N_CTX
    k = tl.load(k_ptr + ptrs, mask=in_n, other=0.0)
    v = tl.load(v_ptr + ptrs, mask=in_n, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    q_base, do_base, dq_base = q_ptr + base, do_ptr + base, dq_ptr + base
    lse_base, delta_base = lse_ptr + bh * N_CTX, delta_ptr + bh * N_CTX
    if CAUSAL:  # the same causal skipping as attention_bwd_dkdv_kernel: no dQ share from keys a query cannot see
        dk, dv = _dkdv_dq_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, offs_n, offs_d,
                                 sm_scale, qk_scale, N_CTX, start_n, start_n + BLOCK_N, HEAD_DIM, BLOCK_M, True,
                                 DOT_PRECISION)
        lo = start_n + BLOCK_N
    else:
        lo = 0
    dk, dv = _dkdv_dq_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, offs_n, offs_d,
                             sm_scale, qk_scale, N_CTX, lo, N_CTX, HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    tl.store(dk_ptr + ptrs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=in_n)
    tl.store(dv_ptr + ptrs, dv.to(dv_ptr.dtype.element_ty), mask=in_n)


# %% [markdown]
# Flash-decoding. One new token per (batch, query head) attends to the ctx positions of the KV
# cache. One program per head would leave most SMs idle at small batch and stream the whole
# cache through one SM each; instead the context is split: program (b, kv head, split) runs the
# online softmax over its slice of SPLIT_SIZE keys and writes its partial (max, sum,
# unnormalised output); a second kernel combines the partials of each (batch, head), rescaling
# each by exp2(m_split - m_max).
#
# Grouped-query attention (GQA): HQ query heads share HKV = HQ / GROUP key/value heads (Llama 3
# 8B: 32 and 8). One program loads the GROUP queries of a KV head as a (BLOCK_G, D) tile and
# reads each K and V block once for all of them: the scores are a (BLOCK_G, BLOCK_N) tl.dot on
# the tensor cores, not a row sum per query. BLOCK_G pads GROUP to 16 (tl.dot's smallest tile);
# the padded rows are zero queries, never stored. GROUP = 1 is plain multi-head attention.
#
# Paged KV cache (vLLM's layout): the cache is a pool of pages of PAGE_SIZE positions,
# (pages, PAGE_SIZE, HKV, D), and a block table row per sequence lists its pages in order, so
# sequences grow without reallocating and share no contiguous memory. The only change in the
# kernel is where a block's rows live: position n of sequence b is slot n % PAGE_SIZE of page
# block_table[b, n // PAGE_SIZE]. Each sequence has its own length (seq_lens); splits past it
# write an empty partial (max -inf, sum 0), which the reduction weighs 0.


# %%
@triton.jit
def decode_split_kernel(
    q_ptr,  # (B, HQ, D): the new token's queries
    k_ptr, v_ptr,  # contiguous: (B, HKV, >= CTX, D) caches; paged: (pages, PAGE_SIZE, HKV, D) page pools
    block_table_ptr, seq_lens_ptr,  # paged only: (B, pages per sequence) int32 page ids, (B,) int32 lengths
    part_o_ptr,  # (B*HQ, NUM_SPLITS, D) fp32 output: each split's unnormalised output
    part_m_ptr, part_l_ptr,  # (B*HQ, NUM_SPLITS) fp32 outputs: each split's max (log2 units) and sum
    sm_scale,
    stride_qb, stride_qh,  # q's strides over batch and head
    stride_kb, stride_kh, stride_kn,  # K's strides: contiguous over batch, kv head, position; paged over page, kv head, slot
    stride_vb, stride_vh, stride_vn,  # the same for V
    stride_bt,  # elements between block_table[b, 0] and block_table[b + 1, 0]
    HKV, CTX,  # kv heads; contiguous: how many positions to attend to (paged: seq_lens[b])
    SPLIT_SIZE, NUM_SPLITS,  # keys per split, and how many splits the grid has
    GROUP: tl.constexpr,  # query heads per kv head, HQ // HKV (1: multi-head attention)
    BLOCK_G: tl.constexpr,  # GROUP padded to a tile tl.dot accepts (>= 16)
    PAGE_SIZE: tl.constexpr,  # 0: contiguous caches; else positions per page of a paged cache
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,  # D, and keys per loop step
    DOT_PRECISION: tl.constexpr,
):
    bg = tl.program_id(0)  # (batch, kv head)
    split = tl.program_id(1)
    b = (bg // HKV).to(tl.int64)
    g = (bg % HKV).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    in_g = offs_g < GROUP
    heads = g * GROUP + offs_g  # the query heads that read kv head g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=in_g[:, None], other=0.0)
    qk_scale = sm_scale * LOG2E
    if PAGE_SIZE == 0:
        length = CTX
    else:
        length = tl.load(seq_lens_ptr + b)
    lo = split * SPLIT_SIZE
    hi = tl.minimum(lo + SPLIT_SIZE, length)  # hi <= lo for a split past this sequence: no iteration
    m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)  # per query head of the group
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_n = cols < hi
        if PAGE_SIZE == 0:
            rows_k = b * stride_kb + cols.to(tl.int64) * stride_kn
            rows_v = b * stride_vb + cols.to(tl.int64) * stride_vn
        else:  # each row's page from the block table (a block may span pages when PAGE_SIZE < BLOCK_N)
            page = tl.load(block_table_ptr + b * stride_bt + cols // PAGE_SIZE, mask=in_n, other=0).to(tl.int64)
            slot = (cols % PAGE_SIZE).to(tl.int64)
            rows_k = page * stride_kb + slot * stride_kn
            rows_v = page * stride_vb + slot * stride_vn
        k = tl.load(k_ptr + g * stride_kh + rows_k[:, None] + offs_d[None, :], mask=in_n[:, None], other=0.0)
        v = tl.load(v_ptr + g * stride_vh + rows_v[:, None] + offs_d[None, :], mask=in_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N), log2 units
        s = tl.where(in_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    part = ((b * HKV + g) * GROUP + offs_g) * NUM_SPLITS + split  # the partial rows of query heads (b, heads)
    tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=in_g[:, None])
    tl.store(part_m_ptr + part, m_i, mask=in_g)
    tl.store(part_l_ptr + part, l_i, mask=in_g)


@triton.jit
def decode_reduce_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr,  # the partials written by decode_split_kernel
    out_ptr,  # (B, H, D) contiguous output
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,  # D, and splits combined per loop step
):
    bh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):  # online softmax again, over the splits
        part = bh * NUM_SPLITS + s0 + offs_s
        in_s = s0 + offs_s < NUM_SPLITS
        m_s = tl.load(part_m_ptr + part, mask=in_s, other=float("-inf"))
        l_s = tl.load(part_l_ptr + part, mask=in_s, other=0.0)
        o_s = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=in_s[:, None], other=0.0)
        m_new = tl.maximum(m_i, tl.max(m_s, 0))
        w = tl.exp2(m_s - m_new)  # each split's weight under the common max
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(w * l_s, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
        m_i = m_new
    tl.store(out_ptr + bh * HEAD_DIM + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty))


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. Block sizes: tiny in the interpreter (it runs the
# programs one after another on numpy); on a GPU fixed configs for the checks and autotuned
# ones for the benchmarks.

# %%
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if common.supports_bf16() else ())
HEAD_DIMS = (16, 32, 64, 128)


def fwd_configs(for_gpu: bool = False) -> list:
    """The configs v3's autotuner times on the first call for each (N, D, causal) and dtype
    (for_gpu: the GPU's list under the interpreter too, for common.inspect_kernel)."""
    if common.INTERPRETER and not for_gpu:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # Hopper: 128 queries per program over 8 warps (two warpgroups of wgmma), keys in blocks of
    # 64 or 128, 3 or 4 stages of K/V tiles in flight. Configs whose tiles do not fit this GPU's
    # shared memory are pruned before timing (_prune_for, below).
    return [triton.Config({"BLOCK_M": 128, "BLOCK_N": bn}, num_warps=8, num_stages=s)
            for bn in (64, 128) for s in (3, 4)]


def dkdv_configs() -> list:
    if common.INTERPRETER:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # dK and dV of BLOCK_N keys are two fp32 accumulators held in registers for the whole loop:
    # 8 warps keep them at 2 * 128 * D / 256 registers per thread for BLOCK_N = 128.
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3)]


def dq_configs() -> list:
    if common.INTERPRETER:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3)]


def _fixed(configs: list, dtype: torch.dtype, kernel: str, head_dim: int, arch: int | None = None) -> tuple[dict, dict]:
    """(block sizes, launch options) used without autotuning: the first config, smaller for fp32,
    fitted to the shared memory of this GPU (or of sm_<arch>: the capability test asks for each card)."""
    if dtype == torch.float32 and not common.INTERPRETER:
        # fp32 tiles are twice the bytes and the dots run on the CUDA cores ("ieee"): small tiles
        blocks = {key: max(16, value // 2) for key, value in configs[0].kwargs.items()}
        options = dict(num_warps=4, num_stages=2)
    else:
        blocks = dict(configs[0].kwargs)
        options = dict(num_warps=configs[0].num_warps, num_stages=configs[0].num_stages)
    return _fit_blocks(blocks, options, dtype, kernel, head_dim, arch), options


def _fit_blocks(blocks: dict, options: dict, dtype: torch.dtype, kernel: str, head_dim: int,
                arch: int | None = None) -> dict:
    """`blocks` with its largest block halved until the tiles fit one program's shared memory:
    fp32 at D = 128 needs 104-112 KiB with _fixed's halved blocks, more than an RTX 3090 or 4090
    has; V2_CONFIG's 64 x 64 at D = 128 needs about 100 KiB on a T4's CUDA cores, of its 64
    (compiled for each card, tests/test_capabilities.py)."""
    estimate = functools.partial(capability.attention_shared_memory, kernel=kernel, HEAD_DIM=head_dim,
                                 tensor_cores=dtype != torch.float32)
    return capability.fit_blocks(blocks, options, dtype.itemsize, estimate=estimate, arch=arch)


# The autotuned kernels: the same @triton.jit functions, with a config chosen by timing on the
# first call for each key (and the dtypes, which the autotuner adds to the key).
# Before timing, configs that do not fit this GPU's shared memory are pruned (common/capability.py
# estimates each kernel's tiles: 128 x 128 with 4 stages at D = 128 needs 288 KiB on an H100, more
# than its 227). Where none fits (a T4 has 64 KiB), the smallest tiles below stand in: chosen by
# the same estimate, not measured on such a card.
_SMALL_CONFIGS = {"fwd": triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
                  "dkdv": triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
                  "dq": triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)}


def _prune_for(kernel: str, arch: int | None = None):
    """The tuner's early_config_prune for `kernel`, against this GPU (or sm_<arch>, for the tests)."""
    estimate = functools.partial(capability.attention_shared_memory, kernel=kernel)

    def prune(configs, named_args, **launch_args):
        kept = capability.prune_configs_by_shared_memory(configs, named_args, estimate=estimate, empty_ok=True,
                                                         arch=arch, **launch_args)
        return kept or [_SMALL_CONFIGS[kernel]]
    return {"early_config_prune": prune}


_KEY = ["N_CTX", "HEAD_DIM", "CAUSAL"]
attention_fwd_v3_tuned = triton.autotune(configs=fwd_configs(), key=_KEY,
                                         prune_configs_by=_prune_for("fwd"))(attention_fwd_v3_kernel)
# The varlen forward is the same kernel with VARLEN=True; a tuner of its own keeps its configs
# apart from the padded forward's (its N_CTX is the longest sequence, not every sequence's length).
attention_fwd_varlen_tuned = triton.autotune(configs=fwd_configs(), key=_KEY,
                                             prune_configs_by=_prune_for("fwd"))(attention_fwd_v3_kernel)
attention_bwd_dkdv_tuned = triton.autotune(configs=dkdv_configs(), key=_KEY,
                                           prune_configs_by=_prune_for("dkdv"))(attention_bwd_dkdv_kernel)
attention_bwd_dq_tuned = triton.autotune(configs=dq_configs(), key=_KEY,
                                         prune_configs_by=_prune_for("dq"))(attention_bwd_dq_kernel)
# The atomic-dQ kernel holds the dK/dV kernel's tiles (K, V kept, Q and dO streamed; its dQ share
# lives in registers): the same configs and shared-memory estimate. reset_to_zero: the tuner runs
# each config several times, and every run adds into dQ, so it zeroes dQ before each one.
attention_bwd_dkdvdq_tuned = triton.autotune(configs=dkdv_configs(), key=_KEY, prune_configs_by=_prune_for("dkdv"),
                                             reset_to_zero=["dq_ptr"])(attention_bwd_dkdvdq_kernel)

V2_CONFIG = (dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1) if common.INTERPRETER
             else dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2))



def v2_config(dtype: torch.dtype, head_dim: int, arch: int | None = None) -> dict:
    """V2_CONFIG with its blocks fitted to this GPU's shared memory (unchanged on an H100)."""
    blocks = {k: v for k, v in V2_CONFIG.items() if k.startswith("BLOCK")}
    options = {k: v for k, v in V2_CONFIG.items() if not k.startswith("BLOCK")}
    return {**_fit_blocks(blocks, options, dtype, "fwd", head_dim, arch), **options}


def _check_qkv(q, k, v, grouped: bool = False) -> None:
    """grouped: k and v may have fewer heads than q (grouped-query attention), a divisor of q's."""
    common.check_tensors(q=q, k=k, v=v, ndim=4, contiguous=False, dtypes=DTYPES, same_shape=False)
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != q.shape[2:] or H % max(k.shape[1], 1) or (
            not grouped and k.shape[1] != H):
        heads = "HKV" if grouped else str(H)
        raise ValueError(f"k and v must both have shape ({B}, {heads}, {N}, {D}) for q of shape {tuple(q.shape)}"
                         + (f", HKV dividing {H}" if grouped else "") + f"; got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got strides "
                             f"{t.stride()} for shape {tuple(t.shape)}; pass {name}.contiguous()")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the head dimension D = q.shape[-1] must be one of {HEAD_DIMS} (tl.arange and "
                         f"tl.dot need a power of 2 of at least 16), got {q.shape[-1]}")
    if q.numel() == 0:
        raise ValueError(f"q, k, v must not be empty, got shape {tuple(q.shape)}")


def _check_out(q, out, name="out") -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    common.check_tensors(q=q, **{name: out}, contiguous=False)
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {out.stride()}")
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products ("ieee"), like the float64 reference; fp16/bf16 ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _qkv_strides(q, k, v) -> tuple:
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))


def attention_v2(q, k, v, causal: bool = False, sm_scale: float | None = None, out=None) -> torch.Tensor:
    """FlashAttention v2 (plain, non-causal): softmax(q k^T * sm_scale) v for (B, H, N, D) inputs."""
    _check_qkv(q, k, v)
    if causal:
        raise ValueError("attention_v2 is non-causal only (adding the mask is exercise 7.1); use attention_v3")
    out = _check_out(q, out)
    B, H, N, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    config = v2_config(q.dtype, D)
    grid = (triton.cdiv(N, config["BLOCK_M"]), B * H)
    attention_fwd_v2_kernel[grid](q, k, v, out, sm_scale, *_qkv_strides(q, k, v), H, N, HEAD_DIM=D,
                                  DOT_PRECISION=_dot_precision(q.dtype), **config)
    return out


def attention_v3(q, k, v, causal: bool = False, sm_scale: float | None = None, out=None,
                 autotune: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention v3 forward: (out, lse) with lse (B, H, N) fp32 the logsumexp of each row.
    k and v may have HKV heads, HKV dividing H (grouped-query attention: query head h reads K/V
    head h // (H // HKV)).

    autotune: on a GPU with fp16/bf16, time the configs of fwd_configs() on the first call per
    shape; otherwise (or False) use one fixed config.
    """
    _check_qkv(q, k, v, grouped=True)
    out = _check_out(q, out)
    B, H, N, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse, sm_scale, *_qkv_strides(q, k, v), H, N, H // k.shape[1])
    meta = dict(HEAD_DIM=D, CAUSAL=bool(causal), DOT_PRECISION=_dot_precision(q.dtype))
    if autotune and common.HAS_GPU and q.dtype != torch.float32:
        grid = lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)  # noqa: E731 (the tuner picks BLOCK_M)
        attention_fwd_v3_tuned[grid](*args, **meta)
    else:
        blocks, options = _fixed(fwd_configs(), q.dtype, "fwd", D)
        grid = (triton.cdiv(N, blocks["BLOCK_M"]), B * H)
        attention_fwd_v3_kernel[grid](*args, **meta, **blocks, **options)
    return out, lse


def _check_cu_seqlens(cu_seqlens, total: int, max_seqlen: int | None, q) -> tuple[list[int], int]:
    """The sequence lengths, and max_seqlen (their maximum when None), after checking that
    cu_seqlens is int32 (B + 1,) on q's device, starts at 0, never decreases and ends at total."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or (
            cu_seqlens.numel() < 2):
        got = (f"{str(cu_seqlens.dtype).removeprefix('torch.')} of shape {tuple(cu_seqlens.shape)}"
               if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens must be an int32 tensor of shape (B + 1,), B >= 1 (the kernel reads it as "
                         f"int32 offsets), got {got}")
    common.check_tensors(q=q, cu_seqlens=cu_seqlens, same_shape=False, same_dtype=False, contiguous=False)
    # One copy to the host (a sync) for the checks: a wrong cu_seqlens would read another sequence's keys
    # or memory past the tensors without an error. flash-attn trusts the caller instead.
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or min(lengths) < 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the number of tokens {total} "
                         f"(q.shape[0]): sequence b is tokens [cu_seqlens[b], cu_seqlens[b + 1]); got {bounds}")
    longest = max(lengths)
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:  # the grid would not reach the end of the longest sequence
        raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest sequence in cu_seqlens ({longest})")
    return lengths, max_seqlen


def attention_varlen(q, k, v, cu_seqlens, max_seqlen: int | None = None, causal: bool = False,
                     sm_scale: float | None = None, out=None, autotune: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention forward over a packed batch of sequences of different lengths (no padding),
    flash-attn's varlen layout: q (total, HQ, D), k and v (total, HKV, D), HKV dividing HQ, and
    cu_seqlens (B + 1,) int32, sequence b being tokens [cu_seqlens[b], cu_seqlens[b + 1]) (a length
    may be 0). Each sequence attends only to itself (causal: to its own past). Returns (out, lse):
    out (total, HQ, D) contiguous, lse (total, HQ) fp32. max_seqlen: at least the longest length
    (default: that length); it sizes the grid."""
    common.check_tensors(q=q, k=k, v=v, ndim=3, contiguous=False, dtypes=DTYPES, same_shape=False)
    total, HQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != D or k.shape[1] < 1 or HQ % k.shape[1]:
        raise ValueError(f"k and v must both have shape ({total}, HKV, {D}) with HKV dividing HQ = {HQ}, for q of "
                         f"shape {tuple(q.shape)}; got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got strides {t.stride()}; "
                             f"pass {name}.contiguous()")
    if D not in HEAD_DIMS:
        raise ValueError(f"the head dimension D = q.shape[-1] must be one of {HEAD_DIMS} (tl.arange and "
                         f"tl.dot need a power of 2 of at least 16), got {D}")
    if total == 0:
        raise ValueError(f"q, k, v must hold at least one token, got shape {tuple(q.shape)}")
    lengths, max_seqlen = _check_cu_seqlens(cu_seqlens, total, max_seqlen, q)
    if out is None:
        out = torch.empty((total, HQ, D), dtype=q.dtype, device=q.device)
    else:
        common.check_tensors(q=q, out=out)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    lse = torch.empty((total, HQ), dtype=torch.float32, device=q.device)
    # no batch stride: each program finds its sequence's first token in cu_seqlens
    strides = (0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0), 0, v.stride(1), v.stride(0))
    args = (q, k, v, out, lse, sm_scale, *strides, HQ, max_seqlen, HQ // k.shape[1])
    meta = dict(HEAD_DIM=D, CAUSAL=bool(causal), DOT_PRECISION=_dot_precision(q.dtype), cu_seqlens_ptr=cu_seqlens,
                VARLEN=True)
    B = len(lengths)
    if autotune and common.HAS_GPU and q.dtype != torch.float32:
        grid = lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), B * HQ)  # noqa: E731 (the tuner picks BLOCK_M)
        attention_fwd_varlen_tuned[grid](*args, **meta)
    else:
        blocks, options = _fixed(fwd_configs(), q.dtype, "fwd", D)
        grid = (triton.cdiv(max_seqlen, blocks["BLOCK_M"]), B * HQ)
        attention_fwd_v3_kernel[grid](*args, **meta, **blocks, **options)
    return out, lse


DQ_MODES = ("separate", "atomic")  # the backward's two ways to dQ: a second pass, or atomics in the dK/dV pass


def _check_dq_mode(dq_mode) -> None:
    if dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")


def attention_backward(do, q, k, v, out, lse, causal: bool = False, sm_scale: float | None = None,
                       autotune: bool = True,
                       dq_mode: str = "separate") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of attention_v3 given dO, the forward's inputs, output and logsumexp. dq_mode
    "separate": a dK/dV kernel and a dQ kernel (7 matmuls per block pair, deterministic); "atomic":
    one kernel that adds dQ with fp32 atomics (5 matmuls, dQ's summation order varies run to run)."""
    _check_dq_mode(dq_mode)
    # The three kernels index every (B*H, N, D) tensor with one layout: make them contiguous
    # (a no-op when they are). dO often is not: the gradient of out.sum() is a stride-0 view.
    q, k, v, out, do = (t.contiguous() for t in (q, k, v, out, do))
    B, H, N, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pre_block = 16 if common.INTERPRETER else 64
    attention_bwd_preprocess_kernel[(triton.cdiv(N, pre_block), B * H)](out, do, delta, N, HEAD_DIM=D,
                                                                       BLOCK_M=pre_block)
    meta = dict(HEAD_DIM=D, CAUSAL=bool(causal), DOT_PRECISION=_dot_precision(q.dtype))
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, sm_scale, N)
    dq_args = (q, k, v, do, lse, delta, dq, sm_scale, N)
    if dq_mode == "atomic":
        dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # the atomics add into it: zero first
        atomic_args = (q, k, v, do, lse, delta, dk, dv, dq32, sm_scale, N)
        if autotune and common.HAS_GPU and q.dtype != torch.float32:
            attention_bwd_dkdvdq_tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H)](*atomic_args, **meta)
        else:
            blocks, options = _fixed(dkdv_configs(), q.dtype, "dkdv", D)
            attention_bwd_dkdvdq_kernel[(triton.cdiv(N, blocks["BLOCK_N"]), B * H)](*atomic_args, **meta,
                                                                                   **blocks, **options)
        return (dq32 if q.dtype == torch.float32 else dq32.to(q.dtype)), dk, dv  # the cast: one small pass over dQ
    if autotune and common.HAS_GPU and q.dtype != torch.float32:
        attention_bwd_dkdv_tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H)](*dkdv_args, **meta)
        attention_bwd_dq_tuned[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](*dq_args, **meta)
    else:
        blocks, options = _fixed(dkdv_configs(), q.dtype, "dkdv", D)
        attention_bwd_dkdv_kernel[(triton.cdiv(N, blocks["BLOCK_N"]), B * H)](*dkdv_args, **meta, **blocks,
                                                                               **options)
        blocks, options = _fixed(dq_configs(), q.dtype, "dq", D)
        attention_bwd_dq_kernel[(triton.cdiv(N, blocks["BLOCK_M"]), B * H)](*dq_args, **meta, **blocks, **options)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """attention_v3 forward; backward from the saved q, k, v, out and logsumexp (no N x N tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, autotune, dq_mode="separate"):
        out, lse = attention_v3(q, k, v, causal, sm_scale, autotune=autotune)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.sm_scale, ctx.autotune, ctx.dq_mode = causal, sm_scale, autotune, dq_mode
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        group = q.shape[1] // k.shape[1]
        if group > 1:  # GQA: the backward kernels are per head; expand K, V and sum their gradients per group
            # (simple, not fast: the expanded copies cost GROUP x the K/V memory for the backward)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.causal, ctx.sm_scale, ctx.autotune, ctx.dq_mode)
        if group > 1:
            B, H, N, D = dk.shape
            dk, dv = (t.view(B, H // group, group, N, D).sum(dim=2) for t in (dk, dv))
        return dq, dk, dv, None, None, None, None  # autograd drops the trailing None when dq_mode was not passed


def flash_attention(q, k, v, causal: bool = False, sm_scale: float | None = None,
                    autotune: bool = True, dq_mode: str = "separate") -> torch.Tensor:
    """softmax(q k^T * sm_scale [causal mask]) v for q (B, H, N, D) and k, v (B, HKV, N, D), HKV
    dividing H (HKV < H: grouped-query attention), differentiable; dq_mode picks the backward's
    dQ strategy (attention_backward)."""
    _check_qkv(q, k, v, grouped=True)
    _check_dq_mode(dq_mode)  # here, not in the backward: a bad value fails at the call that passed it
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), sm_scale, autotune, dq_mode)


# The forward's versions, each called as fn(q, k, v, causal). v1 is the reference itself: the
# benchmarks race it as "torch eager", next to v2 and v3.
VERSIONS = common.Versions("attention forward")
VERSIONS.add("v1", "naive (PyTorch, N x N in memory)", lambda q, k, v, causal: attention_reference(q, k, v, causal))
VERSIONS.add("v2", "flash, plain (non-causal only)", lambda q, k, v, causal: attention_v2(q, k, v, causal))
VERSIONS.add("v3", "flash, exp2 + split masks + tuned", lambda q, k, v, causal: attention_v3(q, k, v, causal)[0])

# Decoding: BLOCK_N cache rows per loop step, and splits sized so that a few waves of programs
# fill the GPU (the split-K sweep in the benchmark shows what the split size changes).
DECODE_BLOCK_N = 16 if common.INTERPRETER else 64
DECODE_BLOCK_S = 16


def default_split_size(ctx: int, programs: int) -> int:
    """Keys per split: enough splits for about 16 programs per SM (programs = B * HKV per split),
    each at least one block long."""
    if not common.HAS_GPU:  # the interpreter (or compile-only, COURSE_INTERPRETER=0)
        return 32  # several splits even on tiny caches, so the reduce kernel is exercised
    n_sm = torch.cuda.get_device_properties(common.DEVICE).multi_processor_count
    splits = max(1, triton.cdiv(16 * n_sm, programs))
    return max(DECODE_BLOCK_N, triton.cdiv(triton.cdiv(ctx, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N)


def _check_decode_q(q, k_pool, v_pool, kv_heads_dim: int) -> tuple[int, int, int, int]:
    """(B, HQ, HKV, D) of a decode call; raises on the mistakes a caller makes."""
    common.check_tensors(q=q, dtypes=DTYPES, ndim=3, contiguous=False)
    common.check_tensors(k_cache=k_pool, v_cache=v_pool, dtypes=DTYPES, ndim=4, contiguous=False)
    common.check_tensors(q=q, k_cache=k_pool, same_shape=False, contiguous=False)
    B, HQ, D = q.shape
    HKV = k_pool.shape[kv_heads_dim]
    if k_pool.shape[3] != D or HKV < 1 or HQ % HKV:
        raise ValueError(f"k_cache has shape {tuple(k_pool.shape)}: for q of shape {tuple(q.shape)} its last "
                         f"dimension must be {D} and its kv heads (dimension {kv_heads_dim}) must divide {HQ}")
    for name, t in (("q", q), ("k_cache", k_pool), ("v_cache", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got strides {t.stride()}")
    if D not in HEAD_DIMS:
        raise ValueError(f"the head dimension must be one of {HEAD_DIMS}, got {D}")
    return B, HQ, HKV, D


def _decode(q, k_pool, v_pool, block_table, seq_lens, HKV, ctx, page_size, split_size, max_len, sm_scale, out):
    """Allocate the partials, launch split + reduce; shared by the contiguous and the paged caches."""
    B, HQ, D = q.shape
    split_size = default_split_size(max_len, B * HKV) if split_size is None else split_size
    if split_size < 1:
        raise ValueError(f"split_size must be at least 1, got {split_size}")
    if out is None:
        out = torch.empty((B, HQ, D), dtype=q.dtype, device=q.device)
    else:
        common.check_tensors(q=q, out=out)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    group = HQ // HKV
    num_splits = triton.cdiv(max_len, split_size)
    part_o = torch.empty((B * HQ, num_splits, D), dtype=torch.float32, device=q.device)
    part_m = torch.empty((B * HQ, num_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty((B * HQ, num_splits), dtype=torch.float32, device=q.device)
    table = block_table if block_table is not None else q  # not read when PAGE_SIZE = 0
    decode_split_kernel[(B * HKV, num_splits)](
        q, k_pool, v_pool, table, seq_lens if seq_lens is not None else q, part_o, part_m, part_l, sm_scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1 if page_size == 0 else 2),
        k_pool.stride(2 if page_size == 0 else 1), v_pool.stride(0), v_pool.stride(1 if page_size == 0 else 2),
        v_pool.stride(2 if page_size == 0 else 1), table.stride(0), HKV, ctx, split_size, num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), PAGE_SIZE=page_size, HEAD_DIM=D,
        BLOCK_N=DECODE_BLOCK_N, DOT_PRECISION=_dot_precision(q.dtype), num_warps=4)
    decode_reduce_kernel[(B * HQ,)](part_o, part_m, part_l, out, num_splits, HEAD_DIM=D, BLOCK_S=DECODE_BLOCK_S)
    return out


def decode_attention(q, k_cache, v_cache, ctx: int | None = None, sm_scale: float | None = None,
                     split_size: int | None = None, out=None) -> torch.Tensor:
    """Attention of one token q (B, HQ, D) over the first ctx positions of caches (B, HKV, max_ctx, D);
    HQ a multiple of HKV (grouped-query attention; HQ == HKV is multi-head attention)."""
    B, HQ, HKV, D = _check_decode_q(q, k_cache, v_cache, kv_heads_dim=1)
    if k_cache.shape[0] != B or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both have shape ({B}, HKV, max_ctx, {D}) for q of shape "
                         f"{tuple(q.shape)}, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    ctx = k_cache.shape[2] if ctx is None else ctx
    if not 1 <= ctx <= k_cache.shape[2]:
        raise ValueError(f"ctx must be in [1, {k_cache.shape[2]}] (the cache length), got {ctx}")
    return _decode(q, k_cache, v_cache, None, None, HKV, ctx, 0, split_size, ctx, sm_scale, out)


def paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, sm_scale: float | None = None,
                           split_size: int | None = None, max_seq_len: int | None = None, out=None) -> torch.Tensor:
    """Decode over a paged KV cache: pools k_pages, v_pages (pages, page_size, HKV, D), block_table
    (B, pages per sequence) int32 (sequence b's positions [i * page_size, (i + 1) * page_size) are in
    page block_table[b, i]) and seq_lens (B,) int32 in [1, pages per sequence * page_size].
    max_seq_len: an upper bound of seq_lens that sizes the grid (default: the block table's capacity;
    the lengths stay on the device, no host sync). The lengths are not checked on the device: a
    length past the block table reads the pages its extra entries name."""
    B, HQ, HKV, D = _check_decode_q(q, k_pages, v_pages, kv_heads_dim=2)
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must have the shape of k_pages {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    for name, t, shape in (("block_table", block_table, (B, None)), ("seq_lens", seq_lens, (B,))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != len(shape) or t.shape[0] != B:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an int32 tensor of shape ({B}{', pages' if len(shape) == 2 else ''}) "
                             f"on q's device, got {got}")
        common.check_tensors(q=q, **{name: t}, same_shape=False, same_dtype=False, contiguous=len(shape) == 1)
    if block_table.stride(-1) != 1:
        raise ValueError(f"block_table must be contiguous along its pages, got strides {block_table.stride()}")
    page_size = k_pages.shape[1]
    capacity = block_table.shape[1] * page_size
    max_seq_len = capacity if max_seq_len is None else max_seq_len
    if not 1 <= max_seq_len <= capacity:
        raise ValueError(f"max_seq_len must be in [1, {capacity}] (pages per sequence x page size), got {max_seq_len}")
    return _decode(q, k_pages, v_pages, block_table, seq_lens, HKV, 0, page_size, split_size, max_seq_len,
                   sm_scale, out)


def to_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous caches (B, HKV, ctx, D) as page pools (B * pages, page_size, HKV, D) in shuffled
    page order, and their block table (B, pages) int32: what a paged cache looks like after
    sequences have grown in turn. Slots past ctx in the last pages are NaN, never to be read."""
    B, HKV, ctx, D = k_cache.shape
    n_pages = triton.cdiv(ctx, page_size)
    order = torch.randperm(B * n_pages, generator=generator).to(k_cache.device)  # pool slot of each page
    pools = []
    for cache in (k_cache, v_cache):
        padded = torch.full((B, HKV, n_pages * page_size, D), float("nan"), dtype=cache.dtype, device=cache.device)
        padded[:, :, :ctx] = cache
        pool = torch.empty((B * n_pages, page_size, HKV, D), dtype=cache.dtype, device=cache.device)
        pool[order] = padded.view(B, HKV, n_pages, page_size, D).permute(0, 2, 3, 1, 4).reshape(pool.shape)
        pools.append(pool)
    return pools[0], pools[1], order.view(B, n_pages).to(torch.int32)


# %% [markdown]
# ## Check
# Awkward sequence lengths (not multiples of any block, and N = 1), q, k, v as transposed views
# of a (B, N, H, D) tensor (strided, as a model's projections produce them), outputs poisoned
# with NaN, a float64 reference. The backward is checked against PyTorch autograd of the naive
# reference in float64, the decoder with a cache longer than the context it reads.


# %%
def random_qkv(B, H, N, D, dtype, requires_grad=False, layout="bhnd"):
    """q, k, v of shape (B, H, N, D); layout "bnhd" makes them strided views of (B, N, H, D)."""
    def one():
        t = (common.randn(B, H, N, D, dtype=dtype) if layout == "bhnd"
             else common.randn(B, N, H, D, dtype=dtype).transpose(1, 2))
        return t.requires_grad_(requires_grad)
    return one(), one(), one()


def reference_grads(q, k, v, do, causal):
    """(out, dq, dk, dv) of the naive reference in float64, by autograd."""
    out, (dq, dk, dv) = common.grads_float64(lambda *qkv: attention_reference(*qkv, causal), (q, k, v), do)
    return out, dq, dk, dv


def grad_tolerance(dtype: torch.dtype) -> dict:
    """Gradients sum N products of rounded values (P and dS are rounded to fp16/bf16 before
    their tl.dot): looser than one rounding of the output."""
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=1e-1, rtol=5e-2)}[dtype]


def check_shapes(quick: bool) -> list[tuple]:
    if common.INTERPRETER:
        return [(1, 2, 67, 16), (2, 1, 33, 32), (1, 1, 1, 16)]
    shapes = [(2, 3, 193, 128), (1, 1, 1, 128)]
    return shapes if quick else shapes + [(1, 2, 1000, 128)]


def check_dtypes(quick: bool) -> list[torch.dtype]:
    if common.INTERPRETER:
        return [torch.float32, torch.float16]
    # Every dtype is one more compile of every kernel (the run must stay short): the script checks
    # bf16, the dtype it benchmarks; tests/test_07_attention.py covers fp32 and fp16 on the GPU too.
    return [torch.bfloat16]


def check(quick: bool) -> None:
    section("Check: forward, backward and decode against PyTorch (float64 reference)")
    shapes, dtypes = check_shapes(quick), check_dtypes(quick)
    for dtype in dtypes:
        for B, H, N, D in shapes:
            for causal in (False, True):
                q, k, v = random_qkv(B, H, N, D, dtype, layout="bnhd" if N > 1 else "bhnd")
                expected = attention_reference(q.double(), k.double(), v.double(), causal)
                name = f"(B,H,N,D)=({B},{H},{N},{D}) {common.dtype_name(dtype)} causal={causal}"
                if not causal:
                    out = common.poisoned_empty(B, H, N, D, dtype=dtype)
                    attention_v2(q, k, v, out=out)
                    common.assert_close(out, expected, name=f"v2 forward {name}")
                out = common.poisoned_empty(B, H, N, D, dtype=dtype)
                _, lse = attention_v3(q, k, v, causal, out=out, autotune=False)
                common.assert_close(out, expected, name=f"v3 forward {name}")
                s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * D ** -0.5
                if causal:
                    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
                common.assert_close(lse, torch.logsumexp(s, -1), name=f"v3 logsumexp {name}", atol=1e-4, rtol=1e-5)
                # backward: autograd through FlashAttentionFunction vs autograd of the float64 reference
                q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                do = common.randn(B, H, N, D, dtype=dtype)
                flash_attention(q, k, v, causal, autotune=False).backward(do)
                _, dq, dk, dv = reference_grads(q, k, v, do, causal)
                for got, ref, what in ((q.grad, dq, "dq"), (k.grad, dk, "dk"), (v.grad, dv, "dv")):
                    common.assert_close(got, ref, name=f"{what} {name}", **grad_tolerance(dtype))
    print(f"v2 (non-causal), v3 (causal and not) forward and logsumexp, and the backward (dq, dk, dv) "
          f"match for (B, H, N, D) in {shapes}, dtypes {', '.join(common.dtype_name(d) for d in dtypes)}: OK")
    check_gqa(dtypes)
    check_atomic_dq(dtypes)
    check_varlen(dtypes)
    check_decode(shapes, dtypes)
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


def check_gqa(dtypes) -> None:
    """Grouped-query attention (K/V with fewer heads than q): v3 forward and the backward, whose dK
    and dV sum over each group of query heads, against float64 autograd of the repeated reference."""
    N, D = (33, 16) if common.INTERPRETER else (193, 64)
    for dtype in dtypes:
        for hkv in (2, 1):  # groups of 2, and multi-query attention (one K/V head for all four)
            q = common.randn(2, 4, N, D, dtype=dtype)
            k, v = common.randn(2, hkv, N, D, dtype=dtype), common.randn(2, hkv, N, D, dtype=dtype)
            do = common.randn(2, 4, N, D, dtype=dtype)
            for causal in (False, True):
                name = f"GQA H=4 HKV={hkv} N={N} D={D} {common.dtype_name(dtype)} causal={causal}"
                out = common.poisoned_empty(2, 4, N, D, dtype=dtype)
                attention_v3(q, k, v, causal, out=out, autotune=False)
                ref_out, ref_grads = common.grads_float64(lambda *t: attention_reference(*t, causal), (q, k, v), do)
                common.assert_close(out, ref_out, name=f"v3 forward {name}")
                _, grads = common.grads_of(lambda *t: flash_attention(*t, causal, autotune=False), (q, k, v), do)
                for got, ref, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
                    common.assert_close(got, ref, name=f"{what} {name}", **grad_tolerance(dtype))
    print("grouped-query attention (4 query heads over 2 and 1 K/V heads): v3 forward and the backward "
          "(dK, dV summed per group) match: OK")


def atomic_dq_shapes() -> list[tuple]:
    """(B, H, HKV, N, D) of the atomic-dQ check: N a multiple of no block, D = 64 and 32, a GQA group of 2."""
    if common.INTERPRETER:
        return [(1, 2, 2, 45, 64), (2, 1, 1, 67, 32), (1, 4, 2, 33, 32)]
    return [(2, 3, 3, 193, 64), (1, 2, 2, 300, 128), (2, 4, 2, 193, 64)]


DQ_NAN_HINT = ("dQ holds NaN: the fp32 buffer the atomics add into must start at zero (torch.zeros, "
               "not torch.empty)")
DQ_WRONG_HINT = ("each key block's program must tl.atomic_add its share of dQ (dS K); a tl.store "
                 "keeps only the share of whichever program stored last")


def check_atomic_dq(dtypes, flash=None) -> None:
    """The backward with dq_mode="atomic" (or `flash`, a function with flash_attention's signature):
    dq, dk, dv against float64 autograd, causal and not, every buffer the wrapper takes from
    torch.empty filled with NaN (PoisonedAllocations); and a second run's dq agrees with the first
    to the dtype's tolerance (the atomics add in no fixed order: equal, but not bitwise)."""
    flash = flash or functools.partial(flash_attention, autotune=False, dq_mode="atomic")
    for dtype in dtypes:
        for B, H, HKV, N, D in atomic_dq_shapes():
            q, do = common.randn(B, H, N, D, dtype=dtype), common.randn(B, H, N, D, dtype=dtype)
            k, v = common.randn(B, HKV, N, D, dtype=dtype), common.randn(B, HKV, N, D, dtype=dtype)
            for causal in (False, True):
                name = f"atomic dQ (B,H,HKV,N,D)=({B},{H},{HKV},{N},{D}) {common.dtype_name(dtype)} causal={causal}"
                with common.checks.PoisonedAllocations() as allocations:
                    _, grads = common.grads_of(lambda *t: flash(*t, causal), (q, k, v), do)
                allocations.check_guards()
                _, expected = common.grads_float64(lambda *t: attention_reference(*t, causal), (q, k, v), do)
                for got, ref, what in zip(grads, expected, ("dq", "dk", "dv")):
                    try:
                        common.assert_close(got, ref, name=f"{what} {name}", **grad_tolerance(dtype))
                    except common.CheckError as error:
                        hint = DQ_NAN_HINT if got.isnan().any() else DQ_WRONG_HINT
                        raise common.CheckError(f"{error}\n  hint: {hint}" if what == "dq" else str(error)) from None
            _, again = common.grads_of(lambda *t: flash(*t, causal), (q, k, v), do)
            common.assert_close(again[0], grads[0], name=f"dq of a second run, {name}", **grad_tolerance(dtype))
    print(f"the backward with dQ by atomics (dq_mode='atomic'; (B, H, HKV, N, D) in {atomic_dq_shapes()}, "
          f"causal and not) matches, and two runs agree to tolerance: OK")


VARLEN_LENGTHS = [17, 1, 100, 0, 33] if common.INTERPRETER else [17, 1, 300, 0, 129, 64]  # one token, an
# empty sequence, none a multiple of a block


def varlen_problem(lengths: list[int], HQ: int, HKV: int, D: int, dtype: torch.dtype) -> tuple:
    """q (total, HQ, D), k, v (total, HKV, D) of a packed batch of sequences of these lengths, and cu_seqlens."""
    total = sum(lengths)
    q = common.randn(total, HQ, D, dtype=dtype)
    k, v = common.randn(total, HKV, D, dtype=dtype), common.randn(total, HKV, D, dtype=dtype)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=q.device)
    return q, k, v, cu_seqlens


def keys_to_max_seqlen(q, k, v, cu_seqlens, max_seqlen: int, causal: bool) -> torch.Tensor:
    """What a varlen forward that masks keys by max_seqlen instead of its sequence's length computes:
    each sequence attends to the first tokens of the next ones too (causal hides it: they come after)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        stop = min(start + max_seqlen, q.shape[0])
        one = torch.tensor([0, stop - start], dtype=torch.int32)
        out[start:end] = varlen_reference(q[start:stop], k[start:stop], v[start:stop], one, causal=causal)[:end - start]
    return out


def varlen_logsumexp(q, k, cu_seqlens, causal: bool) -> torch.Tensor:
    """(total, HQ): the logsumexp of each query's scaled scores over its own sequence's keys."""
    lse = torch.empty(q.shape[:2], dtype=q.dtype, device=q.device)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        s = torch.einsum("mhd,nhd->hmn", q[start:end], k[start:end]) * q.shape[-1] ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1),
                              float("-inf"))
        lse[start:end] = torch.logsumexp(s, -1).transpose(0, 1)
    return lse


def check_varlen(dtypes, varlen=None) -> None:
    """attention_varlen (or `varlen`, a function with its signature) on a packed batch of the
    VARLEN_LENGTHS, multi-head, GQA groups of 4 and multi-query, causal and not, outputs poisoned:
    against each sequence run on its own in float64, and against padding + masking."""
    varlen = varlen or functools.partial(attention_varlen, autotune=False)
    lengths, D = VARLEN_LENGTHS, 16 if common.INTERPRETER else 64
    for dtype in dtypes:
        for hq, hkv in ((4, 4), (8, 2), (4, 1)):
            q, k, v, cu_seqlens = varlen_problem(lengths, hq, hkv, D, dtype)
            q64, k64, v64 = q.double(), k.double(), v.double()
            wrong_head = torch.arange(hq, device=q.device) % hkv
            for causal in (False, True):
                name = f"varlen lengths {lengths} HQ={hq} HKV={hkv} D={D} {common.dtype_name(dtype)} causal={causal}"
                out = common.poisoned_empty(*q.shape, dtype=dtype)
                _, lse = varlen(q, k, v, cu_seqlens, max(lengths), causal, out=out)
                expected = varlen_reference(q64, k64, v64, cu_seqlens, causal=causal)
                common.assert_close(out, expected, name=name, mistakes={
                    "keys past the sequence's end were attended (the next sequence's tokens): mask the keys by "
                    "the sequence's own length, cu_seqlens[b + 1] - cu_seqlens[b], not by max_seqlen":
                        keys_to_max_seqlen(q64, k64, v64, cu_seqlens, max(lengths), causal),
                    "wrong K/V head: query head h reads K/V head h // (HQ // HKV), not h % HKV":
                        varlen_reference(q64, k64[:, wrong_head], v64[:, wrong_head], cu_seqlens, causal=causal),
                })
                common.assert_close(out, padded_attention(q64, k64, v64, cu_seqlens, max(lengths), causal),
                                    name=f"{name}, against padding + masking")
                common.assert_close(lse, varlen_logsumexp(q64, k64, cu_seqlens, causal), name=f"logsumexp {name}",
                                    atol=1e-4, rtol=1e-5)
    print(f"varlen forward over a packed batch of lengths {lengths} (multi-head, GQA groups of 4, multi-query; "
          f"causal and not) matches each sequence on its own and padding + masking: OK")


def check_decode(shapes, dtypes) -> None:
    contexts = []
    for dtype in dtypes:
        for i, (B, H, N, D) in enumerate(shapes):
            ctx = max(N, 3)
            contexts.append(ctx)
            for hkv in sorted({H, 1}):  # multi-head, and every query head sharing one KV head (MQA)
                q = common.randn(B, H, D, dtype=dtype)
                k_cache = common.randn(B, hkv, ctx + 5, D, dtype=dtype)  # 5 positions past ctx: must be ignored
                v_cache = common.randn(B, hkv, ctx + 5, D, dtype=dtype)
                expected = decode_reference(q.double(), k_cache[:, :, :ctx].double(), v_cache[:, :, :ctx].double())
                # the default split, then (first shape only) one not a multiple of the block and one split only
                for split in (None, 48, ctx + 100) if i == 0 else (None,):
                    out = common.poisoned_empty(B, H, D, dtype=dtype)
                    decode_attention(q, k_cache, v_cache, ctx, split_size=split, out=out)
                    common.assert_close(out, expected, name=f"decode B={B} HQ={H} HKV={hkv} ctx={ctx} D={D} "
                                                            f"split={split} {dtype}")
        for page_size, group, split in ((16, 4, None), (8, 1, 24), (64, 2, None)):
            q, k_pages, v_pages, table, seq_lens, expected = paged_inputs(3, 4 * group if group > 1 else 2,
                                                                          4 if group > 1 else 2, 16,
                                                                          [37, 1, 70], page_size, dtype)
            out = common.poisoned_empty(*q.shape, dtype=dtype)
            paged_decode_attention(q, k_pages, v_pages, table, seq_lens, split_size=split, out=out)
            common.assert_close(out, expected, name=f"paged decode, pages of {page_size}, lengths 37, 1, 70, "
                                                    f"group {group}, split {split}, {dtype}")
    print(f"decode (split-K + reduce) matches for contexts {sorted(set(contexts))}, multi-head and one KV head "
          f"for all query heads, reading a prefix of a longer cache, with several split sizes; paged caches "
          f"(pages of 8, 16, 64 in shuffled order, sequences of 37, 1 and 70 tokens, NaN wherever none is): OK")


def paged_inputs(B, HQ, HKV, D, lengths, page_size, dtype):
    """q, paged caches holding sequences of the given lengths (pages shuffled, NaN past each
    sequence), block table, lengths, and the float64 reference of each sequence's decode."""
    ctx = max(lengths)
    q = common.randn(B, HQ, D, dtype=dtype)
    k_cache, v_cache = common.randn(B, HKV, ctx, D, dtype=dtype), common.randn(B, HKV, ctx, D, dtype=dtype)
    expected = torch.stack([decode_reference(q[b:b + 1].double(), k_cache[b:b + 1, :, :n].double(),
                                             v_cache[b:b + 1, :, :n].double())[0] for b, n in enumerate(lengths)])
    for b, n in enumerate(lengths):  # past a sequence's length: never to be read
        k_cache[b, :, n:] = float("nan")
        v_cache[b, :, n:] = float("nan")
    k_pages, v_pages, table = to_pages(k_cache, v_cache, page_size, torch.Generator().manual_seed(page_size))
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
    return q, k_pages, v_pages, table, seq_lens, expected


# %% [markdown]
# ## Memory traffic and memory footprint
# The naive reference writes and reads N x N tensors; FlashAttention moves q, k, v and the
# output (k and v are re-read once per query block, mostly from L2). Counted per aten op with a
# TorchDispatchMode on this machine, then the modelled footprint over sequence lengths.


# %%
def traffic(B: int, H: int, N: int, D: int, dtype: torch.dtype) -> None:
    section(f"Memory traffic: attention at B={B} H={H} N={N} D={D} {common.dtype_name(dtype)}")
    q, k, v = random_qkv(B, H, N, D, dtype)
    out = torch.empty_like(q)
    counted = common.count_torch_traffic(attention_reference, q, k, v)
    # _unsafe_view reshapes bmm's output without touching it (the counter does not know it as a view)
    counted.ops = [op for op in counted.ops if op.op != "_unsafe_view"]
    minimum = common.min_bytes(q, k, v, out)
    flops = attention_flops(B, H, N, D, causal=False)
    print(f"modelled minimum (read q, k, v; write out):   {fmt_bytes(minimum)}")
    print(f"naive PyTorch reference, counted:             {counted.summary()}")
    print(f"  = {counted.total / minimum:.1f}x the minimum; the largest tensors are the N x N scores "
          f"({fmt_bytes(B * H * N * N * q.element_size())} each)")
    print(f"FlashAttention: 1 kernel, q read once, k and v once per query block "
          f"(cdiv(N, BLOCK_M) times, mostly hits in L2), out and lse ({fmt_bytes(B * H * N * 4)}) written")
    print(f"arithmetic intensity: {flops / 1e9:.2f} GFLOP / {fmt_bytes(minimum)} = {flops / minimum:,.0f} "
          f"flop/byte (N / element size: it grows with N)")
    decode_bytes = 2 * B * H * N * D * q.element_size()  # one token against a cache of N positions
    print(f"decode, one query against a cache of {N} positions: K and V {fmt_bytes(decode_bytes)} read for "
          f"{4 * B * H * N * D / decode_bytes:.1f} flop/byte, whatever the context length; with grouped-query "
          f"attention each K, V head serves GROUP queries, GROUP times that (4 for Llama 3 8B's 32 / 8 heads)")
    if common.HAS_GPU:
        ridge = common.matmul_rate(dtype) * 1e12 / (common.copy_bandwidth() * 1e9)
        print(f"this GPU's ridge point (matmul TFLOP/s / copy GB/s, both measured now): {ridge:,.0f} flop/byte: "
              f"the forward is compute bound (TFLOP/s), decoding is memory bound (GB/s)")


BACKWARD_MATMULS = {"separate": 7, "atomic": 5}  # per (query block, key block) pair, by dq_mode


def backward_flops(B: int, H: int, N: int, D: int, causal: bool, dq_mode: str | None = None) -> float:
    """The flops the backward's matmuls do: BACKWARD_MATMULS[dq_mode] products of the forward's size,
    each 2 * N * N * D per (batch, head), half for causal (the diagonal blocks, computed whole, are not
    counted). dq_mode None: the minimum, 5 (S, dP, dV, dK, dQ), which is 2.5x the forward's 2."""
    return (BACKWARD_MATMULS[dq_mode] if dq_mode else 5) * attention_flops(B, H, N, D, causal) / 2


def print_backward_matmuls(B: int, H: int, N: int, D: int) -> None:
    """The matmul count of each pass and its flops at one shape (arithmetic on the shape: no GPU needed)."""
    section(f"Matmuls per (query block, key block) pair, and their flops at B={B} H={H} N={N} D={D}")
    table = Table("each matmul is 2 * N^2 * D flops per (batch, head) over all pairs (causal: half)",
                  ["pass", "matmuls per pair", "which", "GFLOP", "GFLOP causal", "x the forward"])
    rows = [("forward", 2, "S = Q K^T, O = P V", attention_flops(B, H, N, D, False)),
            ("backward, dq_mode='atomic'", BACKWARD_MATMULS["atomic"], "S, dV, dP, dK, dQ (atomic adds)",
             backward_flops(B, H, N, D, False, "atomic")),
            ("backward, dq_mode='separate'", BACKWARD_MATMULS["separate"], "dK/dV: S, dV, dP, dK; dQ: S, dP, dQ",
             backward_flops(B, H, N, D, False, "separate"))]
    for name, count, which, flops in rows:
        table.add(name, count, which, f"{flops / 1e9:,.0f}", f"{flops / 2e9:,.0f}",
                  f"{flops / attention_flops(B, H, N, D, False):.1f}x")
    table.print()
    print("The backward benchmark's TFLOP/s counts the minimum, 2.5x the forward's flops, for every provider "
          "(the useful work): the separate dQ pass does 3.5x, recomputing S and dP for dQ; the atomic kernel does "
          "2.5x, and pays instead with cdiv(N, BLOCK_N) fp32 atomic adds into every element of dQ (fewer causal).")


def memory_model(B: int, H: int, D: int, element_size: int, lengths: list[int]) -> None:
    section(f"Memory footprint over sequence length (modelled; B={B} H={H} D={D}, {element_size}-byte elements)")
    table = Table("extra memory of one forward, modelled",
                  ["N", "naive: S and P (2 x BHN^2)", "flash: out + lse", "ratio"])
    for n in lengths:
        naive = 2 * B * H * n * n * element_size + B * H * n * D * element_size
        flash = B * H * n * D * element_size + B * H * n * 4
        table.add(n, fmt_bytes(naive), fmt_bytes(flash), f"{naive / flash:.0f}x")
    table.print()
    print("The naive footprint grows 4x when N doubles, the flash one 2x. The GPU run measures both.")


# %% [markdown]
# ## Benchmark
# Declared once, run by common.Benchmark: every provider is timed on every case in alternating
# rounds (CUDA events, L2 flushed), against every baseline the registry names for the op: the
# naive reference as "torch eager" (that is v1), torch.compile of it, SDPA on its default choice
# and forced onto each backend (cuDNN, FLASH_ATTENTION, EFFICIENT), and the flash-attn package
# where it imports. Attention is compute bound: TFLOP/s with 4*B*H*N^2*D flops for the forward
# (half for causal) and 2.5x that for the backward (the usual convention: 5 matmuls of the
# forward's size against 2), as a % of torch.matmul (cuBLAS) measured in the same run. Decoding
# is memory bound: GB/s on the KV cache (plus q and out), as a % of a read-only stream measured
# in the same run, since the cache is only read.

# %%
BENCH_DTYPE = torch.bfloat16 if common.supports_bf16() else torch.float32  # no bf16 in the interpreter
BAR_CASE = (4, 32, 4096, 128)  # B, H, N, D of the perf bars
DECODE_CASES = [(8, 32, 8, 128, ctx) for ctx in (8192, 32768, 131072)]  # B, HQ, HKV, D, ctx: Llama-3-8B's heads
DECODE_PAGE = 64 if common.HAS_GPU else 16  # positions per page of the paged benchmark
SWEEP_CTX = 8192
V3 = VERSIONS["v3"].label
BACKWARD = "v3 backward: preprocess, dK/dV and dQ kernels"
BACKWARD_ATOMIC = "v3 backward, atomic dQ: preprocess, one dK/dV/dQ kernel"
DECODE = "split-K + reduce, grouped"
DECODE_PAGED = f"paged ({DECODE_PAGE} per page), split-K + reduce, grouped"
MEMORY_TITLE = "forward: peak extra memory over N, B1 H8 D128"
# What the bars' fastest baselines do that these kernels do not (a known miss prints it):
FORWARD_WHY = ("SDPA's fastest Hopper kernel (cuDNN) loads tiles with TMA and runs warp-specialized, persistent "
               "programs; v3 is one program per query block, software-pipelined, with none of the three")
BACKWARD_WHY = FORWARD_WHY + "; the backward is three kernels, two of which recompute P"
BACKWARD_ATOMIC_WHY = FORWARD_WHY + "; its dQ is cdiv(N, BLOCK_N) fp32 atomic adds per element"


def attention_inputs(B, H, N, D, causal, requires_grad=False) -> tuple:
    """(q, k, v, causal), the op's signature; drawn on the device (a CPU draw of GiBs is slow)."""
    def one():
        return torch.randn(B, H, N, D, device=common.DEVICE, dtype=BENCH_DTYPE).requires_grad_(requires_grad)
    return one(), one(), one(), causal


def decode_inputs(B, HQ, HKV, D, ctx) -> tuple:
    q = torch.randn(B, HQ, D, device=common.DEVICE, dtype=BENCH_DTYPE)
    return q, *(torch.randn(B, HKV, ctx, D, device=common.DEVICE, dtype=BENCH_DTYPE) for _ in range(2))


_PAGED = {}  # the benchmark case's caches and their paged copy, built once, outside the timing


def paged_copy(q, k_cache, v_cache):
    """decode_attention's inputs as a paged cache (DECODE_PAGE per page, shuffled): the paged provider
    of the decode benchmark reads the same values from the same number of bytes, through a block table."""
    # Keyed by the tensors themselves, not their id(): a freed case's id can come back for the next
    # case's tensors (a first version served the 32K case's pages to the 128K case that way).
    if _PAGED.get("caches", (None, None))[0] is not k_cache or _PAGED["caches"][1] is not v_cache:
        _PAGED.clear()  # one case at a time: the copies of a 128K context are GiBs
        k_pages, v_pages, table = to_pages(k_cache, v_cache, DECODE_PAGE)
        seq_lens = torch.full((q.shape[0],), k_cache.shape[2], dtype=torch.int32, device=q.device)
        _PAGED.update(caches=(k_cache, v_cache), paged=(k_pages, v_pages, table, seq_lens, k_cache.shape[2]))
    k_pages, v_pages, table, seq_lens, ctx = _PAGED["paged"]
    return paged_decode_attention(q, k_pages, v_pages, table, seq_lens, max_seq_len=ctx)


def _attention_flops(q, k, v, causal) -> float:
    return attention_flops(*q.shape, causal)


def _decode_bytes(q, k_cache, v_cache) -> int:
    return (k_cache.numel() + v_cache.numel() + 2 * q.numel()) * q.element_size()  # caches and q read, out written


def _shape(case) -> str:
    B, H, N, D, causal = case
    return f"B{B} H{H} N{N} D{D}" + (" causal" if causal else "")


@functools.cache
def _sweep_inputs() -> tuple:  # one cache for every split size of the sweep
    return decode_inputs(8, 32, 8, 128, SWEEP_CTX) if common.HAS_GPU else decode_inputs(1, 4, 2, 16, 64)


def _split_label(split: int) -> str:
    return f"{split} keys ({triton.cdiv(_sweep_inputs()[1].shape[2], split)} splits)"


def _forward(causal: bool) -> common.Benchmark:
    cases = [(4, 32, n, 128, causal) for n in (1024, 2048, 4096, 8192)]
    return common.Benchmark(
        f"forward over N, B4 H32 D128, {'causal' if causal else 'non-causal'}", op="attention", cases=cases,
        quick_cases=[(2, 16, 2048, 128, causal)], cpu_cases=[(1, 1, 32, 16, causal)], setup=attention_inputs,
        kernels=VERSIONS.providers(only=("v3",) if causal else ("v2", "v3")),  # v2 has no causal mask (exercise 7.1)
        reference=attention_reference, flops=_attention_flops, ceiling="matmul", dtype=BENCH_DTYPE, label=_shape,
        bars=[common.Bar(V3, (*BAR_CASE, causal), "baseline", 1.0, why=FORWARD_WHY)],
        plot=f"07_attention_tflops{'_causal' if causal else ''}",
        note="v1 (naive, N x N in memory) is the reference, raced as torch eager. TFLOP/s counts the useful "
             "flops (half for causal) for every provider, so the naive one, which computes the masked half too, "
             "is rated on them. v3 is autotuned on its first call at each N.")


def gqa_inputs(B, HQ, HKV, N, D, causal) -> tuple:
    """(q, k, v, causal) with HKV K/V heads for HQ query heads."""
    q = torch.randn(B, HQ, N, D, device=common.DEVICE, dtype=BENCH_DTYPE)
    k, v = (torch.randn(B, HKV, N, D, device=common.DEVICE, dtype=BENCH_DTYPE) for _ in range(2))
    return q, k, v, causal


# A packed batch as a serving engine or a training step with packed documents holds it: sequences
# of random lengths (a fixed seed), Llama 3 8B's heads. Case: (B, shortest, longest, HQ, HKV, D, causal).
VARLEN_CASES = [(16, 256, 4096, 32, 8, 128, causal) for causal in (True, False)]
VARLEN_QUICK = (8, 128, 1024, 32, 8, 128, True)
VARLEN_PADDED = "SDPA over the padded batch"


def varlen_lengths(B: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """B lengths drawn uniformly from [lo, hi] with a fixed seed: the same batch on every machine."""
    return torch.randint(lo, hi + 1, (B,), generator=torch.Generator().manual_seed(seed)).tolist()


def varlen_inputs(B, lo, hi, HQ, HKV, D, causal) -> tuple:
    """(q, k, v, cu_seqlens, max_seqlen, causal) of a packed batch of varlen_lengths(B, lo, hi)."""
    lengths = varlen_lengths(B, lo, hi)
    total = sum(lengths)
    q = torch.randn(total, HQ, D, device=common.DEVICE, dtype=BENCH_DTYPE)
    k, v = (torch.randn(total, HKV, D, device=common.DEVICE, dtype=BENCH_DTYPE) for _ in range(2))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=common.DEVICE)
    return q, k, v, cu_seqlens, max(lengths), causal


def _varlen_flops(q, k, v, cu_seqlens, max_seqlen, causal) -> float:  # the real work: no padded token counted
    return varlen_flops((cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), q.shape[1], q.shape[2], causal)


def _varlen_label(case) -> str:
    B, lo, hi, HQ, HKV, D, causal = case
    lengths = varlen_lengths(B, lo, hi)
    return (f"{B} seqs of {lo}..{hi} ({sum(lengths):,} tokens, longest {max(lengths)}) HQ{HQ} HKV{HKV} D{D}"
            + (" causal" if causal else ""))


def padding_waste(lengths: list[int], causal: bool) -> tuple[float, float]:
    """(fraction of the padded batch's tokens that are padding, fraction of its attention flops that
    are wasted): a padded batch holds B * longest tokens, and SDPA with a mask computes every one of
    the B * longest^2 scores per head, where each sequence needs its own n^2 (causal: half of it)."""
    longest = max(lengths)
    tokens = 1 - sum(lengths) / (len(lengths) * longest)
    flops = 1 - sum(n * n for n in lengths) / (2 if causal else 1) / (len(lengths) * longest ** 2)
    return tokens, flops


def print_padding_waste() -> None:
    """The waste of padding the benchmark's batches (arithmetic on the lengths: no GPU needed)."""
    section("Padding a packed batch: the work it wastes (the varlen benchmark's lengths)")
    table = Table("padding every sequence to the longest", ["batch", "padded tokens", "wasted attention flops"])
    for case in VARLEN_CASES + [VARLEN_QUICK]:
        tokens, flops = padding_waste(varlen_lengths(*case[:3]), case[-1])
        table.add(_varlen_label(case), f"{100 * tokens:.0f}%", f"{100 * flops:.0f}%")
    table.print()
    print("Wasted flops: of the B * longest^2 scores per head of the padded batch, which a kernel given a mask "
          "tensor computes before masking (it cannot know which blocks are empty without reading the mask); "
          "the varlen kernel computes each sequence's own n^2 (causal: the blocks on and below the diagonal).")


BENCHMARKS = [
    _forward(causal=False),
    _forward(causal=True),
    common.Benchmark(
        "forward, grouped-query attention (Llama 3 8B's heads: 32 query, 8 K/V), B4 D128, causal", op="attention",
        cases=[(4, 32, 8, n, 128, True) for n in (2048, 4096, 8192)], quick_cases=[(2, 32, 8, 2048, 128, True)],
        cpu_cases=[(1, 4, 2, 32, 16, True)], setup=gqa_inputs, kernels=VERSIONS.providers(only=("v3",)),
        reference=attention_reference, flops=lambda q, k, v, causal: attention_flops(*q.shape, causal),
        ceiling="matmul", dtype=BENCH_DTYPE,
        label=lambda case: f"B{case[0]} HQ{case[1]} HKV{case[2]} N{case[3]} D{case[4]}",
        note="v3 reads K/V head h // 4 for query head h; SDPA runs with enable_gqa=True. No bar yet: the "
             "first measurement sets it."),
    common.Benchmark(
        "forward, packed batch of sequences of different lengths (cu_seqlens), Llama 3 8B's heads",
        op="attention_varlen",
        cases=VARLEN_CASES, quick_cases=[VARLEN_QUICK], cpu_cases=[(3, 1, 40, 4, 2, 16, True)],
        setup=varlen_inputs, kernels={"v3 varlen": lambda *inputs: attention_varlen(*inputs)[0]},
        baselines={VARLEN_PADDED: padded_attention}, reference=varlen_reference, flops=_varlen_flops,
        ceiling="matmul", dtype=BENCH_DTYPE, label=_varlen_label,
        note="TFLOP/s counts the real work only (each sequence's own 4 * HQ * n^2 * D, half for causal), for every "
             "provider. torch eager runs each sequence on its own through the naive reference; the padded "
             "baseline's time includes padding, the mask and taking the real rows back (K/V repeated per query "
             "head: SDPA with a mask and enable_gqa falls back to its math backend). No bar yet: the first "
             "measurement sets it."),
    common.Benchmark(
        "backward alone (dq, dk, dv from dO; the forward's graph is kept)", op="attention",
        cases=[(*BAR_CASE, False), (*BAR_CASE, True)], quick_cases=[(2, 16, 2048, 128, True)],
        cpu_cases=[(1, 1, 32, 16, True)], setup=lambda *case: attention_inputs(*case, requires_grad=True),
        kernels={BACKWARD: flash_attention, BACKWARD_ATOMIC: functools.partial(flash_attention, dq_mode="atomic")},
        reference=attention_reference, grad="bwd",
        flops=lambda q, k, v, causal: backward_flops(*q.shape, causal), ceiling="matmul",
        dtype=BENCH_DTYPE, label=_shape,
        bars=[common.Bar(kernel, (*BAR_CASE, causal), "baseline", 0.9, why=why) for causal in (False, True)
              for kernel, why in ((BACKWARD, BACKWARD_WHY), (BACKWARD_ATOMIC, BACKWARD_ATOMIC_WHY))],
        note="Backward time only: each provider's forward ran once before timing, and autograd.grad runs on "
             "its graph with retain_graph. TFLOP/s counts 2.5x the forward's flops (5 matmuls) for every "
             "provider; the separate dQ pass does 7, the atomic kernel 5. Atomic dQ is not bitwise deterministic."),
    common.Benchmark(
        MEMORY_TITLE, op="attention", cases=[(1, 8, n, 128, False) for n in (2048, 4096, 8192, 16384)],
        quick_cases=[(1, 8, 2048, 128, False)], cpu_cases=[(1, 1, 32, 16, False)], setup=attention_inputs,
        kernels=VERSIONS.providers(only=("v3",)), reference=attention_reference, flops=_attention_flops,
        dtype=BENCH_DTYPE, memory=True, label=_shape,
        note="peak extra memory: torch.cuda.max_memory_allocated above what was allocated before one call. "
             "The naive reference (torch eager) grows 4x when N doubles; the flash kernels 2x (out and lse)."),
    common.Benchmark(
        "decode: one query token over the KV cache, B8 HQ32 HKV8 D128", op="decode_attention", cases=DECODE_CASES,
        quick_cases=DECODE_CASES[:1], cpu_cases=[(1, 4, 2, 16, 64)], setup=decode_inputs,
        kernels={DECODE: decode_attention, DECODE_PAGED: paged_copy}, reference=decode_reference,
        nbytes=_decode_bytes, ceiling="read", dtype=BENCH_DTYPE,
        label=lambda case: f"B{case[0]} HQ{case[1]} HKV{case[2]} D{case[3]} ctx {case[4]:,}",
        bars=[common.Bar(kernel, case, vs, at_least) for kernel in (DECODE, DECODE_PAGED) for case in DECODE_CASES
              for vs, at_least in (("ceiling", 90), ("baseline", 1.0))],
        note="The paged kernel reads the same cache from a pool of shuffled pages through a block table; "
             "every provider but it reads the contiguous cache. SDPA runs with enable_gqa=True."),
    common.Benchmark(
        f"decode: keys per split at ctx {SWEEP_CTX:,}, B8 HQ32 HKV8 D128", op=None,
        cases=[SWEEP_CTX >> i for i in range(7)], cpu_cases=[32],
        setup=lambda split: (*_sweep_inputs(), split),
        kernels={DECODE: lambda q, k_cache, v_cache, split: decode_attention(q, k_cache, v_cache, split_size=split)},
        nbytes=lambda q, k_cache, v_cache, split: _decode_bytes(q, k_cache, v_cache), ceiling="read",
        dtype=BENCH_DTYPE, label=_split_label,
        plot="07_attention_decode_splits", xlabel="keys per split", logx=True,
        note=f"One split per KV head is B*HKV = 64 programs, each streaming the whole context alone; more splits "
             f"put more programs (and loads) in flight, until the partials and the reduce start to cost. "
             f"decode_attention's default here: {default_split_size(SWEEP_CTX, 8 * 8)} keys per split."),
]


def plot_memory(results) -> None:
    """The memory benchmark's peak extra memory over N, on log axes: slope 2 for O(N^2), 1 for O(N)."""
    if len(results) < 2:
        return
    fig, ax = common.new_figure(f"Attention forward: peak extra memory, B1 H8 D128 {common.dtype_name(BENCH_DTYPE)}",
                                "sequence length N", "MiB", logx=True)
    ax.set_yscale("log", base=2)
    for name in results[0].memory:
        ax.plot([r.case[2] for r in results], [r.memory[name] / 2**20 for r in results], marker="o", label=name)
    ax.legend(fontsize=7)
    common.save_plot(fig, "07_attention_memory")


def check_at_benchmark_size(quick: bool) -> None:
    """The autotuned bf16 kernels at the benchmarks' sizes, on their first two heads against float64."""
    B, H, N, D = (2, 16, 2048, 128) if quick else BAR_CASE
    section(f"Check: autotuned kernels at B={B} H={H} N={N} D={D} {common.dtype_name(BENCH_DTYPE)} (first two heads)")
    q, k, v, _ = attention_inputs(B, H, N, D, False, requires_grad=True)
    do = torch.randn_like(q)
    for causal, dq_mode in itertools.product((False, True), DQ_MODES):
        out = flash_attention(q, k, v, causal, dq_mode=dq_mode)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref_out, *ref_grads = reference_grads(*(t[:1, :2].detach() for t in (q, k, v)), do[:1, :2], causal)
        common.assert_close(out[:1, :2], ref_out, name=f"forward causal={causal}")
        for got, ref, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
            common.assert_close(got[:1, :2], ref, name=f"{what} causal={causal} dq_mode={dq_mode}",
                                **grad_tolerance(BENCH_DTYPE))
    q, k_cache, v_cache = decode_inputs(8, 32, 8, 128, SWEEP_CTX)
    expected = decode_reference(q[:1, :8].double(), k_cache[:1, :2].double(), v_cache[:1, :2].double())
    common.assert_close(decode_attention(q, k_cache, v_cache)[:1, :8], expected, name=f"decode ctx={SWEEP_CTX}")
    common.assert_close(paged_copy(q, k_cache, v_cache)[:1, :8], expected, name=f"paged decode ctx={SWEEP_CTX}")
    print("forward, backward (causal and not, both dq modes) and decode at the benchmark sizes: OK")


# %% [markdown]
# ## Takeaways
# - Naive attention stores N x N scores and probabilities: memory and traffic grow as N^2.
# - FlashAttention keeps one BLOCK_M x BLOCK_N tile of scores in registers and uses online
#   softmax (running max, running sum, rescaled accumulator): memory O(N), one kernel.
# - Causal attention skips the blocks above the diagonal and masks only the diagonal blocks;
#   blocks that need no mask run a loop without one. exp2 with log2(e) folded into the scale
#   saves a multiply per score.
# - The backward recomputes P from the saved logsumexp: delta = rowsum(dO * O), then dK/dV per
#   key block and dQ per query block, no N x N tensor and no atomics: 7 matmuls per block pair.
#   dq_mode="atomic" adds dQ from the dK/dV kernel with fp32 atomics instead: 5 matmuls, one
#   kernel, and a dQ whose summation order (and last bits) varies from run to run.
# - Decoding one token is memory bound: split the context over many programs, then combine the
#   partial (max, sum, output) with the same rescaling.
# - A packed batch (cu_seqlens) needs no padding: each program reads its sequence's start and
#   length, masks keys by that length, and exits when its block is past the end.


# %%
# %% [markdown]
# ## What the compiler made
# The forward's first config (128 queries over 8 warps, 64 keys a step, 3 stages), fp16, at
# D = 64 and D = 128, as common.inspect_kernel compiles it for this GPU (for an H100 without
# one): the accumulator (BLOCK_M x D fp32) and the score tile (BLOCK_M x BLOCK_N) live in
# registers, so doubling D adds registers; K and V tiles stream through shared memory, so it
# adds shared memory too. The layouts line of the TTGIR says how the tensor cores hold them.


# %%
def compiled_forward() -> None:
    section("What the compiler made of the forward (fp16, the first autotuned config)")
    config = fwd_configs(for_gpu=True)[0]
    calls = []
    for d in (64, 128):
        q = torch.empty(1, 1, 4096, d, dtype=torch.float16, device=common.DEVICE)  # nothing is launched
        lse = torch.empty(1, 1, 4096, device=common.DEVICE)
        strides = (4096 * d, 4096 * d, d) * 3
        calls.append((attention_fwd_v3_kernel, (q, q, q, q, lse, d ** -0.5, *strides, 1, 4096, 1),
                      dict(config.kwargs, HEAD_DIM=d, CAUSAL=False, DOT_PRECISION="tf32",
                           num_warps=config.num_warps, num_stages=config.num_stages)))
    reports = common.inspect_kernels(calls, skip_with_reason=True)
    if reports is None:
        return
    table = Table(f"attention_fwd_v3_kernel compiled for sm_{reports[0].arch}: "
                  f"{config.kwargs['BLOCK_M']} x {config.kwargs['BLOCK_N']}, {config.num_warps} warps, "
                  f"{config.num_stages} stages",
                  ["D", "registers/thread", "spilled", "shared", "programs/SM", "bound by", "tensor cores"])
    for d, r in zip((64, 128), reports):
        programs, binding, _ = r.occupancy()
        table.add(d, r.registers, fmt_bytes(r.local_bytes or 0), fmt_bytes(r.shared), programs, binding,
                  "wgmma" if r.features["wgmma"] else "mma.sync" if r.features["mma"] else "none")
    table.print()
    if reports[0].note:
        print(reports[0].note)
    print("The layouts of the D = 128 kernel (TTGIR):")
    print(reports[1].excerpt("ttgir", r"^#(mma|shared|blocked|smem)\w* =", lines=6))


if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    compiled_forward()
    if common.HAS_GPU:
        check_at_benchmark_size(args.quick)
        traffic(*BAR_CASE, torch.bfloat16)
    else:
        traffic(1, 2, 256, 64, torch.float32)
    memory_model(1, 8, 128, 2, [1024, 2048, 4096, 8192, 16384])
    print_backward_matmuls(*BAR_CASE)
    print_padding_waste()
    results = common.run_benchmarks(BENCHMARKS, args.quick)
    plot_memory(results[MEMORY_TITLE])
