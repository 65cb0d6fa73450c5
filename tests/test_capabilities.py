"""Every lesson kernel, compiled for each card the course supports, against that card's shared memory.

Issue 21: T4 (sm_75), A100 (sm_80), RTX 3090 / A10 (sm_86), L4 / RTX 4090 (sm_89), H100 / H200
(sm_90). Without any of them at hand, each kernel is compiled here for each target on the CPU
(Triton's front end, LLVM and its bundled ptxas; nothing is launched), and the compiler's own
count of the shared memory a program needs (`metadata.shared`) is compared with the card's limit
(common/capability.py). The checks:
- every config a lesson launches on a card (its tuner's pruning by `prune_configs_by_shared_memory`
  and its fallback, its fixed tiles fitted by `fit_blocks`) compiles for it and fits, and every
  config list launches something on every card, or the lesson skips it there with a reason;
- the helper's estimate is an upper bound of the measured bytes, and close to it (ESTIMATE_SLACK);
- configs that cannot fit (KNOWN_WRONG) are rejected by the helper, and the compiler agrees.

The compiles run in worker processes with COURSE_INTERPRETER=0 (this pytest process runs
kernels in the interpreter, where @triton.jit gives no compilable kernel and the lessons pick
their small interpreter configs). The test compiles a subset (see _cases(quick=True) and
_worker: what sm_75 and sm_86/89 skip); `python tests/test_capabilities.py --table` compiles
every config of every list for every card and prints the table (minutes per core).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if __name__ != "__main__":
    import common  # noqa: F401  (pytest: conftest imported it first, so kernels run in the interpreter)
ARCHS = (75, 80, 86, 89, 90)
WORKERS = 2  # compile processes at once: the CI box has 2 cores
# In the test (not --full), sm_86 and sm_89 compile only the configs the helper keeps within
# NEAR_LIMIT of their 99 KiB; for the rest sm_80's compile stands in (same code, same bytes).
SAME_CODE_AS_SM80 = {arch: "same code as sm_80, not compiled in the test" for arch in (86, 89)}
NEAR_LIMIT = 0.8
# Configs that cannot fit a card, which the helper must reject and the compiler confirm:
# (lesson, source, label) as the cases name them.
KNOWN_WRONG = {
    ("04", "v4_configs() float16", "128x256x64 w8 s4 GROUP_M=8"): (86, 89),  # 3 x 48 KiB in flight: 144 KiB > 99
    ("07", "dkdv_configs() float16", "32x128 w8 s3 HEAD_DIM=64 CAUSAL=False"): (75,),  # fp32 K, V: 80 KiB > 64
}


# ---------------------------------------------------------------------------------------------
# The worker: runs in a subprocess with COURSE_INTERPRETER=0, loads the lessons (so they pick
# their GPU configs), compiles each case for the asked targets and prints one JSON line a case.


@dataclass
class Case:
    """One kernel launch as a lesson makes it: the kernel, its arguments, one config."""
    lesson: str  # "04"
    kernel: str  # the lesson's name for it
    source: str  # where the config comes from, and the dtype: "v4_configs() float16", "V23_CONFIG", ...
    label: str  # the config, short
    fn: object  # a JITFunction, or a triton.heuristics wrapper of one
    args: tuple  # the launch's positional arguments (meta tensors: dtype and shape, no memory)
    meta: dict  # constexprs and launch options (num_warps, num_stages)
    min_arch: int = 75  # below it the lesson does not launch this (bf16: sm_80, fp8: sm_89)
    estimator: object = None  # the helper's estimate(config, element_size, arch=, **launch_args), for tl.dot loops
    element_size: int = 2  # of the tiles the estimate counts
    # used_on(arch): whether the lesson launches this config on sm_<arch> (its tuner's pruning with
    # its fallback, its fixed tiles fitted to the card); None: the helper's verdict ("kept"), or
    # always for a config without an estimate
    used_on: object = None
    # unavailable(arch): why the lesson skips this list's experiment on sm_<arch> ("" where it runs)
    unavailable: object = None


def _config_parts(config) -> dict:
    """A triton.Config or a lesson's config dict as one dict of launch keyword arguments."""
    if isinstance(config, dict):
        return dict(config)
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _label(meta: dict) -> str:
    blocks = "x".join(str(v) for k, v in meta.items() if k.startswith("BLOCK"))
    extra = [f"{k}={v}" for k, v in meta.items() if k not in ("num_warps", "num_stages") and not k.startswith("BLOCK")
             and k in ("GROUP_M", "HEAD_DIM", "CAUSAL", "SWIGLU", "PRECISE_ACC", "NUM_STAGES", "GROUPS")]
    return f"{blocks} w{meta.get('num_warps', 4)} s{meta.get('num_stages', 3)}" + (" " + " ".join(extra) if extra else "")


def _meta_tensor(*shape, dtype):
    import torch
    return torch.empty(*shape, dtype=dtype, device="meta")


def _load(number: str):
    """A lesson module, imported as the worker's COURSE_INTERPRETER=0 sees it (GPU configs)."""
    import torch
    from common.lessons import find, load_module

    if number == "07" and not torch.cuda.is_available():
        # Lesson 07 sizes its decode splits from the SM count at import (default_split_size, for a
        # benchmark's note); without a GPU that raises. Stand in an H100's 132 SMs for the import.
        real = torch.cuda.get_device_properties
        torch.cuda.get_device_properties = lambda *a, **k: type("Props", (), {"multi_processor_count": 132})()
        try:
            return load_module(find(number).script, name=f"capability_lesson_{number}")
        finally:
            torch.cuda.get_device_properties = real
    return load_module(find(number).script, name=f"capability_lesson_{number}")


def _matmul_cases(quick: bool) -> list[Case]:
    import torch

    cases = []
    M = N = K = 4096

    def mm_args(dtype, out_dtype=None):
        a, b = _meta_tensor(M, K, dtype=dtype), _meta_tensor(K, N, dtype=dtype)
        c = _meta_tensor(M, N, dtype=out_dtype or dtype)
        return (a, b, c, M, N, K, K, 1, N, 1, N, 1)

    dtypes = [(torch.float16, 75), (torch.bfloat16, 80)]
    L04 = _load("04")
    for source, configs, kernel, extra in (
            ("v4_configs()", L04.v4_configs(), L04.matmul_v3_kernel, {"INPUT_PRECISION": "ieee"}),
            ("V23_CONFIG + V3_GROUP_M", [dict(L04.V23_CONFIG, GROUP_M=L04.V3_GROUP_M)], L04.matmul_v3_kernel,
             {"INPUT_PRECISION": "ieee"}),
            ("TILE_SWEEP", [] if quick else [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w,
                                                  num_stages=3) for bm, bn, bk, w in L04.TILE_SWEEP],
             L04.matmul_v3_kernel, {"INPUT_PRECISION": "ieee"}),  # its tiles are v4's and STAGE_SWEEP's
            ("STAGE_SWEEP", [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=s)
                             for s in L04.STAGE_SWEEP], L04.matmul_v3_kernel, {"INPUT_PRECISION": "ieee"})):
        # the sweeps run the cases this card holds (L04._fits), and say why where none fits
        sweep = source.endswith("SWEEP")
        for dtype, min_arch in dtypes[:1] if quick else dtypes:
            for config in configs:
                meta = {**_config_parts(config), **extra}
                tile = (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["num_stages"])
                cases.append(Case("04", kernel.__name__, f"{source} {str(dtype)[6:]}", _label(meta), kernel,
                                  mm_args(dtype), meta, min_arch,
                                  _matmul_estimate(), dtype.itemsize,
                                  used_on=functools.partial(_sweep_fits, L04, tile) if sweep else None,
                                  unavailable=L04._stage_sweep_unavailable if source == "STAGE_SWEEP" else None))
    # fp32: v2/v3 (V23_CONFIG) and the three fp32 modes (FP32_CONFIG), on CUDA cores or tf32
    for source, config, kernel, precision in (
            ("V23_CONFIG fp32 ieee", dict(L04.V23_CONFIG), L04.matmul_v2_kernel, "ieee"),
            ("FP32_CONFIG ieee", dict(L04.FP32_CONFIG), L04.matmul_v3_kernel, "ieee"),
            ("FP32_CONFIG tf32", dict(L04.FP32_CONFIG), L04.matmul_v3_kernel, "tf32")):
        meta = {**config, "INPUT_PRECISION": precision}
        cases.append(Case("04", kernel.__name__, source, _label(meta), kernel, mm_args(torch.float32), meta, 75,
                          _matmul_estimate(tensor_cores=precision != "ieee"), 4))

    L10 = _load("10")
    kernel = L10.matmul_heuristic_kernel
    for source, configs in (("MATMUL_CONFIGS (HAND_PICKED + EXTRA_CONFIGS)", L10.MATMUL_CONFIGS),):
        for dtype, min_arch in dtypes[:1] if quick else dtypes:
            for config in configs:
                meta = _config_parts(config)
                if quick and any(_label(meta) == c.label for c in cases if c.lesson == "04"):
                    continue  # the same tile, stages and warps as one of lesson 04's
                cases.append(Case("10", "matmul_kernel", f"{source} {str(dtype)[6:]}", _label(meta), kernel,
                                  mm_args(dtype), meta, min_arch,
                                  _matmul_estimate(), dtype.itemsize))
    meta = _config_parts(L10.CHECK_CONFIG)
    cases.append(Case("10", "matmul_kernel", "CHECK_CONFIG fp32", _label(meta), kernel, mm_args(torch.float32), meta,
                      75, _matmul_estimate(), 4))  # tl.dot's default input_precision for fp32: tf32
    return cases


def _sweep_fits(L04, tile: tuple, arch: int) -> bool:
    return L04._fits(*tile, arch)


def _config_in(config, kept: list) -> bool:
    return any(_config_parts(config) == _config_parts(k) for k in kept)


def _fitted(per_arch: dict) -> list:
    """A config the lesson fits to each card (fixed tiles, halved where they do not fit), as
    (config, used_on) pairs: each distinct config once, used on the cards that get it.
    per_arch: arch -> the config the lesson launches there."""
    archs_of: dict = {}
    for arch, config in per_arch.items():
        archs_of.setdefault(json.dumps(_config_parts(config), sort_keys=True), (config, []))[1].append(arch)
    return [(config, lambda arch, archs=tuple(archs): arch in archs) for config, archs in archs_of.values()]


def _matmul_estimate(**kwargs):
    from common import capability as cap
    return functools.partial(cap.matmul_shared_memory, **kwargs)


def _attention_cases(quick: bool) -> list[Case]:
    import torch

    L07 = _load("07")
    B, H, N = 2, 16, 4096
    cases = []
    for D in (64, 128):
        for dtype, min_arch in ((torch.float16, 75), (torch.bfloat16, 80), (torch.float32, 75)):
            if quick and (dtype == torch.bfloat16 or (dtype == torch.float32 and D == 128)):
                continue  # bf16 compiles as fp16 does; fp32 (checks only, CUDA cores) at one D
            q, k, v, o, do, dq, dk, dv = (_meta_tensor(B, H, N, D, dtype=dtype) for _ in range(8))
            lse, delta = _meta_tensor(B, H, N, dtype=torch.float32), _meta_tensor(B, H, N, dtype=torch.float32)
            strides = (H * N * D, N * D, D) * 3
            precision = L07._dot_precision(dtype)
            fwd = (q, k, v, o, lse, 0.125, *strides, H, N, 1)
            dkdv = (q, k, v, do, lse, delta, dk, dv, 0.125, N)
            dqa = (q, k, v, do, lse, delta, dq, 0.125, N)
            # (configs, used_on) of each list: which config the lesson launches on which card
            if dtype == torch.float32:  # no autotuning: _fixed's halved tiles, fitted to each card
                def fixed(configs, name):
                    return _fitted({a: {**b, **o} for a in ARCHS for b, o in [L07._fixed(configs, dtype, name, D, a)]})
                lists = [("_fixed(fwd_configs(), fp32)", L07.attention_fwd_v3_kernel, fwd, fixed(L07.fwd_configs(), "fwd")),
                         ("_fixed(dkdv_configs(), fp32)", L07.attention_bwd_dkdv_kernel, dkdv,
                          fixed(L07.dkdv_configs(), "dkdv")),
                         ("_fixed(dq_configs(), fp32)", L07.attention_bwd_dq_kernel, dqa, fixed(L07.dq_configs(), "dq"))]
            else:  # the tuners' lists, pruned per card, and the small tiles that stand in where none fits
                def tuned(configs, name):
                    def used(config, arch):
                        prune = L07._prune_for(name, arch)["early_config_prune"]
                        return _config_in(config, prune(configs, {"q_ptr": q}, HEAD_DIM=D))
                    return [(c, functools.partial(used, c)) for c in configs + [L07._SMALL_CONFIGS[name]]]
                lists = [("fwd_configs()", L07.attention_fwd_v3_kernel, fwd, tuned(L07.fwd_configs(), "fwd")),
                         ("dkdv_configs()", L07.attention_bwd_dkdv_kernel, dkdv, tuned(L07.dkdv_configs(), "dkdv")),
                         ("dq_configs()", L07.attention_bwd_dq_kernel, dqa, tuned(L07.dq_configs(), "dq"))]
            lists.append(("v2_config()", L07.attention_fwd_v2_kernel, (q, k, v, o, 0.125, *strides, H, N),
                          _fitted({a: L07.v2_config(dtype, D, a) for a in ARCHS})))
            for source, kernel, args, configs in lists:
                for causal in (False,) if quick else (False, True):  # causal: measured the same
                    if kernel is L07.attention_fwd_v2_kernel and causal:
                        continue  # v2 is non-causal only
                    for config, used_on in configs:
                        meta = {**_config_parts(config), "HEAD_DIM": D, "DOT_PRECISION": precision}
                        if kernel is not L07.attention_fwd_v2_kernel:
                            meta["CAUSAL"] = causal
                        cases.append(Case("07", kernel.__name__, f"{source} {L07.common.dtype_name(dtype)}",
                                          _label(meta), kernel, args, meta, min_arch,
                                          _attention_estimate(kernel.__name__, dtype), dtype.itemsize, used_on))
    D, dtype, group = 128, torch.float16, 4
    HKV = H // group  # grouped-query attention, as the decode benchmark runs it
    q, cache = _meta_tensor(B, H, D, dtype=dtype), _meta_tensor(B, HKV, N, D, dtype=dtype)
    splits = 64
    parts = (_meta_tensor(B * H, splits, D, dtype=torch.float32), _meta_tensor(B * H, splits, dtype=torch.float32),
             _meta_tensor(B * H, splits, dtype=torch.float32))
    meta = dict(GROUP=group, BLOCK_G=16, PAGE_SIZE=0, HEAD_DIM=D, BLOCK_N=L07.DECODE_BLOCK_N, DOT_PRECISION="tf32",
                num_warps=4)
    cases.append(Case("07", "decode_split_kernel", "DECODE_BLOCK_N", _label(meta), L07.decode_split_kernel,
                      (q, cache, cache, q, q, *parts, 0.125, H * D, D, HKV * N * D, N * D, D, HKV * N * D, N * D, D,
                       D, HKV, N, 64, splits), meta))
    meta = dict(HEAD_DIM=D, BLOCK_S=L07.DECODE_BLOCK_S)
    cases.append(Case("07", "decode_reduce_kernel", "DECODE_BLOCK_S", _label(meta), L07.decode_reduce_kernel,
                      (*parts, _meta_tensor(B, H, D, dtype=dtype), splits), meta))
    return cases


def _attention_estimate(kernel_name: str, dtype):
    import torch
    from common import capability as cap
    kernel = {"attention_fwd_v3_kernel": "fwd", "attention_fwd_v2_kernel": "fwd", "attention_bwd_dq_kernel": "dq",
              "attention_bwd_dkdv_kernel": "dkdv"}[kernel_name]
    # fp32 runs its dots with input_precision="ieee" (_dot_precision): CUDA cores, no tensor cores
    return functools.partial(cap.attention_shared_memory, kernel=kernel, tensor_cores=dtype != torch.float32)


def _row_cases(quick: bool) -> list[Case]:
    """Lessons 05, 06 and 08: rows and tiles in registers; shared memory only for reductions,
    layout conversions and (softmax v4) rows in flight."""
    import torch

    cases = []
    M = 4096
    L05 = _load("05")
    for dtype in (torch.float32,):
        x, out = _meta_tensor(M, M, dtype=dtype), _meta_tensor(M, M, dtype=dtype)
        meta = dict(BLOCK_M=L05.BLOCK_M, BLOCK_N=L05.BLOCK_N, GROUP_M=8, EVICT="", num_warps=L05.NUM_WARPS)
        cases.append(Case("05", "transpose_v2_kernel", "BLOCK_M, BLOCK_N, NUM_WARPS", _label(meta),
                          L05.transpose_v2_kernel, (x, out, M, M, M, 1, M, 1), meta))
    L06 = _load("06")
    for dtype, min_arch in ((torch.float32, 75), (torch.float16, 75), (torch.bfloat16, 80)):
        if quick and dtype == torch.bfloat16:
            continue
        for n in (8192, 16384) if quick else (4096, 8192, 16384):  # the largest rows, and stages 2 -> 1
            x, out = _meta_tensor(M, n, dtype=dtype), _meta_tensor(M, n, dtype=dtype)
            block = L06._row_block(n)
            meta = dict(BLOCK_SIZE=block, num_warps=L06._softmax_num_warps(block))
            cases.append(Case("06", "softmax_kernel", f"_softmax_num_warps {L06.common.dtype_name(dtype)}",
                              _label(meta), L06.softmax_kernel, (x, out, n, n, n), meta, min_arch))
            num_warps, num_stages = L06._row_config(block, dtype.itemsize)
            meta = dict(BLOCK_SIZE=block, NUM_STAGES=num_stages, num_warps=num_warps)
            cases.append(Case("06", "softmax_rows_kernel", f"_row_config {L06.common.dtype_name(dtype)}", _label(meta),
                              L06.softmax_rows_kernel, (x, out, n, n, M, n), meta, min_arch))
        n = 131072
        x, out = _meta_tensor(1024, n, dtype=dtype), _meta_tensor(1024, n, dtype=dtype)
        split = n // L06.SPLIT_SEGMENT
        meta = dict(SPLIT=split, BLOCK_SIZE=L06.SPLIT_SEGMENT, SPLIT_BLOCK=max(16, split), PHASE=0,
                    num_warps=L06._split_warps(L06.SPLIT_SEGMENT, dtype.itemsize), launch_cooperative_grid=True)
        cases.append(Case("06", "softmax_split_row_kernel", f"SPLIT_SEGMENT {L06.common.dtype_name(dtype)}",
                          _label(meta), L06.softmax_split_row_kernel,
                          (x, out, n, n, 1024, n, _meta_tensor(1024, split, 2, dtype=torch.float32),
                           _meta_tensor(1024, dtype=torch.int32)), meta, min_arch))
        for name in ("softmax_three_pass_kernel", "softmax_online_kernel"):
            meta = dict(BLOCK_SIZE=L06.CHUNK_SIZE, num_warps=L06._softmax_num_warps(L06.CHUNK_SIZE))
            cases.append(Case("06", name, f"CHUNK_SIZE {L06.common.dtype_name(dtype)}", _label(meta),
                              getattr(L06, name), (x, out, n, n, n), meta, min_arch))
    L08 = _load("08")
    for dtype, min_arch in ((torch.float32, 75),) if quick else ((torch.float32, 75), (torch.bfloat16, 80)):
        for n in (16384,) if quick else (4096, 16384):
            x, y = _meta_tensor(M, n, dtype=dtype), _meta_tensor(M, n, dtype=dtype)
            w, b = _meta_tensor(n, dtype=dtype), _meta_tensor(n, dtype=dtype)
            stats = _meta_tensor(M, dtype=torch.float32)
            block = L08._row_block(n)
            d = L08.common.dtype_name(dtype)
            meta = dict(BLOCK_SIZE=block, num_warps=L08._row_num_warps(block))
            cases.append(Case("08", "layernorm_fwd_kernel", f"_row_num_warps {d}", _label(meta),
                              L08.layernorm_fwd_kernel, (x, w, b, y, stats, stats, n, n, 1e-5), meta, min_arch))
            cases.append(Case("08", "rmsnorm_fwd_kernel", f"_row_num_warps {d}", _label(meta),
                              L08.rmsnorm_fwd_kernel, (x, w, y, n, n, 1e-6), meta, min_arch))
            partial = _meta_tensor(264, n, dtype=torch.float32)
            meta = dict(BLOCK_SIZE=block, num_warps=L08._bwd_num_warps(block))
            cases.append(Case("08", "layernorm_bwd_kernel", f"_bwd_num_warps {d}", _label(meta),
                              L08.layernorm_bwd_kernel, (y, x, w, stats, stats, y, partial, partial, n, n, M, n, 16),
                              meta, min_arch))
        V = 128256
        logits, target = _meta_tensor(M, V, dtype=dtype), _meta_tensor(M, dtype=torch.int64)
        stats = _meta_tensor(M, dtype=torch.float32)
        one = _meta_tensor(1, dtype=torch.float32)
        meta = dict(BLOCK_SIZE=L08.CE_BLOCK_SIZE if L08.common.HAS_GPU else 4096)
        cases.append(Case("08", "cross_entropy_fwd_kernel", "CE_BLOCK_SIZE", _label(meta), L08.cross_entropy_fwd_kernel,
                          (logits, target, stats, stats, V, V, -100), meta, min_arch))
        cases.append(Case("08", "cross_entropy_bwd_kernel", "CE_BLOCK_SIZE", _label(meta), L08.cross_entropy_bwd_kernel,
                          (logits, logits, target, stats, one, one, V, V, V, -100), meta, min_arch))
    partial = _meta_tensor(2, 264, 4096, dtype=torch.float32)
    meta = dict(BLOCK_P=L08.SUM_ROWS_BLOCK[0], BLOCK_N=L08.SUM_ROWS_BLOCK[1])
    cases.append(Case("08", "sum_rows_kernel", "SUM_ROWS_BLOCK", _label(meta), L08.sum_rows_kernel,
                      (partial, _meta_tensor(4096, dtype=torch.float32), _meta_tensor(4096, dtype=torch.float32),
                       264, 4096), meta))
    return cases


def _moe_and_quantization_cases(quick: bool) -> list[Case]:
    import torch

    cases = []
    L09 = _load("09")
    T, E, top_k, H, F = 4096, 8, 2, 4096, 14336
    R = T * top_k
    max_tiles = R // L09.BLOCK_M + E
    for dtype, min_arch in ((torch.bfloat16, 80), (torch.float16, 75), (torch.float32, 75)):
        if quick and dtype == torch.bfloat16:
            continue
        d = L09.common.dtype_name(dtype)
        for swiglu, (K, N) in ((True, (H, F)), (False, (F, H))):
            a = _meta_tensor(T if swiglu else R, K, dtype=dtype)
            w = _meta_tensor(E, K, N, dtype=dtype)
            c = _meta_tensor(R, N, dtype=dtype)
            i32 = lambda n: _meta_tensor(n, dtype=torch.int32)  # noqa: E731
            # ..., stride_am, then the weights' strides (e, k, n) of a contiguous (E, K, N) tensor
            args = (a, i32(R), w, w, c, i32(max_tiles), i32(max_tiles), i32(E + 1), i32(1), N, K, max_tiles, K,
                    K * N, N, 1)
            fixed = _fitted({arch: L09.fixed_gemm_config(dtype, swiglu, arch) for arch in ARCHS})
            if dtype == torch.float32:
                lists = [("fixed_gemm_config() fp32", fixed)]
            else:
                def used(config, arch, configs=L09.gemm_configs(swiglu), swiglu=swiglu, a=a):
                    prune = L09._prune_for(swiglu, arch)["early_config_prune"]
                    return _config_in(config, prune(configs, {"a_ptr": a}, BLOCK_M=L09.BLOCK_M, SWIGLU=swiglu))
                lists = [(f"gemm_configs(swiglu={swiglu})", [(c, functools.partial(used, c))
                                                             for c in L09.gemm_configs(swiglu)]),
                         ("fixed_gemm_config()", fixed)]
            for source, configs in lists:
                for config, used_on in configs:
                    meta = {**_config_parts(config), "GATHER": swiglu, "SWIGLU": swiglu, "IEEE": dtype == torch.float32,
                            "BLOCK_M": L09.BLOCK_M}
                    cases.append(Case("09", "grouped_gemm_kernel", f"{source} {d}", _label(meta), L09.grouped_gemm_kernel,
                                      args, meta, min_arch,
                                      _matmul_estimate(b_tiles=2 if swiglu else 1, tensor_cores=dtype != torch.float32),
                                      dtype.itemsize, used_on))
    L11 = _load("11")
    N, K = 14336, 4096
    fp16 = torch.float16
    x, w, scale, out = (_meta_tensor(K, dtype=fp16), _meta_tensor(N, K, dtype=torch.int8),
                        _meta_tensor(N, dtype=torch.float32), _meta_tensor(N, dtype=fp16))
    for config in _first_and_largest(L11.w8a16_gemv_kernel.configs, quick):
        meta = _config_parts(config)
        cases.append(Case("11", "w8a16_gemv_kernel", "gemv_configs()", _label(meta), L11.w8a16_gemv_kernel.fn,
                          (x, w, scale, out, N, K, K), meta))
    M = 16
    x, out = _meta_tensor(M, K, dtype=fp16), _meta_tensor(M, N, dtype=fp16)
    for config in L11.w8a16_matmul_kernel.configs:
        meta = _config_parts(config)
        cases.append(Case("11", "w8a16_matmul_kernel", "matmul_configs()", _label(meta), L11.w8a16_matmul_kernel.fn,
                          (x, w, scale, out, M, N, K, K, K), meta, 75, _matmul_estimate(b_element_size=1), 2))
    words, scales = _meta_tensor(N, K // 8, dtype=torch.int32), _meta_tensor(N, K // 128, dtype=fp16)
    x, out = _meta_tensor(1, K, dtype=fp16), _meta_tensor(1, N, dtype=fp16)
    for config in _first_and_largest(L11.w4a16_gemv_kernel.configs, quick):
        meta = {**_config_parts(config), "GROUP_SIZE": 128, "BLOCK_M": 1}
        cases.append(Case("11", "w4a16_gemv_kernel", "w4a16_configs()", _label(meta), L11.w4a16_gemv_kernel.fn,
                          (x, words, scales, out, 1, N, K, K, K // 8, K // 128), meta))
    M = N = K = 4096
    a, b = _meta_tensor(M, K, dtype=torch.float8_e4m3fn), _meta_tensor(N, K, dtype=torch.float8_e4m3fn)
    s, c = _meta_tensor(1, dtype=torch.float32), _meta_tensor(M, N, dtype=torch.bfloat16)
    for precise in (False,) if quick else (False, True):  # PRECISE_ACC: measured the same
        for config in L11.fp8_matmul_kernel.configs:
            meta = {**_config_parts(config), "PRECISE_ACC": precise}
            cases.append(Case("11", "fp8_matmul_kernel", "fp8_configs()", _label(meta), L11.fp8_matmul_kernel.fn,
                              (a, b, s, s, c, M, N, K, K, K, N), meta, 89, _matmul_estimate(), 1))
    return cases


def _first_and_largest(configs: list, quick: bool) -> list:
    """Register-only kernels (GEMVs): their first config (the checks') and their largest tile."""
    if not quick:
        return configs
    largest = max(configs, key=lambda c: (c.num_warps, *sorted(c.kwargs.values())))
    return [configs[0]] + ([largest] if largest is not configs[0] else [])


def _cases(quick: bool) -> list[Case]:
    return _matmul_cases(quick) + _attention_cases(quick) + _row_cases(quick) + _moe_and_quantization_cases(quick)


def _compile_key(case: Case, arch: int) -> tuple:
    """Cases that compile the same kernel (a fixed config that is also in its tuner's list,
    lesson 09's): compiled once a worker."""
    return (id(case.fn), arch, tuple(str(getattr(a, "dtype", a)) for a in case.args), tuple(sorted(case.meta.items())))


def _first_dtype(args) -> str:
    return next((str(a.dtype).removeprefix("torch.") for a in args if hasattr(a, "dtype")), "")


def _worker(archs: list[int], quick: bool, only: str | None, out, shard: tuple[int, int] = (0, 1)) -> None:
    import common  # noqa: F401  (first: COURSE_INTERPRETER=0 keeps the kernels compilable)
    from common import capability as cap
    from common.compiler import compile_for

    cases = [c for c in _cases(quick) if not only or re.search(only, f"{c.lesson} {c.kernel} {c.source} {c.label}")]
    compiled_shared: dict = {}
    for case in cases[shard[0]::shard[1]]:
        known_wrong = KNOWN_WRONG.get((case.lesson, case.source, case.label), ())
        for arch in archs:
            row = dict(lesson=case.lesson, kernel=case.kernel, source=case.source, label=case.label, arch=arch,
                       limit=cap.shared_memory_limit(arch), dtype=_first_dtype(case.args),
                       meta={k: v for k, v in case.meta.items() if isinstance(v, (int, str, bool, float))})
            if case.estimator:
                row["estimate"] = case.estimator(case.meta, case.element_size, arch=arch, **case.meta)
                row["conservative"] = case.estimator(case.meta, case.element_size, arch=None, **case.meta)
                row["kept"] = bool(cap.prune_configs_by_shared_memory([case.meta], element_size=case.element_size,
                                                                      estimate=case.estimator, arch=arch, **case.meta))
            row["used"] = bool(case.used_on(arch)) if case.used_on else row.get("kept", True)
            row["unavailable"] = case.unavailable(arch) if case.unavailable else ""
            if arch < case.min_arch:
                row["skipped"] = f"needs sm_{case.min_arch}+"
            elif quick and arch == 75 and not row["used"] and arch not in known_wrong:
                # sm_75 compiles its dots for the CUDA cores, several seconds each: the test compiles
                # only what the lesson launches there (the --full table has the rest)
                row["skipped"] = "not compiled in the test: not launched on sm_75"
            elif quick and arch in SAME_CODE_AS_SM80 and arch not in known_wrong and not (
                    row["used"] and row.get("estimate", 0) >= NEAR_LIMIT * row["limit"]):
                # sm_86 and sm_89 get sm_80's code (mma v2, cp.async pipeline: the --full table shows
                # the same bytes for every case); the test compiles for them what is near their limit
                row["skipped"] = SAME_CODE_AS_SM80[arch]
            elif _compile_key(case, arch) in compiled_shared:
                row.update(compiled_shared[_compile_key(case, arch)])
            else:
                start = time.perf_counter()
                try:
                    compiled = compile_for(case.fn, arch, case.args, case.meta)
                    row["shared"] = compiled.metadata.shared
                except Exception as e:  # noqa: BLE001  (reported: the test decides what it means)
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
                row["seconds"] = round(time.perf_counter() - start, 2)
                compiled_shared[_compile_key(case, arch)] = {k: row[k] for k in ("shared", "error") if k in row}
            print(json.dumps(row), file=out, flush=True)


# ---------------------------------------------------------------------------------------------
# The tests. This process runs kernels in the interpreter, so the compiles happen in WORKERS
# worker processes (COURSE_INTERPRETER=0), started once for all the tests below.

# How far above the measured bytes the helper's estimate may be (it must never be below):
# exact for most tensor-core loops; sm_90's small tiles (BLOCK_M < 64: no wgmma, num_stages - 1
# buffers) leave more room; on sm_75 the estimate counts every fp32 operand copy of a K step,
# where Triton keeps one at a time for 16-bit inputs (up to 3x for the fused gate / up GEMM).
ESTIMATE_SLACK = {75: 3.0, 80: 1.5, 86: 1.5, 89: 1.5, 90: 1.5}


def _compile_in_workers(jobs: int, extra: list[str]) -> list[dict]:
    """Run `jobs` workers (this file with --worker, COURSE_INTERPRETER=0) and gather their rows."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COURSE_AUTO_INTERPRET")}
    env.update(COURSE_INTERPRETER="0", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--shard", f"{i}/{jobs}",
                               *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(jobs)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"a compile worker failed:\n{err[-4000:]}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def _read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]


@functools.cache
def _rows() -> tuple:
    """Every case x card of the test's subset, compiled: one dict a row (see _worker).
    CAPABILITY_ROWS=file: the rows a worker printed earlier, checked again without compiling."""
    rows = _read_rows(os.environ["CAPABILITY_ROWS"]) if os.environ.get("CAPABILITY_ROWS") else \
        _compile_in_workers(WORKERS, [])
    assert rows, "the workers compiled nothing"
    return tuple(rows)


def _name(row: dict) -> str:
    return f"lesson {row['lesson']} {row['kernel']} [{row['source']}] {row['label']} on sm_{row['arch']}"


def test_card_limits():
    from common import capability as cap

    assert {c.arch: c.max_shared_per_block for c in cap.CARDS} == {
        75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}
    assert cap.shared_memory_limit(90) == 227 * 1024
    with pytest.raises(ValueError, match="sm_70"):
        cap.shared_memory_limit(70)
    if not common.HAS_GPU:
        assert cap.shared_memory_limit() is None and cap.current_arch() is None


def _configs():
    import triton
    return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),  # 192 KiB
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),  # 144 KiB
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)]  # 16 KiB


def test_helper_prunes_a_list():
    from common import capability as cap

    big4, big3, small = _configs()
    # sm_90 keeps num_stages buffers, sm_80-89 num_stages - 1: 192 / 144 KiB there, 144 / 96 KiB here
    assert cap.prune_configs_by_shared_memory(_configs(), element_size=2, arch=90) == [big4, big3, small]
    assert cap.prune_configs_by_shared_memory(_configs(), element_size=2, arch=86) == [big3, small]
    assert cap.prune_configs_by_shared_memory(_configs(), element_size=2, arch=80) == [big4, big3, small]
    assert cap.prune_configs_by_shared_memory(_configs(), element_size=4, arch=86) == [small]
    assert cap.prune_configs_by_shared_memory(_configs(), element_size=2, limit=64 * 1024) == [small] or common.HAS_GPU
    assert cap.prune_configs_by_shared_memory([big4], element_size=2, arch=75) == []
    assert cap.fits_shared_memory(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_stages=2), 2, arch=75)
    if not common.HAS_GPU:  # the interpreter: no limit to prune against, every config stays
        assert cap.prune_configs_by_shared_memory(_configs(), element_size=2) == _configs()


def test_fit_blocks_halves_the_largest_until_it_fits():
    """fit_blocks: a fixed config's largest block halved until the estimate fits the card."""
    from common import capability as cap
    big = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)
    options = dict(num_warps=8, num_stages=4)
    # sm_86 keeps 3 buffers: 128x256x64 is 144 KiB of 99; 128x128x64 is 96 KiB
    assert cap.fit_blocks(big, options, 2, arch=86) == dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    assert cap.fit_blocks(big, options, 2, arch=90) == big  # 192 KiB of 227: as it is
    # BLOCK_M held (lesson 09's tile table): BLOCK_N, then BLOCK_K give way; sm_75 counts fp32 copies
    fitted = cap.fit_blocks(big, options, 2, arch=75, shrink=("BLOCK_N", "BLOCK_K"))
    assert fitted["BLOCK_M"] == 128 and cap.matmul_shared_memory({**fitted, **options}, 2, arch=75) <= 65536, fitted
    # nothing fits: it stops at the smallest blocks instead of looping
    assert cap.fit_blocks(big, options, 2, limit=1024) == dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    if not common.HAS_GPU:  # no card to fit to: unchanged
        assert cap.fit_blocks(big, options, 2) == big


def test_helper_as_early_config_prune():
    """The autotuner's call: (configs, named_args, **launch kwargs); element size from the tensors."""
    import torch
    import triton
    from common import capability as cap

    big4, big3, small = _configs()
    named = {"a_ptr": torch.empty(0, dtype=torch.float16), "M": 4096}
    prune = functools.partial(cap.prune_configs_by_shared_memory, arch=89)  # as on an L4 / RTX 4090
    assert prune(_configs(), named, INPUT_PRECISION="ieee") == [big3, small]
    with pytest.raises(triton.runtime.errors.OutOfResources, match="shared memory"):
        prune([big4], named)  # nothing fits: the launch's own error, not "no valid configs"
    attention = functools.partial(cap.prune_configs_by_shared_memory, arch=86,
                                  estimate=functools.partial(cap.attention_shared_memory, kernel="fwd"))
    fwd = [triton.Config({"BLOCK_M": 128, "BLOCK_N": bn}, num_warps=8, num_stages=s) for bn in (64, 128) for s in (3, 4)]
    kept = attention(fwd, {"q_ptr": torch.empty(0, dtype=torch.float16)}, HEAD_DIM=128)
    assert [(c.kwargs["BLOCK_N"], c.num_stages) for c in kept] == [(64, 3)]  # 96 KiB; 4 stages need 128


def test_helper_under_triton_autotune():
    """Wired into triton.autotune the way a lesson would; runs in this process (the interpreter)."""
    import torch
    import triton
    import triton.language as tl
    from common import capability as cap

    @triton.jit
    def fill_kernel(out_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, 16), tl.full([16], BLOCK_M + BLOCK_N, tl.float16))

    seen = []

    def prune(configs, named_args, **kwargs):
        kept = cap.prune_configs_by_shared_memory(configs, named_args, arch=86, **kwargs)
        seen.append(len(kept))
        return kept

    tuned = triton.autotune(configs=_configs(), key=[], prune_configs_by={"early_config_prune": prune},
                            do_bench=lambda fn, quantiles=None: (fn(), [1.0, 1.0, 1.0])[1])(fill_kernel)
    out = torch.zeros(16, dtype=torch.float16, device=common.DEVICE)  # 2-byte tiles: the estimate's size
    tuned[(1,)](out)
    assert seen == [2]  # 128x256x64 with 4 stages dropped before anything ran
    assert out[0].item() in (128 + 256, 64 + 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_configs_compile_and_fit(arch):
    """(a) What a lesson launches on this card (after its pruning and fitting) compiles for it and fits."""
    rows = [r for r in _rows() if r["arch"] == arch and "skipped" not in r and r["used"]]
    assert rows
    if arch in SAME_CODE_AS_SM80:  # the configs not compiled for it: sm_80's bytes against its limit
        sm80 = {(r["lesson"], r["kernel"], r["source"], r["label"]): r for r in _rows() if r["arch"] == 80}
        rows += [dict(sm80[(r["lesson"], r["kernel"], r["source"], r["label"])], arch=arch, limit=r["limit"])
                 for r in _rows() if r["arch"] == arch and r.get("skipped") == SAME_CODE_AS_SM80[arch]
                 and r["used"]]
    failed = [f"{_name(r)}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    over = [f"{_name(r)}: {r['shared']:,} B > {r['limit']:,} B (estimate {r.get('estimate')})"
            for r in rows if r["shared"] > r["limit"]]
    assert not over, "launched by the lesson but over the limit:\n" + "\n".join(over)


@pytest.mark.parametrize("arch", ARCHS)
def test_estimate_bounds_measured(arch):
    """(b) The estimate is never below what the compiler allocates, and close above it; the
    conservative estimate (arch=None, lesson 10's formula) is above it on every card."""
    rows = [r for r in _rows() if r["arch"] == arch and "shared" in r and r.get("estimate") is not None]
    assert rows
    below = [f"{_name(r)}: estimate {r['estimate']:,} < measured {r['shared']:,}" for r in rows
             if r["estimate"] < r["shared"] or r["conservative"] < r["shared"]]
    assert not below, "\n".join(below)
    # close above it where the lesson launches the config (sm_75's fitted tiles compiled for sm_90,
    # say, are smaller than wgmma's 64 rows and keep a buffer fewer than the estimate counts)
    loose = [f"{_name(r)}: estimate {r['estimate']:,} vs measured {r['shared']:,}" for r in rows
             if r["used"] and r["estimate"] > ESTIMATE_SLACK[arch] * r["shared"] + 2048]
    assert not loose, "\n".join(loose)


def test_sm86_sm89_compile_as_sm80():
    """What licenses the shortcut above: the configs compiled for all three take the same bytes."""
    by_arch = {}
    for r in _rows():
        if "shared" in r:
            by_arch.setdefault((r["lesson"], r["kernel"], r["source"], r["label"]), {})[r["arch"]] = r["shared"]
    compared = [v for v in by_arch.values() if {80, 86, 89} <= set(v)]
    assert len(compared) >= 5
    differ = [(k, v) for k, v in by_arch.items() if {80, 86, 89} <= set(v) and len({v[80], v[86], v[89]}) > 1]
    assert not differ, differ


def test_known_wrong_configs_are_rejected():
    """(c) 128x256x64 with 4 stages: 144 KiB on sm_86/89 (99 KiB), more than a T4's 64 KiB on every
    card that pipelines; the helper drops it on sm_75/86/89 and the compiler agrees where it pipelines.
    dkdv 32x128 at D = 64: K and V as fp32 copies on sm_75 are 80 KiB of its 64."""
    rows = {(r["lesson"], r["source"], r["label"], r["arch"]): r for r in _rows()}
    for arch in ARCHS:
        r = rows[("04", "v4_configs() float16", "128x256x64 w8 s4 GROUP_M=8", arch)]
        assert r["kept"] is (arch in (80, 90)), _name(r)
        assert r["conservative"] > 64 * 1024, _name(r)  # lesson 10's formula rejects it for a T4 too
        if arch in (86, 89):
            assert r["shared"] > r["limit"], _name(r)
        if arch >= 80 and "shared" in r:  # 3 or 4 stages pipelined: over a T4's 64 KiB on any card
            assert r["shared"] > 64 * 1024, _name(r)
    r = rows[("07", "dkdv_configs() float16", "32x128 w8 s3 HEAD_DIM=64 CAUSAL=False", 75)]
    assert r["kept"] is False and r["shared"] > r["limit"], _name(r)


def test_every_card_keeps_a_config():
    """Every config list launches something on every card (its tuner's pruning, its fallback,
    its fitted fixed tiles), or the lesson skips that experiment there with a reason (lesson 04's
    stage sweep on a T4). Together with (a): on no card does a lesson launch what cannot fit."""
    problems = []
    lists: dict = {}
    for r in _rows():
        if "skipped" in r and "needs" in r["skipped"]:
            continue
        head_dim = re.search(r"HEAD_DIM=\d+", r["label"])  # a list per head dimension: each is its own call
        key = (r["lesson"], r["kernel"], r["source"] + (f" {head_dim.group()}" if head_dim else ""), r["arch"])
        lists.setdefault(key, []).append(r)
    for (lesson, kernel, source, arch), rows in sorted(lists.items()):
        if not any(r["used"] for r in rows) and not all(r["unavailable"] for r in rows):
            problems.append(f"lesson {lesson} {kernel} [{source}]: launches no config on sm_{arch}, and gives no reason")
    assert not problems, "\n".join(problems)
    skipped = {(r["lesson"], r["source"], r["arch"]): r["unavailable"] for r in _rows() if r["unavailable"]}
    assert skipped.get(("04", "STAGE_SWEEP float16", 75), "").startswith("128 x 256 x 64 tiles need 96.00 KiB"), skipped


def _gpu_check(only: str | None, out, shard: tuple[int, int] = (0, 1)) -> None:
    """On a real GPU: the compile-only numbers against the JIT's own compile for this GPU, and a
    launch past the limit (it must raise OutOfResources), to show the CPU-side check is the real one."""
    import common
    import torch
    import triton
    from common import capability as cap
    from common.compiler import compile_for
    from triton.runtime.autotuner import Heuristics

    arch = cap.current_arch()
    props = torch.cuda.get_device_properties(0)
    driver_limit = triton.runtime.driver.active.utils.get_device_properties(0)["max_shared_mem"]
    print(json.dumps(dict(gpu=props.name, arch=arch, triton=triton.__version__, torch=torch.__version__,
                          shared_memory_per_block_optin=props.shared_memory_per_block_optin,
                          triton_max_shared_mem=driver_limit, table=cap.shared_memory_limit(arch))), file=out, flush=True)
    real = lambda a: torch.empty(a.shape, dtype=a.dtype, device="cuda") if hasattr(a, "dtype") else a  # noqa: E731
    for case in _cases(quick=True)[shard[0]::shard[1]]:
        if only and not re.search(only, f"{case.lesson} {case.kernel} {case.source} {case.label}"):
            continue
        if arch < case.min_arch:
            continue
        row = dict(lesson=case.lesson, kernel=case.kernel, source=case.source, label=case.label, arch=arch)
        try:
            row["compile_only"] = compile_for(case.fn, arch, case.args, case.meta).metadata.shared
            fn, meta, args = case.fn, dict(case.meta), tuple(real(a) for a in case.args)
            while isinstance(fn, Heuristics):
                for name, rule in fn.values.items():
                    meta[name] = rule({**dict(zip(fn.arg_names, args)), **meta})
                fn = fn.fn
            compiled = fn.warmup(*args, grid=(1,), **meta)
            row["jit"] = compiled.metadata.shared
            try:  # loads the binary: raises OutOfResources past the limit, as a launch would
                compiled._init_handles()
                row["loads"] = True
            except triton.runtime.errors.OutOfResources as e:
                row["loads"] = False
                row["load_error"] = str(e)[:200]
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), file=out, flush=True)


def _print_table(rows: list[dict]) -> None:
    """Markdown: one line a kernel x config, one column a card: bytes measured, and whether they fit."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["lesson"], r["kernel"], r["source"], r["label"]), {})[r["arch"]] = r
    print("| lesson | kernel | configs | config | " + " | ".join(f"sm_{a}" for a in ARCHS) + " |")
    print("|---|---|---|---|" + "---|" * len(ARCHS))
    for (lesson, kernel, source, label), cells in sorted(by_case.items()):
        shown = []
        for arch in ARCHS:
            r = cells.get(arch)
            if r is None or "skipped" in r:
                shown.append("-" if r is None else r["skipped"].split(":")[0])
            elif "error" in r:
                shown.append(f"error: {r['error'][:60]}")
            else:
                fit = "fits" if r["shared"] <= r["limit"] else "**over**"
                helper = " launched" if r.get("used") else " not launched"
                shown.append(f"{r['shared']:,} {fit}{helper}")
        print(f"| {lesson} | {kernel} | {source} | {label} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help="compile and print JSON lines (COURSE_INTERPRETER=0)")
    parser.add_argument("--gpu-check", action="store_true", help="on a GPU: compile-only vs the JIT's compile, and loads")
    parser.add_argument("--table", action="store_true", help="compile every case (--full) and print a Markdown table")
    parser.add_argument("--rows", help="with --table: print the table of a worker's saved JSON lines instead")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="with --table: worker processes")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--full", action="store_true", help="every config and dtype, not the test's subset")
    parser.add_argument("--only", help="a regex on 'lesson kernel source label'")
    parser.add_argument("--shard", default="0/1", help="k/n: every n-th case from the k-th (parallel workers)")
    cli = parser.parse_args()
    if cli.worker:
        sys.path.insert(0, str(REPO))
        k, n = map(int, cli.shard.split("/"))
        _worker(cli.arch, not cli.full, cli.only, sys.stdout, (k, n))
    elif cli.table:
        sys.path.insert(0, str(REPO))
        _print_table(_read_rows(cli.rows) if cli.rows else _compile_in_workers(cli.jobs, ["--full"]))
    elif cli.gpu_check:
        sys.path.insert(0, str(REPO))
        k, n = map(int, cli.shard.split("/"))
        _gpu_check(cli.only, sys.stdout, (k, n))


def test_tma_unavailable_names_the_missing_piece(monkeypatch):
    from common import capability
    monkeypatch.setattr(capability, "current_arch", lambda: 90)
    assert capability.tma_unavailable(("warp_specialize",)) == ""  # Triton 3.6 and 3.8 have both
    assert "no_such_option" in capability.tma_unavailable(("no_such_option",))
    monkeypatch.setattr(capability, "current_arch", lambda: 80)
    assert "sm_80" in capability.tma_unavailable() and "sm_90" in capability.tma_unavailable()
    monkeypatch.setattr(capability, "HAS_DESCRIPTORS", False)
    assert "make_tensor_descriptor" in capability.tma_unavailable()
