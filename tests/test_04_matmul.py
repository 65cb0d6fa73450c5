"""Lesson 04 (matmul): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/04_matmul.py; IMPL=solutions grades the answers.
"""

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.checks import dot_tolerance
from common.grading import Exercise, expect_rejected, grade_function, lesson_tests
from common.lessons import lesson_module

STEM = "04_matmul"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
BLOCK = 32  # BLOCK_M = BLOCK_N = BLOCK_K of the exercise file: the checks use K not a multiple of it
GEMV_BLOCK_K = 128  # GEMV_BLOCK_K of the exercise file
GELU = torch.nn.functional.gelu


def _size(lo: int, hi: int) -> int:
    """One random size in [lo, hi) that is not a multiple of 16 (so not of any block either)."""
    return awkward_sizes(1, lo=lo, hi=hi, include=())[0]


def _same_output(result, out, name):
    if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
        raise CheckError(f"{name} was given out= but returned a different tensor: write into `out` "
                         f"and return it")


def _expect_value_error(fn, what, hint):
    try:
        fn()
    except ValueError:
        return
    raise CheckError(f"{what} returned instead of raising ValueError: {hint}")


# --------------------------------------------------------------------------- the checks

def check_matmul_bias_act(matmul_bias_act):
    # M < N (so a bias indexed by row stays inside bias); K is not a multiple of BLOCK_K. The
    # interpreter lowers awkward_sizes' lo to hi // 2 (55 here), so M stays below 55: M = 59 with
    # N = 58 once broke the bias-per-row mistake's reference (a flaky failure).
    shapes = [(_size(17, 55), _size(61, 110), _size(33, 100)), (1, 37, 5)]
    for dtype in DTYPES:
        for activation, act in (("relu", torch.relu), ("gelu", GELU)):
            for M, N, K in shapes:
                a = randn(M, K, dtype=dtype, scale=K ** -0.5)
                b, bias = randn(K, N, dtype=dtype), randn(N, dtype=dtype)
                out = poisoned_empty(M, N, dtype=dtype)
                _same_output(matmul_bias_act(a, b, bias, activation, out=out), out, "matmul_bias_act")
                a64, b64, bias64 = a.double(), b.double(), bias.double()
                k0 = K // BLOCK * BLOCK
                assert_close(out, act(a64 @ b64 + bias64), name=f"matmul_bias_act {activation} {M}x{N}x{K} {dtype}",
                             **dot_tolerance(dtype), mistakes={
                    "the K loop stopped before the last, partial block of K: run tl.cdiv(K, BLOCK_K) "
                    "steps and mask the tail (offs_k < K - k * BLOCK_K)": act(a64[:, :k0] @ b64[:k0] + bias64),
                    "the bias was added per row (bias[m]); bias has N entries, one per output column: "
                    "add bias[None, :]": act(a64 @ b64 + bias64[:M, None]),
                    "the activation was applied before the bias was added: compute act(acc + bias)":
                        act(a64 @ b64) + bias64,
                    "the bias was never added: load bias[offs_n] and add it to the tile before the "
                    "activation": act(a64 @ b64),
                })
    a, b, bias = randn(40, 20, scale=20 ** -0.5), randn(20, 30), randn(30)
    assert_close(matmul_bias_act(a, b, bias, "gelu"), GELU(a.double() @ b.double() + bias.double()),
                 name="matmul_bias_act (out=None)", **dot_tolerance(torch.float32))


def check_bmm(bmm):
    for dtype in DTYPES:
        for transpose_b in (False, True):
            batch = int(torch.randint(2, 5, ()))
            M, N, K = _size(17, 80), _size(17, 80), _size(17, 80)
            a = randn(batch, M, K, dtype=dtype, scale=K ** -0.5)
            b_storage = randn(batch, N, K, dtype=dtype) if transpose_b else randn(batch, K, N, dtype=dtype)
            b = b_storage.transpose(1, 2) if transpose_b else b_storage
            out = poisoned_empty(batch, M, N, dtype=dtype)
            _same_output(bmm(a, b, out=out), out, "bmm")
            expected = a.double() @ b.double()
            mistakes = {
                "every batch element got batch 0's product: move a_ptr and b_ptr (and c_ptr) to matrix "
                "i with pid_b * stride_ab, pid_b * stride_bb, pid_b * stride_cb":
                    expected[:1].expand(batch, M, N),
                "only batch element 0 was computed: the grid needs a third axis of size batch "
                "(tl.program_id(2) is the batch index)":
                    torch.cat([expected[:1], torch.full_like(expected[1:], float("nan"))]),
            }
            if transpose_b:
                mistakes["b's strides were ignored: b is a transposed view, not contiguous; pass "
                         "b.stride(0), b.stride(1), b.stride(2) and use them in the kernel"] = (
                    a.double() @ b_storage.double().reshape(batch, K, N))
            name = f"bmm {batch}x{M}x{N}x{K} {dtype}" + (" (b transposed)" if transpose_b else "")
            assert_close(out, expected, name=name, mistakes=mistakes, **dot_tolerance(dtype))
    a, b = randn(2, 5, 4, scale=0.5), randn(2, 4, 3)
    assert_close(bmm(a, b), a.double() @ b.double(), name="bmm (out=None)", **dot_tolerance(torch.float32))
    # Shapes chosen so that a wrapper without the check still reads inside both tensors.
    _expect_value_error(lambda: bmm(randn(2, 5, 6), randn(2, 7, 3)), "bmm(a (2, 5, 6), b (2, 7, 3))",
                        "a.shape[2] and b.shape[1] (K) differ; the wrapper must check them")
    _expect_value_error(lambda: bmm(randn(2, 5, 6), randn(3, 6, 3)), "bmm(a (2, 5, 6), b (3, 6, 3))",
                        "the batch sizes differ; the wrapper must check a.shape[0] == b.shape[0]")


def check_gemv(gemv):
    for dtype in DTYPES:
        for pad in (0, 3):  # pad > 0: w is a slice w_big[:, :K], its rows K + pad elements apart
            N, K = _size(100, 300), _size(200, 1000)
            w_big = randn(N, K + pad, dtype=dtype, scale=K ** -0.5)
            w, x = w_big[:, :K], randn(K, dtype=dtype)
            out = poisoned_empty(N, dtype=dtype)
            _same_output(gemv(w, x, out=out), out, "gemv")
            w64, x64 = w.double(), x.double()
            k0 = K // GEMV_BLOCK_K * GEMV_BLOCK_K
            mistakes = {"the K loop stopped before the last, partial block of K: loop up to K "
                        "(range(0, K, BLOCK_K)) and mask the columns >= K": w64[:, :k0] @ x64[:k0]}
            if pad:
                mistakes["the row stride was ignored: row n of w starts at w_ptr + n * stride_wn, "
                         "which is not n * K when w is a slice of a wider matrix"] = (
                    w_big.double().flatten()[:N * K].view(N, K) @ x64)
            name = f"gemv N={N} K={K} {dtype}" + (f" (rows {K + pad} apart)" if pad else "")
            assert_close(out, w64 @ x64, name=name, mistakes=mistakes)
    w, x = randn(50, 70, scale=70 ** -0.5), randn(70)
    assert_close(gemv(w, x), w.double() @ x.double(), name="gemv (out=None)")


EXERCISES = [
    Exercise("4.1", "matmul_bias_act", check_matmul_bias_act, kernels=("matmul_bias_act_kernel",)),
    Exercise("4.2", "bmm", check_bmm, kernels=("bmm_kernel",)),
    Exercise("4.3", "gemv", check_gemv, kernels=("gemv_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

# Known-wrong answers: one kernel per exercise with the mistake picked by a constexpr
# (MISTAKE="none" is a correct answer, tested below, so each rejection is the mistake's doing).

@triton.jit
def _bias_act_wrong_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                           stride_cm, stride_cn, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MISTAKE: tl.constexpr):
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)  # row-major tile order: right, just not grouped
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if MISTAKE == "short_k":
        steps = K // BLOCK_K  # wrong: drops the last, partial block of K
    else:
        steps = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, steps):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if MISTAKE == "bias_per_row":  # wrong: bias[m] on row m
        acc += tl.load(bias_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
    elif MISTAKE != "act_first":
        acc += bias[None, :]
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    else:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if MISTAKE == "act_first":  # wrong: the bias after the activation
        acc += bias[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _bias_act_with(mistake):
    def matmul_bias_act(a, b, bias, activation="relu", out=None):
        (M, K), N = a.shape, b.shape[1]
        out = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
        _bias_act_wrong_kernel[(triton.cdiv(M, BLOCK) * triton.cdiv(N, BLOCK),)](
            a, b, bias, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
            out.stride(1), ACTIVATION=activation, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=BLOCK, MISTAKE=mistake)
        return out
    return matmul_bias_act


@triton.jit
def _bmm_wrong_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_ab, stride_am, stride_ak, stride_bb, stride_bk,
                      stride_bn, stride_cb, stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, MISTAKE: tl.constexpr):
    pid_b = tl.program_id(2)
    if MISTAKE != "no_batch_offset":  # wrong when skipped: every batch element reads matrix 0
        a_ptr += pid_b * stride_ab
        b_ptr += pid_b * stride_bb
    c_ptr += pid_b * stride_cb
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _bmm_with(mistake="none", batch_axis=True, contiguous_b_strides=False, validate=True):
    def bmm(a, b, out=None):
        if validate and (a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]):
            raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not match")
        batch, M, K = a.shape
        N = b.shape[2]
        out = torch.empty((batch, M, N), dtype=a.dtype, device=a.device) if out is None else out
        b_strides = (K * N, N, 1) if contiguous_b_strides else b.stride()  # wrong if b is a view
        grid = (triton.cdiv(M, BLOCK), triton.cdiv(N, BLOCK), batch if batch_axis else 1)
        _bmm_wrong_kernel[grid](a, b, out, M, N, K, *a.stride(), *b_strides, *out.stride(),
                                BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=BLOCK, MISTAKE=mistake)
        return out
    return bmm


@triton.jit
def _gemv_wrong_kernel(w_ptr, x_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       MISTAKE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    if MISTAKE == "short_k":
        k_end = K // BLOCK_K * BLOCK_K  # wrong: drops the last, partial block of K
    else:
        k_end = K
    if MISTAKE == "ignore_stride":
        row_stride = K  # wrong when w is a slice of a wider matrix
    else:
        row_stride = stride_wn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        cols = k0 + offs_k
        w = tl.load(w_ptr + offs_n[:, None] * row_stride + cols[None, :],
                    mask=mask_n[:, None] & (cols[None, :] < K), other=0.0)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
    if MISTAKE == "unmasked_store":
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty))  # wrong: the last block runs past N
    else:
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def _gemv_with(mistake):
    def gemv(w, x, out=None):
        N, K = w.shape
        out = torch.empty(N, dtype=w.dtype, device=w.device) if out is None else out
        _gemv_wrong_kernel[(triton.cdiv(N, 16),)](w, x, out, N, K, w.stride(0), BLOCK_N=16,
                                                 BLOCK_K=GEMV_BLOCK_K, MISTAKE=mistake)
        return out
    return gemv


KNOWN_WRONG = [
    ("matmul_bias_act", "K tail skipped", lambda: _bias_act_with("short_k"), "partial block of K"),
    ("matmul_bias_act", "bias per row", lambda: _bias_act_with("bias_per_row"), "per row"),
    ("matmul_bias_act", "activation before bias", lambda: _bias_act_with("act_first"), "before the bias"),
    ("bmm", "batch offset missing", lambda: _bmm_with("no_batch_offset"), "batch 0's product"),
    ("bmm", "grid without batch axis", lambda: _bmm_with(batch_axis=False), "third axis"),
    ("bmm", "b strides assumed contiguous", lambda: _bmm_with(contiguous_b_strides=True), "strides were ignored"),
    ("bmm", "no shape check", lambda: _bmm_with(validate=False), "ValueError"),
    ("gemv", "K tail skipped", lambda: _gemv_with("short_k"), "partial block of K"),
    ("gemv", "row stride ignored", lambda: _gemv_with("ignore_stride"), "row stride was ignored"),
    ("gemv", "store not masked", lambda: _gemv_with("unmasked_store"), "past the end"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


@pytest.mark.parametrize("name,make_right", [
    ("matmul_bias_act", lambda: _bias_act_with("none")),
    ("bmm", lambda: _bmm_with()),
    ("gemv", lambda: _gemv_with("none")),
], ids=["matmul_bias_act", "bmm", "gemv"])
def test_known_wrong_kernels_are_right_without_their_mistake(name, make_right):
    result = grade_function(BY_NAME[name], make_right())
    assert result.status == "passed", result.detail


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("04")


VERSION_DTYPES = [(v, d) for v in (1, 2, 3, 4) for d in DTYPES if not (v == 4 and d == torch.float32)]


@pytest.mark.parametrize("version,dtype", VERSION_DTYPES, ids=[f"v{v}-{common.dtype_name(d)}" for v, d in VERSION_DTYPES])
def test_lesson_versions(lesson, version, dtype):
    hi = 100 if common.INTERPRETER else 1000
    # A random shape with a transposed b, M = 1 with K smaller than any BLOCK_K, and a fixed one.
    shapes = [(_size(17, hi), _size(17, hi), _size(17, hi)), (1, 37, 5), (67, 45, 83)]
    for i, (M, N, K) in enumerate(shapes):
        a, b = lesson.random_problem(M, N, K, dtype, transpose_b=(i == 0))
        out = poisoned_empty(M, N, dtype=dtype)
        result = lesson.matmul(a, b, version=version, out=out)
        assert result is out
        assert_close(out, a.double() @ b.double(), name=f"v{version} {M}x{N}x{K} {dtype}")


def test_lesson_grouped_order_writes_every_tile(lesson):
    # 7 tile rows in groups of 3 (3, 3, then a short group of 1) by 4 tile columns.
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=3, num_warps=4, num_stages=1)
    a, b = lesson.random_problem(100, 50, 40, torch.float16)
    out = poisoned_empty(100, 50, dtype=torch.float16)
    lesson.matmul_v3(a, b, out=out, config=cfg)
    assert_close(out, a.double() @ b.double(), name="v3 GROUP_M=3")


def test_lesson_default_version_and_allocation(lesson):
    for dtype in DTYPES:
        a, b = lesson.random_problem(33, 20, 47, dtype)
        assert_close(lesson.matmul(a, b), a.double() @ b.double(), name=f"matmul default {dtype}")


def test_lesson_bad_input(lesson):
    a = randn(20, 30)
    with pytest.raises(ValueError, match="K"):
        lesson.matmul(a, randn(31, 10))
    with pytest.raises(TypeError, match="dtype"):
        lesson.matmul(a, randn(30, 10, dtype=torch.float16))
    with pytest.raises(ValueError, match="dimension"):
        lesson.matmul(randn(30), randn(30, 10))
    with pytest.raises(ValueError, match="version"):
        lesson.matmul(a, randn(30, 10), version=5)
    with pytest.raises(ValueError, match="input_precision"):
        lesson.matmul(a, randn(30, 10), input_precision="fp8")
    with pytest.raises(TypeError, match="float32"):
        lesson.matmul(a, randn(30, 10), version=4)
    with pytest.raises(ValueError, match="out has shape"):
        lesson.matmul(a, randn(30, 10), out=torch.empty(20, 11, device=common.DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lesson.matmul([[1.0]], a)
    with pytest.raises(TypeError, match="supports"):
        lesson.matmul(a.to(torch.int32), randn(30, 10).to(torch.int32))
    if not common.supports_bf16():
        with pytest.raises(TypeError, match="supports"):
            lesson.matmul(a.bfloat16(), randn(30, 10, dtype=torch.bfloat16))


def test_lesson_models(lesson):
    # One tile covering all of C reads A and B once: the modelled minimum.
    assert lesson.tile_load_bytes(100, 60, 70, 128, 64, 2) > lesson.matmul_min_bytes(100, 60, 70, 2)
    assert lesson.tile_load_bytes(128, 64, 70, 128, 64, 2) == lesson.matmul_min_bytes(128, 64, 70, 2)
    assert lesson.matmul_flops(2, 3, 4) == 48
    x = torch.tensor([1 + 2**-10, 1 + 2**-11, -3.0 - 2**-20])
    assert lesson.to_tf32(x).tolist() == [1 + 2**-10, 1.0, -3.0]  # 10 mantissa bits kept, truncated


def test_lesson_traffic_and_precision_tables_run(lesson, capsys):
    lesson.traffic()
    lesson.precision(64, 48, 256)  # on a GPU this also runs the measured rows (Triton fp32, fp16, bf16)
    printed = capsys.readouterr().out
    assert "flop / byte" in printed and "relative error" in printed


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter computes tl.dot in fp32 "
                                               "whatever input_precision says")
def test_lesson_tf32_loses_precision_ieee_does_not(lesson):
    a, b = lesson.random_problem(256, 256, 1024, torch.float32)
    ref = a.double() @ b.double()
    err = {p: lesson.relative_error(lesson.matmul(a, b, version=3, input_precision=p), ref)
           for p in ("ieee", "tf32x3", "tf32")}
    assert err["ieee"] < 1e-6, err
    assert err["tf32"] > 10 * err["ieee"], err
    assert err["tf32x3"] < err["tf32"] / 10, err


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.matmul(torch.randn(10, 10), torch.randn(10, 10, device="cuda"))


# --------------------------------------------------------------------------- CUDA C++ side by side

def test_side_by_side_counts_lines_and_says_why_cuda_is_not_built(lesson, capsys):
    lines = lesson._source_lines()
    assert set(lines) == set(lesson.SIDE_BY_SIDE_DECISIONS)
    assert 0 < lines[lesson.CUDA_TILED] < lines[lesson.CUDA_WMMA], lines
    lesson.side_by_side()
    printed = capsys.readouterr().out
    reason = common.cuda_unavailable()
    assert (f"not built or run here ({reason})" in printed) if reason else "matches PyTorch" in printed


@pytest.mark.skipif(bool(common.cuda_unavailable()), reason=common.cuda_unavailable() or "runs")
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_cuda_matmul_matches_and_checks_its_input(lesson, tensor_cores):
    for M, N, K in [(1, 1, 1), (17, 300, 33), (129, 131, 257), (256, 128, 64)]:
        a, b = lesson.random_problem(M, N, K, torch.float16)
        out = common.poisoned_empty(M, N, dtype=torch.float16)
        lesson.cuda_matmul(a, b, tensor_cores, out=out)
        common.assert_close(out, a.double() @ b.double(), name=f"cuda matmul {M}x{N}x{K}")
    a, b = lesson.random_problem(64, 64, 64, torch.float16)
    with pytest.raises(RuntimeError, match="contiguous"):
        lesson.cuda_matmul(a, b.t(), tensor_cores)
