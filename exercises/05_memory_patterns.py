"""
Exercises for lesson 05: memory patterns
========================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=05

Each exercise reuses an idea of lessons/intermediate/05_memory_patterns.py: 5.1 the tiled
transpose, 5.2 the stencil's shifted masked loads, 5.3 a gather at data-dependent addresses.
Hints, from gentle to explicit, are in lessons/intermediate/05_memory_patterns.md under
"Exercises".
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 32, 32  # transpose tile
BLOCK_H, BLOCK_W = 32, 64  # convolution output tile
BLOCK_D = 64  # embedding columns per program


# --------------------------------------------------------------------------------------------
# Exercise 5.1: batched tiled transpose
# x has shape (B, M, N) and any strides (it may be a slice or a permuted view); out has shape
# (B, N, M) and is contiguous: out[b, n, m] = x[b, m, n]. One program per (tile, batch).
# The wrapper is written for you; write the kernel.


@triton.jit
def batched_transpose_kernel(
    x_ptr,  # pointer to x[0, 0, 0]; x has shape (B, M, N)
    out_ptr,  # pointer to out[0, 0, 0]; out has shape (B, N, M)
    M, N,  # the shape of one matrix of x
    stride_xb, stride_xm, stride_xn,  # strides of x, in elements
    stride_ob, stride_on, stride_om,  # strides of out, in elements
    BLOCK_M: tl.constexpr,  # tile rows (of x)
    BLOCK_N: tl.constexpr,  # tile columns (of x)
):
    """out[b, n, m] = x[b, m, n] for one BLOCK_M x BLOCK_N tile of x[b].

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), B). Program (pid, b), with pid = tl.program_id(0)
    and b = tl.program_id(1), handles tile row pid_m = pid // cdiv(N, BLOCK_N) and tile column
    pid_n = pid % cdiv(N, BLOCK_N) of batch b. M and N need not be multiples of the tile.
    """
    # TODO: the batch b, the tile's pid_m and pid_n, and offs_m / offs_n (about 6 lines)
    # TODO: load the BLOCK_M x BLOCK_N tile of x[b] with a 2-D mask, using all three strides (about 2 lines)
    # TODO: store tl.trans(tile) into out[b] at rows offs_n, columns offs_m, with its own mask (about 2 lines)
    pass


def batched_transpose(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.transpose(1, 2) as a new contiguous (B, N, M) tensor."""
    common.check_tensors(x=x, contiguous=False, ndim=3)
    B, M, N = x.shape
    if out is None:
        out = torch.empty((B, N, M), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N), B)
    batched_transpose_kernel[grid](x, out, M, N, *x.stride(), *out.stride(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 5.2: depthwise 3x3 convolution
# Each of the C channels of x (C, H, W) is convolved with its own 3x3 filter weight[c], zero
# padding, same output size: what F.conv2d(x[None], weight[:, None], padding=1, groups=C)[0]
# computes. The wrapper is written for you; write the kernel.


@triton.jit
def conv3x3_kernel(
    x_ptr,  # pointer to x[0, 0, 0]; x has shape (C, H, W), contiguous
    w_ptr,  # pointer to weight[0, 0, 0]; weight has shape (C, 3, 3), contiguous
    out_ptr,  # pointer to out[0, 0, 0]; out has shape (C, H, W), contiguous
    H, W,  # image height and width
    BLOCK_H: tl.constexpr,  # output tile rows
    BLOCK_W: tl.constexpr,  # output tile columns
):
    """out[c, i, j] = sum over di, dj in {0, 1, 2} of weight[c, di, dj] * x[c, i + di - 1, j + dj - 1],

    where x is 0 outside the image (rows 0..H-1, columns 0..W-1). Accumulate in fp32, store in
    out's dtype. Grid: (cdiv(H, BLOCK_H) * cdiv(W, BLOCK_W), C). Program (pid, c) computes one
    tile of channel c: tile row pid // cdiv(W, BLOCK_W), tile column pid % cdiv(W, BLOCK_W).
    """
    # TODO: the channel c, offs_h as a column (BLOCK_H, 1) and offs_w as a row (1, BLOCK_W) (about 4 lines)
    # TODO: an fp32 accumulator; for di, dj in tl.static_range(3): load the weight (one scalar)
    #       and the tile shifted by (di - 1, dj - 1), masked so that it stays inside the image
    #       (rows AND columns), with other=0.0; accumulate (about 9 lines)
    # TODO: store the accumulator, cast to out's dtype, masked to the image (about 2 lines)
    pass


def conv3x3(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise 3x3 convolution of x (C, H, W) with weight (C, 3, 3), zero padding."""
    common.check_tensors(x=x, weight=weight, same_shape=False, ndim=3)
    C, H, W = x.shape
    if tuple(weight.shape) != (C, 3, 3):
        raise ValueError(f"weight must have shape ({C}, 3, 3) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    out = torch.empty_like(x) if out is None else out
    grid = (triton.cdiv(H, BLOCK_H) * triton.cdiv(W, BLOCK_W), C)
    conv3x3_kernel[grid](x, weight, out, H, W, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 5.3: embedding gather
# out[..., :] = table[ids[...], :]: each token id picks a row of the table. The addresses
# depend on the data, so this is a gather: every program reads one row it cannot predict.
# Write the kernel AND the wrapper (validate, allocate, grid, launch, return).


@triton.jit
def embedding_kernel(
    ids_ptr,  # pointer to the token ids (n_tokens of them, int32 or int64), contiguous
    table_ptr,  # pointer to table[0, 0]; table has shape (V, D), columns contiguous
    out_ptr,  # pointer to out[0, 0]; out has shape (n_tokens, D), contiguous
    D,  # embedding width
    stride_table,  # elements between table[r, 0] and table[r + 1, 0] (D, or more for a slice)
    BLOCK_D: tl.constexpr,  # columns per program
):
    """out[t, d] = table[ids[t], d] for the BLOCK_D columns of program (t, j) = (program_id 0, 1).

    Grid: (n_tokens, cdiv(D, BLOCK_D)). D need not be a multiple of BLOCK_D.
    """
    # TODO: the token t, this program's column offsets and their mask (about 3 lines)
    # TODO: load the token's id (a scalar), then its row of the table, masked (about 2 lines)
    # TODO: store the row into out[t] (about 1 line)
    pass


def embedding(ids: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """table[ids]: ids of any shape (int32 or int64), table (V, D); returns ids.shape + (D,).

    Raise TypeError if ids are not int32 / int64, ValueError if an id is outside [0, V) (name
    the bad values) or if table's columns are not contiguous. Writes into `out` when given.
    """
    # TODO: validate: ids int32 / int64 (TypeError), both on the kernel's device
    #       (common.check_tensors), table 2-D with table.stride(1) == 1 (about 6 lines)
    # TODO: flatten ids to a contiguous 1-D tensor; raise ValueError naming the bad values if
    #       an id is < 0 or >= V (about 4 lines)
    # TODO: allocate out (shape ids.shape + (D,)) when it is None, launch the grid
    #       (n_tokens, cdiv(D, BLOCK_D)) when there is at least one token, return out (about 5 lines)
    raise NotImplementedError("TODO: exercise 5.3")
