"""The registry of baselines: for every operation the course benchmarks, what it must race.

A benchmark (common.benchmark.Benchmark) names its operation, and the layer races every baseline
registered for it, in the same run, on the same inputs: the lesson cannot leave one out, and a
perf bar against "baseline" is against the fastest of them as measured. What each op's inputs are
(`signature`) is fixed here, so a library function can be called the same way by every lesson.

Kinds of baseline:
  - "torch eager": the lesson's PyTorch reference, as written (op by op where it is naive);
  - "torch.compile": torch.compile of that same reference (GPU, full runs: compiling takes
    seconds to minutes, which --quick does not spend);
  - a library op (F.layer_norm, F.scaled_dot_product_attention on each backend, torch.matmul...),
    called here with the op's signature;
  - a lesson baseline: a name the registry requires but whose code lives in the lesson
    (fn=None: the lesson passes it in `baselines=`, or the benchmark refuses to run);
  - a peer: a library users pick (Liger-Kernel, gemlite); raced when it imports, skipped with a
    printed reason otherwise; never in requirements.txt.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

EAGER = "torch eager"
COMPILE = "torch.compile"


@dataclass(frozen=True)
class Baseline:
    name: str
    fn: Callable | None = None  # called as fn(*inputs); None: the lesson supplies it under `name`
    peer: str | None = None  # the module a peer library imports from; missing -> skipped with a reason
    gpu_only: bool = False  # a CUDA-only op (cuDNN, cuBLAS-Lt fp8): not called in the interpreter


@dataclass(frozen=True)
class Op:
    name: str
    signature: str  # what the benchmark's setup returns, in order
    baselines: tuple[Baseline, ...] = ()
    eager: bool = True  # race the lesson's reference as "torch eager"
    compile: bool = True  # race torch.compile(reference)
    what: str = ""

    @property
    def baseline_names(self) -> list[str]:
        return ([EAGER] if self.eager else []) + ([COMPILE] if self.compile else []) + [b.name for b in self.baselines]

    @property
    def lesson_supplied(self) -> list[str]:
        return [b.name for b in self.baselines if b.fn is None and b.peer is None]


def _peer(module: str, attr: str) -> Callable:
    """A peer library's function, imported on first call (its absence is reported by the layer)."""
    def call(*args):
        return getattr(importlib.import_module(module), attr)(*args)
    return call


def peer_missing(baseline: Baseline) -> str | None:
    """Why a peer cannot be raced here (not installed), or None when it imports."""
    if baseline.peer is None:
        return None
    try:
        importlib.import_module(baseline.peer)
    except Exception as err:  # ImportError, or a peer that fails on import with this torch/triton
        return f"{baseline.peer} is not importable ({type(err).__name__}); pip install it to race it"
    return None


def _sdpa(backend_name: str | None):
    def run(q, k, v, causal=False, gqa=None):  # gqa: k, v have fewer heads than q (default: when they do)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        gqa = q.shape[-3] != k.shape[-3] if gqa is None else gqa
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return run


def _sdpa_decode(backend_name: str | None):
    attend = _sdpa(backend_name)

    def run(q, k_cache, v_cache):  # q (B, HQ, D): one new token over the whole cache (B, HKV, ctx, D)
        return attend(q.unsqueeze(2), k_cache, v_cache, gqa=q.shape[1] != k_cache.shape[1]).squeeze(2)
    return run


_SDPA = tuple(Baseline(f"SDPA {label}", _sdpa(backend), gpu_only=backend is not None)
              for label, backend in (("default", None), ("cuDNN", "CUDNN_ATTENTION"),
                                     ("FLASH_ATTENTION", "FLASH_ATTENTION"), ("EFFICIENT", "EFFICIENT_ATTENTION")))
_SDPA_DECODE = tuple(Baseline(f"SDPA {label}", _sdpa_decode(backend), gpu_only=backend is not None)
                     for label, backend in (("default", None), ("cuDNN", "CUDNN_ATTENTION"),
                                            ("FLASH_ATTENTION", "FLASH_ATTENTION"),
                                            ("EFFICIENT", "EFFICIENT_ATTENTION")))


def _rms_norm(x, w, eps=1e-6):
    return F.rms_norm(x, x.shape[-1:], w, eps)


def _scaled_mm(a, b, scale_a, scale_b):
    # a (M, K) row-major, b (N, K) row-major: _scaled_mm wants its second operand column-major.
    return torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=torch.bfloat16, use_fast_accum=True)


def _scaled_mm_rowwise(a, b, scale_a, scale_b, block_scale_a=None, block_scale_b=None):
    # The nearest scaling torch._scaled_mm supports to block scales: one fp32 scale per row of a (M, 1)
    # and per row of b (1, N), precise accumulation (block-scaled kernels accumulate precisely too).
    # The block scales are the lesson kernel's inputs, unused here.
    return torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=torch.bfloat16, use_fast_accum=False)


def _liger_ce(logits, target):
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss()(logits, target)


def _liger_flce(hidden, weight, target):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss()(weight, hidden, target)


_OPS = [
    Op("elementwise", "the lesson's tensors", what="an elementwise op whose only library form is the eager "
       "reference itself (x + y, x * y + z, a cast): eager and torch.compile are its strongest baselines"),
    Op("copy", "x, out", (Baseline("torch copy_", lambda x, out: out.copy_(x)),),
       what="out <- x (any strides): torch's copy kernel"),
    Op("reduction", "the lesson's tensors", what="a row or whole-tensor reduction whose library form is the "
       "eager reference (torch.sum, torch.amax, torch.argmax)"),
    Op("matmul", "a, b", (Baseline("torch.matmul (cuBLAS)", torch.matmul),), compile=False, eager=False,
       what="C = A @ B; the lesson's reference is this same call (raced twice, cuBLAS won as 'torch eager' in "
            "lesson 04's fp16 run), and torch.compile of a matmul calls the same cuBLAS (or a slower template)"),
    Op("transpose", "x", (Baseline("torch .t().contiguous()", lambda x: x.t().contiguous()),), eager=False),
    Op("conv2d", "x, weight", (Baseline("F.conv2d (cuDNN)", lambda x, w: F.conv2d(x, w, padding=w.shape[-1] // 2)),)),
    Op("embedding", "table, ids", (Baseline("F.embedding", lambda table, ids: F.embedding(ids, table)),)),
    Op("softmax", "x", (Baseline("torch.softmax", lambda x: torch.softmax(x, dim=-1)),)),
    Op("log_softmax", "x", (Baseline("torch.log_softmax", lambda x: torch.log_softmax(x, dim=-1)),)),
    Op("layer_norm", "x, w, b", (Baseline("F.layer_norm", lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)),
                                 Baseline("Liger-Kernel", _peer("liger_kernel.transformers.functional",
                                                                "liger_layer_norm"), peer="liger_kernel")),
       what="x, w, b -> layer_norm(x) * w + b over the last dim, eps 1e-5"),
    Op("rms_norm", "x, w", (Baseline("F.rms_norm", _rms_norm),
                            Baseline("Liger-Kernel", _peer("liger_kernel.transformers.functional", "liger_rms_norm"),
                                     peer="liger_kernel")),
       what="x, w -> x / rms(x) * w over the last dim, eps 1e-6"),
    Op("geglu", "a, b", (Baseline("Liger-Kernel", _peer("liger_kernel.transformers.functional", "liger_geglu"),
                                  peer="liger_kernel"),),
       what="gelu_tanh(a) * b"),
    Op("swiglu", "a, b", (Baseline("Liger-Kernel", _peer("liger_kernel.transformers.functional", "liger_swiglu"),
                                   peer="liger_kernel"),),
       what="silu(a) * b"),
    Op("rope", "the lesson's tensors", what="rotary position embedding"),
    Op("cross_entropy", "logits, target", (Baseline("F.cross_entropy", F.cross_entropy),
                                          Baseline("Liger-Kernel", _liger_ce, peer="liger_kernel")),
       what="mean cross-entropy of (M, V) logits against (M,) targets"),
    Op("linear_cross_entropy", "hidden, weight, target",
       (Baseline("F.cross_entropy(hidden @ weight.T)", lambda h, w, t: F.cross_entropy(h @ w.t(), t)),
        Baseline("Liger-Kernel", _liger_flce, peer="liger_kernel"))),
    Op("mse_loss", "x, y", (Baseline("F.mse_loss", F.mse_loss),)),
    Op("attention", "q, k, v, causal", _SDPA + (
        # the flash-attn package (FlashAttention-2) takes (B, N, H, D): transposed views, no copy
        Baseline("flash-attn", lambda q, k, v, causal=False: importlib.import_module("flash_attn").flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2),
            peer="flash_attn", gpu_only=True),),
       what="softmax(q k^T / sqrt(D), causal mask) v on (B, H, N, D); SDPA on every backend this torch has"),
    Op("decode_attention", "q, k_cache, v_cache", _SDPA_DECODE + (
        # flash-attn's split-KV decode kernel; it takes q (B, 1, H, D) and caches (B, ctx, H, D)
        Baseline("flash-attn with_kvcache", lambda q, k_cache, v_cache: importlib.import_module(
            "flash_attn").flash_attn_with_kvcache(q.unsqueeze(1), k_cache.transpose(1, 2),
                                                  v_cache.transpose(1, 2)).squeeze(1),
            peer="flash_attn", gpu_only=True),),
       what="one query token (B, HQ, D) over a full KV cache (B, HKV, ctx, D), HKV dividing HQ"),
    Op("moe", "the lesson's tensors", (Baseline("torch._grouped_mm"),),
       what="a routed MoE layer; eager is the PyTorch loop over experts"),
    Op("topk_routing", "logits", what="softmax + top-k over the expert logits"),
    Op("quantize", "the lesson's tensors", what="float -> int8 / fp8 with scales"),
    Op("gemv_w8a16", "x, w_q, scale, w_fp16",
       # gemlite (a peer users pick) takes its own packed weight format: not raced yet.
       (Baseline("fp16 torch.matmul (cuBLAS)", lambda x, w_q, scale, w: x @ w.t()),),
       what="x (M, K) fp16 times int8 weights (N, K) with per-row scales; the fp16 GEMV on the same "
       "weights in fp16 is the library op"),
    Op("gemv_w4a16", "x, w_packed, scales, w_fp16",
       # gemlite packs int4 in its own layout (and needs its own install): not raced yet.
       (Baseline("fp16 torch.matmul (cuBLAS)", lambda x, w_packed, scales, w: x @ w.t()),),
       what="x (M, K) fp16 times int4 weights (N, K) packed two per byte (N, K // 2) with fp16 scales per "
       "group of 128 along K (N, K // 128); the fp16 GEMV on the same weights in fp16 is the library op"),
    Op("fp8_matmul", "a, b, scale_a, scale_b",
       (Baseline("torch._scaled_mm (fast accum)", _scaled_mm, gpu_only=True),), eager=False, compile=False,
       what="fp8 e4m3 (M, K) x (N, K)^T with per-tensor scales, bf16 out"),
    Op("fp8_block_matmul", "a, b, row_scale_a, row_scale_b, block_scale_a, block_scale_b",
       (Baseline("torch._scaled_mm row-wise", _scaled_mm_rowwise, gpu_only=True),), eager=False, compile=False,
       what="fp8 e4m3 (M, K) x (N, K)^T, bf16 out; the lesson's kernel takes block scales (1 x 128 for a, "
       "128 x 128 for b: (M, K // 128) and (N // 128, K // 128) fp32), the baseline the row-wise scales ((M, 1) and "
       "(1, N) fp32) of its own quantization of the same inputs"),
    Op("moe_backward", "the lesson's tensors", (Baseline("torch._grouped_mm"),),
       what="the backward of a routed MoE layer (dX and every expert's dW); eager is autograd through the "
       "PyTorch loop over experts"),
    Op("attention_varlen", "the lesson's tensors", (Baseline("SDPA over the padded batch"),), compile=False,
       what="attention over a packed batch of sequences of different lengths (cu_seqlens, no padding); "
       "the baseline pads every sequence to the longest and masks (SDPA with an attention mask)"),
    Op("dpo_loss", "the lesson's tensors", what="DPO loss of a policy and a reference model's logits"),
    Op("grpo_loss", "the lesson's tensors", what="GRPO policy-gradient loss of a policy's logits"),
    Op("decode_step", "the lesson's tensors", compile=False,
       what="a whole decode step's kernels: eager launches vs a CUDA graph of the same kernels"),
]

OPS: dict[str, Op] = {op.name: op for op in _OPS}


def op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"op '{name}' is not in the baseline registry (common/baselines.py); "
                         f"known ops: {', '.join(sorted(OPS))}")
    return OPS[name]
