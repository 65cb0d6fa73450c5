"""Command-line flags every lesson script understands."""

import argparse
import atexit
import os
import re
import sys
from pathlib import Path
from typing import Callable

from .device import HAS_GPU, banner


def lesson_args(description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                ) -> argparse.Namespace:
    """Parse --quick (what `make test` runs: checks and a short benchmark) and print the banner.

    Without a GPU `quick` is always on: the interpreter runs small sizes and skips timings.
    COURSE_QUICK=1 turns it on too, for a run that cannot pass flags (a notebook).
    A lesson with flags of its own (lesson 12's --profile) adds them with `add_arguments(parser)`.
    In a notebook's cell every flag takes its default (sys.argv is the Jupyter kernel's own there).
    """
    quick_env = os.environ.get("COURSE_QUICK", "")
    if quick_env not in ("", "0", "1"):
        raise ValueError(f"COURSE_QUICK={quick_env!r}: use 1 (quick mode, like --quick) or 0 / unset")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and a short benchmark (what `make test` runs); COURSE_QUICK=1 too")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args([] if _argv_is_the_kernels() else None)
    args.quick = args.quick or quick_env == "1" or not HAS_GPU
    print(banner())
    if not HAS_GPU and "ipykernel" not in sys.modules:  # a Jupyter kernel does not exit after the lesson
        _point_to_gpu_results(Path(sys.argv[0]).stem)
    return args


def _argv_is_the_kernels() -> bool:
    """In a Jupyter kernel (a notebook, Colab) sys.argv is the kernel's own (`.../ipykernel_launcher.py
    -f .../kernel-*.json`), unless `%run lessons/beginner/01_vector_add.py --quick` set it to the lesson's."""
    return "ipykernel" in sys.modules and not re.fullmatch(r"\d\d_\w+\.py", Path(sys.argv[0]).name)


def _point_to_gpu_results(stem: str) -> None:
    """At the end of a CPU run that finished, the lesson's perf bars as measured on a GPU."""
    failed = []
    previous_hook = sys.excepthook

    def note_failure(*exc_info):
        failed.append(True)
        previous_hook(*exc_info)

    def show() -> None:
        if not failed:
            from .report import measured_on_gpu
            print("\n" + measured_on_gpu(stem), flush=True)

    sys.excepthook = note_failure
    atexit.register(show)
