"""The grader's command line: passed / failed (with a diagnosis) / TODO for every exercise.

Each tests/test_NN_topic.py declares `EXERCISES = [Exercise(...), ...]` with the library in
common/grading.py (Exercise, grade, the known-wrong helpers). This runner loads those
declarations, grades a learner's file in child processes and prints the reports; it lives in
tests/ because it reads tests/, so the imports go one way: common <- tests/test_NN <- tests/grader.py
(nothing in common imports tests/). The Makefile's check, progress, try, hint, list and sanitize
targets call it:

    python tests/grader.py check 01 [--impl solutions | --impl FOLDER]
    python tests/grader.py progress [--impl solutions]
    python tests/grader.py try 1.2      one exercise: its first input, expected and received output
    python tests/grader.py hint 1.2 [N] the next hint (or hints 1..N) from the lesson's markdown
    python tests/grader.py list         every exercise
    python tests/grader.py sanitize 01  check, under compute-sanitizer's memcheck (GPU)
"""

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: F401  first: picks the GPU, or Triton's CPU interpreter without one

import torch

from common import checks, grading
from common.checks import seed_from_env
from common.device import banner
from common.grading import IMPLS, Result, _short_error, _valid_impl, current_impl, grade, impl_path, load_impl
from common.lessons import LESSONS, REPO, Lesson, find, load_module, require_written

GRADER = Path(__file__).resolve()
# One exercise's check, in seconds; the slowest solution takes about 20 s in the CPU interpreter.
# COURSE_TIMEOUT=300 make check ... gives a slow machine more.
DEFAULT_EXERCISE_TIMEOUT_S = 60
IMPORT_TIMEOUT_S = 120  # the grading child imports torch, triton and the learner's file first

# --------------------------------------------------------------------------- reports

def exercise_timeout() -> float:
    value = os.environ.get("COURSE_TIMEOUT") or str(DEFAULT_EXERCISE_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SystemExit(f"COURSE_TIMEOUT must be a number of seconds per exercise, got '{value}'")
    return seconds


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _why_child_ended(code: int | None, timeout: float) -> str:
    if code is None:
        return (f"still running after {timeout:g} s (COURSE_TIMEOUT={timeout:g}): a loop that never ends, or a grid "
                f"far larger than the tensor; the grader stopped it")
    if code < 0:
        return (f"crashed the grader process ({_signal_name(code)}): often an unmasked load or store that ran far "
                f"outside its tensor")
    return (f"the grader process exited during this exercise (exit status {code}): sys.exit() or os._exit() in "
            f"your code ends the grading; the exercise did not report a result")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
    proc.wait()


def _grade_lesson_in_child(lesson: Lesson, impl: str, on_start=None, on_result=None,
                           show_output: bool = True, only: str | None = None, env: dict | None = None) -> list[Result]:
    """Grade in child processes, so that a learner's kernel that hangs or crashes the interpreter
    (an out-of-bounds access can segfault it) costs one exercise, not the report: each exercise
    has COURSE_TIMEOUT seconds; after a crash or a timeout a fresh child grades the rest. Results
    come back through a pipe the parent opened (not stdout: a print cannot forge one), and an
    exercise that reports nothing is failed, never dropped."""
    timeout = exercise_timeout()
    labels: list[str] | None = None
    results: list[Result] = []
    while labels is None or len(results) < len(labels):
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, str(GRADER), "_child", lesson.number, impl, str(write_fd),
               str(len(results)), str(os.getpid())] + ([only] if only else [])
        output = None if show_output else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, cwd=REPO, pass_fds=(write_fd,), start_new_session=True,
                                stdout=output, stderr=output, env={**os.environ, **(env or {})})
        os.close(write_fd)
        started, progressed, buffer = None, False, b""
        deadline = time.monotonic() + IMPORT_TIMEOUT_S + timeout
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as pipe:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    ready, _, _ = select.select([pipe], [], [], min(left, 1.0))
                    if not ready:
                        continue
                    chunk = pipe.read(65536)
                    if not chunk:
                        break  # the child closed the pipe: it ended
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        record = json.loads(line)
                        if "exercises" in record:
                            labels = record["exercises"]
                        elif "start" in record:
                            started, progressed = record["start"], True
                            deadline = time.monotonic() + timeout
                            if on_start:
                                on_start(started)
                        elif "result" in record:
                            result = Result(**record["result"])
                            results.append(result)
                            started = None
                            if on_result:
                                on_result(result)
        finally:
            _kill(proc)
        code = proc.returncode if time.monotonic() < deadline else None
        if labels is not None and started is None and not progressed:  # it never reached an exercise
            why = _why_child_ended(code, IMPORT_TIMEOUT_S + timeout)
            for label in labels[len(results):]:
                results.append(Result(label, "failed", f"while importing {impl}/{lesson.stem}.py: {why}"))
                if on_result:
                    on_result(results[-1])
            return results
        if labels is None:  # the child ended before it could list the exercises
            why = f"exit status {code}" if code is not None else f"no answer in {IMPORT_TIMEOUT_S + timeout:g} s"
            results.append(Result(lesson.number, "failed", f"could not grade this lesson ({why}); run "
                                  f"`python tests/grader.py _child {lesson.number} {impl}` to see the error"))
            if on_result:
                on_result(results[-1])
            return results
        if len(results) < len(labels):  # the child stopped inside an exercise (or before the next)
            result = Result(started or labels[len(results)], "failed", _why_child_ended(code, timeout))
            results.append(result)
            if on_result:
                on_result(result)
    return results


def _exit_with_parent(parent: int) -> None:
    """The grading child ends when the process that started it is gone (killed, say)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


def _child(number: str, impl: str, fd: str | None = None, first: str = "0", parent: str | None = None,
           only: str | None = None) -> None:
    pipe = os.fdopen(int(fd), "w", buffering=1) if fd else sys.stdout
    if parent:
        _exit_with_parent(int(parent))

    def send(record: dict) -> None:
        pipe.write(json.dumps(record) + "\n")
        pipe.flush()

    lesson = find(number)
    test_module = load_module(lesson.test, name=f"grading_{lesson.stem}")
    exercises = [e for e in test_module.EXERCISES if only is None or e.number == only]
    send({"exercises": [str(e) for e in exercises]})
    trusted, grade_one, result_of = _trusted(test_module), grade, Result  # before the learner's code runs
    try:
        module = load_impl(lesson.stem, impl)
    except Exception as err:  # a syntax error in the learner's file, say
        module = None
        error = _short_error(err, str(impl_path(lesson.stem, impl)))
    for exercise in exercises[int(first):]:
        send({"start": str(exercise)})
        if module is None:
            result = result_of(str(exercise), "failed", f"{impl}/{lesson.stem}.py does not import:\n{error}")
        else:
            result = grade_one(module, exercise)
        replaced = [name for name, (owner, attr, obj) in trusted.items() if getattr(owner, attr, None) is not obj]
        if replaced:
            result = result_of(str(exercise), "failed", f"the code replaced {', '.join(replaced)}: an answer "
                               f"that patches torch or the grader is not graded")
        send({"result": dict(exercise=result.exercise, status=result.status, detail=result.detail)})


def _trusted(test_module) -> dict:
    """What a check's verdict rests on, by name: (owner, attribute, the object it holds now). The
    grading child takes this before it imports the learner's file and fails any exercise graded
    after one of them was replaced (torch.isclose patched to say True, a grade_function that
    returns "passed")."""
    objects = {f"torch.{name}": (torch, name) for name in ("isclose", "allclose", "equal", "isnan", "isfinite")}
    objects |= {f"torch.Tensor.{name}": (torch.Tensor, name) for name in ("all", "any", "__eq__", "__ne__", "sum")}
    objects |= {f"common.checks.{name}": (checks, name) for name in (
        "assert_close", "diagnose", "check_guards", "CheckError", "_allowed_dtypes", "_hints")}
    objects |= {f"common.grading.{name}": (grading, name) for name in (
        "grade", "grade_function", "_watched", "kernel_launches", "Result", "Exercise")}
    objects |= {f"{test_module.__name__}.{name}": (test_module, name) for name in dir(test_module)
                if name.startswith("check_") or name in ("assert_close", "EXERCISES")}
    objects["json.dumps"] = (json, "dumps")
    return {name: (owner, attr, getattr(owner, attr)) for name, (owner, attr) in objects.items()
            if hasattr(owner, attr)}


_MARK = {"passed": "passed", "failed": "FAILED", "todo": "TODO", "skipped": "skip"}


def check(number: str, impl: str) -> int:
    lesson = find(number)
    require_written(lesson)
    if not lesson.test.exists():
        print(f"Lesson {lesson.number} has no tests yet ({lesson.test.relative_to(REPO)}).")
        return 2
    print(f"Lesson {lesson.number}: {lesson.title}\ngrading {impl}/{lesson.stem}.py\n{banner()}\n", flush=True)

    def started(label: str) -> None:
        print(f"  {label} ... ", end="", flush=True)  # the verdict ends the line (after any prints of yours)

    def finished(r: Result) -> None:
        first, *rest = (r.detail or "").splitlines() or [""]
        print(f"{_MARK[r.status]}  {first}".rstrip())
        for line in rest:
            print(f"      {line}")
        sys.stdout.flush()

    results = _grade_lesson_in_child(lesson, impl, on_start=started, on_result=finished)
    counts = {s: sum(r.status == s for r in results) for s in _MARK}
    skipped = f", {counts['skipped']} skipped (they need a CUDA GPU)" if counts["skipped"] else ""
    print(f"\n{counts['passed']} of {len(results)} passed, {counts['failed']} failed, "
          f"{counts['todo']} TODO{skipped}.")
    if counts["todo"] and impl != "solutions":
        print(f"Hints for each exercise are in {' and '.join(str(md.relative_to(REPO)) for md in lesson.markdowns)}.")
    return 0 if counts["passed"] + counts["skipped"] == len(results) and counts["passed"] else 1


def _exercise_lesson(ex: str) -> tuple[Lesson, str]:
    """'1.2' -> (lesson 01, '1.2'); exit 2 with a line that says what to type otherwise."""
    number, _, part = (ex or "").strip().partition(".")
    if not (number.isdigit() and part.isdigit()):
        print(f"EX must name one exercise as lesson.number, for example EX=1.2 (got '{ex}'); "
              f"`make list` shows them all", file=sys.stderr)
        raise SystemExit(2)
    return find(number), f"{int(number)}.{int(part)}"


def try_one(ex: str, impl: str) -> int:
    """Grade one exercise and show its first input, the expected and the received output, and the
    first element that differs."""
    lesson, number = _exercise_lesson(ex)
    require_written(lesson)
    print(f"Trying {number} in {impl}/{lesson.stem}.py  ({banner()})\n", flush=True)
    results = _grade_lesson_in_child(lesson, impl, only=number, env={"COURSE_TRY": "1"})
    if not results:
        print(f"Lesson {lesson.number} has no exercise {number}; `make list` shows them all", file=sys.stderr)
        return 2
    for r in results:
        print(f"\n{r.exercise}: {_MARK[r.status]}" + (f"\n{r.detail}" if r.detail else ""))
    return 0 if all(r.status in ("passed", "skipped") for r in results) else 1


HINTS_SEEN = REPO / ".hints_seen.json"  # how many hints of each exercise were shown; ignored by git


def exercise_markdown(lesson: Lesson, number: str) -> Path | None:
    """The markdown (the lesson's, or one of its parts') with the heading `### number`."""
    import re

    for md in lesson.markdowns:
        if re.search(rf"^### {re.escape(number)}\b", md.read_text(), re.M):
            return md
    return None


def exercise_hints(lesson: Lesson, number: str) -> tuple[str, list[str]]:
    """The heading and the <details> hint blocks of exercise `number` in the lesson's markdown
    (or in the markdown of the lesson part that teaches it)."""
    import re

    md = exercise_markdown(lesson, number)
    if md is None:
        return "", []
    match = re.search(rf"^### {re.escape(number)}\b([^\n]*)$(.*?)(?=^##|\Z)", md.read_text(), re.M | re.S)
    blocks = re.findall(r"<details><summary>(.*?)</summary>(.*?)</details>", match.group(2), re.S)
    return f"{number}{match.group(1)}", [f"{title.strip()}:\n{body.strip()}" for title, body in blocks]


def hint(ex: str, level: str | None) -> int:
    """Print the hints of one exercise up to the next unseen one (or up to LEVEL)."""
    lesson, number = _exercise_lesson(ex)
    heading, hints = exercise_hints(lesson, number)
    if not hints:
        print(f"No hints for {number} in {' or '.join(str(md.relative_to(REPO)) for md in lesson.markdowns)}", file=sys.stderr)
        return 2
    try:
        seen = json.loads(HINTS_SEEN.read_text())
    except (OSError, ValueError):
        seen = {}
    if level:
        if not level.isdigit() or int(level) < 1:
            print(f"LEVEL must be a hint number from 1 to {len(hints)}, got '{level}'", file=sys.stderr)
            return 2
        upto = min(int(level), len(hints))
    else:
        upto = min(seen.get(number, 0) + 1, len(hints))
    print(f"Exercise {heading.strip()}  ({exercise_markdown(lesson, number).relative_to(REPO)})\n")
    print("\n\n".join(hints[:upto]))
    more = len(hints) - upto
    print(f"\n({upto} of {len(hints)} hints; " + (f"`make hint EX={number}` again for the next)" if more
                                                    else "that was the last one)"))
    seen[number] = max(seen.get(number, 0), upto)
    with contextlib.suppress(OSError):
        HINTS_SEEN.write_text(json.dumps(seen))
    return 0


def list_exercises() -> int:
    for lesson in LESSONS:
        if not lesson.markdowns:
            continue
        import re
        found = [f for md in lesson.markdowns
                 for f in re.findall(rf"^### ({int(lesson.number)}\.\d+)\s+(.*)$", md.read_text(), re.M)]
        print(f"{lesson.number} {lesson.title}")
        for number, title in found:
            print(f"    {number:<6} {title}")
    print("\nmake try EX=1.2 (one exercise, its first input and output) | make hint EX=1.2 | make check LESSON=01")
    return 0


CACHE = REPO / ".grading_cache.json"  # ignored by git; `make clean` removes it


def _cache_key(lesson: Lesson, impl: str) -> str:
    """What a lesson's grades depend on: the graded file, its tests, the lesson script, the
    grader (common/), the versions and the device. Same bytes, same grades."""
    import hashlib

    import torch
    import triton

    digest = hashlib.sha256(f"{impl}|{torch.__version__}|{triton.__version__}|{banner()}".encode())
    files = [impl_path(lesson.stem, impl), lesson.test, lesson.script, GRADER,
             *sorted((REPO / "common").glob("*.py"))]
    for path in files:
        digest.update(path.read_bytes() if path.exists() else b"missing")
    return digest.hexdigest()


def _cached_grades(lesson: Lesson, impl: str) -> tuple[list[Result], bool]:
    """A lesson's results, graded again only when one of the files they depend on changed
    (`make progress` for a class: 2 minutes the first time on a CPU, seconds after)."""
    try:
        cache = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    key = _cache_key(lesson, impl)
    entry = cache.get(f"{impl}:{lesson.number}")
    if entry and entry.get("key") == key:
        return [Result(**r) for r in entry["results"]], True
    results = _grade_lesson_in_child(lesson, impl, show_output=False)
    cache[f"{impl}:{lesson.number}"] = {"key": key, "results": [r.__dict__ for r in results]}
    try:
        tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, CACHE)
    except OSError:  # a read-only checkout: grade every time
        pass
    return results, False


def progress(impl: str) -> int:
    print(f"Progress: {impl}/  ({banner()})\n")
    print(f"  {'lesson':<34} {'passed':>6} {'failed':>6} {'TODO':>6}  exercises")
    for lesson in LESSONS:
        name = f"{lesson.number} {lesson.stem[3:]}"
        if not (lesson.written and lesson.test.exists()):
            print(f"  {name:<34} {'(not written yet)':>20}")
            continue
        results, cached = _cached_grades(lesson, impl)
        counts = [sum(r.status == s for r in results) for s in ("passed", "failed", "todo")]
        each = "  ".join(f"{r.exercise.split()[0]} {_MARK[r.status]}" for r in results)
        print(f"  {name:<34} {counts[0]:>6} {counts[1]:>6} {counts[2]:>6}  {each}", flush=True)
    print("\nDetails for one lesson: make check LESSON=NN (results are re-graded only for files that changed)")
    return 0


# Where compute-sanitizer lives when it is not on PATH: a CUDA toolkit, or the pip package
# nvidia-cuda-sanitizer-api-cu12/cu13 (found next to the other nvidia wheels torch installs).
_SANITIZER_PLACES = ("/usr/local/cuda/bin/compute-sanitizer", "/opt/cuda/bin/compute-sanitizer")


def find_compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    places = list(_SANITIZER_PLACES)
    for site in map(Path, sys.path):
        places += [str(p) for p in (site / "nvidia").glob("cu*/bin/compute-sanitizer")]
        places += [str(p) for p in (site / "nvidia").glob("cuda_sanitizer_api/compute-sanitizer/compute-sanitizer")]
    return next((p for p in places if os.access(p, os.X_OK)), None)


def sanitize(number: str, impl: str) -> int:
    """make sanitize LESSON=NN: `check` under compute-sanitizer's memcheck, which reports every
    read or write outside an allocation on the GPU (the interpreter's load-bounds check does the
    same on CPU). PyTorch's caching allocator hands out pieces of larger blocks, so a read past a
    tensor's end would land in memory the process owns and go unseen:
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation. Exit status: the
    grader's, or 3 when memcheck found an error (its report names the kernel)."""
    lesson = find(number)
    require_written(lesson)
    if not torch.cuda.is_available():
        print("make sanitize runs the exercises on a CUDA GPU under compute-sanitizer. Without one, make check "
              "already runs them in Triton's interpreter, which fails any tl.load past the end of a tensor.")
        return 2
    tool = find_compute_sanitizer()
    if tool is None:
        print("make sanitize needs compute-sanitizer, which comes with the CUDA toolkit (or pip install "
              "nvidia-cuda-sanitizer-api-cu12); it is not on PATH nor in " + ", ".join(_SANITIZER_PLACES))
        return 2
    # memcheck makes every launch 10-100x slower: each exercise gets 10 minutes unless told otherwise.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1",
           "COURSE_TIMEOUT": os.environ.get("COURSE_TIMEOUT") or "600"}
    cmd = [tool, "--tool", "memcheck", "--target-processes", "all", "--error-exitcode", "3",
           "--print-limit", "10", sys.executable, str(GRADER), "check", lesson.number, "--impl", impl]
    print(f"{' '.join(cmd[:9])} ... (PYTORCH_NO_CUDA_MEMORY_CACHING=1)", flush=True)
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if rc == 3:
        print("\ncompute-sanitizer found invalid memory accesses (above: the kernel, the thread, the address and how "
              "far it is past the nearest allocation). Mask every load and store whose offsets can pass the end.")
    return rc


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # the children are killed on the way out (their finally blocks)
        print("\ninterrupted: grading stopped; nothing in your files was changed", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    seed_from_env()  # a bad COURSE_SEED is named here, not read as a crash of every exercise
    impl = current_impl()
    if "--impl" in argv:
        i = argv.index("--impl")
        impl = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
        if not _valid_impl(impl):
            print(f"--impl must be one of {', '.join(IMPLS)} or a folder of exercise files, got '{impl}'",
                  file=sys.stderr)
            return 2
        impl = impl if impl in IMPLS else str(Path(impl).resolve())
    if argv[:1] == ["check"]:
        return check(argv[1] if len(argv) > 1 else "", impl)
    if argv[:1] == ["progress"]:
        return progress(impl)
    if argv[:1] == ["try"]:
        return try_one(argv[1] if len(argv) > 1 else "", impl)
    if argv[:1] == ["hint"]:
        return hint(argv[1] if len(argv) > 1 else "", argv[2] if len(argv) > 2 else None)
    if argv[:1] == ["list"]:
        return list_exercises()
    if argv[:1] == ["sanitize"]:
        return sanitize(argv[1] if len(argv) > 1 else "", impl)
    if argv[:1] == ["_child"]:
        _child(*argv[1:7])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
