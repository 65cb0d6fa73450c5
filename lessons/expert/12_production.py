"""
Lesson 12: production systems
=============================

Use the course's kernels from PyTorch for real: as registered operators that torch.compile,
autograd and opcheck understand, inside an nn.Module that validates its input and falls back
when a kernel does not apply, replayed from CUDA graphs, profiled, split over two GPUs, and
finally training a tiny model from preference pairs with a fused DPO loss kernel; a fused GRPO
loss shows the same machinery for reinforcement learning from rewards.

You will learn:
- how to register Triton kernels as a `torch.library` operator (`triton_op` + `wrap_triton` on
  a GPU, `custom_op` + `register_fake` where the kernel cannot be traced), give it a backward
  with `register_autograd`, and prove it with `torch.library.opcheck` and
  `torch.compile(fullgraph=True)`
- an `nn.Module` wrapper: clear TypeError / ValueError for wrong input, a fallback to PyTorch
  with a one-time warning where the kernel does not apply
- what a kernel launch costs, measured: eager decode step vs CUDA-graph replay, two independent
  steps on one stream vs two streams
- profiling: torch.profiler's kernel table of one step, and Nsight Compute's measured DRAM bytes
  next to the modelled minimum (`--profile`)
- tensor parallelism with torch.distributed: a column- then row-parallel MLP around lesson 08's
  fused GeGLU, checked against one process (NCCL on two GPUs, gloo on the CPU)
- the capstone: a fused DPO loss (forward and backward kernels, online logsumexp over the
  vocabulary) that tunes a tiny language model, round after round, from pairs of its own
  samples ranked by a rule
- a GRPO policy-gradient loss (clipped ratio, group-normalised advantages, a k3 KL penalty) in one
  kernel that also writes the logits' gradient, so its backward pass only scales it

Run:  python lessons/expert/12_production.py [--quick] [--profile]
"""

import argparse
import copy
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

if "common" not in sys.modules:  # a clone run before `make setup` (which installs common): the repo root,
    # the nearest folder above this file (in a notebook, which has no __file__: above the cwd) holding common/
    _here = Path(globals().get("__file__", "notebook")).resolve()
    sys.path.insert(0, str(next((p for p in _here.parents if (p / "common" / "__init__.py").is_file()), _here.parent)))
import common  # first: picks the GPU, or Triton's CPU interpreter without one

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from common import Table, fmt_bytes, section
from common.baselines import EAGER
from common.checks import check_guards
from common.kernels import logsumexp_step  # lesson 08's online logsumexp, one chunk at a time
from common.lessons import lesson_module

# Lesson 08's kernels, used as they are: LayerNorm forward / backward and the fused GeGLU.
L08 = lesson_module("08")

# %% [markdown]
# ## Motivation
# Lessons 01 to 11 launched kernels from Python wrappers and autograd.Functions. That works in
# eager PyTorch, but a real model also goes through torch.compile (which must trace the op or
# treat it as opaque, and needs its output shapes without running it), torch.export, CUDA
# graphs (which replay launches without Python), profilers, and several GPUs. A kernel becomes
# a production op when every one of those sees a well-defined operator: a schema, a fake
# (meta) implementation, an autograd formula, validated inputs and a fallback.
#
# At batch 1 (decoding) a step is dozens of tiny kernels, and the CPU time to launch each one
# (Python, the dispatcher, the driver) can exceed the GPU time. CUDA graphs record the launches
# once and replay them with one call: the script measures what that saves.

# %% [markdown]
# ## Reference (PyTorch)
# Each reference computes in at least fp32 (float64 inputs stay float64, so the same function
# is the float64 reference of the checks). Traffic per line: S sequences of T tokens over a
# vocabulary of V, "STV" elements.


# %%
def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)  # one fused kernel: reads x, writes y


def geglu_mlp_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    """Gemma's MLP: (gelu(x W_gate^T) * (x W_up^T)) W_down^T, GELU in its tanh approximation."""
    return (F.gelu(x @ w_gate.T, approximate="tanh") * (x @ w_up.T)) @ w_down.T


def sequence_logps_reference(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked (response) tokens of log_softmax(logits)[target]: shape (S,)."""
    logp = torch.log_softmax(_upcast(logits), dim=-1)  # reads STV, writes STV fp32 (kept for backward)
    safe = torch.where(mask.bool(), targets, 0)  # prompt tokens may carry -100: any index is fine there
    token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # reads ST, writes ST
    return (token * mask.to(token.dtype)).sum(-1)  # ST


def dpo_loss_reference(logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r, beta: float):
    """Direct Preference Optimization (Rafailov et al., 2023), mean over the B pairs.

    loss_b = -logsigmoid(beta * ((pc_b - pr_b) - (rc_b - rr_b))): pc, pr are the policy's sequence
    log-probs of the chosen and rejected responses, rc, rr the frozen reference model's.
    """
    pc = sequence_logps_reference(logits_c, targets_c, mask_c)
    pr = sequence_logps_reference(logits_r, targets_r, mask_r)
    delta = beta * ((pc - pr) - (ref_c - ref_r))
    return -F.logsigmoid(delta).mean()
    # forward: 2 x (upcast STV, log_softmax STV); backward: a zero-filled STV gradient per gather,
    # log_softmax backward (reads 2 STV, writes STV), the cast back: about 10 passes over the logits


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_b = (r_b - mean of its group) / (std of its group + 1e-4), groups of group_size consecutive
    completions (one prompt each); std with Bessel's correction, as torch.std and TRL's GRPO use."""
    groups = _upcast(rewards).view(-1, group_size)  # reads B, writes B: tiny
    return ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-4)).view(-1)


def grpo_loss_reference(logits, targets, mask, old_logps, ref_logps, rewards, group_size: int,
                        eps: float = 0.2, beta: float = 0.04):
    """Group Relative Policy Optimization (Shao et al., 2024): PPO's clipped surrogate with a
    group-normalised advantage and a k3 KL penalty to the reference model, masked mean per
    sequence, mean over the B sequences.

    ratio = exp(logp - old); surrogate = min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A);
    kl = exp(ref - logp) - (ref - logp) - 1; per-token loss = -(surrogate - beta * kl).
    """
    logp = torch.log_softmax(_upcast(logits), dim=-1)  # reads BTV, writes BTV fp32 (kept for backward)
    safe = torch.where(mask.bool(), targets, 0)  # prompt tokens may carry -100
    logp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # reads BT, writes BT
    adv = grpo_advantages(rewards, group_size).to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logps)  # BT, like every line below
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    log_r = ref_logps - logp
    kl = torch.exp(log_r) - log_r - 1
    per_token = -(surrogate - beta * kl)
    m = mask.to(logp.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1)).mean()
    # forward: upcast BTV, log_softmax BTV, then a dozen small BT ops; backward: a zero-filled BTV
    # gradient for the gather, log_softmax backward (reads 2 BTV, writes BTV), the cast back


# %% [markdown]
# ## Kernel
# LayerNorm and GeGLU are lesson 08's kernels (`L08.layernorm_fwd_kernel`, ...). New here: the
# fused DPO loss. Forward: one program per (sequence, block of BLOCK_T tokens) computes each
# response token's logsumexp online over the vocabulary (lesson 08's cross-entropy, on a 2-D tile)
# and its target log-prob; prompt and padding rows are never read. A second, tiny kernel sums each
# pair's log-probs and computes the loss and dloss/ddelta. Backward: the same tiles again, writing
# dlogits = coef * mask * (onehot - softmax) from the saved logsumexp.
# Then the GRPO loss in one kernel: the same logsumexp pass, the per-token loss and d loss / d logp
# (each token's coefficient is known at once, unlike DPO's), and a second pass over the same rows
# writing d loss / d logits, so no backward kernel is needed.


# %%
@triton.jit
def dpo_token_logps_kernel(
    logits_ptr,  # (S, T, V): row (s, t) at logits_ptr + s * stride_ls + t * stride_lt, columns contiguous
    target_ptr,  # (S, T) int64 target ids, contiguous
    mask_ptr,  # (S, T) fp32 response mask, contiguous: 1 for a response token, 0 for prompt / padding
    logp_ptr,  # (S, T) fp32 out: mask * log_softmax(logits)[target]
    lse_ptr,  # (S, T) fp32 out: each response row's logsumexp, kept for the backward pass
    stride_ls,  # elements between logits[s, 0, 0] and logits[s + 1, 0, 0]
    stride_lt,  # elements between logits[s, t, 0] and logits[s, t + 1, 0]
    n_tokens,  # T
    n_vocab,  # V
    BLOCK_T: tl.constexpr,  # tokens (rows) per program
    BLOCK_V: tl.constexpr,  # vocabulary columns per chunk
):
    seq = tl.program_id(axis=0).to(tl.int64)
    toks = tl.program_id(axis=1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_seq = toks < n_tokens
    st = seq * n_tokens + toks  # index into the (S, T) arrays
    resp = tl.load(mask_ptr + st, mask=in_seq, other=0.0) != 0.0
    target = tl.load(target_ptr + st, mask=resp, other=0)  # a prompt token's target is never read
    # A target outside [0, V) on a response token is a caller's bug: read nothing for it and give
    # NaN, which reaches the loss. Checking on the host instead would cost a sync every step.
    bad = resp & ((target < 0) | (target >= n_vocab))
    row_ptr = logits_ptr + seq * stride_ls + toks.to(tl.int64) * stride_lt
    cols = tl.arange(0, BLOCK_V)
    # A running (max, sum) per row. The max starts finite, so a row that loads nothing (prompt,
    # padding) keeps exp(-inf - m) = 0 instead of exp(-inf + inf) = NaN.
    m = tl.full([BLOCK_T], -1e30, dtype=tl.float32)
    d = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        load = resp[:, None] & (start + cols < n_vocab)[None, :]
        x = tl.load(row_ptr[:, None] + start + cols[None, :], mask=load, other=-float("inf")).to(tl.float32)
        m, d = logsumexp_step(m, d, x, AXIS=1)
    lse = m + tl.log(tl.where(resp, d, 1.0))  # d >= 1 on response rows (their max adds exp(0))
    x_target = tl.load(row_ptr + target, mask=resp & ~bad, other=0.0).to(tl.float32)
    logp = tl.where(bad, float("nan"), x_target - lse)
    tl.store(logp_ptr + st, tl.where(resp, logp, 0.0), mask=in_seq)
    tl.store(lse_ptr + st, tl.where(resp, lse, 0.0), mask=in_seq)


@triton.jit
def dpo_pair_kernel(
    logp_c_ptr,  # (B, Tc) fp32: masked token log-probs of the chosen responses
    logp_r_ptr,  # (B, Tr) fp32: the same for the rejected responses
    ref_c_ptr,  # (B,) fp32: the reference model's sequence log-probs of the chosen responses
    ref_r_ptr,  # (B,) fp32: ... of the rejected responses
    loss_ptr,  # (B,) fp32 out: -logsigmoid(delta) per pair
    pc_ptr,  # (B,) fp32 out: the policy's sequence log-probs, chosen
    pr_ptr,  # (B,) fp32 out: ... rejected
    dldelta_ptr,  # (B,) fp32 out: d loss_b / d delta_b = -sigmoid(-delta_b), for the backward pass
    n_tokens_c,  # Tc
    n_tokens_r,  # Tr
    beta,  # the DPO temperature
    BLOCK_T: tl.constexpr,  # tokens summed per step
):
    # One program per pair: T numbers each, a few KiB at most. Summing here, in a fixed order,
    # keeps the loss the same bits on every run (atomic adds from the token kernel would not).
    pair = tl.program_id(axis=0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    pc = 0.0
    for start in range(0, n_tokens_c, BLOCK_T):
        pc += tl.sum(tl.load(logp_c_ptr + pair * n_tokens_c + start + offs, mask=start + offs < n_tokens_c,
                             other=0.0), axis=0)
    pr = 0.0
    for start in range(0, n_tokens_r, BLOCK_T):
        pr += tl.sum(tl.load(logp_r_ptr + pair * n_tokens_r + start + offs, mask=start + offs < n_tokens_r,
                             other=0.0), axis=0)
    delta = beta * ((pc - pr) - (tl.load(ref_c_ptr + pair) - tl.load(ref_r_ptr + pair)))
    # -logsigmoid(delta) = softplus(-delta) = max(-delta, 0) + log(1 + exp(-|delta|)): no overflow
    # for any delta, where log(1 + exp(-delta)) overflows at delta < -88 in fp32.
    # sigmoid(-delta) from the same e = exp(-|delta|) <= 1, which never overflows either.
    e = tl.exp(-tl.abs(delta))
    loss = tl.maximum(-delta, 0.0) + tl.log(1.0 + e)
    tl.store(loss_ptr + pair, loss)
    tl.store(pc_ptr + pair, pc)
    tl.store(pr_ptr + pair, pr)
    tl.store(dldelta_ptr + pair, -tl.where(delta >= 0, e / (1.0 + e), 1.0 / (1.0 + e)))


@triton.jit
def dpo_grad_kernel(
    logits_ptr,  # (S, T, V), as in dpo_token_logps_kernel
    target_ptr,  # (S, T) int64
    mask_ptr,  # (S, T) fp32 response mask
    lse_ptr,  # (S, T) fp32: the forward pass's logsumexp per row
    coef_ptr,  # (S,) fp32: d loss / d (this sequence's log-prob), grad_output included
    grad_ptr,  # (S, T, V) contiguous out: d loss / d logits
    stride_ls,  # elements between logits[s, 0, 0] and logits[s + 1, 0, 0]
    stride_lt,  # elements between logits[s, t, 0] and logits[s, t + 1, 0]
    n_tokens,  # T
    n_vocab,  # V
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # d logp(target) / d logits = onehot(target) - softmax(logits): per response row, scaled by
    # the sequence's coefficient; prompt and padding rows get exact zeros (their logits are
    # never read).
    seq = tl.program_id(axis=0).to(tl.int64)
    toks = tl.program_id(axis=1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_seq = toks < n_tokens
    st = seq * n_tokens + toks
    resp = tl.load(mask_ptr + st, mask=in_seq, other=0.0) != 0.0
    target = tl.load(target_ptr + st, mask=resp, other=-1)
    lse = tl.load(lse_ptr + st, mask=in_seq, other=0.0)
    scale = tl.where(resp, tl.load(coef_ptr + seq), 0.0)
    row_ptr = logits_ptr + seq * stride_ls + toks.to(tl.int64) * stride_lt
    grad_row = grad_ptr + st * n_vocab
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_vocab, BLOCK_V):
        c = start + cols
        in_vocab = (c < n_vocab)[None, :]
        x = tl.load(row_ptr[:, None] + c[None, :], mask=resp[:, None] & in_vocab, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        g = (tl.where(c[None, :] == target[:, None], 1.0, 0.0) - p) * scale[:, None]
        tl.store(grad_row[:, None] + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=in_seq[:, None] & in_vocab)


@triton.jit
def grpo_loss_kernel(
    logits_ptr,  # (B, T, V): row (b, t) at logits_ptr + b * stride_lb + t * stride_lt, columns contiguous
    target_ptr,  # (B, T) int64 target ids, contiguous
    mask_ptr,  # (B, T) fp32 completion mask, contiguous: 1 for a completion token, 0 for prompt / padding
    old_logp_ptr,  # (B, T) fp32: the sampling policy's log-probs of the targets
    ref_logp_ptr,  # (B, T) fp32: the reference model's log-probs of the targets
    adv_ptr,  # (B,) fp32: each completion's group-normalised advantage
    weight_ptr,  # (B,) fp32: 1 / (completion tokens of the sequence * B), the two means in one weight
    loss_ptr,  # (B, T) fp32 out: weight * per-token loss, 0 off the completion
    logp_ptr,  # (B, T) fp32 out: the policy's log-probs of the targets, 0 off the completion
    grad_ptr,  # (B, T, V) contiguous out: d loss / d logits in the logits' dtype (when WRITE_GRAD)
    stride_lb,  # elements between logits[b, 0, 0] and logits[b + 1, 0, 0]
    stride_lt,  # elements between logits[b, t, 0] and logits[b, t + 1, 0]
    n_tokens,  # T
    n_vocab,  # V
    eps,  # the clip range: past 1 + eps (A > 0) or below 1 - eps (A < 0) a token's surrogate is constant
    beta,  # the weight of the KL penalty
    BLOCK_T: tl.constexpr,  # tokens (rows) per program
    BLOCK_V: tl.constexpr,  # vocabulary columns per chunk
    WRITE_GRAD: tl.constexpr,  # False under torch.no_grad: the loss only, one pass
):
    seq = tl.program_id(axis=0).to(tl.int64)
    toks = tl.program_id(axis=1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_seq = toks < n_tokens
    st = seq * n_tokens + toks
    resp = tl.load(mask_ptr + st, mask=in_seq, other=0.0) != 0.0
    target = tl.load(target_ptr + st, mask=resp, other=0)
    bad = resp & ((target < 0) | (target >= n_vocab))  # NaN for it, as in dpo_token_logps_kernel
    row_ptr = logits_ptr + seq * stride_lb + toks.to(tl.int64) * stride_lt
    cols = tl.arange(0, BLOCK_V)
    # Pass 1 over the vocabulary: the online logsumexp of dpo_token_logps_kernel.
    m = tl.full([BLOCK_T], -1e30, dtype=tl.float32)
    d = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        load = resp[:, None] & (start + cols < n_vocab)[None, :]
        x = tl.load(row_ptr[:, None] + start + cols[None, :], mask=load, other=-float("inf")).to(tl.float32)
        m, d = logsumexp_step(m, d, x, AXIS=1)
    # 0 off the completion: pass 2 then computes exp(0 - 0) * 0 there, not exp(0 + 1e30) * 0 = NaN.
    lse = tl.where(resp, m + tl.log(tl.where(resp, d, 1.0)), 0.0)
    x_target = tl.load(row_ptr + target, mask=resp & ~bad, other=0.0).to(tl.float32)
    logp = tl.where(bad, float("nan"), x_target - lse)
    # The per-token loss and its derivative in logp, all in registers.
    old = tl.load(old_logp_ptr + st, mask=resp, other=0.0)
    ref = tl.load(ref_logp_ptr + st, mask=resp, other=0.0)
    adv = tl.load(adv_ptr + seq)
    weight = tl.load(weight_ptr + seq)
    ratio = tl.exp(logp - old)
    unclipped = ratio * adv
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps), 1.0 + eps) * adv
    # d surrogate / d logp: ratio * A where the unclipped term is the min (inside the clip range the
    # two terms are equal), 0 where the clipped one is (a constant there: the ratio is past the clip).
    d_surrogate = tl.where(unclipped <= clipped, unclipped, 0.0)
    log_r = ref - logp
    e = tl.exp(log_r)
    kl = e - log_r - 1.0  # k3: >= 0, an unbiased estimate of KL(policy || reference) per sampled token
    loss = -(tl.minimum(unclipped, clipped) - beta * kl)
    tl.store(loss_ptr + st, tl.where(resp, weight * loss, 0.0), mask=in_seq)
    tl.store(logp_ptr + st, tl.where(resp, logp, 0.0), mask=in_seq)
    if WRITE_GRAD:
        # d loss / d logp = weight * (beta * (1 - exp(ref - logp)) - d surrogate / d logp); pass 2
        # writes it times d logp / d logits = onehot(target) - softmax, 0 on prompt and padding rows.
        g = tl.where(resp, weight * (beta * (1.0 - e) - d_surrogate), 0.0)
        grad_row = grad_ptr + st * n_vocab
        for start in range(0, n_vocab, BLOCK_V):
            c = start + cols
            in_vocab = (c < n_vocab)[None, :]
            x = tl.load(row_ptr[:, None] + c[None, :], mask=resp[:, None] & in_vocab, other=0.0).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            grad = (tl.where(c[None, :] == target[:, None], 1.0, 0.0) - p) * g[:, None]
            tl.store(grad_row[:, None] + c[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=in_seq[:, None] & in_vocab)


# %% [markdown]
# ## Wrapper
# ### 1. A registered operator
# `torch.library` turns a Python function into an operator with a schema (inferred from the type
# hints). The schema is what makes it production-ready: torch.compile, torch.export, FakeTensor
# shape propagation, CUDA graphs and the profiler all see `course12::layer_norm_fwd` as one op.
#
# - GPU: `triton_op` + `wrap_triton`. The function body is traced (it is its own fake
#   implementation), so torch.compile sees the Triton kernels inside and Inductor can schedule them.
# - Triton's CPU interpreter: `wrap_triton` hands back the plain interpreted kernel (torch 2.14),
#   which would run on FakeTensors and fail. There the same body is registered with `custom_op`
#   (opaque to the compiler) and a `register_fake` that only computes output shapes.
#
# Both get the backward pass from `register_autograd`, itself another registered op.

# %%
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bfloat16 under the interpreter gives wrong values (numpy has no bfloat16): fall back there.
KERNEL_DTYPES = FLOAT_DTYPES if common.HAS_GPU else (torch.float32, torch.float16)
USE_TRITON_OP = common.HAS_GPU and hasattr(torch.library, "triton_op")


def _plain(kernel):
    return kernel


def _layer_norm_fwd_body(x, weight, bias, eps, wrap):
    """validate (done by the caller), allocate, grid, launch, return: lesson 08's forward kernel."""
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_rows = rows.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block = L08._row_block(n_cols)
    wrap(L08.layernorm_fwd_kernel)[(n_rows,)](rows, weight, bias, y, mean, rstd, rows.stride(0), n_cols, eps,
                                              BLOCK_SIZE=block, num_warps=L08._row_num_warps(block))
    return y, mean, rstd


def _layer_norm_bwd_body(dy, x, weight, mean, rstd, wrap):
    """dx per row, then dw and db as partial rows summed by a second kernel (lesson 08)."""
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    dy_rows = dy.reshape(-1, n_cols)
    if dy_rows.stride(-1) != 1:  # the gradient of y.sum() is an expanded tensor, stride 0
        dy_rows = dy_rows.contiguous()
    n_rows = rows.shape[0]
    programs, rows_per_program = L08._bwd_grid(n_rows, None)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    partial = torch.empty(2, programs, n_cols, dtype=torch.float32, device=x.device)  # dw's, then db's
    block = L08._row_block(n_cols)
    wrap(L08.layernorm_bwd_kernel)[(programs,)](dy_rows, rows, weight, mean, rstd, dx, partial[0], partial[1],
                                                dy_rows.stride(0), rows.stride(0), n_rows, n_cols,
                                                rows_per_program, BLOCK_SIZE=block,
                                                num_warps=L08._bwd_num_warps(block))
    dw = torch.empty(n_cols, dtype=weight.dtype, device=x.device)
    db = torch.empty(n_cols, dtype=weight.dtype, device=x.device)
    block_p, block_n = L08.SUM_ROWS_BLOCK
    wrap(L08.sum_rows_kernel)[(triton.cdiv(n_cols, block_n), 2)](partial, dw, db, programs, n_cols,
                                                                 BLOCK_P=block_p, BLOCK_N=block_n)
    return dx, dw, db


def _free_namespace(base: str) -> str:
    """`base`, or base_1, base_2 ... if this process already registered ops there (the lesson
    imported twice, say): an operator name can be registered only once per process."""
    for i in itertools.count():
        namespace = base if i == 0 else f"{base}_{i}"
        try:
            getattr(getattr(torch.ops, namespace), "layer_norm_fwd")
        except AttributeError:
            return namespace
    raise AssertionError("unreachable")


def register_layer_norm_ops(namespace: str, traceable: bool):
    """Register <namespace>::layer_norm_fwd and ::layer_norm_bwd, with autograd; return both."""
    Tensor = torch.Tensor
    if traceable:
        from torch.library import triton_op, wrap_triton

        @triton_op(f"{namespace}::layer_norm_fwd", mutates_args=())
        def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
            return _layer_norm_fwd_body(x, weight, bias, eps, wrap_triton)

        @triton_op(f"{namespace}::layer_norm_bwd", mutates_args=())
        def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
            return _layer_norm_bwd_body(dy, x, weight, mean, rstd, wrap_triton)
    else:
        @torch.library.custom_op(f"{namespace}::layer_norm_fwd", mutates_args=())
        def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
            return _layer_norm_fwd_body(x, weight, bias, eps, _plain)

        @layer_norm_fwd.register_fake
        def _(x, weight, bias, eps):
            # Shapes, dtypes and devices of the outputs, computed without running anything: what
            # torch.compile propagates through the graph. Must match the real outputs exactly
            # (opcheck's test_faketensor compares them, strides included).
            n_rows = x.numel() // x.shape[-1]
            return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
                    x.new_empty(n_rows, dtype=torch.float32), x.new_empty(n_rows, dtype=torch.float32))

        @torch.library.custom_op(f"{namespace}::layer_norm_bwd", mutates_args=())
        def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
            return _layer_norm_bwd_body(dy, x, weight, mean, rstd, _plain)

        @layer_norm_bwd.register_fake
        def _(dy, x, weight, mean, rstd):
            return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight),
                    torch.empty_like(weight))

    def setup_context(ctx, inputs, output):
        x, weight, _bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)  # statistics for the backward pass, not results

    def backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd)
        return dx, dw, db, None  # no gradient for eps

    layer_norm_fwd.register_autograd(backward, setup_context=setup_context)
    return layer_norm_fwd, layer_norm_bwd


NAMESPACE = _free_namespace("course12")
layer_norm_fwd_op, layer_norm_bwd_op = register_layer_norm_ops(NAMESPACE, traceable=USE_TRITON_OP)
OP_KIND = "torch.library.triton_op + wrap_triton" if USE_TRITON_OP else "torch.library.custom_op + register_fake"


def _check_layer_norm_args(x, weight, bias) -> None:
    common.check_tensors(x=x, contiguous=False, dtypes=KERNEL_DTYPES)
    common.check_tensors(weight=weight, bias=bias, ndim=1, dtypes=KERNEL_DTYPES)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must have at least one row of at least one element, got shape {tuple(x.shape)}")
    n_cols = x.shape[-1]
    if weight.shape[0] != n_cols:
        raise ValueError(f"weight must have shape ({n_cols},) to match the last dimension of x, got "
                         f"{tuple(weight.shape)}")
    if n_cols > L08.MAX_FUSED_COLS:
        raise ValueError(f"x has rows of {n_cols} elements; the kernel holds a row in registers, at most "
                         f"{L08.MAX_FUSED_COLS}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension through the registered op; differentiable in x, weight, bias."""
    _check_layer_norm_args(x, weight, bias)
    return layer_norm_fwd_op(x, weight, bias, float(eps))[0]


# %% [markdown]
# ### 2. An nn.Module: validation and fallback
# A drop-in for `nn.LayerNorm(dim)`. Input that can never be right (not a tensor, wrong width,
# integers) raises at once; input the kernel does not handle (float64, a tensor on another device,
# bfloat16 under the interpreter, rows wider than a block) goes to PyTorch, with one warning per
# reason, so a model keeps working and the user learns why it is slower.


# %%
class TritonLayerNorm(nn.Module):
    """LayerNorm over the last dimension with lesson 08's kernels, falling back to F.layer_norm."""

    _warned: set = set()  # reasons already warned about, once per process

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dim must be an int (the size of the last dimension), got {type(dim).__name__}")
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    @classmethod
    def from_torch(cls, module: nn.LayerNorm) -> "TritonLayerNorm":
        if len(module.normalized_shape) != 1 or module.weight is None or module.bias is None:
            raise ValueError("only nn.LayerNorm over one dimension with weight and bias can be replaced")
        new = cls(module.normalized_shape[0], module.eps, device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            new.bias.copy_(module.bias)
        return new

    def fallback_reason(self, x: torch.Tensor) -> str | None:
        """None when the kernel applies to x, else why it does not."""
        if x.device.type != common.DEVICE.type:
            return f"x is on {x.device.type}, the kernel runs on {common.DEVICE.type}"
        if x.dtype not in KERNEL_DTYPES:
            why = " (Triton's interpreter has no bfloat16)" if x.dtype == torch.bfloat16 else ""
            return f"dtype {str(x.dtype).removeprefix('torch.')} is not supported by the kernel{why}"
        if self.weight.dtype not in KERNEL_DTYPES or self.weight.device.type != common.DEVICE.type:
            return f"the parameters are {self.weight.dtype} on {self.weight.device.type}"
        if x.numel() == 0:
            return "x is empty"
        if self.dim > L08.MAX_FUSED_COLS:
            return f"rows of {self.dim} do not fit one block (at most {L08.MAX_FUSED_COLS})"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x has dtype {str(x.dtype).removeprefix('torch.')}; LayerNorm needs floating point")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        reason = self.fallback_reason(x)
        if reason is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        if reason not in TritonLayerNorm._warned:
            TritonLayerNorm._warned.add(reason)
            warnings.warn(f"TritonLayerNorm falls back to F.layer_norm: {reason}", stacklevel=2)
        weight, bias = self.weight.to(x.device, x.dtype), self.bias.to(x.device, x.dtype)  # a copy: it is a fallback
        return F.layer_norm(x, (self.dim,), weight, bias, self.eps)


def swap_layer_norms(model: nn.Module) -> int:
    """Replace every nn.LayerNorm inside `model` by a TritonLayerNorm with the same parameters."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, nn.LayerNorm):
            setattr(model, name, TritonLayerNorm.from_torch(child))
            count += 1
        else:
            count += swap_layer_norms(child)
    return count


# %% [markdown]
# ### 3. The fused DPO loss
# `dpo_loss` takes the policy's logits for the chosen and the rejected responses (B, T, V), their
# target ids and response masks (B, T), and the frozen reference model's sequence log-probs (B,).
# It returns the mean loss and, detached, the policy's sequence log-probs (for the rewards).


# %%
def _dpo_blocks(n_tokens: int, n_vocab: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_V, num_warps) for the DPO tiles."""
    if common.INTERPRETER:  # few, large programs: the interpreter pays per program, not per element
        return min(triton.next_power_of_2(n_tokens), 16), min(max(16, triton.next_power_of_2(n_vocab)), 128), 4
    # H200, 8 x 512 x 32000 bf16: 2 x 4096 with 8 warps ran the forward kernel in 84 us (64% of copy)
    # and the gradient kernel in 133 us (87%); 4 x 1024 (the first choice) took 111 and 155 us.
    return 2, min(max(16, triton.next_power_of_2(n_vocab)), 4096), 8


def _check_sequences(logits, targets, mask, name: str):
    common.check_tensors(**{f"{name}_logits": logits}, contiguous=False, ndim=3, dtypes=FLOAT_DTYPES)
    if logits.stride(-1) != 1:
        raise ValueError(f"{name}_logits must have contiguous rows (stride(-1) == 1), got strides "
                         f"{logits.stride()}; pass .contiguous()")
    if logits.shape[0] == 0 or logits.shape[1] == 0 or logits.shape[2] == 0:
        raise ValueError(f"{name}_logits must not be empty, got shape {tuple(logits.shape)}")
    common.check_tensors(**{f"{name}_targets": targets}, ndim=2, contiguous=False, dtypes=(torch.int64,))
    common.check_tensors(**{f"{name}_mask": mask}, ndim=2, contiguous=False,
                         dtypes=(torch.bool, torch.float32, torch.int64, torch.int32, torch.uint8))
    if targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(f"{name}_targets and {name}_mask must have shape {tuple(logits.shape[:2])} (B, T) of "
                         f"{name}_logits, got {tuple(targets.shape)} and {tuple(mask.shape)}")
    # Target values are not checked here: that needs the data on the host, a sync per step. The
    # kernel gives NaN for a target outside the vocabulary instead (see dpo_token_logps_kernel).
    return targets.contiguous(), mask.to(torch.float32).contiguous()


def token_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """(mask * log_softmax(logits)[target], logsumexp) per token, both (S, T) fp32, in one kernel."""
    targets, mask = _check_sequences(logits, targets, mask, "sequence")
    n_seqs, n_tokens, n_vocab = logits.shape
    out = torch.empty(n_seqs, n_tokens, dtype=torch.float32, device=logits.device) if out is None else out
    lse = torch.empty(n_seqs, n_tokens, dtype=torch.float32, device=logits.device) if lse is None else lse
    for label, t in (("out", out), ("lse", lse)):
        if t.shape != (n_seqs, n_tokens) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{label} must be a contiguous fp32 tensor of shape {(n_seqs, n_tokens)}")
    block_t, block_v, warps = _dpo_blocks(n_tokens, n_vocab)
    dpo_token_logps_kernel[(n_seqs, triton.cdiv(n_tokens, block_t))](
        logits, targets, mask, out, lse, logits.stride(0), logits.stride(1), n_tokens, n_vocab,
        BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps)
    return out, lse


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probs per sequence, (S,) fp32: the reference model's input."""
    return token_logps(logits, targets, mask)[0].sum(-1)


def dpo_grad(logits, targets, mask, lse, coef, out: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d logits = coef[s] * mask * (onehot(target) - softmax(logits)), logits' dtype."""
    n_seqs, n_tokens, n_vocab = logits.shape
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if out is None else out
    block_t, block_v, warps = _dpo_blocks(n_tokens, n_vocab)
    dpo_grad_kernel[(n_seqs, triton.cdiv(n_tokens, block_t))](
        logits, targets, mask, lse, coef, out, logits.stride(0), logits.stride(1), n_tokens, n_vocab,
        BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps)
    return out


class DPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r, beta):
        targets_c, mask_c = _check_sequences(logits_c, targets_c, mask_c, "chosen")
        targets_r, mask_r = _check_sequences(logits_r, targets_r, mask_r, "rejected")
        n_pairs = logits_c.shape[0]
        if logits_r.shape[0] != n_pairs:
            raise ValueError(f"chosen and rejected must hold the same number of pairs, got {n_pairs} and "
                             f"{logits_r.shape[0]}")
        common.check_tensors(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, ndim=1, contiguous=False,
                             dtypes=(torch.float32, torch.float64))
        if ref_c.shape[0] != n_pairs or ref_r.shape[0] != n_pairs:
            raise ValueError(f"the reference log-probs must have shape ({n_pairs},), got {tuple(ref_c.shape)} "
                             f"and {tuple(ref_r.shape)}")
        if not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a positive number, got {beta!r}")
        logp_c, lse_c = token_logps(logits_c, targets_c, mask_c)
        logp_r, lse_r = token_logps(logits_r, targets_r, mask_r)
        dev = logits_c.device
        loss, pc, pr, dldelta = (torch.empty(n_pairs, dtype=torch.float32, device=dev) for _ in range(4))
        block_t = min(triton.next_power_of_2(max(logp_c.shape[1], logp_r.shape[1])), 1024)
        dpo_pair_kernel[(n_pairs,)](logp_c, logp_r, ref_c.float().contiguous(), ref_r.float().contiguous(),
                                    loss, pc, pr, dldelta, logp_c.shape[1], logp_r.shape[1], float(beta),
                                    BLOCK_T=block_t)
        ctx.save_for_backward(logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, lse_c, lse_r, dldelta)
        ctx.beta = float(beta)
        ctx.mark_non_differentiable(pc, pr)
        return loss.mean(), pc, pr

    @staticmethod
    def backward(ctx, grad_loss, _grad_pc, _grad_pr):
        logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, lse_c, lse_r, dldelta = ctx.saved_tensors
        # loss = mean_b loss_b, delta_b = beta * (pc_b - pr_b - ...): d loss / d pc_b = beta * dldelta_b / B
        # and d loss / d pr_b is its negative. grad_loss stays on the device: no host sync.
        coef = dldelta * (ctx.beta / dldelta.shape[0]) * grad_loss.float()
        grad_c = dpo_grad(logits_c, targets_c, mask_c, lse_c, coef) if ctx.needs_input_grad[0] else None
        grad_r = dpo_grad(logits_r, targets_r, mask_r, lse_r, -coef) if ctx.needs_input_grad[1] else None
        return grad_c, grad_r, None, None, None, None, None, None, None


def dpo_loss(logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r, beta: float = 0.1):
    """(mean DPO loss, policy chosen log-probs, policy rejected log-probs); the loss is differentiable."""
    return DPOLossFunction.apply(logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r, beta)


# %% [markdown]
# ### 4. GRPO: a policy-gradient loss
# `grpo_loss` takes the policy's logits for B sampled completions (B, T, V), G per prompt, their
# targets and completion masks (B, T), the sampling policy's and the reference model's per-token
# log-probs (B, T) and one reward per completion (B,). The advantages are computed here in PyTorch
# (B numbers); one kernel does the rest, the logits' gradient included. It returns the loss and,
# detached, the policy's per-token log-probs (the next update's old_logps when a batch is reused).


# %%
def _check_grpo_args(logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta):
    """validate: TypeError / ValueError naming the bad argument; returns the kernel's (B, T) inputs."""
    common.check_tensors(logits=logits, contiguous=False, ndim=3, dtypes=FLOAT_DTYPES)
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError("logits are bfloat16, which Triton's CPU interpreter cannot compute (numpy has no "
                        "bfloat16): pass float32 or float16 logits here, bfloat16 on a GPU")
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must have contiguous rows (stride(-1) == 1), got strides {logits.stride()}; "
                         f"pass .contiguous()")
    if 0 in logits.shape:
        raise ValueError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    n_seqs, n_tokens = logits.shape[:2]
    common.check_tensors(targets=targets, ndim=2, contiguous=False, dtypes=(torch.int64,))
    common.check_tensors(mask=mask, ndim=2, contiguous=False,
                         dtypes=(torch.bool, torch.float32, torch.int64, torch.int32, torch.uint8))
    common.check_tensors(old_logps=old_logps, ref_logps=ref_logps, ndim=2, contiguous=False, same_shape=False,
                         same_dtype=False, dtypes=(torch.float32, torch.float64))
    for name, t in (("targets", targets), ("mask", mask), ("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t.shape != logits.shape[:2]:
            raise ValueError(f"{name} must have shape {(n_seqs, n_tokens)} (B, T) of logits {tuple(logits.shape)}, "
                             f"got {tuple(t.shape)}")
    common.check_tensors(rewards=rewards, ndim=1, contiguous=False, dtypes=(torch.float32, torch.float64))
    if rewards.shape[0] != n_seqs:
        raise ValueError(f"rewards must have shape ({n_seqs},), one per completion, got {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int (completions per prompt), got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}: a group of one has no spread, "
                         f"its advantage would be 0 / 0")
    if n_seqs % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of completions B = {n_seqs} "
                         f"(B = prompts * group_size, each prompt's completions consecutive)")
    if not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ValueError(f"eps (the clip range) must be a number in [0, 1), got {eps!r}")
    if not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"beta (the KL weight) must be a number >= 0, got {beta!r}")
    mask = mask.to(torch.float32).contiguous()
    # One host sync: a sequence with no completion token has no masked mean (0 / 0), which would
    # make the loss and every gradient NaN; say which ones instead.
    n_valid = mask.sum(-1)
    empty = (n_valid == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequences {empty} have no completion token (their mask rows are all 0): the "
                         f"per-sequence mean over completion tokens is 0 / 0; drop them or unmask a token")
    return (targets.contiguous(), mask, old_logps.float().contiguous(), ref_logps.float().contiguous(),
            n_valid)


def grpo_token_loss(logits, targets, mask, old_logps, ref_logps, advantages, weights, eps: float, beta: float,
                    loss: torch.Tensor | None = None, logp: torch.Tensor | None = None,
                    grad: torch.Tensor | None = None, write_grad: bool = True):
    """One launch of grpo_loss_kernel on validated inputs (fp32 contiguous (B, T) arrays, (B,)
    advantages and weights): (weighted per-token loss, log-probs, d loss / d logits or None)."""
    n_seqs, n_tokens, n_vocab = logits.shape
    dev = logits.device
    loss = torch.empty(n_seqs, n_tokens, dtype=torch.float32, device=dev) if loss is None else loss
    logp = torch.empty(n_seqs, n_tokens, dtype=torch.float32, device=dev) if logp is None else logp
    for label, t in (("loss", loss), ("logp", logp)):
        if t.shape != (n_seqs, n_tokens) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{label} must be a contiguous fp32 tensor of shape {(n_seqs, n_tokens)}")
    if write_grad:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=dev) if grad is None else grad
        if grad.shape != logits.shape or grad.dtype != logits.dtype or not grad.is_contiguous():
            raise ValueError(f"grad must be a contiguous {logits.dtype} tensor of shape {tuple(logits.shape)}")
    block_t, block_v, warps = _dpo_blocks(n_tokens, n_vocab)  # DPO's tiles: the same rows, chunks and sweep
    grpo_loss_kernel[(n_seqs, triton.cdiv(n_tokens, block_t))](
        logits, targets, mask, old_logps, ref_logps, advantages, weights, loss, logp,
        grad if write_grad else loss,  # never written without WRITE_GRAD
        logits.stride(0), logits.stride(1), n_tokens, n_vocab, float(eps), float(beta),
        BLOCK_T=block_t, BLOCK_V=block_v, WRITE_GRAD=write_grad, num_warps=warps)
    return loss, logp, grad if write_grad else None


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta, write_grad):
        targets, mask, old_logps, ref_logps, n_valid = _check_grpo_args(
            logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta)
        advantages = grpo_advantages(rewards.float(), group_size).contiguous()  # (B,): a few tiny kernels
        weights = 1.0 / (n_valid * logits.shape[0])  # masked mean per sequence, then mean over sequences
        loss, logp, grad = grpo_token_loss(logits, targets, mask, old_logps, ref_logps, advantages, weights,
                                           eps, beta, write_grad=write_grad)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(logp)
        return loss.sum(), logp  # a fixed-order sum of B x T numbers: the same bits on every run

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        (grad,) = ctx.saved_tensors
        # The gradient was written by the forward kernel: all that is left is the chain rule's
        # scalar, in place (no second B x T x V buffer), on the device (no host sync). In place
        # also means a second backward through the same graph fails loudly (autograd sees the saved
        # tensor changed) instead of scaling twice.
        return grad.mul_(grad_loss), None, None, None, None, None, None, None, None, None


def grpo_loss(logits, targets, mask, old_logps, ref_logps, rewards, group_size: int, eps: float = 0.2,
              beta: float = 0.04):
    """(GRPO loss, the policy's per-token log-probs (B, T) fp32, detached); the loss is differentiable
    in logits. B = prompts * group_size completions, each prompt's group_size completions consecutive."""
    write_grad = torch.is_grad_enabled() and isinstance(logits, torch.Tensor) and logits.requires_grad
    return GRPOLossFunction.apply(logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta,
                                  write_grad)


# %% [markdown]
# ### 5. Tensor parallelism
# The MLP's first two weights are split by rows (column-parallel: each GPU computes its own
# slice of the hidden units, no communication), the GeGLU runs on the local slice (it is
# elementwise, so it splits too), and the down projection is split by columns (row-parallel:
# each GPU produces a partial sum of the full output). One all_reduce adds the partial sums.


# %%
def mlp_weights(dim: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The full MLP's weights, on the CPU in fp32, the same in every process for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return {"w_gate": torch.randn(hidden, dim, generator=g) / dim**0.5,
            "w_up": torch.randn(hidden, dim, generator=g) / dim**0.5,
            "w_down": torch.randn(dim, hidden, generator=g) / hidden**0.5}


def shard_mlp(weights: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    hidden = weights["w_gate"].shape[0]
    if hidden % world_size:
        raise ValueError(f"the hidden size {hidden} must divide by the number of ranks {world_size}")
    part = slice(rank * hidden // world_size, (rank + 1) * hidden // world_size)
    return {"w_gate": weights["w_gate"][part].contiguous(), "w_up": weights["w_up"][part].contiguous(),
            "w_down": weights["w_down"][:, part].contiguous()}


def geglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The MLP with lesson 08's fused GeGLU kernel between the matmuls."""
    return L08.geglu_forward(x @ w_gate.T, x @ w_up.T) @ w_down.T


def tensor_parallel_mlp(x: torch.Tensor, shard: dict[str, torch.Tensor], group=None) -> torch.Tensor:
    """This rank's partial output, summed over the ranks of `group` by one all_reduce."""
    import torch.distributed as dist

    y = geglu_mlp(x, shard["w_gate"], shard["w_up"], shard["w_down"])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y


def _tp_worker(workdir: Path) -> None:
    """One rank of the tensor-parallel run (started by run_tensor_parallel as its own process)."""
    import torch.distributed as dist

    config = json.loads((workdir / "config.json").read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if config["backend"] == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(config["backend"], rank=rank, world_size=world_size)
    weights = mlp_weights(config["dim"], config["hidden"], config["seed"])
    x = torch.randn(config["tokens"], config["dim"], generator=torch.Generator().manual_seed(config["seed"] + 1))
    x = x.to(device)
    shard = {k: v.to(device) for k, v in shard_mlp(weights, rank, world_size).items()}
    y_tp = tensor_parallel_mlp(x, shard)
    if rank == 0:
        # tp=1 in the same process, on the same device, with the same weights: the comparison.
        full = {k: v.to(device) for k, v in weights.items()}
        y_one = geglu_mlp(x, full["w_gate"], full["w_up"], full["w_down"])
        torch.save({"tp": y_tp.cpu(), "one": y_one.cpu(), "x": x.cpu()}, workdir / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


# What the child processes run: this file (a notebook made from it has no __file__: the lesson's file in the repo).
LESSON_SCRIPT = Path(globals().get("__file__")
                     or Path(common.__file__).parents[1] / "lessons" / "expert" / "12_production.py").resolve()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tensor_parallel(backend: str, world_size: int = 2, tokens: int = 5, dim: int = 24, hidden: int = 40,
                        seed: int = 0, timeout_s: float = 300.0) -> dict:
    """Start `world_size` processes running the TP MLP; return tp vs tp=1 vs float64 differences.

    backend="nccl": one GPU per rank. backend="gloo": every rank on the CPU, Triton in its
    interpreter (forced, so this also works on a machine with a GPU).
    """
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"nccl with {world_size} ranks needs {world_size} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="course12_tp_") as tmp:
        workdir = Path(tmp)
        (workdir / "config.json").write_text(json.dumps(dict(backend=backend, tokens=tokens, dim=dim,
                                                             hidden=hidden, seed=seed)))
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE=str(world_size), PYTHONUNBUFFERED="1")
        if backend == "gloo":
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
            env.pop("COURSE_AUTO_INTERPRET", None)  # the interpreter is asked for, not a fallback
        procs = [subprocess.Popen([sys.executable, str(LESSON_SCRIPT), "--tp-worker", str(workdir)],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(world_size)]
        outputs, deadline = [], time.monotonic() + timeout_s
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"the {backend} tensor-parallel run did not finish in {timeout_s:.0f} s")
        for r, (proc, out) in enumerate(zip(procs, outputs)):
            if proc.returncode != 0:
                raise RuntimeError(f"rank {r} ({backend}) exited {proc.returncode}:\n{out[-3000:]}")
        result = torch.load(workdir / "result.pt")
    weights = {k: v.double() for k, v in mlp_weights(dim, hidden, seed).items()}
    y64 = geglu_mlp_reference(result["x"].double(), **weights)
    scale = float(result["one"].abs().max())
    return {"backend": backend, "world_size": world_size, "shape": (tokens, dim, hidden),
            "tp_vs_one": float((result["tp"] - result["one"]).abs().max()) / scale,
            "tp_vs_fp64": float((result["tp"].double() - y64).abs().max()) / scale,
            "one_vs_fp64": float((result["one"].double() - y64).abs().max()) / scale}


# %% [markdown]
# ### 6. CUDA graphs and streams
# A graph is captured once from real launches (after a warm-up on a side stream, so that Triton's
# compilation and cuBLAS's workspace allocation happen outside the capture) and replayed with one
# call. Inputs and outputs are fixed buffers: new data is copied into the static input.


# %%
def capture_cuda_graph(fn, *static_inputs, warmup: int = 3):
    """(graph, static output) of fn(*static_inputs); replay with graph.replay()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_inputs)
    return graph, static_out


class DecodeStack(nn.Module):
    """A decode step at batch 1: per layer, TritonLayerNorm, two projections, GeGLU, a projection
    and the residual add (6 kernels). Tiny tensors: launch cost, not bandwidth, sets the time."""

    def __init__(self, dim: int, hidden: int, layers: int, dtype=torch.float16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        make = lambda *shape: nn.Parameter((torch.randn(*shape, generator=g) / shape[-1] ** 0.5)  # noqa: E731
                                           .to(common.DEVICE, dtype), requires_grad=False)
        self.norms = nn.ModuleList(TritonLayerNorm(dim, device=common.DEVICE, dtype=dtype) for _ in range(layers))
        self.w_gate = nn.ParameterList(make(hidden, dim) for _ in range(layers))
        self.w_up = nn.ParameterList(make(hidden, dim) for _ in range(layers))
        self.w_down = nn.ParameterList(make(dim, hidden) for _ in range(layers))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, wg, wu, wd in zip(self.norms, self.w_gate, self.w_up, self.w_down):
            h = norm(x)
            x = x + L08.geglu_forward(h @ wg.T, h @ wu.T) @ wd.T
        return x


# %% [markdown]
# ### 7. The capstone's model, its samples and the preference rule
# A bigram language model (the next token from the current one) over a toy vocabulary, with
# lesson 08's GeGLU in its MLP. A prompt counts up from a random token. The policy writes the
# responses itself: each round it samples two completions per prompt, a rule scores them (the
# counting reward below), the better one is "chosen", and DPO trains on those pairs against a
# frozen copy of the initial policy (the reference). Nothing is hand-labelled and no pair is
# random tokens: each round's pairs come from the policy that the last round trained.


# %%
class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        x = self.embed(ids)
        x = x + self.down(L08.geglu(self.gate(x), self.up(x)))
        return self.head(x)


def counting_reward(prompt_last: torch.Tensor, response: torch.Tensor, vocab: int) -> torch.Tensor:
    """The preference rule: per sequence, the mean over the response of 1 - dist / (V // 2), dist
    the circular distance of each token from (previous token + 1). 1 for a response that keeps
    counting, about 0.5 for random tokens; dense, so two samples almost never tie."""
    previous = torch.cat([prompt_last[:, None], response[:, :-1]], dim=1)
    dist = (response - previous - 1) % vocab
    dist = torch.minimum(dist, vocab - dist)
    return 1.0 - dist.float().mean(dim=1) / (vocab // 2)


def counting_prompts(n: int, vocab: int, prompt_len: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, vocab, (n, 1), generator=generator, device=generator.device)
    return (start + torch.arange(prompt_len, device=generator.device)) % vocab


@torch.no_grad()
def sample_responses(model: nn.Module, prompt: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """length tokens per prompt, sampled at temperature 1 (a bigram model needs only the last token)."""
    token, out = prompt[:, -1], []
    for _ in range(length):
        probs = torch.softmax(model(token[:, None])[:, -1].float(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        out.append(token)
    return torch.stack(out, dim=1)


def pair_data(prompt: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Inputs, targets and response masks of the chosen and rejected sequences, (B, T) each."""
    n_pairs, prompt_len = prompt.shape
    mask = (torch.arange(prompt_len + chosen.shape[1] - 1, device=prompt.device) >= prompt_len - 1).expand(n_pairs, -1)
    data = {"prompt_last": prompt[:, -1]}
    for name, response in (("c", chosen), ("r", rejected)):
        seq = torch.cat([prompt, response], dim=1)
        data[f"ids_{name}"], data[f"targets_{name}"] = seq[:, :-1], seq[:, 1:]
        data[f"mask_{name}"] = mask
    return {k: v.contiguous() for k, v in data.items()}


def sampled_pairs(model: nn.Module, prompt: torch.Tensor, response_len: int, vocab: int,
                  generator: torch.Generator) -> tuple[dict, int]:
    """Two samples per prompt, the higher counting reward chosen; ties dropped. (pairs, ties)."""
    a, b = (sample_responses(model, prompt, response_len, generator) for _ in range(2))
    reward_a, reward_b = (counting_reward(prompt[:, -1], r, vocab) for r in (a, b))
    keep = reward_a != reward_b
    a_wins = (reward_a > reward_b)[:, None]
    chosen, rejected = torch.where(a_wins, a, b)[keep], torch.where(a_wins, b, a)[keep]
    return pair_data(prompt[keep], chosen, rejected), int((~keep).sum())


def _pair_logits(model: nn.Module, data: dict, idx=slice(None)):
    """One forward pass over the chosen and rejected sequences together, split in two (views)."""
    ids = torch.cat([data["ids_c"][idx], data["ids_r"][idx]])
    logits = model(ids)
    n = ids.shape[0] // 2
    return logits[:n], logits[n:]


@torch.no_grad()
def reference_logps(model: nn.Module, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits_c, logits_r = _pair_logits(model, data)
    return (sequence_logps(logits_c, data["targets_c"], data["mask_c"]),
            sequence_logps(logits_r, data["targets_r"], data["mask_r"]))


@torch.no_grad()
def kl_to_reference(policy: nn.Module, reference: nn.Module, prompt: torch.Tensor, response: torch.Tensor) -> float:
    """Mean over sequences of sum over response positions of KL(policy || reference) of the
    next-token distributions, exact over the vocabulary, on the policy's own samples."""
    current = torch.cat([prompt[:, -1:], response[:, :-1]], dim=1)
    logp = torch.log_softmax(policy(current).float(), dim=-1)
    logr = torch.log_softmax(reference(current).float(), dim=-1)
    return float((logp.exp() * (logp - logr)).sum(dim=-1).sum(dim=1).mean())


def tune_from_feedback(rounds: int, prompts_per_round: int, steps: int, batch: int, n_eval: int, vocab: int,
                       dim: int, hidden: int, prompt_len: int = 3, response_len: int = 4, beta: float = 0.1,
                       lr: float = 1e-3, seed: int = 0) -> dict:
    """Iterative DPO: each round samples pairs from the policy, ranks them by counting_reward and
    trains `steps` DPO steps on them against the frozen initial policy. Returns one row per round
    (round 0: before any training) of the held-out reward, preference accuracy and KL."""
    torch.manual_seed(seed)
    policy = TinyLM(vocab, dim, hidden).to(common.DEVICE)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    gen = torch.Generator(device=common.DEVICE).manual_seed(seed + 1)
    # Held out: prompts the policy never trains on, and pairs sampled once from the initial policy
    # and ranked by the rule, to measure whether the implicit reward ranks them as the rule does.
    eval_prompts = counting_prompts(n_eval, vocab, prompt_len, gen)
    eval_pairs, _ = sampled_pairs(policy, eval_prompts, response_len, vocab, gen)
    ref_eval = reference_logps(reference, eval_pairs)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    history = {"round": [], "reward": [], "accuracy": [], "kl": [], "pairs": [], "ties": [], "loss": []}

    def evaluate(round_, pairs, ties, loss):
        response = sample_responses(policy, eval_prompts, response_len, gen)
        pc, pr = reference_logps(policy, eval_pairs)
        margin = beta * ((pc - ref_eval[0]) - (pr - ref_eval[1]))
        for key, value in (("round", round_), ("pairs", pairs), ("ties", ties), ("loss", loss),
                           ("reward", float(counting_reward(eval_prompts[:, -1], response, vocab).mean())),
                           ("accuracy", float((margin > 0).float().mean())),
                           ("kl", kl_to_reference(policy, reference, eval_prompts, response))):
            history[key].append(value)

    evaluate(0, 0, 0, float("nan"))
    for round_ in range(1, rounds + 1):
        prompts = counting_prompts(prompts_per_round, vocab, prompt_len, gen)
        data, ties = sampled_pairs(policy, prompts, response_len, vocab, gen)
        ref = reference_logps(reference, data)  # the reference is frozen: once per round's pairs
        n_pairs, losses = data["ids_c"].shape[0], []
        for _ in range(steps):
            idx = torch.randint(0, n_pairs, (min(batch, n_pairs),), generator=gen, device=gen.device)
            logits_c, logits_r = _pair_logits(policy, data, idx)
            loss, _, _ = dpo_loss(logits_c, logits_r, data["targets_c"][idx], data["targets_r"][idx],
                                  data["mask_c"][idx], data["mask_r"][idx], ref[0][idx], ref[1][idx], beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        evaluate(round_, n_pairs, ties, float(torch.stack(losses).mean()))
    return history


# %% [markdown]
# ## Check
# The registered op against float64 (forward and autograd), `opcheck`'s four tests,
# torch.compile(fullgraph=True) forward and backward; the module's errors and fallbacks; the DPO
# and GRPO kernels against float64 autograd on awkward sizes with poisoned outputs.


# %%
def _dtypes(quick: bool) -> list[torch.dtype]:
    if common.HAS_GPU and quick:
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


def check_layer_norm_op(quick: bool) -> None:
    for dtype in _dtypes(quick):
        for shape in ((int(torch.randint(3, 40, ()).item()), common.awkward_sizes(1, lo=100, hi=1500)[0]),
                      (2, 3, 17)):
            x = common.randn(*shape, dtype=dtype, scale=2.0) + 0.5
            w, b = common.randn(shape[-1], dtype=dtype), common.randn(shape[-1], dtype=dtype)
            dy = common.randn(*shape, dtype=dtype)
            name = f"{shape} {str(dtype).removeprefix('torch.')}"
            y_ref, grads_ref = common.grads_float64(layer_norm_reference, (x, w, b), dy)
            y, grads = common.grads_of(layer_norm, (x, w, b), dy)
            common.assert_close(y, y_ref, name=f"layer_norm op forward {name}")
            rows = x.numel() // shape[-1]
            for label, got, want in zip(("dx", "dw", "db"), grads, grads_ref):  # dw, db: sums over the rows
                tol = common.checks.tolerance(dtype) if label == "dx" else common.checks.sum_tolerance(dtype, rows)
                common.assert_close(got, want, name=f"layer_norm op backward {label} {name}", **tol)
    print(f"{NAMESPACE}::layer_norm_fwd / _bwd ({OP_KIND}) forward and autograd match float64: OK")


def run_opcheck() -> dict:
    """torch.library.opcheck on both ops: schema, autograd registration, fake tensors, AOT dispatch."""
    x, w, b = common.randn(5, 33, scale=2.0), common.randn(33), common.randn(33)
    results = {}
    results["layer_norm_fwd"] = torch.library.opcheck(
        layer_norm_fwd_op, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5))
    y, mean, rstd = layer_norm_fwd_op(x.detach(), w.detach(), b.detach(), 1e-5)
    results["layer_norm_bwd"] = torch.library.opcheck(layer_norm_bwd_op, (common.randn(5, 33), x.detach(),
                                                                          w.detach(), mean, rstd))
    return results


def compile_backend() -> str:
    # Inductor compiles Triton kernels for GPU tensors only; on the CPU it would need a C++
    # toolchain and still cannot run a Triton kernel on cpu tensors. aot_eager traces the same
    # graph (dynamo + AOT autograd, where fullgraph breaks would show) and runs it eagerly.
    return "inductor" if common.HAS_GPU else "aot_eager"


def check_compile() -> None:
    """torch.compile(fullgraph=True) of a function using the op: no graph break, same values and grads."""
    def block(x, w, b):
        return torch.relu(layer_norm(x, w, b) * 2.0 + 1.0)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend())
    x, w, b, dy = common.randn(7, 129), common.randn(129), common.randn(129), common.randn(7, 129)
    ref = lambda x_, w_, b_: torch.relu(layer_norm_reference(x_, w_, b_) * 2.0 + 1.0)  # noqa: E731
    y_ref, grads_ref = common.grads_float64(ref, (x, w, b), dy)
    y, grads = common.grads_of(compiled, (x, w, b), dy)
    common.assert_close(y, y_ref, name="torch.compile(fullgraph=True) forward")
    for label, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        common.assert_close(got, want, name=f"torch.compile(fullgraph=True) backward {label}")
    print(f"torch.compile(fullgraph=True, backend={compile_backend()!r}): no graph break, forward and "
          f"backward match float64: OK")


def check_module() -> list[tuple[str, str]]:
    """The module's errors and fallbacks; returns (input, what happened) rows."""
    norm = TritonLayerNorm(48, device=common.DEVICE)
    with torch.no_grad():
        norm.weight.copy_(common.randn(48))
        norm.bias.copy_(common.randn(48))
    x = common.randn(6, 48)
    common.assert_close(norm(x), layer_norm_reference(x.double(), norm.weight.double(), norm.bias.double()),
                        name="TritonLayerNorm forward")
    rows = [("fp32 (6, 48)", "kernel")]
    cases = [("float64 (6, 48)", x.double()), ("fp32 (6, 48) on the CPU" if common.HAS_GPU else
                                                "bfloat16 (6, 48)", x.cpu() if common.HAS_GPU else x.bfloat16())]
    for label, inp in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = norm(inp)
            norm(inp)  # a second call: no second warning
        ours = [w for w in caught if "TritonLayerNorm falls back" in str(w.message)]
        ref = layer_norm_reference(inp.double(), norm.weight.double().to(inp.device), norm.bias.double().to(inp.device))
        common.assert_close(out, ref, name=f"TritonLayerNorm fallback {label}")
        rows.append((label, f"fallback: {norm.fallback_reason(inp)}; warned {len(ours)} time(s) in 2 calls"))
    for label, bad in (("a list", [1.0] * 48), ("int64 (6, 48)", torch.ones(6, 48, dtype=torch.int64)),
                       ("fp32 (6, 47)", common.randn(6, 47))):
        try:
            norm(bad)
            rows.append((label, "no error (wrong!)"))
        except (TypeError, ValueError) as err:
            rows.append((label, f"{type(err).__name__}: {err}"))
    model = nn.Sequential(nn.Linear(48, 48), nn.LayerNorm(48), nn.GELU(), nn.LayerNorm(48)).to(common.DEVICE)
    before = model(x)
    swapped = swap_layer_norms(model)
    common.assert_close(model(x), before.double(), name="a model after swap_layer_norms", atol=1e-4, rtol=1e-4)
    rows.append(("nn.Sequential with 2 nn.LayerNorm", f"swap_layer_norms replaced {swapped}, same output"))
    return rows


def _dpo_case(n_pairs, t_c, t_r, n_vocab, dtype, scale=3.0, shift=0.0):
    """Random logits, targets (prompt tokens carry -100) and masks with a prompt and padding."""
    def side(t):
        logits = common.randn(n_pairs, t, n_vocab, dtype=dtype, scale=scale) + shift
        targets = torch.randint(0, n_vocab, (n_pairs, t), device=common.DEVICE)
        mask = torch.ones(n_pairs, t, dtype=torch.bool, device=common.DEVICE)
        prompt = torch.randint(0, max(1, t - 1), (n_pairs,)).tolist()
        for i, p in enumerate(prompt):
            mask[i, :p] = False  # the prompt: not scored
            if i % 2 and t - p > 2:
                mask[i, -1] = False  # padding at the end of a shorter response
        targets[~mask] = -100
        targets[0, -1] = n_vocab - 1  # the last class: the tail chunk's last column
        mask[0, -1] = True
        return logits, targets, mask
    logits_c, targets_c, mask_c = side(t_c)
    logits_r, targets_r, mask_r = side(t_r)
    ref_c = common.randn(n_pairs, scale=4.0) - 10.0
    ref_r = common.randn(n_pairs, scale=4.0) - 10.0
    return logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r


def _dpo_grad_tolerance(dtype: torch.dtype) -> dict:
    # dlogits = coef * (onehot - p), compared after dividing by coef's scale beta / B: entries of
    # order p (most far below 1/V); the atol sees errors in probabilities near 1/V.
    return {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float16: dict(atol=1e-4, rtol=2e-3),
            torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2)}[dtype]


def check_dpo_once(case, beta: float, name: str) -> None:
    """Loss, sequence log-probs and both logit gradients against float64 autograd."""
    logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r = case
    n_pairs = logits_c.shape[0]
    ref = lambda lc, lr: dpo_loss_reference(lc, lr, targets_c, targets_r, mask_c, mask_r,  # noqa: E731
                                            ref_c.double(), ref_r.double(), beta)
    loss_ref, (gc_ref, gr_ref) = common.grads_float64(ref, (logits_c, logits_r))
    lc, lr = logits_c.detach().clone().requires_grad_(), logits_r.detach().clone().requires_grad_()
    loss, pc, pr = dpo_loss(lc, lr, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r, beta)
    gc, gr = torch.autograd.grad(loss, (lc, lr))
    common.assert_close(loss.detach(), loss_ref, name=f"dpo loss {name}", atol=1e-5, rtol=1e-5)
    common.assert_close(pc, sequence_logps_reference(logits_c.double(), targets_c, mask_c),
                        name=f"dpo chosen log-probs {name}", atol=1e-3, rtol=1e-5)
    common.assert_close(pr, sequence_logps_reference(logits_r.double(), targets_r, mask_r),
                        name=f"dpo rejected log-probs {name}", atol=1e-3, rtol=1e-5)
    unit = n_pairs / beta
    tol = _dpo_grad_tolerance(logits_c.dtype)
    # An fp32 logsumexp of logits of size L is off by a few L * eps, and p = exp(x - lse) inherits
    # that error; at the target, 1 - p cancels when p is near 1 (large logits): the absolute error
    # stays, the relative one does not. Seen on H200 with logits of scale 30: 3.6e-6 at p = 1 - 3.4e-5.
    largest = max(float(logits_c.abs().max()), float(logits_r.abs().max()))
    tol["atol"] += 2 * torch.finfo(torch.float32).eps * largest
    common.assert_close(gc * unit, gc_ref * unit, name=f"dpo dlogits chosen x B/beta {name}", **tol)
    common.assert_close(gr * unit, gr_ref * unit, name=f"dpo dlogits rejected x B/beta {name}", **tol)


def check_dpo(quick: bool) -> list:
    vocabs = common.awkward_sizes(1 if quick or common.INTERPRETER else 2, lo=100,
                                  hi=600 if common.INTERPRETER else 40_000, include=(17,))
    for dtype in _dtypes(quick):
        for n_vocab in vocabs:
            n_pairs = int(torch.randint(2, 5 if common.INTERPRETER else 9, ()).item())
            t_c, t_r = (int(t) for t in torch.randint(2, 9 if common.INTERPRETER else 40, (2,)))
            case = _dpo_case(n_pairs, t_c, t_r, n_vocab, dtype)
            check_dpo_once(case, 0.1, f"B={n_pairs} Tc={t_c} Tr={t_r} V={n_vocab} {dtype}")
            # Poisoned outputs: every token of the (S, T) arrays must be written, nothing past them.
            logits, targets, mask = case[0], case[2], case[4]
            out = common.poisoned_empty(n_pairs, t_c)
            lse = common.poisoned_empty(n_pairs, t_c)
            token_logps(logits, targets, mask, out=out, lse=lse)
            logp = torch.log_softmax(logits.double(), -1).gather(-1, torch.where(mask, targets, 0)[..., None])[..., 0]
            common.assert_close(out, logp * mask, name=f"token_logps (poisoned out) V={n_vocab} {dtype}",
                                atol=1e-3 if dtype != torch.float32 else 1e-5)
            check_guards(lse, "token_logps lse")
            grad = common.poisoned_empty(*logits.shape, dtype=dtype)
            coef = common.randn(n_pairs)
            dpo_grad(logits, targets, mask.float(), lse, coef, out=grad)
            p = torch.softmax(logits.double(), -1)
            onehot = F.one_hot(torch.where(mask, targets, 0), n_vocab).double()
            want = coef.double()[:, None, None] * mask.double()[..., None] * (onehot - p)
            common.assert_close(grad, want, name=f"dpo_grad (poisoned out) V={n_vocab} {dtype}",
                                **_dpo_grad_tolerance(dtype))
    shifted = _dpo_case(3, 5, 4, 300, torch.float32, shift=100.0)  # exp(100) overflows fp32
    check_dpo_once(shifted, 0.1, "logits shifted by +100")
    strong = _dpo_case(3, 5, 4, 50, torch.float32, scale=30.0)  # |delta| far past where sigmoid saturates
    check_dpo_once(strong, 5.0, "beta 5, logits of scale 30")
    print(f"dpo_loss forward, chosen / rejected log-probs and both dlogits match float64 autograd for V in "
          f"{vocabs} (prompt and padding masked, Tc != Tr, shift +100, saturated sigmoid): OK")
    return vocabs


def _grpo_case(n_prompts, group_size, n_tokens, n_vocab, dtype, eps=0.2, scale=3.0, shift=0.0, binary=True):
    """GRPO inputs: random logits; targets (-100 off the completion) and masks with a prompt and
    padding; old and reference log-probs near the policy's own, so that ratios fall inside and
    outside [1 - eps, 1 + eps] for advantages of both signs; rewards 0 / 1 (or normal) per completion,
    the first group all 1 (advantage 0: only the KL term moves it)."""
    n_seqs = n_prompts * group_size
    logits = common.randn(n_seqs, n_tokens, n_vocab, dtype=dtype, scale=scale) + shift
    targets = torch.randint(0, n_vocab, (n_seqs, n_tokens), device=common.DEVICE)
    mask = torch.ones(n_seqs, n_tokens, dtype=torch.bool, device=common.DEVICE)
    for i, p in enumerate(torch.randint(0, max(1, n_tokens - 1), (n_seqs,)).tolist()):
        mask[i, :p] = False  # the prompt
        if i % 2 and n_tokens - p > 2:
            mask[i, -1] = False  # padding after a shorter completion
    mask[group_size:group_size + 2, -2:] = True  # prompt 1's first two completions: both clipped branches
    targets[~mask] = -100
    targets[0, -1] = n_vocab - 1  # the last class: the tail chunk's last column
    mask[0, -1] = True
    rewards = ((torch.rand(n_seqs) < 0.5).float() if binary else torch.randn(n_seqs)).to(common.DEVICE)
    rewards[:group_size] = 1.0  # every completion of prompt 0 right: all advantages exactly 0
    rewards[group_size], rewards[group_size + 1] = 1.0, 0.0  # prompt 1: one better, one worse
    logp = torch.log_softmax(logits.double(), -1).gather(-1, torch.where(mask, targets, 0)[..., None])[..., 0]
    log_ratio = common.randn(n_seqs, n_tokens, dtype=torch.float64, scale=0.3)
    # ratio = exp(log_ratio). Prompt 1's completion 0 has A > 0, its completion 1 A < 0: their last
    # tokens are clipped (ratio 1.82 with A > 0, 0.55 with A < 0), the tokens before on the far side.
    log_ratio[group_size:group_size + 2, -1] = torch.tensor([0.6, -0.6], dtype=torch.float64)
    log_ratio[group_size:group_size + 2, -2] = torch.tensor([-0.6, 0.6], dtype=torch.float64)
    # Keep the ratios away from the clip edges, where fp32 and float64 may take different branches.
    for edge in (math.log(1 - eps), math.log(1 + eps)):
        log_ratio[(log_ratio - edge).abs() < 1e-3] += 1e-2
    junk = common.randn(n_seqs, n_tokens, scale=0.5) - 3.0  # off the completion: never read
    old_logps = torch.where(mask, (logp - log_ratio).float(), junk)
    ref_logps = torch.where(mask, (logp + common.randn(n_seqs, n_tokens, dtype=torch.float64, scale=0.3)).float(),
                            junk)
    return logits, targets, mask, old_logps, ref_logps, rewards, group_size


def grpo_branches(case, eps: float) -> dict:
    """Completion tokens per branch of the clipped surrogate, for the case's float64 values."""
    logits, targets, mask, old_logps, _, rewards, group_size = case
    logp = torch.log_softmax(logits.double(), -1).gather(-1, torch.where(mask, targets, 0)[..., None])[..., 0]
    ratio = torch.exp(logp - old_logps.double())
    adv = grpo_advantages(rewards.double(), group_size)[:, None].expand_as(ratio)
    return {"A > 0, ratio > 1 + eps (clipped)": int((mask & (adv > 0) & (ratio > 1 + eps)).sum()),
            "A < 0, ratio < 1 - eps (clipped)": int((mask & (adv < 0) & (ratio < 1 - eps)).sum()),
            "A != 0, unclipped": int((mask & (adv != 0)).sum()) - int((mask & (adv > 0) & (ratio > 1 + eps)).sum())
            - int((mask & (adv < 0) & (ratio < 1 - eps)).sum()),
            "A = 0 (KL only)": int((mask & (adv == 0)).sum())}


def check_grpo_once(case, eps: float, beta: float, name: str) -> None:
    """Loss, per-token log-probs and dlogits (through autograd, with grad_output 2.5, and into
    poisoned buffers) against float64 autograd of grpo_loss_reference; the no-grad loss."""
    logits, targets, mask, old_logps, ref_logps, rewards, group_size = case
    ref = lambda lg: grpo_loss_reference(lg, targets, mask, old_logps.double(), ref_logps.double(),  # noqa: E731
                                         rewards.double(), group_size, eps, beta)
    loss_ref, (grad_ref,) = common.grads_float64(ref, (logits,))
    logp_ref = torch.log_softmax(logits.double(), -1).gather(-1, torch.where(mask, targets, 0)[..., None])[..., 0]
    x = logits.detach().clone().requires_grad_()
    loss, logp = grpo_loss(x, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta)
    (grad,) = torch.autograd.grad(loss, x, torch.tensor(2.5, device=common.DEVICE))
    common.assert_close(loss.detach(), loss_ref, name=f"grpo loss {name}", atol=1e-5, rtol=1e-5)
    common.assert_close(logp, logp_ref * mask, name=f"grpo log-probs {name}", atol=1e-4, rtol=1e-5)
    # dlogits = weight * d loss / d logp * (onehot - p): compared after multiplying by B * T, so that
    # the tolerance is for entries of order ratio * A * p.
    unit = logits.shape[0] * logits.shape[1]
    tol = _dpo_grad_tolerance(logits.dtype)
    tol["atol"] += 2 * torch.finfo(torch.float32).eps * float(logits.abs().max())  # see check_dpo_once
    common.assert_close(grad * (unit / 2.5), grad_ref * unit, name=f"grpo dlogits x B*T {name}", **tol)
    with torch.no_grad():  # the loss alone (WRITE_GRAD=False): one pass, no gradient buffer
        common.assert_close(grpo_loss(logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps,
                                      beta)[0], loss_ref, name=f"grpo loss under no_grad {name}", atol=1e-5,
                            rtol=1e-5)
    # Poisoned outputs: every token of the (B, T) arrays and every row of the gradient is written.
    n_seqs, n_tokens = mask.shape
    args = _check_grpo_args(logits, targets, mask, old_logps, ref_logps, rewards, group_size, eps, beta)
    adv = grpo_advantages(rewards.float(), group_size).contiguous()
    out_loss, out_logp = common.poisoned_empty(n_seqs, n_tokens), common.poisoned_empty(n_seqs, n_tokens)
    out_grad = common.poisoned_empty(*logits.shape, dtype=logits.dtype)
    grpo_token_loss(logits, *args[:4], adv, 1.0 / (args[4] * n_seqs), eps, beta, loss=out_loss, logp=out_logp,
                    grad=out_grad)
    common.assert_close(out_logp, logp_ref * mask, name=f"grpo logp (poisoned out) {name}", atol=1e-4, rtol=1e-5)
    common.assert_close(out_loss.sum(), loss_ref, name=f"grpo loss (poisoned out) {name}", atol=1e-5, rtol=1e-5)
    check_guards(out_loss, "grpo per-token loss")
    common.assert_close(out_grad * unit, grad_ref * unit, name=f"grpo dlogits (poisoned out) {name}", **tol)


def check_grpo(quick: bool) -> list:
    vocabs = common.awkward_sizes(1 if quick or common.INTERPRETER else 2, lo=100,
                                  hi=600 if common.INTERPRETER else 40_000, include=(17,))
    branches: dict = {}
    for dtype in _dtypes(quick):
        for n_vocab in vocabs:
            group_size = int(torch.randint(2, 5 if common.INTERPRETER else 9, ()).item())
            n_prompts = int(torch.randint(2, 4 if common.INTERPRETER else 5, ()).item())
            n_tokens = 2 * int(torch.randint(1, 4 if common.INTERPRETER else 20, ()).item()) + 1  # odd
            case = _grpo_case(n_prompts, group_size, n_tokens, n_vocab, dtype)
            for what, count in grpo_branches(case, 0.2).items():
                branches[what] = branches.get(what, 0) + count
            check_grpo_once(case, 0.2, 0.04, f"{n_prompts} prompts x G={group_size} T={n_tokens} V={n_vocab} "
                                             f"{dtype}")
    check_grpo_once(_grpo_case(2, 3, 5, 300, torch.float32, shift=100.0), 0.2, 0.04, "logits shifted by +100")
    check_grpo_once(_grpo_case(3, 2, 7, 50, torch.float32, eps=0.1, binary=False), 0.1, 0.5,
                    "eps 0.1, beta 0.5, normal rewards")
    missing = [what for what, count in branches.items() if count == 0]
    if missing:
        raise AssertionError(f"the GRPO checks never reached {missing}: _grpo_case must make every branch")
    print(f"grpo_loss forward, per-token log-probs and dlogits match float64 autograd for V in {vocabs} (T odd, "
          f"prompt and padding masked, shift +100); completion tokens per branch: "
          + ", ".join(f"{what} {count}" for what, count in branches.items()) + ": OK")
    return vocabs


def check(quick: bool) -> None:
    section("Check: the registered op, the module, and the DPO and GRPO kernels against float64")
    print(f"op kind here: {OP_KIND} (namespace {NAMESPACE})")
    check_layer_norm_op(quick)
    start = time.perf_counter()
    results = run_opcheck()
    for op, tests in results.items():
        print(f"torch.library.opcheck({NAMESPACE}::{op}): " + ", ".join(f"{k} {v}" for k, v in tests.items())
              + f"  ({time.perf_counter() - start:.1f} s)")
    check_compile()
    print("TritonLayerNorm(48), what each input gets:")
    for what, result in check_module():
        print(f"  {what:<34} -> {result}")
    check_dpo(quick)
    check_grpo(quick)
    if not common.supports_bf16():
        print("bfloat16: skipped, the interpreter has no bfloat16 (numpy lacks it); runs on a GPU")


# %% [markdown]
# ## Several GPUs
# world_size = 2 processes, each holding half of the MLP's hidden units. The bar: the result
# equals the single-process result (same seed, same weights) to fp32 rounding.


# %%
def tensor_parallel(quick: bool) -> None:
    section("Several GPUs: tensor-parallel GeGLU MLP, tp=2 vs tp=1")
    runs = []
    if common.HAS_GPU and torch.cuda.device_count() >= 2:
        runs.append(("nccl", dict(tokens=257, dim=1024, hidden=4096)))
    elif common.HAS_GPU:
        print(f"NCCL over two GPUs needs two GPUs; this machine has {torch.cuda.device_count()}. Running the "
              f"same code with gloo on the CPU (Triton in its interpreter) so the logic is still shown.")
    if not runs or not quick:
        runs.append(("gloo", dict(tokens=5, dim=24, hidden=40)))
    table = Table("tensor-parallel MLP: max |difference| / max |tp=1 output|",
                  ["backend", "ranks", "tokens x dim x hidden", "tp=2 vs tp=1", "tp=2 vs float64", "tp=1 vs float64",
                   "time"])
    for backend, sizes in runs:
        start = time.perf_counter()
        r = run_tensor_parallel(backend, **sizes)
        table.add(backend + (" (CPU)" if backend == "gloo" else " (2 GPUs)"), r["world_size"],
                  " x ".join(map(str, r["shape"])), f"{r['tp_vs_one']:.2e}", f"{r['tp_vs_fp64']:.2e}",
                  f"{r['one_vs_fp64']:.2e}", f"{time.perf_counter() - start:.1f} s")
        runs[runs.index((backend, sizes))] = (backend, r)
    table.print()
    print("Both sides are fp32: the all_reduce adds two partial sums of the down projection, so tp=2 and tp=1 "
          "round differently, by about fp32's epsilon (1.2e-7) times the output, no more. time: process start, "
          "imports and the run.")
    for backend, r in runs:
        common.perf_bar(f"tensor-parallel MLP {' x '.join(map(str, r['shape']))} fp32, tp=2 ({backend}) matches "
                        f"tp=1: max |difference| / max |output|", r["tp_vs_one"] * 1e6, 10, "ppm",
                        higher_is_better=False)


# %% [markdown]
# ## Benchmark
# Declared for common.Benchmark (timings on a GPU): a decode step at batch 1, eager launches against
# the CUDA-graph replay of the same kernels (host wall time, which is what the graph saves); two
# independent steps on one stream vs two; the DPO and GRPO losses against their eager references and
# torch.compile.

# %%
DECODE_DIM, DECODE_HIDDEN = 1024, 2816


class DecodeSteps:
    """The decode benchmarks' input: two stacks (seeds 1 and 2) with their static inputs, and three
    CUDA graphs captured once: one step, two steps on one stream, two steps on two streams."""

    def __init__(self, layers: int):
        self.a = DecodeStack(DECODE_DIM, DECODE_HIDDEN, layers, seed=1)
        self.b = DecodeStack(DECODE_DIM, DECODE_HIDDEN, layers, seed=2)
        self.x_a, self.x_b = (torch.randn(1, DECODE_DIM, device="cuda", dtype=torch.float16) for _ in range(2))
        self.side = torch.cuda.Stream()
        self.graph, out = capture_cuda_graph(self.step)
        for trial in range(2):  # a replay must follow its new input (copied into the static one)
            self.x_a.copy_(torch.randn_like(self.x_a))
            self.graph.replay()
            common.assert_close(out.clone(), self.step().double(), name=f"graph replay {trial}", atol=1e-2, rtol=1e-2)
        self.serial, _ = capture_cuda_graph(self.two_steps)
        self.parallel, _ = capture_cuda_graph(self.two_streams)

    def step(self):
        return self.a(self.x_a)

    def two_steps(self):
        return self.a(self.x_a), self.b(self.x_b)

    def two_streams(self):
        self.side.wait_stream(torch.cuda.current_stream())  # fork: the side stream starts after the inputs
        out_a = self.a(self.x_a)
        with torch.cuda.stream(self.side):
            out_b = self.b(self.x_b)
        torch.cuda.current_stream().wait_stream(self.side)  # join: the step ends when both have
        return out_a, out_b


def _dpo_inputs(n_pairs: int, n_tokens: int, n_vocab: int) -> tuple:
    """dpo_loss's arguments: the logits are the leaves of the backward; the first eighth of every
    sequence is prompt (masked out, never read by the kernels)."""
    dtype = torch.bfloat16 if common.supports_bf16() else torch.float32  # the interpreter has no bfloat16
    logits_c, logits_r = (torch.randn(n_pairs, n_tokens, n_vocab, device=common.DEVICE, dtype=dtype,
                                      requires_grad=True) for _ in range(2))
    targets_c, targets_r = (torch.randint(0, n_vocab, (n_pairs, n_tokens), device=common.DEVICE) for _ in range(2))
    mask = torch.ones(n_pairs, n_tokens, dtype=torch.bool, device=common.DEVICE)
    mask[:, :n_tokens // 8] = False
    ref_c, ref_r = (torch.randn(n_pairs, device=common.DEVICE) - 300.0 for _ in range(2))
    return logits_c, logits_r, targets_c, targets_r, mask, mask, ref_c, ref_r, 0.1


def _dpo_bytes(logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, *_) -> int:
    # The minimum: read the response rows of both logits once, write both gradients (every row) once.
    return sum(lg.element_size() * lg.shape[-1] * (int(m.sum()) + m.numel())
               for lg, m in ((logits_c, mask_c), (logits_r, mask_r)))


def _grpo_inputs(n_seqs: int, n_tokens: int, n_vocab: int) -> tuple:
    """grpo_loss's arguments: GRPO_GROUP completions per prompt, the first eighth of every sequence
    prompt; old and reference log-probs within about 0.1 of the policy's, binary rewards."""
    dtype = torch.bfloat16 if common.supports_bf16() else torch.float32
    logits = torch.randn(n_seqs, n_tokens, n_vocab, device=common.DEVICE, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, n_vocab, (n_seqs, n_tokens), device=common.DEVICE)
    mask = torch.ones(n_seqs, n_tokens, dtype=torch.bool, device=common.DEVICE)
    mask[:, :n_tokens // 8] = False
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    old_logps, ref_logps = (logp + 0.1 * torch.randn_like(logp) for _ in range(2))
    rewards = (torch.rand(n_seqs, device=common.DEVICE) < 0.5).float()
    return logits, targets, mask, old_logps, ref_logps, rewards, GRPO_GROUP, 0.2, 0.04


def _grpo_bytes(logits, targets, mask, old_logps, ref_logps, rewards, *_) -> int:
    # The minimum: the completion rows of the logits read once, the gradient (every row) written
    # once, the per-token inputs read once.
    return (logits.element_size() * logits.shape[-1] * (int(mask.sum()) + mask.numel())
            + common.min_bytes(targets, mask, old_logps, ref_logps, rewards))


DECODE = "decode step at batch 1 (dim 1024, hidden 2816, fp16): host wall time per step"
DECODE_PAIR = "two independent decode steps at batch 1 (fp16): one stream vs two, host wall time per pair"
DPO_BAR = (8, 512, 32000)
GRPO_GROUP = 4  # completions per prompt in the GRPO benchmark: B = 16 is 4 prompts
# CUDA graphs and streams need a GPU: the decode benchmarks have nothing to run in the interpreter.
BENCHMARKS = [
    common.Benchmark(
        DECODE, op="decode_step", cases=[1, 2, 4, 8], quick_cases=[4], setup=lambda layers: (DecodeSteps(layers),),
        kernels={"CUDA graph replay": lambda s: s.graph.replay()}, reference=lambda s: s.step(), timer="wall",
        label=lambda layers: f"{layers} layers",
        bars=[common.Bar("CUDA graph replay", 8, "baseline", 2.0)],
        note="Per layer: TritonLayerNorm, two GEMVs, GeGLU, a GEMV, the residual add. Tiny tensors: what a step "
             "costs is the launches, which the graph issues with one call."),
    common.Benchmark(
        DECODE_PAIR, op="decode_step", cases=[8], quick_cases=[4], setup=lambda layers: (DecodeSteps(layers),),
        kernels={"eager, 2 streams": lambda s: s.two_streams(), "CUDA graph, 1 stream": lambda s: s.serial.replay(),
                 "CUDA graph, 2 streams": lambda s: s.parallel.replay()},
        reference=lambda s: s.two_steps(), timer="wall", label=lambda layers: f"{layers} layers",
        note="torch eager: both steps on one stream. Batch-1 kernels leave most SMs idle, so two independent "
             "ones can run side by side; once the graph removes the launch cost, that shows."),
    common.Benchmark(
        "DPO loss forward + backward, bf16: pairs x tokens x vocabulary", op="dpo_loss",
        cases=[(4, 256, 32000), DPO_BAR], quick_cases=[(4, 256, 32000)], cpu_cases=[(2, 8, 64)],
        setup=_dpo_inputs, kernels={"triton DPOLossFunction": lambda *args: dpo_loss(*args)[0]},
        reference=dpo_loss_reference, grad="fwd+bwd", nbytes=_dpo_bytes, ceiling="copy", dtype=torch.bfloat16,
        memory=True, bars=[common.Bar("triton DPOLossFunction", DPO_BAR, "baseline", 1.0)],
        note="GB/s of the minimum bytes: the response rows of both logits read once, both gradients (every row) "
             "written once. Peak extra memory includes the two gradients every provider returns."),
    common.Benchmark(  # raced against the lesson's reference, eager and under torch.compile
        "GRPO loss forward + backward, bf16: completions x tokens x vocabulary", op="grpo_loss",
        cases=[(8, 256, 32000), (16, 512, 32000)], quick_cases=[(8, 256, 32000)], cpu_cases=[(4, 7, 50)],
        setup=_grpo_inputs, kernels={"triton GRPOLossFunction": lambda *args: grpo_loss(*args)[0]},
        reference=grpo_loss_reference, grad="fwd+bwd", nbytes=_grpo_bytes, ceiling="copy", dtype=torch.bfloat16,
        memory=True,
        note="GB/s of the minimum bytes: the completion rows of the logits read once, the gradient (every row) "
             "written once. The Triton forward reads each completion row twice (logsumexp, then the gradient "
             "pass, mostly from L2) and the backward scales the gradient in place (one more read and write of "
             "it). Peak extra memory includes the gradient every provider returns."),
]


def profile_decode(layers: int) -> int | None:
    """torch.profiler's kernel table of one eager decode step; the kernels it launches."""
    stack = DecodeStack(DECODE_DIM, DECODE_HIDDEN, layers, seed=1)
    x = torch.randn(1, DECODE_DIM, device="cuda", dtype=torch.float16)
    section("Profile: torch.profiler, one decode step")
    profile_step(lambda: stack(x), f"one eager decode step ({layers} layers, batch 1)")
    return common.gpu_kernel_count(lambda: stack(x))


def profile_benchmarks(results: dict, quick: bool) -> None:
    """What the graph saved per launch and two streams per pair, then the profiler on the DPO loss."""
    res, pair = results[DECODE][-1], results[DECODE_PAIR][-1]
    launches = profile_decode(res.case)
    saved = 1e3 * (res.times[EAGER].ms - res.times["CUDA graph replay"].ms)
    print(f"launch overhead the graph saved at {res.label}: {saved:.1f} us per step" + (
        f", {saved / launches:.2f} us per kernel launch ({launches} kernels per step, counted by the profiler)"
        if launches else ""))
    overlap = 1e3 * (pair.times["CUDA graph, 1 stream"].ms - pair.times["CUDA graph, 2 streams"].ms)
    print(f"two streams inside the graph: {overlap:.1f} us less per pair of steps than one stream.")
    print("Measured DRAM bytes per kernel (Nsight Compute): python lessons/expert/12_production.py --profile")
    inputs = _dpo_inputs(*((4, 256, 32000) if quick else DPO_BAR))
    profile_step(lambda: torch.autograd.grad(dpo_loss(*inputs)[0], inputs[:2]),
                 "the Triton DPO loss, forward + backward")


def profile_step(fn, title: str) -> None:
    """torch.profiler's view of one call: every GPU kernel with its count and time, and CPU vs GPU."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    issue = []
    for _ in range(20):  # outside the profiler, which slows the CPU side down many times
        start = time.perf_counter()
        fn()  # returns once every launch is queued: the CPU's share of the step
        issue.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
    cpu_us = statistics.median(issue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Profiler clears events at the end of each cycle": one cycle here
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
    table = Table(f"torch.profiler: GPU kernels of {title}", ["kernel", "calls", "GPU us total", "us per call"])
    for name, (calls, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        table.add(name if len(name) <= 70 else name[:67] + "...", calls, us, us / calls)
    table.print()
    gpu_us = sum(us for _, us in kernels.values())
    print(f"{sum(c for c, _ in kernels.values())} kernels, {gpu_us:.1f} us of GPU time; the CPU takes "
          f"{cpu_us:.1f} us to issue them (median of 20 calls, without the profiler). When the CPU time is the "
          f"larger, launches set the pace.")


def ncu_dram_bytes() -> None:
    """Nsight Compute measures the DRAM bytes of the LayerNorm and GeGLU kernels in a child process."""
    section("Profile: Nsight Compute, measured DRAM bytes vs the modelled minimum")
    print("running: ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum python 12_production.py --ncu-target")
    measured, problem, child_out = common.ncu_counters(
        ["dram__bytes_read.sum", "dram__bytes_write.sum"], "layernorm_fwd_kernel|geglu_fwd_kernel",
        [sys.executable, LESSON_SCRIPT, "--ncu-target"], launch_count=2)
    if problem:
        print(problem + ("" if shutil.which("ncu") else "; the torch.profiler view above is what this run can show."))
        return
    modelled = {}
    for line in child_out.splitlines():
        if line.startswith("@@min "):
            _, kernel, read, write, what = line.split(" ", 4)
            modelled[kernel] = (int(read), int(write), what)
    table = Table("DRAM traffic: Nsight Compute's counters vs common.min_bytes (each tensor moved once)",
                  ["kernel", "tensors", "modelled read", "measured read", "read ratio", "modelled write",
                   "measured write", "write ratio"])
    for kernel, (min_read, min_write, what) in modelled.items():
        got = measured.get(kernel, {})
        read, write = got.get("dram__bytes_read.sum", float("nan")), got.get("dram__bytes_write.sum", float("nan"))
        table.add(kernel, what, fmt_bytes(min_read), fmt_bytes(read), read / min_read, fmt_bytes(min_write),
                  fmt_bytes(write), write / min_write)
    table.print()
    l2 = torch.cuda.get_device_properties(common.DEVICE).L2_cache_size
    print(f"ncu flushes the caches before each measured kernel (--cache-control all), so every byte read comes "
          f"from DRAM: a read ratio near 1.00 says each input byte is read once, as the model assumes. Writes go "
          f"to L2 first; what is still in L2 ({fmt_bytes(l2)} here) when the kernel ends reaches DRAM later and "
          f"is not counted, so measured writes can fall short of the model by up to the L2 size.")


def _ncu_target() -> None:
    """The child ncu profiles: each kernel launched once on tensors far larger than L2."""
    m, n = 8192, 4096
    x = torch.randn(m, n, device="cuda", dtype=torch.float16)
    w = torch.randn(n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, device="cuda", dtype=torch.float16)
    y, mean, rstd = layer_norm_fwd_op(x, w, b, 1e-5)
    print(f"@@min layernorm_fwd_kernel {common.min_bytes(x, w, b)} {common.min_bytes(y, mean, rstd)} "
          f"{m}x{n} fp16: read x, w, b; write y, mean, rstd", flush=True)
    a, g = torch.randn(2**25, device="cuda", dtype=torch.float16), torch.randn(2**25, device="cuda", dtype=torch.float16)
    h = L08.geglu_forward(a, g)
    print(f"@@min geglu_fwd_kernel {common.min_bytes(a, g)} {common.min_bytes(h)} 2^25 fp16: read a, b; write h",
          flush=True)
    torch.cuda.synchronize()


def profile(quick: bool) -> None:
    """What --profile (make profile LESSON=12) runs: the profiler table, then Nsight Compute."""
    if not common.HAS_GPU:
        section("Profile: torch.profiler, one decode step")
        print(common.require_gpu("torch.profiler kernel times"))
        print("Nsight Compute (ncu) " + ("is on PATH" if shutil.which("ncu") else "is not on PATH")
              + "; measured DRAM bytes need a CUDA GPU too.")
        return
    profile_decode(4 if quick else 8)
    ncu_dram_bytes()


# %% [markdown]
# ## Capstone: tuning a tiny model from its own samples
# Rounds of iterative DPO on a GPU (two in the interpreter). Round 0 is the untrained policy: its
# samples score about 0.5 (random tokens), its KL to the reference is 0 and every held-out margin
# is exactly 0. Each round the reward of fresh samples should rise, the held-out preference
# accuracy with it, and the KL to the reference grows: the price DPO's beta charges for moving.


# %%
def capstone(quick: bool) -> None:
    if common.INTERPRETER:
        sizes = dict(rounds=2, prompts_per_round=16, steps=8, batch=16, n_eval=16, vocab=16, dim=16, hidden=32,
                     lr=2e-2)
    else:
        sizes = dict(rounds=4 if quick else 8, prompts_per_round=1024, steps=40, batch=128, n_eval=512, vocab=64,
                     dim=64, hidden=128, lr=1e-3)
    section(f"Capstone: iterative DPO from the policy's own samples, {sizes['rounds']} rounds of "
            f"{sizes['prompts_per_round']} prompts x 2 samples, {sizes['steps']} steps each, vocabulary {sizes['vocab']}")
    start = time.perf_counter()
    history = tune_from_feedback(**sizes)
    took = time.perf_counter() - start
    table = Table("Iterative DPO: per round, on held-out prompts",
                  ["round", "pairs trained (ties dropped)", "mean DPO loss", "reward of samples",
                   "held-out preference accuracy", "KL to reference (nats / response)"])
    for row in zip(*(history[k] for k in ("round", "pairs", "ties", "loss", "reward", "accuracy", "kl"))):
        round_, pairs, ties, loss, reward, accuracy, kl = row
        table.add(round_, f"{pairs} ({ties})" if round_ else "-", loss, reward, accuracy, kl)
    table.print()
    print(f"reward of the policy's samples: {history['reward'][0]:.3f} before, {history['reward'][-1]:.3f} after "
          f"{sizes['rounds']} rounds (1 = always counting on; random tokens score about 0.5) ({took:.1f} s)")
    print("preference accuracy: held-out pairs (sampled once from the initial policy, ranked by the rule) whose "
          "reward margin beta * ((pc - rc) - (pr - rr)) is > 0; 0 at round 0, where policy = reference.")
    fig, ax = common.new_figure("Iterative DPO on a tiny bigram LM: reward of its samples over rounds", "round",
                                "reward / preference accuracy")
    ax.plot(history["round"], history["reward"], marker="o", label="reward of sampled responses", color="tab:blue")
    ax.plot(history["round"], history["accuracy"], marker="s", label="held-out preference accuracy",
            color="tab:orange")
    ax2 = ax.twinx()
    ax2.plot(history["round"], history["kl"], marker="^", label="KL to reference", color="tab:green")
    ax2.set_ylabel("KL to reference (nats per response)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    common.save_plot(fig, "12_production_dpo")


# %% [markdown]
# ## Takeaways
# - A kernel becomes an operator with torch.library: a schema, a fake implementation (or a
#   traceable body with triton_op), register_autograd. opcheck proves the registration, and
#   torch.compile(fullgraph=True) proves nothing breaks the graph.
# - Wrap it in an nn.Module that raises clear errors for impossible input and falls back (with
#   one warning) where the kernel does not apply.
# - At batch 1, launches cost more than the kernels: CUDA graphs replay them in one call; streams
#   let independent small kernels share the GPU. Measure both, with wall clock.
# - Profile before optimising: torch.profiler for the kernels of a step, Nsight Compute for the
#   bytes a kernel really moves against the model.
# - Tensor parallelism: column-parallel, then row-parallel, one all_reduce; check it against one
#   process to rounding.
# - A preference loss is a cross-entropy in disguise: the same online logsumexp, the gradient
#   onehot - softmax, scaled per sequence by the pair's sigmoid.
# - When every token's coefficient is known as soon as its row is read (GRPO), the forward kernel
#   writes the gradient too: one launch, no fp32 softmax kept, a backward that only scales.


# %%
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", action="store_true",
                        help="only profile: torch.profiler's kernel table of a decode step, then Nsight Compute "
                             "(ncu) DRAM bytes of the LayerNorm and GeGLU kernels (what `make profile` runs)")
    parser.add_argument("--tp-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ncu-target", action="store_true", help=argparse.SUPPRESS)


if __name__ == "__main__":
    if "--tp-worker" in sys.argv or "--ncu-target" in sys.argv:  # child processes: no banner, no lesson
        hidden = argparse.ArgumentParser()
        _add_arguments(hidden)
        child = hidden.parse_known_args()[0]
        _tp_worker(child.tp_worker) if child.tp_worker else _ncu_target()
        sys.exit(0)
    args = common.lesson_args(__doc__.strip().splitlines()[0], add_arguments=_add_arguments)
    started = time.perf_counter()
    if args.profile:
        profile(args.quick)
        sys.exit(0)
    check(args.quick)
    print(f"\n(checks done at {time.perf_counter() - started:.1f} s)")
    tensor_parallel(args.quick)
    print(f"(tensor parallel done at {time.perf_counter() - started:.1f} s)")
    results = common.run_benchmarks(BENCHMARKS, args.quick)
    if common.HAS_GPU:
        profile_benchmarks(results, args.quick)
    print(f"(benchmarks done at {time.perf_counter() - started:.1f} s)")
    capstone(args.quick)
    print(f"\n(done at {time.perf_counter() - started:.1f} s)")
