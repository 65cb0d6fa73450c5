"""What each GPU the course supports can hold, and pruning configs to it (issue 21).

The course runs on T4 (sm_75), A100 (sm_80), RTX 3090 / A10 (sm_86), L4 / RTX 4090 (sm_89) and
H100 / H200 (sm_90). Their one limit that config lists keep running into is the shared memory
one program (thread block) may use: Triton compiles a config that needs more without complaint,
and the launch then fails with OutOfResources. So every config list goes through
`prune_configs_by_shared_memory` first, with the estimate of what a config needs:

    configs = prune_configs_by_shared_memory(v4_configs(), element_size=2)      # a fixed list
    triton.autotune(configs, key=[...], prune_configs_by={
        "early_config_prune": prune_configs_by_shared_memory})                   # or per call

tests/test_capabilities.py compiles every lesson kernel for each card with Triton's bundled
ptxas and checks these estimates against the compiler's own `metadata.shared`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import triton
import triton.language as tl

from .device import HAS_GPU

KiB = 1024


@dataclass(frozen=True)
class Card:
    arch: int  # compute capability as one number: 75 for sm_75
    names: str  # the cards of that capability the course is run on
    max_shared_per_block: int  # bytes of shared memory one program may use (the opt-in maximum)
    # What an SM holds at once, which decides how many programs run on it together (occupancy,
    # common/compiler.py): threads, programs, shared memory; 64 K registers on every one of them.
    max_threads_per_sm: int
    max_programs_per_sm: int
    shared_per_sm: int
    registers_per_sm: int = 65536
    reserved_shared_per_program: int = 1 * KiB  # kept by CUDA for each resident block on sm_80+


# From the CUDA C++ Programming Guide ("Compute Capabilities": per-capability technical
# specifications; shared memory per SM and the opt-in maximum per block, 64 KB on Turing, 163 KB
# on 8.0 and 99 KB on 8.6 / 8.9) and the Hopper Tuning Guide (227 KB on 9.0). The per-block
# maximum is what torch reports as shared_memory_per_block_optin and Triton's driver as
# max_shared_mem; the SM has 1 KB more, which CUDA keeps for itself.
CARDS = (
    Card(75, "T4", 64 * KiB, 1024, 16, 64 * KiB, reserved_shared_per_program=0),
    Card(80, "A100", 163 * KiB, 2048, 32, 164 * KiB),
    Card(86, "RTX 3090 / A10 / A40", 99 * KiB, 1536, 16, 100 * KiB),
    Card(89, "L4 / RTX 4090 / L40S", 99 * KiB, 1536, 24, 100 * KiB),
    Card(90, "H100 / H200", 227 * KiB, 2048, 32, 228 * KiB),
)
CARD_BY_ARCH = {card.arch: card for card in CARDS}


def current_arch() -> int | None:
    """This GPU's compute capability as one number (90 for an H100), None without a GPU."""
    if not HAS_GPU:
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


# What kernels built on device-side tensor descriptors (TMA) need from this Triton. Read from its
# API, not its version number: both arrived around Triton 3.4 (3.6 and 3.8 have them).
HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
RANGE_OPTIONS = frozenset(inspect.signature(tl.range.__init__).parameters)


def tma_unavailable(range_options: Iterable[str] = ()) -> str:
    """Why kernels that use tl.make_tensor_descriptor (and the tl.range arguments named, e.g.
    "warp_specialize") cannot run here, "" where they can: this Triton lacks one of them, or the
    GPU is older than sm_90. The interpreter runs such kernels (as masked loads)."""
    missing = [f"tl.range's {name} argument" for name in range_options if name not in RANGE_OPTIONS]
    if not HAS_DESCRIPTORS:
        missing.insert(0, "tl.make_tensor_descriptor")
    if missing:
        return f"Triton {triton.__version__} has no {' and no '.join(missing)} (Triton 3.4 and later have them)"
    arch = current_arch()
    if arch is not None and arch < 90:
        return f"this GPU is sm_{arch}: TMA needs sm_90 (Hopper) or later"
    return ""


def shared_memory_limit(arch: int | None = None) -> int | None:
    """Bytes of shared memory one program may use: on `arch` (from the table), or on this GPU
    (what the driver reports); None without a GPU and without an arch: nothing to prune against."""
    if arch is not None:
        if arch not in CARD_BY_ARCH:
            raise ValueError(f"sm_{arch} is not one of the course's cards: "
                             + ", ".join(f"sm_{c.arch} ({c.names})" for c in CARDS))
        return CARD_BY_ARCH[arch].max_shared_per_block
    if not HAS_GPU:
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


_LAUNCH_DEFAULTS = {"num_warps": 4, "num_stages": 3}  # Triton's, for a launch that names neither


def _value(config, name: str):
    """A meta-parameter or launch option of a triton.Config or of a plain dict of them."""
    if isinstance(config, dict):
        return config.get(name, _LAUNCH_DEFAULTS.get(name)) if name in _LAUNCH_DEFAULTS else config[name]
    if name in ("num_warps", "num_stages"):
        return getattr(config, name)
    return config.kwargs[name]


def pipeline_buffers(num_stages: int, arch: int | None) -> int:
    """How many K steps of tiles a tl.dot loop keeps in shared memory at once (Triton 3.6-3.8).

    sm_90 (wgmma reads both operands from shared memory): num_stages. sm_80-sm_89 (cp.async into
    shared memory, then ldmatrix into registers): num_stages - 1, the steps in flight. sm_75: one,
    whatever num_stages says: Triton 3.x has no tensor-core path below sm_80, tl.dot runs on the
    CUDA cores (FMA) and nothing is pipelined. An unknown arch gets num_stages, the most of any.
    """
    if arch is None or arch >= 90:
        return num_stages
    if arch >= 80:
        return max(1, num_stages - 1)
    return 1


def loop_shared_memory(per_step: int, num_stages: int, element_size: int, *, arch: int | None = None,
                       resident: int = 0, tensor_cores: bool = True) -> int:
    """Bytes of shared memory of a loop whose loads feed tl.dot: the `resident` elements loaded
    once before it (a query tile kept for the whole loop) and pipeline_buffers(num_stages, arch)
    copies of the `per_step` elements each step loads.

    Where tl.dot runs on the CUDA cores (sm_75 always; fp32 with input_precision="ieee" on any
    card: tensor_cores=False) its operands are staged as fp32, 4 bytes an element, and the loop is
    pipelined as on sm_80 (no wgmma) where cp.async exists, not at all on sm_75.
    arch=None: the most any card needs (sm_75's fp32 copies or sm_90's num_stages buffers).
    """
    if arch is None:
        return max(loop_shared_memory(per_step, num_stages, element_size, arch=a, resident=resident,
                                      tensor_cores=tensor_cores) for a in (75, 90))
    if not tensor_cores or arch < 80:
        element_size = 4
        arch = min(arch, 89)
    return (resident + pipeline_buffers(num_stages, arch) * per_step) * element_size


def matmul_shared_memory(config, element_size: int, *, arch: int | None = None, b_tiles: int = 1,
                         b_element_size: int | None = None, tensor_cores: bool = True, **launch_args) -> int:
    """Bytes of shared memory of a tl.dot K loop over (BLOCK_M x BLOCK_K) @ (BLOCK_K x BLOCK_N)
    tiles: pipeline_buffers(num_stages, arch) x (BLOCK_M + b_tiles x BLOCK_N) x BLOCK_K x
    element_size (loop_shared_memory). With arch=None: the bound for every card, lesson 10's
    num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K x element_size for 16-bit tiles.

    config: a triton.Config or a dict with BLOCK_N, BLOCK_K, num_stages and BLOCK_M (or BLOCK_M
    among launch_args, for a kernel whose BLOCK_M is fixed by the caller); b_tiles: B operands a
    K step loads (2 for a fused gate / up GEMM); b_element_size: B's, where it differs from A's
    (1 for int8 weights dequantised in registers after the load).
    """
    bm = _value(config, "BLOCK_M") if _has(config, "BLOCK_M") else launch_args["BLOCK_M"]
    bn, bk, stages = _value(config, "BLOCK_N"), _value(config, "BLOCK_K"), _value(config, "num_stages")
    per_step = (bm + b_tiles * bn) * bk
    if b_element_size is None or b_element_size == element_size:
        return loop_shared_memory(per_step, stages, element_size, arch=arch, tensor_cores=tensor_cores)
    if arch is None:
        return max(matmul_shared_memory(config, element_size, arch=a, b_tiles=b_tiles, b_element_size=b_element_size,
                                        tensor_cores=tensor_cores, **launch_args) for a in (75, 90))
    if not tensor_cores or arch < 80:  # CUDA cores: both operands as fp32 copies (loop_shared_memory)
        return loop_shared_memory(per_step, stages, 4, arch=arch, tensor_cores=False)
    return pipeline_buffers(stages, arch) * (bm * element_size + b_tiles * bn * b_element_size) * bk


def attention_shared_memory(config, element_size: int, *, arch: int | None = None, HEAD_DIM: int,
                            kernel: str = "fwd", tensor_cores: bool = True, **launch_args) -> int:
    """Bytes of shared memory of lesson 07's flash-attention kernels (loop_shared_memory).

    kernel "fwd": a BLOCK_M x D query tile kept, K and V tiles (BLOCK_N x D each) per step;
    "dq": the same with Q and dO kept (2 x BLOCK_M x D); "dkdv": K and V kept (2 x BLOCK_N x D),
    Q and dO tiles (2 x BLOCK_M x D) per step, plus that step's logsumexp and delta (fp32).
    """
    if arch is None:  # the most any card needs
        return max(attention_shared_memory(config, element_size, arch=a, HEAD_DIM=HEAD_DIM, kernel=kernel,
                                           tensor_cores=tensor_cores) for a in (75, 90))
    bm, bn, stages = _value(config, "BLOCK_M"), _value(config, "BLOCK_N"), _value(config, "num_stages")
    if kernel == "fwd":
        resident, per_step, vectors = bm * HEAD_DIM, 2 * bn * HEAD_DIM, 0
    elif kernel == "dq":
        resident, per_step, vectors = 2 * bm * HEAD_DIM, 2 * bn * HEAD_DIM, 0
    elif kernel == "dkdv":
        resident, per_step, vectors = 2 * bn * HEAD_DIM, 2 * bm * HEAD_DIM, 2 * bm * 4
    else:
        raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkdv', got {kernel!r}")
    tiles = loop_shared_memory(per_step, stages, element_size, arch=arch, resident=resident,
                               tensor_cores=tensor_cores)
    # The fp32 row vectors (dkdv's logsumexp and delta) ride the pipeline with the tiles.
    vectors = pipeline_buffers(stages, arch) * vectors if arch >= 80 else 0
    # On the CUDA cores the P tile of the second product can be staged in shared memory as an fp32
    # operand too, with the row statistics' scratch beside it: measured for fp32 inputs ("ieee"),
    # on every card; on sm_75, 16-bit inputs reuse the tiles' space for it (measured, none extra).
    if not tensor_cores or arch < 80:
        return tiles + vectors + (bm * bn * 4 + _ROW_SCRATCH if not tensor_cores or element_size == 4 else 0)
    # mma v2 (sm_80-89; sm_90 below 64 rows, no wgmma) spreads the warps of a product whose tile is
    # wider than tall along its columns; the P tile then changes layout through shared memory on
    # its way into the next product (v2 at D = 128: 64 rows, 128 columns).
    rows, cols = (bn, max(bm, HEAD_DIM)) if kernel == "dkdv" else (bm, max(bn, HEAD_DIM))
    mma_v2 = arch < 90 or rows < 64
    return tiles + vectors + (bm * bn * element_size if mma_v2 and rows < cols else 0)


# Reductions over rows (max, sum) take a little scratch beside the tiles: measured 256 bytes for a
# 64-row block; 1 KiB covers up to 256 rows.
_ROW_SCRATCH = 1024


def _has(config, name: str) -> bool:
    return name in (config if isinstance(config, dict) else config.kwargs)


def _element_size(named_args: dict) -> int:
    for value in named_args.values():
        if hasattr(value, "element_size"):
            return value.element_size()
    raise ValueError("no tensor among the arguments to take the element size from: pass element_size=")


def fits_shared_memory(config, element_size: int, *, estimate: Callable = matmul_shared_memory,
                       arch: int | None = None, limit: int | None = None, **launch_args) -> bool:
    """Whether one config fits (see prune_configs_by_shared_memory); True where no limit is known."""
    return bool(prune_configs_by_shared_memory([config], element_size=element_size, estimate=estimate, arch=arch,
                                               limit=limit, empty_ok=True, **launch_args))


def fit_blocks(blocks: dict, options: dict, element_size: int, *, estimate: Callable = matmul_shared_memory,
               arch: int | None = None, limit: int | None = None, shrink: Iterable[str] | None = None,
               smallest: int = 16, **launch_args) -> dict:
    """A fixed config's block sizes, the largest of `shrink` (default: all of them) halved until
    the estimate fits one program's shared memory on this GPU (or on sm_<arch>), none below
    `smallest`; the blocks as they are where they already fit, or where no limit is known
    (`limit`: bytes instead of the card's).
    For configs used without a tuner to fall back on: lesson 07's fp32 tiles, lesson 09's fixed GEMM."""
    blocks = dict(blocks)
    names = list(shrink) if shrink is not None else list(blocks)
    while not fits_shared_memory({**blocks, **options}, element_size, estimate=estimate, arch=arch, limit=limit,
                                 **launch_args):
        largest = max(names, key=blocks.get)
        if blocks[largest] <= smallest:
            break  # as small as it goes: the launch will say it does not fit
        blocks[largest] //= 2
    return blocks


def prune_configs_by_shared_memory(configs: Iterable, named_args: dict | None = None, *,
                                   element_size: int | None = None, estimate: Callable = matmul_shared_memory,
                                   arch: int | None = None, limit: int | None = None, empty_ok: bool | None = None,
                                   **launch_args) -> list:
    """The configs whose estimated shared memory fits one program, in their order.

    Two ways to call it:
    - on a list, before it is used: prune_configs_by_shared_memory(configs, element_size=2);
    - as triton.autotune(..., prune_configs_by={"early_config_prune": prune_configs_by_shared_memory}):
      Triton passes the launch's arguments (named_args, and the keyword arguments as launch_args),
      and the element size is that of the first tensor among them.
    estimate(config, element_size, arch=..., **launch_args) gives the bytes: matmul_shared_memory
    by default; functools.partial(attention_shared_memory, kernel="dq") and the like for others.
    The limit is this GPU's (arch=None), or sm_<arch>'s from CARDS, or `limit` bytes. Without a
    GPU and without arch or limit (the interpreter) nothing is pruned.
    When nothing fits: [] from a list (empty_ok); under the autotuner, the OutOfResources error
    a launch of the smallest config would raise, instead of Triton's "no valid configs".
    """
    configs = list(configs)
    if named_args is not None:
        launch_args = {**named_args, **launch_args}
        element_size = element_size or _element_size(named_args)
    if element_size is None:
        raise ValueError("pass element_size= (bytes of one element of the tiles), or use it as early_config_prune")
    target = arch if arch is not None else current_arch()
    if limit is None:
        limit = shared_memory_limit(arch) if arch is not None else shared_memory_limit()
    if limit is None:
        return configs
    needs = [estimate(config, element_size, arch=target, **launch_args) for config in configs]
    kept = [config for config, need in zip(configs, needs) if need <= limit]
    if not kept and not (named_args is None if empty_ok is None else empty_ok) and needs:
        from triton.runtime.errors import OutOfResources
        raise OutOfResources(min(needs), limit, "shared memory (every config of the autotuner, estimated)")
    return kept
