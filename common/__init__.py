"""The course's toolkit: device, timing, traffic, reports and checks, shared by every lesson.

`import common` first: it decides where kernels run (common/device.py), which must happen before
any kernel is defined. Without a CUDA GPU that is Triton's CPU interpreter (TRITON_INTERPRET=1);
COURSE_INTERPRETER=auto|1|0 makes the choice explicit (README, "Where kernels run").
"""

from .device import DEVICE, HAS_GPU, INTERPRETER, banner, dtype_name, is_hopper, require_gpu, supports_bf16, supports_fp8
from .checks import (CheckError, assert_close, awkward_sizes, grads_float64, grads_of, poisoned_empty,
                     poisoned_like, randn)
from .report import Table, new_figure, perf_bar, save_plot, section
from .timing import (Timing, bench, bench_graphed, compiled, copy_bandwidth, gpu_kernel_count, matmul_rate,
                     median_ratio, pct_of_copy, read_bandwidth, wall_timing, wall_us_per_call)
from .benchmark import Bar, Benchmark, Version, Versions, run_benchmarks
from .traffic import count_torch_traffic, fmt_bytes, min_bytes, peak_extra_memory
from .validate import check_tensors
from .cli import lesson_args
from .compiler import InspectionUnavailable, KernelReport, inspect_kernel, inspect_kernels, inspect_kernels_by_key
from .cuda_extension import code_lines, cuda_unavailable, load_cuda, print_side_by_side
from .ncu import ncu_counters, parse_ncu_csv

__all__ = [
    "DEVICE", "HAS_GPU", "INTERPRETER", "banner", "dtype_name", "is_hopper", "require_gpu", "supports_bf16", "supports_fp8",
    "CheckError", "assert_close", "awkward_sizes", "grads_float64", "grads_of", "poisoned_empty", "poisoned_like",
    "randn",
    "Table", "new_figure", "perf_bar", "save_plot", "section",
    "Bar", "Benchmark", "Version", "Versions", "run_benchmarks",
    "Timing", "bench", "bench_graphed", "compiled", "copy_bandwidth", "gpu_kernel_count", "matmul_rate", "median_ratio",
    "pct_of_copy", "read_bandwidth", "wall_timing", "wall_us_per_call",
    "count_torch_traffic", "fmt_bytes", "min_bytes", "peak_extra_memory",
    "check_tensors", "lesson_args",
    "InspectionUnavailable", "KernelReport", "inspect_kernel", "inspect_kernels", "inspect_kernels_by_key",
    "code_lines", "cuda_unavailable", "load_cuda", "print_side_by_side", "ncu_counters", "parse_ncu_csv",
]
