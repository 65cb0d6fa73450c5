"""Nsight Compute from a lesson: hardware counters of its kernels, read in a child process.

    counters, problem = common.ncu_counters(["dram__bytes_read.sum"], "layernorm_fwd_kernel",
                                            [sys.executable, LESSON_SCRIPT, "--ncu-target"])
    if problem: print(problem)                      # no ncu, no GPU, no permission: says which
    counters["layernorm_fwd_kernel"]["dram__bytes_read.sum"]

ncu re-runs the child (a lesson's own `--ncu-target` entry, which launches each kernel of
interest once) and reports the metrics of every launch whose name matches the regex. The child's
stdout comes back too, for the lines it prints about what it launched. Clocks are left as the
machine has them (`--clock-control none`).
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess

from .device import HAS_GPU


def parse_ncu_csv(text: str, kernels: list[str] | None = None) -> dict[str, dict[str, float]]:
    """{kernel: {metric: value}} from `ncu --csv --print-units base` output (other lines ignored).
    A kernel name is shortened to the first of `kernels` it contains; values of repeated launches add."""
    rows = list(csv.reader(line for line in text.splitlines() if line.startswith('"')))
    if not rows:
        return {}
    head = rows[0]
    try:
        k_col, m_col, v_col = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
    except ValueError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for row in rows[1:]:
        if len(row) <= max(k_col, m_col, v_col):
            continue
        name = next((k for k in kernels or [] if k in row[k_col]), row[k_col])
        try:
            value = float(row[v_col].replace(",", ""))
        except ValueError:
            continue
        metrics = out.setdefault(name, {})
        metrics[row[m_col]] = metrics.get(row[m_col], 0.0) + value
    return out


def ncu_counters(metrics: list[str], kernel_regex: str, child: list[str], launch_count: int | None = None,
                 timeout_s: int = 300) -> tuple[dict[str, dict[str, float]], str, str]:
    """(counters by kernel, problem, the child's stdout). `problem` is "" when counters were read,
    else one line that says why not (what a lesson prints instead of its table)."""
    ncu = shutil.which("ncu")
    if ncu is None:
        return {}, ("Nsight Compute (ncu) is not on PATH: no hardware counters here. It comes with the CUDA "
                    "toolkit; add its folder to PATH to see them."), ""
    if not HAS_GPU:
        return {}, "ncu is installed, but reading hardware counters needs a CUDA GPU.", ""
    cmd = [ncu, "--clock-control", "none", "--metrics", ",".join(metrics), "--kernel-name", f"regex:{kernel_regex}",
           "--csv", "--print-units", "base"]
    if launch_count:
        cmd += ["--launch-count", str(launch_count)]
    try:
        proc = subprocess.run(cmd + [str(c) for c in child], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {}, f"ncu did not finish in {timeout_s} s", ""
    counters = parse_ncu_csv(proc.stdout, re.findall(r"[\w]+", kernel_regex))
    if proc.returncode != 0 or not counters:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
        return {}, (f"ncu gave no counters (exit {proc.returncode}): {tail[:400]} (ERR_NVGPUCTRPERM means the "
                    f"counters need root or profiling allowed for all users)"), proc.stdout
    return counters, "", proc.stdout
