"""
Exercises for lesson 10: autotuning and performance models
==========================================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=10

10.1 writes the pruning function of an autotuned matmul, 10.2 a roofline predictor for a tiled
matmul, 10.3 the heuristics that pick a row kernel's block size and warps (and the kernel), 10.4 a
split-K matmul (kernel and wrapper) for problems with too few tiles to fill the GPU.
Hints, from gentle to explicit, are in lessons/expert/10_autotuning.md under "Exercises".
"""

import functools

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl


@functools.cache
def shared_memory_limit() -> int:
    """Bytes of shared memory one program may use on this GPU (the interpreter: H100's, assumed)."""
    if common.HAS_GPU:
        props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        return int(props["max_shared_mem"])
    return 232448  # 227 KiB: H100 / H200 (sm_90)


# --------------------------------------------------------------------------------------------
# Exercise 10.1: a config space with a pruning function
# The autotuner below times every config that prune_configs keeps, on the first call for each
# new (M, N, K) and dtype. Write prune_configs so that it keeps only configs that can compile on
# this GPU and can be the fastest for the problem.

MAX_ACC_PER_THREAD = 128  # fp32 accumulator values per thread; beyond it, registers spill


def prune_configs(configs: list, named_args: dict, smem_limit: int | None = None, **kwargs) -> list:
    """early_config_prune for matmul_kernel: keep the configs that can compile here and can win.

    named_args holds the kernel's arguments by name: M, N, K (ints) and a_ptr (a tensor: its
    element_size() is the bytes per element). A config c (c.kwargs holds BLOCK_M, BLOCK_N,
    BLOCK_K; c.num_warps and c.num_stages are attributes) is kept if all three rules hold:
      1. shared memory: c.num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * element_size <= smem_limit
         (smem_limit None means shared_memory_limit(), this device's)
      2. registers: BLOCK_M * BLOCK_N / (32 * c.num_warps) <= MAX_ACC_PER_THREAD (the fp32
         accumulator shared by the program's threads)
      3. no tile dimension larger than the problem needs: BLOCK_M <= max(16, next_power_of_2(M)),
         BLOCK_N <= max(16, next_power_of_2(N)), BLOCK_K <= max(16, next_power_of_2(K))
    Return the kept configs (the same objects) in their given order. If none is kept, return a
    list holding one config: the one with the smallest shared memory (rule 1's left side), the
    first such on a tie. Never an empty list: the autotuner needs at least one config.
    """
    # TODO: the limit (smem_limit, or shared_memory_limit() when it is None), M, N, K and the
    #       element size from named_args (about 3 lines)
    # TODO: a helper for rule 1's shared memory of a config, and a test of the three rules
    #       (about 8 lines)
    # TODO: the kept configs in order; if none, a list of the one with the smallest shared memory
    #       (about 2 lines)
    raise NotImplementedError("TODO: exercise 10.1")


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,  # A (M x K), B (K x N), C (M x N)
    M, N, K,  # the sizes
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # strides, in elements
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # the tile (from the config)
):
    # Lesson 04's v2: one program per output tile, a K loop of tl.dot into an fp32 accumulator.
    offs_m = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k + offs_k)[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (k + offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(k + offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _config(bm, bn, bk, num_warps, num_stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=num_warps, num_stages=num_stages)


CONFIGS = [  # the config space: prune_configs decides which of these are timed
    _config(128, 256, 64, 8, 3), _config(128, 256, 64, 4, 3), _config(128, 256, 64, 8, 5),
    _config(128, 128, 64, 4, 4), _config(64, 128, 64, 4, 4), _config(64, 64, 128, 4, 3),
    _config(32, 32, 32, 2, 2), _config(16, 64, 32, 1, 2), _config(16, 16, 16, 1, 1),
]


def _interpreter_bench(kernel_call, quantiles=None):
    kernel_call()  # the interpreter has no GPU timer: every config "takes" the same time
    return [1.0, 1.0, 1.0]


matmul_tuned_kernel = triton.autotune(
    configs=CONFIGS, key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune_configs},
    do_bench=_interpreter_bench if common.INTERPRETER else None)(matmul_kernel)


def matmul_tuned(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with the config the autotuner picks among those prune_configs keeps."""
    common.check_tensors(a=a, b=b, same_shape=False, contiguous=False, ndim=2,
                         dtypes=(torch.float32, torch.float16, torch.bfloat16))
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)}: a.shape[1] must equal b.shape[0]")
    (M, K), N = a.shape, b.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    matmul_tuned_kernel[grid](a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                              out.stride(0), out.stride(1))
    return out


# --------------------------------------------------------------------------------------------
# Exercise 10.2: a roofline predictor for a tiled matmul
# The lesson's roofline counts the minimum bytes. A tiled kernel moves more: each of its
# cdiv(M, block_m) * cdiv(N, block_n) programs loads a block_m x K strip of A and a K x block_n
# strip of B. Counted as if every load came from memory (no L2 reuse), this predicts which tiles
# keep a matmul compute bound.


def matmul_roofline(M: int, N: int, K: int, element_size: int, block_m: int, block_n: int,
                    peak_tflops: float, bandwidth_gbps: float, launch_us: float = 0.0) -> tuple[float, str]:
    """(seconds, bound) of C = A @ B (A: M x K, B: K x N) computed by block_m x block_n tiles.

    flops   = 2 * M * N * K
    bytes   = (tiles * (block_m + block_n) * K + M * N) * element_size,
              tiles = cdiv(M, block_m) * cdiv(N, block_n)  (each tile loads its strips; C written once)
    seconds = launch_us * 1e-6 + max(bytes / (bandwidth_gbps * 1e9), flops / (peak_tflops * 1e12))
    bound   = "memory" if the bytes' time >= the FLOPs' time, else "compute"
    """
    # TODO: the tiles, the bytes they load plus C written once, and the FLOPs (about 3 lines)
    # TODO: the two times in seconds (GB/s = 1e9 bytes/s, TFLOP/s = 1e12 FLOP/s), the launch, and
    #       which one is larger (about 3 lines)
    raise NotImplementedError("TODO: exercise 10.2")


# --------------------------------------------------------------------------------------------
# Exercise 10.3: a heuristic block-size chooser
# row_absmax computes max |x[i, :]| per row (what an int8 or fp8 quantizer scales each row by),
# one program per row, looping over the row in chunks of BLOCK_SIZE. BLOCK_SIZE and num_warps are
# not tuned: triton.heuristics computes them from the arguments on every launch.

MAX_CHUNK_BYTES = 16384  # a chunk of at most 16 KiB: 32 fp32 per thread at 4 warps, 8 at 16


def choose_block_size(args: dict) -> int:
    """BLOCK_SIZE for row_absmax_kernel, from its arguments (args["n_cols"], args["x_ptr"]).

    The smallest power of 2 >= n_cols, at least 16, and at most MAX_CHUNK_BYTES // element_size
    (4096 fp32, 8192 fp16 / bf16): a row that fits is one chunk, a longer row is looped over.
    """
    # TODO: the cap from the element size of args["x_ptr"], then next_power_of_2(n_cols) between
    #       16 and the cap (about 2 lines)
    raise NotImplementedError("TODO: exercise 10.3")


def choose_num_warps(args: dict) -> int:
    """num_warps from the chunk's bytes: one warp per 512 bytes (32 threads x a 16-byte load),
    between 1 and 16: min(16, max(1, args["BLOCK_SIZE"] * element_size // 512)).

    triton.heuristics computes its values in order, so args["BLOCK_SIZE"] is already chosen.
    """
    # TODO: one line
    raise NotImplementedError("TODO: exercise 10.3")


@triton.jit
def row_absmax_kernel(
    x_ptr,  # M x N input, rows stride_xm apart, columns contiguous
    out_ptr,  # M fp32: max |x[i, :]|
    n_cols,  # N
    stride_xm,  # elements between x[i, 0] and x[i + 1, 0]
    BLOCK_SIZE: tl.constexpr,  # chunk length (choose_block_size)
):
    """One program per row: out[row] = max over the row of |x|, in chunks of BLOCK_SIZE."""
    # TODO: this program's row (as int64: row * stride_xm can pass 2^31), the chunk's column
    #       offsets, a zeroed fp32 accumulator of BLOCK_SIZE values (about 3 lines)
    # TODO: for start in range(0, n_cols, BLOCK_SIZE): load the chunk (masked past n_cols, other=0.0)
    #       and keep the elementwise max of |x| in fp32 (about 3 lines)
    # TODO: store the max of the accumulator at out_ptr + row (1 line)
    pass


row_absmax_heuristic_kernel = triton.heuristics(
    {"BLOCK_SIZE": choose_block_size, "num_warps": choose_num_warps})(row_absmax_kernel)


def row_absmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """max |x[i, :]| of every row of a 2-D x (rows may be strided), as M fp32 values."""
    common.check_tensors(x=x, contiguous=False, ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    if x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows (x.stride(1) == 1), got strides {x.stride()}")
    n_rows, n_cols = x.shape
    if out is None:
        out = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    row_absmax_heuristic_kernel[(n_rows,)](x, out, n_cols, x.stride(0))  # BLOCK_SIZE, num_warps: the heuristics
    return out


# --------------------------------------------------------------------------------------------
# Exercise 10.4: a split-K matmul
# A problem with few output tiles (M = 64 against N = K = 8192, or 1024^3 in 128 x 128 tiles)
# leaves most SMs idle when each program computes one tile. Split-K cuts K into slices too: the
# grid is (tile rows, tile columns, slices), each program sums its tile over its slice of K, and
# adds that fp32 partial into the output with tl.atomic_add.

SPLIT_K_TILE = ({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16} if common.INTERPRETER
                else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})  # the tile matmul_split_k launches with


@triton.jit
def matmul_split_k_kernel(
    a_ptr, b_ptr,  # A (M x K), B (K x N)
    c_ptr,  # C (M x N) fp32, zeroed before the launch: every program adds its partial tile into it
    M, N, K,  # the sizes
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # strides, in elements
    K_PER_SPLIT,  # K elements per slice, a multiple of BLOCK_K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (i, j, s) adds A[rows of tile i, slice s] @ B[slice s, columns of tile j] into C's
    tile (i, j). Slice s covers k in [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT), and k < K."""
    # TODO: the tile's row offsets (program_id 0) and column offsets (program_id 1), the slice's
    #       first k (program_id 2), the K offsets of one step, a zeroed fp32 accumulator (about 5 lines)
    # TODO: loop over the slice in steps of BLOCK_K: load A's and B's blocks masked to rows < M,
    #       columns < N and k < K (other=0.0), and tl.dot them into the accumulator (about 6 lines)
    # TODO: tl.atomic_add the accumulator into C's tile, masked to rows < M and columns < N (about 2 lines)
    pass


def matmul_split_k(a: torch.Tensor, b: torch.Tensor, split_k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b by split-K: split_k slices of K (fewer if rounding empties the last ones), the slices'
    fp32 partials added with atomics, then cast to out's dtype (the inputs', by default)."""
    common.check_tensors(a=a, b=b, same_shape=False, contiguous=False, ndim=2,
                         dtypes=(torch.float32, torch.float16, torch.bfloat16))
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)}: a.shape[1] must equal b.shape[0]")
    if not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1:
        raise ValueError(f"split_k must be an int >= 1, got {split_k!r}")
    (M, K), N = a.shape, b.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    bm, bn, bk = SPLIT_K_TILE["BLOCK_M"], SPLIT_K_TILE["BLOCK_N"], SPLIT_K_TILE["BLOCK_K"]
    # TODO: K per slice: cdiv(K, split_k) rounded up to a multiple of bk; the slices that makes:
    #       cdiv(K, k_per_split) (about 2 lines)
    # TODO: the fp32 accumulator: out itself if out is fp32, else a new M x N fp32 tensor; zero it,
    #       the atomics add into it (about 2 lines)
    # TODO: launch matmul_split_k_kernel on a (cdiv(M, bm), cdiv(N, bn), slices) grid with
    #       **SPLIT_K_TILE; if the accumulator is not out, copy it into out (the cast) (about 5 lines)
    raise NotImplementedError("TODO: exercise 10.4")
