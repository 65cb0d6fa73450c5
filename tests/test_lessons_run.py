"""Every written lesson script runs end to end in quick mode, and the Makefile's lesson handling
gives a clear answer for a bad or missing LESSON."""

import os
import re
import subprocess
import sys

import pytest

import common
from common.lessons import LESSONS, REPO

WRITTEN = [lesson for lesson in LESSONS if lesson.written]
SCRIPTS = [script for lesson in WRITTEN for script in [lesson.script, *lesson.parts]]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.stem)
def test_lesson_script_runs_quick(script, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", COURSE_RESULTS="")
    proc = subprocess.run([sys.executable, str(script), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{output[-4000:]}"
    assert common.banner().split("|")[0].strip() in output, "the script must print the device banner first"
    if common.INTERPRETER:
        assert "needs a CUDA GPU" in output, "without a GPU the script must say that timings need one"
    assert "Traceback" not in output, output[-4000:]


def _lessons_cli(*args):
    return subprocess.run([sys.executable, "common/lessons.py", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("bad", ["99", "", "vector", "0"])
def test_bad_lesson_lists_the_lessons(bad):
    proc = _lessons_cli("run", bad)
    assert proc.returncode == 2
    assert "01  beginner" in proc.stderr and "12  expert" in proc.stderr, proc.stderr


def readme_lesson_rows(readme: str) -> list[tuple[str, str, str]]:
    """(number, level, linked markdown) of each row of the README's lesson table."""
    return re.findall(r"^\| (\d\d) \| (\w+) \| \[[^]]+\]\(([^)]+\.md)\)", readme, flags=re.M)


def test_readme_lists_every_lesson_of_the_tree():
    """The lesson list is discovered from lessons/*/NN_*.py; the README's table must follow it."""
    tree = [(l.number, l.level, l.markdown.relative_to(REPO).as_posix()) for l in LESSONS]
    assert len(tree) == 12, [t[0] for t in tree]
    assert readme_lesson_rows((REPO / "README.md").read_text()) == tree


def test_readme_check_catches_a_missing_lesson():
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| 07 |"))
    rows = readme_lesson_rows(readme.replace(row + "\n", ""))
    assert [r[0] for r in rows] == [l.number for l in LESSONS if l.number != "07"]


def test_discover_reads_a_tree(tmp_path):
    from common.lessons import discover
    (tmp_path / "lessons" / "expert").mkdir(parents=True)
    (tmp_path / "lessons" / "beginner").mkdir(parents=True)
    (tmp_path / "lessons" / "expert" / "13_new_topic.py").write_text("")
    (tmp_path / "lessons" / "expert" / "13_new_topic.md").write_text("# Lesson 13: a new topic\n")
    (tmp_path / "lessons" / "expert" / "13_new_topic_capstone.py").write_text("")  # a part of lesson 13
    (tmp_path / "lessons" / "beginner" / "01_first.py").write_text("")
    found = discover(tmp_path)
    assert [(l.number, l.level, l.title) for l in found] == [("01", "beginner", "First"), ("13", "expert", "A new topic")]
    assert [p.name for p in found[1].parts] == ["13_new_topic_capstone.py"] and found[0].parts == []


def test_make_check_bad_lesson_fails_with_the_map():
    proc = subprocess.run(["make", "--no-print-directory", "check", "LESSON=42", f"PYTHON={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")})
    assert proc.returncode != 0
    assert "'42' is not a lesson" in proc.stderr and "01  beginner" in proc.stderr


def test_grader_report_for_stubs_and_solutions():
    """`make check` for lesson 01: the shipped stubs read TODO, the solutions all pass."""
    def check(impl):
        return subprocess.run([sys.executable, "tests/grader.py", "check", "01", "--impl", impl],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    solutions = check("solutions")
    assert solutions.returncode == 0, solutions.stdout + solutions.stderr
    assert "3 of 3 passed" in solutions.stdout
    edited = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "exercises/01_vector_add.py"],
                            cwd=REPO).returncode == 1
    if edited:
        pytest.skip("exercises/01_vector_add.py has your edits")
    stubs = check("exercises")
    assert stubs.returncode == 1 and "0 of 3 passed, 0 failed, 3 TODO" in stubs.stdout, stubs.stdout
