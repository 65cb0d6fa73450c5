"""
Exercises for lesson 04: matrix multiplication
==============================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=04

Each exercise builds on the kernels of lessons/intermediate/04_matmul.py (v2 and v3 are the
ones to start from). Hints, from gentle to explicit, are in lessons/intermediate/04_matmul.md
under "Exercises".
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

# bfloat16 only on a GPU: the interpreter has no bfloat16.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if common.supports_bf16() else ())

# Small tiles: they keep the interpreter fast and are correct on any GPU. (For speed on a GPU,
# the lesson's tile sweep shows what larger tiles, warps and stages do.)
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M = 32, 32, 32, 4


# --------------------------------------------------------------------------------------------
# Exercise 4.1: matmul with a fused bias + activation epilogue
# C = act(A @ B + bias), with A (M, K), B (K, N), bias (N,): bias[n] is added to column n of
# every row, then act is applied elementwise: "relu" (max(x, 0)) or "gelu" (the exact one,
# 0.5 * x * (1 + erf(x / sqrt(2))), as torch.nn.functional.gelu). PyTorch runs this as three
# kernels (mm, add, relu), writing and re-reading the whole output twice; here the bias and the
# activation are applied to the fp32 tile in registers, before its only store.
# The wrapper is written for you; write the kernel.


@triton.jit
def matmul_bias_act_kernel(
    a_ptr,  # pointer to A[0, 0]; A is M x K
    b_ptr,  # pointer to B[0, 0]; B is K x N
    bias_ptr,  # pointer to bias[0]; N contiguous elements, the dtype of A
    c_ptr,  # pointer to C[0, 0]; C is M x N, the dtype of A
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # in elements, as in the lesson
    ACTIVATION: tl.constexpr,  # "relu" or "gelu"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[m, n] = act(sum_k A[m, k] * B[k, n] + bias[n]), summed in fp32, stored in C's dtype.

    The grid is 1-D, cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs, one per output tile: map the
    program id to (pid_m, pid_n) as matmul_v3_kernel does (grouped), or row by row.
    """
    # TODO: map tl.program_id(0) to the tile (pid_m, pid_n), as in matmul_v3_kernel (about 9 lines)
    # TODO: offsets, pointers and the K loop of tl.dot into an fp32 accumulator, with masked
    #       loads (other=0.0) so that M, N and K need not be multiples of the blocks (about 12 lines)
    # TODO: the epilogue, on the fp32 tile: load BLOCK_N entries of bias (masked), add them to
    #       every row, then apply ACTIVATION (`if ACTIVATION == "relu":` is decided at compile
    #       time; tl.math.erf is the error function) (about 6 lines)
    # TODO: store the tile, cast to C's dtype, with the mask of the valid rows and columns (about 3 lines)
    pass


ACTIVATIONS = ("relu", "gelu")


def matmul_bias_act(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, activation: str = "relu",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """act(a @ b + bias) for a (M, K), b (K, N), bias (N,), all of one dtype."""
    common.check_tensors(a=a, b=b, same_shape=False, contiguous=False, ndim=2, dtypes=DTYPES)
    common.check_tensors(a=a, bias=bias, same_shape=False, contiguous=False)  # device, dtype
    common.check_tensors(bias=bias, ndim=1)  # contiguous and 1-D
    (M, K), N = a.shape, b.shape[1]
    if b.shape[0] != K or bias.shape[0] != N:
        raise ValueError(f"shapes a {tuple(a.shape)}, b {tuple(b.shape)}, bias {tuple(bias.shape)}: "
                         f"expected a (M, K), b (K, N) and bias (N,)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{activation}'")
    out = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    matmul_bias_act_kernel[grid](a, b, bias, out, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                                 b.stride(1), out.stride(0), out.stride(1), ACTIVATION=activation,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M)
    return out


# --------------------------------------------------------------------------------------------
# Exercise 4.2: batched matmul
# C[i] = A[i] @ B[i] for i in 0..batch-1, with A (batch, M, K), B (batch, K, N), C (batch, M, N).
# Inputs may have any strides (B may be a transposed view, b.transpose(1, 2)). One launch for
# the whole batch: a third grid axis picks the batch element.
# Write the kernel AND the wrapper (validate, allocate, grid, launch, return).


@triton.jit
def bmm_kernel(
    a_ptr,  # pointer to A[0, 0, 0]
    b_ptr,  # pointer to B[0, 0, 0]
    c_ptr,  # pointer to C[0, 0, 0]
    M, N, K,
    stride_ab, stride_am, stride_ak,  # A[i, m, k] is at a_ptr + i*stride_ab + m*stride_am + k*stride_ak
    stride_bb, stride_bk, stride_bn,  # B[i, k, n] is at b_ptr + i*stride_bb + k*stride_bk + n*stride_bn
    stride_cb, stride_cm, stride_cn,  # C[i, m, n] is at c_ptr + i*stride_cb + m*stride_cm + n*stride_cn
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[i] = A[i] @ B[i], summed in fp32, stored in C's dtype.

    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), batch). Axes 0 and 1 pick the output tile, as in
    matmul_v2_kernel; axis 2 is the batch index i.
    """
    # TODO: the tile (axes 0 and 1) and the batch index (axis 2) (about 3 lines)
    # TODO: move a_ptr, b_ptr and c_ptr to the start of matrix i (about 3 lines)
    # TODO: from here on, matmul_v2_kernel's body: offsets, K loop of tl.dot with masked
    #       loads, masked store in C's dtype (about 16 lines)
    pass


def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (batch, M, K) @ b (batch, K, N) -> (batch, M, N) in a's dtype; any strides.

    Raise ValueError when the batch sizes or the K dimensions differ (name both shapes), and let
    common.check_tensors reject other bad inputs (3 dimensions, one dtype, the right device).
    """
    # TODO: validate a and b with common.check_tensors (same_shape=False, contiguous=False,
    #       ndim=3, dtypes=DTYPES), then the batch and K dimensions (about 5 lines)
    # TODO: allocate out (batch, M, N) when it is None (about 2 lines)
    # TODO: launch a grid of (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), batch) with all nine strides,
    #       and return out (about 6 lines)
    raise NotImplementedError("TODO: exercise 4.2")


# --------------------------------------------------------------------------------------------
# Exercise 4.3: GEMV, the memory-bound matmul
# y = W @ x with W (N, K) and x (K,): y[n] = sum_k W[n, k] * x[k]. Each element of W is used
# once, so this is about 1 flop per byte: its speed is the speed of reading W (lesson 01's
# GB/s), and tensor cores do not help. W's rows may be further apart than K (a slice
# w_big[:, :K] of a wider matrix): row n starts at w_ptr + n * stride_wn.
# The wrapper is written for you; write the kernel.

GEMV_BLOCK_N, GEMV_BLOCK_K = 16, 128


@triton.jit
def gemv_kernel(
    w_ptr,  # pointer to W[0, 0]; W is N x K, each row contiguous
    x_ptr,  # pointer to x[0]; K contiguous elements
    y_ptr,  # pointer to y[0]; N contiguous elements
    N, K,
    stride_wn,  # elements from W[n, 0] to W[n + 1, 0] (K, or more for a slice)
    BLOCK_N: tl.constexpr,  # rows of W (elements of y) per program
    BLOCK_K: tl.constexpr,  # columns of W per step of the K loop
):
    """y[n] = sum_k W[n, k] * x[k] for 0 <= n < N, summed in fp32, stored in y's dtype.

    Grid: (cdiv(N, BLOCK_N),): program p handles rows p * BLOCK_N ... p * BLOCK_N + BLOCK_N - 1.
    """
    # TODO: this program's rows and their mask (about 3 lines)
    # TODO: loop over K in steps of BLOCK_K: load a BLOCK_N x BLOCK_K tile of W and BLOCK_K
    #       elements of x (both masked, other=0.0), and add the row sums of w * x[None, :]
    #       to a BLOCK_N fp32 accumulator (about 7 lines)
    # TODO: store the accumulator in y's dtype, masked (about 1 line)
    pass


def gemv(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """w (N, K) @ x (K,) -> (N,) in w's dtype. w's rows must be contiguous (w.stride(1) == 1)."""
    common.check_tensors(w=w, x=x, same_shape=False, contiguous=False, dtypes=DTYPES)
    common.check_tensors(x=x, ndim=1)
    N, K = w.shape if w.dim() == 2 else (None, None)
    if N is None or w.stride(1) != 1 or x.shape[0] != K:
        raise ValueError(f"w must be 2-D with contiguous rows and x must have w.shape[1] elements; "
                         f"got w {tuple(w.shape)} (strides {w.stride()}), x {tuple(x.shape)}")
    out = torch.empty(N, dtype=w.dtype, device=w.device) if out is None else out
    gemv_kernel[(triton.cdiv(N, GEMV_BLOCK_N),)](w, x, out, N, K, w.stride(0),
                                                 BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K)
    return out
