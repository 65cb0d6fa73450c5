"""Lesson 06 (kernel fusion): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/06_kernel_fusion.py; IMPL=solutions grades the answers.
"""

import functools
import random

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.checks import current_seed, tolerance
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl
from common.lessons import lesson_module

STEM = "06_kernel_fusion"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
MAX_FUSED_COLS = 16384
SPLIT_SEGMENT, SPLIT_BLOCK = 1024, 256  # small, so the interpreter's rows span several segments and chunks


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


def _fail(message: str):
    seed = current_seed()
    raise CheckError(message + (f"\n  reproduce with COURSE_SEED={seed}" if seed is not None else ""))


def _rows():
    return int(torch.randint(2, 6 if common.INTERPRETER else 64, ()).item())


def _row_sum_tol(dtype):
    return 1e-3 if dtype == torch.float32 else 2e-2


# --------------------------------------------------------------------------- 6.1 log-softmax

def _log_softmax_mistakes(x: torch.Tensor, base: torch.Tensor) -> dict:
    """The outputs that the usual log-softmax mistakes produce, for the diagnosis."""
    m, n = x.shape
    xd = x.double()
    pad = triton.next_power_of_2(n) - n
    m0 = xd.max(dim=1, keepdim=True).values.clamp_min(0.0) if pad else xd.max(dim=1, keepdim=True).values
    lse0 = m0 + torch.log(torch.exp(xd - m0).sum(dim=1, keepdim=True) + pad * torch.exp(-m0))
    x32 = x.float()
    packed = base.flatten()[:m * n].view(m, n).double()  # rows read n apart instead of base.stride(0)
    return {
        "the lanes past the row end were loaded as 0, so they count in the max and the sum: load "
        "them with other=-float('inf') (exp(-inf) = 0)": xd - lse0,
        "exp overflowed: subtract the row max before exp (x - max - log(sum(exp(x - max))))":
            x32 - torch.log(torch.exp(x32).sum(dim=1, keepdim=True)),
        "the rows were read n_cols apart, but row i starts at x_ptr + i * stride_xm: pass "
        "x.stride(0) (x may be a view with padded rows)": torch.log_softmax(packed, dim=1),
    }


def check_log_softmax(log_softmax):
    for dtype in DTYPES:
        cols = awkward_sizes(2, lo=300, hi=MAX_FUSED_COLS, include=(17, 1))
        for n in cols:
            m = _rows()
            base = randn(m, n + 5, dtype=dtype)
            x = base[:, :n]  # rows n + 5 elements apart
            out = poisoned_empty(m, n, dtype=dtype)
            _same_output(log_softmax(x, out=out), out, "log_softmax")
            assert_close(out, torch.log_softmax(x.double(), dim=1), name=f"log_softmax {m}x{n} {dtype}",
                         mistakes=_log_softmax_mistakes(x, base))
    # Shifted by +100, exp(x) overflows fp32: only a max-subtracting kernel survives.
    x = randn(3, 777, scale=2.0) + 100.0
    assert_close(log_softmax(x), torch.log_softmax(x.double(), dim=1),
                 name="log_softmax (out=None), rows shifted by +100", mistakes=_log_softmax_mistakes(x, x))
    for bad, what in ((randn(10), "a 1-D tensor"), (randn(2, MAX_FUSED_COLS + 1), f"rows of {MAX_FUSED_COLS + 1}")):
        try:
            log_softmax(bad)
        except ValueError:
            continue
        raise CheckError(f"log_softmax({what}) returned instead of raising ValueError: the wrapper "
                         f"must reject it (see the docstring)")


# --------------------------------------------------------------------------- 6.2 bias + dropout + residual

@triton.jit
def _keep_mask_kernel(keep_ptr, n_elements, p, seed, WIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # The spec's mask: element k is kept where tl.rand(seed, k) > p. tl.rand's stream depends on
    # the dtype of k, so both int32 (pid * BLOCK_SIZE + arange) and int64 offsets are accepted.
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    if WIDE:
        r = tl.rand(seed, offsets.to(tl.int64))
    else:
        r = tl.rand(seed, offsets)
    tl.store(keep_ptr + offsets, (r > p).to(tl.int8), mask=mask)


def _keep_masks(seed: int, shape, p: float) -> list[torch.Tensor]:
    n = shape[0] * shape[1]
    masks = []
    for wide in (False, True):
        keep = torch.empty(n, dtype=torch.int8, device=common.DEVICE)
        _keep_mask_kernel[(triton.cdiv(n, 1024),)](keep, n, float(p), seed, WIDE=wide, BLOCK_SIZE=1024)
        masks.append(keep.view(shape).bool().cpu())
    return masks


def _diagnose_mask(out, kept_value, dropped_value, keep, p, name):
    """If every element is a kept or a dropped value but the mask is not the spec's, say how."""
    tol = tolerance(out.dtype)
    a = out.detach().double().cpu()
    is_kept = torch.isclose(a, kept_value, **tol)
    is_dropped = torch.isclose(a, dropped_value, **tol)
    if not (is_kept | is_dropped).all():
        return  # not a mask problem: assert_close diagnoses the values
    sure = is_kept ^ is_dropped  # elements where (x + bias) / (1 - p) is far from 0
    got = is_kept & ~is_dropped
    if not ((got != keep) & sure).any():
        return
    fraction = float(got[sure].float().mean())
    if got.shape[0] > 1:
        both = sure[0] & sure[1]
        if both.sum() > 16 and (got[0][both] == got[1][both]).all():
            _fail(
                f"{name}: every row has the same dropout mask.\n  hint: the random numbers must "
                f"differ per element: tl.rand(seed, offsets) with the flat offsets k = i * N + j, "
                f"not the column k % N")
    _fail(
        f"{name}: each element is either kept and scaled or dropped, but not with the spec's mask "
        f"(kept fraction {fraction:.3f}, expected about 1 - p = {1 - p:.3f}).\n  hint: keep element "
        f"k where tl.rand(seed, k) > p, with k = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)")


def check_bias_dropout_add(bias_dropout_add):
    for dtype in DTYPES:
        cols = awkward_sizes(2, lo=100, hi=3000 if common.INTERPRETER else 20_000, include=(17,))
        for i, n in enumerate(cols):
            m = _rows()
            p = 0.0 if i == len(cols) - 1 else random.uniform(0.1, 0.6)
            seed = random.randrange(2, 2**31 - 1)
            x, residual = randn(m, n, dtype=dtype), randn(m, n, dtype=dtype)
            bias = randn(n, dtype=dtype)
            out = poisoned_empty(m, n, dtype=dtype)
            _same_output(bias_dropout_add(x, bias, residual, p, seed, out=out), out, "bias_dropout_add")
            xb, r = x.double().cpu() + bias.double().cpu(), residual.double().cpu()
            kept_value = xb / (1 - p) + r

            def expected_for(keep):
                return torch.where(keep, kept_value, r)

            keeps = _keep_masks(seed, (m, n), p)
            a = out.detach().double().cpu()
            keep = max(keeps, key=lambda k: int(torch.isclose(a, expected_for(k), **tolerance(dtype)).sum()))
            name = f"bias_dropout_add {m}x{n} p={p:.2f} {dtype}"
            _diagnose_mask(out, kept_value, r, keep, p, name)
            assert_close(out, expected_for(keep), name=name, mistakes={
                "kept elements must be scaled by 1 / (1 - p), so that the expected value stays x + bias":
                    torch.where(keep, xb + r, r),
                "the residual must be added to every element, dropped ones too (a dropped element is "
                "residual, not 0)": torch.where(keep, kept_value, 0.0),
                "dropout applies to x + bias: add the bias before dropping and scaling":
                    torch.where(keep, x.double().cpu() / (1 - p), 0.0) + bias.double().cpu() + r,
            })


# --------------------------------------------------------------------------- 6.3 split online softmax

def _check_row_sums(out, n_segments, name):
    """Diagnose the online-softmax mistakes that leave the values finite but the rows off 1."""
    a = out.detach().double().cpu()
    if not torch.isfinite(a).all():
        return  # unwritten or NaN elements: assert_close says more
    sums = a.sum(dim=1)
    tol = _row_sum_tol(out.dtype)
    bad = (sums - 1).abs() > tol
    if not bad.any():
        return
    i = int(bad.nonzero()[0])
    if n_segments > 1 and ((sums - n_segments).abs() <= n_segments * tol).all():
        _fail(
            f"{name}: every row sums to {n_segments}, the number of segments: each segment was normalised "
            f"by its own max and sum.\n  hint: merge all of the row's partials first: m = max of the m_s, "
            f"d = sum of d_s * exp(m_s - m), then write exp(x - m) / d")
    _fail(
        f"{name}: rows do not sum to 1 (row {i} sums to {sums[i].item():.6g}).\n  hint: the running sum "
        f"must be rescaled whenever the running max grows: d = d * exp(m_old - m_new) + "
        f"sum(exp(x - m_new)); merging partial sums needs the same factor exp(m_s - m)")


def check_softmax_split(softmax_split):
    for dtype in DTYPES:
        cols = awkward_sizes(2, lo=2000, hi=200_000, include=(700, 1))  # several segments, one, a tiny row
        for n in cols:
            m = int(torch.randint(1, 4, ()).item())
            base = randn(m, n + 3, dtype=dtype)
            # A rising ramp: the row max grows chunk after chunk, so a running sum that is not
            # rescaled is visibly wrong.
            base[:, :n] += torch.linspace(0, 6, n, device=common.DEVICE).to(dtype)
            x = base[:, :n]
            out = poisoned_empty(m, n, dtype=dtype)
            _same_output(softmax_split(x, out=out, segment=SPLIT_SEGMENT, block_size=SPLIT_BLOCK), out,
                         "softmax_split")
            name = f"softmax_split {m}x{n} {dtype} (segment {SPLIT_SEGMENT}, block {SPLIT_BLOCK})"
            _check_row_sums(out, triton.cdiv(n, SPLIT_SEGMENT), name)
            assert_close(out, torch.softmax(x.double(), dim=1), name=name)
    x = randn(2, 3001, scale=3.0)
    assert_close(softmax_split(x), torch.softmax(x.double(), dim=1), name="softmax_split (default segment, out=None)")


EXERCISES = [
    Exercise("6.1", "log_softmax", check_log_softmax, kernels=("log_softmax_kernel",)),
    Exercise("6.2", "bias_dropout_add", check_bias_dropout_add, kernels=("bias_dropout_add_kernel",)),
    Exercise("6.3", "softmax_split", check_softmax_split,
             kernels=("softmax_partial_kernel", "softmax_normalize_kernel")),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

@functools.cache
def _solutions():
    return load_impl(STEM, "solutions")


@triton.jit
def _log_softmax_other_zero_kernel(x_ptr, out_ptr, stride_xm, stride_om, n_cols, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)  # wrong: 0, not -inf
    z = x - tl.max(x, axis=0)
    tl.store(out_ptr + row * stride_om + cols, z - tl.log(tl.sum(tl.exp(z), axis=0)), mask=mask)


@triton.jit
def _log_softmax_no_max_kernel(x_ptr, out_ptr, stride_xm, stride_om, n_cols, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=-float("inf")).to(tl.float32)
    # wrong: no max subtracted, exp overflows for large x
    tl.store(out_ptr + row * stride_om + cols, x - tl.log(tl.sum(tl.exp(x), axis=0)), mask=mask)


def _log_softmax_with(kernel, row_stride=lambda x: x.stride(0)):
    def log_softmax(x, out=None):
        if x.dim() != 2 or x.shape[1] > MAX_FUSED_COLS:
            raise ValueError("bad input")
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        kernel[(x.shape[0],)](x, out, row_stride(x), out.stride(0), x.shape[1],
                              BLOCK_SIZE=triton.next_power_of_2(x.shape[1]))
        return out
    return log_softmax


@triton.jit
def _bda_kernel(x_ptr, bias_ptr, res_ptr, out_ptr, n_elements, n_cols, p, seed, BLOCK_SIZE: tl.constexpr,
                MISTAKE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    b = tl.load(bias_ptr + offsets % n_cols, mask=mask).to(tl.float32)
    r = tl.load(res_ptr + offsets, mask=mask).to(tl.float32)
    if MISTAKE == "same_mask":
        keep = tl.rand(seed, offsets % n_cols) > p  # wrong: one mask, repeated on every row
    else:
        keep = tl.rand(seed, offsets) > p
    if MISTAKE == "no_scale":
        out = tl.where(keep, x + b, 0.0) + r  # wrong: kept values not divided by 1 - p
    elif MISTAKE == "drop_residual":
        out = tl.where(keep, (x + b) / (1.0 - p) + r, 0.0)  # wrong: dropped elements lose the residual
    else:
        out = tl.where(keep, (x + b) / (1.0 - p), 0.0) + r
    if MISTAKE != "no_store":
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _bda_with(mistake):
    def bias_dropout_add(x, bias, residual, p, seed, out=None):
        out = torch.empty_like(x) if out is None else out
        n = x.numel()
        _bda_kernel[(triton.cdiv(n, 1024),)](x, bias, residual, out, n, x.shape[1], float(p), seed,
                                             BLOCK_SIZE=1024, MISTAKE=mistake)
        return out
    return bias_dropout_add


@triton.jit
def _partial_no_rescale_kernel(x_ptr, m_parts_ptr, d_parts_ptr, stride_xm, n_cols, n_segments,
                               SEGMENT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    cols = tl.arange(0, BLOCK_SIZE)
    m = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, SEGMENT, BLOCK_SIZE):
        offs = seg * SEGMENT + start + cols
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d + tl.exp(x - m_ref)  # wrong: the old sum is not rescaled by exp(m - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    tl.store(m_parts_ptr + row * n_segments + seg, m_row)
    tl.store(d_parts_ptr + row * n_segments + seg, tl.sum(d * tl.exp(m - m_row), axis=0))


@triton.jit
def _normalize_unmerged_kernel(x_ptr, out_ptr, m_parts_ptr, d_parts_ptr, stride_xm, stride_om, n_cols, n_segments,
                               SEGMENT: tl.constexpr, BLOCK_SIZE: tl.constexpr, S_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    m = tl.load(m_parts_ptr + row * n_segments + seg)  # wrong: this segment's max and sum only
    inv_d = 1.0 / tl.load(d_parts_ptr + row * n_segments + seg)
    cols = tl.arange(0, BLOCK_SIZE)
    for start in range(0, SEGMENT, BLOCK_SIZE):
        offs = seg * SEGMENT + start + cols
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=-float("inf")).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs, (tl.exp(x - m) * inv_d).to(out_ptr.dtype.element_ty), mask=mask)


def _softmax_split_with(partial=None, normalize=None):
    def softmax_split(x, out=None, segment=16384, block_size=2048):
        sol = _solutions()
        n_rows, n_cols = x.shape
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        s = triton.cdiv(n_cols, segment)
        m_parts = torch.empty((n_rows, s), dtype=torch.float32, device=x.device)
        d_parts = torch.empty_like(m_parts)
        (partial or sol.softmax_partial_kernel)[(n_rows, s)](x, m_parts, d_parts, x.stride(0), n_cols, s,
                                                             SEGMENT=segment, BLOCK_SIZE=block_size)
        (normalize or sol.softmax_normalize_kernel)[(n_rows, s)](
            x, out, m_parts, d_parts, x.stride(0), out.stride(0), n_cols, s, SEGMENT=segment,
            BLOCK_SIZE=block_size, S_BLOCK=max(16, triton.next_power_of_2(s)))
        return out
    return softmax_split


KNOWN_WRONG = [
    ("log_softmax", "masked lanes loaded as 0", lambda: _log_softmax_with(_log_softmax_other_zero_kernel),
     "past the row end"),
    ("log_softmax", "no max subtracted", lambda: _log_softmax_with(_log_softmax_no_max_kernel),
     "subtract the row max"),
    ("log_softmax", "row stride ignored",
     lambda: _log_softmax_with(_solutions().log_softmax_kernel, row_stride=lambda x: x.shape[1]), "x.stride(0)"),
    ("bias_dropout_add", "kept values not scaled", lambda: _bda_with("no_scale"), "1 / (1 - p)"),
    ("bias_dropout_add", "same mask on every row", lambda: _bda_with("same_mask"), "same dropout mask"),
    ("bias_dropout_add", "residual dropped too", lambda: _bda_with("drop_residual"), "residual"),
    ("bias_dropout_add", "writes nothing", lambda: _bda_with("no_store"), "never written"),
    ("softmax_split", "running sum not rescaled", lambda: _softmax_split_with(partial=_partial_no_rescale_kernel),
     "rescaled"),
    ("softmax_split", "segments not merged", lambda: _softmax_split_with(normalize=_normalize_unmerged_kernel),
     "own max and sum"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("06")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_add_mul(lesson, dtype):
    for n in awkward_sizes(2):
        x, y = randn(n, dtype=dtype), randn(n, dtype=dtype)
        for s in (1.0, 2.0, 10.0):
            for v in lesson.ADD_MUL_VERSIONS:
                out = poisoned_empty(n, dtype=dtype)
                assert v.fn(x, y, s, out=out) is out
                assert_close(out, (x.double() + y.double()) * s, name=f"add_mul {v.label} n={n} s={s}")


@pytest.mark.parametrize("block_size", [256, 16384])
def test_lesson_add_mul_block_sizes(lesson, block_size):
    x, y = randn(3001), randn(3001)
    for v in lesson.ADD_MUL_VERSIONS:
        assert_close(v.fn(x, y, 2.0, block_size), (x.double() + y.double()) * 2.0)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_softmax(lesson, dtype, version):
    op = lesson.SOFTMAX_VERSIONS.get(version).fn
    kwargs = {} if version == "v1" else {"block_size": 512}  # several chunks per row
    for n in awkward_sizes(2, lo=1000, hi=MAX_FUSED_COLS, include=(17, 1)):
        m = 3 if common.INTERPRETER else _rows()
        base = randn(m, n + 3, dtype=dtype, scale=3.0)
        for x in (base[:, :n], base[:, :n].contiguous()):
            out = poisoned_empty(m, n, dtype=dtype)
            assert op(x, out=out, **kwargs) is out
            assert_close(out, torch.softmax(x.double(), dim=1), name=f"softmax {version} {m}x{n}")
            sums = out.double().sum(dim=1)
            assert_close(sums, torch.ones_like(sums), atol=_row_sum_tol(dtype), rtol=0, name="row sums")


def test_lesson_softmax_shifted_rows(lesson):
    x = randn(3, 1001) + 100.0  # exp(100) overflows fp32: each version must subtract the max
    for v in lesson.SOFTMAX_VERSIONS:
        assert_close(v.fn(x), torch.softmax(x.double(), dim=1), name=f"softmax {v.label}")


def test_lesson_long_rows(lesson):
    x = randn(2, MAX_FUSED_COLS + 3)
    with pytest.raises(ValueError, match="softmax_online"):
        lesson.softmax(x)
    for op in (lesson.softmax_three_pass, lesson.softmax_online):
        assert_close(op(x), torch.softmax(x.double(), dim=1), name=op.__name__)


# v4 (softmax_fast) dispatches on the row length. Its limits are arguments, so that the split-row
# path (several programs per row, a (max, sum) merge) runs here at rows the interpreter does in
# seconds: (max_single_pass_cols, segment) -> which path, and how many programs per row.
V4_PATHS = {
    "one block": dict(),
    "one block, persistent": dict(persistent=True),  # a few programs, each looping over rows
    "split rows": dict(max_single_pass_cols=16, segment=128 if common.INTERPRETER else 1024),
    "split, 1-column segments": dict(max_single_pass_cols=1, segment=1),  # n programs per row
}
V4_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BF16_REASON = "bfloat16 needs a GPU: the interpreter has no bfloat16 (numpy lacks it)"


def _v4_dtype(dtype):
    if dtype == torch.bfloat16 and not common.supports_bf16():
        pytest.skip(BF16_REASON)


def _check_v4(lesson, x, name, **kwargs):
    m, n = x.shape
    out = poisoned_empty(m, n, dtype=x.dtype)
    assert lesson.softmax_fast(x, out=out, **kwargs) is out
    assert_close(out, torch.softmax(x.double(), dim=1), name=name)
    sums = out.double().sum(dim=1)
    assert_close(sums, torch.ones_like(sums), atol=_row_sum_tol(x.dtype), rtol=0, name=f"{name}: row sums")


@pytest.mark.parametrize("path", list(V4_PATHS))
@pytest.mark.parametrize("dtype", V4_DTYPES, ids=str)
def test_lesson_softmax_fast(lesson, dtype, path):
    _v4_dtype(dtype)
    kwargs = V4_PATHS[path]
    cols = (1, 7, 1000) if path != "split, 1-column segments" else (1, 7, 33)
    for n in cols:
        m = 5 if common.INTERPRETER else _rows()  # more rows than the interpreter's 4 programs
        base = randn(m, n + 3, dtype=dtype, scale=3.0)
        for x in (base[:, :n], base[:, :n].contiguous()):  # padded rows, then packed
            _check_v4(lesson, x, f"softmax_fast ({path}) {m}x{n} {dtype}", **kwargs)


@pytest.mark.parametrize("dtype", V4_DTYPES, ids=str)
def test_lesson_softmax_fast_threshold(lesson, dtype):
    """Rows of the threshold and one past it take the two paths; both must agree with float64."""
    _v4_dtype(dtype)
    limit = 256 if common.INTERPRETER else lesson.MAX_SINGLE_PASS_COLS
    segment = 100 if common.INTERPRETER else lesson.SPLIT_SEGMENT
    for n in (limit, limit + 1, 3 * segment + 1):  # the last one: 4 segments, the last of 1 column
        x = randn(3, n, dtype=dtype, scale=3.0)
        _check_v4(lesson, x, f"softmax_fast {3}x{n} (limit {limit}, segment {segment}) {dtype}",
                  max_single_pass_cols=limit, segment=segment)


@pytest.mark.parametrize("path", list(V4_PATHS))
def test_lesson_softmax_fast_extremes(lesson, path):
    """-inf entries (masked positions), rows shifted by +100 (exp overflows unless the max is
    subtracted), a segment whose values are all -inf, and a large spread within one row."""
    kwargs = V4_PATHS[path]
    x = randn(4, 300, scale=3.0)
    x[0, ::3] = -float("inf")
    x[1] += 100.0
    x[2, :200] = -float("inf")  # the split path: whole segments of -inf, measured from 0
    x[3, 5] = 80.0  # one value dominates: the others round to 0 in fp32
    _check_v4(lesson, x, f"softmax_fast ({path}) with -inf and large values", **kwargs)


def test_lesson_softmax_fast_repeated_calls(lesson):
    """The split path's barrier counters persist between calls: different rows and segment
    counts in turn must all still be right (on a GPU a wrong count hangs or races)."""
    for m, n, segment in ((3, 300, 128), (7, 300, 100), (3, 300, 128), (2, 1000, 128)):
        x = randn(m, n)
        _check_v4(lesson, x, f"softmax_fast split {m}x{n} segment {segment}", max_single_pass_cols=16,
                  segment=segment if common.INTERPRETER else 8 * segment)


def test_lesson_softmax_fast_bad_args(lesson):
    x = randn(2, 40)
    with pytest.raises(ValueError, match="segment"):
        lesson.softmax_fast(x, segment=0)
    with pytest.raises(ValueError, match="max_single_pass_cols"):
        lesson.softmax_fast(x, max_single_pass_cols=1.5)
    with pytest.raises(TypeError, match="dtype"):
        lesson.softmax_fast(torch.ones(2, 40, dtype=torch.int32, device=common.DEVICE))


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the benchmark's long rows are too big for the "
                                               "interpreter")
def test_lesson_softmax_fast_long_rows_gpu(lesson):
    for dtype in [torch.float32] + ([torch.bfloat16] if common.supports_bf16() else []):
        x = randn(300, 131072 + 5, dtype=dtype, scale=3.0)  # fewer rows than the resident groups
        _check_v4(lesson, x, f"softmax_fast 300x131077 {dtype}")


def test_lesson_traffic_counts(lesson):
    x = torch.randn(64, 100, device=common.DEVICE)
    naive = common.count_torch_traffic(lesson.softmax_naive, x)
    assert naive.kernels == 5, naive.summary()
    assert common.count_torch_traffic(lesson.softmax_reference, x).kernels == 1
    assert common.count_torch_traffic(lesson.add_mul_reference, x, x, 2.0).kernels == 2


def test_lesson_bad_input(lesson):
    x = randn(100)
    with pytest.raises(ValueError, match="shape"):
        lesson.add_mul(x, randn(99), 2.0)
    with pytest.raises(TypeError, match="dtype"):
        lesson.add_mul(x, randn(100, dtype=torch.float16), 2.0)
    with pytest.raises(TypeError, match="s must be a Python number"):
        lesson.add_mul(x, x, torch.tensor(2.0))
    with pytest.raises(ValueError, match="power of 2"):
        lesson.add_mul_two_step(x, x, 2.0, block_size=1000)
    with pytest.raises(TypeError, match="dtype"):
        lesson.add_mul(torch.ones(10, dtype=torch.int32, device=common.DEVICE),
                       torch.ones(10, dtype=torch.int32, device=common.DEVICE), 2.0)
    x2 = randn(8, 40)
    for v in lesson.SOFTMAX_VERSIONS:
        with pytest.raises(ValueError, match="2 dimension"):
            v.fn(x)
        with pytest.raises(ValueError, match="stride"):
            v.fn(x2.t())
        with pytest.raises(ValueError, match="shape"):
            v.fn(x2, out=randn(8, 41))
    with pytest.raises(ValueError, match="power of 2"):
        lesson.softmax_online(x2, block_size=100)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.add_mul(torch.randn(10), torch.randn(10, device="cuda"), 2.0)
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.softmax(torch.randn(4, 10))
