"""The benchmark layer (common.benchmark) and the baseline registry (common.baselines), on the CPU.

The GPU clock is replaced by a stub that hands out scripted times, so the layer's own logic is
checked here: the order providers are timed in, extra rounds when a ratio is noisy, every bar
against the fastest registered baseline, the memory and ceiling bars, results.json. Then every
lesson's declarations: each races its op's registered baselines and states a bar against them.
"""

import json
import re

import pytest
import torch

import common
from common import baselines as registry
from common import benchmark, report
from common.lessons import LESSONS, lesson_module
from common.timing import Timing

WRITTEN = [lesson for lesson in LESSONS if lesson.written]


# -- a fake op and a stub clock -------------------------------------------------------------------

CALLS: list[str] = []


def _provider(name):
    def fn(x):
        CALLS.append(name)
        return x
    fn.__name__ = name.replace(" ", "_")
    return fn


@pytest.fixture
def fake_op(monkeypatch):
    """An op "fake" whose library baseline is "lib": eager, compile and lib are all raced."""
    op = registry.Op("fake", "x", (registry.Baseline("lib", _provider("lib")),))
    monkeypatch.setitem(registry.OPS, "fake", op)
    monkeypatch.setattr(report, "_RUN", {"tables": [], "bars": [], "plots": []})
    CALLS.clear()
    return op


class StubClock:
    """times[name] is a list of ms per round (cycled); the name is the provider the step calls."""

    def __init__(self, times, memory=None, ceiling=1000.0):
        self.times, self.memories, self.ceiling_value = times, memory or {}, ceiling
        self.rounds_seen: dict[str, int] = {}
        self.order: list[str] = []

    def _name_of(self, fn):
        before = len(CALLS)
        fn()
        return CALLS[before]

    def time(self, fn, timer, copies=None):
        name = self._name_of(fn)
        self.order.append(name)
        i = self.rounds_seen.get(name, 0)
        self.rounds_seen[name] = i + 1
        ms = self.times[name][i % len(self.times[name])]
        return Timing(ms, ms * 0.99, ms * 1.01)

    def ceiling(self, kind, dtype):
        return self.ceiling_value

    def memory(self, fn):
        return self.memories[self._name_of(fn)]

    def compile(self, fn, inputs):
        return _provider(registry.COMPILE)


def _benchmark(**overrides):
    spec = dict(title="fake bench", op="fake", cases=[8], setup=lambda n: (torch.zeros(n),),
                kernels={"mine": _provider("mine")}, reference=_provider(registry.EAGER),
                nbytes=lambda x: 1e9, ceiling="copy")
    spec.update(overrides)
    return benchmark.Benchmark(**spec)


def test_providers_alternate_and_every_registered_baseline_races(fake_op):
    clock = StubClock({"mine": [1.0], registry.EAGER: [2.0], registry.COMPILE: [1.5], "lib": [1.2]})
    [res] = _benchmark().run(quick=False, _clock=clock)
    assert set(res.baselines) == {registry.EAGER, registry.COMPILE, "lib"}
    n = 4
    first, second = clock.order[:n], clock.order[n:2 * n]
    assert first == ["mine", registry.EAGER, registry.COMPILE, "lib"]
    assert second == first[::-1], "the second round must time the providers in reverse order"
    assert res.rounds == 3
    assert res.best_baseline == "lib"
    assert res.ratios["mine"] == pytest.approx(1.2)


def test_noisy_ratio_gets_more_rounds(fake_op):
    steady = StubClock({"mine": [1.0], registry.EAGER: [2.0], registry.COMPILE: [2.0], "lib": [1.0]})
    assert _benchmark().run(quick=False, _clock=steady)[0].rounds == 3
    noisy = StubClock({"mine": [1.0, 1.3, 0.8], registry.EAGER: [2.0], registry.COMPILE: [2.0], "lib": [1.0]})
    res = _benchmark().run(quick=False, _clock=noisy)[0]
    assert res.rounds > 3, "a kernel/baseline ratio that spreads by 20% must get extra rounds"
    assert res.rounds <= _benchmark().max_rounds


def test_bars_race_the_fastest_baseline_and_record_it(fake_op):
    # lib is fastest at case 8, torch.compile at case 16: each bar names the one it raced.
    clock = StubClock({"mine": [1.0], registry.EAGER: [3.0], registry.COMPILE: [2.0], "lib": [1.5]},
                      memory={"mine": 100, registry.EAGER: 400, registry.COMPILE: 300, "lib": 50})
    b = _benchmark(cases=[8], memory=True, bars=[
        common.Bar("mine", 8, "baseline", 1.4), common.Bar("mine", 8, "baseline memory", 100.0),
        common.Bar("mine", 8, "ceiling", 90.0)])
    b.run(quick=False, _clock=clock)
    speed, memory, ceiling = report._RUN["bars"]
    assert speed["baseline"] == "lib" and speed["value"] == pytest.approx(1.5) and speed["passed"]
    # 100 B against lib's 50 B: 200% of the leanest baseline's memory, over the 100% bar
    assert memory["baseline"] == "lib" and memory["value"] == pytest.approx(200.0) and not memory["passed"]
    assert memory["unit"] == "%" and not memory["higher_is_better"]
    assert ceiling["value"] == pytest.approx(100.0) and ceiling["unit"] == "%"  # 1e9 B in 1 ms = 1000 GB/s
    for record in report._RUN["bars"]:
        assert {"kernel", "baseline", "shape", "dtype", "op", "benchmark"} <= set(record)


def test_a_miss_states_the_measured_reason(fake_op, capsys):
    clock = StubClock({"mine": [2.0], registry.EAGER: [3.0], registry.COMPILE: [1.0], "lib": [1.5]})
    _benchmark(bars=[common.Bar("mine", 8, "baseline", 1.0)]).run(quick=False, _clock=clock)
    [bar] = report._RUN["bars"]
    assert not bar["passed"] and bar["baseline"] == registry.COMPILE and bar["value"] == pytest.approx(0.5)
    assert "torch.compile" in bar["why"] and "GB/s" in bar["why"]
    assert "MISS" in capsys.readouterr().out


def test_quick_runs_state_no_bars_and_skip_compile(fake_op, capsys):
    clock = StubClock({"mine": [1.0], registry.EAGER: [2.0], "lib": [1.5]})
    res = _benchmark(bars=[common.Bar("mine", 8, "baseline", 1.0)]).run(quick=True, _clock=clock)
    assert report._RUN["bars"] == [] and res[0].rounds == 1
    assert "not raced: torch.compile" in capsys.readouterr().out


def test_interpreter_smoke_runs_every_provider_once(fake_op, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "HAS_GPU", False)
    monkeypatch.setattr(common.device, "HAS_GPU", False)  # require_gpu's, for the message (on a GPU too)
    b = _benchmark(cpu_cases=[3])
    assert b.run(quick=True) == []  # no GPU clock here: the smoke path
    assert sorted(CALLS) == sorted(["mine", registry.EAGER, "lib"])
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_a_kernel_that_fails_in_the_smoke_run_is_an_error(fake_op, monkeypatch):
    monkeypatch.setattr(benchmark, "HAS_GPU", False)

    def broken(x):
        raise RuntimeError("wrong")
    with pytest.raises(RuntimeError, match="wrong"):
        _benchmark(kernels={"mine": broken}, cpu_cases=[3]).run(quick=True)


# -- declarations that must be refused ----------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(bars=[common.Bar("mine", 8, registry.EAGER, 1.0)]), "bar vs must be"),  # pick-your-own baseline
    (dict(bars=[common.Bar("mine", 8, "F.softmax", 1.0)]), "bar vs must be"),
    (dict(baselines={"my slow loop": _provider("slow")}), "not in the registry"),
    (dict(reference=None), "pass reference="),
    (dict(bars=[common.Bar("yours", 8, "baseline", 1.0)]), "not one of the kernels"),
    (dict(bars=[common.Bar("mine", 4096, "baseline", 1.0)]), "not one of the cases"),
    (dict(bars=[common.Bar("mine", 8, "baseline memory", 1.0)]), "needs memory=True"),
    (dict(ceiling="dram"), "ceiling must be"),
    (dict(nbytes=None), "a ceiling needs nbytes"),
    (dict(op="softmaxx"), "not in the baseline registry"),
    (dict(op=None), "op=None is a sweep"),
    (dict(timer="graph", grad="fwd+bwd"), "forward calls only"),
])
def test_wrong_declarations_are_refused(fake_op, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _benchmark(**overrides)


def test_a_lesson_supplied_baseline_cannot_be_left_out():
    with pytest.raises(ValueError, match="torch._grouped_mm"):
        benchmark.Benchmark("moe", op="moe", cases=[1], setup=lambda n: (n,), kernels={"mine": _provider("m")},
                        reference=_provider(registry.EAGER))


def test_versions_registry():
    versions = common.Versions("matmul")
    versions.add("v1", "naive", _provider("v1"))
    versions.add("v2", "tiled", _provider("v2"))
    assert versions.get(2).label == "v2 tiled" and versions["v1"].fn.__name__ == "v1"
    assert list(versions.providers()) == ["v1 naive", "v2 tiled"]
    with pytest.raises(ValueError, match="v1, v2"):
        versions.get("v3")
    with pytest.raises(ValueError, match="added twice"):
        versions.add("v1", "again", _provider("v1"))


# -- results.json ---------------------------------------------------------------------------------

def test_results_json_is_written_and_parses(fake_op, tmp_path, monkeypatch):
    clock = StubClock({"mine": [1.0], registry.EAGER: [3.0], registry.COMPILE: [2.0], "lib": [1.5]})
    _benchmark(bars=[common.Bar("mine", 8, "baseline", 1.0), common.Bar("mine", 8, "ceiling", 90)]).run(
        quick=False, _clock=clock)
    monkeypatch.setenv("COURSE_RESULTS", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["lessons/beginner/01_vector_add.py"])
    report._write_results()
    md, js = report.write_results(tmp_path)  # a folder other than lessons/results: no md is touched
    bars = json.loads(js.read_text())["bars"]
    assert len(bars) == 2
    for record in bars:
        missing = set(report.BAR_FIELDS) - set(record)
        assert not missing, f"results.json bar lacks {missing}"
        assert record["lesson"] == "01_vector_add" and record["baseline"] in ("lib", "copy ceiling")
    assert "strongest baseline" in md.read_text() and "| lib |" in md.read_text()
    table = report.bars_table(bars)
    assert table.count("\n| 01 |") == 2 and "| the fastest baseline: lib | 1.50 x | >= 1 x | PASS |" in table
    assert table.startswith(f"Measured on {bars[0]['gpu']}") and "| GPU, date |" not in table
    mixed = [dict(bars[0]), dict(bars[1], gpu="another GPU")]
    table = report.bars_table(mixed)
    assert "| GPU, date |" in table and "| another GPU, " in table and not table.startswith("Measured")


# -- every lesson's declarations --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lesson_modules():
    return {lesson.stem: lesson_module(lesson.number) for lesson in WRITTEN}


@pytest.mark.parametrize("lesson", WRITTEN, ids=lambda l: l.stem)
def test_lesson_declares_its_benchmarks(lesson, lesson_modules):
    source = lesson.script.read_text()
    loops = re.findall(r"^def (benchmark_\w+)", source, re.M)
    assert not loops, f"{lesson.stem} still hand-writes benchmark loops: {loops}; declare them in BENCHMARKS"
    declared = getattr(lesson_modules[lesson.stem], "BENCHMARKS", None)
    assert declared, f"{lesson.stem} has no BENCHMARKS list"
    assert all(isinstance(b, common.Benchmark) for b in declared)
    assert "common.run_benchmarks(" in source, f"{lesson.stem} does not run its BENCHMARKS through the layer"


@pytest.mark.parametrize("lesson", WRITTEN, ids=lambda l: l.stem)
def test_lesson_bars_race_the_registry_strongest(lesson, lesson_modules):
    declared = lesson_modules[lesson.stem].BENCHMARKS
    baseline_bars = [(b, bar) for b in declared for bar in b.bars if bar.vs.startswith("baseline")]
    assert baseline_bars, f"{lesson.stem} states no bar against the strongest baseline"
    for b, bar in baseline_bars:
        op = registry.op(b.op)
        # The layer races every baseline registered for the op: the lesson's extra ones are refused,
        # its required ones present, and the bar is against the fastest of all of them.
        assert b.baseline_names() == op.baseline_names
        assert set(b.baselines) <= set(op.baseline_names)
        assert all(name in b.baselines for name in op.lesson_supplied)
        assert b.reference is not None or not (op.eager or op.compile)
        assert bar.vs in benchmark.BASELINE_VS
    for b in declared:
        for bar in b.bars:
            assert bar.vs in benchmark.BASELINE_VS or bar.vs in b.kernel_names, (b.title, bar)


def test_registry_ops_are_well_formed():
    for name, op in registry.OPS.items():
        assert op.name == name and op.signature
        names = op.baseline_names
        assert len(names) == len(set(names)), f"{name}: a baseline is registered twice"
        assert names, f"{name}: an op with nothing to race"
        for b in op.baselines:
            assert b.fn is not None or b.peer is None, f"{name}: peer {b.name} has no code to call"


def test_a_bar_between_kernels_is_the_median_of_paired_rounds(fake_op):
    # Round by round "other" takes 2x, 0.67x, 2x mine's time: the paired median is 2x, where the
    # ratio of each kernel's median time (2.0 / 3.0) would say 0.67x.
    clock = StubClock({"mine": [1.0, 3.0, 3.0], "other": [2.0, 2.0, 6.0], registry.EAGER: [9.0],
                       registry.COMPILE: [9.0], "lib": [9.0]})
    b = _benchmark(kernels={"mine": _provider("mine"), "other": _provider("other")}, rounds=3, max_rounds=3,
                   bars=[common.Bar("mine", 8, "other", 1.5), common.Bar("other", 8, "mine", 1.0)])
    [res] = b.run(quick=False, _clock=clock)
    mine_vs_other, other_vs_mine = report._RUN["bars"]
    assert mine_vs_other["value"] == pytest.approx(2.0) and mine_vs_other["baseline"] == "other"
    assert other_vs_mine["value"] == pytest.approx(0.5) and not other_vs_mine["passed"]  # 1/2, 1.5, 1/2
    assert "other" in other_vs_mine["why"] and "mine" in other_vs_mine["why"]


def test_a_memory_miss_names_the_bytes(fake_op):
    clock = StubClock({"mine": [1.0], registry.EAGER: [3.0], registry.COMPILE: [2.0], "lib": [1.5]},
                      memory={"mine": 4 << 20, registry.EAGER: 8 << 20, registry.COMPILE: 2 << 20, "lib": 8 << 20})
    _benchmark(memory=True, bars=[common.Bar("mine", 8, "baseline memory", 100.0)]).run(quick=False, _clock=clock)
    [bar] = report._RUN["bars"]
    assert bar["baseline"] == registry.COMPILE and bar["value"] == pytest.approx(200.0) and not bar["passed"]
    assert "extra memory" in bar["why"] and "MiB" in bar["why"]


def test_a_small_bar_value_keeps_its_digits(capsys):
    # 104 KiB of extra memory against 1.96 GiB is 0.0052%: two decimals would print 0.01 %.
    report.perf_bar("memory", 0.0052, 100.0, "%", higher_is_better=False)
    assert "0.0052 % (bar <= 100 %) -> PASS" in capsys.readouterr().out
    assert report._RUN["bars"][-1]["value"] == 0.0052


def test_a_miss_never_prints_as_its_bar(capsys):
    # 0.9774x against a 0.98x bar printed "0.98 x (bar >= 0.98 x) -> MISS" on the GPU (lesson 03):
    # a miss gets the digits that show it. The json keeps 6 digits, so the table prints the same.
    report.perf_bar("ratio", 0.9774, 0.98, "x")
    assert "0.977 x (bar >= 0.98 x) -> MISS" in capsys.readouterr().out
    assert report._RUN["bars"][-1]["value"] == 0.9774
    report.perf_bar("ratio", 1.2345, 1.0, "x")
    assert "1.23 x (bar >= 1 x) -> PASS" in capsys.readouterr().out
    assert report.fmt_value(0.9952) == report.fmt_value(0.9952, 0.98) == "1.00"


def test_common_bench_is_the_timer_not_a_module():
    # common/bench.py, the layer's old module name, replaced the function common.bench on import
    # (a submodule import sets the package attribute): lesson 10's roofline crashed on the GPU
    # with "'module' object is not callable". The layer lives in common/benchmark.py.
    import common
    from common.timing import bench
    assert common.bench is bench and callable(common.bench)


def test_unavailable_benchmark_says_why_and_times_nothing(fake_op, capsys):
    """A benchmark this GPU cannot hold (lesson 04's stage sweep on a T4) prints its reason, no table."""
    clock = StubClock({"mine": [1.0], registry.EAGER: [2.0], registry.COMPILE: [1.5], "lib": [1.2]})
    assert _benchmark(unavailable="tiles of 96 KiB, 64 KiB here").run(quick=False, _clock=clock) == []
    assert clock.order == []
    assert "not run on this GPU: tiles of 96 KiB, 64 KiB here" in capsys.readouterr().out


# -- every raced output is checked against the reference's at the timed size ---------------------

def _scaled(name, factor):
    def fn(x):
        CALLS.append(name)
        return x * factor
    return fn


def _randn_setup(n):
    return (torch.randn(n, generator=torch.Generator().manual_seed(n)),)


def test_a_fast_kernel_with_a_wrong_output_misses_its_bar(fake_op, capsys):
    # "mine" is 2x faster than every baseline, but its output is 1% off: the bar must be a MISS.
    clock = StubClock({"mine": [1.0], registry.EAGER: [2.0], registry.COMPILE: [2.0], "lib": [2.0]})
    b = _benchmark(setup=_randn_setup, kernels={"mine": _scaled("mine", 1.01)},
                   bars=[common.Bar("mine", 8, "baseline", 1.0)])
    [res] = b.run(quick=False, _clock=clock)
    [bar] = report._RUN["bars"]
    assert not bar["passed"] and bar["value"] == pytest.approx(2.0)
    assert "output is wrong" in bar["why"] and "torch eager" in bar["why"]
    assert "mine" in res.disagree and "lib" not in res.disagree
    assert "OUTPUT DIFFERS at 8: mine" in capsys.readouterr().out


def test_agreement_within_tolerance_passes_and_none_compares_nothing(fake_op):
    clock = StubClock({"mine": [1.0], registry.EAGER: [2.0], registry.COMPILE: [2.0], "lib": [2.0]})
    close = _benchmark(setup=_randn_setup, kernels={"mine": _scaled("mine", 1 + 1e-4)},
                       bars=[common.Bar("mine", 8, "baseline", 1.0)])
    close.run(quick=False, _clock=clock)
    assert report._RUN["bars"][-1]["passed"], "fp32 within 1e-4 of the reference must agree"
    off = _benchmark(setup=_randn_setup, kernels={"mine": _scaled("mine", 2.0)}, agreement=None,
                     bars=[common.Bar("mine", 8, "baseline", 1.0)])
    [res] = off.run(quick=False, _clock=clock)
    assert res.disagree == {} and report._RUN["bars"][-1]["passed"]


def test_the_interpreter_run_rejects_a_wrong_kernel_and_reports_a_wrong_baseline(fake_op, monkeypatch, capsys):
    monkeypatch.setitem(registry.OPS, "fake", registry.Op("fake", "x", (registry.Baseline("lib", _scaled("lib", 3.0)),)))
    # _smoke is what run() does without a GPU (called directly, so a GPU machine tests it too)
    right = _benchmark(setup=_randn_setup, cpu_cases=[8], kernels={"mine": _provider("mine")})
    assert right._smoke() == []
    assert "OUTPUT DIFFERS at 8: lib" in capsys.readouterr().out  # a baseline: reported, not raised
    wrong = _benchmark(setup=_randn_setup, cpu_cases=[8], kernels={"mine": _scaled("mine", -1.0)})
    with pytest.raises(AssertionError, match="mine: relative error 2 against torch eager"):
        wrong._smoke()


def test_fwd_bwd_providers_get_the_same_upstream_gradient(fake_op):
    # Two correct providers of x * 3 must give equal gradients: a fresh random dy per provider
    # would make their gradients disagree.
    def setup(n):
        return (torch.randn(n).requires_grad_(),)
    b = _benchmark(setup=setup, cpu_cases=[16], grad="fwd+bwd", kernels={"mine": lambda x: x * 3.0},
                   reference=lambda x: 3.0 * x)
    b._smoke()  # raises if the kernel's gradient differs from the reference's


def test_disagreement_measure():
    x = torch.randn(64, dtype=torch.float64)
    assert benchmark.disagreement(x, x) == (0.0, 1e-6)
    nan = x.clone()
    nan[3] = float("nan")
    assert benchmark.disagreement(nan, x)[0] == float("inf"), "NaN where the reference is finite"
    # tensors pair in order while shapes match: (y, mean, rstd) against y compares y
    y = torch.randn(4, 8, dtype=torch.float16)
    assert benchmark.disagreement((y, torch.zeros(4)), y)[0] == 0.0
    assert benchmark.disagreement(torch.zeros(3), torch.zeros(4)) is None
    assert benchmark.disagreement("no tensors", x) is None
    ids = torch.tensor([1, 2, 3])
    assert benchmark.disagreement(ids, ids)[0] == 0.0
    assert benchmark.disagreement(ids, torch.tensor([1, 2, 4]))[0] == pytest.approx(1 / 3)
    assert benchmark.disagreement(ids, torch.tensor([1, 2, 4]))[1] == benchmark.AGREEMENT_INTEGERS
    bf = torch.randn(256).to(torch.bfloat16)
    err, tol = benchmark.disagreement(bf, (bf.double() * 1.001).to(torch.bfloat16))
    assert err < tol == benchmark.AGREEMENT[torch.bfloat16]
