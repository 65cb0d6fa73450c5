"""Lesson 01 (vector add): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/01_vector_add.py; IMPL=solutions grades the answers.
"""

import random

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl
from common.lessons import lesson_module

STEM = "01_vector_add"
BLOCK = 1024
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


# --------------------------------------------------------------------------- the checks

def check_axpy(axpy):
    for dtype in DTYPES:
        for n in awkward_sizes(3):
            a = random.uniform(-3, 3)
            x, y = randn(n, dtype=dtype), randn(n, dtype=dtype)
            out = poisoned_empty(n, dtype=dtype)
            _same_output(axpy(a, x, y, out=out), out, "axpy")
            assert_close(out, a * x.double() + y.double(), name=f"axpy n={n} {dtype}")
    x, y = randn(777), randn(777)
    assert_close(axpy(0.5, x, y), 0.5 * x.double() + y.double(), name="axpy (out=None)")


def check_clamp(clamp):
    for dtype in DTYPES:
        for n in awkward_sizes(3):
            lo = random.uniform(-1.5, -0.1)
            hi = random.uniform(0.1, 1.5)
            x = randn(n, dtype=dtype, scale=2.0)
            out = poisoned_empty(n, dtype=dtype)
            _same_output(clamp(x, lo, hi, out=out), out, "clamp")
            expected = x.double().clamp(lo, hi)
            assert_close(out, expected, name=f"clamp n={n} {dtype}", mistakes={
                "lo and hi are swapped (clamp is tl.minimum(tl.maximum(x, lo), hi))":
                    torch.full_like(expected, float(torch.tensor(hi, dtype=dtype)))})
    x = randn(100)
    assert_close(clamp(x, -0.5, 0.5), x.double().clamp(-0.5, 0.5), name="clamp (out=None)")
    try:
        clamp(x, 1.0, -1.0)
    except ValueError:
        pass
    else:
        raise CheckError("clamp(x, lo=1.0, hi=-1.0) returned instead of raising ValueError: "
                         "the wrapper must reject lo > hi")


def check_add_strided(add_strided):
    for dtype in DTYPES:
        for n in awkward_sizes(3):
            for sx, sy in ((3, 2), (1, 5)):
                x_base, y_base = randn(n * sx + 1, dtype=dtype), randn(n * sy, dtype=dtype)
                x, y = x_base[1::sx][:n], y_base[::sy][:n]  # x starts one element in
                out = poisoned_empty(n, dtype=dtype)
                _same_output(add_strided(x, y, out=out), out, "add_strided")
                assert_close(out, x.double() + y.double(), name=f"add_strided n={n} strides ({sx}, {sy})",
                             mistakes={"the strides were ignored: element i of x is at x_ptr + i * stride_x":
                                       x_base[1:n + 1].double() + y_base[:n].double()})


EXERCISES = [
    Exercise("1.1", "axpy", check_axpy, kernels=("axpy_kernel",)),
    Exercise("1.2", "clamp", check_clamp, kernels=("clamp_kernel",)),
    Exercise("1.3", "add_strided", check_add_strided, kernels=("add_strided_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

@triton.jit
def _axpy_unmasked_store_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, a * x + y)  # wrong: no mask, the last block writes past the end


@triton.jit
def _axpy_unmasked_load_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets)  # wrong: the last block reads past the end of x and y
    y = tl.load(y_ptr + offsets)
    tl.store(out_ptr + offsets, a * x + y, mask=offsets < n)  # the store is masked: the output is right


@triton.jit
def _axpy_no_store_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=offsets < n)  # wrong: computes nothing, stores nothing


@triton.jit
def _axpy_no_pid_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.arange(0, BLOCK_SIZE)  # wrong: every program handles block 0
    mask = offsets < n
    tl.store(out_ptr + offsets, a * tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask),
             mask=mask)


def _axpy_with(kernel, grid_of=lambda n: triton.cdiv(n, BLOCK), out_dtype=None):
    def axpy(a, x, y, out=None):
        out = torch.empty_like(x, dtype=out_dtype) if out is None else out
        kernel[(grid_of(x.numel()),)](x, y, out, a, x.numel(), BLOCK_SIZE=BLOCK)
        return out
    return axpy


@triton.jit
def _clamp_swapped_kernel(x_ptr, out_ptr, lo, hi, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.maximum(tl.minimum(tl.load(x_ptr + offsets, mask=mask), lo), hi), mask=mask)


def _axpy_into_y(a, x, y, out=None):
    """Wrong: the kernel writes a * x + y over y, and the result is copied out of y."""
    _solution_axpy_kernel()[(triton.cdiv(x.numel(), BLOCK),)](x, y, y, a, x.numel(), BLOCK_SIZE=BLOCK)
    return y.clone() if out is None else out.copy_(y)


def _solution_axpy_kernel():
    return load_impl(STEM, "solutions").axpy_kernel


def _clamp_with(kernel, validate, out_dtype=None):
    def clamp(x, lo, hi, out=None):
        if validate and lo > hi:
            raise ValueError("lo > hi")
        out = torch.empty_like(x, dtype=out_dtype) if out is None else out
        kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, lo, hi, x.numel(), BLOCK_SIZE=BLOCK)
        return out
    return clamp


@triton.jit
def _add_ignoring_stride_kernel(x_ptr, y_ptr, out_ptr, n, stride_x, stride_y, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)  # wrong: x[i] is at x_ptr + i * stride_x
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def _add_strided_ignoring_stride(x, y, out=None):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    _add_ignoring_stride_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, out, x.numel(), x.stride(0),
                                                                  y.stride(0), BLOCK_SIZE=BLOCK)
    return out


def _solution_clamp():
    return load_impl(STEM, "solutions").clamp_kernel


KNOWN_WRONG = [
    ("axpy", "tail not masked", lambda: _axpy_with(_axpy_unmasked_store_kernel), "past the end"),
    # Only the interpreter sees this one (the grader checks its loads' addresses; a GPU reads past the
    # end unseen, and the output is still right): on a GPU, compute-sanitizer is the tool.
    *([("axpy", "loads not masked", lambda: _axpy_with(_axpy_unmasked_load_kernel), "past the end of 'x_ptr'")]
      if common.INTERPRETER else []),
    ("axpy", "grid n // BLOCK", lambda: _axpy_with(load_impl(STEM, "solutions").axpy_kernel, lambda n: n // BLOCK),
     "grid is too small"),
    ("axpy", "writes nothing", lambda: _axpy_with(_axpy_no_store_kernel), "never written"),
    ("axpy", "offset without pid", lambda: _axpy_with(_axpy_no_pid_kernel), "pid * BLOCK_SIZE"),
    ("clamp", "lo and hi swapped", lambda: _clamp_with(_clamp_swapped_kernel, True), "swapped"),
    ("clamp", "no lo > hi check", lambda: _clamp_with(_solution_clamp(), False), "lo > hi"),
    ("add_strided", "stride ignored", lambda: _add_strided_ignoring_stride, "strides were ignored"),
    # Right values in the wrong dtype: a float64 reference alone would pass them (issue 19).
    ("axpy", "fp16 output for fp32 inputs", lambda: _axpy_with(_solution_axpy_kernel(), out_dtype=torch.float16),
     "dtype float16, expected float32"),
    ("axpy", "float64 output", lambda: _axpy_with(_solution_axpy_kernel(), out_dtype=torch.float64),
     "dtype float64, expected float32"),
    ("clamp", "int32 output", lambda: _clamp_with(_solution_clamp(), True, out_dtype=torch.int32),
     "dtype int32, expected float32"),
    ("axpy", "result written over y", lambda: _axpy_into_y, "changed its input 'y'"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("01")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_add_and_sub(lesson, dtype):
    for n in awkward_sizes(3):
        x, y = randn(n, dtype=dtype), randn(n, dtype=dtype)
        for op, expected in ((lesson.add, x.double() + y.double()), (lesson.sub, x.double() - y.double())):
            out = poisoned_empty(n, dtype=dtype)
            op(x, y, out=out)
            assert_close(out, expected, name=f"{op.__name__} n={n}")


@pytest.mark.parametrize("block_size", [64, 1024, 16384])
def test_lesson_add_block_sizes(lesson, block_size):
    x, y = randn(3001), randn(3001)
    assert_close(lesson.add(x, y, block_size), x.double() + y.double())


def test_lesson_add_bad_input(lesson):
    x = randn(100)
    with pytest.raises(ValueError, match="shape"):
        lesson.add(x, randn(99))
    with pytest.raises(TypeError, match="dtype"):
        lesson.add(x, randn(100, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        lesson.add(randn(200)[::2], randn(100))
    with pytest.raises(ValueError, match="power of 2"):
        lesson.add(x, x, block_size=1000)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lesson.add([1.0, 2.0], x)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_add_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.add(torch.randn(10), torch.randn(10, device="cuda"))


# --------------------------------------------------------------------------- CUDA C++ side by side

def test_side_by_side_counts_lines_and_says_why_cuda_is_not_built(lesson, capsys):
    lines = lesson._source_lines()
    assert set(lines) == set(lesson.SIDE_BY_SIDE_DECISIONS)
    # the float4 version is the scalar one plus a kernel: it must count more lines
    assert 0 < lines["cuda add, 1 float/thread"] < lines["cuda add, float4"], lines
    lesson.side_by_side()
    printed = capsys.readouterr().out
    reason = common.cuda_unavailable()
    assert (f"not built or run here ({reason})" in printed) if reason else "matches PyTorch" in printed


def test_code_lines_skips_blanks_comments_and_docstrings():
    source = 'def f():\n    """Doc\n    more doc\n    """\n    # a comment\n\n    return 1  # counted\n// c++ comment\nint x;\n'
    assert common.code_lines(source) == 3


@pytest.mark.skipif(bool(common.cuda_unavailable()), reason=common.cuda_unavailable() or "runs")
@pytest.mark.parametrize("vec4", [False, True])
def test_cuda_add_matches_and_checks_its_input(lesson, vec4):
    for n in awkward_sizes(3, include=(1, 3, 5)):
        x, y = randn(n), randn(n)
        out = poisoned_empty(n)
        lesson.cuda_add(x, y, vec4, out=out)
        assert_close(out, x.double() + y.double(), name=f"cuda add n={n}")
    x, y = randn(1001), randn(1001)
    assert_close(lesson.cuda_add(x[1:], y[1:], vec4), x[1:].double() + y[1:].double(), name="misaligned")
    with pytest.raises(RuntimeError, match="float32"):
        lesson.cuda_add(x.half(), y.half(), vec4)
