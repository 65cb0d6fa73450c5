"""Code a lesson's markdown quotes from its script is still in the script (issue 16).

A ```python block that shows a function of the lesson (a `def` or `class` of a name the lesson's
.py defines, or one of its decorator lines) is a quote: every code line of it must still be a line of the
.py, so that an edit to the kernel cannot leave the explanation showing the old code. Blocks
that show no line of the script (usage, pseudo-code) are not quotes, and the Exercises section
(its hints show answers, not the script) is not read.
"""

from __future__ import annotations

import re

import pytest

from common.lessons import LESSONS

FENCE = re.compile(r"```python\n(.*?)```", re.S)
CUDA_FENCE = re.compile(r"```cuda\n(.*?)```", re.S)  # the CUDA C++ that lessons 01 and 04 hold as strings
DEFINED = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", re.M)


def code_lines(block: str) -> list[str]:
    """The block's lines that are code: stripped, without blanks, comments and `...` elisions."""
    return [line.strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#") and line.strip() != "..."]


def stale_quotes(markdown: str, script: str) -> list[str]:
    """Lines of quoted blocks (see the module docstring) that the script no longer has."""
    script_lines = {line.strip() for line in script.splitlines()}
    defined = set(DEFINED.findall(script))
    stale = []
    for block in FENCE.findall(markdown):
        lines = code_lines(block)
        shows = set(DEFINED.findall("\n".join(lines))) & defined
        if shows or any(line.startswith("@") and line in script_lines for line in lines):
            stale += [line for line in lines if line not in script_lines]
    for block in CUDA_FENCE.findall(markdown):  # every CUDA block quotes the script's CUDA source
        stale += [line.strip() for line in block.splitlines()
                  if line.strip() and not line.strip().startswith("//") and line.strip() not in script_lines]
    return stale


SCRIPTS = [script for lesson in LESSONS if lesson.written for script in [lesson.script, *lesson.parts]]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.stem)
def test_quoted_code_is_in_the_script(script):
    markdown = script.with_suffix(".md").read_text().split("\n## Exercises")[0]
    stale = stale_quotes(markdown, script.read_text())
    assert not stale, f"{script.with_suffix('.md').name} quotes lines its .py no longer has:\n" + "\n".join(stale)


def test_a_stale_cuda_quote_is_caught():
    script = 'SOURCE = r"""\n__global__ void k(float* x) {\n    x[0] = 1.f;\n}\n"""\n'
    assert stale_quotes("```cuda\n__global__ void k(float* x) {\n    // why\n    x[0] = 1.f;\n}\n```", script) == []
    assert stale_quotes("```cuda\n__global__ void k(float* x) {\n    x[0] = 2.f;\n}\n```", script) == ["x[0] = 2.f;"]


def test_a_stale_quote_is_caught():
    script = "def kernel(x):\n    y = x + 1\n    return y\n"
    assert stale_quotes("```python\ndef kernel(x):\n    y = x + 1\n    ...\n```", script) == []
    assert stale_quotes("```python\ndef kernel(x):\n    y = x + 2\n```", script) == ["y = x + 2"]
    assert stale_quotes("```python\ndef kernel(x, z):\n    y = x + 1\n```", script) == ["def kernel(x, z):"]
    assert stale_quotes("```python\ndef other(x):\n    y = x + 2\n```", script) == []  # not a quote
