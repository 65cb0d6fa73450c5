"""
Exercises for lesson 05: memory patterns
========================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=05

Each exercise reuses an idea of lessons/intermediate/05_memory_patterns.py: 5.1 the tiled
transpose, 5.2 the stencil's shifted masked loads, 5.3 a gather at data-dependent addresses,
5.4 the convolution with many channels as an implicit GEMM.
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
# implicit-GEMM convolution tile: output pixels, output channels, taps per step. tl.dot needs 16
# or more along each side; the interpreter's small test images still span several tiles.
CONV_BLOCK_M, CONV_BLOCK_N, CONV_BLOCK_K = (32, 16, 16) if common.INTERPRETER else (64, 32, 32)
CONV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


# --------------------------------------------------------------------------------------------
# Exercise 5.4: conv2d as an implicit GEMM
# x (N, C, H, W) convolved with weight (K, C, R, S) at a stride and a zero padding gives
# out (N, K, P, Q): what F.conv2d(x, weight, stride=stride, padding=padding) computes. Seen as a
# matrix product, its rows are the N * P * Q output pixels, its columns the K output channels,
# and its reduction runs over the C * R * S taps; the A tile is gathered from x inside the loop.
# The wrapper is written for you; write the kernel.


@triton.jit
def conv2d_gemm_kernel(
    x_ptr,  # pointer to x[0, 0, 0, 0]; x has shape (N, C, H, W), contiguous
    w_ptr,  # pointer to weight[0, 0, 0, 0]; weight has shape (K, C, R, S), contiguous
    out_ptr,  # pointer to out[0, 0, 0, 0]; out has shape (N, K, P, Q), contiguous
    N, C, H, W,  # images, input channels, input height and width
    K, P, Q,  # output channels, output height and width
    stride, padding,  # the same along both image axes
    R: tl.constexpr, S: tl.constexpr,  # filter height and width
    BLOCK_M: tl.constexpr,  # output pixels (n, p, q) per program: the GEMM's rows
    BLOCK_N: tl.constexpr,  # output channels per program: the GEMM's columns
    BLOCK_K: tl.constexpr,  # taps (c, r, s) per step of the reduction
    INPUT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" (fp32 products in full fp32)
):
    """out[n, k, p, q] = sum over c, r, s of weight[k, c, r, s] * x[n, c, p * stride - padding + r,
    q * stride - padding + s], where x is 0 outside the image (rows 0..H-1, columns 0..W-1).

    The GEMM: row m = (n * P + p) * Q + q is an output pixel, column k an output channel, and
    tap t = (c * R + r) * S + s runs over the C * R * S products of one output. A[m, t] is the
    pixel of x that tap t of output pixel m reads; B[t, k] = weight[k, c, r, s], the weights
    viewed as a (K, C * R * S) matrix, transposed. Grid: (cdiv(N * P * Q, BLOCK_M),
    cdiv(K, BLOCK_N)); program (i, j) computes rows i * BLOCK_M ... and columns j * BLOCK_N ...,
    BLOCK_K taps per step. Accumulate in fp32 with tl.dot(a, b, acc, input_precision=INPUT_PRECISION),
    store in out's dtype. No size is a multiple of a block.
    """
    # TODO: rows (BLOCK_M output pixels m) and cols (BLOCK_N output channels k) of this program,
    #       with their masks; split m into the image n (as tl.int64) and the pixel (p, q); the
    #       input row and column that tap (r, s) = (0, 0) reads: p * stride - padding and
    #       q * stride - padding (about 10 lines)
    # TODO: an fp32 (BLOCK_M, BLOCK_N) accumulator, then a loop over the C * R * S taps, BLOCK_K
    #       at a time; in it, split the taps t into (c, r, s) and make the input rows h and
    #       columns w (BLOCK_M, BLOCK_K) by broadcasting (about 9 lines)
    # TODO: in the loop: load A = x[n, c, h, w] with a mask that is False (load 0.0) where h or w
    #       falls outside the image, where the row is past N * P * Q and where the tap is past
    #       C * R * S; load B = weight[k, t] as a (BLOCK_K, BLOCK_N) tile, masked too; then
    #       acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION) (about 5 lines)
    # TODO: store acc, cast to out's dtype, at out[n, k, p, q], masked to the rows and columns
    #       that exist (about 3 lines)
    pass


def conv2d_gemm(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, stride=stride, padding=padding) for contiguous x (N, C, H, W) and weight
    (K, C, R, S), fp32 / fp16 / bf16; no bias, dilation or groups. Writes into `out` when given."""
    common.check_tensors(x=x, weight=weight, same_shape=False, ndim=4, dtypes=CONV_DTYPES)
    (N, C, H, W), (K, C_w, R, S) = x.shape, weight.shape
    if C_w != C:
        raise ValueError(f"x has {C} channels but weight expects {C_w} (weight is (K, C, R, S) = "
                         f"{tuple(weight.shape)})")
    if not isinstance(stride, int) or stride < 1 or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"stride must be an int >= 1 and padding an int >= 0, got stride={stride!r}, "
                         f"padding={padding!r}")
    P, Q = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - S) // stride + 1
    if P < 1 or Q < 1:
        raise ValueError(f"a {R}x{S} filter at padding {padding} does not fit a {H}x{W} image")
    if out is None:
        out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device)
    else:
        common.check_tensors(x=x, out=out, same_shape=False)
        if tuple(out.shape) != (N, K, P, Q):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(N, K, P, Q)}")
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(N * P * Q, CONV_BLOCK_M), triton.cdiv(K, CONV_BLOCK_N))
    # "ieee": on a GPU, fp32 products run in full fp32 (tl.dot's default, tf32, keeps 10 mantissa
    # bits and misses fp32's 1e-5 tolerance). fp16 and bf16 products are exact in fp32 either way.
    conv2d_gemm_kernel[grid](x, weight, out, N, C, H, W, K, P, Q, stride, padding, R=R, S=S,
                             BLOCK_M=CONV_BLOCK_M, BLOCK_N=CONV_BLOCK_N, BLOCK_K=CONV_BLOCK_K,
                             INPUT_PRECISION="ieee")
    return out
