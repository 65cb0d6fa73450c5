"""
Lesson 02: memory and data types
================================

Build copy kernels (contiguous, strided, misaligned, dtype-converting) and measure what the
GPU's memory system does with each access pattern and each data type.

You will learn:
- how global memory is read (32-byte sectors) and why neighbouring threads should read
  neighbouring addresses (coalescing)
- what reading with a stride costs, from 1 to 32, measured and plotted against a sector model
- what a misaligned start costs, and how Triton learns alignment from the arguments
- fp32, fp16, bf16, int8 and fp8: bytes per element, GB/s and elements per second
- what a cast does: round to nearest even, its error against float64, and overflow
- what `tl.multiple_of` and `tl.max_contiguous` tell the compiler, and when that changes anything

Run:  python lessons/beginner/02_memory_and_dtypes.py [--quick]
"""

import functools
import sys
import warnings
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

from common import Table, fmt_bytes, section

# %% [markdown]
# ## Motivation
# Lesson 01's kernels were memory bound: their time is the time it takes to move their bytes.
# How the bytes are laid out decides how many bytes the memory system really moves. Global
# memory is read in 32-byte *sectors*. A warp (32 threads) reading 32 neighbouring fp32 values
# touches 4 sectors, and every byte fetched is used: the access is *coalesced*. The same warp
# reading every 8th value touches 32 sectors and uses 4 bytes of each 32: an eighth of the
# traffic is useful. Narrower types move fewer bytes per element, so the same GB/s is more
# elements per second. And the instructions matter: a thread can move 16 bytes with one
# (vectorized) load only when the compiler can prove the address is a multiple of 16.

# %%
SECTOR_BYTES = 32  # the unit in which global memory is read and written


def sector_efficiency(stride: int, element_size: int) -> float:
    """Model: the useful fraction of the bytes a warp moves when it reads elements `stride` apart.

    Stride 1: every byte of every sector is used. Stride s: 1 element in s is used, until the
    elements are a sector or more apart; from there on each element costs a whole sector.
    """
    return max(1 / stride, element_size / SECTOR_BYTES)


def strided_copy_model(stride: int, element_size: int) -> float:
    """Model: speed of a strided-read, contiguous-write copy relative to stride 1.

    n useful elements read at efficiency e and written at efficiency 1 move n*size*(1/e + 1)
    bytes instead of 2*n*size.
    """
    return 2 / (1 / sector_efficiency(stride, element_size) + 1)


def warp_sectors(offset_bytes: int, element_size: int = 4, threads: int = 32) -> int:
    """Model: how many 32-byte sectors one warp touches reading `threads` neighbouring elements."""
    first = offset_bytes // SECTOR_BYTES
    last = (offset_bytes + threads * element_size - 1) // SECTOR_BYTES
    return last - first + 1


# %% [markdown]
# ## Reference (PyTorch)
# Each reference is one aten op; the comments give the traffic a kernel cannot avoid.


# %%
def copy_reference(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # reads n elements, writes n: 1 kernel


def copy_strided_reference(x: torch.Tensor) -> torch.Tensor:
    # x is a strided view: reads n useful elements (the hardware moves whole sectors), writes n
    return x.contiguous()


def cast_reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)  # reads n * x.element_size() bytes, writes n * (size of dtype)


def copy_slice_reference(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return x[start:start + n].clone()  # reads n elements from offset start, writes n


# %% [markdown]
# ## Kernel
# The copy kernel is lesson 01's add kernel with one input. Every other kernel here changes
# one thing about *where* it reads or *what type* it writes.


# %%
@triton.jit
def copy_kernel(
    x_ptr,  # pointer to the input (contiguous, any dtype)
    out_ptr,  # pointer to the output (contiguous, same dtype)
    n_elements,  # how many elements to copy
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def copy_strided_kernel(
    x_ptr,  # pointer to x[0] of a 1-D strided view
    out_ptr,  # pointer to the contiguous output
    n_elements,  # how many elements to copy
    stride_x,  # distance in elements between x[i] and x[i + 1]
    BLOCK_SIZE: tl.constexpr,
):
    # Neighbouring threads read addresses stride_x elements apart: the gather this lesson times.
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets * stride_x, mask=mask), mask=mask)


@triton.jit
def cast_kernel(
    x_ptr,  # pointer to the input (fp32, fp16 or bf16)
    out_ptr,  # pointer to the output, of the dtype to convert to
    n_elements,  # how many elements to convert
    BLOCK_SIZE: tl.constexpr,
    ROUNDING: tl.constexpr,  # "rtne" (round to nearest even, the default) or "rtz" (toward zero)
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    # out_ptr.dtype.element_ty is the output's element type, known when the kernel compiles.
    # tl.store would convert on its own; writing .to() says where the rounding happens.
    if ROUNDING == "rtz":
        y = x.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtz")
    else:
        y = x.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, y, mask=mask)


@triton.jit
def copy_split_tail_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    # copy_kernel, with a mask in the last block only. Unless n is known to be a multiple of
    # 16, the mask `offsets < n` may change between any two neighbours, so the compiler loads
    # and stores one element per instruction. Full blocks need no mask at all.
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if (pid + 1) * BLOCK_SIZE <= n_elements:
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets))
    else:
        mask = offsets < n_elements
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def copy_slice_kernel(
    x_ptr,  # pointer to x[0]
    out_ptr,  # pointer to the output (n_elements)
    start,  # first element of x to copy: an int argument, so Triton specializes on it
    n_elements,  # how many elements to copy
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(out_ptr + offsets, tl.load(x_ptr + start + offsets, mask=mask), mask=mask)


@triton.jit
def copy_slice_loaded_kernel(
    x_ptr,  # pointer to x[0]
    out_ptr,  # pointer to the output (n_elements)
    start_ptr,  # pointer to one int32 on the device: the first element of x to copy
    n_elements,  # how many elements to copy
    BLOCK_SIZE: tl.constexpr,
    HINT: tl.constexpr,  # "none", "max_contiguous" or "multiple_of"
):
    # The start comes from memory (as a write position in a cache does): the compiler knows
    # nothing about it, so it cannot prove that x_ptr + start is 16-byte aligned.
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    start = tl.load(start_ptr)
    if HINT == "multiple_of":
        start = tl.multiple_of(start, 16)  # a promise: start % 16 == 0 (the wrapper checks it)
    src = start + offsets
    if HINT == "max_contiguous":
        src = tl.max_contiguous(src, BLOCK_SIZE)  # a promise the compiler had already proven
    tl.store(out_ptr + offsets, tl.load(x_ptr + src, mask=mask), mask=mask)


# %% [markdown]
# ## Wrapper
# validate, allocate, grid, launch, return.

# %%
BLOCK_BYTES = 4096  # bytes per program: 1024 fp32, as in lesson 01, and the same bytes for every dtype
BLOCK_SIZE = 1024  # elements per program for the strided, cast and slice kernels
MAX_INDEX = 2**31  # the kernels compute offsets in int32
GPU_ONLY_DTYPES = (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
SLICE_HOWS = {
    "arg": "start as an int argument (Triton specializes start % 16 == 0)",
    "loaded": "start loaded from memory: the compiler knows nothing about it",
    "loaded+max_contiguous": "loaded, plus tl.max_contiguous(start + offsets, BLOCK_SIZE)",
    "loaded+multiple_of": "loaded, plus tl.multiple_of(start, 16)",
}



def _check_out(out: torch.Tensor, shape, dtype: torch.dtype) -> None:
    common.check_tensors(out=out)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must have shape {tuple(shape)} and dtype {common.dtype_name(dtype)}, got "
                         f"{tuple(out.shape)} and {common.dtype_name(out.dtype)}")


def _check_interpretable(dtype: torch.dtype) -> None:
    if common.INTERPRETER and dtype in GPU_ONLY_DTYPES:
        raise TypeError(f"{common.dtype_name(dtype)} needs a GPU: the interpreter runs on numpy, which has no "
                        f"bfloat16, and its fp8 conversions differ from the GPU's")


def copy(x: torch.Tensor, out: torch.Tensor | None = None, block_size: int | None = None) -> torch.Tensor:
    """A copy of a contiguous tensor of any dtype, BLOCK_BYTES per program unless block_size is given."""
    common.check_tensors(x=x)
    if x.numel() >= MAX_INDEX:
        raise ValueError(f"x has {x.numel()} elements; these kernels index with int32 (< 2^31)")
    block_size = block_size or BLOCK_BYTES // x.element_size()
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out(out, x.shape, x.dtype)
    n = x.numel()
    copy_kernel[(triton.cdiv(n, block_size),)](x, out, n, BLOCK_SIZE=block_size)
    return out


def copy_split_tail(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """copy(), with the mask only in the last program."""
    common.check_tensors(x=x)
    block_size = BLOCK_BYTES // x.element_size()
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out(out, x.shape, x.dtype)
    n = x.numel()
    copy_split_tail_kernel[(triton.cdiv(n, block_size),)](x, out, n, BLOCK_SIZE=block_size)
    return out


def copy_strided(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous copy of a 1-D view with any stride (x = base[::s])."""
    common.check_tensors(x=x, contiguous=False, ndim=1)
    n = x.numel()
    if n * x.stride(0) >= MAX_INDEX:
        raise ValueError(f"x spans {n * x.stride(0)} elements; these kernels index with int32 (< 2^31)")
    if out is None:
        out = torch.empty(n, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, (n,), x.dtype)
    copy_strided_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, out, n, x.stride(0), BLOCK_SIZE=BLOCK_SIZE)
    return out


def cast(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
         rounding: str = "rtne") -> torch.Tensor:
    """x converted to `dtype`: rounding "rtne" (to nearest even, as torch does) or "rtz" (toward zero)."""
    common.check_tensors(x=x, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    if dtype not in CAST_DTYPES:
        names = ", ".join(map(common.dtype_name, CAST_DTYPES))
        raise TypeError(f"cast to {common.dtype_name(dtype)} is not supported; pick one of {names}")
    _check_interpretable(x.dtype)
    _check_interpretable(dtype)
    if rounding not in ("rtne", "rtz"):
        raise ValueError(f"rounding must be 'rtne' or 'rtz', got {rounding!r}")
    if rounding == "rtz" and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"rounding='rtz' is available for float16 and bfloat16 outputs, not "
                         f"{common.dtype_name(dtype)} (Triton has no round-toward-zero fp8 conversion)")
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        _check_out(out, x.shape, dtype)
    n = x.numel()
    cast_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, out, n, BLOCK_SIZE=BLOCK_SIZE, ROUNDING=rounding)
    return out


def copy_slice(x: torch.Tensor, start: int, n: int, how: str = "arg",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x[start : start + n], with `start` handed to the kernel as SLICE_HOWS[how] says."""
    common.check_tensors(x=x, ndim=1)
    if how not in SLICE_HOWS:
        raise ValueError(f"how must be one of {', '.join(SLICE_HOWS)}, got {how!r}")
    if start < 0 or n < 0 or start + n > x.numel():
        raise ValueError(f"x[{start}:{start + n}] is outside x, which has {x.numel()} elements")
    if how == "loaded+multiple_of" and start % 16:
        raise ValueError(f"how='loaded+multiple_of' promises the compiler start % 16 == 0, but "
                         f"start={start}: a false hint gives wrong values or a misaligned-address fault")
    if out is None:
        out = torch.empty(n, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, (n,), x.dtype)
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    if how == "arg":
        copy_slice_kernel[grid](x, out, start, n, BLOCK_SIZE=BLOCK_SIZE)
    else:
        # torch.full fills the int32 on the device (no copy from the host, no sync); that tiny
        # fill kernel is part of what the benchmark times for these three variants.
        start_on_device = torch.full((1,), start, dtype=torch.int32, device=x.device)
        hint = how.partition("+")[2] or "none"
        copy_slice_loaded_kernel[grid](x, out, start_on_device, n, BLOCK_SIZE=BLOCK_SIZE, HINT=hint)
    return out


# %% [markdown]
# ## Check
# Awkward sizes, fresh random inputs, outputs poisoned with NaN (ints: -128) and guarded at both
# ends, references in float64. A copy must reproduce its input exactly; a cast must give the
# same bits as torch's cast.

# %%
COPY_DTYPES = [torch.float32, torch.float16, torch.int8] + \
    ([torch.bfloat16] if common.supports_bf16() else []) + \
    ([torch.float8_e4m3fn] if common.supports_fp8() else [])


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def make_input(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values of any dtype the lesson copies (ints: -127 .. 127)."""
    if dtype.is_floating_point:
        return common.randn(n, dtype=dtype)
    # Not -128: that is the value int outputs are poisoned with, so an unwritten element would pass.
    return torch.randint(-127, 128, (n,), dtype=torch.int8).to(device=common.DEVICE, dtype=dtype)


def check(quick: bool) -> None:
    section("Check: every kernel against PyTorch (float64 reference)")
    sizes = common.awkward_sizes(count=2 if quick else 4, lo=1000, hi=10_000_000, include=(1, 17))
    for dtype in COPY_DTYPES:
        for n in sizes:
            x = make_input(n, dtype)
            for op in (copy, copy_split_tail):
                out = common.poisoned_empty(n, dtype=dtype)
                op(x, out=out)
                common.assert_close(out, x.cpu().double(), name=f"{op.__name__} n={n} {common.dtype_name(dtype)}")
    names = ", ".join(map(common.dtype_name, COPY_DTYPES))
    print(f"copy and copy_split_tail reproduce their input for n in {sizes}, dtypes {names}: OK")

    n = min(sizes[0], 100_000)  # the strided input below is 32 times larger
    for stride in (1, 2, 3, 7, 32):
        base = common.randn(n * stride + 5)
        x = base[2::stride][:n]  # starts 2 elements in: a misaligned strided view
        out = common.poisoned_empty(n)
        copy_strided(x, out=out)
        common.assert_close(out, x.double(), name=f"copy_strided stride={stride}")
    for shift in (1, 2, 3):  # a contiguous input that starts 4, 8, 12 bytes past a 16-byte boundary
        x = common.randn(n + shift)[shift:]
        out = common.poisoned_empty(n)
        copy(x, out=out)
        common.assert_close(out, x.double(), name=f"copy, input shifted by {shift}")
    print(f"copy_strided (strides 1, 2, 3, 7, 32) and copy of misaligned inputs, n={n}: OK")

    x = common.randn(n, scale=10.0)
    for dtype in [torch.float16] + ([torch.bfloat16] if common.supports_bf16() else []):
        out = common.poisoned_empty(n, dtype=dtype)
        cast(x, dtype, out=out)
        # Bit for bit: a cast rounds one way only (to nearest even), so any difference is a bug.
        common.assert_close(out, x.to(dtype), name=f"cast to {common.dtype_name(dtype)}", atol=0, rtol=0)
        rtz = cast(x, dtype, rounding="rtz")
        common.assert_close(rtz, x.double(), name=f"cast to {common.dtype_name(dtype)}, rounding toward zero")
        if not (rtz.double().abs() <= x.double().abs()).all():
            raise common.CheckError("rounding toward zero gave a value larger in magnitude than its input")
    if common.supports_fp8():
        for dtype in FP8_DTYPES:
            y = common.randn(n)
            out = common.poisoned_empty(n, dtype=dtype)
            cast(y, dtype, out=out)
            # Within one fp8 rounding step of float64; whether the bits equal torch's is printed
            # in the rounding table below, not asserted.
            common.assert_close(out, y.double(), name=f"cast to {common.dtype_name(dtype)}")
    print("cast matches torch's x.to(dtype) bit for bit (fp16" + (", bf16" if common.supports_bf16() else "")
          + "); rounding toward zero never rounds up" + ("; fp8 within one rounding step" if common.supports_fp8() else ""))

    x = common.randn(n + 64)
    for how in SLICE_HOWS:
        for start in (32, 5) if how != "loaded+multiple_of" else (32, 48):
            out = common.poisoned_empty(n)
            copy_slice(x, start, n, how, out=out)
            common.assert_close(out, copy_slice_reference(x, start, n).double(), name=f"copy_slice {how} start={start}")
    print(f"copy_slice, all {len(SLICE_HOWS)} ways of passing start: OK")
    if not common.supports_bf16():
        print("bfloat16 and fp8: skipped, the interpreter has no bfloat16 (numpy lacks it) and its fp8 "
              "conversions differ from the GPU's; they run on a GPU")


# %% [markdown]
# ## Memory traffic
# What each access pattern must move, and what the hardware moves, by the 32-byte sector model.
# PyTorch's op counter (common.count_torch_traffic) sees elements, not sectors: it reports the
# useful bytes of a strided copy, the same whatever the stride.


# %%
def traffic() -> None:
    section("Memory traffic: useful bytes vs bytes moved (32-byte sector model)")
    table = Table("strided read, contiguous write (fp32): model",
                  ["stride", "bytes used per sector", "useful fraction of the read",
                   "copy speed vs stride 1 (model)"])
    for stride in (1, 2, 4, 8, 16, 32):
        eff = sector_efficiency(stride, 4)
        table.add(stride, f"{round(SECTOR_BYTES * eff)} of {SECTOR_BYTES}", f"{eff:.3f}",
                  f"{100 * strided_copy_model(stride, 4):.0f}%")
    table.print()
    n = 4096
    base = torch.randn(n * 8, device=common.DEVICE)
    for stride in (2, 8):
        counted = common.count_torch_traffic(copy_strided_reference, base[::stride][:n])
        print(f"PyTorch x[::{stride}].contiguous(), n = {n}, counted: {counted.summary()}")
    ratio = sector_efficiency(2, 4) / sector_efficiency(8, 4)
    print(f"The counter reports the same bytes for both: it sees elements. The sector model says the "
          f"stride-8 read moves {ratio:g}x the bytes of the stride-2 read.")

    table = Table("one warp reads 32 neighbouring fp32 (128 bytes) starting at a byte offset: model",
                  ["offset (bytes)", "16-byte aligned", "sectors touched", "bytes moved", "useful"])
    for offset in (0, 4, 8, 16, 32, 128):
        sectors = warp_sectors(offset)
        table.add(offset, "yes" if offset % 16 == 0 else "no", sectors, sectors * SECTOR_BYTES,
                  f"{100 * 128 / (sectors * SECTOR_BYTES):.0f}%")
    table.print()

    table = Table("data types: what one element costs", ["dtype", "bytes", "elements per sector",
                                                           "elements per GiB", "cast from fp32 of 2^20 elements moves"])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn):
        size = torch.empty((), dtype=dtype).element_size()
        moved = 2**20 * (4 + size)  # read fp32, write the narrower type
        table.add(common.dtype_name(dtype), size, SECTOR_BYTES // size, f"{2**30 // size:,}", fmt_bytes(moved))
    table.print()
    x = torch.randn(2**20, device=common.DEVICE)
    print(f"PyTorch x.to(float16), counted: {common.count_torch_traffic(cast_reference, x, torch.float16).summary()}")


# %% [markdown]
# ## Casting and rounding
# A cast to a narrower float rounds to the nearest value it can hold (ties to the even one).
# The worst relative error is the *unit roundoff*, 2^-(mantissa bits + 1); the mean signed
# error (the bias) is about zero. Rounding toward zero is biased: every value shrinks.

# %%
FLOAT_FORMATS = {  # dtype: (exponent bits, mantissa bits)
    torch.float16: (5, 10),
    torch.bfloat16: (8, 7),
    torch.float8_e4m3fn: (4, 3),
    torch.float8_e5m2: (5, 2),
}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> float:
    as_int = torch.int16 if a.element_size() == 2 else torch.uint8
    return float((a.cpu().view(as_int) == b.cpu().view(as_int)).float().mean())


def _triton_cast_possible(dtype: torch.dtype) -> str | None:
    """None if the Triton cast to dtype runs here, else why not."""
    if dtype == torch.bfloat16 and not common.supports_bf16():
        return "bfloat16: the interpreter has no bfloat16 (numpy lacks it); runs on a GPU"
    if dtype in FP8_DTYPES and not common.supports_fp8():
        return (f"{common.dtype_name(dtype)}: the interpreter's fp8 conversions differ from the GPU's; "
                f"runs on a GPU with fp8 (sm_89+)")
    return None


def rounding(quick: bool) -> None:
    section("Casting and rounding: fp32 -> narrower floats, error against float64")
    n = 2**14 if common.INTERPRETER or quick else 2**20
    # Magnitudes spread evenly over 2^-4 .. 2^6, both signs: inside the normal range of every
    # type below, so the error is rounding alone (no underflow, no overflow).
    magnitude = torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(-4, 6))
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0).double()
    x = (magnitude * sign).float().to(common.DEVICE)  # the fp32 values every cast starts from
    exact = x.double().cpu()
    table = Table(f"fp32 -> dtype over {n:,} values in +-[2^-4, 2^6]",
                  ["cast", "by", "exp/mantissa bits", "unit roundoff u", "max |rel err|", "max / u",
                   "bias / u", "same bits as torch"])
    skipped = []
    for dtype, (e_bits, m_bits) in FLOAT_FORMATS.items():
        u = 2.0 ** -(m_bits + 1)
        torch_cast = x.cpu().to(dtype)  # torch on the CPU: the reference on any machine
        runs = [("torch (CPU)", torch_cast)]
        why_not = _triton_cast_possible(dtype)
        if why_not:
            skipped.append(why_not)
        else:
            runs.append(("triton", cast(x, dtype)))
            if dtype in (torch.float16, torch.bfloat16):
                runs.append(("triton, rtz", cast(x, dtype, rounding="rtz")))
        for who, y in runs:
            y64 = y.cpu().double()
            rel = ((y64 - exact) / exact.abs()).abs()
            bias = ((y64.abs() - exact.abs()) / exact.abs()).mean()  # < 0: magnitudes shrink on average
            table.add(common.dtype_name(dtype), who, f"{e_bits}/{m_bits}", f"{u:.3g}", f"{rel.max().item():.3g}",
                      f"{rel.max().item() / u:.3f}", f"{bias.item() / u:+.3f}",
                      f"{100 * _same_bits(y, torch_cast):.2f}%")
    table.print()
    print("max / u <= 1: every value went to a nearest neighbour. bias = mean of (|cast| - |x|) / |x|, "
          "in units of u: near 0 when errors cancel, negative when magnitudes shrink (rtz).")

    # Past the largest finite value: round to inf, or saturate at the largest finite value?
    values = [240.0, 449.0, 500.0, 60000.0, 65519.0, 65520.0, 1e5, 1e6]
    x_big = torch.tensor(values, device=common.DEVICE)
    columns = {}  # all on the CPU in float64, ready to print
    for dtype in FLOAT_FORMATS:
        columns[f"{common.dtype_name(dtype)} torch"] = x_big.cpu().to(dtype).double()
        if _triton_cast_possible(dtype) is None:
            with warnings.catch_warnings():  # the interpreter's numpy warns on overflow to inf
                warnings.simplefilter("ignore", RuntimeWarning)
                columns[f"{common.dtype_name(dtype)} triton"] = cast(x_big, dtype).cpu().double()
    table = Table("large values: what each cast returns (max finite: float16 65504, bfloat16 ~3.4e38, "
                  "e4m3fn 448, e5m2 57344)", ["x"] + list(columns))
    for i, v in enumerate(values):
        table.add(f"{v:g}", *[f"{col[i].item():g}" for col in columns.values()])
    table.print()
    print("float16: 65519 rounds down to 65504; 65520 is halfway to the next step (65536, past the range) "
          "and the tie rounds to it: inf. Overflow starts half a step above the largest finite value.")
    print("Compare the torch and triton columns of one type: where they differ, the two "
          "conversions treat overflow differently (inf or nan vs saturating at the largest finite value).")
    for reason in dict.fromkeys(skipped):
        print(f"triton cast to {reason}")


# %% [markdown]
# ## What the compiler could prove
# The widest global load and store in the PTX of each variant the benchmarks time (128/128:
# 16-byte instructions; 32/32: one fp32 each), from common.inspect_kernel: the kernel compiled as
# a launch with these arguments would compile it, for this GPU (for an H100 without one: the same
# PTX a GPU learner sees). Triton specializes on n % 16 and on 16-byte alignment, not on sizes:
# these small arguments compile the same kernels as the timed ones.


# %%
def access_widths() -> None:
    section("What the compiler could prove: the widest global load/store in the PTX (bits)")
    n, odd = 2**16, 2**16 - 3
    src, out = torch.empty(32 * n + 64, device=common.DEVICE), torch.empty(n + 64, device=common.DEVICE)
    start = torch.full((1,), 32, dtype=torch.int32, device=common.DEVICE)
    rows = [("copy, n % 16 == 0", "n is a multiple of 16: whole vectors are in or out",
             copy_kernel, (src, out, n), dict(BLOCK_SIZE=1024)),
            ("copy, n % 16 != 0", "nothing about n: the mask may change at any element",
             copy_kernel, (src, out, odd), dict(BLOCK_SIZE=1024)),
            ("split-tail copy, n % 16 != 0", "full blocks need no mask",
             copy_split_tail_kernel, (src, out, odd), dict(BLOCK_SIZE=1024))]
    rows += [(f"copy, both shifted {4 * s} bytes", "16-byte aligned" if s % 4 == 0 else "not 16-byte aligned",
              copy_kernel, (src[s:], out[s:], n), dict(BLOCK_SIZE=1024)) for s in (1, 2, 4, 8)]
    rows += [(f"copy_strided, stride {s}", "stride == 1: contiguous" if s == 1 else "a gather",
              copy_strided_kernel, (src[::s], out, n, s), dict(BLOCK_SIZE=BLOCK_SIZE)) for s in (1, 2, 8)]
    rows += [(f"copy, {common.dtype_name(d)}", f"BLOCK_SIZE = {BLOCK_BYTES // d.itemsize}: 4096 bytes per program",
              copy_kernel, (src[:n].view(d), out[:n].view(d), n), dict(BLOCK_SIZE=BLOCK_BYTES // d.itemsize))
             for d in COPY_DTYPES]
    rows.append(("slice at 32, arg", SLICE_HOWS["arg"], copy_slice_kernel, (src, out, 32, n), dict(BLOCK_SIZE=BLOCK_SIZE)))
    rows += [(f"slice at 32, {how}", knows, copy_slice_loaded_kernel, (src, out, start, n),
              dict(BLOCK_SIZE=BLOCK_SIZE, HINT=how.partition("+")[2] or "none"))
             for how, knows in SLICE_HOWS.items() if how != "arg"]
    reports = common.inspect_kernels([(kernel, args, meta) for _, _, kernel, args, meta in rows],
                                     skip_with_reason=True)
    if reports is None:
        return
    table = Table(f"copy variants compiled for sm_{reports[0].arch}: widest global load/store",
                  ["variant", "what the compiler knows", "load/store bits"])
    for (name, knows, *_), report in zip(rows, reports):
        table.add(name, knows, f"{report.widest_load_bits()}/{report.widest_store_bits()}")
    table.print()
    if reports[0].note:
        print(reports[0].note)
    print("The bits say what the compiler could prove; the benchmarks below say whether it mattered.")


# %% [markdown]
# ## Benchmark
# Declared once, run by common.Benchmark: every provider is timed in alternating rounds (CUDA
# events, L2 flushed before each run), in GB/s of the bytes read plus the bytes written, as a %
# of a device-to-device copy measured in the same run. A copy races torch's copy kernel
# (`out.copy_(x)`), the lesson's reference (`x.clone()`) and torch.compile of it. Sizes are far
# larger than L2 (50 MB on H100, 60 MB on H200): every number is HBM traffic.


# %%
def _size(n: int) -> int:
    return n if common.HAS_GPU else 1000  # the interpreter runs each provider once, on tiny inputs


def _draw(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.randn(n, device=common.DEVICE, dtype=dtype)
    # random bytes: int8 values, or fp8 bit patterns (a copy does not look at them)
    return torch.randint(-128, 128, (n,), dtype=torch.int8, device=common.DEVICE).view(dtype)


def _fresh(n: int, dtype: torch.dtype = torch.float32) -> tuple:
    x = _draw(n, dtype)
    return x, torch.empty_like(x)


def _copy_bytes(x, out) -> int:
    return 2 * x.numel() * x.element_size()  # useful bytes: n read (whatever x's stride), n written


def _clone(x, out):
    # The registry's copy signature is (x, out); clone allocates its own output. On a strided view
    # it writes a contiguous one (x.contiguous() would return x itself at stride 1, copying nothing).
    return copy_reference(x)


@functools.cache
def _strided_source(n: int) -> tuple:  # one buffer for the largest stride; each stride reads a view
    return _draw(n * max(STRIDES)), torch.empty(n, device=common.DEVICE)


def _strided(stride: int) -> tuple:
    src, out = _strided_source(_size(2**24))
    return src[::stride][:out.numel()], out


@functools.cache
def _shifted_buffers(n: int) -> tuple:
    return _draw(n + 64), torch.empty(n + 64, device=common.DEVICE)


def _shifted(shift: int) -> tuple:  # x = buf[shift : shift + n] and the output shifted the same
    src, dst = _shifted_buffers(_size(2**28))
    n = src.numel() - 64
    return src[shift:shift + n], dst[shift:shift + n]


def _copy_input_shifted(x, out):  # only the input shifted: the output at the start of its buffer
    return copy(x, out=_shifted_buffers(_size(2**28))[1][:x.numel()])


def _usable(dtype: torch.dtype) -> bool:
    return (dtype != torch.bfloat16 or common.supports_bf16()) and (dtype not in FP8_DTYPES or common.supports_fp8())


STRIDES = [1, 2, 4, 8, 16, 32]
SHIFTS = [0, 1, 2, 4, 8, 32]  # elements: 0 to 128 bytes
DTYPES = [d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn) if _usable(d)]
CAST_TARGETS = [d for d in (torch.float16, torch.bfloat16, torch.float8_e4m3fn) if _usable(d)]
SLICE_START = 32  # a multiple of 16 elements (128 bytes): the multiple_of hint is true
STRIDE_TITLE = "x[::stride] -> contiguous, n = 2^24 fp32 gathered: useful GB/s"
DTYPE_TITLE = "the same copy in each dtype, 1 GiB in and out"


def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:,}"


def _shift_label(shift: int) -> str:
    return f"{4 * shift} B" + (" (16-B aligned)" if shift % 4 == 0 else "")


BENCHMARKS = [
    common.Benchmark(
        "contiguous copy, n = 2^28 fp32 (1 GiB each way): the perf bar", op="copy", cases=[2**28],
        quick_cases=[2**24], cpu_cases=[1000], setup=lambda n: _fresh(n), kernels={"triton copy": copy},
        reference=_clone, nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32, label=_pow2,
        bars=[common.Bar("triton copy", 2**28, "ceiling", 90),
              # "On par": within the 2% that repeated timings of one kernel differ by.
              common.Bar("triton copy", 2**28, "baseline", 0.98)]),
    common.Benchmark(
        STRIDE_TITLE, op="copy", cases=STRIDES, quick_cases=[1, 8, 32], cpu_cases=[1, 8],
        setup=_strided, kernels={"triton copy_strided": copy_strided}, reference=_clone, nbytes=_copy_bytes,
        ceiling="copy", dtype=torch.float32, label=lambda s: f"stride {s}", plot="02_memory_stride",
        xlabel="stride (elements)", logx=True,
        note="Useful bytes only: the sector model (the traffic table above) says how many bytes the hardware "
             "really moves. The table after the benchmarks sets the measured curve against the model."),
    common.Benchmark(
        "copy of x = buf[shift : shift + n], n = 2^28 fp32: aligned vs misaligned start", op="copy",
        cases=SHIFTS, quick_cases=[0, 1, 4], cpu_cases=[0, 1], setup=_shifted,
        kernels={"triton copy, both shifted": copy, "triton copy, input shifted": _copy_input_shifted},
        reference=_clone, nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32, label=_shift_label,
        note="Two effects mix: lost 16-byte instructions (shifts of 4, 8 bytes) and one more sector per warp "
             "(any shift not a multiple of 32 bytes). torch copy_ writes the shifted output, x.clone() an aligned "
             "one."),
    common.Benchmark(
        DTYPE_TITLE, op="copy", cases=DTYPES,
        quick_cases=[torch.float32, torch.int8], cpu_cases=[torch.float32, torch.int8],
        setup=lambda dtype: _fresh(_size(2**30 // dtype.itemsize), dtype), kernels={"triton copy": copy},
        reference=_clone, nbytes=_copy_bytes, ceiling="copy", label=common.dtype_name, plot="02_memory_dtypes",
        xlabel="dtype", note="Every dtype moves the same bytes: at equal GB/s a narrower type moves more "
                             "elements per second (the table after the benchmarks)."),
    common.Benchmark(
        "cast n = 2^28 fp32 to narrower types: GB/s of 4 bytes read + the output's bytes written",
        op="elementwise", cases=CAST_TARGETS, quick_cases=[torch.float16], cpu_cases=[torch.float16],
        setup=lambda dtype: (_draw(_size(2**28)), dtype), kernels={"triton cast": cast},
        reference=cast_reference, nbytes=lambda x, dtype: x.numel() * (4 + dtype.itemsize), ceiling="copy",
        dtype=torch.float32, label=lambda dtype: f"to {common.dtype_name(dtype)}"),
    common.Benchmark(
        "the mask: copy of n fp32, n a multiple of 16 or not", op="copy", cases=[2**28, 2**28 - 3],
        quick_cases=[2**24, 2**24 - 3], cpu_cases=[1024, 1021], setup=lambda n: _fresh(n),
        kernels={"triton copy": copy, "triton split-tail copy": copy_split_tail}, reference=_clone,
        nbytes=_copy_bytes, ceiling="copy", dtype=torch.float32,
        label=lambda n: "n % 16 == 0" if n % 16 == 0 else "n % 16 != 0",
        note="With n % 16 != 0 every masked load and store of copy is one element wide; split-tail masks "
             "only the last block. A difference smaller than the spread (the +- after each time) is no effect."),
    common.Benchmark(
        f"copy of x[{SLICE_START} : {SLICE_START} + n], n = 2^28 fp32: how the kernel learns the start",
        op=None, cases=[2**28], quick_cases=[2**24], cpu_cases=[1000],
        setup=lambda n: (_shifted_buffers(n)[0], SLICE_START, n, torch.empty(n, device=common.DEVICE)),
        kernels={f"start {how}": (lambda x, start, n, out, how=how: copy_slice(x, start, n, how, out=out))
                 for how in SLICE_HOWS},
        nbytes=lambda x, start, n, out: 8 * n, ceiling="copy", dtype=torch.float32,
        label=_pow2, note="Nothing in PyTorch takes a start from device memory: a race of the lesson's own variants. "
             + "; ".join(f"{how}: {knows}" for how, knows in SLICE_HOWS.items()) + "."),
]


def summarize(results: dict) -> None:
    """What the tables above do not say: the stride curve against the model, elements per second."""
    strides, dtypes = results.get(STRIDE_TITLE), results.get(DTYPE_TITLE)
    if not strides or not dtypes:
        return
    first = strides[0].rate["triton copy_strided"]
    table = Table("triton copy_strided against the 32-byte sector model", ["stride", "measured vs stride 1",
                                                                            "model vs stride 1"])
    for res in strides:
        table.add(res.case, f"{100 * res.rate['triton copy_strided'] / first:.0f}%",
                  f"{100 * strided_copy_model(res.case, 4):.0f}%")
    table.print()
    table = Table("triton copy by dtype: elements per second", ["dtype", "bytes/elem", "GB/s", "G elem/s"])
    for res in dtypes:
        gbps = res.rate["triton copy"]
        table.add(res.label, res.case.itemsize, gbps, gbps / (2 * res.case.itemsize))
    table.print()


# %% [markdown]
# ## Takeaways
# - Global memory moves 32-byte sectors: neighbouring threads should read neighbouring addresses.
# - A stride wastes the rest of each sector; by the sector model, once elements are 32 bytes
#   apart each costs a whole sector (compare the measured stride curve with it).
# - Triton specializes pointers (16-byte aligned?) and ints (== 1? multiple of 16?) at launch;
#   that knowledge decides whether it can use 16-byte loads and stores.
# - Narrow types move the same GB/s and more elements per second.
# - A cast rounds to nearest even: error at most 2^-(mantissa bits + 1), no bias; overflow
#   handling differs between conversions, so check it when values may exceed the range.
# - `tl.multiple_of` / `tl.max_contiguous` are promises: they help only where the compiler
#   could not prove the same thing itself, and a false one gives wrong results.


# %%
if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    check(args.quick)
    traffic()
    rounding(args.quick)
    access_widths()
    summarize(common.run_benchmarks(BENCHMARKS, args.quick))
