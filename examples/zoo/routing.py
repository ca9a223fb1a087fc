"""Routing / clustered attention: tokens attend (causally) within their cluster; cluster ids are not sorted.

Routing Transformer (Roy et al., 2021): queries and keys are assigned to the
nearest of CLUSTERS centroids (online k-means; here one fixed set of random
centroids, shared by Q and K as in the paper's shared-QK variant) and a token
attends only to earlier tokens of its own cluster. The ids are a captured
(B, L) tensor in token order: each cluster is a scattered, non-contiguous
set. Natural form: ``cluster[b, q_idx] == cluster[b, kv_idx]``. Its tiles are
nearly all partial (every tile holds every cluster), so the second form sorts
the tokens by cluster (as the paper's implementation does): the mask becomes
block diagonal, with the original positions (a captured permutation) keeping
it causal. Both are checked against the same dense formula.
"""

import torch

import flexattn
from _dense import check, dense_attention, qkv, randn, report, torch_flex_error

BATCH, HEADS, DIM, CLUSTERS = 2, 4, 64, 16


def clusters_of(x, centroids):
    """(B, L) cluster id of each token: the nearest centroid (cosine) of its key, averaged over heads."""
    x = torch.nn.functional.normalize(x.detach().mean(1), dim=-1)
    return (x @ torch.nn.functional.normalize(centroids, dim=-1).T).argmax(-1)


# --- the user's code ---------------------------------------------------------------------
def make_routing(cluster):
    def routing(b, h, q_idx, kv_idx):
        return (cluster[b, q_idx] == cluster[b, kv_idx]) & (q_idx >= kv_idx)
    return routing


def make_sorted_routing(sorted_cluster, position):  # tokens permuted so that clusters are contiguous
    def sorted_routing(b, h, q_idx, kv_idx):
        same = sorted_cluster[b, q_idx] == sorted_cluster[b, kv_idx]
        return same & (position[b, q_idx] >= position[b, kv_idx])
    return sorted_routing
# ------------------------------------------------------------------------------------------


def dense_routing_mask(cluster):
    """(B, 1, L, L): same cluster and not in the future, from the definition."""
    L = cluster.shape[-1]
    same = cluster[:, :, None] == cluster[:, None, :]
    return (same & torch.ones(L, L, dtype=torch.bool).tril())[:, None]


def main(size=8192):
    q, k, v = qkv(BATCH, HEADS, size, DIM)
    cluster = clusters_of(k, randn(CLUSTERS, DIM, seed=7, grad=False))
    mask = dense_routing_mask(cluster)
    dense = lambda q, k, v: dense_attention(q, k, v, mask)  # noqa: E731
    routing = make_routing(cluster)
    block_mask = flexattn.create_block_mask(routing, BATCH, None, size, size)
    errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask), dense, [q, k, v])
    ours = flexattn.flex_attention(q, k, v, block_mask=block_mask)
    results = {"unsorted": report("routing, cluster ids in token order", size, block_mask, errors,
                                  torch_flex_error(ours, q, k, v, mask_mod=routing, B=BATCH))}

    # Sorted by cluster (stable: each cluster keeps token order); gather in, scatter back out.
    order = torch.argsort(cluster, dim=-1, stable=True)
    sorted_routing = make_sorted_routing(torch.gather(cluster, 1, order), order)
    sorted_mask = flexattn.create_block_mask(sorted_routing, BATCH, None, size, size)
    index = order[:, None, :, None].expand(-1, HEADS, -1, DIM)

    def sorted_attention(q, k, v):
        out = flexattn.flex_attention(*(x.gather(2, index) for x in (q, k, v)), block_mask=sorted_mask)
        return torch.empty_like(out).scatter(2, index, out)
    errors = check(sorted_attention, dense, [q, k, v])
    results["sorted"] = report("routing, tokens sorted by cluster", size, sorted_mask, errors)
    return results


if __name__ == "__main__":
    main()
