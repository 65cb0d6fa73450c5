"""Command-line flags every lesson script understands."""

import argparse

from .device import HAS_GPU, banner


def lesson_args(description: str) -> argparse.Namespace:
    """Parse --quick (what `make test` runs: checks and a short benchmark) and print the banner.

    Without a GPU `quick` is always on: the interpreter runs small sizes and skips timings.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and a short benchmark (what `make test` runs)")
    args = parser.parse_args()
    args.quick = args.quick or not HAS_GPU
    print(banner())
    return args
