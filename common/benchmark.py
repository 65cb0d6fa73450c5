"""One declarative benchmark for every lesson: what is measured, who races, what the bar is.

A lesson declares its benchmarks next to its kernels, and the layer does the rest:

    BENCHMARKS = [common.Benchmark(
        "softmax fp32", op="softmax",                      # the op names its baselines (common/baselines.py)
        cases=[(4096, 4096), (8192, 8192)],                # what is measured; --quick runs quick_cases
        setup=lambda m, n: (common.randn(m, n),),          # one case -> the inputs every provider gets
        kernels=SOFTMAX_VERSIONS,                          # v1..vN (a common.Versions) or {name: fn}
        reference=softmax_naive,                           # raced as "torch eager" and "torch.compile"
        nbytes=lambda x: 2 * x.numel() * x.element_size(), # read x, write y -> GB/s
        ceiling="copy",                                     # % of the copy bandwidth measured in this run
        bars=[common.Bar("v3 online", (4096, 4096), "baseline", 1.0)],
    )]
    ...
    common.run_benchmarks(BENCHMARKS, args.quick)

On a GPU, for every case the layer times every provider in alternating order, round after round
(more rounds where the kernel-vs-baseline ratio spreads), prints one table (time and spread,
GB/s or TFLOP/s, % of the ceiling, ratio to the fastest baseline), draws the plot, and states
each perf bar, recorded for `make bench` (lessons/results/results.json). A bar "vs baseline" is
always against the fastest baseline the registry names for the op, as measured in that run.
In the interpreter every provider runs once on `cpu_cases` (tiny inputs) so the declarations
are exercised, and the timings are skipped with a message that says so.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import baselines as registry
from .device import HAS_GPU, dtype_name, require_gpu
from .report import Table, new_figure, perf_bar, save_plot, section
from .timing import Timing, bench, bench_graphed, compiled, copy_bandwidth, matmul_rate, read_bandwidth, wall_timing
from .traffic import fmt_bytes, peak_extra_memory

BASELINE_VS = ("baseline", "baseline memory", "ceiling")
SPREAD_FOR_MORE_ROUNDS = 0.03  # a kernel / baseline ratio that moves by more than 3% across rounds
# Every raced output must agree with the reference's at the size that is timed: relative error
# ||out - ref|| / ||ref|| over each output tensor, by the dtype of the reference's output. Loose
# enough for tf32 dots and bf16 rounding, far below what a wrong index or a missed tile gives
# (a tile of 128 x 128 wrong in a 4096 x 4096 output is a relative error near 1e-2 at best).
AGREEMENT = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
AGREEMENT_LOW_PRECISION = 0.15  # fp8 and other dtypes not above
AGREEMENT_INTEGERS = 1e-3  # integer outputs: the fraction of elements that may differ


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a provider's output, in order (a tensor, or tuples / lists of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def disagreement(out, ref) -> tuple[float, float] | None:
    """(the largest relative error over the tensors that the two outputs share, its tolerance),
    or None when nothing could be compared (no tensors, or the first ones differ in shape).
    Tensors pair up in order while their shapes match: a kernel that returns (y, mean, rstd)
    is compared on y with a reference that returns y. Integer outputs: the fraction of elements
    that differ. NaN or inf where the reference is finite is an error of inf."""
    pairs = []
    for a, b in zip(_tensors(out), _tensors(ref)):
        if a.shape != b.shape:
            break
        pairs.append((a, b))
    if not pairs:
        return None
    worst, tol = 0.0, 0.0
    for a, b in pairs:
        if not a.is_floating_point() and not b.is_floating_point():
            # integers (indices, quantized values): the fraction of elements that differ, which
            # ties and rounding halfway may touch in a few places, a wrong kernel in many
            worst, tol = max(worst, float((a != b).double().mean())), max(tol, AGREEMENT_INTEGERS)
            continue
        diff2, ref2 = 0.0, 0.0
        # In chunks of 16M elements, float64: a gradient of 8192 x 128256 logits is 1G elements,
        # and whole float64 copies of two of them would not fit beside the benchmark's inputs.
        for a_part, b_part in zip(a.detach().reshape(-1).split(1 << 24), b.detach().reshape(-1).split(1 << 24)):
            a_part, b_part = a_part.to(torch.float64), b_part.to(torch.float64)
            finite = torch.isfinite(b_part)
            if bool((~torch.isfinite(a_part) & finite).any()):
                return float("inf"), AGREEMENT.get(b.dtype, AGREEMENT_LOW_PRECISION)
            a_part, b_part = torch.where(finite, a_part, 0.0), torch.where(finite, b_part, 0.0)
            diff2 += float(torch.sum((a_part - b_part) ** 2))
            ref2 += float(torch.sum(b_part ** 2))
        err = diff2 ** 0.5 / max(ref2 ** 0.5, 1e-30)
        worst, tol = max(worst, err), max(tol, AGREEMENT.get(b.dtype, AGREEMENT_LOW_PRECISION))
    return worst, tol


@dataclass(frozen=True)
class Version:
    key: str  # "v1"
    what: str  # one line: what this version changes
    fn: Callable

    @property
    def label(self) -> str:
        return f"{self.key} {self.what}"


class Versions:
    """A kernel's numbered versions v1..vN, in order: one registry type for every lesson.

    VERSIONS = common.Versions("matmul")
    VERSIONS.add("v1", "naive: one program per output tile, no K tiling", matmul_v1)
    VERSIONS["v1"].fn(a, b); VERSIONS.get("v9") raises a ValueError that lists the versions.
    As `kernels=` of a Benchmark, every version is raced under its label ("v1 naive: ...").
    """

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, Version] = {}

    def add(self, key: str, what: str, fn: Callable) -> Callable:
        if key in self._items:
            raise ValueError(f"{self.what}: version {key!r} is added twice")
        self._items[key] = Version(str(key), what, fn)
        return fn

    def get(self, key) -> Version:
        key = str(key) if not isinstance(key, str) or key in self._items else key
        if key not in self._items and f"v{key}" in self._items:
            key = f"v{key}"
        if key not in self._items:
            raise ValueError(f"{self.what}: version must be one of {', '.join(self._items)}, got {key!r}")
        return self._items[key]

    def __getitem__(self, key) -> Version:
        return self.get(key)

    def __contains__(self, key) -> bool:
        try:
            self.get(key)
        except ValueError:
            return False
        return True

    def __iter__(self):
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def providers(self, only: Sequence[str] | None = None) -> dict[str, Callable]:
        return {v.label: v.fn for v in self if only is None or v.key in only}


@dataclass(frozen=True)
class Bar:
    """One perf bar: `kernel` at `case`, measured against `vs`, must reach `at_least`.

    vs = "baseline": fastest registered baseline time / kernel time (x);
         "baseline memory": the kernel's peak extra memory as % of the leanest baseline's; the bar
         is met at or below `at_least`, read as "at most" (needs memory=True). A percentage, not
         a ratio of bytes: an in-place kernel that allocates 100 KiB against 2 GiB would print
         20,000x, a number that says nothing; 0.005% says "next to nothing";
         "ceiling": the kernel's GB/s or TFLOP/s as % of the benchmark's ceiling (%);
         a kernel of the same benchmark: that kernel's time / this one's (x; a comparison of the
         lesson's own versions, e.g. autotuned vs the best hand-picked config).
    why: what the lesson measured about a known miss (printed with MISS and recorded).
    """

    kernel: str
    case: object
    vs: str
    at_least: float
    name: str = ""
    why: str = ""


@dataclass
class Provider:
    name: str
    role: str  # "kernel" or "baseline"
    fn: Callable | None  # fn(*inputs); None when skipped
    skipped: str | None = None  # why it is not raced here


@dataclass
class CaseResult:
    case: object
    label: str
    times: dict[str, Timing] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # kernel -> median of paired best-baseline ratios
    best_baseline: str | None = None
    memory: dict[str, int] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)  # GB/s or TFLOP/s
    baselines: list[str] = field(default_factory=list)  # the providers above that are baselines
    rounds: int = 0
    round_ms: dict[str, list[float]] = field(default_factory=dict)  # every round's time, per provider
    disagree: dict[str, str] = field(default_factory=dict)  # provider -> how its output differed from the reference's


class _GpuClock:
    """What the layer asks of the GPU; tests hand it a stub with the same methods."""

    def time(self, fn: Callable, timer: str, copies: list[Callable] | None = None) -> Timing:
        if timer == "graph":
            copies = copies or [fn]
            # About 40 ms of calls per replay: 200 calls of a 1 GiB add would replay for 150 ms each.
            per_call = bench(copies[0], warmup_ms=5, rep_ms=20).ms
            calls = max(len(copies), min(200, int(40 / max(per_call, 1e-3))) // len(copies) * len(copies))
            return bench_graphed(copies, calls=calls)
        if timer == "wall":
            return wall_timing(fn)
        return bench(fn)

    def ceiling(self, kind: str, dtype) -> float:
        if kind == "copy":
            return copy_bandwidth()
        if kind == "read":
            return read_bandwidth()
        if kind == "matmul":
            return matmul_rate(dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)
        raise ValueError(f"unknown ceiling {kind!r}")

    def memory(self, fn: Callable) -> int | None:
        return peak_extra_memory(fn)

    def compile(self, fn: Callable, inputs: tuple) -> Callable | None:
        return compiled(fn, *inputs)  # called once with the inputs: a failure prints why and gives None


def _label(case) -> str:
    if isinstance(case, tuple):
        return " x ".join(str(c) for c in case)
    return f"{case:,}" if isinstance(case, int) else str(case)


@dataclass
class Benchmark:
    """A declared benchmark: see the module docstring. `op=None` is a sweep of the lesson's own
    kernels (block sizes, configs): no baselines are raced, and no bar may be against one."""

    title: str
    op: str | None
    cases: Sequence
    setup: Callable[..., tuple]
    kernels: Mapping[str, Callable] | Versions
    reference: Callable | None = None
    baselines: Mapping[str, Callable] = field(default_factory=dict)
    quick_cases: Sequence | None = None
    cpu_cases: Sequence = ()
    nbytes: Callable[..., float] | None = None
    flops: Callable[..., float] | None = None
    ceiling: str | None = None  # "copy" (read + write streams), "read" (read-only), "matmul" (cuBLAS at dtype)
    dtype: torch.dtype | None = None
    grad: str | None = None  # None: forward; "fwd+bwd": forward and backward; "bwd": backward alone
    timer: str = "events"  # "events": do_bench (L2 flushed); "graph": per call in a CUDA graph; "wall": host time
    copies: int = 4  # timer="graph": setups bound in turn, so that no call finds its inputs in L2
    memory: bool = False  # also measure each provider's peak extra memory
    bars: Sequence[Bar] = ()
    label: Callable[[object], str] = _label
    plot: str | None = None  # file name under plots/; x = the case
    xlabel: str = ""
    logx: bool = False
    note: str = ""  # printed under the table: how to read it
    rounds: int = 3
    max_rounds: int = 7
    unavailable: str = ""  # why this GPU cannot run it (shared memory, say): printed instead of a table
    # Relative error that every provider's output may have against the reference's (the lesson's
    # reference, else the first baseline that ran) at each case: "auto" takes AGREEMENT by dtype;
    # None compares nothing, for providers that do not compute the same values (say why in a comment:
    # an in-place kernel that eats its input, a baseline that quantizes differently).
    agreement: float | str | None = "auto"

    def __post_init__(self):
        self.validate()

    # -- declaration checks (CPU, at import) --------------------------------------------------------

    @property
    def kernel_names(self) -> list[str]:
        return list(self.kernels.providers()) if isinstance(self.kernels, Versions) else list(self.kernels)

    @property
    def registry_op(self) -> registry.Op | None:
        return registry.op(self.op) if self.op is not None else None

    def baseline_names(self) -> list[str]:
        """Every baseline this benchmark races where it can: the registry's, nothing else."""
        return self.registry_op.baseline_names if self.registry_op else []

    def validate(self) -> None:
        where = f"benchmark '{self.title}'"
        if not self.kernel_names:
            raise ValueError(f"{where}: no kernels to measure")
        if self.ceiling not in (None, "copy", "read", "matmul"):
            raise ValueError(f"{where}: ceiling must be 'copy', 'read', 'matmul' or None, got {self.ceiling!r}")
        if self.ceiling and not (self.nbytes or self.flops):
            raise ValueError(f"{where}: a ceiling needs nbytes= or flops= to rate the kernels against it")
        if self.grad not in (None, "fwd+bwd", "bwd"):
            raise ValueError(f"{where}: grad must be None, 'fwd+bwd' or 'bwd', got {self.grad!r}")
        if self.timer not in ("events", "graph", "wall"):
            raise ValueError(f"{where}: timer must be 'events', 'graph' or 'wall', got {self.timer!r}")
        if not (self.agreement is None or self.agreement == "auto" or isinstance(self.agreement, (int, float))):
            raise ValueError(f"{where}: agreement must be 'auto', a relative error or None, got {self.agreement!r}")
        if self.timer == "graph" and self.grad:
            raise ValueError(f"{where}: timer='graph' times forward calls only")
        op = self.registry_op
        if op is not None:
            if (op.eager or op.compile) and self.reference is None:
                raise ValueError(f"{where}: op '{op.name}' races the lesson's reference (torch eager, "
                                 f"torch.compile): pass reference=")
            unknown = set(self.baselines) - set(op.baseline_names)
            if unknown:
                raise ValueError(f"{where}: baselines {sorted(unknown)} are not in the registry for op "
                                 f"'{op.name}' ({', '.join(op.baseline_names)}); add them to common/baselines.py")
            missing = [name for name in op.lesson_supplied if name not in self.baselines]
            if missing:
                raise ValueError(f"{where}: op '{op.name}' needs the lesson to supply {missing} in baselines=")
        elif self.baselines or self.reference is not None:
            raise ValueError(f"{where}: op=None is a sweep of the lesson's own kernels; name an op to race baselines")
        names = self.kernel_names
        for bar in self.bars:
            if bar.kernel not in names:
                raise ValueError(f"{where}: bar kernel {bar.kernel!r} is not one of the kernels {names}")
            if bar.case not in list(self.cases):
                raise ValueError(f"{where}: bar case {bar.case!r} is not one of the cases")
            if bar.vs not in BASELINE_VS and bar.vs not in names:
                raise ValueError(f"{where}: bar vs must be one of {BASELINE_VS} or a kernel of this benchmark, "
                                 f"got {bar.vs!r}")
            if bar.vs.startswith("baseline") and op is None:
                raise ValueError(f"{where}: a bar against a baseline needs an op (op=None races none)")
            if bar.vs == "baseline memory" and not self.memory:
                raise ValueError(f"{where}: a memory bar needs memory=True")
            if bar.vs == "ceiling" and not self.ceiling:
                raise ValueError(f"{where}: a bar against the ceiling needs ceiling=")

    # -- running ------------------------------------------------------------------------------------

    def _providers(self, inputs: tuple, quick: bool, clock) -> list[Provider]:
        kernels = self.kernels.providers() if isinstance(self.kernels, Versions) else dict(self.kernels)
        out = [Provider(name, "kernel", fn) for name, fn in kernels.items()]
        op = self.registry_op
        if op is None:
            return out
        if op.eager:
            out.append(Provider(registry.EAGER, "baseline", self.reference))
        if op.compile:
            if quick or clock is None:
                out.append(Provider(registry.COMPILE, "baseline", None,
                                    "raced in full runs (make bench); --quick and the interpreter skip compiling"))
            else:  # compiled once per case: one function called at many shapes collects guards
                fn = clock.compile(self.reference, inputs)
                out.append(Provider(registry.COMPILE, "baseline", fn,
                                    None if fn else "torch.compile failed here (its error is printed above)"))
        for b in op.baselines:
            fn = self.baselines.get(b.name, b.fn)
            reason = registry.peer_missing(b)
            if reason is None and b.gpu_only and not HAS_GPU:
                reason = "CUDA only"
            if reason is None and fn is None:
                reason = "not supplied by this lesson"
            out.append(Provider(b.name, "baseline", None if reason else fn, reason))
        return out

    def _grad_args(self, inputs: tuple):
        leaves = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
        if not leaves:
            raise ValueError(f"benchmark '{self.title}': grad={self.grad!r} needs inputs with requires_grad=True")
        return leaves

    def _wrap(self, fn: Callable, inputs: tuple) -> Callable[[], object]:
        """The zero-argument step that is timed: a forward call, or forward + backward."""
        if self.grad is None:
            return lambda: fn(*inputs)
        leaves = self._grad_args(inputs)

        def grad_out(out):  # the same upstream gradient for every provider, so their gradients compare
            if out.dim() == 0:
                return torch.ones_like(out)
            gen = torch.Generator(device=out.device).manual_seed(0)
            return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        if self.grad == "fwd+bwd":
            seed = {}

            def step():
                out = fn(*inputs)
                if "g" not in seed:
                    seed["g"] = grad_out(out)
                return torch.autograd.grad(out, leaves, seed["g"])
            return step
        out = fn(*inputs)
        g = grad_out(out)
        return lambda: torch.autograd.grad(out, leaves, g, retain_graph=True)

    def run(self, quick: bool, _clock=None) -> list[CaseResult]:
        """Time every provider on every case (GPU), or run each once on cpu_cases (interpreter).
        `_clock` replaces the GPU timer in the layer's own tests."""
        clock = _clock or (_GpuClock() if HAS_GPU else None)
        section(f"Benchmark: {self.title}")
        if clock is None:
            return self._smoke()
        if self.unavailable:
            print(f"not run on this GPU: {self.unavailable}")
            return []
        cases = list(self.quick_cases if self.quick_cases is not None else self.cases[:1]) if quick else list(self.cases)
        ceiling = clock.ceiling(self.ceiling, self.dtype) if self.ceiling else None
        if ceiling:
            what = {"copy": "device-to-device copy, GB/s (read + write)", "read": "read-only stream (a sum), GB/s",
                    "matmul": f"torch.matmul (cuBLAS) {_dtype(self.dtype) or 'fp16'}, TFLOP/s"}[self.ceiling]
            print(f"ceiling measured now: {ceiling:,.0f} ({what})")
        results, skipped = [], {}
        for case in cases:
            result = self._run_case(case, quick, clock, ceiling, skipped)
            results.append(result)
        self._table(results, ceiling, skipped)
        if not quick:
            self._bars(results, ceiling)
        if self.plot:
            self._plot(results, ceiling)
        return results

    def _smoke(self) -> list[CaseResult]:
        """The interpreter: every provider once on each cpu case, so the declarations run."""
        ran = set()
        for case in self.cpu_cases:
            inputs = self.setup(*case) if isinstance(case, tuple) else self.setup(case)
            result = CaseResult(case, self.label(case))
            checker = _Agreement(self, result)
            for p in checker.order(self._providers(inputs, quick=True, clock=None)):
                if p.fn is None:
                    continue
                try:
                    out = self._wrap(p.fn, inputs)()
                except Exception as err:
                    if p.role == "kernel":
                        raise
                    print(f"  {p.name}: skipped here ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                    continue
                checker.check(p.name, out)
                ran.add(p.name)
            checker.done()
            wrong = [name for name in result.disagree if name in self.kernel_names]
            if wrong:  # the interpreter runs the course's own kernels: a wrong output is a bug, not a timing
                raise AssertionError(f"benchmark '{self.title}' at {result.label}: " + "; ".join(
                    f"{name}: {result.disagree[name]}" for name in wrong))
            for counted in (self.nbytes, self.flops):
                if counted is not None:
                    counted(*inputs)
        where = f"on {', '.join(self.label(c) for c in self.cpu_cases)}" if self.cpu_cases else "(no cpu_cases)"
        print(f"{len(ran)} provider(s) ran once in the interpreter {where}: {', '.join(sorted(ran)) or 'none'}")
        print(require_gpu("Timings, bars and plots"))
        return []

    def _time_all(self, steps: dict, clock, copies: dict) -> dict[str, Timing]:
        return {name: clock.time(fn, self.timer, copies.get(name)) for name, fn in steps.items()}

    def _run_case(self, case, quick: bool, clock, ceiling, skipped: dict) -> CaseResult:
        inputs = self.setup(*case) if isinstance(case, tuple) else self.setup(case)
        result = CaseResult(case, self.label(case))
        providers = self._providers(inputs, quick, clock)
        steps, roles = {}, {}
        checker = _Agreement(self, result)
        for p in checker.order(providers):
            if p.fn is None:
                skipped[p.name] = p.skipped
                continue
            step = self._wrap(p.fn, inputs)
            try:
                out = step()  # warm-up: compiles and autotunes before timing; a baseline that cannot run is skipped
            except Exception as err:
                if p.role == "kernel":
                    raise
                skipped[p.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                continue
            checker.check(p.name, out)
            del out
            steps[p.name], roles[p.name] = step, p.role
        checker.done()
        steps = {p.name: steps[p.name] for p in providers if p.name in steps}  # timing order: as declared
        copies = {}
        if self.timer == "graph":  # more copies of the inputs, bound in turn inside the graph
            extra = [self.setup(*case) if isinstance(case, tuple) else self.setup(case) for _ in range(self.copies - 1)]
            for p in providers:
                if p.name in steps:
                    copies[p.name] = [steps[p.name]] + [self._wrap(p.fn, more) for more in extra]
        kernels = [n for n in steps if roles[n] == "kernel"]
        base = [n for n in steps if roles[n] == "baseline"]
        rounds: list[dict[str, Timing]] = []
        target = 1 if quick else self.rounds
        order = list(steps)
        while len(rounds) < target:
            names = order if len(rounds) % 2 == 0 else order[::-1]  # alternate: no provider always goes first
            rounds.append(self._time_all({n: steps[n] for n in names}, clock, copies))
            if len(rounds) == target and not quick and base and target < self.max_rounds:
                if self._ratio_spread(rounds, kernels, base) > SPREAD_FOR_MORE_ROUNDS:
                    target = min(self.max_rounds, target + 2)
        result.rounds, result.baselines = len(rounds), base
        for name in steps:
            ms = result.round_ms[name] = [r[name].ms for r in rounds]
            result.times[name] = Timing(statistics.median(ms), statistics.median(r[name].lo_ms for r in rounds),
                                        statistics.median(r[name].hi_ms for r in rounds))
        if base:
            result.best_baseline = min(base, key=lambda n: result.times[n].ms)
            for name in steps:
                result.ratios[name] = statistics.median(r[result.best_baseline].ms / r[name].ms for r in rounds)
        work = self.nbytes or self.flops
        if work:
            amount = work(*inputs)
            for name, t in result.times.items():
                result.rate[name] = t.gbps(amount) if self.nbytes else t.tflops(amount)
        if self.memory:
            for name, step in steps.items():
                result.memory[name] = clock.memory(step)
        return result

    @staticmethod
    def _ratio_spread(rounds, kernels, base) -> float:
        worst = 0.0
        for k in kernels:
            ratios = [min(r[b].ms for b in base) / r[k].ms for r in rounds]
            mid = statistics.median(ratios)
            worst = max(worst, (max(ratios) - min(ratios)) / (2 * mid))
        return worst

    def _unit(self) -> str:
        return "GB/s" if self.nbytes else "TFLOP/s" if self.flops else ""

    def _table(self, results: list[CaseResult], ceiling, skipped: dict) -> None:
        unit = self._unit()
        columns = ["case", "provider", "time" + (" per call" if self.timer != "events" else "")]
        if unit:
            columns.append(unit)
        if ceiling:
            columns.append(f"% {self.ceiling}")
        if self.op:
            columns.append("vs best baseline")
        if self.memory:
            columns.append("peak extra memory")
        table = Table(self.title, columns)
        for res in results:
            for i, (name, t) in enumerate(res.times.items()):
                row = [res.label if i == 0 else "", name + (" *" if name == res.best_baseline else ""), str(t)]
                if unit:
                    row.append(res.rate[name])
                if ceiling:
                    row.append(100 * res.rate[name] / ceiling)
                if self.op:
                    row.append(f"{res.ratios[name]:.2f}x" if name in res.ratios else "-")
                if self.memory:
                    mem = res.memory.get(name)
                    row.append(fmt_bytes(mem) if mem is not None else "-")
                table.add(*row)
        table.print()
        timer = {"events": "CUDA events, L2 flushed before each run",
                 "graph": f"per call inside a CUDA graph, {self.copies} input copies in turn (no L2 hits, no host)",
                 "wall": "host wall time per call (Python, checks and launch included)"}[self.timer]
        rounds = sorted({r.rounds for r in results})
        print(f"time: median ±half the 20-80% range; {timer}; providers alternated over "
              f"{'/'.join(map(str, rounds))} round(s)." + (
                  " vs best baseline: the fastest baseline's time / this time, median of the rounds' pairs "
                  "(* marks that baseline; above 1.00x is faster)." if self.op else ""))
        for name, why in skipped.items():
            print(f"not raced: {name}: {why}")
        if self.note:
            print(self.note)

    def _bars(self, results: list[CaseResult], ceiling) -> None:
        by_case = {r.case: r for r in results}
        for bar in self.bars:
            res = by_case.get(bar.case)
            if res is None or bar.kernel not in res.times:
                continue
            kernel_label = bar.kernel
            if bar.vs == "baseline":
                if res.best_baseline is None:
                    print(f"perf bar '{bar.name or bar.kernel}': no baseline could run here; not stated")
                    continue
                value, unit, against = res.ratios[bar.kernel], "x", res.best_baseline
                what = f"vs the fastest baseline ({against}), its time / this time"
            elif bar.vs == "baseline memory":
                mems = {n: res.memory[n] for n in res.baselines if res.memory.get(n) is not None}
                if not mems or not res.memory.get(bar.kernel):
                    continue
                against = min(mems, key=mems.get)
                value, unit = 100 * res.memory[bar.kernel] / max(mems[against], 1), "%"
                what = (f"peak extra memory, % of the leanest baseline's ({against}: "
                        f"{fmt_bytes(mems[against])}; this kernel: {fmt_bytes(res.memory[bar.kernel])})")
            elif bar.vs == "ceiling":
                value, unit, against = 100 * res.rate[bar.kernel] / ceiling, "%", f"{self.ceiling} ceiling"
                what = f"% of the measured {self.ceiling} {self._unit()}"
            else:
                # paired like the baseline ratio: each round's two times saw the same clocks
                value = statistics.median(a / b for a, b in zip(res.round_ms[bar.vs], res.round_ms[bar.kernel]))
                unit, against = "x", bar.vs
                what = f"vs {bar.vs}, its time / this time"
            name = bar.name or f"{self.title}, {kernel_label} at {res.label}: {what}"
            reason = bar.why
            lower_is_better = bar.vs == "baseline memory"
            if not reason and value > bar.at_least and lower_is_better:
                reason = (f"measured: {bar.kernel} {fmt_bytes(res.memory[bar.kernel])} of extra memory vs "
                          f"{against} {fmt_bytes(res.memory[against])}")
            elif not reason and value < bar.at_least and bar.vs != "ceiling":
                reason = self._measured_reason(res, bar.kernel, against, ceiling)
            perf_bar(name, value, bar.at_least, unit, higher_is_better=not lower_is_better, record=dict(
                kernel=bar.kernel, baseline=against, shape=res.label, dtype=_dtype(self.dtype), vs=bar.vs,
                op=self.op, benchmark=self.title), why=reason, wrong=res.disagree.get(bar.kernel, ""))

    def _measured_reason(self, res: CaseResult, kernel: str, against: str, ceiling) -> str:
        unit = self._unit()
        if not unit:
            return f"{against} takes {res.times[against].ms:.4g} ms, the kernel {res.times[kernel].ms:.4g} ms"
        parts = [f"{name} {res.rate[name]:,.0f} {unit}" + (f" ({100 * res.rate[name] / ceiling:.0f}% of "
                                                           f"{self.ceiling})" if ceiling else "")
                 for name in (kernel, against)]
        return "measured: " + " vs ".join(parts)

    def _plot(self, results: list[CaseResult], ceiling) -> None:
        unit = self._unit() or "ms"
        numeric = all(isinstance(r.case, (int, float)) for r in results)
        xs = [r.case for r in results] if numeric else list(range(len(results)))
        fig, ax = new_figure(self.title, self.xlabel or "case", unit, logx=self.logx and numeric)
        names = list(dict.fromkeys(n for r in results for n in r.times))
        for name in names:
            ys = [(r.rate.get(name) if unit != "ms" else r.times[name].ms) if name in r.times else float("nan")
                  for r in results]
            ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name in self.baseline_names() else "-")
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle=":", label=f"{self.ceiling} (measured)")
        if not numeric:
            ax.set_xticks(xs, [r.label for r in results], fontsize=7)
        ax.legend(fontsize=7)
        save_plot(fig, self.plot)


class _Agreement:
    """Compares every provider's warm-up output with the reference's, case by case: the lesson's
    reference (torch eager) when it races, else the first baseline that runs. Only the
    reference's output is kept; a disagreement is printed and recorded in result.disagree (a bar
    on that kernel and case is then a MISS). A sweep (op=None) compares nothing: its kernels may
    be different ops side by side, and each is raced against its baselines elsewhere."""

    def __init__(self, bench: Benchmark, result: CaseResult):
        self.bench, self.result = bench, result
        self.active = bench.agreement is not None and bench.op is not None
        self.reference_name, self.reference_out, self.uncompared = None, None, []

    @staticmethod
    def order(providers: list[Provider]) -> list[Provider]:
        """The warm-up order: torch eager, the other baselines, then the kernels as declared (a
        kernel that overwrites its inputs, declared last, cannot change what the others see)."""
        return ([p for p in providers if p.name == registry.EAGER]
                + [p for p in providers if p.role == "baseline" and p.name != registry.EAGER]
                + [p for p in providers if p.role == "kernel"])

    def check(self, name: str, out) -> None:
        if not self.active:
            return
        if self.reference_name is None:
            self.reference_name, self.reference_out = name, out
            return
        found = disagreement(out, self.reference_out)
        if found is None:
            self.uncompared.append(name)
            return
        err, tol = found
        tol = tol if self.bench.agreement == "auto" else float(self.bench.agreement)
        if not err <= tol:  # NaN fails too
            self.result.disagree[name] = f"relative error {err:.3g} against {self.reference_name} (tolerance {tol:g})"

    def done(self) -> None:
        self.reference_out = None  # free it before the timings and the memory measurements
        for name, how in self.result.disagree.items():
            print(f"OUTPUT DIFFERS at {self.result.label}: {name}: {how}")
        if self.uncompared:
            print(f"output not compared at {self.result.label} (no tensors, or shapes unlike {self.reference_name}'s): "
                  f"{', '.join(self.uncompared)}")


def _dtype(dtype) -> str | None:
    return dtype_name(dtype) if dtype is not None else None


def run_benchmarks(benchmarks: Sequence[Benchmark], quick: bool) -> dict[str, list[CaseResult]]:
    """Run a lesson's declared benchmarks in order; the results by title, for lessons that print more."""
    return {b.title: b.run(quick) for b in benchmarks}
