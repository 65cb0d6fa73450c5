"""One table format for every lesson, plots under plots/, and the perf-bar record `make bench` reads.

A lesson prints its tables with `Table`, saves figures with `save_plot`, and states each perf
bar with `perf_bar` (common.Benchmark does all three). When COURSE_RESULTS is set (make bench
sets it to lessons/results), every table and bar of the run is also written to
$COURSE_RESULTS/<lesson>.json, plots go there too, and `python -m common results DIR` gathers
those files into DIR/results.md (tables, bars, plots) and DIR/results.json (every bar, one
record each: lesson, name, kernel, baseline, shape, dtype, value, threshold, pass, GPU, versions,
date).
"""

import atexit
import datetime
import json
import os
import sys
from pathlib import Path

from .device import banner, gpu_name, versions

REPO = Path(__file__).resolve().parents[1]


def plots_dir() -> Path:
    """plots/ for a lesson run; the results folder when make bench collects a run."""
    out = os.environ.get("COURSE_RESULTS")
    return Path(out).resolve() if out else REPO / "plots"

_RUN = {"tables": [], "bars": [], "plots": []}


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


class Table:
    """Rows of values under named columns, printed aligned; numbers formatted the same everywhere."""

    def __init__(self, title: str, columns: list[str]):
        self.title = title
        self.columns = columns
        self.rows: list[list] = []

    def add(self, *values) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"table '{self.title}' has {len(self.columns)} columns, got {len(values)} values")
        self.rows.append(list(values))

    def text(self) -> str:
        cells = [self.columns] + [[_fmt(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([self.title, rule, line(cells[0]), rule] + [line(r) for r in cells[1:]] + [rule])

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns) + "\n"
        return f"**{self.title}**\n\n" + head + "\n".join(
            "| " + " | ".join(_fmt(v) for v in row) + " |" for row in self.rows)

    def print(self) -> None:
        print("\n" + self.text())
        _RUN["tables"].append({"title": self.title, "markdown": self.markdown()})


def section(title: str) -> None:
    print(f"\n=== {title} ===")


def save_plot(fig, name: str) -> Path:
    """Save a matplotlib figure as plots/<name>.png and print where it went."""
    folder = plots_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only checkout: the lesson goes on without its plot
        print(f"plot not written ({name}): cannot create {folder} ({err.strerror})")
        return folder / f"{name}.png"
    path = folder / f"{name}.png"
    import matplotlib.pyplot as plt
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as err:  # a folder that exists but is read-only
        print(f"plot not written ({name}): cannot write {path} ({err.strerror})")
        return path
    finally:
        plt.close(fig)
    shown = os.path.relpath(path, REPO)
    print(f"plot written: {shown}")
    _RUN["plots"].append(path.name)
    return path


def new_figure(title: str, xlabel: str, ylabel: str, logx: bool = False):
    """A figure with the course's look; the Agg backend so it works with no display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_title(f"{title}\n{gpu_name()}", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    return fig, ax


def fmt_value(value: float, bar: float | None = None) -> str:
    """A bar's value: two decimals, or three significant digits below 0.1 (0.0052 %, not 0.01 %).
    Next to its bar, more decimals where two would print a miss as the bar itself (0.977, not 0.98)."""
    if abs(value) < 0.1:
        return f"{value:.3g}"
    digits = 2
    while bar is not None and value != bar and digits < 4 and f"{value:.{digits}f}" == f"{bar:.{digits}f}":
        digits += 1
    return f"{value:.{digits}f}"


def perf_bar(name: str, value: float, bar: float, unit: str, higher_is_better: bool = True,
             record: dict | None = None, why: str = "", wrong: str = "") -> bool:
    """Print one perf-bar line (PASS/MISS, with the measured reason of a miss) and keep it for
    `make bench`'s results. `record` adds the fields of results.json (kernel, baseline, shape,
    dtype, ...); common.Benchmark fills them. `wrong`: the kernel's output at this size disagreed
    with the reference's (how): the bar is a MISS whatever its time, and that is its reason."""
    ok = (value >= bar if higher_is_better else value <= bar) and not wrong
    why = f"its output is wrong at this size: {wrong}" if wrong else why
    sign = ">=" if higher_is_better else "<="
    print(f"perf bar: {name}: {fmt_value(value, bar)} {unit} (bar {sign} {bar:g} {unit}) -> {'PASS' if ok else 'MISS'}"
          + (f"\n  why: {why}" if why and not ok else ""))
    _RUN["bars"].append({"name": name, "value": float(f"{value:.6g}"), "bar": bar, "unit": unit,
                         "higher_is_better": higher_is_better, "passed": ok, **(record or {}),
                         **({"why": why} if why and not ok else {})})
    return ok


def _write_results() -> None:
    out_dir = os.environ.get("COURSE_RESULTS")
    if not out_dir or not (_RUN["tables"] or _RUN["bars"]):
        return
    script = Path(sys.argv[0]).stem
    path = Path(out_dir) / f"{script}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"lesson": script, "gpu": gpu_name(), "banner": banner(),
                                "versions": versions(), "date": datetime.date.today().isoformat(),
                                **_RUN}, indent=2))


atexit.register(_write_results)
if os.environ.get("COURSE_RESULTS"):
    import signal
    # A lesson stopped by a time limit (SIGTERM) still writes the tables and bars it measured.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


BAR_FIELDS = ("lesson", "name", "kernel", "baseline", "shape", "dtype", "value", "bar", "unit", "passed",
              "gpu", "versions", "date")


def gather(results_dir: Path) -> tuple[str, dict]:
    """All lesson JSON files of one results folder: a markdown page, and every perf bar as one
    record (the fields of BAR_FIELDS, plus the benchmark, op and the reason of a miss)."""
    parts, bars = [], []
    for path in sorted(results_dir.glob("[0-9][0-9]_*.json")):
        run = json.loads(path.read_text())
        parts.append(f"## {run['lesson']}\n\n{run['date']}, {run['banner']}\n")
        if run["bars"]:
            parts.append("| perf bar | strongest baseline | measured | bar | result |\n|---|---|---|---|---|")
            for b in run["bars"]:
                sign = ">=" if b["higher_is_better"] else "<="
                result = "PASS" if b["passed"] else "MISS" + (f": {b['why']}" if b.get("why") else "")
                parts.append(f"| {b['name']} | {b.get('baseline', '-')} | {fmt_value(b['value'], b['bar'])} {b['unit']} | "
                             f"{sign} {b['bar']:g} {b['unit']} | {result} |")
                bars.append({"lesson": run["lesson"], **b, "gpu": run["gpu"], "versions": run["versions"],
                             "date": run["date"]})
            parts.append("")
        parts += [t["markdown"] + "\n" for t in run["tables"]]
        parts += [f"![{Path(p).stem}]({Path(p).name})\n" for p in run["plots"]]
    return "\n".join(parts), {"bars": bars}


def _against(b: dict) -> str:
    """What a bar's value is measured against, in a few words."""
    vs, baseline = b.get("vs"), b.get("baseline")
    if vs == "ceiling":
        return f"% of the {baseline}"
    if vs == "baseline":
        return f"the fastest baseline: {baseline}"
    if vs == "baseline memory":
        return f"% of the leanest baseline's peak memory: {baseline}"
    return baseline or "-"


def bars_table(bars: list[dict]) -> str:
    """The README's results table: one row per perf bar of results.json, what it races named.
    One line above names the GPU, versions and date where every bar shares them; else a column does."""
    machines = {(b["gpu"], b["versions"], b["date"]) for b in bars}
    one = len(machines) == 1
    head = "| lesson | benchmark | kernel at case | against | measured | bar | |"
    rows = ([f"Measured on {b['gpu']}, {b['versions']}, {b['date']}.", ""] if one and (b := bars[0]) else []) + [
        head if one else head.replace("| lesson |", "| lesson | GPU, date |"),
        "|---" * (7 if one else 8) + "|"]
    for b in bars:
        sign = ">=" if b["higher_is_better"] else "<="
        unit = b["unit"]
        result = "PASS" if b["passed"] else "MISS" + (f": {b['why']}" if b.get("why") else "")
        cells = ([b.get("benchmark", b["name"]), f"{b['kernel']} at {b['shape']}", _against(b)] if b.get("kernel")
                 else [b["name"], "-", "-"])
        cells = [b["lesson"][:2]] + ([] if one else [f"{b['gpu']}, {b['date']}"]) + cells + [
            f"{fmt_value(b['value'], b['bar'])} {unit}", f"{sign} {b['bar']:g} {unit}", result]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # a | in a name ends a cell
    return "\n".join(rows)


def write_results(results_dir: Path) -> tuple[Path, ...]:
    """results.md and results.json of one results folder (python -m common results DIR), and the
    "What the GPU printed" block of every lesson md it has a run of."""
    page, record = gather(results_dir)
    md, js = results_dir / "results.md", results_dir / "results.json"
    md.write_text("# Benchmark results (make bench)\n\n" + page)
    js.write_text(json.dumps(record, indent=2) + "\n")
    # The mds quote the course's own record only: a results folder elsewhere (a test's) leaves them alone.
    ours = results_dir.resolve() == (REPO / "lessons" / "results").resolve()
    return md, js, *(write_md_excerpts(results_dir) if ours else [])


EXCERPT_START = "<!-- gpu-output: written by `python -m common results lessons/results`; do not edit -->"
EXCERPT_END = "<!-- gpu-output end -->"
EXCERPT_TABLES = 2  # the tables of the benchmarks that state the lesson's bars, at most this many


def gpu_output_excerpt(run: dict, results_link: str = "../results/results.md") -> str:
    """What a lesson's md shows of its last `make bench` run (issue 16: a learner on a CPU sees what
    the GPU printed): the machine, every perf bar, and the tables of the benchmarks the bars are in."""
    lines = [f"Printed by `make bench` on {run['gpu']} ({run['versions']}, {run['date']}); the whole run is in "
             f"[lessons/results/results.md]({results_link}).", ""]
    for b in run["bars"]:
        sign = ">=" if b["higher_is_better"] else "<="
        what = f"{b['kernel']} at {b['shape']}, {_against(b)}" if b.get("kernel") else b["name"]
        result = "PASS" if b["passed"] else "MISS" + (f" ({b['why']})" if b.get("why") else "")
        lines.append(f"- {what}: **{fmt_value(b['value'], b['bar'])} {b['unit']}** (bar {sign} {b['bar']:g} "
                     f"{b['unit']}): {result}")
    benchmarks = list(dict.fromkeys(b["benchmark"] for b in run["bars"] if b.get("benchmark")))
    tables = [t for t in run["tables"] if t["title"] in benchmarks][:EXCERPT_TABLES] or run["tables"][:1]
    for table in tables:
        lines += ["", table["markdown"]]
    return "\n".join(lines).strip()


def excerpt_block(run: dict) -> str:
    return f"{EXCERPT_START}\n{gpu_output_excerpt(run)}\n{EXCERPT_END}"


def write_md_excerpts(results_dir: Path) -> list[Path]:
    """Each lesson md's "What the GPU printed" block, rewritten from its JSON in results_dir. A lesson
    whose md has no block gets one, as a section before its Takeaways (or at its end)."""
    from .lessons import LESSONS
    written = []
    for script in (s for lesson in LESSONS for s in [lesson.script, *lesson.parts]):  # a lesson's parts too
        path, markdown = results_dir / f"{script.stem}.json", script.with_suffix(".md")
        if not path.exists() or not markdown.exists():
            continue
        block = excerpt_block(json.loads(path.read_text()))
        md = markdown.read_text()
        if EXCERPT_START in md:
            head, rest = md.split(EXCERPT_START, 1)
            new = head + block + rest.split(EXCERPT_END, 1)[1]
        else:
            section_text = f"## What the GPU printed\n\n{block}\n\n"
            at = md.find("\n## Takeaways")
            new = md[:at + 1] + section_text + md[at + 1:] if at >= 0 else md.rstrip("\n") + "\n\n" + section_text
        if new != md:
            markdown.write_text(new)
            written.append(markdown)
    return written


def measured_on_gpu(stem: str, results_dir: Path | None = None) -> str:
    """What a CPU run of a lesson cannot show: its perf bars as measured by `make bench` on a GPU
    (lessons/results/results.json), one line each, or where to find them when none are recorded."""
    results_dir = results_dir or Path(__file__).resolve().parent.parent / "lessons" / "results"
    try:
        bars = [b for b in json.loads((results_dir / "results.json").read_text())["bars"] if b["lesson"] == stem]
    except (OSError, ValueError, KeyError):
        bars = []
    if not bars:
        return (f"No GPU here, so no timings; no GPU results of {stem} are recorded yet "
                f"(`make bench LESSON={stem[:2]}` on a GPU records them).")
    lines = [f"No GPU here, so no timings. Measured by `make bench` on {bars[0]['gpu']} ({bars[0]['date']}); "
             f"all of it in lessons/results/results.md:"]
    for b in bars:
        sign = ">=" if b["higher_is_better"] else "<="
        what = f"{b['kernel']} at {b['shape']}, {_against(b)}" if b.get("kernel") else b["name"]
        lines.append(f"  {what}: {fmt_value(b['value'], b['bar'])} {b['unit']} (bar {sign} {b['bar']:g} "
                     f"{b['unit']}) {'PASS' if b['passed'] else 'MISS'}")
    return "\n".join(lines)
