"""Relation attention pooling: torch and Triton faces against the float64 per-row reference."""

import pytest
import torch

from kernels.relation_attention import relation_attention, resolve_impl
from kernels.relation_attention_triton import BLOCK_T

# (relations R, items I, tokens T, heads H, head_dim Dh, rows B). T=37 and T=70 are not multiples of
# BLOCK_T (32), T=5 is below it; Dh=24 / 20 are not powers of two.
SHAPES = [(3, 4, 37, 2, 24, 9), (5, 3, 5, 3, 16, 11), (2, 6, 70, 1, 20, 6)]


def make_inputs(R, I, T, H, Dh, B, seed=0):
    """Random float64 inputs with padding masks; rows cover: an item under several relations, a
    relation over several items, repeated (item, relation) pairs, and one item / relation without rows."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(R, H, Dh, generator=gen, dtype=torch.float64)
    k = torch.randn(I, T, H, Dh, generator=gen, dtype=torch.float64) * 1.5
    v = torch.randn(I, T, H, Dh, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (I,), generator=gen)
    lengths[0] = T  # one item without padding
    valid = torch.arange(T)[None, :] < lengths[:, None]  # [I, T] right padding, as from the tokenizer
    valid[-1] = torch.rand(T, generator=gen) < 0.5  # and one item with holes anywhere
    valid[-1, T // 2] = True
    # Items 0..I-2 and relations 0..R-2 only: the last item / relation get no rows (zero gradient).
    row_item = torch.randint(0, max(I - 1, 1), (B,), generator=gen)
    row_relation = torch.randint(0, max(R - 1, 1), (B,), generator=gen)
    row_item[:3], row_relation[:3] = 0, torch.tensor([0, 1, 1]) % max(R - 1, 1)  # item 0 under several relations
    row_item[3:5], row_relation[3:5] = torch.tensor([1, 2]) % max(I - 1, 1), 0  # relation 0 over several items
    return q, k, v, valid, row_item, row_relation


def run(impl, dtype, q, k, v, valid, row_item, row_relation, grad_out):
    """Forward + backward of ``sum(out * grad_out)``; returns (out, dq, dk, dv) in float64."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = relation_attention(*leaves, valid, row_item, row_relation, impl=impl)
    assert out.dtype == dtype and out.shape == (row_item.shape[0], q.shape[1], q.shape[2])
    (out.double() * grad_out).sum().backward()
    return [out.detach().double()] + [x.grad.double() for x in leaves]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference_fp32(impl, shape):
    inputs = make_inputs(*shape)
    grad_out = torch.randn(shape[5], shape[3], shape[4], dtype=torch.float64)
    ref = run("reference", torch.float64, *inputs, grad_out)
    got = run(impl, torch.float32, *inputs, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m: f"{impl} {name}: {m}")
    # The relation and the item without rows get exactly zero gradient; so do padded keys.
    valid = inputs[3]
    assert got[1][-1].abs().max() == 0 and got[2][-1].abs().max() == 0 and got[3][-1].abs().max() == 0
    assert got[2][~valid].abs().max() == 0 and got[3][~valid].abs().max() == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_within_bf16_tolerance(impl):
    shape = SHAPES[0]
    inputs = make_inputs(*shape, seed=1)
    grad_out = torch.randn(shape[5], shape[3], shape[4], dtype=torch.float64)
    # The oracle sees the same bf16-rounded inputs, so the difference is the op's own rounding.
    rounded = [x.to(torch.bfloat16).double() for x in inputs[:3]]
    ref = run("reference", torch.float64, *rounded, *inputs[3:], grad_out)
    got = run(impl, torch.bfloat16, *rounded, *inputs[3:], grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 2e-2 * scale + 1e-3, f"{impl} {name}: {(a - b).abs().max()} vs scale {scale}"


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_padded_keys_and_values_are_ignored(impl):
    q, k, v, valid, row_item, row_relation = make_inputs(*SHAPES[0], seed=2)
    q, k, v = q.float(), k.float(), v.float()
    out = relation_attention(q, k, v, valid, row_item, row_relation, impl=impl)
    noise = torch.randn_like(k) * 100
    k2, v2 = torch.where(valid[..., None, None], k, noise), torch.where(valid[..., None, None], v, -noise)
    out2 = relation_attention(q, k2, v2, valid, row_item, row_relation, impl=impl)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_single_valid_key_returns_its_value(impl):
    """With one valid key the softmax is 1 there: the output is that value, whatever the query."""
    q, k, v, _, row_item, row_relation = make_inputs(*SHAPES[0], seed=3)
    q, k, v = q.float() * 10, k.float(), v.float()
    valid = torch.zeros(k.shape[:2], dtype=torch.bool)
    pos = torch.arange(k.shape[0]) * 7 % k.shape[1]
    valid[torch.arange(k.shape[0]), pos] = True
    out = relation_attention(q, k, v, valid, row_item, row_relation, impl=impl)
    torch.testing.assert_close(out, v[row_item, pos[row_item]], rtol=0, atol=1e-6)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q, k, v, valid, row_item, row_relation = make_inputs(*SHAPES[0])
    empty = valid.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"items \[1\] have no valid key"):
        relation_attention(q, k, v, empty, row_item, row_relation)
    with pytest.raises(IndexError, match="row_item must be in"):
        relation_attention(q, k, v, valid, row_item + k.shape[0], row_relation)
    with pytest.raises(IndexError, match="row_relation must be in"):
        relation_attention(q, k, v, valid, row_item, row_relation - 10)
    with pytest.raises(ValueError, match="key_valid must be a bool"):
        relation_attention(q, k, v, valid.float(), row_item, row_relation)
    with pytest.raises(ValueError, match="same H and Dh"):
        relation_attention(q[:, :1], k, v, valid, row_item, row_relation)
    with pytest.raises(ValueError, match="impl must be one of"):
        relation_attention(q, k, v, valid, row_item, row_relation, impl="flash")
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        relation_attention(q, k, v, valid, row_item, row_relation, impl="triton")  # float64
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        relation_attention(q.float(), k.float(), v.float(), valid, row_item, row_relation, impl="triton")
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda")) == "triton"


def test_triton_tiles_are_gpu_legal():
    assert BLOCK_T >= 16 and BLOCK_T & (BLOCK_T - 1) == 0


def test_benchmark_script_runs_on_cpu():
    """benchmarks/kernels_attention.py at smoke size: rows, ratios and errors are produced and sane."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_attention.py"
    spec = importlib.util.spec_from_file_location("kernels_attention_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.bench_relation_attention("cpu", items=3, per_item=2, tokens=(19,), heads=2, head_dim=16,
                                          impls=("triton", "torch"), reps=1)
    assert [r["impl"] for r in rows] == ["triton", "torch"] and all(r["ms"] > 0 and r["rows"] == 6 for r in rows)
    assert rows[1]["speedup_vs_torch"] == 1.0
    check = bench.check_relation_attention("cpu", items=3, per_item=2, tokens=19, heads=2, head_dim=16)
    assert set(check["float32"]) == {"torch", "triton"}
    assert max(check["float32"]["triton"].values()) < 1e-5 and max(check["bfloat16"]["triton"].values()) < 0.1
