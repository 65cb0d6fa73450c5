"""
Exercises for lesson 09: mixture of experts
===========================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=09

Each exercise is a variant of a stage of the MoE layer in
lessons/advanced/09_mixture_of_experts.py: routing, permutation, grouped GEMM, its dW. Hints, from
gentle to explicit, are in lessons/advanced/09_mixture_of_experts.md under "Exercises".
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

GATING_BLOCK_T = 64  # tokens per program in exercise 9.1
DISPATCH_BLOCK_SIZE = 128  # assignments per step in exercise 9.2
# Exercise 9.3's tiles: tensor-core sized on a GPU, tiny in the interpreter (so checks take seconds).
BLOCK_M, BLOCK_N, BLOCK_K = (16, 32, 16) if common.INTERPRETER else (64, 64, 32)
# Exercise 9.4's tiles: (rows, columns) of dW per program and rows per reduction step.
DW_BLOCK_K, DW_BLOCK_N, DW_BLOCK_M = (16, 32, 16) if common.INTERPRETER else (64, 64, 32)


# --------------------------------------------------------------------------------------------
# Exercise 9.1: top-k gating with a selection bias (DeepSeek-V3's auxiliary-loss-free balancing)
# scores = sigmoid(logits); each token picks the k experts with the largest scores + bias[e]
# (largest first), and weighs them by their *unbiased* scores, renormalised to sum to 1. The
# bias only steers the choice: training raises it for under-loaded experts instead of adding an
# auxiliary loss. The wrapper is written for you; write the kernel.


@triton.jit
def topk_sigmoid_gating_kernel(
    logits_ptr,  # (T, E) router logits, fp32 or fp16; row t starts at logits_ptr + t * stride_lt
    bias_ptr,  # (E,) fp32 selection bias
    weights_ptr,  # (T, k) fp32 output
    ids_ptr,  # (T, k) int32 output
    n_tokens,  # T
    n_experts,  # E
    stride_lt,  # elements between two rows of logits
    TOP_K: tl.constexpr,  # k
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_E: tl.constexpr,  # next power of 2 >= E
    BLOCK_K: tl.constexpr,  # next power of 2 >= k
):
    """For each token t (one row of logits), in fp32:

        scores[e] = sigmoid(logits[t, e]),  biased[e] = scores[e] + bias[e]
        ids[t, :]  = the k experts with the largest biased[e], largest first
        weights[t, j] = scores[ids[t, j]] / sum_j' scores[ids[t, j']]   (no bias in the weights)
    """
    # TODO: rows and columns of this program's (BLOCK_T, BLOCK_E) tile of logits, with their masks;
    #       load it and convert to fp32 (about 6 lines)
    # TODO: scores = sigmoid(logits); biased = scores + bias, and -inf in the padding columns so they
    #       are never chosen (about 3 lines)
    # TODO: k rounds: argmax of biased, the unbiased score at that column, record both into
    #       (BLOCK_T, BLOCK_K) tiles, then set the picked column to -inf (about 9 lines)
    # TODO: divide the weights by their row sum; store weights and ids with a mask (about 5 lines)
    pass


def topk_sigmoid_gating(logits: torch.Tensor, bias: torch.Tensor, top_k: int,
                        weights_out: torch.Tensor | None = None, ids_out: torch.Tensor | None = None):
    """(weights (T, k) fp32, ids (T, k) int32) for logits (T, E) and a selection bias (E,)."""
    common.check_tensors(logits=logits, dtypes=(torch.float32, torch.float16), ndim=2)
    common.check_tensors(bias=bias, dtypes=(torch.float32,), ndim=1)
    n_tokens, n_experts = logits.shape
    if bias.numel() != n_experts:
        raise ValueError(f"bias has {bias.numel()} values but there are {n_experts} experts")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}], got {top_k}")
    weights = weights_out if weights_out is not None else torch.empty(
        (n_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = ids_out if ids_out is not None else torch.empty((n_tokens, top_k), dtype=torch.int32, device=logits.device)
    grid = (triton.cdiv(n_tokens, GATING_BLOCK_T),)
    topk_sigmoid_gating_kernel[grid](logits, bias, weights, ids, n_tokens, n_experts, logits.stride(0),
                                     TOP_K=top_k, BLOCK_T=GATING_BLOCK_T,
                                     BLOCK_E=triton.next_power_of_2(n_experts),
                                     BLOCK_K=triton.next_power_of_2(top_k))
    return weights, ids


# --------------------------------------------------------------------------------------------
# Exercise 9.2: dispatch with a capacity, in a fixed order (Switch Transformer's token dropping)
# Each expert takes at most `capacity` assignments, first come first served in assignment order
# a = t*k + j; the rest are dropped. Unlike the lesson's atomic scatter the result is the same
# on every run: one program per expert walks all assignments in order with a running count.
# Write the kernel AND the wrapper (validate, allocate, grid, launch, return).


@triton.jit
def capacity_dispatch_kernel(
    ids_ptr,  # (R,) int32 expert of each assignment (ids of shape (T, k), flattened)
    slot_ptr,  # (R,) int32 output: e * capacity + rank, or -1 when dropped
    counts_ptr,  # (E,) int32 output: assignments routed to each expert, dropped ones included
    n_assignments,  # R = T * k
    capacity,  # the most assignments an expert keeps
    BLOCK_SIZE: tl.constexpr,  # assignments looked at per step
):
    """Program e (one per expert) walks a = 0 .. R-1 in order, BLOCK_SIZE at a time. The r-th
    assignment routed to e (r = 0, 1, 2, ...) gets slot[a] = e * capacity + r if r < capacity,
    else slot[a] = -1 (dropped). Finally counts[e] = how many assignments were routed to e.
    Assignments of other experts are left alone: their own program writes them.
    """
    # TODO: e = this program's expert; a running count of its assignments seen so far, starting at 0
    #       (use a tensor, e.g. tl.zeros((), dtype=tl.int32), so its type stays the same in the loop)
    #       (about 2 lines)
    # TODO: loop over the assignments BLOCK_SIZE at a time: load ids (masked), hit = ids == e as
    #       int32, rank = running count + inclusive cumsum of hit - 1 (about 6 lines)
    # TODO: slot = e * capacity + rank, or -1 past the capacity; store it where hit; add the block's
    #       hits to the running count (about 3 lines)
    # TODO: store the count (about 1 line)
    pass


def capacity_dispatch(ids: torch.Tensor, n_experts: int, capacity: int, slot_out: torch.Tensor | None = None,
                      counts_out: torch.Tensor | None = None):
    """(slot (T, k) int32, counts (E,) int32) for ids (T, k) int32 with values in [0, n_experts).

    Raise ValueError when capacity < 0 or n_experts < 1 (name the value).
    """
    # TODO: validate ids (common.check_tensors: int32, 2-D), n_experts >= 1 and capacity >= 0
    #       (about 5 lines)
    # TODO: allocate slot (like ids) and counts (E,) int32 unless given; launch one program per
    #       expert with BLOCK_SIZE=DISPATCH_BLOCK_SIZE; return (slot, counts) (about 4 lines)
    raise NotImplementedError("TODO: exercise 9.2")


# --------------------------------------------------------------------------------------------
# Exercise 9.3: grouped GEMM with a host-built tile table and a per-row scale
# x (R, K) holds rows already grouped by expert: expert e owns rows offsets[e]:offsets[e+1].
# out[r] = row_scale[r] * (x[r] @ w[e]) for the expert e owning row r (no scale: row_scale = 1).
# Scaling by the routing weight here, in the down projection's epilogue, is how many MoE layers
# save the combine's multiply. Write the tile schedule (host) and the kernel; the wrapper is given.


def tile_schedule(expert_offsets: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """The tile table: expert e (rows offsets[e]:offsets[e+1]) gets cdiv(rows, block_m) tiles of
    block_m rows, in expert order. Returns (tile_expert, tile_start): for each tile, its expert and
    its first row. An expert with no rows gets no tile.

    tile_schedule([0, 5, 5, 40], 16) == ([0, 2, 2, 2], [0, 5, 21, 37])
    """
    # TODO: for each expert, one tile per block_m rows from its first row to its end; collect the
    #       expert and the first row of every tile (about 6 lines)
    raise NotImplementedError("TODO: exercise 9.3")


@triton.jit
def grouped_matmul_kernel(
    x_ptr,  # (R, K) rows grouped by expert, contiguous
    w_ptr,  # (E, K, N) expert weights, contiguous
    scale_ptr,  # (R,) fp32 per-row scale (read only when HAS_SCALE)
    out_ptr,  # (R, N) output, contiguous
    tile_expert_ptr,  # (num_tiles,) int32 expert of each tile
    tile_start_ptr,  # (num_tiles,) int32 first row of each tile
    offsets_ptr,  # (E+1,) int32 expert e's rows are offsets[e]:offsets[e+1]
    N,  # columns of w and out
    K,  # columns of x, rows of each w[e]
    HAS_SCALE: tl.constexpr,  # multiply each output row by scale[row]
    BLOCK_M: tl.constexpr,  # rows per tile (the schedule's block_m)
    BLOCK_N: tl.constexpr,  # columns per program
    BLOCK_K: tl.constexpr,  # reduction step
):
    """Program (tile, pid_n) = (program_id(0), program_id(1)) computes rows
    tile_start[tile] + arange(BLOCK_M) (only those before offsets[e + 1], e = tile_expert[tile])
    and columns pid_n * BLOCK_N + arange(BLOCK_N) of out = scale[:, None] * (x @ w[e]), with an
    fp32 accumulator and one rounding to out's dtype at the store. w[e] starts at w_ptr + e * K * N.
    """
    # TODO: read this tile's expert and first row; rows, the row mask (rows before offsets[e + 1]),
    #       columns and the column mask (about 7 lines)
    # TODO: the K loop: load a (BLOCK_M, BLOCK_K) tile of x and a (BLOCK_K, BLOCK_N) tile of w[e],
    #       both masked, and tl.dot into an fp32 accumulator (about 8 lines)
    # TODO: if HAS_SCALE, multiply each row by its scale; store with both masks (about 4 lines)
    pass


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor,
                   row_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] = row_scale[r] * (x[r] @ w[e]) for rows r of expert e: (R, K) x (E, K, N) -> (R, N)."""
    common.check_tensors(x=x, w=w, same_shape=False, dtypes=(torch.float16, torch.bfloat16))
    common.check_tensors(expert_offsets=expert_offsets, dtypes=(torch.int32,), ndim=1)
    n_experts, K, N = w.shape
    if x.dim() != 2 or x.shape[1] != K or expert_offsets.numel() != n_experts + 1:
        raise ValueError(f"expected x (R, {K}), w (E, {K}, N) and expert_offsets (E+1,), got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(expert_offsets.shape)}")
    if row_scale is not None:
        common.check_tensors(row_scale=row_scale, dtypes=(torch.float32,), ndim=1)
    out = torch.empty((x.shape[0], N), dtype=x.dtype, device=x.device) if out is None else out
    # A host-built table reads the offsets back to the CPU: one sync (the lesson builds it on the GPU).
    tile_expert, tile_start = tile_schedule([int(v) for v in expert_offsets.tolist()], BLOCK_M)
    if tile_expert:
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=x.device)  # noqa: E731
        grid = (len(tile_expert), triton.cdiv(N, BLOCK_N))
        grouped_matmul_kernel[grid](x, w, row_scale if row_scale is not None else x, out, as_tensor(tile_expert),
                                    as_tensor(tile_start), expert_offsets, N, K, HAS_SCALE=row_scale is not None,
                                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 9.4: grouped GEMM dW, the weight gradient of exercise 9.3's layer
# The backward of out[r] = x[r] @ w[e] gives each expert's weight gradient
#     dw[e] = x_e^T @ dy_e     (K x n_e) @ (n_e x N) -> (K x N)
# over expert e's rows offsets[e]:offsets[e+1]. Every expert's output has the same size, so the
# grid needs no tile table; what varies is the reduction: each program loops over its expert's
# rows. The wrapper is given; write the kernel.


@triton.jit
def grouped_matmul_dw_kernel(
    x_ptr,  # (R, K) rows grouped by expert, contiguous
    dy_ptr,  # (R, N) gradient of the forward's output, rows grouped like x, contiguous
    dw_ptr,  # (E, K, N) output, contiguous: dw[e] starts at dw_ptr + e * K * N
    offsets_ptr,  # (E+1,) int32 expert e's rows are offsets[e]:offsets[e+1]
    K,  # columns of x, rows of each dw[e]
    N,  # columns of dy and of each dw[e]
    BLOCK_K: tl.constexpr,  # rows of dw[e] per program
    BLOCK_N: tl.constexpr,  # columns of dw[e] per program
    BLOCK_M: tl.constexpr,  # rows of x and dy per step of the reduction
):
    """Program (e, pid_k, pid_n) = (program_id(0), program_id(1), program_id(2)) computes rows
    pid_k * BLOCK_K + arange(BLOCK_K) and columns pid_n * BLOCK_N + arange(BLOCK_N) of
    dw[e] = x_e^T @ dy_e, the sum over expert e's rows r in offsets[e]:offsets[e+1] of
    x[r, :, None] * dy[r, None, :], with an fp32 accumulator and one rounding at the store. An
    expert with no rows gets dw[e] = 0.
    """
    # TODO: this program's expert and tile; the rows and columns of dw[e] it owns, with their masks;
    #       the expert's first row and its end (about 8 lines)
    # TODO: the reduction: loop over the expert's rows BLOCK_M at a time; mask the rows at the
    #       expert's end; load x's tile already transposed, (BLOCK_K, BLOCK_M), and dy's
    #       (BLOCK_M, BLOCK_N) tile; tl.dot into an fp32 accumulator (about 8 lines)
    # TODO: store the accumulator into dw[e] with both masks, even when the loop ran 0 times
    #       (about 2 lines)
    pass


def grouped_matmul_dw(x: torch.Tensor, dy: torch.Tensor, expert_offsets: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """dw[e] = x_e^T @ dy_e over the rows of expert e: (R, K) and (R, N) -> (E, K, N)."""
    common.check_tensors(x=x, dy=dy, same_shape=False, dtypes=(torch.float16, torch.bfloat16), ndim=2)
    common.check_tensors(expert_offsets=expert_offsets, dtypes=(torch.int32,), ndim=1)
    (R, K), N = x.shape, dy.shape[1]
    n_experts = expert_offsets.numel() - 1
    if dy.shape[0] != R or n_experts < 1:
        raise ValueError(f"expected x (R, K), dy (R, N) with the same R and expert_offsets (E+1,), got "
                         f"{tuple(x.shape)}, {tuple(dy.shape)}, {tuple(expert_offsets.shape)}")
    out = torch.empty((n_experts, K, N), dtype=x.dtype, device=x.device) if out is None else out
    # No tile table and no sync: the grid follows from the shapes; the row counts stay on the device.
    grid = (n_experts, triton.cdiv(K, DW_BLOCK_K), triton.cdiv(N, DW_BLOCK_N))
    grouped_matmul_dw_kernel[grid](x, dy, out, expert_offsets, K, N, BLOCK_K=DW_BLOCK_K, BLOCK_N=DW_BLOCK_N,
                                   BLOCK_M=DW_BLOCK_M)
    return out
