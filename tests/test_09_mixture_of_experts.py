"""Lesson 09 (mixture of experts): the exercise checks, the grader's own tests, and the lesson's kernels.

IMPL=exercises (default) grades exercises/09_mixture_of_experts.py; IMPL=solutions grades the answers.
"""

import random

import pytest
import torch
import triton
import triton.language as tl

import common
from common import CheckError, assert_close, poisoned_empty, randn
from common.checks import PoisonedAllocations
from common.grading import Exercise, expect_rejected, lesson_tests, load_impl, solution_with, with_flags
from common.lessons import lesson_module

STEM = "09_mixture_of_experts"
GEMM_DTYPES = [torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


def _ints(*shape, lo, hi):
    return torch.randint(lo, hi, shape, dtype=torch.int32).to(common.DEVICE)


def _routed_ids(n_tokens, n_experts, top_k, skew=0.0):
    """(T, k) int32 ids as a router makes them: k distinct experts per token; skew > 0 loads the last ones."""
    scores = torch.rand(n_tokens, n_experts) + skew * torch.linspace(0, 1, n_experts)
    return scores.topk(top_k, dim=1).indices.to(torch.int32).to(common.DEVICE)


# --------------------------------------------------------------------------- the checks

def _gating_reference(logits, bias, top_k):
    scores = torch.sigmoid(logits.double())
    biased = scores + bias.double()
    ids = biased.topk(top_k, dim=1).indices
    chosen = scores.gather(1, ids)
    return chosen / chosen.sum(dim=1, keepdim=True), ids, scores, biased


def check_topk_sigmoid_gating(gating):
    cases = [(int(torch.randint(2, 400, ())), 8, 2, torch.float32), (int(torch.randint(2, 300, ())), 6, 4, torch.float16),
             (1, 16, 1, torch.float32)]
    for n_tokens, n_experts, top_k, dtype in cases:
        logits = randn(n_tokens, n_experts, dtype=dtype, scale=2.0)
        bias = randn(n_experts, scale=0.5)
        weights = poisoned_empty(n_tokens, top_k)
        ids = poisoned_empty(n_tokens, top_k, dtype=torch.int32)
        result = gating(logits, bias, top_k, weights_out=weights, ids_out=ids)
        if not isinstance(result, tuple) or len(result) != 2:
            raise CheckError("topk_sigmoid_gating must return (weights, ids)")
        w_ref, ids_ref, scores, biased = _gating_reference(logits, bias, top_k)
        name = f"T={n_tokens} E={n_experts} k={top_k} {str(dtype).removeprefix('torch.')}"
        ids_unbiased = scores.topk(top_k, dim=1).indices
        assert_close(ids, ids_ref.to(torch.int32), name=f"ids {name}", mistakes={
            "the bias was not added for the selection: pick the top k of sigmoid(logits) + bias":
                ids_unbiased.to(torch.int32)})
        chosen_biased = biased.gather(1, ids_ref)
        chosen = scores.gather(1, ids_ref)
        assert_close(weights, w_ref, name=f"weights {name}", mistakes={
            "the weights include the bias: the bias only picks the experts; weigh them by sigmoid(logits)":
                chosen_biased / chosen_biased.sum(dim=1, keepdim=True),
            "the weights were not renormalised: divide the k chosen scores by their sum": chosen})


def _dispatch_reference(ids, n_experts, capacity):
    flat = ids.flatten().long().cpu()
    one_hot = torch.nn.functional.one_hot(flat, n_experts)
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # r-th assignment of its expert, from 0
    slot = torch.where(rank < capacity, flat * capacity + rank, -1)
    return slot.view(ids.shape), one_hot.sum(dim=0), rank, flat


def check_capacity_dispatch(dispatch):
    cases = [(int(torch.randint(300, 900, ())), 8, 2, 1.0, 1.5), (int(torch.randint(200, 600, ())), 4, 1, 0.75, 0.0),
             (1, 4, 2, 1.0, 0.0), (50, 4, 2, 0.0, 0.0)]
    for n_tokens, n_experts, top_k, factor, skew in cases:
        ids = _routed_ids(n_tokens, n_experts, top_k, skew)
        capacity = int(factor * n_tokens * top_k / n_experts)
        slot = poisoned_empty(n_tokens, top_k, dtype=torch.int32)
        counts = poisoned_empty(n_experts, dtype=torch.int32)
        result = dispatch(ids, n_experts, capacity, slot_out=slot, counts_out=counts)
        if not isinstance(result, tuple) or len(result) != 2:
            raise CheckError("capacity_dispatch must return (slot, counts)")
        slot_ref, counts_ref, rank, flat = _dispatch_reference(ids, n_experts, capacity)
        name = f"T={n_tokens} k={top_k} E={n_experts} capacity={capacity}"
        shape = ids.shape
        mistakes = {
            "ranks start at 1: the inclusive cumsum counts the assignment itself; subtract 1":
                torch.where(rank + 1 < capacity, flat * capacity + rank + 1, -1).view(shape),
            "nothing was dropped: an assignment whose rank is >= capacity gets slot -1":
                (flat * capacity + rank).view(shape),
        }
        poison = int(poisoned_empty(1, dtype=torch.int32).item())
        mistakes["the dropped assignments were never written: store slot -1 for them too (store where the "
                 "assignment is this expert's, whatever its rank)"] = \
            torch.where(slot_ref == -1, poison, slot_ref).view(shape)
        for block in (32, 64, 128, 256, 512, 1024):
            local = torch.cat([_dispatch_reference(part, n_experts, 10**9)[2]
                               for part in flat.split(block)]) if flat.numel() else rank
            mistakes[f"the running count was not carried from one block to the next (ranks restart every "
                     f"{block} assignments): add each block's hits to it"] = \
                torch.where(local < capacity, flat * capacity + local, -1).view(shape)
        assert_close(slot, slot_ref.to(torch.int32), name=f"slot {name}", mistakes=mistakes)
        assert_close(counts, counts_ref.to(torch.int32), name=f"counts {name}", mistakes={
            "counts leave out the dropped assignments: count every assignment routed to the expert, "
            "dropped ones included": counts_ref.clamp(max=capacity).to(torch.int32)})
    try:
        dispatch(_routed_ids(4, 4, 1), 4, -1)
    except ValueError:
        pass
    else:
        raise CheckError("capacity_dispatch(ids, 4, capacity=-1) returned instead of raising ValueError")


def _grouped_case(n_experts, K, N, dtype, block=16):
    counts = [int(c) for c in torch.randint(1, 3 * block, (n_experts,))]
    counts[1] = 0  # an expert with no rows: no tiles
    counts[-1] = 37  # the last expert ends in a partial tile whatever BLOCK_M is (16, 32, 64, 128)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    x = randn(offsets[-1], K, dtype=dtype)
    w = randn(n_experts, K, N, dtype=dtype, scale=K ** -0.5)
    return counts, offsets, x, w


def _grouped_reference(x, w, offsets, scale, expert_of=None):
    out = torch.empty(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        we = w[expert_of if expert_of is not None else e].double()
        out[lo:hi] = x[lo:hi].double() @ we
    return out * scale.double()[:, None] if scale is not None else out


def check_grouped_matmul(grouped):
    n_experts, K, N = 5, 40, 48
    for dtype in GEMM_DTYPES:
        for with_scale in (True, False):
            counts, offsets, x, w = _grouped_case(n_experts, K, N, dtype)
            scale = randn(x.shape[0]).abs() + 0.5 if with_scale else None
            out = poisoned_empty(x.shape[0], N, dtype=dtype)
            offsets_t = torch.tensor(offsets, dtype=torch.int32, device=common.DEVICE)
            result = grouped(x, w, offsets_t, row_scale=scale, out=out)
            if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
                raise CheckError("grouped_matmul was given out= but returned a different tensor")
            expected = _grouped_reference(x, w, offsets, scale)
            mistakes = {"every row used expert 0's weights: w[e] starts at w_ptr + e * K * N (the tile's "
                        "expert's weights)": _grouped_reference(x, w, offsets, scale, expert_of=0)}
            if scale is not None:
                mistakes["row_scale was not applied: multiply each accumulator row by scale[row]"] = \
                    _grouped_reference(x, w, offsets, None)
            for block in (16, 32, 64, 128):
                floor = expected.clone()
                for e in range(n_experts):
                    full = offsets[e] + counts[e] // block * block
                    floor[full:offsets[e + 1]] = float("nan")
                mistakes[f"each expert's last, partial tile is missing (block_m {block}): the schedule needs "
                         f"cdiv(rows, block_m) tiles per expert, not rows // block_m"] = floor
            assert_close(out, expected, name=f"grouped_matmul {str(dtype).removeprefix('torch.')} counts={counts} "
                                             f"scale={with_scale}", mistakes=mistakes)


def _dw_reference(x, dy, offsets, rows_of=None):
    """(E, K, N) float64: dw[e] = x[rows]^T @ dy[rows], rows = rows_of(e) (default: e's own)."""
    out = []
    for e in range(len(offsets) - 1):
        lo, hi = rows_of(e) if rows_of is not None else (offsets[e], offsets[e + 1])
        out.append(x[lo:hi].double().T @ dy[lo:hi].double())
    return torch.stack(out)


def _dw_case(counts, K, N, dtype, shift=0.0):
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    x = randn(offsets[-1], K, dtype=dtype) + shift
    dy = randn(offsets[-1], N, dtype=dtype) + shift
    return offsets, x, dy


def check_grouped_matmul_dw(grouped_dw):
    for dtype in GEMM_DTYPES:
        small = [int(c) for c in torch.randint(1, 48, (5,))]
        small[1], small[-1] = 0, 37  # an idle expert; the last ends in a partial block whatever BLOCK_M is
        busy = [int(torch.randint(1500, 2000, ())), 5, 0]  # a long reduction: sums near 2000 (shift 1)
        # The square case first: a transposed dw[e] has dw's shape only when K == N.
        for counts, K, N, shift in ((small, 40, 40, 0.0), (small, 40, 48, 0.0), (busy, 40, 48, 1.0)):
            offsets, x, dy = _dw_case(counts, K, N, dtype, shift)
            offsets_t = torch.tensor(offsets, dtype=torch.int32, device=common.DEVICE)
            out = poisoned_empty(len(counts), K, N, dtype=dtype)
            result = grouped_dw(x, dy, offsets_t, out=out)
            if result is not out and (not isinstance(result, torch.Tensor) or result.data_ptr() != out.data_ptr()):
                raise CheckError("grouped_matmul_dw was given out= but returned a different tensor")
            expected = _dw_reference(x, dy, offsets)
            n_rows = offsets[-1]
            mistakes = {
                "the reduction ran over all rows, not the expert's own: loop from offsets[e] to offsets[e + 1]":
                    _dw_reference(x, dy, offsets, rows_of=lambda e: (0, n_rows)),
                "an expert with no rows was never written: store the accumulator (zeros) even when the row loop "
                "runs 0 times": torch.where(torch.tensor([c == 0 for c in counts], device=expected.device).view(-1, 1, 1), float("nan"),
                                            expected),
            }
            if K == N:
                mistakes["dw[e] is transposed (dy_e^T @ x_e): tl.dot's first operand is x_e^T, a (BLOCK_K, "
                         "BLOCK_M) tile of x, its second a (BLOCK_M, BLOCK_N) tile of dy"] = expected.transpose(1, 2)
            for block in (16, 32, 64, 128):
                def past_end(e, block=block):
                    lo = offsets[e]
                    return lo, min(lo + triton.cdiv(counts[e], block) * block, n_rows)
                mistakes[f"the last block of an expert's rows was not masked at the expert's end (BLOCK_M {block}): "
                         f"rows past offsets[e + 1] are the next expert's; mask rows < end"] = \
                    _dw_reference(x, dy, offsets, rows_of=past_end)
            assert_close(out, expected, name=f"grouped_matmul_dw {str(dtype).removeprefix('torch.')} counts={counts} "
                                             f"K={K} N={N}", mistakes=mistakes)


EXERCISES = [
    Exercise("9.1", "topk_sigmoid_gating", check_topk_sigmoid_gating, kernels=("topk_sigmoid_gating_kernel",)),
    Exercise("9.2", "capacity_dispatch", check_capacity_dispatch, kernels=("capacity_dispatch_kernel",)),
    Exercise("9.3", "grouped_matmul", check_grouped_matmul, kernels=("grouped_matmul_kernel", "tile_schedule")),
    Exercise("9.4", "grouped_matmul_dw", check_grouped_matmul_dw, kernels=("grouped_matmul_dw_kernel",)),
]
BY_NAME = {e.name: e for e in EXERCISES}


impl, test_exercise, test_untouched_stubs_are_todo = lesson_tests(STEM, EXERCISES)


def test_tile_schedule_example(impl):
    try:
        result = impl.tile_schedule([0, 5, 5, 40], 16)
    except NotImplementedError:
        if common.grading.current_impl() == "exercises":
            pytest.skip("TODO: exercise 9.3 (tile_schedule)")
        raise
    assert result == ([0, 2, 2, 2], [0, 5, 21, 37]) or tuple(map(list, result)) == ([0, 2, 2, 2], [0, 5, 21, 37])


# --------------------------------------------------------------------------- the grader's own tests

def _solutions():
    return load_impl(STEM, "solutions")


# 9.1: known-wrong gating kernels, each with one mistake.
@triton.jit
def _gating_wrong_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, n_tokens, n_experts, stride_lt,
                         TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                         MISTAKE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < n_tokens
    col_mask = cols < n_experts
    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :],
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    scores = tl.sigmoid(logits)
    if MISTAKE == "no bias":
        biased = scores  # wrong: the bias is never added
    else:
        biased = scores + tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    biased = tl.where(col_mask[None, :], biased, float("-inf"))
    if MISTAKE == "biased weights":
        scores = biased  # wrong: the weights come from the biased scores
    ks = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(biased, axis=1)
        picked = cols[None, :] == best[:, None]
        weights = tl.where(ks[None, :] == j, tl.sum(tl.where(picked, scores, 0.0), axis=1)[:, None], weights)
        ids = tl.where(ks[None, :] == j, best[:, None].to(tl.int32), ids)
        biased = tl.where(picked, float("-inf"), biased)
    if MISTAKE != "not renormalised":
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out_mask = ks[None, :] < TOP_K
    if MISTAKE != "tail not masked":
        out_mask = out_mask & row_mask[:, None]
    offsets = rows[:, None] * TOP_K + ks[None, :]
    tl.store(weights_ptr + offsets, weights, mask=out_mask)
    tl.store(ids_ptr + offsets, ids, mask=out_mask)


def _gating_with(mistake):
    def gating(logits, bias, top_k, weights_out=None, ids_out=None):
        n_tokens, n_experts = logits.shape
        weights = torch.empty(n_tokens, top_k, device=logits.device) if weights_out is None else weights_out
        ids = torch.empty(n_tokens, top_k, dtype=torch.int32, device=logits.device) if ids_out is None else ids_out
        _gating_wrong_kernel[(triton.cdiv(n_tokens, 64),)](
            logits, bias, weights, ids, n_tokens, n_experts, logits.stride(0), TOP_K=top_k, BLOCK_T=64,
            BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_K=triton.next_power_of_2(top_k), MISTAKE=mistake)
        return weights, ids
    return gating


# 9.2: known-wrong dispatch kernels.
@triton.jit
def _dispatch_wrong_kernel(ids_ptr, slot_ptr, counts_ptr, n_assignments, capacity, BLOCK_SIZE: tl.constexpr,
                           MISTAKE: tl.constexpr):
    e = tl.program_id(0)
    seen = tl.zeros((), dtype=tl.int32)
    for start in range(0, n_assignments, BLOCK_SIZE):
        a = start + tl.arange(0, BLOCK_SIZE)
        mask = a < n_assignments
        hit = (tl.load(ids_ptr + a, mask=mask, other=-1) == e).to(tl.int32)
        if MISTAKE == "inclusive rank":
            rank = seen + tl.cumsum(hit, axis=0)  # wrong: the first assignment gets rank 1
        elif MISTAKE == "no carry":
            rank = tl.cumsum(hit, axis=0) - 1  # wrong: every block starts again at rank 0
        else:
            rank = seen + tl.cumsum(hit, axis=0) - 1
        if MISTAKE == "no drop":
            slot = e * capacity + rank  # wrong: nothing is dropped
        else:
            slot = tl.where(rank < capacity, e * capacity + rank, -1)
        store_mask = mask & (hit == 1)
        if MISTAKE == "dropped unwritten":
            store_mask = store_mask & (rank < capacity)  # wrong: dropped assignments keep whatever was there
        tl.store(slot_ptr + a, slot, mask=store_mask)
        seen += tl.sum(hit, axis=0)
    if MISTAKE == "counts after drop":
        seen = tl.minimum(seen, capacity)  # wrong: counts must include the dropped assignments
    tl.store(counts_ptr + e, seen)


def _dispatch_with(mistake, validate=True):
    def dispatch(ids, n_experts, capacity, slot_out=None, counts_out=None):
        if validate and capacity < 0:
            raise ValueError("capacity < 0")
        slot = torch.empty_like(ids) if slot_out is None else slot_out
        counts = torch.empty(n_experts, dtype=torch.int32, device=ids.device) if counts_out is None else counts_out
        _dispatch_wrong_kernel[(n_experts,)](ids, slot, counts, ids.numel(), capacity, BLOCK_SIZE=128, MISTAKE=mistake)
        return slot, counts
    return dispatch


# 9.3: known-wrong grouped matmuls: a wrong kernel, or the right kernel with a wrong schedule.
@triton.jit
def _grouped_wrong_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, N, K,
                          HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, MISTAKE: tl.constexpr):
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    rows = tl.load(tile_start_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(offsets_ptr + expert + 1)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    if MISTAKE == "expert 0":
        w_base = w_ptr  # wrong: ignores the tile's expert
    else:
        w_base = w_ptr + expert * K * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + ks < K
        x = tl.load(x_ptr + rows[:, None] * K + (k0 + ks)[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_base + (k0 + ks)[:, None] * N + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0)
        acc = tl.dot(x, w, acc)
    if HAS_SCALE and MISTAKE != "no scale":
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    store_mask = col_mask[None, :]
    if MISTAKE != "rows not masked":
        store_mask = store_mask & row_mask[:, None]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=store_mask)


def _floor_schedule(expert_offsets, block_m):
    tile_expert, tile_start = [], []
    for e in range(len(expert_offsets) - 1):
        for i in range((expert_offsets[e + 1] - expert_offsets[e]) // block_m):  # wrong: drops the partial tile
            tile_expert.append(e)
            tile_start.append(expert_offsets[e] + i * block_m)
    return tile_expert, tile_start


def _grouped_with(mistake):
    sol = _solutions()

    def grouped(x, w, expert_offsets, row_scale=None, out=None):
        n_experts, K, N = w.shape
        out = torch.empty((x.shape[0], N), dtype=x.dtype, device=x.device) if out is None else out
        schedule = _floor_schedule if mistake == "floor schedule" else sol.tile_schedule
        tile_expert, tile_start = schedule(expert_offsets.tolist(), sol.BLOCK_M)
        if not tile_expert:
            return out
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=x.device)  # noqa: E731
        grid = (len(tile_expert), triton.cdiv(N, sol.BLOCK_N))
        args = (x, w, row_scale if row_scale is not None else x, out, as_tensor(tile_expert), as_tensor(tile_start),
                expert_offsets, N, K)
        meta = dict(HAS_SCALE=row_scale is not None, BLOCK_M=sol.BLOCK_M, BLOCK_N=sol.BLOCK_N, BLOCK_K=sol.BLOCK_K)
        if mistake == "floor schedule":
            sol.grouped_matmul_kernel[grid](*args, **meta)
        else:
            _grouped_wrong_kernel[grid](*args, **meta, MISTAKE=mistake)
        return out
    return grouped


# 9.4: known-wrong dW kernels, each with one mistake.
@triton.jit
def _dw_wrong_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_M: tl.constexpr, MISTAKE: tl.constexpr):
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if MISTAKE == "all rows":
        start = 0  # wrong: sums every expert's rows
        end = tl.load(offsets_ptr + tl.num_programs(0))
    if MISTAKE == "idle unwritten":
        if start == end:
            return  # wrong: an idle expert's dw keeps whatever the buffer held
    mask_end = end
    if MISTAKE == "mask at R":
        mask_end = tl.load(offsets_ptr + tl.num_programs(0))  # wrong: the last block runs into the next expert
    acc_dtype = tl.float16 if MISTAKE == "fp16 accumulator" else tl.float32
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=acc_dtype)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < mask_end
        if MISTAKE == "transposed":  # wrong: dy_e^T @ x_e (the same shape only when K == N)
            a_t = tl.load(dy_ptr + rows[None, :] * N + ks[:, None], mask=k_mask[:, None] & row_mask[None, :], other=0.0)
            b = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        else:
            a_t = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=k_mask[:, None] & row_mask[None, :], other=0.0)
            b = tl.load(dy_ptr + rows[:, None] * N + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0)
        if MISTAKE == "fp16 accumulator":
            acc += tl.dot(a_t, b).to(tl.float16)  # wrong: the running sum is rounded to fp16 every step
        else:
            acc = tl.dot(a_t, b, acc)
    tl.store(dw_ptr + e * K * N + ks[:, None] * N + cols[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=k_mask[:, None] & col_mask[None, :])


def _dw_with(mistake):
    return solution_with(STEM, grouped_matmul_dw_kernel=with_flags(_dw_wrong_kernel, MISTAKE=mistake)).grouped_matmul_dw


KNOWN_WRONG = [
    ("topk_sigmoid_gating", "bias not used to select", lambda: _gating_with("no bias"), "not added for the selection"),
    ("topk_sigmoid_gating", "bias in the weights", lambda: _gating_with("biased weights"), "only picks the experts"),
    ("topk_sigmoid_gating", "weights not renormalised", lambda: _gating_with("not renormalised"), "renormalised"),
    ("topk_sigmoid_gating", "tail rows not masked", lambda: _gating_with("tail not masked"), "past the end"),
    ("capacity_dispatch", "inclusive rank", lambda: _dispatch_with("inclusive rank"), "ranks start at 1"),
    ("capacity_dispatch", "count not carried", lambda: _dispatch_with("no carry"), "not carried"),
    ("capacity_dispatch", "nothing dropped", lambda: _dispatch_with("no drop"), "nothing was dropped"),
    ("capacity_dispatch", "counts after dropping", lambda: _dispatch_with("counts after drop"), "dropped ones included"),
    ("capacity_dispatch", "dropped slots never written", lambda: _dispatch_with("dropped unwritten"),
     "dropped assignments were never written"),
    ("capacity_dispatch", "no capacity < 0 check", lambda: _dispatch_with("none", validate=False), "ValueError"),
    ("grouped_matmul", "every tile uses expert 0", lambda: _grouped_with("expert 0"), "expert 0's weights"),
    ("grouped_matmul", "row scale ignored", lambda: _grouped_with("no scale"), "row_scale was not applied"),
    ("grouped_matmul", "schedule rows // block_m", lambda: _grouped_with("floor schedule"), "cdiv(rows, block_m)"),
    ("grouped_matmul", "rows past the expert not masked", lambda: _grouped_with("rows not masked"), "past the end"),
    ("grouped_matmul_dw", "reduction over all rows", lambda: _dw_with("all rows"), "over all rows"),
    ("grouped_matmul_dw", "last block masked at R", lambda: _dw_with("mask at R"), "not masked at the expert's end"),
    ("grouped_matmul_dw", "operands swapped: dW^T", lambda: _dw_with("transposed"), "is transposed"),
    ("grouped_matmul_dw", "fp16 accumulator", lambda: _dw_with("fp16 accumulator"), "accumulated in"),
    ("grouped_matmul_dw", "idle expert never written", lambda: _dw_with("idle unwritten"), "never written"),
]


@pytest.mark.parametrize("name,mistake,make_wrong,hint", KNOWN_WRONG, ids=[f"{k[0]}: {k[1]}" for k in KNOWN_WRONG])
def test_grader_rejects_known_wrong(name, mistake, make_wrong, hint):
    expect_rejected(BY_NAME[name], make_wrong(), hint)


# --------------------------------------------------------------------------- the lesson's kernels

@pytest.fixture(scope="module")
def lesson():
    return lesson_module("09")


@pytest.mark.parametrize("renormalize", [True, False])
def test_lesson_route(lesson, renormalize):
    for n_tokens, n_experts, top_k in ((random.randint(2, 300), 8, 2), (1, 6, 4), (45, 16, 1)):
        logits = randn(n_tokens, n_experts)
        weights = poisoned_empty(n_tokens, top_k)
        ids = poisoned_empty(n_tokens, top_k, dtype=torch.int32)
        lesson.route(logits, top_k, renormalize, weights_out=weights, ids_out=ids)
        w_ref, ids_ref = lesson.route_reference(logits.double(), top_k, renormalize)
        assert_close(ids, ids_ref.to(torch.int32), name="ids")
        assert_close(weights, w_ref, name="weights")
        if renormalize:
            assert torch.allclose(weights.sum(dim=1).double().cpu(), torch.ones(n_tokens, dtype=torch.float64))


def test_lesson_route_strided_logits(lesson):
    base = randn(50, 16)
    logits = base[:, :8]  # rows 16 apart: the kernel takes the row stride
    weights, ids = lesson.route(logits, 2)
    w_ref, ids_ref = lesson.route_reference(logits.double(), 2)
    assert_close(ids, ids_ref.to(torch.int32), name="ids")
    assert_close(weights, w_ref, name="weights")


@pytest.mark.parametrize("n_tokens,n_experts,top_k", [(1, 4, 1), (700, 8, 2), (333, 5, 3)])
def test_lesson_permute(lesson, n_tokens, n_experts, top_k):
    ids = _routed_ids(n_tokens, n_experts, top_k, skew=2.0)
    ids[ids == 1] = 0  # expert 1 gets no assignment at all (k ids per token need not be distinct here)
    perm = lesson.permute(ids, n_experts)
    lesson.check_permutation(perm, ids, lesson.BLOCK_M)
    assert int(perm.num_tiles) <= perm.max_tiles


def test_lesson_check_permutation_catches_a_bad_tile_table(lesson):
    ids = _routed_ids(200, 4, 2)
    perm = lesson.permute(ids, 4)
    perm.tile_start[0] += 1
    with pytest.raises(CheckError, match="tile table"):
        lesson.check_permutation(perm, ids, lesson.BLOCK_M)


@pytest.mark.parametrize("dtype", [torch.float32] + GEMM_DTYPES, ids=str)
def test_lesson_grouped_gemm(lesson, dtype):
    n_tokens, hidden, ffn, n_experts, top_k = 29, 40, 48, 4, 2
    x, logits, w_gate, w_up, w_down = lesson.random_moe(n_tokens, hidden, ffn, n_experts, dtype, idle_expert=True)
    _, ids = lesson.route(logits, top_k)
    perm = lesson.permute(ids, n_experts)
    token = perm.sorted_token.long()
    expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), perm.counts.long())
    xs = x[token].double()
    gate = torch.einsum("rk,rkn->rn", xs, w_gate.double()[expert])
    up = torch.einsum("rk,rkn->rn", xs, w_up.double()[expert])
    out = poisoned_empty(n_tokens * top_k, ffn, dtype=dtype)
    lesson.grouped_gemm(x[token].contiguous(), w_gate, perm, out=out)
    assert_close(out, gate, name="grouped_gemm (sorted rows)")
    out = poisoned_empty(n_tokens * top_k, ffn, dtype=dtype)
    lesson.grouped_gemm(x, w_gate, perm, w_up=w_up, gather=True, out=out)
    assert_close(out, torch.nn.functional.silu(gate) * up, name="grouped_gemm (gather + SwiGLU)")


@pytest.mark.parametrize("dtype", [torch.float32] + GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("version", [1, 2, 3])
def test_lesson_moe(lesson, dtype, version):
    if common.INTERPRETER and version == 3:
        pytest.skip("v3 is v2 with autotuned configs; the interpreter has one config, so it runs v2's kernels")
    n_tokens, hidden, ffn, n_experts, top_k = (31, 24, 40, 4, 2) if common.INTERPRETER else (257, 176, 272, 8, 2)
    x, logits, w_gate, w_up, w_down = lesson.random_moe(n_tokens, hidden, ffn, n_experts, dtype, idle_expert=True)
    out = poisoned_empty(n_tokens, hidden, dtype=dtype)
    result = lesson.moe(x, logits, w_gate, w_up, w_down, top_k, version=version, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = lesson.moe_loop_reference(x.double(), logits.double(), w_gate.double(), w_up.double(),
                                         w_down.double(), top_k)
    assert_close(out, expected, name=f"moe v{version}")


def test_lesson_moe_loop_reference_matches_dense_formula(lesson):
    """The reference itself: the loop equals the dense sum over every token's k experts."""
    x, logits, w_gate, w_up, w_down = [t.double() for t in lesson.random_moe(9, 8, 12, 4, torch.float32)]
    weights, ids = lesson.route_reference(logits, 2)
    dense = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(2):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])
            dense[t] += weights[t, j] * (h @ w_down[e])
    assert torch.allclose(lesson.moe_loop_reference(x, logits, w_gate, w_up, w_down, 2), dense)


def test_lesson_load_balancing_math(lesson):
    n_experts = 8
    uniform_logits = torch.zeros(64, n_experts)
    assert abs(lesson.aux_loss_reference(uniform_logits, torch.full((n_experts,), 16)) - 1.0) < 1e-12
    skewed = torch.tensor([64] + [0] * (n_experts - 1))
    assert lesson.aux_loss_reference(torch.zeros(64, n_experts), skewed) == pytest.approx(1.0)  # P uniform: 1
    peaked = torch.full((64, n_experts), -10.0)
    peaked[:, 0] = 10.0
    assert lesson.aux_loss_reference(peaked, skewed) == pytest.approx(n_experts, rel=1e-6)  # collapse: E
    assert lesson.capacity(100, 8, 1.0) == 13 and lesson.capacity(100, 8, 1.25) == 16
    assert lesson.dropped(torch.tensor([20, 5, 13]), 13) == 7


def test_lesson_bad_input(lesson):
    x, logits, w_gate, w_up, w_down = lesson.random_moe(10, 16, 32, 4, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        lesson.moe(x, logits, w_gate, w_up, w_down, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        lesson.route(logits, 0)
    with pytest.raises(ValueError, match="w_down"):
        lesson.moe(x, logits, w_gate, w_up, w_down.transpose(1, 2).contiguous(), top_k=2)
    with pytest.raises(ValueError, match="contiguous"):
        lesson.moe(randn(10, 32)[:, ::2], logits, w_gate, w_up, w_down, top_k=2)
    with pytest.raises(TypeError, match="dtype"):
        lesson.moe(x.half(), logits, w_gate, w_up, w_down, top_k=2)
    with pytest.raises(ValueError, match="logits"):
        lesson.moe(x, logits[:5], w_gate, w_up, w_down, top_k=2)
    with pytest.raises(ValueError, match="version"):
        lesson.moe(x, logits, w_gate, w_up, w_down, top_k=2, version=4)
    with pytest.raises(TypeError, match="dtype"):
        lesson.permute(torch.zeros(4, 2, dtype=torch.int64, device=common.DEVICE), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lesson.route([[1.0, 2.0]], 1)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_lesson_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.route(torch.randn(10, 8), 2)


@pytest.mark.skipif(not common.supports_bf16(), reason="needs a GPU with bf16 (the interpreter has no bfloat16)")
def test_lesson_matches_torch_grouped_mm(lesson):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    x, logits, w_gate, w_up, w_down = lesson.random_moe(300, 256, 512, 8, torch.bfloat16)
    try:
        theirs = lesson.moe_torch_grouped(x, logits, w_gate, w_up, w_down, 2)
    except Exception as err:  # private API: dtypes, layouts and GPUs vary by release
        pytest.skip(f"torch._grouped_mm failed here: {type(err).__name__}: {err}")
    ours = lesson.moe(x, logits, w_gate, w_up, w_down, 2)
    assert_close(ours, theirs.float(), name="moe vs torch._grouped_mm", atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------- the lesson's backward

@pytest.mark.parametrize("dtype", [torch.float32] + GEMM_DTYPES, ids=str)
def test_lesson_backward_matches_float64_autograd(lesson, dtype):
    n_tokens, hidden, ffn, n_experts, top_k = (23, 24, 40, 4, 2) if common.INTERPRETER else (257, 176, 272, 8, 2)
    inputs = lesson.random_moe(n_tokens, hidden, ffn, n_experts, dtype, idle_expert=True)
    dout = randn(n_tokens, hidden, dtype=dtype)
    out_ref, expected = common.grads_float64(lambda *t: lesson.moe_loop_reference(*t, top_k), inputs, dout)
    with PoisonedAllocations() as allocations:  # every torch.empty of the layer starts as NaN
        out, grads = common.grads_of(lambda *t: lesson.moe_train(*t, top_k), inputs, dout)
    allocations.check_guards()
    assert_close(out, out_ref, name="moe_train forward")
    for name, got, ref in zip(lesson.GRAD_NAMES, grads, expected):
        assert_close(got, ref, name=name, **lesson.backward_tolerance(dtype))
    assert grads[3][-1].abs().max() == 0, "the idle expert's dW_up must be exactly 0"


def test_lesson_backward_only_what_is_needed(lesson):
    """x alone needs a gradient: the weights' dW GEMMs are skipped, and dx is still right."""
    x, logits, w_gate, w_up, w_down = lesson.random_moe(19, 24, 40, 4, torch.float32)
    x.requires_grad_()
    out = lesson.moe_train(x, logits, w_gate, w_up, w_down, 2)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    _, (dx_ref,) = common.grads_float64(lambda x: lesson.moe_loop_reference(x, logits.double(), w_gate.double(),
                                                                           w_up.double(), w_down.double(), 2),
                                        (x,), torch.ones_like(out))
    assert_close(dx, dx_ref, name="dx", **lesson.backward_tolerance(torch.float32))
    assert w_gate.grad is None and not w_gate.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32] + GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("gather", [False, True])
def test_lesson_grouped_gemm_dw(lesson, dtype, gather):
    n_tokens, n_experts, K, N = 41, 6, 40, 33
    ids = _routed_ids(n_tokens, n_experts, 2, skew=3.0)
    ids[ids == 2] = 1  # expert 2 gets no rows: its dW must be written as zeros
    perm = lesson.permute(ids, n_experts)
    token = perm.sorted_token.long()
    x = randn(n_tokens, K, dtype=dtype)
    a = x if gather else x[token].contiguous()
    b = randn(n_tokens * 2, N, dtype=dtype)
    out = poisoned_empty(n_experts, K, N, dtype=dtype)
    result = lesson.grouped_gemm_dw(a, b, perm, gather=gather, out=out)
    assert result.data_ptr() == out.data_ptr()
    offsets = perm.offsets.tolist()
    xs = x[token].double()
    expected = torch.stack([xs[lo:hi].T @ b[lo:hi].double() for lo, hi in zip(offsets, offsets[1:])])
    assert_close(out, expected, name=f"grouped_gemm_dw gather={gather}", **common.checks.sum_tolerance(dtype, 2 * n_tokens))


@pytest.mark.parametrize("dtype", [torch.float32] + GEMM_DTYPES, ids=str)
def test_lesson_grouped_gemm_transposed_weights(lesson, dtype):
    """The backward's dX: grouped_gemm through w.transpose(1, 2), a strided view, no copy."""
    n_tokens, n_experts, K, N = 29, 4, 48, 40
    ids = _routed_ids(n_tokens, n_experts, 2)
    perm = lesson.permute(ids, n_experts)
    w = randn(n_experts, N, K, dtype=dtype, scale=K ** -0.5)  # stored (E, N, K): used as (E, K, N) transposed
    a = randn(n_tokens * 2, K, dtype=dtype)
    expert = torch.repeat_interleave(torch.arange(n_experts, device=a.device), perm.counts.long())
    expected = torch.einsum("rk,rnk->rn", a.double(), w.double()[expert])
    out = poisoned_empty(n_tokens * 2, N, dtype=dtype)
    lesson.grouped_gemm(a, w.transpose(1, 2), perm, out=out)
    assert_close(out, expected, name="grouped_gemm with transposed weights")


def test_lesson_swiglu_backward(lesson):
    gate, up, dh = (randn(37, 45) for _ in range(3))
    dgate, dup = lesson.swiglu_backward(gate, up, dh)
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    ref_dgate, ref_dup = torch.autograd.grad(torch.nn.functional.silu(g) * u, (g, u), dh.double())
    assert_close(dgate, ref_dgate, name="dgate")
    assert_close(dup, ref_dup, name="dup")


def test_lesson_backward_bad_input(lesson):
    perm = lesson.permute(_routed_ids(10, 4, 2), 4)
    with pytest.raises(ValueError, match="rows"):
        lesson.grouped_gemm_dw(randn(19, 8), randn(20, 8), perm)
    with pytest.raises(ValueError, match="out has shape"):
        lesson.grouped_gemm_dw(randn(20, 8), randn(20, 8), perm, out=torch.empty(4, 8, 9, device=common.DEVICE))
    w = randn(4, 8, 16)
    with pytest.raises(ValueError, match="strides"):
        lesson.grouped_gemm(randn(10, 8), w, perm, w_up=randn(4, 16, 8).transpose(1, 2), gather=True)


def test_dw_config_fits_the_card(lesson, monkeypatch):
    """The dW GEMM's fixed tiles fit every card from a T4 to an H100 as they are; tiles too large
    for a card are halved (BLOCK_M, the reduction step, kept) until they fit its shared memory."""
    from common import capability
    gpu_config = dict(BLOCK_K=128, BLOCK_N=128, BLOCK_M=64, num_warps=8, num_stages=3)  # the lesson's, on a GPU
    monkeypatch.setattr(lesson, "DW_CONFIG", gpu_config)
    for arch in (75, 80, 86, 90):
        assert lesson.dw_gemm_config(torch.bfloat16, arch=arch) == gpu_config, arch
    too_big = dict(BLOCK_K=256, BLOCK_N=256, BLOCK_M=64, num_warps=8, num_stages=4)
    monkeypatch.setattr(lesson, "DW_CONFIG", too_big)
    fitted = lesson.dw_gemm_config(torch.bfloat16, arch=86)
    need = capability.loop_shared_memory((fitted["BLOCK_K"] + fitted["BLOCK_N"]) * 64, 4, 2, arch=86)
    assert need <= capability.shared_memory_limit(86), fitted
    assert fitted["BLOCK_M"] == 64 and fitted["BLOCK_K"] * fitted["BLOCK_N"] < 256 * 256, fitted


def test_gemm_configs_fit_the_card(lesson, monkeypatch):
    """On a T4 (64 KiB, fp32 copies of the tiles on its CUDA cores) the fixed gate / up config is
    fitted (BLOCK_N halved, BLOCK_M kept for the tile table) and the tuner's prune keeps only what
    fits, falling back to the fitted config when nothing does; an H100 changes nothing."""
    from common import capability
    gpu_config = dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)  # the lesson's, on a GPU
    monkeypatch.setattr(lesson, "GEMM_CONFIG", gpu_config)
    monkeypatch.setattr(lesson, "BLOCK_M", 128)
    assert lesson.fixed_gemm_config(torch.float16, True, arch=90) == gpu_config
    fitted = lesson.fixed_gemm_config(torch.float16, True, arch=75)
    need = capability.matmul_shared_memory(fitted, 2, arch=75, b_tiles=2, BLOCK_M=128)
    assert need <= 65536 < capability.matmul_shared_memory(gpu_config, 2, arch=75, b_tiles=2, BLOCK_M=128), fitted
    assert fitted["BLOCK_N"] == 64 and fitted["BLOCK_K"] == 64, fitted
    a = torch.empty(4, 64, dtype=torch.float16)
    too_big = triton.Config({"BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4)
    prune = lesson._prune_for(True, arch=75)["early_config_prune"]
    [fallback] = prune([too_big], {"a_ptr": a}, BLOCK_M=128)
    assert fallback.kwargs == {k: v for k, v in fitted.items() if k.isupper()}
    fits = triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)
    assert prune([too_big, fits], {"a_ptr": a}, BLOCK_M=128) == [fits]
