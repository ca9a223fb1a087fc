"""Documents on the fused kernel beyond plain packed documents: prefix-LM documents (a bidirectional
prefix, then causal) and documents ordered by a captured position buffer (tokens sorted by cluster,
as routing attention does), ids per batch row. The pieces must be exactly the mask, and the path
must match the dense reference forward and backward; buffers that do not make documents (an order
that falls inside a document) must leave the path."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from flexattn import dispatch
from flexattn.analysis.segments import segment_mask
from flexattn.api import mask_of

PREFIX_FORMS = {
    "prefix by kv": lambda doc, ends: lambda b, h, q, kv: (doc[q] == doc[kv]) & ((kv < ends[doc[kv]]) | (q >= kv)),
    "prefix by q, reversed": lambda doc, ends: lambda b, h, q, kv: ((kv <= q) | (ends[doc[q]] > kv)) & (doc[kv] == doc[q]),
}


def _documents(draw_lengths, ids_order):
    lengths = torch.tensor(draw_lengths)
    ids = torch.tensor(ids_order[:len(draw_lengths)])
    return torch.repeat_interleave(ids, lengths), lengths


def _mask_pieces(mask_mod, L, B=1):
    traced = flexattn.trace_mask_mod(mask_mod)
    found = segment_mask(traced.graph)
    return found, [found.pieces(traced.buffers, L, b) if found else None for b in range(B)]


def _built(pieces, L):
    built = torch.zeros(L, L, dtype=torch.bool)
    for r0, r1, c0, c1, causal in pieces:
        block = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool)
        built[r0:r1, c0:c1] |= block.tril() if causal else block
    return built


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
       order=st.permutations(list(range(-3, 5))),
       ends=st.lists(st.integers(-5, 70), min_size=1, max_size=9), form=st.sampled_from(sorted(PREFIX_FORMS)))
def test_prefix_pieces_are_exactly_the_mask(lengths, order, ends, form):
    doc, _ = _documents(lengths, order)  # ids may be negative: they index the ends Python's way
    mask_mod = PREFIX_FORMS[form](doc, torch.tensor(ends))
    found, (pieces,) = _mask_pieces(mask_mod, len(doc))
    assert found is not None and found.prefix is not None and pieces is not None
    assert torch.equal(_built(pieces, len(doc)), flexattn.create_mask(mask_mod, 1, 1, len(doc), len(doc))[0, 0])


@settings(max_examples=150, deadline=None)
@given(cluster=st.lists(st.integers(0, 3), min_size=2, max_size=40), batch=st.integers(1, 2),
       shuffle=st.booleans(), seed=st.integers(0, 2**16))
def test_ordered_pieces_are_exactly_the_mask_or_refused(cluster, batch, shuffle, seed):
    g = torch.Generator().manual_seed(seed)
    cluster = torch.stack([torch.tensor(cluster)[torch.randperm(len(cluster), generator=g)] for _ in range(batch)])
    order = torch.argsort(cluster, dim=-1, stable=True)
    if shuffle:  # positions no longer increase inside a cluster (for most draws)
        order = order[:, torch.randperm(order.shape[1], generator=g)]
    sorted_cluster = torch.gather(cluster, 1, torch.argsort(cluster, dim=-1, stable=True))

    def mask_mod(b, h, q_idx, kv_idx):
        return (sorted_cluster[b, q_idx] == sorted_cluster[b, kv_idx]) & (order[b, q_idx] >= order[b, kv_idx])
    L = cluster.shape[1]
    found, pieces = _mask_pieces(mask_mod, L, batch)
    assert found is not None and found.batched and found.order is not None
    dense = flexattn.create_mask(mask_mod, batch, 1, L, L)[:, 0]
    for b, p in enumerate(pieces):
        if p is None:
            assert shuffle
        else:
            assert torch.equal(_built(p, L), dense[b])


def _check_against_reference(mask_mod, B, L, expect_fused, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, 2, L, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bm = flexattn.create_block_mask(mask_mod, B, None, L, L, BLOCK_SIZE=16)
    mask = mask_of(bm)
    call = dispatch.call_of(q, k, v, score_graph=None, score_buffers=(), mask_graph=mask.graph,
                            mask_buffers=mask.buffers, block_mask=bm, scale=1 / 4, enable_gqa=False, kernel_options={})
    chosen = dispatch.choose("torch", call).path.name
    assert (chosen == "fused_documents") == expect_fused, chosen
    out = flexattn.flex_attention(q, k, v, block_mask=bm, backend="torch", scale=1 / 4)
    ref = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference", scale=1 / 4)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(64, 160), min_size=1, max_size=4), ends=st.lists(st.integers(-10, 700), min_size=4,
       max_size=4), form=st.sampled_from(sorted(PREFIX_FORMS)), seed=st.integers(0, 2**16))
def test_prefix_lm_documents_equal_the_reference_forward_and_backward(lengths, ends, form, seed):
    doc, _ = _documents(lengths, list(range(len(lengths)))[::-1])
    mask_mod = PREFIX_FORMS[form](doc, torch.tensor(ends))
    _check_against_reference(mask_mod, 1, len(doc), True, seed)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), clusters=st.integers(1, 4), shuffle=st.booleans(), seed=st.integers(0, 2**16))
def test_sorted_clusters_equal_the_reference_forward_and_backward(B, clusters, shuffle, seed):
    g = torch.Generator().manual_seed(seed)
    L = 256
    cluster = torch.randint(0, clusters, (B, L), generator=g)
    sorted_cluster, order = torch.sort(cluster, dim=-1, stable=True)
    if shuffle:
        order = order[:, torch.randperm(L, generator=g)]

    def mask_mod(b, h, q_idx, kv_idx):
        return (sorted_cluster[b, q_idx] == sorted_cluster[b, kv_idx]) & (order[b, q_idx] >= order[b, kv_idx])
    # Shuffled positions (nearly always not increasing inside a cluster) leave the documents path.
    increasing = bool(((order[:, 1:] > order[:, :-1]) | (sorted_cluster[:, 1:] != sorted_cluster[:, :-1])).all())
    _check_against_reference(mask_mod, B, L, increasing, seed)
