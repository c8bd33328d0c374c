"""relation_contrastive_loss and all_gather_rows on 2 gloo ranks against one process on the concatenated batch.

Contract (W ranks, global loss L): the mean over ranks of every returned value is its global value; rank r's
gradient of its own rows is W x dL/d(rows); the mean over ranks of the scale gradient is dL/ds. Also: equal
to OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) on 2 ranks for singleton groups.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.oracles import load_open_clip_loss, make_batch, make_members, naive_loss, pad_members

WORLD = 2
D = 12
# name: (rows per rank, group sizes, dtype, impl, w_intra); "membership" scenarios give items several groups,
# with a different membership width on each rank
SCENARIOS = {
    "membership": ((7, 10), [4, 1, 3, 1, 2, 5, 1], torch.float64, "torch", 1.0),
    "membership_triton_fp32": ((9, 6), [4, 1, 2, 5, 3], torch.float32, "triton", 1.0),
    "singletons": ((7, 5), [1] * 12, torch.float64, "torch", 1.0),
    "spanning_unequal": ((6, 9), [4, 3, 5, 1, 2], torch.float64, "torch", 1.0),
    "no_intra_positives_on_a_rank": ((4, 8), [1, 1, 1, 1, 8], torch.float64, "torch", 1.0),
    "empty_rank": ((0, 9), [3, 1, 5], torch.float64, "torch", 1.0),
    "reference_impl": ((5, 8), [2, 6, 1, 4], torch.float64, "reference", 0.6),
    "fp32": ((8, 11), [5, 1, 3, 2, 1, 7], torch.float32, "torch", 1.0),
    "triton_fp32": ((9, 6), [4, 1, 2, 5, 3], torch.float32, "triton", 1.0),
}
CLIP_ROWS = 6  # per rank (ClipLoss needs equal row counts)


def _own(x, counts, rank):
    lo = sum(counts[:rank])
    return x[lo : lo + counts[rank]]


def _run_scenario(rank, name, counts, sizes, dtype, impl, w_intra, seed):
    from rcml.loss import relation_contrastive_loss

    u, t, g, s = make_batch(sum(counts), D, sizes, dtype=dtype, seed=seed)
    u_r, t_r = _own(u, counts, rank).clone().requires_grad_(), _own(t, counts, rank).clone().requires_grad_()
    s_r = s.to(dtype).clone().requires_grad_()
    members = None
    if name.startswith("membership"):  # padded to this rank's own width
        members = pad_members(_own(make_members(g, seed=seed, max_extra=2 + 2 * rank), counts, rank),
                              _own(g, counts, rank))
    out = relation_contrastive_loss(u_r, t_r, _own(g, counts, rank), s_r, w_intra=w_intra, impl=impl,
                                    member_groups=members)
    out["loss"].backward()
    return {"values": {k: v.detach() for k, v in out.items()}, "d_image": u_r.grad, "d_text": t_r.grad,
            "d_scale": s_r.grad}


def _run_clip(rank):
    from rcml.loss import relation_contrastive_loss

    clip_loss = load_open_clip_loss().ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
    u, t, g, s = make_batch(WORLD * CLIP_ROWS, D, [1] * (WORLD * CLIP_ROWS), seed=99)
    res = {}
    for name, fn in (("ours", lambda a, b, c, d: relation_contrastive_loss(a, b, c, d, w_intra=0.0)["loss"]),
                     ("open_clip", lambda a, b, c, d: clip_loss(a, b, d))):
        counts = [CLIP_ROWS] * WORLD
        u_r, t_r = _own(u, counts, rank).clone().requires_grad_(), _own(t, counts, rank).clone().requires_grad_()
        s_r = s.clone().requires_grad_()
        loss = fn(u_r, t_r, _own(g, counts, rank), s_r)
        loss.backward()
        res[name] = {"loss": loss.detach(), "d_image": u_r.grad, "d_text": t_r.grad, "d_scale": s_r.grad}
    return res


def _run_gather(rank):
    from kernels.distributed import all_gather_rows, all_gather_rows_nograd

    counts = (3, 5)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(counts), 4, 2, generator=gen, dtype=torch.float64)
    weights = torch.randn(WORLD, sum(counts), 4, 2, generator=gen, dtype=torch.float64)  # a different loss per rank
    x_r = _own(x, counts, rank).clone().requires_grad_()
    x_all, offset = all_gather_rows(x_r)
    (x_all * weights[rank]).sum().backward()
    ids_all, ids_offset = all_gather_rows_nograd(torch.arange(counts[rank]) + 100 * rank)
    return {"x_all": x_all.detach(), "offset": offset, "grad": x_r.grad, "x": x, "weights": weights,
            "ids_all": ids_all, "ids_offset": ids_offset}


COLLECTIVES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_object", "all_reduce",
               "reduce_scatter_single", "reduce_scatter_tensor", "broadcast", "all_to_all_single", "barrier")


def _count_collectives(fn):
    """-> (fn(), {collective: calls}) with every torch.distributed collective wrapped by a counter."""
    counts, originals = {}, {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        return fn(), counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _run_sync_counts(rank):
    """Collectives of one loss forward + backward: a RowGather kept across calls needs one all-gather
    forward (embeddings, memberships and row counts together) and one reduce-scatter backward."""
    from kernels.distributed import RowGather
    from rcml.loss import relation_contrastive_loss

    counts = (6, 9)
    u, t, g, s = make_batch(sum(counts), D, [4, 3, 5, 1, 2], dtype=torch.float32, seed=11)
    members = pad_members(_own(make_members(g, seed=11, max_extra=1 + 2 * rank), counts, rank), _own(g, counts, rank))
    gather = RowGather()

    def step():
        u_r, t_r = _own(u, counts, rank).clone().requires_grad_(), _own(t, counts, rank).clone().requires_grad_()
        out = relation_contrastive_loss(u_r, t_r, _own(g, counts, rank), s, member_groups=members, gather=gather)
        out["loss"].backward()
        return out["loss"].detach(), u_r.grad

    (first, _), first_calls = _count_collectives(step)  # the capacity is learnt: header, then rows
    (warm, grad), warm_calls = _count_collectives(step)
    return {"first": first_calls, "warm": warm_calls, "same": bool(torch.equal(first, warm)), "grad": grad}


def _run_row_gather(rank):
    """Ragged label widths, growing capacity, int64 labels whose bits are not valid floats, bf16 rows."""
    from kernels.distributed import RowGather

    gather, results = RowGather(), []
    extremes = torch.tensor([-2**63, 2**63 - 1, -1, 0x7FC00001_7FC00001, 0x7F800000_FF800000], dtype=torch.int64)
    for call, (rows, width, dtype) in enumerate([((3, 5), (2, 1), torch.float32), ((2, 7), (1, 4), torch.float32),
                                                 ((4, 0), (3, 6), torch.bfloat16), ((1, 1), (1, 1), torch.float64)]):
        gen = torch.Generator().manual_seed(call)
        values = [torch.randn(rows[r], 6, generator=gen).to(dtype) for r in range(WORLD)]
        labels = [torch.randint(-2**62, 2**62, (rows[r], width[r]), generator=gen) for r in range(WORLD)]
        labels[0][:, 0] = extremes[: rows[0]].repeat(2)[: rows[0]] if rows[0] else labels[0][:, 0]
        got, calls = _count_collectives(lambda: gather(values[rank], labels[rank]))
        results.append({"values": got.values, "labels": got.labels, "counts": got.counts, "offset": got.offset,
                        "calls": calls, "sent_values": values, "sent_labels": labels})
    return results


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {name: _run_scenario(rank, name, *spec, seed=i) for i, (name, spec) in enumerate(SCENARIOS.items())}
        results["clip"] = _run_clip(rank)
        results["gather"] = _run_gather(rank)
        results["sync_counts"] = _run_sync_counts(rank)
        results["row_gather"] = _run_row_gather(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer is still inside a collective
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    from tests.conftest import free_port

    out = tmp_path_factory.mktemp("loss_dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _global(name, seed):
    counts, sizes, dtype, impl, w_intra = SCENARIOS[name]
    u, t, g, s = make_batch(sum(counts), D, sizes, dtype=dtype, seed=seed)
    u, t, s = u.double().requires_grad_(), t.double().requires_grad_(), s.clone().requires_grad_()
    members = None
    if name.startswith("membership"):  # what each rank passed: rank r drew with max_extra = 2 + 2r
        members = [m for r in range(WORLD) for m in _own(make_members(g, seed=seed, max_extra=2 + 2 * r), counts, r)]
    out = naive_loss(u, t, g, s, w_intra=w_intra, members=members)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, u.grad, t.grad, s.grad


def _close(a, b, rtol, what):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err, ref = (a - b).abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0
    assert err <= rtol * max(ref, 1e-12), f"{what}: {err:.3e} > {rtol:.0e} x {ref:.3e}"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(rank_results, name):
    counts, sizes, dtype, impl, _ = SCENARIOS[name]
    rtol = 1e-11 if dtype == torch.float64 else 1e-6
    values, d_u, d_t, d_s = _global(name, list(SCENARIOS).index(name))
    per_rank = [res[name] for res in rank_results]
    for k, v in values.items():  # mean over ranks = global value, for the loss and each term
        _close(sum(r["values"][k] for r in per_rank) / WORLD, v, rtol, k)
    for r, res in enumerate(per_rank):  # own rows: W x global gradient
        _close(res["d_image"], WORLD * _own(d_u, counts, r), rtol, f"rank {r} d_image")
        _close(res["d_text"], WORLD * _own(d_t, counts, r), rtol, f"rank {r} d_text")
    _close(sum(r["d_scale"] for r in per_rank) / WORLD, d_s, rtol, "d_scale")
    if name == "singletons":
        assert values["ii"] == 0 and all(r["values"]["ii"] == 0 for r in per_rank)
    else:
        assert values["ii"] > 0


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_equal_open_clip_local_loss_gather_with_grad(rank_results):
    for r, res in enumerate(rank_results):
        ours, ref = res["clip"]["ours"], res["clip"]["open_clip"]
        for k in ("loss", "d_image", "d_text", "d_scale"):
            _close(ours[k], ref[k], 1e-12, f"rank {r} {k}")


@pytest.mark.slow
@pytest.mark.dist
def test_all_gather_rows_variable_counts_and_reduce_scatter_backward(rank_results):
    counts = (3, 5)
    for r, res in enumerate(res["gather"] for res in rank_results):
        x, weights = res["x"], res["weights"]
        assert res["offset"] == sum(counts[:r]) == res["ids_offset"]
        assert torch.equal(res["x_all"], x)
        # d/dx_r of sum_q <x_all, weights_q>: the sum over ranks of their weights on rank r's rows.
        _close(res["grad"], _own(weights.sum(0), counts, r), 1e-14, f"rank {r} grad")
        assert res["ids_all"].tolist() == [0, 1, 2, 100, 101, 102, 103, 104]


@pytest.mark.slow
@pytest.mark.dist
def test_the_loss_communicates_once_each_way(rank_results):
    """One all-gather forward and one reduce-scatter backward per loss call once the RowGather knows its
    capacity (before: row counts, group ids, memberships, image rows and text rows were five all-gathers,
    and the backward two reduce-scatters); a fresh RowGather gathers a header first."""
    for res in (r["sync_counts"] for r in rank_results):
        assert res["warm"] == {"all_gather_single": 1, "reduce_scatter_single": 1}, res["warm"]
        assert res["first"] == {"all_gather_single": 2, "reduce_scatter_single": 1}, res["first"]
        assert res["same"]


@pytest.mark.slow
@pytest.mark.dist
def test_row_gather_ragged_widths_growing_capacity_and_raw_label_bits(rank_results):
    per_rank = [r["row_gather"] for r in rank_results]
    gathers = []
    for r, calls in enumerate(per_rank):
        for c, res in enumerate(calls):
            sent_v, sent_l = res["sent_values"], res["sent_labels"]
            width = max(l.shape[1] for l in sent_l)
            padded = [torch.cat([l, l[:, :1].expand(-1, width - l.shape[1])], 1) for l in sent_l]
            assert res["counts"] == [v.shape[0] for v in sent_v] and res["offset"] == sum(res["counts"][:r])
            assert torch.equal(res["values"], torch.cat(sent_v)) and res["values"].dtype == sent_v[0].dtype
            assert torch.equal(res["labels"], torch.cat(padded)), (r, c)  # every bit of every hash
            gathers.append(sum(res["calls"].values()))
        assert per_rank[0][0]["labels"][:3, 0].tolist() == [-2**63, 2**63 - 1, -1]
    # call 0 learns (2 gathers); call 1 has more rows and a wider label set (2 again, the width rounded up to
    # 4); call 2 more rows (2); call 3 fits (1)
    assert gathers == [2, 2, 2, 1] * WORLD, gathers
