"""The grader's process handling, on lesson 01's solutions with one thing broken in a copy: an
exercise that exits, kills its process, never ends, prints forged results or computes its answer
without a kernel is failed with that diagnosis, and the exercises after it are still graded."""

import os
import subprocess
import sys

import pytest

from common.lessons import REPO

SOLUTION = (REPO / "solutions" / "01_vector_add.py").read_text()


def _grade(tmp_path, patch: str, timeout_s: float = 60, **env):
    folder = tmp_path / "learner"
    folder.mkdir()
    (folder / "01_vector_add.py").write_text(SOLUTION + "\n\nimport os, sys\n" + patch)
    proc = subprocess.run([sys.executable, "tests/grader.py", "check", "01", "--impl", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COURSE_TIMEOUT": str(timeout_s), **env})
    lines = {line.split(" ... ")[0].strip(): line.split(" ... ")[1] for line in proc.stdout.splitlines()
             if " ... " in line}
    return proc, lines


def _clamp_and_strided_still_pass(lines):
    assert lines["1.2 clamp"].startswith("passed") and lines["1.3 add_strided"].startswith("passed"), lines


def test_sys_exit_in_a_wrapper_fails_that_exercise_only(tmp_path):
    proc, lines = _grade(tmp_path, "def axpy(a, x, y, out=None):\n    sys.exit(0)\n")
    assert lines["1.1 axpy"].startswith("FAILED") and "sys.exit(0)" in lines["1.1 axpy"]
    _clamp_and_strided_still_pass(lines)
    assert proc.returncode == 1 and "2 of 3 passed, 1 failed" in proc.stdout


def test_os_exit_is_a_failed_exercise_not_a_shorter_report(tmp_path):
    proc, lines = _grade(tmp_path, "def axpy(a, x, y, out=None):\n    os._exit(0)\n")
    assert lines["1.1 axpy"].startswith("FAILED") and "exited during this exercise" in lines["1.1 axpy"]
    _clamp_and_strided_still_pass(lines)
    assert proc.returncode == 1 and "2 of 3 passed, 1 failed" in proc.stdout


def test_an_endless_exercise_times_out_and_the_rest_are_graded(tmp_path):
    proc, lines = _grade(tmp_path, "def clamp(x, lo, hi, out=None):\n    while True:\n        pass\n",
                         timeout_s=20)
    assert lines["1.2 clamp"].startswith("FAILED") and "still running after 20 s" in lines["1.2 clamp"]
    assert lines["1.1 axpy"].startswith("passed") and lines["1.3 add_strided"].startswith("passed"), lines


def test_printed_results_cannot_forge_a_pass(tmp_path):
    forged = ('{"result": {"exercise": "1.1 axpy", "status": "passed", "detail": ""}}')
    patch = (f"_axpy = axpy\ndef axpy(a, x, y, out=None):\n    print({forged!r}, flush=True)\n"
             f"    print('@@result ' + {forged!r}, flush=True)\n    return _axpy(a + 1.0, x, y, out)\n")
    proc, _ = _grade(tmp_path, patch)
    assert "2 of 3 passed, 1 failed" in proc.stdout, proc.stdout


def test_plain_pytorch_without_a_kernel_fails(tmp_path):
    patch = "def axpy(a, x, y, out=None):\n    return a * x + y if out is None else out.copy_(a * x + y)\n"
    proc, lines = _grade(tmp_path, patch)
    assert lines["1.1 axpy"].startswith("FAILED") and "no Triton kernel" in lines["1.1 axpy"], lines


def test_a_bad_course_seed_is_named(tmp_path):
    proc, _ = _grade(tmp_path, "", COURSE_SEED="abc")
    assert proc.returncode != 0 and "COURSE_SEED must be a whole number" in proc.stderr
    assert "crashed" not in proc.stdout


def test_try_shows_the_first_input_and_the_first_difference(tmp_path):
    folder = tmp_path / "learner"
    folder.mkdir()
    wrong = "_clamp = clamp\ndef clamp(x, lo, hi, out=None):\n    return _clamp(x, lo, hi + 1.0, out)\n"
    (folder / "01_vector_add.py").write_text(SOLUTION + "\n\n" + wrong)
    proc = subprocess.run([sys.executable, "tests/grader.py", "try", "1.2", "--impl", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "input (the check's first call of clamp)" in proc.stdout and "first difference at index" in proc.stdout
    assert "1.1" not in proc.stdout.split("input")[0], "try grades the one exercise named"


def test_every_exercise_has_hints_and_hint_gives_one_more_each_time(tmp_path, monkeypatch, capsys):

    import grader
    from common.lessons import LESSONS, load_module

    for lesson in LESSONS:
        if lesson.test.exists():
            for exercise in load_module(lesson.test, name=f"hints_{lesson.stem}").EXERCISES:
                _, hints = grader.exercise_hints(lesson, exercise.number)
                assert hints, f"{exercise} has no <details> hints under '### {exercise.number}' in {lesson.markdown.name}"
    monkeypatch.setattr(grader, "HINTS_SEEN", tmp_path / "seen.json")
    assert grader.hint("1.2", None) == 0 and "(1 of 3 hints" in capsys.readouterr().out
    assert grader.hint("1.2", None) == 0 and "(2 of 3 hints" in capsys.readouterr().out
    assert grader.hint("1.2", "3") == 0 and "that was the last one" in capsys.readouterr().out
    assert grader.hint("1.2", "zero") == 2 and "LEVEL must be a hint number" in capsys.readouterr().err


def test_patching_torch_to_say_close_is_caught(tmp_path):
    patch = ("import torch\n"
             "torch.isclose = lambda a, b, **k: torch.ones(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)\n"
             "_axpy = axpy\ndef axpy(a, x, y, out=None):\n    return _axpy(a + 1.0, x, y, out)\n")
    proc, lines = _grade(tmp_path, patch)
    assert lines["1.1 axpy"].startswith("FAILED") and "replaced torch.isclose" in lines["1.1 axpy"], lines
    assert proc.returncode == 1


def test_patching_the_grader_is_caught(tmp_path):
    patch = ("import common.grading as g\n"
             "g.grade_function = lambda exercise, fn, label=None, module_file=None: g.Result(label, 'passed')\n"
             "_axpy = axpy\ndef axpy(a, x, y, out=None):\n    return _axpy(a + 1.0, x, y, out)\n")
    proc, lines = _grade(tmp_path, patch)
    assert lines["1.1 axpy"].startswith("FAILED"), lines
    assert "replaced common.grading.grade_function" in lines["1.1 axpy"], lines


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSEGV"])
def test_a_killed_or_crashed_exercise_fails_alone(tmp_path, signal_name):
    """A segfault or a SIGKILL in one exercise: that one fails with the signal named, a fresh
    child grades the rest."""
    patch = f"import signal\ndef axpy(a, x, y, out=None):\n    os.kill(os.getpid(), signal.{signal_name})\n"
    proc, lines = _grade(tmp_path, patch)
    assert lines["1.1 axpy"].startswith("FAILED") and f"crashed the grader process ({signal_name})" in lines["1.1 axpy"]
    _clamp_and_strided_still_pass(lines)
    assert proc.returncode == 1 and "2 of 3 passed, 1 failed" in proc.stdout


def test_a_wrong_output_dtype_fails(tmp_path):
    """An fp16 answer for an fp32 reference used to pass (assert_close compared values only)."""
    patch = "_axpy = axpy\ndef axpy(a, x, y, out=None):\n    return _axpy(a, x, y, out) if out is not None else _axpy(a, x, y).half()\n"
    proc, lines = _grade(tmp_path, patch)
    assert lines["1.1 axpy"].startswith("FAILED") and "dtype float16, expected float32" in lines["1.1 axpy"], lines


def test_an_answer_that_changes_its_input_fails(tmp_path):
    patch = "_axpy = axpy\ndef axpy(a, x, y, out=None):\n    result = _axpy(a, x, y, out)\n    x.zero_()\n    return result\n"
    proc, lines = _grade(tmp_path, patch)
    assert lines["1.1 axpy"].startswith("FAILED") and "changed its input 'x'" in lines["1.1 axpy"], lines


def _start_endless(tmp_path):
    """The grader on a copy whose clamp never ends, returned once it has printed clamp's line."""
    import time
    folder = tmp_path / "learner"
    folder.mkdir()
    (folder / "01_vector_add.py").write_text(SOLUTION + "\n\ndef clamp(x, lo, hi, out=None):\n    while True:\n        pass\n")
    proc = subprocess.Popen([sys.executable, "tests/grader.py", "check", "01", "--impl", str(folder)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COURSE_TIMEOUT": "120"})
    shown, start = "", time.monotonic()
    while "1.2 clamp" not in shown and time.monotonic() - start < 120:
        char = proc.stdout.read(1)  # the exercise's line has no newline until its result
        if not char:
            break
        shown += char
    assert "1.2 clamp" in shown, shown
    time.sleep(2)  # inside the endless loop
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the grader runs each exercise in a child process"
    return proc, shown, [int(pid) for pid in children]


def _gone(pids, seconds=10):
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_ends_with_one_clean_line_and_no_child_left(tmp_path):
    import signal
    proc, _, children = _start_endless(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err + out, err
    assert "interrupted: grading stopped; nothing in your files was changed" in err
    assert _gone(children), "the exercise's child process outlived the interrupted grader"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_killing_the_grader_kills_the_exercise_it_runs(tmp_path):
    import signal
    proc, _, children = _start_endless(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _gone(children), "a child left spinning after its grader was killed"


def test_an_error_inside_a_kernel_points_at_the_kernel_line(tmp_path):
    """Not the launch line: the line of the learner's kernel that failed, with its text."""
    patch = ("import triton\nimport triton.language as tl\n\n@triton.jit\n"
             "def broken_axpy_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK_SIZE: tl.constexpr):\n"
             "    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)\n"
             "    x = tl.load(x_ptr + offsets + tl.arange(0, 16), mask=offsets < n)  # lengths 1024 and 16\n"
             "    tl.store(out_ptr + offsets, a * x, mask=offsets < n)\n\n"
             "def axpy(a, x, y, out=None):\n    out = torch.empty_like(x) if out is None else out\n"
             "    broken_axpy_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, out, a, x.numel(), BLOCK_SIZE=1024)\n"
             "    return out\n")
    proc, lines = _grade(tmp_path, patch)
    assert lines["1.1 axpy"].startswith("FAILED"), lines
    where = next(line for line in proc.stdout.splitlines() if "raised at" in line)
    assert "01_vector_add.py:" in where and "tl.load(x_ptr + offsets + tl.arange(0, 16)" in where, proc.stdout
    _clamp_and_strided_still_pass(lines)


def test_a_gpu_compile_error_points_at_the_kernel_line(tmp_path):
    """On a GPU a kernel's error is Triton's CompilationError raised at the launch, its line counted
    from the kernel's def: the report names the file's line. Built by hand here (no GPU compile)."""
    import ast
    from triton.compiler.errors import CompilationError
    from common.grading import _short_error
    source = ("import triton\n\n\n@triton.jit\ndef k(x_ptr, BLOCK: tl.constexpr):\n"
              "    offs = tl.arange(0, BLOCK)\n    x = tl.load(x_ptr + offs + tl.arange(0, 16))\n\n\n"
              "def launch(x):\n    k[(1,)](x, BLOCK=1024)\n")
    path = tmp_path / "01_vector_add.py"
    path.write_text(source)
    kernel_src = "def k(x_ptr, BLOCK: tl.constexpr):\n    offs = tl.arange(0, BLOCK)\n" \
                 "    x = tl.load(x_ptr + offs + tl.arange(0, 16))\n"
    node = ast.parse("x = 1").body[0]
    node.lineno, node.col_offset = 3, 8  # the load, the kernel's third line
    err = CompilationError(kernel_src, node, "incompatible shapes 1024 and 16")
    report = _short_error(err, str(path))
    assert "raised at 01_vector_add.py:7: x = tl.load(x_ptr + offs + tl.arange(0, 16))" in report, report
