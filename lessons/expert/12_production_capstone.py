"""
Lesson 12 capstone: a small GPT trained with the course's kernels
=================================================================

Every hot op of a small GPT is a kernel from this course: causal FlashAttention forward and
backward (lesson 07), LayerNorm and the fused GeGLU (lesson 08), and the fused linear
cross-entropy that never materialises the logits (lesson 08). The same model, from the same
initial weights, on the same batches, is trained three ways: with those kernels, with eager
PyTorch (F.layer_norm, SDPA's fastest backend, F.gelu, F.cross_entropy) and with torch.compile
of the eager model. The loss curves go on one plot, tokens/s and peak memory in one table.

You will learn:
- what it takes for separately checked kernels to train together: gradients through every one,
  mixed precision (bf16 autocast, fp16 with a GradScaler), the same loss curve as PyTorch
- how autocast meets a custom kernel: the inputs cast as `torch.amp.custom_fwd(cast_inputs=...)`
  would, the kernel run with autocast off, LayerNorm's fp32 weights left fp32
- where a whole training step spends its time, and what fusing saves there (and what it cannot:
  the matmuls are cuBLAS's in all three)
- how torch.compile meets a kernel: the same LayerNorm as `torch.library.triton_op`,
  `torch.library.custom_op` and a plain `autograd.Function` inside a compiled block, with the
  graph breaks and step time of each

Run:  python lessons/expert/12_production_capstone.py [--quick]
"""

import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Table, section
from common.lessons import lesson_module

L07 = lesson_module("07")  # causal FlashAttention, forward and backward
L08 = lesson_module("08")  # LayerNorm, GeGLU, fused linear cross-entropy
L12 = lesson_module("12")  # the LayerNorm registered as a torch.library operator

# %% [markdown]
# ## The data: a corpus written by a rule, read as bytes
# No downloads: the corpus is generated from a seed. Lines like `37+58=95;` and `9*7=63;`:
# the format (digits, operators, `=`, `;`) is learnt in a few dozen steps, the sums take
# longer. Byte-level tokens: the vocabulary is 256 and nothing needs a tokenizer.


# %%
VOCAB = 256


def make_corpus(n_bytes: int, seed: int = 0) -> torch.Tensor:
    """n_bytes of arithmetic lines as a uint8 tensor on the CPU."""
    g = torch.Generator().manual_seed(seed)
    lines, size = [], 0
    while size < n_bytes:
        a, b, op = torch.randint(0, 100, (3,), generator=g).tolist()
        line = f"{a}+{b}={a + b};" if op % 2 else f"{a % 10}*{b % 10}={(a % 10) * (b % 10)};"
        lines.append(line)
        size += len(line)
    return torch.tensor(list("".join(lines)[:n_bytes].encode()), dtype=torch.uint8)


def batches(corpus: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    """The same (inputs, targets) windows for every run that passes the same seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, corpus.numel() - seq - 1, (batch, 1), generator=g)
        window = corpus[start + torch.arange(seq + 1)].long().to(common.DEVICE)
        yield window[:, :-1], window[:, 1:]


# %% [markdown]
# ## The model: one set of weights, two sets of ops
# A pre-norm GPT: token and position embeddings, `layers` blocks of (LayerNorm, causal
# self-attention, residual) and (LayerNorm, GeGLU MLP, residual), a final LayerNorm and an
# untied lm_head. `ops` picks who computes the non-matmul work; the matmuls (nn.Linear) are
# cuBLAS's in both. Autocast: PyTorch's own ops follow its cast lists; the course's go through
# `course_op`, which casts the named inputs to the autocast dtype and runs the kernel with
# autocast off, what `torch.amp.custom_fwd(cast_inputs=dtype)` does for one fixed dtype.
# LayerNorm's weights stay fp32 (the kernel reads them as fp32 and returns fp32 gradients),
# the lm_head's weight is cast like any matmul input.


# %%
@dataclass(frozen=True)
class GPTConfig:
    layers: int
    dim: int
    heads: int
    seq: int
    hidden: int  # the MLP's width (GeGLU: two projections of this width, one back)

    def params(self) -> int:
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.hidden + 4 * self.dim
        return VOCAB * self.dim + self.seq * self.dim + self.layers * per_layer + 2 * self.dim + VOCAB * self.dim


def course_op(fn, *args, cast: tuple[int, ...] = ()):
    """fn(*args) with args[i] for i in cast cast to the autocast dtype when autocast is on; fn runs
    with autocast off, so a matmul inside a kernel wrapper does not cast again."""
    device = common.DEVICE.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        args = tuple(a.to(dtype) if i in cast and a.is_floating_point() else a for i, a in enumerate(args))
    with torch.autocast(device, enabled=False):
        return fn(*args)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: str):
        super().__init__()
        self.config, self.ops = config, ops
        d = config.dim
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, config.hidden, bias=False)
        self.up = nn.Linear(d, config.hidden, bias=False)
        self.down = nn.Linear(config.hidden, d, bias=False)

    def norm(self, layer: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if self.ops == "course":
            return course_op(L08.layernorm, x, layer.weight, layer.bias, layer.eps, cast=(0,))
        return F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        H = self.config.heads
        q, k, v = self.qkv(self.norm(self.norm1, x)).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if self.ops == "course":
            # autotuned on the GPU (its first call per shape, in the warm-up steps that are not timed)
            att = course_op(lambda q_, k_, v_: L07.flash_attention(q_, k_, v_, causal=True),
                            q, k, v, cast=(0, 1, 2))
        else:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the fastest backend there is
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        h = self.norm(self.norm2, x)
        if self.ops == "course":
            mlp = course_op(L08.geglu, self.gate(h), self.up(h), cast=(0, 1))
        else:
            mlp = F.gelu(self.gate(h), approximate="tanh") * self.up(h)
        return x + self.down(mlp)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, ops: str = "torch"):
        super().__init__()
        if ops not in ("torch", "course"):
            raise ValueError(f"ops must be 'torch' or 'course', got {ops!r}")
        self.config, self.ops = config, ops
        self.embed = nn.Embedding(VOCAB, config.dim)
        self.pos = nn.Parameter(torch.zeros(config.seq, config.dim))
        self.blocks = nn.ModuleList(Block(config, ops) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's initialisation; LayerNorm keeps weight 1, bias 0
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.layers) if name.endswith(("proj.weight", "down.weight"))
                                else 0.02)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy of ids (B, T) against targets (B, T)."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        if self.ops == "course":
            h = block.norm(self.norm, x) if self.blocks else x
            # chunk: 4096 tokens x 256 classes is 2 MiB of logits at a time, and 4 launches per chunk
            return course_op(lambda h_, w_, t_: L08.linear_cross_entropy(h_, w_, t_, chunk_size=4096),
                             h, self.head.weight, targets, cast=(0, 1))
        h = F.layer_norm(x, (self.config.dim,), self.norm.weight, self.norm.bias, self.norm.eps)
        return F.cross_entropy(self.head(h).flatten(0, 1).float(), targets.flatten())


# %% [markdown]
# ## Training: one loop for every variant
# AdamW, a constant learning rate, the same seed for the weights and the batches. The loss is
# kept on the GPU and read once at the end, so the timed steps have no host sync. tokens/s is
# timed over the steps after the first `warmup` (compilation, Triton's first launches).


# %%
@dataclass
class Run:
    name: str
    losses: list[float]
    tokens_per_s: float
    peak_bytes: int
    skipped: int  # steps the GradScaler skipped (inf / NaN gradients), fp16 only


def train(model: nn.Module, config: GPTConfig, steps: int, batch: int, amp: torch.dtype | None, corpus,
          name: str, compile_model: bool = False, lr: float = 1e-3, warmup: int = 5, seed: int = 1,
          autograd_threads: bool = True) -> Run:
    """autograd_threads=False runs each backward on the calling thread instead of autograd's device
    thread (torch.autograd.set_multithreading_enabled): lesson 08 measured LayerNorm's autograd
    round trip at 677 us with the thread and 244 us without."""
    with torch.autograd.set_multithreading_enabled(autograd_threads):
        return _train(model, config, steps, batch, amp, corpus, name, compile_model, lr, warmup, seed)


def _train(model, config, steps, batch, amp, corpus, name, compile_model, lr, warmup, seed) -> Run:
    device = common.DEVICE
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn = torch.compile(model.loss) if compile_model else model.loss
    losses, start, skipped = [], None, 0
    if common.HAS_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step, (ids, targets) in enumerate(batches(corpus, steps, batch, config.seq, seed)):
        if step == warmup:
            if common.HAS_GPU:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(ids, targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:  # the scaler found inf / NaN and skipped the step
            skipped += 1  # (a host sync, fp16 only)
        losses.append(loss.detach())
    if common.HAS_GPU:
        torch.cuda.synchronize()
    took = time.perf_counter() - start if start is not None else float("nan")
    timed_tokens = (steps - warmup) * batch * config.seq
    peak = torch.cuda.max_memory_allocated() if common.HAS_GPU else 0
    return Run(name, torch.stack(losses).float().tolist(), timed_tokens / took if took == took else float("nan"),
               peak, skipped)


# Kernel names -> what they do, first match wins (attention first: cuDNN's SDPA kernels say sm90 too).
CATEGORIES = (("attention", r"attention|flash|fmha|sdpa|attn"), ("LayerNorm", r"layer_?norm|sum_rows"),
              ("GeGLU / GELU", r"geglu|gelu"), ("cross-entropy", r"cross_entropy|nll|log_softmax|softmax"),
              ("matmul (cuBLAS)", r"gemm|nvjet|cutlass|xmma|cublas|matmul"), ("optimizer", r"adam|foreach|multi_tensor"),
              ("other (adds, casts, copies, embedding)", r"."))


def step_breakdown(config: GPTConfig, batch: int, amp, corpus, steps: int = 3) -> dict[str, dict[str, float]]:
    """GPU milliseconds per training step by kind of kernel (torch.profiler), for the course's model
    and the eager one: where the tokens/s difference comes from, measured."""
    import re
    from torch.profiler import ProfilerActivity, profile
    result = {}
    for ops in ("course", "torch"):
        eager, course = paired_models(config)
        model = course if ops == "course" else eager
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = list(batches(corpus, steps + 2, batch, config.seq, seed=11))

        def step(ids, targets, model=model, opt=opt):
            with torch.autocast(common.DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = model.loss(ids, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for ids, targets in data[:2]:  # warm-up: first launches, compiles
            step(ids, targets)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for ids, targets in data[2:]:
                step(ids, targets)
            torch.cuda.synchronize()
        ms = dict.fromkeys((c for c, _ in CATEGORIES), 0.0)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kind = next(c for c, pattern in CATEGORIES if re.search(pattern, e.name.lower()))
                ms[kind] += e.time_range.elapsed_us() / 1e3 / steps
        result["course kernels" if ops == "course" else "eager PyTorch"] = ms
        del model, eager, course, opt
    table = Table(f"GPU time per training step by kind of kernel (torch.profiler, {steps} steps)",
                  ["kernels", "course kernels (ms)", "eager PyTorch (ms)", "difference (ms)"])
    for kind, _ in CATEGORIES:
        c, e = result["course kernels"][kind], result["eager PyTorch"][kind]
        table.add(kind, c, e, c - e)
    total = {name: sum(ms.values()) for name, ms in result.items()}
    table.add("all GPU kernels", total["course kernels"], total["eager PyTorch"],
              total["course kernels"] - total["eager PyTorch"])
    table.print()
    return result


def slowest_parts(breakdown: dict[str, dict[str, float]], top: int = 2) -> str:
    """The kinds of kernel that cost the course's model the most GPU time over eager, in words."""
    diffs = sorted(((breakdown["course kernels"][k] - breakdown["eager PyTorch"][k], k) for k, _ in CATEGORIES),
                   reverse=True)[:top]
    return "; ".join(f"{kind} {breakdown['course kernels'][kind]:.2f} ms vs {breakdown['eager PyTorch'][kind]:.2f} ms"
                     for _, kind in diffs) + " of GPU time per step (profiled)"


def tail_mean(losses: list[float], fraction: float = 0.1) -> float:
    n = max(1, int(len(losses) * fraction))
    return statistics.mean(losses[-n:])


# %% [markdown]
# ## Check: the two models compute the same thing
# Before anything is trained: the same weights in both, the loss and every parameter's gradient
# of the course's model against the eager model's in float64 (the eager ops run in float64; the
# kernels in fp32, as they run in training without autocast).


# %%
def paired_models(config: GPTConfig, seed: int = 0) -> tuple[GPT, GPT]:
    torch.manual_seed(seed)
    eager = GPT(config, "torch").to(common.DEVICE)
    course = GPT(config, "course").to(common.DEVICE)
    course.load_state_dict(eager.state_dict())
    return eager, course


def check_gradients(config: GPTConfig, batch: int) -> float:
    """Largest gradient error of the course's model against float64 eager, relative to each gradient's
    largest entry; raises where it is off."""
    eager, course = paired_models(config, seed=3)
    ids, targets = next(batches(make_corpus(4096, seed=5), 1, batch, config.seq, seed=7))
    loss = course.loss(ids, targets)
    loss.backward()
    ref = copy.deepcopy(eager).double()
    ref_loss = ref.loss(ids, targets)
    ref_loss.backward()
    common.assert_close(loss.detach().double(), ref_loss.detach(), atol=1e-5, rtol=1e-5, name="loss")
    worst = 0.0
    for (name, p), q in zip(course.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item() or 1.0
        err = (p.grad.double() - q.grad).abs().max().item() / scale
        worst = max(worst, err)
        if err > 1e-3:
            raise common.CheckError(f"gradient of {name}: largest error {err:.2e} of its largest entry "
                                    f"(tolerance 1e-3) against float64 eager")
    return worst


# %% [markdown]
# ## torch.compile and a kernel: three ways to hand it over
# One transformer sub-block, `x + W2 gelu(W1 LayerNorm(x))`, compiled with LayerNorm given to
# torch.compile three ways: a `torch.library.triton_op` (Inductor traces into the Triton kernel and
# schedules it with its own), a `torch.library.custom_op` with a fake implementation (an opaque call
# Inductor places but cannot see into) and lesson 08's plain `autograd.Function` (Dynamo traces the
# Python wrapper itself, launch and all, or breaks the graph where it cannot).


# %%
_OPS = {}


def layer_norm_styles() -> dict:
    """name -> layer_norm(x, w, b); the two registered ops under fresh namespaces of this process."""
    if not _OPS:
        # op=op binds each lambda to its own op (a plain closure would see the last one registered)
        if common.HAS_GPU and hasattr(torch.library, "triton_op"):
            op, _ = L12.register_layer_norm_ops(L12._free_namespace("capstone_triton_op"), traceable=True)
            _OPS["torch.library.triton_op"] = lambda x, w, b, op=op: op(x, w, b, 1e-5)[0]
        op, _ = L12.register_layer_norm_ops(L12._free_namespace("capstone_custom_op"), traceable=False)
        _OPS["torch.library.custom_op"] = lambda x, w, b, op=op: op(x, w, b, 1e-5)[0]
        if common.HAS_GPU:  # under the interpreter Dynamo would trace Triton's numpy interpreter itself
            _OPS["autograd.Function (lesson 08)"] = lambda x, w, b: L08.layernorm(x, w, b)
        _OPS["F.layer_norm (PyTorch)"] = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)
    return _OPS


def sub_block(norm, x, w, b, w1, w2):
    return x + F.gelu(norm(x, w, b) @ w1) @ w2


def aot_graph_code(fn, inputs) -> str:
    """The code of the forward and backward graphs AOTAutograd hands to the compiler backend: what
    Inductor gets to see (a triton_op's kernel appears as a triton_kernel_wrapper node)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    codes = []

    def record(gm, example_inputs):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)
    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record))(*inputs)
    torch.autograd.grad(out.sum(), inputs)
    torch._dynamo.reset()
    return "\n".join(codes)


def compile_interplay(tokens: int, dim: int, time_it: bool) -> Table:
    backend = L12.compile_backend()
    dtype = torch.bfloat16 if common.supports_bf16() else torch.float32
    inputs = tuple(t.requires_grad_() for t in (
        common.randn(tokens, dim, dtype=dtype), common.randn(dim, dtype=dtype), common.randn(dim, dtype=dtype),
        common.randn(dim, 4 * dim, dtype=dtype, scale=dim ** -0.5),
        common.randn(4 * dim, dim, dtype=dtype, scale=(4 * dim) ** -0.5)))
    table = Table(f"torch.compile(backend={backend!r}) of x + W2 gelu(W1 LayerNorm(x)), {tokens} x {dim} "
                  f"{common.dtype_name(dtype)}: LayerNorm handed over three ways",
                  ["LayerNorm as", "graphs", "graph breaks", "kernel visible to the compiler",
                   "eager fwd+bwd (ms)", "compiled fwd+bwd (ms)"])
    for name, norm in layer_norm_styles().items():
        fn = lambda *a, norm=norm: sub_block(norm, *a)  # noqa: E731
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(fn)(*inputs)
        except Exception as err:  # noqa: BLE001 (what Dynamo could not trace is the finding)
            table.add(name, "-", "-", f"Dynamo failed: {type(err).__name__}", "-", "-")
            print(f"  {name}: torch._dynamo.explain failed: {str(err).splitlines()[0][:160]}")
            continue
        code = aot_graph_code(fn, inputs)
        visible = ("yes: Triton kernel in the graph" if "triton_kernel_wrapper" in code
                   else "PyTorch op" if name.startswith("F.") else "no: one opaque call" if "capstone_" in code
                   else "no")
        eager_ms = compiled_ms = float("nan")
        if time_it:
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend=backend)
            step = lambda f: torch.autograd.grad(f(*inputs).sum(), inputs)  # noqa: E731
            eager_ms = common.bench(lambda: step(fn)).ms
            compiled_ms = common.bench(lambda: step(compiled)).ms
        table.add(name, explained.graph_count, explained.graph_break_count, visible, eager_ms, compiled_ms)
        for reason in explained.break_reasons[:1]:
            print(f"  {name}: first graph break: {str(reason.reason).splitlines()[0][:160]}")
    table.print()
    return table


# %% [markdown]
# ## Run: the table, the curves, the bars


# %%
def sizes(quick: bool) -> dict:
    if common.INTERPRETER:  # a few steps at toy sizes: it runs, the losses match, the loss falls
        return dict(config=GPTConfig(layers=2, dim=32, heads=2, seq=16, hidden=64), batch=2, steps=6, lr=3e-3)
    return dict(config=GPTConfig(layers=6, dim=512, heads=8, seq=1024, hidden=1536), batch=16,
                steps=120 if quick else 400, lr=1e-3)


LOSS_TOLERANCE = 0.05  # nats: |mean of the last 10% of steps, kernels - eager|, bf16 autocast


def capstone(quick: bool) -> dict[str, Run]:
    s = sizes(quick)
    config, batch, steps, lr = s["config"], s["batch"], s["steps"], s["lr"]
    section(f"Check: the course's GPT against eager PyTorch in float64 ({config.layers} layers, dim {config.dim})")
    check_config = GPTConfig(layers=2, dim=64, heads=2, seq=32, hidden=96) if common.HAS_GPU else s["config"]
    worst = check_gradients(check_config, batch=2)
    print(f"loss and the gradients of all parameters match float64 eager: largest error {worst:.1e} of a "
          f"gradient's largest entry: OK")

    corpus = make_corpus(1 << 22 if common.HAS_GPU else 1 << 12)
    amp = torch.bfloat16 if common.supports_bf16() else None
    amp_name = "bf16 autocast" if amp else "fp32 (no bf16 in the interpreter)"
    section(f"Training {config.params() / 1e6:.1f}M parameters: {config.layers} layers, dim {config.dim}, "
            f"{config.heads} heads, seq {config.seq}, batch {batch}, {steps} steps, {amp_name}")
    variants = [("course kernels", "course", False, True), ("eager PyTorch", "torch", False, True)]
    if common.HAS_GPU:
        variants.append(("torch.compile", "torch", True, True))
        # an experiment, not a bar: the same course model with autograd's backward on the calling thread
        variants.append(("course kernels, autograd on the calling thread", "course", False, False))
    runs = {}
    for name, ops, compiled, threads in variants:
        eager, course = paired_models(config)
        model = course if ops == "course" else eager
        del eager, course
        torch._dynamo.reset()
        runs[name] = train(model, config, steps, batch, amp, corpus, name, compile_model=compiled, lr=lr,
                           warmup=5 if common.HAS_GPU else 1, autograd_threads=threads)
        del model
        print(f"{name}: loss {runs[name].losses[0]:.3f} -> {tail_mean(runs[name].losses):.3f}")

    fp16 = {}
    if common.HAS_GPU:  # fp16 needs loss scaling: the GradScaler with the course's kernels, and eager's
        for name, ops in (("course kernels", "course"), ("eager PyTorch", "torch")):
            eager, course = paired_models(config)
            fp16[name] = train(course if ops == "course" else eager, config, steps // 2, batch, torch.float16,
                               corpus, name, lr=lr)
            del eager, course

    eager_run = runs["eager PyTorch"]
    table = Table(f"GPT training, {config.params() / 1e6:.1f}M parameters, {batch} x {config.seq} tokens per step, "
                  f"{amp_name}", ["ops", "tokens/s", "vs eager", "peak memory", "first loss",
                                  "mean loss, last 10%", "vs eager (nats)"])
    for name, run in runs.items():
        timed = common.HAS_GPU  # the interpreter's tokens/s says nothing about a kernel
        table.add(name, run.tokens_per_s if timed else "-", run.tokens_per_s / eager_run.tokens_per_s if timed else "-",
                  common.fmt_bytes(run.peak_bytes) if timed else "-", run.losses[0],
                  tail_mean(run.losses), tail_mean(run.losses) - tail_mean(eager_run.losses))
    table.print()
    if fp16:
        t16 = Table(f"fp16 autocast + GradScaler, {steps // 2} steps", ["ops", "first loss", "mean loss, last 10%",
                                                                       "steps skipped (inf/NaN)", "tokens/s"])
        for name, run in fp16.items():
            t16.add(name, run.losses[0], tail_mean(run.losses), run.skipped, run.tokens_per_s)
        t16.print()

    reason = common.require_gpu("tokens/s, peak memory, the torch.compile and fp16 runs and the perf bars")
    if reason:
        print(reason)
    course_run = runs["course kernels"]
    if abs(course_run.losses[0] - eager_run.losses[0]) > 1e-2:
        raise common.CheckError(f"the first loss differs: kernels {course_run.losses[0]:.4f}, eager "
                                f"{eager_run.losses[0]:.4f} (same weights and batch: they must agree)")
    if tail_mean(course_run.losses) >= course_run.losses[0] - (0.5 if common.HAS_GPU else 0.02):
        raise common.CheckError(f"the course's model did not learn: loss {course_run.losses[0]:.3f} -> "
                                f"{tail_mean(course_run.losses):.3f}")
    if common.HAS_GPU:
        gap = abs(tail_mean(course_run.losses) - tail_mean(eager_run.losses))
        if gap > LOSS_TOLERANCE:
            raise common.CheckError(f"the loss curves drift apart: {gap:.3f} nats over the last 10% of steps "
                                    f"(tolerance {LOSS_TOLERANCE})")
        for name, run in fp16.items():
            if not all(math.isfinite(v) for v in run.losses[-5:]) or tail_mean(run.losses) > run.losses[0] - 0.5:
                raise common.CheckError(f"fp16 + GradScaler, {name}: did not train ({run.losses[0]:.3f} -> "
                                        f"{tail_mean(run.losses):.3f})")
        print(f"loss curves agree: last-10% means differ by {gap:.3f} nats (tolerance {LOSS_TOLERANCE}); fp16 with "
              f"a GradScaler trains with both")
        breakdown = step_breakdown(config, batch, amp, corpus)
        step_ms = {name: batch * config.seq / run.tokens_per_s * 1e3 for name, run in runs.items()}
        gpu_ms = {name: sum(ms.values()) for name, ms in breakdown.items()}
        print(f"wall time per step: course kernels {step_ms['course kernels']:.2f} ms "
              f"(GPU busy {gpu_ms['course kernels']:.2f} ms), eager {step_ms['eager PyTorch']:.2f} ms "
              f"(GPU busy {gpu_ms['eager PyTorch']:.2f} ms), torch.compile {step_ms['torch.compile']:.2f} ms")
        shape = f"{config.layers}L d{config.dim} T{config.seq} B{batch}"
        record = dict(benchmark="GPT training step", kernel="course kernels", shape=shape, dtype="bf16 autocast")
        compiled_run = runs["torch.compile"]
        why = slowest_parts(breakdown)
        common.perf_bar("GPT step: course kernels vs eager, tokens/s", course_run.tokens_per_s / eager_run.tokens_per_s,
                        1.3, "x", record={**record, "baseline": "eager PyTorch (SDPA fastest backend)", "vs": "baseline"},
                        why=why)
        common.perf_bar("GPT step: course kernels vs torch.compile, tokens/s",
                        course_run.tokens_per_s / compiled_run.tokens_per_s, 1.0, "x",
                        record={**record, "baseline": "torch.compile of the eager model", "vs": "baseline"},
                        why=f"{why}; wall time per step {step_ms['course kernels']:.2f} ms vs torch.compile's "
                            f"{step_ms['torch.compile']:.2f} ms")
        common.perf_bar("GPT step: course kernels' peak memory vs eager", course_run.peak_bytes / eager_run.peak_bytes,
                        1.0, "x", higher_is_better=False,
                        record={**record, "baseline": "eager PyTorch", "vs": "baseline memory"})
    plot_curves(runs, config, amp_name)
    return runs


def plot_curves(runs: dict[str, Run], config: GPTConfig, amp_name: str) -> None:
    fig, ax = common.new_figure(f"GPT ({config.layers} layers, dim {config.dim}) training loss, {amp_name}",
                                "step", "cross-entropy (nats per byte)")
    for (name, run), style in zip(runs.items(), ("-", "--", ":", "-.")):
        ax.plot(range(len(run.losses)), run.losses, style, label=name, linewidth=1.2)
    ax.legend(fontsize=8)
    common.save_plot(fig, "12_production_capstone_loss")


# %% [markdown]
# ## Takeaways
# - Kernels checked alone are not yet a training stack: the gradients of a whole model against
#   float64, autocast's casts, fp16's loss scaling and the same loss curve as PyTorch are what
#   show that they are.
# - A kernel meets autocast at its wrapper: cast what autocast would cast, leave fp32 master
#   weights fp32, run the kernel with autocast off.
# - In a whole step the matmuls dominate and are the same cuBLAS calls in every variant: fusing
#   the rest shows as a modest gain in tokens/s, and torch.compile fuses the small ops that the
#   hand-written model still launches one by one.
# - torch.compile sees into a kernel only when told how: `triton_op` lets Inductor trace it,
#   `custom_op` keeps it opaque but graph-safe, a plain autograd.Function depends on what Dynamo
#   can trace in its wrapper.


# %%
if __name__ == "__main__":
    args = common.lesson_args(__doc__.strip().splitlines()[0])
    started = time.perf_counter()
    capstone(args.quick)
    section("torch.compile and a kernel: LayerNorm as triton_op, custom_op, autograd.Function")
    compile_interplay(8192 if common.HAS_GPU else 16, 1024 if common.HAS_GPU else 32, time_it=common.HAS_GPU)
    print(f"\n(done at {time.perf_counter() - started:.1f} s)")
