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
import inspect
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
# ## The same kernel in CUDA C++
# In CUDA you write what one *thread* does and choose everything around it: threads per block,
# elements per thread, the grid, the bounds check of every element, 16-byte vector loads (and
# what to do when a pointer is not 16-byte aligned), the stream, the launch-error check. Below
# are two CUDA versions, built with torch's load_inline where nvcc exists: the textbook one
# (one float per thread) and one with float4 loads, which is what Triton's compiler emits for
# add_kernel (two 16-byte loads per input per thread at BLOCK_SIZE = 1024).


# %%
CUDA_ADD_KERNELS = r"""
#include <cstdint>
#include <cuda_runtime.h>

// The textbook version: thread i adds element i. 256 threads a block, n / 256 blocks.
__global__ void add_scalar_kernel(const float* __restrict__ x, const float* __restrict__ y,
                                  float* __restrict__ out, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] + y[i];
}

// Four floats a thread, in one 16-byte load per input (ld.global.v4.f32). Needs 16-byte aligned
// pointers (the launcher checks); the thread holding the last partial group adds it one by one.
__global__ void add_vec4_kernel(const float* __restrict__ x, const float* __restrict__ y,
                                float* __restrict__ out, int64_t n) {
    int64_t i = 4 * (blockIdx.x * (int64_t)blockDim.x + threadIdx.x);
    if (i + 3 < n) {
        float4 a = *reinterpret_cast<const float4*>(x + i);
        float4 b = *reinterpret_cast<const float4*>(y + i);
        *reinterpret_cast<float4*>(out + i) = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
    } else {
        for (; i < n; ++i) out[i] = x[i] + y[i];
    }
}

cudaError_t launch_add(const float* x, const float* y, float* out, int64_t n, bool vec4, cudaStream_t stream) {
    const int threads = 256;
    bool aligned = (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y) |
                    reinterpret_cast<uintptr_t>(out)) % 16 == 0;
    if (vec4 && aligned) {
        int64_t blocks = ((n + 3) / 4 + threads - 1) / threads;
        add_vec4_kernel<<<blocks, threads, 0, stream>>>(x, y, out, n);
    } else {
        add_scalar_kernel<<<(n + threads - 1) / threads, threads, 0, stream>>>(x, y, out, n);
    }
    return cudaGetLastError();
}
"""

CUDA_ADD_HOST = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

cudaError_t launch_add(const float* x, const float* y, float* out, int64_t n, bool vec4, cudaStream_t stream);

void add(torch::Tensor x, torch::Tensor y, torch::Tensor out, bool vec4) {
    for (const torch::Tensor& t : {x, y, out}) {
        TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
                    "x, y and out must be contiguous float32 CUDA tensors");
        TORCH_CHECK(t.sizes() == x.sizes(), "x, y and out must have one shape");
    }
    const c10::cuda::CUDAGuard guard(x.device());
    cudaError_t err = launch_add(x.data_ptr<float>(), y.data_ptr<float>(), out.data_ptr<float>(), x.numel(), vec4,
                                 c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "add kernel launch failed: ", cudaGetErrorString(err));
}
"""


def cuda_add(x: torch.Tensor, y: torch.Tensor, vec4: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """x + y by the CUDA C++ kernels above (float32, GPU with nvcc; common.cuda_unavailable says why not)."""
    module = common.load_cuda("course_vector_add", CUDA_ADD_KERNELS, CUDA_ADD_HOST, ("add",))
    if module is None:
        raise RuntimeError(f"the CUDA C++ add is not built here: {common.cuda_unavailable()}")
    common.check_tensors(x=x, y=y)
    out = torch.empty_like(x) if out is None else out
    module.add(x, y, out, vec4)
    return out


# What each version made its programmer write down. Lines of code are counted from the sources
# (common.code_lines: no blank or comment lines).
SIDE_BY_SIDE_DECISIONS = {
    "triton add": "BLOCK_SIZE (elements a program); num_warps kept at 4; the mask. The compiler picked "
                  "16-byte loads and how the block is spread over the threads",
    "cuda add, 1 float/thread": "threads a block (256), the grid, the bounds check, the stream, the launch "
                                "error check, the tensor checks in C++",
    "cuda add, float4": "all of the above, plus elements a thread (4), float4 casts, a fallback for pointers "
                        "that are not 16-byte aligned, the tail of a partial group",
}


def _source_lines() -> dict[str, int]:
    triton_lines = common.code_lines(inspect.getsource(add_kernel.fn)) + common.code_lines(inspect.getsource(_launch))
    kernel_scalar = CUDA_ADD_KERNELS.split("// Four floats")[0]
    launcher = CUDA_ADD_KERNELS[CUDA_ADD_KERNELS.index("cudaError_t launch_add"):]
    host = common.code_lines(CUDA_ADD_HOST)
    return {"triton add": triton_lines,
            "cuda add, 1 float/thread": common.code_lines(kernel_scalar) + common.code_lines(launcher) + host,
            "cuda add, float4": common.code_lines(CUDA_ADD_KERNELS) + host}


def side_by_side() -> None:
    section("Triton vs CUDA C++: what each made the programmer decide")
    if common.print_side_by_side("vector add, three ways (timed in the benchmark 'Triton vs CUDA C++' below)",
                                 _source_lines(), SIDE_BY_SIDE_DECISIONS):
        return  # no CUDA here: the reason is printed
    sizes = common.awkward_sizes(count=3, lo=1000, hi=10_000_000, include=(1, 3, 17))
    for n in sizes:
        x, y = common.randn(n), common.randn(n)
        for vec4 in (False, True):
            out = common.poisoned_empty(n)
            cuda_add(x, y, vec4, out=out)
            common.assert_close(out, add_reference(x.double(), y.double()), name=f"cuda add n={n} vec4={vec4}")
    x, y = common.randn(sizes[-1] + 1), common.randn(sizes[-1] + 1)
    common.assert_close(cuda_add(x[1:], y[1:]), add_reference(x[1:].double(), y[1:].double()),
                        name="cuda add, inputs 4 bytes off 16-byte alignment (the scalar fallback)")
    print(f"CUDA C++ add (both kernels) matches PyTorch for n in {sizes} and for misaligned inputs: OK")


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
        "Triton vs CUDA C++: add at n = 2^28 fp32", op="elementwise", cases=[2**28],
        setup=_two_vectors, kernels={"triton add": add,
                                     "cuda add, 1 float/thread": functools.partial(cuda_add, vec4=False),
                                     "cuda add, float4": cuda_add},
        reference=add_reference, nbytes=_add_bytes, ceiling="copy", dtype=torch.float32, label=_pow2,
        unavailable=common.cuda_unavailable() if common.HAS_GPU else "",
        note="Lines of code and what each version made its programmer decide: the table 'vector add, three "
             "ways' above."),
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
    side_by_side()
    common.run_benchmarks(BENCHMARKS, args.quick)
