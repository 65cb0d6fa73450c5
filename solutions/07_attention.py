"""
Solutions for lesson 07: attention
==================================

The reference answers to exercises/07_attention.py. Check them with:

    make check LESSON=07 IMPL=solutions

Each exercise changes which keys a query may see, like the kernels in
lessons/advanced/07_attention.py: a causal mask, a per-sequence cache length, a sliding
window, a cache in pages, a packed batch of sequences. Hints, from gentle to explicit, are in
lessons/advanced/07_attention.md under "Exercises".

All tensors here are contiguous: q, k, v, out of shape (B, H, N, D) hold element [b, h, n, d]
at ((b * H + h) * N + n) * D + d, so (batch, head) number bh = b * H + h starts at bh * N * D.
Exercise 7.5 packs sequences of different lengths instead: (TOTAL, H, D), token t, head h at row t * H + h.
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

from common.kernels import LOG2E

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128)
# Queries per program and keys per loop step. BLOCK_M is a multiple of BLOCK_N.
BLOCK_M = 32 if common.INTERPRETER else 64
BLOCK_N = 16 if common.INTERPRETER else 32


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # exact fp32 dots; ignored for fp16/bf16


def _check_qkv(q, k, v, out):
    common.check_tensors(q=q, k=k, v=v, ndim=4, dtypes=DTYPES)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the head dimension must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if out is None:
        return torch.empty_like(q)
    common.check_tensors(q=q, out=out)
    return out


# --------------------------------------------------------------------------------------------
# The starting point: FlashAttention forward, NON-causal, complete. Read it; exercise 7.1 makes
# a causal copy of it.


@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) contiguous inputs
    out_ptr,  # (B, H, N, D) contiguous output
    sm_scale,  # softmax scale, 1 / sqrt(D) by default
    N_CTX,  # sequence length N
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    """out = softmax(q k^T * sm_scale) v for BLOCK_M queries of one (batch, head)."""
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * N_CTX * HEAD_DIM  # this (batch, head)'s first element
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < N_CTX, other=0.0)
    qk_scale = sm_scale * LOG2E  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running output
    for start_n in range(0, N_CTX, BLOCK_N):
        cols = start_n + offs_n
        kv_offsets = base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=cols[:, None] < N_CTX, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=cols[:, None] < N_CTX, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(cols[None, :] < N_CTX, s, float("-inf"))  # keys past the end
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < N_CTX)


def attention(q, k, v, sm_scale: float | None = None, out=None) -> torch.Tensor:
    """Non-causal attention for contiguous (B, H, N, D) q, k, v (the starting point)."""
    out = _check_qkv(q, k, v, out)
    B, H, N, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    attention_kernel[(triton.cdiv(N, BLOCK_M), B * H)](q, k, v, out, sm_scale, N, HEAD_DIM=D, BLOCK_M=BLOCK_M,
                                                       BLOCK_N=BLOCK_N, DOT_PRECISION=_dot_precision(q.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Exercise 7.1: causal masking
# out[b, h, m] = sum_n P[m, n] v[n] with P = softmax over the keys n <= m only (query m sees
# itself and the past). Same inputs and shapes as `attention`. The wrapper is written for you;
# write the kernel.


@triton.jit
def causal_attention_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) contiguous inputs
    out_ptr,  # (B, H, N, D) contiguous output
    sm_scale,  # softmax scale
    N_CTX,  # sequence length N
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Causal attention for BLOCK_M queries of one (batch, head): key n is visible to query m iff n <= m.

    Key blocks entirely after this program's last query (start_n >= start_m + BLOCK_M) are
    fully masked: skip them instead of computing them.
    """
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * N_CTX * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < N_CTX, other=0.0)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # keys from start_m + BLOCK_M on come after every query of this block: never visit them
    hi = tl.minimum(start_m + BLOCK_M, N_CTX)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_offsets = base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=cols[:, None] < N_CTX, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=cols[:, None] < N_CTX, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # key n is visible to query m iff n <= m (itself and the past), and n exists
        visible = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < N_CTX)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < N_CTX)


def causal_attention(q, k, v, sm_scale: float | None = None, out=None) -> torch.Tensor:
    """Causal attention for contiguous (B, H, N, D) q, k, v."""
    out = _check_qkv(q, k, v, out)
    B, H, N, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    causal_attention_kernel[(triton.cdiv(N, BLOCK_M), B * H)](q, k, v, out, sm_scale, N, HEAD_DIM=D,
                                                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                              DOT_PRECISION=_dot_precision(q.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Exercise 7.2: decode attention over a KV cache, with per-sequence lengths and grouped-query
# attention (GQA)
# A batch of B sequences is being generated, one new token each. Sequence b has seq_lens[b]
# tokens in the cache so far; the caches are allocated for MAX_CTX positions and the rest is
# garbage. With GQA, HQ query heads share HKV key/value heads (HQ a multiple of HKV): query
# head hq reads kv head hq // (HQ // HKV).
#     q: (B, HQ, D)   k_cache, v_cache: (B, HKV, MAX_CTX, D)   seq_lens: (B,) int32   out: (B, HQ, D)
#     out[b, hq] = softmax(q[b, hq] . k_cache[b, g, :L]^T * sm_scale) @ v_cache[b, g, :L]
#     with g = hq // (HQ // HKV) and L = seq_lens[b]
# One program per (b, hq), looping over the cache in blocks of BLOCK_N positions (no split-K).
# Write the kernel AND the wrapper (validate, allocate, grid, launch, return).

DECODE_BLOCK_N = 16 if common.INTERPRETER else 64


@triton.jit
def _decode_block_step(q, k, v, in_n, m_i, l_i, acc):
    """One block of keys for one query (fp32 q, k, v; in_n masks the block's valid rows): the
    online-softmax update of the running max m_i, sum l_i and output acc (log2 units). 7.2 and 7.4."""
    s = tl.where(in_n, tl.sum(k * q[None, :], 1), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    p = tl.exp2(s - m_new)
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * v, 0)


@triton.jit
def decode_gqa_kernel(
    q_ptr,  # (B, HQ, D) contiguous
    k_ptr, v_ptr,  # (B, HKV, MAX_CTX, D) contiguous caches
    seq_lens_ptr,  # (B,) int32: how many cache positions of sequence b are valid
    out_ptr,  # (B, HQ, D) contiguous output
    sm_scale,  # softmax scale
    HQ, HKV, MAX_CTX,  # query heads, kv heads, cache length
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, hq] for program tl.program_id(0) = b * HQ + hq; scores and sums in fp32."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    g = hq // (HQ // HKV)  # HQ // HKV query heads share one kv head
    seq_len = tl.load(seq_lens_ptr + b)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d).to(tl.float32) * (sm_scale * LOG2E)
    kv_base = (b.to(tl.int64) * HKV + g) * MAX_CTX * HEAD_DIM
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):  # positions past seq_len are never read
        cols = start_n + offs_n
        in_n = cols < seq_len
        offsets = kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        m_i, l_i, acc = _decode_block_step(q, k, v, in_n, m_i, l_i, acc)
    tl.store(out_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty))


def decode_gqa(q, k_cache, v_cache, seq_lens, sm_scale: float | None = None, out=None) -> torch.Tensor:
    """Decode attention of q (B, HQ, D) over caches (B, HKV, MAX_CTX, D), sequence b using seq_lens[b] positions.

    Raise ValueError if HQ is not a multiple of HKV (say both numbers), or if the shapes of q and
    the caches disagree on B or D. seq_lens is an int32 tensor of B lengths on q's device.
    Write into `out` when it is given and return the output.
    """
    common.check_tensors(q=q, dtypes=DTYPES, ndim=3)
    common.check_tensors(k_cache=k_cache, v_cache=v_cache, dtypes=DTYPES, ndim=4)
    common.check_tensors(q=q, k_cache=k_cache, same_shape=False)  # one device, one dtype
    B, HQ, D = q.shape
    _, HKV, MAX_CTX, _ = k_cache.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or D not in HEAD_DIMS:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}; for q of shape {tuple(q.shape)} it must "
                         f"be ({B}, HKV, MAX_CTX, {D}), with D one of {HEAD_DIMS}")
    if HQ % HKV:
        raise ValueError(f"HQ = {HQ} query heads is not a multiple of HKV = {HKV} kv heads")
    common.check_tensors(seq_lens=seq_lens, dtypes=(torch.int32,), ndim=1)
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens must hold one length per sequence ({B}), got {seq_lens.shape[0]}")
    if out is None:
        out = torch.empty_like(q)
    else:
        common.check_tensors(q=q, out=out)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    decode_gqa_kernel[(B * HQ,)](q, k_cache, v_cache, seq_lens, out, sm_scale, HQ, HKV, MAX_CTX, HEAD_DIM=D,
                                 BLOCK_N=DECODE_BLOCK_N)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 7.3: sliding-window attention
# Causal attention where query m sees only the last WINDOW keys: key n is visible iff
# m - WINDOW < n <= m (Mistral-style local attention; WINDOW = 1 sees only itself, WINDOW >= N
# is plain causal attention). Cost per query is O(WINDOW), not O(N): visit only the key blocks
# some query of the block can see. The wrapper is written for you; write the kernel.


@triton.jit
def sliding_window_attention_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) contiguous inputs
    out_ptr,  # (B, H, N, D) contiguous output
    sm_scale,  # softmax scale
    N_CTX,  # sequence length N
    WINDOW,  # keys per query, >= 1
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Sliding-window causal attention for BLOCK_M queries of one (batch, head).

    Careful: a block may hold no visible key at all for some rows. With -inf scores, a row whose
    running max is still -inf computes exp2(-inf - (-inf)) = NaN unless you guard it.
    """
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * N_CTX * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < N_CTX, other=0.0)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the first query (start_m) sees keys from start_m - WINDOW + 1: start at that key's block;
    # the last query sees up to start_m + BLOCK_M - 1
    lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M, N_CTX)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_offsets = base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=cols[:, None] < N_CTX, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=cols[:, None] < N_CTX, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = ((cols[None, :] <= offs_m[:, None]) & (cols[None, :] > offs_m[:, None] - WINDOW)
                   & (cols[None, :] < N_CTX))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m_new = -inf: subtract 0 instead, so that its
        # exp2(-inf - 0) is 0 rather than exp2(-inf - (-inf)) = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < N_CTX)


def sliding_window_attention(q, k, v, window: int, sm_scale: float | None = None, out=None) -> torch.Tensor:
    """Sliding-window causal attention for contiguous (B, H, N, D) q, k, v."""
    out = _check_qkv(q, k, v, out)
    if window < 1:
        raise ValueError(f"window must be at least 1 (a query always sees itself), got {window}")
    B, H, N, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    sliding_window_attention_kernel[(triton.cdiv(N, BLOCK_M), B * H)](
        q, k, v, out, sm_scale, N, window, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DOT_PRECISION=_dot_precision(q.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Exercise 7.4: decode over a paged KV cache
# A serving engine keeps the KV cache as a pool of pages of PAGE_SIZE positions (vLLM's
# layout) and, per sequence, a row of a block table naming its pages in order. Position n of
# sequence b is slot n % PAGE_SIZE of page block_table[b, n // PAGE_SIZE]; element d of kv
# head g there is at ((page * PAGE_SIZE + slot) * HKV + g) * D + d.
#     q: (B, HQ, D)   k_pages, v_pages: (NUM_PAGES, PAGE_SIZE, HKV, D)   block_table: (B, MAX_PAGES) int32
#     seq_lens: (B,) int32   out: (B, HQ, D); query head hq reads kv head hq // (HQ // HKV) (as in 7.2)
# One program per (b, hq), as in 7.2; only where a block's rows live changes. The wrapper is
# written for you; write the kernel.


@triton.jit
def paged_decode_kernel(
    q_ptr,  # (B, HQ, D) contiguous
    k_ptr, v_ptr,  # (NUM_PAGES, PAGE_SIZE, HKV, D) contiguous page pools
    block_table_ptr,  # (B, MAX_PAGES) int32 contiguous: sequence b's pages, in order
    seq_lens_ptr,  # (B,) int32: positions of sequence b
    out_ptr,  # (B, HQ, D) contiguous output
    sm_scale,  # softmax scale
    HQ, HKV, MAX_PAGES, PAGE_SIZE,  # query heads, kv heads, block-table width, positions per page
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, hq] for program tl.program_id(0) = b * HQ + hq; scores and sums in fp32."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    g = hq // (HQ // HKV)  # HQ // HKV query heads share one kv head
    seq_len = tl.load(seq_lens_ptr + b)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d).to(tl.float32) * (sm_scale * LOG2E)
    table_row = block_table_ptr + b.to(tl.int64) * MAX_PAGES
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):  # positions past seq_len are never read
        cols = start_n + offs_n
        in_n = cols < seq_len
        page = tl.load(table_row + cols // PAGE_SIZE, mask=in_n, other=0).to(tl.int64)  # a block may span pages
        rows = (page * PAGE_SIZE + cols % PAGE_SIZE) * HKV + g  # (page, slot, kv head) of each position
        offsets = rows[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        m_i, l_i, acc = _decode_block_step(q, k, v, in_n, m_i, l_i, acc)
    tl.store(out_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty))


def paged_decode(q, k_pages, v_pages, block_table, seq_lens, sm_scale: float | None = None, out=None) -> torch.Tensor:
    """Decode attention of q (B, HQ, D) over paged caches (NUM_PAGES, PAGE_SIZE, HKV, D) through
    block_table (B, MAX_PAGES) int32, sequence b using its first seq_lens[b] positions."""
    common.check_tensors(q=q, dtypes=DTYPES, ndim=3)
    common.check_tensors(k_pages=k_pages, v_pages=v_pages, dtypes=DTYPES, ndim=4)
    common.check_tensors(q=q, k_pages=k_pages, same_shape=False)  # one device, one dtype
    common.check_tensors(block_table=block_table, dtypes=(torch.int32,), ndim=2)
    common.check_tensors(seq_lens=seq_lens, dtypes=(torch.int32,), ndim=1)
    B, HQ, D = q.shape
    _, page_size, HKV, _ = k_pages.shape
    if k_pages.shape[3] != D or D not in HEAD_DIMS or HQ % HKV:
        raise ValueError(f"k_pages has shape {tuple(k_pages.shape)}; for q of shape {tuple(q.shape)} it must be "
                         f"(NUM_PAGES, PAGE_SIZE, HKV, {D}) with HKV dividing {HQ} and D one of {HEAD_DIMS}")
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(f"block_table and seq_lens need one row per sequence ({B}), got "
                         f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    if out is None:
        out = torch.empty_like(q)
    else:
        common.check_tensors(q=q, out=out)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    paged_decode_kernel[(B * HQ,)](q, k_pages, v_pages, block_table, seq_lens, out, sm_scale, HQ, HKV,
                                   block_table.shape[1], page_size, HEAD_DIM=D, BLOCK_N=DECODE_BLOCK_N)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 7.5: varlen attention: find your sequence
# A packed batch: B sequences of different lengths stored back to back, no padding (flash-attn's
# varlen layout). cu_seqlens holds the cumulative lengths: sequence b is tokens
# [cu_seqlens[b], cu_seqlens[b + 1]) (a length may be 0). Each sequence attends only to its own
# tokens (non-causal); query head h reads K/V head h // (HQ // HKV), as in 7.2.
#     q: (TOTAL, HQ, D)   k, v: (TOTAL, HKV, D)   cu_seqlens: (B + 1,) int32   out: (TOTAL, HQ, D)
#     out[t, h] = softmax(q[t, h] . k[s:e, g]^T * sm_scale) @ v[s:e, g] for t in [s, e), sequence b's
#     tokens, with g = h // (HQ // HKV); token t, head h of q is row t * HQ + h (of k, v: t * HKV + g)
# The grid is (cdiv(MAX_SEQLEN, BLOCK_M), B * HQ): sized for the longest sequence. The wrapper is
# written for you; write the kernel.


@triton.jit
def varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr,  # (TOTAL, HQ, D) and (TOTAL, HKV, D) contiguous inputs
    cu_seqlens_ptr,  # (B + 1,) int32: sequence b is tokens [cu_seqlens[b], cu_seqlens[b + 1])
    out_ptr,  # (TOTAL, HQ, D) contiguous output
    sm_scale,  # softmax scale
    HQ, HKV,  # query heads, K/V heads
    MAX_SEQLEN,  # the longest sequence: what the grid is sized for
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """BLOCK_M queries of one (sequence b, query head h): program (query block, b * HQ + h)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    g = h // (HQ // HKV)  # HQ // HKV query heads share one K/V head
    seq_start = tl.load(cu_seqlens_ptr + b)  # this sequence's first token in the packed batch
    seq_len = tl.load(cu_seqlens_ptr + b + 1) - seq_start  # its own length: keys past it are the next sequence's
    if start_m >= seq_len:  # the grid covers the longest sequence: no query of this one here
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (seq_start + offs_m).to(tl.int64) * HQ + h  # token seq_start + m, head h; int64: TOTAL * HQ * D
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < seq_len, other=0.0)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        kv_rows = (seq_start + cols).to(tl.int64) * HKV + g
        kv_offsets = kv_rows[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=cols[:, None] < seq_len, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(cols[None, :] < seq_len, s, float("-inf"))  # the next sequence's keys get no weight
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < seq_len)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, sm_scale: float | None = None, out=None) -> torch.Tensor:
    """Non-causal attention of each sequence of a packed batch: q (TOTAL, HQ, D), k, v (TOTAL, HKV, D),
    cu_seqlens (B + 1,) int32, max_seqlen at least the longest length."""
    common.check_tensors(q=q, k=k, v=v, ndim=3, dtypes=DTYPES, same_shape=False)
    common.check_tensors(cu_seqlens=cu_seqlens, dtypes=(torch.int32,), ndim=1)
    total, HQ, D = q.shape
    HKV = k.shape[1]
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != D or D not in HEAD_DIMS or HQ % HKV:
        raise ValueError(f"k and v must both have shape ({total}, HKV, {D}) with HKV dividing {HQ} and D one of "
                         f"{HEAD_DIMS}, for q of shape {tuple(q.shape)}; got {tuple(k.shape)} and {tuple(v.shape)}")
    if out is None:
        out = torch.empty_like(q)
    else:
        common.check_tensors(q=q, out=out)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    B = cu_seqlens.numel() - 1
    varlen_attention_kernel[(triton.cdiv(max_seqlen, BLOCK_M), B * HQ)](
        q, k, v, cu_seqlens, out, sm_scale, HQ, HKV, max_seqlen, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DOT_PRECISION=_dot_precision(q.dtype))
    return out
