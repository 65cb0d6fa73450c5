"""The grader: passed / failed (with a diagnosis) / TODO for every exercise.

Each tests/test_NN_topic.py declares `EXERCISES = [Exercise(...), ...]`: the function to grade,
the kernels it needs, and a check that raises CheckError when the answer is wrong. The same
declarations serve three masters:
  - pytest (`make test`, IMPL=solutions): every solution must pass;
  - `make check LESSON=NN`: a short report per exercise instead of pytest's output;
  - the grader's own tests: untouched stubs are TODO, known-wrong answers are rejected.

    python -m common.grading check 01 [--impl solutions]
    python -m common.grading progress [--impl solutions]
"""

import ast
import inspect
import itertools
import json
import os
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checks import CheckError, fresh_seed
from .device import banner
from .lessons import LESSONS, REPO, Lesson, find, load_module, require_written

IMPLS = ("exercises", "solutions")
GRADE_TIMEOUT_S = 900


@dataclass(frozen=True)
class Exercise:
    number: str  # "1.2", as numbered in the lesson's markdown
    name: str  # the function graded (the wrapper the learner completes or is given)
    check: Callable[[Callable], None]  # raises CheckError if the function is wrong
    kernels: tuple[str, ...] = ()  # @triton.jit functions whose untouched stub means TODO

    def __str__(self) -> str:
        return f"{self.number} {self.name}"


@dataclass
class Result:
    exercise: str
    status: str  # "passed" | "failed" | "todo" | "skipped" (the check needs a GPU)
    detail: str = ""


class Todo(Exception):
    """Raised by a stub that has not been filled in (exercises raise NotImplementedError)."""


class NeedsGPU(Exception):
    """Raised by a check that cannot judge the answer here (CUDA graphs, fp8 on the GPU): the
    exercise is reported as skipped with this reason, never as passed."""


def current_impl() -> str:
    impl = os.environ.get("IMPL") or "exercises"
    if impl not in IMPLS:
        raise SystemExit(f"IMPL must be one of {', '.join(IMPLS)}, got '{impl}'")
    return impl


def load_impl(stem: str, impl: str | None = None):
    """The module under test: exercises/<stem>.py (default) or solutions/<stem>.py (IMPL)."""
    impl = impl or current_impl()
    return load_module(REPO / impl / f"{stem}.py", name=f"{impl}_{stem}")


# --------------------------------------------------------------------------- one exercise

def _python_function(obj):
    """The Python function behind a @triton.jit kernel (GPU or interpreter) or a plain one."""
    return getattr(obj, "fn", obj)


def is_untouched_stub(obj) -> bool:
    """True if the body is only a docstring, comments and `pass` / `...` / raise NotImplementedError."""
    try:
        source = textwrap.dedent(inspect.getsource(_python_function(obj)))
    except (OSError, TypeError):
        return False
    body = ast.parse(source).body[0].body
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring or ...
        if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
            continue
        return False
    return True


def _short_error(err: BaseException, module_file: str | None) -> str:
    """The error's last line, and where in the learner's file it was raised."""
    lines = [f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"]
    if module_file:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == module_file]
        if frames:
            lines.append(f"raised at {Path(module_file).name}:{frames[-1].lineno}: {frames[-1].line}")
    return "\n".join(lines)


def grade(module, exercise: Exercise) -> Result:
    """Run one exercise's check against the function of that name in `module`."""
    label = str(exercise)
    fn = getattr(module, exercise.name, None)
    if fn is None:
        return Result(label, "failed", f"{module.__name__} has no function named '{exercise.name}'")
    stubs = [k for k in exercise.kernels if is_untouched_stub(getattr(module, k, None))]
    wrapper_stub = is_untouched_stub(fn)
    if wrapper_stub or (stubs and len(stubs) == len(exercise.kernels)):
        todo = " and ".join(stubs + [exercise.name] * wrapper_stub)
        return Result(label, "todo", f"not started: fill in {todo}")
    return grade_function(exercise, fn, label, getattr(module, "__file__", None))


def grade_function(exercise: Exercise, fn: Callable, label: str | None = None,
                   module_file: str | None = None) -> Result:
    label = label or str(exercise)
    fresh_seed()
    try:
        exercise.check(fn)
    except (NotImplementedError, Todo) as err:
        return Result(label, "todo", f"not finished: {err}" if str(err) else "not finished")
    except NeedsGPU as err:
        return Result(label, "skipped", str(err))
    except CheckError as err:
        return Result(label, "failed", str(err))
    except Exception as err:  # a learner's code may fail in any way; report it, do not crash
        return Result(label, "failed", _short_error(err, module_file))
    return Result(label, "passed")


# --------------------------------------------------------------------------- pytest helpers

def expect_pass(module, exercise: Exercise) -> None:
    """pytest: the solution (or the learner's answer) must pass; a stub is a skip for learners."""
    import pytest

    result = grade(module, exercise)
    if result.status == "passed":
        return
    if result.status == "todo" and current_impl() == "exercises":
        pytest.skip(f"TODO: {result.detail}")
    if result.status == "skipped":
        pytest.skip(result.detail)
    pytest.fail(f"{exercise} {result.status}: {result.detail}", pytrace=False)


def expect_rejected(exercise: Exercise, wrong_fn: Callable, hint: str) -> None:
    """pytest: a known-wrong answer must fail, and the diagnosis must name its cause (`hint`)."""
    import pytest

    result = grade_function(exercise, wrong_fn)
    if result.status == "skipped":
        pytest.skip(result.detail)
    if result.status != "failed":
        pytest.fail(f"the grader did not reject a known-wrong {exercise}: graded {result.status}",
                    pytrace=False)
    if hint.lower() not in result.detail.lower():
        pytest.fail(f"the grader rejected a known-wrong {exercise} but its diagnosis does not "
                    f"mention '{hint}':\n{result.detail}", pytrace=False)


def expect_stubs_todo(stem: str, exercises: list[Exercise]) -> None:
    """pytest: every untouched exercise stub is graded TODO (never passed, failed or a crash)."""
    import pytest

    path = REPO / "exercises" / f"{stem}.py"
    try:  # exit status 1: the file differs from the last commit (other codes: no git history)
        edited = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(path)], cwd=REPO,
                                capture_output=True).returncode == 1
    except FileNotFoundError:  # no git: assume the stubs are as shipped
        edited = False
    if edited:
        pytest.skip(f"{path.name} has your edits; this check needs the untouched stubs")
    module = load_impl(stem, "exercises")
    for exercise in exercises:
        result = grade(module, exercise)
        assert result.status == "todo", (
            f"untouched stub {exercise} was graded {result.status}, not TODO: {result.detail}")


def lesson_tests(stem: str, exercises: list[Exercise]):
    """The tests every tests/test_NN_topic.py starts with, as (impl fixture, test_exercise,
    test_untouched_stubs_are_todo). Bind them to those names at module level so pytest finds them:

        impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)
    """
    import pytest

    @pytest.fixture(scope="module", name="impl")
    def impl_fixture():
        return load_impl(stem)

    @pytest.mark.parametrize("exercise", exercises, ids=str)
    def test_exercise(impl, exercise):
        expect_pass(impl, exercise)

    def test_untouched_stubs_are_todo():
        expect_stubs_todo(stem, exercises)

    return impl_fixture, test_exercise, test_untouched_stubs_are_todo


_COPIES = itertools.count()


def solution_with(stem: str, **replace):
    """A private copy of solutions/<stem>.py with some of its functions or kernels replaced: a
    known-wrong answer that differs from the reference in exactly one place."""
    module = load_module(REPO / "solutions" / f"{stem}.py", name=f"known_wrong_{stem}_{next(_COPIES)}")
    for name, value in replace.items():
        setattr(module, name, value)
    return module


def with_flags(kernel, **flags):
    """Stands in for a kernel: kernel[grid](...) as a wrapper calls it, with extra arguments added
    (a known-wrong kernel's MISTAKE switch, say)."""
    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: kernel[grid](*args, **kwargs, **flags)
    return Launcher()


# --------------------------------------------------------------------------- reports

def _grade_lesson_in_child(lesson: Lesson, impl: str) -> list[Result]:
    """Grade in a child process, so a learner's kernel that crashes the interpreter (an
    out-of-bounds access can segfault it) or hangs costs one exercise, not the report."""
    cmd = [sys.executable, "-m", "common.grading", "_child", lesson.number, impl]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=GRADE_TIMEOUT_S)
        out, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, code = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), None
    results, started = [], None
    for line in out.splitlines():
        if line.startswith("@@start "):
            started = line.removeprefix("@@start ")
        elif line.startswith("@@result "):
            results.append(Result(**json.loads(line.removeprefix("@@result "))))
            started = None
    if code is None or code != 0 and started:
        why = f"timed out after {GRADE_TIMEOUT_S} s" if code is None else f"crashed the grader (exit {code})"
        results.append(Result(started or lesson.number, "failed",
                              f"{why}: often an unmasked load or store that ran far outside its "
                              f"tensor, or a loop that never ends"))
    elif code != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
        results.append(Result(lesson.number, "failed", f"could not grade this lesson:\n{tail}"))
    return results


def _child(number: str, impl: str) -> None:
    lesson = find(number)
    test_module = load_module(lesson.test, name=f"grading_{lesson.stem}")
    try:
        module = load_impl(lesson.stem, impl)
    except Exception as err:  # a syntax error in the learner's file, say
        module = None
        error = _short_error(err, str(REPO / impl / f"{lesson.stem}.py"))
    for exercise in test_module.EXERCISES:
        print(f"@@start {exercise}", flush=True)
        if module is None:
            result = Result(str(exercise), "failed", f"{impl}/{lesson.stem}.py does not import:\n{error}")
        else:
            result = grade(module, exercise)
        print("@@result " + json.dumps(result.__dict__), flush=True)


_MARK = {"passed": "passed", "failed": "FAILED", "todo": "TODO", "skipped": "skip"}


def check(number: str, impl: str) -> int:
    lesson = find(number)
    require_written(lesson)
    if not lesson.test.exists():
        print(f"Lesson {lesson.number} has no tests yet ({lesson.test.relative_to(REPO)}).")
        return 2
    print(f"Lesson {lesson.number}: {lesson.title}\ngrading {impl}/{lesson.stem}.py\n{banner()}\n")
    results = _grade_lesson_in_child(lesson, impl)
    width = max(len(r.exercise) for r in results)
    for r in results:
        first, *rest = (r.detail or "").splitlines() or [""]
        print(f"  {r.exercise:<{width}}  {_MARK[r.status]:<6}  {first}")
        for line in rest:
            print(f"  {'':<{width}}          {line}")
    counts = {s: sum(r.status == s for r in results) for s in _MARK}
    skipped = f", {counts['skipped']} skipped (they need a CUDA GPU)" if counts["skipped"] else ""
    print(f"\n{counts['passed']} of {len(results)} passed, {counts['failed']} failed, "
          f"{counts['todo']} TODO{skipped}.")
    if counts["todo"] and impl == "exercises":
        print(f"Hints for each exercise are in {lesson.markdown.relative_to(REPO)}.")
    return 0 if counts["passed"] + counts["skipped"] == len(results) and counts["passed"] else 1


def progress(impl: str) -> int:
    print(f"Progress: {impl}/  ({banner()})\n")
    print(f"  {'lesson':<34} {'passed':>6} {'failed':>6} {'TODO':>6}  exercises")
    for lesson in LESSONS:
        name = f"{lesson.number} {lesson.stem[3:]}"
        if not (lesson.written and lesson.test.exists()):
            print(f"  {name:<34} {'(not written yet)':>20}")
            continue
        results = _grade_lesson_in_child(lesson, impl)
        counts = [sum(r.status == s for r in results) for s in ("passed", "failed", "todo")]
        each = "  ".join(f"{r.exercise.split()[0]} {_MARK[r.status]}" for r in results)
        print(f"  {name:<34} {counts[0]:>6} {counts[1]:>6} {counts[2]:>6}  {each}", flush=True)
    print("\nDetails for one lesson: make check LESSON=NN")
    return 0


def main(argv: list[str]) -> int:
    impl = current_impl()
    if "--impl" in argv:
        i = argv.index("--impl")
        impl = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
        if impl not in IMPLS:
            print(f"--impl must be one of {', '.join(IMPLS)}, got '{impl}'", file=sys.stderr)
            return 2
    if argv[:1] == ["check"]:
        return check(argv[1] if len(argv) > 1 else "", impl)
    if argv[:1] == ["progress"]:
        return progress(impl)
    if argv[:1] == ["_child"]:
        _child(argv[1], argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: the tests raise common.grading.NeedsGPU and
    # Todo, and `except NeedsGPU` here would name a different class.
    from common.grading import main as _main

    sys.exit(_main(sys.argv[1:]))
