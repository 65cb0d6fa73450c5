"""
Solutions for lesson 12: production systems
===========================================

The reference answers to exercises/12_production.py. Check them with:

    make check LESSON=12 IMPL=solutions
"""

import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Exercise 12.1: a Triton kernel as a torch.library custom op
# Logit soft-capping (Gemma 2, Grok): y = cap * tanh(x / cap) squashes x smoothly into
# (-cap, cap); its derivative is dy/dx = 1 - tanh(x / cap)^2. The kernel and its wrapper are
# written for you. Register the wrapper as a custom op so that torch.compile, autograd and
# torch.library.opcheck all accept it: the op itself, a fake (meta) implementation, and a
# backward.

SOFTCAP_BLOCK_SIZE = 1024  # elements per program, lesson 01's choice for elementwise kernels


@triton.jit
def softcap_kernel(
    x_ptr,  # input, n elements, contiguous
    y_ptr,  # output cap * tanh(x / cap), n elements, x's dtype
    n_elements,  # n
    cap,  # the soft cap, > 0 (fp32)
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    t = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) / cap
    # tanh(t) = sign(t) * (1 - e) / (1 + e) with e = exp(-2 |t|) <= 1: never overflows, for any x
    e = tl.exp(-2.0 * tl.abs(t))
    tanh_abs = (1.0 - e) / (1.0 + e)
    tl.store(y_ptr + offsets, (cap * tl.where(t < 0, -tanh_abs, tanh_abs)).to(y_ptr.dtype.element_ty), mask=mask)


def softcap_forward(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) for a contiguous float tensor x; a new tensor of x's shape and dtype."""
    common.check_tensors(x=x, dtypes=FLOAT_DTYPES)
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    y = torch.empty_like(x)
    n = x.numel()
    softcap_kernel[(triton.cdiv(n, SOFTCAP_BLOCK_SIZE),)](x, y, n, float(cap), BLOCK_SIZE=SOFTCAP_BLOCK_SIZE)
    return y


def register_softcap(qualname: str = "course_sol12::softcap"):
    """Register softcap_forward as the custom op `qualname` ("namespace::name"); return the op.

    The op has the schema (Tensor x, float cap) -> Tensor and:
      - runs softcap_forward (a new output: the op must not write into x),
      - has a fake implementation (register_fake) that returns an empty tensor of the output's
        shape, dtype and device, so torch.compile and FakeTensor tracing know the output
        without running the kernel,
      - has a backward (register_autograd): dx = dy * (1 - tanh(x / cap)^2), nothing for cap.
    It must pass every test of torch.library.opcheck and work under torch.compile(fullgraph=True).

    In your own code you register an op once, at module level; here it is a function so that
    the grader can register your answer under fresh names, as many times as it likes.
    """

    @torch.library.custom_op(qualname, mutates_args=())
    def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
        return softcap_forward(x, cap)

    @softcap.register_fake
    def _(x, cap):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        x, cap = inputs
        ctx.save_for_backward(x)  # x, not the output: tanh recomputed in fp32 is exact near +-cap
        ctx.cap = cap

    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        t = torch.tanh(x.float() / ctx.cap)
        return (grad_y * (1.0 - t * t)).to(x.dtype), None  # no gradient for the float cap

    softcap.register_autograd(backward, setup_context=setup_context)
    return softcap


# --------------------------------------------------------------------------------------------
# Exercise 12.2: a fused, length-normalised, conservative DPO loss, forward and backward
# B preference pairs; the policy's logits for both responses of each pair in one tensor
# (2B, T, V): rows 0..B-1 are the chosen responses, rows B..2B-1 the rejected ones, row B + i
# answering the same prompt as row i. targets (2B, T) are the next-token ids; mask (2B, T) is
# True at the response tokens (False at the prompt and the padding). ref_logps (2B,) are the
# frozen reference model's log-probs of the same responses, normalised the same way.
#
#   logp[r, t] = log_softmax(logits[r, t])[targets[r, t]]               (token log-prob)
#   s[r]       = sum_t mask[r, t] * logp[r, t] / sum_t mask[r, t]       (the MEAN over the response)
#   delta[i]   = beta * ((s[i] - s[B + i]) - (ref_logps[i] - ref_logps[B + i]))
#   loss[i]    = -(1 - eps) * logsigmoid(delta[i]) - eps * logsigmoid(-delta[i])
#
# eps is label smoothing ("conservative DPO": the label "chosen is better" is wrong with
# probability eps). Backward, for upstream gradients g[i] = dL/dloss[i]:
#   dL/d delta[i]     = g[i] * (sigmoid(delta[i]) - (1 - eps))
#   dL/d s[i]         = beta * dL/d delta[i],   dL/d s[B + i] = -beta * dL/d delta[i]
#   coef[r, t]        = dL/d logp[r, t] = dL/d s[r] * mask[r, t] / sum_t mask[r, t]
#   dL/d logits[r, t, v] = coef[r, t] * (onehot(v == targets[r, t]) - softmax(logits[r, t])[v])
#
# Two kernels, one program per token row (N = 2B * T rows of V logits): the forward kernel
# reads a row once (online log-sum-exp in chunks of BLOCK_V, never the whole softmax) and
# writes two fp32 per row; the backward kernel reads the row again and writes its gradient.
# The wrappers are written for you; write the two kernels and DPOLossFunction's two methods.

# Chunk of the vocabulary per step: 4096 fp32 values are 16 per thread at 8 warps. The
# interpreter uses short chunks, so that its small vocabularies still take several.
DPO_BLOCK_V = 4096 if common.HAS_GPU else 256
DPO_NUM_WARPS = 8


@triton.jit
def dpo_logp_kernel(
    logits_ptr,  # N x V logits, row r at logits_ptr + r * stride_row, columns contiguous
    targets_ptr,  # N int64 target ids in [0, V)
    mask_ptr,  # N int8: 1 at response tokens, 0 at the prompt and the padding
    logp_ptr,  # output N fp32: log_softmax(row)[target], 0 where mask is 0
    lse_ptr,  # output N fp32: the row's log-sum-exp, for the backward pass; 0 where mask is 0
    n_cols,  # V
    stride_row,  # elements between logits[r, 0] and logits[r + 1, 0]
    BLOCK_V: tl.constexpr,  # columns per chunk, a power of 2
):
    """Program r: if mask[r], lse = log(sum_v exp(x[v])) by an online log-sum-exp over chunks of
    BLOCK_V columns (a running max m and a running sum d of exp(x - m), rescaled by exp(m_old - m_new)
    when the max grows), logp = x[target] - lse. Store logp and lse (fp32); 0 and 0 where mask is 0,
    without reading that row's logits.
    """
    row = tl.program_id(axis=0).to(tl.int64)
    logp = tl.zeros((), dtype=tl.float32)
    lse = tl.zeros((), dtype=tl.float32)
    if tl.load(mask_ptr + row) != 0:  # prompt tokens: no traffic at all
        row_ptr = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        logp = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32) - lse
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)


@triton.jit
def dpo_grad_kernel(
    logits_ptr,  # N x V logits, row r at logits_ptr + r * stride_row, columns contiguous
    targets_ptr,  # N int64 target ids
    lse_ptr,  # N fp32, from dpo_logp_kernel
    coef_ptr,  # N fp32: dL/dlogp of each token (0 at the prompt and the padding)
    dlogits_ptr,  # output N x V, contiguous, the logits' dtype
    n_cols,  # V
    stride_row,  # elements between logits[r, 0] and logits[r + 1, 0]
    BLOCK_V: tl.constexpr,  # columns per chunk
):
    """Program r: dlogits[r, v] = coef[r] * (onehot(v == target[r]) - exp(x[v] - lse[r])) for every v,
    in chunks of BLOCK_V. Rows with coef 0 store zeros without reading their logits (their lse is 0,
    not their log-sum-exp).
    """
    row = tl.program_id(axis=0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    n_read = tl.where(coef != 0, n_cols, 0)  # columns to read: none for a prompt token
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(logits_ptr + row * stride_row + start + cols, mask=start + cols < n_read, other=0.0)
        p = tl.exp(x.to(tl.float32) - lse)
        grad = tl.where(start + cols < n_read, coef * (tl.where(start + cols == target, 1.0, 0.0) - p), 0.0)
        tl.store(dlogits_ptr + row * n_cols + start + cols, grad.to(dlogits_ptr.dtype.element_ty),
                 mask=start + cols < n_cols)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, block_v: int = DPO_BLOCK_V):
    """(logp, lse), each (N,) fp32, for N x V logits (rows contiguous), N targets and an N int8 mask."""
    n_rows, n_cols = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    dpo_logp_kernel[(n_rows,)](logits, targets, mask, logp, lse, n_cols, logits.stride(0),
                               BLOCK_V=min(block_v, triton.next_power_of_2(n_cols)), num_warps=DPO_NUM_WARPS)
    return logp, lse


def logits_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                block_v: int = DPO_BLOCK_V) -> torch.Tensor:
    """dL/dlogits, N x V in the logits' dtype, from the saved lse and coef = dL/dlogp (N fp32)."""
    n_rows, n_cols = logits.shape
    dlogits = torch.empty(n_rows, n_cols, dtype=logits.dtype, device=logits.device)
    dpo_grad_kernel[(n_rows,)](logits, targets, lse, coef, dlogits, n_cols, logits.stride(0),
                               BLOCK_V=min(block_v, triton.next_power_of_2(n_cols)), num_warps=DPO_NUM_WARPS)
    return dlogits


class DPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, ref_logps, beta, eps):
        """The (B,) fp32 losses. logits (2B, T, V) contiguous, targets (2B, T) int64, mask (2B, T) bool."""
        n_seq, seq_len, n_cols = logits.shape
        n_pairs = n_seq // 2
        flat = logits.view(n_seq * seq_len, n_cols)
        logp, lse = token_logps(flat, targets.reshape(-1), mask.reshape(-1).to(torch.int8))
        n_tokens = mask.sum(dim=1, dtype=torch.float32)  # (2B,) response lengths, >= 1 (checked by dpo_loss)
        s = logp.view(n_seq, seq_len).sum(dim=1) / n_tokens  # prompt tokens hold logp = 0
        ref = ref_logps.float()
        delta = beta * ((s[:n_pairs] - s[n_pairs:]) - (ref[:n_pairs] - ref[n_pairs:]))
        loss = -(1.0 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
        ctx.save_for_backward(logits, targets, mask, lse, n_tokens, delta)
        ctx.beta, ctx.eps = beta, eps
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, mask, lse, n_tokens, delta = ctx.saved_tensors
        n_seq, seq_len, n_cols = logits.shape
        d_delta = grad_loss.float() * (torch.sigmoid(delta) - (1.0 - ctx.eps))  # (B,)
        d_s = ctx.beta * torch.cat([d_delta, -d_delta])  # (2B,): chosen rows +, rejected rows -
        coef = (d_s / n_tokens)[:, None] * mask  # (2B, T): 0 at the prompt and the padding
        dlogits = logits_grad(logits.view(n_seq * seq_len, n_cols), targets.reshape(-1), lse,
                              coef.reshape(-1).contiguous())
        return dlogits.view(n_seq, seq_len, n_cols), None, None, None, None, None


def dpo_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, ref_logps: torch.Tensor,
             beta: float = 0.1, eps: float = 0.0) -> torch.Tensor:
    """Per-pair conservative DPO losses (B,) fp32 with length-normalised log-probs; differentiable in logits.

    logits (2B, T, V) contiguous float (chosen responses first, then the rejected ones), targets
    (2B, T) int64 in [0, V), mask (2B, T) bool with at least one True per row, ref_logps (2B,) float.
    """
    common.check_tensors(logits=logits, ndim=3, dtypes=FLOAT_DTYPES)
    common.check_tensors(targets=targets, ndim=2, dtypes=(torch.int64,))
    common.check_tensors(mask=mask, ndim=2, dtypes=(torch.bool,))
    common.check_tensors(ref_logps=ref_logps, ndim=1, dtypes=FLOAT_DTYPES)
    n_seq, seq_len, _ = logits.shape
    if n_seq % 2 or n_seq == 0:
        raise ValueError(f"logits must hold 2B sequences (B chosen, then B rejected), got {n_seq}")
    for name, t, shape in (("targets", targets, (n_seq, seq_len)), ("mask", mask, (n_seq, seq_len)),
                           ("ref_logps", ref_logps, (n_seq,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match logits {tuple(logits.shape)}, "
                             f"got {tuple(t.shape)}")
    if not beta > 0 or not 0.0 <= eps < 0.5:
        raise ValueError(f"need beta > 0 and 0 <= eps < 0.5, got beta={beta}, eps={eps}")
    # One host sync: a response with no token has no mean log-prob (0 / 0) and would poison the
    # whole batch's gradient with NaN; say so here instead.
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"every response needs at least one token (mask row with a True); rows {empty} "
                         f"have none")
    return DPOLossFunction.apply(logits, targets, mask, ref_logps, beta, eps)


# --------------------------------------------------------------------------------------------
# Exercise 12.3: CUDA-graph a decode step
# A decode step at batch 1 to 8 is dozens of tiny kernels, each shorter than the few
# microseconds it takes the CPU to launch it: the GPU waits for Python. A CUDA graph records
# the launches once and replays them with one call. It replays the same kernels on the same
# addresses, so the inputs must be copied into the buffers the graph was captured with, and
# its output lives in a buffer the next replay overwrites.


def graph_decode_step(step, example_inputs, warmup: int = 3):
    """Capture `step(*inputs) -> Tensor` into a CUDA graph; return `replay(*new_inputs) -> Tensor`.

    - The graph owns its static input buffers: copies of `example_inputs` (CUDA tensors). The
      caller's tensors are never written.
    - Before capturing, run `step` `warmup` times on a side stream (compiles Triton kernels,
      sets up cuBLAS), then capture it once with torch.cuda.graph.
    - replay(*new_inputs) checks that each new input has the captured shape, dtype and device
      (ValueError otherwise: copy_ would broadcast or convert silently), copies them into the
      static buffers, replays the graph, and returns a new tensor with the output (a clone: the
      next replay overwrites the static output). It never runs `step` in Python again.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("graph_decode_step needs a CUDA GPU: CUDA graphs record GPU kernel launches")
    static_inputs = tuple(t.clone() for t in example_inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = step(*static_inputs)

    def replay(*new_inputs):
        if len(new_inputs) != len(static_inputs):
            raise ValueError(f"replay takes {len(static_inputs)} inputs, as captured, got {len(new_inputs)}")
        for i, (static, new) in enumerate(zip(static_inputs, new_inputs)):
            if new.shape != static.shape or new.dtype != static.dtype or new.device != static.device:
                raise ValueError(f"input {i} is {tuple(new.shape)} {new.dtype} on {new.device}, but the graph "
                                 f"was captured with {tuple(static.shape)} {static.dtype} on {static.device}")
            static.copy_(new)
        graph.replay()
        return static_output.clone()

    return replay


# --------------------------------------------------------------------------------------------
# Exercise 12.4: a fused GRPO loss, whose forward kernel writes the gradient too
# GRPO (Group Relative Policy Optimization) tunes a policy from its own samples: G completions of
# each prompt, each scored by a reward; B = n_prompts * G completions in all, each prompt's G
# consecutive. logits (B, T, V) are the policy's, targets (B, T) the sampled next tokens (valid
# ids everywhere), mask (B, T) is True at the completion tokens (False at the prompt and the
# padding), old_logps (B, T) are the log-probs the sampling policy gave the targets, ref_logps
# (B, T) the frozen reference model's, rewards (B,) one per completion.
#
#   A[b]       = (rewards[b] - mean of its group) / (std of its group + 1e-4)   (grpo_advantages, given)
#   logp[b, t] = log_softmax(logits[b, t])[targets[b, t]]
#   ratio      = exp(logp - old_logps)
#   surrogate  = min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A)
#   kl         = exp(ref_logps - logp) - (ref_logps - logp) - 1                (the k3 estimator)
#   loss[b, t] = -(surrogate - beta * kl)
#   L          = sum_b sum_t w[b] * mask[b, t] * loss[b, t],   w[b] = 1 / (B * sum_t mask[b, t])
#
# (L is the mean over the sequences of each sequence's mean over its completion tokens.) A token's
# derivative is known as soon as its row has been read, unlike DPO's, which needs the whole pair
# first, so one kernel computes the loss and the gradient (for an upstream gradient of 1):
#   dsurrogate          = ratio * A where ratio * A <= clamp(ratio, 1 - eps, 1 + eps) * A, else 0
#   g[b, t] = dL/dlogp  = w[b] * mask[b, t] * (beta * (1 - exp(ref_logps - logp)) - dsurrogate)
#   dL/dlogits[b, t, v] = g[b, t] * (onehot(v == targets[b, t]) - softmax(logits[b, t])[v])
# and the backward pass only multiplies that by grad_output.
#
# One program per token row (N = B * T rows of V logits): pass 1 over the row's chunks, the online
# log-sum-exp; the loss and g in registers; pass 2 over the same chunks, the gradient. The wrappers
# are written for you; write the kernel.


@triton.jit
def grpo_loss_kernel(
    logits_ptr,  # N x V logits, row r at logits_ptr + r * stride_row, columns contiguous
    targets_ptr,  # N int64 target ids in [0, V)
    mask_ptr,  # N int8: 1 at completion tokens, 0 at the prompt and the padding
    old_logp_ptr,  # N fp32: the sampling policy's log-probs of the targets
    ref_logp_ptr,  # N fp32: the reference model's log-probs of the targets
    adv_ptr,  # N fp32: the advantage A of each row's completion
    weight_ptr,  # N fp32: the weight w of each row's completion, 1 / (B * its completion tokens)
    loss_ptr,  # output N fp32: w * loss of the row's token, 0 where mask is 0
    dlogits_ptr,  # output N x V, contiguous, the logits' dtype: dL/dlogits, zeros where mask is 0
    n_cols,  # V
    stride_row,  # elements between logits[r, 0] and logits[r + 1, 0]
    eps,  # the clip range
    beta,  # the weight of the KL penalty
    BLOCK_V: tl.constexpr,  # columns per chunk, a power of 2
):
    """Program r: if mask[r], lse by an online log-sum-exp over chunks of BLOCK_V columns, logp =
    x[target] - lse, the row's loss w * -(surrogate - beta * kl) and g = dL/dlogp from the formulas
    above; then, in a second pass over the chunks, dlogits = g * (onehot - exp(x - lse)). Where mask
    is 0: a loss of 0 and a row of zeros, without reading that row's logits.
    """
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    out_row = dlogits_ptr + row * n_cols
    row_loss = tl.zeros((), dtype=tl.float32)
    if tl.load(mask_ptr + row) != 0:
        row_ptr = logits_ptr + row * stride_row
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        target = tl.load(targets_ptr + row)
        logp = tl.load(row_ptr + target).to(tl.float32) - lse
        adv = tl.load(adv_ptr + row)
        weight = tl.load(weight_ptr + row)
        ratio = tl.exp(logp - tl.load(old_logp_ptr + row))
        unclipped = ratio * adv
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps), 1.0 + eps) * adv
        log_r = tl.load(ref_logp_ptr + row) - logp
        e = tl.exp(log_r)
        row_loss = weight * -(tl.minimum(unclipped, clipped) - beta * (e - log_r - 1.0))
        g = weight * (beta * (1.0 - e) - tl.where(unclipped <= clipped, unclipped, 0.0))
        for start in range(0, n_cols, BLOCK_V):
            x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
            grad = g * (tl.where(start + cols == target, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(out_row + start + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=start + cols < n_cols)
    else:  # a prompt or padding row: zeros, and not one byte of its logits read
        for start in range(0, n_cols, BLOCK_V):
            tl.store(out_row + start + cols, tl.zeros([BLOCK_V], dtype=dlogits_ptr.dtype.element_ty),
                     mask=start + cols < n_cols)
    tl.store(loss_ptr + row, row_loss)


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + 1e-4), fp32, groups of group_size consecutive rewards."""
    groups = rewards.float().view(-1, group_size)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)).view(-1)


def grpo_rows(logits, targets, mask, old_logps, ref_logps, adv, weight, eps: float, beta: float,
              block_v: int = DPO_BLOCK_V):
    """(loss, dlogits): N fp32 weighted token losses and the N x V gradient of their sum, for N x V
    logits (rows contiguous) and the N-long per-row inputs of grpo_loss_kernel."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    dlogits = torch.empty(n_rows, n_cols, dtype=logits.dtype, device=logits.device)
    grpo_loss_kernel[(n_rows,)](logits, targets, mask, old_logps, ref_logps, adv, weight, loss, dlogits, n_cols,
                                logits.stride(0), float(eps), float(beta),
                                BLOCK_V=min(block_v, triton.next_power_of_2(n_cols)), num_warps=DPO_NUM_WARPS)
    return loss, dlogits


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta):
        n_seq, seq_len, n_cols = logits.shape

        def per_row(t):  # (B,) -> (B * T,): each sequence's value on every one of its rows
            return t[:, None].expand(n_seq, seq_len).reshape(-1).contiguous()

        adv = grpo_advantages(rewards, group_size)
        weight = 1.0 / (n_seq * mask.sum(dim=1, dtype=torch.float32))  # >= 1 token per row (grpo_loss checks)
        loss, dlogits = grpo_rows(logits.view(-1, n_cols), targets.reshape(-1), mask.reshape(-1).to(torch.int8),
                                  old_logps.reshape(-1).contiguous(), ref_logps.reshape(-1).contiguous(),
                                  per_row(adv), per_row(weight), eps, beta)
        ctx.save_for_backward(dlogits.view(n_seq, seq_len, n_cols))
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (dlogits,) = ctx.saved_tensors  # written by the forward kernel: only the chain rule's scalar is left
        return dlogits * grad_loss, None, None, None, None, None, None, None, None


def grpo_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, old_logps: torch.Tensor,
              ref_logps: torch.Tensor, rewards: torch.Tensor, group_size: int, eps: float = 0.2,
              beta: float = 0.04) -> torch.Tensor:
    """The GRPO loss, a scalar fp32 tensor, differentiable in logits.

    logits (B, T, V) contiguous float, targets (B, T) int64 in [0, V), mask (B, T) bool with at
    least one True per row, old_logps and ref_logps (B, T) fp32, rewards (B,) float, B a multiple
    of group_size (each prompt's group_size completions consecutive).
    """
    common.check_tensors(logits=logits, ndim=3, dtypes=FLOAT_DTYPES)
    common.check_tensors(targets=targets, ndim=2, dtypes=(torch.int64,))
    common.check_tensors(mask=mask, ndim=2, dtypes=(torch.bool,))
    common.check_tensors(old_logps=old_logps, ref_logps=ref_logps, ndim=2, same_shape=False, dtypes=(torch.float32,))
    common.check_tensors(rewards=rewards, ndim=1, dtypes=(torch.float32, torch.float64))
    n_seq, seq_len, _ = logits.shape
    for name, t, shape in (("targets", targets, (n_seq, seq_len)), ("mask", mask, (n_seq, seq_len)),
                           ("old_logps", old_logps, (n_seq, seq_len)), ("ref_logps", ref_logps, (n_seq, seq_len)),
                           ("rewards", rewards, (n_seq,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match logits {tuple(logits.shape)}, "
                             f"got {tuple(t.shape)}")
    if not isinstance(group_size, int) or group_size < 2 or n_seq % group_size:
        raise ValueError(f"group_size must be an int >= 2 that divides B = {n_seq}, got {group_size!r}")
    if not 0.0 <= eps < 1.0 or not beta >= 0.0:
        raise ValueError(f"need 0 <= eps < 1 and beta >= 0, got eps={eps}, beta={beta}")
    # One host sync: a sequence with no completion token has no mean (0 / 0), which would make the
    # loss NaN; say so here instead.
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"every sequence needs at least one completion token (a mask row with a True); "
                         f"rows {empty} have none")
    return GRPOLossFunction.apply(logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta)


# --------------------------------------------------------------------------------------------
# Exercise 12.5 (from the capstone, lessons/expert/12_production_capstone.md): residual add and
# LayerNorm in one kernel
# A pre-norm transformer block starts with  h = x + residual;  y = LayerNorm(h) * w + b.  As two
# kernels, h goes to memory and comes straight back: the add writes it, the norm reads it. One
# program per row can add, keep h in registers, normalize it and write both h (the next block's
# residual stream) and y: per row, 2 reads and 2 writes of N elements instead of 3 and 3.
# h is rounded to x's dtype before it is normalized, as PyTorch's F.layer_norm(x + residual)
# does, so the fused kernel gives the same numbers as the two kernels it replaces.

ADD_NORM_MAX_COLS = 16384  # a row lives in registers, as in lesson 08's LayerNorm


@triton.jit
def add_layernorm_kernel(
    x_ptr,  # M x N, row i at x_ptr + i * stride_x, columns contiguous
    r_ptr,  # M x N residual, row i at r_ptr + i * stride_r
    w_ptr,  # weight, N
    b_ptr,  # bias, N
    h_ptr,  # output M x N contiguous, x's dtype: x + residual
    y_ptr,  # output M x N contiguous, x's dtype: LayerNorm(h) * w + b
    stride_x,  # elements between x[i, 0] and x[i + 1, 0]
    stride_r,  # elements between residual[i, 0] and residual[i + 1, 0]
    n_cols,  # N
    eps,  # added to the variance
    BLOCK_SIZE: tl.constexpr,  # a power of 2 >= N: the whole row is one block
):
    row = tl.program_id(axis=0).to(tl.int64)  # int64: row * stride can pass 2^31
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)  # rounded as the two kernels would
    tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
    hf = h.to(tl.float32)
    mean = tl.sum(hf, axis=0) / n_cols
    hc = tl.where(mask, hf - mean, 0.0)  # the lanes past N add nothing to the variance
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (hc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


def add_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual, and y = LayerNorm(h) * weight + bias over the last dimension.

    x and residual (..., N) of one float dtype, rows contiguous in the last dimension (the leading
    dimensions may be strided); weight and bias (N,); h and y are new tensors of x's shape and dtype.
    """
    common.check_tensors(x=x, residual=residual, contiguous=False, dtypes=FLOAT_DTYPES)
    common.check_tensors(weight=weight, bias=bias, ndim=1, same_dtype=False, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must have at least one row of at least one element, got shape {tuple(x.shape)}")
    n_cols = x.shape[-1]
    if n_cols > ADD_NORM_MAX_COLS:
        raise ValueError(f"rows of {n_cols} elements: this kernel holds a row in one block, at most {ADD_NORM_MAX_COLS}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p.shape[0] != n_cols:
            raise ValueError(f"{name} must have shape ({n_cols},) to match x's last dimension, got {tuple(p.shape)}")
    x_rows, r_rows = x.reshape(-1, n_cols), residual.reshape(-1, n_cols)
    if x_rows.stride(-1) != 1 and n_cols > 1:
        x_rows = x_rows.contiguous()
    if r_rows.stride(-1) != 1 and n_cols > 1:
        r_rows = r_rows.contiguous()
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = max(16, triton.next_power_of_2(n_cols))
    add_layernorm_kernel[(x_rows.shape[0],)](x_rows, r_rows, weight, bias, h, y, x_rows.stride(0), r_rows.stride(0),
                                             n_cols, eps, BLOCK_SIZE=block,
                                             num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return h, y
