"""make sanitize: the grader under compute-sanitizer's memcheck, on a GPU. A copy of lesson 01's
solutions whose axpy kernel reads past the end of x and y (its store is masked, so the output is
right) must be reported by memcheck and exit non-zero; the solutions themselves must run clean.
Without a GPU (or without compute-sanitizer) the target says what it needs: tested here too."""

import os
import subprocess
import sys

import pytest
import torch

from grader import find_compute_sanitizer
from common.lessons import REPO

SOLUTION = (REPO / "solutions" / "01_vector_add.py").read_text()
UNMASKED_LOADS = '''

@triton.jit
def axpy_kernel(x_ptr, y_ptr, out_ptr, a, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets)  # wrong: the last block reads past the end of x and y
    y = tl.load(y_ptr + offsets)
    tl.store(out_ptr + offsets, a * x + y, mask=offsets < n_elements)
'''
needs_sanitizer = pytest.mark.skipif(not torch.cuda.is_available() or find_compute_sanitizer() is None,
                                     reason="make sanitize needs a CUDA GPU and compute-sanitizer")


def _sanitize(impl: str, timeout_s: int = 900):
    return subprocess.run([sys.executable, "tests/grader.py", "sanitize", "01", "--impl", impl], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)


@needs_sanitizer
def test_memcheck_reports_a_load_past_the_end(tmp_path):
    folder = tmp_path / "learner"
    folder.mkdir()
    (folder / "01_vector_add.py").write_text(SOLUTION + UNMASKED_LOADS)
    proc = _sanitize(str(folder))
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Invalid __global__ read" in proc.stdout + proc.stderr
    assert "compute-sanitizer found invalid memory accesses" in proc.stdout


@needs_sanitizer
def test_the_solutions_run_clean_under_memcheck():
    proc = _sanitize("solutions")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr


def test_without_a_gpu_sanitize_says_what_it_needs():
    proc = subprocess.run([sys.executable, "tests/grader.py", "sanitize", "01", "--impl", "solutions"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "runs the exercises on a CUDA GPU" in proc.stdout, proc.stdout + proc.stderr
