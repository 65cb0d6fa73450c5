"""The grading library: an exercise's declaration, its grade (passed / failed with a diagnosis /
TODO / skipped), and the helpers the tests use to reject known-wrong answers.

Each tests/test_NN_topic.py declares `EXERCISES = [Exercise(...), ...]`: the function to grade,
the kernels it needs, and a check that raises CheckError when the answer is wrong. The same
declarations serve three masters:
  - pytest (`make test`, IMPL=solutions): every solution must pass;
  - `make check LESSON=NN`: tests/grader.py, the command line, grades a learner's file and prints
    a short report per exercise (it loads tests/; this module never does);
  - the grader's own tests: untouched stubs are TODO, known-wrong answers are rejected.
"""

import ast
import contextlib
import functools
import inspect
import itertools
import os
import subprocess
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checks
from .checks import CheckError, fresh_seed
from .lessons import REPO, load_module

IMPLS = ("exercises", "solutions")


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


def _valid_impl(impl: str) -> bool:
    return impl in IMPLS or Path(impl).is_dir()


def current_impl() -> str:
    impl = os.environ.get("IMPL") or "exercises"
    if not _valid_impl(impl):
        raise SystemExit(f"IMPL must be one of {', '.join(IMPLS)} or a folder of exercise files, got '{impl}'")
    return impl if impl in IMPLS else str(Path(impl).resolve())


def impl_path(stem: str, impl: str) -> Path:
    """exercises/<stem>.py, solutions/<stem>.py, or <stem>.py in any folder (a learner's copy that
    a teacher grades: `make check LESSON=01 IMPL=/path/to/their/exercises`)."""
    return REPO / impl / f"{stem}.py" if impl in IMPLS else Path(impl).resolve() / f"{stem}.py"


def load_impl(stem: str, impl: str | None = None):
    """The module under test: exercises/<stem>.py (default), solutions/<stem>.py, or a folder's."""
    impl = impl or current_impl()
    name = impl if impl in IMPLS else "folder"
    return load_module(impl_path(stem, impl), name=f"{name}_{stem}")


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
    """The error's last line, and where in the learner's file it was raised: the deepest frame in
    that file along the exception chain (a kernel's error is re-raised by Triton from the launch;
    its cause holds the kernel's line)."""
    lines = [f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"]
    if module_file:
        frames = [f for cause in _chain(err) for f in traceback.extract_tb(cause.__traceback__)
                  if f.filename == module_file]
        where = _compiled_kernel_line(err, module_file)
        if where is None and frames:
            where = frames[-1].lineno, frames[-1].line
        if where is not None:
            lines.append(f"raised at {Path(module_file).name}:{where[0]}: {where[1]}")
    return "\n".join(lines)


def _compiled_kernel_line(err: BaseException, module_file: str) -> tuple[int, str] | None:
    """(line number, text) in module_file of the kernel line a GPU compile rejected. Triton's
    CompilationError is raised from the launch, and names its line relative to the kernel's
    source (line 1 is its `def`): found again in the file by that def line."""
    from triton.compiler.errors import CompilationError
    for cause in _chain(err):
        if isinstance(cause, CompilationError) and cause.src and getattr(cause.node, "lineno", None):
            def_line = cause.src.split("\n", 1)[0].strip()
            try:
                file_lines = Path(module_file).read_text().splitlines()
            except OSError:
                return None
            for i, line in enumerate(file_lines):
                if line.strip() == def_line and i + cause.node.lineno <= len(file_lines):
                    number = i + cause.node.lineno  # the def is line i + 1
                    return number, file_lines[number - 1].strip()
    return None


def _chain(err: BaseException | None):
    """err, then its cause (or context), and so on: what Triton re-raised and what it wrapped."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


@contextlib.contextmanager
def kernel_launches():
    """Records the source file of every Triton kernel launched inside the block (GPU JITFunction
    and the interpreter alike; autotuned kernels end in the same run method)."""
    from triton.runtime import interpreter, jit

    files: list[str] = []
    originals = {cls: cls.run for cls in (jit.JITFunction, interpreter.InterpretedFunction)}
    launch_tensors: list[tuple[str, int, int]] = []  # (argument, first byte, end) of the running launch

    def counted(run):
        def wrapper(self, *args, **kwargs):
            fn = getattr(self, "fn", None)
            code = getattr(fn, "__code__", None)
            files.append(code.co_filename if code else "")
            names = list(inspect.signature(fn).parameters) if fn is not None else []
            launch_tensors[:] = [(name, *_byte_range(arg)) for name, arg in zip(names, args)
                                 if isinstance(arg, torch.Tensor)]
            return run(self, *args, **kwargs)
        return wrapper

    masked_load = interpreter.InterpreterBuilder.create_masked_load

    def bounds_checked_load(builder, ptrs, mask, other, *rest):
        """The interpreter reads any address; a GPU reads garbage or faults. A lane that the mask
        lets through must point into one of the launch's tensors."""
        if launch_tensors:
            _check_load_bounds(ptrs, mask, launch_tensors)
        return masked_load(builder, ptrs, mask, other, *rest)

    for cls, run in originals.items():
        cls.run = counted(run)
    interpreter.InterpreterBuilder.create_masked_load = bounds_checked_load
    try:
        yield files
    finally:
        for cls, run in originals.items():
            cls.run = run
        interpreter.InterpreterBuilder.create_masked_load = masked_load


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _check_load_bounds(ptrs, mask, tensors) -> None:
    addresses = np.asarray(ptrs.data).astype(np.uint64)
    wanted = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    size = max(int(ptrs.get_element_ty().primitive_bitwidth) // 8, 1)
    inside = np.zeros(wanted.shape, dtype=bool)
    for _, lo, hi in tensors:
        inside |= (wanted >= lo) & (wanted + size <= hi)
    if inside.all():
        return
    outside = wanted[~inside]
    first = int(outside[0])
    name, lo, hi = min(tensors, key=lambda t: min(abs(first - t[1]), abs(first - t[2])))
    where = (f"{(first + size - hi) // size} element(s) past the end of '{name}'" if first >= hi
             else f"{(lo - first) // size} element(s) before the start of '{name}'")
    raise CheckError(f"a tl.load read outside every tensor of the launch: {len(outside)} active lane(s), the first "
                     f"{where}.\n  hint: the interpreter reads whatever lies there (a GPU reads garbage or "
                     f"faults); mask the load (mask=offsets < n_elements) so that lanes past the end read `other`")


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


def _show_first_call(fn: Callable) -> Callable:
    """`make try`: print the arguments of the check's first call of the learner's function."""
    @functools.wraps(fn)
    def first_call(*args, **kwargs):
        if not checks._SHOWN.get("call"):
            checks._SHOWN["call"] = True
            print(f"  input (the check's first call of {getattr(fn, '__name__', 'the function')}):")
            for i, value in enumerate(args):
                print(f"    arg {i}: {checks.describe(value)}")
            for key, value in kwargs.items():
                print(f"    {key}: {checks.describe(value)}")
        return fn(*args, **kwargs)
    return first_call


def _tensors_in(name: str, value):
    """(label, tensor) for a tensor argument and for the tensors of a list or tuple argument."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                yield f"{name}[{i}]", item


def _same(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.shape != after.shape or before.dtype != after.dtype:
        return False
    if before.dtype.is_floating_point:
        return bool(((before == after) | (before.isnan() & after.isnan())).all())
    return torch.equal(before, after)


def _watched(fn: Callable, exercise: Exercise) -> Callable:
    """The learner's function as the check calls it, with two checks around each call: its
    inputs' float dtypes are recorded (assert_close checks the output's dtype against them), and
    an input it changed fails the exercise (a right answer written over x passes every comparison
    made after it, against x's new values)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs).arguments if signature else None
        except TypeError:
            bound = None
        named = bound if bound is not None else {**{f"argument {i}": a for i, a in enumerate(args)}, **kwargs}
        inputs = [(label, t) for key, value in named.items() for label, t in _tensors_in(key, value)
                  if key != "out" and not hasattr(t, "_course_guard")]
        checks.GRADED_CALL["float_dtypes"] = {t.dtype for _, t in inputs if t.dtype.is_floating_point}
        with torch.no_grad():
            before = [(label, t, t.detach().clone()) for label, t in inputs]
        result = fn(*args, **kwargs)
        with torch.no_grad():
            for label, t, copy in before:
                if not _same(copy, t.detach()):
                    raise CheckError(f"{exercise.name} changed its input '{label}': an answer must leave "
                                     f"its inputs as they were.\n  hint: store into the output's pointer, "
                                     f"not the input's (is an out_ptr argument swapped with x_ptr?)")
        return result
    return call


def grade_function(exercise: Exercise, fn: Callable, label: str | None = None,
                   module_file: str | None = None) -> Result:
    label = label or str(exercise)
    fresh_seed()
    fn = _watched(fn, exercise)
    if checks.TRY_MODE:
        fn = _show_first_call(fn)
    try:
        with kernel_launches() as launched:
            exercise.check(fn)
    except (NotImplementedError, Todo) as err:
        return Result(label, "todo", f"not finished: {err}" if str(err) else "not finished")
    except NeedsGPU as err:
        return Result(label, "skipped", str(err))
    except CheckError as err:
        return Result(label, "failed", str(err))
    except SystemExit as err:  # sys.exit() in the learner's code would end the grading unseen
        return Result(label, "failed", f"the code called sys.exit({err.code!r}): an exercise must return its "
                      f"result; the grader stops nothing else")
    except Exception as err:  # a learner's code may fail in any way; report it, do not crash
        check_error = next((e for e in _chain(err) if isinstance(e, CheckError)), None)  # wrapped by Triton
        return Result(label, "failed", str(check_error) if check_error else _short_error(err, module_file))
    finally:
        checks.GRADED_CALL.clear()
    if exercise.kernels and module_file and module_file not in launched:
        return Result(label, "failed", f"the answers are right but no Triton kernel of {Path(module_file).name} "
                      f"was launched: {' / '.join(exercise.kernels)} must do the work (PyTorch alone does "
                      f"not count)")
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
