"""Lesson 07 (attention): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/07_attention.py; IMPL=solutions grades the answers.
Attention is slow in the interpreter: every shape here is tiny there (N <= 67, D <= 32).
"""

import itertools
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, poisoned_empty, randn
from common.checks import current_seed, tolerance, unravel
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl, solution_with, with_flags
from common.kernels import LOG2E
from common.lessons import lesson_module, load_module

# Kernels that divide 0 by 0 on purpose (rows that see no key, in known-wrong answers and in the
# padding rows past N) make numpy warn in the interpreter; the checks look at the values instead.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

STEM = "07_attention"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


def _shapes():
    """(B, H, N, D): N not a multiple of any block, several query blocks and heads."""
    if common.INTERPRETER:
        return [(1, 2, 67, 16), (2, 1, 33, 32)]
    # one head dimension on the GPU: each (dtype, D) is one more compile of every kernel
    return [(2, 3, 193, 64), (1, 2, 300, 64)]


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


def _fail(message: str):
    seed = current_seed()
    raise CheckError(message + (f"\n  reproduce with COURSE_SEED={seed}" if seed is not None else ""))


def _masked_attention(q, k, v, visible):
    """float64 softmax(q k^T / sqrt(D), keys where visible[m, n]) v; a row that sees nothing is NaN."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible.to(s.device), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _positions(n):
    idx = torch.arange(n, device=common.DEVICE)
    return idx[:, None], idx[None, :]  # query m (rows), key n (columns)


def _close(out, expected, name, mistakes, nan_rows_hint):
    """assert_close, after a diagnosis for outputs where whole query rows are NaN (0 / 0)."""
    tol = tolerance(out.dtype)
    a = out.detach().double().cpu()
    matches_mistake = any(torch.isclose(a, m.detach().double().cpu(), equal_nan=True, **tol).all()
                          for m in mistakes.values())
    rows, expected_rows = a.flatten(0, -2), expected.detach().double().cpu().flatten(0, -2)
    nan_rows = torch.isnan(rows).all(dim=1) & torch.isfinite(expected_rows).all(dim=1)
    if 0 < int(nan_rows.sum()) < len(rows) and not matches_mistake:
        first = unravel(int(nan_rows.nonzero()[0]), a.shape[:-1])
        _fail(f"{name}: {int(nan_rows.sum())} of {len(rows)} query rows are entirely NaN, the first at "
              f"(b, h, m) = {first}; they were computed as NaN (or never written).\n  hint: {nan_rows_hint}")
    assert_close(out, expected, name=name, mistakes=mistakes)


# --------------------------------------------------------------------------- 7.1 causal masking

CAUSAL_NAN_HINT = ("those queries saw no key at all (m = -inf, l = 0, 0 / 0): does the key loop stop before "
                   "the diagonal block? Every query sees its own key, so the loop runs to start_m + BLOCK_M")


def check_causal_attention(causal_attention):
    for dtype in DTYPES:
        for B, H, N, D in _shapes():
            q, k, v = (randn(B, H, N, D, dtype=dtype) for _ in range(3))
            out = poisoned_empty(B, H, N, D, dtype=dtype)
            _same_output(causal_attention(q, k, v, out=out), out, "causal_attention")
            m, n = _positions(N)
            _close(out, _masked_attention(q, k, v, n <= m), f"causal_attention (B,H,N,D)=({B},{H},{N},{D}) {dtype}",
                   mistakes={
                       "the causal mask is missing: the output is non-causal attention; mask the scores of "
                       "keys after the query (cols[None, :] <= offs_m[:, None])":
                           _masked_attention(q, k, v, n >= 0),
                       "the mask is reversed: queries see the future (n >= m) instead of the past (n <= m)":
                           _masked_attention(q, k, v, n >= m),
                       "the diagonal is masked out: query m must see key m itself (n <= m, not n < m)":
                           _masked_attention(q, k, v, n < m),
                   }, nan_rows_hint=CAUSAL_NAN_HINT)
    q, k, v = (randn(1, 1, 1, 16) for _ in range(3))  # N = 1: one query, one key
    assert_close(causal_attention(q, k, v), v.double(), name="causal_attention N=1 (out=None)")


# --------------------------------------------------------------------------- 7.2 decode with GQA

def _decode_cases():
    """(B, HQ, HKV, MAX_CTX, D): GQA groups of 2, plain multi-head (HQ = HKV), multi-query (HKV = 1)."""
    if common.INTERPRETER:
        return [(3, 4, 2, 70, 16), (2, 3, 3, 45, 32), (2, 4, 1, 33, 16)]
    return [(4, 8, 2, 300, 64), (2, 4, 4, 129, 64), (3, 6, 1, 77, 64)]


def _decode_expected(q, k_cache, v_cache, lengths, kv_head):
    """float64 reference; kv_head[hq] is the cache head query head hq reads."""
    B, HQ, D = q.shape
    k = k_cache.double()[:, kv_head]  # (B, HQ, MAX_CTX, D)
    v = v_cache.double()[:, kv_head]
    s = torch.einsum("bhd,bhnd->bhn", q.double(), k) * D ** -0.5
    positions = torch.arange(k.shape[2], device=q.device)
    s = s.masked_fill(positions[None, None, :] >= lengths.to(q.device)[:, None, None], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(s, dim=-1), v)


def _first_rows_only(expected, n_rows):
    """expected with every (b, hq) row from flat row n_rows on left as the NaN poison."""
    flat = expected.clone().flatten(0, -2)
    flat[n_rows:] = float("nan")
    return flat.view(expected.shape)


def check_decode_gqa(decode_gqa):
    for dtype in DTYPES:
        for B, HQ, HKV, max_ctx, D in _decode_cases():
            q = randn(B, HQ, D, dtype=dtype)
            k_cache, v_cache = randn(B, HKV, max_ctx, D, dtype=dtype), randn(B, HKV, max_ctx, D, dtype=dtype)
            lengths = torch.randint(1, max_ctx + 1, (B,))
            lengths[0], lengths[-1] = max_ctx, 1  # a full cache and a single token
            seq_lens = lengths.to(device=common.DEVICE, dtype=torch.int32)
            out = poisoned_empty(B, HQ, D, dtype=dtype)
            _same_output(decode_gqa(q, k_cache, v_cache, seq_lens, out=out), out, "decode_gqa")
            heads = torch.arange(HQ, device=q.device)
            assert_close(out, _decode_expected(q, k_cache, v_cache, lengths, heads // (HQ // HKV)),
                         name=f"decode_gqa B={B} HQ={HQ} HKV={HKV} MAX_CTX={max_ctx} D={D} {dtype}", mistakes={
                             "the output attends to the whole cache: sequence b must read only its first "
                             "seq_lens[b] positions (load seq_lens_ptr + b, mask and stop the loop there)":
                                 _decode_expected(q, k_cache, v_cache, torch.full_like(lengths, max_ctx),
                                                  heads // (HQ // HKV)),
                             "wrong kv head: query head hq reads kv head hq // (HQ // HKV) (consecutive query "
                             "heads share one), not hq % HKV": _decode_expected(q, k_cache, v_cache, lengths,
                                                                                heads % HKV),
                             "only the first B * HKV (batch, head) rows were written: launch one program per "
                             "query head, B * HQ programs": _first_rows_only(
                                 _decode_expected(q, k_cache, v_cache, lengths, heads // (HQ // HKV)), B * HKV),
                         })
    B, HQ, HKV, max_ctx, D = 2, 3, 2, 20, 16
    q = randn(B, HQ, D)
    # caches at the start of larger buffers, so a wrapper that launches anyway (and reads kv
    # heads past HKV) stays inside memory it owns
    k_big, v_big = randn(B + 2, HKV, max_ctx, D), randn(B + 2, HKV, max_ctx, D)
    k_cache, v_cache = k_big[:B], v_big[:B]
    try:
        decode_gqa(q, k_cache, v_cache, torch.full((B,), max_ctx, dtype=torch.int32, device=common.DEVICE))
    except ValueError:
        pass
    else:
        _fail(f"decode_gqa with HQ={HQ} query heads and HKV={HKV} kv heads returned instead of raising "
              f"ValueError.\n  hint: the wrapper must check that HQ is a multiple of HKV (HQ % HKV == 0)")
    q = randn(2, 4, 32)
    k_cache, v_cache = randn(2, 2, 9, 32), randn(2, 2, 9, 32)
    seq_lens = torch.tensor([9, 4], dtype=torch.int32, device=common.DEVICE)
    assert_close(decode_gqa(q, k_cache, v_cache, seq_lens),
                 _decode_expected(q, k_cache, v_cache, seq_lens.cpu(), torch.arange(4, device=q.device) // 2),
                 name="decode_gqa (out=None)")


# --------------------------------------------------------------------------- 7.4 paged decode

def _paged_cases():
    """(B, HQ, HKV, D, lengths, page size): pages smaller and larger than a block, GQA, MHA, MQA. The
    longest length fills its last page, so every slot of the pool holds a value (see paged_problem)."""
    if common.INTERPRETER:
        return [(3, 4, 2, 16, [37, 1, 64], 16), (2, 3, 3, 32, [9, 32], 8), (2, 4, 1, 16, [50, 64], 32)]
    return [(3, 8, 2, 64, [300, 1, 320], 16), (2, 4, 4, 64, [77, 256], 128), (2, 6, 1, 128, [64, 128], 64)]


def _paged_expected(q, k_pages, v_pages, table, lengths, kv_head):
    """float64 reference: sequence b's cache gathered from its pages, kv_head[hq] read by query head hq;
    lengths None reads every position the table names (past seq_lens too)."""
    B, HQ, D = q.shape
    _, page, HKV, _ = k_pages.shape
    gather = lambda pool: pool.double()[table.long()].reshape(B, -1, HKV, D).transpose(1, 2)  # noqa: E731
    k, v = gather(k_pages)[:, kv_head], gather(v_pages)[:, kv_head]  # (B, HQ, MAX_PAGES * page, D)
    past = None
    if lengths is not None:  # past each length: -inf scores, and 0 for the NaN values (0 * NaN is NaN)
        past = torch.arange(k.shape[2], device=q.device)[None, None, :] >= lengths.to(q.device)[:, None, None]
        k, v = k.masked_fill(past[..., None], 0.0), v.masked_fill(past[..., None], 0.0)
    s = torch.einsum("bhd,bhnd->bhn", q.double(), k) * D ** -0.5
    if past is not None:
        s = s.masked_fill(past, float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(s, dim=-1), v)


def paged_problem(B, HQ, HKV, D, lengths, page, dtype):
    """q and pools holding sequences of the given lengths, pages shuffled; past each length, large
    finite garbage (not NaN: a kernel that reads it gets a wrong answer the checks can name, where
    NaN would look the same for every mistake)."""
    ctx = max(lengths)
    assert ctx % page == 0, "the longest sequence fills its last page: no NaN padding in the pool"
    q = randn(B, HQ, D, dtype=dtype)
    k_cache, v_cache = randn(B, HKV, ctx, D, dtype=dtype), randn(B, HKV, ctx, D, dtype=dtype)
    for b, n in enumerate(lengths):
        k_cache[b, :, n:] = randn(HKV, ctx - n, D, dtype=dtype, scale=4.0) + 3.0
        v_cache[b, :, n:] = randn(HKV, ctx - n, D, dtype=dtype, scale=4.0) + 3.0
    k_pages, v_pages, table = lesson_module("07").to_pages(k_cache, v_cache, page,
                                                          torch.Generator().manual_seed(current_seed()))
    return q, k_pages, v_pages, table, torch.tensor(lengths, dtype=torch.int32, device=q.device)


def check_paged_decode(paged_decode):
    for dtype in DTYPES:
        for B, HQ, HKV, D, lengths, page in _paged_cases():
            q, k_pages, v_pages, table, seq_lens = paged_problem(B, HQ, HKV, D, lengths, page, dtype)
            out = poisoned_empty(B, HQ, D, dtype=dtype)
            _same_output(paged_decode(q, k_pages, v_pages, table, seq_lens, out=out), out, "paged_decode")
            heads = torch.arange(HQ, device=q.device)
            lens = seq_lens.cpu()
            in_order = torch.arange(table.numel(), dtype=torch.int32, device=q.device).view(table.shape)
            head_major = lambda pool: pool.reshape(pool.shape[0], HKV, page, D).transpose(1, 2)  # noqa: E731
            _close(out, _paged_expected(q, k_pages, v_pages, table, lens, heads // (HQ // HKV)),
                   f"paged_decode B={B} HQ={HQ} HKV={HKV} D={D} lengths={lengths} page={page} {dtype}", mistakes={
                       "the block table is ignored: position n of sequence b is in page block_table[b, n // "
                       "PAGE_SIZE], not page b * MAX_PAGES + n // PAGE_SIZE (the pages are not in order)":
                           _paged_expected(q, k_pages, v_pages, in_order, lens, heads // (HQ // HKV)),
                       "wrong kv head: query head hq reads kv head hq // (HQ // HKV), not hq % HKV":
                           _paged_expected(q, k_pages, v_pages, table, lens, heads % HKV),
                       "positions past seq_lens[b] were read: mask the loads with cols < seq_len and stop "
                       "the loop at the sequence's length": _paged_expected(q, k_pages, v_pages, table, None,
                                                                heads // (HQ // HKV)),
                       "wrong layout inside a page: a page is (PAGE_SIZE, HKV, D), so row (slot, g) is at "
                       "(page * PAGE_SIZE + slot) * HKV + g, not (page * HKV + g) * PAGE_SIZE + slot":
                           _paged_expected(q, head_major(k_pages), head_major(v_pages), table, lens,
                                           heads // (HQ // HKV)),
                   }, nan_rows_hint="those rows are 0 / 0: did the loop over the sequence's positions run at "
                                    "all (range(0, seq_len, BLOCK_N)) and add to l_i?")


# --------------------------------------------------------------------------- 7.3 sliding window

WINDOW_NAN_HINT = ("a row that sees no key in a block (its window starts later) keeps m = -inf, and "
                   "exp2(s - m_new) = exp2(-inf - (-inf)) is NaN; subtract 0 where the running max is still "
                   "-inf (tl.where(m_new == float('-inf'), 0.0, m_new))")


def _windows(n):
    return [1, 7, 20, n + 5]  # itself only, short, longer than a block, the whole causal past


def check_sliding_window_attention(sliding_window_attention):
    for dtype in DTYPES:
        for B, H, N, D in _shapes():
            q, k, v = (randn(B, H, N, D, dtype=dtype) for _ in range(3))
            m, n = _positions(N)
            for window in _windows(N):
                out = poisoned_empty(B, H, N, D, dtype=dtype)
                _same_output(sliding_window_attention(q, k, v, window, out=out), out, "sliding_window_attention")
                _close(out, _masked_attention(q, k, v, (n <= m) & (n > m - window)),
                       f"sliding_window_attention (B,H,N,D)=({B},{H},{N},{D}) window={window} {dtype}", mistakes={
                           "the window is ignored: this is plain causal attention; also mask keys with "
                           "n <= m - WINDOW": _masked_attention(q, k, v, n <= m),
                           "off by one: the window holds WINDOW keys, m - WINDOW < n <= m (this is WINDOW + 1)":
                               _masked_attention(q, k, v, (n <= m) & (n >= m - window)),
                           "off by one: the window holds WINDOW keys, m - WINDOW < n <= m (this is WINDOW - 1)":
                               _masked_attention(q, k, v, (n <= m) & (n > m - window + 1)),
                       }, nan_rows_hint=WINDOW_NAN_HINT)
    q, k, v = (randn(1, 1, 5, 16) for _ in range(3))
    m, n = _positions(5)
    assert_close(sliding_window_attention(q, k, v, 2), _masked_attention(q, k, v, (n <= m) & (n > m - 2)),
                 name="sliding_window_attention window=2 (out=None)")


# --------------------------------------------------------------------------- 7.5 varlen attention

def _varlen_cases():
    """(lengths, HQ, HKV, D): a token alone, an empty sequence, GQA, MHA, MQA. The longest sequence
    comes last, so that a kernel reading max_seqlen keys from any sequence's start stays inside k and v
    (the mistake is then a wrong answer the check names, not a read out of bounds)."""
    if common.INTERPRETER:
        return [([17, 1, 0, 33, 70], 4, 2, 16), ([9, 40], 3, 3, 32), ([1, 5, 64], 4, 1, 16)]
    return [([17, 1, 0, 129, 300], 8, 2, 64), ([77, 256], 4, 4, 64), ([1, 64, 200], 6, 1, 128)]


def _varlen_expected(q, k, v, lengths, kv_head, keys_to=None):
    """float64: each sequence of the packed batch on its own, query head h reading K/V head
    kv_head[h]; keys_to: attend to keys [start, start + keys_to) (clipped) instead of the sequence's own."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    k, v = k.double()[:, kv_head], v.double()[:, kv_head]  # (TOTAL, HQ, D)
    start = 0
    for n in lengths:
        stop = start + n if keys_to is None else min(start + keys_to, q.shape[0])
        if n:
            visible = torch.ones(n, stop - start, dtype=torch.bool, device=q.device)
            out[start:start + n] = _masked_attention(*(t.transpose(0, 1) for t in (q[start:start + n],
                                                     k[start:stop], v[start:stop])), visible).transpose(0, 1)
        start += n
    return out


def check_varlen_attention(varlen_attention):
    for dtype in DTYPES:
        for lengths, HQ, HKV, D in _varlen_cases():
            total = sum(lengths)
            q = randn(total, HQ, D, dtype=dtype)
            k, v = randn(total, HKV, D, dtype=dtype), randn(total, HKV, D, dtype=dtype)
            cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=common.DEVICE)
            out = poisoned_empty(total, HQ, D, dtype=dtype)
            _same_output(varlen_attention(q, k, v, cu_seqlens, max(lengths), out=out), out, "varlen_attention")
            heads = torch.arange(HQ, device=q.device)
            _close(out, _varlen_expected(q, k, v, lengths, heads // (HQ // HKV)),
                   f"varlen_attention lengths={lengths} HQ={HQ} HKV={HKV} D={D} {dtype}", mistakes={
                       "keys past the sequence's end were attended (the next sequence's tokens): the length is "
                       "cu_seqlens[b + 1] - cu_seqlens[b]; mask and stop the key loop there, not at MAX_SEQLEN":
                           _varlen_expected(q, k, v, lengths, heads // (HQ // HKV), keys_to=max(lengths)),
                       "wrong K/V head: query head h reads K/V head h // (HQ // HKV), not h % HKV":
                           _varlen_expected(q, k, v, lengths, heads % HKV),
                   }, nan_rows_hint="those rows saw no key (l = 0): does the key loop run over the sequence's "
                                    "length, range(0, seq_len, BLOCK_N)?")
    q, k = randn(6, 2, 16), randn(6, 1, 16)
    cu_seqlens = torch.tensor([0, 2, 6], dtype=torch.int32, device=common.DEVICE)
    one_head = torch.zeros(2, dtype=torch.long, device=q.device)  # both query heads read K/V head 0
    assert_close(varlen_attention(q, k, k, cu_seqlens, 4), _varlen_expected(q, k, k, [2, 4], one_head),
                 name="varlen_attention lengths [2, 4] (out=None)")


EXERCISES = [
    Exercise("7.1", "causal_attention", check_causal_attention, kernels=("causal_attention_kernel",)),
    Exercise("7.2", "decode_gqa", check_decode_gqa, kernels=("decode_gqa_kernel",)),
    Exercise("7.3", "sliding_window_attention", check_sliding_window_attention,
             kernels=("sliding_window_attention_kernel",)),
    Exercise("7.4", "paged_decode", check_paged_decode, kernels=("paged_decode_kernel",)),
    Exercise("7.5", "varlen_attention", check_varlen_attention, kernels=("varlen_attention_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

@triton.jit
def _attention_variants_kernel(q_ptr, k_ptr, v_ptr, out_ptr, sm_scale, N_CTX, WINDOW, HEAD_DIM: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                               VARIANT: tl.constexpr):
    # One kernel, one mistake per VARIANT:
    #   0 no causal mask; 1 reversed mask (n >= m); 2 strict mask (n < m); 3 loop stops before the
    #   diagonal block; 4 sliding window ignored; 5 window off by one (m - WINDOW <= n);
    #   6 sliding window without the -inf guard (NaN rows). All but 6 guard the -inf running max,
    #   so that each shows its own mistake and not a NaN.
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
    lo = 0
    hi = N_CTX
    if VARIANT == 3:
        hi = start_m
    if VARIANT == 6:
        lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv = base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv, mask=cols[:, None] < N_CTX, other=0.0)
        v = tl.load(v_ptr + kv, mask=cols[:, None] < N_CTX, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = cols[None, :] < N_CTX
        if VARIANT == 1:
            visible = visible & (cols[None, :] >= offs_m[:, None])
        if VARIANT == 2:
            visible = visible & (cols[None, :] < offs_m[:, None])
        if VARIANT == 3 or VARIANT == 4:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        if VARIANT == 5:
            visible = visible & (cols[None, :] <= offs_m[:, None]) & (cols[None, :] >= offs_m[:, None] - WINDOW)
        if VARIANT == 6:
            visible = visible & (cols[None, :] <= offs_m[:, None]) & (cols[None, :] > offs_m[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
        if VARIANT != 6:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    tl.store(out_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < N_CTX)


def _attention_wrong(variant: int) -> object:
    """A copy of the solutions with one masking mistake in the kernel of causal_attention
    (variants 0-3) or sliding_window_attention (4-6); the solution's wrapper launches it."""
    if variant <= 3:  # causal_attention's launch passes no WINDOW
        return solution_with(STEM, causal_attention_kernel=with_flags(_attention_variants_kernel, WINDOW=0,
                                                                        VARIANT=variant)).causal_attention
    return solution_with(STEM, sliding_window_attention_kernel=with_flags(_attention_variants_kernel,
                                                                          VARIANT=variant)).sliding_window_attention


@triton.jit
def _decode_variants_kernel(q_ptr, k_ptr, v_ptr, seq_lens_ptr, out_ptr, sm_scale, HQ, HKV, MAX_CTX,
                            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, VARIANT: tl.constexpr):
    # 0 ignores seq_lens (reads the whole cache); 1 maps query head hq to kv head hq % HKV
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    if VARIANT == 1:
        g = hq % HKV
    else:
        g = hq // (HQ // HKV)
    if VARIANT == 0:
        seq_len = MAX_CTX
    else:
        seq_len = tl.load(seq_lens_ptr + b)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d).to(tl.float32) * (sm_scale * LOG2E)
    kv_base = (b.to(tl.int64) * HKV + g) * MAX_CTX * HEAD_DIM
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        in_n = cols < seq_len
        offsets = kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        s = tl.where(in_n, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    tl.store(out_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty))


@triton.jit
def _paged_variants_kernel(q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, out_ptr, sm_scale, HQ, HKV,
                           MAX_PAGES, PAGE_SIZE, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                           VARIANT: tl.constexpr):
    # 0 reads the pages in order (no block table); 1 kv head hq % HKV; 2 reads the table's whole
    # capacity (no seq_lens); 3 takes a page as (HKV, PAGE_SIZE, D)
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    if VARIANT == 1:
        g = hq % HKV
    else:
        g = hq // (HQ // HKV)
    if VARIANT == 2:
        seq_len = MAX_PAGES * PAGE_SIZE
    else:
        seq_len = tl.load(seq_lens_ptr + b)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d).to(tl.float32) * (sm_scale * LOG2E)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        in_n = cols < seq_len
        if VARIANT == 0:
            page = (b * MAX_PAGES + cols // PAGE_SIZE).to(tl.int64)
        else:
            page = tl.load(block_table_ptr + b * MAX_PAGES + cols // PAGE_SIZE, mask=in_n, other=0).to(tl.int64)
        if VARIANT == 3:
            rows = (page * HKV + g) * PAGE_SIZE + cols % PAGE_SIZE
        else:
            rows = (page * PAGE_SIZE + cols % PAGE_SIZE) * HKV + g
        offsets = rows[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=in_n[:, None], other=0.0).to(tl.float32)
        s = tl.where(in_n, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    tl.store(out_ptr + pid.to(tl.int64) * HEAD_DIM + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty))


@triton.jit
def _varlen_variants_kernel(q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, sm_scale, HQ, HKV, MAX_SEQLEN,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, VARIANT: tl.constexpr):
    # 0 masks the keys by MAX_SEQLEN (attends into the next sequences); 1 K/V head h % HKV;
    # 2 forgets the sequence's first token (every sequence read and written from token 0)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    if VARIANT == 1:
        g = h % HKV
    else:
        g = h // (HQ // HKV)
    seq_start = tl.load(cu_seqlens_ptr + b)
    seq_len = tl.load(cu_seqlens_ptr + b + 1) - seq_start
    n_keys = seq_len
    if VARIANT == 0:
        n_keys = MAX_SEQLEN
    if VARIANT == 2:
        seq_start = seq_start * 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (seq_start + offs_m).to(tl.int64) * HQ + h
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < seq_len, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_keys, BLOCK_N):
        cols = start_n + offs_n
        kv = ((seq_start + cols).to(tl.int64) * HKV + g)[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv, mask=cols[:, None] < n_keys, other=0.0)
        v = tl.load(v_ptr + kv, mask=cols[:, None] < n_keys, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (sm_scale * LOG2E)
        s = tl.where(cols[None, :] < n_keys, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < seq_len)


def _varlen_wrong(variant: int) -> object:
    """varlen_attention of a copy of the solutions whose kernel has one mistake (VARIANT)."""
    return solution_with(STEM, varlen_attention_kernel=with_flags(_varlen_variants_kernel,
                                                                  VARIANT=variant)).varlen_attention


def _paged_wrong(variant: int) -> object:
    """paged_decode of a copy of the solutions whose kernel has one mistake (VARIANT)."""
    return solution_with(STEM, paged_decode_kernel=with_flags(_paged_variants_kernel, VARIANT=variant)).paged_decode


def _decode_wrong(variant: int) -> object:
    """decode_gqa of a copy of the solutions whose kernel has one mistake (VARIANT)."""
    return solution_with(STEM, decode_gqa_kernel=with_flags(_decode_variants_kernel, VARIANT=variant)).decode_gqa


class _KvHeadPrograms:
    """Stands in for decode_gqa_kernel: launches B * HKV programs (one per kv head) instead of B * HQ."""
    def __getitem__(self, grid):
        kernel = load_impl(STEM, "solutions").decode_gqa_kernel
        return lambda q, k_cache, *rest, **kwargs: kernel[(q.shape[0] * k_cache.shape[1],)](q, k_cache, *rest,
                                                                                           **kwargs)


def _decode_without_head_check(q, k_cache, v_cache, seq_lens, sm_scale=None, out=None):
    """A wrapper mistake: no HQ % HKV check, so HQ = 6 over HKV = 4 runs and maps heads wrongly."""
    B, HQ, D = q.shape
    out = torch.empty_like(q) if out is None else out
    solution = load_impl(STEM, "solutions")
    solution.decode_gqa_kernel[(B * HQ,)](
        q, k_cache, v_cache, seq_lens, out, D ** -0.5 if sm_scale is None else sm_scale, HQ, k_cache.shape[1],
        k_cache.shape[2], HEAD_DIM=D, BLOCK_N=solution.DECODE_BLOCK_N)
    return out


KNOWN_WRONG = [
    ("causal_attention", "no causal mask", lambda: _attention_wrong(0), "causal mask is missing"),
    ("causal_attention", "mask reversed", lambda: _attention_wrong(1), "reversed"),
    ("causal_attention", "diagonal masked (n < m)", lambda: _attention_wrong(2), "diagonal is masked"),
    ("causal_attention", "loop stops before the diagonal", lambda: _attention_wrong(3), "before the diagonal"),
    ("decode_gqa", "ignores seq_lens", lambda: _decode_wrong(0), "seq_lens"),
    ("decode_gqa", "kv head hq % HKV", lambda: _decode_wrong(1), "wrong kv head"),
    ("decode_gqa", "grid of B * HKV programs", lambda: solution_with(STEM, decode_gqa_kernel=_KvHeadPrograms()).decode_gqa, "B * HQ programs"),
    ("decode_gqa", "no HQ % HKV check", lambda: _decode_without_head_check, "multiple of HKV"),
    ("paged_decode", "pages in order, no block table", lambda: _paged_wrong(0), "block table is ignored"),
    ("paged_decode", "kv head hq % HKV", lambda: _paged_wrong(1), "wrong kv head"),
    ("paged_decode", "reads past seq_lens", lambda: _paged_wrong(2), "past seq_lens"),
    ("paged_decode", "page taken as (HKV, PAGE_SIZE, D)", lambda: _paged_wrong(3), "layout inside a page"),
    ("sliding_window_attention", "window ignored", lambda: _attention_wrong(4), "window is ignored"),
    ("sliding_window_attention", "window off by one", lambda: _attention_wrong(5), "off by one"),
    ("sliding_window_attention", "no -inf guard", lambda: _attention_wrong(6), "exp2(-inf - (-inf))"),
    ("varlen_attention", "keys masked by max_seqlen", lambda: _varlen_wrong(0), "not at MAX_SEQLEN"),
    ("varlen_attention", "K/V head h % HKV", lambda: _varlen_wrong(1), "wrong K/V head"),
    ("varlen_attention", "sequence start ignored", lambda: _varlen_wrong(2), "never written"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("07")


def _lesson_shapes():
    if common.INTERPRETER:
        return [(1, 2, 67, 16), (1, 1, 1, 32)]
    # D = 64 here; the lesson script checks D = 128 in bf16, and so does test_lesson_autotuned_bf16
    return [(2, 3, 193, 64), (1, 2, 300, 64), (1, 1, 1, 64)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_forward(lesson, dtype, causal):
    for B, H, N, D in _lesson_shapes():
        q, k, v = lesson.random_qkv(B, H, N, D, dtype, layout="bnhd")  # strided views
        expected = lesson.attention_reference(q.double(), k.double(), v.double(), causal)
        name = f"(B,H,N,D)=({B},{H},{N},{D}) {dtype} causal={causal}"
        if not causal:
            out = poisoned_empty(B, H, N, D, dtype=dtype)
            lesson.attention_v2(q, k, v, out=out)
            assert_close(out, expected, name=f"v2 {name}")
        out = poisoned_empty(B, H, N, D, dtype=dtype)
        _, lse = lesson.attention_v3(q, k, v, causal, out=out, autotune=False)
        assert_close(out, expected, name=f"v3 {name}")
        m, n = _positions(N)
        s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * D ** -0.5
        s = s.masked_fill(~(n <= m) if causal else torch.zeros_like(s, dtype=torch.bool), float("-inf"))
        assert_close(lse, torch.logsumexp(s, -1), name=f"logsumexp {name}", atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_backward(lesson, dtype, causal):
    B, H, N, D = _lesson_shapes()[0]
    q, k, v = lesson.random_qkv(B, H, N, D, dtype, requires_grad=True)
    do = randn(B, H, N, D, dtype=dtype)
    out = lesson.flash_attention(q, k, v, causal, autotune=False)
    out.backward(do)
    ref_out, dq, dk, dv = lesson.reference_grads(q, k, v, do, causal)
    assert_close(out, ref_out, name="forward")
    for got, ref, what in ((q.grad, dq, "dq"), (k.grad, dk, "dk"), (v.grad, dv, "dv")):
        assert_close(got, ref, name=f"{what} {dtype} causal={causal}", **lesson.grad_tolerance(dtype))


def test_lesson_backward_of_sum(lesson):
    """loss = out.sum(): dO is a stride-0 expanded tensor, which the backward must handle."""
    q, k, v = lesson.random_qkv(1, 2, 33, 16, torch.float32, requires_grad=True, layout="bnhd")
    lesson.flash_attention(q, k, v, causal=True, sm_scale=0.3, autotune=False).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    lesson.attention_reference(q64, k64, v64, causal=True, sm_scale=0.3).sum().backward()
    for got, ref, what in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert_close(got, ref, name=what, **lesson.grad_tolerance(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_decode(lesson, dtype):
    B, H, D, ctx = (2, 3, 16, 77) if common.INTERPRETER else (3, 5, 64, 1000)
    q = randn(B, H, D, dtype=dtype)
    k_cache, v_cache = randn(B, H, ctx + 9, D, dtype=dtype), randn(B, H, ctx + 9, D, dtype=dtype)
    expected = lesson.decode_reference(q.double(), k_cache[:, :, :ctx].double(), v_cache[:, :, :ctx].double())
    for split in (None, 1, 37, ctx, 4 * ctx):
        if split == 1 and common.INTERPRETER:
            continue  # 77 splits of one key: correct, but slow in the interpreter
        out = poisoned_empty(B, H, D, dtype=dtype)
        lesson.decode_attention(q, k_cache, v_cache, ctx, split_size=split, out=out)
        assert_close(out, expected, name=f"decode split={split} {dtype}")
    # a prefix view of the cache (strided) gives the same result as passing ctx
    assert_close(lesson.decode_attention(q, k_cache[:, :, :ctx], v_cache[:, :, :ctx]), expected,
                 name="decode on a cache view")


def test_lesson_bad_input(lesson):
    q = randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="head dimension"):
        lesson.attention_v3(randn(1, 2, 8, 24), randn(1, 2, 8, 24), randn(1, 2, 8, 24))
    with pytest.raises(ValueError, match="contiguous last"):
        t = randn(1, 2, 16, 8).transpose(-2, -1)
        lesson.attention_v3(t, t, t)
    with pytest.raises(ValueError, match="shape"):
        lesson.attention_v3(q, randn(1, 2, 9, 16), randn(1, 2, 9, 16))
    with pytest.raises(TypeError, match="dtype"):
        lesson.flash_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="dtype"):
        lesson.attention_v2(q.to(torch.int32), q.to(torch.int32), q.to(torch.int32))
    with pytest.raises(ValueError, match="4 dimension"):
        lesson.attention_v3(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="non-causal"):
        lesson.attention_v2(q, q, q, causal=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lesson.attention_v3(q, [1.0], q)
    qd, cache = randn(1, 2, 16), randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="ctx"):
        lesson.decode_attention(qd, cache, cache, ctx=11)
    with pytest.raises(ValueError, match="split_size"):
        lesson.decode_attention(qd, cache, cache, split_size=0)
    with pytest.raises(ValueError, match="k_cache"):
        lesson.decode_attention(qd, randn(1, 3, 10, 16), randn(1, 3, 10, 16))


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.flash_attention(torch.randn(1, 1, 8, 16), *(torch.randn(1, 1, 8, 16, device="cuda"),) * 2)


@pytest.mark.skipif(not common.supports_bf16(), reason="needs a CUDA GPU: autotuning times configs on the GPU "
                    "(and the interpreter has no bfloat16)")
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lesson_autotuned_bf16(lesson, causal, dq_mode):
    """The autotuned forward and backward (the benchmark's path) on a shape every config divides unevenly;
    with dq_mode="atomic" the tuner must zero dQ before each config it times (reset_to_zero)."""
    B, H, N, D = 2, 4, 700, 128
    q, k, v = lesson.random_qkv(B, H, N, D, torch.bfloat16, requires_grad=True)
    do = randn(B, H, N, D, dtype=torch.bfloat16)
    out = lesson.flash_attention(q, k, v, causal, autotune=True, dq_mode=dq_mode)
    out.backward(do)
    ref_out, dq, dk, dv = lesson.reference_grads(q, k, v, do, causal)
    assert_close(out, ref_out, name="autotuned forward")
    for got, ref, what in ((q.grad, dq, "dq"), (k.grad, dk, "dk"), (v.grad, dv, "dv")):
        assert_close(got, ref, name=f"autotuned {what}", **lesson.grad_tolerance(torch.bfloat16))


def test_attention_tuners_prune_by_shared_memory(lesson, monkeypatch):
    """On a card of 64 KiB (a T4), a config of 288 KiB is pruned and the small tiles stand in;
    one that fits is kept as it is."""
    from common import capability
    monkeypatch.setattr(capability, "current_arch", lambda: 75)
    monkeypatch.setattr(capability, "shared_memory_limit", lambda arch=None: 65536)
    q = torch.empty(1, 1, 16, 128, dtype=torch.float16)
    too_big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)
    fits = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    for tuned, kernel in ((lesson.attention_fwd_v3_tuned, "fwd"), (lesson.attention_bwd_dkdv_tuned, "dkdv"),
                          (lesson.attention_bwd_dq_tuned, "dq"), (lesson.attention_fwd_varlen_tuned, "fwd"),
                          (lesson.attention_bwd_dkdvdq_tuned, "dkdv")):
        assert tuned.early_config_prune([too_big], {"q_ptr": q}, HEAD_DIM=128) == [lesson._SMALL_CONFIGS[kernel]]
        assert tuned.early_config_prune([too_big, fits], {"q_ptr": q}, HEAD_DIM=64) == [fits], kernel
    # the varlen launch's extra keyword arguments reach the estimate too, which ignores them
    cu = torch.zeros(3, dtype=torch.int32)
    assert lesson.attention_fwd_varlen_tuned.early_config_prune([too_big, fits], {"q_ptr": q}, HEAD_DIM=64,
                                                                cu_seqlens_ptr=cu, VARLEN=True) == [fits]


def test_fixed_tiles_fit_the_card(lesson, monkeypatch):
    """fp32 at D = 128 without autotuning: on a 99 KiB card (RTX 3090 / 4090) the halved tiles of
    104-112 KiB are halved again until they fit; on an H100 (227 KiB) they stay as they are."""
    from common import capability
    monkeypatch.setattr(common, "INTERPRETER", False)  # _fixed's GPU branch: the halved fp32 tiles
    for arch, limit in ((86, 101376), (90, 232448)):
        monkeypatch.setattr(capability, "current_arch", lambda arch=arch: arch)
        monkeypatch.setattr(capability, "shared_memory_limit", lambda arch_=None, limit=limit: limit)
        for name, configs in (("fwd", lesson.fwd_configs), ("dkdv", lesson.dkdv_configs), ("dq", lesson.dq_configs)):
            gpu_first = configs()[0].kwargs
            blocks, options = lesson._fixed(configs(), torch.float32, name, 128)
            need = capability.attention_shared_memory({**blocks, **options}, 4, arch=arch, HEAD_DIM=128, kernel=name,
                                                      tensor_cores=False)
            assert need <= limit, (arch, name, blocks, need)
            if arch == 90:
                assert blocks == {key: max(16, value // 2) for key, value in gpu_first.items()}, (name, blocks)


def test_lesson_grouped_query_attention(lesson):
    """v3 forward and the backward with K/V shared by groups of query heads, against float64."""
    lesson.check_gqa([torch.float32] + ([torch.bfloat16] if common.supports_bf16() else []))
    q, kv = randn(1, 6, 16, 16), randn(1, 4, 16, 16)  # 6 query heads over 4 K/V heads: no whole groups
    with pytest.raises(ValueError, match="HKV dividing 6"):
        lesson.flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match=r"\(1, 6, 16, 16\)"):
        lesson.attention_v2(q, randn(1, 3, 16, 16), randn(1, 3, 16, 16))  # v2 is multi-head only


# --------------------------------------------------------------------------- the backward's atomic dQ

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_atomic_dq(lesson, dtype):
    """dq_mode="atomic" against float64 at awkward N, D 64 and 32, causal and not, a GQA group of 2,
    the wrapper's torch.empty buffers poisoned, two runs agreeing to tolerance."""
    lesson.check_atomic_dq([dtype])


def test_lesson_dq_modes_agree(lesson):
    """The two dQ strategies give the same gradients (to fp32 rounding: the atomic sum has no fixed order)."""
    q, k, v = lesson.random_qkv(1, 2, 45, 32, torch.float32, layout="bnhd")
    do = randn(1, 2, 45, 32)
    for causal in (False, True):
        _, separate = common.grads_of(lambda *t: lesson.flash_attention(*t, causal, autotune=False), (q, k, v), do)
        _, atomic = common.grads_of(lambda *t: lesson.flash_attention(*t, causal, autotune=False, dq_mode="atomic"),
                                    (q, k, v), do)
        for a, b, what in zip(atomic, separate, ("dq", "dk", "dv")):
            assert_close(a, b, name=f"{what} atomic vs separate causal={causal}", atol=1e-5, rtol=1e-5)


_COPIES = itertools.count()


def _lesson_with(lesson, **replace):
    """A private copy of the lesson's script with some of its globals replaced (the lesson itself is untouched)."""
    module = load_module(Path(lesson.__file__), name=f"known_wrong_07_lesson_{next(_COPIES)}")
    for name, value in replace.items():
        setattr(module, name, value)
    return module


@triton.jit
def _store_dq(dq_ptrs, dq, mask):  # known wrong: each key block's program overwrites dQ instead of adding to it
    tl.store(dq_ptrs, dq, mask=mask)


class _TorchWithoutZeros:
    """torch, except that torch.zeros is torch.empty: a wrapper that forgets to zero the dQ buffer."""
    zeros = staticmethod(torch.empty)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("replace,hint", [(dict(_add_dq=_store_dq), "tl.atomic_add"),
                                          (dict(torch=_TorchWithoutZeros()), "must start at zero")],
                         ids=["plain store of dQ", "dQ buffer not zeroed"])
def test_lesson_atomic_dq_check_rejects_known_wrong(lesson, replace, hint):
    wrong = _lesson_with(lesson, **replace)
    flash = lambda *args: wrong.flash_attention(*args, autotune=False, dq_mode="atomic")  # noqa: E731
    with pytest.raises(CheckError, match=hint):
        lesson.check_atomic_dq([torch.float32], flash=flash)


def test_lesson_dq_mode_bad_input(lesson):
    q = randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="dq_mode must be one of"):
        lesson.flash_attention(q, q, q, dq_mode="atomics")
    with pytest.raises(ValueError, match="dq_mode must be one of"):
        lesson.attention_backward(q, q, q, q, q, randn(1, 1, 8), dq_mode=None)


def test_backward_matmul_count(lesson):
    """The md's count: 5 matmuls (2.5x the forward's 2) for the atomic backward, 7 (3.5x) for the separate dQ
    pass; the benchmark rates every provider on the minimum, 2.5x."""
    B, H, N, D = lesson.BAR_CASE
    for causal in (False, True):
        forward = lesson.attention_flops(B, H, N, D, causal)
        assert lesson.backward_flops(B, H, N, D, causal) == 2.5 * forward
        assert lesson.backward_flops(B, H, N, D, causal, "atomic") == 2.5 * forward
        assert lesson.backward_flops(B, H, N, D, causal, "separate") == 3.5 * forward
    assert lesson.backward_flops(1, 1, 16, 16, False, "separate") == 7 * 2 * 16 * 16 * 16
    backward = next(b for b in lesson.BENCHMARKS if b.title.startswith("backward alone"))
    assert set(backward.kernels) == {lesson.BACKWARD, lesson.BACKWARD_ATOMIC}
    assert {(bar.kernel, bar.case) for bar in backward.bars} == {
        (kernel, (*lesson.BAR_CASE, causal)) for kernel in (lesson.BACKWARD, lesson.BACKWARD_ATOMIC)
        for causal in (False, True)}
    assert all(bar.at_least == 0.9 and bar.vs == "baseline" for bar in backward.bars)


# --------------------------------------------------------------------------- the varlen forward

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_varlen(lesson, dtype):
    """A packed batch (lengths 17, 1, 100, 0, 33 in the interpreter), multi-head, GQA and MQA, causal
    and not, against each sequence in float64 and against padding + masking."""
    lesson.check_varlen([dtype])


def _varlen_keys_past_the_end(lesson):
    """A varlen forward that masks keys by max_seqlen, not by the sequence's length: the lesson's
    kernel run on each sequence stretched to max_seqlen tokens (into the next ones), its own rows kept."""
    def run(q, k, v, cu_seqlens, max_seqlen, causal=False, out=None):
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds, bounds[1:]):
            stop = min(start + max_seqlen, q.shape[0])
            if end > start:
                stretched = torch.tensor([0, stop - start], dtype=torch.int32, device=q.device)
                got, got_lse = lesson.attention_varlen(q[start:stop], k[start:stop], v[start:stop], stretched,
                                                       causal=causal, autotune=False)
                out[start:end], lse[start:end] = got[:end - start], got_lse[:end - start]
        return out, lse
    return run


def _varlen_kv_head_modulo(lesson):
    """A varlen forward whose query head h reads K/V head h % HKV (the lesson's kernel on K/V
    heads gathered that way)."""
    def run(q, k, v, cu_seqlens, max_seqlen, causal=False, out=None):
        heads = torch.arange(q.shape[1], device=q.device) % k.shape[1]
        return lesson.attention_varlen(q, k[:, heads], v[:, heads], cu_seqlens, max_seqlen, causal, out=out,
                                       autotune=False)
    return run


@pytest.mark.parametrize("make_wrong,hint", [(_varlen_keys_past_the_end, "not by max_seqlen"),
                                             (_varlen_kv_head_modulo, "wrong K/V head")],
                         ids=["keys masked by max_seqlen", "kv head h % HKV"])
def test_lesson_varlen_check_rejects_known_wrong(lesson, make_wrong, hint):
    with pytest.raises(CheckError, match=hint):
        lesson.check_varlen([torch.float32], varlen=make_wrong(lesson))


def test_lesson_varlen_bad_input(lesson):
    q, kv = randn(10, 4, 16), randn(10, 2, 16)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=common.DEVICE)
    with pytest.raises(ValueError, match="int32"):
        lesson.attention_varlen(q, kv, kv, cu.long())
    with pytest.raises(ValueError, match=r"\(B \+ 1,\)"):
        lesson.attention_varlen(q, kv, kv, cu[:1])
    with pytest.raises(ValueError, match="never decrease"):
        lesson.attention_varlen(q, kv, kv, torch.tensor([0, 7, 3, 10], dtype=torch.int32, device=common.DEVICE))
    with pytest.raises(ValueError, match="end at the number of tokens 10"):
        lesson.attention_varlen(q, kv, kv, torch.tensor([0, 3, 9], dtype=torch.int32, device=common.DEVICE))
    with pytest.raises(ValueError, match="start at 0"):
        lesson.attention_varlen(q, kv, kv, torch.tensor([1, 3, 10], dtype=torch.int32, device=common.DEVICE))
    with pytest.raises(ValueError, match="max_seqlen = 5 is shorter"):
        lesson.attention_varlen(q, kv, kv, cu, max_seqlen=5)
    with pytest.raises(ValueError, match="HKV dividing HQ = 4"):
        lesson.attention_varlen(q, randn(10, 3, 16), randn(10, 3, 16), cu)
    with pytest.raises(ValueError, match="head dimension"):
        lesson.attention_varlen(randn(10, 4, 24), randn(10, 2, 24), randn(10, 2, 24), cu)
    with pytest.raises(ValueError, match=r"\(10, HKV, 16\)"):
        lesson.attention_varlen(q, randn(9, 2, 16), randn(9, 2, 16), cu)
    with pytest.raises(ValueError, match="3 dimension"):
        lesson.attention_varlen(q[None], kv[None], kv[None], cu)


def test_lesson_varlen_strided_views(lesson):
    """q, k, v as slices of one fused (total, HQ + 2 HKV, D) projection, as a model produces them."""
    lengths = [5, 40, 1, 23]
    cu = torch.tensor([0, 5, 45, 46, 69], dtype=torch.int32, device=common.DEVICE)
    qkv = randn(sum(lengths), 8, 16)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    out, _ = lesson.attention_varlen(q, k, v, cu, causal=True, autotune=False)
    assert_close(out, lesson.varlen_reference(q.double(), k.double(), v.double(), cu, causal=True),
                 name="varlen on strided views")


def test_padding_waste_of_the_benchmark(lesson):
    """The md's padding numbers: the benchmark's lengths as the lesson draws them, and the arithmetic."""
    assert lesson.padding_waste([4, 4], causal=False) == (0.0, 0.0)
    tokens, flops = lesson.padding_waste([1, 3], causal=False)  # 4 of 6 padded slots are real; 10 of 18 scores
    assert tokens == pytest.approx(1 / 3) and flops == pytest.approx(8 / 18)
    lengths = lesson.varlen_lengths(16, 256, 4096)
    assert len(lengths) == 16 and all(256 <= n <= 4096 for n in lengths)
    assert lengths == lesson.varlen_lengths(16, 256, 4096)  # a fixed seed: the same batch every run
    # the numbers lessons/advanced/07_attention.md quotes for this batch
    assert (sum(lengths), max(lengths)) == (38264, 3696)
    assert [round(100 * x) for x in lesson.padding_waste(lengths, causal=False)] == [35, 52]
    assert round(100 * lesson.padding_waste(lengths, causal=True)[1]) == 76


@pytest.mark.skipif(not common.supports_bf16(), reason="needs a CUDA GPU: autotuning times configs on the GPU "
                    "(and the interpreter has no bfloat16)")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lesson_varlen_autotuned_bf16(lesson, causal):
    """The autotuned varlen forward (the benchmark's path) at Llama 3 8B's heads (32 query, 8 K/V, D=128)."""
    lengths = [700, 1, 0, 257, 1000]
    q, k, v, cu = lesson.varlen_problem(lengths, 32, 8, 128, torch.bfloat16)
    out = poisoned_empty(*q.shape, dtype=torch.bfloat16)
    lesson.attention_varlen(q, k, v, cu, causal=causal, out=out)
    assert_close(out, lesson.varlen_reference(q.double(), k.double(), v.double(), cu, causal=causal),
                 name=f"autotuned varlen causal={causal}")
