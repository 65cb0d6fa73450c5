"""The toolkit itself: diagnoses name the right cause, traffic is counted right, inputs are validated."""

import pytest
import torch

import common
from common import CheckError, assert_close, poisoned_empty
from common.checks import GUARD_ELEMENTS, PoisonedAllocations, awkward_sizes, sum_tolerance
from common.grading import Exercise, NeedsGPU, grade_function, is_untouched_stub, solution_with
from common.lessons import REPO
from common.report import Table
from common.traffic import count_torch_traffic


def _diagnosis(actual, expected, **kwargs) -> str:
    with pytest.raises(CheckError) as info:
        assert_close(actual, expected, **kwargs)
    return str(info.value)


def test_matching_output_passes():
    x = torch.randn(1000, dtype=torch.float64)
    assert_close(x.float(), x)
    assert_close(x.half(), x)


def test_diagnosis_unwritten_tail():
    expected = torch.randn(1823, dtype=torch.float64)
    out = poisoned_empty(1823)
    out[:1024] = expected[:1024].float()
    message = _diagnosis(out, expected)
    assert "799 of 1823 elements wrong" in message and "never written" in message
    assert "first wrong element at index (1024,)" in message and "grid is too small" in message


def test_diagnosis_nothing_written():
    assert "never written" in _diagnosis(poisoned_empty(100), torch.ones(100, dtype=torch.float64))


def test_diagnosis_store_past_the_end():
    out = poisoned_empty(100)
    expected = torch.randn(100, dtype=torch.float64)
    out.copy_(expected)
    out._course_guard[GUARD_ELEMENTS + 100 + 3] = 0.0  # what an unmasked store does
    assert "past the end" in _diagnosis(out, expected)


def test_named_mistake_found_through_its_own_rounding():
    expected = torch.randn(200, dtype=torch.float64)
    unscaled = 3000 * expected  # a sum that forgot its scale: thousands, with fp32 rounding of its own
    got = (unscaled * (1 + 2e-4 * torch.randn(200, dtype=torch.float64))).float()
    message = _diagnosis(got, expected, mistakes={"the scale was not applied": unscaled})
    assert "the scale was not applied" in message
    assert "the scale was not applied" not in _diagnosis(got, expected, mistakes={"the scale was not applied": -unscaled})


def test_precision_loss_named_when_some_outputs_are_near_zero():
    # Seeded: the diagnosis allows errors up to 5% of 1% of the largest output, and 5e-3 noise
    # crossed that in 35 of 200 seeds (a test that failed depending on the tests run before it).
    generator = torch.Generator().manual_seed(0)
    expected = torch.randn(1000, dtype=torch.float64, generator=generator) * 10
    expected[::7] = 1e-4  # outputs near zero, as a dot product of random signs makes
    noise = 3e-3 * torch.randn(1000, dtype=torch.float64, generator=generator)  # fp16-sized rounding errors
    got = (expected + noise).float()  # 0 of 300 seeds leave the precision-loss diagnosis
    assert "precision loss" in _diagnosis(got, expected)


def test_sum_tolerance_grows_for_fp32_sums_only():
    # A sum of 700 fp32 products added in another order than float64 (a weight gradient over the rows).
    terms = torch.randn(700, 2000, dtype=torch.float64)
    want = terms.sum(0)
    got = terms.float().flip(0).cumsum(0)[-1]  # sequential fp32 sum, backwards
    assert sum_tolerance(torch.float32, 700)["atol"] > common.checks.tolerance(torch.float32)["atol"]
    assert sum_tolerance(torch.bfloat16, 700) == common.checks.tolerance(torch.bfloat16)
    assert_close(got, want, **sum_tolerance(torch.float32, 700))
    with pytest.raises(CheckError):  # one term dropped is still an error
        assert_close(got - terms[0].float(), want, **sum_tolerance(torch.float32, 700))


def test_diagnosis_transposed_and_misplaced_and_scaled():
    e = torch.randn(37, 37, dtype=torch.float64)
    assert "transpose" in _diagnosis(e.T.contiguous().float(), e)
    perm = torch.randperm(5000)
    v = torch.randn(5000, dtype=torch.float64)
    assert "wrong places" in _diagnosis(v[perm].float(), v)
    assert "2 x the expected" in _diagnosis((2 * v).float(), v)


def test_diagnosis_precision_loss():
    v = torch.randn(5000, dtype=torch.float64) * 100
    noisy = (v * (1 + 3e-4 * torch.randn_like(v))).float()  # like an fp16 accumulator would do
    assert "precision" in _diagnosis(noisy, v)


def test_diagnosis_named_mistake_and_seed():
    v = torch.randn(300, dtype=torch.float64)
    message = _diagnosis(v.float() + 1, v, mistakes={"you added one": v + 1})
    assert "hint: you added one" in message


def test_shape_and_type_errors():
    with pytest.raises(CheckError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(CheckError, match="return its output"):
        assert_close(None, torch.zeros(4, dtype=torch.float64))


def test_awkward_sizes_are_awkward():
    sizes = awkward_sizes(5, lo=1000, hi=4000, include=(1,))
    assert sizes[-1] == 1 and len(sizes) == 6
    assert all(n % 16 for n in sizes[:-1]) and all(1000 <= n < 4000 for n in sizes[:-1])


def test_traffic_counter_counts_bytes_and_ops():
    x = torch.randn(1000)
    y = torch.randn(1000)

    def unfused(x, y):
        return torch.exp(x + y).sum()  # add: r 8000 w 4000; exp: r 4000 w 4000; sum: r 4000 w 4

    record = count_torch_traffic(unfused, x, y)
    assert [o.op for o in record.ops] == ["add", "exp", "sum"]
    assert record.read == 16000 and record.written == 8004 and record.kernels == 3

    def views_and_inplace(x):
        x.view(10, 100).t().mul_(2)  # views move nothing; mul_ reads and writes x once
        return x

    record = count_torch_traffic(views_and_inplace, x.clone())
    assert [(o.op, o.read, o.written) for o in record.ops] == [("mul_", 4000, 4000)]

    out = torch.empty(1000)
    record = count_torch_traffic(lambda: torch.add(x, y, out=out))
    assert (record.read, record.written) == (8000, 4000)  # out= is written, not read


def test_traffic_counter_write_only_ops_and_broadcast_views():
    x, out = torch.randn(1000), torch.empty(1000)
    record = count_torch_traffic(lambda: out.copy_(x))
    assert [(o.op, o.read, o.written) for o in record.ops] == [("copy_", 4000, 4000)]  # out is overwritten, not read
    record = count_torch_traffic(lambda: out.zero_())
    assert (record.read, record.written) == (0, 4000)
    record = count_torch_traffic(lambda: out.fill_(2.0))
    assert (record.read, record.written) == (0, 4000)
    m, bias = torch.randn(50, 100), torch.randn(100)
    # An expanded (stride-0) view holds 100 floats, not 5000: the kernel reads 400 bytes of it.
    record = count_torch_traffic(lambda: m + bias.expand(50, 100))
    assert (record.read, record.written) == (50 * 100 * 4 + 100 * 4, 50 * 100 * 4)
    record = count_torch_traffic(lambda: m.add_(bias.expand(50, 100)))  # add_ still reads self
    assert (record.read, record.written) == (50 * 100 * 4 + 100 * 4, 50 * 100 * 4)


def test_check_tensors_names_the_problem():
    x = torch.randn(10, device=common.DEVICE)
    common.check_tensors(x=x, y=torch.randn(10, device=common.DEVICE))
    with pytest.raises(ValueError, match="y has shape"):
        common.check_tensors(x=x, y=torch.randn(11, device=common.DEVICE))
    with pytest.raises(TypeError, match="y has dtype float16 but x has float32"):
        common.check_tensors(x=x, y=x.half())
    with pytest.raises(ValueError, match="x must be contiguous"):
        common.check_tensors(x=torch.randn(20, device=common.DEVICE)[::2])
    with pytest.raises(TypeError, match="supports float16"):
        common.check_tensors(x=x, dtypes=(torch.float16,))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        common.check_tensors(x=[1, 2])


def test_table_format():
    table = Table("demo", ["name", "GB/s"])
    table.add("triton", 3012.34)
    table.add("torch", 0.5)
    text = table.text()
    assert "triton" in text and "3,012" in text and "0.5" in text
    assert table.markdown().startswith("**demo**")
    with pytest.raises(ValueError, match="2 columns"):
        table.add("only one")


def _stub():
    """docstring"""
    # TODO: comments do not count
    pass


def _started():
    """docstring"""
    return 1


def _raises():
    raise NotImplementedError("TODO")


def test_stub_detection():
    assert is_untouched_stub(_stub) and is_untouched_stub(_raises) and not is_untouched_stub(_started)


def test_grader_reports_crashes_as_failures_not_crashes():
    def check(fn):
        fn()

    result = grade_function(Exercise("0.1", "boom", check), lambda: 1 / 0)
    assert result.status == "failed" and "ZeroDivisionError" in result.detail
    result = grade_function(Exercise("0.2", "todo", check), _raises)
    assert result.status == "todo"


def test_a_check_that_needs_a_gpu_reports_skipped_never_passed():
    def check(fn):
        fn()
        raise NeedsGPU("needs a CUDA GPU: CUDA graphs")

    result = grade_function(Exercise("0.3", "graph", check), lambda: None)
    assert result.status == "skipped" and "CUDA graphs" in result.detail


def test_solution_with_replaces_in_a_private_copy():
    wrong = solution_with("01_vector_add", axpy=lambda *args, **kwargs: "wrong")
    again = solution_with("01_vector_add")
    assert wrong.axpy() == "wrong" and again.axpy is not wrong.axpy


def test_int_outputs_never_written_are_named():
    for dtype in (torch.int8, torch.int32):
        out = poisoned_empty(50, dtype=dtype)
        out[:20] = 3
        assert "never written" in _diagnosis(out, torch.full((50,), 3, dtype=torch.float64))
        out[:] = -96  # written, wrong: an int8 kernel can write any value but -128 after a clamp to +-127
        assert "never written" not in _diagnosis(out, torch.full((50,), 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=str)
def test_untouched_guards_pass_in_every_dtype(dtype):
    from common.checks import check_guards
    check_guards(poisoned_empty(100, dtype=dtype))  # the guard value must be exact in the dtype


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: CUDA graphs")
def test_bench_graphed_times_every_call():
    xs = [torch.randn(1 << 20, device="cuda") for _ in range(3)]
    calls = []
    timing = common.bench_graphed([lambda x=x: calls.append(1) or x.mul_(1.0) for x in xs], calls=30, replays=5)
    assert len(calls) == 3 + 30  # warm-up once each, then captured once: replays run no Python
    assert 0 < timing.lo_ms <= timing.ms <= timing.hi_ms


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: torch.profiler's kernel events")
def test_gpu_kernel_count_and_wall_time():
    x = torch.randn(1 << 16, device="cuda")
    two_kernels = lambda: (x * 2).add_(1.0)  # noqa: E731  (one multiply, one in-place add)
    assert common.gpu_kernel_count(two_kernels) == 2
    assert common.gpu_kernel_count(lambda: x.clone()) in (1, None)  # a device copy may be a memcpy: not counted
    assert 0 < common.wall_us_per_call(two_kernels, calls=20, repeats=3) < 1e5


def test_poisoned_allocations_catch_unwritten_outputs():
    """The grader's own tool: a NaN-filled, guarded tensor from every torch.empty inside the mode."""
    with PoisonedAllocations() as allocations:
        t = torch.empty(10, device=common.DEVICE)
        i = torch.empty(10, dtype=torch.int64, device=common.DEVICE)  # integers are left alone
    assert torch.isnan(t).all() and len(allocations.made) == 1 and i.dtype == torch.int64
    allocations.made[0]._course_guard[-1] = 0.0  # as if a kernel had stored past the end
    with pytest.raises(CheckError, match="past the end"):
        allocations.check_guards()


def test_median_ratio_takes_the_middle_pair(monkeypatch):
    # bench() returns these times in turn: pairs (base, new) of (2, 1), (9, 1), (3, 1) -> ratios 2, 9, 3.
    times = iter([2.0, 1.0, 9.0, 1.0, 3.0, 1.0])
    monkeypatch.setattr(common.timing, "bench", lambda fn, rep_ms=100: common.Timing(next(times), 0.0, 0.0))
    assert common.median_ratio(lambda: None, lambda: None, pairs=3) == 3.0


def test_a_plot_into_an_unwritable_folder_is_a_message_not_a_crash(tmp_path, monkeypatch, capsys):
    # A read-only checkout crashed lessons 09, 10 and 12 at their first plot. As root (CI, the GPU
    # machine) chmod does not stop a write, so the failing write is simulated.
    from common import report
    monkeypatch.setenv("COURSE_RESULTS", str(tmp_path))
    fig, _ = report.new_figure("t", "x", "y")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(fig, "savefig", read_only)
    report.save_plot(fig, "read_only_test")
    assert "plot not written (read_only_test)" in capsys.readouterr().out
    assert not (tmp_path / "read_only_test.png").exists()


def test_ceilings_json_survives_a_cut_short_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    # Two lessons writing plots/ceilings.json at once left half a file, and the next read crashed.
    import json
    from common import timing
    monkeypatch.setattr(timing, "REPO", tmp_path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "ceilings.json").write_text('{"NVIDIA H100": {"copy GB/s": 30')
    timing._record_ceiling("copy GB/s", 3001.23)
    known = json.loads((tmp_path / "plots" / "ceilings.json").read_text())
    assert next(iter(known.values()))["copy GB/s"] == 3001.2
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["ceilings.json"]


@pytest.mark.parametrize("value", ['01"; touch {mark}; echo "', "$(touch {mark})", "`touch {mark}`"])
def test_make_variables_are_values_not_shell_commands(tmp_path, value):
    """make pastes $(LESSON) into the recipe's shell line; the recipes read "$$LESSON" from the
    environment instead, so a value with quotes or $(...) is an unknown lesson, not a command."""
    import shutil
    import subprocess
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    mark = tmp_path / "ran"
    done = subprocess.run(["make", "-s", "lesson", f"LESSON={value.format(mark=mark)}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert not mark.exists(), f"LESSON={value!r} ran a shell command"
    assert done.returncode != 0, "an unknown lesson must fail"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_a_computed_nan_is_not_called_never_written(dtype):
    """The poison is a NaN with a payload of its own; 0 / 0 stores the hardware's default NaN."""
    expected = torch.ones(100, dtype=torch.float64)
    out = poisoned_empty(100, dtype=dtype)
    out[:] = 1
    out[7] = torch.zeros((), dtype=dtype) / torch.zeros((), dtype=dtype)
    message = _diagnosis(out, expected)
    assert "computed NaN" in message and "never written" not in message, message
    tail = poisoned_empty(100, dtype=dtype)
    tail[:60] = 1
    message = _diagnosis(tail, expected)
    assert "never written" in message and "computed" not in message, message
    assert "never written" in _diagnosis(tail[10:], expected[10:])  # a view of the poisoned buffer too


def test_inf_is_named_an_overflow_not_a_scale_factor():
    expected = torch.full((100,), 2.0, dtype=torch.float64)
    out = poisoned_empty(100)
    out[:] = 2.0
    out[3:9] = float("inf")
    message = _diagnosis(out, expected)
    assert "overflow" in message and "scale factor" not in message, message


def test_a_cpu_run_points_to_the_lessons_gpu_results(tmp_path):
    from common.report import measured_on_gpu
    bar = dict(lesson="01_vector_add", name="x", value=0.978, bar=0.98, unit="x", higher_is_better=True,
               passed=False, kernel="triton add", shape="2^28", vs="baseline", baseline="torch.compile",
               gpu="NVIDIA H100 80GB HBM3", versions="torch 2.11", date="2026-12-05")
    (tmp_path / "results.json").write_text(__import__("json").dumps({"bars": [bar]}))
    text = measured_on_gpu("01_vector_add", tmp_path)
    assert "NVIDIA H100 80GB HBM3" in text and "triton add at 2^28" in text and "0.978 x" in text
    assert "MISS" in text and "PASS" not in text
    assert "no GPU results of 02_memory_and_dtypes are recorded" in measured_on_gpu("02_memory_and_dtypes", tmp_path)
    assert "are recorded yet" in measured_on_gpu("01_vector_add", tmp_path / "missing")


@pytest.mark.parametrize("capability,bf16,fp8", [((7, 5), False, False), ((8, 0), True, False),
                                                   ((8, 6), True, False), ((8, 9), True, True), ((9, 0), True, True)])
def test_capability_gates(monkeypatch, capability, bf16, fp8):
    """bf16 needs sm_80 (a T4's torch.cuda.is_bf16_supported() says yes through emulation), fp8 sm_89."""
    from common import device
    monkeypatch.setattr(device, "HAS_GPU", True)
    monkeypatch.setattr(device.torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(device.torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert (device.supports_bf16(), device.supports_fp8()) == (bf16, fp8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the auto choice is the GPU here")
@pytest.mark.parametrize("choice, interpreter", [("auto", True), ("1", True), ("0", False)])
def test_interpreter_switch(choice, interpreter):
    """COURSE_INTERPRETER picks where kernels run; 0 leaves TRITON_INTERPRET unset (compile-only)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COURSE_AUTO_INTERPRET")}
    probe = "import os, common; print(common.INTERPRETER, os.environ.get('TRITON_INTERPRET'))"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "COURSE_INTERPRETER": choice}, cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ([str(interpreter), "1"] if interpreter else ["False", "None"])
    bad = subprocess.run([sys.executable, "-c", probe], env={**env, "COURSE_INTERPRETER": "yes"}, cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "COURSE_INTERPRETER='yes'" in bad.stderr


# --------------------------------------------------------------------------- Nsight Compute's CSV

NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python3","h","transpose_v2_kernel","1","7","(128, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum","","1,024"
"0","123","python3","h","transpose_v2_kernel","1","7","(128, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum","","65,536"
"1","123","python3","h","void at::native::elementwise_kernel<...>","1","7","(128, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum","","0"
"2","123","python3","h","transpose_v2_kernel","1","7","(128, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum","","1"
==PROF== Disconnected
'''


def test_parse_ncu_csv_reads_counters_per_kernel():
    counters = common.parse_ncu_csv(NCU_CSV, ["transpose_v2_kernel"])
    assert counters["transpose_v2_kernel"] == {"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum": 1024.0,
                                               "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum": 65537.0}
    assert counters["void at::native::elementwise_kernel<...>"] == {
        "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum": 0.0}
    assert common.parse_ncu_csv("==PROF== no metrics\n") == {}
    assert common.parse_ncu_csv('"a","b"\n"1","2"\n') == {}  # no Kernel Name / Metric columns: nothing


def test_ncu_counters_says_why_not_without_ncu_or_gpu(monkeypatch):
    import common.ncu as ncu
    monkeypatch.setattr(ncu.shutil, "which", lambda name: None)
    counters, problem, _ = common.ncu_counters(["m"], "k", ["python3", "-c", "pass"])
    assert counters == {} and "not on PATH" in problem
    monkeypatch.setattr(ncu.shutil, "which", lambda name: "/usr/bin/ncu")
    monkeypatch.setattr(ncu, "HAS_GPU", False)
    assert "needs a CUDA GPU" in common.ncu_counters(["m"], "k", ["python3"])[1]
