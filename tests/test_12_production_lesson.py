"""Lesson 12 (production systems): the lesson script's own functions.

The registered LayerNorm op (forward, autograd, opcheck, torch.compile), the nn.Module's errors
and fallbacks, the fused DPO and GRPO losses against float64 autograd, the tensor-parallel MLP (gloo on the
CPU everywhere, NCCL where two GPUs are visible), and the GPU-only CUDA-graph helper.
The exercises' grader tests are in tests/test_12_production.py.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import assert_close, poisoned_empty, randn
from common.checks import check_guards
from common.lessons import lesson_module

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if common.supports_bf16() else [])


@pytest.fixture(scope="module")
def lesson():
    return lesson_module("12")


# --------------------------------------------------------------------------- the registered op

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_op_forward_and_backward(lesson, dtype):
    for shape in ((int(torch.randint(3, 20, ()).item()), common.awkward_sizes(1, lo=100, hi=1500)[0]), (2, 3, 17)):
        x = randn(*shape, dtype=dtype, scale=2.0) + 0.5
        w, b, dy = randn(shape[-1], dtype=dtype), randn(shape[-1], dtype=dtype), randn(*shape, dtype=dtype)
        y_ref, grads_ref = common.grads_float64(lesson.layer_norm_reference, (x, w, b), dy)
        y, grads = common.grads_of(lesson.layer_norm, (x, w, b), dy)
        assert_close(y, y_ref, name=f"layer_norm {shape} {dtype}")
        for label, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
            assert_close(got, want, name=f"layer_norm {label} {shape} {dtype}")


def test_layer_norm_op_strided_and_expanded_gradient(lesson):
    base = randn(9, 40)
    x = base[:, :33]  # padded rows: the op views them with their row stride
    w, b = randn(33), randn(33)
    _, grads_ref = common.grads_float64(lambda *t: lesson.layer_norm_reference(*t).sum(), (x, w, b))
    _, grads = common.grads_of(lambda *t: lesson.layer_norm(*t).sum(), (x, w, b))  # dy expanded, stride 0
    for label, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        assert_close(got, want, name=f"layer_norm(padded rows).sum() {label}")
    y, mean, rstd = lesson.layer_norm_fwd_op(x, w, b, 1e-5)
    assert not mean.requires_grad and not rstd.requires_grad
    assert_close(mean, x.double().mean(-1), name="saved mean")


def test_opcheck_passes(lesson):
    results = lesson.run_opcheck()
    for op, tests in results.items():
        assert tests and all(v == "SUCCESS" for v in tests.values()), f"{op}: {tests}"


def test_fake_implementation_gives_shapes_without_running(lesson):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w, b = torch.empty(4, 7, 33), torch.empty(33), torch.empty(33)
        y, mean, rstd = lesson.layer_norm_fwd_op(x, w, b, 1e-5)
    assert y.shape == (4, 7, 33) and mean.shape == (28,) and rstd.dtype == torch.float32


def test_torch_compile_fullgraph(lesson):
    lesson.check_compile()  # raises CheckError (or a dynamo error on a graph break) when wrong


def test_op_names_do_not_collide(lesson):
    assert lesson._free_namespace(lesson.NAMESPACE) != lesson.NAMESPACE  # taken now: a second load moves on


def test_layer_norm_bad_input(lesson):
    x, w, b = randn(4, 32), randn(32), randn(32)
    with pytest.raises(ValueError, match="shape"):
        lesson.layer_norm(x, randn(31), b)
    with pytest.raises(TypeError, match="dtype"):
        lesson.layer_norm(x.to(torch.int32), w, b)
    with pytest.raises(TypeError, match="dtype"):
        lesson.layer_norm(x.double(), w.double(), b.double())
    with pytest.raises(ValueError, match="at least one row"):
        lesson.layer_norm(randn(0, 32), w, b)
    with pytest.raises(ValueError, match="at most"):
        n = lesson.L08.MAX_FUSED_COLS + 1
        lesson.layer_norm(randn(1, n), randn(n), randn(n))


# --------------------------------------------------------------------------- the module

def test_module_errors_and_fallback(lesson):
    rows = dict(lesson.check_module())
    assert rows["a list"].startswith("TypeError")
    assert rows["int64 (6, 48)"].startswith("TypeError")
    assert rows["fp32 (6, 47)"].startswith("ValueError")
    assert "fallback" in rows["float64 (6, 48)"]


def test_module_warns_once_per_reason(lesson):
    norm = lesson.TritonLayerNorm(20, device=common.DEVICE)
    lesson.TritonLayerNorm._warned.discard("dtype float64 is not supported by the kernel")
    x = randn(3, 20).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = norm(x)
    ours = [w for w in caught if "falls back" in str(w.message)]
    assert len(ours) == 1 and "float64" in str(ours[0].message)
    assert_close(out, F.layer_norm(x, (20,)), name="fallback output")


def test_module_constructor_validation(lesson):
    with pytest.raises(TypeError, match="int"):
        lesson.TritonLayerNorm(20.0)
    with pytest.raises(ValueError, match="at least 1"):
        lesson.TritonLayerNorm(0)


def test_module_trains_like_nn_layernorm(lesson):
    torch.manual_seed(0)
    ref = nn.LayerNorm(24).to(common.DEVICE)
    with torch.no_grad():
        ref.weight.copy_(randn(24))
        ref.bias.copy_(randn(24))
    ours = lesson.TritonLayerNorm.from_torch(ref)
    x, dy = randn(5, 24), randn(5, 24)
    (ref(x) * dy).sum().backward()
    (ours(x) * dy).sum().backward()
    assert_close(ours.weight.grad, ref.weight.grad.double(), name="dweight", atol=1e-4, rtol=1e-4)
    assert_close(ours.bias.grad, ref.bias.grad.double(), name="dbias", atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the DPO loss

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dpo_loss_matches_float64(lesson, dtype):
    n_vocab = common.awkward_sizes(1, lo=100, hi=700 if common.INTERPRETER else 20_000)[0]
    n_pairs = int(torch.randint(2, 5, ()).item())
    t_c, t_r = (int(t) for t in torch.randint(2, 8, (2,)))
    case = lesson._dpo_case(n_pairs, t_c, t_r, n_vocab, dtype)
    lesson.check_dpo_once(case, 0.1, f"B={n_pairs} Tc={t_c} Tr={t_r} V={n_vocab} {dtype}")


def test_dpo_loss_extreme_values(lesson):
    lesson.check_dpo_once(lesson._dpo_case(2, 4, 3, 257, torch.float32, shift=100.0), 0.1, "shift +100")
    lesson.check_dpo_once(lesson._dpo_case(3, 3, 5, 33, torch.float32, scale=40.0), 10.0, "saturated")


def test_dpo_loss_blocks_and_grad_output(lesson, monkeypatch):
    case = lesson._dpo_case(3, 9, 6, 100, torch.float32)
    logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r = case
    ref = lambda lc, lr: 2.5 * lesson.dpo_loss_reference(lc, lr, targets_c, targets_r, mask_c, mask_r,  # noqa: E731
                                                          ref_c.double(), ref_r.double(), 0.3)
    loss_ref, grads_ref = common.grads_float64(ref, (logits_c, logits_r))
    for blocks in ((1, 16, 4), (4, 64, 4), (16, 512, 4)):  # one row per program ... whole sequences, one chunk
        monkeypatch.setattr(lesson, "_dpo_blocks", lambda t, v, b=blocks: b)
        loss, grads = common.grads_of(lambda lc, lr: 2.5 * lesson.dpo_loss(lc, lr, targets_c, targets_r, mask_c, mask_r,
                                                                  ref_c, ref_r, 0.3)[0], (logits_c, logits_r))
        assert_close(loss, loss_ref, name=f"2.5 * loss, blocks {blocks}")
        for label, got, want in zip(("chosen", "rejected"), grads, grads_ref):
            assert_close(got * 10, want * 10, name=f"grad of 2.5 * loss, {label}, blocks {blocks}", atol=1e-5)


def test_dpo_prompt_rows_get_exact_zero_gradient(lesson):
    case = lesson._dpo_case(2, 6, 6, 40, torch.float32)
    logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r = case
    lc = logits_c.detach().clone().requires_grad_()
    loss, _, _ = lesson.dpo_loss(lc, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r)
    (grad,) = torch.autograd.grad(loss, lc)
    assert torch.equal(grad[~mask_c], torch.zeros_like(grad[~mask_c]))
    assert_close(grad[mask_c].sum(-1), torch.zeros(int(mask_c.sum()), dtype=torch.float64),
                 name="each response row's gradient sums to 0 (onehot - softmax)", atol=1e-7)


def test_token_logps_poisoned_outputs(lesson):
    logits = randn(3, 7, 91, scale=3.0)
    targets = torch.randint(0, 91, (3, 7), device=common.DEVICE)
    mask = torch.rand(3, 7, device=common.DEVICE) < 0.7
    out, lse = poisoned_empty(3, 7), poisoned_empty(3, 7)
    lesson.token_logps(logits, targets, mask, out=out, lse=lse)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert_close(out, logp * mask, name="token_logps")
    assert_close(lse, torch.logsumexp(logits.double(), -1) * mask, name="lse")
    check_guards(lse, "lse")
    assert_close(lesson.sequence_logps(logits, targets, mask),
                 lesson.sequence_logps_reference(logits.double(), targets, mask), name="sequence_logps")


def test_dpo_bad_input(lesson):
    case = lesson._dpo_case(2, 4, 4, 30, torch.float32)
    logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r = case
    args = dict(logits_c=logits_c, logits_r=logits_r, targets_c=targets_c, targets_r=targets_r, mask_c=mask_c,
                mask_r=mask_r, ref_c=ref_c, ref_r=ref_r)

    def call(**changes):
        return lesson.dpo_loss(**{**args, **changes})

    bad = targets_c.clone()
    first = tuple(mask_c.nonzero()[0].tolist())
    bad[first] = 30  # outside [0, 30): no host check (a sync per step); the kernel reads nothing, gives NaN
    loss, pc, _ = call(targets_c=bad)
    assert torch.isnan(loss) and torch.isnan(pc[first[0]]), "a target outside the vocabulary must give NaN"
    bad[first] = -7
    assert torch.isnan(call(targets_c=bad)[0])
    with pytest.raises(ValueError, match="same number of pairs"):
        call(logits_r=logits_r[:1], targets_r=targets_r[:1], mask_r=mask_r[:1])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        call(mask_c=mask_c[:, :3])
    with pytest.raises(TypeError, match="dtype"):
        call(targets_c=targets_c.int())
    with pytest.raises(ValueError, match="3 dimension"):
        call(logits_c=logits_c[0])
    with pytest.raises(ValueError, match="contiguous rows"):
        call(logits_c=randn(2, 30, 4).transpose(1, 2))
    with pytest.raises(ValueError, match="beta"):
        call(beta=0.0)
    with pytest.raises(ValueError, match="ref_"):
        call(ref_c=ref_c[:1])
    with pytest.raises(ValueError, match=r"reference log-probs must have shape \(2,\)"):
        call(ref_c=ref_c[:1], ref_r=ref_r[:1])


# --------------------------------------------------------------------------- the GRPO loss

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grpo_loss_matches_float64(lesson, dtype):
    n_vocab = common.awkward_sizes(1, lo=100, hi=700 if common.INTERPRETER else 20_000)[0]
    case = lesson._grpo_case(2, 3, 5, n_vocab, dtype)
    assert all(lesson.grpo_branches(case, 0.2).values()), "every branch of the surrogate must be exercised"
    lesson.check_grpo_once(case, 0.2, 0.04, f"2 prompts x G=3 T=5 V={n_vocab} {dtype}")


def test_grpo_loss_extreme_values(lesson):
    lesson.check_grpo_once(lesson._grpo_case(2, 2, 3, 257, torch.float32, shift=100.0), 0.2, 0.04, "shift +100")
    # eps = 0: every ratio off 1 is clipped on one side; beta = 0: no KL term (PPO's clipped objective)
    lesson.check_grpo_once(lesson._grpo_case(2, 2, 5, 33, torch.float32, eps=0.0), 0.0, 0.0, "eps 0, beta 0")


def test_grpo_blocks_and_grad_output(lesson, monkeypatch):
    logits, targets, mask, old, ref, rewards, group = lesson._grpo_case(2, 2, 9, 100, torch.float32, binary=False)
    ref_fn = lambda lg: 2.5 * lesson.grpo_loss_reference(lg, targets, mask, old.double(), ref.double(),  # noqa: E731
                                                          rewards.double(), group, 0.3, 0.1)
    loss_ref, (grad_ref,) = common.grads_float64(ref_fn, (logits,))
    for blocks in ((1, 16, 4), (4, 64, 4), (16, 512, 4)):  # one row per program ... whole sequences, one chunk
        monkeypatch.setattr(lesson, "_dpo_blocks", lambda t, v, b=blocks: b)
        loss, (grad,) = common.grads_of(lambda lg: 2.5 * lesson.grpo_loss(lg, targets, mask, old, ref, rewards,
                                                                         group, 0.3, 0.1)[0], (logits,))
        assert_close(loss, loss_ref, name=f"2.5 * grpo loss, blocks {blocks}")
        assert_close(grad * 36, grad_ref * 36, name=f"grad of 2.5 * grpo loss x B*T, blocks {blocks}", atol=1e-5)


def test_grpo_advantages(lesson):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 2.0, -1.0], device=common.DEVICE)
    adv = lesson.grpo_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3, device=common.DEVICE)), "equal rewards: advantage exactly 0"
    groups = rewards.double().view(3, 3)
    want = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    assert_close(adv, want, name="grpo_advantages")
    assert adv.dtype == torch.float32 and lesson.grpo_advantages(rewards.double(), 3).dtype == torch.float64


def test_grpo_prompt_rows_get_exact_zero_gradient(lesson):
    logits, targets, mask, old, ref, rewards, group = lesson._grpo_case(2, 2, 7, 40, torch.float32)
    x = logits.detach().clone().requires_grad_()
    loss, logp = lesson.grpo_loss(x, targets, mask, old, ref, rewards, group)
    assert not logp.requires_grad and torch.equal(logp[~mask], torch.zeros_like(logp[~mask]))
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert_close(grad[mask].sum(-1), torch.zeros(int(mask.sum()), dtype=torch.float64),
                 name="each completion row's gradient sums to 0 (onehot - softmax)", atol=1e-7)


def test_grpo_second_backward_fails_loudly(lesson):
    logits, targets, mask, old, ref, rewards, group = lesson._grpo_case(2, 2, 5, 40, torch.float32)
    x = logits.detach().clone().requires_grad_()
    loss, _ = lesson.grpo_loss(x, targets, mask, old, ref, rewards, group)
    loss.backward(retain_graph=True)  # the gradient buffer is scaled in place by grad_output ...
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()  # ... so a second backward must not silently scale it again


def test_grpo_bad_input(lesson):
    logits, targets, mask, old, ref, rewards, group = lesson._grpo_case(2, 2, 5, 30, torch.float32)
    args = dict(logits=logits, targets=targets, mask=mask, old_logps=old, ref_logps=ref, rewards=rewards,
                group_size=group)

    def call(**changes):
        return lesson.grpo_loss(**{**args, **changes})

    bad = targets.clone()
    first = tuple(mask.nonzero()[0].tolist())
    bad[first] = 30  # outside [0, 30): no host check; the kernel reads nothing and gives NaN
    loss, logp = call(targets=bad)
    assert torch.isnan(loss) and torch.isnan(logp[first]), "a target outside the vocabulary must give NaN"
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 5\)"):
        call(mask=mask[:, :3])
    with pytest.raises(ValueError, match="old_logps must have shape"):
        call(old_logps=old[:3])
    with pytest.raises(TypeError, match="dtype"):
        call(ref_logps=ref.half())
    with pytest.raises(TypeError, match="dtype"):
        call(targets=targets.int())
    with pytest.raises(ValueError, match="3 dimension"):
        call(logits=logits[0])
    with pytest.raises(ValueError, match="contiguous rows"):
        call(logits=randn(4, 30, 5).transpose(1, 2))
    with pytest.raises(ValueError, match=r"rewards must have shape \(4,\)"):
        call(rewards=rewards[:2])
    with pytest.raises(ValueError, match="must divide"):
        call(group_size=3)
    with pytest.raises(ValueError, match="at least 2"):
        call(group_size=1)
    with pytest.raises(TypeError, match="group_size must be an int"):
        call(group_size=2.0)
    with pytest.raises(ValueError, match="eps"):
        call(eps=1.0)
    with pytest.raises(ValueError, match="beta"):
        call(beta=-0.1)
    empty = mask.clone()
    empty[3] = False
    with pytest.raises(ValueError, match=r"sequences \[3\] have no completion token"):
        call(mask=empty)
    if not common.supports_bf16():
        with pytest.raises(TypeError, match="interpreter"):
            call(logits=logits.bfloat16())


# --------------------------------------------------------------------------- tensor parallel

def test_tensor_parallel_gloo_matches_one_process(lesson):
    r = lesson.run_tensor_parallel("gloo", tokens=3, dim=8, hidden=12, timeout_s=240)
    assert r["tp_vs_one"] < 1e-5, r
    assert r["tp_vs_fp64"] < 1e-5 and r["one_vs_fp64"] < 1e-5, r


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not common.HAS_GPU, reason="needs two CUDA GPUs for NCCL")
def test_tensor_parallel_nccl_matches_one_process(lesson):
    r = lesson.run_tensor_parallel("nccl", tokens=65, dim=256, hidden=512, timeout_s=300)
    assert r["tp_vs_one"] < 1e-5, r


def test_tensor_parallel_shards_add_up(lesson):
    weights = lesson.mlp_weights(8, 12, seed=3)
    x = torch.randn(3, 8)
    full = lesson.geglu_mlp_reference(x.double(), *(w.double() for w in weights.values()))
    parts = sum(lesson.geglu_mlp_reference(x.double(), *(w.double() for w in lesson.shard_mlp(weights, r, 3).values()))
                for r in range(3))
    assert torch.allclose(parts, full, atol=1e-12)
    with pytest.raises(ValueError, match="divide"):
        lesson.shard_mlp(weights, 0, 5)
    with pytest.raises(ValueError, match="backend"):
        lesson.run_tensor_parallel("mpi")


# --------------------------------------------------------------------------- capstone, GPU parts

def test_counting_reward_scores_the_rule(lesson):
    prompt_last = torch.tensor([5, 5, 5, 14])
    response = torch.tensor([[6, 7, 8, 9],  # keeps counting: 1
                             [5, 5, 5, 5],  # repeats: each token 1 away from previous + 1
                             [14, 7, 0, 9],  # each token V/2 = 8 away from previous + 1: 0
                             [15, 0, 1, 2]])  # counting on through the wrap-around: 1
    reward = lesson.counting_reward(prompt_last, response, vocab=16)
    assert torch.allclose(reward, torch.tensor([1.0, 1 - 1 / 8, 0.0, 1.0])), reward


def test_sampled_pairs_choose_the_higher_reward(lesson):
    gen = torch.Generator(device=common.DEVICE).manual_seed(3)
    model = lesson.TinyLM(16, 8, 16).to(common.DEVICE)
    prompt = lesson.counting_prompts(32, 16, 3, gen)
    data, ties = lesson.sampled_pairs(model, prompt, 4, 16, gen)
    n = data["ids_c"].shape[0]
    assert n + ties == 32 and n > 0
    chosen, rejected = (data[f"targets_{k}"][:, -4:] for k in "cr")
    prev = data["prompt_last"]
    assert (lesson.counting_reward(prev, chosen, 16) > lesson.counting_reward(prev, rejected, 16)).all()
    assert torch.equal(data["ids_c"][:, :3], data["ids_r"][:, :3]), "both responses follow the same prompt"


def test_one_round_of_tuning_from_feedback(lesson):
    h = lesson.tune_from_feedback(rounds=1, prompts_per_round=12, steps=6, batch=12, n_eval=12, vocab=12, dim=8,
                                  hidden=16, lr=3e-2)
    assert h["round"] == [0, 1] and h["kl"][0] == 0.0 and h["accuracy"][0] == 0.0, h
    assert h["pairs"][1] + h["ties"][1] == 12 and h["pairs"][1] > 0, h
    assert h["loss"][1] < 0.693147, "DPO on the round's pairs: the mean loss falls below log 2"
    assert h["kl"][1] > 0 and h["accuracy"][1] > 0 and 0 <= h["reward"][1] <= 1, h


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: CUDA graphs")
def test_cuda_graph_replay_uses_new_inputs(lesson):
    stack = lesson.DecodeStack(128, 256, 2, seed=5)
    x = torch.randn(1, 128, device="cuda", dtype=torch.float16)
    graph, out = lesson.capture_cuda_graph(stack, x)
    for _ in range(3):
        fresh = torch.randn(1, 128, device="cuda", dtype=torch.float16)
        x.copy_(fresh)
        graph.replay()
        assert_close(out.clone(), stack(fresh).double(), name="replayed decode step", atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA GPU: the interpreter has only cpu tensors")
def test_wrong_device(lesson):
    with pytest.raises(ValueError, match="CUDA device"):
        lesson.layer_norm(torch.randn(4, 32), torch.randn(32, device="cuda"), torch.randn(32, device="cuda"))
    norm = lesson.TritonLayerNorm(32, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = norm.cpu()(torch.randn(4, 32))  # parameters and input on the CPU: the fallback
    assert out.device.type == "cpu"
