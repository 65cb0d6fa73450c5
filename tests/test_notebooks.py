"""Every lesson script is also a notebook (`make notebooks`): its markdown cells hold prose only,
and lesson 01, converted by jupytext, runs in a Jupyter kernel of this Python (Triton's
interpreter without a GPU) and prints its check line. A notebook whose cell raises must fail."""

import json
import os
import re
import subprocess
import sys

import pytest

from common.lessons import LESSONS, REPO

try:
    import jupytext
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    import ipykernel  # noqa: F401 (the kernel runs `python -m ipykernel_launcher`)
except ImportError as err:
    if os.environ.get("CI"):  # .ci/run installs them (`make notebooks`): a skip there would hide that it did not
        raise
    pytest.skip(f"{err.name} is not installed: `make notebooks` installs the notebooks extra of pyproject.toml "
                "(jupytext, nbclient, ipykernel)", allow_module_level=True)

LESSON_01 = next(lesson for lesson in LESSONS if lesson.number == "01")
# What lesson 01's check() prints when add and sub match PyTorch on every size and dtype
CHECK_LINE = re.compile(r"add and sub match PyTorch for n in \[[\d, ]+\], dtypes [\w, ]+: OK")


def prose_lines_with_code(script_text: str) -> list[str]:
    """Lines of `# %% [markdown]` cells that are not comments: code jupytext would fold into prose
    (a markdown cell runs up to the next `# %%` marker)."""
    found, in_markdown = [], False
    for number, line in enumerate(script_text.splitlines(), 1):
        if line.startswith("# %%"):
            in_markdown = line.startswith("# %% [markdown]")
        elif in_markdown and line.strip() and not line.startswith("#"):
            found.append(f"{number}: {line}")
    return found


@pytest.mark.parametrize("script", [s for lesson in LESSONS for s in [lesson.script, *lesson.parts]],
                         ids=lambda script: script.stem)
def test_markdown_cells_hold_prose_only(script):
    text = script.read_text()
    assert not prose_lines_with_code(text), (
        f"{script.name}: code inside a markdown cell; put a `# %%` line before it:\n"
        + "\n".join(prose_lines_with_code(text)[:5]))
    cells = jupytext.reads(text, fmt="py:percent").cells
    assert cells[0].cell_type == "code" and "import common" in cells[0].source, \
        "the first cell must be the docstring and the imports"


def test_markdown_check_catches_code_without_a_marker():
    """Lesson 01 without its plain `# %%` markers (as it was before them): code in prose cells."""
    unmarked = re.sub(r"^# %%\n", "", LESSON_01.script.read_text(), flags=re.M)
    assert any("def add_reference" in line for line in prose_lines_with_code(unmarked))


def test_bootstrap_needs_no_file(tmp_path):
    """A notebook has no __file__: the first cell's bootstrap finds the repo root above the cwd."""
    first = jupytext.read(LESSON_01.script, fmt="py:percent").cells[0].source
    block = first[first.index('if "common" not in sys.modules'):first.index("\nimport common")]
    code = f"import sys\nfrom pathlib import Path\n{block}\nprint(sys.path[0])"  # `python -c` has no __file__
    for cwd in (REPO, LESSON_01.script.parent):
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == str(REPO), (cwd, proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def kernel_manager(tmp_path_factory):
    """A kernel of this Python (the venv's), whatever `python3` kernel Jupyter has installed."""
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / "course").mkdir()
    (kernels / "course" / "kernel.json").write_text(json.dumps(
        {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "course", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    return lambda: KernelManager(kernel_name="course", kernel_spec_manager=specs)


def execute(notebook, kernel_manager, cwd):
    """Run every cell in a fresh kernel started in cwd; raises CellExecutionError at a failing cell."""
    nbclient.NotebookClient(notebook, km=kernel_manager(), timeout=300,
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.output_type == "stream")


@pytest.fixture
def notebook_env(monkeypatch):
    # The quick run on a GPU too (without one it is always quick); no make bench result files.
    monkeypatch.setenv("COURSE_QUICK", "1")
    monkeypatch.setenv("COURSE_RESULTS", "")


def test_lesson_01_runs_as_a_notebook(kernel_manager, tmp_path, notebook_env):
    notebook = jupytext.read(LESSON_01.script, fmt="py:percent")
    output = execute(notebook, kernel_manager, tmp_path)
    assert CHECK_LINE.search(output), f"lesson 01's check line is missing from the notebook's output:\n{output[-3000:]}"
    assert "Memory traffic at n = " in output and "=== Benchmark: " in output, output[-3000:]
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors


def test_a_broken_cell_fails_the_notebook(kernel_manager, tmp_path, notebook_env):
    """The same notebook with a wrong reference put in before the last cell: its check must raise."""
    notebook = jupytext.read(LESSON_01.script, fmt="py:percent")
    notebook.cells.insert(len(notebook.cells) - 1, nbformat.v4.new_code_cell(
        "def add_reference(x, y):  # deliberately wrong\n    return x - y"))
    with pytest.raises(nbclient.exceptions.CellExecutionError) as failed:
        execute(notebook, kernel_manager, tmp_path)
    assert "CheckError" in str(failed.value) and "add n=" in str(failed.value), str(failed.value)[-3000:]
    assert not CHECK_LINE.search("".join(o.get("text", "") for cell in notebook.cells
                                         for o in cell.get("outputs", [])))
