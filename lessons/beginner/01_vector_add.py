"""
Lesson 01: vector add
=====================

Build `add(x, y)`, a Triton kernel that adds two vectors, check it against PyTorch, and measure
it against the memory bandwidth of the GPU it runs on.

You will learn:
- how a Triton *program* finds its slice of the data: `tl.program_id`, `tl.arange`, offsets
- why the last block needs a *mask*, and how the *launch grid* is sized with `triton.cdiv`
- why an elementwise op is limited by memory bandwidth, and how to report it as % of a copy
- what BLOCK_SIZE changes, measured from 64 to 16384

Run:  python lessons/beginner/01_vector_add.py [--quick]
"""

import functools
import sys
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

from common import Table, section

# %% [markdown]
# ## Motivation
# Adding two vectors of n floats reads 2n * 4 bytes and writes n * 4 bytes, and does n additions.
# An H100 does ~50 TFLOP/s of fp32 arithmetic but moves only ~3 TB/s: the additions take a few
# microseconds of a ~1 ms run at n = 2^28. The kernel is *memory bound*: its speed is the
# speed of moving bytes, so we measure it in GB/s against the fastest copy this GPU can do.

# %% [markdown]
# ## Reference (PyTorch)


# %%
def add_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y  # reads 2n elements, writes n: one kernel launch


def sub_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x - y  # same traffic as add


# %% [markdown]
# ## Kernel
# One *program* (a block of threads on one SM) handles BLOCK_SIZE consecutive elements.
# Program `pid` handles elements [pid * BLOCK_SIZE, (pid + 1) * BLOCK_SIZE). When n is not a
# multiple of BLOCK_SIZE the last program's block runs past the end: the mask turns those
# loads and stores off.


# %%
@triton.jit
def add_kernel(
    x_ptr,  # pointer to the first element of x
    y_ptr,  # pointer to the first element of y
    out_ptr,  # pointer to the first element of the output
    n_elements,  # how many elements there are
    BLOCK_SIZE: tl.constexpr,  # elements per program; a compile-time constant (a power of 2)
):
    pid = tl.program_id(axis=0)  # which block this program handles
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # BLOCK_SIZE indices at once
    mask = offsets < n_elements  # False for the part of the last block past the end
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


@triton.jit
def sub_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    # The same kernel with one operator changed: a memory-bound op costs what its bytes cost.
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) - tl.load(y_ptr + offsets, mask=mask),
             mask=mask)


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return. The grid is how many programs to launch:
# cdiv(n, BLOCK_SIZE) = ceil(n / BLOCK_SIZE), so the tail gets a program too.

# %%
# 1024 elements per program (8 fp32 per thread with the default 4 warps). Measured at 2^28 fp32
# on an H200 (2026-11-22): every BLOCK_SIZE from 256 to 16384 ran within 2% of the best
# (4,378 GB/s at 256, 4,351 at 1024); 64 and 128 fell to 1,273 and 2,535 GB/s.
DEFAULT_BLOCK_SIZE = 1024


def _launch(kernel, x: torch.Tensor, y: torch.Tensor, block_size: int, out: torch.Tensor | None):
    common.check_tensors(x=x, y=y)
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 (tl.arange needs one), got {block_size}")
    if out is None:
        out = torch.empty_like(x)
    else:
        common.check_tensors(x=x, out=out)
    n = x.numel()
    grid = (triton.cdiv(n, block_size),)
    kernel[grid](x, y, out, n, BLOCK_SIZE=block_size)
    return out


def add(x: torch.Tensor, y: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """x + y for two contiguous tensors of one shape and dtype."""
    return _launch(add_kernel, x, y, block_size, out)


def sub(x: torch.Tensor, y: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """x - y for two contiguous tensors of one shape and dtype."""
    return _launch(sub_kernel, x, y, block_size, out)


# %% [markdown]
# ## Check
# Awkward sizes (1, and random sizes that are not a multiple of any block), fresh random
# inputs, the output filled with NaN first so an element the kernel skips cannot pass, and a
# reference in float64.


# %%
def check(quick: bool) -> None:
    section("Check: Triton against PyTorch (float64 reference)")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
    sizes = common.awkward_sizes(count=3 if quick else 6, lo=1000, hi=10_000_000, include=(1, 17))
    for dtype in dtypes:
        for n in sizes:
            x, y = common.randn(n, dtype=dtype), common.randn(n, dtype=dtype)
            for op, ref in ((add, add_reference), (sub, sub_reference)):
                out = common.poisoned_empty(n, dtype=dtype)
                op(x, y, out=out)
                common.assert_close(out, ref(x.double(), y.double()), name=f"{op.__name__} n={n}")
    for block_size in (64, 1024, 16384):  # every block size of the sweep below is correct too
        x, y = common.randn(sizes[0]), common.randn(sizes[0])
        common.assert_close(add(x, y, block_size), add_reference(x.double(), y.double()),
                            name=f"add BLOCK_SIZE={block_size}")
    names = ", ".join(common.dtype_name(d) for d in dtypes)
    print(f"add and sub match PyTorch for n in {sizes}, dtypes {names}: OK")
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


# %% [markdown]
# ## Memory traffic
# The modelled minimum is each input read once and the output written once. PyTorch's
# `x + y` is counted op by op with a TorchDispatchMode (this works on the CPU too).


# %%
def traffic(n: int) -> None:
    section(f"Memory traffic at n = {n:,} fp32")
    x = torch.randn(n, device=common.DEVICE)
    y = torch.randn(n, device=common.DEVICE)
    out = add(x, y)
    counted = common.count_torch_traffic(add_reference, x, y)
    print(f"modelled minimum (read x, y; write out): {common.fmt_bytes(common.min_bytes(x, y, out))}")
    print(f"PyTorch x + y, counted:                  {counted.summary()}")
    print(f"Triton add: 1 kernel launch, {triton.cdiv(n, DEFAULT_BLOCK_SIZE):,} programs of "
          f"{DEFAULT_BLOCK_SIZE} elements; reads and writes the minimum")
    print("Both move the minimum: the only way to be faster is to move the bytes faster.")


# %% [markdown]
# ## What the compiler made
# common.inspect_kernel compiles add_kernel as a launch would (for this GPU; for an H100 without
# one, so a CPU learner sees the same numbers) and reads the registers, the load widths and how
# many programs fit on one SM at once. A program of 4 warps is 128 threads: BLOCK_SIZE = 64 leaves
# half of them without an element, 1024 gives each thread 8 (two 16-byte loads per input). The
# last column is the most bytes of x and y one SM can have requested at once: to keep the memory
# busy, an SM needs about bandwidth x latency / SMs bytes in flight (Little's law). On an H100
# (lessons/results): BLOCK_SIZE = 64, at most 8 KiB an SM (1.08 MB over 132 SMs), ran at
# 1,275 GB/s, so a load took about 1.08 MB / 1,275 GB/s = 0.85 us; 3.0 TB/s then needs 2.5 MB
# in flight, 18.8 KiB an SM: 128 (16 KiB) reached 84% of copy, 256 (32 KiB) and up all of it.


# %%
INSPECTED_BLOCK_SIZES = (64, 256, 1024, 4096, 16384)


def compiled_kernel() -> None:
    section("What the compiler made of add_kernel (num_warps = 4)")
    x = torch.empty(2**20, device=common.DEVICE)  # nothing is launched: only the dtype and alignment matter
    reports = common.inspect_kernels([(add_kernel, (x, x, x, x.numel()), dict(BLOCK_SIZE=block, num_warps=4))
                                      for block in INSPECTED_BLOCK_SIZES], skip_with_reason=True)
    if reports is None:
        return
    table = Table(f"add_kernel compiled for sm_{reports[0].arch}",
                  ["BLOCK_SIZE", "elements/thread", "registers/thread", "spilled", "loads of x, y", "programs/SM",
                   "bound by", "x, y requested/SM"])
    for block, r in zip(INSPECTED_BLOCK_SIZES, reports):
        programs, binding, _ = r.occupancy()
        loads = ", ".join(f"{n} x {kind.split()[0]}" for kind, n in sorted(r.loads.items(), reverse=True))
        table.add(block, f"{block / r.threads:g}", r.registers, common.fmt_bytes(r.local_bytes or 0), loads,
                  programs, binding, common.fmt_bytes(programs * block * 2 * x.element_size()))
    table.print()
    if reports[0].note:
        print(reports[0].note)
    by_threads = [b for b, r in zip(INSPECTED_BLOCK_SIZES, reports) if r.occupancy()[1] == "threads"]
    print(f"Up to BLOCK_SIZE = {max(by_threads)} an SM is full by threads (programs of 128 threads); past it the "
          f"registers holding each thread's elements bind. What grows with BLOCK_SIZE is the bytes each program "
          f"requests at once: Little's law (lesson 01's md) says how many an SM needs in flight.")


# %% [markdown]
# ## Benchmark
# Declared once, run by common.Benchmark: every provider is timed on every size in alternating
# rounds, in GB/s counting bytes read plus bytes written, as a % of a device-to-device copy
# measured in the same run, and against the fastest baseline the registry names for an
# elementwise op (torch eager, torch.compile).


# %%
def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:,}"


def _two_vectors(n: int) -> tuple:
    return torch.randn(n, device=common.DEVICE), torch.randn(n, device=common.DEVICE)


def _add_bytes(x, y) -> int:
    return 3 * x.numel() * x.element_size()  # read x and y, write out


@functools.cache
def _sweep_inputs(n: int) -> tuple:  # one pair of vectors for every BLOCK_SIZE of the sweep
    return (*_two_vectors(n), torch.empty(n, device=common.DEVICE))


BENCHMARKS = [
    common.Benchmark(
        "x + y over sizes, fp32: GPU time per call (in a CUDA graph)", op="elementwise",
        cases=[2**e for e in range(12, 29, 2)], quick_cases=[2**12, 2**20, 2**24], cpu_cases=[1000],
        setup=_two_vectors, kernels={"triton add": add}, reference=add_reference,
        nbytes=_add_bytes, ceiling="copy", dtype=torch.float32, timer="graph", label=_pow2,
        plot="01_vector_add_sizes", xlabel="elements", logx=True,
        # Timed with CUDA events, small sizes measured the host instead: torch.compile's guards cost
        # more than its kernel below 2^22 (1.20 GB/s at 2^12 and 1,151 at 2^22 on an H200, where torch
        # read 10.4 and 2,789). Inside a graph no Python runs between calls: each number is GPU time.
        note="GPU time only: no Python between calls. Small sizes fit in L2 (the 4 input copies of 2^20 "
             "are 48 MiB), so they read faster than HBM; the launch cost the host adds is the next table."),
    common.Benchmark(
        "x + y on small tensors: host wall time per call (Python, checks, launch)", op="elementwise",
        cases=[2**12, 2**16, 2**20], cpu_cases=[100], setup=_two_vectors, kernels={"triton add": add},
        reference=add_reference, dtype=torch.float32, timer="wall", label=_pow2,
        note="Below about 2^20 elements every provider costs its launch, whatever n is: what a call costs "
             "the host, not what the GPU does. torch.compile adds its guard checks to each call."),
    common.Benchmark(
        "add: BLOCK_SIZE sweep at n = 2^28 fp32 (num_warps = 4)", op=None,
        cases=[2**k for k in range(6, 15)], cpu_cases=[64],
        setup=lambda block: (*_sweep_inputs(2**28 if common.HAS_GPU else 1000), block),
        kernels={"triton add": lambda x, y, out, block: add(x, y, block, out=out)},
        nbytes=lambda x, y, out, block: _add_bytes(x, y), ceiling="copy", dtype=torch.float32,
        label=lambda block: f"BLOCK_SIZE={block}", plot="01_vector_add_block_size", xlabel="BLOCK_SIZE",
        logx=True, note="Small blocks launch many tiny programs and leave each thread one element; very large "
                        "ones give each thread many registers' worth of data."),
    common.Benchmark(
        "add at n = 2^28 fp32: the perf bar", op="elementwise", cases=[2**28], cpu_cases=[1000],
        setup=_two_vectors, kernels={"triton add": add}, reference=add_reference, nbytes=_add_bytes,
        ceiling="copy", dtype=torch.float32, label=_pow2,
        bars=[common.Bar("triton add", 2**28, "ceiling", 90),
              # "On par": within the 2% that repeated timings of one kernel differ by.
              common.Bar("triton add", 2**28, "baseline", 0.98)]),
    common.Benchmark(
        "sub at n = 2^28 fp32: same bytes as add, same time", op="elementwise", cases=[2**28], cpu_cases=[1000],
        setup=_two_vectors, kernels={"triton sub": sub}, reference=sub_reference, nbytes=_add_bytes,
        ceiling="copy", dtype=torch.float32, label=_pow2),
]


# %% [markdown]
# ## Takeaways
# - A program handles one block; `pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)` are its indices.
# - `mask=offsets < n` on every load and store, and `triton.cdiv` for the grid, make any n work.
# - Elementwise kernels are memory bound: report GB/s and % of the measured copy bandwidth.
# - Add and subtract cost the same: the bytes set the time, not the arithmetic.


# %%
if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    traffic(2**20 if common.INTERPRETER else 2**28)
    compiled_kernel()
    common.run_benchmarks(BENCHMARKS, args.quick)
