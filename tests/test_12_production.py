"""Lesson 12 (production systems): the exercise checks and the grader's own tests.

IMPL=exercises (default) grades exercises/12_production.py; IMPL=solutions grades the answers.
The lesson script's own kernels are tested in tests/test_12_production_lesson.py.
"""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, awkward_sizes, randn
from common.checks import PoisonedAllocations
from common.grading import Exercise, NeedsGPU, expect_rejected, lesson_tests, load_impl, solution_with, with_flags

STEM = "12_production"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])



# --------------------------------------------------------------------------- 12.1 custom op

OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
_QUALNAMES = itertools.count()


def _fresh_qualname() -> str:
    """A name no op has yet: the grader registers every answer it grades under a new one."""
    return f"course_grade12_{next(_QUALNAMES)}::softcap"


def _softcap64(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x.double() / cap)


def _registered_overload(qualname: str):
    namespace, name = qualname.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def _opcheck_diagnosis(test: str, err: Exception) -> str:
    message = str(err).strip()
    detail = message.splitlines()[0][:400] if message else type(err).__name__
    if "register_autograd" in message:
        hint = ("the op has no backward: register one with softcap.register_autograd(backward, "
                "setup_context=setup_context)")
    elif test == "test_schema" and "mutated" in message:
        hint = ("the op writes into its input x, but it was registered with mutates_args=(): compute "
                "the result into a new tensor (softcap_forward does), or declare the mutation")
    elif test == "test_schema" and "alias" in message:
        hint = "the op returns its input (or a view of it): a custom op must return a new tensor"
    elif "no fake impl" in message or "fake impl" in message:
        hint = "the op has no fake implementation: register one with @softcap.register_fake"
    elif test == "test_faketensor":
        hint = ("the fake implementation (register_fake) does not describe the real output: it must "
                "return an empty tensor of the output's shape, dtype and device, torch.empty_like(x), "
                "and must not run the kernel (fake tensors have no data)")
    else:
        hint = ("the op fails when AOTAutograd traces it with dynamic shapes, as torch.compile does; "
                "run torch.library.opcheck(op, (x, cap)) yourself to see the whole error")
    return f"torch.library.opcheck {test} failed: {detail}\n  hint: {hint}"


def _backward_error(err: Exception) -> CheckError:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "register_autograd" in str(err) or "does not require grad" in str(err):
        return CheckError(f"backward through the op failed: {message}\n  hint: the op has no backward: "
                          f"register one with softcap.register_autograd(backward, setup_context=setup_context)")
    return CheckError(f"backward through the op failed: {type(err).__name__}: {message}")


def _softcap_grad(call, x, cap, dy):
    """dL/dx of call(x, cap) for upstream dy, through autograd; CheckError when there is no backward."""
    xg = x.detach().clone().requires_grad_()
    try:
        y = call(xg, cap)
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            raise CheckError("the op's output does not require grad for an input that does: the op has no "
                             "backward; register one with softcap.register_autograd(backward, "
                             "setup_context=setup_context)")
        (dx,) = torch.autograd.grad(y, xg, dy)
    except RuntimeError as err:
        raise _backward_error(err) from err
    return y.detach(), dx


def _softcap_grad_mistakes(x, cap, dy):
    t = torch.tanh(x.double() / cap)
    dy = dy.double()
    return {
        "dx = dy * (1 - tanh(x / cap)): the derivative of tanh(u) is 1 - tanh(u)^2": dy * (1 - t),
        "dx was divided by cap: d/dx [cap * tanh(x / cap)] = cap * (1 - t^2) / cap = 1 - t^2": dy * (1 - t * t) / cap,
        "dx was multiplied by cap: d/dx [cap * tanh(x / cap)] = 1 - tanh(x / cap)^2, the caps cancel":
            dy * (1 - t * t) * cap,
        "dx = 1 - t^2 without the upstream gradient: multiply by grad_y (backward's second argument)": 1 - t * t,
        "dx is grad_y unchanged: the backward returned its input instead of grad_y * (1 - t^2)": dy,
    }


def check_register_softcap(register_softcap):
    qualname = _fresh_qualname()
    op = register_softcap(qualname)
    if op is None:
        raise CheckError("register_softcap returned None: return the op that @torch.library.custom_op made")
    overload = _registered_overload(qualname)
    if overload is None:
        raise CheckError(f"no op named {qualname} was registered: register_softcap must call "
                         f"torch.library.custom_op with the name it is given (qualname), so that the op "
                         f"exists as torch.ops.{qualname.replace('::', '.')}")

    # 1. forward, in every dtype, on awkward sizes; the input must come back untouched
    for dtype in DTYPES:
        for i, n in enumerate(awkward_sizes(2, lo=1000, hi=50_000, include=(1,))):
            shape = (n,) if i % 2 == 0 else (3, n // 3 + 1)
            cap = (30.0, 2.5, 7.0)[i % 3]
            x = randn(*shape, dtype=dtype, scale=1.5 * cap)  # both the linear part and the saturation
            before = x.clone()
            try:
                y = op(x, cap)
            except RuntimeError as err:
                if "alias" not in str(err):
                    raise
                raise CheckError("the op returned its input x (or a view of it): a custom op must return a new "
                                 "tensor, here the one softcap_forward allocates") from err
            if not torch.equal(x, before):
                raise CheckError("the op changed its input x: it was registered with mutates_args=(), so "
                                 "torch.compile and autograd assume x is unchanged (declare mutates_args, "
                                 "or better, write the result to a new tensor)")
            name = f"softcap {shape} cap={cap} {common.dtype_name(dtype)}"
            assert_close(y, _softcap64(x, cap), name=name, mistakes={
                "y = tanh(x): the op must be cap * tanh(x / cap) (softcap_forward)": torch.tanh(x.double()),
                "y = cap * tanh(x): x must be divided by cap first": cap * torch.tanh(x.double())})
            assert_close(overload(x, cap), _softcap64(x, cap), name=f"torch.ops.{qualname.replace('::', '.')} {name}")

    # 2. backward through the op vs autograd of the float64 reference
    for dtype in DTYPES:
        n = awkward_sizes(1, lo=500, hi=20_000)[0]
        cap = 4.0
        x, dy = randn(2, n, dtype=dtype, scale=6.0), randn(2, n, dtype=dtype)
        _, dx = _softcap_grad(overload, x, cap, dy)
        x64 = x.double().requires_grad_()
        (dx_ref,) = torch.autograd.grad(_softcap64(x64, cap), x64, dy.double())
        assert_close(dx, dx_ref, name=f"softcap backward dx (2, {n}) {common.dtype_name(dtype)}",
                     mistakes=_softcap_grad_mistakes(x, cap, dy))

    # 3. every test of torch.library.opcheck, with and without autograd, in two dtypes, 1-D to 3-D
    samples = [(randn(37, 53).requires_grad_(), 4.0), (randn(5, 3, 129, dtype=torch.float16), 30.0),
               (randn(1).requires_grad_(), 1.5)]
    for x, cap in samples:
        for test in OPCHECK_TESTS:
            try:
                torch.library.opcheck(overload, (x, cap), test_utils=test)
            except Exception as err:  # OpCheckError, or whatever the op raised inside it
                raise CheckError(_opcheck_diagnosis(test, err)) from err

    # 4. torch.compile(fullgraph=True) of a function around the op, forward and backward, at two sizes
    # (the second compiles with a dynamic size). In the interpreter the tensors are on the CPU,
    # where inductor would need a C++ compiler and cannot run Triton: aot_eager still traces the
    # op with its fake implementation and its backward, which is what this checks.
    backend = "inductor" if common.HAS_GPU else "aot_eager"
    torch._dynamo.reset()  # a fresh cache: each graded answer is a different op

    def f(a):
        return overload(a * 2.0, 3.0) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    for n in (203, 1001):
        x, dy = randn(3, n), randn(3, n)
        try:
            y, dx = _softcap_grad(lambda a, _cap: compiled(a), x, None, dy)
        except CheckError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckError(f"torch.compile(f, fullgraph=True, backend='{backend}') of f(a) = softcap(2a, 3) + 1 "
                             f"failed: {type(err).__name__}: {first[:400]}\n  hint: a custom op with a fake "
                             f"implementation and a registered backward compiles without a graph break") from err
        x64 = x.double().requires_grad_()
        y_ref = _softcap64(x64 * 2.0, 3.0) + 1.0
        (dx_ref,) = torch.autograd.grad(y_ref, x64, dy.double())
        assert_close(y, y_ref.detach(), name=f"compiled softcap forward (3, {n})")
        assert_close(dx, dx_ref, name=f"compiled softcap backward (3, {n})")


# --------------------------------------------------------------------------- 12.2 DPO loss

def _dpo_case(n_pairs, seq_len, n_cols, dtype, offset=0.0):
    """Logits (2B, T, V), targets, a mask with a prompt, a response and padding per row, ref log-probs."""
    n_seq = 2 * n_pairs
    logits = randn(n_seq, seq_len, n_cols, dtype=torch.float32, scale=3.0) + offset
    logits = logits.to(dtype)
    targets = torch.randint(0, n_cols, (n_seq, seq_len), device=common.DEVICE)  # valid ids at the prompt too
    mask = torch.zeros(n_seq, seq_len, dtype=torch.bool)
    for r in range(n_seq):
        start = int(torch.randint(0, seq_len - 1, ()))
        stop = int(torch.randint(start + 1, seq_len + 1, ()))
        mask[r, start:stop] = True
    mask[0, :] = True  # a response with no prompt and no padding
    ref_logps = randn(n_seq) * 0.5 - 4.0
    return logits, targets, mask.to(common.DEVICE), ref_logps


def _dpo_pieces64(logits, targets, mask, ref_logps, beta, eps, grad_loss):
    """Everything the checks and the diagnoses need, in float64 and by hand."""
    lg = logits.double()
    n_seq = lg.shape[0]
    n_pairs = n_seq // 2
    m = mask.double()
    logsm = torch.log_softmax(lg, dim=-1)
    lp = logsm.gather(-1, targets[..., None]).squeeze(-1)  # (2B, T)
    n_tok = m.sum(dim=1)
    ref = ref_logps.double()
    ref_margin = ref[:n_pairs] - ref[n_pairs:]

    def loss_of(s, eps_=eps, beta_=beta, margin=ref_margin, sign=1.0):
        delta = sign * beta_ * ((s[:n_pairs] - s[n_pairs:]) - margin)
        return -(1 - eps_) * F.logsigmoid(delta) - eps_ * F.logsigmoid(-delta)

    s_mean = (lp * m).sum(1) / n_tok
    delta = beta * ((s_mean[:n_pairs] - s_mean[n_pairs:]) - ref_margin)
    g = grad_loss.double()

    def grad_of(eps_=eps, g_=g, per_token=m / n_tok[:, None], rejected_sign=-1.0, onehot=True, softmax=True,
                sign=1.0):
        d_delta = g_ * (torch.sigmoid(delta) - (1 - eps_))
        d_s = beta * torch.cat([d_delta, rejected_sign * d_delta])
        coef = d_s[:, None] * per_token
        term = torch.zeros_like(lg)
        if onehot:
            term.scatter_(-1, targets[..., None], 1.0)
        if softmax:
            term = term - logsm.exp()
        return sign * coef[..., None] * term

    return dict(lp=lp, m=m, n_tok=n_tok, loss_of=loss_of, grad_of=grad_of, s_mean=s_mean, n_pairs=n_pairs)


def _dpo_reference(logits, targets, mask, ref_logps, beta, eps, grad_loss):
    """Loss and dL/dlogits through PyTorch's autograd in float64: the reference."""
    lg = logits.detach().double().requires_grad_()
    lp = torch.log_softmax(lg, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    s = (lp * mask).sum(1) / mask.sum(1)
    n_pairs = lg.shape[0] // 2
    ref = ref_logps.double()
    delta = beta * ((s[:n_pairs] - s[n_pairs:]) - (ref[:n_pairs] - ref[n_pairs:]))
    loss = -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
    (dlogits,) = torch.autograd.grad(loss, lg, grad_loss.double())
    return loss.detach(), dlogits


def _dpo_cases():
    """(B, T, V, dtype, beta, eps, offset): V is never a multiple of the chunk; one case has large logits."""
    if common.INTERPRETER:
        n_cols = awkward_sizes(2, lo=300, hi=1500)
        cases = [(2, 7, n_cols[0], torch.float32, 0.5, 0.0, 0.0), (3, 5, n_cols[1], torch.float32, 1.0, 0.25, 0.0),
                 (2, 6, n_cols[1], torch.float16, 2.0, 0.1, 0.0), (2, 5, n_cols[0], torch.float32, 0.5, 0.1, 85.0),
                 (1, 4, n_cols[1], torch.float16, 1.0, 0.0, -80.0)]
    else:
        n_cols = awkward_sizes(2, lo=5000, hi=40_000)
        cases = [(4, 33, n_cols[0], torch.float32, 0.5, 0.0, 0.0), (3, 50, n_cols[1], torch.float32, 1.0, 0.25, 0.0),
                 (4, 21, n_cols[1], torch.float16, 2.0, 0.1, 0.0), (2, 17, n_cols[0], torch.float32, 0.5, 0.1, 85.0),
                 (2, 9, n_cols[1], torch.float16, 1.0, 0.0, -80.0)]
        if common.supports_bf16():
            cases.append((3, 19, n_cols[0], torch.bfloat16, 1.0, 0.1, 0.0))
    return cases


def check_dpo_loss(dpo_loss):
    for n_pairs, seq_len, n_cols, dtype, beta, eps, offset in _dpo_cases():
        logits, targets, mask, ref_logps = _dpo_case(n_pairs, seq_len, n_cols, dtype, offset)
        grad_loss = randn(n_pairs)  # each pair its own upstream gradient
        name = f"B={n_pairs} T={seq_len} V={n_cols} {common.dtype_name(dtype)} beta={beta} eps={eps}"
        if offset:
            name += f" logits around {offset:+.0f}"
        x = logits.detach().clone().requires_grad_()
        with PoisonedAllocations() as allocations:
            loss = dpo_loss(x, targets, mask, ref_logps, beta=beta, eps=eps)
            if not isinstance(loss, torch.Tensor) or loss.shape != (n_pairs,):
                raise CheckError(f"dpo_loss must return one loss per pair, shape ({n_pairs},), got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}")
            if loss.grad_fn is None:
                raise CheckError("the loss has no grad_fn: return DPOLossFunction.apply(...)")
            (dlogits,) = torch.autograd.grad(loss, x, grad_loss)
        allocations.check_guards()
        loss_ref, dlogits_ref = _dpo_reference(logits, targets, mask, ref_logps, beta, eps, grad_loss)
        parts = _dpo_pieces64(logits, targets, mask, ref_logps, beta, eps, grad_loss)

        if not torch.isfinite(loss).all():
            if offset:
                big = float(logits.float().abs().max())
                raise CheckError(
                    f"loss {name}: {loss.tolist()} is not finite, for logits up to |x| = {big:.0f}.\n  hint: exp(x) "
                    f"overflows fp32 above x = 88.7: subtract the running max before exp (online "
                    f"log-sum-exp: m_new = max(m, max(x)); d = d * exp(m - m_new) + sum(exp(x - m_new)))")
            raise CheckError(
                f"loss {name}: {loss.tolist()} is not finite although the logits are small.\n  hint: logp and lse "
                f"must be stored for every row, 0 for the prompt tokens (the buffers hold NaN before the "
                f"kernel runs), and every response has at least one token")
        lp, m, loss_of = parts["lp"], parts["m"], parts["loss_of"]
        n_half = parts["n_pairs"]
        loss_mistakes = {
            "the log-probs were summed over the response: this variant uses their MEAN (divide by the number "
            "of response tokens, mask.sum(1))": loss_of((lp * m).sum(1)),
            "the prompt and padding tokens were counted: the mean is over the masked (response) tokens only":
                loss_of(lp.mean(1)),
            "the sum over the response was divided by T: divide by each row's number of response tokens":
                loss_of((lp * m).sum(1) / m.shape[1]),
            "the reference log-probs were left out: delta = beta * ((pc - pr) - (rc - rr))":
                loss_of(parts["s_mean"], margin=torch.zeros(n_half, dtype=torch.float64, device=lp.device)),
            "beta is missing: delta = beta * ((pc - pr) - (rc - rr))": loss_of(parts["s_mean"], beta_=1.0),
            "chosen and rejected are swapped: rows 0..B-1 are the chosen responses, rows B..2B-1 the rejected":
                loss_of(parts["s_mean"], sign=-1.0),
        }
        if eps:
            loss_mistakes["eps was ignored: loss = -(1 - eps) * logsigmoid(delta) - eps * logsigmoid(-delta)"] = \
                loss_of(parts["s_mean"], eps_=0.0)
        assert_close(loss, loss_ref, name=f"loss {name}", mistakes=loss_mistakes)

        # The gradient is small (beta / length times a probability): compare it relative to its largest value.
        scale = 1.0 / float(dlogits_ref.abs().max())
        grad_of = parts["grad_of"]
        unwritten = dlogits_ref.clone()
        unwritten[~mask] = math.nan
        grad_mistakes = {
            "the gradient has the wrong sign: dlogp/dx = onehot - softmax (the cross-entropy's gradient, "
            "softmax - onehot, is that of -logp)": grad_of(sign=-1.0),
            "the softmax term is missing: dlogp/dx[v] = onehot[v] - exp(x[v] - lse)": grad_of(softmax=False),
            "the onehot term is missing: dlogp/dx[v] = onehot[v] - exp(x[v] - lse), +1 at the target":
                grad_of(onehot=False),
            "the rejected rows have the chosen rows' sign: dL/ds of a rejected response is -beta * dL/d delta":
                grad_of(rejected_sign=1.0),
            "grad_loss was ignored: each pair's dL/d delta is multiplied by its upstream gradient":
                grad_of(g_=torch.ones_like(grad_loss, dtype=torch.float64)),
            "the gradient was not divided by the response length: coef = dL/ds * mask / (number of response "
            "tokens)": grad_of(per_token=m),
            "the prompt and padding rows of dlogits were never written: store zeros where coef is 0":
                unwritten,
        }
        if eps:
            grad_mistakes["eps was ignored in the backward pass: dL/d delta = sigmoid(delta) - (1 - eps)"] = \
                grad_of(eps_=0.0)
        assert_close(dlogits * scale, dlogits_ref * scale, name=f"dlogits (divided by its largest value) {name}",
                     mistakes={hint: g * scale for hint, g in grad_mistakes.items()})

    logits, targets, mask, ref_logps = _dpo_case(2, 5, 301, torch.float32)
    mask[3] = False  # the second pair's rejected response has no token
    try:
        dpo_loss(logits, targets, mask, ref_logps)
    except ValueError:
        pass
    else:
        raise CheckError("dpo_loss returned for a response with no tokens (mask row 3 all False) instead of "
                         "raising ValueError: its mean log-prob is 0 / 0; require at least one response "
                         "token per row")


# --------------------------------------------------------------------------- 12.3 CUDA graph

@triton.jit
def _silu_kernel(x_ptr, y_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(y_ptr + offsets, x * tl.sigmoid(x), mask=mask)


def _decode_step(batch: int = 3, dim: int = 96):
    """A toy decode step (two matmuls, a Triton kernel, residual adds), counting its Python calls."""
    w_in = randn(dim, 4 * dim, scale=dim ** -0.5)
    w_out = randn(4 * dim, dim, scale=(4 * dim) ** -0.5)
    calls = [0]

    def math_of(x, h):
        a = (x + h) @ w_in
        y = torch.empty_like(a)
        _silu_kernel[(triton.cdiv(a.numel(), 256),)](a, y, a.numel(), BLOCK_SIZE=256)
        return h + y @ w_out

    def step(x, h):
        calls[0] += 1
        return math_of(x, h)

    return step, calls, math_of, (batch, dim)


def check_graph_decode_step(graph_decode_step):
    if not common.HAS_GPU:
        raise NeedsGPU("needs a CUDA GPU: CUDA graphs record and replay GPU kernel launches, and this run "
                       "uses Triton's CPU interpreter")
    step, calls, math_of, shape = _decode_step()
    x0, h0 = randn(*shape), randn(*shape)
    example = (x0, h0)
    kept = tuple(t.clone() for t in example)
    replay = graph_decode_step(step, example)
    if not callable(replay):
        raise CheckError(f"graph_decode_step must return a function replay(*new_inputs), got {type(replay).__name__}")
    built = calls[0]
    if built == 0:
        raise CheckError("graph_decode_step never ran step: warm it up and capture it before returning replay")
    first = math_of(x0, h0)
    outputs, expected = [], []
    for k in range(4):
        x, h = randn(*shape), randn(*shape)
        out = replay(x, h)
        torch.cuda.synchronize()
        if calls[0] != built:
            raise CheckError(f"step ran in Python {calls[0] - built} more time(s) during {k + 1} call(s) of "
                             f"replay: capture the graph once, in graph_decode_step; replay only copies the "
                             f"inputs into the static buffers and calls graph.replay()")
        want = math_of(x, h)
        mistakes = {"replay returned the output for the example inputs: copy each new input into its static "
                    "buffer (static.copy_(new)) before graph.replay()": first}
        if expected:
            mistakes["replay returned the previous call's output: copy the new inputs before the replay"] = expected[-1]
        assert_close(out, want, name=f"replay call {k + 1}", mistakes=mistakes)
        outputs.append(out)
        expected.append(want)
    for k, (out, want) in enumerate(zip(outputs[:-1], expected[:-1])):
        assert_close(out, want, name=f"the output of replay call {k + 1}, read after {len(outputs) - k - 1} more "
                     f"call(s)", mistakes={
                         "the output changed when replay ran again: replay returned the graph's static output "
                         "buffer, which every replay overwrites; return static_output.clone()": expected[-1]})
    for i, (t, before) in enumerate(zip(example, kept)):
        if not torch.equal(t, before):
            raise CheckError(f"replay wrote into example input {i}, the caller's tensor: the graph must own its "
                             f"static input buffers (clone the example inputs) and copy new inputs into those")
    for what, bad in (("x of shape (1, D)", (x0[:1], h0)), ("x in float16", (x0.half(), h0))):
        try:
            replay(*bad)
        except ValueError:
            continue
        raise CheckError(f"replay accepted {what} for a graph captured with x {tuple(x0.shape)} float32: copy_ "
                         f"broadcasts or converts it silently; raise ValueError when a new input's shape, "
                         f"dtype or device differs from the captured one")


# --------------------------------------------------------------------------- 12.4 GRPO loss

def _grpo_case(n_prompts, group_size, seq_len, n_cols, dtype, eps, offset=0.0):
    """Logits (B, T, V), targets, a mask with a prompt, a completion and padding per row, old and reference
    log-probs near the policy's own (ratios inside and outside the clip range, for A > 0 and A < 0),
    binary rewards: prompt 0's all 1 (A = 0), prompt 1's first two 1 and 0 (A > 0 and A < 0)."""
    n_seq = n_prompts * group_size
    logits = (randn(n_seq, seq_len, n_cols, scale=3.0) + offset).to(dtype)
    targets = torch.randint(0, n_cols, (n_seq, seq_len), device=common.DEVICE)  # valid ids at the prompt too
    mask = torch.zeros(n_seq, seq_len, dtype=torch.bool)
    for r in range(n_seq):
        start = int(torch.randint(0, seq_len - 1, ()))
        stop = int(torch.randint(start + 1, seq_len + 1, ()))
        mask[r, start:stop] = True
    mask[0, :] = True  # a completion with no prompt and no padding
    for r in (group_size, group_size + 1):  # a prompt, then a completion to the end: its last two tokens
        mask[r] = torch.arange(seq_len) >= int(torch.randint(1, seq_len - 1, ()))
    mask = mask.to(common.DEVICE)
    rewards = (torch.rand(n_seq) < 0.5).float()
    rewards[:group_size] = 1.0
    rewards[group_size], rewards[group_size + 1] = 1.0, 0.0
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    log_ratio = torch.randn(n_seq, seq_len, dtype=torch.float64) * 0.3  # ratio = exp(log_ratio)
    log_ratio[group_size:group_size + 2, -1] = torch.tensor([0.6, -0.6])  # clipped: A > 0 high, A < 0 low
    log_ratio[group_size:group_size + 2, -2] = torch.tensor([-0.6, 0.6])  # the far sides: not clipped
    for edge in (math.log(1 - eps), math.log(1 + eps)):  # away from the edges, where fp32 may branch otherwise
        log_ratio[(log_ratio - edge).abs() < 1e-3] += 1e-2
    junk = randn(n_seq, seq_len, scale=0.5) - 3.0  # at the prompt and the padding: must not be used
    old_logps = torch.where(mask, (logp - log_ratio.to(common.DEVICE)).float(), junk)
    ref_logps = torch.where(mask, (logp + 0.3 * torch.randn_like(logp)).float(), junk)
    return logits, targets, mask, old_logps, ref_logps, rewards.to(common.DEVICE)


def _grpo64(logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta, grad_loss, *, clip=True,
            clip_grad=True, kl_sign=1.0, kl_reversed=False, dkl_sign=1.0, count_prompt=False, weighted=True,
            negated=True, grad_sign=1.0, onehot=True, softmax=True):
    """(loss, dlogits) in float64, by hand, with one of the likely mistakes switched on (none by default)."""
    lg = logits.double()
    logsm = torch.log_softmax(lg, -1)
    logp = logsm.gather(-1, targets[..., None])[..., 0]
    groups = rewards.double().view(-1, group_size)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    ratio = torch.exp(logp - old_logps.double())
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv
    surrogate = torch.minimum(unclipped, clipped) if clip else unclipped
    d_surrogate = torch.where(unclipped <= clipped, unclipped, 0.0) if clip and clip_grad else unclipped
    log_r = ref_logps.double() - logp
    if kl_reversed:
        kl, d_kl = torch.exp(-log_r) + log_r - 1, torch.exp(-log_r) - 1
    else:
        kl, d_kl = torch.exp(log_r) - log_r - 1, 1 - torch.exp(log_r)
    sign = 1.0 if negated else -1.0
    token = -sign * (surrogate - kl_sign * beta * kl)
    d_token = -sign * (d_surrogate - kl_sign * dkl_sign * beta * d_kl)
    m = mask.double()
    weight = (1.0 / (m.shape[0] * m.sum(1)))[:, None] if weighted else 1.0
    counted = torch.ones_like(m) if count_prompt else m
    loss = (weight * counted * token).sum()
    g = grad_loss.double() * grad_sign * weight * counted * d_token
    term = torch.zeros_like(lg)
    if onehot:
        term.scatter_(-1, targets[..., None], 1.0)
    if softmax:
        term = term - logsm.exp()
    return loss, g[..., None] * term


def _grpo_reference(logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta, grad_loss):
    """Loss and dL/dlogits through PyTorch's autograd in float64: the reference."""
    lg = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(lg, -1).gather(-1, targets[..., None])[..., 0]
    groups = rewards.double().view(-1, group_size)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    ratio = torch.exp(logp - old_logps.double())
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    log_r = ref_logps.double() - logp
    token = -(surrogate - beta * (torch.exp(log_r) - log_r - 1))
    m = mask.double()
    loss = ((token * m).sum(1) / m.sum(1)).mean()
    (dlogits,) = torch.autograd.grad(loss, lg, grad_loss.double())
    return loss.detach(), dlogits


def _grpo_cases():
    """(prompts, G, T, V, dtype, eps, beta, offset): T odd, V never a multiple of the chunk; the second
    case has logits around +85, where exp overflows fp32 without the running max."""
    if common.INTERPRETER:
        n_cols = awkward_sizes(2, lo=300, hi=1200)
        cases = [(2, 3, 7, n_cols[0], torch.float32, 0.2, 0.04, 0.0),
                 (2, 2, 5, n_cols[1], torch.float32, 0.2, 0.1, 85.0),
                 (3, 2, 5, n_cols[1], torch.float16, 0.1, 0.5, 0.0)]
    else:
        n_cols = awkward_sizes(2, lo=5000, hi=40_000)
        cases = [(3, 4, 33, n_cols[0], torch.float32, 0.2, 0.04, 0.0),
                 (2, 4, 17, n_cols[1], torch.float32, 0.2, 0.1, 85.0),
                 (3, 4, 21, n_cols[1], torch.float16, 0.1, 0.5, 0.0)]
        if common.supports_bf16():
            cases.append((2, 4, 19, n_cols[0], torch.bfloat16, 0.2, 0.04, 0.0))
    return cases


def check_grpo_loss(grpo_loss):
    for n_prompts, group_size, seq_len, n_cols, dtype, eps, beta, offset in _grpo_cases():
        logits, targets, mask, old_logps, ref_logps, rewards = _grpo_case(n_prompts, group_size, seq_len, n_cols,
                                                                         dtype, eps, offset)
        grad_loss = (0.5 + torch.rand(())).to(common.DEVICE)
        name = (f"{n_prompts} prompts x G={group_size} T={seq_len} V={n_cols} {common.dtype_name(dtype)} eps={eps} "
                f"beta={beta}" + (f" logits around {offset:+.0f}" if offset else ""))
        x = logits.detach().clone().requires_grad_()
        with PoisonedAllocations() as allocations:
            loss = grpo_loss(x, targets, mask, old_logps, ref_logps, rewards, group_size, eps=eps, beta=beta)
            if not isinstance(loss, torch.Tensor) or loss.shape != ():
                raise CheckError(f"grpo_loss must return the loss as a scalar tensor, got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}")
            if loss.grad_fn is None:
                raise CheckError("the loss has no grad_fn: return GRPOLossFunction.apply(...)")
            (dlogits,) = torch.autograd.grad(loss, x, grad_loss)
        allocations.check_guards()
        loss_ref, dlogits_ref = _grpo_reference(logits, targets, mask, old_logps, ref_logps, rewards, group_size,
                                                eps, beta, grad_loss)
        args = (logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta, grad_loss)

        if not torch.isfinite(loss):
            if offset:
                big = float(logits.float().abs().max())
                raise CheckError(
                    f"loss {name}: {loss.item()} is not finite, for logits up to |x| = {big:.0f}.\n  hint: exp(x) "
                    f"overflows fp32 above x = 88.7: subtract the running max before exp (online log-sum-exp: "
                    f"m_new = max(m, max(x)); d = d * exp(m - m_new) + sum(exp(x - m_new)))")
            raise CheckError(
                f"loss {name}: {loss.item()} is not finite although the logits are small.\n  hint: the loss must "
                f"be stored for every row, 0 for the prompt and padding tokens (the buffers hold NaN before the "
                f"kernel runs)")
        loss_mistakes = {
            "the ratio was not clipped: surrogate = min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A)":
                _grpo64(*args, clip=False)[0],
            "the KL penalty has the wrong sign: loss = -(surrogate - beta * kl), so the KL is added to the loss":
                _grpo64(*args, kl_sign=-1.0)[0],
            "the KL estimator is reversed: k3 = exp(ref - logp) - (ref - logp) - 1, with ref_logps - logp":
                _grpo64(*args, kl_reversed=True)[0],
            "the prompt and padding tokens were counted: only completion tokens (mask 1) enter the loss; store 0 "
            "for the others": _grpo64(*args, count_prompt=True)[0],
            "the loss was not negated: loss = -(surrogate - beta * kl) (minimising it raises the surrogate)":
                _grpo64(*args, negated=False)[0],
            "the weight was not applied: each token's loss (and gradient) is multiplied by its row's w = "
            "1 / (B * completion tokens)": _grpo64(*args, weighted=False)[0],
        }
        assert_close(loss, loss_ref, name=f"loss {name}", mistakes=loss_mistakes)

        # Entries of w * ratio * A * p, most of them tiny: compare relative to the largest one.
        scale = 1.0 / float(dlogits_ref.abs().max())
        unwritten = dlogits_ref.clone()
        unwritten[~mask] = math.nan
        grad_mistakes = {
            "clipped tokens got a surrogate gradient: where the clipped term is the smaller, it is a constant, "
            "d surrogate / d logp = 0 there": _grpo64(*args, clip_grad=False)[1],
            "the ratio was not clipped in the gradient: d surrogate / d logp = ratio * A only where "
            "ratio * A <= clamp(ratio, 1 - eps, 1 + eps) * A": _grpo64(*args, clip=False)[1],
            "the KL term's derivative has the wrong sign: d kl / d logp = 1 - exp(ref - logp)":
                _grpo64(*args, dkl_sign=-1.0)[1],
            "the KL penalty has the wrong sign in the gradient: g = w * (beta * (1 - exp(ref - logp)) - "
            "d surrogate)": _grpo64(*args, kl_sign=-1.0)[1],
            "the KL estimator is reversed in the gradient: kl = exp(ref - logp) - (ref - logp) - 1":
                _grpo64(*args, kl_reversed=True)[1],
            "the gradient has the wrong sign: d logp / d logits = onehot - softmax (softmax - onehot is the "
            "gradient of -logp)": _grpo64(*args, grad_sign=-1.0)[1],
            "the softmax term is missing: d logp / d x[v] = onehot[v] - exp(x[v] - lse)":
                _grpo64(*args, softmax=False)[1],
            "the onehot term is missing: d logp / d x[v] = onehot[v] - exp(x[v] - lse), +1 at the target":
                _grpo64(*args, onehot=False)[1],
            "the prompt and padding rows got a gradient: their loss is 0, so their row of dlogits is zeros":
                _grpo64(*args, count_prompt=True)[1],
            "the weight w is missing from the gradient: g = w * (beta * (1 - exp(ref - logp)) - d surrogate)":
                _grpo64(*args, weighted=False)[1],
            "the prompt and padding rows of dlogits were never written: store a row of zeros where mask is 0":
                unwritten,
        }
        assert_close(dlogits * scale, dlogits_ref * scale, name=f"dlogits (divided by its largest value) {name}",
                     mistakes={hint: g * scale for hint, g in grad_mistakes.items()})


# --------------------------------------------------------------------------- 12.5 residual add + LayerNorm

ADD_NORM_EPS = 1e-5


def _add_layernorm_cases():
    """(shape, dtype, strided): rows of awkward widths, one 3-D input, one whose rows are strided."""
    widths = awkward_sizes(2, lo=300, hi=3000, include=(1, 17))
    for dtype in DTYPES:
        for i, n_cols in enumerate(widths):
            rows = int(torch.randint(2, 12 if common.INTERPRETER else 300, ()).item())
            yield ((rows, n_cols) if i % 2 == 0 else (2, rows, n_cols)), dtype, i == 1


def _layernorm64(h, w, b, *, unbiased=False, padded_to=None):
    """LayerNorm of h in float64; unbiased / padded_to give two mistakes' outputs."""
    n = h.shape[-1]
    mean = h.mean(-1, keepdim=True)
    sq = ((h - mean) ** 2).sum(-1, keepdim=True)
    if padded_to is not None:
        sq = sq + (padded_to - n) * mean ** 2  # the lanes past N counted as (0 - mean)^2
    var = sq / (n - 1 if unbiased and n > 1 else n)
    return (h - mean) / torch.sqrt(var + ADD_NORM_EPS) * w + b


def check_add_layernorm(add_layernorm):
    for shape, dtype, strided in _add_layernorm_cases():
        n_cols = shape[-1]
        x = randn(*shape, dtype=dtype, scale=2.0) + 0.5
        residual = randn(*shape, dtype=dtype)
        if strided:  # rows 7 elements apart beyond their length: the kernel must use the row strides
            x = torch.cat([x, randn(*shape[:-1], 7, dtype=dtype)], dim=-1)[..., :n_cols]
            residual = torch.cat([residual, randn(*shape[:-1], 3, dtype=dtype)], dim=-1)[..., :n_cols]
        w, b = randn(n_cols, dtype=dtype) + 1.0, randn(n_cols, dtype=dtype)
        x_before, r_before = x.clone(), residual.clone()
        with PoisonedAllocations() as allocations:
            out = add_layernorm(x, residual, w, b, ADD_NORM_EPS)
            if not isinstance(out, tuple) or len(out) != 2:
                raise CheckError(f"add_layernorm must return the pair (h, y), got {type(out).__name__}")
            h, y = out
        allocations.check_guards()
        if not (torch.equal(x, x_before) and torch.equal(residual, r_before)):
            raise CheckError("add_layernorm changed x or residual: write h and y to their own outputs")
        name = f"{tuple(shape)} {common.dtype_name(dtype)}" + (" (strided rows)" if strided else "")
        h_ref = (x + residual).double()  # PyTorch's add in x's dtype: the sum rounded once, as the kernel stores it
        w64, b64 = w.double(), b.double()
        assert_close(h, h_ref, name=f"h = x + residual {name}", mistakes={
            "h is NaN, the poison of its buffer: store h = x + residual (the next block's residual "
            "stream) as well as y": torch.full_like(h_ref, math.nan)})
        assert_close(y, _layernorm64(h_ref, w64, b64), name=f"y = LayerNorm(h) {name}", mistakes={
            "y is LayerNorm(x): normalize h = x + residual, the sum, not x alone": _layernorm64(x.double(), w64, b64),
            "the variance counts the lanes past N as (0 - mean)^2: mask them with tl.where before "
            "squaring": _layernorm64(h_ref, w64, b64, padded_to=max(16, triton.next_power_of_2(n_cols))),
            "the variance was divided by N - 1: LayerNorm uses the biased variance, the sum over N":
                _layernorm64(h_ref, w64, b64, unbiased=True),
            "weight and bias are swapped: y = xhat * w + b": _layernorm64(h_ref, b64, w64)})


EXERCISES = [
    Exercise("12.1", "register_softcap", check_register_softcap),
    Exercise("12.2", "dpo_loss", check_dpo_loss, kernels=("dpo_logp_kernel", "dpo_grad_kernel")),
    Exercise("12.3", "graph_decode_step", check_graph_decode_step),
    Exercise("12.4", "grpo_loss", check_grpo_loss, kernels=("grpo_loss_kernel",)),
    Exercise("12.5", "add_layernorm", check_add_layernorm, kernels=("add_layernorm_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


# --------------------------------------------------------------------------- the grader's own tests

@functools.cache
def _solutions():
    return load_impl(STEM, "solutions")


# 12.1: registrations with one mistake each.
def _register_wrong(mistake):
    def register(qualname):
        sol = _solutions()
        if mistake == "fixed name":
            qualname = f"course_wrong12_fixed_{next(_QUALNAMES)}::softcap"  # wrong: ignores the name it is given
        if mistake == "plain function":
            return sol.softcap_forward  # wrong: not registered at all

        @torch.library.custom_op(qualname, mutates_args=())
        def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
            if mistake in ("in place", "returns input"):
                n = x.numel()  # wrong: writes the result over x to save an allocation
                sol.softcap_kernel[(triton.cdiv(n, 1024),)](x, x, n, cap, BLOCK_SIZE=1024)
                return x if mistake == "returns input" else x.clone()
            return sol.softcap_forward(x, cap)

        if mistake != "no fake":
            @softcap.register_fake
            def _(x, cap):
                if mistake == "fake shape":
                    return x.new_empty(x.shape[:-1])  # wrong: one dimension short
                if mistake == "fake dtype":
                    return torch.empty_like(x, dtype=torch.float32)  # wrong: the op returns x's dtype
                if mistake == "fake runs kernel":
                    return sol.softcap_forward(x, cap)  # wrong: a fake tensor has no data to read
                return torch.empty_like(x)

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.cap = inputs[1]

        def backward(ctx, grad_y):
            (x,) = ctx.saved_tensors
            t = torch.tanh(x.float() / ctx.cap)
            if mistake == "backward 1 - t":
                return (grad_y * (1.0 - t)).to(x.dtype), None  # wrong: tanh' = 1 - tanh^2
            if mistake == "backward without grad_y":
                return (1.0 - t * t).to(x.dtype), None  # wrong: ignores the upstream gradient
            if mistake == "backward over cap":
                return (grad_y * (1.0 - t * t) / ctx.cap).to(x.dtype), None  # wrong: the caps cancel
            return (grad_y * (1.0 - t * t)).to(x.dtype), None

        if mistake != "no autograd":
            softcap.register_autograd(backward, setup_context=setup_context)
        return softcap
    return register


def _interpreter_only(wrong):
    if common.HAS_GPU:
        pytest.skip("on a GPU this mistake launches the kernel on a fake tensor's meaningless pointer: an illegal "
                    "memory access that breaks the CUDA context for every later test (the grader runs in a child "
                    "process, so `make check` reports it as a crash)")
    return wrong


# 12.2: known-wrong kernels (one flag per mistake) and autograd Functions.
@triton.jit
def _dpo_logp_wrong_kernel(logits_ptr, targets_ptr, mask_ptr, logp_ptr, lse_ptr, n_cols, stride_row,
                           BLOCK_V: tl.constexpr, MISTAKE: tl.constexpr = ""):
    row = tl.program_id(axis=0).to(tl.int64)
    logp = tl.zeros((), dtype=tl.float32)
    lse = tl.zeros((), dtype=tl.float32)
    keep = tl.load(mask_ptr + row) != 0
    if keep:
        row_ptr = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            if MISTAKE == "no max":
                d += tl.sum(tl.exp(x), axis=0)  # wrong: exp(x) overflows fp32 for x > 88.7
            else:
                m_new = tl.maximum(m, tl.max(x, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
        if MISTAKE == "no max":
            lse = tl.log(d)
        else:
            lse = m + tl.log(d)
        logp = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32) - lse
    if MISTAKE == "prompt rows unwritten":
        tl.store(logp_ptr + row, logp, mask=keep)  # wrong: the prompt rows keep whatever the buffers held
        tl.store(lse_ptr + row, lse, mask=keep)
    else:
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)


@triton.jit
def _dpo_grad_wrong_kernel(logits_ptr, targets_ptr, lse_ptr, coef_ptr, dlogits_ptr, n_cols, stride_row,
                           BLOCK_V: tl.constexpr, MISTAKE: tl.constexpr = ""):
    row = tl.program_id(axis=0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    n_read = tl.where(coef != 0, n_cols, 0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(logits_ptr + row * stride_row + start + cols, mask=start + cols < n_read, other=0.0)
        p = tl.exp(x.to(tl.float32) - lse)
        onehot = tl.where(start + cols == target, 1.0, 0.0)
        if MISTAKE == "sign":
            grad = coef * (p - onehot)  # wrong: that is the gradient of -logp
        elif MISTAKE == "no softmax":
            grad = coef * onehot  # wrong: logp depends on every logit through lse
        else:
            grad = coef * (onehot - p)
        grad = tl.where(start + cols < n_read, grad, 0.0)
        if MISTAKE == "prompt rows unwritten":
            tl.store(dlogits_ptr + row * n_cols + start + cols, grad.to(dlogits_ptr.dtype.element_ty),
                     mask=start + cols < n_read)  # wrong: the prompt rows are never written
        else:
            tl.store(dlogits_ptr + row * n_cols + start + cols, grad.to(dlogits_ptr.dtype.element_ty),
                     mask=start + cols < n_cols)


def _dpo_function_with(mistake):
    """DPOLossFunction as in the solution, with one mistake in its host-side math."""
    sol = _solutions()

    class WrongDPOLossFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets, mask, ref_logps, beta, eps):
            n_seq, seq_len, n_cols = logits.shape
            n_pairs = n_seq // 2
            token_mask = torch.ones_like(mask) if mistake == "prompt counted" else mask  # wrong if all ones
            logp, lse = sol.token_logps(logits.view(-1, n_cols), targets.reshape(-1),
                                        token_mask.reshape(-1).to(torch.int8))
            n_tokens = token_mask.sum(dim=1, dtype=torch.float32)
            s = logp.view(n_seq, seq_len).sum(dim=1)
            if mistake != "sum":
                s = s / n_tokens  # wrong when skipped: the variant uses the mean
            ref = ref_logps.float()
            delta = beta * ((s[:n_pairs] - s[n_pairs:]) - (ref[:n_pairs] - ref[n_pairs:]))
            eps_used = 0.0 if mistake == "eps ignored" else eps
            loss = -(1.0 - eps_used) * F.logsigmoid(delta) - eps_used * F.logsigmoid(-delta)
            ctx.save_for_backward(logits, targets, token_mask, lse, n_tokens, delta)
            ctx.beta, ctx.eps = beta, eps_used
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            logits, targets, mask, lse, n_tokens, delta = ctx.saved_tensors
            n_seq, seq_len, n_cols = logits.shape
            if mistake == "grad_loss ignored":
                grad_loss = torch.ones_like(grad_loss)  # wrong: each pair has its own upstream gradient
            d_delta = grad_loss.float() * (torch.sigmoid(delta) - (1.0 - ctx.eps))
            rejected = d_delta if mistake == "rejected sign" else -d_delta  # wrong if +
            d_s = ctx.beta * torch.cat([d_delta, rejected])
            per_token = mask if mistake in ("sum", "backward sum") else mask / n_tokens[:, None]
            coef = d_s[:, None] * per_token
            dlogits = sol.logits_grad(logits.view(-1, n_cols), targets.reshape(-1), lse, coef.reshape(-1).contiguous())
            return dlogits.view(n_seq, seq_len, n_cols), None, None, None, None, None

    return WrongDPOLossFunction


def _dpo_loss_without_length_check(logits, targets, mask, ref_logps, beta=0.1, eps=0.0):
    return _solutions().DPOLossFunction.apply(logits, targets, mask, ref_logps, beta, eps)


# 12.4: a known-wrong GRPO kernel, one flag per mistake.
@triton.jit
def _grpo_wrong_kernel(logits_ptr, targets_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, adv_ptr, weight_ptr, loss_ptr,
                       dlogits_ptr, n_cols, stride_row, eps, beta, BLOCK_V: tl.constexpr, MISTAKE: tl.constexpr = ""):
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    out_row = dlogits_ptr + row * n_cols
    row_loss = tl.zeros((), dtype=tl.float32)
    keep = tl.load(mask_ptr + row) != 0
    if MISTAKE == "mask ignored":
        keep = row >= 0  # wrong: the prompt and padding tokens are scored too
    if keep:
        row_ptr = logits_ptr + row * stride_row
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            if MISTAKE == "no max":
                d += tl.sum(tl.exp(x), axis=0)  # wrong: exp(x) overflows fp32 for x > 88.7
            else:
                m_new = tl.maximum(m, tl.max(x, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
        if MISTAKE == "no max":
            lse = tl.log(d)
        else:
            lse = m + tl.log(d)
        target = tl.load(targets_ptr + row)
        logp = tl.load(row_ptr + target).to(tl.float32) - lse
        adv = tl.load(adv_ptr + row)
        weight = tl.load(weight_ptr + row)
        ratio = tl.exp(logp - tl.load(old_logp_ptr + row))
        unclipped = ratio * adv
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps), 1.0 + eps) * adv
        if MISTAKE == "no clip":
            clipped = unclipped  # wrong: PPO's clip is what keeps the update near the sampling policy
        log_r = tl.load(ref_logp_ptr + row) - logp
        if MISTAKE == "kl reversed":
            log_r = -log_r  # wrong: k3 uses ref - logp
        e = tl.exp(log_r)
        kl = e - log_r - 1.0
        d_kl = 1.0 - e
        if MISTAKE == "kl reversed":
            d_kl = e - 1.0
        kl_sign = -1.0 if MISTAKE == "kl plus" else 1.0  # wrong if -1: the KL is a penalty
        row_loss = weight * -(tl.minimum(unclipped, clipped) - kl_sign * beta * kl)
        d_surrogate = tl.where(unclipped <= clipped, unclipped, 0.0)
        if MISTAKE == "clip grad":
            d_surrogate = unclipped  # wrong: a clipped term is a constant, it has no gradient
        g = weight * (kl_sign * beta * d_kl - d_surrogate)
        for start in range(0, n_cols, BLOCK_V):
            x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
            grad = g * (tl.where(start + cols == target, 1.0, 0.0) - tl.exp(x - lse))
            if MISTAKE == "grad sign":
                grad = -grad  # wrong: that is the gradient of -logp
            tl.store(out_row + start + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=start + cols < n_cols)
    else:
        if MISTAKE != "prompt rows unwritten":  # wrong when skipped: dlogits starts as garbage
            for start in range(0, n_cols, BLOCK_V):
                tl.store(out_row + start + cols, tl.zeros([BLOCK_V], dtype=dlogits_ptr.dtype.element_ty),
                         mask=start + cols < n_cols)
    tl.store(loss_ptr + row, row_loss)


def _grpo_wrong(mistake):
    return solution_with(STEM, grpo_loss_kernel=with_flags(_grpo_wrong_kernel, MISTAKE=mistake)).grpo_loss


# 12.5: a known-wrong residual add + LayerNorm kernel, one flag per mistake.
@triton.jit
def _add_layernorm_wrong_kernel(x_ptr, r_ptr, w_ptr, b_ptr, h_ptr, y_ptr, stride_x, stride_r, n_cols, eps,
                                BLOCK_SIZE: tl.constexpr, MISTAKE: tl.constexpr = ""):
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
    if MISTAKE != "h not stored":  # wrong when skipped: the next block's residual stream is garbage
        tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
    hf = h.to(tl.float32)
    if MISTAKE == "normalizes x":
        hf = x.to(tl.float32)  # wrong: the norm is of the sum
    mean = tl.sum(hf, axis=0) / n_cols
    hc = tl.where(mask, hf - mean, 0.0)
    if MISTAKE == "padded lanes":
        hc = hf - mean  # wrong: the lanes past N add (0 - mean)^2 to the variance
    denominator = n_cols - 1 if MISTAKE == "unbiased" else n_cols  # wrong if N - 1: LayerNorm's variance is biased
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=0) / denominator + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if MISTAKE == "w b swapped":
        w, b = b, w  # wrong: y = xhat * w + b
    tl.store(y_ptr + row * n_cols + cols, (hc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


def _add_layernorm_wrong(mistake):
    return solution_with(STEM, add_layernorm_kernel=with_flags(_add_layernorm_wrong_kernel,
                                                               MISTAKE=mistake)).add_layernorm


# 12.3: graph helpers with one mistake each (GPU only: their tests skip without one).
def _graph_with(mistake):
    def graph_decode_step(step, example_inputs, warmup=3):
        if mistake == "eager":
            return lambda *inputs: step(*inputs)  # wrong: no graph at all, Python runs every step
        static_inputs = example_inputs if mistake == "aliases example" else tuple(t.clone() for t in example_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        state = {"graph": torch.cuda.CUDAGraph()}
        with torch.cuda.graph(state["graph"]):
            state["out"] = step(*static_inputs)

        def replay(*new_inputs):
            for static, new in zip(static_inputs, new_inputs):
                if mistake != "no shape check" and (new.shape != static.shape or new.dtype != static.dtype):
                    raise ValueError("shape or dtype differs from the captured one")
                if mistake != "no copy":
                    static.copy_(new)
            if mistake == "recapture":
                state["graph"] = torch.cuda.CUDAGraph()  # wrong: captures again on every call
                with torch.cuda.graph(state["graph"]):
                    state["out"] = step(*static_inputs)
            state["graph"].replay()
            return state["out"] if mistake == "static output" else state["out"].clone()

        return replay
    return graph_decode_step


KNOWN_WRONG = [
    ("register_softcap", "not a custom op", lambda: _register_wrong("plain function"), "torch.library.custom_op"),
    ("register_softcap", "ignores the name", lambda: _register_wrong("fixed name"), "qualname"),
    ("register_softcap", "writes into x", lambda: _register_wrong("in place"), "mutates_args"),
    ("register_softcap", "returns x itself", lambda: _register_wrong("returns input"), "must return a new"),
    ("register_softcap", "no fake implementation", lambda: _register_wrong("no fake"), "register_fake"),
    ("register_softcap", "fake of the wrong shape", lambda: _register_wrong("fake shape"), "register_fake"),
    ("register_softcap", "fake of the wrong dtype", lambda: _register_wrong("fake dtype"), "dtype"),
    ("register_softcap", "fake runs the kernel", lambda: _interpreter_only(_register_wrong("fake runs kernel")),
     "must not run the kernel"),
    ("register_softcap", "no autograd", lambda: _register_wrong("no autograd"), "register_autograd"),
    ("register_softcap", "backward 1 - tanh", lambda: _register_wrong("backward 1 - t"), "1 - tanh(u)^2"),
    ("register_softcap", "backward without grad_y", lambda: _register_wrong("backward without grad_y"), "upstream gradient"),
    ("register_softcap", "backward divided by cap", lambda: _register_wrong("backward over cap"), "divided by cap"),
    ("dpo_loss", "sum instead of mean", lambda: solution_with(STEM, DPOLossFunction=_dpo_function_with("sum")).dpo_loss,
     "MEAN"),
    ("dpo_loss", "prompt tokens counted",
     lambda: solution_with(STEM, DPOLossFunction=_dpo_function_with("prompt counted")).dpo_loss, "prompt and padding"),
    ("dpo_loss", "eps ignored", lambda: solution_with(STEM, DPOLossFunction=_dpo_function_with("eps ignored")).dpo_loss,
     "eps was ignored"),
    ("dpo_loss", "no max subtraction",
     lambda: solution_with(STEM, dpo_logp_kernel=with_flags(_dpo_logp_wrong_kernel, MISTAKE="no max")).dpo_loss,
     "running max"),
    ("dpo_loss", "prompt log-probs unwritten",
     lambda: solution_with(STEM, dpo_logp_kernel=with_flags(_dpo_logp_wrong_kernel, MISTAKE="prompt rows unwritten")).dpo_loss,
     "every row"),
    ("dpo_loss", "gradient sign flipped",
     lambda: solution_with(STEM, dpo_grad_kernel=with_flags(_dpo_grad_wrong_kernel, MISTAKE="sign")).dpo_loss, "wrong sign"),
    ("dpo_loss", "gradient without the softmax term",
     lambda: solution_with(STEM, dpo_grad_kernel=with_flags(_dpo_grad_wrong_kernel, MISTAKE="no softmax")).dpo_loss,
     "softmax term is missing"),
    ("dpo_loss", "prompt gradient rows unwritten",
     lambda: solution_with(STEM, dpo_grad_kernel=with_flags(_dpo_grad_wrong_kernel, MISTAKE="prompt rows unwritten")).dpo_loss,
     "never written"),
    ("dpo_loss", "grad_loss ignored",
     lambda: solution_with(STEM, DPOLossFunction=_dpo_function_with("grad_loss ignored")).dpo_loss, "grad_loss was ignored"),
    ("dpo_loss", "rejected rows with the chosen sign",
     lambda: solution_with(STEM, DPOLossFunction=_dpo_function_with("rejected sign")).dpo_loss, "rejected rows"),
    ("dpo_loss", "backward not divided by the length",
     lambda: solution_with(STEM, DPOLossFunction=_dpo_function_with("backward sum")).dpo_loss, "response length"),
    ("dpo_loss", "empty response accepted", lambda: _dpo_loss_without_length_check, "at least one response token"),
    ("grpo_loss", "no clipping", lambda: _grpo_wrong("no clip"), "ratio was not clipped"),
    ("grpo_loss", "gradient through the clipped term", lambda: _grpo_wrong("clip grad"),
     "clipped tokens got a surrogate gradient"),
    ("grpo_loss", "KL added instead of subtracted", lambda: _grpo_wrong("kl plus"), "KL penalty has the wrong sign"),
    ("grpo_loss", "KL estimator reversed", lambda: _grpo_wrong("kl reversed"), "KL estimator is reversed"),
    ("grpo_loss", "mask ignored", lambda: _grpo_wrong("mask ignored"), "prompt and padding tokens were counted"),
    ("grpo_loss", "no max subtraction", lambda: _grpo_wrong("no max"), "running max"),
    ("grpo_loss", "gradient sign flipped", lambda: _grpo_wrong("grad sign"), "gradient has the wrong sign"),
    ("grpo_loss", "prompt gradient rows unwritten", lambda: _grpo_wrong("prompt rows unwritten"), "never written"),
    ("add_layernorm", "x normalized, not x + residual", lambda: _add_layernorm_wrong("normalizes x"),
     "normalize h = x + residual"),
    ("add_layernorm", "h never stored", lambda: _add_layernorm_wrong("h not stored"), "store h"),
    ("add_layernorm", "variance over the padded lanes", lambda: _add_layernorm_wrong("padded lanes"),
     "lanes past N"),
    ("add_layernorm", "unbiased variance", lambda: _add_layernorm_wrong("unbiased"), "N - 1"),
    ("add_layernorm", "weight and bias swapped", lambda: _add_layernorm_wrong("w b swapped"), "swapped"),
    ("graph_decode_step", "no graph", lambda: _graph_with("eager"), "never ran step"),
    ("graph_decode_step", "captures on every call", lambda: _graph_with("recapture"), "capture the graph once"),
    ("graph_decode_step", "new inputs not copied", lambda: _graph_with("no copy"), "copy each new input"),
    ("graph_decode_step", "returns the static output", lambda: _graph_with("static output"), "clone"),
    ("graph_decode_step", "example inputs as static buffers", lambda: _graph_with("aliases example"),
     "caller's tensor"),
    ("graph_decode_step", "no shape check", lambda: _graph_with("no shape check"), "raise ValueError"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


def test_graph_check_skips_without_gpu():
    """Without a GPU, 12.3 is skipped (never passed); an untouched stub is TODO before that."""
    if common.HAS_GPU:
        pytest.skip("this machine has a GPU: 12.3 is graded there")
    result = common.grading.grade(_solutions(), BY_NAME["graph_decode_step"])
    assert result.status == "skipped" and "needs a CUDA GPU" in result.detail, result


def test_grpo_hand_formula_is_the_reference():
    """The float64 formula the grpo_loss mistakes are built from equals autograd of the reference."""
    case = _grpo_case(2, 3, 5, 41, torch.float32, 0.2)
    grad_loss = torch.tensor(1.7, device=common.DEVICE)
    loss, dlogits = _grpo64(*case, 3, 0.2, 0.04, grad_loss)
    loss_ref, dlogits_ref = _grpo_reference(*case, 3, 0.2, 0.04, grad_loss)
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(dlogits, dlogits_ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the given wrappers

def test_given_wrappers_reject_bad_input():
    sol = _solutions()
    with pytest.raises(ValueError, match="cap must be > 0"):
        sol.softcap_forward(randn(10), 0.0)
    with pytest.raises(TypeError, match="dtype"):
        sol.softcap_forward(torch.arange(10, device=common.DEVICE), 1.0)
    logits, targets, mask, ref_logps = _dpo_case(2, 5, 33, torch.float32)
    with pytest.raises(ValueError, match="2B sequences"):
        sol.dpo_loss(logits[:3], targets[:3], mask[:3], ref_logps[:3])
    with pytest.raises(ValueError, match="targets must have shape"):
        sol.dpo_loss(logits, targets[:, :4].contiguous(), mask, ref_logps)
    with pytest.raises(TypeError, match="dtype"):
        sol.dpo_loss(logits, targets.int(), mask, ref_logps)
    with pytest.raises(TypeError, match="dtype"):
        sol.dpo_loss(logits, targets, mask.float(), ref_logps)
    with pytest.raises(ValueError, match="beta"):
        sol.dpo_loss(logits, targets, mask, ref_logps, beta=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        sol.dpo_loss(logits.transpose(1, 2).contiguous().transpose(1, 2), targets, mask, ref_logps)
    logits, targets, mask, old_logps, ref_logps, rewards = _grpo_case(2, 2, 5, 33, torch.float32, 0.2)
    args = (logits, targets, mask, old_logps, ref_logps, rewards, 2)
    with pytest.raises(ValueError, match="old_logps must have shape"):
        sol.grpo_loss(logits, targets, mask, old_logps[:, :4].contiguous(), ref_logps, rewards, 2)
    with pytest.raises(ValueError, match="rewards must have shape"):
        sol.grpo_loss(*args[:5], rewards[:3], 2)
    with pytest.raises(TypeError, match="dtype"):
        sol.grpo_loss(logits, targets, mask.float(), old_logps, ref_logps, rewards, 2)
    with pytest.raises(ValueError, match="group_size"):
        sol.grpo_loss(*args[:6], 3)
    with pytest.raises(ValueError, match="group_size"):
        sol.grpo_loss(*args[:6], 1)
    with pytest.raises(ValueError, match="eps"):
        sol.grpo_loss(*args, eps=1.0)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] have none"):
        sol.grpo_loss(logits, targets, empty, old_logps, ref_logps, rewards, 2)
    x, w = randn(3, 40), randn(40)
    with pytest.raises(ValueError, match="residual"):
        sol.add_layernorm(x, randn(3, 41), w, w)
    with pytest.raises(TypeError, match="residual has dtype"):
        sol.add_layernorm(x, x.half(), w, w)
    with pytest.raises(ValueError, match=r"weight must have shape \(40,\)"):
        sol.add_layernorm(x, x, randn(41), randn(41))
    with pytest.raises(ValueError, match="at most 16384"):
        sol.add_layernorm(randn(1, 16385), randn(1, 16385), randn(16385), randn(16385))
