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
