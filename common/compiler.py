"""What Triton made of a kernel: registers, spills, shared memory, occupancy, load widths, IR (issue 16).

    report = common.inspect_kernel(add_kernel, x, y, out, n, BLOCK_SIZE=1024)
    print(report)                          # registers, spills, shared memory, occupancy, loads
    print(report.excerpt("ttgir", "#blocked"))   # the layouts Triton chose

The kernel is compiled, not launched: Triton's own compiler with the ptxas it ships, for this
GPU, or for sm_90 (an H100) without one (`arch=` picks another card: 75, 80, 86, 89, 90). So a
learner on a CPU sees the same registers and PTX as one on the GPU. Registers and local memory
(where spills go) come from the cubin, read with the cuobjdump Triton ships: the numbers the
driver reports as `n_regs` and `n_spills` once it loads the kernel.

Under the CPU interpreter the lesson's @triton.jit functions run on numpy. A kernel that calls
no other @triton.jit function is compiled in this process all the same; one that does (the
compiler cannot take the interpreter's functions) is compiled in a child process
(COURSE_INTERPRETER=0) that imports the kernel's file: a few seconds for all of a lesson's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .capability import CARD_BY_ARCH, current_arch
from .device import INTERPRETER

DEFAULT_ARCH = 90  # without a GPU: compile as for an H100, the card the course's numbers come from


def compile_for(fn, arch: int, args: tuple, meta: dict):
    """triton.compile of `fn` as `fn[grid](*args, **meta)` would compile it, for sm_<arch>.

    The argument specialisation (pointer dtypes, integers divisible by 16, constexprs) comes from
    the JIT's own binder, so the kernel is the one a launch on that card would build; only the
    target is ours instead of the driver's (there may be no GPU to ask). Of a tensor the compiler
    sees its dtype and whether its address is a multiple of 16 (tensors on the "meta" device are
    at 0: aligned), which decides the width of its loads (lesson 02).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, meta = _unwrap(fn, args, meta)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _unwrap(fn, args: tuple, meta: dict):
    """The @triton.jit function under triton.autotune / triton.heuristics, and the meta-parameters
    a launch would add: the heuristics' values, the autotuner's first config where meta names none."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    meta = dict(meta)
    while isinstance(fn, (Autotuner, Heuristics)):
        if isinstance(fn, Heuristics):
            for name, rule in fn.values.items():
                meta.setdefault(name, rule({**dict(zip(fn.arg_names, args)), **meta}))
        else:
            config = fn.configs[0]
            if not set(config.kwargs) <= set(meta):
                meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages, **meta}
        fn = fn.fn
    return fn, meta


@dataclass
class KernelReport:
    """What one compiled kernel needs of an SM, and what its code does (see the module docstring)."""
    name: str
    arch: int
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory one program uses
    registers: int | None  # per thread
    local_bytes: int | None  # per thread: spilled registers (and local arrays), in slow local memory
    loads: Counter = field(default_factory=Counter)  # "128-bit ld.global": static count in the PTX
    stores: Counter = field(default_factory=Counter)
    features: dict = field(default_factory=dict)  # "cp.async": True, ...
    asm: dict = field(default_factory=dict)  # "ttgir", "ptx", ... text
    note: str = ""

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def occupancy(self) -> tuple[int, str, dict]:
        """(programs resident per SM, the limit that binds, every limit's programs) on this card."""
        card = CARD_BY_ARCH[self.arch]
        limits = {"threads": card.max_threads_per_sm // self.threads, "programs": card.max_programs_per_sm}
        if self.registers is not None:
            per_warp = -(-self.registers * 32 // 256) * 256  # allocated per warp, 256 registers at a time
            limits["registers"] = card.registers_per_sm // per_warp // self.num_warps
        if self.shared:
            limits["shared memory"] = card.shared_per_sm // (self.shared + card.reserved_shared_per_program)
        binding = min(limits, key=limits.get)
        return limits[binding], binding, limits

    def occupancy_pct(self) -> float:
        programs, _, _ = self.occupancy()
        return 100 * programs * self.num_warps * 32 / CARD_BY_ARCH[self.arch].max_threads_per_sm

    def widest_load_bits(self) -> int:
        return max((int(k.split("-")[0]) for k in self.loads), default=0)

    def widest_store_bits(self) -> int:
        return max((int(k.split("-")[0]) for k in self.stores), default=0)

    def excerpt(self, ir: str = "ttgir", pattern: str | None = None, lines: int = 8) -> str:
        """The first `lines` lines of one IR ("ttir", "ttgir", "llir", "ptx") matching `pattern`
        (a regex), or of the kernel's body without one."""
        if ir not in self.asm:
            raise ValueError(f"ir must be one of {sorted(self.asm)}, got {ir!r}")
        text = [line for line in self.asm[ir].splitlines() if line.strip()]
        if pattern:
            text = [line for line in text if re.search(pattern, line)]
        return "\n".join(line[:160] for line in text[:lines])

    def summary(self) -> str:
        programs, binding, _ = self.occupancy()
        regs = "?" if self.registers is None else str(self.registers)
        spills = "?" if self.local_bytes is None else f"{self.local_bytes} B"
        loads = ", ".join(f"{n} x {k}" for k, n in sorted(self.loads.items(), reverse=True)) or "none"
        used = ", ".join(k for k, v in self.features.items() if v) or "none of cp.async, TMA, wgmma, mma"
        return (f"{self.name} on sm_{self.arch}: {self.num_warps} warps, {self.num_stages} stages; "
                f"{regs} registers/thread, {spills} local (spills); {self.shared:,} B shared; "
                f"{programs} programs/SM ({self.occupancy_pct():.0f}% of the threads, bound by {binding}); "
                f"loads: {loads}; uses: {used}" + (f" ({self.note})" if self.note else ""))

    __str__ = summary

    def to_json(self) -> dict:
        return dict(name=self.name, arch=self.arch, num_warps=self.num_warps, num_stages=self.num_stages,
                    shared=self.shared, registers=self.registers, local_bytes=self.local_bytes,
                    loads=dict(self.loads), stores=dict(self.stores), features=self.features, asm=self.asm,
                    note=self.note)

    @classmethod
    def from_json(cls, d: dict) -> "KernelReport":
        return cls(**{**d, "loads": Counter(d["loads"]), "stores": Counter(d["stores"])})


_FEATURES = {  # what a PTX instruction says about how the kernel moves data and multiplies
    "TMA": r"cp\.async\.bulk\.tensor",
    "wgmma": r"wgmma\.mma_async",
    "cp.async": r"cp\.async\.(ca|cg)\.shared",
    "mma": r"\bmma\.sync",
    "ldmatrix": r"ldmatrix\.sync",
}
_MEMORY_OP = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "b32": 32, "u32": 32, "s32": 32,
         "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def memory_ops(ptx: str) -> tuple[Counter, Counter]:
    """Global loads and stores in the PTX by width: Counter({"128-bit ld.global": 2, ...}).
    A static count of instructions (a loop's body counts once), which is what the width shows."""
    loads, stores = Counter(), Counter()
    for op, suffixes in _MEMORY_OP.findall(ptx):
        parts = suffixes.strip(".").split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((_BITS[p] for p in parts if p in _BITS), 0)
        (loads if op == "ld" else stores)[f"{vector * bits}-bit {op}.global"] += 1
    return loads, stores


def resource_usage(cubin: bytes) -> tuple[int | None, int | None, str]:
    """(registers per thread, local memory bytes per thread, "") from cuobjdump, or (None, None, why)."""
    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
    except Exception as e:  # noqa: BLE001  (older Triton: no knobs)
        return None, None, f"no cuobjdump to read registers ({type(e).__name__})"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        try:
            out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return None, None, f"cuobjdump failed: {e}"
    regs, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    if not regs:
        return None, None, "cuobjdump printed no register count"
    return int(regs.group(1)), int(local.group(1)) if local else None, ""


def _report(compiled, name: str, arch: int, note: str = "") -> KernelReport:
    md = compiled.metadata
    ptx = compiled.asm.get("ptx", "")
    registers, local, why = resource_usage(compiled.asm["cubin"])
    loads, stores = memory_ops(ptx)
    return KernelReport(
        name=name, arch=arch, num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
        registers=registers, local_bytes=local, loads=loads, stores=stores,
        features={k: bool(re.search(p, ptx)) for k, p in _FEATURES.items()},
        asm={k: v for k, v in compiled.asm.items() if isinstance(v, str) and k != "source"},
        note="; ".join(x for x in (note, why) if x))


def _target(arch: int | None) -> tuple[int, str]:
    if arch is not None:
        if arch not in CARD_BY_ARCH:
            raise ValueError(f"arch must be one of {sorted(CARD_BY_ARCH)} (the course's cards), got {arch}")
        return arch, ""
    here = current_arch()
    if here is None:
        return DEFAULT_ARCH, f"no GPU here: compiled for sm_{DEFAULT_ARCH} (H100)"
    if here not in CARD_BY_ARCH:  # a card the table does not know: its nearest older one's limits
        known = max((a for a in CARD_BY_ARCH if a <= here), default=min(CARD_BY_ARCH))
        return known, f"sm_{here} is not in the course's table: compiled for sm_{known}"
    return here, ""


def inspect_kernel(fn, *args, arch: int | None = None, **meta) -> KernelReport:
    """Compile `fn` as `fn[grid](*args, **meta)` would be, and report what the compiler made.
    args: the launch's arguments: tensors of any device ("meta" ones too), of which only the dtype
    and the address's alignment matter; nothing is launched or allocated."""
    return inspect_kernels([(fn, args, meta)], arch=arch)[0]


class InspectionUnavailable(ValueError):
    """The kernel cannot be compiled here: under the interpreter, from a notebook cell, where the
    in-process compile fails (Triton 3.9's interpreter, or a kernel calling other @triton.jit ones)."""


def inspect_kernels(calls: list, arch: int | None = None, skip_with_reason: bool = False) -> list[KernelReport] | None:
    """inspect_kernel for several (fn, args, meta) launches: under the interpreter, in one child
    process for those that need it. skip_with_reason: where they cannot be compiled here, print
    why and return None (what a lesson does) instead of raising InspectionUnavailable."""
    try:
        return _inspect_kernels(calls, arch)
    except InspectionUnavailable as err:
        if not skip_with_reason:
            raise
        print(f"What the compiler made: skipped here. {err}")
        return None


def inspect_kernels_by_key(calls: dict, arch: int | None = None) -> dict | None:
    """inspect_kernels for {key: (fn, args, meta)}: {key: KernelReport}, or None (with the reason
    printed) where nothing can be compiled here. All in one go; if that fails, one at a time, and a
    call whose compile fails is left out with the compiler's last line printed: a compiler failure
    is a finding to show (Triton 3.8's Hopper warp-specialization pass stops with "PassManager::run
    failed" on some kernels), not a crash."""
    keys = list(calls)
    try:
        got = inspect_kernels(list(calls.values()), arch=arch, skip_with_reason=True)
        return None if got is None else dict(zip(keys, got))
    except Exception:  # noqa: BLE001  (find which one fails, below)
        reports = {}
    for key, call in calls.items():
        try:
            reports[key] = _inspect_kernels([call], arch)[0]
        except Exception as err:  # noqa: BLE001  (see the docstring)
            print(f"{' '.join(map(str, key)) if isinstance(key, tuple) else key}: the compile for sm_{arch} failed "
                  f"({type(err).__name__}: {str(err).strip().splitlines()[-1][:200]})")
    return reports


def _inspect_kernels(calls: list, arch: int | None) -> list[KernelReport]:
    target, note = _target(arch)
    reports: list = [None] * len(calls)
    in_child = {}
    for i, (fn, args, meta) in enumerate(calls):
        jit, meta = _unwrap(fn, args, meta)
        pointers = tuple(_Pointer.of(a) if _is_tensor(a) else a for a in args)
        meta = {k: _Pointer.of(v) if _is_tensor(v) else v for k, v in meta.items()}  # a tensor passed by keyword
        if not INTERPRETER:
            reports[i] = _report(compile_for(jit, target, pointers, meta), _name(fn), target, note)
            continue
        # The interpreter's function, compiled as a @triton.jit one: works unless it calls other
        # @triton.jit functions (the interpreter's, which the compiler cannot take): those compile
        # in a child process that imports the kernel's file without the interpreter.
        try:
            from triton.runtime.jit import JITFunction
            with _real_triton_language():
                compiled = compile_for(JITFunction(jit.fn), target, pointers, meta)
            reports[i] = _report(compiled, _name(fn), target, note)
        except Exception as err:  # noqa: BLE001  (the child process compiles it, or says why not)
            in_child[i] = _spec(jit, args, meta, err)
    if in_child:
        for i, d in zip(in_child, _compile_in_child(list(in_child.values()), target)):
            reports[i] = KernelReport.from_json({**d, "note": "; ".join(x for x in (note, d["note"]) if x)})
    return reports


def _language_objects() -> list:
    import triton.language as tl
    objects = [tl, tl.core, tl.math, tl.tensor, getattr(tl.core, "tensor_descriptor_base", None)]
    return [obj for obj in objects if obj is not None]


# triton.language as it was when common was imported, before any kernel ran (see below).
_LANGUAGE = [(obj, dict(vars(obj))) for obj in _language_objects()] if INTERPRETER else []
_ABSENT = object()


@contextlib.contextmanager
def _real_triton_language():
    """The compiler needs triton.language's own functions. The interpreter swaps in numpy ones
    while a kernel runs and swaps them back after, but only in the modules the kernel's own file
    sees. tl.sum, tl.max and the other reductions are @triton.jit functions of
    triton/language/standard.py: running one patches triton.language.core, and nothing restores
    it (Triton 3.6 to 3.8; a @triton.jit function called from plain Python does the same). An
    in-process compile after that fails ("'block_argument' object has no attribute 'dtype'")
    unless Triton's cache already holds the kernel. So the functions saved at import are put back
    for the compile, and whatever was there before is put back after it."""
    swapped = []
    for obj, saved in _LANGUAGE:
        now = vars(obj)
        for name, value in saved.items():
            current = now.get(name, _ABSENT)
            if current is not value:
                swapped.append((obj, name, current))
                setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in swapped:
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def _name(fn) -> str:
    import inspect
    while not inspect.isfunction(fn) and hasattr(fn, "fn"):  # JITFunction, autotune, heuristics, interpreter
        fn = fn.fn
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass(frozen=True)
class _Pointer:
    """A tensor argument as the compiler sees it: its dtype and its address (only the address
    modulo 16 matters). Nothing is allocated: the compile needs no memory."""
    dtype: object
    address: int

    def data_ptr(self) -> int:
        return self.address

    @classmethod
    def of(cls, tensor) -> "_Pointer":
        return cls(tensor.dtype, tensor.data_ptr())


def _is_tensor(a) -> bool:
    import torch
    return isinstance(a, torch.Tensor)


# -- the interpreter: compile in a child process -------------------------------------------------

def _spec(fn, args: tuple, meta: dict, why: Exception) -> dict:
    """A launch described in JSON for the child: the kernel's file and function name, tensors as
    dtype and alignment. `why`: the in-process compile's error, for the message without a file."""
    import inspect

    import torch

    python_fn = getattr(fn, "fn", fn)
    try:
        path = inspect.getsourcefile(python_fn)
    except TypeError:
        path = None
    if not path or not Path(path).is_file():
        raise InspectionUnavailable(f"inspect_kernel: {_name(fn)} could not be compiled under the interpreter "
                         f"({type(why).__name__}: {str(why).splitlines()[0][:200] if str(why) else ''}) and has no "
                         f"source file to compile it from in a child process (a kernel defined in a notebook "
                         f"cell?); run with COURSE_INTERPRETER=0, or on a GPU")
    def encode(a):
        if isinstance(a, (torch.Tensor, _Pointer)):
            return {"dtype": str(a.dtype).removeprefix("torch."), "address_mod_16": a.data_ptr() % 16}
        if isinstance(a, (int, float, bool, str)) or a is None:
            return a
        raise ValueError(f"inspect_kernel: cannot pass a {type(a).__name__} argument to the compiler")
    return {"path": path, "name": python_fn.__name__, "args": [encode(a) for a in args],
            "meta": {k: encode(v) for k, v in meta.items()}}


def _compile_in_child(specs: list[dict], arch: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COURSE_AUTO_INTERPRET")}
    env["COURSE_INTERPRETER"] = "0"
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "common.compiler", str(arch)], input=json.dumps(specs),
                          capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"inspect_kernel's compile (child process, COURSE_INTERPRETER=0) failed:\n"
                           f"{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(arch: int) -> None:
    import torch

    from .lessons import load_module

    reports = []
    modules: dict = {}
    for spec in json.loads(sys.stdin.read()):
        module = modules.get(spec["path"]) or load_module(Path(spec["path"]), name=f"inspected_{len(modules)}")
        modules[spec["path"]] = module
        fn = _find_jit(module, spec["name"])
        def decode(a):
            return _Pointer(getattr(torch, a["dtype"]), 1024 + a["address_mod_16"]) if isinstance(a, dict) else a
        args = tuple(decode(a) for a in spec["args"])
        meta = {k: decode(v) for k, v in spec["meta"].items()}
        reports.append(_report(compile_for(fn, arch, args, meta), spec["name"], arch).to_json())
    print(json.dumps(reports))


def _find_jit(module, name: str):
    from triton.runtime.jit import JITFunction

    for value in vars(module).values():
        while not isinstance(value, JITFunction) and hasattr(value, "fn"):
            value = value.fn  # through triton.autotune / triton.heuristics
        if isinstance(value, JITFunction) and value.fn.__name__ == name:
            return value
    raise ValueError(f"no @triton.jit function {name} in {module.__file__}")


if __name__ == "__main__":
    _child(int(sys.argv[1]))
