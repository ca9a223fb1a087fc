"""Generalized neighborhood attention: 1-D, 2-D and 3-D neighborhoods with dilation and stride.

Neighborhood attention (Hassani et al., NAT 2023; dilated: DiNAT 2022;
strided: "Generalized Neighborhood Attention", 2025). Tokens lie on a grid
(row-major); along each axis of length n with kernel k, dilation d, stride s:
a query at coordinate x belongs to dilation group x % d, which is a sequence of
m = ceil((n - x % d) / d) positions; within it the query's position is
p = x // d, the leader of its stride group is min((p // s) * s + s // 2, m - 1),
and the window is the k consecutive positions of the group centred on the
leader, shifted to stay inside the group. A query sees a key iff the key is in
its window along every axis. stride = kernel gives blocked (windowed) attention.
"""

import torch

import flexattn
from _dense import check, dense_attention, qkv, report, torch_flex_error

HEADS, DIM = 4, 32


# --- the user's code ---------------------------------------------------------------------
def in_window(x, y, n, k, d, s):
    """Is coordinate y in the (k, dilation d, stride s) neighborhood of x on an axis of length n?"""
    group, p = x % d, x // d
    m = (n - group + d - 1) // d
    leader = torch.minimum((p // s) * s + s // 2, m - 1)  # torch.minimum: torch's vmap rejects clamp(max=tensor)
    start = torch.minimum(leader - k // 2, m - k).clamp(min=0)
    return (y % d == group) & (y // d >= start) & (y // d < start + k)


def neighborhood(shape, kernel, dilation, stride):
    def na_mask(b, h, q_idx, kv_idx):
        visible, step = True, 1
        for n, k, d, s in reversed(list(zip(shape, kernel, dilation, stride))):
            visible = visible & in_window(q_idx // step % n, kv_idx // step % n, n, k, d, s)
            step *= n
        return visible
    return na_mask
# ------------------------------------------------------------------------------------------


def axis_neighbors(n, k, d, s):
    """(n, n) bool: the paper's 1-D definition, position by position in Python."""
    near = torch.zeros(n, n, dtype=torch.bool)
    for x in range(n):
        members = list(range(x % d, n, d))  # x's dilation group
        p = members.index(x)
        leader = min((p // s) * s + s // 2, len(members) - 1)
        start = max(0, min(leader - k // 2, len(members) - k))
        near[x, members[start:start + k]] = True
    return near


def dense_mask(shape, kernel, dilation, stride):
    """The N-D neighborhood is the product of the per-axis ones (an outer product over the grid)."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for n, k, d, s in zip(shape, kernel, dilation, stride):
        near = axis_neighbors(n, k, d, s)
        mask = (mask[:, None, :, None] & near[None, :, None, :]).reshape(mask.shape[0] * n, -1)
    return mask


def grids(size):
    """Three problems of about ``size`` tokens (or more): 1-D, a non-square 2-D image, a 3-D video."""
    r = max(1, round((size / 384) ** 0.5))
    c = max(1, round((size / 960) ** (1 / 3)))
    return {"1-D": ((size,), (33,), (2,), (4,)),
            "2-D": ((16 * r, 24 * r), (7, 9), (1, 2), (2, 3)),
            "3-D": ((8 * c, 10 * c, 12 * c), (3, 5, 7), (2, 1, 1), (1, 2, 4))}


def main(size=4096, grad=True):
    results = {}
    for name, (shape, kernel, dilation, stride) in grids(size).items():
        n = int(torch.tensor(shape).prod())
        q, k, v = qkv(1, HEADS, n, DIM)
        mask_mod = neighborhood(shape, kernel, dilation, stride)
        block_mask = flexattn.create_block_mask(mask_mod, None, None, n, n)
        mask = dense_mask(shape, kernel, dilation, stride)
        errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask),
                       lambda q, k, v: dense_attention(q, k, v, mask), [q, k, v], grads=grad)
        ours = flexattn.flex_attention(q, k, v, block_mask=block_mask)
        label = f"{name} NA {'x'.join(map(str, shape))} kernel {kernel} dilation {dilation} stride {stride}"
        results[name] = report(label, n, block_mask, errors, torch_flex_error(ours, q, k, v, mask_mod=mask_mod))
    return results


if __name__ == "__main__":
    main()
