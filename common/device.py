"""Where kernels run: a CUDA GPU, or Triton's CPU interpreter when there is none.

This is the one side effect of `import common`, and it is this module's job: it decides where
kernels run before any `@triton.jit` function is defined (Triton reads TRITON_INTERPRET when a
kernel is decorated), which is why every lesson, exercise, solution and test imports common
first. The choice is explicit through one variable, COURSE_INTERPRETER:
- `auto` (the default): the GPU when torch sees one, else the interpreter (TRITON_INTERPRET=1);
- `1`: the interpreter even on a GPU (print() and pdb inside kernels; TRITON_INTERPRET=1 set by
  hand means the same);
- `0`: never the interpreter. Without a GPU kernels then cannot run, but they can be compiled
  for a chosen GPU with `triton.compile(..., target=...)`: the capability test does that.
"""

import os
import platform

import torch

# A learner may force the interpreter on a GPU machine (TRITON_INTERPRET=1) to debug a kernel
# with print() and pdb; respect that, and fall back to it automatically when there is no GPU.
# COURSE_AUTO_INTERPRET marks the variable as ours, so a child process (the grader, the tests)
# does not mistake it for the learner's choice.
_CHOICE = os.environ.get("COURSE_INTERPRETER", "auto")
if _CHOICE not in ("auto", "0", "1"):
    raise ValueError(f"COURSE_INTERPRETER={_CHOICE!r}: use auto (the default), 1 (always the interpreter) "
                     "or 0 (never; compile-only without a GPU)")
_FORCED_INTERPRETER = _CHOICE == "1" or (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
                                         and os.environ.get("COURSE_AUTO_INTERPRET") != "1")
HAS_GPU = torch.cuda.is_available() and not _FORCED_INTERPRETER
INTERPRETER = not HAS_GPU and _CHOICE != "0"
if INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("COURSE_AUTO_INTERPRET", "0" if _FORCED_INTERPRETER else "1")

import triton  # noqa: E402  (after TRITON_INTERPRET is set: importing triton first broke the interpreter, 3.8)

DEVICE = torch.device("cuda") if HAS_GPU else torch.device("cpu")


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16: the one spelling of a dtype in tables, check names and messages."""
    return str(dtype).removeprefix("torch.")


def _bool_masks_in_the_interpreter() -> None:
    """Triton 3.9's interpreter builds `mask & (row < n_rows)`, a tensor mask and-ed with a
    condition on a program id, as an int32 tensor of 0s and 1s, and its load and store then
    refuse it ("mask has unsupported dtype"); 3.6-3.8 and every GPU build give int1. The lessons
    use that idiom for rows past the end, so the interpreter's masks are made bool again here:
    the same lanes, the dtype it expects. A no-op where masks are already bool."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder

    def as_bool(mask):
        # block pointers hand a raw numpy mask (triton 3.6), or None: only TensorHandles need it
        if not isinstance(mask, interpreter.TensorHandle) or mask.data.dtype == np.bool_:
            return mask
        return interpreter.TensorHandle(mask.data.astype(np.bool_), triton.language.int1)

    load, store = builder.create_masked_load, builder.create_masked_store
    # triton 3.6 passes some arguments by keyword (cache_modifier=...), 3.8 none: forward both.
    builder.create_masked_load = lambda self, ptrs, mask, *rest, **kwargs: load(self, ptrs, as_bool(mask), *rest,
                                                                                **kwargs)
    builder.create_masked_store = lambda self, ptrs, value, mask, *rest, **kwargs: store(
        self, ptrs, value, as_bool(mask), *rest, **kwargs)


if INTERPRETER:
    _bool_masks_in_the_interpreter()


def gpu_name() -> str:
    return torch.cuda.get_device_name() if HAS_GPU else "CPU (Triton interpreter)"


def is_hopper() -> bool:
    """sm_90 (H100, H200): wgmma, TMA and fp8 tensor cores."""
    return HAS_GPU and torch.cuda.get_device_capability()[0] == 9


def supports_bf16() -> bool:
    # The interpreter runs on numpy, which has no bfloat16: loads and stores give wrong values.
    # Triton's bf16 casts and tl.dot need sm_80; torch.cuda.is_bf16_supported() says yes on a T4
    # (sm_75) through emulation, where a bf16 kernel then fails to compile.
    return HAS_GPU and torch.cuda.get_device_capability() >= (8, 0)


def supports_fp8() -> bool:
    # fp8 tensor cores arrived with sm_89 (Ada) / sm_90 (Hopper); the interpreter's fp8 casts
    # differ from the GPU's, so fp8 results are only meaningful on such a GPU.
    return HAS_GPU and torch.cuda.get_device_capability() >= (8, 9)


def versions() -> str:
    return f"torch {torch.__version__} | triton {triton.__version__} | python {platform.python_version()}"


def banner() -> str:
    """One line that says where this run happens, printed at the top of every lesson."""
    if HAS_GPU:
        p = torch.cuda.get_device_properties(DEVICE)
        major, minor = torch.cuda.get_device_capability()
        where = (f"GPU: {p.name} (sm_{major}{minor}, {p.multi_processor_count} SMs, "
                 f"{p.total_memory / 2**30:.0f} GiB)")
        if (major, minor) < (8, 0):
            where += (" | below sm_80: bf16 and fp8 parts skip, and configs were tuned for sm_80+ "
                      "(the course is tested on H100 and H200)")
    elif _FORCED_INTERPRETER:
        where = "Triton interpreter (TRITON_INTERPRET=1 was set): kernels run on the CPU, timings are skipped"
    elif not INTERPRETER:
        where = "No CUDA GPU and COURSE_INTERPRETER=0: kernels can be compiled for a target, not run"
    else:
        where = ("No CUDA GPU: kernels run in Triton's CPU interpreter on small sizes; "
                 "correctness and traffic analysis only, timings need a GPU")
    return f"{where} | {versions()}"


def require_gpu(what: str) -> str | None:
    """Return None when `what` can run here, else the reason it is skipped (to print)."""
    if HAS_GPU:
        return None
    return f"{what}: skipped, needs a CUDA GPU (this run uses Triton's CPU interpreter)"
