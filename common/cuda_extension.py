"""The same kernel in CUDA C++, built where nvcc exists: the lessons' side-by-side comparisons.

    module = common.load_cuda("vector_add", CUDA_KERNELS, CUDA_HOST, ["add"])   # None: not built here
    module.add(x, y, out, True)

torch.utils.cpp_extension.load_inline compiles the CUDA source (the kernels and a plain C++
launcher that takes raw pointers) with nvcc for this GPU's architecture, and the host source (the
functions Python calls: tensor checks, then the launcher) with the host compiler. The build is
cached under ~/.cache/torch_extensions and reused while the sources stay the same, so only the
first run pays for it. The CUDA source includes no PyTorch header: nvcc compiles it in seconds.

Where it cannot be built (no GPU, a CPU build of torch, no nvcc, no ninja) `cuda_unavailable()`
says why, in one line a lesson prints instead of the CUDA rows.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time

import torch

from .device import HAS_GPU


def cuda_unavailable() -> str:
    """Why the CUDA C++ side of a comparison cannot be built and run here; "" where it can."""
    if not HAS_GPU:
        return "no CUDA GPU here: the CUDA C++ version is built and timed on a GPU (make bench)"
    if torch.version.cuda is None:
        return "this torch is a CPU build: building CUDA C++ needs a CUDA build of torch"
    from torch.utils import cpp_extension
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc (the CUDA compiler) is not installed here: set CUDA_HOME to a CUDA toolkit to build the CUDA version"
    if not cpp_extension.is_ninja_available():
        return "ninja is missing (pip install ninja): torch's load_inline builds with it"
    return ""


@functools.cache
def load_cuda(name: str, cuda_source: str, host_source: str, functions: tuple[str, ...]):
    """The compiled module (its `functions` callable from Python), or None with the reason printed.
    A build error is raised with nvcc's message: it is the lesson's source that is wrong."""
    reason = cuda_unavailable()
    if reason:
        print(f"CUDA C++ {name}: not built, {reason}")
        return None
    from torch.utils.cpp_extension import load_inline
    start = time.perf_counter()
    module = load_inline(name=name, cpp_sources=host_source, cuda_sources=cuda_source, functions=list(functions),
                         extra_cuda_cflags=["-O3"], extra_cflags=["-O2"], verbose=False)
    print(f"CUDA C++ {name}: built (or found in torch's extension cache) in {time.perf_counter() - start:.1f} s")
    return module


def code_lines(source: str) -> int:
    """Lines of code: not blank, not only a comment (# or //), not a docstring line."""
    count, in_docstring = 0, False
    for line in source.splitlines():
        text = line.strip()
        if text.startswith(('"""', "'''")):
            one_line = len(text) >= 6 and text.endswith(text[:3])
            in_docstring = in_docstring if one_line else not in_docstring
            continue
        if in_docstring or not text or re.match(r"(#|//)", text):
            continue
        count += 1
    return count


def print_side_by_side(title: str, lines: dict[str, int], decisions: dict[str, str]) -> str:
    """The lessons' Triton-vs-CUDA table: lines of code of each version and what each left its
    programmer to decide. Returns why the CUDA versions cannot run here ("" where they can)."""
    from .report import Table
    table = Table(title, ["version", "lines of code (kernel + host)"])
    for name in decisions:
        table.add(name, lines[name])
    table.print()
    print("What each made its programmer decide:")
    for name, decided in decisions.items():
        print(f"  {name}: {decided}")
    reason = cuda_unavailable()
    if reason:
        print(f"CUDA C++: not built or run here ({reason}).")
    return reason
