"""python -m common results DIR: gather one `make bench` run's JSON files into DIR/results.md and
DIR/results.json."""

import sys
from pathlib import Path

from .report import write_results

if len(sys.argv) != 3 or sys.argv[1] != "results":
    sys.exit("usage: python -m common results RESULTS_DIR")
for path in write_results(Path(sys.argv[2])):
    print(f"results written: {path}")
