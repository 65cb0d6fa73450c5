"""Correctness checks that say what went wrong, not just that something did.

- `assert_close`: compare with a reference (computed in higher precision) using the tolerance
  of the output's dtype; on failure raise `CheckError` with a diagnosis: how many elements are
  wrong, the first wrong index, the largest error, and a hint for the usual causes (tail not
  masked, output never written, wrong offset or stride, low-precision accumulation).
- `poisoned_empty`: an output pre-filled with NaN (so unwritten elements show), sitting between
  two guard zones (so a store past either end shows).
- `awkward_sizes` / `randn`: fresh random inputs of sizes that are not multiples of a block.
"""

import os
import random
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .device import DEVICE, INTERPRETER, dtype_name

# Tolerances by output dtype, against a reference computed in float64.
# fp32: kernels sum in a different order than PyTorch; 1e-5 leaves room for that, not for bugs.
# fp16 / bf16: one rounding step is 4.9e-4 / 3.9e-3 relative, and natural code rounds more than
# once (a * x + y in fp16 rounds a * x, then the sum), so an output near zero carries the
# rounding error of its operands: atol covers operands up to ~10 (0.5 ulp of 10 = 0.004 in fp16).
# fp8: e4m3 has 3 mantissa bits (6.25% per rounding step), e5m2 has 2 (12.5%).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=2e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=1.6e-2),
    torch.float8_e4m3fn: dict(atol=1e-2, rtol=0.0625),
    torch.float8_e5m2: dict(atol=1e-2, rtol=0.125),
}
# Integer and boolean outputs must match exactly.

# tl.dot on fp32 inputs runs on the tensor cores as tf32 by default (10 mantissa bits, truncated:
# about 1e-3 relative per product, measured 2.7e-3 absolute on outputs near 3 at K = 55, H200),
# unless the kernel asks for input_precision="ieee". The interpreter computes in full fp32.
TF32_TOLERANCE = dict(atol=2e-2, rtol=5e-3)


def dot_tolerance(dtype: torch.dtype) -> dict:
    """Keyword arguments for assert_close of a tl.dot result: tf32 tolerance for fp32 on a GPU."""
    return dict(TF32_TOLERANCE) if dtype == torch.float32 and not INTERPRETER else {}

GUARD_ELEMENTS = 1 << 16  # larger than any BLOCK_SIZE the course uses, so an unmasked block lands in it
_GUARD_VALUE = 96  # exact in every dtype from fp8 (e4m3: 1.5 * 2^6, e5m2 too) and int8 to float64


class CheckError(AssertionError):
    """A wrong result, with a diagnosis a learner can act on."""


# --------------------------------------------------------------------------- random inputs

_SEED = None


def seed_from_env() -> int | None:
    """COURSE_SEED (the seed a failed check printed, to reproduce it), or None when unset."""
    value = os.environ.get("COURSE_SEED", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"COURSE_SEED must be a whole number (the seed a failed check printed), "
                         f"got '{value}'") from None


def fresh_seed() -> int:
    """Seed torch for one check: COURSE_SEED if set (to reproduce a failure), else a new one."""
    global _SEED
    seed = seed_from_env()
    _SEED = seed if seed is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(_SEED)
    return _SEED


def current_seed() -> int | None:
    return _SEED


def randn(*shape, dtype=torch.float32, device=DEVICE, scale: float = 1.0) -> torch.Tensor:
    """Normal random values (never zeros: zeros hide unwritten outputs and wrong indexing)."""
    if _SEED is None:
        fresh_seed()
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def awkward_sizes(count: int = 3, lo: int = 1000, hi: int = 100_000, include=(1,)) -> list[int]:
    """`count` random sizes in [lo, hi) that are not multiples of 16, then the sizes in `include`.

    In the interpreter the range is cut to at most 5,000 so a check stays within seconds.
    """
    if _SEED is None:
        fresh_seed()
    if INTERPRETER:
        hi = min(hi, 5_000)
        lo = min(lo, hi // 2)
    sizes = []
    while len(sizes) < count:
        n = int(torch.randint(lo, hi, ()).item())
        if n % 16:
            sizes.append(n)
    return sizes + list(include)  # the random sizes first: their failures say the most


# --------------------------------------------------------------------------- poisoned outputs

# The NaN an output is poisoned with carries a payload of its own (0x5a5a in its mantissa): a NaN
# the kernel computed (0/0, inf - inf: the hardware writes its default NaN) has other bits, so the
# diagnosis tells "never written" from "computed NaN". fp8 has no spare NaN bits.
_NAN_POISON_BITS = {torch.float16: (torch.int16, 0x7E5A), torch.bfloat16: (torch.int16, 0x7FDA),
                    torch.float32: (torch.int32, 0x7FC05A5A), torch.float64: (torch.int64, 0x7FF85A5A5A5A5A5A)}
_POISONED_STORAGES: dict[int, "weakref.ref"] = {}  # data_ptr -> the poisoned buffer, while it lives


def _poison_bits(t: torch.Tensor):
    """(int dtype, bits) of the NaN poison when t lies in a buffer made by poisoned_empty, else None."""
    entry = _NAN_POISON_BITS.get(t.dtype)
    ref = _POISONED_STORAGES.get(t.untyped_storage().data_ptr()) if entry else None
    buf = ref() if ref is not None else None
    return entry if buf is not None and buf.dtype == t.dtype else None


def _poison_value(dtype: torch.dtype):
    """NaN for floats; for integers the value least likely to be a right answer: the most negative
    (int8 -128, which symmetric quantization never writes; a negative index is never valid)."""
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    return info.min if info.min < 0 else info.max


def poisoned_empty(*shape, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """A contiguous output filled with NaN (ints: their most negative value), with guard zones on both sides.

    `assert_close` checks the guards of an output made here: a store past the end (a missing
    mask) or before the start (a negative offset) is reported even when the output looks right.
    """
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.full((numel + 2 * GUARD_ELEMENTS,), _GUARD_VALUE, dtype=dtype, device=device)
    out = buf[GUARD_ELEMENTS:GUARD_ELEMENTS + numel].view(shape)
    if dtype in _NAN_POISON_BITS:
        int_dtype, bits = _NAN_POISON_BITS[dtype]
        out.view(int_dtype).fill_(bits)
        if len(_POISONED_STORAGES) > 4096:  # forget the buffers that were freed
            for ptr in [p for p, ref in _POISONED_STORAGES.items() if ref() is None]:
                del _POISONED_STORAGES[ptr]
        _POISONED_STORAGES[buf.untyped_storage().data_ptr()] = weakref.ref(buf)
    else:
        out.fill_(_poison_value(dtype))
    out._course_guard = buf  # noqa: SLF001 (kept on the tensor so assert_close can find it)
    return out


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return poisoned_empty(*t.shape, dtype=t.dtype, device=t.device)


def check_guards(out: torch.Tensor, name: str = "output") -> None:
    """Raise CheckError if a kernel wrote outside `out` (made by poisoned_empty)."""
    buf = getattr(out, "_course_guard", None)
    if buf is None:
        return
    numel = out.numel()
    guard = torch.tensor(_GUARD_VALUE, dtype=buf.dtype).float().item()  # as the dtype stores it
    before = buf[:GUARD_ELEMENTS].float().cpu()
    after = buf[GUARD_ELEMENTS + numel:].float().cpu()
    hit_after = (after != guard).nonzero()
    hit_before = (before != guard).nonzero()
    if len(hit_after):
        last = int(hit_after.max()) + 1
        raise CheckError(
            f"{name}: the kernel wrote {len(hit_after)} element(s) past the end of the output "
            f"(up to {last} elements beyond it).\n"
            f"  hint: the last block runs past n; store with a mask, e.g. "
            f"tl.store(out_ptr + offsets, value, mask=offsets < n_elements)")
    if len(hit_before):
        raise CheckError(
            f"{name}: the kernel wrote {len(hit_before)} element(s) before the start of the output.\n"
            f"  hint: an offset went negative; check how the offsets are computed")


# --------------------------------------------------------------------------- comparison

def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES.get(dtype, dict(atol=0.0, rtol=0.0))


def sum_tolerance(dtype: torch.dtype, n_terms: int) -> dict:
    """The tolerance of an output that adds n_terms values in another order than its reference
    (a weight gradient summed over the rows, say). In fp32 the rounding difference grows about
    like sqrt(n_terms): seen on an H200, a LayerNorm dw over 668 rows was off by 1.5e-5 at a
    value of 0.23. A 16-bit output's own rounding is larger than that, so only fp32's grows.
    """
    tol = dict(tolerance(dtype))
    if dtype == torch.float32:
        tol["atol"] *= max(n_terms, 1) ** 0.5
    return tol


# `make try EX=1.2`: the first call of the exercise and its first comparison are printed.
TRY_MODE = os.environ.get("COURSE_TRY") == "1"
_SHOWN: dict[str, bool] = {}


def _values(t: torch.Tensor, count: int = 8) -> str:
    flat = t.detach().reshape(-1)[:count].cpu()
    more = " ..." if t.numel() > count else ""
    if flat.dtype.is_floating_point:
        return "[" + ", ".join(f"{v:.5g}" for v in flat.double().tolist()) + more + "]"
    return "[" + ", ".join(str(v) for v in flat.tolist()) + more + "]"


def describe(value) -> str:
    """One line for an argument: a tensor's shape, dtype, strides and first values; else repr."""
    if isinstance(value, torch.Tensor):
        return (f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} strides "
                f"{value.stride()} {_values(value)}")
    return repr(value)


def show_comparison(actual: torch.Tensor, expected: torch.Tensor, name: str, *, atol: float, rtol: float) -> None:
    print(f"  expected {name}: {describe(expected)}")
    print(f"  got      {name}: {describe(actual)}")
    wrong = ~torch.isclose(actual.detach().cpu().to(torch.float64) if actual.dtype.is_floating_point
                           else actual.detach().cpu().double(), expected.detach().cpu().double(),
                           rtol=rtol, atol=atol, equal_nan=True)
    if wrong.any():
        first = tuple(int(i) for i in wrong.nonzero()[0])
        print(f"  first difference at index {first}: expected {expected[first].item():.6g}, "
              f"got {actual[first].item():.6g} ({int(wrong.sum())} of {wrong.numel()} elements differ)")
    else:
        print(f"  every element within atol={atol:g}, rtol={rtol:g}")


# Set by the grader around a learner's function (grading._watched): the dtypes of the latest
# call's floating-point tensor inputs. A float64 reference says nothing about the dtype the
# output must have; an fp16 or float64 output for fp32 inputs would otherwise pass.
GRADED_CALL: dict = {}


def _allowed_dtypes(expected: torch.Tensor, dtype: torch.dtype | None) -> set | None:
    """The dtypes an output may have: `dtype` when given; while grading, a float output must have
    the reference's dtype (unless that is the float64 of a reference) or one of its inputs'."""
    if dtype is not None:
        return {dtype}
    inputs = GRADED_CALL.get("float_dtypes")
    if inputs is None or not expected.dtype.is_floating_point:
        return None
    allowed = set(inputs) | ({expected.dtype} if expected.dtype != torch.float64 else set())
    return allowed or None


def _dtype_names(dtypes) -> str:
    return " or ".join(sorted(dtype_name(d) for d in dtypes))


def assert_close(actual, expected, *, name: str = "output", atol: float | None = None,
                 rtol: float | None = None, mistakes: dict | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """Compare a kernel's output with a reference; raise CheckError with a diagnosis if wrong.

    `expected` may be in higher precision (float64 is best); the tolerance is the one of
    `actual`'s dtype unless atol / rtol are given. `mistakes` maps a hint to the output a
    typical mistake would produce ({"the stride was ignored ...": x_flat + y_flat}); when the
    output matches one of them, the diagnosis gives that hint. `dtype` is the dtype the output
    must have (by default, while grading, the reference's or one of the inputs').
    """
    if not isinstance(actual, torch.Tensor):
        raise CheckError(f"{name}: expected a torch.Tensor, got {type(actual).__name__} "
                         f"(did the wrapper forget to return its output?)")
    if actual.shape != expected.shape:
        raise CheckError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    # An output the grader allocated (poisoned_empty) has the dtype the grader chose.
    allowed = None if hasattr(actual, "_course_guard") else _allowed_dtypes(expected, dtype)
    if allowed is not None and actual.dtype not in allowed:
        raise CheckError(f"{name}: dtype {str(actual.dtype).removeprefix('torch.')}, expected "
                         f"{_dtype_names(allowed)}.\n  hint: allocate the output with the input's dtype "
                         f"(torch.empty_like(x), or dtype=x.dtype); the kernel's tl.store casts to the "
                         f"output pointer's type")
    if expected.dtype != torch.float64 and actual.dtype.is_floating_point != expected.dtype.is_floating_point:
        raise CheckError(f"{name}: dtype {str(actual.dtype).removeprefix('torch.')}, expected a "
                         f"{'floating-point' if expected.dtype.is_floating_point else 'integer'} dtype "
                         f"like {str(expected.dtype).removeprefix('torch.')}")
    check_guards(actual, name)
    tol = tolerance(actual.dtype)
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    if TRY_MODE and not _SHOWN.get("compare"):
        _SHOWN["compare"] = True
        show_comparison(actual, expected, name, atol=atol, rtol=rtol)
    if actual.device == expected.device and torch.isclose(
            actual.to(expected.dtype), expected, rtol=rtol, atol=atol, equal_nan=True).all():
        return  # the common case, decided where the data lives; the diagnosis copies to the CPU
    message = diagnose(actual, expected, atol=atol, rtol=rtol, name=name, mistakes=mistakes)
    if message:
        seed = f"\n  reproduce with COURSE_SEED={_SEED}" if _SEED is not None else ""
        raise CheckError(message + seed)


def diagnose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
             name: str = "output", mistakes: dict | None = None) -> str | None:
    """None if actual matches expected within atol + rtol * |expected|, else what is wrong."""
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    computed_nan = torch.zeros_like(a, dtype=torch.bool)
    if not actual.dtype.is_floating_point:
        poison = float(_poison_value(actual.dtype))
        unwritten = (a == poison) & (e != poison)
    else:
        unwritten = torch.isnan(a) & ~torch.isnan(e)
        poison = _poison_bits(actual)
        if poison is not None:  # tell the poison from a NaN the kernel computed, by its bits
            int_dtype, bits = poison
            computed_nan = unwritten & (actual.detach().cpu().view(int_dtype) != bits)
            unwritten &= ~computed_nan
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    wrong = ~close
    n_wrong = int(wrong.sum())
    if n_wrong == 0:
        return None
    total = a.numel()
    first = unravel(int(wrong.flatten().nonzero()[0]), a.shape)
    lines = [f"{name}: {n_wrong} of {total} elements wrong ({100 * n_wrong / total:.1f}%), "
             f"shape {tuple(a.shape)}, tolerance atol={atol:g} rtol={rtol:g}",
             f"  first wrong element at index {first}: got {a[first].item():.6g}, "
             f"expected {e[first].item():.6g}"]
    finite_wrong = wrong & torch.isfinite(a) & torch.isfinite(e)
    if finite_wrong.any():
        err = (a - e).abs().masked_fill(~finite_wrong, 0)
        worst = unravel(int(err.flatten().argmax()), a.shape)
        lines.append(f"  largest error {err[worst].item():.3g} at index {worst} "
                     f"(got {a[worst].item():.6g}, expected {e[worst].item():.6g})")
    n_unwritten = int(unwritten.sum())
    if n_unwritten:
        lines.append(f"  {n_unwritten} element(s) still hold the poison the output was filled "
                     f"with before the kernel ran: they were never written")
    if computed_nan.any():
        lines.append(f"  {int(computed_nan.sum())} element(s) are a NaN the kernel computed and stored (not "
                     f"the poison the output was filled with: its bits differ)")
    named = {hint: m.detach().cpu().to(torch.float64) for hint, m in (mistakes or {}).items()}
    named = {hint: m for hint, m in named.items() if m.shape == a.shape}
    # First within the output's tolerance; then loosely (1e-3 relative to the mistake's size): a
    # mistake such as a missing scale makes sums in the thousands whose own rounding exceeds fp32's
    # tolerance. Loose matching cannot pass a wrong answer: it only picks the hint.
    for loose in (False, True):
        for hint, m in named.items():
            r, t = (max(rtol, 1e-3), max(atol, 1e-4 * float(m.abs().nan_to_num().max()))) if loose else (rtol, atol)
            if torch.isclose(a, m, rtol=r, atol=t, equal_nan=True).all():
                return "\n".join(lines + [f"  hint: {hint}"])
    lines += ["  hint: " + h for h in _hints(a, e, wrong, unwritten, rtol, atol, actual.dtype, computed_nan)]
    return "\n".join(lines)


def unravel(flat: int, shape) -> tuple:
    """The index tuple of element `flat` of a row-major tensor of this shape."""
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def _hints(a, e, wrong, unwritten, rtol, atol, dtype, computed_nan=None) -> list[str]:
    flat_unwritten = unwritten.flatten()
    n = a.numel()
    if computed_nan is not None and computed_nan.any() and not unwritten.any():
        return ["the kernel computed NaN: 0 / 0, inf - inf or inf * 0. Usual causes: exp of an "
                "unshifted value overflowed and was divided by another inf (subtract the max first), "
                "a masked lane loaded with other=0 and then divided by a sum of 0 or took log(0), or "
                "the kernel read the output before writing it (outputs start as NaN here)"]
    overflow = wrong & torch.isinf(a) & torch.isfinite(e)
    if overflow.any() and not unwritten.any():
        return [f"{int(overflow.sum())} element(s) are inf where the reference is finite: an overflow. "
                f"exp of an unshifted value (subtract the max first), a sum past fp16's largest value "
                f"65504 (accumulate in tl.float32), or a division by zero"]
    if unwritten.all():
        return ["the output was never written: does the kernel tl.store to the output pointer, "
                "does the grid launch at least one program (triton.cdiv(n, BLOCK_SIZE), not "
                "n // BLOCK_SIZE), and does the wrapper return that output?"]
    if unwritten.any():
        positions = flat_unwritten.nonzero().flatten()
        first, count = int(positions[0]), len(positions)
        if first + count == n:
            one_block = first & (first - 1) == 0
            if one_block and count > first:
                return [f"only the first {first} elements (one block) were written: every program "
                        f"wrote the same block; the offsets need pid * BLOCK_SIZE"]
            if first % 16 == 0:
                also = (f"; or, if {first} is your BLOCK_SIZE, every program wrote the same block "
                        f"(the offsets need pid * BLOCK_SIZE)") if one_block else ""
                return [f"the first {first} elements were written and the last {count} were "
                        f"not: the grid is too small for the tail; launch "
                        f"triton.cdiv(n_elements, BLOCK_SIZE) programs, not n_elements // BLOCK_SIZE"
                        + also]
            return [f"the last {count} elements were never written: the grid or the mask stops "
                    f"short of the end (mask=offsets < n_elements, grid=triton.cdiv(...))"]
        if a.dim() == 2 and unwritten[:, -1].all() and not unwritten[:, 0].any():
            cols = int(unwritten[0].sum())
            return [f"the last {cols} column(s) were never written: the grid over columns "
                    f"or the column mask stops short of the width"]
        return [f"{count} elements were never written, the first at flat index {first}: some "
                f"blocks were skipped or several programs wrote to the same place; check "
                f"the offsets (pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)) and the grid"]
    written_wrong = wrong & ~unwritten
    if a.dim() == 2 and a.shape[0] == a.shape[1] and torch.allclose(a, e.T, rtol=rtol, atol=atol):
        return ["the output is the transpose of the reference: rows and columns (or their "
                "strides) are swapped"]
    if _values_misplaced(a[written_wrong], e, dtype):
        return ["the values are right but in the wrong places: check the offsets and the "
                "strides (a non-contiguous input needs x.stride(0), not 1)"]
    # Relative to the element, but never to less than 1% of the output's largest value: rounding
    # errors scale with the terms summed, so outputs near zero would otherwise look far off.
    floor = max(atol, 1e-2 * float(e.abs().nan_to_num().max()))
    rel = ((a - e).abs() / e.abs().clamp_min(floor))[written_wrong & torch.isfinite(a)]
    if len(rel) and float(rel.max()) < 50 * max(rtol, 1e-3):
        low = "fp16 / bf16" if dtype in (torch.float16, torch.bfloat16) else "low precision"
        return [f"small errors, just over tolerance: precision loss; is something accumulated "
                f"in {low}? Accumulate in tl.float32 and cast once, at the store"]
    ratio = (a / e)[written_wrong & (e.abs() > atol)]
    if len(ratio) > 1 and torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3):
        return [f"every wrong value is {ratio[0].item():.4g} x the expected one: a scale factor "
                f"or constant is wrong or missing"]
    return ["the math itself differs from the reference: run the kernel under the interpreter "
            "(TRITON_INTERPRET=1) on a tiny input and print() the intermediate values"]


def _values_misplaced(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """True if nearly every wrong value is (to a few rounding steps) a value of the reference.

    A control set (the same values nudged by 0.1%) must not match as well, otherwise the
    reference is so dense (large fp16 tensors) that any value would seem to appear in it.
    """
    got = got[torch.isfinite(got)]
    if len(got) < 4:
        return False
    eps = 4 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    ref = expected.flatten().sort().values

    def match_rate(values):
        pos = torch.searchsorted(ref, values).clamp(max=len(ref) - 1)
        near = torch.minimum((ref[pos] - values).abs(), (ref[(pos - 1).clamp(min=0)] - values).abs())
        return float((near <= eps * values.abs() + 1e-30).float().mean())

    return match_rate(got) > 0.9 and match_rate(got * 1.001 + 1e-3) < 0.3


def grads_float64(fn, inputs, dy=None):
    """fn(*inputs) and its gradients w.r.t. every input, computed by autograd on float64 copies:
    the reference a backward kernel is checked against (dy=None for a scalar output)."""
    xs = [t.detach().double().requires_grad_() for t in inputs]
    y = fn(*xs)
    return y.detach(), torch.autograd.grad(y, xs, None if dy is None else dy.double())


def grads_of(fn, inputs, dy=None):
    """fn(*inputs) and its gradients w.r.t. every input, in the inputs' own dtype: the function
    under test, on fresh leaf copies so that nothing accumulates into the caller's tensors."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*xs)
    return y.detach(), torch.autograd.grad(y, xs, dy)


_ALLOCATORS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
               torch.ops.aten.new_empty.default}


class PoisonedAllocations(TorchDispatchMode):
    """Every float tensor made by torch.empty / empty_like / new_empty inside this mode is filled
    with NaN and sits between guard zones (poisoned_empty).

    For wrappers that allocate their own outputs (autograd Functions: y, dx, partial sums, a
    gradient buffer), where a grader cannot pass a poisoned out=: with this mode, an output a
    kernel never writes reads NaN, and check_guards() reports a store past the end of any of them.
    """

    def __init__(self):
        super().__init__()
        self.made: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func in _ALLOCATORS and isinstance(out, torch.Tensor) and out.dtype.is_floating_point
                and out.numel() and out.is_contiguous()):
            out = poisoned_empty(*out.shape, dtype=out.dtype, device=out.device)
            self.made.append(out)
        return out

    def check_guards(self) -> None:
        for t in self.made:
            check_guards(t, "an output allocated by the wrapper")
