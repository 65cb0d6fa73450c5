"""Device-side helpers two or more lessons share: `tl.constexpr` constants and `@triton.jit`
functions. Each is written out in the lesson that teaches it and imported from here in the
lessons after it (their markdown says so):

- LOG2E, LN2: lesson 07 (exp2 and log2 in the attention kernels; a plain Python float global
  is not a compile-time constant for Triton, a tl.constexpr one is)
- grouped_tile_position: lesson 04's v3 (grouped program order for L2 reuse), used by 10 and 11
- logsumexp_step: lesson 08's chunked online logsumexp (cross-entropy over the vocabulary), used
  by lesson 12's DPO and GRPO kernels

Import them by name (`from common.kernels import LOG2E`): a @triton.jit function resolves the
globals of the module that defines it, so the names must be in the lesson's own globals.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) * LN2


@triton.jit
def grouped_tile_position(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile `tile_id` in grouped order: GROUP_M tile rows walk the
    tile columns together, so their strips of A and the columns of B they share stay in L2
    (lesson 04 measures it)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)  # the last group may be shorter
    pid_m = first_pid_m + (tile_id % num_pid_in_group) % group_size_m
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def logsumexp_step(m, d, x, AXIS: tl.constexpr):
    """One chunk x more of an online logsumexp along AXIS: the running max m and the running sum
    d = sum exp(seen - m) become those of everything seen so far (lesson 08). When the chunk
    raises the max, the old sum was taken against the old max: it is rescaled by exp(m - m_new).
    At the end, logsumexp = m + log(d). Start m finite (e.g. -1e30) where a row may load nothing,
    so exp(-inf - m) = 0 rather than exp(-inf + inf) = NaN."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - tl.expand_dims(m_new, AXIS)), axis=AXIS)
    return m_new, d
