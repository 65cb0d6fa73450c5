"""Command-line flags every lesson script understands."""

import argparse
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
    return args
