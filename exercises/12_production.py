"""
Exercises for lesson 12: production systems
===========================================

Fill in the TODOs, then grade your answers with:

    make check LESSON=12

12.1 turns a finished Triton kernel into a torch.library custom op (what the lesson does for
its own kernel, for another one); 12.2 is a variant of the lesson's fused DPO loss (the mean
log-prob over the response instead of the sum, and label smoothing); 12.3 captures a decode
step in a CUDA graph (it needs a CUDA GPU; without one it is reported as skipped). Hints, from
gentle to explicit, are in lessons/expert/12_production.md under "Exercises".
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


def register_softcap(qualname: str = "course_ex12::softcap"):
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

    # TODO: define the op with @torch.library.custom_op(qualname, mutates_args=()) on a function
    #       softcap(x: torch.Tensor, cap: float) -> torch.Tensor that returns softcap_forward(x, cap)
    #       (the type annotations are the op's schema) (about 3 lines)
    # TODO: its fake implementation, with @softcap.register_fake: an empty tensor like x (about 3 lines)
    # TODO: setup_context(ctx, inputs, output) saving x and cap, and backward(ctx, grad_y) returning
    #       (dx, None); register them with softcap.register_autograd (about 9 lines)
    # TODO: return the op (1 line)
    raise NotImplementedError("TODO: exercise 12.1")


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
    # TODO: this program's row (as int64); fp32 zeros for logp and lse, for the prompt rows (about 3 lines)
    # TODO: if the row's mask is not 0: the column offsets, a running max m = -inf and sum d = 0.0;
    #       for each chunk, load it (other=-inf past V) as fp32, update m and d; then
    #       lse = m + log(d) and logp = x[target] - lse (about 12 lines)
    # TODO: store logp and lse (about 2 lines)
    pass


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
    # TODO: this program's row (as int64); load its coef, lse and target (about 4 lines)
    # TODO: for each chunk of BLOCK_V columns: load the logits as fp32 (none at all where coef is 0),
    #       p = exp(x - lse), grad = coef * (onehot - p), 0 where coef is 0; store it in the
    #       output's dtype, masked past V (about 7 lines)
    pass


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
        # TODO: view the logits as N x V rows (N = 2B * T) and run token_logps on them, with the
        #       targets flattened and the mask flattened as int8 (about 4 lines)
        # TODO: the response lengths (fp32, per row) and the mean log-prob s of every sequence (about 2 lines)
        # TODO: delta and the loss of each pair, from the formulas above (F.logsigmoid) (about 3 lines)
        # TODO: save what backward needs (ctx.save_for_backward for tensors, ctx attributes for
        #       beta and eps); return the loss (about 3 lines)
        raise NotImplementedError("TODO: exercise 12.2 (DPOLossFunction.forward)")

    @staticmethod
    def backward(ctx, grad_loss):
        # TODO: dL/d delta for each pair, scaled by grad_loss (each pair has its own) (about 2 lines)
        # TODO: dL/ds for the 2B sequences (+ for chosen, - for rejected), then coef (2B, T): dL/ds
        #       spread over each response's tokens, 0 at the prompt and the padding (about 2 lines)
        # TODO: dlogits from logits_grad on the N x V view, reshaped to (2B, T, V); return it and a
        #       None for each of the other five inputs (about 3 lines)
        raise NotImplementedError("TODO: exercise 12.2 (DPOLossFunction.backward)")


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
    # TODO: the static inputs: clones of example_inputs (about 1 line)
    # TODO: warm up: a side stream that waits for the current one; run step `warmup` times on it;
    #       then the current stream waits for the side stream (about 5 lines)
    # TODO: capture: graph = torch.cuda.CUDAGraph(); with torch.cuda.graph(graph): static_output = ...
    #       (about 3 lines)
    # TODO: def replay(*new_inputs): check the number of inputs and each one's shape, dtype and device
    #       (ValueError), copy them into the static inputs, graph.replay(), return a clone of the
    #       static output (about 10 lines)
    # TODO: return replay (1 line)
    raise NotImplementedError("TODO: exercise 12.3")
