"""Command-line flags every lesson script understands."""

import argparse
import atexit
import sys
from pathlib import Path
from typing import Callable

from .device import HAS_GPU, banner


def lesson_args(description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                ) -> argparse.Namespace:
    """Parse --quick (what `make test` runs: checks and a short benchmark) and print the banner.

    Without a GPU `quick` is always on: the interpreter runs small sizes and skips timings.
    A lesson with flags of its own (lesson 12's --profile) adds them with `add_arguments(parser)`.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and a short benchmark (what `make test` runs)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    args.quick = args.quick or not HAS_GPU
    print(banner())
    if not HAS_GPU:
        _point_to_gpu_results(Path(sys.argv[0]).stem)
    return args


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
