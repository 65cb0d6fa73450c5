"""common.compiler: what Triton made of a kernel, on a CPU (compiled, not launched) and on a GPU."""

from __future__ import annotations

import random

from collections import Counter

import pytest
import torch

import common
from common.compiler import InspectionUnavailable, KernelReport, inspect_kernel, inspect_kernels, memory_ops
from common.lessons import lesson_module


@pytest.fixture(scope="module")
def add_reports():
    """Lesson 01's add_kernel at three block sizes, compiled for sm_90 (in one child process under
    the interpreter)."""
    L01 = lesson_module("01")
    x = torch.empty(4096)
    calls = [(L01.add_kernel, (x, x, x, 4096), dict(BLOCK_SIZE=b, num_warps=w)) for b, w in ((256, 4), (1024, 4),
                                                                                             (4096, 8))]
    return inspect_kernels(calls, arch=90)


def test_add_kernel_registers_loads_and_occupancy(add_reports):
    small, mid, large = add_reports
    for r in add_reports:
        assert r.name == "add_kernel" and r.arch == 90
        assert 8 <= r.registers <= 128 and r.local_bytes == 0 and r.shared == 0, r
        assert not any(r.features.values()), r.features  # a stream: no tensor cores, no async copies
    # 256 elements over 128 threads: 2 fp32 a thread, one 64-bit load per input; 1024: 8 a thread, 2 x 128-bit
    assert small.loads == Counter({"64-bit ld.global": 2}) and small.stores == Counter({"64-bit st.global": 1})
    assert mid.loads == Counter({"128-bit ld.global": 4}) and mid.widest_load_bits() == 128
    assert small.occupancy()[:2] == (16, "threads")  # 2048 threads an SM / 128 a program
    assert large.registers > mid.registers  # 16 elements a thread: more registers
    assert "#blocked" in mid.excerpt("ttgir", "#blocked") and "sizePerThread = [4]" in mid.excerpt("ttgir", "#blocked")
    assert "ld.global.v4" in mid.excerpt("ptx", r"ld\.global")
    assert "registers/thread" in str(mid) and "programs/SM" in str(mid)


def test_alignment_decides_the_load_width():
    """A tensor 4 bytes off a 16-byte boundary gets scalar loads: the helper keeps each argument's
    alignment (through the interpreter's child process too)."""
    L02 = lesson_module("02")
    buf = torch.empty(4096 + 8)
    aligned, shifted = inspect_kernels([(L02.copy_kernel, (buf[:4096], buf[:4096], 4096), dict(BLOCK_SIZE=1024)),
                                        (L02.copy_kernel, (buf[1:4097], buf[1:4097], 4096), dict(BLOCK_SIZE=1024))],
                                       arch=90)
    assert (aligned.widest_load_bits(), aligned.widest_store_bits()) == (128, 128)
    assert (shifted.widest_load_bits(), shifted.widest_store_bits()) == (32, 32)


def test_a_kernel_calling_other_jit_functions_compiles():
    """Lesson 05's v2 calls common.kernels' @triton.jit tile helper: under the interpreter the
    compiler cannot take that helper, so the child process compiles the kernel from its file."""
    L05 = lesson_module("05")
    x = torch.empty(256, 256)
    r = inspect_kernel(L05.transpose_v2_kernel, x, x, 256, 256, 256, 1, 256, 1, arch=90,
                       BLOCK_M=64, BLOCK_N=64, GROUP_M=1, EVICT="", num_warps=4)
    assert r.name == "transpose_v2_kernel" and r.shared == 64 * 64 * 4, r  # the tile, staged to turn it
    assert (r.widest_load_bits(), r.widest_store_bits()) == (128, 128)


def test_a_tensor_passed_by_keyword_compiles(tmp_path, monkeypatch):
    """A tensor among the meta-parameters (lesson 07's varlen forward takes cu_seqlens_ptr= by
    keyword) reaches the compiler as a pointer, in process and in the interpreter's child
    process (a kernel that calls a @triton.jit helper compiles there)."""
    source = (
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef _twice(v):\n    return v * 2\n\n"
        "@triton.jit\ndef keyword_kernel(x_ptr, n, offsets_ptr=None, BLOCK: tl.constexpr = 128):\n"
        "    start = tl.load(offsets_ptr)\n    i = start + tl.arange(0, BLOCK)\n"
        "    tl.store(x_ptr + i, _twice(tl.load(x_ptr + i, mask=i < n)), mask=i < n)\n")
    path = tmp_path / "keyword_kernels.py"
    path.write_text(source)
    from common.lessons import load_module
    module = load_module(path, name="keyword_kernels")
    x, offsets = torch.empty(256), torch.zeros(1, dtype=torch.int32)
    r = inspect_kernel(module.keyword_kernel, x, 256, arch=90, offsets_ptr=offsets, BLOCK=128)
    assert r.name == "keyword_kernel" and r.registers and "ld.global" in r.excerpt("ptx", r"ld\.global")

    """Registers are allocated per warp in units of 256; shared memory per program plus 1 KiB."""
    def report(**kw):
        return KernelReport(**{**dict(name="k", arch=90, num_warps=4, num_stages=1, shared=0, registers=32,
                                      local_bytes=0), **kw})
    assert report(registers=255, num_warps=8).occupancy()[:2] == (1, "registers")  # 8192 a warp x 8 = 64 K
    assert report(registers=128, num_warps=4).occupancy()[:2] == (4, "registers")
    assert report(registers=129, num_warps=4).occupancy()[:2] == (3, "registers")  # 136 allocated
    assert report(shared=100 * 1024).occupancy()[:2] == (2, "shared memory")  # 228 KiB / 101 KiB
    assert report(num_warps=1).occupancy()[:2] == (32, "programs")  # at most 32 programs an SM
    assert report(arch=75, num_warps=4).occupancy()[:2] == (8, "threads")  # a T4 holds 1024 threads
    assert report(registers=128, num_warps=4).occupancy_pct() == 100 * 4 * 128 / 2048
    # 84 registers are allocated as 88 (2816 a warp): 2 programs of 8 warps, where registers x
    # threads without the rounding (21504 a program) would allow 3
    assert report(registers=84, num_warps=8).occupancy()[:2] == (2, "registers") and 65536 // (84 * 256) == 3


def test_memory_ops_parses_widths():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
    ld.global.b16 %rs1, [ %rd3 + 0 ];
    @%p2 st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
    ld.shared.v4.b32 { %r7, %r8, %r9, %r10 }, [ %r11 + 0 ];
    """
    loads, stores = memory_ops(ptx)
    assert loads == Counter({"128-bit ld.global": 1, "64-bit ld.global": 1, "16-bit ld.global": 1})
    assert stores == Counter({"128-bit st.global": 1})


def test_matmul_uses_the_tensor_cores_of_each_card():
    """Lesson 04's v3 at 128 x 128 x 64: wgmma on sm_90, mma.sync with cp.async on sm_80."""
    L04 = lesson_module("04")
    a = torch.empty(512, 512, dtype=torch.float16)
    args = (a, a, a, 512, 512, 512, 512, 1, 512, 1, 512, 1)
    meta = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, INPUT_PRECISION="ieee", num_warps=4, num_stages=3)
    hopper, ampere = (inspect_kernel(L04.matmul_v3_kernel, *args, arch=arch, **meta) for arch in (90, 80))
    assert hopper.features["wgmma"] and not hopper.features["mma"], hopper.features
    assert ampere.features["mma"] and ampere.features["cp.async"] and not ampere.features["wgmma"], ampere.features
    assert hopper.shared == 3 * (128 + 128) * 64 * 2  # three stages of A and B tiles
    assert ampere.shared == 2 * (128 + 128) * 64 * 2  # sm_80 keeps num_stages - 1 in flight


def test_bad_requests_name_the_problem(capsys):
    L01 = lesson_module("01")
    x = torch.empty(16)
    with pytest.raises(ValueError, match="arch must be one of"):
        inspect_kernel(L01.add_kernel, x, x, x, 16, BLOCK_SIZE=16, arch=70)
    report = KernelReport(name="k", arch=90, num_warps=4, num_stages=1, shared=0, registers=1, local_bytes=0,
                          asm={"ptx": ""})
    with pytest.raises(ValueError, match="ir must be one of"):
        report.excerpt("sass")
    if common.INTERPRETER:  # notebook cells (no source file): a plain kernel compiles in-process,
        import linecache    # one that calls another @triton.jit function is told what to do
        import triton
        import triton.language as tl
        source = ("@triton.jit\ndef helper(x):\n    return x + 1\n\n"
                  "@triton.jit\ndef plain_kernel(x_ptr, BLOCK: tl.constexpr):\n"
                  "    tl.store(x_ptr + tl.arange(0, BLOCK), tl.load(x_ptr + tl.arange(0, BLOCK)) + 1.0)\n\n"
                  "@triton.jit\ndef nested_kernel(x_ptr, BLOCK: tl.constexpr):\n"
                  "    tl.store(x_ptr + tl.arange(0, BLOCK), helper(tl.load(x_ptr + tl.arange(0, BLOCK))))\n")
        cell = "<notebook cell 1>"  # as IPython does: the cell's source in linecache, no file on disk
        linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
        namespace = {"triton": triton, "tl": tl}
        exec(compile(source, cell, "exec"), namespace)
        try:
            assert inspect_kernel(namespace["plain_kernel"], x, BLOCK=16).loads
        except InspectionUnavailable as err:  # Triton 3.9's interpreter: no in-process compile at all
            assert tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 9) and "no source file" in str(err), err
        with pytest.raises(InspectionUnavailable, match="no source file"):
            inspect_kernel(namespace["nested_kernel"], x, BLOCK=16)
        assert inspect_kernels([(namespace["nested_kernel"], (x,), dict(BLOCK=16))], skip_with_reason=True) is None
        assert "What the compiler made: skipped here" in capsys.readouterr().out


@pytest.mark.skipif(not common.INTERPRETER, reason="the interpreter's own quirk: on a GPU kernels are compiled")
def test_inspection_after_a_kernel_that_sums():
    # An interpreted kernel that calls tl.sum leaves triton.language.core patched with the
    # interpreter's functions (Triton 3.6-3.8); a CI run once failed an in-process compile after it.
    import linecache
    import triton
    import triton.language as tl
    rows = torch.randn(4, 50)
    sums = lesson_module("03").row_sum_v1(rows)  # its kernel calls tl.sum
    assert torch.allclose(sums, rows.sum(dim=1), atol=1e-4)
    # A factor new to Triton's compile cache: a cached kernel would skip the code generator that fails.
    factor = 1.0 + random.random()
    source = ("@triton.jit\ndef cell_kernel(x_ptr, BLOCK: tl.constexpr):\n"
              f"    tl.store(x_ptr + tl.arange(0, BLOCK), tl.load(x_ptr + tl.arange(0, BLOCK)) * {factor!r})\n")
    cell = "<notebook cell 2>"  # no source file: only the in-process compile can take it
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    namespace = {"triton": triton, "tl": tl}
    exec(compile(source, cell, "exec"), namespace)
    x = torch.randn(16)
    try:
        assert inspect_kernel(namespace["cell_kernel"], x, BLOCK=16).loads
    except InspectionUnavailable as err:  # Triton 3.9's interpreter: no in-process compile at all
        assert tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 9), err
    out = torch.empty(16)
    lesson_module("01").add(x, x, out=out)  # and the interpreter still runs kernels afterwards
    assert torch.equal(out, x + x)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the driver's own counts")
def test_registers_match_the_driver():
    """On a GPU: the cubin's register and local-memory counts are what the driver loads."""
    L01 = lesson_module("01")
    x = torch.randn(1 << 16, device="cuda")
    out = torch.empty_like(x)
    for block, warps in ((1024, 4), (4096, 8)):
        compiled = L01.add_kernel[(64,)](x, x, out, x.numel(), BLOCK_SIZE=block, num_warps=warps)
        report = inspect_kernel(L01.add_kernel, x, x, out, x.numel(), BLOCK_SIZE=block, num_warps=warps)
        assert (report.registers, report.local_bytes) == (compiled.n_regs, 4 * compiled.n_spills), report
        assert report.shared == compiled.metadata.shared


def test_inspect_kernels_by_key_leaves_out_a_failing_compile(capsys):
    calls = {("bad", 1): (lambda: None, (), {})}  # not a Triton kernel: its compile fails
    got = common.inspect_kernels_by_key(calls, arch=90)
    if got is None:
        pytest.skip("nothing can be compiled here")
    assert got == {} and "bad 1: the compile for sm_90 failed" in capsys.readouterr().out
