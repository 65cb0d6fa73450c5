"""Lesson 07's Hopper part (v4 TMA, v5 persistent, v6 warp-specialized forward): correctness against
float64 on awkward sizes, the checks' ability to fail, and what the kernels compile to for sm_90.
The part has no graded exercise: its kernels are checked here, under IMPL=solutions and IMPL=exercises
alike. In the interpreter a tensor descriptor runs as masked pointer loads, so the values are tested
here and the TMA / wgmma code is tested by compiling for sm_90 (no launch); timings need the GPU."""

import importlib

import pytest
import torch

import common
from common.lessons import REPO, find


@pytest.fixture(scope="module")
def part():
    script = next(p for p in find("07").parts if p.stem.endswith("_hopper"))
    return importlib.import_module(".".join(script.relative_to(REPO).with_suffix("").parts))


@pytest.fixture(autouse=True)
def _needs_hopper(part):
    if part.hopper_unavailable():
        pytest.skip(part.hopper_unavailable())


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])
# (B, H, HKV, N, D): N not a multiple of any block (the interpreter's are 32 x 16), N = 1, GQA
CASES = [(1, 2, 2, 45, 64), (2, 2, 1, 33, 128), (1, 1, 1, 1, 64)] if common.INTERPRETER else \
    [(2, 4, 4, 193, 128), (2, 4, 2, 1000, 64), (1, 1, 1, 1, 128), (1, 2, 2, 4097, 128)]


def _inputs(B, H, HKV, N, D, dtype):
    q = common.randn(B, H, N, D, dtype=dtype)
    return q, common.randn(B, HKV, N, D, dtype=dtype), common.randn(B, HKV, N, D, dtype=dtype)


def _expected(q, k, v, causal):
    H, HKV, N, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    s = torch.matmul(q.double(), k.double().repeat_interleave(H // HKV, 1).transpose(-2, -1)) * D ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.double().repeat_interleave(H // HKV, 1)), torch.logsumexp(s, -1)


@pytest.mark.parametrize("version", ["v4", "v5", "v6"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=common.dtype_name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}KV{}N{}D{}".format(*c))
def test_forward_matches_float64(part, version, causal, dtype, case):
    q, k, v = _inputs(*case, dtype)
    out = common.poisoned_empty(*q.shape, dtype=dtype)
    _, lse = part.hopper_attention(q, k, v, causal, out=out, version=version, autotune=False)
    expected, expected_lse = _expected(q, k, v, causal)
    common.assert_close(out, expected, name=f"{version} out")
    common.assert_close(lse, expected_lse, name=f"{version} logsumexp", atol=1e-4, rtol=1e-5)


def test_strided_inputs(part):
    """q, k, v as (B, N, H, D) transposed views, as a model's projections give them: the descriptor
    takes any strides that are multiples of 16 bytes."""
    q, k, v = (common.randn(2, 37, 2, 64, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    expected, _ = _expected(q, k, v, True)
    for version in ("v4", "v5"):
        common.assert_close(part.hopper_attention(q, k, v, True, version=version, autotune=False)[0], expected,
                            name=f"{version} strided")


@pytest.mark.parametrize("programs", [1, 2, 5])
def test_persistent_grid_covers_every_tile(part, monkeypatch, programs):
    """However few programs the grid has, each loops until every (head, query block) tile is done."""
    monkeypatch.setattr(part, "programs_for", lambda tiles, head_dim: programs)
    q, k, v = _inputs(2, 2, 2, 70, 64, torch.float32)
    for causal in (False, True):
        out = common.poisoned_empty(*q.shape)
        part.hopper_attention(q, k, v, causal, out=out, version="v5", autotune=False)
        common.assert_close(out, _expected(q, k, v, causal)[0], name=f"v5 with {programs} programs causal={causal}")


def test_programs_for_never_exceeds_the_tiles(part):
    assert part.programs_for(1, 128) == 1 and part.programs_for(2, 64) >= 1
    assert part.programs_for(10**6, 64) < 10**6


def test_the_check_catches_an_unwritten_output(part, monkeypatch):
    """A version that never writes its output (a wrapper that skips the launch) fails the check."""
    real = part.hopper_attention

    def lazy(q, k, v, causal=False, sm_scale=None, out=None, version="v4", autotune=True):
        if version == "v5":
            return out, torch.zeros(q.shape[:3], device=q.device)
        return real(q, k, v, causal, sm_scale, out, version, autotune)
    monkeypatch.setattr(part, "hopper_attention", lazy)
    with pytest.raises(common.CheckError):
        part.check(quick=True, versions=("v4", "v5"))


def test_the_check_catches_a_missing_causal_mask(part):
    """Non-causal output against the causal reference is wrong: the test's reference tells them apart."""
    q, k, v = _inputs(1, 1, 1, 45, 64, torch.float32)
    out, _ = part.hopper_attention(q, k, v, False, version="v4", autotune=False)
    with pytest.raises(common.CheckError):
        common.assert_close(out, _expected(q, k, v, True)[0], name="non-causal vs causal")


def test_misaligned_inputs_are_rejected_with_the_tma_rule(part):
    flat = common.randn(40 * 64 + 1, dtype=torch.float32)
    q = flat[1:].view(1, 1, 40, 64)  # starts 4 bytes past an aligned address
    with pytest.raises(ValueError, match="16-byte aligned"):
        part.hopper_attention(q, q, q, version="v4")


def test_bad_version_names_the_choices(part):
    q = common.randn(1, 1, 16, 64)
    with pytest.raises(ValueError, match="'v4', 'v5' or 'v6'"):
        part.hopper_attention(q, q, q, version="v7")


def test_unavailable_names_the_missing_piece(part, monkeypatch):
    monkeypatch.setattr(part.capability, "current_arch", lambda: 80)
    assert "sm_80" in part.hopper_unavailable() and "sm_90" in part.hopper_unavailable()
    monkeypatch.setattr(part.capability, "HAS_DESCRIPTORS", False)
    assert "make_tensor_descriptor" in part.hopper_unavailable()


@pytest.fixture(scope="module")
def reports(part):
    got = part.compile_reports()
    if got is None:
        pytest.skip("the kernels cannot be compiled for sm_90 here (see common/compiler.py)")
    return got


@pytest.mark.parametrize("d", [64, 128])
def test_compiled_for_sm90_v4_v5_use_tma_and_wgmma(reports, d):
    """The strongest check without a GPU: the PTX for sm_90 holds TMA copies and wgmma, v3's
    per-thread cp.async is gone, and nothing spills."""
    for version in ("v4", "v5", "v6"):
        r = reports[version, d]
        assert r.features["TMA"] and r.features["wgmma"], (version, d, r.summary())
        assert not r.features["cp.async"], (version, d, r.summary())
        assert r.local_bytes == 0 and r.shared <= 227 * 1024, (version, d, r.summary())
    assert reports["v3", d].features["cp.async"] and not reports["v3", d].features["TMA"]


def test_v6_is_benchmarked_only_when_the_compiler_split_the_loop(part, reports):
    split = all(part.warp_specialized(reports["v6", d]) for d in (64, 128))
    assert (part.v6_status(reports) == "") == split
    assert "tt.warp_specialize" in reports["v6", 128].asm["ttgir"]  # the request reached the compiler
    assert "tt.warp_specialize" not in reports["v5", 128].asm["ttgir"]
    fake = {key: common.KernelReport.from_json({**r.to_json(), "asm": {"ttgir": "ttg.warp_specialize(...)"}})
            for key, r in reports.items()}
    assert part.v6_status(fake) == ""
    assert "did not compile" in part.v6_status({k: r for k, r in reports.items() if k != ("v6", 64)})


def test_benchmarks_race_every_version_with_bars_at_4096(part):
    titles = [b.title for b in part.BENCHMARKS]
    assert len(titles) == 4 and all(b.op == "attention" for b in part.BENCHMARKS)
    for b in part.BENCHMARKS:
        assert [c[2] for c in b.cases] == [1024, 4096, 16384]
        assert {"v3", "v4", "v5"} <= {name.split()[0] for name in b.kernel_names}
        (bar,) = b.bars
        assert bar.case[2] == 4096 and bar.vs == "baseline" and bar.at_least == 1.0
        assert bar.kernel == b.kernel_names[-1]
    assert {(b.cases[0][3], b.cases[0][4]) for b in part.BENCHMARKS} == {(128, False), (128, True), (64, False),
                                                                         (64, True)}


@pytest.mark.skipif(not common.HAS_GPU, reason="autotuned bf16 kernels at the benchmark size need a CUDA GPU")
def test_autotuned_at_benchmark_size(part):
    part.check_at_benchmark_size(quick=True)
