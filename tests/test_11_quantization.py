"""Lesson 11 (quantization): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/11_quantization.py; IMPL=solutions grades the answers.
"""

import functools

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.checks import check_guards
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl, solution_with, with_flags
from common.lessons import lesson_module

STEM = "11_quantization"
FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


def _rows() -> int:
    return int(torch.randint(3, 10 if common.INTERPRETER else 200, ()).item())


def _name(dtype) -> str:
    return common.dtype_name(dtype)


def _round_tolerant(q: torch.Tensor, y: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """q with the values next to a rounding tie of y (within 1e-3) replaced by `expected` when they
    are off by at most 1: there fp32 and float64 division may round to different sides."""
    near_tie = ((y - y.floor()) - 0.5).abs() < 1e-3
    return torch.where(near_tie & ((q.double().cpu() - expected).abs() <= 1), expected, q.double().cpu())


# --------------------------------------------------------------------------- 11.1 per-row INT8

def _int8_rows_case(x: torch.Tensor, clip_ratio: float, quantize, name: str) -> None:
    n_rows, n_cols = x.shape
    q = poisoned_empty(n_rows, n_cols, dtype=torch.int8)
    scale = poisoned_empty(n_rows)
    result = quantize(x, clip_ratio, q_out=q, scale_out=scale)
    if not isinstance(result, tuple) or len(result) != 2:
        raise CheckError("quantize_rows_int8 must return (q, scale)")
    x64 = x.double().cpu()
    amax = x64.abs().amax(dim=1)
    scale_ref = torch.where(amax > 0, clip_ratio * amax / 127, torch.ones_like(amax))
    signed_max = x64.amax(dim=1)
    zero_rows = amax == 0
    assert_close(scale, scale_ref, name=f"{name}: scale", mistakes={
        "the scale divides by 128: the symmetric int8 range is [-127, 127], so scale = amax / 127":
            torch.where(amax > 0, clip_ratio * amax / 128, torch.ones_like(amax)),
        "the scale comes from max(x), not max(|x|): a row whose largest magnitude is negative gets "
        "the wrong scale (take tl.abs before the max)":
            torch.where(amax > 0, clip_ratio * signed_max.clamp_min(0) / 127, torch.ones_like(amax)),
        "one scale for the whole tensor: per-row quantization needs each row's own amax":
            torch.full_like(amax, clip_ratio * float(amax.max()) / 127),
        "the clip_ratio was ignored: scale = clip_ratio * amax / 127": torch.where(amax > 0, amax / 127,
                                                                                 torch.ones_like(amax)),
        "an all-zero row got scale 0 (then q = 0 / 0): use scale 1.0 when amax is 0":
            torch.where(zero_rows, torch.zeros_like(amax), scale_ref),
    })
    check_guards(q, f"{name}: q")
    s = scale_ref[:, None]
    y = x64 / s
    expected = torch.round(y).clamp(-127, 127)
    qd = q.double().cpu()
    clipped = y.abs() > 127.5
    if (qd == -128).any() or ((qd.abs() != 127) & clipped).any():
        raise CheckError(f"{name}: values past +-127 (x / scale beyond the clip) were not clamped to "
                         f"[-127, 127]; clamp before the int8 cast (an out-of-range cast wraps or "
                         f"saturates to -128)")
    # Where |x / scale| has a fraction between 0.501 and 0.999, rounding and truncation differ by
    # one whatever the division's last bit: if q always took the lower magnitude there, it truncated.
    frac = y.abs() - y.abs().floor()
    decisive = (frac > 0.501) & (frac < 0.999) & (y.abs() < 127)
    if decisive.sum() > 10 and (qd[decisive] == torch.trunc(y)[decisive]).double().mean() > 0.9:
        raise CheckError(f"{name}: q was truncated toward zero (x.to(tl.int8) truncates: 2.7 -> 2): round with "
                         f"round_half_to_even first")
    assert_close(_round_tolerant(q, y, expected).to(torch.int8), expected.to(torch.int8), name=f"{name}: q")


def check_quantize_rows_int8(quantize):
    for dtype in (torch.float32, torch.float16):
        for i, n_cols in enumerate(awkward_sizes(2, lo=300, hi=5000, include=(7,))):
            n_rows = _rows()
            base = randn(n_rows, n_cols + 5, dtype=dtype, scale=2.0)
            x = base[:, :n_cols] if i % 2 == 0 else base[:, :n_cols].contiguous()  # padded rows, then contiguous
            x[0] = 0.0  # an all-zero row
            if n_rows > 1 and n_cols > 1:
                x[1, n_cols // 2] = -8.0  # the row's largest magnitude is negative
            for clip_ratio in (1.0, 0.8):
                _int8_rows_case(x, clip_ratio, quantize, f"quantize_rows_int8 {n_rows}x{n_cols} {_name(dtype)} "
                                f"clip_ratio={clip_ratio}{' (padded rows)' if i % 2 == 0 else ''}")


# --------------------------------------------------------------------------- 11.2 grouped W8A16 GEMV

def _grouped_problem(n, k, group, dtype, scale_dtype, pad):
    base = randn(n, k + pad, scale=k ** -0.5)
    w = base[:, :k].double().cpu()
    amax = w.reshape(n, k // group, group).abs().amax(dim=2)
    scales64 = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q64 = torch.round(w / scales64.repeat_interleave(group, dim=1)).clamp(-127, 127)
    padded = torch.full((n, k + pad), 0, dtype=torch.int8)
    padded[:, :k] = q64.to(torch.int8)
    padded[:, k:] = torch.randint(-127, 128, (n, pad), dtype=torch.int8)  # junk in the padding
    w_q = padded.to(common.DEVICE)[:, :k] if pad else padded.to(common.DEVICE).contiguous()
    scales = scales64.to(scale_dtype).to(common.DEVICE)
    x = randn(k, dtype=dtype)
    return x, w_q, scales, padded


def check_w8a16_gemv_grouped(gemv):
    cases = [(torch.float32, torch.float32, 64, 8), (torch.float16, torch.float16, 128, 0),
             (torch.float32, torch.float16, 32, 0)]
    for dtype, scale_dtype, group, pad in cases:
        n = awkward_sizes(1, lo=100, hi=2000 if common.INTERPRETER else 5000, include=())[0]
        k = group * int(torch.randint(3, 12, ()).item())
        x, w_q, scales, padded = _grouped_problem(n, k, group, dtype, scale_dtype, pad)
        name = f"w8a16_gemv_grouped N={n} K={k} G={group} {_name(dtype)} x, {_name(scale_dtype)} scales" + \
            (f", rows padded to {k + pad}" if pad else "")
        out = poisoned_empty(n, dtype=dtype)
        result = gemv(x, w_q, scales, group, out=out)
        if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
            raise CheckError(f"{name}: given out=, the wrapper must write into it and return it")
        x64, q64, s64 = x.double().cpu(), w_q.double().cpu(), scales.double().cpu()
        per_group = (q64.reshape(n, -1, group) * x64.reshape(1, -1, group)).sum(dim=2)  # (N, K / G)
        ref = (per_group * s64).sum(dim=1)
        flat = padded.flatten()[:n * k].reshape(n, k).double()  # w read with stride K, not K + pad
        mistakes = {
            "the scales were not applied: multiply each group's sum by scales[n, g]": per_group.sum(dim=1),
            "every group used the scale of group 0: the scale changes along K, load scales[n, g] for each "
            "group g": per_group.sum(dim=1) * s64[:, 0],
        }
        if pad:
            mistakes["w was read with row stride K instead of stride_wn: its rows are padded, row n starts "
                     "at w_ptr + n * stride_wn"] = ((flat.reshape(n, -1, group) * x64.reshape(1, -1, group)).sum(2)
                                                   * s64).sum(dim=1)
        assert_close(out, ref, name=name, mistakes=mistakes)


# --------------------------------------------------------------------------- 11.3 FP8 per-row quantize

def _fp8_case(quantize, x: torch.Tensor, fmt: str, out_dtype: torch.dtype, name: str) -> None:
    dtype, fmax = FP8[fmt]
    n_rows, n_cols = x.shape
    out = poisoned_empty(n_rows, n_cols, dtype=out_dtype)
    scale = poisoned_empty(n_rows)
    result = quantize(x, fmt, out=out, scale_out=scale)
    if not isinstance(result, tuple) or len(result) != 2:
        raise CheckError("fp8_quantize_rows must return (q, scale)")
    x64 = x.double().cpu()
    amax = x64.abs().amax(dim=1)
    ones = torch.ones_like(amax)
    scale_ref = torch.where(amax > 0, amax / fmax, ones)
    other_max = 57344.0 if fmt == "e4m3" else 448.0
    assert_close(scale, scale_ref, name=f"{name}: scale", mistakes={
        f"the scale used {other_max:g}, the largest value of the other format: {fmt}'s is {fmax:g}":
            torch.where(amax > 0, amax / other_max, ones),
        "the scale is amax itself: divide by the format's largest value (scale = amax / FP8_MAX) so the "
        "row's amax lands on FP8_MAX": torch.where(amax > 0, amax, ones),
        "the scale used 127, int8's largest value: fp8's is FP8_MAX": torch.where(amax > 0, amax / 127, ones),
        "one scale for the whole tensor: per-row (per-token) scaling needs each row's own amax":
            torch.full_like(amax, float(amax.max()) / fmax),
        "the scale comes from max(x), not max(|x|)": torch.where(amax > 0, x64.amax(dim=1).clamp_min(0) / fmax, ones),
        "an all-zero row got scale 0: use scale 1.0 when amax is 0 (0 / 0 is NaN)":
            torch.where(amax > 0, scale_ref, torch.zeros_like(amax)),
    })
    check_guards(out, f"{name}: q")
    expected = (x64 / scale_ref[:, None]).clamp(-fmax, fmax)
    values = out.double().cpu()
    if torch.isfinite(values).all() and (values.abs() > fmax * (1 + 1e-6)).any():
        raise CheckError(f"{name}: values beyond +-{fmax:g}, {fmt}'s largest value: saturate x / scale to "
                         f"[-FP8_MAX, FP8_MAX] before the store")
    assert_close(out, expected, name=f"{name}: q", mistakes={
        "q = x * scale: quantizing divides by the scale (x ~ q * scale)": (x64 * scale_ref[:, None]).clamp(-fmax, fmax)})


def check_fp8_quantize_rows(quantize):
    with pytest.raises(ValueError, match="fmt"):
        quantize(randn(4, 32), "e3m4")
    for fmt in FP8:
        for n_cols in awkward_sizes(1, lo=100, hi=3000, include=(5,)):
            n_rows = _rows()
            base = randn(n_rows, n_cols + 3, scale=4.0)
            x = base[:, :n_cols]  # padded rows
            x[0] = 0.0
            if n_cols > 1:
                x[-1, n_cols - 1] = -30.0  # a negative amax, in the last column
            _fp8_case(quantize, x, fmt, torch.float32, f"fp8_quantize_rows {fmt} {n_rows}x{n_cols} (fp32 out)")
            if common.supports_fp8():
                _fp8_case(quantize, x.contiguous(), fmt, FP8[fmt][0], f"fp8_quantize_rows {fmt} {n_rows}x{n_cols}")
    if common.supports_fp8():  # out=None: the format's own dtype
        q, _ = quantize(randn(3, 40), "e5m2")
        if q.dtype != torch.float8_e5m2:
            raise CheckError(f"fp8_quantize_rows(x, 'e5m2') must return float8_e5m2 values, got {q.dtype}")


def _check_fp8_quantize_rows(quantize):
    # pytest.raises inside a grader check: turn "did not raise" into a diagnosis, not a crash.
    try:
        check_fp8_quantize_rows(quantize)
    except pytest.fail.Exception as err:
        raise CheckError(f"fp8_quantize_rows(x, 'e3m4') must raise ValueError naming fmt ({err})") from None


# --------------------------------------------------------------------------- 11.4 W4A16 GEMV

def _unpack_int4_64(w_packed: torch.Tensor) -> torch.Tensor:
    """The nibbles u (N, K) in k order, as float64: byte j = u[2j] | u[2j + 1] << 4."""
    b = w_packed.cpu().to(torch.int64)
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(b.shape[0], -1).double()


def _int4_problem(n, k, pad):
    u = torch.randint(1, 16, (n, k))  # q + 8 for q in [-7, 7]
    u[0, :] = 8  # a row of zeros (q = 0)
    u[-1, :2] = torch.tensor([1, 15])  # the extremes, in the first byte of the last row
    packed = torch.randint(0, 256, (n, k // 2 + pad), dtype=torch.uint8)  # junk in the padding
    packed[:, :k // 2] = (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)
    packed = packed.to(common.DEVICE)
    w_packed = packed[:, :k // 2] if pad else packed.contiguous()
    # scales of different sizes per group (as per-group amaxes are), so group 0's scale is not the others'
    scales = (torch.rand(n, k // 128) * 0.03 + 0.002).to(torch.float16).to(common.DEVICE)
    return w_packed, scales, packed


def check_w4a16_gemv(gemv):
    cases = [(1, torch.float16, 0), (3, torch.float32, 16)]
    for m, dtype, pad in cases:
        n = awkward_sizes(1, lo=20, hi=90 if common.INTERPRETER else 3000, include=(37,))[0]
        k = 128 * int(torch.randint(2, 5, ()).item())  # 256 to 512: a few groups
        w_packed, scales, padded = _int4_problem(n, k, pad)
        x = randn(m, k, dtype=dtype)
        name = f"w4a16_gemv M={m} N={n} K={k} {_name(dtype)} x" + (f", rows padded to {k // 2 + pad} bytes" if pad else "")
        out = poisoned_empty(m, n, dtype=dtype)
        result = gemv(x, w_packed, scales, out=out)
        if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
            raise CheckError(f"{name}: given out=, the wrapper must write into it and return it")
        x64, u, s64 = x.double().cpu(), _unpack_int4_64(w_packed), scales.double().cpu()
        g = k // 128

        def gemv64(w_int, sc):  # sum_g sc[n, g] * sum_{k in g} x[m, k] * w_int[n, k]
            return torch.einsum("mgk,ngk,ng->mn", x64.reshape(m, g, 128), w_int.reshape(n, g, 128), sc)
        ref = gemv64(u - 8, s64)
        swapped = torch.stack((u[:, 1::2], u[:, 0::2]), dim=-1).reshape(n, k)
        mistakes = {
            "the nibbles are in the wrong order: the LOW nibble (b & 15) is the even k = 2j, the high one "
            "(b >> 4) is k = 2j + 1": gemv64(swapped - 8, s64),
            "the zero point was not subtracted: the nibble u holds q + 8, the weight is (u - 8) * scale":
                gemv64(u, s64),
            "every group used the scale of group 0: one scale per row is per-channel, these scales change "
            "along K (load scales[n, g] for each group g)": gemv64(u - 8, s64[:, :1].expand(n, g)),
            "the scales were not applied: multiply each group's sum by scales[n, g]":
                gemv64(u - 8, torch.ones_like(s64)),
        }
        if pad:
            flat = _unpack_int4_64(padded.flatten()[:n * k // 2].reshape(n, k // 2))
            mistakes["w was read with row stride K / 2 instead of stride_wn: its rows are padded, row n starts "
                     "at w_ptr + n * stride_wn"] = gemv64(flat - 8, s64)
        assert_close(out, ref, name=name, mistakes=mistakes)


EXERCISES = [
    Exercise("11.1", "quantize_rows_int8", check_quantize_rows_int8, kernels=("quantize_rows_int8_kernel",)),
    Exercise("11.2", "w8a16_gemv_grouped", check_w8a16_gemv_grouped, kernels=("w8a16_gemv_grouped_kernel",)),
    Exercise("11.3", "fp8_quantize_rows", _check_fp8_quantize_rows, kernels=("fp8_quantize_rows_kernel",)),
    Exercise("11.4", "w4a16_gemv", check_w4a16_gemv, kernels=("w4a16_gemv_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

@functools.cache
def _solutions():
    return load_impl(STEM, "solutions")


@triton.jit
def _rne(y):
    f = tl.floor(y)
    d = y - f
    r = tl.where(d > 0.5, f + 1.0, f)
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d == 0.5) & odd, f + 1.0, r)


@triton.jit
def _int8_rows_wrong_kernel(x_ptr, q_ptr, scale_ptr, stride_xm, n_cols, clip_ratio, BLOCK_SIZE: tl.constexpr,
                            QMAX: tl.constexpr = 127.0, ABS: tl.constexpr = True, ROUND: tl.constexpr = True,
                            CLAMP: tl.constexpr = True, CLIP: tl.constexpr = True, ZERO_GUARD: tl.constexpr = True):
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    x_row = x_ptr + row * stride_xm
    amax = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
        if ABS:
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        else:  # wrong: max, not max |x|
            amax = tl.maximum(amax, tl.max(x, axis=0))
    ratio = clip_ratio if CLIP else 1.0  # wrong when CLIP is False
    scale = ratio * amax / QMAX  # wrong when QMAX is 128
    if ZERO_GUARD:
        scale = tl.where(amax > 0, scale, 1.0)
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = x / scale
        if ROUND:
            y = _rne(y)
        if CLAMP:
            y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        tl.store(q_ptr + row * n_cols + start + cols, y.to(tl.int8), mask=mask)  # truncates when not rounded
    tl.store(scale_ptr + row, scale)


@triton.jit
def _int8_rows_per_tensor_kernel(x_ptr, q_ptr, scale_ptr, stride_xm, n_cols, clip_ratio, n_rows,
                                 BLOCK_SIZE: tl.constexpr):
    # wrong: every row scans the whole tensor and uses its amax
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    amax = 0.0
    for r in range(0, n_rows):
        for start in range(0, n_cols, BLOCK_SIZE):
            x = tl.load(x_ptr + r * stride_xm + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.where(amax > 0, clip_ratio * amax / 127.0, 1.0)
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        x = tl.load(x_ptr + row * stride_xm + start + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rne(x / scale), -127.0), 127.0)
        tl.store(q_ptr + row * n_cols + start + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def _per_tensor_launcher():
    class Launcher:
        def __getitem__(self, grid):
            def launch(x, q, scale, stride_xm, n_cols, clip_ratio, BLOCK_SIZE):
                _int8_rows_per_tensor_kernel[grid](x, q, scale, stride_xm, n_cols, clip_ratio, x.shape[0],
                                                   BLOCK_SIZE=BLOCK_SIZE)
            return launch
    return Launcher()


@triton.jit
def _gemv_grouped_wrong_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, stride_wn, stride_sn,
                               GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SCALE: tl.constexpr = True,
                               GROUP0_SCALE: tl.constexpr = False, MASK_STORE: tl.constexpr = True,
                               ACC_FP16: tl.constexpr = False, STRIDE_K: tl.constexpr = False):
    offs_n = tl.program_id(axis=0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, GROUP_SIZE)
    mask_n = offs_n < N
    row_stride = K if STRIDE_K else stride_wn  # wrong when STRIDE_K: ignores padded rows
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * row_stride + offs_k[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float16 if ACC_FP16 else tl.float32)
    for g in range(0, K // GROUP_SIZE):
        x = tl.load(x_ptr + g * GROUP_SIZE + offs_k).to(tl.float32)
        w = tl.load(w_ptrs + g * GROUP_SIZE, mask=mask_n[:, None], other=0).to(tl.float32)
        part = tl.sum(w * x[None, :], axis=1)
        if SCALE:
            if GROUP0_SCALE:  # wrong: the scale of group 0 for every group
                part = part * tl.load(scale_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
            else:
                part = part * tl.load(scale_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        acc += part.to(acc.dtype)  # wrong when ACC_FP16: fp16 running sums
    if MASK_STORE:
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:  # wrong: the last program writes past N
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty))


def _gemv_floor_grid(x, w_q, scales, group_size, out=None):
    """The solution's wrapper with a grid of N // BLOCK_N programs: the last channels are never computed."""
    sol = _solutions()
    n, k = w_q.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device) if out is None else out
    sol.w8a16_gemv_grouped_kernel[(n // sol.GEMV_BLOCK_N,)](x, w_q, scales, out, n, k, w_q.stride(0), scales.stride(0),
                                                            GROUP_SIZE=group_size, BLOCK_N=sol.GEMV_BLOCK_N)
    return out


@triton.jit
def _fp8_rows_wrong_kernel(x_ptr, q_ptr, scale_ptr, stride_xm, n_cols, FP8_MAX: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           DIVIDE_MAX: tl.constexpr = True, MULTIPLY: tl.constexpr = False,
                           SATURATE: tl.constexpr = True, ZERO_GUARD: tl.constexpr = True,
                           ABS: tl.constexpr = True):
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0) if ABS else tl.max(tl.where(mask, x, 0.0), axis=0)  # wrong when not ABS
    scale = amax / FP8_MAX if DIVIDE_MAX else amax  # wrong when not DIVIDE_MAX
    if ZERO_GUARD:
        scale = tl.where(amax > 0, scale, 1.0)
    y = x * scale if MULTIPLY else x / scale  # wrong when MULTIPLY
    if SATURATE:
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * n_cols + cols, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def _fp8_max_swapped(x, fmt="e4m3", out=None, scale_out=None):
    """The solution's wrapper with the other format's largest value."""
    sol = _solutions()
    if fmt not in sol.FP8_FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}")
    dtype, _ = sol.FP8_FORMATS[fmt]
    wrong_max = 57344.0 if fmt == "e4m3" else 448.0
    n_rows, n_cols = x.shape
    out = torch.empty(n_rows, n_cols, dtype=dtype, device=x.device) if out is None else out
    scale_out = torch.empty(n_rows, dtype=torch.float32, device=x.device) if scale_out is None else scale_out
    sol.fp8_quantize_rows_kernel[(n_rows,)](x, out, scale_out, x.stride(0), n_cols, FP8_MAX=wrong_max,
                                            BLOCK_SIZE=max(16, triton.next_power_of_2(n_cols)))
    return out, scale_out


def _fp8_no_fmt_check(x, fmt="e4m3", out=None, scale_out=None):
    return _solutions().fp8_quantize_rows(x, fmt if fmt in ("e4m3", "e5m2") else "e4m3", out, scale_out)


@triton.jit
def _w4a16_wrong_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_sn,
                        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr = False,
                        ZERO: tl.constexpr = True, GROUP0_SCALE: tl.constexpr = False,
                        MASK_STORE: tl.constexpr = True, ACC_FP16: tl.constexpr = False):
    offs_n = tl.program_id(axis=0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(axis=1).to(tl.int64)
    offs_b = tl.arange(0, GROUP_SIZE // 2)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float16 if ACC_FP16 else tl.float32)
    for g in range(0, K // GROUP_SIZE):
        b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + g * (GROUP_SIZE // 2) + offs_b[None, :],
                    mask=mask_n[:, None], other=0)
        x_even = tl.load(x_ptr + row * stride_xm + g * GROUP_SIZE + 2 * offs_b).to(tl.float32)
        x_odd = tl.load(x_ptr + row * stride_xm + g * GROUP_SIZE + 2 * offs_b + 1).to(tl.float32)
        group = 0 if GROUP0_SCALE else g  # wrong when GROUP0_SCALE: one scale per row
        s = tl.load(scale_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0).to(tl.float32)
        zero = 8.0 if ZERO else 0.0  # wrong when not ZERO
        lo = (b & 15).to(tl.float32) - zero
        hi = (b >> 4).to(tl.float32) - zero
        if SWAP:  # wrong: the high nibble taken as the even k
            lo, hi = hi, lo
        part = tl.sum(lo * x_even[None, :] + hi * x_odd[None, :], axis=1) * s
        acc += part.to(acc.dtype)  # wrong when ACC_FP16: fp16 running sums
    if MASK_STORE:
        tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:  # wrong: the last program writes past N
        tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty))


def _w4a16_wrong(**flags):
    return solution_with(STEM, w4a16_gemv_kernel=with_flags(_w4a16_wrong_kernel, **flags)).w4a16_gemv


def _w4a16_row_stride_half_k(x, w_packed, scales, out=None):
    """The solution's wrapper, launching with row stride K / 2 instead of the weight's own."""
    sol = _solutions()
    m, k = x.shape
    n = w_packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    sol.w4a16_gemv_kernel[(triton.cdiv(n, sol.W4A16_BLOCK_N), m)](
        x, w_packed, scales, out, n, k, x.stride(0), k // 2, scales.stride(0), GROUP_SIZE=128,
        BLOCK_N=sol.W4A16_BLOCK_N)
    return out


def _int8_wrong(**flags):
    return solution_with(STEM, quantize_rows_int8_kernel=with_flags(_int8_rows_wrong_kernel, **flags)).quantize_rows_int8


def _gemv_wrong(**flags):
    return solution_with(STEM, w8a16_gemv_grouped_kernel=with_flags(_gemv_grouped_wrong_kernel, **flags)).w8a16_gemv_grouped


def _fp8_wrong(**flags):
    return solution_with(STEM, fp8_quantize_rows_kernel=with_flags(_fp8_rows_wrong_kernel, **flags)).fp8_quantize_rows


KNOWN_WRONG = [
    ("quantize_rows_int8", "scale = amax / 128", lambda: _int8_wrong(QMAX=128.0), "divides by 128"),
    ("quantize_rows_int8", "max instead of abs max", lambda: _int8_wrong(ABS=False), "max(|x|)"),
    ("quantize_rows_int8", "truncation instead of rounding", lambda: _int8_wrong(ROUND=False), "truncated toward zero"),
    ("quantize_rows_int8", "no clamp", lambda: _int8_wrong(CLAMP=False), "not clamped"),
    ("quantize_rows_int8", "clip_ratio ignored", lambda: _int8_wrong(CLIP=False), "clip_ratio was ignored"),
    ("quantize_rows_int8", "zero row divides by zero", lambda: _int8_wrong(ZERO_GUARD=False), "all-zero row"),
    ("quantize_rows_int8", "per-tensor scale",
     lambda: solution_with(STEM, quantize_rows_int8_kernel=_per_tensor_launcher()).quantize_rows_int8, "whole tensor"),
    ("w8a16_gemv_grouped", "scale not applied", lambda: _gemv_wrong(SCALE=False), "scales were not applied"),
    ("w8a16_gemv_grouped", "group 0's scale everywhere", lambda: _gemv_wrong(GROUP0_SCALE=True), "scale of group 0"),
    ("w8a16_gemv_grouped", "tail store not masked", lambda: _gemv_wrong(MASK_STORE=False), "past the end"),
    ("w8a16_gemv_grouped", "fp16 accumulator", lambda: _gemv_wrong(ACC_FP16=True), "accumulate in tl.float32"),
    ("w8a16_gemv_grouped", "row stride K instead of stride_wn", lambda: _gemv_wrong(STRIDE_K=True), "stride_wn"),
    ("w8a16_gemv_grouped", "grid N // BLOCK_N", lambda: _gemv_floor_grid, "never written"),
    ("fp8_quantize_rows", "scale = amax", lambda: _fp8_wrong(DIVIDE_MAX=False), "scale is amax itself"),
    ("fp8_quantize_rows", "x * scale", lambda: _fp8_wrong(MULTIPLY=True), "divides by the scale"),
    ("fp8_quantize_rows", "zero row divides by zero", lambda: _fp8_wrong(ZERO_GUARD=False), "all-zero row"),
    ("fp8_quantize_rows", "max instead of abs max", lambda: _fp8_wrong(ABS=False), "max(|x|)"),
    ("fp8_quantize_rows", "the other format's max", lambda: _fp8_max_swapped, "largest value of the other format"),
    ("fp8_quantize_rows", "unknown fmt accepted", lambda: _fp8_no_fmt_check, "ValueError"),
    ("w4a16_gemv", "nibbles in the wrong order", lambda: _w4a16_wrong(SWAP=True), "wrong order"),
    ("w4a16_gemv", "zero point not subtracted", lambda: _w4a16_wrong(ZERO=False), "zero point"),
    ("w4a16_gemv", "one scale per row, not per group", lambda: _w4a16_wrong(GROUP0_SCALE=True), "scale of group 0"),
    ("w4a16_gemv", "tail store not masked", lambda: _w4a16_wrong(MASK_STORE=False), "past the end"),
    ("w4a16_gemv", "fp16 accumulator", lambda: _w4a16_wrong(ACC_FP16=True), "accumulate in tl.float32"),
    ("w4a16_gemv", "row stride K / 2 instead of stride_wn", lambda: _w4a16_row_stride_half_k, "stride_wn"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    # The awkward shapes below would each autotune on a GPU (every config compiled and timed):
    # the lesson's checks run the first config only, and so do these tests, but one.
    module = lesson_module("11")
    with module.first_config_only():
        yield module


def test_lesson_first_config_only_matches_the_tuned_launch(lesson):
    """The autotuned path (what the benchmarks and a learner's calls run) against the checks' one."""
    n, k = 300, 512
    w_q, scale = lesson.random_weight(n, k)
    x = randn(1, k, dtype=torch.float16)
    w_packed, scales = lesson.quantize_int4_groups(randn(n, k, dtype=torch.float16))
    first = lesson.w8a16_gemv(x, w_q, scale), lesson.w4a16_gemv(x, w_packed, scales)
    lesson._FIRST_CONFIG_ONLY[0] = False
    try:
        tuned = lesson.w8a16_gemv(x, w_q, scale), lesson.w4a16_gemv(x, w_packed, scales)
    finally:
        lesson._FIRST_CONFIG_ONLY[0] = True
    for a, b, name in zip(first, tuned, ("w8a16_gemv", "w4a16_gemv")):
        assert_close(a, b.double(), name=f"{name}: first config vs tuned", atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("granularity,group_size", [("tensor", 0), ("row", 0), ("group", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_name)
def test_lesson_quantize_int8(lesson, granularity, group_size, dtype):
    rows = _rows()
    n_cols = group_size * int(torch.randint(2, 9, ()).item()) if group_size else awkward_sizes(1, 100, 3000, include=())[0]
    x = randn(rows, n_cols, dtype=dtype, scale=3.0)
    x[-1] = 0.0
    q = poisoned_empty(rows, n_cols, dtype=torch.int8)
    shape = {"tensor": (), "row": (rows,), "group": (rows, n_cols // max(group_size, 1))}[granularity]
    scale = poisoned_empty(*shape)
    lesson.quantize_int8(x, granularity, group_size or 128, q_out=q, scale_out=scale)
    _, scale_ref = lesson.quantize_int8_reference(x.double(), granularity, group_size or 128)
    group_len = {"tensor": x.numel(), "row": n_cols, "group": group_size}[granularity]
    lesson.check_int8(q, scale, x, scale_ref, group_len, f"quantize_int8 {granularity}")
    out = poisoned_empty(rows, n_cols)
    lesson.dequantize(q, scale, out=out)  # group_len read from the number of scales
    assert_close(out, lesson.dequantize_reference(q, scale.double(), group_len, torch.float64), name="dequantize")


def test_lesson_round_half_to_even(lesson):
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 126.5, -126.5, 3.0, -0.0], device=common.DEVICE)
    q, scale = lesson.quantize_int8(torch.cat([x, torch.tensor([127.0], device=common.DEVICE)]).reshape(1, -1), "row")
    assert float(scale) == 1.0
    assert q.flatten()[:-1].tolist() == torch.round(x).to(torch.int8).tolist()


def test_lesson_fp8_quantize_scaled_values(lesson):
    x = randn(57, 301, scale=7.0)
    for fmt, (dtype, fmax) in FP8.items():
        out = poisoned_empty(*x.shape)
        _, scale = lesson.fp8_quantize(x, fmt, out=out)
        amax = x.double().abs().max()
        assert_close(scale, amax / fmax, name=f"{fmt} scale")
        assert_close(out, (x.double() / (amax / fmax)).clamp(-fmax, fmax), name=f"{fmt} scaled values")


@pytest.mark.skipif(not common.supports_fp8(), reason="needs a GPU with fp8 (sm_89+); the interpreter's fp8 casts "
                    "differ from the GPU's")
def test_lesson_fp8_quantize_cast(lesson):
    x = randn(300, 777, scale=3.0)
    for fmt, (dtype, fmax) in FP8.items():
        q, scale = lesson.fp8_quantize(x, fmt)
        assert q.dtype == dtype
        assert_close(q, (x.double() / scale.double()).clamp(-fmax, fmax), name=f"{fmt} values")
        back = lesson.dequantize(q, scale.reshape(1))
        assert_close(back, q.double() * scale.double(), name=f"dequantize {fmt}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_name)
def test_lesson_w8a16_gemv(lesson, dtype):
    n = awkward_sizes(1, 100, 3000, include=())[0]
    for k, padded in ((int(torch.randint(100, 700, ()).item()), 0), (256, 9)):
        w_q, scale = lesson.random_weight(n, k, padded=padded)
        x = randn(1, k, dtype=dtype)
        out = poisoned_empty(1, n, dtype=dtype)
        lesson.w8a16_gemv(x, w_q, scale, out=out)
        assert_close(out, x.double() @ (w_q.double() * scale.double()[:, None]).t(), name=f"gemv K={k} pad={padded}")


@pytest.mark.parametrize("m", [16, 3])
def test_lesson_w8a16_matmul(lesson, m):
    n, k = awkward_sizes(1, 100, 1000, include=())[0], 200
    w_q, scale = lesson.random_weight(n, k)
    x = randn(m, k, dtype=torch.float16)
    out = poisoned_empty(m, n, dtype=torch.float16)
    lesson.w8a16_matmul(x, w_q, scale, out=out)
    assert_close(out, x.double() @ (w_q.double() * scale.double()[:, None]).t(), name=f"w8a16_matmul M={m}")


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_name)
def test_lesson_w4a16_gemv(lesson, m, dtype):
    n, k = awkward_sizes(1, 20, 90 if common.INTERPRETER else 3000, include=())[0], 128 * int(torch.randint(1, 6, ()).item())
    w = randn(n, k, scale=k ** -0.5)
    w[0, :128] = 0.0  # an all-zero group: scale 1.0, every nibble 8
    w_packed, scales = lesson.quantize_int4_groups(w)
    assert w_packed.dtype == torch.uint8 and w_packed.shape == (n, k // 2) and scales.shape == (n, k // 128)
    w64 = lesson.dequantize_int4_reference(w_packed, scales, torch.float64)
    # the format: q = round(w / scale) in [-7, 7], so the dequantised weight is within half a step of w
    step = scales.double().repeat_interleave(128, dim=1)
    assert ((w64 - w.double()).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6).all()
    assert int((w_packed & 15).min()) >= 1 and int((w_packed >> 4).min()) >= 1  # u = q + 8 >= 1
    x = randn(m, k, dtype=dtype)
    out = poisoned_empty(m, n, dtype=dtype)
    lesson.w4a16_gemv(x, w_packed, scales, out=out)
    # 16 sum (1 + u/16) x - 24 sum x cancels: the rounding is that of sums as large as 24 sum |x|,
    # not of the result (an all-zero row: expected 0, got -1.2e-4 at K = 128 with sum |x| near
    # 100, once in CI). In fp32 the tolerance is twice that rounding; fp16's own rounding is larger.
    tol = dict(common.checks.sum_tolerance(dtype, k))
    if dtype == torch.float32:
        tol["atol"] = max(tol["atol"], 2 * 24 * float(x.abs().sum(dim=-1).max()) * torch.finfo(torch.float32).eps)
    assert_close(out, x.double() @ w64.t(), name=f"w4a16_gemv M={m} N={n} K={k}", **tol)
    assert_close(lesson.w4a16_reference(x, w_packed, scales), x.double() @ w64.t(), name="w4a16_reference",
                 **({"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}))
    with pytest.raises(ValueError, match="scales must be"):
        lesson.w4a16_gemv(x, w_packed, scales[:-1])
    with pytest.raises(ValueError, match="1 to 16 rows"):
        lesson.w4a16_gemv(randn(17, k, dtype=dtype), w_packed, scales)
    with pytest.raises(TypeError, match="dtype"):
        lesson.w4a16_gemv(x, w_packed.to(torch.int8), scales)


def test_lesson_dot_accumulate_and_logsumexp(lesson):
    x = (4 * torch.rand(2, 3000)).half().to(common.DEVICE)
    y = torch.rand(2, 3000).half().to(common.DEVICE)
    exact = (x.double() * y.double()).sum(dim=1)
    assert_close(lesson.dot_accumulate(x, y, False), exact, name="fp32 accumulation", rtol=1e-6, atol=1e-3)
    err16 = float(((lesson.dot_accumulate(x, y, True).double() - exact).abs() / exact).max())
    assert 1e-6 < err16 < 0.05, f"fp16 accumulation should lose a little, got relative error {err16}"
    logits = (torch.randn(3, 500) + torch.tensor([[0.0], [9.0], [30.0]])).half().to(common.DEVICE)
    ref = torch.logsumexp(logits.double(), dim=1)
    assert_close(lesson.logsumexp_fp16(logits, True), ref, name="stable logsumexp", atol=2e-2, rtol=2e-3)
    naive = lesson.logsumexp_fp16(logits, False)
    assert torch.isfinite(naive[0]) and torch.isinf(naive[1:]).all(), naive


@pytest.mark.skipif(not common.is_hopper(), reason="fp8 matmul needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("precise", [False, True])
def test_lesson_fp8_matmul(lesson, precise):
    m, n, k = 200, 333, 520
    a, sa = lesson.fp8_quantize(randn(m, k, scale=k ** -0.25), "e4m3")
    b, sb = lesson.fp8_quantize(randn(n, k, scale=k ** -0.25), "e4m3")
    c = lesson.fp8_matmul(a, b, sa.reshape(1), sb.reshape(1), precise_acc=precise)
    assert c.dtype == torch.bfloat16
    assert_close(c, lesson.fp8_matmul_reference(a, b, sa, sb), name="fp8_matmul")


def test_lesson_traffic(lesson):
    w_q = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    counted = common.count_torch_traffic(lesson.w8a16_reference, torch.randn(1, 32).half(), w_q, torch.rand(64))
    assert counted.kernels >= 3 and counted.total > 4 * w_q.numel(), counted.summary()


def test_lesson_bad_input(lesson):
    x = randn(4, 64)
    with pytest.raises(ValueError, match="granularity"):
        lesson.quantize_int8(x, "column")
    with pytest.raises(ValueError, match="group_size"):
        lesson.quantize_int8(x, "group", 48)
    with pytest.raises(TypeError, match="dtype"):
        lesson.quantize_int8(x.to(torch.int32))
    with pytest.raises(ValueError, match="at most"):
        lesson.quantize_int8(randn(1, lesson.MAX_GROUP_LEN + 1), "row")
    with pytest.raises(ValueError, match="fmt"):
        lesson.fp8_quantize(x, "e2m5")
    w_q, scale = lesson.random_weight(10, 64)
    with pytest.raises(ValueError, match="K = 32"):
        lesson.w8a16_gemv(randn(32, dtype=torch.float16), w_q, scale)
    with pytest.raises(ValueError, match="one value per output channel"):
        lesson.w8a16_gemv(randn(64, dtype=torch.float16), w_q, scale[:5])
    with pytest.raises(TypeError, match="dtype"):
        lesson.w8a16_gemv(randn(64, dtype=torch.float16), w_q.to(torch.int16), scale)
    with pytest.raises(ValueError, match="K contiguous"):
        lesson.w8a16_gemv(randn(64, dtype=torch.float16), randn(64, 10).to(torch.int8).t(), scale)
    with pytest.raises(ValueError, match=r"\(1, K\)"):
        lesson.w8a16_gemv(randn(2, 64, dtype=torch.float16), w_q, scale)
    with pytest.raises(ValueError, match="does not divide"):
        lesson.dequantize(w_q, torch.ones(3, device=common.DEVICE))
    if not common.is_hopper():
        with pytest.raises(RuntimeError, match="Hopper"):
            lesson.fp8_matmul(x, x, x, x)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.quantize_int8(torch.randn(4, 32))
    w_q, scale = lesson.random_weight(10, 64)
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.w8a16_gemv(torch.randn(64).half(), w_q, scale)


# --------------------------------------------------------------------------- block-scaled FP8 (DeepSeek-V3 style)

FP8_BLOCK_SHAPES = [(77, 300, 384), (130, 129, 256), (5, 1, 128)]  # M, N not multiples of 128 (or of the tiles)


@pytest.mark.parametrize("m,n,k", FP8_BLOCK_SHAPES)
def test_lesson_fp8_block_quantize(lesson, m, n, k):
    x, w = lesson.block_scaled_problem(m, n, k)
    lesson.check_fp8_block_quantize(x, w, f"{m}x{n}x{k}")
    # the zero group of x and the zero (last, partial) block of w: scale 1.0, not 0 / 0
    _, a_scale = lesson.fp8_quantize_groups(x, out=torch.empty(x.shape, device=x.device))
    _, b_scale = lesson.fp8_quantize_blocks(w, out=torch.empty(w.shape, device=w.device))
    assert a_scale.shape == (m, k // 128) and b_scale.shape == ((n + 127) // 128, k // 128)
    assert float(a_scale[m // 2, 0]) == 1.0 and float(b_scale[-1, -1]) == 1.0


def test_lesson_fp8_block_reference_matches_the_formula(lesson):
    # the reference itself, against a loop over the blocks: scale = amax / 448 of each block
    w = randn(200, 256).double().cpu()
    q, scale = lesson.fp8_block_quantize_reference(w, 128)
    for i in range(2):
        for j in range(2):
            block = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
            assert float(scale[i, j]) == pytest.approx(float(block.abs().max()) / 448, rel=1e-12)
            assert_close(q[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)], (block / scale[i, j]).clamp(-448, 448),
                         name=f"reference block ({i}, {j})")


@pytest.mark.parametrize("m,n,k", FP8_BLOCK_SHAPES)
def test_lesson_fp8_block_matmul(lesson, m, n, k):
    x, w = lesson.block_scaled_problem(m, n, k)
    lesson.check_fp8_block_matmul(lesson.fp8_block_matmul, *lesson.fp8_block_operands(x, w),
                                  name=f"fp8_block_matmul {m}x{n}x{k}")


@triton.jit
def _fp8_block_wrong_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                            stride_asm, stride_bsn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, FIRST_SCALE_ONLY: tl.constexpr = False,
                            A_SCALE_TRANSPOSED: tl.constexpr = False):
    """The lesson's fp8_block_matmul_kernel (without the program grouping) with one mistake switched on."""
    pid_m = tl.program_id(axis=0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(axis=0) % tl.cdiv(N, BLOCK_N)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        if A_SCALE_TRANSPOSED:  # wrong: reads a_scale as (K / 128, M)
            a_scale = tl.load(a_scale_ptr + j * M + offs_m)
        else:
            a_scale = tl.load(a_scale_ptr + offs_m * stride_asm + j)
        b_scale = tl.load(b_scale_ptr + (offs_n // BLOCK_K) * stride_bsn + j)
        if FIRST_SCALE_ONLY:  # wrong: raw sums over K, scaled once below
            acc += tl.dot(a, b)
        else:
            acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if FIRST_SCALE_ONLY:
        acc = acc * (tl.load(a_scale_ptr + offs_m * stride_asm)[:, None]
                     * tl.load(b_scale_ptr + (offs_n // BLOCK_K) * stride_bsn)[None, :])
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _fp8_block_wrong(**flags):
    def matmul(a, b, a_scale, b_scale, out):
        (m, k), n = a.shape, b.shape[0]
        grid = (triton.cdiv(m, 32) * triton.cdiv(n, 64),)
        _fp8_block_wrong_kernel[grid](a, b, a_scale, b_scale, out, m, n, k, a.stride(0), b.stride(0), out.stride(0),
                                      a_scale.stride(0), b_scale.stride(0), BLOCK_M=32, BLOCK_N=64, BLOCK_K=128,
                                      **flags)
        return out
    return matmul


@pytest.mark.parametrize("flag,hint", [("FIRST_SCALE_ONLY", "after the K loop"),
                                       ("A_SCALE_TRANSPOSED", "K-block-major")])
def test_lesson_fp8_block_matmul_check_rejects_known_wrong(lesson, flag, hint):
    x, w = lesson.block_scaled_problem(77, 300, 384)
    operands = lesson.fp8_block_operands(x, w)
    lesson.check_fp8_block_matmul(_fp8_block_wrong(), *operands, name="the wrong kernel with no mistake on")
    with pytest.raises(CheckError, match=hint):
        lesson.check_fp8_block_matmul(_fp8_block_wrong(**{flag: True}), *operands, name=f"wrong: {flag}")


def test_lesson_fp8_block_bad_input(lesson):
    x = randn(64, 200)
    with pytest.raises(ValueError, match="multiple of 128"):
        lesson.fp8_quantize_groups(x, out=torch.empty(x.shape, device=x.device))
    with pytest.raises(ValueError, match="multiple of 128"):
        lesson.fp8_quantize_blocks(x, out=torch.empty(x.shape, device=x.device))
    with pytest.raises(ValueError, match="multiple of 128"):
        lesson.fp8_block_quantize_reference(x, 1)
    with pytest.raises(TypeError, match="dtype"):
        lesson.fp8_quantize_groups(randn(4, 128).to(torch.int32))
    with pytest.raises(ValueError, match="contiguous rows"):
        lesson.fp8_quantize_blocks(randn(256, 4).t(), out=torch.empty(4, 256, device=common.DEVICE))
    if not common.supports_fp8():
        with pytest.raises(RuntimeError, match="out=torch.empty"):
            lesson.fp8_quantize_groups(randn(4, 128))
    if common.HAS_GPU and not common.supports_fp8():
        return  # fp8_block_matmul refuses this GPU before it looks at the inputs
    a = randn(8, 200).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="multiple of 128"):
        lesson.fp8_block_matmul(a, a, torch.ones(8, 1, device=common.DEVICE), torch.ones(1, 1, device=common.DEVICE))
    a, b = randn(8, 256).to(torch.float8_e4m3fn), randn(130, 256).to(torch.float8_e4m3fn)
    ones = functools.partial(torch.ones, device=common.DEVICE)
    with pytest.raises(ValueError, match=r"b_scale must have shape \(2, 2\)"):
        lesson.fp8_block_matmul(a, b, ones(8, 2), ones(1, 2))
    with pytest.raises(ValueError, match=r"a_scale must have shape \(8, 2\)"):
        lesson.fp8_block_matmul(a, b, ones(8, 1), ones(2, 2))
    with pytest.raises(TypeError, match="dtype"):
        lesson.fp8_block_matmul(a.to(torch.float8_e5m2), b, ones(8, 2), ones(2, 2))
    with pytest.raises(ValueError, match="same K"):
        lesson.fp8_block_matmul(a, b[:, :128].contiguous(), ones(8, 2), ones(2, 1))


def test_lesson_fp8_block_error_table(lesson):
    """The error table's claim: with massive outlier channels, block scales beat row-wise, which beats one
    scale per tensor; every fp8 scaling is far from bf16 on plain N(0, 1)."""
    problems = lesson._fp8_matmul_problems(64, 128, 512)
    errors = {}
    for dist, (x64, w64) in problems.items():
        exact = x64 @ w64.t()
        for name, y in lesson._fp8_matmuls(x64, w64).items():
            errors[dist, name.split(" (")[0]] = float(((y - exact).norm(dim=1) / exact.norm(dim=1)).median())
    massive = list(problems)[-1]
    block, row, tensor = (errors[massive, f"fp8 {how}"] for how in ("1 x 128 / 128 x 128 blocks", "row-wise",
                                                                     "per tensor"))
    assert block < row < tensor, errors
    assert errors["N(0,1)", "bf16 inputs, torch.matmul"] < 0.2 * errors["N(0,1)", "fp8 per tensor"], errors


def test_lesson_fp8_block_benchmark_inputs_agree(lesson):
    """The benchmark's inputs: the row scales (the baseline's) and the block scales (the kernel's) describe
    the same dequantised operands, so the layer can compare the two providers' outputs."""
    a, b, row_a, row_b, block_a, block_b = lesson._fp8_block_inputs(256)
    assert row_a.shape == (256, 1) and row_b.shape == (1, 256)
    assert block_a.shape == (256, 2) and block_b.shape == (2, 2)
    by_rows = (a.double() * row_a.double()) @ (b.double() * row_b.double().t()).t()
    assert_close(lesson.fp8_block_matmul_reference(a, b, block_a, block_b), by_rows, name="block vs row scales",
                 atol=1e-12, rtol=1e-12)
    if common.is_hopper():
        baseline = common.baselines.op("fp8_block_matmul").baselines[0]
        assert_close(lesson.fp8_block_matmul(a, b, block_a, block_b), baseline.fn(a, b, row_a, row_b).double(),
                     name="fp8_block_matmul vs torch._scaled_mm row-wise")
