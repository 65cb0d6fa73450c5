"""Memory traffic: what an op must move, what PyTorch actually moves, and what that achieves.

Memory-bound kernels are judged by bytes, so every lesson prints three things:
  - the modelled minimum: each input read once, each output written once (`min_bytes`);
  - what the PyTorch reference moves, op by op, counted with a TorchDispatchMode
    (`count_torch_traffic`; works on the CPU too, so the interpreter run shows it);
  - achieved GB/s and % of the copy bandwidth measured in the same run (timing.copy_bandwidth).
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .device import DEVICE, HAS_GPU

# Ops that allocate or reinterpret memory without launching a kernel that touches the data.
_NO_DATA_MOVED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                  "lift_fresh", "detach", "alias", "_local_scalar_dense", "sym_size", "sym_stride",
                  "sym_numel", "sym_storage_offset", "is_same_size", "size", "stride"}


# In-place ops that overwrite self without reading it: self is an output only. (add_, mul_ and
# the other in-place arithmetic read self first, so they count it both ways.)
_WRITE_ONLY_INPLACE = {"copy_", "zero_", "fill_", "normal_", "uniform_", "random_", "exponential_",
                       "bernoulli_", "geometric_", "cauchy_", "log_normal_"}


def nbytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor covers: a stride-0 (expanded) dimension repeats the same elements,
    so a bias expanded to (M, N) is N elements, not M * N."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size() if t.numel() else 0


def min_bytes(*tensors: torch.Tensor) -> int:
    """Modelled minimum traffic: every tensor given (inputs and outputs) moved exactly once."""
    return sum(nbytes(t) for t in tensors)


@dataclass
class OpTraffic:
    op: str
    read: int
    written: int


@dataclass
class TorchTraffic:
    """What the PyTorch reference did: one record per aten op that moved data."""

    ops: list[OpTraffic] = field(default_factory=list)

    @property
    def kernels(self) -> int:
        return len(self.ops)

    @property
    def read(self) -> int:
        return sum(o.read for o in self.ops)

    @property
    def written(self) -> int:
        return sum(o.written for o in self.ops)

    @property
    def total(self) -> int:
        return self.read + self.written

    def summary(self) -> str:
        names = ", ".join(o.op for o in self.ops)
        return (f"{self.kernels} aten op(s) [{names}]: reads {fmt_bytes(self.read)}, "
                f"writes {fmt_bytes(self.written)}, total {fmt_bytes(self.total)}")


class _TrafficCounter(TorchDispatchMode):
    def __init__(self, record: TorchTraffic):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_DATA_MOVED:
            return out
        # Tensors the op writes into (out=, or self for in-place ops) are outputs, not inputs,
        # unless the op is in-place arithmetic (add_), which reads self before writing it.
        written_args = set()
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = kwargs.get(arg.name, args[i] if i < len(args) and not arg.kwarg_only else None)
                if isinstance(value, torch.Tensor) and (not name.endswith("_") or name in _WRITE_ONLY_INPLACE):
                    written_args.add(id(value))
        inputs = {id(t): t for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and id(t) not in written_args}
        outputs = {id(t): t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        self.record.ops.append(OpTraffic(name, sum(map(nbytes, inputs.values())),
                                         sum(map(nbytes, outputs.values()))))
        return out


def count_torch_traffic(fn: Callable, *args, **kwargs) -> TorchTraffic:
    """Run fn(*args) once and count, per aten op, the bytes read and written and the op count.

    Each aten op is one kernel launch in eager PyTorch (on the GPU), so the op count is the
    launch count. Views (reshape, transpose, expand) move nothing and are not counted.
    """
    record = TorchTraffic()
    with _TrafficCounter(record):
        fn(*args, **kwargs)
    return record


def peak_extra_memory(fn: Callable, *args, **kwargs) -> int | None:
    """Bytes allocated by fn(*args) above what was allocated before it ran (GPU only)."""
    if not HAS_GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(DEVICE) - before


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

