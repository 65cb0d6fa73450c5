"""Timing on the GPU: medians with their spread, and the machine's ceilings measured in-run.

Nothing here runs without a GPU: the interpreter's timings say nothing about a GPU kernel, so
lessons print "needs a GPU" instead of a number (see `device.require_gpu`).
"""

import functools
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton.testing

from .device import DEVICE, HAS_GPU, gpu_name, versions

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    """Median time of many runs, with the 20th and 80th percentiles as its spread."""

    ms: float
    lo_ms: float
    hi_ms: float

    @property
    def spread(self) -> float:
        """Half the 20-80 percentile range, relative to the median."""
        return (self.hi_ms - self.lo_ms) / (2 * self.ms)

    def gbps(self, nbytes: float) -> float:
        return nbytes / (self.ms * 1e-3) / 1e9

    def tflops(self, flops: float) -> float:
        return flops / (self.ms * 1e-3) / 1e12

    def __str__(self) -> str:
        return f"{self.ms:.4f} ms ±{100 * self.spread:.0f}%"


def bench(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """Median of `triton.testing.do_bench` (CUDA events, L2 flushed before each run)."""
    if not HAS_GPU:
        raise RuntimeError("bench() needs a CUDA GPU; check common.HAS_GPU before timing")
    med, lo, hi = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(med, lo, hi)


def median_ratio(fn_base: Callable[[], object], fn_new: Callable[[], object], pairs: int = 3,
                 rep_ms: int = 100) -> float:
    """Base time / new time: the median over `pairs` pairs of bench() timings taken back to back.

    Single timings of one kernel spread by several percent from call to call (on an H200, up to
    +-6% for lesson 04's 4096^3 matmuls: 85% of cuBLAS in one run, 94% in the next). The two
    timings of a pair see the same clocks and neighbours, and the median drops an odd pair.
    """
    ratios = sorted(bench(fn_base, rep_ms=rep_ms).ms / bench(fn_new, rep_ms=rep_ms).ms for _ in range(pairs))
    return ratios[len(ratios) // 2]


def bench_graphed(fns: list[Callable[[], object]], calls: int = 200, replays: int = 25) -> Timing:
    """Time per call of kernels too short for their Python launch, the way a decode step runs them:
    `calls` calls captured in one CUDA graph, replayed `replays` times (median and spread of the
    replays, divided by `calls`). No Python runs between the kernels, so the host cannot starve the
    GPU. There is no L2 flush inside a graph: pass several fns bound to copies of the data whose
    total is well above the L2 size; the graph calls them in turn, so no call finds its inputs in
    L2. Call each fn once before (an autotuner must not tune during the capture).
    """
    if not HAS_GPU:
        raise RuntimeError("bench_graphed() needs a CUDA GPU; check common.HAS_GPU before timing")
    side = torch.cuda.Stream()  # warm up on a side stream, as torch's CUDA-graph notes advise
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()  # warm-up
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return Timing(times[len(times) // 2], times[len(times) // 5], times[(4 * len(times)) // 5])


def wall_timing(fn: Callable[[], object], calls: int = 200, repeats: int = 5) -> Timing:
    """Wall-clock time per call of `calls` back-to-back calls: the median of `repeats`, with the
    20th and 80th percentiles of the repeats as its spread.

    What a tiny op really costs the host (Python, argument checks, the launch): CUDA events
    (bench) time the GPU side, which only waits when launches are the bottleneck.
    """
    if not HAS_GPU:
        raise RuntimeError("wall_timing() needs a CUDA GPU; check common.HAS_GPU before timing")
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e3)
    times.sort()
    return Timing(statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5])


def wall_us_per_call(fn: Callable[[], object], calls: int = 200, repeats: int = 5) -> float:
    """wall_timing's median in microseconds."""
    return 1e3 * wall_timing(fn, calls, repeats).ms


def gpu_kernel_count(fn: Callable[[], object]) -> int | None:
    """GPU kernels that one call of fn launches, counted with torch.profiler (memcpy and memset
    not counted); None where the profiler fails or sees no GPU activity (no CUPTI in the install).
    fn runs once before, so that compiling and autotuning are not counted."""
    if not HAS_GPU:
        raise RuntimeError("gpu_kernel_count() needs a CUDA GPU; check common.HAS_GPU first")
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the profiler warns about CUPTI settings it cannot change
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
    except Exception as err:
        print(f"kernel count skipped: torch.profiler failed ({type(err).__name__}: {err})")
        return None
    count = sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
                and not ev.name.startswith(("Memcpy", "Memset")))
    return count or None


def compiled(fn: Callable, *example_args) -> Callable | None:
    """torch.compile(fn) as a peer provider, or None (printed why) where it cannot run.

    With example arguments it is called once here, so a compile failure (a machine without a
    working inductor toolchain, say) prints a reason instead of crashing the benchmark.
    Call it once per input shape: it starts from a clean dynamo cache, because one compiled
    function called at many shapes collects a cache entry per shape, and checking those guards
    cost more than the kernel at small sizes (seen on H200: 38 GB/s instead of 166 at 2^16).
    """
    if not HAS_GPU:
        return None
    try:
        torch._dynamo.reset()
        result = torch.compile(fn, dynamic=False)
        if example_args:
            result(*example_args)
        return result
    except Exception as err:
        print(f"torch.compile failed, its column is left empty: {type(err).__name__}: {err}")
        return None


def _record_ceiling(key: str, value: float) -> None:
    """Keep what was measured in plots/ceilings.json, keyed by GPU, for `make bench`'s table.
    Written to a temporary file and renamed: two lessons measuring at once never leave half a
    file; an unreadable file is started again, an unwritable folder only skips the record."""
    path = REPO / "plots" / "ceilings.json"
    try:
        path.parent.mkdir(exist_ok=True)
        try:
            known = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # a file cut short by an older, non-atomic writer
            known = {}
        entry = known.setdefault(gpu_name(), {})
        entry[key] = round(value, 1)
        entry["versions"] = versions()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=2))
        os.replace(tmp, path)
    except OSError as err:
        print(f"ceiling not recorded in {path}: {err.strerror}")


@functools.cache
def copy_bandwidth() -> float:
    """Device-to-device copy in GB/s (bytes read + bytes written), measured once per process.

    1 GiB buffers are far larger than L2 (50 MB on H100, 60 MB on H200), so this is HBM.
    Every memory-bound kernel in the course is reported as a % of this number.
    """
    if not HAS_GPU:
        raise RuntimeError("copy_bandwidth() needs a CUDA GPU")
    src = torch.randn(2**28, device=DEVICE)
    dst = torch.empty_like(src)
    gbps = bench(lambda: dst.copy_(src)).gbps(2 * src.numel() * src.element_size())
    _record_ceiling("copy_GBps", gbps)
    return gbps


@functools.cache
def matmul_rate(dtype: torch.dtype = torch.float16, n: int = 8192) -> float:
    """torch.matmul (cuBLAS) TFLOP/s on random n x n x n data, measured once per process."""
    if not HAS_GPU:
        raise RuntimeError("matmul_rate() needs a CUDA GPU")
    # Random data, not zeros: zeros run measurably faster on the tensor cores (seen on H200).
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    tflops = bench(lambda: torch.matmul(a, b)).tflops(2 * n**3)
    _record_ceiling(f"matmul_{str(dtype).removeprefix('torch.')}_{n}_TFLOPs", tflops)
    return tflops


@functools.cache
def read_bandwidth() -> float:
    """Read-only stream in GB/s (bytes read), measured once per process: torch.sum over 1 GiB.

    The ceiling of a kernel that only reads (a decode over a KV cache, a GEMV over its weights,
    a reduction): DRAM reads faster than it copies, because a copy also writes (on an H200, SDPA's
    decode read its KV cache at 103-109% of the copy rate). Judging such a kernel against copy
    flatters it; against this it does not.
    """
    if not HAS_GPU:
        raise RuntimeError("read_bandwidth() needs a CUDA GPU")
    src = torch.randn(2**28, device=DEVICE)
    gbps = bench(lambda: src.sum()).gbps(src.numel() * src.element_size())
    _record_ceiling("read_GBps", gbps)
    return gbps


def pct_of_copy(gbps: float) -> float:
    return 100 * gbps / copy_bandwidth()
