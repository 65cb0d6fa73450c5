"""The lesson map: number, level, file stem, title. Used by the Makefile targets and the README.

`python common/lessons.py run 01 [--quick]` runs a lesson script, `python common/lessons.py list`
prints the map, `python common/lessons.py numbers` the written lessons' numbers (for make bench). A bad or missing lesson number prints the valid ones and exits with status 2.
Run as a plain script (not -m, which would import torch through common/__init__), so a
typo gets its answer at once.
"""

import importlib
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Lesson:
    number: str
    level: str
    stem: str
    title: str
    root: Path = REPO  # the repository the lesson lives in (a test's tree elsewhere)

    @property
    def script(self) -> Path:
        return self.root / "lessons" / self.level / f"{self.stem}.py"

    @property
    def markdown(self) -> Path:
        return self.script.with_suffix(".md")

    @property
    def exercises(self) -> Path:
        return self.root / "exercises" / f"{self.stem}.py"

    @property
    def solutions(self) -> Path:
        return self.root / "solutions" / f"{self.stem}.py"

    @property
    def test(self) -> Path:
        return self.root / "tests" / f"test_{self.stem}.py"

    @property
    def written(self) -> bool:
        return self.script.exists()

    @property
    def parts(self) -> list[Path]:
        """Scripts that continue the lesson in a file of their own, NN_topic_<part>.py beside it
        (lesson 12's capstone): run after the lesson by `common/lessons.py run`, so make bench and
        make test run them too."""
        return sorted(self.script.parent.glob(f"{self.stem}_*.py"))

    @property
    def markdowns(self) -> list[Path]:
        """The lesson's markdown, then its parts' (a part's exercises live in the lesson's
        exercises/ file, their hints in the part's markdown, where the learner reads about them)."""
        return [md for md in [self.markdown] + [part.with_suffix(".md") for part in self.parts] if md.exists()]


LEVELS = ("beginner", "intermediate", "advanced", "expert")


def _title(markdown: Path, stem: str) -> str:
    """The lesson's title from its markdown's first line, `# Lesson 01: vector add`."""
    first = markdown.read_text().splitlines()[0] if markdown.exists() else ""
    title = re.sub(r"^#\s*Lesson\s+\d+\s*:\s*", "", first).strip() or stem.split("_", 1)[1].replace("_", " ")
    return title[0].upper() + title[1:]


def discover(root: Path = REPO) -> list[Lesson]:
    """The lesson list is the tree: lessons/<level>/NN_topic.py, one source for the Makefile, the
    grader, the tests and the README table (tests/test_lessons_run.py checks the README against it)."""
    found = []
    for level in LEVELS:
        scripts = sorted((root / "lessons" / level).glob("[0-9][0-9]_*.py"))
        stems = {script.stem for script in scripts}
        for script in scripts:
            if any(script.stem.startswith(f"{stem}_") for stem in stems):
                continue  # a part of that lesson (Lesson.parts), not a lesson of its own
            found.append(Lesson(script.stem[:2], level, script.stem, _title(script.with_suffix(".md"), script.stem), root))
    return sorted(found, key=lambda lesson: lesson.number)


LESSONS = discover()


def lesson_map() -> str:
    rows = [f"  {l.number}  {l.level:<12}  {l.title}" for l in LESSONS]
    return "\n".join(rows)


def find(number: str | None) -> Lesson:
    """The lesson for '1', '01' or '01_vector_add'; exit 2 with the lesson map otherwise."""
    key = (number or "").strip()
    if key.isdigit():
        key = f"{int(key):02d}"
    for lesson in LESSONS:
        if key in (lesson.number, lesson.stem):
            return lesson
    what = f"'{number}' is not a lesson" if key else "no lesson given"
    print(f"{what}. Pick one with LESSON=NN, for example: make lesson LESSON=01\n\n{lesson_map()}",
          file=sys.stderr)
    sys.exit(2)


def require_written(lesson: Lesson) -> None:
    if not lesson.written:
        print(f"Lesson {lesson.number} ({lesson.title}) is not written yet. Written so far:\n\n"
              f"{lesson_map()}", file=sys.stderr)
        sys.exit(2)


def lesson_module(number: str):
    """Lesson NN's script as a module, imported once under its package name
    (`lessons.advanced.08_transformer_blocks`): how a later lesson, an exercise or a test reuses a
    lesson's kernels. The files are named for the course's order, and the import statement cannot
    spell a name that starts with a digit, so this is `importlib.import_module` (the import system,
    its sys.modules cache, one copy of the kernels however many modules ask), not a load by path."""
    lesson = find(number)
    require_written(lesson)
    if str(REPO) not in sys.path:  # common installed editable, run from elsewhere: lessons/ is in the repo
        sys.path.append(str(REPO))
    return importlib.import_module(f"lessons.{lesson.level}.{lesson.stem}")


def load_module(path: Path, name: str | None = None):
    """Import an exercise, solution or test file by path: a learner's folder can be anywhere
    (`make check IMPL=/their/folder`), and solution_with needs private copies."""
    spec = importlib.util.spec_from_file_location(name or f"course_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "list", "numbers", "stem", "written"):
        print("usage: python common/lessons.py run NN [--quick] | list | numbers | stem NN | written NN", file=sys.stderr)
        return 2
    if argv[0] == "list":
        print(lesson_map())
        return 0
    if argv[0] == "numbers":
        print(" ".join(lesson.number for lesson in LESSONS if lesson.written))
        return 0
    lesson = find(argv[1] if len(argv) > 1 else None)
    if argv[0] == "stem":
        print(lesson.stem)
        return 0
    if argv[0] == "written":
        return 0 if lesson.written else 1
    require_written(lesson)
    status = subprocess.call([sys.executable, str(lesson.script), *argv[2:]])
    if set(argv[2:]) <= {"--quick"}:  # a plain or quick run goes on with the lesson's parts; --profile does not
        for part in lesson.parts:
            print(f"\n=== {part.name} ===", flush=True)
            status = subprocess.call([sys.executable, str(part), *argv[2:]]) or status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
