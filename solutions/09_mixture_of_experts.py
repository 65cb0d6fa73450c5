"""
Solutions for lesson 09: mixture of experts
===========================================

Reference answers to exercises/09_mixture_of_experts.py. Grade them with:

    make check LESSON=09 IMPL=solutions
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
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < n_tokens
    col_mask = cols < n_experts
    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :],
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    scores = tl.sigmoid(logits)
    biased = scores + tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    biased = tl.where(col_mask[None, :], biased, float("-inf"))  # padding columns are never chosen

    ks = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(biased, axis=1)
        picked = cols[None, :] == best[:, None]
        score = tl.sum(tl.where(picked, scores, 0.0), axis=1)  # the unbiased score of the pick
        weights = tl.where(ks[None, :] == j, score[:, None], weights)
        ids = tl.where(ks[None, :] == j, best[:, None].to(tl.int32), ids)
        biased = tl.where(picked, float("-inf"), biased)
    weights = weights / tl.sum(weights, axis=1)[:, None]
    out_mask = row_mask[:, None] & (ks[None, :] < TOP_K)
    out_offsets = rows[:, None] * TOP_K + ks[None, :]
    tl.store(weights_ptr + out_offsets, weights, mask=out_mask)
    tl.store(ids_ptr + out_offsets, ids, mask=out_mask)


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
    e = tl.program_id(0)
    seen = tl.zeros((), dtype=tl.int32)  # assignments of e in the blocks before this one
    for start in range(0, n_assignments, BLOCK_SIZE):
        a = start + tl.arange(0, BLOCK_SIZE)
        mask = a < n_assignments
        hit = (tl.load(ids_ptr + a, mask=mask, other=-1) == e).to(tl.int32)
        rank = seen + tl.cumsum(hit, axis=0) - 1  # inclusive scan - 1: ranks 0, 1, 2, ...
        slot = tl.where(rank < capacity, e * capacity + rank, -1)
        tl.store(slot_ptr + a, slot, mask=mask & (hit == 1))
        seen += tl.sum(hit, axis=0)
    tl.store(counts_ptr + e, seen)


def capacity_dispatch(ids: torch.Tensor, n_experts: int, capacity: int, slot_out: torch.Tensor | None = None,
                      counts_out: torch.Tensor | None = None):
    """(slot (T, k) int32, counts (E,) int32) for ids (T, k) int32 with values in [0, n_experts).

    Raise ValueError when capacity < 0 or n_experts < 1 (name the value).
    """
    common.check_tensors(ids=ids, dtypes=(torch.int32,), ndim=2)
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    slot = torch.empty_like(ids) if slot_out is None else slot_out
    counts = torch.empty(n_experts, dtype=torch.int32, device=ids.device) if counts_out is None else counts_out
    capacity_dispatch_kernel[(n_experts,)](ids, slot, counts, ids.numel(), capacity, BLOCK_SIZE=DISPATCH_BLOCK_SIZE)
    return slot, counts


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
    tile_expert, tile_start = [], []
    for e in range(len(expert_offsets) - 1):
        start, end = expert_offsets[e], expert_offsets[e + 1]
        for row in range(start, end, block_m):  # cdiv(end - start, block_m) tiles
            tile_expert.append(e)
            tile_start.append(row)
    return tile_expert, tile_start


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
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(offsets_ptr + expert + 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + ks < K
        x = tl.load(x_ptr + rows[:, None] * K + (k0 + ks)[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + expert * K * N + (k0 + ks)[:, None] * N + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


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
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):  # this expert's rows only
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end  # the last block stops at the expert's end: the next rows are another's
        x_t = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=k_mask[:, None] & row_mask[None, :],
                      other=0.0)  # x_e^T's tile: the transpose is in the pointers
        dy = tl.load(dy_ptr + rows[:, None] * N + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=0.0)
        acc = tl.dot(x_t, dy, acc)
    tl.store(dw_ptr + e * K * N + ks[:, None] * N + cols[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=k_mask[:, None] & col_mask[None, :])


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
