"""python -m common results DIR: gather one `make bench` run's JSON files into DIR/results.md."""

import sys
from pathlib import Path

from .report import gather

if len(sys.argv) != 3 or sys.argv[1] != "results":
    sys.exit("usage: python -m common results RESULTS_DIR")
results = Path(sys.argv[2])
(results / "results.md").write_text("# Benchmark results (make bench)\n\n" + gather(results))
print(f"results table written: {results / 'results.md'}")
