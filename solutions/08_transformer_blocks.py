"""
Solutions for lesson 08: transformer blocks
===========================================

The reference answers to exercises/08_transformer_blocks.py. Check them with:

    make check LESSON=08 IMPL=solutions
"""

import functools

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZE = 1024  # elements per program for the elementwise kernels (8.2, 8.4)
MAX_COLS = 16384  # 8.1 holds a whole row in one block


@functools.cache
def _sm_count() -> int:
    if common.HAS_GPU:
        return torch.cuda.get_device_properties(common.DEVICE).multi_processor_count
    return 2  # the interpreter: a few programs, so that each one loops over several rows


# --------------------------------------------------------------------------------------------
# Exercise 8.1: RMSNorm forward and backward
# For x of shape (..., N) and a weight w of shape (N,), per row (all math in fp32):
#   rstd = 1 / sqrt(mean(x^2) + eps)        y = x * rstd * w
# Backward, with xhat = x * rstd and g = dy * w:
#   dx = rstd * (g - xhat * mean(g * xhat))     (mean over the N columns of the row)
#   dw = sum over all rows of dy * xhat
# Like the lesson's LayerNorm: the forward pass keeps rstd (one fp32 per row) for the backward
# pass, and the backward pass sums dw per group of rows into a partial row, then the wrapper adds
# the partial rows. The wrappers and the autograd.Function are written for you; write the kernels.


@triton.jit
def rmsnorm_fwd_kernel(
    x_ptr,  # input, M x N contiguous: row i starts at x_ptr + i * n_cols
    w_ptr,  # weight, N
    y_ptr,  # output, M x N contiguous
    rstd_ptr,  # M fp32: each row's 1 / sqrt(mean(x^2) + eps), for the backward pass
    n_cols,  # N
    eps,  # added to the mean square
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= N: the whole row is one block
):
    """One program per row i: y[i, :] = x[i, :] * rstd[i] * w, rstd[i] = 1 / sqrt(mean(x[i, :]^2) + eps).

    The mean is over the N real columns, not the BLOCK_SIZE lanes. Store y in y's dtype, rstd in fp32.
    """
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(y_ptr + row * n_cols + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def rmsnorm_bwd_kernel(
    dy_ptr,  # upstream gradient dL/dy, M x N contiguous
    x_ptr,  # the forward input, M x N contiguous
    w_ptr,  # weight, N
    rstd_ptr,  # M fp32, saved by the forward pass
    dx_ptr,  # output dL/dx, M x N contiguous
    dw_partial_ptr,  # P x N fp32: row p is program p's sum of dy * xhat over its rows
    n_rows,  # M
    n_cols,  # N
    rows_per_program,  # program p handles rows [p * rows_per_program, (p + 1) * rows_per_program)
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= N
):
    """Program p handles rows p * rows_per_program up to (not including) min(that + rows_per_program, M).

    For each of its rows: xhat = x * rstd, g = dy * w, dx = rstd * (g - xhat * mean(g * xhat)),
    store dx. Meanwhile sum dy * xhat over its rows in fp32, and store that sum as row p of
    dw_partial.
    """
    pid = tl.program_id(axis=0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _rows(x: torch.Tensor, n_cols: int) -> int:
    return x.numel() // n_cols


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(y, rstd) for contiguous x (..., N) and weight (N,)."""
    n_cols = x.shape[-1]
    n_rows = _rows(x, n_cols)
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    # more warps for longer rows, so that no thread holds more than 16 values of the row
    rmsnorm_fwd_kernel[(n_rows,)](x, weight, y, rstd, n_cols, eps, BLOCK_SIZE=block,
                                  num_warps=min(16, max(4, block // 512)))
    return y, rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """(dx, dw) of RMSNorm from the forward pass's input and rstd."""
    n_cols = x.shape[-1]
    n_rows = _rows(x, n_cols)
    dy = dy.contiguous()  # autograd may hand over an expanded gradient (stride 0)
    # Program p sums the rows [p * rows_per_program, (p + 1) * rows_per_program); a few programs
    # per SM keep the GPU busy, and every program gets at least one row.
    rows_per_program = triton.cdiv(n_rows, min(n_rows, 2 * _sm_count()))
    n_programs = triton.cdiv(n_rows, rows_per_program)
    dx = torch.empty_like(x)
    dw_partial = torch.empty(n_programs, n_cols, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    rmsnorm_bwd_kernel[(n_programs,)](dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols, rows_per_program,
                                      BLOCK_SIZE=block, num_warps=min(32, max(4, block // 256)))
    # The second, small reduction (the lesson does it with sum_rows_kernel): P x N fp32 -> N.
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x, weight, rstd)
        return dx, dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of a contiguous x (..., N); differentiable in x and weight."""
    common.check_tensors(x=x, dtypes=FLOAT_DTYPES)
    common.check_tensors(weight=weight, ndim=1, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or weight.shape[0] != x.shape[-1] or x.numel() == 0:
        raise ValueError(f"rmsnorm needs x (..., N) with N >= 1 and weight (N,), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] > MAX_COLS:
        raise ValueError(f"rows of {x.shape[-1]} elements do not fit one block (at most {MAX_COLS})")
    return RMSNormFunction.apply(x, weight, eps)


# --------------------------------------------------------------------------------------------
# Exercise 8.2: SwiGLU forward and backward
# Llama's MLP gate: h = silu(a) * b, silu(a) = a * sigmoid(a), elementwise on tensors of one
# shape. Backward, with s = sigmoid(a):
#   da = dh * b * s * (1 + a * (1 - s))         (silu'(a) = s + a * s * (1 - s))
#   db = dh * silu(a)
# The backward kernel recomputes s and silu(a) from a instead of reading them from memory.
# The wrappers and the autograd.Function are written for you; write the two kernels.


@triton.jit
def swiglu_fwd_kernel(
    a_ptr,  # gate input, n elements
    b_ptr,  # up input, n elements
    h_ptr,  # output silu(a) * b, n elements
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    """h[i] = a[i] * sigmoid(a[i]) * b[i], computed in fp32, stored in h's dtype."""
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offsets, (a * tl.sigmoid(a) * b).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    dh_ptr,  # upstream gradient dL/dh, n elements
    a_ptr,  # gate input, n elements
    b_ptr,  # up input, n elements
    da_ptr,  # output dL/da, n elements
    db_ptr,  # output dL/db, n elements
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,
):
    """da[i] = dh * b * s * (1 + a * (1 - s)), db[i] = dh * a * s, with s = sigmoid(a[i]); fp32 math."""
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(da_ptr + offsets, (dh * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offsets, (dh * a * s).to(db_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(a)
    n = a.numel()
    swiglu_fwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](a, b, h, n, BLOCK_SIZE=BLOCK_SIZE)
    return h


def swiglu_backward(dh: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    dh = dh.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    swiglu_bwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](dh, a, b, da, db, n, BLOCK_SIZE=BLOCK_SIZE)
    return da, db


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)  # not silu(a): the backward kernel recomputes it
        return swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dh):
        a, b = ctx.saved_tensors
        return swiglu_backward(dh, a, b)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for contiguous a, b of one shape and dtype; differentiable in a and b."""
    common.check_tensors(a=a, b=b, dtypes=FLOAT_DTYPES)
    return SwiGLUFunction.apply(a, b)


# --------------------------------------------------------------------------------------------
# Exercise 8.3: rotary position embedding (RoPE)
# x has shape (B, S, H, D): batch, sequence, heads, head dimension (D even), contiguous.
# cos and sin have shape (S, D/2), fp32: cos[s, j] = cos(s * theta_j), sin likewise.
# Each pair (x[..., j], x[..., j + D/2]) of the token at position s is rotated by theta[s, j]:
#   out[b, s, h, j]         = x[b, s, h, j] * cos[s, j] - x[b, s, h, j + D/2] * sin[s, j]
#   out[b, s, h, j + D/2]   = x[b, s, h, j + D/2] * cos[s, j] + x[b, s, h, j] * sin[s, j]
# (the "rotate half" layout of GPT-NeoX and Llama). Its backward pass is the inverse rotation:
# the same kernel with -sin. Write the kernel AND the wrapper; one program per token (b, s)
# handles all H heads, so it reads that token's cos and sin once.


@triton.jit
def rope_kernel(
    x_ptr,  # input (B, S, H, D) contiguous
    cos_ptr,  # (S, D/2) fp32 contiguous
    sin_ptr,  # (S, D/2) fp32 contiguous
    out_ptr,  # output (B, S, H, D) contiguous
    seq_len,  # S
    n_heads,  # H
    half_dim,  # D / 2
    BLOCK_H: tl.constexpr,  # a power of 2 >= H
    BLOCK_D: tl.constexpr,  # a power of 2 >= D / 2
):
    """Program t = b * S + s rotates the H x D values of token (b, s) (see the formulas above)."""
    token = tl.program_id(axis=0).to(tl.int64)
    pos = token % seq_len
    heads = tl.arange(0, BLOCK_H)[:, None]  # BLOCK_H x 1
    dims = tl.arange(0, BLOCK_D)[None, :]  # 1 x BLOCK_D
    mask = (heads < n_heads) & (dims < half_dim)
    cos = tl.load(cos_ptr + pos * half_dim + dims, mask=dims < half_dim, other=0.0)  # 1 x BLOCK_D
    sin = tl.load(sin_ptr + pos * half_dim + dims, mask=dims < half_dim, other=0.0)
    first = token * n_heads * 2 * half_dim + heads * 2 * half_dim + dims  # BLOCK_H x BLOCK_D: x[.., h, j]
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + half_dim, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + first + half_dim, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE of x (B, S, H, D) with cos, sin (S, D/2) fp32; writes into `out` when given, returns it.

    Raise ValueError for an x that is not 4-D, an odd D, or cos / sin not of shape (S, D/2).
    """
    common.check_tensors(x=x, dtypes=FLOAT_DTYPES, ndim=4)
    common.check_tensors(cos=cos, sin=sin, dtypes=(torch.float32,), ndim=2)
    batch, seq_len, n_heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs: the head dimension D must be even, got D = {head_dim}")
    if cos.shape != (seq_len, head_dim // 2):
        raise ValueError(f"cos and sin must have shape (S, D/2) = ({seq_len}, {head_dim // 2}), got "
                         f"{tuple(cos.shape)}")
    if out is None:
        out = torch.empty_like(x)
    else:
        common.check_tensors(x=x, out=out)
    rope_kernel[(batch * seq_len,)](x, cos, sin, out, seq_len, n_heads, head_dim // 2,
                                    BLOCK_H=triton.next_power_of_2(n_heads),
                                    BLOCK_D=triton.next_power_of_2(head_dim // 2))
    return out


# --------------------------------------------------------------------------------------------
# Exercise 8.4: fused MSE loss and gradient
# loss = mean((pred - target)^2) over all n elements, and in the same pass over the data
#   grad[i] = d loss / d pred[i] = 2 * (pred[i] - target[i]) / n
# so the backward pass reads nothing but that gradient. Each program handles BLOCK_SIZE
# elements: it writes their gradient and one fp32 partial sum of (pred - target)^2; the wrapper
# adds the partial sums (a second, small reduction, as for dW in the lesson). The wrapper and
# the autograd.Function are written for you; write the kernel.


@triton.jit
def mse_kernel(
    pred_ptr,  # predictions, n elements
    target_ptr,  # targets, n elements
    grad_ptr,  # output: d loss / d pred, n elements, pred's dtype
    partial_ptr,  # output: one fp32 per program, the sum of (pred - target)^2 over its block
    n_elements,  # n
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    """Program p, elements i in [p * BLOCK_SIZE, (p + 1) * BLOCK_SIZE) with i < n, d = pred - target in fp32:
    grad[i] = 2 * d[i] / n; partial[p] = sum of d[i]^2 (the lanes past n add nothing).
    """
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    pred = tl.load(pred_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    d = pred - target
    tl.store(grad_ptr + offsets, (2.0 * d / n_elements).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(d * d, axis=0))


def mse_loss_forward(pred: torch.Tensor, target: torch.Tensor):
    """(loss, grad): the fp32 mean squared error and its gradient w.r.t. pred, in one kernel."""
    n = pred.numel()
    grad = torch.empty_like(pred)
    n_programs = triton.cdiv(n, BLOCK_SIZE)
    partial = torch.empty(n_programs, dtype=torch.float32, device=pred.device)
    mse_kernel[(n_programs,)](pred, target, grad, partial, n, BLOCK_SIZE=BLOCK_SIZE)
    return partial.sum() / n, grad


class MSELossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target):
        loss, grad = mse_loss_forward(pred, target)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad_pred = grad * grad_loss.to(grad.dtype)  # loss.backward() passes 1.0
        # d loss / d target = -d loss / d pred, computed only when the target needs it
        return grad_pred, (-grad_pred if ctx.needs_input_grad[1] else None)


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((pred - target)^2) as an fp32 scalar, for contiguous pred, target of one shape and dtype."""
    common.check_tensors(pred=pred, target=target, dtypes=FLOAT_DTYPES)
    if pred.numel() == 0:
        raise ValueError("mse_loss of empty tensors is undefined (0 / 0)")
    return MSELossFunction.apply(pred, target)


# --------------------------------------------------------------------------------------------
# Exercise 8.5: fused linear cross-entropy
# An lm_head and its loss: mean over the valid tokens of cross_entropy(hidden @ weight.T, target),
# hidden (T, H), weight (V, H), target (T,), and the gradients for hidden and weight, without
# ever holding the T x V logits (at T = 8192 and Llama 3's V = 128,256 they are 2 GiB of bf16).
# Loop over chunks of C tokens; for each chunk [start, end):
#   z = hidden[start:end] @ weight.T       torch.matmul into the first end - start rows of z_buffer
#   each row's loss and lse                 _ce_loss_rows (the lesson's cross_entropy_fwd_kernel)
#   z <- softmax(z) - onehot, in place      _ce_grad_in_place (the lesson's cross_entropy_bwd_kernel;
#                                           ignored rows become 0)
#   dhidden[start:end] = z @ weight         C x H
#   dweight += z.T @ hidden[start:end]      V x H, summed over every chunk
# The loss is sum(loss_rows) / n_valid, n_valid the number of targets that are not ignore_index.
# The gradients are those of the *sum* of the valid rows' losses: the backward pass (written for
# you) divides them by n_valid and multiplies them by grad_output. The two kernel launchers, the
# allocations, the autograd.Function and the wrapper are written; write the chunk loop.


@functools.cache
def _lesson():
    """The lesson's module, for its two cross-entropy kernels (loaded once, on first use)."""
    from common.lessons import lesson_module
    return lesson_module("08")


def _ce_loss_rows(z: torch.Tensor, target: torch.Tensor, loss_rows: torch.Tensor, lse: torch.Tensor,
                  ignore_index: int) -> None:
    """The lesson's cross_entropy_fwd_kernel on the rows of z (C x V): each row's loss into
    loss_rows (0 for an ignored row) and its logsumexp into lse, both C fp32 (views are fine)."""
    lesson = _lesson()
    lesson._launch_cross_entropy_fwd(z, target, loss_rows, lse, ignore_index, lesson.CE_BLOCK_SIZE)


def _ce_grad_in_place(z: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, ignore_index: int) -> None:
    """The lesson's cross_entropy_bwd_kernel, in place: z <- softmax(z) - onehot(target) on valid
    rows, 0 on ignored rows (unscaled: not divided by n_valid). lse: the rows' logsumexp."""
    lesson = _lesson()
    one = torch.ones((), dtype=torch.float32, device=z.device)  # as n_valid and grad_loss: no scaling
    lesson._launch_cross_entropy_bwd(z, z, target, lse, one, one, ignore_index, lesson.CE_BLOCK_SIZE)


def linear_cross_entropy_chunks(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                ignore_index: int, chunk_size: int):
    """(loss, dhidden, dweight, n_valid): the mean loss (fp32 scalar), the gradients of the sum of
    the valid rows' losses (hidden's and weight's dtype), and n_valid (an fp32 scalar tensor)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    n_valid = (target != ignore_index).sum(dtype=torch.float32)  # a tensor: no host sync
    z_buffer = torch.empty(min(chunk_size, n_tokens), vocab, dtype=hidden.dtype, device=hidden.device)
    dhidden = torch.empty_like(hidden)
    dweight = torch.empty_like(weight)  # not zeroed: the first chunk writes it, the others add to it
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h, t, z = hidden[start:end], target[start:end], z_buffer[:end - start]
        torch.matmul(h, weight.t(), out=z)
        _ce_loss_rows(z, t, loss_rows[start:end], lse[start:end], ignore_index)
        _ce_grad_in_place(z, t, lse[start:end], ignore_index)
        torch.matmul(z, weight, out=dhidden[start:end])
        if start == 0:
            torch.matmul(z.t(), h, out=dweight)
        else:
            dweight.addmm_(z.t(), h)
    return loss_rows.sum() / n_valid, dhidden, dweight, n_valid


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, chunk_size):
        loss, dhidden, dweight, n_valid = linear_cross_entropy_chunks(hidden, weight, target, ignore_index,
                                                                      chunk_size)
        ctx.save_for_backward(dhidden, dweight, n_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dhidden, dweight, n_valid = ctx.saved_tensors
        scale = grad_loss.float() / n_valid.clamp_min(1.0)  # d mean / d sum, times grad_output
        return dhidden.mul_(scale), dweight.mul_(scale), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, chunk_size: int = 256) -> torch.Tensor:
    """Mean cross-entropy of hidden (T, H) @ weight (V, H)^T against target (T,) int64, chunk_size
    tokens at a time; differentiable in hidden and weight (call backward once)."""
    common.check_tensors(hidden=hidden, weight=weight, same_shape=False, ndim=2, dtypes=FLOAT_DTYPES)
    common.check_tensors(target=target, ndim=1, dtypes=(torch.int64,))
    if weight.shape[1] != hidden.shape[1] or target.shape[0] != hidden.shape[0] or hidden.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy needs hidden (T, H) with T >= 1, weight (V, H) and target (T,), "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(target.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return LinearCrossEntropyFunction.apply(hidden, weight, target, ignore_index, chunk_size)
