"""Lesson 03 (basic operations): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/03_basic_operations.py; IMPL=solutions grades the answers.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl
from common.lessons import lesson_module

STEM = "03_basic_operations"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
ROW_BLOCK_N = 1024  # the block the given row_mean wrapper launches with
SUM_BLOCKS = (128, 256, 512, 1024, 2048, 4096, 8192)  # block sizes a learner's sum_of_squares may use


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


def _matrices(dtype):
    """(x, base, label): awkward shapes, one column, and row-strided views of a wider `base`."""
    cols = awkward_sizes(2, lo=100, hi=6000, include=(1, 17))
    rows = awkward_sizes(len(cols), lo=3, hi=40, include=())
    for i, (m, n) in enumerate(zip(rows, cols)):
        pad = 7 if i % 2 == 0 else 0  # every other matrix is a view x = base[:, :n] with row stride n + 7
        base = randn(m, n + pad, dtype=dtype)
        yield base[:, :n], base, f"{m}x{n}{' row-strided' if pad else ''} {str(dtype).removeprefix('torch.')}"


def _rows_ignoring_stride(x, base):
    """What a kernel that uses n_cols as the row stride reads: the first M*N elements of base."""
    m, n = x.shape
    return base.reshape(-1)[:m * n].view(m, n)


def _gelu(v):
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


# --------------------------------------------------------------------------- the checks

def check_row_mean(row_mean):
    for dtype in DTYPES:
        for x, base, label in _matrices(dtype):
            m, n = x.shape
            out = poisoned_empty(m, dtype=dtype)
            _same_output(row_mean(x, out=out), out, "row_mean")
            mistakes = {f"divided by BLOCK_N ({ROW_BLOCK_N}) instead of n_cols: the mean is the sum over "
                        f"the row divided by the number of columns": x.double().sum(1) / ROW_BLOCK_N}
            if x.stride(0) != n:
                mistakes["the row stride was ignored: row m starts at x_ptr + m * stride_xm, not "
                         "m * n_cols"] = _rows_ignoring_stride(x, base).double().mean(1)
            assert_close(out, x.double().mean(1), name=f"row_mean {label}", mistakes=mistakes)
    x = randn(5, 300)
    assert_close(row_mean(x), x.double().mean(1), name="row_mean (out=None)")


def check_row_argmax(row_argmax):
    for dtype in DTYPES:
        for x, base, label in _matrices(dtype):
            m, n = x.shape
            x[::2] = -x[::2].abs() - 0.1  # every other row all negative: a padding of 0 would win there
            out = poisoned_empty(m, dtype=torch.int64)
            _same_output(row_argmax(x, out=out), out, "row_argmax")
            expected = x.double().argmax(1)
            mistakes = {}
            if n & (n - 1):  # n not a power of 2: the block has padding lanes, the first at index n
                padding_won = torch.where(x.double().amax(1) < 0, torch.full_like(expected, n), expected)
                mistakes["the padding won: masked-off lanes loaded as 0 beat rows of negative values; "
                         "load with other=float('-inf') so padding can never be the max"] = padding_won
            if x.stride(0) != n:
                mistakes["the row stride was ignored: row m starts at x_ptr + m * stride_xm, not "
                         "m * n_cols"] = _rows_ignoring_stride(x, base).double().argmax(1)
            assert_close(out, expected, name=f"row_argmax {label}", mistakes=mistakes)
    x = randn(4, 33)
    assert_close(row_argmax(x), x.double().argmax(1), name="row_argmax (out=None)")


def check_bias_gelu(bias_gelu):
    x, bias = randn(3, 50), randn(50)
    try:
        bias_gelu(x, randn(51))
    except ValueError:
        pass
    else:
        raise CheckError("bias_gelu(x of shape (3, 50), bias of shape (51,)) returned instead of raising "
                         "ValueError: the wrapper must check that bias has x.shape[1] elements")
    for dtype in DTYPES:
        for x, base, label in _matrices(dtype):
            m, n = x.shape
            bias = randn(n, dtype=dtype)
            out = poisoned_empty(m, n, dtype=dtype)
            _same_output(bias_gelu(x, bias, out=out), out, "bias_gelu")
            v = x.double() + bias.double()
            mistakes = {
                "the bias was not added: out = gelu(x + bias[None, :])": _gelu(x.double()),
                "this is the tanh approximation of GELU; the spec is the exact form "
                "0.5 * v * (1 + erf(v / sqrt(2)))": _gelu_tanh(v),
            }
            if x.stride(0) != n:
                mistakes["the row stride was ignored: row m of x starts at x_ptr + m * stride_xm"] = \
                    _gelu(_rows_ignoring_stride(x, base).double() + bias.double())
            assert_close(out, _gelu(v), name=f"bias_gelu {label}", mistakes=mistakes)
    x, bias = randn(3, 50), randn(50)  # last: an unguarded output, once the guarded ones passed
    assert_close(bias_gelu(x, bias), _gelu(x.double() + bias.double()), name="bias_gelu (out=None)")


def check_sum_of_squares(sum_of_squares):
    for dtype in DTYPES:
        # scale 16 for 16-bit inputs: squares near 256, so a block's sum passes fp16's max (65504)
        scale = 1.0 if dtype == torch.float32 else 16.0
        for n in awkward_sizes(3, lo=1000, hi=200_000, include=(1,)):
            shape = (n // 7, 7) if n % 7 == 0 else (n,)  # any shape: a contiguous 2-D x is fine too
            x = randn(*shape, dtype=dtype, scale=scale)
            out = poisoned_empty(dtype=torch.float32)
            _same_output(sum_of_squares(x, out=out), out, "sum_of_squares")
            squares = x.double().reshape(-1) ** 2
            expected = squares.sum()
            if torch.isinf(out).any() and torch.isfinite(expected):
                raise CheckError(f"sum_of_squares n={n} {dtype}: got {out.item()}, expected {expected.item():.6g}: "
                                 f"the squares were added in fp16 (largest value 65504); convert x to "
                                 f"tl.float32 right after the load, before squaring")
            first_only = "pass 2 must add all the partials (only the first block's partial came back)"
            tail = ("the last, partial block was dropped: launch triton.cdiv(n, BLOCK_SIZE) programs "
                    "(not n // BLOCK_SIZE) and mask the tail")
            why = {}  # elements summed -> the mistakes that sum exactly those (several can coincide)
            for b in SUM_BLOCKS:
                if n > b:
                    why.setdefault(b, []).append(first_only)
                    if n % b:
                        why.setdefault(n // b * b, []).append(tail)
            mistakes = {f"only the first {k} of {n} elements were summed: " + "; or ".join(dict.fromkeys(reasons)):
                        squares[:k].sum() for k, reasons in why.items()}
            assert_close(out, expected, name=f"sum_of_squares n={n} {dtype}", mistakes=mistakes)
            again = sum_of_squares(x)
            if not (isinstance(again, torch.Tensor) and torch.equal(again, out)):
                raise CheckError(f"sum_of_squares n={n}: two calls on the same input gave different bits "
                                 f"({out.item()!r} then {again!r}); no atomics: pass 2 adds the partials "
                                 f"in a fixed order")


EXERCISES = [
    Exercise("3.1", "row_mean", check_row_mean, kernels=("row_mean_kernel",)),
    Exercise("3.2", "row_argmax", check_row_argmax, kernels=("row_argmax_kernel",)),
    Exercise("3.3", "bias_gelu", check_bias_gelu, kernels=("bias_gelu_kernel",)),
    Exercise("3.4", "sum_of_squares", check_sum_of_squares, kernels=("sum_squares_partials_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

def _solutions():
    return load_impl(STEM, "solutions")


def _row_wrapper(kernel, block_n=lambda n: ROW_BLOCK_N, out_dtype=None, stride=lambda x: x.stride(0)):
    """A row_mean / row_argmax wrapper around a (wrong) kernel, launched as the given wrappers do."""
    def wrapper(x, out=None):
        if out is None:
            out = torch.empty(x.shape[0], dtype=out_dtype or x.dtype, device=x.device)
        kernel[(x.shape[0],)](x, out, x.shape[1], stride(x), BLOCK_N=block_n(x.shape[1]))
        return out
    return wrapper


@triton.jit
def _row_mean_divide_by_block_kernel(x_ptr, out_ptr, n_cols, stride_xm, BLOCK_N: tl.constexpr):
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        acc += tl.load(x_ptr + tl.program_id(0) * stride_xm + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0) / BLOCK_N)  # wrong: divides by the block size


@triton.jit
def _row_argmax_zero_padding_kernel(x_ptr, out_ptr, n_cols, stride_xm, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + tl.program_id(0) * stride_xm + cols, mask=cols < n_cols, other=0.0)  # wrong: 0 can win
    tl.store(out_ptr + tl.program_id(0), tl.argmax(x, axis=0).to(tl.int64))


@triton.jit
def _bias_gelu_kernel(x_ptr, bias_ptr, out_ptr, n_rows, n_cols, stride_xm, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      ADD_BIAS: tl.constexpr, TANH: tl.constexpr, MASK_STORE: tl.constexpr):
    """bias + GELU with one mistake switched on by the constexpr flags."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    v = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD_BIAS:
        v += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    if TANH:
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        y = 0.5 * v * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
    else:
        y = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if MASK_STORE:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=rows[:, None] < n_rows)  # wrong: no column mask


def _bias_gelu_with(add_bias=True, tanh=False, mask_store=True, all_columns=True, validate=True):
    def bias_gelu(x, bias, out=None):
        if validate and bias.shape != (x.shape[1],):
            raise ValueError("bias must have x.shape[1] elements")
        m, n = x.shape
        out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
        block_m, block_n = (8, 256) if all_columns else (4, 64)  # 64 < every n but 1 and 17 in the check
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n) if all_columns else 1)  # wrong if not all_columns
        _bias_gelu_kernel[grid](x, bias, out, m, n, x.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                ADD_BIAS=add_bias, TANH=tanh, MASK_STORE=mask_store)
        return out
    return bias_gelu


@triton.jit
def _sum_squares_fp16_kernel(x_ptr, partials_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0)  # wrong: squared and added in x's dtype
    tl.store(partials_ptr + tl.program_id(0), tl.sum(x * x, axis=0))


def _sum_of_squares_with(pass1=None, grid_of=lambda n, b: triton.cdiv(n, b), pass2=True, store=True):
    def sum_of_squares(x, out=None):
        sol = _solutions()
        kernel = pass1 or sol.sum_squares_partials_kernel
        out = torch.empty((), dtype=torch.float32, device=x.device) if out is None else out
        n, block = x.numel(), 1024
        partials = torch.zeros(triton.cdiv(n, block), dtype=torch.float32, device=x.device)
        kernel[(grid_of(n, block),)](x, partials, n, BLOCK_SIZE=block)
        if not store:
            return out  # wrong: never writes the result
        if pass2:
            sol.sum_finish_kernel[(1,)](partials, out, partials.numel(), BLOCK_SIZE=1024)
        else:
            out.copy_(partials[0])  # wrong: only the first program's partial
        return out
    return sum_of_squares


KNOWN_WRONG = [
    ("row_mean", "divides by BLOCK_N", lambda: _row_wrapper(_row_mean_divide_by_block_kernel), "divided by BLOCK_N"),
    ("row_mean", "row stride ignored",
     lambda: _row_wrapper(_solutions().row_mean_kernel, stride=lambda x: x.shape[1]), "row stride was ignored"),
    ("row_argmax", "other=0.0",
     lambda: _row_wrapper(_row_argmax_zero_padding_kernel, triton.next_power_of_2, torch.int64), "padding won"),
    ("row_argmax", "row stride ignored",
     lambda: _row_wrapper(_solutions().row_argmax_kernel, triton.next_power_of_2, torch.int64,
                          stride=lambda x: x.shape[1]), "row stride was ignored"),
    ("bias_gelu", "bias not added", lambda: _bias_gelu_with(add_bias=False), "bias was not added"),
    ("bias_gelu", "tanh approximation", lambda: _bias_gelu_with(tanh=True), "tanh approximation"),
    ("bias_gelu", "no column mask on the store", lambda: _bias_gelu_with(mask_store=False), "past the end"),
    ("bias_gelu", "grid covers one column block", lambda: _bias_gelu_with(all_columns=False), "column(s) were never written"),
    ("bias_gelu", "bias length not validated", lambda: _bias_gelu_with(validate=False), "ValueError"),
    ("sum_of_squares", "squares added in fp16", lambda: _sum_of_squares_with(pass1=_sum_squares_fp16_kernel), "fp16"),
    ("sum_of_squares", "grid n // BLOCK", lambda: _sum_of_squares_with(grid_of=lambda n, b: max(1, n // b)),
     "partial block was dropped"),
    ("sum_of_squares", "pass 2 skipped", lambda: _sum_of_squares_with(pass2=False), "pass 2 must add all the partials"),
    ("sum_of_squares", "writes nothing", lambda: _sum_of_squares_with(store=False), "never written"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the fp16 mistake, on purpose
@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("03")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_elementwise(lesson, dtype):
    for n in awkward_sizes(2, include=(1,)):
        x = randn(n, dtype=dtype, scale=3.0)
        for op, ref in ((lesson.sigmoid, torch.sigmoid), (lesson.gelu, _gelu)):
            out = poisoned_empty(n, dtype=dtype)
            op(x, out=out)
            assert_close(out, ref(x.double()), name=f"{op.__name__} n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_bias_add(lesson, dtype):
    for x, _, label in _matrices(dtype):
        bias = randn(x.shape[1], dtype=dtype)
        out = poisoned_empty(*x.shape, dtype=dtype)
        lesson.bias_add(x, bias, out=out)
        assert_close(out, x.double() + bias.double(), name=f"bias_add {label}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_row_reductions(lesson, dtype):
    for x, _, label in _matrices(dtype):
        atol = lesson.sum_atol(x, dim=1) if dtype == torch.float32 else None
        for version in (1, 2, 3):
            out = poisoned_empty(x.shape[0], dtype=dtype)
            lesson.row_sum(x, version, out=out)
            assert_close(out, x.double().sum(1), atol=atol, name=f"row_sum v{version} {label}")
        out = poisoned_empty(x.shape[0], dtype=dtype)
        lesson.row_max(x, out=out)
        assert_close(out, x.double().amax(1), name=f"row_max {label}")


def test_lesson_row_sum_v3_configs(lesson):
    x = randn(37, 1500)
    for config in (dict(BLOCK_M=1, BLOCK_N=256, num_warps=4), dict(BLOCK_M=8, BLOCK_N=512, num_warps=8)):
        out = poisoned_empty(37)
        lesson.row_sum_v3(x, out, config)
        assert_close(out, x.double().sum(1), atol=lesson.sum_atol(x, 1), name=f"row_sum v3 {config}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_total_sums(lesson, dtype):
    for n in awkward_sizes(2, lo=1000, hi=300_000, include=(1,)):
        x = randn(n, dtype=dtype)
        for total in (lesson.total_sum_atomic, lesson.total_sum_two_pass):
            out = poisoned_empty(dtype=torch.float32)
            total(x, out=out)
            assert_close(out, x.double().sum(), atol=lesson.sum_atol(x), name=f"{total.__name__} n={n}")
        first = lesson.total_sum_two_pass(x)
        assert torch.equal(first, lesson.total_sum_two_pass(x)), "the two-pass sum must give the same bits"


def test_lesson_padding_demo(lesson):
    x = -randn(6, 1000).abs() - 0.5  # 1000 columns in a block of 1024: 24 padding lanes per row
    right_sum, right_max = x.double().sum(1), x.double().amax(1)
    assert_close(lesson.row_reduce_padded(x, 0.0, is_max=False), right_sum, atol=lesson.sum_atol(x, 1))
    assert_close(lesson.row_reduce_padded(x, float("-inf"), is_max=True), right_max)
    assert (lesson.row_reduce_padded(x, 0.0, is_max=True) == 0).all(), "padding 0 must win a max of negatives"
    assert torch.isinf(lesson.row_reduce_padded(x, float("-inf"), is_max=False)).all()


def test_lesson_bad_input(lesson):
    x = randn(8, 100)
    with pytest.raises(ValueError, match="contiguous"):
        lesson.row_sum(x.t())
    with pytest.raises(ValueError, match="dimension"):
        lesson.row_sum(randn(100))
    with pytest.raises(TypeError, match="dtype"):
        lesson.row_max(torch.ones(4, 4, dtype=torch.int32, device=common.DEVICE))
    with pytest.raises(ValueError, match="version"):
        lesson.row_sum(x, version=4)
    with pytest.raises(ValueError, match="at most 8192 columns"):
        lesson.row_sum(randn(2, 9000), version=1)
    with pytest.raises(ValueError, match="bias"):
        lesson.bias_add(x, randn(99))
    with pytest.raises(TypeError, match="dtype"):
        lesson.bias_add(x, randn(100, dtype=torch.float16))
    with pytest.raises(ValueError, match="shape"):
        lesson.gelu(randn(10), out=randn(11))
    with pytest.raises(TypeError, match="dtype"):
        lesson.row_sum(x, out=randn(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lesson.sigmoid([1.0, 2.0])
    with pytest.raises(ValueError, match="no elements"):
        lesson.total_sum_two_pass(randn(0))


@pytest.mark.parametrize("index", range(4))
def test_lesson_common_errors_raise(lesson, index):
    """Each broken kernel of the debugging section raises an error whose message names the problem."""
    title, expected, _, launch = lesson.COMMON_ERRORS[index]
    a, b = randn(2048), randn(2048)
    with pytest.raises(Exception) as info:
        launch(a, b)
    err, messages = info.value, []
    while err is not None:
        messages.append(str(err))
        err = err.__cause__
    assert expected.lower() in " ".join(messages).lower(), f"{title}: {messages}"


def test_lesson_debugging_demos_run(lesson, capsys):
    lesson.debugging(quick=True)  # every demo catches its own error: this must not raise
    printed = capsys.readouterr().out
    assert printed.count("-> raised") >= 5  # static_assert and the four common errors
    assert "past the end" in printed  # the guard zones caught the unmasked store


def test_lesson_determinism_demo_runs(lesson, capsys):
    lesson.determinism(quick=True)
    assert "two passes" in capsys.readouterr().out


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.row_sum(torch.randn(4, 10))
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.bias_add(torch.randn(4, 10, device="cuda"), torch.randn(10))
