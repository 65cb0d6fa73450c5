"""Lesson 10's part 2 (a persistent TMA matmul for Hopper): the versions against float64 in the
interpreter (fp32, fp16; bf16 on a GPU), TMA's input rules, the pruning, the benchmark's
declaration, and what the compiler makes of each version for sm_90 (also without a GPU).
The whole script runs in tests/test_lessons_run.py; the timed run is `make bench LESSON=10`.
The part has no graded exercise of its own."""

import importlib

import pytest
import torch

import common
from common.lessons import REPO, find


@pytest.fixture(scope="module")
def part():
    script = next(p for p in find("10").parts if p.stem.endswith("_persistent"))
    module = importlib.import_module(".".join(script.relative_to(REPO).with_suffix("").parts))
    if module.tma_unavailable():
        pytest.skip(module.tma_unavailable())
    return module


def _shape(part):
    M = common.awkward_sizes(1, lo=40, hi=100 if common.INTERPRETER else 1000, include=())[0]
    N, K = part.awkward_tma_sizes(2, 32, 100 if common.INTERPRETER else 1000)
    return M, N, K


DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not common.supports_bf16(), reason="the interpreter has no bfloat16 (numpy lacks it); runs on a GPU"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=common.dtype_name)
@pytest.mark.parametrize("transpose_b", [False, True], ids=["b row-major", "b column-major"])
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_version_matches_float64(part, version, transpose_b, dtype):
    M, N, K = _shape(part)
    if version == "v3":
        why = part.v3_compile_error(part.CHECK_TRITON_CONFIG, dtype)
        if why:
            pytest.skip(f"v3 on this GPU: {why}")
    part.check_tma(lambda a, b, o: part.matmul_tma(a, b, version, part.CHECK_CONFIG, out=o, num_programs=3),
                   M, N, K, dtype, version, transpose_b)


def test_autotuned_v2_and_one_row(part):
    part.check_tma(lambda a, b, o: part.matmul_tma(a, b, "v2", out=o), *_shape(part), torch.float16, "v2 tuned")
    part.check_tma(lambda a, b, o: part.matmul_tma(a, b, "v1", part.CHECK_CONFIG, out=o), 1, 24, 40,
                   torch.float32, "v1 one row")


def test_a_grid_smaller_than_its_step_is_caught(part):
    """The check can fail: a persistent launch of 1 program that steps by 3 tiles leaves the tiles
    of the other two unwritten (NaN), which the float64 comparison reports."""
    def wrong(a, b, out):
        M, N, K = a.shape[0], b.shape[1], a.shape[1]
        part.matmul_tma_persistent_kernel[(1,)](a, b, out, M, N, K, a.stride(0), b.stride(0), out.stride(0),
                                               B_TRANSPOSED=False, NUM_PROGRAMS=3, WARP_SPECIALIZE=False,
                                               **part.CHECK_CONFIG)
    with pytest.raises(common.CheckError):
        part.check_tma(wrong, 70, 72, 40, torch.float32, "wrong grid")


def test_tma_rules_are_named(part):
    a, b = common.randn(20, 37, dtype=torch.float16), common.randn(37, 24, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        part.matmul_tma(a, b, "v1")  # a row of 37 fp16 is 74 bytes
    a = common.randn(40, 20, dtype=torch.float16).t()
    with pytest.raises(ValueError, match="row-major"):
        part.matmul_tma(a, common.randn(40, 24, dtype=torch.float16), "v1")
    with pytest.raises(ValueError, match="version must be one of v1, v2, v3"):
        part.matmul_tma(common.randn(8, 8), common.randn(8, 8), "v4")
    with pytest.raises(TypeError, match="dtype"):
        part.matmul_tma(common.randn(8, 8), common.randn(8, 8, dtype=torch.float16), "v1")


def test_pruning_keeps_the_c_tile_of_the_persistent_kernel_in_shared_memory(part):
    big = next(c for c in part.GPU_CONFIGS if (c.kwargs["BLOCK_N"], c.num_stages) == (256, 4))
    args = {"M": 4096, "N": 4096, "K": 4096, "a_ptr": torch.empty(0, dtype=torch.float16)}
    assert part.tma_smem_bytes(big, 2, False) <= part.L10.shared_memory_limit() < part.tma_smem_bytes(big, 2, True)
    assert any(c is big for c in part.prune_tma_configs(part.GPU_CONFIGS, args))
    kept = part.prune_tma_persistent_configs(part.GPU_CONFIGS, args)
    assert kept and not any(c is big for c in kept)
    small = {**args, "M": 50, "N": 60}  # tiles larger than the problem never win: only 64 x 64 is kept
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in
            part.prune_tma_persistent_configs(part.GPU_CONFIGS, small)] == [(64, 64)]
    fp32 = {**args, "a_ptr": torch.empty(0, dtype=torch.float32)}  # 4-byte tiles: only the small config fits
    assert [c.kwargs["BLOCK_M"] for c in part.prune_tma_persistent_configs(part.GPU_CONFIGS, fp32)] == [64]


def test_benchmark_races_cublas_with_bars_at_both_sizes(part):
    for bench in part.benchmarks():
        assert bench.op == "matmul" and list(bench.quick_cases) == [] and list(bench.cases) == part.BENCH_SHAPES
        assert set(part.LESSON_10) <= set(bench.kernel_names)
        barred = {(bar.kernel.split()[0], bar.case) for bar in bench.bars if bar.vs == "baseline" and bar.at_least == 1.0}
        assert barred == {(v, shape) for v in ("v2", "v3") for shape in part.BENCH_SHAPES}
    assert all(not any(b.kernel.startswith("v3") for b in bench.bars) for bench in part.benchmarks("no split"))


def test_waves_of_4096_cubed_on_132_sms(part, capsys):
    square, wide = part._config(128, 128, 64, 4, 4), part._config(128, 256, 64, 8, 3)
    assert part.waves(4096, 4096, square, 132) == (1024, 1024 / 132, 100)  # 7.76 waves, 100 SMs in the last
    assert part.waves(4096, 4096, wide, 132) == (512, 512 / 132, 116)
    assert part.waves(8192, 8192, square, 132) == (4096, 4096 / 132, 4)
    part.waves_table(132)
    assert "4096x4096x4096" in capsys.readouterr().out


def test_each_version_compiles_for_sm90_with_tma_and_wgmma(part):
    """The strongest check without a GPU: compiled for sm_90 by this machine's Triton, every version's
    PTX holds TMA copies (cp.async.bulk.tensor) and wgmma, no cp.async, nothing spilled."""
    reports = part.compile_reports(part.COMPILE_CONFIGS[:1])
    if reports is None:
        pytest.skip("the kernels cannot be compiled here (see common.inspect_kernels)")
    assert sorted(v for v, _ in reports) == ["v1", "v2", "v3"]
    for (version, label), r in reports.items():
        assert r.arch == 90 and r.features["TMA"] and r.features["wgmma"], (version, label, r.features)
        assert not r.features["cp.async"] and r.local_bytes == 0, (version, r)
        assert "cp.async.bulk.tensor" in r.asm["ptx"] and "wgmma.mma_async" in r.asm["ptx"]
    # the persistent kernel keeps a C tile for its overlapped store; v1 reuses the loop's buffers
    v1, v2 = (reports[v, part.L10.config_label(part.COMPILE_CONFIGS[0])] for v in ("v1", "v2"))
    config = part.COMPILE_CONFIGS[0].kwargs
    assert v2.shared - v1.shared == config["BLOCK_M"] * config["BLOCK_N"] * 2
    assert not part.warp_specialized(v1) and not part.warp_specialized(v2)
