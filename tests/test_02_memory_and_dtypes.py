"""Lesson 02 (memory and data types): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/02_memory_and_dtypes.py; IMPL=solutions grades the answers.
"""

from collections import Counter

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.compiler import memory_ops
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl
from common.lessons import lesson_module

STEM = "02_memory_and_dtypes"
BLOCK = 1024
BLOCK_M, BLOCK_N = 32, 64
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
CAST_DTYPES = [torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
GPU_ONLY = pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has no bfloat16 "
                              "and its fp8 conversions differ from the GPU's")


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


def _shape_2d():
    # The interpreter runs one program after another: keep it small there. On the GPU, below
    # 1000 columns an unmasked tile store (a known-wrong answer below) overshoots by less than
    # 31 * 1000 + 63 elements, inside the 65536-element guard zone of poisoned_empty.
    hi = 1000 if common.HAS_GPU else 300
    return tuple(awkward_sizes(2, lo=17, hi=hi, include=()))


# --------------------------------------------------------------------------- the checks

def check_deinterleave(deinterleave):
    for dtype in DTYPES:
        for n in awkward_sizes(2, include=(1,)):
            for channels in (2, 3, 4):  # not 1: with one channel every mistake below is right
                x = randn(n * channels, dtype=dtype)
                out = poisoned_empty(channels, n, dtype=dtype)
                _same_output(deinterleave(x, channels, out=out), out, "deinterleave")
                items = x.double().view(n, channels)
                assert_close(out, items.t(), name=f"deinterleave n={n} channels={channels} {dtype}", mistakes={
                    "every row holds channel 0: add the channel c = tl.program_id(1) to the input index "
                    "(x[i * channels + c])": items[:, :1].t().expand(channels, n),
                    "x was read as if it were already planar (x[c * n + i]): item i of channel c is at "
                    "x[i * channels + c], a strided read": x.double().view(channels, n)})
    x = randn(3 * 777)
    assert_close(deinterleave(x, 3), x.double().view(777, 3).t(), name="deinterleave (out=None)")


def _round_toward_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype) rounded toward zero instead of to nearest: the RNE result, one step smaller
    in magnitude wherever it rounded up. Steps of the bit pattern are steps of magnitude."""
    nearest = x.to(dtype)
    bits = nearest.view(torch.int16)
    rounded_up = nearest.double().abs() > x.double().abs()
    return torch.where(rounded_up, bits - 1, bits).view(dtype)


def check_saturating_cast(saturating_cast):
    for dtype in CAST_DTYPES:
        limit = torch.finfo(dtype).max
        for n in awkward_sizes(3, include=(9,)):
            x = randn(n, scale=3e4)  # |x| > 65504 for about 3% of the values
            specials = torch.tensor([1e5, -1e5, 65519.0, 65520.0, -65520.0, 3.4e38, -3.4e38, 0.0, 1e-3])
            k = min(n, len(specials))
            x[:k] = specials[:k].to(x.device)
            out = poisoned_empty(n, dtype=dtype)
            _same_output(saturating_cast(x, dtype, out=out), out, "saturating_cast")
            clamped = x.clamp(-limit, limit)
            # Bit for bit: a correct cast rounds one way only.
            assert_close(out, clamped.to(dtype), name=f"saturating_cast n={n} to {dtype}", atol=0, rtol=0, mistakes={
                f"values beyond the {dtype} range became inf: clamp x to [-limit, limit] in fp32 "
                f"before converting": x.to(dtype),
                "values were rounded toward zero: convert with the default rounding (round to nearest "
                "even), not fp_downcast_rounding='rtz'": _round_toward_zero(clamped, dtype)})
    x = randn(500, scale=3e4)
    result = saturating_cast(x)
    if isinstance(result, torch.Tensor) and result.dtype != torch.float16:
        raise CheckError(f"saturating_cast(x) returned {result.dtype}, expected torch.float16: allocate the "
                         f"output with dtype=dtype (torch.empty_like(x) copies x's dtype, float32)")
    assert_close(result, x.clamp(-65504, 65504).half(), name="saturating_cast (out=None)", atol=0, rtol=0)
    try:
        saturating_cast(x, torch.int8)
    except TypeError:
        pass
    else:
        raise CheckError("saturating_cast(x, torch.int8) did not raise TypeError: the wrapper must reject "
                         "dtypes other than float16 and bfloat16")


def check_copy_2d(copy_2d):
    for dtype in DTYPES:
        m, n = _shape_2d()
        views = {
            "x = base[:, 5:5 + n] (rows further apart than n)": randn(m, n + 37, dtype=dtype)[:, 5:5 + n],
            "x = base[::2] (every other row)": randn(2 * m, n, dtype=dtype)[::2],
            "x = base.t() (a transpose)": randn(n, m, dtype=dtype).t(),
        }
        for what, x in views.items():
            out = poisoned_empty(m, n, dtype=dtype)
            _same_output(copy_2d(x, out=out), out, "copy_2d")
            # What a kernel that ignores one stride reads (as_strided stays inside x's storage here).
            mistakes = {}
            if x.stride(1) == 1:
                mistakes["the row stride was ignored: row m starts at x_ptr + m * stride_xm "
                          "(x.stride(0)), not m * n_cols"] = x.as_strided((m, n), (n, 1)).double()
            else:
                mistakes["the column stride was ignored: x[m, n] is at m * stride_xm + n * stride_xn, and "
                         "stride_xn (x.stride(1)) is not 1 for a transpose"] = x.as_strided((m, n), (x.stride(0), 1)).double()
            assert_close(out, x.double(), name=f"copy_2d {m}x{n} {dtype}, {what}", mistakes=mistakes)
    x = randn(40, 100)[:, :70]
    assert_close(copy_2d(x), x.double(), name="copy_2d (out=None)")
    try:
        copy_2d(randn(10))
    except ValueError:
        pass
    else:
        raise CheckError("copy_2d of a 1-D tensor did not raise ValueError: validate x.dim() == 2 "
                         "(common.check_tensors(..., ndim=2))")


EXERCISES = [
    Exercise("2.1", "deinterleave", check_deinterleave, kernels=("deinterleave_kernel",)),
    Exercise("2.2", "saturating_cast", check_saturating_cast, kernels=("saturating_cast_kernel",)),
    Exercise("2.3", "copy_2d", check_copy_2d, kernels=("copy_2d_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

@triton.jit
def _deinterleave_no_channel_kernel(x_ptr, out_ptr, n_items, channels, BLOCK_SIZE: tl.constexpr):
    c = tl.program_id(1)
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_items
    values = tl.load(x_ptr + offsets * channels, mask=mask)  # wrong: + c is missing
    tl.store(out_ptr + c * n_items + offsets, values, mask=mask)


@triton.jit
def _deinterleave_planar_kernel(x_ptr, out_ptr, n_items, channels, BLOCK_SIZE: tl.constexpr):
    c = tl.program_id(1)
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_items
    values = tl.load(x_ptr + c * n_items + offsets, mask=mask)  # wrong: reads x as if planar
    tl.store(out_ptr + c * n_items + offsets, values, mask=mask)


@triton.jit
def _deinterleave_unmasked_store_kernel(x_ptr, out_ptr, n_items, channels, BLOCK_SIZE: tl.constexpr):
    c = tl.program_id(1)
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_items
    values = tl.load(x_ptr + offsets * channels + c, mask=mask, other=0.0)
    tl.store(out_ptr + c * n_items + offsets, values)  # wrong: no mask, the last row runs past the end


def _deinterleave_with(kernel):
    def deinterleave(x, channels, out=None):
        n = x.numel() // channels
        out = torch.empty((channels, n), dtype=x.dtype, device=x.device) if out is None else out
        kernel[(triton.cdiv(n, BLOCK), channels)](x, out, n, channels, BLOCK_SIZE=BLOCK)
        return out
    return deinterleave


@triton.jit
def _cast_no_clamp_kernel(x_ptr, out_ptr, limit, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=mask)  # wrong: overflows to inf


@triton.jit
def _cast_rtz_kernel(x_ptr, out_ptr, limit, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    x = tl.minimum(tl.maximum(tl.load(x_ptr + offsets, mask=mask), -limit), limit)
    # wrong: rounds toward zero, not to nearest even
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtz"), mask=mask)


@triton.jit
def _cast_unmasked_store_kernel(x_ptr, out_ptr, limit, n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.minimum(tl.maximum(tl.load(x_ptr + offsets, mask=offsets < n, other=0.0), -limit), limit)
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty))  # wrong: no mask


def _saturating_cast_with(kernel, allocate=lambda x, dtype: torch.empty(x.shape, dtype=dtype, device=x.device)):
    def saturating_cast(x, dtype=torch.float16, out=None):
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"unsupported dtype {dtype}")
        out = allocate(x, dtype) if out is None else out
        kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, torch.finfo(dtype).max, x.numel(), BLOCK_SIZE=BLOCK)
        return out
    return saturating_cast


def _solution_saturating_cast_kernel():
    return load_impl(STEM, "solutions").saturating_cast_kernel


@triton.jit
def _copy_2d_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_xm, stride_xn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MISTAKE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    if MISTAKE == "row stride":  # wrong: rows assumed n_cols apart, as in a contiguous x
        src = rows[:, None] * n_cols + cols[None, :] * stride_xn
    elif MISTAKE == "column stride":  # wrong: columns assumed neighbours
        src = rows[:, None] * stride_xm + cols[None, :]
    else:
        src = rows[:, None] * stride_xm + cols[None, :] * stride_xn
    tile = tl.load(x_ptr + src, mask=mask, other=0.0)
    if MISTAKE == "store mask":  # wrong: the store of the last tiles runs past the end
        tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], tile)
    else:
        tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], tile, mask=mask)


def _copy_2d_with(mistake, grid_rows=triton.cdiv):
    def copy_2d(x, out=None):
        if x.dim() != 2:
            raise ValueError("x must be 2-D")
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        m, n = x.shape
        grid = (grid_rows(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _copy_2d_kernel[grid](x, out, m, n, x.stride(0), x.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                              MISTAKE=mistake)
        return out
    return copy_2d


KNOWN_WRONG = [
    ("deinterleave", "channel not added", lambda: _deinterleave_with(_deinterleave_no_channel_kernel),
     "holds channel 0"),
    ("deinterleave", "read as planar", lambda: _deinterleave_with(_deinterleave_planar_kernel), "planar"),
    ("deinterleave", "store not masked", lambda: _deinterleave_with(_deinterleave_unmasked_store_kernel),
     "past the end"),
    ("saturating_cast", "no clamp", lambda: _saturating_cast_with(_cast_no_clamp_kernel), "became inf"),
    ("saturating_cast", "rounds toward zero", lambda: _saturating_cast_with(_cast_rtz_kernel), "toward zero"),
    ("saturating_cast", "store not masked", lambda: _saturating_cast_with(_cast_unmasked_store_kernel),
     "past the end"),
    ("saturating_cast", "output allocated as float32",
     lambda: _saturating_cast_with(_solution_saturating_cast_kernel(), lambda x, dtype: torch.empty_like(x)),
     "allocate the output with dtype"),
    ("copy_2d", "row stride ignored", lambda: _copy_2d_with("row stride"), "row stride was ignored"),
    ("copy_2d", "column stride ignored", lambda: _copy_2d_with("column stride"), "column stride was ignored"),
    ("copy_2d", "store not masked", lambda: _copy_2d_with("store mask"), "past the end"),
    ("copy_2d", "grid rows // BLOCK_M", lambda: _copy_2d_with("none", lambda m, b: m // b), "never written"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy, on inf
@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("02")


COPY_DTYPES = [torch.float32, torch.float16, torch.int8]


@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=str)
def test_lesson_copy(lesson, dtype):
    for n in awkward_sizes(2, include=(1, 16, 4096)):
        x = lesson.make_input(n, dtype)
        for op in (lesson.copy, lesson.copy_split_tail):
            out = poisoned_empty(n, dtype=dtype)
            op(x, out=out)
            assert_close(out, x.double(), name=f"{op.__name__} n={n}")


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_lesson_copy_gpu_dtypes(lesson, dtype):
    if dtype != torch.bfloat16 and not common.supports_fp8():
        pytest.skip("needs an fp8-capable GPU (sm_89+)")
    for n in awkward_sizes(2, include=(1,)):
        x = lesson.make_input(n, dtype)
        out = common.poisoned_empty(n, dtype=dtype)
        lesson.copy(x, out=out)
        assert_close(out, x.cpu().double(), name=f"copy n={n} {dtype}")


@pytest.mark.parametrize("stride", [1, 2, 5, 16, 32])
def test_lesson_copy_strided(lesson, stride):
    n = awkward_sizes(1, include=())[0]
    x = randn(n * stride + 3)[1::stride][:n]
    out = poisoned_empty(n)
    lesson.copy_strided(x, out=out)
    assert_close(out, x.double(), name=f"copy_strided stride={stride}")


@pytest.mark.parametrize("shift", [0, 1, 2, 3, 4])
def test_lesson_copy_misaligned(lesson, shift):
    n = awkward_sizes(1, include=())[0]
    x = randn(n + shift)[shift:]
    out = poisoned_empty(n)
    lesson.copy(x, out=out)
    assert_close(out, x.double(), name=f"copy shifted by {shift}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lesson_cast(lesson, dtype):
    if dtype == torch.bfloat16 and not common.supports_bf16():
        pytest.skip("bfloat16 needs a GPU: the interpreter has no bfloat16 (numpy lacks it)")
    x = randn(3001, scale=10.0)
    out = poisoned_empty(3001, dtype=dtype)
    lesson.cast(x, dtype, out=out)
    assert_close(out, x.to(dtype), atol=0, rtol=0, name=f"cast to {dtype}")
    rtz = lesson.cast(x, dtype, rounding="rtz")
    assert_close(rtz, x.double(), name=f"cast to {dtype}, rtz")
    assert (rtz.double().abs() <= x.double().abs()).all(), "rtz rounded a magnitude up"
    assert (rtz != out).any(), "rtz gave the same bits as round-to-nearest on every value"


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_lesson_cast_fp8(lesson, dtype):
    if not common.supports_fp8():
        pytest.skip("needs an fp8-capable GPU (sm_89+)")
    x = randn(3001)
    out = common.poisoned_empty(3001, dtype=dtype)
    lesson.cast(x, dtype, out=out)
    assert_close(out, x.double(), name=f"cast to {dtype}")


@pytest.mark.parametrize("how", ["arg", "loaded", "loaded+max_contiguous", "loaded+multiple_of"])
def test_lesson_copy_slice(lesson, how):
    x = randn(5000)
    starts = (0, 32, 4096) if how == "loaded+multiple_of" else (0, 5, 33)
    for start in starts:
        n = awkward_sizes(1, lo=100, hi=900, include=())[0]
        out = poisoned_empty(n)
        lesson.copy_slice(x, start, n, how, out=out)
        assert_close(out, x[start:start + n].double(), name=f"copy_slice {how} start={start}")


def test_lesson_bad_input(lesson):
    x = randn(100)
    with pytest.raises(ValueError, match="contiguous"):
        lesson.copy(randn(200)[::2])
    with pytest.raises(ValueError, match="shape"):
        lesson.copy(x, out=randn(99))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lesson.copy([1.0, 2.0])
    with pytest.raises(ValueError, match="1 dimension"):
        lesson.copy_strided(randn(10, 10))
    with pytest.raises(TypeError, match="int8"):
        lesson.cast(x, torch.int8)
    with pytest.raises(TypeError, match="supports"):
        lesson.cast(x.to(torch.int32), torch.float16)
    with pytest.raises(ValueError, match="rtz"):
        lesson.cast(x, torch.float32, rounding="rtz")
    with pytest.raises(ValueError, match="outside"):
        lesson.copy_slice(x, 90, 20)
    with pytest.raises(ValueError, match="start % 16"):
        lesson.copy_slice(x, 5, 20, how="loaded+multiple_of")
    with pytest.raises(ValueError, match="how must be"):
        lesson.copy_slice(x, 0, 20, how="hinted")


@pytest.mark.skipif(common.HAS_GPU, reason="interpreter only: on a GPU the bf16 / fp8 casts run (tested above)")
def test_lesson_cast_refuses_gpu_only_dtypes_in_interpreter(lesson):
    with pytest.raises(TypeError, match="needs a GPU"):
        lesson.cast(randn(10), torch.bfloat16)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_copy_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.copy(torch.randn(10))


def test_lesson_models(lesson):
    assert lesson.sector_efficiency(1, 4) == 1.0
    assert lesson.sector_efficiency(8, 4) == lesson.sector_efficiency(32, 4) == 0.125
    assert lesson.warp_sectors(0) == 4 and lesson.warp_sectors(4) == 5 and lesson.warp_sectors(32) == 4
    ptx = ("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "ld.global.b32 %r5, [ %rd2 + 0 ];\n@%p2 st.global.v2.b32 [ %rd3 + 0 ], { %r6, %r7 };")

    loads, stores = memory_ops(ptx)  # what the lesson's access-width table reads
    assert loads == Counter({"128-bit ld.global": 1, "32-bit ld.global": 1})
    assert stores == Counter({"64-bit st.global": 1})
