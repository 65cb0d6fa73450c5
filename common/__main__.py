"""python -m common results DIR: gather one `make bench` run's JSON files into DIR/results.md and
DIR/results.json (for lessons/results, also each lesson md's "What the GPU printed" block).
python -m common table DIR: the README's results table from DIR/results.json."""

import json
import sys
from pathlib import Path

from .report import bars_table, write_results

if len(sys.argv) != 3 or sys.argv[1] not in ("results", "table"):
    sys.exit("usage: python -m common results RESULTS_DIR | python -m common table RESULTS_DIR")
if sys.argv[1] == "table":
    print(bars_table(json.loads((Path(sys.argv[2]) / "results.json").read_text())["bars"]))
else:
    for path in write_results(Path(sys.argv[2])):
        print(f"results written: {path}")
