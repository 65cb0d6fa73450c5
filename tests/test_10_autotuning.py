"""Lesson 10 (autotuning and performance models): the exercise checks, the grader's own tests, and
the lesson's kernels.

IMPL=exercises (default) grades exercises/10_autotuning.py; IMPL=solutions grades the answers.
"""

import functools
import math
import inspect
import random

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, poisoned_empty, randn
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl, solution_with, with_flags
from common.lessons import lesson_module

STEM = "10_autotuning"


@functools.cache
def _lesson():
    return lesson_module("10")


def _cfg(bm, bn, bk, num_warps, num_stages):
    # GROUP_M: the lesson's kernel (which the 10.1 check runs the learner's pruning on) needs it
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 4},
                         num_warps=num_warps, num_stages=num_stages)


def _interpreter_bench(kernel_call, quantiles=None):
    kernel_call()  # no GPU timer in the interpreter: every config ties, the first kept one wins
    return [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- 10.1 pruning

# Each rule of the spec is broken by at least one config at some shape, dtype or limit below.
SPACE = [
    _cfg(128, 256, 64, 8, 3),  # 144 KiB fp16, 128 accumulator values per thread: kept for big problems
    _cfg(128, 256, 64, 4, 3),  # 256 values per thread: rule 2
    _cfg(128, 256, 64, 8, 5),  # 240 KiB fp16: rule 1
    _cfg(128, 128, 64, 4, 4),  # 128 KiB fp16, 256 KiB fp32: rule 1 for fp32
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 128, 4, 3),  # BLOCK_K 128: rule 3 for small K
    _cfg(32, 32, 32, 2, 2),
    _cfg(16, 64, 32, 1, 2),
    _cfg(16, 16, 16, 1, 1),  # the smallest shared memory
]
H100_SMEM, A100_SMEM, SM86_SMEM = 232448, 166912, 101376
PRUNE_CASES = [  # (M, N, K), dtype, shared memory limit
    ((4096, 4096, 4096), torch.float16, H100_SMEM),
    ((4096, 4096, 4096), torch.float32, H100_SMEM),
    ((4096, 4096, 4096), torch.float16, SM86_SMEM),
    ((100, 3000, 40), torch.float16, H100_SMEM),
    ((1, 50, 20000), torch.float32, A100_SMEM),
    ((8, 8, 8), torch.float16, H100_SMEM),
    ((4096, 4096, 4096), torch.float16, 512),  # nothing fits: the fallback
    ((3000, 3000, 3000), torch.float32, 1024),  # nothing fits: the fallback, fp32
]


def _smem(c, element_size, stages=True):
    kw = c.kwargs
    return (c.num_stages if stages else 1) * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size


def _prune_reference(configs, M, N, K, element_size, limit, *, stages=True, threads=32, tile_bound="pow2",
                     check_k=True, fallback="smallest"):
    """The spec of 10.1, with switches that reproduce the usual mistakes."""
    def bound(n):
        return max(16, triton.next_power_of_2(n)) if tile_bound == "pow2" else n

    def keep(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (_smem(c, element_size, stages) <= limit and bm * bn / (threads * c.num_warps) <= 128
                and bm <= bound(M) and bn <= bound(N) and (not check_k or bk <= bound(K)))

    kept = [c for c in configs if keep(c)]
    if kept or fallback == "empty":
        return kept
    return [configs[0]] if fallback == "first" else [min(configs, key=lambda c: _smem(c, element_size))]


def _why(c, M, N, K, element_size, limit) -> str:
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    smem, acc = _smem(c, element_size), bm * bn / (32 * c.num_warps)
    broken = []
    if smem > limit:
        broken.append(f"rule 1: {c.num_stages} stages x ({bm} + {bn}) x {bk} x {element_size} bytes = {smem} > {limit}")
    if acc > 128:
        broken.append(f"rule 2: {bm} x {bn} accumulator values over 32 x {c.num_warps} threads = {acc:g} > 128")
    for name, block, n in (("BLOCK_M", bm, M), ("BLOCK_N", bn, N), ("BLOCK_K", bk, K)):
        if block > max(16, triton.next_power_of_2(n)):
            broken.append(f"rule 3: {name} {block} > max(16, next_power_of_2({n})) = {max(16, triton.next_power_of_2(n))}")
    return "; ".join(broken) or (f"it passes every rule (shared memory {smem} <= {limit}, {acc:g} accumulator "
                                 f"values per thread <= 128, no tile dimension above the problem's)")


def _label(c):
    return (f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} "
            f"s{c.num_stages}")


_PRUNE_MISTAKES = {
    "shared memory must count every pipeline stage: num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K x "
    "element_size (each stage holds its own A and B tiles)": dict(stages=False),
    "the accumulator is spread over the program's 32 * num_warps threads (a warp is 32 threads), "
    "not over num_warps": dict(threads=1),
    "compare each block with max(16, triton.next_power_of_2(n)), not with n itself: tiles are powers "
    "of 2, and the smallest one that covers 50 rows has 64": dict(tile_bound="raw"),
    "BLOCK_K must not exceed max(16, next_power_of_2(K)) either (rule 3 covers all three blocks)":
        dict(check_k=False),
    "when nothing passes, return the config with the smallest shared memory, not the first one":
        dict(fallback="first"),
}


def _diagnose_prune(result, configs, case, element_size) -> str:
    (M, N, K), dtype, limit = case
    expected = _prune_reference(configs, M, N, K, element_size, limit)
    name = f"prune_configs at M, N, K = {M}, {N}, {K}, {common.dtype_name(dtype)}, smem_limit={limit}"
    if not result:
        return (f"{name} returned an empty list: when no config passes, return a list of the one with the "
                f"smallest shared memory (the autotuner needs at least one config)")
    lines = [f"{name}: kept {[_label(c) for c in result]}, expected {[_label(c) for c in expected]}"]
    for hint, switches in _PRUNE_MISTAKES.items():
        if _prune_reference(configs, M, N, K, element_size, limit, **switches) == result:
            return "\n".join(lines + [f"  hint: {hint}"])
    for element in (1, 2, 4):
        if element != element_size and _prune_reference(configs, M, N, K, element, limit) == result:
            return "\n".join(lines + [f"  hint: the bytes per element come from named_args['a_ptr'].element_size() "
                                      f"({element_size} here), so fp32 tiles take twice the shared memory of fp16"])
    wrong_kept = [c for c in result if not any(c is e for e in expected)]
    wrong_dropped = [c for c in expected if not any(c is r for r in result)]
    for c in wrong_kept[:2]:
        lines.append(f"  kept {_label(c)}, which must go: {_why(c, M, N, K, element_size, limit)}")
    for c in wrong_dropped[:2]:
        lines.append(f"  dropped {_label(c)}, which must stay: {_why(c, M, N, K, element_size, limit)}")
    if not wrong_kept and not wrong_dropped:
        lines.append("  hint: the right configs, in another order: keep the order they were given in")
    return "\n".join(lines)


def check_prune_configs(prune_configs):
    cases = list(PRUNE_CASES)
    cases.append(((random.randint(2, 5000), random.randint(2, 5000), random.randint(2, 5000)), torch.float16,
                  random.choice([H100_SMEM, A100_SMEM, SM86_SMEM])))
    for case in cases:
        (M, N, K), dtype, limit = case
        element = torch.empty(0, dtype=dtype, device=common.DEVICE)
        named_args = {"a_ptr": element, "b_ptr": element, "c_ptr": element, "M": M, "N": N, "K": K}
        configs = list(SPACE)
        # grid and warmup: the keyword arguments the autotuner passes along
        result = prune_configs(configs, named_args, smem_limit=limit, grid=None, warmup=False)
        if not isinstance(result, (list, tuple)) or not all(isinstance(c, triton.Config) for c in result):
            raise CheckError(f"prune_configs must return a list of triton.Config, got {type(result).__name__}")
        if configs != SPACE:
            raise CheckError("prune_configs changed the list it was given: build a new list")
        expected = _prune_reference(configs, M, N, K, element.element_size(), limit)
        same = len(result) == len(expected) and all(r is e for r, e in zip(result, expected))
        if not same:
            raise CheckError(_diagnose_prune(list(result), configs, case, element.element_size()))
    # Inside an autotuner, on the lesson's matmul kernel: it must run, and the kernel must be right.
    lesson = _lesson()
    kernel = triton.autotune(
        configs=SPACE, key=["M", "N", "K"], do_bench=_interpreter_bench if common.INTERPRETER else None,
        prune_configs_by={"early_config_prune": lambda c, a, **kw: prune_configs(c, a, smem_limit=H100_SMEM, **kw)},
    )(lesson.matmul_heuristic_kernel)
    for (M, N, K), dtype in (((int(torch.randint(33, 64, ())), int(torch.randint(65, 128, ())), 30), torch.float16),
                             ((20, 33, int(torch.randint(65, 128, ()))), torch.float32)):
        a, b = lesson.random_problem(M, N, K, dtype)
        out = poisoned_empty(M, N, dtype=dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
        assert_close(out, a.double() @ b.double(), name=f"the lesson's matmul tuned with your pruning, {M}x{N}x{K}",
                     **common.checks.dot_tolerance(dtype))


# --------------------------------------------------------------------------- 10.2 roofline

def _roofline_reference(M, N, K, element_size, block_m, block_n, peak_tflops, bandwidth_gbps, launch_us=0.0, *,
                        combine=max, gb=1e9, tflop=1e12, tiles=triton.cdiv, traffic="tiles", strips=1, c_writes=1,
                        launch_scale=1e-6, swap=False, element=True):
    """The spec of 10.2, with switches that reproduce the usual mistakes."""
    n_tiles = tiles(M, block_m) * tiles(N, block_n)
    if traffic == "tiles":
        elements = strips * n_tiles * (block_m + block_n) * K + c_writes * M * N
    else:  # the minimum: each matrix once
        elements = M * K + K * N + M * N
    nbytes = elements * (element_size if element else 1)
    t_memory = nbytes / (bandwidth_gbps * gb)
    t_math = 2 * M * N * K / (peak_tflops * tflop)
    memory = t_memory >= t_math
    return launch_us * launch_scale + combine(t_memory, t_math), ("memory" if memory != swap else "compute")


_ROOFLINE_MISTAKES = {
    "the two times were added: loads and math overlap on a GPU, so the time is the larger of the two "
    "(max), plus the launch": dict(combine=lambda a, b: a + b),
    "min of the two times: the slower ceiling holds a kernel back, so take the max": dict(combine=min),
    "GB/s means 1e9 bytes per second (not 2^30)": dict(gb=2**30),
    "TFLOP/s means 1e12 FLOPs per second": dict(tflop=1e9),
    "these are the minimum bytes (each matrix once): a tiled kernel loads more, every one of the "
    "cdiv(M, block_m) * cdiv(N, block_n) tiles loads a block_m x K strip of A and a K x block_n strip of B":
        dict(traffic="minimum"),
    "the tile count rounds up: triton.cdiv(M, block_m) * triton.cdiv(N, block_n); a partial tile loads "
    "whole strips too": dict(tiles=lambda a, b: a // b),
    "C is written once and never read: M * N elements, counted once": dict(c_writes=2),
    "C is written once: add its M * N elements to the bytes": dict(c_writes=0),
    "each tile loads its strips once: tiles * (block_m + block_n) * K elements, not twice that":
        dict(strips=2),
    "launch_us is in microseconds: add launch_us * 1e-6 seconds": dict(launch_scale=1e-3),
    "launch_us was left out: add launch_us * 1e-6 seconds to the larger time": dict(launch_scale=0.0),
    "bytes are elements times element_size": dict(element=False),
}

ROOFLINE_CASES = [  # M, N, K, element_size, block_m, block_n, peak TFLOP/s, bandwidth GB/s, launch us
    (4096, 4096, 4096, 2, 128, 128, 800.0, 3000.0, 0.0),  # memory bound: no L2 reuse is counted
    (4096, 4096, 4096, 2, 256, 256, 100.0, 3000.0, 5.0),  # compute bound
    (1000, 3001, 77, 4, 64, 128, 50.5, 1234.5, 4.2),
    (1, 8192, 8192, 2, 16, 128, 989.0, 3350.0, 3.0),
]


def check_matmul_roofline(matmul_roofline):
    cases = list(ROOFLINE_CASES)
    for _ in range(3):
        cases.append((random.randint(1, 9000), random.randint(1, 9000), random.randint(1, 9000), random.choice([1, 2, 4]),
                      random.choice([16, 32, 64, 128, 256]), random.choice([16, 32, 64, 128, 256]),
                      random.uniform(20, 1000), random.uniform(500, 5000), random.uniform(0, 10)))
    results = []
    for case in cases:
        result = matmul_roofline(*case)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str)):
            raise CheckError(f"matmul_roofline must return (seconds, bound), a float and 'memory' or 'compute'; "
                             f"got {result!r}")
        results.append((float(result[0]), result[1]))
    for case, (seconds, bound) in zip(cases, results):
        want_s, want_bound = _roofline_reference(*case)
        name = "matmul_roofline(M={}, N={}, K={}, element_size={}, block_m={}, block_n={}, peak_tflops={:g}, " \
               "bandwidth_gbps={:g}, launch_us={:g})".format(*case)
        if not math.isclose(seconds, want_s, rel_tol=1e-9, abs_tol=1e-15):
            lines = [f"{name}: {seconds:.6g} s, expected {want_s:.6g} s"]
            for hint, switches in _ROOFLINE_MISTAKES.items():  # the mistake that explains every case
                if all(math.isclose(got, _roofline_reference(*c, **switches)[0], rel_tol=1e-9, abs_tol=1e-15)
                       for c, (got, _) in zip(cases, results)):
                    lines.append(f"  hint: {hint}")
                    break
            raise CheckError("\n".join(lines))
        if bound != want_bound:
            raise CheckError(f"{name}: bound '{bound}', expected '{want_bound}'\n  hint: bound names the ceiling "
                             f"that sets the time: 'memory' when the bytes' time is at least the FLOPs' time")


# --------------------------------------------------------------------------- 10.3 heuristics

CHUNK_BYTES = 16384
CHOOSER_COLS = (1, 15, 16, 17, 100, 511, 1000, 1024, 1025, 4095, 4096, 4097, 8191, 8192, 9000, 100_000)


def _block_reference(n, element_size):
    return min(max(16, triton.next_power_of_2(n)), CHUNK_BYTES // element_size)


def _warps_reference(block, element_size):
    return min(16, max(1, block * element_size // 512))


def _check_choosers(choose_block_size, choose_num_warps):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.empty(0, dtype=dtype)  # the choosers read its element_size() only
        size = x.element_size()
        cap = CHUNK_BYTES // size
        name = common.dtype_name(dtype)
        for n in CHOOSER_COLS:
            args = {"x_ptr": x, "out_ptr": x, "n_cols": n, "stride_xm": n}
            block = choose_block_size(dict(args))
            want = _block_reference(n, size)
            where = f"choose_block_size for n_cols={n} {name}"
            if not isinstance(block, int) or isinstance(block, bool):
                raise CheckError(f"{where} returned {block!r}: a BLOCK_SIZE must be a Python int")
            if block != want:
                if block < 1 or block & (block - 1):
                    hint = "BLOCK_SIZE must be a power of 2 (tl.arange needs one): triton.next_power_of_2(n_cols)"
                elif size != 4 and block == min(max(16, triton.next_power_of_2(n)), CHUNK_BYTES // 4):
                    hint = "the cap is in bytes: 16 KiB is 4096 fp32 values but 8192 fp16 / bf16 ones"
                elif block > cap:
                    hint = (f"BLOCK_SIZE is capped at MAX_CHUNK_BYTES // element_size = {cap} for {name}: a longer "
                            f"row is looped over in chunks")
                elif block < 16:
                    hint = "at least 16, so that even a 1-column row gets an ordinary block"
                elif block < min(n, cap):
                    hint = (f"a row that fits under the cap must be one chunk: BLOCK_SIZE >= n_cols "
                            f"(the smallest power of 2 >= {n})")
                else:
                    hint = "the smallest power of 2 >= n_cols, at least 16, at most the cap: larger wastes lanes"
                raise CheckError(f"{where}: {block}, expected {want}\n  hint: {hint}")
            warps = choose_num_warps({**args, "BLOCK_SIZE": want})
            want_warps = _warps_reference(want, size)
            if warps != want_warps:
                hint = ("count bytes, not elements: one warp per 512 bytes, BLOCK_SIZE * element_size // 512"
                        if warps == min(16, max(1, want // 512)) else
                        "one warp per 512 bytes of the chunk (32 threads x 16 bytes), clamped to 1..16")
                raise CheckError(f"choose_num_warps for BLOCK_SIZE={want} {name}: {warps}, expected {want_warps}\n"
                                 f"  hint: {hint}")


def check_row_absmax(row_absmax):
    functions = inspect.unwrap(row_absmax).__globals__  # the grader wraps the function it grades
    choosers = functions.get("choose_block_size"), functions.get("choose_num_warps")
    if None in choosers:
        raise CheckError("the module must define choose_block_size and choose_num_warps (exercise 10.3)")
    _check_choosers(*choosers)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
    for dtype in dtypes:
        cap = CHUNK_BYTES // torch.empty(0, dtype=dtype).element_size()
        for n in (awkward_sizes(1, lo=17, hi=cap, include=())[0], cap + int(torch.randint(1, cap - 1, ())), 1):
            rows = int(torch.randint(3, 7 if common.INTERPRETER else 300, ()).item())
            base = randn(rows, n + 5, dtype=dtype, scale=3.0)
            # Each row's largest |x| planted where a mistake misses it: in the last column (the tail of
            # the last chunk) on even rows, anywhere on odd rows; negative on every third row.
            spike_cols = torch.randint(0, n, (rows,))
            spike_cols[::2] = n - 1
            spikes = torch.where(torch.arange(rows) % 3 == 0, -20.0, 20.0)
            base[torch.arange(rows), spike_cols.to(base.device)] = spikes.to(dtype=dtype, device=base.device)
            x = base[:, :n]  # rows 5 elements apart more than their length: the kernel must use the stride
            out = poisoned_empty(rows, dtype=torch.float32)
            result = row_absmax(x, out=out)
            if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
                raise CheckError("row_absmax was given out= but returned a different tensor")
            x64 = x.double()
            block = _block_reference(n, x.element_size())
            flat = base.flatten().double()[:rows * n].view(rows, n)  # what row * n_cols as the row start reads
            assert_close(out, x64.abs().amax(dim=1), name=f"row_absmax {rows}x{n} {common.dtype_name(dtype)}", mistakes={
                "only the first BLOCK_SIZE columns were read: loop over the row in chunks, "
                "for start in range(0, n_cols, BLOCK_SIZE)": x64[:, :block].abs().amax(dim=1),
                "that is the max of x, not of |x|: take tl.abs before the max": x64.amax(dim=1).clamp(min=0),
                "the rows are strided here: row i starts at x_ptr + i * stride_xm, not i * n_cols":
                    flat.abs().amax(dim=1),
            })


# --------------------------------------------------------------------------- 10.4 split-K

def _split_k_ranges(K, bk, split_k, *, start="slice", rounded=True, k_mask=True):
    """The [lo, hi) of K that each slice adds, by the spec of 10.4; the switches give the ranges of
    the usual mistakes (hi may pass K where a load is not masked: read from the padded storage)."""
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), bk) * bk if rounded else triton.cdiv(K, split_k)
    ranges = []
    for s in range(triton.cdiv(K, k_per_split)):
        lo = s * (k_per_split if start == "slice" else bk)
        # the kernel walks whole BLOCK_K steps from lo; only the k < K mask stops a step
        hi = lo + triton.cdiv(min(k_per_split, K - lo), bk) * bk
        ranges.append((lo, hi if not k_mask else min(hi, K)))
    return ranges


def _slice_sums(a64, b64, ranges):
    return [a64[:, lo:hi] @ b64[lo:hi, :] for lo, hi in ranges if hi > lo]


def _one_slice_each(out, partials):
    """Per element, the slice partial nearest to out: equal to out when every element holds one slice's
    partial (stored, not added: the last slice to finish wins, tile by tile on a GPU)."""
    stack = torch.stack([p.cpu() for p in partials])
    nearest = (stack - out.detach().cpu().double()).abs().nan_to_num(float("inf")).argmin(dim=0)
    return stack.gather(0, nearest[None]).squeeze(0)


def _split_k_inputs(M, N, K, dtype, layout):
    """a (M x K) and b (K x N), and the padded storage they are views of ("padded": rows of a and b
    continue past K with finite garbage, which an unmasked load reads instead of faulting)."""
    if layout == "padded":
        a_full = randn(M, 2 * K, dtype=dtype, scale=K ** -0.5)
        b_full = randn(2 * K, N, dtype=dtype)
        return a_full[:, :K], b_full[:K], a_full, b_full
    a = randn(M, K, dtype=dtype, scale=K ** -0.5)
    b = randn(N, K, dtype=dtype).t() if layout == "transposed" else randn(K, N, dtype=dtype)
    return a, b, a, b


def check_matmul_split_k(matmul_split_k):
    tile = inspect.unwrap(matmul_split_k).__globals__.get("SPLIT_K_TILE")
    if not tile:
        raise CheckError("the module must define SPLIT_K_TILE, the tile matmul_split_k launches with (exercise 10.4)")
    bk = tile["BLOCK_K"]
    hi = 70 if common.INTERPRETER else 300

    def side():
        return awkward_sizes(1, lo=17, hi=hi, include=())[0]

    def k_steps(lo, high):  # K of lo..high BLOCK_K steps, never a multiple of BLOCK_K
        K = int(torch.randint(lo * bk + 1, high * bk, ()).item())
        return K + 1 if K % bk == 0 else K

    cases = [  # M, N, K, split_k, dtype, layout
        (side(), side(), k_steps(5, 9), 3, torch.float32, "padded"),  # K not a multiple of split_k x BLOCK_K
        (side(), side(), k_steps(6, 12), 4, torch.float16, "padded"),  # the cast from the fp32 accumulator
        (side(), side(), k_steps(2, 3), 8, torch.float32, "contiguous"),  # more slices asked than K has steps
        (1, side(), k_steps(8, 12), 5, torch.float32, "contiguous"),  # one row: the skinny case
        (side(), side(), k_steps(3, 5), 1, torch.float16, "transposed"),  # one slice, a transposed b
    ]
    # An fp32 output that holds something already (7.0, not the NaN poison, which stays NaN whatever is
    # added to it): the atomics must start from zero. Run first, judged last (after the diagnoses below).
    M, N, K = side(), side(), k_steps(4, 8)
    a, b, _, _ = _split_k_inputs(M, N, K, torch.float32, "padded")  # padded: an unmasked K reads garbage, not past b
    held = torch.full((M, N), 7.0, device=common.DEVICE)
    matmul_split_k(a, b, 3, out=held)
    held_expected = a.double() @ b.double()
    zero_hint = "zero the fp32 accumulator before the launch (acc.zero_()): the atomics add into whatever it held"
    if torch.isclose(held.double().cpu(), (held_expected + 7.0).cpu(), rtol=1e-3, atol=1e-3).all():
        raise CheckError(f"matmul_split_k {M}x{N}x{K} into an fp32 out holding 7.0: every element is 7.0 more than "
                         f"a @ b\n  hint: {zero_hint}")
    for M, N, K, split_k, dtype, layout in cases:
        a, b, a_full, b_full = _split_k_inputs(M, N, K, dtype, layout)
        a64, b64, a_full64, b_full64 = a.double(), b.double(), a_full.double(), b_full.double()
        out = poisoned_empty(M, N, dtype=dtype)
        result = matmul_split_k(a, b, split_k, out=out)
        if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
            raise CheckError("matmul_split_k was given out= but returned a different tensor")
        slices = _slice_sums(a64, b64, _split_k_ranges(K, bk, split_k))
        mistakes = {
            "slice s starts at s * K_PER_SPLIT (program_id(2) * K_PER_SPLIT): started at s * BLOCK_K, the "
            "slices overlap, part of K is added more than once and the end of K never":
                sum(_slice_sums(a64, b64, _split_k_ranges(K, bk, split_k, start="block"))),
            "K_PER_SPLIT must be whole BLOCK_K steps, triton.cdiv(triton.cdiv(K, split_k), bk) * bk: otherwise "
            "a slice's last step runs into the next slice, and that part of K is added twice":
                sum(_slice_sums(a64, b64, _split_k_ranges(K, bk, split_k, rounded=False))),
            "the loads need the mask k < K as well: the last slice's last step reaches past K and adds "
            "whatever lies there (the tail of K)":
                sum(_slice_sums(a_full64, b_full64, _split_k_ranges(K, bk, split_k, k_mask=False))),
            "each slice's partial was stored, so the last slice to finish overwrote the others: add it "
            "into C with tl.atomic_add": _one_slice_each(out, slices),
        }
        name = f"matmul_split_k {M}x{N}x{K} split_k={split_k} {common.dtype_name(dtype)} ({layout} inputs)"
        assert_close(out, a64 @ b64, name=name, mistakes=mistakes, **common.checks.dot_tolerance(dtype))
    assert_close(held, held_expected, name="matmul_split_k into an fp32 out holding 7.0", mistakes={
        zero_hint: held_expected + 7.0,
        "nothing was added into out: does the kernel tl.atomic_add into c_ptr, and does the wrapper launch it "
        "on the fp32 accumulator (out itself when out is fp32)?": torch.full_like(held_expected, 7.0)},
        dtype=torch.float32, **common.checks.dot_tolerance(torch.float32))
    result = matmul_split_k(a.half(), b.half(), 2)  # no out: an output of the inputs' dtype
    assert_close(result, a.half().double() @ b.half().double(), name=f"matmul_split_k {M}x{N}x{K} fp16, out=None")


EXERCISES = [
    Exercise("10.1", "prune_configs", check_prune_configs),
    Exercise("10.2", "matmul_roofline", check_matmul_roofline),
    Exercise("10.3", "row_absmax", check_row_absmax,
             kernels=("row_absmax_kernel", "choose_block_size", "choose_num_warps")),
    Exercise("10.4", "matmul_split_k", check_matmul_split_k, kernels=("matmul_split_k_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

def _wrong_prune(**switches):
    def prune_configs(configs, named_args, smem_limit=None, **kwargs):
        return _prune_reference(configs, named_args["M"], named_args["N"], named_args["K"],
                                named_args["a_ptr"].element_size(), smem_limit or H100_SMEM, **switches)
    return prune_configs


def _prune_fixed_element_size(configs, named_args, smem_limit=None, **kwargs):
    return _prune_reference(configs, named_args["M"], named_args["N"], named_args["K"], 2, smem_limit or H100_SMEM)


def _wrong_roofline(**switches):
    return lambda *args: _roofline_reference(*args, **switches)


@triton.jit
def _row_absmax_wrong_kernel(x_ptr, out_ptr, n_cols, stride_xm, BLOCK_SIZE: tl.constexpr, MISTAKE: tl.constexpr):
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    stride = n_cols if MISTAKE == "stride" else stride_xm  # wrong for "stride": the rows are padded
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    end = BLOCK_SIZE if MISTAKE == "first chunk" else n_cols  # wrong for "first chunk": one chunk only
    for start in range(0, end, BLOCK_SIZE):
        x = tl.load(x_ptr + row * stride + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, x if MISTAKE == "no abs" else tl.abs(x))  # wrong for "no abs"
    if MISTAKE != "no store":
        tl.store(out_ptr + row, tl.max(acc, axis=0))


def _absmax_with(mistake=None, choose_block_size=None, choose_num_warps=None):
    sol = load_impl(STEM, "solutions")
    block = choose_block_size or sol.choose_block_size
    warps = choose_num_warps or sol.choose_num_warps
    heuristics = {"BLOCK_SIZE": block, "num_warps": warps}
    kernel = sol.row_absmax_kernel
    if mistake:
        heuristics["MISTAKE"] = lambda args: mistake
        kernel = _row_absmax_wrong_kernel
    copy = solution_with(STEM, choose_block_size=block, choose_num_warps=warps,
                          row_absmax_heuristic_kernel=triton.heuristics(heuristics)(kernel))
    return copy.row_absmax


@triton.jit
def _split_k_wrong_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                          stride_cn, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, MISTAKE: tl.constexpr):
    offs_m = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if MISTAKE == "overlap":
        k_start = tl.program_id(axis=2) * BLOCK_K  # wrong: slices BLOCK_K apart, each K_PER_SPLIT long
    else:
        k_start = tl.program_id(axis=2) * K_PER_SPLIT
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        if MISTAKE == "no k mask":  # wrong: the step that holds K's tail loads past it
            a_mask = offs_m[:, None] < M
            b_mask = offs_n[None, :] < N
        else:
            a_mask = (offs_m[:, None] < M) & (k + offs_k[None, :] < K)
            b_mask = (k + offs_k[:, None] < K) & (offs_n[None, :] < N)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k + offs_k)[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + (k + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if MISTAKE == "store":  # wrong: each slice overwrites the others' partials
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)


def _split_k_wrong(mistake):
    """matmul_split_k of a copy of the solutions whose kernel has one mistake (MISTAKE)."""
    return solution_with(STEM, matmul_split_k_kernel=with_flags(_split_k_wrong_kernel, MISTAKE=mistake)).matmul_split_k


# The exercise file's tile, for the wrong wrappers below: the check reads SPLIT_K_TILE from the module
# of the function it grades (test_split_k_tile_matches_the_exercise keeps the two equal).
SPLIT_K_TILE = ({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16} if common.INTERPRETER
                else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})


def _split_k_wrapper(*, rounded=True, zero=True):
    """The solution's wrapper, with switches for the wrapper's usual mistakes."""
    sol = load_impl(STEM, "solutions")

    def matmul_split_k(a, b, split_k, out=None):
        (M, K), N = a.shape, b.shape[1]
        out = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
        bm, bn, bk = (SPLIT_K_TILE[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        k_per_split = triton.cdiv(K, split_k)
        if rounded:
            k_per_split = triton.cdiv(k_per_split, bk) * bk
        acc = out if out.dtype == torch.float32 else torch.zeros((M, N), dtype=torch.float32, device=a.device)
        if zero:
            acc.zero_()
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), triton.cdiv(K, k_per_split))
        sol.matmul_split_k_kernel[grid](a, b, acc, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                        acc.stride(0), acc.stride(1), k_per_split, **SPLIT_K_TILE)
        if acc is not out:
            out.copy_(acc)
        return out
    return matmul_split_k


KNOWN_WRONG = [
    ("prune_configs", "shared memory without num_stages", lambda: _wrong_prune(stages=False), "num_stages"),
    ("prune_configs", "registers over num_warps, not threads", lambda: _wrong_prune(threads=1), "32 * num_warps"),
    ("prune_configs", "tiles compared with M itself", lambda: _wrong_prune(tile_bound="raw"), "next_power_of_2"),
    ("prune_configs", "BLOCK_K not checked", lambda: _wrong_prune(check_k=False), "BLOCK_K"),
    ("prune_configs", "empty list when nothing fits", lambda: _wrong_prune(fallback="empty"), "empty list"),
    ("prune_configs", "fallback to the first config", lambda: _wrong_prune(fallback="first"), "smallest shared memory"),
    ("prune_configs", "element size fixed at 2", lambda: _prune_fixed_element_size, "element_size()"),
    ("matmul_roofline", "times added", lambda: _wrong_roofline(combine=lambda a, b: a + b), "added"),
    ("matmul_roofline", "min instead of max", lambda: _wrong_roofline(combine=min), "min of the two"),
    ("matmul_roofline", "GiB/s", lambda: _wrong_roofline(gb=2**30), "1e9 bytes"),
    ("matmul_roofline", "TFLOP/s as 1e9", lambda: _wrong_roofline(tflop=1e9), "1e12"),
    ("matmul_roofline", "minimum bytes", lambda: _wrong_roofline(traffic="minimum"), "minimum bytes"),
    ("matmul_roofline", "tiles rounded down", lambda: _wrong_roofline(tiles=lambda a, b: a // b), "rounds up"),
    ("matmul_roofline", "C counted twice", lambda: _wrong_roofline(c_writes=2), "counted once"),
    ("matmul_roofline", "strips counted twice", lambda: _wrong_roofline(strips=2), "not twice"),
    ("matmul_roofline", "launch in ms", lambda: _wrong_roofline(launch_scale=1e-3), "microseconds"),
    ("matmul_roofline", "element size ignored", lambda: _wrong_roofline(element=False), "element_size"),
    ("matmul_roofline", "bound reversed", lambda: _wrong_roofline(swap=True), "bound names"),
    ("row_absmax", "block size not capped",
     lambda: _absmax_with(choose_block_size=lambda a: max(16, triton.next_power_of_2(a["n_cols"]))), "capped"),
    ("row_absmax", "cap in elements",
     lambda: _absmax_with(choose_block_size=lambda a: min(max(16, triton.next_power_of_2(a["n_cols"])), 4096)),
     "in bytes"),
    ("row_absmax", "block size = n_cols", lambda: _absmax_with(choose_block_size=lambda a: max(16, a["n_cols"])),
     "power of 2"),
    ("row_absmax", "num_warps from elements",
     lambda: _absmax_with(choose_num_warps=lambda a: min(16, max(1, a["BLOCK_SIZE"] // 512))), "count bytes"),
    ("row_absmax", "first chunk only", lambda: _absmax_with("first chunk"), "loop over the row"),
    ("row_absmax", "max of x, not |x|", lambda: _absmax_with("no abs"), "tl.abs"),
    ("row_absmax", "stride ignored", lambda: _absmax_with("stride"), "stride_xm"),
    ("row_absmax", "writes nothing", lambda: _absmax_with("no store"), "never written"),
    ("matmul_split_k", "slices start s * BLOCK_K apart (overlap)", lambda: _split_k_wrong("overlap"),
     "s * K_PER_SPLIT"),
    ("matmul_split_k", "the tail of K unmasked", lambda: _split_k_wrong("no k mask"), "mask k < K"),
    ("matmul_split_k", "partials stored, not added", lambda: _split_k_wrong("store"), "tl.atomic_add"),
    ("matmul_split_k", "K_PER_SPLIT not whole BLOCK_K steps", lambda: _split_k_wrapper(rounded=False),
     "whole BLOCK_K steps"),
    ("matmul_split_k", "accumulator not zeroed", lambda: _split_k_wrapper(zero=False), "zero the fp32 accumulator"),
]


def test_split_k_tile_matches_the_exercise():
    for impl in ("exercises", "solutions"):
        assert load_impl(STEM, impl).SPLIT_K_TILE == SPLIT_K_TILE, f"{impl}/{STEM}.py's SPLIT_K_TILE changed"


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


def test_references_match_hand_computed_values():
    """The checks' own references, against numbers worked out by hand."""
    # 32 x 32 tiles of 128 x 128: (1024 x 256 x 4096 + 4096^2) x 2 bytes = 2,181,038,080 at 3000 GB/s
    seconds, bound = _roofline_reference(4096, 4096, 4096, 2, 128, 128, 800.0, 3000.0)
    assert bound == "memory" and math.isclose(seconds, 2_181_038_080 / 3e12)
    seconds, bound = _roofline_reference(4096, 4096, 4096, 2, 256, 256, 100.0, 3000.0, 5.0)
    assert bound == "compute" and math.isclose(seconds, 5e-6 + 2 * 4096**3 / 100e12)
    kept = _prune_reference(SPACE, 4096, 4096, 4096, 2, H100_SMEM)
    assert [_label(c) for c in kept] == ["128x256x64 w8 s3", "128x128x64 w4 s4", "64x128x64 w4 s4", "64x64x128 w4 s3",
                                         "32x32x32 w2 s2", "16x64x32 w1 s2", "16x16x16 w1 s1"]
    assert [_label(c) for c in _prune_reference(SPACE, 4096, 4096, 4096, 2, 512)] == ["16x16x16 w1 s1"]
    assert _block_reference(5000, 4) == 4096 and _block_reference(5000, 2) == 8192 and _block_reference(1, 4) == 16
    assert _warps_reference(4096, 4) == 16 and _warps_reference(1024, 4) == 8 and _warps_reference(16, 2) == 1


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return _lesson()


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


def _fp32_safe_config(lesson) -> dict:
    """The lesson's CHECK_CONFIG: its fp32 tiles fit in the shared memory of any sm_80+ GPU."""
    return lesson.config_dict(lesson.CHECK_CONFIG)


def _shape():
    hi = 100 if common.INTERPRETER else 700
    return tuple(int(torch.randint(17, hi, ()).item()) for _ in range(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_matmul_one_config(lesson, dtype):
    M, N, K = _shape()
    config = _fp32_safe_config(lesson)
    for transpose_b in (False, True):
        a, b = lesson.random_problem(M, N, K, dtype, transpose_b)
        out = poisoned_empty(M, N, dtype=dtype)
        assert lesson.matmul(a, b, config, out=out) is out
        assert_close(out, a.double() @ b.double(), name=f"matmul {M}x{N}x{K} transpose_b={transpose_b}",
                     **common.checks.dot_tolerance(dtype))


def test_lesson_matmul_even_k(lesson):
    config = lesson.config_dict(lesson.HAND_PICKED[0])
    K = 4 * config["BLOCK_K"]  # a multiple of BLOCK_K: the heuristic picks the loads without K masks
    a, b = lesson.random_problem(37, 29, K, torch.float16)
    out = poisoned_empty(37, 29, dtype=torch.float16)
    lesson.matmul(a, b, config, out=out)
    assert_close(out, a.double() @ b.double(), name=f"matmul with EVEN_K (K = {K})")


def test_lesson_tuned_retunes_per_key_and_respects_pruning(lesson):
    kernel = lesson.matmul_tuned_kernel
    shapes = [(int(torch.randint(40, 90, ())), int(torch.randint(17, 60, ())), K) for K in (48, 50)]
    for M, N, K in shapes:
        a, b = lesson.random_problem(M, N, K, torch.float16)
        before = len(kernel.cache)
        for _ in range(2):  # the second call must reuse the key's entry
            out = poisoned_empty(M, N, dtype=torch.float16)
            lesson.matmul_tuned(a, b, out=out)
            assert_close(out, a.double() @ b.double(), name=f"matmul_tuned {M}x{N}x{K}")
        assert len(kernel.cache) <= before + 1
        chosen = lesson.tuned_config(kernel, M, N, K, torch.float16)
        survivors = lesson.prune_matmul_configs(lesson.MATMUL_CONFIGS, {"M": M, "N": N, "K": K, "a_ptr": a})
        assert any(chosen is c for c in survivors), "the tuner picked a config the pruning dropped"
    out = lesson.matmul_tuned(a, b, modelled=True)
    assert_close(out, a.double() @ b.double(), name="matmul_tuned(modelled=True)")


def test_lesson_prune_rules(lesson):
    element = torch.empty(0, dtype=torch.float16)
    space = lesson.GPU_HAND_PICKED + lesson.GPU_EXTRA_CONFIGS
    limit = lesson.shared_memory_limit()
    for M, N in ((4096, 4096), (16, 8192), (50, 60), (1, 1)):
        kept = lesson.prune_matmul_configs(space, {"M": M, "N": N, "K": 64, "a_ptr": element})
        assert kept, "the pruning must keep at least one config"
        for c in kept:
            assert lesson.config_smem_bytes(c, 2) <= limit
        if len(kept) > 1 or M >= 16:
            for c in kept:
                assert c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(M))
    big = lesson.prune_matmul_configs(space, {"M": 4096, "N": 4096, "K": 4096, "a_ptr": element})
    too_big = [c for c in space if lesson.config_smem_bytes(c, 2) > limit]
    assert too_big and not any(c in big for c in too_big)


def test_lesson_perf_model(lesson):
    a = torch.empty(0, dtype=torch.float16)
    cfg = lesson.config_dict(lesson.GPU_HAND_PICKED[0])
    small = lesson.matmul_perf_model(1024, 1024, 1024, a, **cfg)
    large = lesson.matmul_perf_model(8192, 8192, 1024, a, **cfg)
    assert 0 < small < large, "more tiles (more waves) must take longer"
    assert lesson.matmul_perf_model(1024, 1024, 2048, a, **cfg) == pytest.approx(2 * small), "time is linear in K"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lesson_persistent(lesson, dtype):
    M, N, K = _shape()
    config = _fp32_safe_config(lesson)
    tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
    a, b = lesson.random_problem(M, N, K, dtype)
    for programs in sorted({1, 2, max(1, tiles - 1), tiles + 3}):  # one program for every tile .. more than tiles
        out = poisoned_empty(M, N, dtype=dtype)
        lesson.matmul_persistent(a, b, config, out=out, num_programs=programs)
        assert_close(out, a.double() @ b.double(), name=f"matmul_persistent {M}x{N}x{K}, {programs} programs",
                     **common.checks.dot_tolerance(dtype))


@pytest.mark.parametrize("reduction", ["atomic", "workspace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lesson_split_k(lesson, dtype, reduction):
    config = _fp32_safe_config(lesson)
    bk = config["BLOCK_K"]
    M, N = _shape()[:2]
    K = awkward_sizes(1, lo=5 * bk, hi=12 * bk, include=())[0]  # several steps, a partial last one
    for split_k, transpose_b in ((1, False), (2, True), (3, False), (lesson.MAX_SPLIT_K, False)):
        a, b = lesson.random_problem(M, N, K, dtype, transpose_b)
        out = poisoned_empty(M, N, dtype=dtype)
        assert lesson.matmul_split_k(a, b, config, split_k, out=out, reduction=reduction) is out
        assert_close(out, a.double() @ b.double(), name=f"matmul_split_k {M}x{N}x{K} split_k={split_k} {reduction}",
                     **common.checks.dot_tolerance(dtype))
    auto = lesson.matmul_split_k_auto(a, b, reduction=reduction)
    assert auto.dtype == dtype
    assert_close(auto, a.double() @ b.double(), name=f"matmul_split_k_auto {M}x{N}x{K}",
                 **common.checks.dot_tolerance(dtype))


def test_lesson_split_k_slices(lesson):
    assert lesson.split_k_slices(100, 64, 4) == (64, 2)  # 25 per slice rounds up to one step: 2 slices
    assert lesson.split_k_slices(1024, 64, 2) == (512, 2)
    assert lesson.split_k_slices(16384, 64, 8) == (2048, 8)
    assert lesson.split_k_slices(5, 32, 1) == (32, 1)
    for _ in range(50):  # the slices cover [0, K) once, each a whole number of BLOCK_K steps
        K, bk, split_k = random.randint(1, 5000), random.choice([16, 32, 64, 128]), random.randint(1, 20)
        k_per_split, slices = lesson.split_k_slices(K, bk, split_k)
        assert k_per_split % bk == 0 and 1 <= slices <= split_k
        assert (slices - 1) * k_per_split < K <= slices * k_per_split, (K, bk, split_k)


def test_lesson_split_k_waves_and_rule(lesson):
    big = lesson.config_dict(lesson.GPU_HAND_PICKED[0])  # 128 x 128 x 64
    thin = lesson.config_dict(lesson.GPU_EXTRA_CONFIGS[3])  # 16 x 128 x 128
    w = lesson.split_k_waves(1024, 1024, 1024, big, 1, 132)
    assert (w.tiles, w.programs, w.k_per_split) == (64, 64, 1024)
    assert w.waves == pytest.approx(64 / 132) and w.last_wave_full == pytest.approx(64 / 132)
    w = lesson.split_k_waves(1024, 1024, 1024, big, 3, 132)
    assert (w.slices, w.k_per_split, w.programs, w.busiest_sm_k) == (3, 384, 192, 768)
    assert w.last_wave_full == pytest.approx(60 / 132)
    assert lesson.split_k_waves(100, 100, 100, big, 1, 1).last_wave_full == 1.0
    # 64 tiles on 132 SMs: more than a quarter wave, no split (measured slower on an H100);
    # 16 tiles: 8 slices; already 4 waves: no split
    assert lesson.choose_split_k(1024, 1024, 1024, big, 132) == 1
    assert lesson.choose_split_k(1024, 1024, 1024, big, 512) == 4  # on 512 SMs 64 tiles are an eighth
    assert lesson.choose_split_k(512, 512, 16384, big, 132) == 8
    assert lesson.choose_split_k(16, 8192, 8192, thin, 132) == 1
    assert lesson.choose_split_k(128, 8192, 8192, thin, 132) == 1
    assert lesson.choose_split_k(4096, 4096, 4096, big, 132) == 1
    # each slice keeps at least MIN_K_STEPS steps: K = 256 is 4 steps of 64, too short to split
    assert lesson.choose_split_k(128, 128, 256, big, 132) == 1
    assert lesson.choose_split_k(128, 128, 512, big, 132) == 2


def test_lesson_split_k_bad_input(lesson):
    a, b = randn(8, 16), randn(16, 4)
    config = _fp32_safe_config(lesson)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="split_k must be an int >= 1"):
            lesson.matmul_split_k(a, b, config, bad)
    with pytest.raises(ValueError, match="reduction must be one of atomic, workspace"):
        lesson.matmul_split_k(a, b, config, 2, reduction="tree")
    with pytest.raises(TypeError, match="dtype"):
        lesson.matmul_split_k(a, b.half(), config, 2)
    with pytest.raises(ValueError, match="a.shape\\[1\\] must equal b.shape\\[0\\]"):
        lesson.matmul_split_k(a, randn(15, 4), config, 2)
    with pytest.raises(ValueError, match="out has shape"):
        lesson.matmul_split_k(a, b, config, 2, out=randn(4, 8))


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter runs programs one at a time, "
                                               "so atomics add in one order there anyway")
def test_lesson_split_k_workspace_is_deterministic(lesson):
    a, b = lesson.random_problem(300, 500, 4000, torch.float16)
    config = _fp32_safe_config(lesson)
    first = lesson.matmul_split_k(a, b, config, 8, reduction="workspace")
    for _ in range(3):
        assert torch.equal(lesson.matmul_split_k(a, b, config, 8, reduction="workspace"), first)


def test_lesson_split_k_benchmark_declared(lesson):
    bench = next(b for b in lesson.BENCHMARKS if "split-K" in b.title)
    assert list(bench.cases) == lesson.SPLIT_K_SHAPES and bench.op == "matmul"
    assert {(bar.kernel, bar.case, bar.vs, bar.at_least) for bar in bench.bars} == {
        (lesson.SPLIT_K_RULE, shape, "baseline", 0.9) for shape in lesson.SPLIT_K_SHAPES}


def test_lesson_hooks(lesson):
    n = awkward_sizes(1, lo=1000, hi=5000, include=())[0]  # a new size: a new key, so the tuners tune
    x = randn(n)
    expected = x.double().sum()
    wrong = float(lesson.tensor_sum(x, kernel=lesson.SUM_KERNELS["no hook (wrong)"]).double().cpu() / expected.cpu())
    assert wrong > 1.5, "without reset_to_zero the tuning runs add into the output"
    if common.INTERPRETER:  # one run per config while tuning, then the real one
        assert wrong == pytest.approx(len(lesson.ELEMENTWISE_CONFIGS) + 1, rel=1e-4)
    again = lesson.tensor_sum(x, kernel=lesson.SUM_KERNELS["no hook (wrong)"])  # cached config: one run
    assert_close(again, expected.reshape(1), name="tensor_sum, second call", atol=1e-4 * math.sqrt(n))
    y = randn(n + 1)
    assert_close(lesson.tensor_sum(y), y.double().sum().reshape(1), name="tensor_sum with reset_to_zero",
                 atol=1e-4 * math.sqrt(n))
    z = randn(n + 2)
    assert_close(lesson.scale_inplace(z.clone(), 3.0), z.double() * 3.0, name="scale_inplace with restore_value")
    w = z.clone()
    lesson.scale_inplace(w, 3.0, kernel=lesson.SCALE_KERNELS["no hook (wrong)"])
    assert not torch.allclose(w, z * 3.0), "without restore_value the tuning runs scale x again and again"


def test_lesson_roofline_math(lesson):
    cost = lesson.matmul_cost(4096, 4096, 4096, 2)
    assert cost.flops == 2 * 4096**3 and cost.nbytes == 3 * 4096**2 * 2
    seconds, bound = lesson.roofline_time(cost, peak_tflops=500.0, bandwidth_gbps=3000.0, launch_us=4.0)
    assert bound == "compute" and seconds == pytest.approx(4e-6 + 2 * 4096**3 / 500e12)
    seconds, bound = lesson.roofline_time(lesson.add_cost(2**20, 4), peak_tflops=500.0, bandwidth_gbps=2000.0)
    assert bound == "memory" and seconds == pytest.approx(3 * 4 * 2**20 / 2e12)
    x, y = torch.randn(1000), torch.randn(1000)
    assert lesson.add_cost(1000, 4).nbytes == common.min_bytes(x, y, x + y)
    props = {"mem_clock_rate": 2_619_000, "mem_bus_width": 5120}  # H100 SXM's HBM3: 2619 MHz, 5120 bits
    assert lesson.theoretical_bandwidth_gbps(props) == pytest.approx(3352.3, rel=1e-4)
    assert lesson.theoretical_bandwidth_gbps({}) is None


def test_lesson_roofline_cases_run(lesson):
    """Every course kernel the roofline benchmark times, called through its lesson's wrapper."""
    cases = lesson.roofline_cases(quick=False, small=True)
    assert {c.kernel for c in cases} == {"vector add (01)", "softmax (06)", "rmsnorm (08)", "matmul (10, tuned)"}
    for case in cases:
        out = case.setup()()
        assert isinstance(out, torch.Tensor) and torch.isfinite(out).all(), case.kernel
        assert case.cost.flops > 0 and case.cost.nbytes > 0


def test_lesson_benchmark_kernels(lesson):
    """Every kernel the benchmarks race is right (the layer times outputs, it does not check them)."""
    for bench in lesson.BENCHMARKS:
        a, b = bench.setup(*lesson.CPU_SHAPE)
        for name, fn in bench.kernels.items():
            assert_close(fn(a, b), a.double() @ b.double(), name=f"{bench.title}: {name}",
                         **common.checks.dot_tolerance(a.dtype))
    names = [bar.vs for bar in lesson.BENCHMARKS[0].bars]
    assert "baseline" in names and set(lesson.HAND) <= set(names), "a bar against cuBLAS and each hand-picked config"
    with pytest.raises(ValueError, match="EVEN_K=True needs K a multiple of BLOCK_K"):
        lesson.matmul_even_k(*lesson.random_problem(20, 24, 33, torch.float16), even_k=True)


def test_lesson_bad_input(lesson):
    a, b = randn(8, 16), randn(16, 4)
    config = lesson.config_dict(lesson.HAND_PICKED[0])
    with pytest.raises(ValueError, match="a.shape\\[1\\] must equal b.shape\\[0\\]"):
        lesson.matmul(a, randn(15, 4), config)
    with pytest.raises(ValueError, match="config must be a dict"):
        lesson.matmul(a, b, {"BLOCK_M": 16})
    with pytest.raises(ValueError, match="power of 2"):
        lesson.matmul(a, b, dict(config, BLOCK_K=24))
    with pytest.raises(TypeError, match="dtype"):
        lesson.matmul_tuned(a.to(torch.int32), b.to(torch.int32))
    with pytest.raises(ValueError, match="out has shape"):
        lesson.matmul_tuned(a, b, out=randn(4, 8))
    with pytest.raises(ValueError, match="num_programs"):
        lesson.matmul_persistent(a, b, config, num_programs=0)
    with pytest.raises(ValueError, match="empty"):
        lesson.matmul(randn(0, 16), b, config)
    with pytest.raises(TypeError, match="dtype"):
        lesson.tensor_sum(torch.ones(10, dtype=torch.int32, device=common.DEVICE))
    with pytest.raises(TypeError, match="scale"):
        lesson.scale_inplace(randn(10), "2")


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has no device to query")
def test_lesson_device_properties(lesson):
    props = lesson.device_properties()
    assert props["multiprocessor_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    assert props["max_shared_mem"] >= 48 * 1024 and props["warpSize"] == 32
    assert lesson.theoretical_bandwidth_gbps(props) is None or lesson.theoretical_bandwidth_gbps(props) > 100


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    config = lesson.config_dict(lesson.HAND_PICKED[0])
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.matmul(torch.randn(8, 16), torch.randn(16, 4, device="cuda"), config)
