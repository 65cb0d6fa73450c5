"""Lesson 12's capstone (a small GPT trained with the course's kernels): its pieces on CPU-sized
inputs. The whole script runs in tests/test_lessons_run.py; the GPU run is `make bench LESSON=12`.
The capstone has no graded exercise of its own: its kernels are the ones of lessons 07 and 08."""

import importlib
import re

import pytest
import torch

import common
from common.lessons import REPO, find

TINY = dict(layers=2, dim=32, heads=2, seq=16, hidden=64)


@pytest.fixture(scope="module")
def capstone():
    part = find("12").parts[0]  # lessons/expert/12_production_capstone.py, imported as lesson_module does
    return importlib.import_module(".".join(part.relative_to(REPO).with_suffix("").parts))


def test_the_course_model_matches_float64_eager(capstone):
    worst = capstone.check_gradients(capstone.GPTConfig(**TINY), batch=2)
    assert 0 <= worst < 1e-3


def test_a_wrong_kernel_fails_the_gradient_check(capstone, monkeypatch):
    """The check must be able to fail: a LayerNorm whose output is off by 1% is caught."""
    real = capstone.L08.layernorm
    monkeypatch.setattr(capstone.L08, "layernorm", lambda x, w, b, eps=1e-5: real(x, w, b, eps) * 1.01)
    with pytest.raises(common.CheckError):
        capstone.check_gradients(capstone.GPTConfig(**TINY), batch=2)


def test_course_op_casts_only_what_it_is_told_and_turns_autocast_off(capstone):
    seen = {}

    def fn(a, b):
        seen.update(a=a.dtype, b=b.dtype, autocast=torch.is_autocast_enabled(common.DEVICE.type))
        return a

    a, b = torch.ones(2, 2, device=common.DEVICE), torch.ones(2, device=common.DEVICE)
    with torch.autocast(common.DEVICE.type, dtype=torch.bfloat16):
        capstone.course_op(fn, a, b, cast=(0,))
    assert seen == dict(a=torch.bfloat16, b=torch.float32, autocast=False), seen
    capstone.course_op(fn, a, b, cast=(0, 1))  # autocast off: nothing is cast
    assert seen["a"] == seen["b"] == torch.float32


def test_corpus_and_batches_are_reproducible(capstone):
    corpus = capstone.make_corpus(2000, seed=4)
    text = bytes(corpus.tolist()).decode()
    assert corpus.numel() == 2000 and set(text) <= set("0123456789+*=;")
    for line in text.split(";")[1:-1]:  # whole lines (the first and last may be cut)
        lhs, rhs = line.split("=")
        assert eval(lhs) == int(rhs), line  # the corpus states true sums and products
    first, second = (list(capstone.batches(corpus, 2, 3, 16, seed=9)) for _ in range(2))
    for (i1, t1), (i2, t2) in zip(first, second):
        assert torch.equal(i1, i2) and torch.equal(t1, t2) and torch.equal(i1[:, 1:], t1[:, :-1])


def test_bad_ops_name_the_choices(capstone):
    with pytest.raises(ValueError, match="'torch' or 'course'"):
        capstone.GPT(capstone.GPTConfig(**TINY), ops="triton")


@pytest.mark.parametrize("kernel,kind", [
    ("attention_fwd_v3_kernel", "attention"), ("pytorch_flash::flash_fwd_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"), ("layernorm_bwd_kernel", "LayerNorm"),
    ("sum_rows_kernel", "LayerNorm"), ("nvjet_tst_128x256_64x4", "matmul (cuBLAS)"),
    ("sm90_xmma_gemm_bf16bf16", "matmul (cuBLAS)"), ("geglu_fwd_kernel", "GeGLU / GELU"),
    ("cross_entropy_fwd_kernel", "cross-entropy"), ("multi_tensor_apply_kernel", "optimizer"),
    ("triton_poi_fused_add_0", "other (adds, casts, copies, embedding)")])
def test_profile_kinds(capstone, kernel, kind):
    assert next(c for c, pattern in capstone.CATEGORIES if re.search(pattern, kernel.lower())) == kind


def test_slowest_parts_names_the_largest_gaps(capstone):
    kinds = [c for c, _ in capstone.CATEGORIES]
    course, eager = dict.fromkeys(kinds, 1.0), dict.fromkeys(kinds, 1.0)
    course["attention"], course["GeGLU / GELU"], course["LayerNorm"] = 3.0, 2.0, 0.5
    text = capstone.slowest_parts({"course kernels": course, "eager PyTorch": eager})
    assert text.startswith("attention 3.00 ms vs 1.00 ms; GeGLU / GELU 2.00 ms vs 1.00 ms"), text
