"""The lesson map: number, level, file stem, title. Used by the Makefile targets and the README.

`python common/lessons.py run 01 [--quick]` runs a lesson script, `python common/lessons.py list`
prints the map, `python common/lessons.py numbers` the written lessons' numbers (for make bench). A bad or missing lesson number prints the valid ones and exits with status 2.
Run as a plain script (not -m, which would import torch through common/__init__), so a
typo gets its answer at once.
"""

import importlib.util
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

    @property
    def script(self) -> Path:
        return REPO / "lessons" / self.level / f"{self.stem}.py"

    @property
    def markdown(self) -> Path:
        return self.script.with_suffix(".md")

    @property
    def exercises(self) -> Path:
        return REPO / "exercises" / f"{self.stem}.py"

    @property
    def solutions(self) -> Path:
        return REPO / "solutions" / f"{self.stem}.py"

    @property
    def test(self) -> Path:
        return REPO / "tests" / f"test_{self.stem}.py"

    @property
    def written(self) -> bool:
        return self.script.exists()


LESSONS = [
    Lesson("01", "beginner", "01_vector_add", "Vector add: programs, masks, the launch grid"),
    Lesson("02", "beginner", "02_memory_and_dtypes", "Memory and data types"),
    Lesson("03", "beginner", "03_basic_operations", "Basic operations: elementwise, reductions, debugging"),
    Lesson("04", "intermediate", "04_matmul", "Matrix multiplication"),
    Lesson("05", "intermediate", "05_memory_patterns", "Memory patterns: transpose, L2 reuse, stencils"),
    Lesson("06", "intermediate", "06_kernel_fusion", "Kernel fusion and online softmax"),
    Lesson("07", "advanced", "07_attention", "Attention: FlashAttention forward, backward, decoding"),
    Lesson("08", "advanced", "08_transformer_blocks", "Transformer blocks: norms, activations, RoPE, losses"),
    Lesson("09", "advanced", "09_mixture_of_experts", "Mixture of experts: routing, permutation, grouped GEMM"),
    Lesson("10", "expert", "10_autotuning", "Autotuning and performance models"),
    Lesson("11", "expert", "11_quantization", "Quantization and custom data types"),
    Lesson("12", "expert", "12_production", "Production systems: custom ops, graphs, profiling, multi-GPU"),
]


def lesson_map() -> str:
    rows = [f"  {l.number}  {l.level:<12}  {l.title}{'' if l.written else '  (not written yet)'}"
            for l in LESSONS]
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


def load_module(path: Path, name: str | None = None):
    """Import a file whose name starts with a digit (lessons, exercises, solutions)."""
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
    return subprocess.call([sys.executable, str(lesson.script), *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
